//! Latency statistics from the kernel programs' histograms: memory stalls
//! (per thread, `kdiag_common::memory::HIST`) and softirqs (per CPU and
//! vector, `kdiag_common::softirq::HIST`). Both are bucketed in the kernel
//! on a `kdiag_common::log2::Scale`, from its branch-free log2, so the
//! agent takes bucket bounds from the same scale and applies one
//! percentile rule to either.
//!
//! **Percentiles.** The q-th percentile of the n values a histogram holds
//! is the nearest rank, the value of rank ceil(q/100 * n) (at least 1) in
//! ascending order, reported as the largest value its bucket holds and
//! capped at the maximum. With an exact maximum it is never below the true
//! percentile and above it by less than one bucket's width: less than
//! 2^-`sub_bits` of the true value from 2^`min_exp` ns up (memory stalls:
//! 12.5%; softirqs: less than twice it), and less than 2^`min_exp` ns below
//! that (memory stalls: 1.024 µs; softirqs: 2 ns). The last bucket has no
//! upper bound: there the cap at the maximum is the percentile.

use kdiag_common::{log2::Scale, memory};

use crate::output::record::LatencySummary;

/// The counts added between two reads of the same kernel buckets, which
/// only grow.
pub(crate) fn delta<const N: usize>(now: &[u64; N], before: &[u64; N]) -> [u64; N] {
    std::array::from_fn(|i| now[i].saturating_sub(before[i]))
}

/// Percentile `q` (in percent) of the values in `buckets`, by the rule in
/// the module's documentation but not yet capped at the maximum; `None`
/// for an empty histogram.
pub(crate) fn percentile(scale: &Scale, buckets: &[u64], q: u64) -> Option<u64> {
    let n: u64 = buckets.iter().sum();
    let rank = (n * q).div_ceil(100).max(1);
    let mut seen = 0;
    let bucket = buckets.iter().position(|&count| {
        seen += count;
        seen >= rank
    })?;
    Some(scale.bucket_max(bucket))
}

/// The bounds of the highest non-empty bucket, where the largest value
/// lies; `None` for an empty histogram.
pub(crate) fn top_bucket(scale: &Scale, buckets: &[u64]) -> Option<(u64, u64)> {
    let b = buckets.iter().rposition(|&count| count > 0)?;
    Some((scale.bucket_min(b), scale.bucket_max(b)))
}

/// Memory stalls accumulated over an interval: counters and a histogram on
/// `memory::HIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Latencies {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub hist: [u64; memory::HIST_BUCKETS],
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            count: 0,
            total_ns: 0,
            max_ns: 0,
            hist: [0; memory::HIST_BUCKETS],
        }
    }
}

impl Latencies {
    pub(crate) fn merge(&mut self, other: &Latencies) {
        self.count += other.count;
        self.total_ns = self.total_ns.saturating_add(other.total_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
        for (a, b) in self.hist.iter_mut().zip(other.hist.iter()) {
            *a += b;
        }
    }

    /// The top of the highest non-empty bucket: an upper bound of the
    /// largest latency the histogram holds (0 when empty).
    pub(crate) fn hist_max(&self) -> u64 {
        top_bucket(&memory::HIST, &self.hist).map_or(0, |(_, hi)| hi)
    }

    /// The summary. Whatever the inputs (the counters and the histogram are
    /// read from the kernel while it may be adding to them, so they can be
    /// one stall apart), p50 <= p99 <= max <= total holds.
    pub(crate) fn summary(&self) -> LatencySummary {
        let max_ns = self.max_ns.min(self.total_ns);
        let percentile = |q| percentile(&memory::HIST, &self.hist, q).unwrap_or(0);
        let p99_ns = percentile(99).min(max_ns);
        let p50_ns = percentile(50).min(p99_ns);
        LatencySummary {
            count: self.count,
            total_ns: self.total_ns,
            max_ns,
            p50_ns,
            p99_ns,
        }
    }
}

/// Count, maximum and 99th percentile of one interval of a softirq
/// histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Latency {
    pub count: u64,
    pub max_ns: u64,
    pub p99_ns: u64,
}

/// Summarizes the interval's bucket counts `b` on `scale`; `None` when
/// they are all 0.
///
/// `reported_max` is the kernel's maximum for the interval. It is exact
/// unless a softirq raced the switch between two intervals (its counts and
/// its maximum then land in neighbouring intervals), so it is kept within
/// what the buckets allow: the bounds of the highest non-empty bucket, and,
/// given the interval's `total`, between total / count and total. p99 is
/// capped at it, so `p99_ns <= max_ns` always, and with a total,
/// `max_ns <= total <= count * max_ns`.
pub(crate) fn summarize(
    scale: &Scale,
    b: &[u64],
    reported_max: u64,
    total: Option<u64>,
) -> Option<Latency> {
    let count: u64 = b.iter().sum();
    let (lo, hi) = top_bucket(scale, b)?;
    let mut max_ns = reported_max.clamp(lo, hi);
    if let Some(total) = total {
        max_ns = max_ns.clamp(total.div_ceil(count), total);
    }
    let p99_ns = percentile(scale, b, 99)?.min(max_ns);
    Some(Latency {
        count,
        max_ns,
        p99_ns,
    })
}

#[cfg(test)]
mod tests {
    use kdiag_common::softirq;
    use proptest::prelude::*;

    use super::*;

    fn of(values: &[u64]) -> Latencies {
        let mut l = Latencies::default();
        for &v in values {
            l.count += 1;
            l.total_ns += v;
            l.max_ns = l.max_ns.max(v);
            l.hist[memory::HIST.bucket(v)] += 1;
        }
        l
    }

    fn softirq_hist(samples: &[u64]) -> [u64; softirq::HIST_BUCKETS] {
        let mut b = [0; softirq::HIST_BUCKETS];
        for &s in samples {
            b[softirq::HIST.bucket(s)] += 1;
        }
        b
    }

    /// The exact nearest-rank percentile.
    fn exact(values: &[u64], q: u64) -> u64 {
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = (v.len() as u64 * q).div_ceil(100).max(1);
        v[rank as usize - 1]
    }

    proptest! {
        /// The stated bound, on both scales: never below the exact
        /// nearest-rank percentile, above it by less than a bucket.
        #[test]
        fn percentiles_within_one_bucket_of_the_exact_value(
            values in proptest::collection::vec(0u64..(1 << 36), 1..300),
            q in 1u64..=100,
        ) {
            let max = *values.iter().max().unwrap();
            for scale in [memory::HIST, softirq::HIST] {
                let mut b = vec![0; scale.buckets()];
                for &v in &values {
                    b[scale.bucket(v)] += 1;
                }
                let got = percentile(&scale, &b, q).unwrap().min(max);
                let want = exact(&values, q);
                prop_assert!(got >= want, "{scale:?} p{q} {got} under {want}");
                if scale.bucket(want) == scale.buckets() - 1 {
                    // The last bucket is unbounded: the maximum caps it.
                    continue;
                }
                let bound = if want < 1 << scale.min_exp {
                    1 << scale.min_exp
                } else {
                    want >> scale.sub_bits
                };
                prop_assert!(got - want < bound, "{scale:?} p{q} {got} over {want}");
            }
        }
    }

    #[test]
    fn memory_percentiles_within_stated_error() {
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
    fn one_rule_for_both_scales() {
        // The same 100 values: 99 of 1500 ns, one of 100 µs. The rank of
        // p99 is 99, a 1500 ns value, reported as the top of its bucket on
        // each scale; p50 likewise.
        let mut values = vec![1500; 99];
        values.push(100_000);
        let mem = of(&values);
        assert_eq!(percentile(&memory::HIST, &mem.hist, 99), Some(1535));
        assert_eq!(percentile(&memory::HIST, &mem.hist, 50), Some(1535));
        let sirq = softirq_hist(&values);
        assert_eq!(percentile(&softirq::HIST, &sirq, 99), Some(2047));
        assert_eq!(percentile(&softirq::HIST, &sirq, 50), Some(2047));
        // One more slow value moves the rank of p99 into the slow bucket.
        values.push(100_000);
        assert_eq!(
            percentile(&softirq::HIST, &softirq_hist(&values), 99),
            Some(131_071)
        );
        assert_eq!(percentile(&softirq::HIST, &[0; 32], 99), None);
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

    #[test]
    fn softirq_buckets_are_the_kernels() {
        for (ns, bucket) in [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 1),
            (4, 2),
            (1023, 9),
            (1024, 10),
            ((1 << 31) - 1, 30),
            (1 << 31, 31),
            (u64::MAX, 31),
        ] {
            assert_eq!(softirq::HIST.bucket(ns), bucket, "{ns}");
            let (lo, hi) = (
                softirq::HIST.bucket_min(bucket),
                softirq::HIST.bucket_max(bucket),
            );
            assert!(
                lo <= ns && ns <= hi,
                "{ns} not in bucket {bucket} [{lo}, {hi}]"
            );
        }
        assert_eq!(softirq::HIST.bucket_max(0), 1);
        assert_eq!(softirq::HIST.bucket_min(10), 1024);
        assert_eq!(softirq::HIST.bucket_max(10), 2047);
        assert_eq!(softirq::HIST.bucket_min(31), 1 << 31);
    }

    #[test]
    fn exact_max_and_bucket_bound_p99() {
        let mut samples = vec![1500; 99];
        samples.push(100_000);
        let total = samples.iter().sum();
        let l = summarize(
            &softirq::HIST,
            &softirq_hist(&samples),
            100_000,
            Some(total),
        )
        .unwrap();
        assert_eq!(l.count, 100);
        assert_eq!(l.max_ns, 100_000);
        // 1500 is in [1024, 2047].
        assert_eq!(l.p99_ns, 2047);
        // One sample: p99 is the sample's bucket, capped at the maximum.
        let l = summarize(&softirq::HIST, &softirq_hist(&[1500]), 1500, Some(1500)).unwrap();
        assert_eq!((l.max_ns, l.p99_ns), (1500, 1500));
        assert_eq!(summarize(&softirq::HIST, &[0; 32], 7, Some(7)), None);
    }

    #[test]
    fn p99_is_an_upper_bound_under_twice_the_true_value() {
        for v in [2u64, 3, 100, 1000, 4095, 4096, 1 << 30] {
            let b = softirq_hist(&vec![v; 1000]);
            // Even with a maximum far above (a slow outlier).
            let l = summarize(&softirq::HIST, &b, u64::MAX, None).unwrap();
            assert!(l.p99_ns >= v && l.p99_ns < 2 * v, "{v}: {l:?}");
        }
    }

    #[test]
    fn a_raced_maximum_is_kept_consistent() {
        // The slowest softirq's maximum went to the next interval: the
        // kernel reports 0 for this one.
        let b = softirq_hist(&[1000, 1900]);
        let total = 2900;
        let l = summarize(&softirq::HIST, &b, 0, Some(total)).unwrap();
        assert!(l.max_ns >= 1024 && l.max_ns <= 2047, "{l:?}");
        assert!(l.max_ns <= total && total <= l.count * l.max_ns, "{l:?}");
        assert!(l.p99_ns <= l.max_ns);
        // A maximum from another interval, above these buckets.
        let l = summarize(&softirq::HIST, &b, 1 << 20, Some(total)).unwrap();
        assert_eq!(l.max_ns, 2047);
        // A read that caught a bucket before its total (counters torn by a
        // concurrent update): the invariants still hold.
        let l = summarize(&softirq::HIST, &b, 1900, Some(1000)).unwrap();
        assert!(l.p99_ns <= l.max_ns && l.max_ns <= 1000 && 1000 <= 2 * l.max_ns);
    }

    #[test]
    fn deltas_of_monotonic_counters() {
        let mut a = [0; softirq::HIST_BUCKETS];
        let mut b = [0; softirq::HIST_BUCKETS];
        a[3] = 5;
        b[3] = 9;
        b[7] = 1;
        let d = delta(&b, &a);
        assert_eq!((d[3], d[7], d.iter().sum::<u64>()), (4, 1, 5));
    }
}
