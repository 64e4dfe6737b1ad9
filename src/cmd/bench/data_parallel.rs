//! `odcd bench data-parallel`: the whole ODC training step (forward, labels from the memory,
//! loss, backward, gradient all-reduce, SGD, memory update) on random keyed images, as one
//! process or as one rank of `mpirun -np N`, with the same GLOBAL batch either way. Rank 0
//! prints images/s of the global batch, and per step and rank the bytes each collective
//! moved and the time it took.
//!
//!   RAYON_NUM_THREADS=2 odcd bench data-parallel --batch 32
//!   mpirun -np 2 odcd bench data-parallel --batch 32     # each rank: 16 images, 1 thread

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::device::Kernels;
use crate::dist::{CollectiveStats, OpStats};
use crate::model::{Arch, ModelConfig};
use crate::optim::SgdConfig;
use crate::train::{MinClusterSpec, OdcConfig, Trainer};

#[derive(Debug, clap::Args)]
pub struct DataParallelArgs {
    /// resnet18 or resnet50.
    #[arg(long, default_value = "resnet18", value_parser = super::shape::parse_arch)]
    pub arch: Arch,
    /// Input side in pixels (1 × SIZE × SIZE random images).
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// The GLOBAL batch: each of N ranks trains BATCH / N images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Measured steps (after two warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Clusters.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
}

fn per_step(total: OpStats, before: OpStats, steps: usize) -> (f64, f64, f64) {
    let n = steps.max(1) as f64;
    (
        (total.calls - before.calls) as f64 / n,
        (total.bytes - before.bytes) as f64 / n,
        (total.seconds - before.seconds) * 1e3 / n,
    )
}

impl DataParallelArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let c = crate::dist::from_environment()?;
        let (rank, ranks) = (c.rank(), c.size());
        let threads = if ranks > 1 {
            crate::dist::share_cores_between_ranks()
        } else {
            None
        }
        .unwrap_or_else(rayon::current_num_threads);
        if !self.batch.is_multiple_of(ranks) || self.batch / ranks < 2 {
            anyhow::bail!(
                "--batch {} does not split into {ranks} equal parts of at least 2 images",
                self.batch
            );
        }
        if self.steps == 0 {
            anyhow::bail!("--steps must be at least 1");
        }
        let local = self.batch / ranks;
        let model = ModelConfig {
            arch: self.arch,
            in_channels: 1,
            ..ModelConfig::default()
        };
        let warmup = (self.k * 4).max(self.batch);
        let odc = OdcConfig {
            num_clusters: self.k,
            memory_capacity: self.batch * (self.steps + 4) + warmup,
            warmup_samples: warmup,
            min_cluster: MinClusterSpec::Count(1),
            ..OdcConfig::default()
        };
        let dev = Device::Cpu;
        let mut trainer =
            Trainer::new(&model, &odc, &SgdConfig::default(), &dev, Kernels::Auto, 0)?;
        trainer.set_collective(c.clone());
        let batch = |step: usize| -> anyhow::Result<(Tensor, Vec<String>)> {
            let x = Tensor::randn(0f32, 1f32, (local, 1, self.size, self.size), &dev)?;
            let keys = (0..local).map(|i| format!("r{rank}-s{step}-{i}")).collect();
            Ok((x, keys))
        };
        // warm-up clustering on every rank's first batches (gathered, as `odcd run` does)
        let (mut keys, mut feats) = (Vec::new(), Vec::new());
        let mut i = 0;
        while keys.len() < warmup {
            let (x, k) = batch(1_000_000 + i)?;
            let f = trainer.embed(&x)?;
            let gk = c.all_gather_bytes(&crate::dist::encode_strings(&k))?;
            let gf = c.all_gather_f32(&f)?;
            for (ks, fs) in gk.iter().zip(gf) {
                keys.extend(crate::dist::decode_strings(ks)?);
                feats.extend(fs);
            }
            i += 1;
        }
        trainer.initial_clustering(keys, feats)?;
        let mut before = CollectiveStats::default();
        let mut t0 = Instant::now();
        let mut step_times = Vec::new();
        for step in 0..self.steps + 2 {
            if step == 2 {
                before = c.stats();
                t0 = Instant::now();
            }
            let (x, k) = batch(step)?;
            let ts = Instant::now();
            trainer.step(&x, &k)?;
            if step >= 2 {
                step_times.push(ts.elapsed().as_secs_f64());
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = c.stats();
        let n = self.steps;
        let mut line = format!(
            "odcd data-parallel {:?} 1x{}x{} global batch {} ({} rank(s) x {} images, {} thread(s) each): {:.1} images/s, step {:.1} ms (median)",
            self.arch,
            self.size,
            self.size,
            self.batch,
            ranks,
            local,
            threads,
            (self.batch * n) as f64 / secs,
            {
                step_times.sort_by(|a, b| a.total_cmp(b));
                step_times[step_times.len() / 2] * 1e3
            }
        );
        if ranks > 1 {
            let ops = [
                (
                    "all-reduce",
                    per_step(after.all_reduce, before.all_reduce, n),
                ),
                (
                    "all-gather",
                    per_step(after.all_gather, before.all_gather, n),
                ),
                ("broadcast", per_step(after.broadcast, before.broadcast, n)),
            ];
            let bytes: f64 = ops.iter().map(|(_, o)| o.1).sum();
            line.push_str(&format!(
                "; per step on rank {rank}: {:.2} MB sent",
                bytes / 1e6
            ));
            for (name, (calls, b, ms)) in ops {
                line.push_str(&format!(
                    ", {name} {calls:.0} call(s) {:.3} MB {ms:.1} ms",
                    b / 1e6
                ));
            }
        }
        if rank == 0 {
            println!("{line}");
        }
        Ok(())
    }
}
