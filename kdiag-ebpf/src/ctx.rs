//! Fields of a classic tracepoint's record, at the offsets the agent read
//! from the tracepoint's format file
//! (`/sys/kernel/tracing/events/<group>/<name>/format`) and handed to the
//! programs in their configuration: the layouts move between kernel
//! versions, so no offset is hard-coded.

use core::ptr;

use aya_ebpf::{EbpfContext as _, programs::TracePointContext};
use kdiag_common::FIELD_ABSENT;

/// The field of type `T` at `offset` in the record; an error when this
/// kernel's tracepoint has no such field (`offset` is [`FIELD_ABSENT`]) or
/// the read fails.
///
/// `usual` is where the layouts seen so far put the field, or
/// `FIELD_ABSENT` when there is no such place (then the field is always
/// read through the helper). The verifier lets a classic tracepoint program
/// load from its context only at an offset fixed in the instruction, so a
/// field at an offset known only at load needs the probe-read helper, a
/// call. aya freezes `.rodata` at load, though, so the verifier knows
/// `offset` and checks only the branch taken: a field where it usually is
/// costs one load, and only a layout that moved pays for the call. A read
/// at the usual offset must be of a scalar: a byte array read in one go
/// compiles to a copy through a moved context pointer, which the verifier
/// refuses.
#[inline(always)]
pub(crate) fn field<T>(ctx: &TracePointContext, offset: u16, usual: u16) -> Result<T, i64> {
    if usual != FIELD_ABSENT && offset == usual {
        // SAFETY: the format file puts this field at `usual`, inside the
        // record, and the usual layouts align every scalar field.
        return Ok(unsafe {
            ptr::read(
                ctx.as_ptr()
                    .cast::<u8>()
                    .add(usize::from(usual))
                    .cast::<T>(),
            )
        });
    }
    if offset == FIELD_ABSENT {
        return Err(-1);
    }
    // SAFETY: the offset comes from this tracepoint's format file, and the
    // probe read returns an error rather than fault.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }.map_err(i64::from)
}
