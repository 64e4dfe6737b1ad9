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
use crate::metrics::{Health, TrainMetrics};
use crate::odc::StreamingMemory;
use crate::record::Batch;
use crate::sink::{EmbeddingBatch, ParquetSink, SinkMetrics};
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
    if let (Some(store), Some(c)) = (&store, &cfg.checkpoint) {
        if c.resume {
            if let Some((m, ckpt)) = store.load_latest_valid().await? {
                resume = restore(&mut trainer, &ckpt)?;
                resumed_from = Some(ckpt.step);
                tracing::info!(step = ckpt.step, id = %m.id, "resumed from checkpoint");
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

    let handle = tokio::runtime::Handle::current();
    let trainer_cancel = cancel.clone();
    let ctx = LoopCtx {
        metrics: train_metrics,
        health,
        store,
        sink_tx,
        resumed_from,
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
    let mut sink = ParquetSink::open(&e.url, &e.options, e.parquet.clone())?;
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
        while keys.len() < warmup {
            if cancel.is_cancelled() {
                return Ok(summary);
            }
            let Some(batch) = rt.block_on(next_or_cancel(&mut stream, &cancel)) else {
                ended = true;
                break;
            };
            summary.records += batch.keys.len() as u64;
            let f = trainer.embed(&batch.images)?;
            for (i, key) in batch.keys.iter().enumerate() {
                if keys.len() < warmup && seen.insert(key.clone()) {
                    keys.push(key.clone());
                    feats.extend_from_slice(&f[i * d..(i + 1) * d]);
                }
            }
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

        if (out.step + 1) % cfg.train.log_every == 0 {
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
