//! Seeded standard-normal numbers drawn on the host.
//!
//! Initial latents (and the tiny checkpoints' weights) come from ChaCha8 plus a Box-Muller
//! transform written out here, rather than from a device RNG or `rand_distr`, whose outputs
//! may change between versions: the same seed gives the same numbers on every machine, so
//! the same request gives the same image on CPU and GPU.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// `len` samples of N(0, 1) for `seed`.
pub fn standard_normal(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        // u1 in (0, 1] keeps ln(u1) finite.
        let u1 = (f64::from(rng.next_u32()) + 1.0) / 4_294_967_296.0;
        let u2 = f64::from(rng.next_u32()) / 4_294_967_296.0;
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(len);
    out
}

/// A seed derived from `seed` and a name (FNV-1a), so that each named tensor gets its own
/// stream regardless of the order in which tensors are generated.
pub fn named_seed(seed: u64, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers() {
        assert_eq!(standard_normal(7, 101), standard_normal(7, 101));
        assert_ne!(standard_normal(7, 8), standard_normal(8, 8));
    }

    #[test]
    fn moments_are_standard_normal() {
        let xs = standard_normal(1, 100_000);
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
        let var = xs
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / xs.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn named_seeds_differ_by_name_and_seed() {
        assert_ne!(named_seed(0, "a.weight"), named_seed(0, "b.weight"));
        assert_ne!(named_seed(0, "a.weight"), named_seed(1, "a.weight"));
    }
}
