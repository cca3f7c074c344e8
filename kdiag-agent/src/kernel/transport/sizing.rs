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

use std::time::{Duration, Instant};

use kdiag_common::DEFAULT_BUFFER_BYTES;

use crate::attribution::procfs;

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

#[derive(Debug, Clone, Copy)]
pub(crate) enum BufferSize {
    /// `--buffer-mib`, in bytes.
    Given(u32),
    /// From the TCP connections opened since `at` (`opens` then, if
    /// /proc/net/snmp could be read).
    FromOpens { opens: Option<u64>, at: Instant },
}

impl BufferSize {
    /// `given_mib` if given, else measured from now on when `tcp_states`
    /// (a class records TCP state changes: the busiest producer by far),
    /// else the default.
    pub(crate) fn start(given_mib: Option<u32>, tcp_states: bool) -> Self {
        match given_mib {
            Some(mib) => Self::Given(mib << 20),
            None if tcp_states => Self::FromOpens {
                opens: procfs::tcp_opens(),
                at: Instant::now(),
            },
            None => Self::Given(DEFAULT_BUFFER_BYTES),
        }
    }

    /// The size, in bytes: a power of two.
    pub(crate) fn bytes(self) -> u32 {
        match self {
            Self::Given(bytes) => bytes,
            Self::FromOpens { opens, at } => {
                let opened = opens
                    .zip(procfs::tcp_opens())
                    .map(|(then, now)| now.saturating_sub(then));
                sized_for(opened, at.elapsed())
            }
        }
    }
}

/// The buffer for `opened` connection ends in `over`: the default, or more
/// to hold [`HOLD_SECS`] of their records, up to [`MAX_SIZED_BYTES`].
fn sized_for(opened: Option<u64>, over: Duration) -> u32 {
    let Some(opened) = opened else {
        return DEFAULT_BUFFER_BYTES;
    };
    // A window under a millisecond says little; count it as one.
    let per_sec = opened as f64 / over.as_secs_f64().max(1e-3);
    let wanted = (per_sec * BYTES_PER_OPEN * HOLD_SECS).min(f64::from(MAX_SIZED_BYTES));
    // Within u32 by the min above.
    (wanted as u32)
        .next_power_of_two()
        .clamp(DEFAULT_BUFFER_BYTES, MAX_SIZED_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_host_gets_the_default() {
        let sec = Duration::from_secs(1);
        assert_eq!(sized_for(Some(0), sec), DEFAULT_BUFFER_BYTES);
        assert_eq!(sized_for(Some(1000), sec), DEFAULT_BUFFER_BYTES);
        // Unreadable counters.
        assert_eq!(sized_for(None, sec), DEFAULT_BUFFER_BYTES);
    }

    #[test]
    fn churn_gets_half_a_second_of_its_records() {
        // 40k connection ends a second (20k loopback connections): 20 MB.
        let ms = Duration::from_millis(20);
        assert_eq!(sized_for(Some(800), ms), 32 << 20);
        // 10k a second: 5 MB.
        assert_eq!(sized_for(Some(200), ms), 8 << 20);
        // 8k a second: 4 MB.
        assert_eq!(sized_for(Some(160), ms), 4 << 20);
    }

    #[test]
    fn never_more_than_the_ceiling() {
        assert_eq!(sized_for(Some(u64::MAX), Duration::ZERO), MAX_SIZED_BYTES);
        assert_eq!(
            sized_for(Some(10_000_000), Duration::from_secs(1)),
            MAX_SIZED_BYTES
        );
    }

    #[test]
    fn a_given_size_is_kept() {
        assert_eq!(BufferSize::start(Some(1), true).bytes(), 1 << 20);
        assert_eq!(BufferSize::start(Some(64), false).bytes(), 64 << 20);
        assert_eq!(BufferSize::start(None, false).bytes(), DEFAULT_BUFFER_BYTES);
    }
}
