//! Softirq programs: per-CPU, per-vector histograms of service time (entry
//! to exit) and queueing delay (raise to entry).
//!
//! Softirqs run up to millions of times a second, so nothing leaves the
//! kernel per softirq but the ones at or over the threshold. The hot path is
//! one per-CPU array lookup (the vector's slot, which also counts the
//! program's runs), one clock read and a few loads and stores per program;
//! no hash map, no helper beyond those.
//!
//! Pairing relies on kernel/softirq.c: `__raise_softirq_irqoff` traces
//! softirq_raise and sets the vector pending on the current CPU; only that
//! CPU's `handle_softirqs` runs it, tracing softirq_entry and softirq_exit
//! around each handler. Handlers never nest on a CPU (they run with softirqs
//! disabled), so one slot per CPU and vector holds all the state.
//!
//! Each program has two entry points around one body that takes the
//! decoded `vec`: a BTF tracepoint (tp_btf), where the kernel hands the
//! tracepoint's arguments straight to the program, without filling a trace
//! record first, and a classic tracepoint, which reads `vec` from the record
//! and is the fallback where the kernel has no BTF for the tracepoint. The
//! agent loads one of the two per tracepoint.
//!
//! Every slot is per-CPU, and no program preempts itself or another of
//! these on a CPU: classic tracepoint programs never nest on one CPU (the
//! kernel's per-CPU `bpf_prog_active` guard skips a program that would
//! start while another runs there), and BTF tracepoint programs have a
//! per-program guard. A raise from a hard interrupt can land in the middle
//! of an entry or exit program of the same CPU, though, and a raise only
//! touches its own vector's `raise_ns`, which the entry program reads and
//! clears: such a raise can be lost (its softirq then has no delay), never
//! corrupt a count. So plain increments cannot race.

use core::ptr;

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext},
};
use kdiag_common::{
    ClassId, EventKind,
    cost::ProgramId,
    softirq::{HIST, NO_DELAY, NR_SOFTIRQS, SoftirqConfig, SoftirqEvent, SoftirqSlot, cost_index},
};

use crate::{
    cost::{gates, measured, measured_in},
    ctx,
    output::{counted, emit, header_at},
    rodata::rodata,
    stack::{StackedSlot, emit_stacked, stacked_slot},
};

/// Offsets and threshold, written by the agent at load.
#[unsafe(no_mangle)]
static SOFTIRQ_CONFIG: SoftirqConfig = SoftirqConfig::DEFAULT;

/// Per CPU, per vector: pending raise, running handler, histograms.
#[map]
static SOFTIRQ: PerCpuArray<SoftirqSlot> = PerCpuArray::with_max_entries(NR_SOFTIRQS, 0);

/// The interval generation, bumped by the agent every interval (see
/// `SoftirqSlot::max`).
#[map]
static SOFTIRQ_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Where a slow softirq's event is built with its kernel stack (see
/// stack.rs).
#[map]
static SOFTIRQ_STACKED: StackedSlot<SoftirqEvent> = stacked_slot();

/// Where `vec` has been in every kernel's softirq records so far (right
/// after the 8-byte common header).
const USUAL_VEC_OFFSET: u16 = 8;

#[inline(always)]
fn config() -> &'static SoftirqConfig {
    rodata(&SOFTIRQ_CONFIG)
}

/// The record's `vec` (a 4-byte field: the agent checks its size) at
/// `offset`, if it is a vector the kernel has.
#[inline(always)]
fn record_vec(ctx: &TracePointContext, offset: u16) -> Result<u32, i64> {
    known_vec(ctx::field(ctx, offset, USUAL_VEC_OFFSET)?)
}

/// The BTF tracepoint's `vec_nr`, its only argument in every kernel that
/// has BTF tracepoints (include/trace/events/irq.h, the softirq event
/// class: `TP_PROTO(unsigned int vec_nr)`), if it is a vector the kernel
/// has.
#[inline(always)]
fn arg_vec(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    known_vec(ctx.arg::<u64>(0) as u32)
}

#[inline(always)]
fn known_vec(vec: u32) -> Result<u32, i64> {
    if vec < NR_SOFTIRQS { Ok(vec) } else { Err(-1) }
}

#[inline(always)]
fn slot(vec: u32) -> Result<*mut SoftirqSlot, i64> {
    SOFTIRQ.get_ptr_mut(vec).ok_or(-1)
}

/// Runs `body` on `vec`'s slot, counting the run in the slot
/// (`SoftirqSlot::cost`): one lookup per run for both. A run without a
/// known vector is counted in the cost map, and as the class's `failed`.
#[inline(always)]
fn run(
    program: ProgramId,
    vec: Result<u32, i64>,
    body: impl FnOnce(u32, *mut SoftirqSlot) -> Result<u32, i64>,
) -> u32 {
    // Only the three softirq programs come here, each with its constant
    // id: the match folds away.
    let index = match cost_index(program) {
        Some(i) => i,
        None => 0,
    };
    match vec.and_then(|v| Ok((v, slot(v)?))) {
        Ok((vec, s)) => {
            // SAFETY: a live per-CPU map value (see the module comment).
            let cost = unsafe { &raw mut (*s).cost[index] };
            measured_in(cost, || counted(ClassId::Softirq, body(vec, s)))
        }
        Err(e) => measured(program, || counted(ClassId::Softirq, Err(e))),
    }
}

#[btf_tracepoint(function = "softirq_raise")]
pub(crate) fn softirq_raise_btf(ctx: BtfTracePointContext) -> u32 {
    run(ProgramId::SoftirqRaise, arg_vec(&ctx), try_softirq_raise)
}

#[tracepoint]
pub(crate) fn softirq_raise(ctx: TracePointContext) -> u32 {
    run(
        ProgramId::SoftirqRaise,
        record_vec(&ctx, config().raise_vec),
        try_softirq_raise,
    )
}

#[inline(always)]
fn try_softirq_raise(_vec: u32, s: *mut SoftirqSlot) -> Result<u32, i64> {
    let gates = gates();
    if gates.softirq_paused != 0 || gates.delay_shed != 0 {
        // The budget sheds queueing delay, or all measuring: counted only.
        return Ok(0);
    }
    // SAFETY: a live per-CPU map value (see the module comment).
    unsafe {
        // Keep the first raise: later ones while it is pending wait no
        // longer than it does, and the clock is only read when needed.
        if (*s).raise_ns == 0 {
            (*s).raise_ns = bpf_ktime_get_ns();
        }
    }
    Ok(0)
}

#[btf_tracepoint(function = "softirq_entry")]
pub(crate) fn softirq_entry_btf(ctx: BtfTracePointContext) -> u32 {
    run(ProgramId::SoftirqEntry, arg_vec(&ctx), try_softirq_entry)
}

#[tracepoint]
pub(crate) fn softirq_entry(ctx: TracePointContext) -> u32 {
    run(
        ProgramId::SoftirqEntry,
        record_vec(&ctx, config().entry_vec),
        try_softirq_entry,
    )
}

#[inline(always)]
fn try_softirq_entry(_vec: u32, s: *mut SoftirqSlot) -> Result<u32, i64> {
    let gates = gates();
    if gates.softirq_paused != 0 {
        // Off phase of the budget's duty cycle: this run is not measured
        // (its exit finds no entry time of the current phase).
        return Ok(0);
    }
    let since = gates.softirq_since_ns;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a live per-CPU map value (see the module comment).
    unsafe {
        let raised = (*s).raise_ns;
        (*s).raise_ns = 0;
        // No raise seen (agent started while it was pending, or a raise
        // left from before the budget paused measuring): service time
        // only. The clock is per-CPU monotonic, but stay safe.
        (*s).delay_ns = if raised != 0 && raised >= since && raised <= now {
            now - raised
        } else {
            NO_DELAY
        };
        (*s).entry_ns = now;
    }
    Ok(0)
}

#[btf_tracepoint(function = "softirq_exit")]
pub(crate) fn softirq_exit_btf(ctx: BtfTracePointContext) -> u32 {
    run(ProgramId::SoftirqExit, arg_vec(&ctx), |vec, s| {
        try_softirq_exit(&ctx, vec, s)
    })
}

#[tracepoint]
pub(crate) fn softirq_exit(ctx: TracePointContext) -> u32 {
    run(
        ProgramId::SoftirqExit,
        record_vec(&ctx, config().exit_vec),
        |vec, s| try_softirq_exit(&ctx, vec, s),
    )
}

/// `ctx` is only for the perf transport's output helper.
#[inline(always)]
fn try_softirq_exit<C: EbpfContext>(ctx: &C, vec: u32, s: *mut SoftirqSlot) -> Result<u32, i64> {
    let cfg = config();
    let gates = gates();
    // SAFETY: a live per-CPU map value (see the module comment).
    let (entry, mut delay) = unsafe { ((*s).entry_ns, (*s).delay_ns) };
    if gates.delay_shed != 0 {
        // Shed by the budget: also the delay of a handler that entered just
        // before, so that no summary of a step without delays has one.
        delay = NO_DELAY;
    }
    if entry == 0 || entry < gates.softirq_since_ns {
        // Its entry was not seen: the agent attached mid-handler, the entry
        // program was skipped, or it ran in a duty cycle's off phase (an
        // entry time older than the current phase is a leftover of an exit
        // that was skipped). Not counted.
        return Ok(0);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let service = now.saturating_sub(entry);
    let slowest = if delay == NO_DELAY || delay < service {
        service
    } else {
        delay
    };
    // Out first, counted second: at exit the agent detaches, drains the
    // buffer, then reads the counters, so a program still running on
    // another CPU while it detaches cannot leave a counted softirq without
    // its event in a `--min-latency-us 0` run.
    if slowest >= cfg.min_latency_ns && slowest >= gates.min_latency_ns {
        let event = SoftirqEvent {
            header: header_at(EventKind::Softirq, now),
            vec,
            _pad: 0,
            service_ns: service,
            delay_ns: delay,
        };
        if service >= cfg.stack_min_latency_ns {
            emit_stacked(ctx, ClassId::Softirq, &SOFTIRQ_STACKED, &event);
        } else {
            emit(ctx, ClassId::Softirq, &event);
        }
    }
    let generation = SOFTIRQ_GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: a live per-CPU map value (see the module comment).
    unsafe {
        (*s).entry_ns = 0;
        (*s).service_total_ns += service;
        // u32 buckets wrap (see `SoftirqSlot`).
        let bucket = &mut (*s).service_buckets[HIST.bucket(service)];
        *bucket = bucket.wrapping_add(1);
        let max = &mut (*s).max[(generation & 1) as usize];
        if max.generation != generation {
            // Field by field: a struct assignment becomes a memset call.
            max.generation = generation;
            ptr::write_volatile(&raw mut max.service_ns, 0);
            ptr::write_volatile(&raw mut max.delay_ns, 0);
        }
        if service > max.service_ns {
            max.service_ns = service;
        }
        if delay != NO_DELAY {
            let bucket = &mut (*s).delay_buckets[HIST.bucket(delay)];
            *bucket = bucket.wrapping_add(1);
            if delay > max.delay_ns {
                max.delay_ns = delay;
            }
        }
    }
    Ok(0)
}
