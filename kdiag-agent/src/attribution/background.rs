//! Lookups off the event loop: /proc owner lookups and cgroup walks read
//! files whose cost grows with the host (a /proc/net/tcp read took 0.7 s
//! with 38k TIME_WAIT sockets; a walk visits every cgroup). Each runs on a
//! thread of its own, and its result is applied when it comes back: owners
//! hold their events meanwhile (see `owner`), cgroup walks are waited for
//! at most a deadline (see `cgroup`).

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

/// A lookup running on its own thread.
#[derive(Debug)]
pub(crate) struct Pending<T> {
    result: mpsc::Receiver<(T, Duration)>,
}

impl<T: Send + 'static> Pending<T> {
    /// Starts `job` on a new thread; `None` if no thread could be started
    /// (the lookup is then not made).
    pub(crate) fn start(name: &str, job: impl FnOnce() -> T + Send + 'static) -> Option<Self> {
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let started = Instant::now();
                let found = job();
                // The loop may have gone: nobody wants the result then.
                let _ = tx.send((found, started.elapsed()));
            })
            .ok()?;
        Some(Self { result: rx })
    }

    /// The result and how long the lookup took, waiting at most `deadline`.
    pub(crate) fn wait(&self, deadline: Duration) -> Option<(T, Duration)> {
        self.result.recv_timeout(deadline).ok()
    }

    /// The result, however long it takes; `None` if its thread died.
    pub(crate) fn join(self) -> Option<T> {
        self.result.recv().ok().map(|(found, _)| found)
    }

    /// Whether the lookup is over: its result, or `Err(())` when it has no
    /// result any more (its thread died).
    pub(crate) fn poll(&self) -> Option<Result<(T, Duration), ()>> {
        match self.result.try_recv() {
            Ok(found) => Some(Ok(found)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Err(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_lookup_is_applied_when_it_comes_back() {
        let (go, wait) = mpsc::channel::<()>();
        let pending = Pending::start("test", move || {
            let _ = wait.recv();
            7
        })
        .unwrap();
        // Not back by its deadline: the caller goes on.
        assert!(pending.wait(Duration::from_millis(5)).is_none());
        assert!(pending.poll().is_none());
        go.send(()).unwrap();
        let (found, _) = pending.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(found, 7);
    }
}
