//! The trainer: one training step of ODC (forward, labels from the memory, weighted loss,
//! backward, SGD, memory update) over the model, the optimizer and the ODC memory, with its
//! configuration (`[odc]`, `[train]`) and its metrics. What drives it step after step (warm-up,
//! publishing, checkpoints) is `crate::topology::train_loop`.

mod config;
#[cfg(test)]
mod kernels_equivalence;
mod metrics;
mod trainer;

pub use self::config::{EvictionSpec, MinClusterSpec, OdcConfig, TrainConfig};
pub use self::metrics::{LoopPhase, LoopTimes, TrainMetrics};
pub use self::trainer::{InitReport, StepOutput, StepTimings, TrainError, Trainer};
