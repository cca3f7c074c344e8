//! Compaction programs. mm_compaction_begin/end bracket one compact_zone()
//! run over one zone (mm/compaction.c), on the thread that runs it: the
//! allocating task for direct compaction, kcompactd for background and
//! proactive compaction, the writer of /proc/sys/vm/compact_memory for a
//! manual one. Direct compaction announces itself with
//! mm_compaction_try_to_compact_pages, which gives the allocation's order.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_get_current_task},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use kdiag_common::{
    ClassId, EventKind,
    cost::ProgramId,
    memory::{CompactConfig, FIELD_ABSENT, MigrateMode, ORDER_UNKNOWN, PF_MEMALLOC, StallKind},
};

use crate::{
    cost::measured,
    ctx,
    output::counted,
    rodata::rodata,
    stall::{self, Outcome, StatsMap},
};

/// Offsets and filters, written by the agent at load.
#[unsafe(no_mangle)]
static COMPACT_CONFIG: CompactConfig = CompactConfig::DEFAULT;

/// Per-thread compaction statistics, read by the agent every interval.
#[map]
static COMPACT_STATS: StatsMap = stall::stats_map();

/// Thread -> order of its latest direct compaction request. Each request
/// overwrites it, so it is current whenever the thread compacts directly.
/// One entry in the object: the agent sizes it at load for the classes that
/// run (see `Class::map_sizes`), and leaves it this small for the others.
#[map]
static TRY_ORDER: LruHashMap<u32, i32> = LruHashMap::with_max_entries(1, 0);

#[inline(always)]
fn config() -> &'static CompactConfig {
    rodata(&COMPACT_CONFIG)
}

#[tracepoint]
pub(crate) fn try_to_compact_pages(ctx: TracePointContext) -> u32 {
    measured(ProgramId::TryToCompactPages, || {
        counted(ClassId::Compact, try_try_to_compact_pages(&ctx))
    })
}

fn try_try_to_compact_pages(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if !cfg.filter.pid_allowed((pid_tgid >> 32) as u32) {
        return Ok(0);
    }
    // As in the reclaim programs, fields are read with the helper (no usual
    // offsets): these tracepoints fire once per compaction run.
    let order: i32 = ctx::field(ctx, cfg.try_order, FIELD_ABSENT)?;
    TRY_ORDER
        .insert(pid_tgid as u32, order, 0)
        .map_err(i64::from)?;
    Ok(0)
}

/// The current task's `flags`, or 0 when their offset is unknown.
#[inline(always)]
fn task_flags(cfg: &CompactConfig) -> u32 {
    if cfg.task_flags == 0 {
        return 0;
    }
    // SAFETY: helper without arguments, then a probe read of kernel memory.
    unsafe {
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + u64::from(cfg.task_flags)) as *const u32).unwrap_or(0)
    }
}

#[tracepoint]
pub(crate) fn compaction_begin(_ctx: TracePointContext) -> u32 {
    measured(ProgramId::CompactionBegin, || {
        counted(ClassId::Compact, try_compaction_begin())
    })
}

fn try_compaction_begin() -> Result<u32, i64> {
    let cfg = config();
    let flags = task_flags(cfg);
    let tid = bpf_get_current_pid_tgid() as u32;
    // __alloc_pages_direct_compact() runs try_to_compact_pages() under
    // memalloc_noreclaim_save(), i.e. with PF_MEMALLOC: a run with it set is
    // direct compaction and its request's order applies. Without it the
    // order is unknown (kcompactd, compact_memory).
    let order = if flags & PF_MEMALLOC != 0 {
        // SAFETY: copied out at once.
        unsafe { TRY_ORDER.get(tid) }
            .copied()
            .unwrap_or(ORDER_UNKNOWN)
    } else {
        ORDER_UNKNOWN
    };
    stall::begin(&cfg.filter, StallKind::Compact, order, flags)
}

#[tracepoint]
pub(crate) fn compaction_end(ctx: TracePointContext) -> u32 {
    measured(ProgramId::CompactionEnd, || {
        counted(ClassId::Compact, try_compaction_end(&ctx))
    })
}

fn try_compaction_end(ctx: &TracePointContext) -> Result<u32, i64> {
    let Some(ended) = stall::end(StallKind::Compact) else {
        return Ok(0);
    };
    let cfg = config();
    let sync: u8 = ctx::field(ctx, cfg.end_sync, FIELD_ABSENT).unwrap_or(0);
    let outcome = Outcome {
        kind: StallKind::Compact,
        order: ended.start.order,
        nr_reclaimed: 0,
        status: ctx::field(ctx, cfg.end_status, FIELD_ABSENT).unwrap_or(-1),
        mode: MigrateMode::of_run(sync != 0, ended.start.flags) as u32,
    };
    stall::finish(
        ctx,
        ClassId::Compact,
        EventKind::Compact,
        &COMPACT_STATS,
        &cfg.filter,
        &ended,
        &outcome,
    )
}
