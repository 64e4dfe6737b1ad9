//! Weighted k-NN classification of test features against train features, as in the
//! InstDisc / NPID protocol (Wu et al. 2018): cosine similarity, the k most similar train
//! samples vote for their class with weight exp(s / T).
//!
//! The similarities are a blocked A·Bᵀ product (gemm on the rayon pool): a block of test rows
//! against every train row, then a partial top-k per row; memory stays block × N floats.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Test rows per similarity block (block × N_train f32 are held at once).
const BLOCK: usize = 128;

/// Top-1 accuracy of the weighted k-NN vote for one k.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KnnResult {
    pub k: usize,
    pub top1: f64,
}

/// Weighted k-NN top-1 of `test` (m × d, with `test_labels`) against `train` (n × d, with
/// `train_labels`), for every k in `ks`. Rows must already be L2-normalised (cosine
/// similarity = dot product). Labels are class ids `0..classes`. Ties between classes go to
/// the lowest class id. Returns one result per k, in the order of `ks`; k larger than n uses n.
#[allow(clippy::too_many_arguments)]
pub fn weighted_knn(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    classes: usize,
    ks: &[usize],
    temperature: f32,
) -> Vec<KnnResult> {
    let n = train_labels.len();
    let m = test_labels.len();
    let kmax = ks.iter().copied().max().unwrap_or(0).min(n);
    if n == 0 || m == 0 || kmax == 0 || d == 0 || classes == 0 {
        return ks.iter().map(|&k| KnnResult { k, top1: 0.0 }).collect();
    }
    let mut correct = vec![0usize; ks.len()];
    let mut sims = vec![0f32; BLOCK.min(m) * n];
    for (b, block) in test.chunks(BLOCK * d).enumerate() {
        let rows = block.len() / d;
        crate::odc::linalg::matmul_abt(block, rows, train, n, d, &mut sims, true);
        let hits: Vec<Vec<bool>> = sims[..rows * n]
            .par_chunks(n)
            .enumerate()
            .map(|(r, s)| {
                let truth = test_labels[b * BLOCK + r];
                let mut idx: Vec<u32> = (0..n as u32).collect();
                let by_sim = |a: &u32, b: &u32| {
                    s[*b as usize]
                        .partial_cmp(&s[*a as usize])
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(a.cmp(b))
                };
                if kmax < n {
                    idx.select_nth_unstable_by(kmax - 1, by_sim);
                    idx.truncate(kmax);
                }
                idx.sort_unstable_by(by_sim);
                let mut votes = vec![0f64; classes];
                let mut out = vec![false; ks.len()];
                let mut order: Vec<usize> = (0..ks.len()).collect();
                order.sort_by_key(|&i| ks[i]);
                let mut taken = 0usize;
                for &i in &order {
                    let k = ks[i].min(n);
                    while taken < k {
                        let j = idx[taken] as usize;
                        let c = train_labels[j] as usize;
                        if c < classes {
                            votes[c] += ((s[j] / temperature) as f64).exp();
                        }
                        taken += 1;
                    }
                    let best = votes
                        .iter()
                        .enumerate()
                        .fold((0usize, f64::NEG_INFINITY), |acc, (c, &v)| {
                            if v > acc.1 {
                                (c, v)
                            } else {
                                acc
                            }
                        })
                        .0;
                    out[i] = best as u32 == truth;
                }
                out
            })
            .collect();
        for h in hits {
            for (c, hit) in correct.iter_mut().zip(h) {
                *c += hit as usize;
            }
        }
    }
    ks.iter()
        .zip(correct)
        .map(|(&k, c)| KnnResult {
            k,
            top1: c as f64 / m as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit vectors at angle `deg` in the plane.
    fn at(deg: f32) -> [f32; 2] {
        let r = deg.to_radians();
        [r.cos(), r.sin()]
    }

    #[test]
    fn nearest_neighbour_and_weighted_vote_by_hand() {
        // Train: class 0 at 0°, 10°, 20°; class 1 at 90°, 100°.
        let train: Vec<f32> = [0.0, 10.0, 20.0, 90.0, 100.0]
            .iter()
            .flat_map(|&a| at(a))
            .collect();
        let train_labels = [0, 0, 0, 1, 1];
        // Test at 80° (class 1): its nearest is 90° (class 1), so k = 1 is right. With k = 5
        // all five vote: class 1 has exp(cos10°/T)+exp(cos20°/T), class 0 three small
        // weights; at T = 0.07 class 1 wins by far.
        let test: Vec<f32> = at(80.0).to_vec();
        let r = weighted_knn(&train, &train_labels, &test, &[1], 2, 2, &[1, 5], 0.07);
        assert_eq!(r[0], KnnResult { k: 1, top1: 1.0 });
        assert_eq!(r[1], KnnResult { k: 5, top1: 1.0 });
        // At 50°: nearest is 20° (class 0, cos 30°) against 90° (class 1, cos 40°). k = 1
        // says class 0; with k = 5 and a huge temperature every vote weighs ~1 and class 0
        // (three members) wins; with k = 2 votes are cos30° (0) vs cos40° (1) → class 0.
        let test: Vec<f32> = at(50.0).to_vec();
        let r = weighted_knn(&train, &train_labels, &test, &[1], 2, 2, &[1, 2, 5], 1e6);
        assert_eq!(
            r.iter().map(|x| x.top1).collect::<Vec<_>>(),
            [0.0, 0.0, 0.0]
        );
        let r = weighted_knn(&train, &train_labels, &test, &[0], 2, 2, &[1, 2, 5], 1e6);
        assert_eq!(
            r.iter().map(|x| x.top1).collect::<Vec<_>>(),
            [1.0, 1.0, 1.0]
        );
        // Two test points, one right and one wrong → 0.5.
        let test: Vec<f32> = at(5.0).into_iter().chain(at(95.0)).collect();
        let r = weighted_knn(&train, &train_labels, &test, &[0, 0], 2, 2, &[1], 0.07);
        assert_eq!(r[0].top1, 0.5);
    }

    #[test]
    fn more_test_rows_than_a_block() {
        // 300 test rows span three similarity blocks; each is a copy of a train row.
        let d = 3;
        let train: Vec<f32> = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let labels = [0u32, 1, 2];
        let mut test = Vec::new();
        let mut truth = Vec::new();
        for i in 0..300 {
            test.extend_from_slice(&train[(i % 3) * d..(i % 3 + 1) * d]);
            truth.push((i % 3) as u32);
        }
        let r = weighted_knn(&train, &labels, &test, &truth, d, 3, &[1, 200], 0.07);
        assert_eq!(r[0].top1, 1.0);
        // k = 200 > n = 3: every train row votes, the identical one weighs most.
        assert_eq!(r[1].top1, 1.0);
    }

    #[test]
    fn normalise_rows_to_unit_length() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        crate::odc::normalise_rows(&mut x, 2);
        assert_eq!(x, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
