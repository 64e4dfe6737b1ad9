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

use tokio::sync::{mpsc, oneshot};
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
    #[error("embeddings sink: could not publish its last rows within {secs} s at shutdown ({rows} row(s) unpublished; last error: {last}); a restart publishes them again")]
    SinkShutdown { secs: u64, rows: u64, last: String },
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("trainer thread failed: {0}")]
    Thread(String),
    #[error("evaluation: {0}")]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    #[error("releases: {0}")]
    Release(#[from] crate::release::ReleaseError),
    #[error("data-parallel training: {0}")]
    Dist(#[from] crate::dist::DistError),
    #[error("data-parallel run: {0}")]
    Config(String),
    #[error("checkpoint {checkpoint} was written by {written} rank(s) but this job has {ranks}: each rank's source position belongs to its own part of the stream, so restart with `mpirun -np {written}` (or a plain `odcd run` for 1), or point checkpoint.url at a new location to start afresh with {ranks}")]
    WorldSizeChanged {
        checkpoint: String,
        written: usize,
        ranks: usize,
    },
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

/// What the training loop sends the embeddings task, in order, through one bounded queue.
pub enum SinkMsg {
    /// One step's rows.
    Rows(EmbeddingBatch),
    /// The checkpoint barrier: publish every row queued before this message (Parquet file
    /// closed and uploaded, Kafka deliveries acknowledged), then answer.
    Flush(oneshot::Sender<Result<(), SinkError>>),
}

/// The embeddings sinks of `odcd run` on their own task, fed through a bounded queue: a slow
/// or failing sink slows training instead of growing memory. A failed write is retried with
/// backoff, never dropped; the queue's [`SinkMsg::Flush`] is the checkpoint barrier.
pub struct EmbeddingsTask {
    handle: EmbeddingsHandle,
    task: tokio::task::JoinHandle<Result<(), SinkError>>,
}

/// The loop's side of the [`EmbeddingsTask`]: the queue and the sinks' counters.
#[derive(Clone)]
pub struct EmbeddingsHandle {
    tx: mpsc::Sender<SinkMsg>,
    metrics: Arc<SinkMetrics>,
}

/// Why the embeddings could not be published up to a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("the embeddings sinks did not publish the rows up to this step within {secs} s{}", last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout { secs: u64, last: Option<String> },
    #[error("the embeddings sink task stopped{}; no checkpoint can cover rows it did not publish", last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Stopped { last: Option<String> },
    #[error("embeddings sink: {0}")]
    Sink(#[from] SinkError),
    #[error("embeddings sink: could not publish its last rows within {secs} s at shutdown ({rows} row(s) unpublished; last error: {last}); a restart publishes them again")]
    SinkShutdown { secs: u64, rows: u64, last: String },
}

impl EmbeddingsHandle {
    /// Queues one step's rows, waiting while the queue is full (back-pressure). `false` when
    /// the task has stopped.
    pub async fn send(&self, rows: EmbeddingBatch) -> bool {
        self.tx.send(SinkMsg::Rows(rows)).await.is_ok()
    }

    /// Waits for a free place in the queue; `false` when the task has stopped.
    pub async fn reserve(&self) -> Option<mpsc::Permit<'_, SinkMsg>> {
        self.tx.reserve().await.ok()
    }

    /// The checkpoint barrier: returns `Ok` once every row queued before it is durably
    /// published, or an error after `timeout` (the sinks go on retrying meanwhile).
    pub async fn barrier(&self, timeout: Duration) -> Result<(), BarrierError> {
        let (reply, answer) = oneshot::channel();
        let wait = async {
            if self.tx.send(SinkMsg::Flush(reply)).await.is_err() {
                return Err(BarrierError::Stopped {
                    last: self.metrics.last_error(),
                });
            }
            match answer.await {
                Ok(r) => r.map_err(BarrierError::Sink),
                Err(_) => Err(BarrierError::Stopped {
                    last: self.metrics.last_error(),
                }),
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(BarrierError::Timeout {
                    secs: timeout.as_secs(),
                    last: self.metrics.last_error(),
                })
            })
    }

    /// The error of the sinks' last failed attempt, if they have not succeeded since.
    pub fn last_error(&self) -> Option<String> {
        self.metrics.last_error()
    }
}

impl EmbeddingsTask {
    /// Opens the sinks of `cfg`, registers `odcd_sink_rows_total` / `odcd_sink_errors_total`
    /// / `odcd_sink_retries_total` and starts the task (which also publishes a Parquet file
    /// once it is older than `parquet.max_file_age_secs`).
    pub fn spawn(
        cfg: &EmbeddingsConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, TopologyError> {
        let mut sinks = EmbeddingSinks::open(cfg, Some(registry), false, false)?;
        // A checkpoint must never move past an undelivered record: keep re-sending it.
        if let Some(k) = sinks.kafka() {
            k.resend_forever(true);
        }
        Self::start(sinks, cfg.queue, cfg.parquet.max_file_age_secs, registry)
    }

    /// Starts the task on opened `sinks` with a queue of `queue` messages.
    pub fn start(
        mut sinks: EmbeddingSinks,
        queue: usize,
        max_file_age_secs: u64,
        registry: &prometheus::Registry,
    ) -> Result<Self, TopologyError> {
        let metrics = sinks.metrics();
        let rows = prometheus::IntCounter::new(
            "odcd_sink_rows_total",
            "Embedding rows published to Parquet files",
        )?;
        let errors = prometheus::IntCounter::new(
            "odcd_sink_errors_total",
            "Embedding sink write / publish failures",
        )?;
        let retries = prometheus::IntCounter::new(
            "odcd_sink_retries_total",
            "Embedding sink writes / publishes / flushes attempted again after a failure",
        )?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        let (tx, mut rx) = mpsc::channel::<SinkMsg>(queue.max(1));
        let age = max_file_age_secs;
        let counters = metrics.clone();
        let sync = Arc::new(move || {
            let up = |c: &prometheus::IntCounter, v: &std::sync::atomic::AtomicU64| {
                c.inc_by(v.load(Relaxed).saturating_sub(c.get()));
            };
            up(&rows, &counters.rows_published);
            up(&errors, &counters.errors);
            up(&retries, &counters.retries);
        });
        // The series also move while a write is being retried (the task is busy then).
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let sync_often = sync.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => sync_often(),
                    _ = stop.cancelled() => break,
                }
            }
        });
        let task = tokio::spawn(async move {
            let _stop_syncing = guard;
            let mut tick = tokio::time::interval(Duration::from_secs(age.clamp(1, 30)));
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        // A write or flush that fails is retried here until it succeeds: the
                        // queue fills meanwhile and training waits (nothing is dropped).
                        Some(SinkMsg::Rows(b)) => {
                            if let Err(e) = sinks.write_retrying(b).await {
                                tracing::error!("embeddings sink: a batch cannot be written: {e}");
                                sync();
                                return Err(e);
                            }
                        }
                        Some(SinkMsg::Flush(reply)) => {
                            let res = sinks.flush_retrying().await;
                            // The loop may have given up waiting; the rows are published anyway.
                            let _ = reply.send(res);
                        }
                        None => break,
                    },
                    _ = tick.tick() => {
                        if age > 0 {
                            if let Err(e) = sinks.flush_if_older_retrying(age).await {
                                tracing::error!("embeddings sink flush failed: {e}");
                            }
                        }
                    }
                }
                sync();
            }
            let res = match sinks.flush_retrying().await {
                Ok(()) => sinks.close().await,
                Err(e) => Err(e),
            };
            sync();
            res
        });
        Ok(EmbeddingsTask {
            handle: EmbeddingsHandle { tx, metrics },
            task,
        })
    }

    /// The loop's handle: the queue and the barrier.
    pub fn handle(&self) -> EmbeddingsHandle {
        self.handle.clone()
    }

    /// Waits for the task after every other handle is dropped: the sinks publish what they
    /// hold. A sink that cannot publish within `timeout` (it would retry for ever) is given up
    /// with an error naming its last failure, so shutdown never hangs.
    pub async fn finish(self, timeout: Duration) -> Result<(), TopologyError> {
        let EmbeddingsTask { handle, mut task } = self;
        let metrics = handle.metrics.clone();
        drop(handle);
        let res = match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(r)) => r.map_err(TopologyError::Sink),
            Ok(Err(e)) => Err(TopologyError::Thread(format!(
                "embeddings sink task failed: {e}"
            ))),
            Err(_) => {
                task.abort();
                Err(TopologyError::SinkShutdown {
                    secs: timeout.as_secs(),
                    rows: metrics
                        .rows_written
                        .load(Relaxed)
                        .saturating_sub(metrics.rows_published.load(Relaxed)),
                    last: metrics.last_error().unwrap_or_else(|| "none".into()),
                })
            }
        };
        tracing::info!(
            rows = metrics.rows_published.load(Relaxed),
            files = metrics.files_published.load(Relaxed),
            "embeddings flushed"
        );
        res
    }
}

#[cfg(test)]
mod tests;
