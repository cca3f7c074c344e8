//! Memory stalls: direct and memcg reclaim (vmscan/mm_vmscan_*_reclaim_*)
//! and compaction (compaction/mm_compaction_*). Both classes pair a begin
//! with an end on the same thread in the kernel, keep per-thread cumulative
//! statistics there (so stalls under `--min-latency-us` still count), and
//! send each stall at or over the threshold as a [`StallEvent`].

use bytemuck::{Pod, Zeroable};

use crate::{COMM_LEN, EventHeader, log2::Scale, stack::NO_STACKS};

pub use crate::FIELD_ABSENT;

/// What stalled. Also the `kind` of [`StallKey`], so that one thread's
/// reclaim and compaction pair separately.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StallKind {
    /// Global direct reclaim (mm_vmscan_direct_reclaim_begin/end).
    Direct = 0,
    /// Reclaim against a memory cgroup's limit
    /// (mm_vmscan_memcg_reclaim_begin/end).
    Memcg = 1,
    /// One compaction run over one zone (mm_compaction_begin/end).
    Compact = 2,
}

impl StallKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Direct),
            1 => Some(Self::Memcg),
            2 => Some(Self::Compact),
            _ => None,
        }
    }

    pub const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// Where the programs find the task's cgroup.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupSource {
    /// cgroup v2: `bpf_get_current_cgroup_id` and
    /// `bpf_get_current_ancestor_cgroup_id`.
    Unified = 0,
    /// A v1 memory hierarchy: the task's memory css, read through
    /// [`MemcgOffsets`].
    V1Memory = 1,
    /// Neither is usable: cgroup ids are 0 and `--cgroup` cannot be set.
    None = 2,
}

/// Byte offsets from the kernel's BTF to walk, with probe reads,
/// `task->cgroups->subsys[memory_cgrp_id]->cgroup` and from that cgroup to
/// its id (`kn->id`, which is also the inode number of its directory in the
/// cgroup mount) and its ancestors (`level`, `ancestors[]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MemcgOffsets {
    pub task_cgroups: u32,
    /// `css_set.subsys` plus 8 × `memory_cgrp_id`.
    pub css_set_memory: u32,
    pub css_cgroup: u32,
    pub cgroup_kn: u32,
    pub cgroup_level: u32,
    pub cgroup_ancestors: u32,
    pub kn_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<MemcgOffsets>() == 32);

/// Most pids `--pid` can name; the filter lives in the kernel.
pub const MAX_PIDS: usize = 8;

/// No `--cgroup`: every cgroup passes.
pub const NO_CGROUP_FILTER: u32 = u32::MAX;

/// Who to trace and how to find their cgroup; part of each memory class's
/// configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct StallFilter {
    pub memcg: MemcgOffsets,
    /// A [`CgroupSource`] as u32.
    pub cgroup_source: u32,
    /// Number of valid entries in `pids` (0 = every process).
    pub npids: u32,
    pub pids: [u32; MAX_PIDS],
    /// The `--cgroup`'s id, and its depth below the root
    /// ([`NO_CGROUP_FILTER`] without `--cgroup`).
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    /// [`StallKind::bit`]s of the kinds to trace.
    pub kinds: u32,
    /// Stalls shorter than this are only counted, not sent.
    pub min_latency_ns: u64,
    /// Stalls sent that are at least this long carry their kernel stack
    /// ([`crate::stack`]); [`NO_STACKS`] for none.
    pub stack_min_latency_ns: u64,
}
const _: () = assert!(size_of::<StallFilter>() == 32 + 8 + 32 + 8 + 8 + 8 + 8);

impl StallFilter {
    pub const DEFAULT: Self = Self {
        memcg: MemcgOffsets {
            task_cgroups: 0,
            css_set_memory: 0,
            css_cgroup: 0,
            cgroup_kn: 0,
            cgroup_level: 0,
            cgroup_ancestors: 0,
            kn_id: 0,
            _pad: 0,
        },
        cgroup_source: CgroupSource::None as u32,
        npids: 0,
        pids: [0; MAX_PIDS],
        cgroup_id: 0,
        cgroup_level: NO_CGROUP_FILTER,
        kinds: 0,
        min_latency_ns: 0,
        stack_min_latency_ns: NO_STACKS,
    };

    /// Whether the process `tgid` passes `--pid`.
    #[inline(always)]
    pub fn pid_allowed(&self, tgid: u32) -> bool {
        if self.npids == 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PIDS {
            if (i as u32) < self.npids && self.pids[i] == tgid {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// `RECLAIM_CONFIG`: tracepoint offsets and filters of the reclaim programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ReclaimConfig {
    pub filter: StallFilter,
    /// `order` of mm_vmscan_direct_reclaim_begin.
    pub direct_order: u16,
    /// `nr_reclaimed` of mm_vmscan_direct_reclaim_end and
    /// mm_vmscan_memcg_reclaim_end.
    pub direct_nr_reclaimed: u16,
    pub memcg_nr_reclaimed: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ReclaimConfig>() == size_of::<StallFilter>() + 8);

impl ReclaimConfig {
    pub const DEFAULT: Self = Self {
        filter: StallFilter::DEFAULT,
        direct_order: FIELD_ABSENT,
        direct_nr_reclaimed: FIELD_ABSENT,
        memcg_nr_reclaimed: FIELD_ABSENT,
        _pad: 0,
    };
}

/// `COMPACT_CONFIG`: tracepoint offsets and filters of the compaction
/// programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CompactConfig {
    pub filter: StallFilter,
    /// `status` and `sync` of mm_compaction_end.
    pub end_status: u16,
    pub end_sync: u16,
    /// `order` of mm_compaction_try_to_compact_pages.
    pub try_order: u16,
    pub _pad: u16,
    /// Byte offset of `flags` in `struct task_struct` (from BTF), or 0 when
    /// unknown: then no run counts as direct or kcompactd.
    pub task_flags: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<CompactConfig>() == size_of::<StallFilter>() + 16);

impl CompactConfig {
    pub const DEFAULT: Self = Self {
        filter: StallFilter::DEFAULT,
        end_status: FIELD_ABSENT,
        end_sync: FIELD_ABSENT,
        try_order: FIELD_ABSENT,
        _pad: 0,
        task_flags: 0,
        _pad2: 0,
    };
}

/// How hard compaction tried to migrate (enum migrate_mode,
/// include/linux/migrate_mode.h).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrateMode {
    Async = 0,
    SyncLight = 1,
    Sync = 2,
}

impl MigrateMode {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Async),
            1 => Some(Self::SyncLight),
            2 => Some(Self::Sync),
            _ => None,
        }
    }

    /// mm_compaction_end only says whether the run was synchronous
    /// (`cc->mode != MIGRATE_ASYNC`). Which synchronous mode follows from
    /// who ran it (mm/compaction.c): direct compaction (compact_zone_order,
    /// under PF_MEMALLOC from __alloc_pages_direct_compact) and kcompactd,
    /// a kernel thread (kcompactd_do_work, proactive_compact_node), use
    /// MIGRATE_SYNC_LIGHT; compact_node, run for writes to
    /// /proc/sys/vm/compact_memory or a node's `compact` file, MIGRATE_SYNC.
    #[inline(always)]
    pub const fn of_run(sync: bool, task_flags: u32) -> Self {
        if !sync {
            Self::Async
        } else if task_flags & (PF_MEMALLOC | PF_KTHREAD) != 0 {
            Self::SyncLight
        } else {
            Self::Sync
        }
    }
}

/// Task flags (include/linux/sched.h).
pub const PF_MEMALLOC: u32 = 0x0000_0800;
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// `order` when the tracepoints did not give one.
pub const ORDER_UNKNOWN: i32 = -1;

/// One thread's stall of one kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct StallKey {
    pub tid: u32,
    /// A [`StallKind`] as u32.
    pub kind: u32,
}
const _: () = assert!(size_of::<StallKey>() == 8);

/// A stall in progress, from its begin tracepoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct StallStart {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Allocation order, or [`ORDER_UNKNOWN`].
    pub order: i32,
    /// Compaction: the task's `flags` at begin (PF_MEMALLOC, PF_KTHREAD).
    pub flags: u32,
}
const _: () = assert!(size_of::<StallStart>() == 24);

/// One stall at or over the threshold. Sent with kind `Reclaim` or
/// `Compact`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct StallEvent {
    pub header: EventHeader,
    pub tgid: u32,
    pub tid: u32,
    /// A [`StallKind`] as u32.
    pub kind: u32,
    /// Allocation order, or [`ORDER_UNKNOWN`].
    pub order: i32,
    pub cgroup_id: u64,
    pub latency_ns: u64,
    /// Reclaim: pages reclaimed. Compaction: 0.
    pub nr_reclaimed: u64,
    /// Compaction: mm_compaction_end's `status` (enum compact_result).
    pub status: i32,
    /// Compaction: a [`MigrateMode`] as u32.
    pub mode: u32,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<StallEvent>() == 16 + 16 + 8 * 3 + 8 + 16);

/// Per-thread latency histogram: 8 buckets per power of two from 1.024 µs
/// (2^10 ns), one bucket below that, up to 2^34 ns (about 17 s), the top
/// bucket also holding everything longer. A latency's bucket is less than
/// 1/8 of its lower bound wide.
pub const HIST: Scale = Scale::new(10, 3, 33);
pub const HIST_BUCKETS: usize = HIST.buckets();

/// One thread's stalls of one kind since the agent started: counters that
/// only grow, so the agent takes differences and never has to reset them
/// (a reset would race with the programs). Written only by programs running
/// on that thread, which runs on one CPU at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct StallStats {
    pub tgid: u32,
    pub _pad: u32,
    /// Of the latest stall.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    pub count: u64,
    pub total_ns: u64,
    /// The longest stall so far.
    pub max_ns: u64,
    pub nr_reclaimed: u64,
    pub hist: [u32; HIST_BUCKETS],
    /// Makes the trailing padding explicit (HIST_BUCKETS is odd).
    pub _pad_end: u32,
}
const _: () = assert!(size_of::<StallStats>() == 64 + 4 * HIST_BUCKETS + 4);

impl StallStats {
    pub const ZERO: Self = Self {
        tgid: 0,
        _pad: 0,
        cgroup_id: 0,
        comm: [0; COMM_LEN],
        count: 0,
        total_ns: 0,
        max_ns: 0,
        nr_reclaimed: 0,
        hist: [0; HIST_BUCKETS],
        _pad_end: 0,
    };
}

impl Default for StallStats {
    fn default() -> Self {
        Self::ZERO
    }
}

crate::impl_pod!(
    MemcgOffsets,
    StallFilter,
    ReclaimConfig,
    CompactConfig,
    StallKey,
    StallStart,
    StallEvent,
    StallStats
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bounds() {
        assert_eq!(HIST_BUCKETS, 193);
        assert_eq!((HIST.bucket(1023), HIST.bucket(1024)), (0, 1));
        assert_eq!((HIST.bucket_max(1), HIST.bucket_min(2)), (1151, 1152));
        assert_eq!(HIST.bucket_min(HIST_BUCKETS - 1), 15 << 30);
        assert_eq!(HIST.bucket(u64::MAX), HIST_BUCKETS - 1);
    }

    #[test]
    fn migrate_mode_of_run() {
        assert_eq!(MigrateMode::of_run(false, PF_MEMALLOC), MigrateMode::Async);
        assert_eq!(
            MigrateMode::of_run(true, PF_MEMALLOC),
            MigrateMode::SyncLight
        );
        assert_eq!(
            MigrateMode::of_run(true, PF_KTHREAD),
            MigrateMode::SyncLight
        );
        assert_eq!(MigrateMode::of_run(true, 0), MigrateMode::Sync);
    }

    #[test]
    fn pid_filter() {
        let mut f = StallFilter::DEFAULT;
        assert!(f.pid_allowed(5));
        f.npids = 2;
        f.pids[0] = 5;
        f.pids[1] = 6;
        assert!(f.pid_allowed(6));
        assert!(!f.pid_allowed(7));
    }
}
