//! The convolution geometry ([`Geom`]) and the column matrix: im2col, its adjoint col2im,
//! and the (N, C, P) ↔ (C, N·P) re-layouts between candle's NCHW and the batch-wide GEMMs.
//! The column matrix is (C_in·k_h·k_w) × (N·H_out·W_out), row-major, rows
//! [`Geom::col_stride`] apart; every sum runs in a fixed order.

use std::mem::MaybeUninit;

use candle_core::Layout;
use rayon::prelude::*;

/// Convolution geometry, shared by the forward and both backward ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c_in: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c_out: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
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
    pub(super) fn of(
        x: &Layout,
        w: &Layout,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        Self::new(x.shape().dims4()?, w.shape().dims4()?, stride, padding)
    }

    /// Rows of the column matrix: C_in·k_h·k_w.
    pub(super) fn ckk(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output pixels per image.
    pub(super) fn hw_out(&self) -> usize {
        self.ho * self.wo
    }

    /// Columns of the column matrix: N·H_out·W_out.
    pub(super) fn cols(&self) -> usize {
        self.n * self.hw_out()
    }

    /// Row stride of the column matrix: `cols`, plus 16 when it is a multiple of 64. The GEMMs
    /// read column rows unpacked, and with a power-of-two stride (4,096 floats = 16 KiB at
    /// ResNet-18's first stage on 32 px images) those reads all fell into the same cache
    /// sets: that forward GEMM took 6.2 ms, and 2.7 ms with the padded stride.
    pub(super) fn col_stride(&self) -> usize {
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
pub(super) fn col2im_into(g: &Geom, col: &[f32], x: &mut [f32]) {
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
pub(super) fn nc_to_cn(src: &[f32], n: usize, c: usize, p: usize, ld: usize) -> Vec<f32> {
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
pub(super) fn cn_to_nc(src: &[f32], n: usize, c: usize, p: usize) -> Vec<f32> {
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
pub(super) fn cn_to_nc_into(src: &[f32], n: usize, c: usize, p: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(c * p).enumerate().for_each(|(b, img)| {
        for ci in 0..c {
            img[ci * p..(ci + 1) * p]
                .copy_from_slice(&src[ci * n * p + b * p..ci * n * p + (b + 1) * p]);
        }
    });
}

/// True when the fast path applies: 1×1 kernel, stride 1, no padding (the column matrix
/// is the input itself, re-ordered).
pub(super) fn is_pointwise(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0
}

/// Column matrix for `g` (rows [`Geom::col_stride`] apart): a plain reorder for pointwise
/// convs, im2col otherwise.
pub(super) fn columns(g: &Geom, x: &[f32]) -> Vec<f32> {
    if is_pointwise(g) {
        nc_to_cn(x, g.n, g.c_in, g.h * g.w, g.col_stride())
    } else {
        im2col(g, x)
    }
}
