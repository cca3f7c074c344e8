//! How large the buffer between the programs and the agent is: `--buffer-mib`,
//! or sized at start from how fast TCP connections open while the agent
//! starts.
//!
//! The buffer is what holds events while the agent waits for a CPU, and the
//! agent waits longest as it starts: under loopback churn with both CPUs
//! busy, every record lost with the default 4 MiB was lost in the agent's
//! first second (docs/BENCHMARKS.md, "Drops at maximum churn"). A host
//! opening connections that fast as the agent starts gets a buffer that
//! holds [`HOLD_SECS`] of their state changes.
//!
//! The rate is that of every network namespace a process lives in: the
//! programs see the whole host's connections, and on a host of containers
//! most of them open in the containers' namespaces, not in the agent's.

use std::{
    thread,
    time::{Duration, Instant},
};

use kdiag_common::DEFAULT_BUFFER_BYTES;

use crate::attribution::{background::Pending, procfs};

/// The largest buffer the agent sizes for itself: locked kernel memory.
/// `--buffer-mib` goes to 1024.
pub(crate) const MAX_SIZED_BYTES: u32 = 64 << 20;
/// Buffer bytes per TCP connection end opened (`ActiveOpens` +
/// `PassiveOpens`): a record per state change it goes through (at most four
/// before its close, 152 bytes each with the ring's header) and its closing
/// record (312).
const BYTES_PER_OPEN: f64 = 1024.0;
/// What the buffer holds at the rate measured: twice the longest the agent
/// went without draining as it started under churn with both CPUs busy
/// (about 250 ms), since the rate measured over its start-up is up to half
/// the load's own (the agent's start-up takes CPU from the load).
const HOLD_SECS: f64 = 0.5;
/// The shortest time a namespace's opens are counted over. The first
/// reading walks /proc while the agent starts, and under load the walk can
/// end just before the second reading: the opens of a window of
/// microseconds say nothing (a churn of 16k a second read as 0).
const MIN_WINDOW: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub(crate) enum BufferSize {
    /// `--buffer-mib`, in bytes.
    Given(u32),
    /// From the TCP connections opened since the first reading, taken on a
    /// thread of its own: the walk of /proc that finds a process in each
    /// network namespace grows with the host, and start-up goes on
    /// meanwhile. `None` if no thread could be started.
    FromOpens(Option<Pending<Opens>>),
}

/// Connection ends opened so far in one network namespace, read through
/// one of its processes, and when.
#[derive(Debug)]
struct NetnsOpens {
    pid: u32,
    /// The namespace's id ([`procfs::tcp_table_id`]).
    netns: u64,
    opens: u64,
    at: Instant,
}

/// Connection ends opened so far in each network namespace.
#[derive(Debug)]
pub(crate) struct Opens(Vec<NetnsOpens>);

impl Opens {
    fn read() -> Self {
        Self(
            procfs::one_pid_per_netns()
                .into_iter()
                .filter_map(|(pid, netns)| {
                    let opens = procfs::tcp_opens(pid)?;
                    Some(NetnsOpens {
                        pid,
                        netns,
                        opens,
                        at: Instant::now(),
                    })
                })
                .collect(),
        )
    }

    /// Connection ends opened a second since, summed over the namespaces
    /// read then whose process is still there, each over its own window
    /// (at least [`MIN_WINDOW`]: waits for it if need be); `None` if none
    /// could be read.
    fn rate_since(&self) -> Option<f64> {
        if let Some(age) = self.0.iter().map(|n| n.at.elapsed()).min() {
            thread::sleep(MIN_WINDOW.saturating_sub(age));
        }
        let mut read_any = false;
        let rate = self
            .0
            .iter()
            .filter(|n| {
                // The pid could name another process since: only the same
                // namespace's counters compare.
                procfs::tcp_table_id(n.pid) == Some(n.netns)
            })
            .filter_map(|n| {
                let opened = procfs::tcp_opens(n.pid)?.saturating_sub(n.opens);
                Some(per_sec(opened, n.at.elapsed()))
            })
            .inspect(|_| read_any = true)
            .sum();
        read_any.then_some(rate)
    }
}

/// The buffer's size, and the rate it was sized for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SizedBuffer {
    /// A power of two.
    pub bytes: u32,
    /// TCP connection ends opened a second over the start-up, in every
    /// network namespace with a process in it; `None` when not measured
    /// (`--buffer-mib`, no class recording TCP state changes, counters
    /// unreadable).
    pub opens_per_sec: Option<u64>,
}

impl BufferSize {
    /// `given_mib` if given, else measured from now on when `tcp_states`
    /// (a class records TCP state changes: the busiest producer by far),
    /// else the default.
    pub(crate) fn start(given_mib: Option<u32>, tcp_states: bool) -> Self {
        match given_mib {
            Some(mib) => Self::Given(mib << 20),
            None if tcp_states => Self::FromOpens(Pending::start("kdiag-opens", Opens::read)),
            None => Self::Given(DEFAULT_BUFFER_BYTES),
        }
    }

    /// The size, measured from the start when not given.
    pub(crate) fn sized(self) -> SizedBuffer {
        let measured = match self {
            Self::Given(bytes) => {
                return SizedBuffer {
                    bytes,
                    opens_per_sec: None,
                };
            }
            Self::FromOpens(first) => first
                .and_then(Pending::join)
                .and_then(|first| first.rate_since()),
        };
        SizedBuffer {
            bytes: measured.map_or(DEFAULT_BUFFER_BYTES, sized_for),
            opens_per_sec: measured.map(|r| r.round() as u64),
        }
    }
}

/// `opened` in `over`, a second.
fn per_sec(opened: u64, over: Duration) -> f64 {
    // A window under a millisecond says little; count it as one.
    opened as f64 / over.as_secs_f64().max(1e-3)
}

/// The buffer for `per_sec` connection ends opened a second: the default,
/// or more to hold [`HOLD_SECS`] of their records, up to
/// [`MAX_SIZED_BYTES`].
fn sized_for(per_sec: f64) -> u32 {
    let wanted = (per_sec * BYTES_PER_OPEN * HOLD_SECS).min(f64::from(MAX_SIZED_BYTES));
    // Within u32 by the min above.
    (wanted as u32)
        .next_power_of_two()
        .clamp(DEFAULT_BUFFER_BYTES, MAX_SIZED_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size for `opened` connection ends in `over`.
    fn sized(opened: u64, over: Duration) -> u32 {
        sized_for(per_sec(opened, over))
    }

    #[test]
    fn an_idle_host_gets_the_default() {
        let sec = Duration::from_secs(1);
        assert_eq!(sized(0, sec), DEFAULT_BUFFER_BYTES);
        assert_eq!(sized(1000, sec), DEFAULT_BUFFER_BYTES);
    }

    #[test]
    fn churn_gets_half_a_second_of_its_records() {
        // 40k connection ends a second (20k loopback connections): 20 MB.
        let ms = Duration::from_millis(20);
        assert_eq!(sized(800, ms), 32 << 20);
        // 10k a second: 5 MB.
        assert_eq!(sized(200, ms), 8 << 20);
        // 8k a second: 4 MB.
        assert_eq!(sized(160, ms), 4 << 20);
    }

    #[test]
    fn never_more_than_the_ceiling() {
        assert_eq!(sized(u64::MAX, Duration::ZERO), MAX_SIZED_BYTES);
        assert_eq!(sized(10_000_000, Duration::from_secs(1)), MAX_SIZED_BYTES);
    }

    #[test]
    fn a_given_size_is_kept_and_not_measured() {
        let given = |mib: u32| SizedBuffer {
            bytes: mib << 20,
            opens_per_sec: None,
        };
        assert_eq!(BufferSize::start(Some(1), true).sized(), given(1));
        assert_eq!(BufferSize::start(Some(64), false).sized(), given(64));
        assert_eq!(BufferSize::start(None, false).sized(), given(4));
    }

    /// The namespace of this process is among those read, through a
    /// process that is in it, this one or another.
    #[test]
    fn every_namespace_with_a_process_is_read() {
        let own = procfs::tcp_table_id(std::process::id()).expect("own /proc/PID/net/tcp");
        let opens = Opens::read();
        assert!(opens.0.iter().any(|n| n.netns == own), "{opens:?}");
        let measured = BufferSize::start(None, true).sized();
        assert!(measured.opens_per_sec.is_some(), "{measured:?}");
        assert!(measured.bytes >= DEFAULT_BUFFER_BYTES, "{measured:?}");
    }
}
