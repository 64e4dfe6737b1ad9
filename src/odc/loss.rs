//! ODC class re-weighting and its weighted-mean cross-entropy.
//!
//! `weighted_cross_entropy` is the f64 reference (conformance vector 04);
//! `weighted_cross_entropy_tensor` is the differentiable candle form the trainer uses.

use super::{OdcError, Result};
use candle_core::{DType, Tensor, D};

/// `u_c = (n_c + eps)^(−power)`, `w_c = u_c / Σ u`, computed in f64 and stored as f32.
/// O(k) from cluster sizes.
pub fn class_weights(sizes: &[usize], eps: f64, power: f64) -> Vec<f32> {
    let u: Vec<f64> = sizes
        .iter()
        .map(|&n| (n as f64 + eps).powf(-power))
        .collect();
    let total: f64 = u.iter().sum();
    u.iter().map(|&x| (x / total) as f32).collect()
}

/// Weighted cross-entropy in f64 from f32 inputs: `CE_i = logsumexp(z_i) − z_i[y_i]`,
/// `loss = Σ w[y_i]·CE_i / Σ w[y_i]` (PyTorch `CrossEntropyLoss(weight=w)`).
/// `logits` is B × k row-major with k = `weights.len()`. Returns (per-sample CE, loss).
pub fn weighted_cross_entropy(
    logits: &[f32],
    targets: &[u32],
    weights: &[f32],
) -> Result<(Vec<f64>, f64)> {
    let k = weights.len();
    if k == 0 || logits.len() != targets.len() * k {
        return Err(OdcError::LengthMismatch {
            what: "logits (B × k)",
            expected: targets.len() * k,
            got: logits.len(),
        });
    }
    if let Some(row) = logits
        .chunks(k)
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(OdcError::NonFinite {
            what: "logits",
            row,
        });
    }
    let mut ce = Vec::with_capacity(targets.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (z, &y) in logits.chunks(k).zip(targets) {
        if y as usize >= k {
            return Err(OdcError::LabelOutOfRange {
                what: "targets",
                label: y,
                k,
            });
        }
        let top = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = top + z.iter().map(|&v| (v as f64 - top).exp()).sum::<f64>().ln();
        let c = lse - z[y as usize] as f64;
        let w = weights[y as usize] as f64;
        num += w * c;
        den += w;
        ce.push(c);
    }
    if den <= 0.0 {
        return Err(OdcError::InvalidParameter(
            "weighted_cross_entropy: the weights of the targets sum to zero".into(),
        ));
    }
    Ok((ce, num / den))
}

/// Differentiable weighted-mean cross-entropy: `Σ w[y]·CE / Σ w[y]`.
/// `logits`: (B, k) float; `targets`: (B,) u32; `weights`: (k,) f32. Computed in the logits'
/// dtype; the max used for a stable logsumexp is detached (its gradient cancels anyway).
pub fn weighted_cross_entropy_tensor(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, _k) = logits.dims2()?;
    let targets = targets.to_dtype(DType::U32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?
        .squeeze(D::Minus1)?;
    let picked = logits
        .gather(&targets.reshape((b, 1))?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let ce = (lse - picked)?;
    let w = weights
        .to_dtype(logits.dtype())?
        .index_select(&targets, 0)?;
    (ce * &w)?.sum_all()? / w.sum_all()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use serde_json::Value;

    fn vector04() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/conformance/odc/vectors/04_reweight_ce.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|x| match x.as_array() {
                Some(row) => row.iter().map(|y| y.as_f64().unwrap() as f32).collect(),
                None => vec![x.as_f64().unwrap() as f32],
            })
            .collect()
    }

    #[test]
    fn tensor_loss_matches_f64_reference_on_vector_04() {
        let v = vector04();
        let k = v["params"]["k"].as_u64().unwrap() as usize;
        let labels: Vec<usize> = v["input"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let mut sizes = vec![0usize; k];
        for l in labels {
            sizes[l] += 1;
        }
        let w = class_weights(&sizes, 1e-5, 0.5);
        let logits = f32s(&v["input"]["logits"]);
        let targets: Vec<u32> = f32s(&v["input"]["targets"])
            .iter()
            .map(|&t| t as u32)
            .collect();
        let (_, loss64) = weighted_cross_entropy(&logits, &targets, &w).unwrap();
        let expected = v["expected"]["loss"].as_f64().unwrap();
        assert!((loss64 - expected).abs() < 1e-5, "{loss64} vs {expected}");

        let dev = Device::Cpu;
        let b = targets.len();
        let lt = Var::from_vec(logits.clone(), (b, k), &dev).unwrap();
        let tt = Tensor::from_vec(targets.clone(), b, &dev).unwrap();
        let wt = Tensor::from_vec(w.clone(), k, &dev).unwrap();
        let loss = weighted_cross_entropy_tensor(lt.as_tensor(), &tt, &wt).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - loss64).abs() < 1e-5, "tensor {got} vs f64 {loss64}");

        // gradient: d loss / d z_ij = w_yi (softmax_ij − [j = y_i]) / Σ w
        let grads = loss.backward().unwrap();
        let g = grads.get(lt.as_tensor()).unwrap().flatten_all().unwrap();
        let g: Vec<f32> = g.to_vec1().unwrap();
        let den: f64 = targets.iter().map(|&t| w[t as usize] as f64).sum();
        for (i, (z, &y)) in logits.chunks(k).zip(&targets).enumerate() {
            let top = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let s: f64 = z.iter().map(|&v| (v as f64 - top).exp()).sum();
            for j in 0..k {
                let p = (z[j] as f64 - top).exp() / s;
                let want = w[y as usize] as f64 * (p - f64::from(j == y as usize)) / den;
                assert!((g[i * k + j] as f64 - want).abs() < 1e-5, "grad [{i},{j}]");
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(weighted_cross_entropy(&[0.0; 5], &[0, 1], &[0.5, 0.5]).is_err());
        assert!(weighted_cross_entropy(&[0.0, 1.0], &[2], &[0.5, 0.5]).is_err());
        assert!(weighted_cross_entropy(&[f32::NAN, 1.0], &[0], &[0.5, 0.5]).is_err());
    }

    #[test]
    fn empty_cluster_gets_the_largest_weight() {
        let w = class_weights(&[4, 0, 1], 1e-5, 0.5);
        assert!(w[1] > w[2] && w[2] > w[0]);
        assert!((w.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-6);
    }
}
