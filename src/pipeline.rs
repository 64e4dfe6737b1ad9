//! Wiring of `odcd run`: source → decode (rayon) → trainer (+ ODC memory), joined by bounded
//! channels, with cancellation. The trainer runs on its own OS thread: tensor math never
//! runs on a tokio worker.

use std::collections::HashSet;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Health, TrainMetrics};
use crate::decode::BatchStream;
use crate::record::Batch;
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
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("trainer thread failed: {0}")]
    Thread(String),
}

/// What a finished run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub steps: u64,
    pub records: u64,
    pub seconds: f64,
    pub last_loss: Option<f32>,
    pub first_loss: Option<f32>,
    pub max_empty_clusters_after_step: usize,
}

/// Runs the daemon's main job until the source ends, `train.max_steps` is reached or `cancel`
/// fires (then the step in flight finishes first). Must be called inside a tokio runtime.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<RunSummary, RunError> {
    let device = crate::device::select_device(&cfg.train.device)?;
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry)?;
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
    let stream = BatchStream::from_config(
        cfg.source.clone(),
        cfg.pipeline.clone(),
        metrics,
        SourceState::default(),
        cancel.child_token(),
    )?;
    let handle = tokio::runtime::Handle::current();
    health.set_source_ok(true);
    let trainer_cancel = cancel.clone();
    let ctx = LoopCtx {
        metrics: train_metrics,
        health,
    };
    let join = std::thread::Builder::new()
        .name("odcd-trainer".into())
        .spawn(move || train_loop(cfg, device, stream, handle, trainer_cancel, ctx))
        .map_err(|e| RunError::Thread(e.to_string()))?;
    // Wait for the trainer without blocking a runtime worker.
    tokio::task::spawn_blocking(move || join.join())
        .await
        .map_err(|e| RunError::Thread(e.to_string()))?
        .map_err(|_| RunError::Thread("the trainer thread panicked".into()))?
}

struct LoopCtx {
    metrics: TrainMetrics,
    health: Health,
}

fn train_loop(
    cfg: Config,
    device: candle_core::Device,
    mut stream: BatchStream,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
    ctx: LoopCtx,
) -> Result<RunSummary, RunError> {
    let LoopCtx { metrics, health } = ctx;
    let t_start = Instant::now();
    let mut trainer = Trainer::new(&cfg.model, &cfg.odc, &cfg.optimizer, &device, cfg.train.seed)?;
    let mut summary = RunSummary::default();

    // Warm-up: buffer the first W distinct samples, cluster their eval-mode features.
    let warmup = cfg.odc.warmup_samples.max(cfg.odc.num_clusters);
    let mut buffered: Vec<Batch> = Vec::new();
    let (mut keys, mut feats) = (Vec::new(), Vec::new());
    let mut seen = HashSet::new();
    let d = cfg.model.feat_dim;
    let mut ended = false;
    tracing::info!(warmup, k = cfg.odc.num_clusters, "collecting the warm-up buffer");
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
        buffered.push(batch);
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

    metrics.observe_memory(&trainer.memory().stats());
    health.set_training(true);

    // Then train: the warm-up batches first (no record is skipped), then the stream.
    let mut pending = buffered.into_iter();
    let (mut wait_s, mut busy_s, mut window_imgs) = (0.0f64, 0.0f64, 0usize);
    let mut window_start = Instant::now();
    loop {
        if cancel.is_cancelled() {
            tracing::info!("stop requested: finishing after the step in flight");
            break;
        }
        if cfg.train.max_steps.is_some_and(|m| trainer.step_count() >= m) {
            break;
        }
        let t_wait = Instant::now();
        let batch = match pending.next() {
            Some(b) => b,
            None if ended => break,
            None => match rt.block_on(next_or_cancel(&mut stream, &cancel)) {
                Some(b) => {
                    summary.records += b.keys.len() as u64;
                    b
                }
                None => break,
            },
        };
        let waited = t_wait.elapsed().as_secs_f64();
        wait_s += waited;
        metrics.input_wait_seconds.inc_by(waited);
        let t_step = Instant::now();
        let out = trainer.step(&batch.images, &batch.keys)?;
        busy_s += t_step.elapsed().as_secs_f64();
        window_imgs += batch.keys.len();
        summary.steps = out.step + 1;
        summary.first_loss.get_or_insert(out.loss);
        summary.last_loss = Some(out.loss);
        let stats = trainer.memory().stats();
        metrics.observe_step(&out, out.reseeded.len(), batch.keys.len());
        metrics.observe_memory(&stats);
        summary.max_empty_clusters_after_step =
            summary.max_empty_clusters_after_step.max(stats.empty_clusters);
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
    }
    health.set_training(false);
    if let Some(path) = &cfg.train.save_weights {
        let bytes = trainer
            .model()
            .to_safetensors()
            .map_err(TrainError::from)?;
        std::fs::write(path, bytes).map_err(|e| RunError::SaveWeights {
            path: path.clone(),
            message: e.to_string(),
        })?;
        tracing::info!(path = %path, "weights written");
    }
    summary.seconds = t_start.elapsed().as_secs_f64();
    Ok(summary)
}

async fn next_or_cancel(stream: &mut BatchStream, cancel: &CancellationToken) -> Option<Batch> {
    tokio::select! {
        b = stream.next() => b,
        _ = cancel.cancelled() => None,
    }
}
