//! Small numeric helpers shared by the memory and the k-means: row normalisation as the
//! reference does it, finiteness checks, and an `A·Bᵀ` product on top of `gemm`.

use super::{OdcError, Result, NORM_EPS};
use rayon::prelude::*;

/// Rows per block when scoring many rows against all centroids: bounds the score buffer
/// (block × K f32) whatever the number of rows.
pub(crate) const SCORE_BLOCK: usize = 512;

/// `||x|| + NORM_EPS`, in f64: the divisor of the reference's normalisation.
fn norm_denominator(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
        + NORM_EPS
}

/// `out = x / (||x|| + 1e-10)`, computed in f64 and rounded to f32 once (the reference's rule).
pub(crate) fn normalise_into(x: &[f32], out: &mut [f32]) {
    let denom = norm_denominator(x);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 / denom) as f32;
    }
}

/// Scales every row of `x` (rows of `d` values) in place to `x / (||x|| + NORM_EPS)`: the one
/// normalisation of features the daemon uses (memory, published embeddings, k-NN). A zero row
/// stays zero.
pub fn normalise_rows(x: &mut [f32], d: usize) {
    if d == 0 {
        return;
    }
    x.par_chunks_mut(d).for_each(|row| {
        let denom = norm_denominator(row);
        row.iter_mut().for_each(|v| *v = (*v as f64 / denom) as f32);
    });
}

/// Rejects NaN/inf rows, which would otherwise silently poison centroids and argmaxes.
pub(crate) fn check_finite(what: &'static str, data: &[f32], dim: usize) -> Result<()> {
    if dim == 0 {
        return Ok(());
    }
    match data
        .par_chunks(dim)
        .position_first(|r| r.iter().any(|v| !v.is_finite()))
    {
        Some(row) => Err(OdcError::NonFinite { what, row }),
        None => Ok(()),
    }
}

/// Checks `data.len() == rows * dim` (and that it is a whole number of rows).
pub(crate) fn check_rows(what: &'static str, data: &[f32], dim: usize) -> Result<usize> {
    if dim == 0 || !data.len().is_multiple_of(dim) {
        return Err(OdcError::LengthMismatch {
            what,
            expected: data.len().div_ceil(dim.max(1)) * dim,
            got: data.len(),
        });
    }
    Ok(data.len() / dim)
}

/// `out (m×n) = a (m×d) · b (n×d)ᵀ`, all row-major f32. `parallel` lets gemm use the rayon
/// pool; callers that already run inside a rayon task pass `false`.
pub(crate) fn matmul_abt(
    a: &[f32],
    m: usize,
    b: &[f32],
    n: usize,
    d: usize,
    out: &mut [f32],
    parallel: bool,
) {
    assert!(a.len() >= m * d && b.len() >= n * d && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if d == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above guarantees every index gemm touches is inside the slices:
    // dst is m×n with row stride n, lhs m×d with row stride d, rhs is bᵀ (d×n) read with
    // row stride 1 and column stride d, i.e. element (p, j) = b[j*d + p] < n*d.
    unsafe {
        gemm::gemm(
            m,
            n,
            d,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            d as isize,
            b.as_ptr(),
            d as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// Index of the largest score (ties: lowest index) among the entries allowed by `mask`;
/// `None` when nothing is allowed.
pub(crate) fn argmax_masked(scores: &[f32], mask: Option<&[bool]>) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (c, &s) in scores.iter().enumerate() {
        if let Some(m) = mask {
            if !m[c] {
                continue;
            }
        }
        // strict `>` keeps the lowest index on ties, as numpy's argmax does
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((c, s));
        }
    }
    best.map(|(c, _)| c as u32)
}

/// For every row of `rows` (r×d), the centroid (k×d) with the largest raw dot product,
/// restricted to `mask` when given. Blocked so the score buffer stays SCORE_BLOCK × k.
pub(crate) fn nearest_by_dot(
    rows: &[f32],
    d: usize,
    centroids: &[f32],
    k: usize,
    mask: Option<&[bool]>,
) -> Vec<Option<u32>> {
    let r = rows.len().checked_div(d).unwrap_or(0);
    let mut out = Vec::with_capacity(r);
    let mut scores = vec![0f32; SCORE_BLOCK.min(r.max(1)) * k];
    for block in rows.chunks(SCORE_BLOCK * d.max(1)) {
        let m = block.len() / d.max(1);
        matmul_abt(block, m, centroids, k, d, &mut scores, true);
        let labels: Vec<Option<u32>> = scores[..m * k]
            .par_chunks(k.max(1))
            .map(|s| argmax_masked(s, mask))
            .collect();
        out.extend(labels);
    }
    out
}
