//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) to wall time.

use time::{OffsetDateTime, format_description::FormatItem, macros::format_description};

const RFC3339_NANOS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z");

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer; these clocks cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Monotonic nanoseconds now, on the clock the kernel programs stamp with.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// Converts monotonic timestamps to wall time. The offset between the two
/// clocks moves when the wall clock is stepped (NTP, an operator), so the
/// agent calls [`WallClock::resync`] every interval.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let mut clock = Self { offset_ns: 0 };
        clock.resync();
        clock
    }

    pub fn resync(&mut self) {
        self.offset_ns = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// RFC 3339 UTC with nanoseconds, appended to `out`.
    pub fn format_into(&self, mono_ns: u64, out: &mut String) {
        let unix_ns = i128::from(mono_ns) + self.offset_ns;
        let formatted = OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
            .ok()
            .and_then(|t| t.format(RFC3339_NANOS).ok());
        out.push_str(
            formatted
                .as_deref()
                .unwrap_or("1970-01-01T00:00:00.000000000Z"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_nanoseconds() {
        // 2026-11-21T22:36:07.000000042Z is 1795300567 s after the epoch.
        let clock = WallClock::with_offset(1_795_300_567_000_000_000);
        let mut s = String::new();
        clock.format_into(42, &mut s);
        assert_eq!(s, "2026-11-21T22:36:07.000000042Z");
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
