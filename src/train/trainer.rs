//! The training step: batch → forward (train mode) → labels from the ODC memory → weighted
//! cross-entropy → backward → SGD → memory update → centroids / small clusters.
//!
//! Order follows the reference (ODC_SPEC §1.4): the loss uses the labels held in memory
//! BEFORE this step's update (unseen keys are first labelled by their nearest centroid) and
//! the class weights computed at the end of the previous step.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use serde::Serialize;

use super::OdcConfig;
use crate::device::Kernels;
use crate::dist::{Collective, DistError, SingleProcess};
use crate::model::{ModelConfig, ModelError, OdcModel};
use crate::odc::{self, KMeansConfig, MemoryCompute, OdcError, StreamingMemory};
use crate::optim::{OptimError, Sgd, SgdConfig};
use crate::validate::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Odc(#[from] OdcError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("batch has {images} images but {keys} keys")]
    BatchMismatch { images: usize, keys: usize },
    #[error(
        "loss is not finite ({0}) at step {1}: lower optimizer.lr or check the input normalisation"
    )]
    NonFinite(f32, u64),
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("data-parallel training: {0}")]
    Dist(#[from] DistError),
    #[error("rank 0 failed this step, so every rank stops: {0}")]
    RootFailed(String),
}

mod data_parallel;

/// Wall time of each part of a step, in seconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepTimings {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub memory: f64,
}

/// What one training step produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub step: u64,
    pub loss: f32,
    /// Top-1 accuracy of the head against the memory labels used by the loss.
    pub accuracy: f32,
    /// (B × D) train-mode neck features, row-major.
    pub features: Vec<f32>,
    /// The labels the loss used (stale memory labels, nearest centroid for unseen keys).
    pub labels_used: Vec<u32>,
    /// Labels in memory after this step's update and small-cluster handling.
    pub labels_after: Vec<u32>,
    /// Fraction of re-visited samples whose label changed (0 when none was re-visited).
    pub change_ratio: f64,
    /// Batch rows whose key was already in memory (the reference path); the rest were new.
    pub revisited: usize,
    pub lr: f64,
    /// Cluster ids re-seeded this step (their head rows were re-drawn when enabled).
    pub reseeded: Vec<u32>,
    pub timings: StepTimings,
}

/// The result of the initial clustering on the warm-up buffer.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct InitReport {
    pub samples: usize,
    pub seconds: f64,
    pub empty_after_kmeans: usize,
    pub empty_after_fix: usize,
    pub min_size: usize,
    pub max_size: usize,
}

pub struct Trainer {
    model: OdcModel,
    opt: Sgd,
    memory: StreamingMemory,
    /// Where the memory and the initial k-means do their heavy work.
    memory_compute: MemoryCompute,
    odc_cfg: OdcConfig,
    step: u64,
    seed: u64,
    /// The ranks this trainer trains with (one process: [`SingleProcess`]). With more than
    /// one, the ODC memory lives on rank 0 only (`data_parallel.rs`).
    collective: Arc<dyn Collective>,
    /// On ranks other than 0: rank 0's memory statistics after the last step.
    remote_stats: Option<odc::MemoryStats>,
}

impl Trainer {
    /// A fresh trainer; `kernels` picks odcd's CPU kernels or the generic path for the model
    /// and the optimizer (`train.kernels`).
    pub fn new(
        model_cfg: &ModelConfig,
        odc_cfg: &OdcConfig,
        sgd_cfg: &SgdConfig,
        device: &Device,
        kernels: Kernels,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let model = OdcModel::new(model_cfg, odc_cfg.num_clusters, device, seed)?;
        model.set_kernels(kernels);
        let mut opt = Sgd::new(sgd_cfg.clone(), model.params().params())?;
        opt.set_kernels(kernels);
        odc_cfg.validate()?;
        let mut memory = StreamingMemory::new(odc_cfg.stream_config(model_cfg.feat_dim))?;
        // train.kernels moves the memory too: host kernels under "auto" on CPU, the training
        // device otherwise (so "generic" on CPU runs what a GPU runs)
        let memory_compute = if kernels.cpu_kernels_on(device) {
            MemoryCompute::Host
        } else {
            MemoryCompute::generic(device)
        };
        memory.set_compute(&memory_compute);
        Ok(Trainer {
            model,
            opt,
            memory,
            memory_compute,
            odc_cfg: odc_cfg.clone(),
            step: 0,
            seed,
            collective: Arc::new(SingleProcess),
            remote_stats: None,
        })
    }

    /// Trains data-parallel with the ranks of `collective` (see `data_parallel.rs`).
    pub fn set_collective(&mut self, collective: Arc<dyn Collective>) {
        // SyncBN: BatchNorm normalises with the global batch's statistics, as one process
        // with the whole batch would (on odcd's CPU kernels; the generic path stays per rank).
        self.model
            .set_batchnorm_sync((collective.size() > 1).then(|| collective.clone()));
        self.collective = collective;
    }
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }
    /// Statistics of the ODC memory: this process's, or on ranks other than 0 (which hold
    /// none) rank 0's as of the last step.
    pub fn memory_stats(&self) -> odc::MemoryStats {
        match &self.remote_stats {
            Some(s) if !self.collective.is_root() => s.clone(),
            _ => self.memory.stats(),
        }
    }

    pub fn model(&self) -> &OdcModel {
        &self.model
    }
    pub fn model_mut(&mut self) -> &mut OdcModel {
        &mut self.model
    }
    pub fn memory(&self) -> &StreamingMemory {
        &self.memory
    }
    pub fn memory_mut(&mut self) -> &mut StreamingMemory {
        &mut self.memory
    }
    /// Replaces the memory (a restored checkpoint), keeping [`Self::memory_compute`].
    pub fn replace_memory(&mut self, memory: StreamingMemory) {
        self.memory = memory;
        self.memory.set_compute(&self.memory_compute);
    }
    /// Where the memory's relabel, centroid recompute and the initial k-means run:
    /// the host under `train.kernels = "auto"` on CPU, the training device otherwise.
    pub fn memory_compute(&self) -> &MemoryCompute {
        &self.memory_compute
    }
    /// Moves the memory's heavy work (and the next initial k-means) to `compute`.
    pub fn set_memory_compute(&mut self, compute: MemoryCompute) {
        self.memory.set_compute(&compute);
        self.memory_compute = compute;
    }
    pub fn optimizer(&self) -> &Sgd {
        &self.opt
    }
    pub fn optimizer_mut(&mut self) -> &mut Sgd {
        &mut self.opt
    }
    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Eval-mode features (B × D, row-major) of a batch: for the warm-up clustering and
    /// for embeddings.
    pub fn embed(&self, images: &Tensor) -> Result<Vec<f32>, TrainError> {
        let images = images.to_device(self.model.device())?;
        let f = self.model.features_eval(&images)?;
        Ok(f.flatten_all()?.to_vec1::<f32>()?)
    }

    /// BatchNorm calibration on `batches` before the warm-up features are extracted (see
    /// `OdcConfig::bn_calibration_batches`). Returns the number of batches used.
    pub fn calibrate_batchnorm(&self, batches: &[&Tensor]) -> Result<usize, TrainError> {
        let dev = self.model.device();
        let on_dev = batches
            .iter()
            .map(|b| b.to_device(dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(self.model.calibrate_batchnorm(on_dev.iter())?)
    }

    /// Initial clustering (ODC_SPEC §1.3): k-means on the eval-mode features of the warm-up
    /// buffer, memory initialised with them, small clusters handled so that none starts
    /// empty, then the head is re-drawn N(0, 0.01).
    pub fn initial_clustering(
        &mut self,
        keys: Vec<String>,
        features: Vec<f32>,
    ) -> Result<InitReport, TrainError> {
        if self.collective.size() > 1 {
            return self.initial_clustering_distributed(keys, features);
        }
        self.initial_clustering_local(keys, features)
    }

    fn initial_clustering_local(
        &mut self,
        keys: Vec<String>,
        features: Vec<f32>,
    ) -> Result<InitReport, TrainError> {
        let t0 = Instant::now();
        let d = self.model.config().feat_dim;
        if features.len() != keys.len() * d {
            return Err(TrainError::BatchMismatch {
                images: features.len() / d.max(1),
                keys: keys.len(),
            });
        }
        // A key may repeat in the warm-up buffer (a looped source): keep its first copy.
        let (keys, features) = {
            let mut seen = std::collections::HashSet::with_capacity(keys.len());
            let mut fk = Vec::with_capacity(keys.len());
            let mut ff = Vec::with_capacity(features.len());
            for (i, key) in keys.into_iter().enumerate() {
                if seen.insert(key.clone()) {
                    ff.extend_from_slice(&features[i * d..(i + 1) * d]);
                    fk.push(key);
                }
            }
            (fk, ff)
        };
        let n = keys.len();
        let k = self.odc_cfg.num_clusters;
        let km = odc::kmeans_on(
            &features,
            d,
            &KMeansConfig {
                k,
                niter: self.odc_cfg.kmeans_iterations,
                seed: self.seed,
                ..KMeansConfig::default()
            },
            &self.memory_compute,
        )?;
        self.memory
            .init_from_clustering(&keys, &features, &km.labels)?;
        let empty_after_kmeans = self.memory.stats().empty_clusters;
        self.memory.handle_small_clusters()?;
        let stats = self.memory.stats();
        self.model.reinit_head()?;
        Ok(InitReport {
            samples: n,
            seconds: t0.elapsed().as_secs_f64(),
            empty_after_kmeans,
            empty_after_fix: stats.empty_clusters,
            min_size: stats.min_size,
            max_size: stats.max_size,
        })
    }

    /// One training step on a batch (N, C, H, W) with its sample keys.
    pub fn step(&mut self, images: &Tensor, keys: &[String]) -> Result<StepOutput, TrainError> {
        if self.collective.size() > 1 {
            return self.step_distributed(images, keys);
        }
        let b = images.dim(0)?;
        if b != keys.len() {
            return Err(TrainError::BatchMismatch {
                images: b,
                keys: keys.len(),
            });
        }
        let step = self.step;
        let dev = self.model.device().clone();
        let images = images.to_device(&dev)?;

        let t0 = Instant::now();
        // A per-step dropout seed keeps the step bit-for-bit reproducible.
        let dropout_seed = self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let out = self.model.forward_train(&images, dropout_seed)?;
        let features = out.features.detach().flatten_all()?.to_vec1::<f32>()?;

        let t_mem0 = Instant::now();
        let prepared = self.memory.prepare(keys, &features)?;
        let weights = prepared.weights.clone();
        let mem_prepare = t_mem0.elapsed().as_secs_f64();

        let targets = Tensor::from_vec(prepared.labels.clone(), b, &dev)?;
        let w = Tensor::from_vec(weights, self.odc_cfg.num_clusters, &dev)?;
        let loss = odc::weighted_cross_entropy_tensor(&out.logits, &targets, &w)?;
        let loss_v = loss.to_scalar::<f32>()?;
        if !loss_v.is_finite() {
            return Err(TrainError::NonFinite(loss_v, step));
        }
        let accuracy = {
            let pred = out.logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
            let hits = pred
                .iter()
                .zip(prepared.labels.iter())
                .filter(|(a, b)| a == b)
                .count();
            hits as f32 / b.max(1) as f32
        };
        let t1 = Instant::now();
        let grads = self.model.backward(&loss)?;
        let t2 = Instant::now();
        let lr = self.opt.step(&grads, step)?;
        drop(grads);
        let t3 = Instant::now();

        let upd = self.memory.update(keys, &features, &prepared)?;
        let after = self.memory.after_step(step)?;
        let labels_after: Vec<u32> = keys
            .iter()
            .zip(prepared.labels.iter())
            .map(|(k, &l)| self.memory.label_of(k).unwrap_or(l))
            .collect();
        let reseeded: Vec<u32> = after.reseeded.clone();
        if self.odc_cfg.reinit_reseeded_heads && !reseeded.is_empty() {
            let rows: Vec<usize> = reseeded.iter().map(|&r| r as usize).collect();
            self.model.reinit_head_rows(&rows)?;
        }
        let t4 = Instant::now();
        self.step += 1;
        Ok(StepOutput {
            step,
            loss: loss_v,
            accuracy,
            features,
            labels_used: prepared.labels,
            labels_after,
            change_ratio: upd.change_ratio,
            revisited: upd.seen,
            lr,
            reseeded,
            timings: StepTimings {
                forward: (t1 - t0).as_secs_f64() - mem_prepare,
                backward: (t2 - t1).as_secs_f64(),
                optimizer: (t3 - t2).as_secs_f64(),
                memory: (t4 - t3).as_secs_f64() + mem_prepare,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;
    use crate::train::MinClusterSpec;

    fn setup(seed: u64) -> Result<Trainer, TrainError> {
        let model = ModelConfig {
            arch: Arch::Resnet18,
            in_channels: 1,
            neck_hidden: 32,
            feat_dim: 16,
            ..ModelConfig::default()
        };
        let odc = OdcConfig {
            num_clusters: 4,
            memory_capacity: 64,
            warmup_samples: 16,
            min_cluster: MinClusterSpec::Count(2),
            ..OdcConfig::default()
        };
        Trainer::new(
            &model,
            &odc,
            &SgdConfig::default(),
            &Device::Cpu,
            Kernels::Auto,
            seed,
        )
    }

    fn batch(i: u64) -> Result<(Tensor, Vec<String>), TrainError> {
        let n = 8usize;
        let data: Vec<f32> = (0..n * 32 * 32)
            .map(|j| (((j as u64 * 2654435761 + i * 97) % 1000) as f32) / 500.0 - 1.0)
            .collect();
        let keys = (0..n)
            .map(|k| format!("s{}", (i as usize * 5 + k) % 24))
            .collect();
        Ok((Tensor::from_vec(data, (n, 1, 32, 32), &Device::Cpu)?, keys))
    }

    /// (loss, features, labels after) per step.
    type Trace = Vec<(f32, Vec<f32>, Vec<u32>)>;

    fn run(seed: u64) -> Result<Trace, TrainError> {
        run_on(seed, None)
    }

    fn run_on(seed: u64, compute: Option<MemoryCompute>) -> Result<Trace, TrainError> {
        let mut t = setup(seed)?;
        if let Some(c) = compute {
            t.set_memory_compute(c);
        }
        let (mut keys, mut feats) = (Vec::new(), Vec::new());
        for i in 0..2 {
            let (x, k) = batch(i)?;
            feats.extend(t.embed(&x)?);
            keys.extend(k);
        }
        t.initial_clustering(keys, feats)?;
        let mut out = Vec::new();
        for i in 0..5 {
            let (x, k) = batch(i)?;
            let o = t.step(&x, &k)?;
            assert!(o.loss.is_finite());
            assert_eq!(
                t.memory().stats().empty_clusters,
                0,
                "no cluster empty after a step"
            );
            out.push((o.loss, o.features, o.labels_after));
        }
        Ok(out)
    }

    #[test]
    fn steps_are_bit_for_bit_reproducible_for_a_seed() -> Result<(), TrainError> {
        let a = run(7)?;
        let b = run(7)?;
        assert_eq!(a.len(), 5);
        for (x, y) in a.iter().zip(b.iter()) {
            assert_eq!(x.0.to_bits(), y.0.to_bits(), "loss differs");
            assert_eq!(x.1, y.1, "features differ");
            assert_eq!(x.2, y.2, "labels differ");
        }
        let c = run(8)?;
        assert_ne!(a[0].1, c[0].1, "another seed gives another run");
        Ok(())
    }

    /// The memory and the initial k-means on the device path (candle's CPU device, what
    /// `train.kernels = "generic"` selects) train exactly like the host path: same losses,
    /// features and labels, bit for bit. The CPU trainer defaults to the host path.
    #[test]
    fn memory_on_the_device_path_trains_like_the_host_path() -> Result<(), TrainError> {
        assert!(setup(1)?.memory_compute().is_host());
        let host = run(7)?;
        let device = run_on(7, Some(MemoryCompute::generic(&Device::Cpu)))?;
        for (i, (x, y)) in host.iter().zip(device.iter()).enumerate() {
            assert_eq!(x.0.to_bits(), y.0.to_bits(), "step {i}: loss differs");
            assert_eq!(x.1, y.1, "step {i}: features differ");
            assert_eq!(x.2, y.2, "step {i}: labels differ");
        }
        Ok(())
    }

    #[test]
    fn config_validation_names_the_field() {
        let mut c = OdcConfig {
            num_clusters: 10,
            memory_capacity: 5,
            ..OdcConfig::default()
        };
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("odc.num_clusters"), "{e}");
        c.memory_capacity = 1000;
        c.warmup_samples = 100;
        c.min_cluster = MinClusterSpec::Fraction(0.5);
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("odc.min_cluster"), "{e}");
    }
}
