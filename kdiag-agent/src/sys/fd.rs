//! File descriptors: polling one, and registering one with the event loop.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::maps::{MapData, RingBuf};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use tokio::io::{Interest, unix::AsyncFd};

use super::perf::PerfBuffer;

/// Whether the other end of the pipe or socket `fd` writes to is gone: a
/// writer whose reader has closed sees POLLERR (a pipe) or POLLHUP. Does
/// not wait.
pub(crate) fn peer_closed(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::empty())];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let ready = poll(&mut fds, Some(&now)).unwrap_or(0);
    ready > 0 && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
}

/// A value that owns one open file descriptor, the one `as_raw_fd` returns,
/// from its creation until it is dropped.
///
/// # Safety
/// `as_raw_fd` returns that same descriptor every time, and nothing closes
/// it or puts another file behind it before the value is dropped.
pub(crate) unsafe trait OwnedFdHolder: AsRawFd {}

// SAFETY: a RingBuf owns its map (MapData), whose descriptor it returns and
// which closes only when the map is dropped.
unsafe impl OwnedFdHolder for RingBuf<MapData> {}

// SAFETY: a PerfBuffer owns the OwnedFd it returns, closed only on drop.
unsafe impl OwnedFdHolder for PerfBuffer {}

/// Registers `inner`'s descriptor with the event loop, to be woken when it is
/// readable.
pub(crate) fn register_readable<T: OwnedFdHolder>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: T's descriptor stays open and unchanged until `inner` is
    // dropped (OwnedFdHolder), which the AsyncFd does.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Bytes a write to the pipe `fd` can surely take now without blocking;
/// `None` when `fd` is not a pipe. A pipe is a ring of pages, and holds
/// fewer bytes than its size: a write whose tail does not fit in the last
/// page's free end starts a new page and leaves that end empty (fs/pipe.c,
/// anon_pipe_write), so each write wastes less than its own length, and the
/// reader leaves the first page partly read. Pages in use thus hold at most
/// twice the bytes queued, plus a page, and a write of `n` bytes takes at
/// most `2n` of what is free.
pub(crate) fn pipe_room(fd: BorrowedFd<'_>) -> Option<usize> {
    let capacity = rustix::pipe::fcntl_getpipe_size(fd).ok()?;
    let queued = usize::try_from(rustix::io::ioctl_fionread(fd).ok()?).unwrap_or(usize::MAX);
    let used = queued.saturating_mul(2) + 2 * rustix::param::page_size();
    Some(capacity.saturating_sub(used) / 2)
}

/// Makes the pipe `fd` hold `bytes` if the kernel lets it (up to
/// /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE); returns what it
/// holds, `None` when `fd` is not a pipe.
pub(crate) fn grow_pipe(fd: BorrowedFd<'_>, bytes: usize) -> Option<usize> {
    let now = rustix::pipe::fcntl_getpipe_size(fd).ok()?;
    if now >= bytes {
        return Some(now);
    }
    Some(rustix::pipe::fcntl_setpipe_size(fd, bytes).unwrap_or(now))
}
