//! `odcd release list | promote | rollback | work`: the operator's side of releases
//! (docs/embeddings.md). Each reads `[releases]` (and, to build a release, `[checkpoint]`
//! and the catalog) from the daemon's config file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::infer::Centroids;
use crate::odc::StreamingMemory;
use crate::release::layout::{now_secs, release_id, CheckpointRef, ReleaseSpec, FORMAT_VERSION};
use crate::release::share::CpuShare;
use crate::release::worker::make_current;
use crate::release::{
    Announcer, Catalog, Judge, ReleaseError, ReleaseMetrics, ReleaseState, ReleaseStore,
    ReleasesConfig, Step, Targets, Worker, WorkerSettings,
};

#[derive(Debug, clap::Subcommand)]
pub enum ReleaseCmd {
    /// The releases under `[releases] url`: id, step, feature, dim, state, rows, decision.
    List {
        #[arg(long)]
        config: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Makes a release of checkpoint `--step` (operator's decision, no quality gate; its
    /// figures are measured and recorded), builds it here unless `--no-work`, and makes it
    /// CURRENT when complete.
    Promote {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        step: u64,
        /// Checkpoint store (default: `[checkpoint] url`).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Only create the pending release; the daemon or `odcd release work` builds it.
        #[arg(long)]
        no_work: bool,
    },
    /// Points CURRENT back at the previous release (or `--to ID`); the rolled-back release
    /// is never made current again automatically.
    Rollback {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        to: Option<String>,
    },
    /// A release worker (a fleet member): embeds pending releases' shards and fresh
    /// arrivals into the current release, at full speed.
    Work {
        #[arg(long)]
        config: PathBuf,
        /// This worker's index among `--workers` (shards split by a hash of their name).
        #[arg(long, default_value_t = 0)]
        worker: usize,
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Exit once no release is pending and nothing new has arrived.
        #[arg(long)]
        once: bool,
    },
}

fn releases_of(cfg: &Config) -> anyhow::Result<&ReleasesConfig> {
    cfg.releases
        .as_ref()
        .context("the config has no [releases] section: add one with a url (configs/quickstart.toml shows every field)")
}

impl ReleaseCmd {
    pub fn execute(self, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        let path = match &self {
            ReleaseCmd::List { config, .. }
            | ReleaseCmd::Promote { config, .. }
            | ReleaseCmd::Rollback { config, .. }
            | ReleaseCmd::Work { config, .. } => config.clone(),
        };
        let cfg = Config::load(&path)?;
        crate::logging::init_logging(cfg.log.format);
        rt.block_on(async move {
            match self {
                ReleaseCmd::List { json, .. } => list(&cfg, json).await,
                ReleaseCmd::Promote {
                    step,
                    checkpoint,
                    no_work,
                    ..
                } => promote(&cfg, step, checkpoint, no_work, super::shutdown_signal()).await,
                ReleaseCmd::Rollback { to, .. } => rollback(&cfg, to).await,
                ReleaseCmd::Work {
                    worker,
                    workers,
                    once,
                    ..
                } => {
                    if workers == 0 || worker >= workers {
                        bail!("--worker {worker} --workers {workers}: the index must be below the count");
                    }
                    let split = (workers > 1).then_some((worker, workers));
                    work(&cfg, split, once, None, super::shutdown_signal()).await
                }
            }
        })
    }
}

async fn list(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let r = releases_of(cfg)?;
    let store = ReleaseStore::open(&r.url, &r.options)?;
    let (current, _) = store.current().await?;
    let current = current.map(|p| p.release);
    let all = store.list().await?;
    if !json {
        println!(
            "{:<32} {:>10} {:>9} {:>6} {:<12} {:>9}  decision",
            "release", "step", "feature", "dim", "state", "rows"
        );
    }
    for rel in all {
        let state = if Some(&rel.id) == current.as_ref() {
            "current"
        } else if rel.rolled_back {
            "rolled back"
        } else if rel.complete() {
            "complete"
        } else {
            "building"
        };
        let rows = rel.manifest.as_ref().map(|m| m.rows);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "release": rel.id, "step": rel.spec.checkpoint.step,
                    "feature": rel.spec.feature, "dim": rel.spec.dim, "state": state,
                    "rows": rows, "quality": rel.spec.quality,
                })
            );
        } else {
            println!(
                "{:<32} {:>10} {:>9} {:>6} {:<12} {:>9}  {}",
                rel.id,
                rel.spec.checkpoint.step,
                rel.spec.feature.to_string(),
                rel.spec.dim,
                state,
                rows.map_or("-".into(), |r| r.to_string()),
                rel.spec.quality.decision
            );
        }
    }
    Ok(())
}

async fn rollback(cfg: &Config, to: Option<String>) -> anyhow::Result<()> {
    let r = releases_of(cfg)?;
    let store = ReleaseStore::open(&r.url, &r.options)?;
    let (current, version) = store.current().await?;
    let Some(current) = current else {
        bail!(
            "no CURRENT release under {}: nothing to roll back",
            store.url()
        );
    };
    let target = match to.or(current.previous.clone()) {
        Some(t) => t,
        None => bail!(
            "release {} replaced none: name the target with --to (see `odcd release list`)",
            current.release
        ),
    };
    let manifest = store
        .manifest(&target)
        .await?
        .ok_or_else(|| ReleaseError::NoRelease {
            url: store.url().to_string(),
            id: format!("{target} (complete)"),
        })?;
    let pointer = crate::release::Pointer::to(&manifest, Some(current.release.clone()));
    // Every release newer than the target is rolled back with it (complete ones, or the
    // workers would make the newest current again; pending ones, or their build would).
    let rolled: Vec<_> = store
        .list()
        .await?
        .into_iter()
        .filter(|r| !r.rolled_back && (r.id > target || r.id == current.release))
        .collect();
    for r in &rolled {
        store.mark_rolled_back(&r.id).await?;
    }
    store.set_current(&pointer, &version).await?;
    if let Some(k) = &r.kafka {
        let a = Announcer::open(k)?;
        a.announce(&ReleaseState::current(&pointer, store.url()))
            .await?;
        for rel in &rolled {
            a.announce(&ReleaseState::retired(&rel.spec, store.url()))
                .await?;
        }
    }
    tracing::info!(from = %current.release, to = %target, "rolled back: CURRENT names {target}");
    println!("CURRENT: {} (was {})", target, current.release);
    Ok(())
}

async fn promote(
    cfg: &Config,
    step: u64,
    checkpoint: Option<String>,
    no_work: bool,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let r = releases_of(cfg)?;
    let store = ReleaseStore::open(&r.url, &r.options)?;
    let (url, options) = match (&checkpoint, &cfg.checkpoint) {
        (Some(u), _) => (
            u.clone(),
            cfg.checkpoint
                .as_ref()
                .map(|c| c.options.clone())
                .unwrap_or_default(),
        ),
        (None, Some(c)) => (c.url.clone(), c.options.clone()),
        (None, None) => {
            bail!("no checkpoint store: give --checkpoint URL or a [checkpoint] section")
        }
    };
    let (manifest, mut ckpt, run_cfg) = super::load_checkpoint(&url, &options, Some(step)).await?;
    let (catalog_url, catalog_options) = cfg.release_catalog()?;
    let net = run_cfg.eval_model();
    let mut judge = Judge::load(
        net.clone(),
        r.feature,
        &catalog_url,
        &catalog_options,
        r.reference_samples,
        cfg.eval.as_ref(),
        r.batch_size,
        &cancel,
    )
    .await?;
    let mut share = CpuShare::new(1.0).context("release thread pool")?;
    let (current, _) = store.current().await?;
    let current = match current {
        Some(p) => Some((
            p.release.clone(),
            store.read_model(&p.release).await?,
            store.read_centring(&p.release).await?.0,
        )),
        None => None,
    };
    let weights = std::mem::take(&mut ckpt.model_safetensors);
    let a = tokio::task::block_in_place(|| {
        judge.assess(
            &weights,
            r.calibrate_bn,
            current
                .as_ref()
                .map(|(id, w, m)| (id.as_str(), &w[..], &m[..])),
            &mut share,
            &cancel,
        )
    })?;
    // The operator decides; the promotion rule's verdict is recorded beside the decision.
    let rule = match a.verdict(&r.promote) {
        crate::release::Verdict::Promote(why) => format!("the promotion rule agrees: {why}"),
        crate::release::Verdict::Reject(reason, why) => {
            format!(
                "the promotion rule would reject it ({}): {why}",
                reason.as_str()
            )
        }
    };
    let centroids = match ckpt.memory.take() {
        Some(s) => Some(Centroids::of(
            StreamingMemory::from_state(s)
                .context("the checkpoint's ODC memory")?
                .memory(),
        )),
        None => None,
    };
    let spec = ReleaseSpec {
        format_version: FORMAT_VERSION,
        release: release_id(ckpt.step, r.feature),
        created_unix_secs: now_secs(),
        checkpoint: CheckpointRef {
            url: url.clone(),
            id: manifest.id.clone(),
            step: ckpt.step,
        },
        feature: r.feature,
        dim: a.candidate.dim,
        model: net.model.clone(),
        num_clusters: net.num_clusters,
        pipeline: net.pipeline.for_eval(r.batch_size),
        reference_samples: judge.reference_len(),
        catalog_url,
        quality: a.quality(format!(
            "operator: odcd release promote --step {step}; {rule}"
        )),
    };
    if store.manifest(&spec.release).await?.is_some() {
        // Already built: promoting it again only moves the pointer.
        let m = store
            .manifest(&spec.release)
            .await?
            .context("manifest vanished")?;
        make_current(&store, &m).await?;
        println!("CURRENT: {}", spec.release);
        return Ok(());
    }
    crate::release::create(
        &store,
        &spec,
        a.weights.clone(),
        &a.candidate.mean,
        centroids.as_ref(),
    )
    .await?;
    if let Some(k) = &r.kafka {
        Announcer::open(k)?
            .announce(&ReleaseState::building(&spec, store.url()))
            .await?;
    }
    println!(
        "pending: {} (effective rank {:.1}; {rule})",
        spec.release, a.candidate.effective_rank
    );
    if no_work {
        return Ok(());
    }
    work(cfg, None, true, Some(spec.release.clone()), cancel).await?;
    let (cur, _) = store.current().await?;
    match cur {
        Some(p) if p.release == spec.release => {
            println!("CURRENT: {} ({} rows)", p.release, p.rows);
            Ok(())
        }
        _ => bail!(
            "release {} is not complete yet: run `odcd release work --config ...` to finish it",
            spec.release
        ),
    }
}

/// Runs a release worker until cancelled, or with `once` until nothing is pending (or,
/// with `until`, until that release is complete).
async fn work(
    cfg: &Config,
    split: Option<(usize, usize)>,
    once: bool,
    until: Option<String>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let r = releases_of(cfg)?;
    let store = ReleaseStore::open(&r.url, &r.options)?;
    let (catalog_url, catalog_options) = cfg.release_catalog()?;
    let registry = prometheus::Registry::new();
    let metrics = ReleaseMetrics::register(&registry)?;
    let mut worker = Worker::new(
        WorkerSettings {
            store: store.clone(),
            catalog: Catalog::open(&catalog_url, &catalog_options)?,
            split,
            dead_letter: cfg.pipeline.dead_letter.clone(),
            batch: r.batch_size,
            device: cfg.train.device.clone(),
            poll: Duration::from_millis(r.poll_interval_ms),
            keep: r.keep,
            share: 1.0,
            kafka: r.kafka.clone(),
        },
        metrics,
        cancel.clone(),
    )?;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let targets = Targets::read(&store).await?;
        if let Some(id) = &until {
            if targets.current.as_ref().is_some_and(|c| &c.id == id) {
                return Ok(());
            }
        }
        // Tensor math blocks this thread, not the runtime's other workers.
        let step = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(worker.step(&targets))
        });
        match step {
            Ok(Step::Idle) => {
                if once && (targets.pending.is_none() || until.is_some()) {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(r.poll_interval_ms)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
            Ok(Step::Completed { release, rows }) => {
                println!("complete and CURRENT: {release} ({rows} rows)");
            }
            Ok(Step::Embedded { .. }) => {}
            Err(ReleaseError::Cancelled) => return Ok(()),
            Err(e) => {
                tracing::warn!("release work failed, tried again: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
        }
    }
}
