//! `odcd report`: a self-contained HTML page about a checkpoint (curves over steps, cluster
//! sizes, mosaics of the largest clusters' member images).

use std::path::PathBuf;

use crate::eval::report::{write_report, ReportOptions, RunInfo};
use crate::logging::{init_logging, LogFormat};
use crate::source::SourceConfig;

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Checkpoint store (URL or local path), as in [checkpoint] url.
    #[arg(long)]
    pub checkpoint: String,
    /// Which checkpoint (default: the latest).
    #[arg(long)]
    pub step: Option<u64>,
    /// Folder for index.html (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Shards with the member images (default: the run's [source] url).
    #[arg(long)]
    pub shards: Option<String>,
    /// Largest clusters shown as mosaics.
    #[arg(long, default_value_t = 12)]
    pub clusters: usize,
    /// Images per mosaic.
    #[arg(long, default_value_t = 32)]
    pub per_cluster: usize,
    /// object_store option KEY=VALUE (repeatable).
    #[arg(long = "option", value_parser = super::parse_kv)]
    pub options: Vec<(String, String)>,
}

impl ReportArgs {
    pub fn execute(self, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        init_logging(LogFormat::Human);
        let opts = ReportOptions {
            checkpoint_url: self.checkpoint,
            step: self.step,
            shards_url: self.shards,
            options: self.options.into_iter().collect(),
            out_dir: self.out,
            clusters: self.clusters,
            per_cluster: self.per_cluster,
        };
        rt.block_on(async move {
            let cancel = super::shutdown_signal();
            let (manifest, ckpt, cfg) =
                super::load_checkpoint(&opts.checkpoint_url, &opts.options, opts.step).await?;
            let run = RunInfo {
                arch: cfg.model.arch,
                num_clusters: cfg.odc.num_clusters,
                source_shards: match &cfg.source {
                    SourceConfig::ObjectStore(s) => Some((s.url.clone(), s.options.clone())),
                    SourceConfig::Kafka(_) => None,
                },
            };
            let s = write_report(&opts, &manifest, &ckpt, &run, cancel).await?;
            tracing::info!(
                step = s.step,
                history_points = s.history_points,
                clusters = s.clusters_shown,
                images = s.images,
                images_missing = s.images_missing,
                "report written"
            );
            println!("{}", s.path.display());
            Ok::<_, anyhow::Error>(())
        })
    }
}
