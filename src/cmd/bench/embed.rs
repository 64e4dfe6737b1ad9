//! `odcd bench embed --config FILE`: what one release forward costs: the config's network in
//! eval mode on random images of its input size, through the same [`FrozenEmbedder`] a
//! release's backfill runs (the feature, the neck's nearest centroid, centring, L2
//! normalisation), on a [`CpuShare`] as the daemon runs it beside training. A backfill reads,
//! decodes and writes on top of this; `scripts/bench-release.sh` sets the two side by side.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;

use super::shape::stem_label;
use crate::infer::{Centroids, FrozenEmbedder};
use crate::model::{FeatureKind, OdcModel};
use crate::release::share::CpuShare;

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// The daemon config: its network, input size, `[releases] feature` and `batch_size`.
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides of the config's values, as `odcd run --set`.
    #[arg(long = "set", value_parser = crate::cmd::parse_kv)]
    pub overrides: Vec<(String, String)>,
    /// The feature (default: `[releases] feature`, else backbone).
    #[arg(long)]
    pub feature: Option<FeatureKind>,
    /// Images per forward (default: `[releases] batch_size`, else 256).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Measured batches (after one warm-up batch).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Share of the cores, as `releases.cpu_share` (1 = all of them).
    #[arg(long, default_value_t = 1.0)]
    pub share: f64,
}

impl EmbedArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let cfg = crate::config::Config::load_with_overrides(&self.config, &self.overrides)?;
        anyhow::ensure!(self.steps > 0, "--steps must be at least 1");
        let releases = cfg.releases.as_ref();
        let feature = self
            .feature
            .or(releases.map(|r| r.feature))
            .unwrap_or_default();
        let batch = self
            .batch
            .or(releases.map(|r| r.batch_size))
            .unwrap_or(256)
            .max(1);
        let device = crate::device::select_device(&cfg.train.device)?;
        let model = OdcModel::new(&cfg.model, cfg.odc.num_clusters, &device, 0)?;
        let size = cfg.pipeline.transform.size() as usize;
        let x = Tensor::randn(
            0f32,
            1f32,
            (batch, cfg.model.in_channels, size, size),
            &device,
        )?;
        let k = cfg.odc.num_clusters;
        let d_neck = cfg.model.feat_dim;
        let centroids = Centroids {
            k,
            dim: d_neck,
            values: Tensor::randn(0f32, 1f32, k * d_neck, &device)?.to_vec1::<f32>()?,
        };
        let probe = FrozenEmbedder::new(model, feature, Some(centroids));
        let dim = probe.raw(&x.narrow(0, 0, 1)?)?.dim;
        let embedder = probe.with_mean(vec![0.0; dim]);
        let mut share = CpuShare::new(self.share).context("the bench's thread pool")?;
        let mut times = Vec::with_capacity(self.steps);
        for step in 0..=self.steps {
            let t = Instant::now();
            let rows = share.run(|| embedder.embed(&x))?;
            anyhow::ensure!(
                rows.values.len() == batch * dim,
                "a batch gave {} values",
                rows.values.len()
            );
            if step > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        println!(
            "odcd embed {:?}{} {}x{size}x{size} batch {batch} feature {feature} (D = {dim}) share {}: {:.1} ms per batch, {:.1} images/s, threads {}",
            cfg.model.arch,
            stem_label(&cfg.model),
            cfg.model.in_channels,
            self.share,
            median * 1e3,
            batch as f64 / median,
            share.threads()
        );
        Ok(())
    }
}
