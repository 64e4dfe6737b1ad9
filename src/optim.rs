//! SGD with momentum and weight decay (PyTorch semantics), per-parameter-group overrides,
//! and learning-rate schedules by step. candle-nn's SGD has no momentum.
//!
//! Update per parameter p with gradient g (PyTorch `torch.optim.SGD`, dampening 0,
//! nesterov off):  g ← g + wd·p;  v ← μ·v + g (v ← g at the first step);  p ← p − lr·v.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid optimizer setting `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("optimizer state has no entry for parameter `{0}`")]
    MissingState(String),
}

fn default_lr() -> f64 {
    0.06
}
fn default_momentum() -> f64 {
    0.9
}
fn default_wd() -> f64 {
    1e-5
}

/// Learning-rate schedule in steps (never epochs: a stream has none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LrSchedule {
    /// lr stays at base_lr.
    Constant,
    /// lr = base_lr · gamma^(number of milestones ≤ step).
    Step { milestones: Vec<u64>, gamma: f64 },
    /// Cosine from base_lr down to min_lr over total_steps, then min_lr.
    Cosine { total_steps: u64, min_lr: f64 },
}

/// A parameter group: parameters whose name starts with `prefix` get these overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamGroup {
    /// Name prefix, e.g. `head.` (the reference gives the head momentum 0).
    pub prefix: String,
    pub momentum: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Multiplies the scheduled learning rate.
    pub lr_mult: Option<f64>,
}

fn default_groups() -> Vec<ParamGroup> {
    vec![ParamGroup {
        prefix: "head.".into(),
        momentum: Some(0.0),
        weight_decay: None,
        lr_mult: None,
    }]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Base learning rate (reference: 0.06 for batch 512).
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_schedule")]
    pub schedule: LrSchedule,
    /// Linear warm-up from 0 over this many steps (0 = none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Per-parameter-group overrides; the first matching prefix wins.
    #[serde(default = "default_groups")]
    pub groups: Vec<ParamGroup>,
}

fn default_schedule() -> LrSchedule {
    LrSchedule::Constant
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: default_lr(),
            momentum: default_momentum(),
            weight_decay: default_wd(),
            schedule: default_schedule(),
            warmup_steps: 0,
            groups: default_groups(),
        }
    }
}

impl SgdConfig {
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |field: &str, msg: &str| OptimError::Config {
            field: field.into(),
            msg: msg.into(),
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("optimizer.lr", "must be a finite number > 0"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad("optimizer.momentum", "must be in [0, 1)"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(bad("optimizer.weight_decay", "must be ≥ 0"));
        }
        match &self.schedule {
            LrSchedule::Step { gamma, .. } if gamma.is_nan() || *gamma <= 0.0 => {
                return Err(bad("optimizer.schedule.gamma", "must be > 0"))
            }
            LrSchedule::Cosine { total_steps: 0, .. } => {
                return Err(bad("optimizer.schedule.total_steps", "must be > 0"))
            }
            _ => {}
        }
        for g in &self.groups {
            if let Some(m) = g.momentum {
                if !(0.0..1.0).contains(&m) {
                    return Err(bad("optimizer.groups.momentum", "must be in [0, 1)"));
                }
            }
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based), before group multipliers.
    pub fn lr_at(&self, step: u64) -> f64 {
        let base = match &self.schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Step { milestones, gamma } => {
                let n = milestones.iter().filter(|&&m| m <= step).count();
                self.lr * gamma.powi(n as i32)
            }
            LrSchedule::Cosine {
                total_steps,
                min_lr,
            } => {
                let t = (step.min(*total_steps)) as f64 / *total_steps as f64;
                min_lr + 0.5 * (self.lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        if self.warmup_steps > 0 && step < self.warmup_steps {
            base * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            base
        }
    }
}

/// The update of one parameter with candle ops (any device).
fn step_generic(slot: &mut Slot, g: &Tensor, lr: f64) -> Result<(), OptimError> {
    let p = slot.var.as_tensor();
    let g = if slot.weight_decay != 0.0 {
        (g + (p * slot.weight_decay)?)?
    } else {
        g.clone()
    };
    let update = if slot.momentum != 0.0 {
        let v = match &slot.velocity {
            Some(v) => ((v * slot.momentum)? + &g)?,
            None => g,
        };
        slot.velocity = Some(v.detach());
        v
    } else {
        g
    };
    let new_p = (p - (update * (lr * slot.lr_mult))?)?;
    slot.var.set(&new_p.detach())?;
    Ok(())
}

/// The same update for contiguous f32 CPU tensors, in place: one pass over (velocity,
/// gradient, parameter) and one over (parameter, velocity), no allocation after the first
/// step. candle's op-by-op form made seven passes and five allocations per parameter.
mod fused {
    use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};
    use rayon::prelude::*;

    use super::{OptimError, Slot};

    const CHUNK: usize = 32 * 1024;

    pub(super) fn applies(p: &Tensor, g: &Tensor, v: Option<&Tensor>) -> bool {
        let ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        ok(p) && ok(g) && p.is_contiguous() && v.is_none_or(|v| ok(v) && v.is_contiguous())
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
            _ => candle_core::bail!("sgd: expected a contiguous f32 tensor"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
            _ => candle_core::bail!("sgd: expected a contiguous f32 tensor"),
        }
    }

    fn same_len(a: usize, b: usize, c: usize) -> candle_core::Result<()> {
        if a != b || a != c {
            candle_core::bail!("sgd: parameter, gradient and velocity sizes differ");
        }
        Ok(())
    }

    /// velocity ← μ·velocity + (g + wd·p)
    struct Momentum {
        mu: f32,
        wd: f32,
    }

    impl InplaceOp3 for Momentum {
        fn name(&self) -> &'static str {
            "odcd-sgd-momentum"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<()> {
            let v = slice_mut(s1, l1)?;
            let (g, p) = (slice(s2, l2)?, slice(s3, l3)?);
            same_len(v.len(), g.len(), p.len())?;
            let (mu, wd) = (self.mu, self.wd);
            v.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(p.par_chunks(CHUNK)))
                .for_each(|(v, (g, p))| {
                    for ((v, &g), &p) in v.iter_mut().zip(g).zip(p) {
                        *v = *v * mu + (g + p * wd);
                    }
                });
            Ok(())
        }
    }

    /// p ← p − lr·(u + wd·p): with wd = 0 and u the velocity this is the momentum step.
    struct Descend {
        lr: f32,
        wd: f32,
    }

    impl InplaceOp2 for Descend {
        fn name(&self) -> &'static str {
            "odcd-sgd-descend"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            let p = slice_mut(s1, l1)?;
            let u = slice(s2, l2)?;
            same_len(p.len(), u.len(), u.len())?;
            let (lr, wd) = (self.lr, self.wd);
            p.par_chunks_mut(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .for_each(|(p, u)| {
                    for (p, &u) in p.iter_mut().zip(u) {
                        *p -= (u + *p * wd) * lr;
                    }
                });
            Ok(())
        }
    }

    pub(super) fn step(slot: &mut Slot, g: &Tensor, lr: f64) -> Result<(), OptimError> {
        let p = slot.var.as_tensor();
        let g = g.contiguous()?;
        let lr = (lr * slot.lr_mult) as f32;
        let wd = slot.weight_decay as f32;
        if slot.momentum == 0.0 {
            p.inplace_op2(&g, &Descend { lr, wd })?;
            return Ok(());
        }
        let v = match &slot.velocity {
            Some(v) => {
                v.inplace_op3(
                    &g,
                    p,
                    &Momentum {
                        mu: slot.momentum as f32,
                        wd,
                    },
                )?;
                v.clone()
            }
            // first step: v = g + wd·p, in a buffer of its own (never the gradient's)
            None => {
                let v = g.zeros_like()?;
                v.inplace_op3(&g, p, &Momentum { mu: 0.0, wd })?;
                slot.velocity = Some(v.clone());
                v
            }
        };
        p.inplace_op2(&v, &Descend { lr, wd: 0.0 })?;
        Ok(())
    }
}

struct Slot {
    var: Var,
    momentum: f64,
    weight_decay: f64,
    lr_mult: f64,
    velocity: Option<Tensor>,
}

pub struct Sgd {
    cfg: SgdConfig,
    slots: BTreeMap<String, Slot>,
}

impl Sgd {
    pub fn new(cfg: SgdConfig, params: &BTreeMap<String, Var>) -> Result<Self, OptimError> {
        cfg.validate()?;
        let mut slots = BTreeMap::new();
        for (name, var) in params {
            let group = cfg.groups.iter().find(|g| name.starts_with(&g.prefix));
            slots.insert(
                name.clone(),
                Slot {
                    var: var.clone(),
                    momentum: group.and_then(|g| g.momentum).unwrap_or(cfg.momentum),
                    weight_decay: group
                        .and_then(|g| g.weight_decay)
                        .unwrap_or(cfg.weight_decay),
                    lr_mult: group.and_then(|g| g.lr_mult).unwrap_or(1.0),
                    velocity: None,
                },
            );
        }
        Ok(Sgd { cfg, slots })
    }

    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// One update with the learning rate of `step`. Parameters without a gradient are left
    /// alone (as PyTorch does for `grad is None`). Returns the base lr used.
    pub fn step(&mut self, grads: &GradStore, step: u64) -> Result<f64, OptimError> {
        let lr = self.cfg.lr_at(step);
        for slot in self.slots.values_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let p = slot.var.as_tensor();
            if fused::applies(p, g, slot.velocity.as_ref()) {
                fused::step(slot, g, lr)?;
            } else {
                step_generic(slot, g, lr)?;
            }
        }
        Ok(lr)
    }

    /// Momentum buffers by parameter name (for checkpoints); absent before the first step.
    /// Copies: the buffers are updated in place by later steps.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>, OptimError> {
        let mut out = BTreeMap::new();
        for (k, s) in &self.slots {
            if let Some(v) = &s.velocity {
                out.insert(format!("velocity.{k}"), v.copy()?);
            }
        }
        Ok(out)
    }

    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<(), OptimError> {
        for (name, slot) in self.slots.iter_mut() {
            if let Some(v) = state.get(&format!("velocity.{name}")) {
                if v.dims() != slot.var.dims() {
                    return Err(OptimError::Config {
                        field: format!("velocity.{name}"),
                        msg: format!(
                            "shape {:?} does not match the parameter {:?}",
                            v.dims(),
                            slot.var.dims()
                        ),
                    });
                }
                // a buffer of our own: later steps update it in place
                slot.velocity = Some(v.to_device(slot.var.device())?.contiguous()?.copy()?);
            } else {
                slot.velocity = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computed_pytorch_sequence() -> Result<(), OptimError> {
        // loss = sum(p * c): gradient c, constant.  p0 = 1, c = 0.5, lr 0.1, μ 0.9, wd 0.01.
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f32], &dev)?)?;
        let h = Var::from_tensor(&Tensor::new(&[1.0f32], &dev)?)?;
        let mut params = BTreeMap::new();
        params.insert("backbone.w".to_string(), p.clone());
        params.insert("head.w".to_string(), h.clone());
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            ..SgdConfig::default()
        };
        let mut opt = Sgd::new(cfg, &params)?;
        let c = Tensor::new(&[0.5f32], &dev)?;
        // hand computation
        let (mut pe, mut v, mut he) = (1.0f64, 0.0f64, 1.0f64);
        for step in 0..4u64 {
            let loss = ((p.as_tensor() * &c)?.sum_all()? + (h.as_tensor() * &c)?.sum_all()?)?;
            let grads = loss.backward()?;
            opt.step(&grads, step)?;
            let g = 0.5 + 0.01 * pe;
            v = if step == 0 { g } else { 0.9 * v + g };
            pe -= 0.1 * v;
            he -= 0.1 * (0.5 + 0.01 * he); // head: momentum 0
            let got = p.as_tensor().to_vec1::<f32>()?[0] as f64;
            let goth = h.as_tensor().to_vec1::<f32>()?[0] as f64;
            assert!((got - pe).abs() < 1e-6, "step {step}: {got} vs {pe}");
            assert!((goth - he).abs() < 1e-6, "step {step}: head {goth} vs {he}");
        }
        Ok(())
    }

    #[test]
    fn fused_cpu_update_matches_candle_ops() -> Result<(), OptimError> {
        // several rayon chunks, momentum and plain groups, three steps
        let dev = Device::Cpu;
        let n = 100_003;
        let init = Tensor::randn(0f32, 1f32, n, &dev)?;
        let grads_seq: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1f32, n, &dev))
            .collect::<Result<_, _>>()?;
        let g0 = grads_seq[0].to_vec1::<f32>()?;
        let cfg = SgdConfig {
            weight_decay: 0.01,
            ..SgdConfig::default()
        };
        for name in ["backbone.w", "head.w"] {
            let fused_p = Var::from_tensor(&init.copy()?)?;
            let mut fused_slot = Sgd::new(
                cfg.clone(),
                &BTreeMap::from([(name.to_string(), fused_p.clone())]),
            )?
            .slots
            .remove(name)
            .ok_or_else(|| OptimError::MissingState(name.into()))?;
            let plain_p = Var::from_tensor(&init.copy()?)?;
            let mut plain_slot = Sgd::new(
                cfg.clone(),
                &BTreeMap::from([(name.to_string(), plain_p.clone())]),
            )?
            .slots
            .remove(name)
            .ok_or_else(|| OptimError::MissingState(name.into()))?;
            for g in &grads_seq {
                assert!(fused::applies(
                    fused_p.as_tensor(),
                    g,
                    fused_slot.velocity.as_ref()
                ));
                fused::step(&mut fused_slot, g, 0.05)?;
                step_generic(&mut plain_slot, g, 0.05)?;
                let a = fused_p.as_tensor().to_vec1::<f32>()?;
                let b = plain_p.as_tensor().to_vec1::<f32>()?;
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                        "{name}: {x} vs {y}"
                    );
                }
            }
            // the gradient tensors were not touched by the in-place update
            assert_eq!(grads_seq[0].to_vec1::<f32>()?, g0);
        }
        Ok(())
    }

    #[test]
    fn schedules() {
        let mut c = SgdConfig {
            lr: 1.0,
            schedule: LrSchedule::Step {
                milestones: vec![10, 20],
                gamma: 0.4,
            },
            ..SgdConfig::default()
        };
        assert_eq!(c.lr_at(9), 1.0);
        assert!((c.lr_at(10) - 0.4).abs() < 1e-12);
        assert!((c.lr_at(25) - 0.16).abs() < 1e-12);
        c.schedule = LrSchedule::Cosine {
            total_steps: 100,
            min_lr: 0.0,
        };
        assert!((c.lr_at(50) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(100).abs() < 1e-12);
        assert!(c.lr_at(1000).abs() < 1e-12);
        c.warmup_steps = 10;
        assert!((c.lr_at(0) - 0.1).abs() < 1e-9);
        assert!(c.validate().is_ok());
        c.lr = -1.0;
        assert!(c.validate().is_err());
    }
}
