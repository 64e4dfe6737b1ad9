//! Helpers shared by the ODC memory benches (`memory_step`, `memory_compute`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::time::Instant;

/// A size from the environment, or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Non-negative random features (like post-ReLU neck output), generated in parallel.
pub fn features(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d * 4096)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
            for x in chunk {
                *x = rng.random::<f32>();
            }
        });
    out
}

/// Runs `f` and returns its result and the time it took, in ms.
pub fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1e3)
}
