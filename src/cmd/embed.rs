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
use crate::model::{FeatureKind, OdcModel};
use crate::odc::StreamingMemory;
use crate::sink::{EmbeddingBatch, EmbeddingSinks, SinkError};
use crate::source::{DataMetrics, SourceConfig, SourceMode, SourceState};
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
    let device = crate::device::select_device(&cfg.train.device)?;
    let model =
        OdcModel::new(&cfg.model, cfg.odc.num_clusters, &device, 0).map_err(TrainError::from)?;
    model
        .load_safetensors(&ckpt.model_safetensors)
        .map_err(|e| TopologyError::Resume {
            step: ckpt.step,
            message: format!("model: {e}"),
        })?;
    let memory = match ckpt.memory.take() {
        Some(s) => Some(
            StreamingMemory::from_state(s).map_err(|e| TopologyError::Resume {
                step: ckpt.step,
                message: format!("ODC memory: {e}"),
            })?,
        ),
        None => None,
    };
    tracing::info!(step = ckpt.step, id = %manifest.id, "embedding with checkpoint");

    let mut pipeline = cfg.pipeline.clone();
    pipeline.transform = pipeline.transform.for_eval();
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry)?;
    let path = topology::data_path(
        &cfg.source,
        &pipeline,
        metrics,
        SourceState::default(),
        cancel.child_token(),
    )?;
    let (mut stream, kafka_src) = (path.batches, path.kafka);
    let exactly_once = ecfg.kafka.as_ref().is_some_and(|k| k.exactly_once);
    if exactly_once && kafka_src.is_none() {
        return Err(TopologyError::Sink(SinkError::Config(crate::validate::FieldError::new(
            "embeddings.kafka.exactly_once",
            "needs a Kafka source ([source] kind = \"kafka\"): the input offsets are part of each transaction",
        ))));
    }
    let mut sink = EmbeddingSinks::open(&ecfg, Some(&registry), true, exactly_once)?;
    if let Some(k) = sink.kafka() {
        if exactly_once {
            k.init_transactions().await?;
        } else {
            // As under `odcd run`: a record whose deliveries keep failing (a broker that is
            // down) is re-sent with a growing pause rather than dropped, so no row is lost.
            k.resend_forever(true);
        }
    }
    let sink_metrics = sink.metrics();
    // The published feature is part of the version: rows of another feature from the same
    // checkpoint are other vectors (and other Kafka keys).
    let version = match feature {
        FeatureKind::Neck => format!("step-{:012}", ckpt.step),
        other => format!("step-{:012}-{other}", ckpt.step),
    };
    let mut rows = 0u64;
    loop {
        let batch = tokio::select! {
            b = stream.next() => b,
            _ = cancel.cancelled() => None,
        };
        let Some(batch) = batch else { break };
        // Tensor math off the async workers.
        let model_ref = &model;
        let memory_ref = memory.as_ref();
        let (emb, d, clusters) = tokio::task::block_in_place(|| -> Result<_, TopologyError> {
            let x = batch.images.to_device(&device).map_err(TrainError::from)?;
            let rows_of = |f: candle_core::Tensor| -> Result<(Vec<f32>, usize), TopologyError> {
                let d = f.dim(1).map_err(TrainError::from)?;
                let mut v = f
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(TrainError::from)?;
                crate::odc::normalise_rows(&mut v, d);
                Ok((v, d))
            };
            // One backbone forward; the neck (what the memory clusters) gives the cluster.
            let (neck, feature) = match (memory_ref, feature) {
                (None, kind) if kind != FeatureKind::Neck => (
                    None,
                    model_ref.features(&x, kind).map_err(TrainError::from)?,
                ),
                (_, kind) => {
                    let (n, f) = model_ref
                        .neck_and_features(&x, kind)
                        .map_err(TrainError::from)?;
                    (Some(n), f)
                }
            };
            let clusters: Vec<Option<u32>> = match (memory_ref, neck) {
                (Some(m), Some(neck)) => m
                    .memory()
                    .nearest_centroid(&rows_of(neck)?.0)
                    .map_err(TrainError::from)?
                    .into_iter()
                    .map(Some)
                    .collect(),
                _ => vec![None; batch.keys.len()],
            };
            let (emb, d) = rows_of(feature)?;
            Ok((emb, d, clusters))
        })?;
        rows += batch.keys.len() as u64;
        let out = EmbeddingBatch {
            keys: batch.keys,
            step: ckpt.step,
            model_version: version.clone(),
            clusters,
            class_labels: batch.class_labels,
            dim: d,
            embeddings: emb,
        };
        // A failed write is retried with backoff until it succeeds, never dropped (only a
        // malformed batch is an error).
        let Some(src) = &kafka_src else {
            sink.write_retrying(out).await?;
            continue;
        };
        // Kafka input: the batch's offsets are committed only once its outputs are durable.
        let state = stream.state().clone();
        if exactly_once {
            let group = src.group_metadata().ok_or_else(|| {
                TopologyError::Sink(SinkError::Kafka {
                    topic: "(source)".into(),
                    message: "the consumer has no group metadata for the transaction".into(),
                })
            })?;
            sink.write_transaction(out, src.offsets(&state), group)
                .await?;
        } else if sink.kafka().is_none() {
            // Parquet only: rows are durable when their file is published, at the latest at
            // close, so the offsets are committed after the close below (a crash re-reads).
            sink.write_retrying(out).await?;
        } else {
            sink.write_retrying(out).await?;
            if let Some(k) = sink.kafka() {
                let failed = k.flush().await?;
                if failed > 0 {
                    // Never commit past an output that was not delivered: stop, and a restart
                    // re-reads from the last committed offsets.
                    return Err(TopologyError::Sink(SinkError::Kafka {
                        topic: k.topic().into(),
                        message: format!("{failed} embedding record(s) could not be delivered; stopping before committing their input offsets"),
                    }));
                }
            }
            src.commit_sync(&state).map_err(|e| {
                TopologyError::Sink(SinkError::Kafka {
                    topic: "(source)".into(),
                    message: format!("cannot commit the input offsets: {e}"),
                })
            })?;
        }
    }
    let has_kafka_sink = sink.kafka().is_some();
    // Publish what the sinks hold, retrying failures, but bounded: a sink that cannot publish
    // ends the command with its error (and no input offset is committed past its rows).
    let wait = Duration::from_secs(cfg.checkpoint.as_ref().map_or(300, |c| c.timeout_secs));
    tokio::time::timeout(wait, sink.flush_retrying())
        .await
        .map_err(|_| TopologyError::SinkShutdown {
            secs: wait.as_secs(),
            rows: sink_metrics
                .rows_written
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(
                    sink_metrics
                        .rows_published
                        .load(std::sync::atomic::Ordering::Relaxed),
                ),
            last: sink_metrics.last_error().unwrap_or_else(|| "none".into()),
        })??;
    sink.close().await?;
    if let (Some(src), false) = (&kafka_src, has_kafka_sink) {
        src.commit_sync(stream.state()).map_err(|e| {
            TopologyError::Sink(SinkError::Kafka {
                topic: "(source)".into(),
                message: format!("cannot commit the input offsets: {e}"),
            })
        })?;
    }
    Ok(EmbedSummary {
        step: ckpt.step,
        rows,
        files: sink_metrics
            .files_published
            .load(std::sync::atomic::Ordering::Relaxed),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
