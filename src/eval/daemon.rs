//! In-daemon evaluation (`[eval]`): every `every_steps` training steps the trainer hands a
//! snapshot of the weights to an evaluation thread, which embeds a labelled train / test set
//! (read once, at the first evaluation) and exports the weighted k-NN top-1 as metrics.
//! Training does not wait: a snapshot offered while the previous evaluation still runs is
//! skipped (counted). Labels are only read here, never by training.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Gauge, GaugeVec, IntCounter, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::data::{self, FeatureKind, LabelledSet};
use super::knn::{self, KnnResult};
use super::EvalError;
use super::EvalModel;

fn default_every_steps() -> u64 {
    500
}
fn default_ks() -> Vec<usize> {
    vec![20, 200]
}
fn default_temperature() -> f32 {
    0.07
}
fn default_max_train() -> usize {
    10_000
}
fn default_max_test() -> usize {
    2_000
}

/// `[eval]`: periodic k-NN evaluation on a labelled set while training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnEvalConfig {
    /// Labelled shards (`.cls`) the k-NN votes come from: URL or local path.
    pub train_url: String,
    /// Labelled shards that are classified: URL or local path.
    pub test_url: String,
    /// object_store options for both URLs (endpoints; secrets come from the environment).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Evaluate every N training steps.
    #[serde(default = "default_every_steps")]
    pub every_steps: u64,
    /// Neighbour counts (one metric series each).
    #[serde(default = "default_ks")]
    pub k: Vec<usize>,
    /// Vote weight exp(similarity / temperature).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Images read from each set at most (the first ones in shard order).
    #[serde(default = "default_max_train")]
    pub max_train: usize,
    #[serde(default = "default_max_test")]
    pub max_test: usize,
    /// `backbone` (pooled backbone output), `neck` (the clustered feature), `spatial` (the
    /// backbone map flattened), `stageN` or `stagesN` (`odcd eval --feature`).
    #[serde(default)]
    pub feature: FeatureKind,
    /// Subtract the train features' mean before the cosine, for every row (`odcd eval
    /// --center`).
    #[serde(default)]
    pub center: bool,
}

impl KnnEvalConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), crate::validate::FieldError> {
        let bad = |field: &str, message: String| {
            crate::validate::FieldError::new(format!("eval.{field}"), message)
        };
        for (field, url) in [("train_url", &self.train_url), ("test_url", &self.test_url)] {
            if url.trim().is_empty() {
                return Err(bad(
                    field,
                    "is empty: give the URL or path of labelled shards".into(),
                ));
            }
        }
        if self.every_steps == 0 {
            return Err(bad("every_steps", "must be > 0".into()));
        }
        if self.k.is_empty() || self.k.contains(&0) {
            return Err(bad(
                "k",
                format!("{:?}: give one or more k > 0, e.g. [20, 200]", self.k),
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(bad(
                "temperature",
                format!("{} must be a positive number", self.temperature),
            ));
        }
        if self.max_train == 0 || self.max_test == 0 {
            return Err(bad("max_train / max_test", "must be > 0".into()));
        }
        Ok(())
    }
}

/// The latest finished evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestEval {
    /// Step of the weights evaluated.
    pub step: u64,
    pub knn: Vec<KnnResult>,
    pub seconds: f64,
    /// The same k-NN on what a user has without training, measured once on the same sets:
    /// [`BASELINE_UNTRAINED`] and [`BASELINE_PIXELS`].
    pub baselines: BTreeMap<String, Vec<KnnResult>>,
}

/// The network of the run's architecture as initialised from `train.seed`, never trained
/// (BatchNorm running statistics at their initial 0/1, as `odcd eval --baseline-random`'s
/// `random_init`).
pub const BASELINE_UNTRAINED: &str = "untrained";
/// The eval-transform pixels, flattened (as `odcd eval --baseline-pixels`).
pub const BASELINE_PIXELS: &str = "raw_pixels";

/// The first k (in `[eval] k` order) at which the trained features score below the
/// untrained network: `(k, trained top-1, untrained top-1)`.
pub fn below_untrained(
    trained: &[KnnResult],
    baselines: &BTreeMap<String, Vec<KnnResult>>,
) -> Option<(usize, f64, f64)> {
    let untrained = baselines.get(BASELINE_UNTRAINED)?;
    trained.iter().find_map(|t| {
        let u = untrained.iter().find(|u| u.k == t.k)?;
        (t.top1 < u.top1).then_some((t.k, t.top1, u.top1))
    })
}

#[derive(Clone)]
struct EvalMetrics {
    knn_top1: GaugeVec,
    baseline_knn_top1: GaugeVec,
    below_untrained: IntGauge,
    last_step: IntGauge,
    seconds: Gauge,
    runs: IntCounter,
    failures: IntCounter,
    skipped: IntCounter,
}

impl EvalMetrics {
    fn register(r: &Registry) -> prometheus::Result<Self> {
        let m = EvalMetrics {
            knn_top1: GaugeVec::new(
                Opts::new(
                    "odcd_eval_knn_top1",
                    "Weighted k-NN top-1 accuracy (0..1) of the [eval] test set against its train set",
                ),
                &["k"],
            )?,
            baseline_knn_top1: GaugeVec::new(
                Opts::new(
                    "odcd_eval_baseline_knn_top1",
                    "The same weighted k-NN top-1 without training: the untrained network of the run's architecture and raw pixels (measured once)",
                ),
                &["baseline", "k"],
            )?,
            below_untrained: IntGauge::new(
                "odcd_eval_below_untrained",
                "1 while the latest evaluation scores below the untrained network at some k: training has made the features worse",
            )?,
            last_step: IntGauge::new(
                "odcd_eval_last_step",
                "Training step of the weights of the latest finished evaluation",
            )?,
            seconds: Gauge::new(
                "odcd_eval_seconds",
                "Duration of the latest evaluation (features + k-NN), seconds",
            )?,
            runs: IntCounter::new("odcd_eval_runs_total", "Evaluations finished")?,
            failures: IntCounter::new(
                "odcd_eval_failures_total",
                "Evaluations that failed (see the log)",
            )?,
            skipped: IntCounter::new(
                "odcd_eval_skipped_total",
                "Evaluations skipped because the previous one was still running",
            )?,
        };
        r.register(Box::new(m.knn_top1.clone()))?;
        r.register(Box::new(m.baseline_knn_top1.clone()))?;
        r.register(Box::new(m.below_untrained.clone()))?;
        r.register(Box::new(m.last_step.clone()))?;
        r.register(Box::new(m.seconds.clone()))?;
        r.register(Box::new(m.runs.clone()))?;
        r.register(Box::new(m.failures.clone()))?;
        r.register(Box::new(m.skipped.clone()))?;
        Ok(m)
    }
}

struct Job {
    step: u64,
    weights: Vec<u8>,
}

/// The evaluation thread and its mailbox (one job at a time). Dropping it stops the thread
/// (an evaluation in progress is cancelled between batches) and waits for it.
pub struct DaemonEval {
    tx: Option<SyncSender<Job>>,
    latest: Arc<Mutex<Option<LatestEval>>>,
    every: u64,
    metrics: EvalMetrics,
    cancel: CancellationToken,
    join: Option<std::thread::JoinHandle<()>>,
}

struct Worker {
    net: EvalModel,
    ecfg: KnnEvalConfig,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
    metrics: EvalMetrics,
    latest: Arc<Mutex<Option<LatestEval>>>,
    sets: Option<(LabelledSet, LabelledSet)>,
    /// The baselines' k-NN, measured at the first evaluation.
    baselines: BTreeMap<String, Vec<KnnResult>>,
}

/// `k-NN@20 81.20%, k-NN@200 78.00%`
fn knn_summary(knn: &[KnnResult]) -> String {
    knn.iter()
        .map(|k| format!("k-NN@{} {:.2}%", k.k, 100.0 * k.top1))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Worker {
    /// Weighted k-NN of test features against train features (centred if `[eval] center`,
    /// rows L2-normalised here).
    fn knn(&self, mut ftr: Vec<f32>, mut fte: Vec<f32>, d: usize) -> Vec<KnnResult> {
        let Some((train, test)) = &self.sets else {
            return Vec::new();
        };
        if self.ecfg.center {
            super::center_on_train_mean(&mut ftr, &mut fte, d);
        }
        crate::odc::normalise_rows(&mut ftr, d);
        crate::odc::normalise_rows(&mut fte, d);
        let (ytr, yte, classes) = data::dense_labels(&train.labels, &test.labels);
        knn::weighted_knn(
            &ftr,
            &ytr,
            &fte,
            &yte,
            d,
            classes,
            &self.ecfg.k,
            self.ecfg.temperature,
        )
    }

    /// The untrained network's and the raw pixels' k-NN on the loaded sets.
    fn measure_baselines(
        &self,
        device: &candle_core::Device,
    ) -> Result<BTreeMap<String, Vec<KnnResult>>, EvalError> {
        let Some((train, test)) = &self.sets else {
            return Err(EvalError::Cancelled);
        };
        let batch = self.net.pipeline.batch_size.max(64);
        let kind = self.ecfg.feature;
        let untrained = self.net.build(None, self.net.seed, device)?;
        let (ftr, d) =
            data::extract_features(&untrained, train, kind, batch, device, Some(&self.cancel))?;
        let (fte, _) =
            data::extract_features(&untrained, test, kind, batch, device, Some(&self.cancel))?;
        let mut out = BTreeMap::new();
        out.insert(BASELINE_UNTRAINED.to_string(), self.knn(ftr, fte, d));
        let pixels = self.knn(train.pixels.clone(), test.pixels.clone(), train.per_image());
        out.insert(BASELINE_PIXELS.to_string(), pixels);
        Ok(out)
    }

    fn evaluate(&mut self, job: &Job) -> Result<LatestEval, EvalError> {
        let t0 = Instant::now();
        if self.sets.is_none() {
            let pipeline = self
                .net
                .pipeline
                .for_eval(self.net.pipeline.batch_size.max(64));
            let e = &self.ecfg;
            let train = self.rt.block_on(data::load_set(
                &e.train_url,
                &e.options,
                &pipeline,
                Some(e.max_train),
                &self.cancel,
            ))?;
            let test = self.rt.block_on(data::load_set(
                &e.test_url,
                &e.options,
                &pipeline,
                Some(e.max_test),
                &self.cancel,
            ))?;
            tracing::info!(
                train = train.len(),
                test = test.len(),
                "in-daemon evaluation sets loaded"
            );
            self.sets = Some((train, test));
        }
        let device = crate::device::select_device(&self.net.device)
            .map_err(|e| EvalError::model(format!("train.device: {e}")))?;
        if self.baselines.is_empty() {
            self.baselines = self.measure_baselines(&device)?;
            for (name, knn) in &self.baselines {
                for k in knn {
                    self.metrics
                        .baseline_knn_top1
                        .with_label_values(&[name, &k.k.to_string()])
                        .set(k.top1);
                }
                tracing::info!("evaluation baseline {name}: {}", knn_summary(knn));
            }
        }
        let Some((train, test)) = &self.sets else {
            return Err(EvalError::Cancelled);
        };
        let model = self.net.build(Some(&job.weights), 0, &device)?;
        let batch = self.net.pipeline.batch_size.max(64);
        let kind = self.ecfg.feature;
        let (ftr, d) =
            data::extract_features(&model, train, kind, batch, &device, Some(&self.cancel))?;
        let (fte, _) =
            data::extract_features(&model, test, kind, batch, &device, Some(&self.cancel))?;
        let knn = self.knn(ftr, fte, d);
        Ok(LatestEval {
            step: job.step,
            knn,
            seconds: t0.elapsed().as_secs_f64(),
            baselines: self.baselines.clone(),
        })
    }

    fn run(mut self, rx: std::sync::mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            if self.cancel.is_cancelled() {
                break;
            }
            match self.evaluate(&job) {
                Ok(r) => {
                    for k in &r.knn {
                        self.metrics
                            .knn_top1
                            .with_label_values(&[&k.k.to_string()])
                            .set(k.top1);
                    }
                    self.metrics.last_step.set(r.step as i64);
                    self.metrics.seconds.set(r.seconds);
                    self.metrics.runs.inc();
                    tracing::info!(
                        step = r.step,
                        seconds = format!("{:.1}", r.seconds),
                        "evaluation: {}",
                        knn_summary(&r.knn)
                    );
                    match below_untrained(&r.knn, &r.baselines) {
                        Some((k, t, u)) => {
                            self.metrics.below_untrained.set(1);
                            tracing::warn!(
                                step = r.step,
                                "training has made the features worse than the untrained network: k-NN@{k} {:.2}% < {:.2}% untrained (see docs/evaluation.md for the settings that matter)",
                                100.0 * t,
                                100.0 * u
                            );
                        }
                        None => self.metrics.below_untrained.set(0),
                    }
                    if let Ok(mut l) = self.latest.lock() {
                        *l = Some(r);
                    }
                }
                Err(EvalError::Cancelled) => break,
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::error!(
                        step = job.step,
                        "in-daemon evaluation failed (training goes on; retried at the next evaluation step): {e}"
                    );
                }
            }
        }
    }
}

impl DaemonEval {
    /// Registers the `odcd_eval_*` metrics and starts the evaluation thread. `rt` runs the
    /// shard reads; `cancel` stops the thread.
    pub fn spawn(
        net: EvalModel,
        ecfg: &KnnEvalConfig,
        registry: &Registry,
        rt: tokio::runtime::Handle,
        cancel: CancellationToken,
    ) -> Result<DaemonEval, EvalError> {
        ecfg.validate()?;
        let metrics = EvalMetrics::register(registry).map_err(|e| EvalError::Invalid {
            field: "eval".into(),
            message: format!("cannot register the odcd_eval_* metrics: {e}"),
        })?;
        let (tx, rx) = sync_channel::<Job>(1);
        let latest = Arc::new(Mutex::new(None));
        let cancel = cancel.child_token();
        let worker = Worker {
            net,
            ecfg: ecfg.clone(),
            rt,
            cancel: cancel.clone(),
            metrics: metrics.clone(),
            latest: latest.clone(),
            sets: None,
            baselines: BTreeMap::new(),
        };
        let join = std::thread::Builder::new()
            .name("odcd-eval".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| EvalError::Thread(e.to_string()))?;
        Ok(DaemonEval {
            tx: Some(tx),
            latest,
            every: ecfg.every_steps,
            metrics,
            cancel,
            join: Some(join),
        })
    }

    /// Call after each training step with the number of steps done: on an evaluation step,
    /// `snapshot` is called for the weights (safetensors bytes) and they are handed over
    /// unless the previous evaluation still runs. Never blocks on the evaluation.
    pub fn after_step<E: std::fmt::Display>(
        &self,
        steps_done: u64,
        snapshot: impl FnOnce() -> Result<Vec<u8>, E>,
    ) {
        if steps_done == 0 || !steps_done.is_multiple_of(self.every) {
            return;
        }
        let Some(tx) = &self.tx else { return };
        let weights = match snapshot() {
            Ok(w) => w,
            Err(e) => {
                self.metrics.failures.inc();
                tracing::error!(
                    step = steps_done,
                    "cannot snapshot the weights for evaluation: {e}"
                );
                return;
            }
        };
        match tx.try_send(Job {
            step: steps_done,
            weights,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.skipped.inc();
                tracing::warn!(
                    step = steps_done,
                    "evaluation skipped: the previous one is still running (raise eval.every_steps or lower eval.max_train)"
                );
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.failures.inc();
                tracing::error!("the evaluation thread has stopped");
            }
        }
    }

    /// The latest finished evaluation, if any.
    pub fn latest(&self) -> Option<LatestEval> {
        self.latest.lock().ok().and_then(|l| l.clone())
    }
}

impl Drop for DaemonEval {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tx.take();
        if let Some(j) = self.join.take() {
            if j.join().is_err() {
                tracing::error!("the evaluation thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KnnEvalConfig {
        toml::from_str(
            r#"
train_url = "data/a/"
test_url = "data/b/"
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_config_takes_a_stage_feature_and_centring() {
        let c: KnnEvalConfig = toml::from_str(
            "train_url = \"a/\"\ntest_url = \"b/\"\nfeature = \"stage2\"\ncenter = true\n",
        )
        .unwrap();
        assert_eq!((c.feature, c.center), (FeatureKind::Stage(2), true));
        assert_eq!(
            (cfg().feature, cfg().center),
            (FeatureKind::Backbone, false)
        );
        let e = toml::from_str::<KnnEvalConfig>(
            "train_url = \"a/\"\ntest_url = \"b/\"\nfeature = \"stage9\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("stage must be 1, 2, 3 or 4"), "{e}");
    }

    #[test]
    fn the_guard_names_the_first_k_below_the_untrained_network() {
        let r = |k: usize, top1: f64| KnnResult { k, top1 };
        let mut baselines = BTreeMap::new();
        assert_eq!(below_untrained(&[r(20, 0.5)], &baselines), None);
        baselines.insert(BASELINE_PIXELS.to_string(), vec![r(20, 0.9)]);
        // raw pixels above the trained features is no alarm of this guard
        assert_eq!(below_untrained(&[r(20, 0.5)], &baselines), None);
        baselines.insert(
            BASELINE_UNTRAINED.to_string(),
            vec![r(20, 0.8), r(200, 0.7)],
        );
        assert_eq!(
            below_untrained(&[r(20, 0.85), r(200, 0.75)], &baselines),
            None
        );
        assert_eq!(
            below_untrained(&[r(20, 0.85), r(200, 0.6)], &baselines),
            Some((200, 0.6, 0.7))
        );
    }

    #[test]
    fn defaults_and_validation_name_the_field() {
        let c = cfg();
        assert_eq!(c.k, vec![20, 200]);
        assert_eq!(c.every_steps, 500);
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.k = vec![0];
        assert!(bad.validate().unwrap_err().to_string().contains("eval.k"));
        let mut bad = c.clone();
        bad.every_steps = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eval.every_steps"));
        let mut bad = c;
        bad.temperature = 0.0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eval.temperature"));
        assert!(
            toml::from_str::<KnnEvalConfig>("train_url = \"a\"\ntest_url = \"b\"\nbogus = 1")
                .is_err()
        );
    }
}
