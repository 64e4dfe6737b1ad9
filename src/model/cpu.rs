//! Helpers shared by the CPU kernels of the custom ops (conv, batch-norm, residual, max-pool).

use candle_core::{CpuStorage, Layout};

/// The contiguous f32 data of a CPU tensor; `op` and `what` name the op and operand in errors.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: {what} must be f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// Largest |a − b| over the tensors, relative to max(|b|, `floor`): the kernels' tests
/// compare against candle's ops or a naive reference with it.
#[cfg(test)]
pub(crate) fn max_scaled_err(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    floor: f32,
) -> candle_core::Result<f32> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
    Ok(a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale)))
}
