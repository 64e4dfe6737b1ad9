//! Helpers shared by the CPU kernels of the custom ops (conv, batch-norm, residual, max-pool).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout};

/// Writes 0.0 into every element of `s`.
pub(crate) fn write_zeros(s: &mut [MaybeUninit<f32>]) {
    s.iter_mut().for_each(|d| {
        d.write(0.0);
    });
}

/// A vector of `len` f32 that `fill` initialises, without zero-filling it first: the
/// kernels' column matrices, GEMM outputs and re-laid-out copies are overwritten anyway, and
/// the memset of fresh buffers was ~6% of the ResNet-18 training step.
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn vec_written_by(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller guarantees that `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

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

/// Keeps candle's own CPU worker pool (its element-wise and reduction ops) to the calling
/// thread unless `CANDLE_NUM_THREADS` is set. That pool's workers spin up to 25,000 times
/// before parking after every op, and on CPU the training step's heavy ops (conv, BatchNorm,
/// GEMM) run on rayon: the spinning workers took cores from them. On the 2-core development
/// machine the ResNet-18 step went from ~310 to ~230–255 ms (README, "Training throughput").
/// Call it first thing in `main`, before any other thread exists: it sets an environment
/// variable, which candle reads once when its pool starts.
pub fn keep_candle_pool_off_rayon_cores() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Tunes glibc's allocator for the training step, once per process. Every step allocates and
/// frees the same large buffers (im2col columns, activations, gradients: up to tens of MB each).
/// By default glibc serves such sizes with fresh `mmap`s or trims them off the heap top when
/// freed, so the next step page-faults (and the kernel zeroes) them again: on ResNet-18 at
/// batch 64 that was ~260,000 page faults per 20 steps and ~10% of the step time. With a 32 MB
/// mmap threshold (glibc's maximum) and a 1 GiB trim threshold, freed blocks stay in the heap
/// and are reused; the cost is that RSS stays at the step's peak instead of dropping between
/// steps. No-op on other platforms and allocators.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets allocator parameters; it is called before the
            // training threads allocate (and glibc serialises it with its own locks).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
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
