//! `odcd run --config FILE`: the daemon. Builds every stage from the config (metrics endpoint,
//! trainer, resume from the latest checkpoint, data path, embeddings sinks, in-daemon
//! evaluation), runs the training loop on its own thread until the source ends,
//! `train.max_steps` is reached or SIGTERM / SIGINT, then flushes the sinks.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::eval::DaemonEval;
use crate::metrics::Health;
use crate::release::{ManagerSettings, ReleaseManager};
use crate::source::{DataMetrics, RejectReason};
use crate::topology::resume::{resume_latest, Resumed};
use crate::topology::train_loop::{LoopSettings, LoopStages, RunSummary, TrainLoop};
use crate::topology::{self, EmbeddingsTask, TopologyError};
use crate::train::{TrainError, TrainMetrics, Trainer};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Override one config key, KEY=VALUE (repeatable): a dotted key and a TOML value, e.g.
    /// `--set odc.num_clusters=50 --set source.url=data/shards/other/`.
    #[arg(long = "set", value_parser = super::parse_kv)]
    pub overrides: Vec<(String, String)>,
}

impl RunArgs {
    pub fn execute(self, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        let cfg = Config::load_with_overrides(&self.config, &self.overrides)?;
        crate::logging::init_logging(cfg.log.format);
        rt.block_on(async move {
            let summary = run(cfg, super::shutdown_signal()).await?;
            tracing::info!(
                steps = summary.steps,
                resumed_from = ?summary.resumed_from,
                checkpoints = summary.checkpoints,
                checkpoint_failures = summary.checkpoint_failures,
                records = summary.records,
                rejected = summary.rejected,
                max_empty_clusters_after_a_step = summary.max_empty_clusters_after_step,
                seconds = format!("{:.1}", summary.seconds),
                first_loss = ?summary.first_loss,
                last_loss = ?summary.last_loss,
                "run finished"
            );
            Ok(())
        })
    }
}

/// Runs the daemon's main job until the source ends, `train.max_steps` is reached or `cancel`
/// fires (then the step in flight finishes, a checkpoint is written and the sinks flushed).
/// Must be called inside a tokio runtime.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<RunSummary, TopologyError> {
    // A launcher (mpirun, srun) that started several ranks makes this a data-parallel run
    // (docs/distributed.md); a plain start is one process.
    let collective = crate::dist::from_environment()?;
    run_with(cfg, cancel, collective).await
}

/// [`run`] as one rank of `collective`'s world.
pub async fn run_with(
    mut cfg: Config,
    cancel: CancellationToken,
    collective: std::sync::Arc<dyn crate::dist::Collective>,
) -> Result<RunSummary, TopologyError> {
    let (rank, ranks) = (collective.rank(), collective.size());
    // Checkpoints keep the config as written (the global batch), not this rank's share.
    let config_json = serde_json::to_value(&cfg)
        .map_err(|e| TopologyError::Thread(format!("cannot encode the config: {e}")))?;
    if ranks > 1 {
        let threads = crate::dist::share_cores_between_ranks();
        tracing::info!(
            rank,
            ranks,
            compute_threads = ?threads,
            "data-parallel run: this rank trains on its part of the stream"
        );
        cfg.data_parallel_rank(rank, ranks)
            .map_err(|e| TopologyError::Config(e.to_string()))?;
    }
    if ranks > 1 {
        // A rank still waiting for the others once asked to stop ends promptly (dist docs).
        let (c, stop) = (collective.clone(), cancel.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            c.stop_requested();
        });
    }
    let device = crate::device::select_device(&cfg.train.device)?;
    // Several ranks: every metric carries the rank (each rank serves its own endpoint).
    let registry = if ranks > 1 {
        let labels = std::collections::HashMap::from([("rank".to_string(), rank.to_string())]);
        prometheus::Registry::new_custom(None, Some(labels))?
    } else {
        prometheus::Registry::new()
    };
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
        .map_err(TopologyError::Listen)?;
        tracing::info!("metrics on http://{addr}/metrics (also /healthz, /readyz)");
    }

    let kernels = cfg.train.kernels().map_err(TrainError::from)?;
    let mut trainer = Trainer::new(
        &cfg.model,
        &cfg.odc,
        &cfg.optimizer,
        &device,
        kernels,
        cfg.train.seed,
    )?;
    trainer.set_collective(collective.clone());
    tracing::info!(
        device = ?device,
        kernels = if kernels.cpu_kernels_on(&device) {
            "odcd CPU kernels"
        } else {
            "generic"
        },
        memory = if trainer.memory_compute().is_host() {
            "host"
        } else {
            "device"
        },
        "training path"
    );

    // Resume: model, optimizer, memory, step and source positions from the latest valid
    // checkpoint.
    let store = match &cfg.checkpoint {
        Some(c) => Some(CheckpointStore::open(&c.url, &c.options, c.keep)?),
        None => None,
    };
    let mut resumed = Resumed::default();
    if let (Some(store), Some(c)) = (&store, &cfg.checkpoint) {
        if c.resume {
            let timeout = Duration::from_secs(c.startup_timeout_secs);
            match resume_latest(store, timeout, &mut trainer, &health, &cancel).await? {
                Some(r) => resumed = r,
                None => return Ok(RunSummary::default()), // cancelled while waiting
            }
        }
    }
    if let Some(step) = resumed.step {
        resumed.source = rank_position(&resumed, step, &cfg, rank, ranks)?;
        trainer.release_memory_unless_root()?;
    }

    let embeddings = cfg
        .embeddings
        .as_ref()
        .map(|e| EmbeddingsTask::spawn(e, &registry))
        .transpose()?;
    let path = topology::data_path(
        &cfg.source,
        &cfg.pipeline,
        data_metrics.clone(),
        resumed.source,
        cancel.child_token(),
    )?;
    health.set_source_ok(true);
    if let Some(k) = &path.kafka {
        // `/readyz` follows the broker connection.
        k.report_to(health.clone(), cancel.clone());
    } else {
        // ... or says when the object store cannot be reached.
        data_metrics.report_to(health.clone(), cancel.clone());
    }

    let handle = tokio::runtime::Handle::current();
    let eval = match &cfg.eval {
        Some(e) => Some(DaemonEval::spawn(
            cfg.eval_model(),
            e,
            &registry,
            handle.clone(),
            cancel.clone(),
        )?),
        None => None,
    };
    // Releases are built once for the job: by rank 0.
    let releases = match (&cfg.releases, collective.is_root()) {
        (Some(r), true) => {
            let (catalog_url, catalog_options) = cfg
                .release_catalog()
                .map_err(|e| TopologyError::Config(e.to_string()))?;
            Some(ReleaseManager::spawn(
                ManagerSettings {
                    cfg: r.clone(),
                    net: cfg.eval_model(),
                    eval: cfg.eval.clone(),
                    checkpoint_url: cfg
                        .checkpoint
                        .as_ref()
                        .map(|c| c.url.clone())
                        .unwrap_or_default(),
                    catalog_url,
                    catalog_options,
                    dead_letter: cfg.pipeline.dead_letter.clone(),
                },
                &registry,
                handle.clone(),
                cancel.clone(),
            )?)
        }
        _ => None,
    };
    let settings = LoopSettings {
        odc: cfg.odc.clone(),
        train: cfg.train.clone(),
        feat_dim: cfg.model.feat_dim,
        embed_every: cfg.embeddings.as_ref().map_or(1, |e| e.every_steps),
        checkpoint: cfg.checkpoint.clone(),
        config_json,
        metadata: serde_json::json!({
            "arch": cfg.model.arch,
            "in_channels": cfg.model.in_channels,
            "feat_dim": cfg.model.feat_dim,
            "num_clusters": cfg.odc.num_clusters,
            "memory_capacity": cfg.odc.memory_capacity,
        }),
    };
    let train_loop = TrainLoop {
        settings,
        stages: LoopStages {
            metrics: train_metrics,
            health,
            store,
            embeddings: embeddings.as_ref().map(|e| e.handle()),
            kafka: path.kafka,
            eval,
            releases,
        },
        trainer,
        batches: path.batches,
        rt: handle,
        cancel,
        resumed_from: resumed.step,
        history: resumed.history,
    };
    let join = std::thread::Builder::new()
        .name("odcd-trainer".into())
        .spawn(move || train_loop.run())
        .map_err(|e| TopologyError::Thread(e.to_string()))?;
    // Wait for the trainer without blocking a runtime worker.
    let res = tokio::task::spawn_blocking(move || join.join())
        .await
        .map_err(|e| TopologyError::Thread(e.to_string()))?
        .map_err(|_| TopologyError::Thread("the trainer thread panicked".into()))?;
    let res = res.map(|mut s| {
        s.rejected = RejectReason::ALL
            .iter()
            .map(|&r| data_metrics.rejected_count(r))
            .sum();
        s
    });
    // The trainer dropped its handle: the sinks publish what they hold and end, within the
    // checkpoint timeout; a sink that cannot publish makes the run end with its error.
    if let Some(e) = embeddings {
        let wait = Duration::from_secs(cfg.checkpoint.as_ref().map_or(300, |c| c.timeout_secs));
        let fin = e.finish(wait).await;
        if let (Ok(_), Err(e)) = (&res, fin) {
            return Err(e);
        }
    }
    res
}

/// This rank's source position in the checkpoint the run resumed from (written at `step`);
/// a checkpoint written by another number of ranks is refused.
fn rank_position(
    resumed: &Resumed,
    step: u64,
    cfg: &Config,
    rank: usize,
    ranks: usize,
) -> Result<crate::source::SourceState, TopologyError> {
    let world = crate::topology::train_loop::checkpoint_world(&resumed.extra);
    let written = world.as_ref().map_or(1, |(n, _)| *n);
    if written != ranks {
        return Err(TopologyError::WorldSizeChanged {
            checkpoint: format!(
                "step {step} in {}",
                cfg.checkpoint.as_ref().map_or("?", |c| c.url.as_str())
            ),
            written,
            ranks,
        });
    }
    Ok(match world {
        Some((_, mut states)) if rank < states.len() => states.swap_remove(rank),
        _ => resumed.source.clone(),
    })
}
