//! Reclaim programs: direct reclaim (the allocating task reclaims because
//! the zone is under its watermark, mm/vmscan.c try_to_free_pages) and memcg
//! reclaim (the task's memory cgroup is at its limit,
//! try_to_free_mem_cgroup_pages). Each pair brackets one reclaim call on the
//! stalled thread.

use aya_ebpf::{
    macros::{map, tracepoint},
    programs::TracePointContext,
};
use kdiag_common::{
    ClassId, EventKind,
    cost::ProgramId,
    memory::{FIELD_ABSENT, ORDER_UNKNOWN, ReclaimConfig, StallKind},
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
static RECLAIM_CONFIG: ReclaimConfig = ReclaimConfig::DEFAULT;

/// Per-thread reclaim statistics, read by the agent every interval.
#[map]
static RECLAIM_STATS: StatsMap = stall::stats_map();

#[inline(always)]
fn config() -> &'static ReclaimConfig {
    rodata(&RECLAIM_CONFIG)
}

#[tracepoint]
pub(crate) fn direct_reclaim_begin(ctx: TracePointContext) -> u32 {
    measured(ProgramId::DirectReclaimBegin, || {
        counted(ClassId::Reclaim, try_direct_reclaim_begin(&ctx))
    })
}

fn try_direct_reclaim_begin(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = config();
    // The memory tracepoints fire once per stall, rarely enough to read
    // their fields with the helper wherever they are: no usual offsets.
    let order: i32 = ctx::field(ctx, cfg.direct_order, FIELD_ABSENT).unwrap_or(ORDER_UNKNOWN);
    stall::begin(&cfg.filter, StallKind::Direct, order, 0)
}

#[tracepoint]
pub(crate) fn memcg_reclaim_begin(_ctx: TracePointContext) -> u32 {
    measured(ProgramId::MemcgReclaimBegin, || {
        counted(ClassId::Reclaim, try_memcg_reclaim_begin())
    })
}

fn try_memcg_reclaim_begin() -> Result<u32, i64> {
    // The begin's `order` is the charge's, not an allocation order worth
    // reporting (the contract has none for memcg reclaim).
    stall::begin(&config().filter, StallKind::Memcg, ORDER_UNKNOWN, 0)
}

#[tracepoint]
pub(crate) fn direct_reclaim_end(ctx: TracePointContext) -> u32 {
    measured(ProgramId::DirectReclaimEnd, || {
        let offset = config().direct_nr_reclaimed;
        counted(
            ClassId::Reclaim,
            try_reclaim_end(&ctx, StallKind::Direct, offset),
        )
    })
}

#[tracepoint]
pub(crate) fn memcg_reclaim_end(ctx: TracePointContext) -> u32 {
    measured(ProgramId::MemcgReclaimEnd, || {
        let offset = config().memcg_nr_reclaimed;
        counted(
            ClassId::Reclaim,
            try_reclaim_end(&ctx, StallKind::Memcg, offset),
        )
    })
}

fn try_reclaim_end(
    ctx: &TracePointContext,
    kind: StallKind,
    nr_reclaimed_offset: u16,
) -> Result<u32, i64> {
    let Some(ended) = stall::end(kind) else {
        return Ok(0);
    };
    let cfg = config();
    let outcome = Outcome {
        kind,
        order: ended.start.order,
        nr_reclaimed: ctx::field(ctx, nr_reclaimed_offset, FIELD_ABSENT).unwrap_or(0),
        status: 0,
        mode: 0,
    };
    stall::finish(
        ctx,
        ClassId::Reclaim,
        EventKind::Reclaim,
        &RECLAIM_STATS,
        &cfg.filter,
        &ended,
        &outcome,
    )
}
