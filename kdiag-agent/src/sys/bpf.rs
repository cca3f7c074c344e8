//! bpf() commands on descriptors the agent already holds, beyond those aya
//! makes. Layouts are the kernel's (include/uapi/linux/bpf.h), from aya's
//! generated bindings.

use std::{
    ffi::{c_long, c_uint},
    mem::MaybeUninit,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

use super::SyscallError;

/// Asks the kernel about the BPF object behind `fd`
/// (`BPF_OBJ_GET_INFO_BY_FD`, with no room for the answer, which the kernel
/// accepts: it copies nothing). The cheapest bpf() command on a descriptor
/// already open, and so the probe of whether the calling thread may still
/// make such commands: kernels before 6.5 refuse every bpf() command
/// without CAP_BPF (or CAP_SYS_ADMIN) when unprivileged BPF is disabled
/// (`__sys_bpf` in kernel/bpf/syscall.c), later ones check at the
/// descriptor's creation only.
pub(crate) fn query_object(fd: BorrowedFd<'_>) -> Result<(), SyscallError> {
    // SAFETY: bpf_attr is a union of integer structs: all-zero is valid, and
    // what the kernel expects of every field this command does not use.
    let mut attr: bpf_attr = unsafe { MaybeUninit::zeroed().assume_init() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD with a valid bpf_attr of the size
    // stated, alive and writable for the call (the kernel writes info_len
    // back into it); info_len 0 makes it copy nothing to `info`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as c_long,
            &raw mut attr,
            size_of::<bpf_attr>() as c_uint,
        )
    };
    if ret < 0 {
        return Err(SyscallError::last_os_error("bpf(BPF_OBJ_GET_INFO_BY_FD)"));
    }
    Ok(())
}
