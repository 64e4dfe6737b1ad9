//! The ODC memory's heavy work, host kernels against the device path (candle tensors; here on
//! candle's CPU device, the same code that runs on a GPU), side by side. Plain bench binary.
//!
//! `cargo bench --bench memory_compute` — sizes from env: ODC_BENCH_N (k-means points,
//! 50000), ODC_BENCH_K (10000), ODC_BENCH_D (256), ODC_BENCH_M (memory capacity, 1281167),
//! ODC_BENCH_B (512), ODC_BENCH_STEPS (relabel steps timed per path, 20), ODC_BENCH_REPS
//! (k-means passes and centroid recomputes timed per path, 2).
//!
//! Rows:
//! - `k-means assignment pass`: `kmeans_on` with 0 Lloyd iterations, i.e. normalising the
//!   points and one N × K × D assignment pass (plus, on the device path, the upload of the
//!   points).
//! - `k-means Lloyd iteration`: `kmeans_on` with 1 iteration minus the 0-iteration time: one
//!   assignment pass + centroid update + empty-cluster splits.
//! - `relabel step`: `OdcMemory::update_samples` on B rows of an M-row memory (momentum mix on
//!   the host, then the B × K × D product + argmax).
//! - `full centroid recompute`: `OdcMemory::update_centroids(None)` over the M rows.

use candle_core::Device;
use odcd::odc::{kmeans_on, KMeansConfig, MemoryCompute, OdcMemory};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{env, features, time};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("{what}: {e}");
    std::process::exit(1);
}

fn main() {
    let n = env("ODC_BENCH_N", 50_000);
    let k = env("ODC_BENCH_K", 10_000);
    let d = env("ODC_BENCH_D", 256);
    let m = env("ODC_BENCH_M", 1_281_167);
    let b = env("ODC_BENCH_B", 512);
    let steps = env("ODC_BENCH_STEPS", 20).max(1);
    let reps = env("ODC_BENCH_REPS", 2).max(1);
    println!(
        "odc memory compute bench: N={n} K={k} D={d} M={m} B={b} steps={steps} reps={reps} threads={}",
        rayon::current_num_threads()
    );
    let paths = [
        ("host", MemoryCompute::Host),
        ("device (cpu)", MemoryCompute::generic(&Device::Cpu)),
    ];
    let mut rows: Vec<(String, [f64; 2])> = Vec::new();

    // k-means passes
    let points = features(n, d, 7);
    let mut assign = [0f64; 2];
    let mut lloyd = [0f64; 2];
    for (p, (_, compute)) in paths.iter().enumerate() {
        let mut t0 = Vec::new();
        let mut t1 = Vec::new();
        for _ in 0..reps {
            for (niter, out) in [(0, &mut t0), (1, &mut t1)] {
                let cfg = KMeansConfig {
                    k,
                    niter,
                    seed: 0,
                    ..Default::default()
                };
                let (r, t) = time(|| kmeans_on(&points, d, &cfg, compute));
                if let Err(e) = r {
                    fail("kmeans", e);
                }
                out.push(t);
            }
        }
        assign[p] = median(t0);
        lloyd[p] = median(t1) - assign[p];
    }
    drop(points);
    rows.push((format!("k-means assignment pass (N={n})"), assign));
    rows.push((format!("k-means Lloyd iteration (N={n})"), lloyd));

    // memory: relabel step and full recompute, one memory switched between the paths
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let labels: Vec<u32> = (0..m).map(|_| rng.random_range(0..k as u32)).collect();
    let mut mem = OdcMemory::new(m, d, k).unwrap_or_else(|e| fail("memory", e));
    {
        let feats = features(m, d, 1);
        if let Err(e) = mem.init_memory(&feats, &labels) {
            fail("init_memory", e);
        }
    }
    let mut relabel = [0f64; 2];
    let mut recompute = [0f64; 2];
    for (p, (_, compute)) in paths.iter().enumerate() {
        mem.set_compute(compute);
        // untimed: the first use after a switch sends the whole bank and centroids
        if let Err(e) = mem.update_centroids(None) {
            fail("update_centroids", e);
        }
        let mut t = Vec::new();
        for step in 0..=steps {
            let slots: Vec<u32> = (0..b).map(|_| rng.random_range(0..m as u32)).collect();
            let f = features(b, d, 100 + step as u64);
            let (r, dt) = time(|| mem.update_samples(&slots, &f, 0.5));
            if let Err(e) = r {
                fail("update_samples", e);
            }
            // step 0 warms up
            if step > 0 {
                t.push(dt);
            }
        }
        relabel[p] = median(t);
        let mut t = Vec::new();
        for _ in 0..reps {
            let (r, dt) = time(|| mem.update_centroids(None));
            if let Err(e) = r {
                fail("update_centroids", e);
            }
            t.push(dt);
        }
        recompute[p] = median(t);
    }
    rows.push((format!("relabel step (B={b}, M={m})"), relabel));
    rows.push((format!("full centroid recompute (M={m})"), recompute));

    println!("{:<44} {:>14} {:>18}", "median ms", paths[0].0, paths[1].0);
    for (name, [h, dv]) in rows {
        println!("{name:<44} {h:>14.1} {dv:>18.1}");
    }
}
