//! `odcd embed --checkpoint URL --config FILE`: inference with a frozen checkpoint over a source, to the embeddings sink,
//! tagged with the checkpoint's step. Uses the eval transform (resize + centre crop) derived
//! from the config's train transform, eval-mode BatchNorm and no dropout.
//!
//! From a Kafka source it runs as a fleet: processes with the same `group_id` share the
//! partitions. Kafka output keys are `<sample key>@<model version>` (deterministic), the
//! producer is idempotent, and a batch's input offsets are committed only after all its
//! outputs are delivered, so after a crash no input is missing and a duplicate is an identical
//! re-delivery. With `[embeddings.kafka] exactly_once = true` each batch is one Kafka
//! transaction (embeddings + `send_offsets_to_transaction` + commit).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::decode::BatchStream;
use crate::infer::{Centroids, FrozenEmbedder};
use crate::model::{FeatureKind, OdcModel};
use crate::odc::StreamingMemory;
use crate::sink::{EmbeddingBatch, EmbeddingSinks, EmbeddingsConfig, SinkError};
use crate::source::{DataMetrics, KafkaHandle, SourceConfig, SourceMode, SourceState};
use crate::topology::{self, TopologyError};
use crate::train::TrainError;

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// Checkpoint store (URL or local path), as in [checkpoint] url.
    #[arg(long)]
    pub checkpoint: String,
    /// Which checkpoint (default: the latest).
    #[arg(long)]
    pub step: Option<u64>,
    #[arg(long)]
    pub config: PathBuf,
    /// Read the source once, whatever its configured mode.
    #[arg(long)]
    pub once: bool,
    /// The feature published, L2-normalised: neck (the clustered D-dim feature), backbone
    /// (pooled backbone output), spatial, stageN (stage N's map flattened, N = 1..4) or
    /// stagesN (`odcd eval --feature`; docs/evaluation.md says which scored best).
    #[arg(long, default_value = "neck")]
    pub feature: FeatureKind,
}

impl EmbedArgs {
    pub fn execute(self, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        let mut cfg = Config::load(&self.config)?;
        if self.once {
            match &mut cfg.source {
                SourceConfig::ObjectStore(s) => s.mode = SourceMode::Once,
                SourceConfig::Kafka(_) => anyhow::bail!(
                    "--once reads an object-store prefix once; a Kafka source has no end: stop `odcd embed` with SIGTERM"
                ),
            }
        }
        crate::logging::init_logging(cfg.log.format);
        rt.block_on(async move {
            let s = embed(
                cfg,
                &self.checkpoint,
                self.step,
                self.feature,
                super::shutdown_signal(),
            )
            .await?;
            tracing::info!(
                step = s.step,
                rows = s.rows,
                files = s.files,
                seconds = format!("{:.1}", s.seconds),
                "embedding finished"
            );
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct EmbedSummary {
    pub step: u64,
    pub rows: u64,
    pub files: u64,
    pub seconds: f64,
}

/// Embeds the source of `cfg` with checkpoint `step` (or the latest) under
/// `checkpoint_url` into the `[embeddings]` sinks. Must be called inside a tokio runtime.
pub async fn embed(
    cfg: Config,
    checkpoint_url: &str,
    step: Option<u64>,
    feature: FeatureKind,
    cancel: CancellationToken,
) -> Result<EmbedSummary, TopologyError> {
    let t0 = Instant::now();
    let Some(ecfg) = cfg.embeddings.clone() else {
        return Err(TopologyError::Resume {
            step: step.unwrap_or(0),
            message:
                "odcd embed writes to the [embeddings] sink: add an [embeddings] section with a url"
                    .into(),
        });
    };
    let frozen = open_frozen(&cfg, checkpoint_url, step, feature).await?;
    let mut pipeline = cfg.pipeline.clone();
    pipeline.transform = pipeline.transform.for_eval();
    let registry = prometheus::Registry::new();
    let path = topology::data_path(
        &cfg.source,
        &pipeline,
        DataMetrics::register(&registry)?,
        SourceState::default(),
        cancel.child_token(),
    )?;
    let mut out = Outputs::open(&ecfg, &registry, path.kafka)?;
    let mut stream = path.batches;
    let rows = embed_stream(&frozen, &mut stream, &mut out, &cancel).await?;
    let wait = Duration::from_secs(cfg.checkpoint.as_ref().map_or(300, |c| c.timeout_secs));
    let files = out.finish(stream.state(), wait).await?;
    Ok(EmbedSummary {
        step: frozen.step,
        rows,
        files,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The checkpoint's network in eval mode, its centroids and the version its rows carry.
struct Frozen {
    embedder: FrozenEmbedder,
    step: u64,
    /// `step-<step>` for the neck, `step-<step>-<feature>` otherwise: rows of another feature
    /// from the same checkpoint are other vectors (and other Kafka keys).
    version: String,
}

/// Phase 1: loads checkpoint `step` (or the latest) and rebuilds its network.
async fn open_frozen(
    cfg: &Config,
    checkpoint_url: &str,
    step: Option<u64>,
    feature: FeatureKind,
) -> Result<Frozen, TopologyError> {
    let options = cfg
        .checkpoint
        .as_ref()
        .map(|c| c.options.clone())
        .unwrap_or_default();
    let store = CheckpointStore::open(checkpoint_url, &options, 0)?;
    let manifest = store
        .find(step)
        .await?
        .ok_or_else(|| TopologyError::Resume {
            step: step.unwrap_or(0),
            message: format!("no checkpoint found under {checkpoint_url}"),
        })?;
    let mut ckpt = store.load(&manifest).await?;
    let resume_err = |what: &str, e: &dyn std::fmt::Display| TopologyError::Resume {
        step: manifest.step,
        message: format!("{what}: {e}"),
    };
    let device = crate::device::select_device(&cfg.train.device)?;
    let model =
        OdcModel::new(&cfg.model, cfg.odc.num_clusters, &device, 0).map_err(TrainError::from)?;
    model
        .load_safetensors(&ckpt.model_safetensors)
        .map_err(|e| resume_err("model", &e))?;
    let centroids = match ckpt.memory.take() {
        Some(s) => Some(Centroids::of(
            StreamingMemory::from_state(s)
                .map_err(|e| resume_err("ODC memory", &e))?
                .memory(),
        )),
        None => None,
    };
    tracing::info!(step = ckpt.step, id = %manifest.id, "embedding with checkpoint");
    let version = match feature {
        FeatureKind::Neck => format!("step-{:012}", ckpt.step),
        other => format!("step-{:012}-{other}", ckpt.step),
    };
    Ok(Frozen {
        embedder: FrozenEmbedder::new(model, feature, centroids),
        step: ckpt.step,
        version,
    })
}

/// The `[embeddings]` sinks and, for a Kafka source, what commits its offsets.
struct Outputs {
    sink: EmbeddingSinks,
    metrics: std::sync::Arc<crate::sink::SinkMetrics>,
    kafka_src: Option<KafkaHandle>,
    exactly_once: bool,
}

impl Outputs {
    /// Phase 2: opens the sinks; `exactly_once` needs a Kafka source.
    fn open(
        ecfg: &EmbeddingsConfig,
        registry: &prometheus::Registry,
        kafka_src: Option<KafkaHandle>,
    ) -> Result<Self, TopologyError> {
        let exactly_once = ecfg.kafka.as_ref().is_some_and(|k| k.exactly_once);
        if exactly_once && kafka_src.is_none() {
            return Err(TopologyError::Sink(SinkError::Config(
                crate::validate::FieldError::new(
                    "embeddings.kafka.exactly_once",
                    "needs a Kafka source ([source] kind = \"kafka\"): the input offsets are part of each transaction",
                ),
            )));
        }
        let sink = EmbeddingSinks::open(ecfg, Some(registry), true, exactly_once)?;
        let metrics = sink.metrics();
        Ok(Outputs {
            sink,
            metrics,
            kafka_src,
            exactly_once,
        })
    }

    /// Starts a Kafka sink's transactions, or makes it re-send failed deliveries for ever.
    async fn start(&mut self) -> Result<(), TopologyError> {
        let exactly_once = self.exactly_once;
        if let Some(k) = self.sink.kafka() {
            if exactly_once {
                k.init_transactions().await?;
            } else {
                // As under `odcd run`: a record whose deliveries keep failing (a broker that
                // is down) is re-sent with a growing pause rather than dropped.
                k.resend_forever(true);
            }
        }
        Ok(())
    }

    /// Phase 3, per batch: writes the rows. A failed write is retried with backoff until it
    /// succeeds, never dropped (only a malformed batch is an error). From a Kafka source, the
    /// batch's input offsets (`state`) are committed only once its outputs are durable.
    async fn deliver(
        &mut self,
        out: EmbeddingBatch,
        state: &SourceState,
    ) -> Result<(), TopologyError> {
        let Some(src) = &self.kafka_src else {
            return Ok(self.sink.write_retrying(out).await?);
        };
        if self.exactly_once {
            let group = src.group_metadata().ok_or_else(|| {
                TopologyError::Sink(SinkError::Kafka {
                    topic: "(source)".into(),
                    message: "the consumer has no group metadata for the transaction".into(),
                })
            })?;
            let offsets = src.offsets(state);
            return Ok(self.sink.write_transaction(out, offsets, group).await?);
        }
        self.sink.write_retrying(out).await?;
        // Parquet only: rows are durable when their file is published, at the latest at
        // close, so the offsets are committed after the close (a crash re-reads).
        let Some(k) = self.sink.kafka() else {
            return Ok(());
        };
        let failed = k.flush().await?;
        if failed > 0 {
            // Never commit past an output that was not delivered: stop, and a restart
            // re-reads from the last committed offsets.
            return Err(TopologyError::Sink(SinkError::Kafka {
                topic: k.topic().into(),
                message: format!("{failed} embedding record(s) could not be delivered; stopping before committing their input offsets"),
            }));
        }
        commit(src, state)
    }

    /// Phase 4: publishes what the sinks hold, retrying failures but bounded by `wait`: a
    /// sink that cannot publish ends the command with its error, and no input offset is
    /// committed past its rows. Returns the Parquet files published.
    async fn finish(mut self, state: &SourceState, wait: Duration) -> Result<u64, TopologyError> {
        use std::sync::atomic::Ordering::Relaxed;
        let has_kafka_sink = self.sink.kafka().is_some();
        let m = self.metrics.clone();
        tokio::time::timeout(wait, self.sink.flush_retrying())
            .await
            .map_err(|_| TopologyError::SinkShutdown {
                secs: wait.as_secs(),
                rows: m
                    .rows_written
                    .load(Relaxed)
                    .saturating_sub(m.rows_published.load(Relaxed)),
                last: m.last_error().unwrap_or_else(|| "none".into()),
            })??;
        self.sink.close().await?;
        if let (Some(src), false) = (&self.kafka_src, has_kafka_sink) {
            commit(src, state)?;
        }
        Ok(m.files_published.load(Relaxed))
    }
}

fn commit(src: &KafkaHandle, state: &SourceState) -> Result<(), TopologyError> {
    src.commit_sync(state).map_err(|e| {
        TopologyError::Sink(SinkError::Kafka {
            topic: "(source)".into(),
            message: format!("cannot commit the input offsets: {e}"),
        })
    })
}

/// Phase 3: every batch of the stream through the frozen network (off the async workers)
/// to the outputs, until the stream ends or `cancel` fires. Returns the rows embedded.
async fn embed_stream(
    frozen: &Frozen,
    stream: &mut BatchStream,
    out: &mut Outputs,
    cancel: &CancellationToken,
) -> Result<u64, TopologyError> {
    out.start().await?;
    let mut rows = 0u64;
    loop {
        let batch = tokio::select! {
            b = stream.next() => b,
            _ = cancel.cancelled() => None,
        };
        let Some(batch) = batch else { break };
        let embedded = tokio::task::block_in_place(|| frozen.embedder.embed(&batch.images))?;
        rows += batch.keys.len() as u64;
        let batch_rows = EmbeddingBatch {
            keys: batch.keys,
            step: frozen.step,
            model_version: frozen.version.clone(),
            clusters: embedded.clusters,
            class_labels: batch.class_labels,
            dim: embedded.dim,
            embeddings: embedded.values,
        };
        let state = stream.state().clone();
        out.deliver(batch_rows, &state).await?;
    }
    Ok(rows)
}
