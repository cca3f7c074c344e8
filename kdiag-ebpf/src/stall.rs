//! What the memory-stall programs (reclaim, compaction) share: pairing a
//! begin with its end on the same thread, the filters, the task's memory
//! cgroup, and the per-thread statistics.
//!
//! Reclaim and compaction run synchronously in the stalled task's context
//! (mm/vmscan.c try_to_free_pages and try_to_free_mem_cgroup_pages,
//! mm/compaction.c compact_zone), so begin and end of one stall fire on the
//! same thread with nothing of the same kind nested in between: a map keyed
//! by (thread, kind) pairs them.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_task},
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use kdiag_common::{
    ClassId, EventKind, LOSS_MAP_FULL,
    memory::{
        CgroupSource, HIST, NO_CGROUP_FILTER, StallEvent, StallFilter, StallKey, StallKind,
        StallStart, StallStats,
    },
};

use crate::{
    cost::gates,
    output::{count_loss, emit, header},
    stack::{StackedSlot, emit_stacked, stacked_slot},
};

/// Stalls in progress. LRU: a begin whose end never comes (the agent
/// attached or detached in between) ages out instead of filling the map,
/// and an end without a begin finds nothing and is ignored.
///
/// One entry in the object: the agent sizes it at load for the classes that
/// run (see `Class::map_sizes`), and leaves it this small for the others.
#[map]
static STALL_STARTS: LruHashMap<StallKey, StallStart> = LruHashMap::with_max_entries(1, 0);

/// One all-zero value to create statistics entries from: a `StallStats` is
/// larger than the 512-byte BPF stack. Never written.
#[map]
static STATS_ZERO: Array<StallStats> = Array::with_max_entries(1, 0);

/// Where a stall's event is built with its kernel stack (see stack.rs).
#[map]
static STALL_STACKED: StackedSlot<StallEvent> = stacked_slot();

/// Per-thread statistics map type. Not preallocated: entries cost memory
/// only for threads that stalled. Not LRU: an entry evicted silently would
/// lose counts; when full, new threads' stalls are counted as dropped.
/// One entry in the object, sized by the agent like `STALL_STARTS`.
pub(crate) type StatsMap = HashMap<StallKey, StallStats>;

pub(crate) const fn stats_map() -> StatsMap {
    HashMap::with_max_entries(1, BPF_F_NO_PREALLOC)
}

#[inline(always)]
fn read_u64(addr: u64) -> Result<u64, i64> {
    // SAFETY: probe read of kernel memory; a fault returns an error.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.map_err(i64::from)
}

/// The current task's memory cgroup id (0 when unknown), and whether it is
/// the `--cgroup` or below it.
#[inline(always)]
fn current_cgroup(f: &StallFilter) -> (u64, bool) {
    let unfiltered = f.cgroup_level == NO_CGROUP_FILTER;
    if f.cgroup_source == CgroupSource::Unified as u32 {
        // SAFETY: a helper without arguments.
        let id = unsafe { bpf_get_current_cgroup_id() };
        let ok = unfiltered
            // SAFETY: a helper without pointer arguments.
            || unsafe { bpf_get_current_ancestor_cgroup_id(f.cgroup_level as i32) } == f.cgroup_id;
        (id, ok)
    } else if f.cgroup_source == CgroupSource::V1Memory as u32 {
        // A read that faults (a cgroup being torn down) leaves the stall
        // without a cgroup; it then fails a `--cgroup` filter.
        v1_memory_cgroup(f).unwrap_or((0, unfiltered))
    } else {
        // The agent refuses `--cgroup` without a cgroup source.
        (0, true)
    }
}

/// `task->cgroups->subsys[memory_cgrp_id]->cgroup`: the v1 memory cgroup,
/// which is where the limit being reclaimed against lives on a hybrid host
/// (the v2 helpers only see the unified hierarchy). For the filter, its
/// ancestor at the filter's level (`cgroup->ancestors[level]`, as
/// cgroup_ancestor() in include/linux/cgroup.h) must be the `--cgroup`.
#[inline(always)]
fn v1_memory_cgroup(f: &StallFilter) -> Result<(u64, bool), i64> {
    let o = &f.memcg;
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let css_set = read_u64(task + u64::from(o.task_cgroups))?;
    let css = read_u64(css_set + u64::from(o.css_set_memory))?;
    let cgroup = read_u64(css + u64::from(o.css_cgroup))?;
    let id = read_u64(read_u64(cgroup + u64::from(o.cgroup_kn))? + u64::from(o.kn_id))?;
    if f.cgroup_level == NO_CGROUP_FILTER {
        return Ok((id, true));
    }
    // SAFETY: as read_u64.
    let level: i32 =
        unsafe { bpf_probe_read_kernel((cgroup + u64::from(o.cgroup_level)) as *const i32) }
            .map_err(i64::from)?;
    if level < 0 || (level as u32) < f.cgroup_level {
        return Ok((id, false));
    }
    let ancestor =
        read_u64(cgroup + u64::from(o.cgroup_ancestors) + 8 * u64::from(f.cgroup_level))?;
    let ancestor_id = read_u64(read_u64(ancestor + u64::from(o.cgroup_kn))? + u64::from(o.kn_id))?;
    Ok((id, ancestor_id == f.cgroup_id))
}

/// A begin tracepoint: remembers when (and with what order) the current
/// thread started stalling, if it passes the filters. `flags` is kept for
/// the end (compaction's task flags).
#[inline(always)]
pub(crate) fn begin(f: &StallFilter, kind: StallKind, order: i32, flags: u32) -> Result<u32, i64> {
    if f.kinds & kind.bit() == 0 {
        return Ok(0);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !f.pid_allowed((pid_tgid >> 32) as u32) {
        return Ok(0);
    }
    let (cgroup_id, ok) = current_cgroup(f);
    if !ok {
        return Ok(0);
    }
    let key = StallKey {
        tid: pid_tgid as u32,
        kind: kind as u32,
    };
    let start = StallStart {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id,
        order,
        flags,
    };
    STALL_STARTS.insert(key, start, 0).map_err(i64::from)?;
    Ok(0)
}

/// A stall that ended on the current thread.
pub(crate) struct Ended {
    pub(crate) start: StallStart,
    pub(crate) tgid: u32,
    pub(crate) tid: u32,
    pub(crate) latency_ns: u64,
}

/// An end tracepoint: the matching begin of the current thread, taken out
/// of the map. `None`: no begin (filtered out, or it predates the agent).
#[inline(always)]
pub(crate) fn end(kind: StallKind) -> Option<Ended> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let key = StallKey {
        tid: pid_tgid as u32,
        kind: kind as u32,
    };
    // SAFETY: the value is copied out before the entry is removed.
    let start = *unsafe { STALL_STARTS.get(key) }?;
    let _ = STALL_STARTS.remove(key);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    Some(Ended {
        start,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        latency_ns: now.saturating_sub(start.ts_ns),
    })
}

/// What one end adds to the record and the statistics.
pub(crate) struct Outcome {
    pub(crate) kind: StallKind,
    pub(crate) order: i32,
    pub(crate) nr_reclaimed: u64,
    pub(crate) status: i32,
    pub(crate) mode: u32,
}

/// Counts an ended stall in the thread's statistics and sends it if it is
/// at or over the threshold.
#[inline(always)]
pub(crate) fn finish<C: EbpfContext>(
    ctx: &C,
    class: ClassId,
    event_kind: EventKind,
    stats: &StatsMap,
    f: &StallFilter,
    ended: &Ended,
    outcome: &Outcome,
) -> Result<u32, i64> {
    let comm = bpf_get_current_comm().unwrap_or_default();
    let key = StallKey {
        tid: ended.tid,
        kind: outcome.kind as u32,
    };
    match thread_stats(stats, key) {
        Some(s) => {
            let lat = ended.latency_ns;
            let bucket = HIST.bucket(lat);
            // SAFETY: a live map value. Only this thread's programs write
            // it (the key holds its tid), and a thread runs on one CPU at a
            // time; classic tracepoint programs do not nest on a CPU. So
            // plain updates cannot race.
            unsafe {
                (*s).tgid = ended.tgid;
                (*s).cgroup_id = ended.start.cgroup_id;
                (*s).comm = comm;
                (*s).count += 1;
                (*s).total_ns += lat;
                if lat > (*s).max_ns {
                    (*s).max_ns = lat;
                }
                (*s).nr_reclaimed += outcome.nr_reclaimed;
                if let Some(slot) = (*s).hist.get_mut(bucket) {
                    *slot += 1;
                }
            }
        }
        // The statistics map is full: this stall will be missing from the
        // summaries, so count it where losses are reported.
        None => count_loss(class, LOSS_MAP_FULL),
    }
    if ended.latency_ns < f.min_latency_ns || ended.latency_ns < gates().min_latency_ns {
        return Ok(0);
    }
    let event = StallEvent {
        header: header(event_kind),
        tgid: ended.tgid,
        tid: ended.tid,
        kind: outcome.kind as u32,
        order: outcome.order,
        cgroup_id: ended.start.cgroup_id,
        latency_ns: ended.latency_ns,
        nr_reclaimed: outcome.nr_reclaimed,
        status: outcome.status,
        mode: outcome.mode,
        comm,
    };
    if ended.latency_ns >= f.stack_min_latency_ns {
        emit_stacked(ctx, class, &STALL_STACKED, &event);
    } else {
        emit(ctx, class, &event);
    }
    Ok(0)
}

/// The statistics entry of `key`, created (zeroed) on first use.
#[inline(always)]
fn thread_stats(stats: &StatsMap, key: StallKey) -> Option<*mut StallStats> {
    if let Some(s) = stats.get_ptr_mut(key) {
        return Some(s);
    }
    let zero = STATS_ZERO.get(0)?;
    // NOEXIST: never overwrite counts.
    let _ = stats.insert(key, zero, u64::from(BPF_NOEXIST));
    stats.get_ptr_mut(key)
}
