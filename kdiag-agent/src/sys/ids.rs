//! User and group ids: looking a user up by name, and taking its ids.

use std::{
    ffi::{CString, c_char},
    io,
    mem::MaybeUninit,
    ptr,
};

use rustix::{
    process::{Gid, Uid, getegid, geteuid, getgid, getuid},
    thread::{set_keep_capabilities, set_thread_groups, set_thread_res_gid, set_thread_res_uid},
};

use super::SyscallError;

/// A user's ids, from the user database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Looks `name` up in the user database (`getpwnam_r`, so through the name
/// services nsswitch.conf configures). `Ok(None)` when there is no such
/// user.
pub(crate) fn lookup_user(name: &str) -> Result<Option<UserIds>, SyscallError> {
    let not_a_name = || SyscallError::new("getpwnam_r", io::ErrorKind::InvalidInput);
    let c_name = CString::new(name).map_err(|_| not_a_name())?;
    let mut buf: Vec<c_char> = vec![0; 1024];
    loop {
        let mut pwd = MaybeUninit::<libc::passwd>::uninit();
        let mut found: *mut libc::passwd = ptr::null_mut();
        // SAFETY: every pointer is valid for the call: a NUL-terminated
        // name, a passwd to fill, a buffer of `buf.len()` bytes for its
        // strings, and the result pointer.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            0 => {
                // SAFETY: getpwnam_r returned 0 with a non-null result:
                // `pwd` is filled in (and `found` points to it).
                let pwd = unsafe { pwd.assume_init() };
                return Ok(Some(UserIds {
                    uid: pwd.pw_uid,
                    gid: pwd.pw_gid,
                }));
            }
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Some name services report "no such user" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            err => {
                return Err(SyscallError::new(
                    "getpwnam_r",
                    io::Error::from_raw_os_error(err),
                ));
            }
        }
    }
}

/// The real, effective and saved ids are all `ids`: nothing to switch.
pub(crate) fn running_as(ids: UserIds) -> bool {
    let uid = Uid::from_raw(ids.uid);
    let gid = Gid::from_raw(ids.gid);
    // rustix has no getresuid; the saved ids follow the effective ones in
    // every switch this module makes, and the caller checks
    // /proc/self/status after the drop.
    getuid() == uid && geteuid() == uid && getgid() == gid && getegid() == gid
}

/// Makes the calling thread keep its permitted capabilities when its uid
/// changes from 0 (`PR_SET_KEEPCAPS`); the effective set is still cleared.
pub(crate) fn keep_capabilities(keep: bool) -> Result<(), SyscallError> {
    set_keep_capabilities(keep).map_err(|e| SyscallError::new("prctl(PR_SET_KEEPCAPS)", e))
}

/// Takes `ids` as the real, effective and saved user and group ids, with no
/// supplementary groups (needs CAP_SETGID and CAP_SETUID). Acts on the
/// calling thread only, as the kernel does: the caller makes sure it is the
/// process's only one.
pub(crate) fn switch_to(ids: UserIds) -> Result<(), SyscallError> {
    let uid = Uid::from_raw(ids.uid);
    let gid = Gid::from_raw(ids.gid);
    set_thread_groups(&[]).map_err(|e| SyscallError::new("setgroups", e))?;
    set_thread_res_gid(gid, gid, gid).map_err(|e| SyscallError::new("setresgid", e))?;
    set_thread_res_uid(uid, uid, uid).map_err(|e| SyscallError::new("setresuid", e))
}
