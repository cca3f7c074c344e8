//! The programs' own cost accounting, and the budget's gates.
//!
//! Every program entry goes through [`measured`]: a per-CPU run counter and,
//! one run in `SAMPLE_EVERY`, two clock reads around the body. The agent
//! reads these counters every interval instead of turning on the kernel's
//! host-wide BPF statistics (see kdiag_common::cost).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, PerCpuArray},
};
use kdiag_common::cost::{BudgetGates, PROGRAM_COUNT, ProgramCost, ProgramId, SAMPLE_EVERY};

/// Per program, per CPU: runs, and the timed ones.
#[map]
static PROGRAM_COST: PerCpuArray<ProgramCost> = PerCpuArray::with_max_entries(PROGRAM_COUNT, 0);

/// The budget's gates, written by the agent (all zero: full detail).
#[map]
static BUDGET: Array<BudgetGates> = Array::with_max_entries(1, 0);

/// The gates in force; full detail if the map cannot be read.
#[inline(always)]
pub(crate) fn gates() -> &'static BudgetGates {
    const FULL: BudgetGates = BudgetGates {
        softirq_paused: 0,
        delay_shed: 0,
        softirq_since_ns: 0,
        min_latency_ns: 0,
        drop_events_shed: 0,
        _pad: 0,
    };
    BUDGET.get(0).unwrap_or(&FULL)
}

/// Runs `body`, the program `program`'s work, counting the run and timing
/// one run in `SAMPLE_EVERY` on each CPU (the first included), in the
/// program's slot of the cost map.
#[inline(always)]
pub(crate) fn measured(program: ProgramId, body: impl FnOnce() -> u32) -> u32 {
    match PROGRAM_COST.get_ptr_mut(program as u32) {
        Some(cost) => measured_in(cost, body),
        // Never taken: every program's index is below the map's size, and
        // a per-CPU array has a slot at each index on every CPU. The
        // verifier does not know that; were the body run here too, it
        // would check the whole program a second time, for this path (half
        // of inet_sock_set_state's verification, the longest part of the
        // agent's start-up).
        None => 0,
    }
}

/// [`measured`], counting in `cost`: a per-CPU slot of this program's own
/// (the softirq programs keep theirs beside the state they work on).
///
/// A program never runs twice at once on a CPU (classic tracepoint programs
/// never nest on a CPU at all, and BTF tracepoint programs have a
/// per-program recursion guard), so the plain updates cannot race. Before
/// that guard (2022; see tcp.rs), a run in the middle of another of the same
/// program can make one of these counts miss a run or mistime one: they
/// are the programs' cost, not their events. The
/// start time is kept in the slot, not in a register: with a register the
/// verifier would check the body twice, once for a timed run and once for
/// an untimed one.
#[inline(always)]
pub(crate) fn measured_in(cost: *mut ProgramCost, body: impl FnOnce() -> u32) -> u32 {
    // SAFETY: `cost` is a live per-CPU map value (above).
    let runs = unsafe { (*cost).runs };
    // SAFETY: as above.
    unsafe { (*cost).runs = runs + 1 };
    if runs & (SAMPLE_EVERY - 1) == 0 {
        // SAFETY: as above; the helper takes no arguments.
        unsafe { (*cost).started_ns = bpf_ktime_get_ns() };
    }
    let ret = body();
    // Read back from the map: whether this run is timed is not carried in
    // a register across the body (see above).
    // SAFETY: as above.
    let runs = unsafe { core::ptr::read_volatile(&raw const (*cost).runs) };
    if runs.wrapping_sub(1) & (SAMPLE_EVERY - 1) == 0 {
        // SAFETY: as above; the helper takes no arguments.
        unsafe {
            let elapsed = bpf_ktime_get_ns().saturating_sub((*cost).started_ns);
            (*cost).timed_runs += 1;
            (*cost).timed_ns += elapsed;
        }
    }
    ret
}
