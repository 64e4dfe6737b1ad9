//! Deterministic 2-means that splits the largest cluster (conformance README, "Splitting a
//! cluster"). The official code uses scikit-learn's randomised KMeans, which no other language
//! can reproduce; the project fixes this rule instead.
//!
//! Rows are read through an accessor so the memory never copies a (possibly huge) cluster;
//! every distance and centre is computed in f64 from the f32 rows.

use super::{OdcError, Result};
use rayon::prelude::*;

/// Maximum number of assignment rounds.
pub const TWO_MEANS_ROUNDS: u32 = 20;

/// Rows per parallel chunk. Fixed so partial sums are added in the same order on every run,
/// whatever the thread count (bitwise-reproducible splits).
const CHUNK: usize = 1024;

/// Result of one split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoMeansSplit {
    /// `true` for rows that form the second part (they take the emptied cluster id).
    pub part: Vec<bool>,
    /// Whether one side came out empty and the odd-position rule was used.
    pub fallback: bool,
    /// Assignment rounds made, the last (unchanged) one included.
    pub rounds: u32,
    /// Row chosen as centre 1 (farthest from row 0, ties: lowest row).
    pub seed_row: usize,
}

fn sq_dist(row: &[f32], c: &[f64]) -> f64 {
    row.iter()
        .zip(c)
        .map(|(&x, &y)| {
            let t = x as f64 - y;
            t * t
        })
        .sum()
}

/// Mean of the rows where `assign[i] == side`; `None` if there is none.
fn side_mean<'a, F>(n: usize, dim: usize, row: &F, assign: &[bool], side: bool) -> Option<Vec<f64>>
where
    F: Fn(usize) -> &'a [f32] + Sync,
{
    let partial: Vec<(Vec<f64>, usize)> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ch| {
            let mut acc = vec![0f64; dim];
            let mut cnt = 0usize;
            let lo = ch * CHUNK;
            for (i, &a) in assign.iter().enumerate().take((lo + CHUNK).min(n)).skip(lo) {
                if a == side {
                    cnt += 1;
                    for (a, &x) in acc.iter_mut().zip(row(i)) {
                        *a += x as f64;
                    }
                }
            }
            (acc, cnt)
        })
        .collect();
    let mut acc = vec![0f64; dim];
    let mut cnt = 0usize;
    for (p, c) in partial {
        cnt += c;
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    if cnt == 0 {
        return None;
    }
    for a in &mut acc {
        *a /= cnt as f64;
    }
    Some(acc)
}

/// Splits `n` rows of length `dim` (row `i` given by `row(i)`, in ascending sample order).
///
/// 1. centre 0 = row 0, centre 1 = the row farthest from row 0 (ties: lowest row);
/// 2. up to 20 rounds: assign each row to the nearer centre (equal distance → centre 0), stop
///    when nothing changed since the previous round, else move each non-empty side's centre to
///    its mean;
/// 3. if a side is empty, the odd positions 1, 3, 5, … form the second part (fallback).
///
/// `n == 1` gives an empty second part with `fallback = true`; `n == 0` is an error.
pub fn two_means<'a, F>(n: usize, dim: usize, row: F) -> Result<TwoMeansSplit>
where
    F: Fn(usize) -> &'a [f32] + Sync,
{
    if n == 0 {
        return Err(OdcError::InvalidParameter(
            "two_means needs at least one row".into(),
        ));
    }
    let first: Vec<f64> = row(0).iter().map(|&v| v as f64).collect();
    let d_first: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| sq_dist(row(i), &first))
        .collect();
    let mut seed_row = 0usize;
    for (i, &d) in d_first.iter().enumerate() {
        if d > d_first[seed_row] {
            seed_row = i;
        }
    }
    let mut c0 = first;
    let mut c1: Vec<f64> = row(seed_row).iter().map(|&v| v as f64).collect();
    let mut assign: Option<Vec<bool>> = None;
    let mut rounds = 0u32;
    for _ in 0..TWO_MEANS_ROUNDS {
        let new: Vec<bool> = (0..n)
            .into_par_iter()
            .map(|i| {
                let r = row(i);
                sq_dist(r, &c1) < sq_dist(r, &c0)
            })
            .collect();
        rounds += 1;
        if assign.as_ref() == Some(&new) {
            break;
        }
        if let Some(m) = side_mean(n, dim, &row, &new, false) {
            c0 = m;
        }
        if let Some(m) = side_mean(n, dim, &row, &new, true) {
            c1 = m;
        }
        assign = Some(new);
    }
    let mut part = assign.unwrap_or_else(|| vec![false; n]);
    let moved = part.iter().filter(|&&p| p).count();
    let fallback = moved == 0 || moved == n;
    if fallback {
        for (i, p) in part.iter_mut().enumerate() {
            *p = i % 2 == 1;
        }
    }
    Ok(TwoMeansSplit {
        part,
        fallback,
        rounds,
        seed_row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rows: &[Vec<f32>]) -> TwoMeansSplit {
        let d = rows[0].len();
        two_means(rows.len(), d, |i| rows[i].as_slice()).unwrap()
    }

    #[test]
    fn two_groups_are_separated() {
        let rows: Vec<Vec<f32>> = (0..8)
            .map(|i| {
                if i % 3 == 0 {
                    vec![1.0, 0.0]
                } else {
                    vec![0.0, 1.0 + i as f32 * 0.01]
                }
            })
            .collect();
        let s = run(&rows);
        assert!(!s.fallback);
        for (i, &p) in s.part.iter().enumerate() {
            assert_eq!(p, i % 3 != 0, "row {i}");
        }
        assert_eq!(
            s.seed_row, 7,
            "farthest from row 0 is the last of the second group"
        );
    }

    #[test]
    fn identical_rows_use_odd_positions() {
        let rows = vec![vec![0.5f32, 0.5]; 5];
        let s = run(&rows);
        assert!(s.fallback);
        assert_eq!(s.part, vec![false, true, false, true, false]);
        assert_eq!(s.seed_row, 0);
        assert_eq!(s.rounds, 2);
    }

    #[test]
    fn single_row_and_empty_input() {
        let s = run(&[vec![1.0f32, 2.0]]);
        assert!(s.fallback);
        assert_eq!(s.part, vec![false]);
        assert!(two_means(0, 2, |_| &[][..]).is_err());
    }

    #[test]
    fn seed_ties_go_to_lowest_row() {
        let rows = vec![vec![0.0f32, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]];
        assert_eq!(run(&rows).seed_row, 1);
    }
}
