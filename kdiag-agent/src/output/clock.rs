//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) to wall time.

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

use crate::sys;

const SECOND: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].");

/// Monotonic nanoseconds now, on the clock the kernel programs stamp with.
pub(crate) fn monotonic_ns() -> u64 {
    sys::process::monotonic_ns() as u64
}

/// Length of an RFC 3339 UTC time with nanoseconds:
/// `2026-11-21T22:36:07.000000042Z`.
pub(crate) const RFC3339_LEN: usize = 30;

/// `YYYY-MM-DDTHH:MM:SS.`, the part that changes once a second.
const SECOND_LEN: usize = 20;

/// Converts monotonic timestamps to wall time. The offset between the two
/// clocks moves when the wall clock is stepped (NTP, an operator), so the
/// agent calls [`WallClock::resync`] every interval.
#[derive(Debug, Clone)]
pub(crate) struct WallClock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
    /// The last second formatted, and its text: records come thousands a
    /// second, and calendar arithmetic is most of a timestamp's cost.
    second: Option<(i128, [u8; SECOND_LEN])>,
}

impl WallClock {
    pub(crate) fn now() -> Self {
        let mut clock = Self::with_offset(0);
        clock.resync();
        clock
    }

    pub(crate) fn resync(&mut self) {
        self.offset_ns = sys::process::realtime_ns() - sys::process::monotonic_ns();
    }

    pub(crate) fn with_offset(offset_ns: i128) -> Self {
        Self {
            offset_ns,
            second: None,
        }
    }

    /// RFC 3339 UTC with nanoseconds.
    pub(crate) fn format(&mut self, mono_ns: u64) -> [u8; RFC3339_LEN] {
        let unix_ns = i128::from(mono_ns) + self.offset_ns;
        let (sec, nanos) = (
            unix_ns.div_euclid(1_000_000_000),
            unix_ns.rem_euclid(1_000_000_000),
        );
        let prefix = match self.second {
            Some((cached, text)) if cached == sec => text,
            _ => {
                let text = second_text(sec);
                self.second = Some((sec, text));
                text
            }
        };
        let mut out = [0u8; RFC3339_LEN];
        out[..SECOND_LEN].copy_from_slice(&prefix);
        let mut n = nanos as u32;
        for digit in out[SECOND_LEN..RFC3339_LEN - 1].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out[RFC3339_LEN - 1] = b'Z';
        out
    }

    /// [`WallClock::format`], appended to `out`.
    pub(crate) fn format_into(&mut self, mono_ns: u64, out: &mut String) {
        let text = self.format(mono_ns);
        // ASCII digits and punctuation only.
        out.push_str(std::str::from_utf8(&text).unwrap_or_default());
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` of a unix second; times the calendar cannot hold
/// come out as the epoch.
fn second_text(sec: i128) -> [u8; SECOND_LEN] {
    const EPOCH: &[u8; SECOND_LEN] = b"1970-01-01T00:00:00.";
    let formatted = i64::try_from(sec)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(SECOND).ok());
    match formatted {
        Some(f) if f.len() == SECOND_LEN => {
            let mut text = [0u8; SECOND_LEN];
            text.copy_from_slice(f.as_bytes());
            text
        }
        _ => *EPOCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_nanoseconds() {
        // 2026-11-21T22:36:07.000000042Z is 1795300567 s after the epoch.
        let mut clock = WallClock::with_offset(1_795_300_567_000_000_000);
        let mut s = String::new();
        clock.format_into(42, &mut s);
        assert_eq!(s, "2026-11-21T22:36:07.000000042Z");
    }

    #[test]
    fn cached_second_follows_the_clock() {
        let mut clock = WallClock::with_offset(1_795_300_567_000_000_000);
        let text = |c: &mut WallClock, ns| String::from_utf8(c.format(ns).to_vec()).unwrap();
        assert_eq!(
            text(&mut clock, 999_999_999),
            "2026-11-21T22:36:07.999999999Z"
        );
        assert_eq!(
            text(&mut clock, 1_000_000_000),
            "2026-11-21T22:36:08.000000000Z"
        );
        // Back in time (a stepped clock, records from another CPU).
        assert_eq!(text(&mut clock, 5), "2026-11-21T22:36:07.000000005Z");
        let mut before_epoch = WallClock::with_offset(-1);
        assert_eq!(text(&mut before_epoch, 0), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn live_clock_is_plausible() {
        let mut s = String::new();
        WallClock::now().format_into(monotonic_ns(), &mut s);
        assert!(
            s.starts_with("20") && s.ends_with('Z') && s.len() == 30,
            "{s}"
        );
    }
}
