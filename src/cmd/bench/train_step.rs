//! `odcd bench train-step`: training-step throughput of odcd's model on a device: forward
//! (train mode) + weighted cross-entropy + backward + momentum SGD, median of N steps after
//! one warm-up step. The same code runs `cargo bench --bench train_step`; the subcommand is
//! there so that a machine with a GPU and no Rust toolchain can measure the binary it was
//! given (`scripts/gpu-check.sh`, docs/gpu.md).

use std::fmt;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::shape::{device_name, parse_arch, rss_mib, stem_label};
use crate::device::Kernels;
use crate::model::{Arch, ModelConfig, ModelError, OdcModel};
use crate::optim::{OptimError, Sgd, SgdConfig};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the bench needs at least one measured step: --steps was 0")]
    NoSteps,
    #[error("building the model: {0}")]
    Model(#[from] ModelError),
    #[error("the optimizer: {0}")]
    Optim(#[from] OptimError),
    #[error("a training step on {device}: {source}")]
    Step {
        device: String,
        source: candle_core::Error,
    },
}

/// What to measure: the model and input shape of one training step.
#[derive(Debug, Clone)]
pub struct TrainStepBench {
    /// The network (arch, input channels, stem, width, neck) as `[model]` builds it.
    pub model: ModelConfig,
    /// SGD settings (`[optimizer]`).
    pub optimizer: SgdConfig,
    /// Input side in pixels (in_channels × size × size images).
    pub size: usize,
    pub batch: usize,
    /// Measured steps (one warm-up step runs before them).
    pub steps: usize,
    /// Clusters (the head's outputs).
    pub k: usize,
    /// Report the resident set size every N steps (0 = never).
    pub rss_every: usize,
    /// odcd's CPU kernels (`Auto`, on CPU) or the generic path, as `train.kernels`.
    pub kernels: Kernels,
}

/// Median times of the measured steps.
#[derive(Debug, Clone)]
pub struct TrainStepResult {
    pub bench: TrainStepBench,
    pub device: String,
    /// `cpu` (odcd's CPU kernels) or `generic`: the path the step took.
    pub kernels: &'static str,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub fastest_ms: f64,
    pub threads: usize,
}

impl TrainStepResult {
    pub fn images_per_s(&self) -> f64 {
        self.bench.batch as f64 / (self.step_ms / 1e3)
    }
}

impl fmt::Display for TrainStepResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.bench;
        write!(
            f,
            "odcd(candle) {:?}{} {}x{}x{} batch {} on {} kernels {}: step {:.1} ms (forward {:.1} ms, backward {:.1} ms, fastest step {:.1} ms), {:.1} images/s, threads {}",
            b.model.arch,
            stem_label(&b.model),
            b.model.in_channels,
            b.size,
            b.size,
            b.batch,
            self.device,
            self.kernels,
            self.step_ms,
            self.forward_ms,
            self.backward_ms,
            self.fastest_ms,
            self.images_per_s(),
            self.threads
        )
    }
}

/// Runs `bench.steps + 1` training steps on `dev` (the first is a warm-up: allocator, thread
/// pool, kernel loading) and returns the medians. Each phase ends with a device
/// synchronisation, so GPU times are the kernels' and not only their launches'.
pub fn train_step(bench: &TrainStepBench, dev: &Device) -> Result<TrainStepResult, BenchError> {
    if bench.steps == 0 {
        return Err(BenchError::NoSteps);
    }
    let device = device_name(dev);
    let step_err = |source: candle_core::Error| BenchError::Step {
        device: device.clone(),
        source,
    };
    let cfg = &bench.model;
    let k = bench.k;
    let model = OdcModel::new(cfg, k, dev, 0)?;
    model.set_kernels(bench.kernels);
    let mut opt = Sgd::new(bench.optimizer.clone(), model.params().params())?;
    opt.set_kernels(bench.kernels);
    let shape = (bench.batch, cfg.in_channels, bench.size, bench.size);
    let x = Tensor::randn(0f32, 1f32, shape, dev).map_err(step_err)?;
    let y: Vec<u32> = (0..bench.batch as u32).map(|i| i % k as u32).collect();
    let y = Tensor::from_vec(y, bench.batch, dev).map_err(step_err)?;
    let w = Tensor::ones(k, DType::F32, dev).map_err(step_err)?;
    let (mut times, mut tf, mut tb) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..bench.steps + 1 {
        let t0 = Instant::now();
        let out = model.forward_train(&x, step as u64).map_err(step_err)?;
        let loss =
            crate::odc::weighted_cross_entropy_tensor(&out.logits, &y, &w).map_err(step_err)?;
        dev.synchronize().map_err(step_err)?;
        let t1 = Instant::now();
        let grads = model.backward(&loss).map_err(step_err)?;
        dev.synchronize().map_err(step_err)?;
        let t2 = Instant::now();
        opt.step(&grads, step as u64)?;
        dev.synchronize().map_err(step_err)?;
        let t3 = Instant::now();
        if bench.rss_every > 0 && step % bench.rss_every == 0 {
            println!("step {step:>5} rss {:.1} MiB", rss_mib());
        }
        if step > 0 {
            times.push((t3 - t0).as_secs_f64());
            tf.push((t1 - t0).as_secs_f64());
            tb.push((t2 - t1).as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2] * 1e3
    };
    let step_ms = med(&mut times);
    Ok(TrainStepResult {
        bench: bench.clone(),
        device,
        kernels: if bench.kernels.cpu_kernels_on(dev) {
            "cpu"
        } else {
            "generic"
        },
        step_ms,
        forward_ms: med(&mut tf),
        backward_ms: med(&mut tb),
        // the fastest step: least disturbed by other work on a shared machine
        fastest_ms: times[0] * 1e3,
        threads: rayon::current_num_threads(),
    })
}

#[derive(Debug, clap::Args)]
pub struct TrainStepArgs {
    /// Take the network, input size, channels, batch and K from this daemon config (and its
    /// `--set` overrides): the step `odcd run --config FILE` trains, without input, memory or
    /// outputs; its optimizer, and its device and kernels unless --device / --kernels say
    /// otherwise.
    #[arg(long, conflicts_with_all = ["arch", "size", "batch", "k"])]
    pub config: Option<std::path::PathBuf>,
    /// Overrides of --config's values, as `odcd run --set`.
    #[arg(long = "set", value_parser = crate::cmd::parse_kv, requires = "config")]
    pub overrides: Vec<(String, String)>,
    /// resnet18 or resnet50.
    #[arg(long, default_value = "resnet18", value_parser = parse_arch)]
    pub arch: Arch,
    /// Input side in pixels (3 × SIZE × SIZE random images).
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Clusters (the head's outputs).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// cpu, cuda:N or auto, as `train.device` (default: --config's, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// auto or generic, as `train.kernels` (generic runs on CPU what a GPU runs; default:
    /// --config's, else auto).
    #[arg(long, value_parser = Kernels::parse)]
    pub kernels: Option<Kernels>,
}

impl TrainStepArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let a = self;
        let cfg = match &a.config {
            Some(path) => Some(crate::config::Config::load_with_overrides(
                path,
                &a.overrides,
            )?),
            None => None,
        };
        let device = a
            .device
            .or_else(|| cfg.as_ref().map(|c| c.train.device.clone()))
            .unwrap_or_else(|| "cpu".into());
        let kernels = match (a.kernels, &cfg) {
            (Some(k), _) => k,
            (None, Some(c)) => Kernels::parse(&c.train.kernels).map_err(anyhow::Error::msg)?,
            (None, None) => Kernels::Auto,
        };
        let dev = crate::device::select_device(&device)?;
        let mut bench = TrainStepBench {
            model: ModelConfig {
                arch: a.arch,
                in_channels: 3,
                ..ModelConfig::default()
            },
            optimizer: SgdConfig::default(),
            size: a.size,
            batch: a.batch,
            steps: a.steps,
            k: a.k,
            rss_every: 0,
            kernels,
        };
        if let Some(cfg) = &cfg {
            bench.model = cfg.model.clone();
            bench.optimizer = cfg.optimizer.clone();
            bench.size = cfg.pipeline.transform.size() as usize;
            bench.batch = cfg.pipeline.batch_size;
            bench.k = cfg.odc.num_clusters;
        }
        let mut r = train_step(&bench, &dev)?;
        r.device = device;
        println!("{r}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_resnet18_step_on_the_cpu_reports_its_times() -> Result<(), BenchError> {
        let bench = TrainStepBench {
            model: ModelConfig {
                in_channels: 3,
                ..ModelConfig::default()
            },
            optimizer: SgdConfig::default(),
            size: 32,
            batch: 4,
            steps: 1,
            k: 3,
            rss_every: 0,
            kernels: Kernels::Auto,
        };
        let r = train_step(&bench, &Device::Cpu)?;
        assert!(r.step_ms > 0.0 && r.step_ms >= r.forward_ms);
        let line = r.to_string();
        assert!(line.starts_with("odcd(candle) Resnet18 3x32x32 batch 4 on cpu kernels cpu: step "));
        let small = ModelConfig {
            small_stem: true,
            small_stem_stride: 2,
            width: 32,
            in_channels: 1,
            ..ModelConfig::default()
        };
        assert_eq!(stem_label(&small), " (3x3/s2 stem, width 32)");
        assert!(line.contains(" images/s"));
        Ok(())
    }

    #[test]
    fn zero_steps_is_refused() {
        let bench = TrainStepBench {
            model: ModelConfig {
                in_channels: 3,
                ..ModelConfig::default()
            },
            optimizer: SgdConfig::default(),
            size: 32,
            batch: 4,
            steps: 0,
            k: 3,
            rss_every: 0,
            kernels: Kernels::Auto,
        };
        assert!(matches!(
            train_step(&bench, &Device::Cpu),
            Err(BenchError::NoSteps)
        ));
    }
}
