//! GEMM plumbing for the conv kernels: strided operand views ([`Mat`]), product shapes
//! ([`Dims`]) and the calls into the `gemm` crate (multithreaded on rayon), including the
//! split along k for products with few rows and a long inner dimension. `gemm_raw` checks
//! the operands' extents before the one call into `gemm::gemm`, so no product reads outside
//! its slices.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// A GEMM operand: element (r, c) is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(super) fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Mat { data, rs, cs }
    }

    /// True when a rows × cols view lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }

    /// The view from column `c0` on (empty, and so failing [`Mat::fits`], past the end).
    fn skip_cols(self, c0: usize) -> Self {
        Mat {
            data: self.data.get(c0 * self.cs..).unwrap_or_default(),
            ..self
        }
    }

    /// The view from row `r0` on.
    fn skip_rows(self, r0: usize) -> Self {
        Mat {
            data: self.data.get(r0 * self.rs..).unwrap_or_default(),
            ..self
        }
    }
}

/// The shape of a product: dst (m × n) = A (m × k) · B (k × n).
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
}

/// `dst` (m × n, row-major, contiguous) = A·B, or dst + A·B when `accumulate`.
pub(super) fn gemm_f32(
    d: Dims,
    dst: &mut [f32],
    a: Mat,
    b: Mat,
    accumulate: bool,
) -> candle_core::Result<()> {
    if dst.len() < d.m * d.n {
        candle_core::bail!("conv2d: GEMM output shorter than its shape (internal error)");
    }
    if d.k == 0 && !accumulate {
        dst[..d.m * d.n].fill(0.0);
        return Ok(());
    }
    // SAFETY: dst holds m·n initialised values (checked above).
    unsafe { gemm_raw(d, dst.as_mut_ptr(), a, b, accumulate, all_threads()) }
}

fn all_threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// `dst` (m × n, row-major, uninitialised) = A·B. Every element is written, with zeros
/// when k = 0 or on an error (which is returned).
fn gemm_write(d: Dims, dst: &mut [MaybeUninit<f32>], a: Mat, b: Mat) -> candle_core::Result<()> {
    let zero = super::cpu::write_zeros;
    if dst.len() != d.m * d.n {
        zero(dst);
        candle_core::bail!("conv2d: GEMM output of the wrong size (internal error)");
    }
    if d.k == 0 {
        zero(dst);
        return Ok(());
    }
    // SAFETY: dst is valid for m·n writes and borrowed mutably, so it overlaps neither
    // operand; with `accumulate` off nothing is read from it.
    let result = unsafe {
        gemm_raw(
            d,
            dst.as_mut_ptr().cast::<f32>(),
            a,
            b,
            false,
            all_threads(),
        )
    };
    if result.is_err() {
        zero(dst);
    }
    result
}

/// The gemm crate splits only m and n across threads. A product with few rows and a long
/// inner dimension (the weight gradient of a 64-channel conv: 64 × 576 over k = 4,096
/// columns, or the stem's 64 × 147 over 16,384) then runs at about half speed, so it is
/// split along k instead: one single-threaded GEMM per thread over its share of k, summed
/// in a fixed order. Measured on 2 cores: 3.1 → 2.0 ms (first stage), 4.3 → 3.0 ms (stem).
const SPLIT_K_MAX_M: usize = 64;
const SPLIT_K_MIN_PART: usize = 1024;

/// [`gemm_write`], split along k where that is faster (see [`SPLIT_K_MAX_M`]).
pub(super) fn gemm_write_split_k(
    d: Dims,
    dst: &mut [MaybeUninit<f32>],
    a: Mat,
    b: Mat,
) -> candle_core::Result<()> {
    let parts = rayon::current_num_threads().min(d.k / SPLIT_K_MIN_PART);
    if d.m > SPLIT_K_MAX_M || parts < 2 || dst.len() != d.m * d.n {
        return gemm_write(d, dst, a, b);
    }
    let chunk = d.k.div_ceil(parts);
    let partials = (0..parts)
        .into_par_iter()
        .map(|i| {
            let k0 = i * chunk;
            let part_dims = Dims {
                k: chunk.min(d.k - k0),
                ..d
            };
            let mut part = vec![0f32; d.m * d.n];
            // SAFETY: `part` holds m·n values and is not shared.
            unsafe {
                gemm_raw(
                    part_dims,
                    part.as_mut_ptr(),
                    a.skip_cols(k0),
                    b.skip_rows(k0),
                    false,
                    gemm::Parallelism::None,
                )
            }
            .map(|()| part)
        })
        .collect::<candle_core::Result<Vec<_>>>();
    let partials = match partials {
        Ok(p) => p,
        Err(e) => {
            super::cpu::write_zeros(dst);
            return Err(e);
        }
    };
    dst.par_chunks_mut(4096).enumerate().for_each(|(ci, out)| {
        for (j, o) in out.iter_mut().enumerate() {
            let i = ci * 4096 + j;
            o.write(partials.iter().map(|p| p[i]).sum());
        }
    });
    Ok(())
}

/// A new m × n row-major matrix A·B, written by the GEMM without zero-filling it first.
pub(super) fn gemm_new(d: Dims, a: Mat, b: Mat) -> candle_core::Result<Vec<f32>> {
    let mut result = Ok(());
    // SAFETY: gemm_write writes every element, on success and on error.
    let v = unsafe {
        super::cpu::vec_written_by(d.m * d.n, |dst| {
            result = gemm_write(d, dst, a, b);
        })
    };
    result.map(|()| v)
}

/// The GEMM call behind the functions above. The operands' extents are checked here, so
/// the call cannot read outside their slices.
///
/// # Safety
/// `dst` must be valid for m·n writes (and reads when `accumulate`), contiguous row-major,
/// and must not overlap `a` or `b`.
unsafe fn gemm_raw(
    d: Dims,
    dst: *mut f32,
    a: Mat,
    b: Mat,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> candle_core::Result<()> {
    let Dims { m, n, k } = d;
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    if !a.fits(m, k) || !b.fits(k, n) {
        candle_core::bail!("conv2d: GEMM operand shorter than its shape (internal error)");
    }
    // SAFETY: the extents of a and b were checked against their slices above, dst is valid
    // for m·n elements by this function's contract, and the strides fit in isize because
    // they index allocations that exist.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
