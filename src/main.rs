//! `odcd`: the command line. Parses the arguments and hands each command to `odcd::cmd`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use odcd::cmd;
use odcd::logging::{init_logging, LogFormat};

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
    Run(cmd::run::RunArgs),
    /// Embed a source with a frozen checkpoint into the [embeddings] sink (eval transform).
    Embed(cmd::embed::EmbedArgs),
    /// Representation quality of a checkpoint: weighted k-NN and linear probe on labelled
    /// train / test shards (frozen network, eval transform), NMI / ARI / purity of the ODC
    /// memory's clusters, cluster statistics, and optional baselines.
    Eval(cmd::eval::EvalArgs),
    /// A self-contained HTML page about a checkpoint: curves over steps, cluster sizes and
    /// mosaics of the largest clusters' member images.
    Report(cmd::report::ReportArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: cmd::config::ConfigCmd,
    },
    /// List and inspect checkpoints (a URL or a local path).
    Checkpoint {
        #[command(subcommand)]
        cmd: cmd::checkpoint::CheckpointCmd,
    },
    /// Releases of clean embeddings: list, promote a checkpoint, roll back, run a worker.
    Release {
        #[command(subcommand)]
        cmd: cmd::release::ReleaseCmd,
    },
    /// Make and inspect WebDataset shards.
    Shards {
        #[command(subcommand)]
        cmd: cmd::shards::ShardsCmd,
    },
    /// Measure the binary on this machine: `bench train-step --device cuda:0` is the
    /// training-step throughput (docs/gpu.md).
    Bench {
        #[command(subcommand)]
        cmd: cmd::bench::BenchCmd,
    },
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
        Cmd::Run(args) => args.execute(&rt),
        Cmd::Embed(args) => args.execute(&rt),
        Cmd::Eval(args) => args.execute(&rt),
        Cmd::Report(args) => args.execute(&rt),
        Cmd::Config { cmd } => cmd.execute(),
        Cmd::Checkpoint { cmd } => {
            init_logging(LogFormat::Human);
            rt.block_on(cmd.run())
        }
        Cmd::Release { cmd } => cmd.execute(&rt),
        Cmd::Shards { cmd } => {
            init_logging(LogFormat::Human);
            rt.block_on(cmd.run())
        }
        Cmd::Bench { cmd } => {
            init_logging(LogFormat::Human);
            cmd.execute()
        }
    }
}
