//! Log2 histograms as the kernel programs keep them
//! (`kdiag_common::softirq::bucket_of`): bucket `i` holds [2^i, 2^(i+1)) ns,
//! bucket 0 holds [0, 2), the last bucket everything above. Percentiles
//! and maxima of one interval, from the bucket differences of two reads.

use kdiag_common::softirq::HIST_BUCKETS;

pub type Buckets = [u64; HIST_BUCKETS];

/// Smallest and largest value bucket `i` holds.
pub fn bucket_bounds(i: usize) -> (u64, u64) {
    let lo = if i == 0 { 0 } else { 1u64 << i };
    let hi = if i + 1 >= HIST_BUCKETS {
        u64::MAX
    } else {
        (1u64 << (i + 1)) - 1
    };
    (lo, hi)
}

/// The counts added between two reads of the same monotonic buckets.
pub fn delta(now: &Buckets, before: &Buckets) -> Buckets {
    std::array::from_fn(|i| now[i].saturating_sub(before[i]))
}

/// Count, maximum and 99th percentile of one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub max_ns: u64,
    pub p99_ns: u64,
}

/// Summarizes the interval's bucket counts `b`.
///
/// `reported_max` is the kernel's maximum for the interval. It is exact
/// unless a softirq raced the switch between two intervals (its counts and
/// its maximum then land in neighbouring intervals), so it is kept within
/// what the buckets allow: the bounds of the highest non-empty bucket, and,
/// given the interval's `total`, between total / count and total.
///
/// p99 is the upper bound of the bucket holding the sample of rank
/// ceil(0.99 * count), capped at the maximum: never below the true p99 and
/// less than twice it. So `p99_ns <= max_ns` always, and with a total,
/// `max_ns <= total <= count * max_ns`.
pub fn summarize(b: &Buckets, reported_max: u64, total: Option<u64>) -> Option<Latency> {
    let count: u64 = b.iter().sum();
    let top = b.iter().rposition(|&n| n > 0)?;
    let (lo, hi) = bucket_bounds(top);
    let mut max_ns = reported_max.clamp(lo, hi);
    if let Some(total) = total {
        max_ns = max_ns.clamp(total.div_ceil(count), total);
    }
    let rank = (count * 99).div_ceil(100);
    let mut seen = 0;
    let p99_bucket = b
        .iter()
        .position(|&n| {
            seen += n;
            seen >= rank
        })
        .unwrap_or(top);
    let p99_ns = bucket_bounds(p99_bucket).1.min(max_ns);
    Some(Latency {
        count,
        max_ns,
        p99_ns,
    })
}

#[cfg(test)]
mod tests {
    use kdiag_common::softirq::bucket_of;

    use super::*;

    #[test]
    fn buckets_match_the_kernel_side() {
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
            assert_eq!(bucket_of(ns), bucket, "{ns}");
            let (lo, hi) = bucket_bounds(bucket);
            assert!(
                lo <= ns && ns <= hi,
                "{ns} not in bucket {bucket} [{lo}, {hi}]"
            );
        }
        assert_eq!(bucket_bounds(0), (0, 1));
        assert_eq!(bucket_bounds(10), (1024, 2047));
        assert_eq!(bucket_bounds(HIST_BUCKETS - 1), (1 << 31, u64::MAX));
    }

    fn hist(samples: &[u64]) -> Buckets {
        let mut b = [0; HIST_BUCKETS];
        for &s in samples {
            b[bucket_of(s)] += 1;
        }
        b
    }

    #[test]
    fn exact_max_and_bucket_bound_p99() {
        let mut samples = vec![1500; 99];
        samples.push(100_000);
        let total = samples.iter().sum();
        let l = summarize(&hist(&samples), 100_000, Some(total)).unwrap();
        assert_eq!(l.count, 100);
        assert_eq!(l.max_ns, 100_000);
        // 1500 is in [1024, 2047].
        assert_eq!(l.p99_ns, 2047);
        // One sample: p99 is the sample's bucket, capped at the maximum.
        let l = summarize(&hist(&[1500]), 1500, Some(1500)).unwrap();
        assert_eq!((l.max_ns, l.p99_ns), (1500, 1500));
        assert_eq!(summarize(&[0; HIST_BUCKETS], 7, Some(7)), None);
    }

    #[test]
    fn p99_is_an_upper_bound_under_twice_the_true_value() {
        for v in [2u64, 3, 100, 1000, 4095, 4096, 1 << 30] {
            let b = hist(&vec![v; 1000]);
            // Even with a maximum far above (a slow outlier).
            let l = summarize(&b, u64::MAX, None).unwrap();
            assert!(l.p99_ns >= v && l.p99_ns < 2 * v, "{v}: {l:?}");
        }
    }

    #[test]
    fn a_raced_maximum_is_kept_consistent() {
        // The slowest softirq's maximum went to the next interval: the
        // kernel reports 0 for this one.
        let samples = [1000, 1900];
        let total = 2900;
        let l = summarize(&hist(&samples), 0, Some(total)).unwrap();
        assert!(l.max_ns >= 1024 && l.max_ns <= 2047, "{l:?}");
        assert!(l.max_ns <= total && total <= l.count * l.max_ns, "{l:?}");
        assert!(l.p99_ns <= l.max_ns);
        // A maximum from another interval, above these buckets.
        let l = summarize(&hist(&samples), 1 << 20, Some(total)).unwrap();
        assert_eq!(l.max_ns, 2047);
        // A read that caught a bucket before its total (counters torn by a
        // concurrent update): the invariants still hold.
        let l = summarize(&hist(&samples), 1900, Some(1000)).unwrap();
        assert!(l.p99_ns <= l.max_ns && l.max_ns <= 1000 && 1000 <= 2 * l.max_ns);
    }

    #[test]
    fn deltas_of_monotonic_counters() {
        let mut a = [0; HIST_BUCKETS];
        let mut b = [0; HIST_BUCKETS];
        a[3] = 5;
        b[3] = 9;
        b[7] = 1;
        let d = delta(&b, &a);
        assert_eq!((d[3], d[7], d.iter().sum::<u64>()), (4, 1, 5));
    }
}
