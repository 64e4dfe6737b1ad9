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
