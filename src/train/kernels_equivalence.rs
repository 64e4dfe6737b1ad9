//! The generic training path (candle ops with a backward on every device, what a GPU runs)
//! against odcd's CPU kernels: full training steps (forward in train mode, ODC weighted
//! cross-entropy, backward, momentum SGD with parameter groups) of the same network from the
//! same initial parameters on the same inputs, both ways, on CPU.
//!
//! Tolerances. The two paths compute the same functions in different f32 summation orders
//! (im2col + GEMM blocks against candle's direct conv and `conv_transpose2d`; f64 against
//! f32 BatchNorm sums), so they differ by rounding: ~1e-7 relative per reduction, compounded
//! through ~20–50 layers forward and back. Each tensor is compared as ‖a − b‖ / ‖b‖ (with a
//! floor on ‖b‖ for gradients that are zero in exact arithmetic: the neck's fc0 bias, whose
//! gradient the affine-free BatchNorm after it cancels, is ~1e-8 of noise in both paths).
//! Measured here: at most ~1e-3 for gradients and updates, ~1e-7 for the loss. The
//! tolerances leave a margin of ~10× for other machines (another thread count changes the
//! CPU kernels' summation order) and for a ReLU whose pre-activation lies within rounding of
//! 0 flipping in one path only: such a flip moved one tensor by 0.5% in a measurement. A
//! wrong formula, a missing gradient term or a gradient routed to the wrong element moves
//! whole tensors by 10–100%.
//!
//! Where the paths differ in rule rather than rounding, nothing reaches a parameter: the
//! generic max-pool splits the gradient of tied inputs, the CPU kernel gives it to the
//! first; both ReLU rules drop the gradient at 0. Behind a ReLU the only ties are its exact
//! zeros, whose pre-activations are negative, so neither choice sends gradient upstream.
//!
//! Conditioning. The residual branches' last BatchNorm weights start at 0.2 instead of 1 in
//! both copies (torchvision's `zero_init_residual`, less strongly). With 1, a freshly
//! initialised ResNet-50 on 32 px batches of 4 is chaotic in f32: scaling its input by
//! 1 + 1e-6 moved its gradients by up to 70% in either path (0.3–3% for ResNet-18), so no two
//! f32 implementations could be compared there. With 0.2 the same perturbation moves them by
//! less than 1e-3.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::device::Kernels;
use crate::model::{Arch, ModelConfig, OdcModel};
use crate::odc::{class_weights, weighted_cross_entropy_tensor};
use crate::optim::{ParamGroup, Sgd, SgdConfig};

/// Loss: |Δ| / max(|loss|, 1).
const LOSS_TOL: f64 = 1e-5;
/// Gradients, and parameter updates (parameter after SGD − parameter before): ‖Δ‖ / ‖b‖.
const TOL: f64 = 1e-2;
/// Floor of ‖b‖ for gradients (real ones are ≥ 1e-3 here); updates use lr × this.
const GRAD_FLOOR: f64 = 1e-4;
/// BatchNorm running statistics (forward only: rounding stays ~1e-6).
const STATS_TOL: f64 = 1e-3;
/// Initial weight of each residual branch's last BatchNorm (see the module comment).
const RESIDUAL_BN_WEIGHT: f64 = 0.2;
const LR: f64 = 0.05;
const K: usize = 10;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Run {
    model: OdcModel,
    opt: Sgd,
}

fn run(cfg: &ModelConfig, kernels: Kernels) -> Result<Run> {
    let model = OdcModel::new(cfg, K, &Device::Cpu, 3)?;
    model.set_kernels(kernels);
    let last_bn = match cfg.arch {
        Arch::Resnet18 => "bn2.weight",
        Arch::Resnet50 => "bn3.weight",
    };
    for (name, v) in model.params().params() {
        if name.starts_with("backbone.layer") && name.ends_with(last_bn) {
            v.set(&(v.as_tensor() * RESIDUAL_BN_WEIGHT)?)?;
        }
    }
    // the reference's head group (momentum 0) plus a neck group with its own lr and decay
    let mut groups = SgdConfig::default().groups;
    groups.push(ParamGroup {
        prefix: "neck.".into(),
        momentum: Some(0.5),
        weight_decay: Some(1e-4),
        lr_mult: Some(0.5),
    });
    let sgd = SgdConfig {
        lr: LR,
        groups,
        ..SgdConfig::default()
    };
    let mut opt = Sgd::new(sgd, model.params().params())?;
    opt.set_kernels(kernels);
    Ok(Run { model, opt })
}

/// ‖a − b‖ / max(‖b‖, floor), in f64.
fn rel_err(a: &Tensor, b: &Tensor, floor: f64) -> Result<f64> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len(), "tensor sizes");
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    Ok(diff.sqrt() / norm.sqrt().max(floor))
}

/// Largest errors of one comparison: loss, gradients, parameter updates.
#[derive(Debug, Default)]
struct Worst {
    loss: f64,
    grad: (f64, String),
    update: (f64, String),
}

fn keep_worst(w: &mut (f64, String), e: f64, name: &str) {
    if e > w.0 {
        *w = (e, name.to_string());
    }
}

fn values(t: &Tensor) -> Result<Tensor> {
    Ok(t.detach().copy()?)
}

/// Two training steps both ways (the second one with momentum); asserts the loss, every
/// parameter's gradient, every parameter's update and every running statistic.
fn compare(cfg: &ModelConfig, batch: usize, size: usize) -> Result<Worst> {
    let cpu = run(cfg, Kernels::Auto)?;
    let generic = run(cfg, Kernels::Generic)?;
    assert_eq!(cpu.model.kernels(), Kernels::Auto);
    assert_eq!(generic.model.kernels(), Kernels::Generic);
    let mut runs = [cpu, generic];
    let names: Vec<String> = runs[0].model.params().params().keys().cloned().collect();
    let param = |r: &Run, name: &str| -> Result<Tensor> {
        Ok(r.model.params().param(name)?.as_tensor().clone())
    };
    for name in &names {
        let (a, b) = (param(&runs[0], name)?, param(&runs[1], name)?);
        let (a, b) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(a, b, "{name}: same seed, same initial values");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let normal = Normal::new(0f32, 1f32)?;
    let c = cfg.in_channels;
    // cluster sizes far apart: the class weights differ by an order of magnitude
    let w = class_weights(&[40, 3, 9, 1, 25, 7, 12, 2, 30, 5], 1e-5, 0.5);
    let w = Tensor::from_vec(w, K, &Device::Cpu)?;
    let mut worst = Worst::default();
    for step in 0..2u64 {
        let xs: Vec<f32> = (0..batch * c * size * size)
            .map(|_| normal.sample(&mut rng))
            .collect();
        let x = Tensor::from_vec(xs, (batch, c, size, size), &Device::Cpu)?;
        let labels: Vec<u32> = (0..batch as u32)
            .map(|i| (i * 3 + step as u32) % 10)
            .collect();
        let y = Tensor::from_vec(labels, batch, &Device::Cpu)?;
        let mut losses = Vec::new();
        let mut grads = Vec::new();
        for r in &runs {
            let out = r.model.forward_train(&x, 100 + step)?;
            let loss = weighted_cross_entropy_tensor(&out.logits, &y, &w)?;
            losses.push(loss.to_scalar::<f32>()? as f64);
            grads.push(r.model.backward(&loss)?);
        }
        let dl = (losses[0] - losses[1]).abs() / losses[0].abs().max(1.0);
        assert!(
            losses[0].is_finite() && dl <= LOSS_TOL,
            "step {step}: loss {} (CPU kernels) vs {} (generic)",
            losses[0],
            losses[1]
        );
        worst.loss = worst.loss.max(dl);
        for name in &names {
            let ga = grads[0].get(&param(&runs[0], name)?).cloned();
            let gb = grads[1].get(&param(&runs[1], name)?).cloned();
            let (Some(ga), Some(gb)) = (&ga, &gb) else {
                panic!(
                    "step {step}: `{name}` has a gradient on the CPU kernels: {}, generic: {}",
                    ga.is_some(),
                    gb.is_some()
                );
            };
            let e = rel_err(gb, ga, GRAD_FLOOR)?;
            assert!(
                e <= TOL,
                "step {step}: gradient of `{name}` differs by {e:.2e}"
            );
            keep_worst(&mut worst.grad, e, name);
        }
        let before: Vec<[Tensor; 2]> = names
            .iter()
            .map(|n| Ok([values(&param(&runs[0], n)?)?, values(&param(&runs[1], n)?)?]))
            .collect::<Result<_>>()?;
        for (r, g) in runs.iter_mut().zip(&grads) {
            r.opt.step(g, step)?;
        }
        for (name, [a0, b0]) in names.iter().zip(&before) {
            let da = (param(&runs[0], name)? - a0)?;
            let db = (param(&runs[1], name)? - b0)?;
            let e = rel_err(&db, &da, GRAD_FLOOR * LR)?;
            assert!(
                e <= TOL,
                "step {step}: SGD update of `{name}` differs by {e:.2e}"
            );
            keep_worst(&mut worst.update, e, name);
        }
        let stats: BTreeMap<_, _> = runs[1].model.params().buffers().clone();
        for (name, buf) in runs[0].model.params().buffers() {
            let Some(other) = stats.get(name).map(|b| b.get()) else {
                panic!("running statistic `{name}` missing on the generic path");
            };
            let e = rel_err(&other, &buf.get(), 1e-6)?;
            assert!(
                e <= STATS_TOL,
                "step {step}: running statistic `{name}` differs by {e:.2e}"
            );
        }
        // The next step starts both ways from the same parameters (each optimizer keeps its
        // own velocity). Left apart, their ~1e-6 differences would make a ReLU output that
        // is within rounding of 0, and the max-pool window it wins or loses, differ between
        // the copies: one stem gradient moved by 7% that way.
        for name in &names {
            let src = param(&runs[0], name)?;
            runs[1].model.params().param(name)?.set(&src)?;
        }
    }
    Ok(worst)
}

fn cfg(arch: Arch, in_channels: usize, small_stem: bool) -> ModelConfig {
    ModelConfig {
        arch,
        in_channels,
        small_stem,
        neck_hidden: 64,
        feat_dim: 32,
        ..ModelConfig::default()
    }
}

#[test]
fn resnet18_standard_stem_steps_match_both_ways() -> Result<()> {
    // 7×7/2 conv, the padded 3×3/2 max-pool, 1×1 maps in the last stage
    let worst = compare(&cfg(Arch::Resnet18, 3, false), 8, 32)?;
    eprintln!("resnet18 standard stem: {worst:?}");
    Ok(())
}

#[test]
fn resnet18_small_stem_steps_match_both_ways() -> Result<()> {
    let worst = compare(&cfg(Arch::Resnet18, 1, true), 8, 28)?;
    eprintln!("resnet18 small stem: {worst:?}");
    Ok(())
}

#[test]
fn resnet50_steps_match_both_ways() -> Result<()> {
    let worst = compare(&cfg(Arch::Resnet50, 3, false), 4, 32)?;
    eprintln!("resnet50 standard stem: {worst:?}");
    Ok(())
}
