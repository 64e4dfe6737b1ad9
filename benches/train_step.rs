//! Training-step throughput of odcd's model on this machine: forward (train mode) +
//! weighted cross-entropy + backward + momentum SGD, median of N steps.
//!
//!   cargo bench --bench train_step                 # ResNet-18, 3×32×32, batch 64
//!   ARCH=resnet50 SIZE=64 BATCH=32 cargo bench --bench train_step
//!
//! Compare with `benches/train_step_torch.py` (same architecture in PyTorch) in the same run:
//! `scripts/bench-train.sh` runs both. The step itself is `odcd::cmd::bench::train_step`, which
//! `odcd bench train-step --device cuda:0` also runs where there is no cargo (docs/gpu.md).
//!
//! The generic path (candle ops with a backward on every device, what a GPU runs) instead of
//! odcd's CPU kernels: `KERNELS=generic cargo bench --bench train_step`;
//! `scripts/bench-train.sh kernels` runs both side by side.
//!
//! RSS check: `STEPS=1000 RSS_EVERY=100 cargo bench --bench train_step` prints the resident
//! set size every 100 steps (`scripts/bench-train.sh rss` runs it); it must stay flat.

use candle_core::Device;
use odcd::cmd::bench::{train_step, TrainStepBench};
use odcd::device::Kernels;
use odcd::model::{Arch, ModelConfig};
use odcd::optim::SgdConfig;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() -> anyhow::Result<()> {
    // As `odcd` does at start: candle's own pool stays on the calling thread.
    odcd::model::keep_candle_pool_off_rayon_cores();
    let arch = match std::env::var("ARCH").as_deref() {
        Ok("resnet50") => Arch::Resnet50,
        _ => Arch::Resnet18,
    };
    let bench = TrainStepBench {
        model: ModelConfig {
            arch,
            in_channels: 3,
            ..ModelConfig::default()
        },
        optimizer: SgdConfig::default(),
        size: env_usize("SIZE", 32),
        batch: env_usize("BATCH", 64),
        steps: env_usize("STEPS", 5),
        k: env_usize("K", 10),
        rss_every: env_usize("RSS_EVERY", 0),
        kernels: match std::env::var("KERNELS").as_deref() {
            Ok("generic") => Kernels::Generic,
            _ => Kernels::Auto,
        },
    };
    println!("{}", train_step(&bench, &Device::Cpu)?);
    Ok(())
}
