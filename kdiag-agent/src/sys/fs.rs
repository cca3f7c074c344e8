//! File system calls: mounting tracefs, a thread's own root directory.

use std::path::Path;

use rustix::{
    mount::{MountFlags, mount},
    process,
    thread::{UnshareFlags, unshare_unsafe},
};

use super::SyscallError;

/// Mounts a tracefs at `target`.
pub(crate) fn mount_tracefs(target: &Path) -> Result<(), SyscallError> {
    mount("tracefs", target, "tracefs", MountFlags::empty(), None)
        .map_err(|e| SyscallError::new("mount", e))
}

/// Gives the calling thread a file system context of its own (root, working
/// directory, umask: `unshare(CLONE_FS)`) and makes `root` its root
/// directory. The process's other threads keep theirs.
pub(crate) fn chroot_this_thread(root: &Path) -> Result<(), SyscallError> {
    // SAFETY: what makes unshare unsafe is CLONE_FILES (descriptors of other
    // threads that this one could no longer use); CLONE_FS splits off only
    // the root and working directories and the umask.
    unsafe { unshare_unsafe(UnshareFlags::FS) }.map_err(|e| SyscallError::new("unshare", e))?;
    process::chroot(root).map_err(|e| SyscallError::new("chroot", e))
}
