//! Named parameters (trainable `Var`s) and buffers (BatchNorm running statistics), with
//! deterministic initialisation and safetensors save / load.
//!
//! candle's own `VarMap` initialises from an unseedable CPU RNG; odcd must be bit-for-bit
//! reproducible for a fixed seed, so parameters are drawn here from a ChaCha RNG.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::ModelError;
use crate::device::Kernels;

/// A non-trainable tensor that a layer updates in place (running mean / variance).
#[derive(Clone, Debug)]
pub struct Buffer(Arc<Mutex<Tensor>>);

impl Buffer {
    pub fn new(t: Tensor) -> Self {
        Buffer(Arc::new(Mutex::new(t)))
    }
    pub fn get(&self) -> Tensor {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    pub fn set(&self, t: Tensor) {
        match self.0.lock() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
    }
}

/// Every parameter and buffer of a model, by dotted name (torchvision-style names).
pub struct ParamStore {
    device: Device,
    rng: ChaCha8Rng,
    params: BTreeMap<String, Var>,
    buffers: BTreeMap<String, Buffer>,
    bn_momentum: BnMomentumOverride,
    weight_grads: WeightGrads,
    kernels: KernelChoice,
    bn_sync: BnSyncChoice,
}

/// The ranks the model's BatchNorm layers synchronise their statistics with (none: this
/// process's batch alone); shared by the model's layers, read at every training forward.
#[derive(Clone, Default)]
pub struct BnSyncChoice(Arc<Mutex<super::ops::BnSync>>);

impl std::fmt::Debug for BnSyncChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranks = self.get().map_or(1, |c| c.size());
        write!(f, "BnSyncChoice(ranks: {ranks})")
    }
}

impl BnSyncChoice {
    pub fn set(&self, sync: super::ops::BnSync) {
        if let Ok(mut s) = self.0.lock() {
            *s = sync;
        }
    }
    pub fn get(&self) -> super::ops::BnSync {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

/// A momentum that, while set, every BatchNorm of one model uses instead of its own: BN
/// calibration sets 1/(i+1) for its i-th batch, so the running statistics become the plain
/// average over the calibration batches. Shared by the model's BatchNorm layers.
#[derive(Clone, Debug, Default)]
pub struct BnMomentumOverride(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl BnMomentumOverride {
    // 0 bits = unset: a real override is always in (0, 1].
    pub fn get(&self) -> Option<f64> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
    }
    pub fn set(&self, m: Option<f64>) {
        let bits = m.filter(|m| *m > 0.0).map_or(0, f64::to_bits);
        self.0.store(bits, std::sync::atomic::Ordering::Relaxed);
    }
}

pub use super::ops::WeightGrads;

/// Whether the model's layers may use odcd's CPU kernels (`train.kernels`), read at every
/// forward; shared by the model's layers. Off the CPU the generic path runs whatever it says.
#[derive(Clone, Debug, Default)]
pub struct KernelChoice(Arc<std::sync::atomic::AtomicBool>);

impl KernelChoice {
    pub fn set(&self, kernels: Kernels) {
        let generic = kernels == Kernels::Generic;
        self.0.store(generic, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Kernels {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Kernels::Generic
        } else {
            Kernels::Auto
        }
    }

    /// Whether `x` goes through odcd's CPU kernels: an f32 CPU tensor, `auto` kernels.
    pub fn cpu_kernels_for(&self, x: &Tensor) -> bool {
        x.dtype() == DType::F32 && self.get().cpu_kernels_on(x.device())
    }
}

impl ParamStore {
    pub fn new(device: &Device, seed: u64) -> Self {
        ParamStore {
            device: device.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            params: BTreeMap::new(),
            buffers: BTreeMap::new(),
            bn_momentum: BnMomentumOverride::default(),
            weight_grads: WeightGrads::default(),
            kernels: KernelChoice::default(),
            bn_sync: BnSyncChoice::default(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn insert_param(&mut self, name: &str, t: Tensor) -> Result<Tensor, ModelError> {
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        if self.params.insert(name.to_string(), var).is_some() {
            return Err(ModelError::Duplicate(name.to_string()));
        }
        Ok(out)
    }

    /// Normal(0, std) parameter.
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0f32, std as f32).map_err(|e| ModelError::Init(e.to_string()))?;
        let data: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
        let t = Tensor::from_vec(data, shape, &self.device)?;
        self.insert_param(name, t)
    }

    /// Kaiming normal, fan-in mode, ReLU gain: std = sqrt(2 / fan_in).
    pub fn kaiming(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let fan_in: usize = shape.iter().skip(1).product();
        let std = (2.0 / fan_in.max(1) as f64).sqrt();
        self.normal(name, shape, std)
    }

    pub fn constant(&mut self, name: &str, shape: &[usize], v: f64) -> Result<Tensor, ModelError> {
        let t = (Tensor::ones(shape, DType::F32, &self.device)? * v)?;
        self.insert_param(name, t)
    }

    pub fn buffer(&mut self, name: &str, shape: &[usize], v: f64) -> Result<Buffer, ModelError> {
        let t = (Tensor::ones(shape, DType::F32, &self.device)? * v)?;
        let b = Buffer::new(t);
        if self.buffers.insert(name.to_string(), b.clone()).is_some() {
            return Err(ModelError::Duplicate(name.to_string()));
        }
        Ok(b)
    }

    /// A fresh N(0, std) draw for part of a parameter (used to re-initialise head rows).
    pub fn draw_normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        match Normal::new(0.0f32, std) {
            Ok(dist) => (0..n).map(|_| dist.sample(&mut self.rng)).collect(),
            Err(_) => vec![0.0; n],
        }
    }

    /// Where the model's CPU conv layers leave their weight gradients.
    pub fn weight_grads(&self) -> &WeightGrads {
        &self.weight_grads
    }

    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    pub fn param(&self, name: &str) -> Result<&Var, ModelError> {
        self.params
            .get(name)
            .ok_or_else(|| ModelError::Missing(name.to_string()))
    }

    pub fn buffers(&self) -> &BTreeMap<String, Buffer> {
        &self.buffers
    }

    /// The kernel choice every layer of this model reads.
    pub fn kernel_choice(&self) -> &KernelChoice {
        &self.kernels
    }

    pub fn bn_sync(&self) -> &BnSyncChoice {
        &self.bn_sync
    }
    pub fn bn_momentum_override(&self) -> &BnMomentumOverride {
        &self.bn_momentum
    }

    pub fn num_parameters(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// All parameters and buffers as CPU tensors, by name.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>, ModelError> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.params {
            out.insert(k.clone(), v.as_tensor().to_device(&Device::Cpu)?);
        }
        for (k, b) in &self.buffers {
            out.insert(k.clone(), b.get().to_device(&Device::Cpu)?);
        }
        Ok(out)
    }

    /// Serialises parameters and buffers as safetensors bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        let tensors = self.tensors()?;
        Ok(safetensors::serialize(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            None,
        )?)
    }

    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let bytes = self.to_safetensors()?;
        std::fs::write(path, bytes).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })
    }

    /// Loads values into the existing parameters and buffers. Every name must be present
    /// with the same shape: a checkpoint of another architecture is refused, not half-loaded.
    pub fn load_safetensors(&self, bytes: &[u8]) -> Result<(), ModelError> {
        let loaded = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        for (name, var) in &self.params {
            let t = loaded
                .get(name)
                .ok_or_else(|| ModelError::Missing(name.clone()))?;
            if t.dims() != var.dims() {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        for (name, buf) in &self.buffers {
            let t = loaded
                .get(name)
                .ok_or_else(|| ModelError::Missing(name.clone()))?;
            let cur = buf.get();
            if t.dims() != cur.dims() {
                return Err(ModelError::Shape {
                    name: name.clone(),
                    expected: cur.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            buf.set(t.to_dtype(DType::F32)?.to_device(&self.device)?);
        }
        Ok(())
    }

    pub fn load(&self, path: &Path) -> Result<(), ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        self.load_safetensors(&bytes)
    }
}
