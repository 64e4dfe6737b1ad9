//! Wiring of `odcd run`: source → decode (rayon) → trainer (+ ODC memory) → sinks, joined by
//! bounded channels, with checkpoints, resume and graceful shutdown. The trainer runs on its
//! own OS thread: tensor math never runs on a tokio worker.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::config::{CheckpointConfig, Config, EmbeddingsConfig};
use crate::decode::BatchStream;
use crate::eval::history::{History, HistoryPoint};
use crate::eval::DaemonEval;
use crate::metrics::{Health, TrainMetrics};
use crate::odc::StreamingMemory;
use crate::record::Batch;
use crate::sink::{EmbeddingBatch, EmbeddingSinks, SinkMetrics};
use crate::source::{DataMetrics, SourceState};
use crate::train::{TrainError, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("data pipeline: {0}")]
    Pipeline(#[from] crate::decode::PipelineError),
    #[error("device: {0}")]
    Device(#[from] crate::device::DeviceError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the source ended after {got} samples, before the warm-up buffer was full; the initial clustering needs at least odc.num_clusters = {k} distinct samples: add data or lower odc.num_clusters")]
    TooFewSamples { got: usize, k: usize },
    #[error("cannot write weights to {path}: {message}")]
    SaveWeights { path: String, message: String },
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("cannot resume from checkpoint step {step}: {message}")]
    Resume { step: u64, message: String },
    #[error("embeddings sink: {0}")]
    Sink(#[from] crate::sink::SinkError),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("trainer thread failed: {0}")]
    Thread(String),
    #[error("evaluation: {0}")]
    Eval(#[from] crate::eval::EvalError),
}

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

/// Runs the daemon's main job until the source ends, `train.max_steps` is reached or `cancel`
/// fires (then the step in flight finishes, a checkpoint is written and the sinks flushed).
/// Must be called inside a tokio runtime.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<RunSummary, RunError> {
    let device = crate::device::select_device(&cfg.train.device)?;
    let registry = prometheus::Registry::new();
    let data_metrics = DataMetrics::register(&registry)?;
    let train_metrics = TrainMetrics::register(&registry)?;
    let health = Health::new();
    if cfg.metrics.enabled {
        let addr = crate::metrics::serve(
            &cfg.metrics.listen,
            registry.clone(),
            health.clone(),
            cancel.clone(),
        )
        .await
        .map_err(RunError::Listen)?;
        tracing::info!("metrics on http://{addr}/metrics (also /healthz, /readyz)");
    }

    let mut trainer = Trainer::new(
        &cfg.model,
        &cfg.odc,
        &cfg.optimizer,
        &device,
        cfg.train.seed,
    )?;

    // Resume: model, optimizer, memory, step and source positions from the latest valid
    // checkpoint.
    let store = match &cfg.checkpoint {
        Some(c) => Some(CheckpointStore::open(&c.url, &c.options, c.keep)?),
        None => None,
    };
    let mut resume = SourceState::default();
    let mut resumed_from = None;
    let mut history = History::default();
    if let (Some(store), Some(c)) = (&store, &cfg.checkpoint) {
        if c.resume {
            let retry = StartupRetry {
                timeout: Duration::from_secs(c.startup_timeout_secs),
                first_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(30),
            };
            let latest = retry
                .run(&health, &cancel, || store.load_latest_valid())
                .await?;
            match latest {
                None => return Ok(RunSummary::default()), // cancelled while waiting
                Some(Some((m, ckpt))) => {
                    resume = restore(&mut trainer, &ckpt)?;
                    history = History::from_extra(&ckpt.extra);
                    resumed_from = Some(ckpt.step);
                    tracing::info!(step = ckpt.step, id = %m.id, "resumed from checkpoint");
                }
                Some(None) => {}
            }
        }
    }

    // Embeddings sink: its own task, fed through a bounded channel.
    let (sink_tx, sink_task, sink_metrics) = match &cfg.embeddings {
        Some(e) => {
            let (tx, task, m) = spawn_sink(e, &registry)?;
            (Some(tx), Some(task), Some(m))
        }
        None => (None, None, None),
    };

    let stream = BatchStream::from_config(
        cfg.source.clone(),
        cfg.pipeline.clone(),
        data_metrics.clone(),
        resume,
        cancel.child_token(),
    )?;
    health.set_source_ok(true);
    let kafka = stream.kafka();
    if let Some(k) = &kafka {
        // `/readyz` follows the broker connection.
        k.report_to(health.clone(), cancel.clone());
    }

    let handle = tokio::runtime::Handle::current();
    let eval = match &cfg.eval {
        Some(e) => Some(DaemonEval::spawn(
            &cfg,
            e,
            &registry,
            handle.clone(),
            cancel.clone(),
        )?),
        None => None,
    };
    let trainer_cancel = cancel.clone();
    let ctx = LoopCtx {
        metrics: train_metrics,
        health,
        store,
        sink_tx,
        resumed_from,
        kafka,
        history: std::cell::RefCell::new(history),
        eval,
    };
    let join = std::thread::Builder::new()
        .name("odcd-trainer".into())
        .spawn(move || train_loop(cfg, trainer, stream, handle, trainer_cancel, ctx))
        .map_err(|e| RunError::Thread(e.to_string()))?;
    // Wait for the trainer without blocking a runtime worker.
    let res = tokio::task::spawn_blocking(move || join.join())
        .await
        .map_err(|e| RunError::Thread(e.to_string()))?
        .map_err(|_| RunError::Thread("the trainer thread panicked".into()))?;
    let res = res.map(|mut s| {
        s.rejected = crate::source::RejectReason::ALL
            .iter()
            .map(|&r| data_metrics.rejected_count(r))
            .sum();
        s
    });
    // The trainer dropped its sender: the sink flushes what it holds and ends.
    if let Some(task) = sink_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("embeddings sink: {e}"),
            Err(e) => tracing::error!("embeddings sink task failed: {e}"),
        }
        if let Some(m) = sink_metrics {
            tracing::info!(
                rows = m.rows_published.load(std::sync::atomic::Ordering::Relaxed),
                files = m.files_published.load(std::sync::atomic::Ordering::Relaxed),
                "embeddings flushed"
            );
        }
    }
    res
}

/// Retries a start-up read of the checkpoint store while the store is unreachable: starting
/// fresh instead would silently throw away the training the store holds. `/readyz` says why the
/// daemon is waiting; a damaged checkpoint or a bad configuration is not retried.
struct StartupRetry {
    /// Give up after this long (zero: never).
    timeout: Duration,
    first_backoff: Duration,
    max_backoff: Duration,
}

impl StartupRetry {
    /// `Ok(None)` when `cancel` fired while waiting.
    async fn run<T, F, Fut>(
        &self,
        health: &Health,
        cancel: &CancellationToken,
        mut attempt: F,
    ) -> Result<Option<T>, crate::checkpoint::CheckpointError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::checkpoint::CheckpointError>>,
    {
        let started = Instant::now();
        let mut backoff = self.first_backoff.min(self.max_backoff);
        loop {
            let res = tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                r = attempt() => r,
            };
            match res {
                Ok(v) => {
                    health.set_startup_blocked(None);
                    return Ok(Some(v));
                }
                Err(e)
                    if e.is_transport()
                        && (self.timeout.is_zero() || started.elapsed() < self.timeout) =>
                {
                    tracing::error!(
                        retry_in_secs = backoff.as_secs_f64(),
                        "cannot read the checkpoint store to resume: {e}; retrying (checkpoint.startup_timeout_secs bounds the wait)"
                    );
                    health.set_startup_blocked(Some(format!(
                        "checkpoint store unreachable, retrying: {e}"
                    )));
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Restores trainer state from a checkpoint; returns the source resume position.
fn restore(trainer: &mut Trainer, ckpt: &Checkpoint) -> Result<SourceState, RunError> {
    let err = |message: String| RunError::Resume {
        step: ckpt.step,
        message,
    };
    trainer
        .model()
        .load_safetensors(&ckpt.model_safetensors)
        .map_err(|e| err(format!("model: {e}")))?;
    trainer
        .optimizer_mut()
        .load_state(&ckpt.optimizer)
        .map_err(|e| err(format!("optimizer: {e}")))?;
    let Some(state) = &ckpt.memory else {
        return Err(err("the checkpoint holds no ODC memory".into()));
    };
    let mem = StreamingMemory::import(state).map_err(|e| err(format!("ODC memory: {e}")))?;
    if mem.config().k != trainer.memory().config().k
        || mem.config().dim != trainer.memory().config().dim
    {
        return Err(err(format!(
            "its memory has K = {}, D = {} but the config asks for K = {}, D = {}: use another checkpoint.url for a new configuration",
            mem.config().k,
            mem.config().dim,
            trainer.memory().config().k,
            trainer.memory().config().dim
        )));
    }
    *trainer.memory_mut() = mem;
    trainer.set_step(ckpt.step);
    let source: SourceState = if ckpt.source_state.is_null() {
        SourceState::default()
    } else {
        serde_json::from_value(ckpt.source_state.clone())
            .map_err(|e| err(format!("source position: {e}")))?
    };
    Ok(source)
}

/// The embeddings sink's input, its task and its counters.
type SinkParts = (
    mpsc::Sender<EmbeddingBatch>,
    tokio::task::JoinHandle<Result<(), crate::sink::SinkError>>,
    std::sync::Arc<SinkMetrics>,
);

fn spawn_sink(
    e: &EmbeddingsConfig,
    registry: &prometheus::Registry,
) -> Result<SinkParts, RunError> {
    let mut sink = EmbeddingSinks::open(e, Some(registry), false, false)?;
    let m = sink.metrics();
    let rows = prometheus::IntCounter::new(
        "odcd_sink_rows_total",
        "Embedding rows published to Parquet files",
    )?;
    let errors = prometheus::IntCounter::new(
        "odcd_sink_errors_total",
        "Embedding sink write / publish failures",
    )?;
    registry.register(Box::new(rows.clone()))?;
    registry.register(Box::new(errors.clone()))?;
    let (tx, mut rx) = mpsc::channel::<EmbeddingBatch>(e.queue);
    let age = e.parquet.max_file_age_secs;
    let mm = m.clone();
    let task = tokio::spawn(async move {
        let sync = |rows: &prometheus::IntCounter, errors: &prometheus::IntCounter| {
            use std::sync::atomic::Ordering::Relaxed;
            rows.inc_by(mm.rows_published.load(Relaxed).saturating_sub(rows.get()));
            errors.inc_by(mm.errors.load(Relaxed).saturating_sub(errors.get()));
        };
        let mut tick = tokio::time::interval(Duration::from_secs(age.clamp(1, 30)));
        loop {
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => {
                        if let Err(e) = sink.write(b).await {
                            tracing::error!("embeddings sink write failed: {e}");
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if age > 0 {
                        if let Err(e) = sink.flush_if_older(age).await {
                            tracing::error!("embeddings sink flush failed: {e}");
                        }
                    }
                }
            }
            sync(&rows, &errors);
        }
        let res = sink.close().await;
        sync(&rows, &errors);
        res
    });
    Ok((tx, task, m))
}

struct LoopCtx {
    metrics: TrainMetrics,
    health: Health,
    store: Option<CheckpointStore>,
    sink_tx: Option<mpsc::Sender<EmbeddingBatch>>,
    resumed_from: Option<u64>,
    /// Kafka source: offsets are committed once a checkpoint covering them is durable.
    kafka: Option<crate::source::KafkaHandle>,
    /// Training curves, saved in checkpoints (for `odcd report`).
    history: std::cell::RefCell<History>,
    /// In-daemon evaluation (`[eval]`), on its own thread.
    eval: Option<DaemonEval>,
}

/// Writes a checkpoint from the trainer thread; failures are reported, never fatal.
fn checkpoint(
    rt: &tokio::runtime::Handle,
    (store, c): (&CheckpointStore, &CheckpointConfig),
    trainer: &Trainer,
    source: &SourceState,
    cfg: &Config,
    ctx: &LoopCtx,
    summary: &mut RunSummary,
) {
    let t0 = Instant::now();
    let built = (|| -> Result<Checkpoint, String> {
        let mut ck = Checkpoint::new(
            trainer.step_count(),
            trainer
                .model()
                .to_safetensors()
                .map_err(|e| e.to_string())?,
        );
        ck.optimizer = trainer.optimizer().state().map_err(|e| e.to_string())?;
        ck.memory = Some(trainer.memory().export());
        ck.source_state = serde_json::to_value(source).map_err(|e| e.to_string())?;
        ck.rng = serde_json::json!({ "seed": cfg.train.seed });
        ck.config = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
        ck.extra = ctx.history.borrow().into_extra(&ck.extra);
        ck.metadata = serde_json::json!({
            "arch": cfg.model.arch,
            "in_channels": cfg.model.in_channels,
            "feat_dim": cfg.model.feat_dim,
            "num_clusters": cfg.odc.num_clusters,
            "memory_capacity": cfg.odc.memory_capacity,
        });
        Ok(ck)
    })();
    let res = match built {
        Ok(ck) => rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(c.timeout_secs), store.save(&ck)).await
            })
            .map_err(|_| format!("timed out after {} s", c.timeout_secs))
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e),
    };
    match res {
        Ok(m) => {
            summary.checkpoints += 1;
            ctx.metrics.checkpoints.inc();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            ctx.metrics.last_checkpoint_timestamp.set(now);
            ctx.health.set_checkpoint(None);
            if let Some(k) = &ctx.kafka {
                k.commit(source);
            }
            tracing::info!(
                step = m.step,
                id = %m.id,
                bytes = m.total_bytes(),
                seconds = format!("{:.2}", t0.elapsed().as_secs_f64()),
                "checkpoint written"
            );
        }
        Err(e) => {
            summary.checkpoint_failures += 1;
            ctx.metrics.checkpoint_failures.inc();
            tracing::error!(
                step = trainer.step_count(),
                "checkpoint failed (training goes on): {e}"
            );
            ctx.health.set_checkpoint(Some(e));
        }
    }
}

fn train_loop(
    cfg: Config,
    mut trainer: Trainer,
    mut stream: BatchStream,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
    ctx: LoopCtx,
) -> Result<RunSummary, RunError> {
    let t_start = Instant::now();
    let metrics = ctx.metrics.clone();
    let mut summary = RunSummary {
        resumed_from: ctx.resumed_from,
        ..RunSummary::default()
    };
    // Batches read but not trained yet, each with the source position that covers it.
    let mut pending: std::collections::VecDeque<(Batch, SourceState)> = Default::default();
    let mut ended = false;

    if ctx.resumed_from.is_none() {
        // Warm-up: buffer the first W distinct samples, cluster their eval-mode features.
        let warmup = cfg.odc.warmup_samples.max(cfg.odc.num_clusters);
        let (mut keys, mut feats) = (Vec::new(), Vec::new());
        let mut seen = HashSet::new();
        let d = cfg.model.feat_dim;
        tracing::info!(
            warmup,
            k = cfg.odc.num_clusters,
            "collecting the warm-up buffer"
        );
        let calibrate = cfg.odc.bn_calibration_batches;
        if calibrate > 0 {
            // The first batches are read before any is embedded: BatchNorm is calibrated
            // on them first.
            while pending.len() < calibrate {
                if cancel.is_cancelled() {
                    return Ok(summary);
                }
                let Some(batch) = rt.block_on(next_or_cancel(&mut stream, &cancel)) else {
                    ended = true;
                    break;
                };
                summary.records += batch.keys.len() as u64;
                pending.push_back((batch, stream.state().clone()));
            }
            let t = Instant::now();
            let images: Vec<&candle_core::Tensor> =
                pending.iter().map(|(b, _)| &b.images).collect();
            let used = trainer.calibrate_batchnorm(&images)?;
            tracing::info!(
                batches = used,
                seconds = format!("{:.2}", t.elapsed().as_secs_f64()),
                "BatchNorm calibrated on the first warm-up batches"
            );
        }
        // Eval-mode features of a batch's new keys, until the buffer is full (returns
        // whether it is).
        let mut add = |batch: &Batch| -> Result<bool, RunError> {
            let f = trainer.embed(&batch.images)?;
            for (i, key) in batch.keys.iter().enumerate() {
                if keys.len() < warmup && seen.insert(key.clone()) {
                    keys.push(key.clone());
                    feats.extend_from_slice(&f[i * d..(i + 1) * d]);
                }
            }
            Ok(keys.len() >= warmup)
        };
        let mut full = false;
        for (batch, _) in &pending {
            full = add(batch)?;
        }
        while !ended && !full {
            if cancel.is_cancelled() {
                return Ok(summary);
            }
            let Some(batch) = rt.block_on(next_or_cancel(&mut stream, &cancel)) else {
                ended = true;
                break;
            };
            summary.records += batch.keys.len() as u64;
            full = add(&batch)?;
            pending.push_back((batch, stream.state().clone()));
        }
        if keys.len() < cfg.odc.num_clusters {
            if cancel.is_cancelled() {
                return Ok(summary);
            }
            return Err(RunError::TooFewSamples {
                got: keys.len(),
                k: cfg.odc.num_clusters,
            });
        }
        let init = trainer.initial_clustering(keys, feats)?;
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
    metrics.observe_memory(&trainer.memory().stats());
    metrics.step.set(trainer.step_count() as i64);
    ctx.health.set_training(true);

    // The source position covering every trained batch: what a checkpoint stores.
    let mut trained_state = match ctx.resumed_from {
        // nothing pulled yet: the stream's state is the checkpointed position
        Some(_) => stream.state().clone(),
        None => SourceState::default(),
    };
    let mut last_ckpt_step = trainer.step_count();
    let mut last_ckpt_time = Instant::now();
    let (mut wait_s, mut busy_s, mut window_imgs) = (0.0f64, 0.0f64, 0usize);
    let mut window_start = Instant::now();
    let version = |step: u64| format!("step-{step:012}");
    loop {
        if cancel.is_cancelled() {
            tracing::info!("stop requested: finishing after the step in flight");
            break;
        }
        if cfg
            .train
            .max_steps
            .is_some_and(|m| trainer.step_count() >= m)
        {
            break;
        }
        let t_wait = Instant::now();
        let (batch, state) = match pending.pop_front() {
            Some(b) => b,
            None if ended => break,
            None => match rt.block_on(next_or_cancel(&mut stream, &cancel)) {
                Some(b) => {
                    summary.records += b.keys.len() as u64;
                    (b, stream.state().clone())
                }
                None => break,
            },
        };
        metrics.batch_queue_depth.set(stream.queued() as i64);
        let waited = t_wait.elapsed().as_secs_f64();
        wait_s += waited;
        metrics.input_wait_seconds.inc_by(waited);
        let t_step = Instant::now();
        let out = trainer.step(&batch.images, &batch.keys)?;
        trained_state = state;
        busy_s += t_step.elapsed().as_secs_f64();
        window_imgs += batch.keys.len();
        summary.steps = out.step + 1;
        summary.first_loss.get_or_insert(out.loss);
        summary.last_loss = Some(out.loss);
        let stats = trainer.memory().stats();
        metrics.observe_step(&out, out.reseeded.len(), batch.keys.len());
        metrics.observe_memory(&stats);
        summary.max_empty_clusters_after_step = summary
            .max_empty_clusters_after_step
            .max(stats.empty_clusters);

        if let (Some(tx), Some(e)) = (&ctx.sink_tx, &cfg.embeddings) {
            if out.step % e.every_steps == 0 {
                let d = cfg.model.feat_dim;
                let mut emb = out.features.clone();
                for row in emb.chunks_mut(d) {
                    let n = row.iter().map(|v| v * v).sum::<f32>().sqrt() + 1e-10;
                    row.iter_mut().for_each(|v| *v /= n);
                }
                let rows = EmbeddingBatch {
                    keys: batch.keys.clone(),
                    step: out.step + 1,
                    model_version: version(out.step + 1),
                    clusters: out.labels_after.iter().map(|&l| Some(l)).collect(),
                    class_labels: batch.class_labels.clone(),
                    dim: d,
                    embeddings: emb,
                };
                // Bounded: a slow sink slows training rather than growing memory.
                if tx.blocking_send(rows).is_err() {
                    tracing::error!("embeddings sink stopped; embeddings are no longer published");
                }
            }
        }

        if let Some(ev) = &ctx.eval {
            ev.after_step(trainer.step_count(), || trainer.model().to_safetensors());
        }

        if (out.step + 1) % cfg.train.log_every == 0 {
            ctx.history.borrow_mut().push(HistoryPoint::new(
                &out,
                &stats,
                ctx.eval.as_ref().and_then(|e| e.latest()),
            ));
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            metrics.images_per_second.set(window_imgs as f64 / secs);
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
                images_per_s = format!("{:.1}", window_imgs as f64 / secs),
                input_wait = format!("{:.1}%", 100.0 * wait_s / (wait_s + busy_s).max(1e-9)),
                "step"
            );
            (wait_s, busy_s, window_imgs) = (0.0, 0.0, 0);
            window_start = Instant::now();
        }

        if let (Some(store), Some(c)) = (&ctx.store, &cfg.checkpoint) {
            let by_steps =
                c.every_steps > 0 && trainer.step_count() - last_ckpt_step >= c.every_steps;
            let by_time = c.every_secs > 0 && last_ckpt_time.elapsed().as_secs() >= c.every_secs;
            if by_steps || by_time {
                checkpoint(
                    &rt,
                    (store, c),
                    &trainer,
                    &trained_state,
                    &cfg,
                    &ctx,
                    &mut summary,
                );
                last_ckpt_step = trainer.step_count();
                last_ckpt_time = Instant::now();
            }
        }
    }
    ctx.health.set_training(false);
    // Final checkpoint at shutdown (unless nothing was trained since the last one).
    if let (Some(store), Some(c)) = (&ctx.store, &cfg.checkpoint) {
        if trainer.step_count() > last_ckpt_step {
            checkpoint(
                &rt,
                (store, c),
                &trainer,
                &trained_state,
                &cfg,
                &ctx,
                &mut summary,
            );
        }
    }
    if let Some(path) = &cfg.train.save_weights {
        let bytes = trainer.model().to_safetensors().map_err(TrainError::from)?;
        std::fs::write(path, bytes).map_err(|e| RunError::SaveWeights {
            path: path.clone(),
            message: e.to_string(),
        })?;
        tracing::info!(path = %path, "weights written");
    }
    summary.steps = trainer.step_count();
    summary.seconds = t_start.elapsed().as_secs_f64();
    Ok(summary)
}

async fn next_or_cancel(stream: &mut BatchStream, cancel: &CancellationToken) -> Option<Batch> {
    tokio::select! {
        b = stream.next() => b,
        _ = cancel.cancelled() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointError;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn unreachable() -> CheckpointError {
        CheckpointError::List {
            url: "s3://ckpt/".into(),
            path: "manifests".into(),
            message: "connection refused".into(),
        }
    }

    fn retry(timeout_ms: u64) -> StartupRetry {
        StartupRetry {
            timeout: Duration::from_millis(timeout_ms),
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn startup_waits_out_an_unreachable_store_and_says_so() {
        let health = Health::new();
        let calls = AtomicU32::new(0);
        let seen_blocked = std::sync::Mutex::new(None);
        let got = retry(0)
            .run(&health, &CancellationToken::new(), || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n == 3 {
                    *seen_blocked.lock().unwrap() = health.not_ready();
                }
                async move {
                    if n < 3 {
                        Err(unreachable())
                    } else {
                        Ok(7u64)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(got, Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let why = seen_blocked.lock().unwrap().clone().unwrap();
        assert!(why.contains("checkpoint store unreachable"), "{why}");
        // Once through, start-up no longer holds readiness back.
        assert!(!health.not_ready().unwrap().contains("unreachable"));
    }

    #[tokio::test]
    async fn a_damaged_checkpoint_or_timeout_is_an_error_not_a_fresh_start() {
        let health = Health::new();
        let corrupt = retry(0)
            .run(&health, &CancellationToken::new(), || async {
                Err::<(), _>(CheckpointError::NoSuchStep {
                    url: "file:///c".into(),
                    step: 3,
                })
            })
            .await;
        assert!(matches!(corrupt, Err(CheckpointError::NoSuchStep { .. })));

        let timed_out = retry(50)
            .run(&health, &CancellationToken::new(), || async {
                Err::<(), _>(unreachable())
            })
            .await;
        assert!(matches!(timed_out, Err(CheckpointError::List { .. })));
    }

    #[tokio::test]
    async fn shutdown_while_waiting_ends_cleanly() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            c2.cancel();
        });
        let got = retry(0)
            .run(&Health::new(), &cancel, || async {
                Err::<(), _>(unreachable())
            })
            .await
            .unwrap();
        assert_eq!(got, None);
    }
}
