//! Linear probe: multinomial logistic regression on frozen features, trained a fixed number
//! of epochs with mini-batch SGD (momentum 0.9, cosine-decayed rate), then top-1 on the test
//! features. The features are L2-normalised by the caller and standardised here with the
//! train mean / std per dimension, so one learning rate suits every feature extractor.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Probe training settings (`odcd eval --probe-epochs ...`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            epochs: 30,
            batch_size: 256,
            lr: 0.1,
            weight_decay: 1e-4,
            seed: 0,
        }
    }
}

/// What a trained probe scored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub epochs: usize,
    pub train_top1: f64,
    pub test_top1: f64,
    /// Mean cross-entropy over the last epoch.
    pub final_loss: f64,
}

/// A trained linear classifier over standardised features.
pub struct LinearProbe {
    d: usize,
    classes: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// classes × d
    w: Vec<f32>,
    b: Vec<f32>,
}

fn standardise(x: &[f32], d: usize, mean: &[f32], inv_std: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(d).for_each(|row| {
        for ((v, m), s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    });
    out
}

/// Softmax of `logits` in place; returns ln of the normaliser - max (for the loss).
fn softmax(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in logits.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in logits.iter_mut() {
        *v /= sum;
    }
}

impl LinearProbe {
    /// Trains on `x` (n × d) with labels in `0..classes`. Returns the probe and the mean loss
    /// of the last epoch.
    pub fn train(
        x: &[f32],
        labels: &[u32],
        d: usize,
        classes: usize,
        cfg: &ProbeConfig,
    ) -> (LinearProbe, f64) {
        let n = labels.len();
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for row in x.chunks(d) {
            for j in 0..d {
                mean[j] += row[j] as f64;
                sq[j] += (row[j] as f64) * (row[j] as f64);
            }
        }
        let nf = n.max(1) as f64;
        let mean: Vec<f32> = mean.iter().map(|m| (m / nf) as f32).collect();
        let inv_std: Vec<f32> = sq
            .iter()
            .zip(&mean)
            .map(|(s, &m)| {
                let var = (s / nf - (m as f64) * (m as f64)).max(0.0);
                (1.0 / (var.sqrt() + 1e-6)) as f32
            })
            .collect();
        let xs = standardise(x, d, &mean, &inv_std);
        let mut probe = LinearProbe {
            d,
            classes,
            mean,
            inv_std,
            w: vec![0f32; classes * d],
            b: vec![0f32; classes],
        };
        let (mut vw, mut vb) = (vec![0f32; classes * d], vec![0f32; classes]);
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let bs = cfg.batch_size.max(1);
        let steps_per_epoch = n.div_ceil(bs);
        let total = (cfg.epochs * steps_per_epoch).max(1);
        let mut step = 0usize;
        let mut last_loss = 0.0;
        for _ in 0..cfg.epochs {
            order.shuffle(&mut rng);
            let mut epoch_loss = 0.0;
            for batch in order.chunks(bs) {
                let lr = 0.5
                    * cfg.lr
                    * (1.0 + (std::f32::consts::PI * step as f32 / total as f32).cos());
                step += 1;
                // Per-sample softmax gradients (P - Y), in parallel.
                let grads: Vec<(Vec<f32>, f64)> = batch
                    .par_iter()
                    .map(|&i| {
                        let row = &xs[i * d..(i + 1) * d];
                        let mut p = probe.logits_std(row);
                        softmax(&mut p);
                        let y = labels[i] as usize;
                        let loss = -(p.get(y).copied().unwrap_or(1.0).max(1e-12) as f64).ln();
                        if y < classes {
                            p[y] -= 1.0;
                        }
                        (p, loss)
                    })
                    .collect();
                let inv = 1.0 / batch.len() as f32;
                // gW[c] = mean_i g[i][c] x_i, one class per task.
                let gw: Vec<Vec<f32>> = (0..classes)
                    .into_par_iter()
                    .map(|c| {
                        let mut acc = vec![0f32; d];
                        for (&i, (g, _)) in batch.iter().zip(&grads) {
                            let gc = g[c] * inv;
                            if gc != 0.0 {
                                let row = &xs[i * d..(i + 1) * d];
                                acc.iter_mut().zip(row).for_each(|(a, v)| *a += gc * v);
                            }
                        }
                        acc
                    })
                    .collect();
                for c in 0..classes {
                    let gb: f32 = grads.iter().map(|(g, _)| g[c]).sum::<f32>() * inv;
                    vb[c] = 0.9 * vb[c] + gb;
                    probe.b[c] -= lr * vb[c];
                    let w = &mut probe.w[c * d..(c + 1) * d];
                    let v = &mut vw[c * d..(c + 1) * d];
                    for j in 0..d {
                        v[j] = 0.9 * v[j] + gw[c][j] + cfg.weight_decay * w[j];
                        w[j] -= lr * v[j];
                    }
                }
                epoch_loss += grads.iter().map(|(_, l)| l).sum::<f64>();
            }
            last_loss = epoch_loss / nf;
        }
        (probe, last_loss)
    }

    fn logits_std(&self, row: &[f32]) -> Vec<f32> {
        (0..self.classes)
            .map(|c| {
                self.w[c * self.d..(c + 1) * self.d]
                    .iter()
                    .zip(row)
                    .map(|(w, v)| w * v)
                    .sum::<f32>()
                    + self.b[c]
            })
            .collect()
    }

    /// Predicted class of every row of `x` (n × d, not standardised).
    pub fn predict(&self, x: &[f32]) -> Vec<u32> {
        let xs = standardise(x, self.d, &self.mean, &self.inv_std);
        xs.par_chunks(self.d)
            .map(|row| {
                let l = self.logits_std(row);
                l.iter()
                    .enumerate()
                    .fold((0usize, f32::NEG_INFINITY), |acc, (c, &v)| {
                        if v > acc.1 {
                            (c, v)
                        } else {
                            acc
                        }
                    })
                    .0 as u32
            })
            .collect()
    }
}

fn accuracy(pred: &[u32], truth: &[u32]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    pred.iter().zip(truth).filter(|(p, t)| p == t).count() as f64 / truth.len() as f64
}

/// Trains a probe on (train, train_labels) and scores it on both sets.
#[allow(clippy::too_many_arguments)]
pub fn linear_probe(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    d: usize,
    classes: usize,
    cfg: &ProbeConfig,
) -> ProbeResult {
    let (probe, final_loss) = LinearProbe::train(train, train_labels, d, classes, cfg);
    ProbeResult {
        epochs: cfg.epochs,
        train_top1: accuracy(&probe.predict(train), train_labels),
        test_top1: accuracy(&probe.predict(test), test_labels),
        final_loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Three Gaussian blobs in 5-d around well separated means, plus a useless constant dim.
    fn blobs(n_per: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let means = [
            [3.0, 0.0, 0.0, 0.0],
            [0.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 3.0, 0.0],
        ];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..n_per {
            for (c, m) in means.iter().enumerate() {
                for v in m {
                    x.push(v + rng.random_range(-1.0f32..1.0));
                }
                x.push(1.0);
                y.push(c as u32);
            }
        }
        (x, y)
    }

    #[test]
    fn probe_separates_separable_classes() {
        let (xtr, ytr) = blobs(100, 1);
        let (xte, yte) = blobs(50, 2);
        let cfg = ProbeConfig {
            epochs: 20,
            batch_size: 32,
            ..ProbeConfig::default()
        };
        let r = linear_probe(&xtr, &ytr, &xte, &yte, 5, 3, &cfg);
        assert_eq!(r.test_top1, 1.0, "{r:?}");
        assert_eq!(r.train_top1, 1.0, "{r:?}");
        assert!(r.final_loss < 0.1, "{r:?}");
    }

    #[test]
    fn probe_cannot_separate_shuffled_labels() {
        // Same inputs with labels unrelated to them: test accuracy stays near chance (1/3).
        let (xtr, mut ytr) = blobs(100, 1);
        let (xte, mut yte) = blobs(100, 2);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        ytr.shuffle(&mut rng);
        yte.shuffle(&mut rng);
        let r = linear_probe(&xtr, &ytr, &xte, &yte, 5, 3, &ProbeConfig::default());
        assert!(r.test_top1 < 0.5, "{r:?}");
    }
}
