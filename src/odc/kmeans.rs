//! Initial clustering with faiss `Clustering` semantics (ODC_SPEC §1.3): L2-normalised copy of
//! the input, K distinct random points as initial centroids, Lloyd iterations with faiss's
//! empty-cluster splitting, final labels = nearest centroid.
//!
//! With [`MemoryCompute::Device`] ([`kmeans_on`]) the assignment pass (the n × K × D product
//! and the argmin, chunked to bound device memory) and the centroid update run on that
//! device, over a copy of the training points uploaded once; the empty-cluster splits stay on
//! the host (K × D per iteration).
//!
//! Deviation: faiss draws from its own Mersenne-Twister generator; this port uses ChaCha8
//! with the same seeds (`seed + 1` for the initial permutation, 1234 for splits), so the
//! procedure is the same but the random draws are not bit-identical to faiss.

use super::compute::{self, device_error, MemoryCompute};
use super::linalg::{check_finite, check_rows, matmul_abt, normalise_into};
use super::{OdcError, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Rows per assignment block: the score buffer per rayon task is ASSIGN_BLOCK × k f32.
const ASSIGN_BLOCK: usize = 256;

/// k-means settings. `Default` gives the OSS ODC settings for `k` = 10000.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansConfig {
    pub k: usize,
    /// Lloyd iterations (OSS ODC: 20).
    pub niter: usize,
    /// Seed of the initial-centroid permutation (faiss uses `seed + 1` for it).
    pub seed: u64,
    /// Seed of the empty-cluster split generator (faiss: 1234, re-seeded every iteration).
    pub split_seed: u64,
    /// Train on a random subset of `k × max` points when the input is larger (faiss's
    /// `max_points_per_centroid`); `None` (default, as OSS) trains on every point.
    pub max_points_per_centroid: Option<usize>,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            k: 10_000,
            niter: 20,
            seed: 0,
            split_seed: 1234,
            max_points_per_centroid: None,
        }
    }
}

/// Output of [`kmeans`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansResult {
    /// k × dim.
    pub centroids: Vec<f32>,
    /// Nearest centroid (L2) of every input point after training.
    pub labels: Vec<u32>,
    /// Sum of squared distances at each iteration's assignment (faiss's `obj`).
    pub objective: Vec<f64>,
    /// Empty clusters re-seeded by splitting, summed over iterations.
    pub splits: usize,
}

/// Squared norm of every centroid, summed in f32 in index order (both paths use these).
fn centroid_norms(centroids: &[f32], dim: usize) -> Vec<f32> {
    centroids
        .par_chunks(dim)
        .map(|c| c.iter().map(|v| v * v).sum())
        .collect()
}

/// L2-nearest centroid of every row plus the squared distance, using
/// `‖x‖² + ‖c‖² − 2 x·c` with gemm, in blocks so memory stays bounded.
fn assign(data: &[f32], dim: usize, centroids: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let c_norms = centroid_norms(centroids, dim);
    let n = data.len() / dim;
    let mut labels = vec![0u32; n];
    let mut dists = vec![0f32; n];
    labels
        .par_chunks_mut(ASSIGN_BLOCK)
        .zip(dists.par_chunks_mut(ASSIGN_BLOCK))
        .zip(data.par_chunks(ASSIGN_BLOCK * dim))
        .for_each_init(
            || vec![0f32; ASSIGN_BLOCK * k],
            |scores, ((lab, dis), block)| {
                let m = block.len() / dim;
                matmul_abt(block, m, centroids, k, dim, scores, false);
                for i in 0..m {
                    let x = &block[i * dim..(i + 1) * dim];
                    let xn: f32 = x.iter().map(|v| v * v).sum();
                    let s = &scores[i * k..(i + 1) * k];
                    let mut best = 0usize;
                    let mut best_d = f32::INFINITY;
                    for c in 0..k {
                        let d = c_norms[c] - 2.0 * s[c];
                        if d < best_d {
                            best_d = d;
                            best = c;
                        }
                    }
                    lab[i] = best as u32;
                    dis[i] = (xn + best_d).max(0.0);
                }
            },
        );
    (labels, dists)
}

/// Per-cluster means (f64 accumulation, f32 result) and sizes. Clusters without points keep
/// a zero row here; the caller splits them.
fn means(data: &[f32], dim: usize, labels: &[u32], k: usize) -> (Vec<f32>, Vec<usize>) {
    let (order, start, sizes) = group_by_label(labels, k);
    let mut centroids = vec![0f32; k * dim];
    centroids
        .par_chunks_mut(dim)
        .enumerate()
        .for_each(|(c, out)| {
            let pts = &order[start[c]..start[c + 1]];
            if pts.is_empty() {
                return;
            }
            let mut acc = vec![0f64; dim];
            for &i in pts {
                for (a, &x) in acc
                    .iter_mut()
                    .zip(&data[i as usize * dim..(i as usize + 1) * dim])
                {
                    *a += x as f64;
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = (a / pts.len() as f64) as f32;
            }
        });
    (centroids, sizes)
}

/// Counting sort of point indices by cluster (ascending index within a cluster), so each
/// cluster is summed in a fixed order whatever the thread count: the rows of cluster c are
/// `order[start[c]..start[c+1]]`. Also returns the sizes.
fn group_by_label(labels: &[u32], k: usize) -> (Vec<u32>, Vec<usize>, Vec<usize>) {
    let mut sizes = vec![0usize; k];
    for &l in labels {
        sizes[l as usize] += 1;
    }
    let mut start = vec![0usize; k + 1];
    for c in 0..k {
        start[c + 1] = start[c] + sizes[c];
    }
    let mut fill = start.clone();
    let mut order = vec![0u32; labels.len()];
    for (i, &l) in labels.iter().enumerate() {
        order[fill[l as usize]] = i as u32;
        fill[l as usize] += 1;
    }
    (order, start, sizes)
}

/// faiss `split_clusters`: every empty cluster copies a donor picked by scanning
/// cj = 0, 1, 2, … and accepting with probability (|cj| − 1)/(n − k), with a symmetric
/// ±1/1024 perturbation; sizes are assumed to split evenly. Returns the number of splits.
fn split_empty(
    centroids: &mut [f32],
    sizes: &mut [usize],
    dim: usize,
    n: usize,
    seed: u64,
) -> usize {
    const EPS: f32 = 1.0 / 1024.0;
    let k = sizes.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let denom = n.saturating_sub(k).max(1) as f32;
    let mut nsplit = 0;
    for ci in 0..k {
        if sizes[ci] != 0 {
            continue;
        }
        // a donor with ≥ 2 points exists whenever n ≥ k (pigeonhole), but never loop forever
        if !sizes.iter().any(|&s| s >= 2) {
            break;
        }
        let mut cj = 0usize;
        loop {
            let p = (sizes[cj] as f32 - 1.0) / denom;
            let r: f32 = rng.random();
            if r < p {
                break;
            }
            cj = (cj + 1) % k;
        }
        for j in 0..dim {
            let v = centroids[cj * dim + j];
            let (ci_f, cj_f) = if j % 2 == 0 {
                (1.0 + EPS, 1.0 - EPS)
            } else {
                (1.0 - EPS, 1.0 + EPS)
            };
            centroids[ci * dim + j] = v * ci_f;
            centroids[cj * dim + j] = v * cj_f;
        }
        sizes[ci] = sizes[cj] / 2;
        sizes[cj] -= sizes[ci];
        nsplit += 1;
    }
    nsplit
}

/// First `m` entries of a seeded random permutation of 0..n (partial Fisher–Yates).
fn random_subset(n: usize, m: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in 0..m.min(n) {
        let j = rng.random_range(i..n);
        perm.swap(i, j);
    }
    perm.truncate(m);
    perm
}

/// Clusters `data` (n × dim, row-major) into `cfg.k` clusters with host kernels. The data is
/// L2-normalised (eps 1e-10) on a copy first, as OSS does before faiss. Needs n ≥ k and
/// finite input.
pub fn kmeans(data: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<KMeansResult> {
    kmeans_on(data, dim, cfg, &MemoryCompute::Host)
}

/// [`kmeans`] with its assignment passes and centroid updates where `compute` says. The
/// device path gives the same labels whenever no point is within a few f32 ulps of two
/// centroids (see `compute.rs`), and centroids within 1 ulp.
pub fn kmeans_on(
    data: &[f32],
    dim: usize,
    cfg: &KMeansConfig,
    compute: &MemoryCompute,
) -> Result<KMeansResult> {
    let k = cfg.k;
    if dim == 0 || k == 0 {
        return Err(OdcError::InvalidParameter(format!(
            "kmeans: dim and k must be positive (dim = {dim}, k = {k})"
        )));
    }
    let n = check_rows("kmeans data", data, dim)?;
    if n < k {
        return Err(OdcError::InvalidParameter(format!(
            "kmeans: {n} points cannot make {k} clusters"
        )));
    }
    check_finite("kmeans data", data, dim)?;
    let mut x = vec![0f32; data.len()];
    x.par_chunks_mut(dim)
        .zip(data.par_chunks(dim))
        .for_each(|(o, r)| normalise_into(r, o));

    // optional faiss-style subsampling of the training set
    let train: Vec<f32> = match cfg.max_points_per_centroid {
        Some(maxp) if n > k.saturating_mul(maxp) => {
            let idx = random_subset(n, k * maxp, cfg.seed);
            let mut t = Vec::with_capacity(idx.len() * dim);
            for i in idx {
                t.extend_from_slice(&x[i * dim..(i + 1) * dim]);
            }
            t
        }
        _ => Vec::new(),
    };
    let train_x: &[f32] = if train.is_empty() { &x } else { &train };
    let nt = train_x.len() / dim;

    let mut centroids = Vec::with_capacity(k * dim);
    for i in random_subset(nt, k, cfg.seed.wrapping_add(1)) {
        centroids.extend_from_slice(&train_x[i * dim..(i + 1) * dim]);
    }
    if let Some(dev) = compute.device() {
        return lloyd_on_device(dev, &x, &train, dim, cfg, centroids)
            .map_err(|e| device_error("k-means", e));
    }
    let mut objective = Vec::with_capacity(cfg.niter);
    let mut splits = 0;
    for _ in 0..cfg.niter {
        let (labels, dists) = assign(train_x, dim, &centroids, k);
        objective.push(dists.iter().map(|&d| d as f64).sum());
        let (mut c, mut sizes) = means(train_x, dim, &labels, k);
        splits += split_empty(&mut c, &mut sizes, dim, nt, cfg.split_seed);
        centroids = c;
    }
    let (labels, _) = assign(&x, dim, &centroids, k);
    Ok(KMeansResult {
        centroids,
        labels,
        objective,
        splits,
    })
}

/// The Lloyd iterations and the final assignment on `dev`. `train` is empty when the
/// training set is all of `x`. Moves the training points up once (plus `x` when it is a
/// different set), and per iteration K × D centroids up and down and n labels + distances
/// and the grouped point ids (~n × 12 bytes) across.
fn lloyd_on_device(
    dev: &Device,
    x: &[f32],
    train: &[f32],
    dim: usize,
    cfg: &KMeansConfig,
    mut centroids: Vec<f32>,
) -> candle_core::Result<KMeansResult> {
    let k = cfg.k;
    let train_x: &[f32] = if train.is_empty() { x } else { train };
    let nt = train_x.len() / dim;
    // one zero row after the points pads the cluster sums' blocks
    let train_t = compute::upload_rows(train_x, dim, 1, dev)?;
    let train_pts = train_t.narrow(0, 0, nt)?;
    let mut objective = Vec::with_capacity(cfg.niter);
    let mut splits = 0;
    for _ in 0..cfg.niter {
        let c_t = Tensor::from_slice(&centroids, (k, dim), dev)?;
        let c_norms = Tensor::from_vec(centroid_norms(&centroids, dim), (1, k), dev)?;
        let (labels, dists) = compute::assign_l2(&train_pts, &c_t, &c_norms)?;
        objective.push(dists.iter().map(|&d| d as f64).sum());
        let (order, start, mut sizes) = group_by_label(&labels, k);
        let sums = compute::cluster_sums(&train_t, &order, &start, compute::SUM_BLOCK)?;
        let mut c = compute::cluster_means(&sums, &sizes)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        splits += split_empty(&mut c, &mut sizes, dim, nt, cfg.split_seed);
        centroids = c;
    }
    let c_t = Tensor::from_slice(&centroids, (k, dim), dev)?;
    let c_norms = Tensor::from_vec(centroid_norms(&centroids, dim), (1, k), dev)?;
    let (labels, _) = if train.is_empty() {
        compute::assign_l2(&train_pts, &c_t, &c_norms)?
    } else {
        drop(train_t);
        let n = x.len() / dim;
        let all = compute::upload_rows(x, dim, 0, dev)?;
        compute::assign_l2(&all.narrow(0, 0, n)?, &c_t, &c_norms)?
    };
    Ok(KMeansResult {
        centroids,
        labels,
        objective,
        splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::odc::OdcMemory;
    use rand_distr::{Distribution, Normal};

    /// `groups` well separated blobs in `dim` dims, `per` points each.
    fn blobs(groups: usize, per: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0f32, 0.05).unwrap();
        let mut out = Vec::new();
        for g in 0..groups {
            for _ in 0..per {
                for j in 0..dim {
                    let centre = if j % groups == g { 1.0 } else { 0.0 };
                    out.push(centre + noise.sample(&mut rng));
                }
            }
        }
        out
    }

    #[test]
    fn finds_separated_blobs_and_objective_does_not_grow() {
        let (g, per, dim) = (6, 50, 12);
        let data = blobs(g, per, dim, 7);
        let cfg = KMeansConfig {
            k: g,
            niter: 20,
            seed: 3,
            ..Default::default()
        };
        let r = kmeans(&data, dim, &cfg).unwrap();
        assert_eq!(r.labels.len(), g * per);
        assert_eq!(r.objective.len(), 20);
        for w in r.objective.windows(2) {
            assert!(
                w[1] <= w[0] * (1.0 + 1e-5),
                "objective grew: {:?}",
                r.objective
            );
        }
        // a good run puts each blob in one cluster; random init can merge two blobs, so
        // only require that every cluster is a subset of one blob
        for c in 0..g as u32 {
            let blobs_of_c: std::collections::BTreeSet<usize> = r
                .labels
                .iter()
                .enumerate()
                .filter(|(_, &l)| l == c)
                .map(|(i, _)| i / per)
                .collect();
            assert!(blobs_of_c.len() <= 2, "cluster {c} spans {blobs_of_c:?}");
        }
    }

    #[test]
    fn empty_clusters_are_split_and_small_cluster_handling_leaves_none_empty() {
        // many identical points force empty clusters during Lloyd
        let (g, per, dim) = (4, 40, 8);
        let mut data = blobs(g, per, dim, 11);
        data.extend(std::iter::repeat_n(0.5f32, 40 * dim));
        let k = 12;
        let cfg = KMeansConfig {
            k,
            niter: 10,
            seed: 5,
            ..Default::default()
        };
        let r = kmeans(&data, dim, &cfg).unwrap();
        let n = data.len() / dim;
        let mut mem = OdcMemory::new(n, dim, k).unwrap();
        mem.init_memory(&data, &r.labels).unwrap();
        mem.deal_with_small_clusters(1).unwrap();
        assert!(mem.sizes().iter().all(|&s| s > 0), "{:?}", mem.sizes());
    }

    /// One assignment pass, host kernels against the device path on candle's CPU device, on
    /// random unit-length points. The device scores with another f32 summation order, so a
    /// point whose two nearest centroids are within a few ulps may resolve differently; every
    /// point with a margin over 1e-5 must get the same label, and every squared distance must
    /// agree within 1e-5. (On this data no point is that close: all labels agree.)
    #[test]
    fn device_assignment_pass_matches_the_host() {
        let (n, k, dim) = (3000usize, 40usize, 24usize);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut x: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        crate::odc::normalise_rows(&mut x, dim);
        let c: Vec<f32> = x[..k * dim].to_vec();
        let (hl, hd) = assign(&x, dim, &c, k);
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(&x, (n, dim), &dev).unwrap();
        let ct = Tensor::from_slice(&c, (k, dim), &dev).unwrap();
        let cn = Tensor::from_vec(centroid_norms(&c, dim), (1, k), &dev).unwrap();
        let (dl, dd) = compute::assign_l2(&xt, &ct, &cn).unwrap();
        let c_norms = centroid_norms(&c, dim);
        let mut near_ties = 0;
        for i in 0..n {
            let row = &x[i * dim..(i + 1) * dim];
            let mut dist: Vec<f32> = (0..k)
                .map(|j| {
                    let dot: f32 = row.iter().zip(&c[j * dim..]).map(|(a, b)| a * b).sum();
                    c_norms[j] - 2.0 * dot
                })
                .collect();
            dist.sort_by(f32::total_cmp);
            if dist[1] - dist[0] <= 1e-5 {
                near_ties += 1;
                continue;
            }
            assert_eq!(hl[i], dl[i], "point {i}");
            assert!(
                (hd[i] - dd[i]).abs() <= 1e-5,
                "point {i}: {} vs {}",
                hd[i],
                dd[i]
            );
        }
        assert_eq!(near_ties, 0, "the data was meant to have no near tie");
    }

    /// Whole k-means runs, host against device path, on blobs plus a block of identical points
    /// (so Lloyd empties clusters and splits them), over several seeds: same labels, same
    /// split count, centroids within 1e-6 (f64 sums in another order round to the same f32 or
    /// 1 ulp apart), objectives within 1e-4 relative.
    #[test]
    fn device_kmeans_matches_the_host() {
        let (g, per, dim) = (4, 40, 8);
        let mut data = blobs(g, per, dim, 11);
        data.extend(std::iter::repeat_n(0.5f32, 40 * dim));
        let device = MemoryCompute::generic(&Device::Cpu);
        let mut total_splits = 0;
        for seed in 0..6 {
            let cfg = KMeansConfig {
                k: 12,
                niter: 6,
                seed,
                ..Default::default()
            };
            let h = kmeans(&data, dim, &cfg).unwrap();
            let d = kmeans_on(&data, dim, &cfg, &device).unwrap();
            assert_eq!(h.labels, d.labels, "seed {seed}");
            assert_eq!(h.splits, d.splits, "seed {seed}");
            total_splits += h.splits;
            for (a, b) in h.centroids.iter().zip(&d.centroids) {
                assert!((a - b).abs() <= 1e-6, "seed {seed}: {a} vs {b}");
            }
            for (a, b) in h.objective.iter().zip(&d.objective) {
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "seed {seed}: {a} vs {b}"
                );
            }
        }
        assert!(total_splits > 0, "the data was meant to empty clusters");
        // a subsampled training set takes the other upload path
        let sub = KMeansConfig {
            k: 12,
            niter: 4,
            max_points_per_centroid: Some(10),
            ..Default::default()
        };
        let h = kmeans(&data, dim, &sub).unwrap();
        let d = kmeans_on(&data, dim, &sub, &device).unwrap();
        assert_eq!(h.labels, d.labels);
    }

    #[test]
    fn split_empty_follows_faiss_rule() {
        let dim = 2;
        let mut c = vec![1.0f32, 2.0, 0.0, 0.0];
        let mut sizes = vec![10usize, 0];
        assert_eq!(split_empty(&mut c, &mut sizes, dim, 10, 1234), 1);
        assert_eq!(sizes, vec![5, 5]);
        let e = 1.0 / 1024.0;
        assert_eq!(c, vec![1.0 - e, 2.0 * (1.0 + e), 1.0 + e, 2.0 * (1.0 - e)]);
    }

    #[test]
    fn rejects_bad_input() {
        let cfg = KMeansConfig {
            k: 3,
            ..Default::default()
        };
        assert!(kmeans(&[0.0; 4], 2, &cfg).is_err(), "n < k");
        assert!(kmeans(&[0.0; 5], 2, &cfg).is_err(), "ragged");
        let mut d = vec![0.1f32; 8];
        d[3] = f32::NAN;
        assert!(kmeans(&d, 2, &cfg).is_err(), "NaN");
    }

    /// Timing at the OSS scale: `cargo test --release --lib odc::kmeans::tests::timing -- --ignored --nocapture`
    /// (ODC_KMEANS_N / ODC_KMEANS_K / ODC_KMEANS_ITERS shrink it).
    #[test]
    #[ignore]
    fn timing_k10000_200k() {
        let env = |name: &str, d: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let (n, k, dim) = (
            env("ODC_KMEANS_N", 200_000),
            env("ODC_KMEANS_K", 10_000),
            256,
        );
        let niter = env("ODC_KMEANS_ITERS", 20);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let data: Vec<f32> = (0..n * dim).map(|_| rng.random::<f32>()).collect();
        let cfg = KMeansConfig {
            k,
            niter,
            seed: 0,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let r = kmeans(&data, dim, &cfg).unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "kmeans n={n} k={k} d={dim} niter={niter} threads={}: {secs:.1} s ({:.2} s/iter), splits {}, obj {:.1} -> {:.1}",
            rayon::current_num_threads(),
            secs / (niter + 1) as f64,
            r.splits,
            r.objective.first().copied().unwrap_or(0.0),
            r.objective.last().copied().unwrap_or(0.0)
        );
    }
}
