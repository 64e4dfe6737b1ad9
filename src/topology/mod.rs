//! The one place that builds the daemon's stages from their config sections and joins them
//! with bounded channels, for `odcd run` and `odcd embed` alike:
//!
//! ```text
//! source (object store / Kafka) ─► decode (rayon) ─► batches ─► train loop / embedder ─► sinks
//!             └─ rejects ─► dead letters                               └─ checkpoints
//! ```
//!
//! - [`data_path`]: source (resumed from a position) → decode → [`BatchStream`], with the
//!   dead-letter writer and, for a Kafka source, the handle that commits offsets.
//! - [`EmbeddingsTask`]: the embeddings sinks on their own task behind a bounded queue.
//! - [`resume`]: the latest valid checkpoint restored into the trainer at start.
//! - [`train_loop`]: what drives the trainer step after step on its own thread.

pub mod resume;
pub mod train_loop;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::deadletter::DeadLetter;
use crate::decode::{BatchDecoder, BatchStream, PipelineConfig};
use crate::sink::{EmbeddingBatch, EmbeddingSinks, EmbeddingsConfig, SinkError, SinkMetrics};
use crate::source::{
    DataMetrics, KafkaHandle, KafkaSource, ObjectStoreSource, SourceConfig, SourceState,
};

/// Errors of building or running the stages; each names the stage and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error("data pipeline: {0}")]
    Pipeline(#[from] crate::decode::PipelineError),
    #[error("source: {0}")]
    Source(#[from] crate::source::SourceError),
    #[error("dead letters: {0}")]
    DeadLetter(#[from] crate::deadletter::DeadLetterError),
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
    Sink(#[from] SinkError),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("trainer thread failed: {0}")]
    Thread(String),
    #[error("evaluation: {0}")]
    Eval(#[from] crate::eval::EvalError),
}

/// The running data path.
pub struct DataPath {
    /// Decoded batches, each with the source position that covers it.
    pub batches: BatchStream,
    /// A Kafka source's handle: offset commits and connection state.
    pub kafka: Option<KafkaHandle>,
}

/// Starts the data path of `source` and `pipeline`: the source (resumed from `resume`), the
/// dead-letter writer and the decode stage. Must be called inside a tokio runtime.
pub fn data_path(
    source: &SourceConfig,
    pipeline: &PipelineConfig,
    metrics: DataMetrics,
    resume: SourceState,
    cancel: CancellationToken,
) -> Result<DataPath, TopologyError> {
    // Checked before the source starts, so a bad config starts nothing.
    BatchDecoder::new(pipeline.clone())?;
    let dead_letter = pipeline
        .dead_letter
        .as_ref()
        .map(DeadLetter::open)
        .transpose()?;
    let (rx, kafka) = match source {
        SourceConfig::ObjectStore(s) => {
            let src = ObjectStoreSource::from_config(s.clone())?.with_metrics(metrics.clone());
            (src.spawn(resume.clone(), cancel.clone()), None)
        }
        SourceConfig::Kafka(k) => {
            let src = KafkaSource::new(k.clone(), metrics.clone())?;
            let (rx, h) = src.spawn(&resume, cancel.clone())?;
            (rx, Some(h))
        }
    };
    let batches = BatchStream::spawn(rx, pipeline.clone(), metrics, dead_letter, resume, cancel)?;
    Ok(DataPath { batches, kafka })
}

/// The embeddings sinks of `odcd run` on their own task, fed through a bounded queue: a slow
/// sink slows training instead of growing memory.
pub struct EmbeddingsTask {
    pub tx: mpsc::Sender<EmbeddingBatch>,
    task: tokio::task::JoinHandle<Result<(), SinkError>>,
    metrics: Arc<SinkMetrics>,
}

impl EmbeddingsTask {
    /// Opens the sinks of `cfg`, registers `odcd_sink_rows_total` / `odcd_sink_errors_total`
    /// and starts the task (which also publishes a Parquet file once it is older than
    /// `parquet.max_file_age_secs`).
    pub fn spawn(
        cfg: &EmbeddingsConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, TopologyError> {
        let mut sink = EmbeddingSinks::open(cfg, Some(registry), false, false)?;
        let metrics = sink.metrics();
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
        let (tx, mut rx) = mpsc::channel::<EmbeddingBatch>(cfg.queue);
        let age = cfg.parquet.max_file_age_secs;
        let counters = metrics.clone();
        let task = tokio::spawn(async move {
            let sync = |rows: &prometheus::IntCounter, errors: &prometheus::IntCounter| {
                rows.inc_by(
                    counters
                        .rows_published
                        .load(Relaxed)
                        .saturating_sub(rows.get()),
                );
                errors.inc_by(counters.errors.load(Relaxed).saturating_sub(errors.get()));
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
        Ok(EmbeddingsTask { tx, task, metrics })
    }

    /// Waits for the task after every sender is dropped: the sinks flush what they hold.
    pub async fn finish(self) {
        let EmbeddingsTask { tx, task, metrics } = self;
        drop(tx);
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("embeddings sink: {e}"),
            Err(e) => tracing::error!("embeddings sink task failed: {e}"),
        }
        tracing::info!(
            rows = metrics.rows_published.load(Relaxed),
            files = metrics.files_published.load(Relaxed),
            "embeddings flushed"
        );
    }
}
