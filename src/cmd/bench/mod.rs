//! `odcd bench ...`: micro-benchmarks of the binary itself, for machines without cargo
//! (`scripts/gpu-check.sh`) and for the scripts that set a bench beside the daemon.
//!
//! - [`train_step`]: the training step (forward + loss + backward + SGD) on random images.
//! - [`data_parallel`]: the whole ODC step as one process or one rank of `mpirun -np N`.
//! - [`embed`]: the frozen network's eval forward as a release embeds (feature, centring,
//!   normalisation, nearest centroid): the bound of a release's backfill.
//! - [`shape`]: the flags and names they share.

pub mod data_parallel;
pub mod embed;
pub mod shape;
pub mod train_step;

pub use train_step::{train_step, BenchError, TrainStepBench, TrainStepResult};

/// Micro-benchmarks of the binary itself.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Training-step throughput (forward + loss + backward + SGD) on random images: median
    /// step time of N steps after one warm-up step, one line on stdout.
    TrainStep(train_step::TrainStepArgs),
    /// The whole ODC step, one process or one rank of `mpirun -np N` (same global batch):
    /// images/s, and per step the bytes and time of each collective.
    DataParallel(data_parallel::DataParallelArgs),
    /// The eval forward a release embeds with (feature, centring, normalisation, nearest
    /// centroid) on random images, at full speed or at a CPU share: images/s.
    Embed(embed::EmbedArgs),
}

impl BenchCmd {
    pub fn execute(self) -> anyhow::Result<()> {
        match self {
            BenchCmd::TrainStep(a) => a.execute(),
            BenchCmd::DataParallel(a) => a.execute(),
            BenchCmd::Embed(a) => a.execute(),
        }
    }
}
