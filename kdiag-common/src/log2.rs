//! floor(log2), and the log-linear bucket scale of every kernel histogram.
//!
//! The BPF instruction set has no count-leading-zeros, and LLVM expands
//! `u64::leading_zeros` into a long sequence with several 64-bit constants.
//! Softirq exit runs this twice per softirq, right after a handler has
//! evicted the program's code from the caches, so its size costs time. The
//! de Bruijn method below is much shorter (docs/BENCHMARKS.md, "log2
//! buckets"), has no branch (one verifier path) and its table is 64 bytes
//! of `.rodata`.

/// A de Bruijn sequence B(2, 6): the top six bits of `DE_BRUIJN << k` are
/// distinct for every k in 0..64.
const DE_BRUIJN: u64 = 0x03f7_9d71_b4cb_0a89;

/// `LOG2_OF[(m * DE_BRUIJN) >> 58]` is floor(log2(m)) for every
/// m = 2^(k+1) - 1 (all bits up to bit k set). A static, not a const, so
/// that the kernel programs index one copy in `.rodata`.
static LOG2_OF: [u8; 64] = {
    let mut table = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let m = u64::MAX >> (63 - k);
        table[(m.wrapping_mul(DE_BRUIJN) >> 58) as usize] = k as u8;
        k += 1;
    }
    table
};

/// floor(log2(v)), and 0 for v = 0.
#[inline(always)]
pub fn log2(v: u64) -> u32 {
    // Set every bit below the highest set one: 2^(k+1) - 1 for log2 k.
    let mut m = v;
    m |= m >> 1;
    m |= m >> 2;
    m |= m >> 4;
    m |= m >> 8;
    m |= m >> 16;
    m |= m >> 32;
    u32::from(LOG2_OF[(m.wrapping_mul(DE_BRUIJN) >> 58) as usize])
}

/// A histogram of nanosecond values, as kept by the kernel programs: bucket
/// 0 holds [0, 2^`min_exp`); then each power of two [2^e, 2^(e+1)) from
/// 2^`min_exp` up is split into 2^`sub_bits` buckets of equal width, and
/// the last bucket, from 2^`max_exp`'s last sub-bucket on, also holds
/// everything larger. A value's bucket is less than 2^-`sub_bits` of its
/// lower bound wide (from 2^`min_exp` up, below the last bucket). With
/// `sub_bits` 0 it is a log2 histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub min_exp: u32,
    pub sub_bits: u32,
    pub max_exp: u32,
}

impl Scale {
    pub const fn new(min_exp: u32, sub_bits: u32, max_exp: u32) -> Self {
        // `bucket` shifts by e - sub_bits for e >= min_exp, and tells 0
        // (log2 0) from 1 only by putting both in bucket 0.
        assert!(0 < min_exp && sub_bits <= min_exp && min_exp <= max_exp && max_exp < 64);
        Self {
            min_exp,
            sub_bits,
            max_exp,
        }
    }

    /// Number of buckets.
    pub const fn buckets(&self) -> usize {
        1 + (((self.max_exp - self.min_exp + 1) as usize) << self.sub_bits)
    }

    /// The bucket of `ns`, from the branch-free [`log2`]. The scales are
    /// constants, so the kernel programs get only the arm of theirs.
    #[inline(always)]
    pub fn bucket(&self, ns: u64) -> usize {
        if self.sub_bits == 0 && self.min_exp == 1 {
            // A log2 scale: floor(log2(ns)), capped. The general arm below
            // gives the same, but the compiler does not reduce it to this,
            // and the softirq exit program runs it twice per softirq.
            return (log2(ns) as usize).min(self.buckets() - 1);
        }
        if ns < 1 << self.min_exp {
            return 0;
        }
        let e = log2(ns);
        if e > self.max_exp {
            return self.buckets() - 1;
        }
        let sub = (ns >> (e - self.sub_bits)) as usize & ((1 << self.sub_bits) - 1);
        1 + (((e - self.min_exp) as usize) << self.sub_bits) + sub
    }

    /// The smallest value bucket `b` holds.
    pub const fn bucket_min(&self, b: usize) -> u64 {
        if b == 0 {
            return 0;
        }
        let b = if b < self.buckets() {
            b
        } else {
            self.buckets() - 1
        };
        let e = self.min_exp + ((b - 1) >> self.sub_bits) as u32;
        let sub = ((b - 1) & ((1 << self.sub_bits) - 1)) as u64;
        (1 << e) + (sub << (e - self.sub_bits))
    }

    /// The largest value bucket `b` holds (`u64::MAX` for the last).
    pub const fn bucket_max(&self, b: usize) -> u64 {
        if b + 1 >= self.buckets() {
            u64::MAX
        } else {
            self.bucket_min(b + 1) - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value falls in a bucket whose bounds hold it, buckets grow
    /// with the value, and a bucket's width stays under the stated bound.
    fn check_scale(scale: Scale) {
        let n = scale.buckets();
        assert_eq!(scale.bucket(0), 0);
        assert_eq!(scale.bucket(u64::MAX), n - 1);
        assert_eq!(scale.bucket_min(0), 0);
        assert_eq!(scale.bucket_max(n - 1), u64::MAX);
        for b in 1..n {
            assert_eq!(scale.bucket_max(b - 1) + 1, scale.bucket_min(b), "{b}");
            assert_eq!(scale.bucket(scale.bucket_min(b)), b);
            assert_eq!(scale.bucket(scale.bucket_max(b - 1)), b - 1);
            if b < n - 1 {
                let (lo, hi) = (scale.bucket_min(b), scale.bucket_max(b));
                assert!(hi - lo < lo >> scale.sub_bits, "bucket {b}: [{lo}, {hi}]");
            }
        }
        let mut last = 0;
        // Increasing: the bottom, middle and top of each power of two.
        for v in (0..64).flat_map(|e| {
            let p = 1u64 << e;
            [p, p | (p >> 1), p | (p - 1)]
        }) {
            let b = scale.bucket(v);
            assert!(scale.bucket_min(b) <= v && v <= scale.bucket_max(b), "{v}");
            assert!(b >= last);
            last = b;
        }
    }

    #[test]
    fn scales_hold_their_values() {
        check_scale(Scale::new(1, 0, 31));
        check_scale(Scale::new(10, 3, 33));
        check_scale(Scale::new(1, 0, 63));
        check_scale(Scale::new(4, 2, 20));
    }

    #[test]
    fn a_log2_scale_is_floor_log2() {
        let scale = Scale::new(1, 0, 31);
        assert_eq!(scale.buckets(), 32);
        for v in (0..40).flat_map(|e| [1u64 << e, (1u64 << e) - 1, (3u64 << e) / 2]) {
            assert_eq!(scale.bucket(v), (log2(v) as usize).min(31), "{v}");
        }
    }

    #[test]
    fn matches_leading_zeros() {
        assert_eq!(log2(0), 0);
        for k in 0..64 {
            for v in [1u64 << k, (1u64 << k) | 1, u64::MAX >> (63 - k)] {
                assert_eq!(log2(v), 63 - v.leading_zeros(), "{v}");
            }
        }
        // The table is a permutation: a wrong constant would leave holes.
        let mut seen = [false; 64];
        for k in 0..64 {
            seen[(LOG2_OF[k]) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
