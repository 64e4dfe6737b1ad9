//! `odcd`: the command line. Errors end here as anyhow reports with context.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use odcd::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "odcd",
    version,
    about = "Online Deep Clustering daemon: learns image representations from a stream of shards"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: source → decode → train (+ ODC memory), until the source ends,
    /// train.max_steps is reached, or SIGTERM / SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Embed a source with a frozen checkpoint into the [embeddings] sink (eval transform).
    Embed {
        /// Checkpoint store (URL or local path), as in [checkpoint] url.
        #[arg(long)]
        checkpoint: String,
        /// Which checkpoint (default: the latest).
        #[arg(long)]
        step: Option<u64>,
        #[arg(long)]
        config: PathBuf,
        /// Read the source once, whatever its configured mode.
        #[arg(long)]
        once: bool,
    },
    /// Representation quality of a checkpoint: weighted k-NN and linear probe on labelled
    /// train / test shards (frozen network, eval transform), NMI / ARI / purity of the ODC
    /// memory's clusters, cluster statistics, and optional baselines.
    Eval {
        /// Checkpoint store (URL or local path), as in [checkpoint] url.
        #[arg(long)]
        checkpoint: String,
        /// Which checkpoint (default: the latest).
        #[arg(long)]
        step: Option<u64>,
        /// Labelled shards the k-NN votes and the probe train on (and the memory's keys are
        /// looked up in): URL or local path.
        #[arg(long)]
        train: String,
        /// Labelled shards that are classified: URL or local path.
        #[arg(long)]
        test: String,
        /// Neighbour counts (repeat the flag).
        #[arg(long = "k", default_values_t = [20usize, 200])]
        ks: Vec<usize>,
        /// k-NN vote weight exp(similarity / T).
        #[arg(long, default_value_t = 0.07)]
        temperature: f32,
        /// Linear probe epochs (0 = no probe).
        #[arg(long, default_value_t = 30)]
        probe_epochs: usize,
        /// Linear probe learning rate (SGD, momentum 0.9, cosine decay, standardised features).
        #[arg(long, default_value_t = 0.1)]
        probe_lr: f32,
        /// Feature evaluated: backbone (pooled backbone output) or neck (the clustered feature).
        #[arg(long, default_value = "backbone")]
        feature: odcd::eval::data::FeatureKind,
        /// Use at most this many train / test images (the first in shard order).
        #[arg(long)]
        max_train: Option<usize>,
        #[arg(long)]
        max_test: Option<usize>,
        /// Also score the raw pixels (eval transform, flattened) as a baseline.
        #[arg(long)]
        baseline_pixels: bool,
        /// Also score the same network randomly initialised as a baseline.
        #[arg(long)]
        baseline_random: bool,
        /// Images per forward pass.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// object_store option for the checkpoint and shard URLs, KEY=VALUE (repeatable),
        /// e.g. aws_endpoint=http://127.0.0.1:9000.
        #[arg(long = "option", value_parser = parse_kv)]
        options: Vec<(String, String)>,
        /// Print the result as JSON on stdout (instead of the table).
        #[arg(long)]
        json: bool,
        /// Also write the result as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// A self-contained HTML page about a checkpoint: curves over steps, cluster sizes and
    /// mosaics of the largest clusters' member images.
    Report {
        /// Checkpoint store (URL or local path), as in [checkpoint] url.
        #[arg(long)]
        checkpoint: String,
        /// Which checkpoint (default: the latest).
        #[arg(long)]
        step: Option<u64>,
        /// Folder for index.html (created).
        #[arg(long)]
        out: PathBuf,
        /// Shards with the member images (default: the run's [source] url).
        #[arg(long)]
        shards: Option<String>,
        /// Largest clusters shown as mosaics.
        #[arg(long, default_value_t = 12)]
        clusters: usize,
        /// Images per mosaic.
        #[arg(long, default_value_t = 32)]
        per_cluster: usize,
        /// object_store option KEY=VALUE (repeatable).
        #[arg(long = "option", value_parser = parse_kv)]
        options: Vec<(String, String)>,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// List and inspect checkpoints (a URL or a local path).
    Checkpoint {
        #[command(subcommand)]
        cmd: odcd::checkpoint::cli::CheckpointCmd,
    },
    /// Make and inspect WebDataset shards.
    Shards {
        #[command(subcommand)]
        cmd: odcd::shards::cli::ShardsCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate a config file; prints the effective configuration.
    Check { file: PathBuf },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(e) = res {
        eprintln!("logging was already initialised: {e}");
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}

fn main() -> Result<()> {
    // Before any thread starts (it sets an environment variable candle reads once).
    odcd::model::keep_candle_pool_off_rayon_cores();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("odcd-io")
        .build()
        .context("cannot start the async runtime")?;
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            init_logging(cfg.log.format);
            rt.block_on(async move {
                let cancel = CancellationToken::new();
                spawn_signal_handler(cancel.clone());
                let summary = odcd::pipeline::run(cfg, cancel).await?;
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
        Cmd::Embed {
            checkpoint,
            step,
            config,
            once,
        } => {
            let mut cfg = Config::load(&config)?;
            if once {
                match &mut cfg.source {
                    odcd::source::SourceConfig::ObjectStore(s) => {
                        s.mode = odcd::source::SourceMode::Once
                    }
                    odcd::source::SourceConfig::Kafka(_) => anyhow::bail!(
                        "--once reads an object-store prefix once; a Kafka source has no end: stop `odcd embed` with SIGTERM"
                    ),
                }
            }
            init_logging(cfg.log.format);
            rt.block_on(async move {
                let cancel = CancellationToken::new();
                spawn_signal_handler(cancel.clone());
                let s = odcd::embed::embed(cfg, &checkpoint, step, cancel).await?;
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
        Cmd::Eval {
            checkpoint,
            step,
            train,
            test,
            ks,
            temperature,
            probe_epochs,
            probe_lr,
            feature,
            max_train,
            max_test,
            baseline_pixels,
            baseline_random,
            batch,
            options,
            json,
            json_out,
        } => {
            init_logging(LogFormat::Human);
            let opts = odcd::eval::EvalOptions {
                checkpoint_url: checkpoint,
                step,
                train_url: train,
                test_url: test,
                options: options.into_iter().collect(),
                ks,
                temperature,
                probe: odcd::eval::linear_probe::ProbeConfig {
                    epochs: probe_epochs,
                    lr: probe_lr,
                    ..Default::default()
                },
                feature,
                max_train,
                max_test,
                baseline_pixels,
                baseline_random,
                random_seed: 0,
                batch,
            };
            rt.block_on(async move {
                let cancel = CancellationToken::new();
                spawn_signal_handler(cancel.clone());
                let report = odcd::eval::run_eval(opts, cancel).await?;
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
                Ok(())
            })
        }
        Cmd::Report {
            checkpoint,
            step,
            out,
            shards,
            clusters,
            per_cluster,
            options,
        } => {
            init_logging(LogFormat::Human);
            let opts = odcd::eval::report::ReportOptions {
                checkpoint_url: checkpoint,
                step,
                shards_url: shards,
                options: options.into_iter().collect(),
                out_dir: out,
                clusters,
                per_cluster,
            };
            rt.block_on(async move {
                let cancel = CancellationToken::new();
                spawn_signal_handler(cancel.clone());
                let s = odcd::eval::report::run_report(opts, cancel).await?;
                tracing::info!(
                    step = s.step,
                    history_points = s.history_points,
                    clusters = s.clusters_shown,
                    images = s.images,
                    images_missing = s.images_missing,
                    "report written"
                );
                println!("{}", s.path.display());
                Ok(())
            })
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let cfg = Config::load(&file)?;
            let text = toml::to_string_pretty(&cfg).context("cannot print the configuration")?;
            println!(
                "# {} is valid; effective configuration:\n{text}",
                file.display()
            );
            Ok(())
        }
        Cmd::Checkpoint { cmd } => {
            init_logging(LogFormat::Human);
            rt.block_on(cmd.run())
        }
        Cmd::Shards { cmd } => {
            init_logging(LogFormat::Human);
            rt.block_on(cmd.run())
        }
    }
}
