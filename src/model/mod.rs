//! The ODC network on candle: ResNet backbone → neck → head.
//!
//! neck (OpenSelfSup `NonLinearNeckV0`): global average pool → Linear → BatchNorm1d
//! (affine off, momentum 0.001) → ReLU → Dropout(0.5) → Linear → ReLU, giving the
//! non-negative D-dim feature that goes into the ODC memory. head: Linear(D → K).
//!
//! This folder holds the model (layers, the ResNet, parameters, the residual join); the CPU
//! kernels it runs on (conv, batch norm, max-pool) live apart in [`ops`].
//!
//! Two paths run the same network: odcd's CPU kernels (f32 CPU tensors, `train.kernels =
//! "auto"`), and the generic path, candle ops that all have a backward on every device
//! (conv2d, composed BatchNorm, add + relu, the separable max-pool of
//! [`MaxPool2d::forward_generic`]). Off the CPU only the generic path runs; on CPU
//! `train.kernels = "generic"` selects it ([`OdcModel::set_kernels`]).

mod feature;
pub mod layers;
pub mod ops;
pub mod params;
pub mod residual;
pub mod resnet;

use candle_core::backprop::GradStore;
use candle_core::{Device, Module, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::device::Kernels;
use crate::validate::FieldError;

pub use feature::FeatureKind;
pub use ops::cpu::keep_candle_pool_off_rayon_cores;
pub use ops::MaxPool2d;
pub use params::ParamStore;
pub use resnet::{Arch, ResNet};

use layers::{BatchNorm, Linear};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("safetensors error: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("parameter `{0}` is defined twice")]
    Duplicate(String),
    #[error("parameter `{0}` is missing from the weights: the checkpoint was written for another model configuration")]
    Missing(String),
    #[error("parameter `{name}` has shape {found:?} in the weights but the model expects {expected:?}: the checkpoint was written for another model configuration (check model.arch, model.in_channels, model.feat_dim, odc.num_clusters)")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("cannot initialise parameters: {0}")]
    Init(String),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Field(#[from] FieldError),
}

fn default_arch() -> Arch {
    Arch::Resnet18
}
fn default_in_channels() -> usize {
    3
}
fn default_neck_hidden() -> usize {
    512
}
fn default_feat_dim() -> usize {
    256
}
fn default_dropout() -> f32 {
    0.5
}
fn default_small_stem_stride() -> usize {
    1
}

fn default_width() -> usize {
    64
}

fn default_head_std() -> f64 {
    0.01
}

/// Network shape. Field docs are the user documentation (see configs/*.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Backbone: `resnet18` or `resnet50` (torchvision shapes).
    #[serde(default = "default_arch")]
    pub arch: Arch,
    /// Input channels: 1 (grey) or 3 (RGB).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// 3×3 first conv and no max-pool, for 28–64 px images (instead of the 7×7 stride-2
    /// conv + max-pool, which shrinks a 28 px image to 7×7 before the first stage).
    #[serde(default)]
    pub small_stem: bool,
    /// Stride of the small stem's conv: 1 (the CIFAR stem: full-size first stage, ~13× the
    /// compute of the standard stem at 32 px) or 2 (half-size first stage).
    #[serde(default = "default_small_stem_stride")]
    pub small_stem_stride: usize,
    /// Channels of the first stage; the stages have width × (1, 2, 4, 8) (torchvision: 64).
    /// The backbone feature has width × 8 (ResNet-18) or width × 32 (ResNet-50) channels.
    #[serde(default = "default_width")]
    pub width: usize,
    /// Hidden width of the neck (the reference uses 512).
    #[serde(default = "default_neck_hidden")]
    pub neck_hidden: usize,
    /// Feature dimension D stored in the ODC memory (the reference uses 256).
    #[serde(default = "default_feat_dim")]
    pub feat_dim: usize,
    /// Neck dropout probability (torch default 0.5).
    #[serde(default = "default_dropout")]
    pub dropout: f32,
    /// Std of the head's Normal init (reference 0.01).
    #[serde(default = "default_head_std")]
    pub head_init_std: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: default_arch(),
            in_channels: default_in_channels(),
            small_stem: false,
            small_stem_stride: default_small_stem_stride(),
            width: default_width(),
            neck_hidden: default_neck_hidden(),
            feat_dim: default_feat_dim(),
            dropout: default_dropout(),
            head_init_std: default_head_std(),
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.in_channels != 1 && self.in_channels != 3 {
            return Err(FieldError::new(
                "model.in_channels",
                format!(
                    "is {}: allowed values are 1 (grey) or 3 (RGB)",
                    self.in_channels
                ),
            ));
        }
        if self.small_stem_stride != 1 && self.small_stem_stride != 2 {
            return Err(FieldError::new(
                "model.small_stem_stride",
                format!("is {}: allowed values are 1 or 2", self.small_stem_stride),
            ));
        }
        if self.width == 0 || self.width > 1024 {
            return Err(FieldError::new(
                "model.width",
                format!(
                    "is {}: must be 1..=1024 (torchvision's ResNets use 64)",
                    self.width
                ),
            ));
        }
        if self.neck_hidden == 0 || self.feat_dim == 0 {
            return Err(FieldError::new(
                "model.neck_hidden",
                "model.neck_hidden and model.feat_dim must be > 0",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(FieldError::new(
                "model.dropout",
                format!("is {}: must be in [0, 1)", self.dropout),
            ));
        }
        Ok(())
    }
}

/// Outputs of a training forward pass.
pub struct TrainOutput {
    /// (B, D) neck feature, non-negative.
    pub features: Tensor,
    /// (B, K) head logits.
    pub logits: Tensor,
}

pub struct OdcModel {
    cfg: ModelConfig,
    num_clusters: usize,
    ps: ParamStore,
    backbone: ResNet,
    fc0: Linear,
    bn0: BatchNorm,
    fc1: Linear,
    head: Linear,
}

pub const HEAD_WEIGHT: &str = "head.fc_cls.weight";
pub const HEAD_BIAS: &str = "head.fc_cls.bias";

impl OdcModel {
    /// A randomly initialised model (reference init), deterministic for `seed`.
    pub fn new(
        cfg: &ModelConfig,
        num_clusters: usize,
        device: &Device,
        seed: u64,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        if device.is_cpu() {
            ops::cpu::keep_freed_memory();
        }
        if num_clusters == 0 {
            return Err(ModelError::Config("odc.num_clusters must be > 0".into()));
        }
        let mut ps = ParamStore::new(device, seed);
        let backbone = ResNet::new(&mut ps, "backbone", cfg)?;
        let c4 = backbone.out_channels();
        let fc0 = Linear::kaiming(&mut ps, "neck.fc0", c4, cfg.neck_hidden)?;
        let bn0 = BatchNorm::new(&mut ps, "neck.bn0", cfg.neck_hidden, false, 0.001)?;
        let fc1 = Linear::kaiming(&mut ps, "neck.fc1", cfg.neck_hidden, cfg.feat_dim)?;
        let head = Linear::normal(
            &mut ps,
            "head.fc_cls",
            cfg.feat_dim,
            num_clusters,
            cfg.head_init_std,
        )?;
        Ok(OdcModel {
            cfg: cfg.clone(),
            num_clusters,
            ps,
            backbone,
            fc0,
            bn0,
            fc1,
            head,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn num_clusters(&self) -> usize {
        self.num_clusters
    }
    pub fn params(&self) -> &ParamStore {
        &self.ps
    }
    pub fn device(&self) -> &Device {
        self.ps.device()
    }

    /// Chooses odcd's CPU kernels (`Auto`, on CPU) or the generic path (`Generic`) for every
    /// later forward and backward.
    pub fn set_kernels(&self, kernels: Kernels) {
        self.ps.kernel_choice().set(kernels);
    }

    /// Synchronises every BatchNorm's training statistics over the ranks of `sync`
    /// (data-parallel training on odcd's CPU kernels; `None`: this process's batch only).
    pub fn set_batchnorm_sync(&self, sync: ops::BnSync) {
        self.ps.bn_sync().set(sync);
    }

    pub fn kernels(&self) -> Kernels {
        self.ps.kernel_choice().get()
    }

    /// Global-average-pooled backbone feature (B, C4): what downstream evaluation uses.
    pub fn backbone_features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.backbone
            .forward(x, train)?
            .mean(D::Minus1)?
            .mean(D::Minus1)
    }

    /// Eval-mode backbone map flattened to (N, C × h × w): the spatial layout kept.
    pub fn backbone_map_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.backbone.forward(x, false)?.flatten_from(1)
    }

    /// Eval-mode output map of every backbone stage, stage 1 first.
    pub fn backbone_stage_maps(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.backbone.forward_stages(x, false)
    }

    fn neck(&self, pooled: &Tensor, train: bool, dropout_seed: u64) -> candle_core::Result<Tensor> {
        let y = self.fc0.forward(pooled)?;
        let y = self.bn0.forward(&y, train)?.relu()?;
        let y = if train {
            layers::dropout(&y, self.cfg.dropout, dropout_seed)?
        } else {
            y
        };
        self.fc1.forward(&y)?.relu()
    }

    /// Train-mode forward: BatchNorm batch statistics, dropout from `dropout_seed`.
    pub fn forward_train(&self, x: &Tensor, dropout_seed: u64) -> candle_core::Result<TrainOutput> {
        let pooled = self.backbone_features(x, true)?;
        let features = self.neck(&pooled, true, dropout_seed)?;
        let logits = self.head.forward(&features)?;
        Ok(TrainOutput { features, logits })
    }

    /// Gradients of `loss` (a scalar computed from [`Self::forward_train`]'s outputs) for
    /// every parameter: candle's backward, plus the conv weight gradients that the CPU conv
    /// kernels (not the generic path) hand over outside candle's graph ([`params::WeightGrads`]). Use this rather
    /// than `loss.backward()`, which would leave those out.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        // left over from a `loss.backward()` called directly: not this loss's
        self.ps.weight_grads().clear();
        let mut grads = loss.backward()?;
        self.ps.weight_grads().drain_into(&mut grads)?;
        Ok(grads)
    }

    /// Eval-mode neck feature (B, D): running statistics, no dropout. Used for the initial
    /// clustering and for embeddings.
    pub fn features_eval(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let pooled = self.backbone_features(x, false)?;
        self.neck(&pooled, false, 0)
    }

    /// BatchNorm calibration: train-mode forwards (batch statistics, no dropout, no
    /// parameter update) over `batches`, with every running statistic set to the plain
    /// average of their batch statistics. A fresh model's running statistics are 0/1, so its
    /// eval-mode features (the initial clustering's) live elsewhere than the train-mode
    /// features that later update the memory; calibrated, the two match. Batches of fewer
    /// than 2 images are skipped. Returns the number of batches used.
    pub fn calibrate_batchnorm<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a Tensor>,
    ) -> candle_core::Result<usize> {
        let momentum = self.ps.bn_momentum_override();
        let mut used = 0usize;
        let run = || -> candle_core::Result<()> {
            for x in batches {
                if x.dim(0)? < 2 {
                    continue;
                }
                momentum.set(Some(1.0 / (used + 1) as f64));
                let pooled = self.backbone_features(&x.detach(), true)?;
                // bn0 is the neck's only BatchNorm; what follows it has no statistics.
                self.bn0.forward(&self.fc0.forward(&pooled)?, true)?;
                used += 1;
            }
            Ok(())
        };
        let res = run();
        momentum.set(None);
        res.map(|_| used)
    }

    /// Re-draws the whole head N(0, std), bias 0 (after the initial clustering).
    pub fn reinit_head(&mut self) -> Result<(), ModelError> {
        let rows: Vec<usize> = (0..self.num_clusters).collect();
        self.reinit_head_rows(&rows)
    }

    /// Re-draws the head rows of the given cluster ids (a re-seeded cluster must not inherit
    /// the stale logits of the id it reuses).
    pub fn reinit_head_rows(&mut self, rows: &[usize]) -> Result<(), ModelError> {
        if rows.is_empty() {
            return Ok(());
        }
        let d = self.cfg.feat_dim;
        let w = self.ps.param(HEAD_WEIGHT)?.clone();
        let b = self.ps.param(HEAD_BIAS)?.clone();
        let mut wv = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let mut bv = b.as_tensor().to_vec1::<f32>()?;
        let std = self.cfg.head_init_std as f32;
        for &r in rows {
            if r >= self.num_clusters {
                return Err(ModelError::Config(format!("head row {r} out of range")));
            }
            let fresh = self.ps.draw_normal(d, std);
            wv[r * d..(r + 1) * d].copy_from_slice(&fresh);
            bv[r] = 0.0;
        }
        let dev = self.device().clone();
        w.set(&Tensor::from_vec(wv, (self.num_clusters, d), &dev)?)?;
        b.set(&Tensor::from_vec(bv, self.num_clusters, &dev)?)?;
        Ok(())
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        self.ps.to_safetensors()
    }

    pub fn load_safetensors(&self, bytes: &[u8]) -> Result<(), ModelError> {
        self.ps.load_safetensors(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn small_cfg(arch: Arch, in_channels: usize, small_stem: bool) -> ModelConfig {
        ModelConfig {
            arch,
            in_channels,
            small_stem,
            neck_hidden: 32,
            feat_dim: 16,
            ..ModelConfig::default()
        }
    }

    #[test]
    fn backward_gives_every_parameter_a_gradient() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let m = OdcModel::new(&small_cfg(Arch::Resnet18, 3, false), 10, &dev, 1)?;
        let x = Tensor::randn(0f32, 1f32, (4, 3, 32, 32), &dev)?;
        let out = m.forward_train(&x, 0)?;
        let grads = m.backward(&out.logits.sqr()?.sum_all()?)?;
        for (name, var) in m.params().params() {
            let g = grads.get(var.as_tensor());
            assert!(g.is_some(), "no gradient for {name}");
            let g = g.map(|g| g.dims().to_vec());
            assert_eq!(g.as_deref(), Some(var.dims()), "{name}");
        }
        // all collected: nothing is left over to be added to the next step's gradients
        assert_eq!(m.params().weight_grads().len(), 0);
        Ok(())
    }

    #[test]
    fn shapes_and_param_counts_match_torchvision() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let m = OdcModel::new(&small_cfg(Arch::Resnet18, 3, false), 10, &dev, 1)?;
        let backbone: usize = m
            .params()
            .params()
            .iter()
            .filter(|(k, _)| k.starts_with("backbone."))
            .map(|(_, v)| v.elem_count())
            .sum();
        // torchvision resnet18 has 11,689,512 params of which fc = 513,000
        assert_eq!(backbone, 11_689_512 - 513_000);
        let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev)?;
        let out = m.forward_train(&x, 0)?;
        assert_eq!(out.features.dims(), &[2, 16]);
        assert_eq!(out.logits.dims(), &[2, 10]);
        let m50 = OdcModel::new(&small_cfg(Arch::Resnet50, 1, true), 10, &dev, 1)?;
        let b50: usize = m50
            .params()
            .params()
            .iter()
            .filter(|(k, _)| k.starts_with("backbone."))
            .map(|(_, v)| v.elem_count())
            .sum();
        // torchvision resnet50: 25,557,032 − fc 2,049,000; conv1 3×3×1 instead of 7×7×3
        assert_eq!(b50, 25_557_032 - 2_049_000 - 64 * 3 * 49 + 64 * 9);
        let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &dev)?;
        assert_eq!(m50.features_eval(&x)?.dims(), &[2, 16]);
        Ok(())
    }

    #[test]
    fn features_are_nonnegative_and_deterministic() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let cfg = small_cfg(Arch::Resnet18, 1, true);
        let a = OdcModel::new(&cfg, 5, &dev, 42)?;
        let b = OdcModel::new(&cfg, 5, &dev, 42)?;
        let x = Tensor::rand(-1f32, 1f32, (4, 1, 28, 28), &dev)?;
        let fa = a
            .forward_train(&x, 9)?
            .features
            .flatten_all()?
            .to_vec1::<f32>()?;
        let fb = b
            .forward_train(&x, 9)?
            .features
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(fa, fb);
        assert!(fa.iter().all(|&v| v >= 0.0));
        Ok(())
    }

    #[test]
    fn batchnorm_calibration_makes_eval_features_match_train_features() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let cfg = small_cfg(Arch::Resnet18, 1, true);
        let m = OdcModel::new(&cfg, 5, &dev, 3)?;
        let x = (Tensor::rand(0f32, 1f32, (8, 1, 16, 16), &dev)? * 3.0)?;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32, ModelError> {
            let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            let n = b.sqr()?.sum_all()?.to_scalar::<f32>()?;
            Ok((d / n.max(1e-12)).sqrt())
        };
        let train_feat = m.backbone_features(&x, true)?;
        // Uncalibrated (running statistics 0/1): eval mode is far from train mode.
        let before = rel(&m.backbone_features(&x, false)?, &train_feat)?;
        assert!(before > 0.2, "uncalibrated: {before}");
        // Calibrated on the same batch twice: the running statistics are that batch's (the
        // variance is the unbiased one: over the 2×2 maps of the last stage that is 32/31 of
        // the batch's, a few percent through 20 layers).
        assert_eq!(m.calibrate_batchnorm([&x, &x])?, 2);
        let e = rel(&m.backbone_features(&x, false)?, &train_feat)?;
        assert!(
            e < 0.1 && e < before / 4.0,
            "eval vs train features: {before} before calibration, {e} after"
        );
        // The override is gone: a train forward moves the statistics by momentum 0.1 only.
        let before = m.backbone_features(&x, false)?;
        let other = Tensor::rand(0f32, 1f32, (8, 1, 16, 16), &dev)?;
        m.backbone_features(&other, true)?;
        let after = m.backbone_features(&x, false)?;
        let moved = rel(&after, &before)?;
        assert!(
            moved > 0.0 && moved < 0.5,
            "one train forward moved eval features by {moved}"
        );
        Ok(())
    }

    #[test]
    fn safetensors_round_trip_and_head_reinit() -> Result<(), ModelError> {
        let dev = Device::Cpu;
        let cfg = small_cfg(Arch::Resnet18, 1, true);
        let mut a = OdcModel::new(&cfg, 6, &dev, 1)?;
        let x = Tensor::rand(0f32, 1f32, (4, 1, 16, 16), &dev)?;
        a.forward_train(&x, 0)?; // moves running stats
        let bytes = a.to_safetensors()?;
        let b = OdcModel::new(&cfg, 6, &dev, 2)?;
        b.load_safetensors(&bytes)?;
        let ea = a.features_eval(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let eb = b.features_eval(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(ea, eb);
        // another K is refused with a message naming the parameter
        let c = OdcModel::new(&cfg, 7, &dev, 1)?;
        assert!(matches!(
            c.load_safetensors(&bytes),
            Err(ModelError::Shape { .. })
        ));
        // head row re-init touches only that row
        let before = a
            .params()
            .param(HEAD_WEIGHT)?
            .as_tensor()
            .to_vec2::<f32>()?;
        a.reinit_head_rows(&[3])?;
        let after = a
            .params()
            .param(HEAD_WEIGHT)?
            .as_tensor()
            .to_vec2::<f32>()?;
        for r in 0..6 {
            assert_eq!(before[r] == after[r], r != 3);
        }
        Ok(())
    }
}
