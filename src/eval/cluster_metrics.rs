//! Agreement of cluster labels with true classes (NMI, ARI, purity) and the shape of a
//! clustering (empty clusters, sizes, size entropy).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How well cluster ids agree with the true classes of the same samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Samples compared.
    pub samples: usize,
    /// Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default).
    pub nmi: f64,
    /// Adjusted Rand index.
    pub ari: f64,
    /// Share of samples whose cluster's majority class is their class.
    pub purity: f64,
}

/// Sizes of a clustering with `k` cluster ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    pub k: usize,
    pub samples: usize,
    pub empty: usize,
    /// Smallest and largest size among the non-empty clusters (0 when all are empty).
    pub min_size: usize,
    pub max_size: usize,
    /// Entropy of the size distribution in nats (ln k when perfectly balanced).
    pub size_entropy_nats: f64,
}

/// Cluster sizes for ids in `0..k` (ids ≥ k are counted in `k`'s growth: the vector grows).
pub fn cluster_sizes(pred: &[u32], k: usize) -> Vec<usize> {
    let mut sizes = vec![0usize; k];
    for &p in pred {
        let p = p as usize;
        if p >= sizes.len() {
            sizes.resize(p + 1, 0);
        }
        sizes[p] += 1;
    }
    sizes
}

pub fn cluster_stats(sizes: &[usize]) -> ClusterStats {
    let samples: usize = sizes.iter().sum();
    let nonempty: Vec<usize> = sizes.iter().copied().filter(|&s| s > 0).collect();
    ClusterStats {
        k: sizes.len(),
        samples,
        empty: sizes.len() - nonempty.len(),
        min_size: nonempty.iter().copied().min().unwrap_or(0),
        max_size: nonempty.iter().copied().max().unwrap_or(0),
        size_entropy_nats: entropy(&nonempty, samples),
    }
}

fn entropy(counts: &[usize], total: usize) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let n = total as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

fn comb2(n: usize) -> f64 {
    let n = n as f64;
    n * (n - 1.0) / 2.0
}

/// NMI, ARI and purity of `pred` against `truth` (same length, same sample order).
/// Returns `None` when the slices are empty or differ in length.
pub fn agreement(truth: &[i64], pred: &[u32]) -> Option<Agreement> {
    if truth.is_empty() || truth.len() != pred.len() {
        return None;
    }
    let n = truth.len();
    let mut joint: HashMap<(i64, u32), usize> = HashMap::new();
    let mut by_truth: HashMap<i64, usize> = HashMap::new();
    let mut by_pred: HashMap<u32, usize> = HashMap::new();
    for (&t, &p) in truth.iter().zip(pred) {
        *joint.entry((t, p)).or_default() += 1;
        *by_truth.entry(t).or_default() += 1;
        *by_pred.entry(p).or_default() += 1;
    }
    let nf = n as f64;
    // Mutual information from the contingency table.
    let mut mi = 0.0;
    for (&(t, p), &c) in &joint {
        let pij = c as f64 / nf;
        let pi = by_truth[&t] as f64 / nf;
        let pj = by_pred[&p] as f64 / nf;
        mi += pij * (pij / (pi * pj)).ln();
    }
    let ht = entropy(&by_truth.values().copied().collect::<Vec<_>>(), n);
    let hp = entropy(&by_pred.values().copied().collect::<Vec<_>>(), n);
    // scikit-learn: both labelings constant (one class, one cluster) = perfect agreement.
    let nmi = if ht == 0.0 && hp == 0.0 {
        1.0
    } else {
        let denom = 0.5 * (ht + hp);
        if denom <= 0.0 {
            0.0
        } else {
            (mi / denom).clamp(0.0, 1.0)
        }
    };
    let sum_ij: f64 = joint.values().map(|&c| comb2(c)).sum();
    let sum_i: f64 = by_truth.values().map(|&c| comb2(c)).sum();
    let sum_j: f64 = by_pred.values().map(|&c| comb2(c)).sum();
    let total = comb2(n);
    let expected = if total > 0.0 {
        sum_i * sum_j / total
    } else {
        0.0
    };
    let max_index = 0.5 * (sum_i + sum_j);
    let ari = if (max_index - expected).abs() < f64::EPSILON {
        1.0
    } else {
        (sum_ij - expected) / (max_index - expected)
    };
    let mut majority: HashMap<u32, usize> = HashMap::new();
    for (&(_, p), &c) in &joint {
        let m = majority.entry(p).or_default();
        *m = (*m).max(c);
    }
    let purity = majority.values().sum::<usize>() as f64 / nf;
    Some(Agreement {
        samples: n,
        nmi,
        ari,
        purity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed with scikit-learn 1.x:
    // normalized_mutual_info_score(t, p), adjusted_rand_score(t, p).
    #[test]
    fn nmi_and_ari_match_scikit_learn() {
        let t = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2];
        let p = [1, 1, 0, 0, 2, 2, 2, 2, 3, 3];
        let a = agreement(&t, &p).unwrap();
        assert!((a.nmi - 0.555960101000571).abs() < 1e-12, "{a:?}");
        assert!((a.ari - 0.19753086419753085).abs() < 1e-12, "{a:?}");
        // cluster 0 {0,1} → 1, cluster 1 {0,0} → 2, cluster 2 {1,1,2,2} → 2, cluster 3 {2,2} → 2
        assert!((a.purity - 0.7).abs() < 1e-12, "{a:?}");

        let t = [0, 1, 0, 1, 0, 1, 0, 1];
        let p = [0, 0, 1, 1, 0, 0, 1, 1];
        let a = agreement(&t, &p).unwrap();
        assert!(a.nmi.abs() < 1e-12, "{a:?}");
        assert!((a.ari - (-0.16666666666666666)).abs() < 1e-12, "{a:?}");
        assert!((a.purity - 0.5).abs() < 1e-12);
    }

    #[test]
    fn renamed_clusters_agree_perfectly() {
        let a = agreement(&[0, 0, 1, 1, 2, 2], &[5, 5, 7, 7, 9, 9]).unwrap();
        assert!((a.nmi - 1.0).abs() < 1e-12);
        assert!((a.ari - 1.0).abs() < 1e-12);
        assert!((a.purity - 1.0).abs() < 1e-12);
    }

    #[test]
    fn mismatched_inputs_give_none() {
        assert!(agreement(&[], &[]).is_none());
        assert!(agreement(&[0, 1], &[0]).is_none());
    }

    #[test]
    fn stats_count_empty_and_sizes() {
        let sizes = cluster_sizes(&[0, 0, 0, 2], 4);
        assert_eq!(sizes, vec![3, 0, 1, 0]);
        let s = cluster_stats(&sizes);
        assert_eq!(
            (s.k, s.samples, s.empty, s.min_size, s.max_size),
            (4, 4, 2, 1, 3)
        );
        let h = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((s.size_entropy_nats - h).abs() < 1e-12);
        let balanced = cluster_stats(&[5, 5, 5, 5]);
        assert!((balanced.size_entropy_nats - 4f64.ln()).abs() < 1e-12);
    }
}
