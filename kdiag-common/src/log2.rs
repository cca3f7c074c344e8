//! floor(log2) for the kernel programs' histograms.
//!
//! The BPF instruction set has no count-leading-zeros, and LLVM expands
//! `u64::leading_zeros` into about fifty instructions with four 64-bit
//! constants. Softirq exit runs this twice per softirq, right after a handler
//! has evicted the program's code from the caches, so its size costs time.
//! The de Bruijn method below is a third of that, has no branch (one
//! verifier path) and its table is 64 bytes of `.rodata`.

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

#[cfg(test)]
mod tests {
    use super::*;

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
