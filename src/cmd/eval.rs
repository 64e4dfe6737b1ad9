//! `odcd eval`: representation quality of a checkpoint (weighted k-NN, linear probe, NMI /
//! ARI / purity of the memory's clusters, optional baselines) as a table or JSON.

use std::path::PathBuf;

use anyhow::Context;

use crate::eval::data::FeatureKind;
use crate::eval::linear_probe::ProbeConfig;
use crate::eval::{EvalError, EvalOptions};
use crate::logging::{init_logging, LogFormat};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint store (URL or local path), as in [checkpoint] url.
    #[arg(long)]
    pub checkpoint: String,
    /// Which checkpoint (default: the latest).
    #[arg(long)]
    pub step: Option<u64>,
    /// Labelled shards the k-NN votes and the probe train on (and the memory's keys are
    /// looked up in): URL or local path.
    #[arg(long)]
    pub train: String,
    /// Labelled shards that are classified: URL or local path.
    #[arg(long)]
    pub test: String,
    /// Neighbour counts (repeat the flag).
    #[arg(long = "k", default_values_t = [20usize, 200])]
    pub ks: Vec<usize>,
    /// k-NN vote weight exp(similarity / T).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f32,
    /// Linear probe epochs (0 = no probe).
    #[arg(long, default_value_t = 30)]
    pub probe_epochs: usize,
    /// Linear probe learning rate (SGD, momentum 0.9, cosine decay, standardised features).
    #[arg(long, default_value_t = 0.1)]
    pub probe_lr: f32,
    /// Feature evaluated: backbone (pooled backbone output), neck (the clustered feature),
    /// spatial (the backbone map flattened, not pooled), stageN (stage N's map flattened,
    /// N = 1..4) or stagesN (stages N..4 flattened, each L2-normalised, side by side).
    #[arg(long, default_value = "backbone")]
    pub feature: FeatureKind,
    /// Use at most this many train / test images (the first in shard order).
    #[arg(long)]
    pub max_train: Option<usize>,
    #[arg(long)]
    pub max_test: Option<usize>,
    /// Also score the raw pixels (eval transform, flattened) as a baseline.
    #[arg(long)]
    pub baseline_pixels: bool,
    /// Also score the same network randomly initialised as a baseline.
    #[arg(long)]
    pub baseline_random: bool,
    /// Also score the trained network with BatchNorm statistics re-measured on train images
    /// (eval transform), as the row `odc_precise_bn`.
    #[arg(long)]
    pub precise_bn: bool,
    /// Subtract the train features' mean from every feature (train and test) before the
    /// L2 normalisation, for every row ("CL2N"): post-ReLU features are all non-negative, so
    /// without it their shared mean direction dominates the cosine.
    #[arg(long)]
    pub center: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// object_store option for the checkpoint and shard URLs, KEY=VALUE (repeatable),
    /// e.g. aws_endpoint=http://127.0.0.1:9000.
    #[arg(long = "option", value_parser = super::parse_kv)]
    pub options: Vec<(String, String)>,
    /// Print the result as JSON on stdout (instead of the table).
    #[arg(long)]
    pub json: bool,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

impl EvalArgs {
    pub fn execute(self, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        init_logging(LogFormat::Human);
        let (json, json_out) = (self.json, self.json_out.clone());
        let opts = EvalOptions {
            checkpoint_url: self.checkpoint,
            step: self.step,
            train_url: self.train,
            test_url: self.test,
            options: self.options.into_iter().collect(),
            ks: self.ks,
            temperature: self.temperature,
            probe: ProbeConfig {
                epochs: self.probe_epochs,
                lr: self.probe_lr,
                ..Default::default()
            },
            feature: self.feature,
            max_train: self.max_train,
            max_test: self.max_test,
            baseline_pixels: self.baseline_pixels,
            baseline_random: self.baseline_random,
            precise_bn: self.precise_bn,
            center: self.center,
            random_seed: 0,
            batch: self.batch,
        };
        rt.block_on(async move {
            let cancel = super::shutdown_signal();
            opts.check()?;
            let (manifest, ckpt, cfg) =
                super::load_checkpoint(&opts.checkpoint_url, &opts.options, opts.step).await?;
            let report =
                crate::eval::evaluate(opts, &manifest, ckpt, cfg.eval_model(), cancel).await?;
            let text = serde_json::to_string_pretty(&report)
                .context("cannot encode the evaluation as JSON")?;
            if let Some(path) = &json_out {
                std::fs::write(path, format!("{text}\n"))
                    .with_context(|| format!("cannot write --json-out {}", path.display()))?;
            }
            if json {
                println!("{text}");
            } else {
                print!("{}", report.to_text());
            }
            Ok::<_, anyhow::Error>(())
        })
    }
}

impl EvalOptions {
    /// The flags' values, checked before anything is read.
    fn check(&self) -> Result<(), EvalError> {
        if self.ks.is_empty() || self.ks.contains(&0) {
            return Err(EvalError::Invalid {
                field: "--k".into(),
                message: "give one or more k > 0 (e.g. --k 20 --k 200)".into(),
            });
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(EvalError::Invalid {
                field: "--temperature".into(),
                message: format!("{} must be a positive number", self.temperature),
            });
        }
        Ok(())
    }
}
