//! Latency summaries from the kernel's log-linear histograms
//! (`kdiag_common::memory::hist_bucket`).
//!
//! A percentile is the nearest rank (the smallest latency with at least
//! q% of the samples at or below it), reported as the top of the bucket
//! that rank falls in, capped at the maximum. Buckets are 1/8 of a power of
//! two wide, so a reported percentile is never below the true one and at
//! most 12.5% above it; under 1.024 µs, where one bucket holds everything,
//! it is at most 1.023 µs above (still capped at the maximum).

use kdiag_common::memory::{HIST_BUCKETS, hist_bucket_max};

/// count, total, max and two percentiles of one set of latencies; records
/// flatten it into their own fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

/// Latencies accumulated over an interval: counters and a histogram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latencies {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub hist: [u64; HIST_BUCKETS],
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            count: 0,
            total_ns: 0,
            max_ns: 0,
            hist: [0; HIST_BUCKETS],
        }
    }
}

impl Latencies {
    pub fn merge(&mut self, other: &Latencies) {
        self.count += other.count;
        self.total_ns = self.total_ns.saturating_add(other.total_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
        for (a, b) in self.hist.iter_mut().zip(other.hist.iter()) {
            *a += b;
        }
    }

    /// The top of the highest non-empty bucket: an upper bound of the
    /// largest latency the histogram holds (0 when empty).
    pub fn hist_max(&self) -> u64 {
        self.hist
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, hist_bucket_max)
    }

    /// The summary. Whatever the inputs (the counters and the histogram are
    /// read from the kernel while it may be adding to them, so they can be
    /// one stall apart), p50 <= p99 <= max <= total holds.
    pub fn summary(&self) -> LatencySummary {
        let max_ns = self.max_ns.min(self.total_ns);
        let p99_ns = self.percentile(99).min(max_ns);
        let p50_ns = self.percentile(50).min(p99_ns);
        LatencySummary {
            count: self.count,
            total_ns: self.total_ns,
            max_ns,
            p50_ns,
            p99_ns,
        }
    }

    /// Nearest-rank percentile `q` (in percent) as the top of its bucket;
    /// u64::MAX when the rank is beyond the histogram (the caller caps it).
    fn percentile(&self, q: u64) -> u64 {
        let in_hist: u64 = self.hist.iter().sum();
        if in_hist == 0 {
            return 0;
        }
        let rank = (in_hist * q).div_ceil(100).max(1);
        let mut seen = 0;
        for (bucket, &n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return hist_bucket_max(bucket);
            }
        }
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::memory::hist_bucket;

    use super::*;

    fn of(values: &[u64]) -> Latencies {
        let mut l = Latencies::default();
        for &v in values {
            l.count += 1;
            l.total_ns += v;
            l.max_ns = l.max_ns.max(v);
            l.hist[hist_bucket(v)] += 1;
        }
        l
    }

    /// The exact nearest-rank percentile.
    fn exact(values: &[u64], q: u64) -> u64 {
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = (v.len() as u64 * q).div_ceil(100).max(1);
        v[rank as usize - 1]
    }

    #[test]
    fn percentiles_within_stated_error() {
        // 1000 latencies from 20 µs to ~20 ms, unevenly spread.
        let values: Vec<u64> = (1..=1000u64).map(|i| 20_000 + i * i * 20).collect();
        let s = of(&values).summary();
        for (q, got) in [(50, s.p50_ns), (99, s.p99_ns)] {
            let want = exact(&values, q);
            assert!(got >= want, "p{q} {got} under {want}");
            assert!(got <= want + want / 8, "p{q} {got} over {want} + 12.5%");
        }
        assert_eq!(s.count, 1000);
        assert_eq!(s.max_ns, *values.last().unwrap());
        assert_eq!(s.total_ns, values.iter().sum::<u64>());
    }

    #[test]
    fn ordering_always_holds() {
        for values in [
            &[5u64][..],
            &[1_000_000],
            &[100, 200, 300],
            &[1 << 40, 1],
            &[3_000, 3_001, 3_002, 3_003],
        ] {
            let s = of(values).summary();
            assert!(
                s.p50_ns <= s.p99_ns && s.p99_ns <= s.max_ns && s.max_ns <= s.total_ns,
                "{values:?}: {s:?}"
            );
        }
        // A single stall: every statistic is that stall.
        let s = of(&[123_456]).summary();
        assert_eq!((s.p50_ns, s.p99_ns, s.max_ns), (123_456, 123_456, 123_456));
    }

    #[test]
    fn torn_and_empty_inputs_stay_ordered() {
        assert_eq!(Latencies::default().summary(), LatencySummary::default());
        // Counters one stall ahead of the histogram, or behind it.
        let mut l = of(&[10_000, 20_000]);
        l.count += 1;
        l.total_ns += 50_000;
        let s = l.summary();
        assert!(s.p50_ns <= s.p99_ns && s.p99_ns <= s.max_ns && s.max_ns <= s.total_ns);
        let mut l = of(&[10_000, 20_000]);
        l.total_ns = 5;
        let s = l.summary();
        assert!(s.p50_ns <= s.p99_ns && s.p99_ns <= s.max_ns && s.max_ns <= s.total_ns);
    }

    #[test]
    fn merge_and_hist_max() {
        let mut a = of(&[10_000]);
        a.merge(&of(&[1_000_000, 2_000]));
        assert_eq!((a.count, a.max_ns), (3, 1_000_000));
        assert_eq!(a.total_ns, 1_012_000);
        assert!(a.hist_max() >= 1_000_000 && a.hist_max() <= 1_125_000);
        assert_eq!(Latencies::default().hist_max(), 0);
    }
}
