//! A tiny deterministic random source. Not `rand`'s `StdRng`, whose algorithm may change between
//! versions: "same seed, same tokens" must hold across upgrades, so the generator is fixed here.

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, full period, good enough statistics for
/// simulation, and trivially reproducible in any language a client might check results from.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_signed(&mut self) -> f64 {
        self.next_f64() * 2.0 - 1.0
    }

    /// A standard normal draw (Box–Muller; one of the pair, for a stream that stays simple to
    /// reproduce elsewhere).
    pub fn next_normal(&mut self) -> f64 {
        let radius = (-2.0 * (1.0 - self.next_f64()).ln()).sqrt();
        radius * (std::f64::consts::TAU * self.next_f64()).cos()
    }

    /// A log-normal factor of mean 1 whose logarithm has deviation `sigma`: right-skewed, never
    /// negative, the shape measured kernel and step times take (a long slow tail, a sharp fast
    /// edge) where a symmetric factor makes p99 look as good as p1 is bad.
    pub fn next_lognormal(&mut self, sigma: f64) -> f64 {
        (sigma * self.next_normal() - sigma * sigma / 2.0).exp()
    }
}

/// SplitMix64's output function: a strong 64-bit mixer, also used to hash small tuples.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over bytes: a stable hash (std's `DefaultHasher` may change between releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_reproducible_and_in_range() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
        // Pinned values: a change here changes every generation's tokens.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn lognormal_factors_average_one_and_lean_slow() {
        let mut rng = SplitMix64::new(7);
        let mut draws: Vec<f64> = (0..100_000).map(|_| rng.next_lognormal(0.1)).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 1.0).abs() < 0.002, "mean {mean}");
        draws.sort_by(f64::total_cmp);
        let (p1, p99) = (draws[1_000], draws[99_000]);
        // Right-skewed: the slow tail reaches further above 1 than the fast edge below it.
        assert!(p99 - 1.0 > 1.0 - p1, "p1 {p1}, p99 {p99}");
        assert!(draws[0] > 0.0);
    }
}
