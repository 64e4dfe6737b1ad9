//! 2-D convolution (no bias, dilation 1, groups 1) for f32 CPU tensors as candle custom ops:
//! im2col + one batch-wide GEMM (the `gemm` crate, multithreaded on rayon) forward, and a
//! backward that is two GEMMs (grad-weight = dY·colᵀ, grad-col = Wᵀ·dY) plus col2im, in one
//! op (the output gradient is re-laid out once; no input gradient for the images).
//!
//! candle 0.11's own CPU backward goes through `conv_transpose2d` and a transposed conv2d
//! for the weight gradient, which dominated the training step (see README, "Training
//! throughput"). On other devices [`conv2d`] falls back to candle's `conv2d` and autograd. On
//! CUDA that is candle's im2col + cuBLAS forward; odcd does not enable candle's `cudnn`
//! feature, and even with it candle's conv backward is `conv_transpose2d` (its naive CUDA
//! kernel) for the input gradient and an im2col conv2d for the weight gradient.
//!
//! Layouts: the input is NCHW, the weight (C_out, C_in, k_h, k_w). The column matrix is
//! (C_in·k_h·k_w) × (N·H_out·W_out), row-major, so every GEMM covers the whole batch (the
//! late ResNet stages have 1×1 or 2×2 maps: per-image GEMMs would be matrix-vector
//! products). All reductions have a fixed order, so results are bit-for-bit reproducible
//! for a given thread count.
//!
//! The GEMM calls live in `gemm.rs`, the geometry and the column matrix in `im2col.rs`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{gemm_f32, gemm_new, gemm_write_split_k, Dims, Mat};
use super::im2col::{cn_to_nc, cn_to_nc_into, col2im_into, columns, is_pointwise, nc_to_cn, Geom};

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::cpu::contiguous_f32(s, l, "conv2d", what)
}

/// The one kernel tap (index ky·k_w + kx) that sees the input when a 1×1 map is convolved
/// with an odd kernel padded to its centre into a 1×1 map (ResNet-18's last stage on 32 px
/// images). The conv is then a matrix product with that tap's weights; through im2col, 8 of
/// every 9 columns rows would be zeros multiplied in.
fn centre_tap(g: &Geom) -> Option<usize> {
    (!is_pointwise(g)
        && (g.h, g.w, g.ho, g.wo) == (1, 1, 1, 1)
        && g.kh == 2 * g.padding + 1
        && g.kw == 2 * g.padding + 1)
        .then_some(g.padding * g.kw + g.padding)
}

/// Forward op: (input, weight) → output.
struct Conv2dOp {
    stride: usize,
    padding: usize,
    /// The input needs a gradient (false for the stem's images: its col2im and GEMM are
    /// skipped).
    input_grad: bool,
    /// The weight operand is a detached copy of this parameter, whose gradient goes to
    /// these [`WeightGrads`] instead of candle's graph (see [`conv2d_param`]).
    weight_grad_to: Option<(Tensor, WeightGrads)>,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "odcd-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::of(l1, l2, self.stride, self.padding)?;
        let x = f32_slice(s1, l1, "input")?;
        let wt = f32_slice(s2, l2, "weight")?;
        if let Some(t) = centre_tap(&g) {
            // Yᵀ (n × c_out) = X (n × c_in) · W_tᵀ (c_in × c_out): already NCHW with 1×1 maps.
            let (kk, ckk) = (g.kh * g.kw, g.ckk());
            let y = gemm_new(
                Dims {
                    m: g.n,
                    n: g.c_out,
                    k: g.c_in,
                },
                Mat::new(x, g.c_in, 1),
                Mat::new(&wt[t..], kk, ckk),
            )?;
            return Ok((CpuStorage::F32(y), Shape::from((g.n, g.c_out, 1, 1))));
        }
        let col = columns(&g, x);
        let (ckk, cols) = (g.ckk(), g.cols());
        let y = gemm_new(
            Dims {
                m: g.c_out,
                n: cols,
                k: ckk,
            },
            Mat::new(wt, ckk, 1),
            Mat::new(&col, g.col_stride(), 1),
        )?;
        drop(col);
        let out = cn_to_nc(&y, g.n, g.c_out, g.hw_out());
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.n, g.c_out, g.ho, g.wo)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Both gradients from one op: the output gradient is re-laid out once. The result is
        // [grad_weight | grad_input], flat. (Keeping the forward's column matrix instead of
        // building it again measured no faster: fresh pages cost what im2col saves.)
        let both = x.apply_op3_no_bwd(
            w,
            &grad,
            &Conv2dBackward {
                stride: self.stride,
                padding: self.padding,
                input_grad: self.input_grad,
            },
        )?;
        let nw = w.elem_count();
        let nx = if self.input_grad { x.elem_count() } else { 0 };
        let gw = both.narrow(0, 0, nw)?.reshape(w.shape())?;
        let gx = if self.input_grad {
            Some(both.narrow(0, nw, nx)?.reshape(x.shape())?)
        } else {
            None
        };
        if let Some((param, to)) = &self.weight_grad_to {
            to.push(param.clone(), gw);
            return Ok((gx, None));
        }
        Ok((gx, Some(gw)))
    }
}

/// (input, weight, grad_out) → [grad_weight | grad_input] flattened (grad_weight alone
/// without `input_grad`): grad_weight = dY · colᵀ (summed over the batch inside the GEMM),
/// grad_input = col2im(Wᵀ · dY).
struct Conv2dBackward {
    stride: usize,
    padding: usize,
    input_grad: bool,
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "odcd-conv2d-backward"
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
        let g = Geom::of(l1, l2, self.stride, self.padding)?;
        if l3.shape().dims4()? != (g.n, g.c_out, g.ho, g.wo) {
            candle_core::bail!("conv2d backward: output gradient shape does not match");
        }
        let (ckk, cols) = (g.ckk(), g.cols());
        let wt = f32_slice(s2, l2, "weight")?;
        if let Some(t) = centre_tap(&g) {
            return centre_tap_backward(
                &g,
                t,
                f32_slice(s1, l1, "input")?,
                wt,
                f32_slice(s3, l3, "output gradient")?,
                self.input_grad,
            );
        }
        let dy = nc_to_cn(
            f32_slice(s3, l3, "output gradient")?,
            g.n,
            g.c_out,
            g.hw_out(),
            cols,
        );
        let nx = if self.input_grad {
            g.n * g.c_in * g.h * g.w
        } else {
            0
        };
        let nw = g.c_out * ckk;
        let mut out = {
            let col = columns(&g, f32_slice(s1, l1, "input")?);
            let mut result = Ok(());
            // SAFETY: gemm_write writes all of dW; dX is zeroed (col2im adds into it).
            let out = unsafe {
                super::cpu::vec_written_by(nw + nx, |out| {
                    let (dw, dx) = out.split_at_mut(nw);
                    // dW (c_out × ckk) = dY (c_out × cols) · colᵀ (cols × ckk)
                    result = gemm_write_split_k(
                        Dims {
                            m: g.c_out,
                            n: ckk,
                            k: cols,
                        },
                        dw,
                        Mat::new(&dy, cols, 1),
                        Mat::new(&col, 1, g.col_stride()),
                    );
                    dx.par_chunks_mut(1 << 16).for_each(super::cpu::write_zeros);
                })
            };
            result?;
            out
        };
        if self.input_grad {
            // dcol (ckk × cols) = Wᵀ (ckk × c_out) · dY (c_out × cols)
            let dcol = gemm_new(
                Dims {
                    m: ckk,
                    n: cols,
                    k: g.c_out,
                },
                Mat::new(wt, 1, ckk),
                Mat::new(&dy, cols, 1),
            )?;
            drop(dy);
            let dx = &mut out[nw..];
            if is_pointwise(&g) {
                cn_to_nc_into(&dcol, g.n, g.c_in, g.h * g.w, dx);
            } else {
                col2im_into(&g, &dcol, dx);
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Backward of a [`centre_tap`] conv, laid out as [`Conv2dBackward`]'s result: with 1×1
/// maps, NCHW tensors are (n × c) matrices. dX = dY · W_t, dW_t = dYᵀ · X, other taps 0.
fn centre_tap_backward(
    g: &Geom,
    t: usize,
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    input_grad: bool,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (kk, ckk) = (g.kh * g.kw, g.ckk());
    let nx = if input_grad { g.n * g.c_in } else { 0 };
    let mut out = vec![0f32; g.c_out * ckk + nx];
    let (dw, dx) = out.split_at_mut(g.c_out * ckk);
    if input_grad {
        gemm_f32(
            Dims {
                m: g.n,
                n: g.c_in,
                k: g.c_out,
            },
            dx,
            Mat::new(dy, g.c_out, 1),
            Mat::new(&wt[t..], ckk, kk),
            false,
        )?;
    }
    let dwt = gemm_new(
        Dims {
            m: g.c_out,
            n: g.c_in,
            k: g.n,
        },
        Mat::new(dy, 1, g.c_out),
        Mat::new(x, g.c_in, 1),
    )?;
    for (row, src) in dw.chunks_exact_mut(ckk).zip(dwt.chunks_exact(g.c_in)) {
        for (ci, v) in src.iter().enumerate() {
            row[ci * kk + t] = *v;
        }
    }
    let len = out.len();
    Ok((CpuStorage::F32(out), Shape::from(len)))
}

/// conv2d(x, weight) with the given stride and zero padding, dilation 1, one group.
/// f32 CPU tensors use the kernels of this module (with backward); anything else goes to
/// candle's `conv2d`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let cpu_f32 = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && weight.dtype() == candle_core::DType::F32;
    if cpu_f32 {
        x.contiguous()?.apply_op2(
            &weight.contiguous()?,
            Conv2dOp {
                stride,
                padding,
                input_grad: x.track_op(),
                weight_grad_to: None,
            },
        )
    } else {
        x.conv2d(weight, padding, stride, 1, 1)
    }
}

/// [`conv2d`] with a parameter `weight` whose gradient, on CPU, goes to `grads` instead of
/// candle's graph (so candle does not zero-fill and add a weight-sized buffer for it); the
/// caller moves it into the `GradStore` after the backward ([`WeightGrads::drain_into`]).
/// Applies when the input is part of the graph (the backward reaches the op through it);
/// otherwise, and on other devices, this is [`conv2d`].
pub(crate) fn conv2d_param(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    grads: &WeightGrads,
) -> candle_core::Result<Tensor> {
    let cpu_f32 = x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && weight.dtype() == candle_core::DType::F32;
    if !(cpu_f32 && x.track_op() && weight.is_variable()) {
        return conv2d(x, weight, stride, padding);
    }
    x.contiguous()?.apply_op2(
        &weight.detach().contiguous()?,
        Conv2dOp {
            stride,
            padding,
            input_grad: true,
            weight_grad_to: Some((weight.clone(), grads.clone())),
        },
    )
}

/// Conv weight gradients handed over outside candle's graph. candle's backward accumulates
/// every gradient it receives as `zeros_like + add`, which for ResNet-18's 11 M conv weights
/// is four extra passes over 45 MB per step; the CPU conv kernels instead leave each weight
/// gradient here, and `OdcModel::backward` puts them into the `GradStore`.
/// Shared by the model's conv layers.
#[derive(Clone, Debug, Default)]
pub struct WeightGrads(std::sync::Arc<std::sync::Mutex<Vec<(Tensor, Tensor)>>>);

impl WeightGrads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>> {
        // the Vec stays consistent even if a holder panicked: take it as it is
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `grad` for the parameter tensor `param`.
    pub(crate) fn push(&self, param: Tensor, grad: Tensor) {
        self.lock().push((param, grad));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Forgets gradients of a backward pass whose results were never collected.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// Moves the recorded gradients into `grads`, summing with any gradient already there
    /// for the same parameter.
    pub(crate) fn drain_into(
        &self,
        grads: &mut candle_core::backprop::GradStore,
    ) -> candle_core::Result<()> {
        for (param, grad) in self.lock().drain(..) {
            let sum = match grads.remove(&param) {
                Some(g) => (g + grad)?,
                None => grad,
            };
            grads.insert(&param, sum);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn max_rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        crate::model::ops::cpu::max_scaled_err(a, b, 1e-3)
    }

    /// Direct-loop reference: output, and the gradients of sum(out · g) w.r.t. x and w.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        (n, c_in, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        (c_out, k): (usize, usize),
        stride: usize,
        padding: usize,
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let ho = (h + 2 * padding - k) / stride + 1;
        let wo = (w + 2 * padding - k) / stride + 1;
        let mut out = vec![0f64; n * c_out * ho * wo];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; wt.len()];
        for b in 0..n {
            for co in 0..c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let o = ((b * c_out + co) * ho + oy) * wo + ox;
                        for ci in 0..c_in {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - padding as isize;
                                    let ix = (ox * stride + kx) as isize - padding as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xi = ((b * c_in + ci) * h + iy as usize) * w + ix as usize;
                                    let wi = ((co * c_in + ci) * k + ky) * k + kx;
                                    out[o] += x[xi] as f64 * wt[wi] as f64;
                                    dx[xi] += g[o] as f64 * wt[wi] as f64;
                                    dw[wi] += g[o] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
        (f(out), f(dx), f(dw))
    }

    /// Forward values against candle's conv2d and the naive loops; both gradients of
    /// sum(conv(x, w) · g) against the naive loops, and against candle's backward where
    /// candle's is right (its conv backward assumes square inputs when the stride is > 1).
    fn check(
        rng: &mut impl Rng,
        (n, c_in, h, w): (usize, usize, usize, usize),
        (c_out, k): (usize, usize),
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..n * c_in * h * w)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let ws: Vec<f32> = (0..c_out * c_in * k * k)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(xs.clone(), (n, c_in, h, w), &dev)?)?;
        let wt = Var::from_tensor(&Tensor::from_vec(ws.clone(), (c_out, c_in, k, k), &dev)?)?;
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, padding)?;
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), padding, stride, 1, 1)?;
        let what = format!("x {n}×{c_in}×{h}×{w} w {c_out}×{k}×{k} s{stride} p{padding}");
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        let e = max_rel_err(&ours, &theirs)?;
        assert!(e < 1e-5, "forward vs candle {what}: rel err {e}");
        let gs: Vec<f32> = (0..ours.elem_count())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let (eo, edx, edw) = naive(&xs, (n, c_in, h, w), &ws, (c_out, k), stride, padding, &gs);
        let e = max_rel_err(&ours, &Tensor::from_vec(eo, ours.shape(), &dev)?)?;
        assert!(e < 1e-5, "forward vs naive {what}: rel err {e}");
        let g = Tensor::from_vec(gs, ours.shape(), &dev)?;
        let go = (ours * &g)?.sum_all()?.backward()?;
        let expect = [
            ("input", &x, Tensor::from_vec(edx, (n, c_in, h, w), &dev)?),
            (
                "weight",
                &wt,
                Tensor::from_vec(edw, (c_out, c_in, k, k), &dev)?,
            ),
        ];
        for (name, v, reference) in &expect {
            let a = go.get(v.as_tensor()).expect("our gradient exists");
            let e = max_rel_err(a, reference)?;
            assert!(e < 1e-5, "grad {name} vs naive {what}: rel err {e}");
        }
        if h == w || stride == 1 {
            let gt = (theirs * &g)?.sum_all()?.backward()?;
            for (name, v, _) in &expect {
                let a = go.get(v.as_tensor()).expect("our gradient exists");
                let b = gt.get(v.as_tensor()).expect("candle gradient exists");
                let e = max_rel_err(a, b)?;
                assert!(e < 1e-5, "grad {name} vs candle {what}: rel err {e}");
            }
        }
        Ok(())
    }

    #[test]
    fn matches_candle_conv2d_values_and_gradients() -> candle_core::Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // (kernel, stride, padding) of every conv in ResNet-18/50 and odd extras
        let kinds = [
            (1, 1, 0),
            (1, 2, 0),
            (3, 1, 1),
            (3, 2, 1),
            (7, 2, 3),
            (3, 1, 0),
            (3, 2, 0),
            (1, 1, 1),
            (5, 3, 2),
            // stride-1 "same" convs take the shifted-copy path (a 5×5 shifts by up to 2)
            (5, 1, 2),
        ];
        for &(k, s, p) in &kinds {
            for &(n, c_in, h, w, c_out) in &[
                (1, 3, 9, 7, 4),
                (3, 5, 8, 8, 6),
                (2, 2, 11, 13, 3),
                (2, 4, 7, 7, 1),
                // outputs wider than GATHER_MAX_WIDTH: the row-copy im2col/col2im path
                (1, 2, 20, 21, 3),
            ] {
                if h + 2 * p < k || w + 2 * p < k {
                    continue;
                }
                check(&mut rng, (n, c_in, h, w), (c_out, k), s, p)?;
            }
        }
        // 2,048 GEMM columns with few output channels: the weight gradient split along k
        check(&mut rng, (8, 2, 16, 16), (3, 3), 1, 1)?;
        // a map smaller than the kernel's reach, as in ResNet's last stage
        check(&mut rng, (4, 8, 1, 1), (5, 3), 1, 1)?;
        check(&mut rng, (2, 8, 2, 2), (5, 3), 2, 1)?;
        // 1×1 maps through the centre tap only (the matrix-product path)
        check(&mut rng, (3, 6, 1, 1), (4, 5), 1, 2)?;
        check(&mut rng, (2, 5, 1, 1), (7, 3), 2, 1)?;
        Ok(())
    }

    #[test]
    fn weight_gradient_is_the_same_when_the_input_needs_none() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (shape, k, stride, pad) in [((2, 3, 9, 9), 7, 2, 3), ((3, 4, 1, 1), 3, 1, 1)] {
            let x = Tensor::randn(0f32, 1f32, shape, &dev)?;
            let w = Var::randn(0f32, 1f32, (5, shape.1, k, k), &dev)?;
            let xv = Var::from_tensor(&x)?;
            let g_plain = conv2d(&x, w.as_tensor(), stride, pad)?
                .sqr()?
                .sum_all()?
                .backward()?;
            let g_var = conv2d(xv.as_tensor(), w.as_tensor(), stride, pad)?
                .sqr()?
                .sum_all()?
                .backward()?;
            let a = g_plain.get(w.as_tensor()).expect("weight gradient");
            let b = g_var.get(w.as_tensor()).expect("weight gradient");
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
            assert!(g_plain.get(&x).is_none());
            assert!(g_var.get(xv.as_tensor()).is_some());
        }
        Ok(())
    }

    #[test]
    fn handed_over_weight_gradient_equals_candles() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1f32, (3, 4, 6, 5), &dev)?;
        let w = Var::randn(0f32, 1f32, (5, 4, 3, 3), &dev)?;
        let loss = |y: Tensor| y.sqr()?.sum_all();
        let reference = loss(conv2d(x.as_tensor(), w.as_tensor(), 2, 1)?)?.backward()?;
        let to = WeightGrads::default();
        // used twice in one graph: the two handed-over gradients are summed
        let y = conv2d_param(x.as_tensor(), w.as_tensor(), 2, 1, &to)?;
        let mut grads = (loss(y.clone())? + loss(y)?)?.backward()?;
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "not through candle's graph"
        );
        to.drain_into(&mut grads)?;
        let got = (grads.get(w.as_tensor()).expect("handed over") / 2.0)?;
        let want = reference.get(w.as_tensor()).expect("weight gradient");
        assert!(max_rel_err(&got, want)? < 1e-6);
        let gx = (grads.get(x.as_tensor()).expect("input gradient") / 2.0)?;
        assert!(max_rel_err(&gx, reference.get(x.as_tensor()).expect("input"))? < 1e-6);
        // an input outside the graph (the stem's images): candle's own path
        let plain = Tensor::randn(0f32, 1f32, (2, 4, 5, 5), &dev)?;
        let g = loss(conv2d_param(&plain, w.as_tensor(), 1, 1, &to)?)?.backward()?;
        assert!(g.get(w.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn rejects_mismatched_channels() -> candle_core::Result<()> {
        let x = Tensor::zeros((1, 3, 5, 5), candle_core::DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((2, 4, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
        assert!(conv2d(&x, &w, 1, 1).is_err());
        Ok(())
    }

    #[test]
    fn non_contiguous_input_gives_the_same_result() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (3, 2, 6, 5), &dev)?;
        let xt = x.transpose(0, 1)?; // (2, 3, 6, 5), strided
        let w = Tensor::randn(0f32, 1f32, (4, 3, 3, 3), &dev)?;
        let a = conv2d(&xt, &w, 1, 1)?;
        let b = conv2d(&xt.contiguous()?, &w, 1, 1)?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
