//! Training-mode batch normalisation (+ optional ReLU) over dim 1 of an (N, C, …) f32 CPU
//! tensor as one candle custom op with a hand-written backward.
//!
//! candle's composition of BatchNorm (transpose, copy, two means, broadcasts, then the
//! backward of each) made ~15 passes over the activation per layer and direction; this is
//! three forward passes (mean, variance, output) and two backward passes (the two channel
//! sums, then the input gradient). Channel sums run in f64 in a fixed order, so the result
//! is reproducible bit for bit.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::dist::Collective;

/// Per-channel batch statistics of one forward call: mean and biased variance.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    /// Values per channel the statistics cover (N·H·W; summed over the ranks when
    /// synchronised).
    pub count: usize,
}

/// Synchronised BatchNorm (SyncBN): the ranks whose batches one BatchNorm normalises
/// together. Forward: the channel sums and the count, then the squared deviations, are
/// all-reduced, so every rank normalises with the statistics of the global batch. Backward:
/// the two channel sums of the input gradient are all-reduced (the weight and bias gradients
/// stay this rank's part; the optimizer's gradient all-reduce sums them).
pub type BnSync = Option<Arc<dyn Collective>>;

fn sync_sum(sync: &BnSync, buf: &mut [f64]) -> candle_core::Result<()> {
    match sync {
        Some(c) => c
            .all_reduce_sum_f64(buf)
            .map_err(|e| candle_core::Error::Msg(format!("synchronised batch-norm: {e}"))),
        None => Ok(()),
    }
}

/// (N, C, P) view of a tensor normalised over dim 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ncp {
    n: usize,
    c: usize,
    p: usize,
}

impl Ncp {
    fn of(shape: &Shape) -> candle_core::Result<Self> {
        let d = shape.dims();
        if d.len() < 2 {
            candle_core::bail!("batch-norm needs an (N, C, …) tensor, got shape {d:?}");
        }
        Ok(Ncp {
            n: d[0],
            c: d[1],
            p: d[2..].iter().product(),
        })
    }

    fn count(&self) -> usize {
        self.n * self.p
    }

    /// Sum over (n, p) of f(i) for the flat indices i of channel c, in a fixed order: eight
    /// interleaved f64 accumulators (so the loop vectorises), then the remainders.
    fn channel_sum(&self, c: usize, f: impl Fn(usize) -> f64) -> f64 {
        const L: usize = 8;
        let mut acc = [0f64; L];
        let mut rest = 0f64;
        for b in 0..self.n {
            let base = (b * self.c + c) * self.p;
            let full = base + self.p / L * L;
            for i in (base..full).step_by(L) {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += f(i + l);
                }
            }
            for i in full..base + self.p {
                rest += f(i);
            }
        }
        acc.iter().sum::<f64>() + rest
    }

    /// Two sums of [`Ncp::channel_sum`] in one pass over the channel (same order per sum,
    /// so the same bits as two separate passes, for half the memory traffic).
    fn channel_sum2(&self, c: usize, f: impl Fn(usize) -> (f64, f64)) -> (f64, f64) {
        const L: usize = 8;
        let (mut acc_a, mut acc_b) = ([0f64; L], [0f64; L]);
        let (mut rest_a, mut rest_b) = (0f64, 0f64);
        for b in 0..self.n {
            let base = (b * self.c + c) * self.p;
            let full = base + self.p / L * L;
            for i in (base..full).step_by(L) {
                for l in 0..L {
                    let (a, bv) = f(i + l);
                    acc_a[l] += a;
                    acc_b[l] += bv;
                }
            }
            for i in full..base + self.p {
                let (a, bv) = f(i);
                rest_a += a;
                rest_b += bv;
            }
        }
        (
            acc_a.iter().sum::<f64>() + rest_a,
            acc_b.iter().sum::<f64>() + rest_b,
        )
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::cpu::contiguous_f32(s, l, "batch-norm", what)
}

type StatsSlot = Arc<Mutex<Option<BatchStats>>>;

fn lock_err() -> candle_core::Error {
    candle_core::Error::Msg("batch-norm: statistics lock poisoned by an earlier panic".into())
}

/// Forward op: (x, gamma, beta) → y = [relu](gamma·(x − mean)/sqrt(var + eps) + beta).
/// The batch statistics are left in `stats` for the running averages and the backward.
struct BnTrainOp {
    eps: f64,
    relu: bool,
    stats: StatsSlot,
    sync: BnSync,
}

impl CustomOp3 for BnTrainOp {
    fn name(&self) -> &'static str {
        "odcd-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Ncp::of(l1.shape())?;
        let x = f32_slice(s1, l1, "input")?;
        let gamma = f32_slice(s2, l2, "weight")?;
        let beta = f32_slice(s3, l3, "bias")?;
        if gamma.len() != g.c || beta.len() != g.c {
            candle_core::bail!(
                "batch-norm: {} channels but weight/bias have {}/{}",
                g.c,
                gamma.len(),
                beta.len()
            );
        }
        if g.count() == 0 || g.c == 0 {
            candle_core::bail!("batch-norm: empty batch");
        }
        let (stats, count) = if self.sync.is_none() {
            let m = g.count() as f64;
            let stats: Vec<(f32, f32)> = (0..g.c)
                .into_par_iter()
                .map(|c| {
                    let mean = g.channel_sum(c, |i| x[i] as f64) / m;
                    let var = g.channel_sum(c, |i| {
                        let d = x[i] as f64 - mean;
                        d * d
                    }) / m;
                    (mean as f32, var as f32)
                })
                .collect();
            (stats, g.count())
        } else {
            // the global batch: sums and count, then squared deviations from the global mean
            let mut sums: Vec<f64> = (0..g.c)
                .into_par_iter()
                .map(|c| g.channel_sum(c, |i| x[i] as f64))
                .collect();
            sums.push(g.count() as f64);
            sync_sum(&self.sync, &mut sums)?;
            let m = sums[g.c];
            if m <= 0.0 {
                candle_core::bail!("synchronised batch-norm: empty global batch");
            }
            let means: Vec<f64> = sums[..g.c].iter().map(|s| s / m).collect();
            let mut sq: Vec<f64> = (0..g.c)
                .into_par_iter()
                .map(|c| {
                    g.channel_sum(c, |i| {
                        let d = x[i] as f64 - means[c];
                        d * d
                    })
                })
                .collect();
            sync_sum(&self.sync, &mut sq)?;
            let stats = means
                .iter()
                .zip(&sq)
                .map(|(&mean, &s)| (mean as f32, (s / m) as f32))
                .collect();
            (stats, m as usize)
        };
        let scales: Vec<f32> = stats
            .iter()
            .zip(gamma)
            .map(|(&(_, var), &gm)| (gm as f64 / (var as f64 + self.eps).sqrt()) as f32)
            .collect();
        let relu = self.relu;
        let img = g.c * g.p;
        // SAFETY: every image's c·p outputs are written, channel by channel.
        let y = unsafe {
            super::cpu::vec_written_by(x.len(), |y| {
                // One task per image: on the late stages' 1×1 and 2×2 maps a task per
                // (image, channel) plane did almost no work per task.
                y.par_chunks_mut(img)
                    .zip(x.par_chunks(img))
                    .for_each(|(yo, xi)| {
                        for (c, (yo, xi)) in yo
                            .chunks_exact_mut(g.p)
                            .zip(xi.chunks_exact(g.p))
                            .enumerate()
                        {
                            let (scale, mean, shift) = (scales[c], stats[c].0, beta[c]);
                            for (o, &v) in yo.iter_mut().zip(xi) {
                                let t = (v - mean) * scale + shift;
                                o.write(if relu { t.max(0.0) } else { t });
                            }
                        }
                    })
            })
        };
        let (mean, var) = stats.into_iter().unzip();
        *self.stats.lock().map_err(|_| lock_err())? = Some(BatchStats { mean, var, count });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self
            .stats
            .lock()
            .map_err(|_| lock_err())?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch-norm: backward before forward".into()))?;
        let op = BnTrainBwd {
            eps: self.eps,
            relu: self.relu,
            stats,
            gamma: gamma.to_vec1::<f32>()?,
            sync: self.sync.clone(),
        };
        let c = gamma.elem_count();
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(&grad.contiguous()?, res, &op)?;
        let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let gg = packed.narrow(0, n, c)?;
        let gb = packed.narrow(0, n + c, c)?;
        Ok((Some(gx), Some(gg), Some(gb)))
    }
}

/// Backward op: (x, grad_y, y) → [grad_x (flattened), grad_gamma, grad_beta] in one vector.
struct BnTrainBwd {
    eps: f64,
    relu: bool,
    stats: BatchStats,
    gamma: Vec<f32>,
    sync: BnSync,
}

impl CustomOp3 for BnTrainBwd {
    fn name(&self) -> &'static str {
        "odcd-batch-norm-train-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Ncp::of(l1.shape())?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() || self.gamma.len() != g.c {
            candle_core::bail!("batch-norm backward: shapes do not match the input");
        }
        if g.count() == 0 || g.c == 0 {
            candle_core::bail!("batch-norm backward: empty batch");
        }
        let x = f32_slice(s1, l1, "input")?;
        let dy = f32_slice(s2, l2, "output gradient")?;
        let y = f32_slice(s3, l3, "output")?;
        let relu = self.relu;
        // gradient after the ReLU mask
        let dyr = |i: usize| -> f64 {
            if relu && y[i] <= 0.0 {
                0.0
            } else {
                dy[i] as f64
            }
        };
        let inv_std: Vec<f64> = self
            .stats
            .var
            .iter()
            .map(|&v| 1.0 / (v as f64 + self.eps).sqrt())
            .collect();
        let sums: Vec<(f64, f64)> = (0..g.c)
            .into_par_iter()
            .map(|c| {
                let mean = self.stats.mean[c] as f64;
                let (db, dg) = g.channel_sum2(c, |i| {
                    let d = dyr(i);
                    (d, d * (x[i] as f64 - mean))
                });
                (dg * inv_std[c], db)
            })
            .collect();
        // Synchronised: the sums over the global batch for dx (M its count); the weight
        // and bias gradients below stay this rank's own sums.
        let (global, m) = if self.sync.is_some() {
            let mut flat: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
            sync_sum(&self.sync, &mut flat)?;
            let global: Vec<(f64, f64)> = flat.chunks_exact(2).map(|p| (p[0], p[1])).collect();
            (global, self.stats.count as f64)
        } else {
            (sums.clone(), g.count() as f64)
        };
        // dx = k·(dy − Σdy/M − xhat·Σ(dy·xhat)/M), k = gamma·inv_std, xhat = (x − mean)·inv_std
        let coef: Vec<(f32, f32, f32, f32)> = (0..g.c)
            .map(|c| {
                let (dg, db) = global[c];
                let k = self.gamma[c] as f64 * inv_std[c];
                let b = k * dg * inv_std[c] / m;
                (k as f32, b as f32, self.stats.mean[c], (-k * db / m) as f32)
            })
            .collect();
        let img = g.c * g.p;
        // SAFETY: every image's c·p input gradients are written, then the 2·c tail.
        let out = unsafe {
            super::cpu::vec_written_by(x.len() + 2 * g.c, |out| {
                let (dx, tail) = out.split_at_mut(x.len());
                dx.par_chunks_mut(img)
                    .zip(
                        x.par_chunks(img)
                            .zip(dy.par_chunks(img).zip(y.par_chunks(img))),
                    )
                    .for_each(|(d, (x, (dy, y)))| {
                        let planes = d.chunks_exact_mut(g.p).zip(
                            x.chunks_exact(g.p)
                                .zip(dy.chunks_exact(g.p).zip(y.chunks_exact(g.p))),
                        );
                        for (c, (d, (x, (dy, y)))) in planes.enumerate() {
                            let (k, b, mean, cst) = coef[c];
                            for (o, ((&x, &dy), &y)) in d.iter_mut().zip(x.iter().zip(dy).zip(y)) {
                                let gy = if relu && y <= 0.0 { 0.0 } else { dy };
                                o.write(k * gy - b * (x - mean) + cst);
                            }
                        }
                    });
                for c in 0..g.c {
                    tail[c].write(sums[c].0 as f32);
                    tail[g.c + c].write(sums[c].1 as f32);
                }
            })
        };
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * g.c)))
    }
}

/// Training-mode batch norm (+ ReLU when `relu`) of an f32 CPU tensor over dim 1, with
/// affine `gamma`/`beta` (C,). Returns the output and the batch statistics.
pub fn batch_norm_train_cpu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, BatchStats)> {
    batch_norm_train_cpu_sync(x, gamma, beta, eps, relu, None)
}

/// [`batch_norm_train_cpu`] over the global batch of the ranks of `sync` ([`BnSync`]); every
/// rank must call it for the same layers in the same order.
pub fn batch_norm_train_cpu_sync(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    sync: BnSync,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let stats: StatsSlot = Arc::new(Mutex::new(None));
    let op = BnTrainOp {
        eps,
        relu,
        stats: stats.clone(),
        sync,
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let s = stats
        .lock()
        .map_err(|_| lock_err())?
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch-norm: no statistics computed".into()))?;
    Ok((y, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    /// BatchNorm(train) (+ ReLU) written with candle ops: the reference.
    fn reference(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        let c = x.dim(1)?;
        let mut bshape = vec![1usize; x.rank()];
        bshape[1] = c;
        let xt = x.transpose(0, 1)?.contiguous()?.flatten_from(1)?;
        let mean = xt.mean_keepdim(D::Minus1)?;
        let var = xt.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
        let mean = mean.reshape(bshape.as_slice())?;
        let inv = (var + eps)?.sqrt()?.recip()?.reshape(bshape.as_slice())?;
        let y = x
            .broadcast_sub(&mean)?
            .broadcast_mul(&inv)?
            .broadcast_mul(&gamma.reshape(bshape.as_slice())?)?
            .broadcast_add(&beta.reshape(bshape.as_slice())?)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    fn max_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        crate::model::ops::cpu::max_scaled_err(a, b, 1.0)
    }

    #[test]
    fn matches_candle_ops_values_gradients_and_stats() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let shapes: [&[usize]; 5] = [
            &[4, 3, 5, 7],
            &[1, 2, 3, 3],
            &[7, 5],
            &[2, 6, 1, 1],
            &[3, 4, 9],
        ];
        for dims in shapes {
            for relu in [false, true] {
                let c = dims[1];
                let n: usize = dims.iter().product();
                // an offset mean so the centring matters
                let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..3.0)).collect();
                let gs: Vec<f32> = (0..c).map(|_| rng.random_range(0.5..1.5)).collect();
                let bs: Vec<f32> = (0..c).map(|_| rng.random_range(-0.5..0.5)).collect();
                let x = Var::from_tensor(&Tensor::from_vec(xs.clone(), dims, &dev)?)?;
                let g = Var::from_tensor(&Tensor::from_vec(gs, c, &dev)?)?;
                let b = Var::from_tensor(&Tensor::from_vec(bs, c, &dev)?)?;
                let (ours, stats) =
                    batch_norm_train_cpu(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, relu)?;
                let theirs = reference(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, relu)?;
                let what = format!("{dims:?} relu {relu}");
                let e = max_err(&ours, &theirs)?;
                assert!(e < 1e-5, "forward {what}: {e}");
                // statistics: channel mean and biased variance
                let p = n / (dims[0] * c);
                for ch in 0..c {
                    let vals: Vec<f64> = (0..dims[0])
                        .flat_map(|i| (0..p).map(move |j| (i * c + ch) * p + j))
                        .map(|i| xs[i] as f64)
                        .collect();
                    let m = vals.iter().sum::<f64>() / vals.len() as f64;
                    let v = vals.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / vals.len() as f64;
                    assert!((stats.mean[ch] as f64 - m).abs() < 1e-5, "mean {what}");
                    assert!((stats.var[ch] as f64 - v).abs() < 1e-5, "var {what}");
                }
                let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let w = Tensor::from_vec(w, dims, &dev)?;
                let go = (ours * &w)?.sum_all()?.backward()?;
                let gt = (theirs * &w)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("gamma", &g), ("beta", &b)] {
                    let a = go.get(v.as_tensor()).expect("our gradient exists");
                    let r = gt.get(v.as_tensor()).expect("reference gradient exists");
                    let e = max_err(a, r)?;
                    assert!(e < 1e-4, "grad {name} {what}: {e}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_parameter_sizes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 2, 2), candle_core::DType::F32, &dev)?;
        let g = Tensor::ones(4, candle_core::DType::F32, &dev)?;
        assert!(batch_norm_train_cpu(&x, &g, &g, 1e-5, false).is_err());
        Ok(())
    }
}
