//! Sending a slow event with the kernel stack at its end: the event, then a
//! `KernelStack`, in one record (kdiag_common::stack says why not a
//! stack-id map).
//!
//! The pair is 300 to 350 bytes, too much beside the programs' other
//! locals on the 512-byte BPF stack: it is built in a per-CPU slot, one map
//! per event type. Not one slot shared by the classes: a softirq's exit
//! program (a BTF tracepoint, which only guards against itself) can run on
//! top of a memory stall's end program, at the exit of an interrupt that
//! came while it ran, and would overwrite the stall's half-built record.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_stack, maps::PerCpuArray};
use kdiag_common::{ClassId, LOSS_PARTIAL, stack::KernelStack};

use crate::{
    mem,
    output::{count_loss, emit},
};

/// An event and its stack, as they travel.
#[repr(C)]
pub(crate) struct Stacked<T> {
    event: T,
    stack: KernelStack,
}

/// The per-CPU slot type for events of type `T`.
pub(crate) type StackedSlot<T> = PerCpuArray<Stacked<T>>;

pub(crate) const fn stacked_slot<T>() -> StackedSlot<T> {
    PerCpuArray::with_max_entries(1, 0)
}

/// Sends `event` followed by the current kernel stack. When the stack
/// cannot be taken, the event still goes out, with an empty stack, and
/// counts as `partial`.
#[inline(always)]
pub(crate) fn emit_stacked<C: EbpfContext, T>(
    ctx: &C,
    class: ClassId,
    slot: &StackedSlot<T>,
    event: &T,
) {
    let Some(s) = slot.get_ptr_mut(0) else {
        // A one-entry array always has entry 0; stay correct anyway: the
        // event goes out without its stack, counted.
        count_loss(class, LOSS_PARTIAL);
        emit(ctx, class, event);
        return;
    };
    // SAFETY: this CPU's slot (see the module comment for why nothing else
    // writes it meanwhile), valid for a Stacked<T>; `event` is a valid T.
    // bpf_get_stack writes at most the size it is given into `ips` and
    // zeroes what it does not fill.
    unsafe {
        mem::copy(&raw mut (*s).event, event);
        let ips = &raw mut (*s).stack.ips;
        let got = bpf_get_stack(
            ctx.as_ptr(),
            ips.cast(),
            size_of::<[u64; kdiag_common::stack::STACK_DEPTH]>() as u32,
            0,
        );
        (*s).stack.nr = if got > 0 { (got as u64 / 8) as u32 } else { 0 };
        (*s).stack._pad = 0;
        if got <= 0 {
            count_loss(class, LOSS_PARTIAL);
        }
        emit(ctx, class, &*s);
    }
}
