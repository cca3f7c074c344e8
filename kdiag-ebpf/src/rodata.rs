//! The programs' configuration: `#[unsafe(no_mangle)]` statics in `.rodata`
//! whose values the agent sets before load (aya's
//! `EbpfLoader::override_global`). aya then freezes the map, so the
//! verifier knows them as constants and checks only the branches they
//! select.
//!
//! They are plain statics. aya-ebpf's `Global<T>` is meant for this, but
//! the BTF bpf-linker 0.10 emits for it (its `MaybeUninit` field) is
//! rejected by the kernel, and aya then loads the whole object without BTF;
//! its `load()` also copies the whole value, where the programs read single
//! fields.

use core::{arch::asm, ptr};

/// A global the agent sets before load, for reading.
///
/// The compiler sees an immutable static with a known initializer and
/// would fold every read of it into the default written in this crate: the
/// agent's value would never be read. The usual cure is a volatile read,
/// but a volatile read of the address (so that the programs still load only
/// the fields they use, without copying the value onto the 512-byte stack)
/// is a stack store and load per use, two more instructions in every
/// program. An empty `asm!` that hands the address back unchanged hides
/// the object from the compiler just as well, and costs nothing: the reads
/// through the returned reference are real loads of the fields used.
#[inline(always)]
pub(crate) fn rodata<T>(global: &'static T) -> &'static T {
    let mut p = ptr::from_ref(global);
    // SAFETY: an empty template: no instruction, no memory access; `p`
    // comes back as it went in.
    unsafe { asm!("/* {0} */", inout(reg) p, options(pure, nomem, nostack, preserves_flags)) };
    // SAFETY: `p` is still `global`, a reference valid for the program's
    // life.
    unsafe { &*p }
}
