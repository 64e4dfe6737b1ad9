//! relu(a + b), the residual join of every ResNet block, as one f32 CPU pass with a one-pass
//! backward (candle's add + relu cost five passes and three allocations backward).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Work per rayon task: big enough to amortise the split, small enough to balance.
const CHUNK: usize = 16 * 1024;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::ops::cpu::contiguous_f32(s, l, "residual add", what)
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "odcd-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "residual add: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let a = f32_slice(s1, l1, "left operand")?;
        let b = f32_slice(s2, l2, "right operand")?;
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = (a + b).max(0.0);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &ReluMask)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// (relu output, grad) → grad where the output is positive, 0 elsewhere.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "odcd-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("residual add backward: gradient shape differs from the output");
        }
        let y = f32_slice(s1, l1, "output")?;
        let g = f32_slice(s2, l2, "gradient")?;
        let mut d = vec![0f32; y.len()];
        d.par_chunks_mut(CHUNK)
            .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(d, (y, g))| {
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = if y > 0.0 { g } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

/// relu(a + b) for tensors of one shape; the fused kernel on f32 CPU tensors, candle ops
/// elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == candle_core::DType::F32 && b.dtype() == a.dtype() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_add_relu_values_and_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for dims in [&[3usize, 4, 5, 6][..], &[70_001][..]] {
            let a = Var::randn(0f32, 1f32, dims, &dev)?;
            let b = Var::randn(0f32, 1f32, dims, &dev)?;
            let w = Tensor::randn(0f32, 1f32, dims, &dev)?;
            let ours = add_relu(a.as_tensor(), b.as_tensor())?;
            let theirs = (a.as_tensor() + b.as_tensor())?.relu()?;
            assert_eq!(
                ours.flatten_all()?.to_vec1::<f32>()?,
                theirs.flatten_all()?.to_vec1::<f32>()?
            );
            let go = (ours * &w)?.sum_all()?.backward()?;
            let gt = (theirs * &w)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let x = go.get(v.as_tensor()).expect("our gradient");
                let y = gt.get(v.as_tensor()).expect("candle gradient");
                // random normal sums are never exactly 0, where the two relu rules differ
                assert_eq!(
                    x.flatten_all()?.to_vec1::<f32>()?,
                    y.flatten_all()?.to_vec1::<f32>()?
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_different_shapes() -> candle_core::Result<()> {
        let a = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu)?;
        assert!(add_relu(&a, &b).is_err());
        Ok(())
    }
}
