//! The few layers ResNet + the ODC neck need, written over candle tensors so that
//! initialisation, running statistics and dropout are under odcd's control.

use candle_core::{DType, Module, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ops::{batch_norm_train_cpu_sync, conv2d_param};
use super::params::{
    BnMomentumOverride, BnSyncChoice, Buffer, KernelChoice, ParamStore, WeightGrads,
};
use super::ModelError;

/// 2-D convolution without bias (ResNet convs are always followed by BatchNorm).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    weight_grads: WeightGrads,
    kernels: KernelChoice,
}

impl Conv2d {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, ModelError> {
        let weight = ps.kaiming(&format!("{name}.weight"), &[c_out, c_in, kernel, kernel])?;
        Ok(Conv2d {
            weight,
            stride,
            padding,
            weight_grads: ps.weight_grads().clone(),
            kernels: ps.kernel_choice().clone(),
        })
    }

    /// odcd's CPU conv kernels on f32 CPU tensors with `auto` kernels; candle's `conv2d`
    /// otherwise (its backward: a `conv_transpose2d` for the input gradient and a conv2d
    /// for the weight gradient, on any device).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels.cpu_kernels_for(x) {
            conv2d_param(
                x,
                &self.weight,
                self.stride,
                self.padding,
                &self.weight_grads,
            )
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
        }
    }
}

/// Fully connected layer, y = x Wᵀ + b.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Kaiming-normal (fan-in, ReLU) weight, zero bias: the neck's init.
    pub fn kaiming(
        ps: &mut ParamStore,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Self, ModelError> {
        let weight = ps.kaiming(&format!("{name}.weight"), &[d_out, d_in])?;
        let bias = ps.constant(&format!("{name}.bias"), &[d_out], 0.0)?;
        Ok(Linear { weight, bias })
    }

    /// Normal(0, std) weight, zero bias: the head's init.
    pub fn normal(
        ps: &mut ParamStore,
        name: &str,
        d_in: usize,
        d_out: usize,
        std: f64,
    ) -> Result<Self, ModelError> {
        let weight = ps.normal(&format!("{name}.weight"), &[d_out, d_in], std)?;
        let bias = ps.constant(&format!("{name}.bias"), &[d_out], 0.0)?;
        Ok(Linear { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Batch normalisation over dim 1 of (N, C) or (N, C, H, W), PyTorch semantics: training
/// normalises with the biased batch variance and updates the running variance with the
/// unbiased one; `momentum` is the weight of the new batch statistic.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    affine: Option<(Tensor, Tensor)>,
    running_mean: Buffer,
    running_var: Buffer,
    momentum: f64,
    momentum_override: BnMomentumOverride,
    kernels: KernelChoice,
    sync: BnSyncChoice,
    eps: f64,
}

impl BatchNorm {
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        channels: usize,
        affine: bool,
        momentum: f64,
    ) -> Result<Self, ModelError> {
        let affine = if affine {
            Some((
                ps.constant(&format!("{name}.weight"), &[channels], 1.0)?,
                ps.constant(&format!("{name}.bias"), &[channels], 0.0)?,
            ))
        } else {
            None
        };
        Ok(BatchNorm {
            affine,
            running_mean: ps.buffer(&format!("{name}.running_mean"), &[channels], 0.0)?,
            running_var: ps.buffer(&format!("{name}.running_var"), &[channels], 1.0)?,
            momentum,
            momentum_override: ps.bn_momentum_override().clone(),
            kernels: ps.kernel_choice().clone(),
            sync: ps.bn_sync().clone(),
            eps: 1e-5,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// Weight of a new batch statistic in the running statistics (BN calibration may
    /// override it for the whole model).
    fn momentum(&self) -> f64 {
        self.momentum_override.get().unwrap_or(self.momentum)
    }

    /// BatchNorm followed by ReLU when `relu`. Training on f32 CPU tensors with affine
    /// parameters and `auto` kernels uses the fused kernel of `ops/batchnorm.rs`; everything
    /// else candle ops. Synchronised over ranks (data-parallel training, `BnSyncChoice`),
    /// every training forward on the CPU kernels goes through the fused kernel, which then
    /// normalises with the global batch's statistics (a layer without affine parameters with
    /// a constant scale 1 and shift 0).
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        let sync = self.sync.get();
        let fused = train && self.kernels.cpu_kernels_for(x);
        let affine = match (&self.affine, &sync) {
            (Some((w, b)), _) => Some((w.clone(), b.clone())),
            (None, Some(_)) if fused => {
                let c = x.dim(1)?;
                Some((
                    Tensor::ones(c, DType::F32, x.device())?,
                    Tensor::zeros(c, DType::F32, x.device())?,
                ))
            }
            (None, _) => None,
        };
        if let (true, Some((w, b))) = (fused, &affine) {
            let (y, stats) = batch_norm_train_cpu_sync(x, w, b, self.eps, relu, sync)?;
            let n = stats.count;
            let c = stats.mean.len();
            let m = self.momentum();
            let unbiased = if n > 1 {
                n as f64 / (n - 1) as f64
            } else {
                1.0
            };
            let dev = x.device();
            let mean = Tensor::from_vec(stats.mean, c, dev)?;
            let var = (Tensor::from_vec(stats.var, c, dev)? * unbiased)?;
            let rm = ((self.running_mean.get() * (1.0 - m))? + (mean * m)?)?;
            let rv = ((self.running_var.get() * (1.0 - m))? + (var * m)?)?;
            self.running_mean.set(rm);
            self.running_var.set(rv);
            return Ok(y);
        }
        let y = self.forward_generic(x, train)?;
        if relu {
            self::relu(&y)
        } else {
            Ok(y)
        }
    }

    /// candle-op BatchNorm: any device, with or without affine parameters.
    fn forward_generic(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let rank = x.rank();
        let c = x.dim(1)?;
        // Shape that broadcasts a per-channel vector against x.
        let mut bshape = vec![1usize; rank];
        bshape[1] = c;
        let (mean, var) = if train {
            // Move channels first and flatten the rest: statistics per channel.
            let xt = x.transpose(0, 1)?.contiguous()?.flatten_from(1)?;
            let n = xt.dim(1)?;
            let mean = xt.mean_keepdim(D::Minus1)?;
            let centered = xt.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            let mean = mean.flatten_all()?;
            let var = var.flatten_all()?;
            let m = self.momentum();
            let unbiased = if n > 1 {
                (var.detach() * (n as f64 / (n - 1) as f64))?
            } else {
                var.detach()
            };
            let rm = ((self.running_mean.get() * (1.0 - m))? + (mean.detach() * m)?)?;
            let rv = ((self.running_var.get() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(rm);
            self.running_var.set(rv);
            (mean, var)
        } else {
            (self.running_mean.get(), self.running_var.get())
        };
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let (scale, shift) = match &self.affine {
            Some((w, b)) => {
                let scale = (inv_std * w)?;
                let shift = (b - (&mean * &scale)?)?;
                (scale, shift)
            }
            None => {
                let shift = (&mean * &inv_std)?.neg()?;
                (inv_std, shift)
            }
        };
        x.broadcast_mul(&scale.reshape(bshape.as_slice())?)?
            .broadcast_add(&shift.reshape(bshape.as_slice())?)
    }
}

/// max(x, 0) with PyTorch's gradient rule: the gradient passes where the output is positive
/// and is 0 at x = 0 (candle's `relu` passes it at 0 too). odcd's CPU kernels follow the
/// same rule, so the two paths agree where a pre-activation is exactly 0 (a BatchNorm of a
/// channel that is constant over the batch, for instance).
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    let positive = x.gt(0.0)?;
    positive.where_cond(x, &x.zeros_like()?)
}

/// Inverted dropout with a mask drawn from a seeded RNG, so a training step is reproducible.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let keep = 1.0 - p;
    let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f32>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(DType::F32)?;
    x.mul(&mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn batch_norm_train_matches_hand_computation() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let mut ps = ParamStore::new(&dev, 0);
        let bn = BatchNorm::new(&mut ps, "bn", 2, false, 0.1)?;
        // (N=4, C=2): channel 0 = 1,2,3,4 ; channel 1 = 0,0,0,8
        let x = Tensor::from_vec(vec![1f32, 0., 2., 0., 3., 0., 4., 8.], (4, 2), &dev)?;
        let y = bn.forward(&x, true)?.to_vec2::<f32>()?;
        // channel 0: mean 2.5, biased var 1.25
        let e = (1.0f32 - 2.5) / (1.25f32 + 1e-5).sqrt();
        assert!((y[0][0] - e).abs() < 1e-5);
        // running mean = 0.9*0 + 0.1*2.5; running var = 0.9 + 0.1 * 1.25*4/3
        let rm = bn.running_mean.get().to_vec1::<f32>()?;
        let rv = bn.running_var.get().to_vec1::<f32>()?;
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - 0.2).abs() < 1e-6);
        assert!((rv[0] - (0.9 + 0.1 * 1.25 * 4.0 / 3.0)).abs() < 1e-5);
        // eval uses running statistics
        let ye = bn.forward(&x, false)?.to_vec2::<f32>()?;
        let e2 = (1.0 - rm[0]) / (rv[0] + 1e-5).sqrt();
        assert!((ye[0][0] - e2).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn fused_cpu_batch_norm_matches_candle_ops_and_running_stats() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2f32, (5, 3, 4, 6), &dev)? + 1.5)?;
        let fused = BatchNorm::new(&mut ParamStore::new(&dev, 0), "bn", 3, true, 0.1)?;
        let plain = BatchNorm::new(&mut ParamStore::new(&dev, 0), "bn", 3, true, 0.1)?;
        for relu in [false, true] {
            let a = fused.forward_act(&x, true, relu)?;
            let mut b = plain.forward_generic(&x, true)?;
            if relu {
                b = b.relu()?;
            }
            let (a, b) = (
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?,
            );
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-5, "relu {relu}: {u} vs {v}");
            }
        }
        for (f, p) in [
            (&fused.running_mean, &plain.running_mean),
            (&fused.running_var, &plain.running_var),
        ] {
            let (f, p) = (f.get().to_vec1::<f32>()?, p.get().to_vec1::<f32>()?);
            for (u, v) in f.iter().zip(&p) {
                assert!((u - v).abs() < 1e-5, "running stats {u} vs {v}");
            }
        }
        Ok(())
    }

    #[test]
    fn dropout_is_seeded_and_scaled() -> candle_core::Result<()> {
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu)?;
        let a = dropout(&x, 0.5, 7)?.to_vec1::<f32>()?;
        let b = dropout(&x, 0.5, 7)?.to_vec1::<f32>()?;
        let c = dropout(&x, 0.5, 8)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
        let kept = a.iter().filter(|&&v| v > 0.0).count();
        assert!((400..600).contains(&kept), "kept {kept}");
        Ok(())
    }
}
