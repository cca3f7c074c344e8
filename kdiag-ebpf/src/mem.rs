//! Word-at-a-time copies and zeroing for the hot paths.
//!
//! In this toolchain a struct assignment or a `[0; N]` of more than a few
//! bytes becomes a call to aya-ebpf's `memmove`/`memset`, which move one
//! byte per loop iteration: 32 iterations for an `Owner`. The kernel
//! types here are 8-byte aligned and sized in whole words, so they can be
//! moved as u64s instead. The accesses are volatile so that the compiler
//! does not turn the loop back into a call.

use core::ptr;

/// Checked at compile time for every type these functions are used with.
struct Words<T>(T);

impl<T> Words<T> {
    const COUNT: usize = {
        assert!(align_of::<T>() >= 8 && size_of::<T>() % 8 == 0);
        size_of::<T>() / 8
    };
}

/// Copies `*src` to `*dst`.
///
/// # Safety
/// Both must be valid for a `T` (map values, stack slots).
#[inline(always)]
pub(crate) unsafe fn copy<T>(dst: *mut T, src: *const T) {
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    let mut i = 0;
    while i < Words::<T>::COUNT {
        // SAFETY: word `i` of a valid T, per the caller.
        unsafe { ptr::write_volatile(d.add(i), ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Sets `*dst` to all zero bytes (a valid value of every type used here:
/// plain integers and arrays of them).
///
/// # Safety
/// `dst` must be valid for a `T`, and all-zero must be a valid `T`.
#[inline(always)]
pub(crate) unsafe fn zero<T>(dst: *mut T) {
    let d = dst.cast::<u64>();
    let mut i = 0;
    while i < Words::<T>::COUNT {
        // SAFETY: word `i` of a valid T, per the caller.
        unsafe { ptr::write_volatile(d.add(i), 0) };
        i += 1;
    }
}
