//! A small deterministic generator (SplitMix64) so that sampling and augmentation depend only on seeds, never on
//! thread timing or a library's version.

/// SplitMix64's increment (the golden ratio in 64-bit fixed point).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective mix of one 64-bit word. Every seed derivation of the project
/// (this generator, [`mix`], the trainer's per-iteration libtorch seed) goes through it.
pub fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes several words into one seed (SplitMix64 steps applied in sequence).
pub fn mix(words: &[u64]) -> u64 {
    words.iter().fold(GOLDEN_GAMMA, |acc, &w| splitmix(acc ^ splitmix(w)))
}

/// One SplitMix64 step from state `z`.
fn splitmix(z: u64) -> u64 {
    finalize(z.wrapping_add(GOLDEN_GAMMA))
}

/// SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for a seed.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        finalize(self.state)
    }
    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }
    /// Uniform integer in `[0, n)` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpoints store sampler states and runs are reproduced from seeds: the streams must never change.
    #[test]
    fn streams_are_splitmix64s() {
        // SplitMix64's published first output for state 0.
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(finalize(GOLDEN_GAMMA), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix(&[1, 2, 3]), 0x16D1_3681_D8F4_8EF1, "the value of the original implementation");
    }
}
