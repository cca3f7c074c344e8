//! Collects a child's output pipe line by line on a background thread, so
//! tests can wait for a line with a timeout, and can close the pipe on
//! purpose (to test how the agent handles a closed stdout).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// How often the reader thread checks for a close request; bounds how long
/// `close` takes to really close the pipe.
const POLL_MS: i32 = 50;

/// Why a `LineLog::wait` gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The writer closed the pipe (usually: the process exited).
    Eof,
    Timeout,
}

#[derive(Default)]
struct State {
    lines: Vec<String>,
    partial: Vec<u8>,
    eof: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    close: AtomicBool,
}

impl Shared {
    // A test that panics inside a wait predicate poisons the mutex; the data
    // is still valid, and Drop impls must keep working, so ignore poisoning.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The lines read so far from one pipe.
pub struct LineLog {
    shared: Arc<Shared>,
}

impl LineLog {
    /// Starts reading `pipe` (a `ChildStdout`/`ChildStderr`) on a thread.
    pub fn spawn(pipe: impl Into<OwnedFd>) -> LineLog {
        let shared = Arc::new(Shared::default());
        let file = File::from(pipe.into());
        let reader = Arc::clone(&shared);
        thread::spawn(move || read_loop(file, &reader));
        LineLog { shared }
    }

    /// A copy of the complete lines read so far.
    pub fn lines(&self) -> Vec<String> {
        self.shared.lock().lines.clone()
    }

    /// Everything read so far, for diagnostics.
    pub fn text(&self) -> String {
        let st = self.shared.lock();
        let mut text = st.lines.join("\n");
        if !st.partial.is_empty() {
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(&st.partial));
        }
        text
    }

    /// Calls `check` on all lines read so far, each time more arrive, until
    /// it returns `Some`, the pipe reaches EOF, or `timeout` passes.
    pub fn wait<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T, Ended> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(found) = check(&st.lines) {
                return Ok(found);
            }
            if st.eof {
                return Err(Ended::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Ended::Timeout);
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the writer closed the pipe; false on timeout.
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        self.wait(timeout, |_| None::<()>) == Err(Ended::Eof)
    }

    /// Closes our read end: the writer's next write fails with EPIPE. Returns
    /// once the pipe is closed.
    pub fn close(&self) {
        self.shared.close.store(true, Ordering::Relaxed);
        let closed = self.wait_eof(Duration::from_secs(5));
        assert!(closed, "reader thread did not close the pipe");
    }
}

impl Drop for LineLog {
    fn drop(&mut self) {
        // Lets the thread end even if the writer (e.g. a grandchild) lives on.
        self.shared.close.store(true, Ordering::Relaxed);
    }
}

fn read_loop(mut file: File, shared: &Shared) {
    let mut buf = [0u8; 8192];
    // Poll with a timeout rather than block in read, so a close request is
    // seen even while the writer is silent.
    while !shared.close.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for an fd this thread owns.
        let ready = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if ready == 0
            || (ready < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted)
        {
            continue;
        }
        let n = match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut st = shared.lock();
        st.partial.extend_from_slice(&buf[..n]);
        while let Some(pos) = st.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = st.partial.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..pos]).into_owned();
            st.lines.push(line);
        }
        drop(st);
        shared.changed.notify_all();
    }
    drop(file);
    let mut st = shared.lock();
    st.eof = true;
    drop(st);
    shared.changed.notify_all();
}
