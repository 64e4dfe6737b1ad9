//! 2-D convolution (no bias, dilation 1, groups 1) for f32 CPU tensors as candle custom ops:
//! im2col + one batch-wide GEMM (the `gemm` crate, multithreaded on rayon) forward, and a
//! backward that is two GEMMs (grad-weight = dY·colᵀ, grad-col = Wᵀ·dY) plus col2im, in one
//! op (the output gradient is re-laid out once; no input gradient for the images).
//!
//! candle 0.11's own CPU backward goes through `conv_transpose2d` and a transposed conv2d
//! for the weight gradient, which dominated the training step (see README, "Training
//! throughput"). On other devices [`conv2d`] falls back to candle's `conv2d`, so CUDA keeps
//! candle's (cuDNN) kernels and autograd.
//!
//! Layouts: the input is NCHW, the weight (C_out, C_in, k_h, k_w). The column matrix is
//! (C_in·k_h·k_w) × (N·H_out·W_out), row-major, so every GEMM covers the whole batch (the
//! late ResNet stages have 1×1 or 2×2 maps: per-image GEMMs would be matrix-vector
//! products). All reductions have a fixed order, so results are bit-for-bit reproducible
//! for a given thread count.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::model::params::WeightGrads;

/// Convolution geometry, shared by the forward and both backward ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(
        x: (usize, usize, usize, usize),
        k: (usize, usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let (n, c_in, h, w) = x;
        let (c_out, c_k, kh, kw) = k;
        if c_in != c_k {
            candle_core::bail!("conv2d: input has {c_in} channels but the weight expects {c_k}");
        }
        if stride == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride and kernel size must be > 0");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!(
                "conv2d: kernel {kh}×{kw} does not fit input {h}×{w} with padding {padding}"
            );
        }
        Ok(Geom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            ho: (h + 2 * padding - kh) / stride + 1,
            wo: (w + 2 * padding - kw) / stride + 1,
        })
    }

    /// The geometry of an op whose first two operands are the input and the weight.
    fn of(x: &Layout, w: &Layout, stride: usize, padding: usize) -> candle_core::Result<Self> {
        Self::new(x.shape().dims4()?, w.shape().dims4()?, stride, padding)
    }

    /// Rows of the column matrix: C_in·k_h·k_w.
    fn ckk(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output pixels per image.
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }

    /// Columns of the column matrix: N·H_out·W_out.
    fn cols(&self) -> usize {
        self.n * self.hw_out()
    }

    /// Row stride of the column matrix: `cols`, plus 16 when it is a multiple of 64. The GEMMs
    /// read column rows unpacked, and with a power-of-two stride (4,096 floats = 16 KiB at
    /// ResNet-18's first stage on 32 px images) those reads all fell into the same cache
    /// sets: that forward GEMM took 6.2 ms, and 2.7 ms with the padded stride.
    fn col_stride(&self) -> usize {
        let cols = self.cols();
        if cols.is_multiple_of(64) {
            cols + 16
        } else {
            cols
        }
    }

    /// For kernel offset `k` along an axis of input size `size`, the output positions
    /// `[lo, hi)` whose input coordinate `o·stride + k − padding` lies inside the input.
    fn valid_range(&self, k: usize, size: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // o·s + k ≥ p  ⇔  o ≥ ceil((p − k) / s)
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
        // o·s + k − p ≤ size − 1  ⇔  o ≤ (size − 1 + p − k) / s
        let hi = if size + p > k {
            ((size - 1 + p - k) / s + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// A GEMM operand: element (r, c) is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
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
struct Dims {
    m: usize,
    n: usize,
    k: usize,
}

/// `dst` (m × n, row-major, contiguous) = A·B, or dst + A·B when `accumulate`.
fn gemm_f32(d: Dims, dst: &mut [f32], a: Mat, b: Mat, accumulate: bool) -> candle_core::Result<()> {
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
fn gemm_write_split_k(
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
fn gemm_new(d: Dims, a: Mat, b: Mat) -> candle_core::Result<Vec<f32>> {
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

/// Output rows at most this wide are gathered through a per-tap index table instead of
/// copied row by row: on the small maps of late ResNet stages a row copy moves 1–8 values and
/// its per-call overhead dominated im2col and col2im.
const GATHER_MAX_WIDTH: usize = 8;

/// For kernel tap (ky, kx): the index within an input plane that each output pixel reads, or
/// `usize::MAX` where it reads padding.
fn tap_table(g: &Geom, ky: usize, kx: usize) -> Vec<usize> {
    let mut t = vec![usize::MAX; g.hw_out()];
    let (oy_lo, oy_hi) = g.valid_range(ky, g.h, g.ho);
    let (ox_lo, ox_hi) = g.valid_range(kx, g.w, g.wo);
    for oy in oy_lo..oy_hi {
        let iy = oy * g.stride + ky - g.padding;
        for ox in ox_lo..ox_hi {
            t[oy * g.wo + ox] = iy * g.w + ox * g.stride + kx - g.padding;
        }
    }
    t
}

fn tap_tables(g: &Geom) -> Vec<Vec<usize>> {
    (0..g.kh * g.kw)
        .map(|t| tap_table(g, t / g.kw, t % g.kw))
        .collect()
}

/// True for a stride-1 conv whose output has the input's size ("same" padding, e.g. 3×3
/// pad 1). For kernel tap (ky, kx) its column row is then the input plane shifted by one
/// constant offset, with the padded border zeroed: one contiguous copy per plane.
fn is_same_shift(g: &Geom) -> bool {
    g.stride == 1 && (g.ho, g.wo) == (g.h, g.w) && g.padding < g.h && g.padding < g.w
}

/// A column matrix for `g` whose row r's first `cols` values `fill(r, row)` writes, rows
/// [`Geom::col_stride`] apart with the padding zeroed, without zero-filling it first.
///
/// # Safety
/// `fill` must write every element of the row it is given.
unsafe fn column_matrix(
    g: &Geom,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let (cols, ld) = (g.cols(), g.col_stride());
    // SAFETY: each row's first `cols` values are written by `fill` (the caller's contract),
    // the rest is zeroed.
    unsafe {
        super::cpu::vec_written_by(g.ckk() * ld, |col| {
            col.par_chunks_mut(ld).enumerate().for_each(|(r, row)| {
                let (row, pad) = row.split_at_mut(cols);
                super::cpu::write_zeros(pad);
                fill(r, row);
            })
        })
    }
}

/// Column matrix of `x` (N, C, H, W): row (c, ky, kx), column (n, oy, ox), zero padding.
fn im2col(g: &Geom, x: &[f32]) -> Vec<f32> {
    let (hw, hwo, ld) = (g.h * g.w, g.hw_out(), g.col_stride());
    let taps = g.kh * g.kw;
    let zero = super::cpu::write_zeros;
    if is_same_shift(g) {
        let shifts = shift_taps(g);
        // SAFETY: every row is written whole: zeros outside [lo, hi), the shifted plane or
        // zero (padding) inside.
        return unsafe {
            column_matrix(g, |r, row| {
                let (c, t) = (r / taps, &shifts[r % taps]);
                for (b, out) in row.chunks_exact_mut(hw).enumerate() {
                    let plane = &x[(b * g.c_in + c) * hw..(b * g.c_in + c + 1) * hw];
                    let (lo, hi) = (t.lo, t.hi.max(t.lo));
                    let (head, rest) = out.split_at_mut(lo);
                    let (body, tail) = rest.split_at_mut(hi - lo);
                    zero(head);
                    zero(tail);
                    let src = &plane[t.src_lo..t.src_lo + (hi - lo)];
                    for ((d, &v), &ok) in body.iter_mut().zip(src).zip(&t.valid[lo..hi]) {
                        d.write(if ok { v } else { 0.0 });
                    }
                }
            })
        };
    }
    if g.wo <= GATHER_MAX_WIDTH {
        let tables = tap_tables(g);
        // SAFETY: the gather writes every element of every row (padding reads as 0).
        return unsafe {
            column_matrix(g, |r, row| {
                let (c, table) = (r / taps, &tables[r % taps]);
                for (b, out) in row.chunks_exact_mut(hwo).enumerate() {
                    let plane = &x[(b * g.c_in + c) * hw..(b * g.c_in + c + 1) * hw];
                    for (d, &i) in out.iter_mut().zip(table) {
                        d.write(plane.get(i).copied().unwrap_or(0.0));
                    }
                }
            })
        };
    }
    let mut col = vec![0f32; g.ckk() * ld];
    col.par_chunks_mut(ld).enumerate().for_each(|(r, row)| {
        let kx = r % g.kw;
        let ky = (r / g.kw) % g.kh;
        let c = r / (g.kw * g.kh);
        let (oy_lo, oy_hi) = g.valid_range(ky, g.h, g.ho);
        let (ox_lo, ox_hi) = g.valid_range(kx, g.w, g.wo);
        if ox_lo >= ox_hi {
            return; // this kernel column only ever sees padding
        }
        for b in 0..g.n {
            let plane = &x[(b * g.c_in + c) * hw..(b * g.c_in + c + 1) * hw];
            let out = &mut row[b * hwo..(b + 1) * hwo];
            for oy in oy_lo..oy_hi {
                let iy = oy * g.stride + ky - g.padding;
                let src = &plane[iy * g.w..(iy + 1) * g.w];
                let dst = &mut out[oy * g.wo..(oy + 1) * g.wo];
                let ix0 = ox_lo * g.stride + kx - g.padding;
                if g.stride == 1 {
                    dst[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
                } else {
                    for (i, d) in dst[ox_lo..ox_hi].iter_mut().enumerate() {
                        *d = src[ix0 + i * g.stride];
                    }
                }
            }
        }
    });
    col
}

/// Kernel tap (ky, kx) of an [`is_same_shift`] conv: output pixel j reads input pixel
/// j + src_lo − lo for every j in [lo, hi) (all inside the plane); `valid[j]` is false
/// where that read wrapped around a row end (the tap reads padding there). Outside
/// [lo, hi) the tap reads padding only.
struct ShiftTap {
    lo: usize,
    hi: usize,
    src_lo: usize,
    valid: Vec<bool>,
}

fn shift_taps(g: &Geom) -> Vec<ShiftTap> {
    (0..g.kh * g.kw)
        .map(|t| {
            let (ky, kx) = (t / g.kw, t % g.kw);
            let (oy_lo, oy_hi) = g.valid_range(ky, g.h, g.ho);
            let (ox_lo, ox_hi) = g.valid_range(kx, g.w, g.wo);
            let valid = tap_table(g, ky, kx)
                .into_iter()
                .map(|i| i != usize::MAX)
                .collect();
            if oy_lo >= oy_hi || ox_lo >= ox_hi {
                return ShiftTap {
                    lo: 0,
                    hi: 0,
                    src_lo: 0,
                    valid,
                };
            }
            let (lo, hi) = (oy_lo * g.w + ox_lo, (oy_hi - 1) * g.w + ox_hi);
            ShiftTap {
                lo,
                hi,
                // (oy + ky − p)·w + (ox + kx − p) for j = oy·w + ox = lo: both terms ≥ 0
                src_lo: lo + ky * g.w + kx - g.padding * (g.w + 1),
                valid,
            }
        })
        .collect()
}

/// Adjoint of [`im2col`]: sums the column matrix into `x`, an (N, C, H, W) gradient that
/// must hold zeros. One task per (n, c) plane, so every sum has a fixed order.
fn col2im_into(g: &Geom, col: &[f32], x: &mut [f32]) {
    let (hw, hwo, cols) = (g.h * g.w, g.hw_out(), g.cols());
    let taps = g.kh * g.kw;
    if is_same_shift(g) {
        // One contiguous run per tap, adding 0 where the tap read padding; per pixel the
        // taps are summed in the same order as the other paths.
        let shifts = shift_taps(g);
        x.par_chunks_mut(g.c_in * hw)
            .enumerate()
            .for_each(|(b, img)| {
                for (c, plane) in img.chunks_exact_mut(hw).enumerate() {
                    for (ti, t) in shifts.iter().enumerate() {
                        if t.lo >= t.hi {
                            continue;
                        }
                        let start = (c * taps + ti) * cols + b * hwo;
                        let src = &col[start + t.lo..start + t.hi];
                        let dst = &mut plane[t.src_lo..t.src_lo + (t.hi - t.lo)];
                        for ((d, &v), &ok) in dst.iter_mut().zip(src).zip(&t.valid[t.lo..t.hi]) {
                            *d += if ok { v } else { 0.0 };
                        }
                    }
                }
            });
        return;
    }
    if g.wo <= GATHER_MAX_WIDTH {
        // One task per image (planes are tiny); within a plane the taps are summed in the
        // same order as below, so both paths give the same bits.
        let tables = tap_tables(g);
        x.par_chunks_mut(g.c_in * hw)
            .enumerate()
            .for_each(|(b, img)| {
                for (c, plane) in img.chunks_exact_mut(hw).enumerate() {
                    for (t, table) in tables.iter().enumerate() {
                        let r = c * taps + t;
                        let src = &col[r * cols + b * hwo..r * cols + (b + 1) * hwo];
                        for (&i, &v) in table.iter().zip(src) {
                            if let Some(d) = plane.get_mut(i) {
                                *d += v;
                            }
                        }
                    }
                }
            });
        return;
    }
    x.par_chunks_mut(hw).enumerate().for_each(|(pl, plane)| {
        let (b, c) = (pl / g.c_in, pl % g.c_in);
        for ky in 0..g.kh {
            let (oy_lo, oy_hi) = g.valid_range(ky, g.h, g.ho);
            for kx in 0..g.kw {
                let (ox_lo, ox_hi) = g.valid_range(kx, g.w, g.wo);
                if ox_lo >= ox_hi {
                    continue;
                }
                let r = (c * g.kh + ky) * g.kw + kx;
                let src = &col[r * cols + b * hwo..r * cols + (b + 1) * hwo];
                let ix0 = ox_lo * g.stride + kx;
                for oy in oy_lo..oy_hi {
                    let iy = oy * g.stride + ky - g.padding;
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    let s = &src[oy * g.wo + ox_lo..oy * g.wo + ox_hi];
                    if g.stride == 1 {
                        let d = &mut dst[ix0 - g.padding..ix0 - g.padding + s.len()];
                        for (dv, sv) in d.iter_mut().zip(s) {
                            *dv += sv;
                        }
                    } else {
                        for (i, sv) in s.iter().enumerate() {
                            dst[ix0 - g.padding + i * g.stride] += sv;
                        }
                    }
                }
            }
        }
    });
}

/// (N, C, P) → (C, N·P): the batch-major layout of the GEMMs from/to candle's NCHW, with
/// rows `ld` ≥ n·p apart (the padding is zeroed).
fn nc_to_cn(src: &[f32], n: usize, c: usize, p: usize, ld: usize) -> Vec<f32> {
    // SAFETY: row ci is the n copies of (b, ci)'s p values, all n·p elements written, and
    // the padding up to ld is zeroed.
    unsafe {
        super::cpu::vec_written_by(c * ld, |dst| {
            dst.par_chunks_mut(ld).enumerate().for_each(|(ci, row)| {
                let (row, pad) = row.split_at_mut(n * p);
                super::cpu::write_zeros(pad);
                for (b, out) in row.chunks_exact_mut(p).enumerate() {
                    let plane = &src[(b * c + ci) * p..(b * c + ci + 1) * p];
                    for (d, &v) in out.iter_mut().zip(plane) {
                        d.write(v);
                    }
                }
            })
        })
    }
}

/// (C, N·P) → (N, C, P).
fn cn_to_nc(src: &[f32], n: usize, c: usize, p: usize) -> Vec<f32> {
    // SAFETY: image b is the c copies of (ci, b)'s p values, all c·p elements written.
    unsafe {
        super::cpu::vec_written_by(n * c * p, |dst| {
            dst.par_chunks_mut(c * p).enumerate().for_each(|(b, img)| {
                for (ci, out) in img.chunks_exact_mut(p).enumerate() {
                    let plane = &src[ci * n * p + b * p..ci * n * p + (b + 1) * p];
                    for (d, &v) in out.iter_mut().zip(plane) {
                        d.write(v);
                    }
                }
            })
        })
    }
}

/// (C, N·P) → (N, C, P), into `dst` (n·c·p values).
fn cn_to_nc_into(src: &[f32], n: usize, c: usize, p: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(c * p).enumerate().for_each(|(b, img)| {
        for ci in 0..c {
            img[ci * p..(ci + 1) * p]
                .copy_from_slice(&src[ci * n * p + b * p..ci * n * p + (b + 1) * p]);
        }
    });
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::cpu::contiguous_f32(s, l, "conv2d", what)
}

/// True when the fast path applies: 1×1 kernel, stride 1, no padding (the column matrix
/// is the input itself, re-ordered).
fn is_pointwise(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0
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

/// Column matrix for `g` (rows [`Geom::col_stride`] apart): a plain reorder for pointwise
/// convs, im2col otherwise.
fn columns(g: &Geom, x: &[f32]) -> Vec<f32> {
    if is_pointwise(g) {
        nc_to_cn(x, g.n, g.c_in, g.h * g.w, g.col_stride())
    } else {
        im2col(g, x)
    }
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
