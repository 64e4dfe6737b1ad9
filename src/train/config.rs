//! `[odc]` and `[train]`: the ODC memory's settings and schedule, and the step loop's.

use serde::{Deserialize, Serialize};

use crate::device::Kernels;
use crate::odc::{EvictionPolicy, MinCluster, StreamConfig};
use crate::validate::FieldError;

fn default_k() -> usize {
    100
}
fn default_capacity() -> usize {
    100_000
}
fn default_mem_momentum() -> f64 {
    0.5
}
fn default_centroid_interval() -> u64 {
    10
}
fn default_min_cluster() -> MinClusterSpec {
    MinClusterSpec::Count(20)
}
fn default_warmup() -> usize {
    4_000
}
fn default_true() -> bool {
    true
}
fn default_kmeans_iters() -> usize {
    20
}

/// `min_cluster` as the user writes it: `{ count = 20 }` or `{ fraction = 0.002 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum MinClusterSpec {
    /// Absolute member count (the reference: 20).
    Count(usize),
    /// Fraction of the current memory fill (at least 1).
    Fraction(f64),
}

/// Eviction as the user writes it: `"fifo"` or `{ reservoir = { seed = 0 } }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum EvictionSpec {
    #[default]
    Fifo,
    Reservoir {
        seed: u64,
    },
}

/// `[odc]`: the ODC memory and its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdcConfig {
    /// Number of clusters K (head outputs).
    #[serde(default = "default_k")]
    pub num_clusters: usize,
    /// Samples memory capacity M.
    #[serde(default = "default_capacity")]
    pub memory_capacity: usize,
    /// Weight of the NEW feature in the memory update (reference 0.5).
    #[serde(default = "default_mem_momentum")]
    pub momentum: f64,
    /// Full centroid recompute every N steps (reference 10).
    #[serde(default = "default_centroid_interval")]
    pub centroid_interval: u64,
    #[serde(default = "default_min_cluster")]
    pub min_cluster: MinClusterSpec,
    #[serde(default)]
    pub eviction: EvictionSpec,
    /// Distinct samples buffered for the initial k-means (at least K).
    #[serde(default = "default_warmup")]
    pub warmup_samples: usize,
    /// Re-draw the head row of a re-seeded cluster id (false reproduces the reference).
    #[serde(default = "default_true")]
    pub reinit_reseeded_heads: bool,
    /// Lloyd iterations of the initial k-means (reference 20).
    #[serde(default = "default_kmeans_iters")]
    pub kmeans_iterations: usize,
    /// Batches of the warm-up buffer whose batch statistics become every BatchNorm's running
    /// statistics before the warm-up features are extracted (0 = off, as the reference).
    /// A fresh network's running statistics are 0/1, so without calibration the initial
    /// clustering's eval-mode features differ from the train-mode features that then update
    /// the memory, and most first labels change on the first visit.
    #[serde(default)]
    pub bn_calibration_batches: usize,
}

impl Default for OdcConfig {
    fn default() -> Self {
        OdcConfig {
            num_clusters: default_k(),
            memory_capacity: default_capacity(),
            momentum: default_mem_momentum(),
            centroid_interval: default_centroid_interval(),
            min_cluster: default_min_cluster(),
            eviction: EvictionSpec::default(),
            warmup_samples: default_warmup(),
            reinit_reseeded_heads: true,
            kmeans_iterations: default_kmeans_iters(),
            bn_calibration_batches: 0,
        }
    }
}

impl OdcConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        let bad = |field: &str, m: String| Err(FieldError::new(format!("odc.{field}"), m));
        if self.num_clusters < 2 {
            return bad(
                "num_clusters",
                format!("is {}: must be at least 2", self.num_clusters),
            );
        }
        if self.num_clusters > self.memory_capacity {
            return bad(
                "num_clusters",
                format!(
                "{} exceeds odc.memory_capacity = {}: K must be ≤ M (the reference uses M/K ≈ 128)",
                self.num_clusters, self.memory_capacity
            ),
            );
        }
        if !(self.momentum > 0.0 && self.momentum <= 1.0) {
            return bad(
                "momentum",
                format!("is {}: must be in (0, 1]", self.momentum),
            );
        }
        if self.warmup_samples > self.memory_capacity {
            return bad(
                "warmup_samples",
                format!(
                    "{} exceeds odc.memory_capacity = {}",
                    self.warmup_samples, self.memory_capacity
                ),
            );
        }
        if self.kmeans_iterations == 0 {
            return bad("kmeans_iterations", "must be > 0".into());
        }
        match self.min_cluster {
            MinClusterSpec::Count(n) if n * self.num_clusters > self.memory_capacity => bad("min_cluster", format!(
                "count {n} × num_clusters {} exceeds memory_capacity {}: every cluster would be small",
                self.num_clusters, self.memory_capacity
            )),
            MinClusterSpec::Fraction(f) if !(f > 0.0 && f * (self.num_clusters as f64) < 1.0) => bad("min_cluster", format!(
                "fraction {f}: must be > 0 and < 1/num_clusters (else every cluster is small)"
            )),
            _ => Ok(()),
        }
    }

    pub fn stream_config(&self, dim: usize) -> StreamConfig {
        let mut c = StreamConfig::new(self.memory_capacity, dim, self.num_clusters);
        c.momentum = self.momentum;
        c.centroid_interval = self.centroid_interval;
        c.min_cluster = match self.min_cluster {
            MinClusterSpec::Count(n) => MinCluster::Count(n),
            MinClusterSpec::Fraction(f) => MinCluster::FractionOfFill(f),
        };
        c.eviction = match self.eviction {
            EvictionSpec::Fifo => EvictionPolicy::Fifo,
            EvictionSpec::Reservoir { seed } => EvictionPolicy::Reservoir { seed },
        };
        c
    }
}

fn default_device() -> String {
    "cpu".into()
}
fn default_kernels() -> String {
    "auto".into()
}
fn default_log_every() -> u64 {
    10
}

/// `[train]`: the step loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `cpu`, `cuda:N` or `auto` (CUDA when built with `--features cuda` and a GPU answers).
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto`: odcd's own CPU kernels on CPU (the fast path), the generic path (candle ops
    /// with a backward on every device) elsewhere. `generic`: the generic path on CPU too,
    /// slower; it runs on CPU exactly what a GPU runs (docs/kernels.md).
    #[serde(default = "default_kernels")]
    pub kernels: String,
    /// Seed of the model init, dropout and k-means: same seed + same input order = same run.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many training steps (absent = train for ever).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Log a progress line every N steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Where to write the final model weights (safetensors) when the run ends; absent = none.
    #[serde(default)]
    pub save_weights: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            device: default_device(),
            kernels: default_kernels(),
            seed: 0,
            max_steps: None,
            log_every: default_log_every(),
            save_weights: None,
        }
    }
}

impl TrainConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::device::select_device(&self.device)
            .map_err(|e| FieldError::new("train.device", e.to_string()))?;
        self.kernels()?;
        if self.log_every == 0 {
            return Err(FieldError::new("train.log_every", "must be > 0"));
        }
        if let Some(0) = self.max_steps {
            return Err(FieldError::new(
                "train.max_steps",
                "must be > 0 (omit it to train for ever)",
            ));
        }
        Ok(())
    }

    /// The `kernels` field, parsed; the error names the field.
    pub fn kernels(&self) -> Result<Kernels, FieldError> {
        Kernels::parse(&self.kernels).map_err(|m| FieldError::new("train.kernels", m))
    }
}
