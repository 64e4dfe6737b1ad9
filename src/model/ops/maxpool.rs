//! Padded, overlapping max-pool (the ResNet stem's 3×3 stride-2 pad-1) with a backward pass.
//!
//! candle 0.11 has neither padding for max-pool nor a backward for overlapping windows
//! (`max_pool2d` refuses its backward when kernel ≠ stride). Two forms here:
//!
//! - the CPU kernel: a `CustomOp1` that keeps the argmax of every window (first maximum wins,
//!   as PyTorch) for its backward, a second custom op that scatters the gradient there. Runs
//!   on rayon over (N·C) planes.
//! - the generic form ([`MaxPool2d::forward_generic`]), for any device: −∞ padding, then a
//!   separable max (along W, then along H) over the k taps, each tap a strided view taken
//!   with `reshape` + `narrow`, combined with `maximum`. Every op in it has a backward in
//!   candle. Where taps tie, `maximum` splits the gradient between them instead of giving it
//!   all to the first; behind a ReLU the only ties are exact zeros, whose gradient the ReLU
//!   drops anyway.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        MaxPool2d {
            kernel,
            stride,
            padding,
        }
    }

    fn out_size(&self, n: usize) -> candle_core::Result<usize> {
        let padded = n + 2 * self.padding;
        if self.kernel == 0 || self.stride == 0 || padded < self.kernel {
            candle_core::bail!(
                "max-pool kernel {} stride {} padding {} does not fit input size {}",
                self.kernel,
                self.stride,
                self.padding,
                n
            );
        }
        if self.padding * 2 > self.kernel {
            candle_core::bail!("max-pool padding must be at most half the kernel size");
        }
        Ok((padded - self.kernel) / self.stride + 1)
    }

    /// Forward with backward support. Input (N, C, H, W) f32: the CPU kernel on CPU, the
    /// generic form elsewhere.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            x.contiguous()?.apply_op1(MaxPoolOp {
                pool: *self,
                keep_argmax: x.track_op(),
                argmax: Mutex::new(None),
            })
        } else {
            self.forward_generic(x)
        }
    }

    /// Device-generic max-pool of (N, C, H, W), any input sign, with a backward on every
    /// device (see the module comment).
    pub fn forward_generic(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (ho, wo) = (self.out_size(h)?, self.out_size(w)?);
        let y = self.max_along(x, 3, w, wo)?;
        self.max_along(&y, 2, h, ho)
    }

    /// Max over the kernel taps along `dim` (of size `n`, giving `n_out`): −∞ padding, then
    /// tap t of output i is padded index i·s + t. With the padded length a multiple of s,
    /// G·s, and the dim reshaped to (G, s), that index is (i + t / s, t % s): tap t is the
    /// view narrow(G: t / s, n_out) × narrow(s: t % s, 1).
    fn max_along(
        &self,
        x: &Tensor,
        dim: usize,
        n: usize,
        n_out: usize,
    ) -> candle_core::Result<Tensor> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        // enough groups for the input plus left padding and for the last tap of the last output
        let groups = (p + n).div_ceil(s).max((k - 1) / s + n_out);
        let right = groups * s - p - n;
        let pad = |len: usize| -> candle_core::Result<Option<Tensor>> {
            if len == 0 {
                return Ok(None);
            }
            let mut dims = x.dims().to_vec();
            dims[dim] = len;
            let t = Tensor::full(f32::NEG_INFINITY, dims, x.device())?;
            Ok(Some(t.to_dtype(x.dtype())?))
        };
        let (left, right) = (pad(p)?, pad(right)?);
        let parts: Vec<&Tensor> = [left.as_ref(), Some(x), right.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        let padded = Tensor::cat(&parts, dim)?;
        let mut grouped = padded.dims().to_vec();
        grouped.splice(dim..=dim, [groups, s]);
        let grouped = padded.reshape(grouped)?;
        let tap = |t: usize| -> candle_core::Result<Tensor> {
            grouped
                .narrow(dim + 1, t % s, 1)?
                .narrow(dim, t / s, n_out)?
                .squeeze(dim + 1)
        };
        let mut acc = tap(0)?;
        for t in 1..k {
            acc = acc.maximum(&tap(t)?)?;
        }
        Ok(acc)
    }

    /// Index (within the input plane) and value of the maximum of every window; index -1
    /// (value −∞) when a window holds only padding (impossible with padding ≤ kernel/2, kept
    /// for safety). Ties go to the first maximum in row-major window order; NaN propagates
    /// like PyTorch.
    fn argmax_plane(
        &self,
        plane: &[f32],
        (h, w): (usize, usize),
        (ho, wo): (usize, usize),
        idx: &mut [i64],
        vals: &mut [f32],
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let (mut even, mut odd) = (Vec::with_capacity(w / 2 + 1), Vec::with_capacity(w / 2));
        for oy in 0..ho {
            let (ylo, yhi) = ((oy * s).max(p) - p, (oy * s + k).saturating_sub(p).min(h));
            let bi = &mut idx[oy * wo..(oy + 1) * wo];
            let bv = &mut vals[oy * wo..(oy + 1) * wo];
            bi.fill(-1);
            bv.fill(f32::NEG_INFINITY);
            // Taps outer, output pixels inner: every pixel's running maximum is its own
            // dependency chain, so the inner loop pipelines (one chain per window was
            // latency-bound), and each pixel still sees its taps in row-major order.
            for y in ylo..yhi.max(ylo) {
                let row = &plane[y * w..(y + 1) * w];
                if s == 2 {
                    // Even and odd columns apart: every tap then reads a contiguous run, and
                    // the loop below vectorises (the stride-2 reads did not).
                    even.clear();
                    odd.clear();
                    for pair in row.chunks(2) {
                        even.push(pair[0]);
                        if let Some(&v) = pair.get(1) {
                            odd.push(v);
                        }
                    }
                }
                for dx in 0..k {
                    // Output columns whose tap dx lies inside the row: ox·s + dx − p ∈ [0, w).
                    let lo = if dx >= p { 0 } else { (p - dx).div_ceil(s) };
                    let hi = if w + p > dx {
                        ((w - 1 + p - dx) / s + 1).min(wo)
                    } else {
                        0
                    };
                    if lo >= hi {
                        continue;
                    }
                    let x0 = lo * s + dx - p;
                    let outs = bi[lo..hi].iter_mut().zip(bv[lo..hi].iter_mut());
                    let base = (y * w + x0) as i64;
                    if s == 2 {
                        // x = x0 + 2j is column (x0 + 2j) / 2 of the even or odd half
                        let half = if x0 % 2 == 0 { &even } else { &odd };
                        let run = &half[x0 / 2..x0 / 2 + (hi - lo)];
                        for (j, (&v, (b_i, b_v))) in run.iter().zip(outs).enumerate() {
                            take_if_greater(v, base + 2 * j as i64, b_v, b_i);
                        }
                    } else {
                        let taps = row[x0..].iter().step_by(s);
                        for (j, (&v, (b_i, b_v))) in taps.zip(outs).enumerate() {
                            take_if_greater(v, base + (j * s) as i64, b_v, b_i);
                        }
                    }
                }
            }
        }
    }
}

/// Running maximum of one output pixel: takes (v, i) when there is none yet, v is larger, or
/// v is the first NaN (NaN propagates like PyTorch). Selected through bit masks, not a branch
/// (the compiler turned an `if` into a jump that random data mispredicts half the time).
#[inline(always)]
fn take_if_greater(v: f32, i: i64, b_v: &mut f32, b_i: &mut i64) {
    let take = (*b_i < 0) | (v > *b_v) | (v.is_nan() & !b_v.is_nan());
    let m32 = (take as u32).wrapping_neg();
    let m64 = (take as i64).wrapping_neg();
    *b_v = f32::from_bits((v.to_bits() & m32) | (b_v.to_bits() & !m32));
    *b_i = (i & m64) | (*b_i & !m64);
}

fn dims4(layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    layout.shape().dims4()
}

fn contiguous_f32<'a>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    super::cpu::contiguous_f32(s, layout, "max-pool", "the input")
}

/// The CPU forward op; with `keep_argmax` (the input is part of a graph backward will walk)
/// it keeps the window argmaxes, so the backward does not search the windows again.
struct MaxPoolOp {
    pool: MaxPool2d,
    keep_argmax: bool,
    argmax: Mutex<Option<Vec<i64>>>,
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "odcd-max-pool2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(layout)?;
        let (ho, wo) = (self.pool.out_size(h)?, self.pool.out_size(w)?);
        let x = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; n * c * ho * wo];
        let mut idx = vec![0i64; n * c * ho * wo];
        out.par_chunks_mut(ho * wo)
            .zip(idx.par_chunks_mut(ho * wo))
            .zip(x.par_chunks(h * w))
            .for_each(|((o, i), plane)| self.pool.argmax_plane(plane, (h, w), (ho, wo), i, o));
        if self.keep_argmax {
            *self.argmax.lock().unwrap_or_else(|p| p.into_inner()) = Some(idx);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let argmax = self.argmax.lock().unwrap_or_else(|p| p.into_inner()).take();
        let g = arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &MaxPool2dBackward {
                pool: self.pool,
                argmax,
            },
        )?;
        Ok(Some(g))
    }
}

/// Gradient of [`MaxPool2d`] w.r.t. its input: (input, grad_out) → grad_in, through the
/// forward's argmaxes when it kept them (searched again otherwise).
struct MaxPool2dBackward {
    pool: MaxPool2d,
    argmax: Option<Vec<i64>>,
}

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "odcd-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(l1)?;
        let (n2, c2, ho, wo) = dims4(l2)?;
        if (n, c) != (n2, c2) || ho != self.pool.out_size(h)? || wo != self.pool.out_size(w)? {
            candle_core::bail!("max-pool backward: gradient shape does not match the input");
        }
        let x = contiguous_f32(s1, l1)?;
        let g = contiguous_f32(s2, l2)?;
        let mut out = vec![0f32; n * c * h * w];
        if let Some(idx) = self.argmax.as_deref().filter(|a| a.len() == g.len()) {
            out.par_chunks_mut(h * w)
                .zip(idx.par_chunks(ho * wo).zip(g.par_chunks(ho * wo)))
                .for_each(|(o, (ip, gp))| {
                    for (&i, &gv) in ip.iter().zip(gp) {
                        if let Some(d) = usize::try_from(i).ok().and_then(|i| o.get_mut(i)) {
                            *d += gv;
                        }
                    }
                });
            return Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))));
        }
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(g.par_chunks(ho * wo)))
            .for_each_init(
                || (vec![0i64; ho * wo], vec![0f32; ho * wo]),
                |(idx, vals), (o, (plane, gp))| {
                    self.pool.argmax_plane(plane, (h, w), (ho, wo), idx, vals);
                    for (&i, &gv) in idx.iter().zip(gp.iter()) {
                        if i >= 0 {
                            o[i as usize] += gv;
                        }
                    }
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    /// Naive reference: values and the gradient of sum(out * g) by finite reasoning
    /// (route each output gradient to its window's first maximum).
    fn naive(
        x: &[f32],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        mp: MaxPool2d,
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let ho = (h + 2 * mp.padding - mp.kernel) / mp.stride + 1;
        let wo = (w + 2 * mp.padding - mp.kernel) / mp.stride + 1;
        let mut out = vec![0f32; n * c * ho * wo];
        let mut grad = vec![0f32; n * c * h * w];
        for pl in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = f32::NEG_INFINITY;
                    let mut bi = usize::MAX;
                    for dy in 0..mp.kernel {
                        for dx in 0..mp.kernel {
                            let y = (oy * mp.stride + dy) as isize - mp.padding as isize;
                            let xx = (ox * mp.stride + dx) as isize - mp.padding as isize;
                            if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                continue;
                            }
                            let i = pl * h * w + y as usize * w + xx as usize;
                            if bi == usize::MAX || x[i] > best {
                                best = x[i];
                                bi = i;
                            }
                        }
                    }
                    let o = pl * ho * wo + oy * wo + ox;
                    out[o] = best;
                    grad[bi] += g[o];
                }
            }
        }
        (out, grad)
    }

    #[test]
    fn matches_naive_forward_and_backward_on_random_shapes() -> candle_core::Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let configs = [
            (3, 2, 1),
            (2, 2, 0),
            (3, 1, 1),
            (3, 2, 0),
            (2, 1, 1),
            (5, 3, 2),
        ];
        for &(k, s, p) in &configs {
            for &(h, w) in &[(7usize, 5usize), (8, 8), (5, 9), (13, 11)] {
                if h + 2 * p < k || w + 2 * p < k {
                    continue;
                }
                let (n, c) = (2, 3);
                // values on a coarse grid so exact ties occur and the tie rule is tested
                let xs: Vec<f32> = (0..n * c * h * w)
                    .map(|_| rng.random_range(0..6) as f32 - 2.0)
                    .collect();
                let mp = MaxPool2d::new(k, s, p);
                let x =
                    Var::from_tensor(&Tensor::from_vec(xs.clone(), (n, c, h, w), &Device::Cpu)?)?;
                let out = mp.forward(x.as_tensor())?;
                let (_, _, ho, wo) = out.dims4()?;
                let gs: Vec<f32> = (0..n * c * ho * wo).map(|_| rng.random::<f32>()).collect();
                let gt = Tensor::from_vec(gs.clone(), (n, c, ho, wo), &Device::Cpu)?;
                let loss = (out.clone() * gt)?.sum_all()?;
                let grads = loss.backward()?;
                let gx = grads
                    .get(x.as_tensor())
                    .expect("grad exists")
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let (eo, eg) = naive(&xs, n, c, h, w, mp, &gs);
                assert_eq!(
                    out.flatten_all()?.to_vec1::<f32>()?,
                    eo,
                    "forward k{k} s{s} p{p} {h}x{w}"
                );
                for (a, b) in gx.iter().zip(eg.iter()) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "backward k{k} s{s} p{p} {h}x{w}: {a} vs {b}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn generic_form_matches_naive_forward_and_backward() -> candle_core::Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for &(k, s, p) in &[
            (3, 2, 1),
            (2, 2, 0),
            (3, 1, 1),
            (3, 2, 0),
            (5, 3, 2),
            (3, 3, 1),
        ] {
            for &(h, w) in &[(7usize, 5usize), (8, 8), (5, 9), (16, 16)] {
                let (n, c) = (2, 3);
                // continuous values of both signs: no ties, and −∞ padding is needed
                let xs: Vec<f32> = (0..n * c * h * w)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect();
                let mp = MaxPool2d::new(k, s, p);
                let x =
                    Var::from_tensor(&Tensor::from_vec(xs.clone(), (n, c, h, w), &Device::Cpu)?)?;
                let out = mp.forward_generic(x.as_tensor())?;
                let (_, _, ho, wo) = out.dims4()?;
                let gs: Vec<f32> = (0..n * c * ho * wo).map(|_| rng.random::<f32>()).collect();
                let gt = Tensor::from_vec(gs.clone(), (n, c, ho, wo), &Device::Cpu)?;
                let grads = (out.clone() * gt)?.sum_all()?.backward()?;
                let gx = grads
                    .get(x.as_tensor())
                    .expect("grad exists")
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let (eo, eg) = naive(&xs, n, c, h, w, mp, &gs);
                let what = format!("k{k} s{s} p{p} {h}x{w}");
                assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, eo, "forward {what}");
                for (a, b) in gx.iter().zip(eg.iter()) {
                    assert!((a - b).abs() < 1e-5, "backward {what}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn generic_form_splits_tied_gradients_but_keeps_their_sum() -> candle_core::Result<()> {
        // one 2×2 window of equal values: PyTorch (and the CPU kernel) give its first element
        // the whole gradient; `maximum` shares it. What reaches anything upstream of a tie
        // that a ReLU produced (exact zeros) is zero in both cases.
        let x = Var::from_tensor(&Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?)?;
        let y = MaxPool2d::new(2, 2, 0).forward_generic(x.as_tensor())?;
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("grad").flatten_all()?;
        let gx = gx.to_vec1::<f32>()?;
        assert_eq!(gx.iter().sum::<f32>(), 1.0);
        assert!(gx.iter().all(|&v| v > 0.0), "{gx:?}");
        Ok(())
    }

    #[test]
    fn backward_with_kept_argmax_equals_searching_again() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mp = MaxPool2d::new(3, 2, 1);
        let x = Tensor::randn(0f32, 1f32, (2, 3, 9, 8), &dev)?;
        let op = MaxPoolOp {
            pool: mp,
            keep_argmax: true,
            argmax: Mutex::new(None),
        };
        let y = x.apply_op1_no_bwd(&op)?;
        let g = Tensor::randn(0f32, 1f32, y.shape(), &dev)?;
        let kept = op.argmax.lock().expect("lock").take();
        assert!(kept.is_some());
        let grad = |argmax| {
            x.apply_op2_no_bwd(&g, &MaxPool2dBackward { pool: mp, argmax })?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        assert_eq!(grad(kept)?, grad(None)?);
        Ok(())
    }
}
