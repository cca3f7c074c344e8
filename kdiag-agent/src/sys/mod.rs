//! The agent's system calls, each behind a safe function.

pub mod perf;

use std::io;

/// A system call the kernel refused, and its error.
#[derive(Debug, thiserror::Error)]
#[error("`{call}` failed")]
pub struct SyscallError {
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
