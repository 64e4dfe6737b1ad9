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
