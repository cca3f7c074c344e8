//! The agent's system calls: every raw syscall and libc call, each behind a
//! safe function, so that `unsafe` lives here and nowhere else in the agent.
//! Built on rustix, on the caps crate for capabilities, on seccompiler for
//! the seccomp filter, and on libc only for what neither has
//! (`perf_event_open`, `bpf`, `getrusage`, `mallopt`, `getpwnam_r`,
//! `socket`).
//! [`pod`] holds the byte views of the wire types, the other unsafe code.

pub(crate) mod bpf;
pub(crate) mod caps;
pub(crate) mod fd;
pub(crate) mod fs;
pub(crate) mod ids;
pub(crate) mod mapping;
pub(crate) mod perf;
pub(crate) mod pod;
pub(crate) mod process;
pub(crate) mod seccomp;

use std::io;

/// A system call the kernel refused, and its error.
#[derive(Debug, thiserror::Error)]
#[error("`{call}` failed")]
pub(crate) struct SyscallError {
    /// The system call, as its man page names it.
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

impl SyscallError {
    fn new(call: &'static str, source: impl Into<io::Error>) -> Self {
        Self {
            call,
            source: source.into(),
        }
    }

    /// For libc calls, which leave their error in errno.
    fn last_os_error(call: &'static str) -> Self {
        Self::new(call, io::Error::last_os_error())
    }
}
