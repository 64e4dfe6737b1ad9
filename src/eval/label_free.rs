//! Label-free quality signals of a set of vectors: what can be measured on a model's
//! embeddings without labels.
//!
//! - [`effective_rank`]: RankMe (Garrido, Balestriero, Najman, LeCun, ICML 2023): the
//!   exponential of the entropy of the normalised singular values of the n × d matrix of
//!   embeddings. A collapsed representation (every image on a few directions) has a low one;
//!   its authors use it to compare runs of one method and call it necessary, not sufficient,
//!   so odcd uses it as a collapse guard, never as a score to maximise.

/// ε added to every normalised singular value, as in the paper (float32 data).
pub const RANKME_EPS: f64 = 1e-7;

/// Rows used at most: the eigen-decomposition costs O(min(n, d)³).
pub const RANKME_MAX_ROWS: usize = 1024;

/// RankMe of the first `min(n, RANKME_MAX_ROWS)` rows of `z` (rows of `d` values, as given:
/// callers centre and normalise them as they publish them). 1.0 for fewer than 2 rows.
pub fn effective_rank(z: &[f32], d: usize) -> f64 {
    let n = (z.len() / d.max(1)).min(RANKME_MAX_ROWS);
    if n < 2 || d == 0 {
        return 1.0;
    }
    let z: Vec<f64> = z[..n * d].iter().map(|&x| f64::from(x)).collect();
    // The singular values of Z are the square roots of the eigenvalues of the smaller Gram
    // matrix, Z·Zᵀ (n × n) or Zᵀ·Z (d × d).
    let (m, gram) = if n <= d {
        (n, gram_rows(&z, n, d))
    } else {
        (d, gram_cols(&z, n, d))
    };
    let g = nalgebra::DMatrix::from_row_slice(m, m, &gram);
    let sigma: Vec<f64> = g
        .symmetric_eigenvalues()
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .collect();
    let total: f64 = sigma.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return 1.0;
    }
    let entropy: f64 = sigma
        .iter()
        .map(|s| {
            let p = s / total + RANKME_EPS;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}

/// Z·Zᵀ of row-major `z` (n × d).
fn gram_rows(z: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    // SAFETY: out is n×n with row stride n; lhs is z (n×d, row stride d); rhs is zᵀ (d×n)
    // read as element (p, j) = z[j*d + p], which is < n*d for p < d, j < n.
    unsafe {
        gemm::gemm(
            n,
            n,
            d,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            z.as_ptr(),
            1,
            d as isize,
            z.as_ptr(),
            d as isize,
            1,
            0.0f64,
            1.0f64,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

/// Zᵀ·Z of row-major `z` (n × d).
fn gram_cols(z: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    // SAFETY: out is d×d with row stride d; lhs is zᵀ (d×n) read as element (i, p) =
    // z[p*d + i]; rhs is z (n×d) with row stride d; every index is < n*d.
    unsafe {
        gemm::gemm(
            d,
            d,
            n,
            out.as_mut_ptr(),
            1,
            d as isize,
            false,
            z.as_ptr(),
            d as isize,
            1,
            z.as_ptr(),
            1,
            d as isize,
            0.0f64,
            1.0f64,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_rank_counts_equal_directions_and_sees_collapse() {
        // 4 rows on 4 orthogonal axes (equal singular values): rank 4, from either Gram side.
        let mut z = vec![0f32; 16];
        for i in 0..4 {
            z[i * 4 + i] = 1.0;
        }
        assert!((effective_rank(&z, 4) - 4.0).abs() < 1e-3);
        let wide: Vec<f32> = (0..4)
            .flat_map(|i| {
                let mut r = vec![0f32; 8];
                r[i] = 2.0;
                r
            })
            .collect();
        assert!((effective_rank(&wide, 8) - 4.0).abs() < 1e-3);
        // Every row the same: one direction.
        let same = vec![0.5f32; 40];
        assert!((effective_rank(&same, 4) - 1.0).abs() < 1e-3);
        // Two directions with unequal weight: between 1 and 2.
        let two = [1.0f32, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5];
        let r = effective_rank(&two, 2);
        assert!(r > 1.0 && r < 2.0, "{r}");
        assert_eq!(effective_rank(&[1.0, 2.0], 2), 1.0);
    }
}
