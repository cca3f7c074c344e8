//! The one way events leave the kernel: the BPF ring buffer, or a per-CPU
//! perf event array where the agent asked for it. Every failed output is
//! counted per class in a per-CPU array, so the agent can report it.

use core::{arch::asm, ffi::c_void, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_CPU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, generated::bpf_perf_event_output},
    macros::map,
    maps::{PerCpuArray, PerfEventArray, RingBuf},
};
use kdiag_common::{
    ClassId, EventHeader, EventKind, LOSS_DROPPED, LOSS_FAILED, LOSS_LOST, LOSS_REASONS,
    LOSS_SLOTS, Transport, wakeup_shift,
};

use crate::rodata::rodata;

/// Which transport to write to; a `Transport` set by the agent at load.
#[unsafe(no_mangle)]
static TRANSPORT: u32 = Transport::RingBuf as u32;

/// Size of `EVENTS` in the object; the agent sets the real one at load.
const EVENTS_BYTES: u32 = 4096;

/// Shared by every class. The agent sizes it at load (`--buffer-mib`, one
/// page when the perf transport is used).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static PERF_EVENTS: PerfEventArray<u8> = PerfEventArray::new(0);

/// Failed outputs: index `class * LOSS_REASONS + reason`.
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_SLOTS, 0);

/// log2 of the queued bytes that make an event wake the reader
/// (`kdiag_common::wakeup_shift`), set by the agent at load for the ring's
/// size (a power of two, so a shift replaces a division).
#[unsafe(no_mangle)]
static WAKEUP_SHIFT: u64 = wakeup_shift(EVENTS_BYTES);

/// -ENOSPC: the perf buffer of this CPU is full.
const ENOSPC: i64 = -28;

/// The header every event starts with: its kind, this CPU, now.
#[inline(always)]
pub(crate) fn header(kind: EventKind) -> EventHeader {
    // SAFETY: helper without arguments.
    header_at(kind, unsafe { bpf_ktime_get_ns() })
}

/// `header`, for a program that has already read the clock.
#[inline(always)]
pub(crate) fn header_at(kind: EventKind, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        // SAFETY: helper without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns,
    }
}

/// Sends `event` to userspace, counting it as dropped or lost if it does not
/// fit.
#[inline(always)]
pub(crate) fn emit<C: EbpfContext, T>(ctx: &C, class: ClassId, event: &T) {
    let transport = *rodata(&TRANSPORT);
    let reason = if transport == Transport::Perf as u32 {
        // aya's PerfEventArray::output discards the helper's result, which
        // we need to count losses, so call the helper directly.
        // SAFETY: the map pointer is PERF_EVENTS's definition and `event` is
        // valid for size_of::<T>() bytes.
        let ret = unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                ptr::from_ref(&PERF_EVENTS).cast_mut().cast::<c_void>(),
                BPF_F_CURRENT_CPU,
                ptr::from_ref(event).cast_mut().cast::<c_void>(),
                size_of::<T>() as u64,
            )
        };
        match ret {
            0 => return,
            ENOSPC => LOSS_LOST,
            _ => LOSS_DROPPED,
        }
    } else {
        // Waking the reader costs more than everything else an event does
        // (an irq_work, in a VM an interrupt to itself; docs/BENCHMARKS.md
        // has the figures). So no wakeup per event: the agent drains the
        // ring on a short timer anyway, and a wakeup is forced only when this
        // event's bytes cross a multiple of 2^WAKEUP_SHIFT bytes (an eighth
        // of the ring, kdiag_common::WAKEUP_FRACTION_SHIFT). Once per
        // crossing, not for every event past it: while the reader catches
        // up, events keep arriving, and waking it again changes nothing.
        let queued = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
        let after = queued + size_of::<T>() as u64;
        let shift = *rodata(&WAKEUP_SHIFT);
        let flags = if after >> shift != queued >> shift {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        match EVENTS.output::<T>(event, u64::from(flags)) {
            Ok(()) => return,
            Err(_) => LOSS_DROPPED,
        }
    };
    count_loss(class, reason);
}

/// What a program's entry point returns for the result of its `try_` fn:
/// an early return with an error (a failed map insert or read) loses the
/// event it was handling, and is counted as that class's `failed`.
#[inline(always)]
pub(crate) fn counted(class: ClassId, result: Result<u32, i64>) -> u32 {
    result.unwrap_or_else(|_| {
        count_loss(class, LOSS_FAILED);
        0
    })
}

#[inline(always)]
pub(crate) fn count_loss(class: ClassId, reason: u32) {
    if let Some(counter) = LOSSES.get_ptr_mut(class as u32 * LOSS_REASONS + reason) {
        // Atomic although per-CPU: classic tracepoint programs never nest
        // on a CPU, but the raw and BTF tracepoint programs (tcp_destroy_sock,
        // the tp_btf entries) can run in the middle of another program, and
        // a plain increment interrupted there would lose its count. The BPF target has no compare-and-swap, so
        // core's atomics offer no fetch_add; the instruction is BPF's
        // atomic add (BPF_ATOMIC | BPF_ADD, without fetch: every kernel
        // with BPF has it).
        // SAFETY: a live per-CPU map value, u64-aligned and valid for
        // writes; the instruction touches those 8 bytes only.
        unsafe {
            asm!(
                "lock *(u64 *)({p} + 0) += {one}",
                p = in(reg) counter,
                one = in(reg) 1u64,
                options(nostack, preserves_flags),
            );
        }
    }
}
