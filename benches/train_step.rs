//! Training-step throughput of odcd's model on this machine: forward (train mode) +
//! weighted cross-entropy + backward + momentum SGD, median of N steps.
//!
//!   cargo bench --bench train_step                 # ResNet-18, 3×32×32, batch 64
//!   ARCH=resnet50 SIZE=64 BATCH=32 cargo bench --bench train_step
//!
//! Compare with `benches/train_step_torch.py` (same architecture in PyTorch) in the same run:
//! `scripts/bench-train.sh` runs both.
//!
//! The generic path (candle ops with a backward on every device, what a GPU runs) instead of
//! odcd's CPU kernels: `KERNELS=generic cargo bench --bench train_step`;
//! `scripts/bench-train.sh kernels` runs both side by side.
//!
//! RSS check: `STEPS=1000 RSS_EVERY=100 cargo bench --bench train_step` prints the resident
//! set size every 100 steps (`scripts/bench-train.sh rss` runs it); it must stay flat.

use std::time::Instant;

use candle_core::{Device, Tensor};
use odcd::device::Kernels;
use odcd::model::{Arch, ModelConfig, OdcModel};
use odcd::optim::{Sgd, SgdConfig};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Resident set size of this process (Linux `/proc/self/status`), NaN where unavailable.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    // As `odcd` does at start: candle's own pool stays on the calling thread.
    odcd::model::keep_candle_pool_off_rayon_cores();
    let arch = match std::env::var("ARCH").as_deref() {
        Ok("resnet50") => Arch::Resnet50,
        _ => Arch::Resnet18,
    };
    let size = env_usize("SIZE", 32);
    let batch = env_usize("BATCH", 64);
    let steps = env_usize("STEPS", 5);
    let k = env_usize("K", 10);
    let rss_every = env_usize("RSS_EVERY", 0);
    let cfg = ModelConfig {
        arch,
        in_channels: 3,
        small_stem: false,
        ..ModelConfig::default()
    };
    let dev = Device::Cpu;
    let kernels = match std::env::var("KERNELS").as_deref() {
        Ok("generic") => Kernels::Generic,
        _ => Kernels::Auto,
    };
    let model = OdcModel::new(&cfg, k, &dev, 0)?;
    model.set_kernels(kernels);
    let mut opt = Sgd::new(SgdConfig::default(), model.params().params())?;
    opt.set_kernels(kernels);
    let x = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &dev)?;
    let y: Vec<u32> = (0..batch as u32).map(|i| i % k as u32).collect();
    let y = Tensor::from_vec(y, batch, &dev)?;
    let w = Tensor::ones(k, candle_core::DType::F32, &dev)?;
    let mut times = Vec::new();
    let (mut tf, mut tb) = (Vec::new(), Vec::new());
    for step in 0..steps + 1 {
        let t0 = Instant::now();
        let out = model.forward_train(&x, step as u64)?;
        let loss = odcd::odc::weighted_cross_entropy_tensor(&out.logits, &y, &w)?;
        let t1 = Instant::now();
        let grads = model.backward(&loss)?;
        let t2 = Instant::now();
        opt.step(&grads, step as u64)?;
        let t3 = Instant::now();
        if rss_every > 0 && step % rss_every == 0 {
            println!("step {step:>5} rss {:.1} MiB", rss_mib());
        }
        if step > 0 {
            // the first step is a warm-up (allocator, thread pool)
            times.push((t3 - t0).as_secs_f64());
            tf.push((t1 - t0).as_secs_f64());
            tb.push((t2 - t1).as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let step_s = med(&mut times);
    // the fastest step: least disturbed by other work on a shared machine
    let min_s = times[0];
    println!(
        "odcd(candle) {:?} {}x{}x{} batch {} kernels {}: step {:.1} ms (forward {:.1} ms, backward {:.1} ms, fastest step {:.1} ms), {:.1} images/s, threads {}",
        arch,
        3,
        size,
        size,
        batch,
        if kernels == Kernels::Generic {
            "generic"
        } else {
            "cpu"
        },
        step_s * 1e3,
        med(&mut tf) * 1e3,
        med(&mut tb) * 1e3,
        min_s * 1e3,
        batch as f64 / step_s,
        rayon::current_num_threads()
    );
    Ok(())
}
