//! The training loop of `odcd run`, on its own OS thread (tensor math never runs on a tokio
//! worker), as named phases:
//!
//! 1. [`TrainLoop::warm_up`]: a fresh run buffers the first `odc.warmup_samples` distinct
//!    samples (BatchNorm calibrated on the first batches if asked) and clusters their
//!    features: the initial ODC memory.
//! 2. The step: the next batch (buffered warm-up batches first) trains one ODC step.
//! 3. [`TrainLoop::publish_embeddings`]: the step's normalised features to the sinks' queue.
//! 4. [`ProgressWindow`]: one progress line and one history point every `train.log_every`.
//! 5. [`CheckpointSchedule`]: a checkpoint every N steps or T seconds, and one at the end.
//!    Each is a barrier: its manifest is written only once the embeddings sinks have published
//!    every row up to its step (else it fails and is tried again at the next one); a Kafka
//!    source's offsets are committed once the checkpoint covering them is durable.

mod data_parallel;
pub use self::data_parallel::{checkpoint_world, DATA_PARALLEL_KEY};

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{EmbeddingsHandle, SinkMsg, TopologyError};
use crate::checkpoint::{Checkpoint, CheckpointConfig, CheckpointStore};
use crate::decode::BatchStream;
use crate::eval::history::{History, HistoryPoint};
use crate::eval::DaemonEval;
use crate::metrics::Health;
use crate::odc::MemoryStats;
use crate::record::Batch;
use crate::release::{Candidate, ReleaseManager};
use crate::sink::EmbeddingBatch;
use crate::source::{KafkaHandle, SourceState};
use crate::train::{
    LoopPhase, LoopTimes, OdcConfig, StepOutput, TrainConfig, TrainError, TrainMetrics, Trainer,
};

/// What a finished run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub records: u64,
    pub seconds: f64,
    pub last_loss: Option<f32>,
    pub first_loss: Option<f32>,
    pub max_empty_clusters_after_step: usize,
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    /// Records rejected by the data path, all reasons.
    pub rejected: u64,
}

/// The config sections the loop reads (it never sees the whole file).
pub struct LoopSettings {
    pub odc: OdcConfig,
    pub train: TrainConfig,
    /// D, the feature dimension (`model.feat_dim`).
    pub feat_dim: usize,
    /// Publish the embeddings of every N-th step (`embeddings.every_steps`).
    pub embed_every: u64,
    pub checkpoint: Option<CheckpointConfig>,
    /// The run's whole config as JSON, kept in every checkpoint: `odcd eval`, `report` and
    /// `embed` rebuild the model and the eval pipeline from it.
    pub config_json: serde_json::Value,
    /// The model's shape, kept in every checkpoint's metadata for `odcd checkpoint inspect`.
    pub metadata: serde_json::Value,
}

/// The stages the loop reports to and feeds.
pub struct LoopStages {
    pub metrics: TrainMetrics,
    pub health: Health,
    /// Where checkpoints go (with `settings.checkpoint`).
    pub store: Option<CheckpointStore>,
    /// The embeddings sinks' bounded queue and checkpoint barrier.
    pub embeddings: Option<EmbeddingsHandle>,
    /// Kafka source: offsets are committed once a checkpoint covering them is durable.
    pub kafka: Option<KafkaHandle>,
    /// In-daemon evaluation (`[eval]`), on its own thread.
    pub eval: Option<DaemonEval>,
    /// Releases (`[releases]`, rank 0 only): every checkpoint written is offered as a
    /// candidate; the manager judges it and builds releases on its own thread.
    pub releases: Option<ReleaseManager>,
}

/// The loop's state; [`TrainLoop::run`] consumes it.
pub struct TrainLoop {
    pub settings: LoopSettings,
    pub stages: LoopStages,
    pub trainer: Trainer,
    pub batches: BatchStream,
    /// Runs the async parts (reading batches, writing checkpoints) from this thread.
    pub rt: tokio::runtime::Handle,
    pub cancel: CancellationToken,
    /// Step of the checkpoint the run resumed from (none: a fresh start, which warms up).
    pub resumed_from: Option<u64>,
    /// Training curves, saved in checkpoints (for `odcd report`).
    pub history: History,
}

/// Model version of the weights after `step` steps, as published with embeddings.
fn model_version(step: u64) -> String {
    format!("step-{step:012}")
}

/// The mutable part of a run: batches read but not trained yet, the summary.
struct Progress {
    /// Batches read during the warm-up, each with the source position that covers it.
    pending: VecDeque<(Batch, SourceState)>,
    /// The source ended.
    ended: bool,
    /// The first step whose embeddings never reached the sinks (the task stopped, or the
    /// shutdown wait ran out): no checkpoint may cover it.
    unqueued_step: Option<u64>,
    /// Step and manifest id of the last checkpoint written.
    last_checkpoint: Option<(u64, String)>,
    summary: RunSummary,
}

impl TrainLoop {
    /// Trains until the source ends, `train.max_steps` is reached or `cancel` fires (then the
    /// step in flight finishes); writes a last checkpoint and the final weights.
    pub fn run(mut self) -> Result<RunSummary, TopologyError> {
        let t_start = Instant::now();
        let mut p = Progress {
            pending: VecDeque::new(),
            ended: false,
            unqueued_step: None,
            last_checkpoint: None,
            summary: RunSummary {
                resumed_from: self.resumed_from,
                ..RunSummary::default()
            },
        };
        if self.resumed_from.is_none() {
            let warmed = if self.collective().size() > 1 {
                self.warm_up_distributed(&mut p)?
            } else {
                self.warm_up(&mut p)?
            };
            if !warmed {
                return Ok(p.summary); // stopped during the warm-up
            }
        }
        let metrics = self.stages.metrics.clone();
        metrics.observe_memory(&self.trainer.memory_stats());
        metrics.step.set(self.trainer.step_count() as i64);
        self.stages.health.set_training(true);

        // The source position covering every trained batch: what a checkpoint stores.
        let mut trained_state = match self.resumed_from {
            // nothing pulled yet: the stream's state is the checkpointed position
            Some(_) => self.batches.state().clone(),
            None => SourceState::default(),
        };
        let mut schedule =
            CheckpointSchedule::new(self.settings.checkpoint.as_ref(), self.trainer.step_count());
        let mut window = ProgressWindow::new();
        // Seconds of the last pass's progress line and checkpoint, counted in the next pass.
        let mut carried_other = 0.0;
        loop {
            // With several ranks the stop is agreed in `next_batch_agreed`, at the same step.
            if self.collective().size() == 1 && self.cancel.is_cancelled() {
                tracing::info!("stop requested: finishing after the step in flight");
                break;
            }
            if self
                .settings
                .train
                .max_steps
                .is_some_and(|m| self.trainer.step_count() >= m)
            {
                break;
            }
            let t_wait = Instant::now();
            let Some((batch, state)) = self.next_batch_agreed(&mut p)? else {
                break;
            };
            metrics.batch_queue_depth.set(self.batches.queued() as i64);
            let waited = t_wait.elapsed().as_secs_f64();
            metrics.input_wait_seconds.inc_by(waited);
            let mut times = LoopTimes::default();
            times.add(LoopPhase::InputWait, waited);

            let t_step = Instant::now();
            let out = self.trainer.step(&batch.images, &batch.keys)?;
            times.add_step(&out.timings, t_step.elapsed().as_secs_f64());
            trained_state = state;
            window.trained(batch.keys.len());
            let s = &mut p.summary;
            s.steps = out.step + 1;
            s.first_loss.get_or_insert(out.loss);
            s.last_loss = Some(out.loss);
            let stats = self.trainer.memory_stats();
            metrics.observe_step(&out, out.reseeded.len(), batch.keys.len());
            metrics.observe_memory(&stats);
            s.max_empty_clusters_after_step =
                s.max_empty_clusters_after_step.max(stats.empty_clusters);

            let t_publish = Instant::now();
            if !self.publish_embeddings(&out, &batch) {
                p.unqueued_step.get_or_insert(out.step + 1);
            }
            times.add(LoopPhase::Publish, t_publish.elapsed().as_secs_f64());
            if let Some(ev) = &self.stages.eval {
                let trainer = &self.trainer;
                ev.after_step(trainer.step_count(), || trainer.model().to_safetensors());
            }
            // The rest of the pass so far (metrics, evaluation hand-off), and the log line and
            // checkpoint of the previous pass: counted before this pass's progress line.
            times.add(
                LoopPhase::Other,
                t_wait.elapsed().as_secs_f64() - times.total() + carried_other,
            );
            metrics.observe_loop(&times);
            window.add(&times);
            let t_tail = Instant::now();
            if (out.step + 1) % self.settings.train.log_every == 0 {
                self.log_progress(&out, &stats, &mut window);
            }
            if self.agree_checkpoint(schedule.due(self.trainer.step_count()))? {
                // A failed checkpoint is tried again at the next checkpoint moment.
                self.checkpoint(&trained_state, &mut p, false);
                schedule.written(self.trainer.step_count());
            }
            carried_other = t_tail.elapsed().as_secs_f64();
        }
        self.stages.health.set_training(false);
        // The run ended by itself (max_steps, the source's end), not by a stop request: its
        // last checkpoint is the release candidate that matters most.
        let ended_by_itself = !self.cancel.is_cancelled();
        // Final checkpoint at shutdown (unless nothing was trained since the last one), through
        // the same barrier.
        if schedule.enabled() && self.trainer.step_count() > schedule.last_step {
            self.checkpoint(&trained_state, &mut p, ended_by_itself);
        } else if ended_by_itself {
            // The last scheduled checkpoint holds these very weights.
            if let Some((step, id)) = p.last_checkpoint.clone() {
                if step == self.trainer.step_count() {
                    match self.trainer.model().to_safetensors() {
                        Ok(w) => self.offer_candidate(step, id, w, true),
                        Err(e) => {
                            tracing::error!("cannot offer the last checkpoint as a release: {e}")
                        }
                    }
                }
            }
        }
        if let Some(releases) = self.stages.releases.take() {
            if ended_by_itself {
                tracing::info!("finishing the release work before exiting (SIGTERM stops it; the next start resumes it)");
            }
            releases.finish(ended_by_itself);
        }
        // Parameters are identical on every rank: rank 0 writes them.
        let weights_path = self.settings.train.save_weights.as_ref();
        if let Some(path) = weights_path.filter(|_| self.collective().is_root()) {
            let bytes = self
                .trainer
                .model()
                .to_safetensors()
                .map_err(TrainError::from)?;
            std::fs::write(path, bytes).map_err(|e| TopologyError::SaveWeights {
                path: path.clone(),
                message: e.to_string(),
            })?;
            tracing::info!(path = %path, "weights written");
        }
        p.summary.steps = self.trainer.step_count();
        p.summary.seconds = t_start.elapsed().as_secs_f64();
        Ok(p.summary)
    }

    /// The next batch to train: the warm-up's buffered batches first, then the stream.
    fn next_batch(&mut self, p: &mut Progress) -> Option<(Batch, SourceState)> {
        if let Some(b) = p.pending.pop_front() {
            return Some(b);
        }
        if p.ended {
            return None;
        }
        let batch = self.read_batch()?;
        p.summary.records += batch.keys.len() as u64;
        Some((batch, self.batches.state().clone()))
    }

    /// Reads the stream's next batch into `p.pending` (the warm-up trains it later); false
    /// when the stream ended (`p.ended`) or `cancel` fired.
    fn read_into_pending(&mut self, p: &mut Progress) -> bool {
        let Some(batch) = self.read_batch() else {
            p.ended = true;
            return false;
        };
        p.summary.records += batch.keys.len() as u64;
        p.pending.push_back((batch, self.batches.state().clone()));
        true
    }

    /// The stream's next batch, or `None` when it ended or `cancel` fired.
    fn read_batch(&mut self) -> Option<Batch> {
        let (batches, cancel) = (&mut self.batches, &self.cancel);
        self.rt.block_on(async {
            tokio::select! {
                b = batches.next() => b,
                _ = cancel.cancelled() => None,
            }
        })
    }

    /// Phase 1 (fresh runs): buffer the first W distinct samples and cluster their eval-mode
    /// features. The batches read stay in `p.pending` and are trained first. Returns false
    /// when stopped meanwhile.
    fn warm_up(&mut self, p: &mut Progress) -> Result<bool, TopologyError> {
        let odc = &self.settings.odc;
        let (warmup, k, calibrate) = (
            odc.warmup_samples.max(odc.num_clusters),
            odc.num_clusters,
            odc.bn_calibration_batches,
        );
        let d = self.settings.feat_dim;
        tracing::info!(warmup, k, "collecting the warm-up buffer");
        if calibrate > 0 {
            // The first batches are read before any is embedded: BatchNorm is calibrated on
            // them first.
            while p.pending.len() < calibrate {
                if self.cancel.is_cancelled() {
                    return Ok(false);
                }
                if !self.read_into_pending(p) {
                    break;
                }
            }
            let t = Instant::now();
            let images: Vec<&candle_core::Tensor> =
                p.pending.iter().map(|(b, _)| &b.images).collect();
            let used = self.trainer.calibrate_batchnorm(&images)?;
            tracing::info!(
                batches = used,
                seconds = format!("{:.2}", t.elapsed().as_secs_f64()),
                "BatchNorm calibrated on the first warm-up batches"
            );
        }
        let mut buffer = WarmupBuffer::new(warmup, d);
        for (batch, _) in &p.pending {
            buffer.add(&self.trainer, batch)?;
        }
        while !p.ended && !buffer.full() {
            if self.cancel.is_cancelled() {
                return Ok(false);
            }
            if !self.read_into_pending(p) {
                break;
            }
            if let Some((batch, _)) = p.pending.back() {
                buffer.add(&self.trainer, batch)?;
            }
        }
        if buffer.keys.len() < k && self.cancel.is_cancelled() {
            return Ok(false);
        }
        self.cluster_warmup(buffer, k, true)?;
        Ok(true)
    }

    /// The end of the warm-up, on one process or every rank: the initial k-means over the
    /// buffer (an error if it holds fewer than `k` samples), logged where `log`.
    fn cluster_warmup(
        &mut self,
        buffer: WarmupBuffer,
        k: usize,
        log: bool,
    ) -> Result<(), TopologyError> {
        if buffer.keys.len() < k {
            return Err(TopologyError::TooFewSamples {
                got: buffer.keys.len(),
                k,
            });
        }
        let init = self.trainer.initial_clustering(buffer.keys, buffer.feats)?;
        if log {
            tracing::info!(
                samples = init.samples,
                seconds = format!("{:.2}", init.seconds),
                empty_after_kmeans = init.empty_after_kmeans,
                empty_after_fix = init.empty_after_fix,
                min_size = init.min_size,
                max_size = init.max_size,
                "initial clustering done"
            );
        }
        Ok(())
    }

    /// Phase 3: the step's L2-normalised features, its cluster labels and the batch's keys
    /// to the sinks' bounded queue (a slow or failing sink slows training rather than growing
    /// memory). Returns false when the rows could not be queued: the sink task stopped, or a
    /// stop was requested and the queue stayed full past the checkpoint timeout.
    fn publish_embeddings(&self, out: &StepOutput, batch: &Batch) -> bool {
        let Some(tx) = &self.stages.embeddings else {
            return true;
        };
        if !out.step.is_multiple_of(self.settings.embed_every) {
            return true;
        }
        let d = self.settings.feat_dim;
        let mut embeddings = out.features.clone();
        crate::odc::normalise_rows(&mut embeddings, d);
        let rows = EmbeddingBatch {
            keys: batch.keys.clone(),
            step: out.step + 1,
            model_version: model_version(out.step + 1),
            clusters: out.labels_after.iter().map(|&l| Some(l)).collect(),
            class_labels: batch.class_labels.clone(),
            dim: d,
            embeddings,
        };
        let (cancel, bound) = (&self.cancel, self.sink_wait());
        let permit = self.rt.block_on(async {
            tokio::select! {
                biased;
                p = tx.reserve() => p,
                // Stopping: still wait for the sinks, but bounded, so a dead sink cannot hang
                // shutdown.
                _ = cancel.cancelled() => tokio::time::timeout(bound, tx.reserve()).await.ok().flatten(),
            }
        });
        match permit {
            Some(p) => {
                p.send(SinkMsg::Rows(rows));
                true
            }
            None => {
                tracing::error!(
                    step = out.step + 1,
                    last_error = ?tx.last_error(),
                    "embeddings of this step could not be queued for the sinks; no checkpoint will cover them"
                );
                false
            }
        }
    }

    /// How long a barrier (and, at shutdown, a full queue) may hold the loop:
    /// `checkpoint.timeout_secs`, or 300 s without checkpoints.
    fn sink_wait(&self) -> Duration {
        Duration::from_secs(
            self.settings
                .checkpoint
                .as_ref()
                .map_or(300, |c| c.timeout_secs),
        )
    }

    /// Phase 4: one history point and one progress line; the window restarts.
    fn log_progress(&mut self, out: &StepOutput, stats: &MemoryStats, window: &mut ProgressWindow) {
        let latest = self.stages.eval.as_ref().and_then(|e| e.latest());
        if let Some(l) = &latest {
            self.history.set_baselines(&l.baselines);
        }
        self.history.push(HistoryPoint::new(out, stats, latest));
        let images_per_s = window.images_per_second();
        self.stages.metrics.images_per_second.set(images_per_s);
        tracing::info!(
            step = out.step + 1,
            loss = format!("{:.4}", out.loss),
            acc = format!("{:.3}", out.accuracy),
            change_ratio = format!("{:.4}", out.change_ratio),
            revisited = out.revisited,
            lr = format!("{:.4}", out.lr),
            empty_clusters = stats.empty_clusters,
            small_clusters = stats.small_clusters,
            min_cluster = stats.min_size,
            max_cluster = stats.max_size,
            memory_fill = stats.fill,
            images_per_s = format!("{images_per_s:.1}"),
            input_wait = format!("{:.1}%", 100.0 * window.input_wait_share()),
            time = window.times.shares(),
            "step"
        );
        *window = ProgressWindow::new();
    }

    /// Phase 5: writes a checkpoint covering `source`, after the barrier: the embeddings sinks
    /// first publish every row up to this step (bounded by `checkpoint.timeout_secs`). A
    /// failure of either is reported (metric, `/readyz`, log), never fatal: training goes on
    /// and the next checkpoint tries again. `unqueued`: a step whose rows never reached the
    /// sinks, which no checkpoint may cover.
    fn checkpoint(&self, source: &SourceState, p: &mut Progress, last_of_run: bool) {
        let (Some(store), Some(c)) = (&self.stages.store, &self.settings.checkpoint) else {
            return;
        };
        let (unqueued, summary) = (p.unqueued_step, &mut p.summary);
        let t0 = Instant::now();
        // The weights written, kept for the release manager.
        let written = std::cell::RefCell::new(None);
        let save = |ck: Checkpoint| {
            let res = self
                .rt
                .block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(c.timeout_secs),
                        store.save_live(&ck, self.trainer.memory()),
                    )
                    .await
                })
                .map_err(|_| format!("timed out after {} s", c.timeout_secs))
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map(|m| (m.step, m.id.to_string(), m.total_bytes()));
            if res.is_ok() && self.stages.releases.is_some() {
                *written.borrow_mut() = Some(ck.model_safetensors);
            }
            res
        };
        let res = if self.collective().size() > 1 {
            self.checkpoint_distributed(source, unqueued, save)
        } else {
            self.barrier(unqueued)
                .and_then(|()| self.build_checkpoint(source))
                .and_then(save)
        };
        let (metrics, health) = (&self.stages.metrics, &self.stages.health);
        match res {
            Ok(m) => {
                summary.checkpoints += 1;
                metrics.checkpoints.inc();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                metrics.last_checkpoint_timestamp.set(now);
                health.set_checkpoint(None);
                if let Some(k) = &self.stages.kafka {
                    k.commit(source);
                }
                tracing::info!(
                    step = m.0,
                    id = %m.1,
                    bytes = m.2,
                    seconds = format!("{:.2}", t0.elapsed().as_secs_f64()),
                    "checkpoint written"
                );
                p.last_checkpoint = Some((m.0, m.1.clone()));
                if let Some(weights) = written.take() {
                    self.offer_candidate(m.0, m.1, weights, last_of_run);
                }
            }
            Err(e) => {
                summary.checkpoint_failures += 1;
                metrics.checkpoint_failures.inc();
                tracing::error!(
                    step = self.trainer.step_count(),
                    "checkpoint failed (training goes on): {e}"
                );
                health.set_checkpoint(Some(e));
            }
        }
    }

    /// Offers checkpoint `step` (manifest `id`, `weights`) to the release manager, with the
    /// memory's centroids of that step (each row's cluster).
    fn offer_candidate(&self, step: u64, id: String, weights: Vec<u8>, last_of_run: bool) {
        let Some(releases) = &self.stages.releases else {
            return;
        };
        let memory = self.trainer.memory().memory();
        releases.offer(Candidate {
            step,
            checkpoint_id: id,
            weights,
            centroids: (!memory.is_empty()).then(|| crate::infer::Centroids::of(memory)),
            last_of_run,
        });
    }

    /// The checkpoint barrier: `Ok` once every embedding row queued so far is published.
    fn barrier(&self, unqueued: Option<u64>) -> Result<(), String> {
        if let Some(step) = unqueued {
            return Err(format!(
                "the embeddings of step {step} never reached the sinks; no checkpoint is written past unpublished rows (a restart publishes them again)"
            ));
        }
        let Some(sinks) = &self.stages.embeddings else {
            return Ok(());
        };
        self.rt
            .block_on(sinks.barrier(self.sink_wait()))
            .map_err(|e| format!("not written: {e}"))
    }

    /// Model, optimizer, source position, config and history as one checkpoint (the memory is
    /// written from the trainer in place by `CheckpointStore::save_live`).
    fn build_checkpoint(&self, source: &SourceState) -> Result<Checkpoint, String> {
        let trainer = &self.trainer;
        let mut ck = Checkpoint::new(
            trainer.step_count(),
            trainer
                .model()
                .to_safetensors()
                .map_err(|e| e.to_string())?,
        );
        ck.optimizer = trainer.optimizer().state().map_err(|e| e.to_string())?;
        // The memory is not copied here: `save_live` streams it from the trainer.
        ck.source_state = serde_json::to_value(source).map_err(|e| e.to_string())?;
        ck.rng = serde_json::json!({ "seed": self.settings.train.seed });
        ck.config = self.settings.config_json.clone();
        ck.extra = self.history.into_extra(&ck.extra);
        ck.metadata = self.settings.metadata.clone();
        Ok(ck)
    }
}

/// The warm-up's distinct keys and their eval-mode features, up to `capacity`.
struct WarmupBuffer {
    capacity: usize,
    dim: usize,
    keys: Vec<String>,
    feats: Vec<f32>,
    seen: HashSet<String>,
}

impl WarmupBuffer {
    fn new(capacity: usize, dim: usize) -> Self {
        WarmupBuffer {
            capacity,
            dim,
            keys: Vec::new(),
            feats: Vec::new(),
            seen: HashSet::new(),
        }
    }

    fn full(&self) -> bool {
        self.keys.len() >= self.capacity
    }

    /// Embeds `batch` and keeps the features of its keys not seen before.
    fn add(&mut self, trainer: &Trainer, batch: &Batch) -> Result<(), TrainError> {
        let f = trainer.embed(&batch.images)?;
        self.add_rows(&batch.keys, &f);
        Ok(())
    }

    /// Keeps the rows (`keys`, features `f`) whose keys were not seen before.
    fn add_rows(&mut self, keys: &[String], f: &[f32]) {
        let d = self.dim;
        for (i, key) in keys.iter().enumerate() {
            if self.keys.len() < self.capacity && self.seen.insert(key.clone()) {
                self.keys.push(key.clone());
                self.feats.extend_from_slice(&f[i * d..(i + 1) * d]);
            }
        }
    }
}

/// When the next checkpoint is due: every `every_steps` steps and/or `every_secs` seconds,
/// whichever comes first.
struct CheckpointSchedule {
    every_steps: u64,
    every_secs: u64,
    enabled: bool,
    /// Steps done at the last checkpoint (or at start).
    last_step: u64,
    last_time: Instant,
}

impl CheckpointSchedule {
    fn new(cfg: Option<&CheckpointConfig>, step: u64) -> Self {
        CheckpointSchedule {
            every_steps: cfg.map_or(0, |c| c.every_steps),
            every_secs: cfg.map_or(0, |c| c.every_secs),
            enabled: cfg.is_some(),
            last_step: step,
            last_time: Instant::now(),
        }
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn due(&self, steps_done: u64) -> bool {
        let by_steps = self.every_steps > 0 && steps_done - self.last_step >= self.every_steps;
        let by_time = self.every_secs > 0 && self.last_time.elapsed().as_secs() >= self.every_secs;
        self.enabled && (by_steps || by_time)
    }

    fn written(&mut self, steps_done: u64) {
        self.last_step = steps_done;
        self.last_time = Instant::now();
    }
}

/// Throughput, input wait and where the time went since the last progress line.
struct ProgressWindow {
    start: Instant,
    images: usize,
    /// Phases of the loop passes in this window (a pass's progress line and checkpoint are
    /// counted with the next pass).
    times: LoopTimes,
}

impl ProgressWindow {
    fn new() -> Self {
        ProgressWindow {
            start: Instant::now(),
            images: 0,
            times: LoopTimes::default(),
        }
    }

    fn trained(&mut self, images: usize) {
        self.images += images;
    }

    fn add(&mut self, times: &LoopTimes) {
        for p in LoopPhase::ALL {
            self.times.add(p, times.get(p));
        }
    }

    fn images_per_second(&self) -> f64 {
        self.images as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Share of the window's loop time spent waiting for input (0..1).
    fn input_wait_share(&self) -> f64 {
        self.times.get(LoopPhase::InputWait) / self.times.total().max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_due_by_steps_and_never_without_a_store() {
        let mut c = crate::checkpoint::CheckpointConfig {
            url: "memory:///".into(),
            options: Default::default(),
            every_steps: 20,
            every_secs: 0,
            keep: 3,
            resume: true,
            timeout_secs: 1,
            startup_timeout_secs: 1,
        };
        let mut s = CheckpointSchedule::new(Some(&c), 5);
        assert!(!s.due(24));
        assert!(s.due(25));
        s.written(25);
        assert!(!s.due(44) && s.due(45));
        c.every_steps = 0;
        c.every_secs = 3600;
        assert!(!CheckpointSchedule::new(Some(&c), 0).due(1_000_000));
        assert!(!CheckpointSchedule::new(None, 0).due(1_000_000));
    }

    #[test]
    fn the_progress_window_measures_input_wait_share() {
        let mut w = ProgressWindow::new();
        let mut t = LoopTimes::default();
        t.add(LoopPhase::InputWait, 1.0);
        t.add_step(
            &crate::train::StepTimings {
                forward: 1.0,
                backward: 1.5,
                optimizer: 0.25,
                memory: 0.0,
            },
            3.0,
        );
        w.add(&t);
        w.trained(64);
        assert!((w.input_wait_share() - 0.25).abs() < 1e-12);
        assert!(ProgressWindow::new().input_wait_share() == 0.0);
        assert_eq!(
            w.times.shares(),
            "forward 25.0% backward 37.5% optimizer 6.2% memory 0.0% step_other 6.2% \
             input_wait 25.0% publish 0.0% other 0.0%"
        );
    }
}
