//! A tiny seeded random generator shared by the datasets, the sampler and model initialisation.
//!
//! SplitMix64 (Steele, Lea, Flood 2014): one 64-bit state advanced by a fixed odd increment and
//! scrambled by two multiply-xorshift rounds. It is not cryptographic, but it is fast, has no
//! dependency, and gives the same stream on every machine and every rank, which is all that
//! deterministic data and replicated initialisation need. Independent streams are derived from
//! `(seed, stream)` pairs with [`SplitMix64::derive`], so e.g. block 7 of a model is initialised the
//! same way whether or not blocks 0..7 were built in the same process.

/// The increment of SplitMix64: the odd integer closest to 2^64 / golden ratio.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// A deterministic 64-bit generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// An independent stream for `(seed, stream)`: used to give every model block, every epoch and
    /// every sample its own generator, so none depends on how many numbers another consumed.
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut outer = Self::new(seed ^ mix(stream.wrapping_add(GOLDEN_GAMMA)));
        // One step decorrelates seeds that differ in a single bit.
        let state = outer.next_u64();
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// A uniform float in `[0, 1)` with 24 random bits (every value exactly representable in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform float in `[-bound, bound)`.
    pub fn uniform(&mut self, bound: f32) -> f32 {
        (self.next_f32() * 2.0 - 1.0) * bound
    }

    /// A standard normal sample (Box-Muller; one of the pair is discarded, which keeps the
    /// generator stateless apart from `state`).
    pub fn normal(&mut self) -> f32 {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-shift; the bias for the sizes
    /// used here (n < 2^32) is below 2^-32 and irrelevant: determinism is what matters.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0, "below(0) has no value to return");
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Shuffles `items` in place (Fisher-Yates, from the back).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// SplitMix64's finaliser: a bijection of u64 that spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
