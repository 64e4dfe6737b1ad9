//! Representation quality: `odcd eval` (weighted k-NN, linear probe, NMI / ARI / purity of
//! the ODC memory's clusters against the true labels, cluster statistics, baselines), the
//! in-daemon k-NN evaluation (`[eval]`), the training history kept in checkpoints and the
//! HTML cluster report (`odcd report`). Labels are read from `<key>.cls` for evaluation only;
//! training never sees them.

pub mod cluster_metrics;
pub mod daemon;
pub mod data;
pub mod history;
pub mod knn;
pub mod label_free;
pub mod linear_probe;
pub mod report;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointError, Manifest};
use crate::decode::PipelineConfig;
use crate::model::{ModelConfig, OdcModel};
use cluster_metrics::{Agreement, ClusterStats};
use data::{FeatureKind, LabelledSet};
use knn::KnnResult;
use linear_probe::{ProbeConfig, ProbeResult};

/// Batches of train images the `random_init_bn_calibrated` and `odc_precise_bn` rows calibrate on.
const BN_CALIBRATION_BATCHES: usize = 50;

pub use daemon::{DaemonEval, KnnEvalConfig};

/// Errors of evaluation and reporting; each says which input was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("no checkpoint found under `{url}`{step}: check --checkpoint (the [checkpoint] url of the run)", step = .step.map(|s| format!(" at step {s}")).unwrap_or_default())]
    NoCheckpoint { url: String, step: Option<u64> },
    #[error("checkpoint `{id}`: {message}")]
    CheckpointContent { id: String, message: String },
    #[error("shards `{url}`: {message}")]
    Data { url: String, message: String },
    #[error("shards `{url}`: record `{key}` has no `.cls` label; evaluation needs a class label for every image (make shards with `odcd shards import-idx` or `odcd shards pack`)")]
    Unlabelled { url: String, key: String },
    #[error("shards `{url}`: no image could be read (empty prefix or every record rejected: run `odcd shards inspect {url}`)")]
    Empty { url: String },
    #[error("model: {0}")]
    Model(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("cannot write `{path}`: {message}")]
    Write { path: String, message: String },
    #[error("evaluation thread failed: {0}")]
    Thread(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<crate::validate::FieldError> for EvalError {
    fn from(e: crate::validate::FieldError) -> Self {
        EvalError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl EvalError {
    pub(crate) fn model(e: impl std::fmt::Display) -> Self {
        EvalError::Model(e.to_string())
    }
}

/// What `odcd eval` measures and against what.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub checkpoint_url: String,
    pub step: Option<u64>,
    pub train_url: String,
    pub test_url: String,
    /// object_store options for the shards (endpoints; secrets come from the environment).
    pub options: BTreeMap<String, String>,
    pub ks: Vec<usize>,
    pub temperature: f32,
    pub probe: ProbeConfig,
    pub feature: FeatureKind,
    pub max_train: Option<usize>,
    pub max_test: Option<usize>,
    pub baseline_pixels: bool,
    pub baseline_random: bool,
    /// Also score the trained network with its BatchNorm running statistics re-measured on
    /// train images with the eval transform ("precise BN"): training's running statistics
    /// come from augmented crops, the evaluation sees whole images.
    pub precise_bn: bool,
    /// Centre every row's features on the train features' mean before normalising them.
    pub center: bool,
    /// Seed of the random-init baseline network.
    pub random_seed: u64,
    /// Images per forward pass.
    pub batch: usize,
}

/// Scores of one feature extractor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    /// `odc` (the checkpoint), `raw_pixels`, `random_init` (BatchNorm running statistics
    /// at their initial 0/1) or `random_init_bn_calibrated` (measured on train images).
    pub method: String,
    /// Feature dimension.
    pub dim: usize,
    pub knn: Vec<KnnResult>,
    /// Absent when the probe is off (`--probe-epochs 0`).
    pub probe: Option<ProbeResult>,
    /// Seconds spent (features + k-NN + probe).
    pub seconds: f64,
}

/// The ODC memory's clusters against the true labels of the train set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEval {
    /// Entries in the memory.
    pub entries: usize,
    /// Entries whose key was found (with a label) in the train shards.
    pub labelled: usize,
    pub agreement: Option<Agreement>,
    pub clusters: ClusterStats,
}

/// Everything `odcd eval` reports (`--json` prints this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub checkpoint_url: String,
    pub checkpoint_id: String,
    pub step: u64,
    pub feature: FeatureKind,
    pub train_url: String,
    pub train_samples: usize,
    pub test_url: String,
    pub test_samples: usize,
    pub classes: usize,
    pub temperature: f32,
    pub methods: Vec<MethodResult>,
    pub memory: Option<MemoryEval>,
    pub seconds: f64,
}

/// The network an evaluation rebuilds, from the sections of the run's config that define it.
#[derive(Debug, Clone)]
pub struct EvalModel {
    pub model: ModelConfig,
    /// K, the head's outputs (`odc.num_clusters`).
    pub num_clusters: usize,
    /// `train.device` of the run.
    pub device: String,
    /// `train.seed` of the run: the untrained baseline is the network it initialised.
    pub seed: u64,
    /// The run's pipeline: its eval form ([`PipelineConfig::for_eval`]) reads the sets.
    pub pipeline: PipelineConfig,
}

impl EvalModel {
    /// The model with the checkpoint's weights (`Some`) or freshly initialised from `seed`
    /// (`None`: the random-network baseline).
    pub fn build(
        &self,
        weights: Option<&[u8]>,
        seed: u64,
        device: &candle_core::Device,
    ) -> Result<OdcModel, EvalError> {
        let model = OdcModel::new(&self.model, self.num_clusters, device, seed)
            .map_err(EvalError::model)?;
        if let Some(w) = weights {
            model.load_safetensors(w).map_err(EvalError::model)?;
        }
        Ok(model)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn score(
    method: &str,
    mut train: Vec<f32>,
    mut test: Vec<f32>,
    d: usize,
    labels: (&[u32], &[u32], usize),
    opts: &EvalOptions,
    t0: Instant,
) -> MethodResult {
    let (ytr, yte, classes) = labels;
    if opts.center {
        center_on_train_mean(&mut train, &mut test, d);
    }
    crate::odc::normalise_rows(&mut train, d);
    crate::odc::normalise_rows(&mut test, d);
    let knn = knn::weighted_knn(
        &train,
        ytr,
        &test,
        yte,
        d,
        classes,
        &opts.ks,
        opts.temperature,
    );
    let probe = (opts.probe.epochs > 0)
        .then(|| linear_probe::linear_probe(&train, ytr, &test, yte, d, classes, &opts.probe));
    let r = MethodResult {
        method: method.to_string(),
        dim: d,
        knn,
        probe,
        seconds: t0.elapsed().as_secs_f64(),
    };
    tracing::info!(method, seconds = format!("{:.1}", r.seconds), "scored");
    r
}

/// Subtracts the column means of `train` (rows of `d`) from both sets.
pub(crate) fn center_on_train_mean(train: &mut [f32], test: &mut [f32], d: usize) {
    let rows = train.len() / d.max(1);
    if rows == 0 {
        return;
    }
    let mut mean = vec![0f64; d];
    for r in train.chunks_exact(d) {
        for (m, &x) in mean.iter_mut().zip(r) {
            *m += f64::from(x);
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / rows as f64) as f32).collect();
    for r in train.chunks_exact_mut(d).chain(test.chunks_exact_mut(d)) {
        for (x, m) in r.iter_mut().zip(&mean) {
            *x -= m;
        }
    }
}

/// NMI / ARI / purity of the memory's labels against the train set's labels (by key), and
/// the memory's cluster statistics.
pub fn memory_eval(state: &crate::odc::StreamingState, train: &LabelledSet) -> MemoryEval {
    let by_key: HashMap<&str, i64> = train
        .keys
        .iter()
        .map(String::as_str)
        .zip(train.labels.iter().copied())
        .collect();
    let (mut truth, mut pred) = (Vec::new(), Vec::new());
    for (k, &l) in state.keys.iter().zip(&state.labels) {
        if let Some(&t) = by_key.get(k.as_str()) {
            truth.push(t);
            pred.push(l);
        }
    }
    let sizes = cluster_metrics::cluster_sizes(&state.labels, state.config.k);
    MemoryEval {
        entries: state.keys.len(),
        labelled: truth.len(),
        agreement: cluster_metrics::agreement(&truth, &pred),
        clusters: cluster_metrics::cluster_stats(&sizes),
    }
}

/// `odcd eval`: embeds the train and test shards with checkpoint `ckpt` of the run that
/// `net` describes (frozen network, eval transform) and scores the features, plus the
/// requested baselines.
pub async fn evaluate(
    opts: EvalOptions,
    manifest: &Manifest,
    ckpt: Checkpoint,
    net: EvalModel,
    cancel: CancellationToken,
) -> Result<EvalReport, EvalError> {
    let t0 = Instant::now();
    tracing::info!(step = ckpt.step, id = %manifest.id, "evaluating checkpoint");
    let pipeline = net.pipeline.for_eval(opts.batch);
    let train = data::load_set(
        &opts.train_url,
        &opts.options,
        &pipeline,
        opts.max_train,
        &cancel,
    )
    .await?;
    let test = data::load_set(
        &opts.test_url,
        &opts.options,
        &pipeline,
        opts.max_test,
        &cancel,
    )
    .await?;
    tracing::info!(
        train = train.len(),
        test = test.len(),
        seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
        "evaluation sets decoded"
    );
    let memory = ckpt.memory.as_ref().map(|m| memory_eval(m, &train));
    let (train_samples, test_samples) = (train.len(), test.len());
    let weights = ckpt.model_safetensors;
    let opts2 = opts.clone();
    let (methods, classes) = tokio::task::spawn_blocking(move || -> Result<_, EvalError> {
        let opts = opts2;
        let device = crate::device::select_device(&net.device)
            .map_err(|e| EvalError::model(format!("train.device of the checkpoint: {e}")))?;
        let (ytr, yte, classes) = data::dense_labels(&train.labels, &test.labels);
        let labels = (&ytr[..], &yte[..], classes);
        let mut methods = Vec::new();
        // Scores `model`'s features of both sets (timed from `t`), then drops the model.
        let score_model = |name: &str, model: OdcModel, t: Instant| {
            let extract =
                |set| data::extract_features(&model, set, opts.feature, opts.batch, &device, None);
            let (ftr, d) = extract(&train)?;
            let (fte, _) = extract(&test)?;
            Ok::<_, EvalError>(score(name, ftr, fte, d, labels, &opts, t))
        };
        let t = Instant::now();
        let model = net.build(Some(&weights), 0, &device)?;
        methods.push(score_model("odc", model, t)?);
        if opts.precise_bn {
            let t = Instant::now();
            let model = net.build(Some(&weights), 0, &device)?;
            data::calibrate_batchnorm(&model, &train, BN_CALIBRATION_BATCHES, opts.batch, &device)?;
            methods.push(score_model("odc_precise_bn", model, t)?);
        }
        if opts.baseline_pixels {
            let t = Instant::now();
            methods.push(score(
                "raw_pixels",
                train.pixels.clone(),
                test.pixels.clone(),
                train.per_image(),
                labels,
                &opts,
                t,
            ));
        }
        if opts.baseline_random {
            let t = Instant::now();
            let model = net.build(None, opts.random_seed, &device)?;
            methods.push(score_model("random_init", model, t)?);
            // The same random weights with BatchNorm running statistics measured on train
            // images: separates what training taught the weights from what BN alone does.
            let t = Instant::now();
            let model = net.build(None, opts.random_seed, &device)?;
            data::calibrate_batchnorm(&model, &train, BN_CALIBRATION_BATCHES, opts.batch, &device)?;
            methods.push(score_model("random_init_bn_calibrated", model, t)?);
        }
        Ok((methods, classes))
    })
    .await
    .map_err(|e| EvalError::Thread(e.to_string()))??;
    Ok(EvalReport {
        checkpoint_url: opts.checkpoint_url.clone(),
        checkpoint_id: manifest.id.clone(),
        step: ckpt.step,
        feature: opts.feature,
        train_url: opts.train_url.clone(),
        train_samples,
        test_url: opts.test_url.clone(),
        test_samples,
        classes,
        temperature: opts.temperature,
        methods,
        memory,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

impl EvalReport {
    /// The human-readable form printed by `odcd eval` without `--json`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "checkpoint {} (step {}) from {}",
            self.checkpoint_id, self.step, self.checkpoint_url
        );
        let _ = writeln!(
            s,
            "train {} images ({}), test {} images ({}), {} classes; {} features, k-NN weighted, cosine, T = {}",
            self.train_samples, self.train_url, self.test_samples, self.test_url, self.classes, self.feature, self.temperature
        );
        let mut header = format!("{:<12} {:>6}", "method", "dim");
        if let Some(m) = self.methods.first() {
            for k in &m.knn {
                let _ = write!(header, " {:>10}", format!("k-NN@{}", k.k));
            }
        }
        let _ = write!(header, " {:>10} {:>8}", "linear", "seconds");
        let _ = writeln!(s, "{header}");
        for m in &self.methods {
            let mut line = format!("{:<12} {:>6}", m.method, m.dim);
            for k in &m.knn {
                let _ = write!(line, " {:>10}", pct(k.top1));
            }
            let probe = m.probe.map(|p| pct(p.test_top1)).unwrap_or("-".into());
            let _ = write!(line, " {:>10} {:>8.1}", probe, m.seconds);
            let _ = writeln!(s, "{line}");
        }
        if let Some(mem) = &self.memory {
            let c = &mem.clusters;
            let _ = writeln!(
                s,
                "memory: {} entries, {} with a label in the train shards; K = {}: {} empty, sizes {}..{}, size entropy {:.3} nats (ln K = {:.3})",
                mem.entries, mem.labelled, c.k, c.empty, c.min_size, c.max_size, c.size_entropy_nats, (c.k.max(1) as f64).ln()
            );
            match &mem.agreement {
                Some(a) => {
                    let _ = writeln!(
                        s,
                        "memory labels vs true labels ({} samples): NMI {:.4}, ARI {:.4}, purity {}",
                        a.samples,
                        a.nmi,
                        a.ari,
                        pct(a.purity)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "memory labels vs true labels: no memory key found in the train shards"
                    );
                }
            }
        } else {
            let _ = writeln!(s, "memory: the checkpoint holds no ODC memory");
        }
        let _ = writeln!(s, "took {:.1} s", self.seconds);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centering_uses_the_train_mean_for_both_sets() {
        // Two train rows (d = 2) with mean (2, 10); the test row moves by the same amount.
        let mut train = vec![1.0, 9.0, 3.0, 11.0];
        let mut test = vec![2.0, 0.0];
        center_on_train_mean(&mut train, &mut test, 2);
        assert_eq!(train, vec![-1.0, -1.0, 1.0, 1.0]);
        assert_eq!(test, vec![0.0, -10.0]);
    }
}
