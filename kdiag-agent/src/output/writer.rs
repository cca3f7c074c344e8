//! The writer thread: records reach stdout through a bounded queue, so a
//! slow or stopped reader of stdout never stalls the event loop (which must
//! keep draining the kernel's buffers and answer signals). What does not fit
//! in the queue is counted, never silently lost (`output_dropped` in
//! `agent_stats`).
//!
//! On a pipe, the thread writes only what fits without blocking and keeps
//! [`RESERVE`] bytes free, so that the final `agent_stats` can always be
//! written at exit, even while the reader is stopped, and is there once it
//! reads again (see [`Writer::finish`]). Other outputs (a file, a terminal,
//! a socket) are written with plain blocking writes.

use std::{
    collections::VecDeque,
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The most bytes queued for the writer thread: at the busiest loopback
/// churn about a second of records.
pub(crate) const QUEUE_BYTES: usize = 8 << 20;
/// What a pipe on stdout is grown to, if the kernel lets the agent.
pub(crate) const PIPE_BYTES: usize = 1 << 20;
/// Bytes of a pipe kept free for the final `agent_stats` (in the terms of
/// `sys::fd::pipe_room`): the longest, `run`'s with every program's
/// figures, takes a few KiB.
pub(crate) const RESERVE: usize = 16 * 1024;
/// How often a writer waiting for room in the pipe looks again (a pipe
/// wakes writers when a page is free, not when the room it wants is).
const ROOM_POLL: Duration = Duration::from_millis(5);
/// How long past its deadline [`Writer::finish`] waits for the thread.
const GIVE_UP_AFTER: Duration = Duration::from_millis(300);

/// Where the writer thread writes.
pub(crate) trait Sink: Write + Send {
    /// Bytes that can be written now without blocking, when this sink can
    /// tell (a pipe); `None`: write and let it block.
    fn room(&self) -> Option<usize>;
}

impl Sink for std::fs::File {
    fn room(&self) -> Option<usize> {
        use std::os::fd::AsFd as _;
        crate::sys::fd::pipe_room(self.as_fd())
    }
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Set by [`Writer::finish`]: what is not written by then is dropped.
    finish_by: Option<Instant>,
    /// The thread has written or dropped everything and stopped.
    done: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// Records (lines) handed to the writer that never reached the sink.
    dropped: AtomicU64,
    /// The sink refused a write with EPIPE: nobody reads any more.
    closed: AtomicBool,
    /// The sink refused a write otherwise (a full disk, an I/O error): the
    /// thread has stopped, and the agent must stop too rather than run on
    /// writing nothing.
    failed: Mutex<Option<io::ErrorKind>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic in the writer thread ends the process (panic = abort is
        // not set, but nothing catches it), so a poisoned lock still holds
        // a consistent queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn drop_lines(&self, bytes: &[u8]) {
        let lines = memchr::memchr_iter(b'\n', bytes).count() as u64;
        self.dropped.fetch_add(lines, Ordering::Relaxed);
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Box<dyn Sink>>>,
    /// The sink back from the thread, for the final record.
    sink: Option<Box<dyn Sink>>,
    /// `dropped` when last taken.
    dropped_taken: u64,
}

impl Writer {
    pub(crate) fn new(sink: Box<dyn Sink>) -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("kdiag-writer".to_owned())
            .spawn({
                let shared = shared.clone();
                move || write_queued(&shared, sink)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
            sink: None,
            dropped_taken: 0,
        })
    }

    /// Queues `chunk` (whole lines), or counts its lines as dropped when
    /// the queue is full. An error when nobody reads stdout any more
    /// (`BrokenPipe`) or the thread could not write to it.
    pub(crate) fn submit(&self, chunk: Vec<u8>) -> io::Result<()> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let failed = *self.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kind) = failed {
            return Err(io::Error::new(kind, "writing to stdout failed"));
        }
        let mut q = self.shared.lock();
        if q.finish_by.is_some() || q.bytes + chunk.len() > QUEUE_BYTES {
            drop(q);
            self.shared.drop_lines(&chunk);
            return Ok(());
        }
        q.bytes += chunk.len();
        q.chunks.push_back(chunk);
        drop(q);
        self.shared.changed.notify_one();
        Ok(())
    }

    /// Records dropped since the last call.
    pub(crate) fn take_dropped(&mut self) -> u64 {
        let total = self.shared.dropped.load(Ordering::Relaxed);
        let delta = total - self.dropped_taken;
        self.dropped_taken = total;
        delta
    }

    /// Gives the thread until `within` from now to write what is queued;
    /// what is left then is dropped (and counted). Returns the sink for
    /// the last record, unless the thread is stuck in a blocking write (a
    /// sink that is not a pipe) or the sink is closed.
    pub(crate) fn finish(&mut self, within: Duration) -> Option<&mut Box<dyn Sink>> {
        if self.sink.is_none() {
            let deadline = Instant::now() + within;
            let mut q = self.shared.lock();
            q.finish_by = Some(deadline);
            self.shared.changed.notify_all();
            // Past the deadline the thread needs one ROOM_POLL to see it
            // (and a CPU: more on a loaded host), unless a blocking write
            // to a sink that is not a pipe holds it.
            let give_up = deadline + GIVE_UP_AFTER;
            while !q.done {
                let now = Instant::now();
                if now >= give_up {
                    return None;
                }
                q = self
                    .shared
                    .changed
                    .wait_timeout(q, give_up - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            drop(q);
            self.sink = self.thread.take()?.join().ok();
        }
        if self.shared.closed.load(Ordering::Relaxed) {
            return None;
        }
        self.sink.as_mut()
    }
}

/// The writer thread: writes queued chunks until [`Writer::finish`]; gives
/// the sink back.
fn write_queued(shared: &Shared, mut sink: Box<dyn Sink>) -> Box<dyn Sink> {
    loop {
        let mut q = shared.lock();
        let chunk = loop {
            if let Some(chunk) = q.chunks.pop_front() {
                break chunk;
            }
            if q.finish_by.is_some() {
                q.done = true;
                shared.changed.notify_all();
                return sink;
            }
            q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        };
        drop(q);
        let written = write_lines(shared, sink.as_mut(), &chunk);
        shared.lock().bytes -= chunk.len();
        if written < chunk.len() {
            // Closed, or out of time: nothing more will be written.
            shared.drop_lines(&chunk[written..]);
            let mut q = shared.lock();
            for rest in q.chunks.drain(..) {
                shared.drop_lines(&rest);
            }
            q.bytes = 0;
            q.done = true;
            shared.changed.notify_all();
            return sink;
        }
    }
}

/// Writes `chunk` (whole lines) to `sink`, on a pipe only whole lines that
/// fit beside [`RESERVE`]; returns how much it wrote, less than all only
/// when the sink is closed or the finishing deadline passed.
fn write_lines(shared: &Shared, sink: &mut dyn Sink, chunk: &[u8]) -> usize {
    let mut written = 0;
    while written < chunk.len() {
        let rest = &chunk[written..];
        let take = match sink.room() {
            None => rest.len(),
            Some(room) => {
                let room = room.saturating_sub(RESERVE);
                match memchr::memrchr(b'\n', &rest[..room.min(rest.len())]) {
                    Some(end) => end + 1,
                    None => {
                        if shared.lock().finish_by.is_some_and(|t| Instant::now() >= t) {
                            return written;
                        }
                        std::thread::sleep(ROOM_POLL);
                        continue;
                    }
                }
            }
        };
        if let Err(e) = sink.write_all(&rest[..take]).and_then(|()| sink.flush()) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                shared.closed.store(true, Ordering::Relaxed);
            } else {
                crate::output::diagnose(format_args!("cannot write to stdout: {e}"));
                *shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.kind());
            }
            return written;
        }
        written += take;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe-like sink with `room` bytes free, recording what it got.
    #[derive(Clone, Default)]
    struct Limited {
        got: Arc<Mutex<Vec<u8>>>,
        room: Arc<Mutex<Option<usize>>>,
    }

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.got.lock().unwrap().extend_from_slice(buf);
            if let Some(room) = self.room.lock().unwrap().as_mut() {
                *room -= buf.len();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink for Limited {
        fn room(&self) -> Option<usize> {
            *self.room.lock().unwrap()
        }
    }

    #[test]
    fn a_full_pipe_keeps_the_reserve_and_counts_what_it_drops() {
        let sink = Limited::default();
        *sink.room.lock().unwrap() = Some(RESERVE + 10);
        let mut w = Writer::new(Box::new(sink.clone())).unwrap();
        // The first line fits beside the reserve, the second does not.
        w.submit(b"12345\n6789012345\n".to_vec()).unwrap();
        let last = w.finish(Duration::from_millis(20)).expect("a sink");
        last.write_all(b"final\n").unwrap();
        assert_eq!(&*sink.got.lock().unwrap(), b"12345\nfinal\n");
        assert_eq!(w.take_dropped(), 1);
        assert_eq!(w.take_dropped(), 0);
    }

    #[test]
    fn a_full_queue_counts_whole_chunks() {
        let sink = Limited::default();
        // No room at all: everything stays queued until finish.
        *sink.room.lock().unwrap() = Some(0);
        let mut w = Writer::new(Box::new(sink.clone())).unwrap();
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<_>>();
        let chunk: Vec<u8> = line.repeat(1024);
        for _ in 0..QUEUE_BYTES / chunk.len() + 2 {
            w.submit(chunk.clone()).unwrap();
        }
        w.finish(Duration::from_millis(10));
        // Every line was either written (none: no room) or counted.
        assert_eq!(
            w.take_dropped(),
            (QUEUE_BYTES / chunk.len() + 2) as u64 * 1024
        );
        assert!(sink.got.lock().unwrap().is_empty());
    }

    /// A sink whose writes all fail as a full disk's do.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink for Full {
        fn room(&self) -> Option<usize> {
            None
        }
    }

    #[test]
    fn a_failed_write_stops_the_agent_with_its_error() {
        let w = Writer::new(Box::new(Full)).unwrap();
        w.submit(b"1\n".to_vec()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = loop {
            if let Err(e) = w.submit(b"2\n".to_vec()) {
                break e;
            }
            assert!(Instant::now() < deadline, "submit never failed");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    }

    #[test]
    fn writes_everything_to_a_sink_that_never_blocks() {
        let sink = Limited::default();
        let mut w = Writer::new(Box::new(sink.clone())).unwrap();
        for i in 0..100 {
            w.submit(format!("{i}\n").into_bytes()).unwrap();
        }
        w.finish(Duration::from_secs(5)).expect("a sink");
        let got = String::from_utf8(sink.got.lock().unwrap().clone()).unwrap();
        assert_eq!(got.lines().count(), 100);
        assert_eq!(w.take_dropped(), 0);
    }
}
