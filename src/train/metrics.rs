//! Gauges and counters of the trainer and the ODC memory (`odcd_train_*`, `odcd_memory_*`,
//! `odcd_checkpoint*`), registered on the run's registry and served by `crate::metrics`.

use prometheus::{
    CounterVec, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry,
};

use super::StepOutput;
use crate::odc::MemoryStats;

/// Gauges and counters of the trainer and the ODC memory.
#[derive(Clone)]
pub struct TrainMetrics {
    pub steps: IntCounter,
    pub images_trained: IntCounter,
    pub step_seconds: Histogram,
    pub forward_seconds: Gauge,
    pub backward_seconds: Gauge,
    pub memory_seconds: Gauge,
    pub input_wait_seconds: IntCounterF,
    /// Wall time of the training loop by phase ([`LoopPhase`]): where the images/s go. One
    /// child per phase in [`LoopPhase::ALL`] order, looked up once rather than every step.
    pub phase_seconds: Vec<prometheus::Counter>,
    pub images_per_second: Gauge,
    pub loss: Gauge,
    pub accuracy: Gauge,
    pub lr: Gauge,
    pub change_ratio: Gauge,
    pub empty_clusters: IntGauge,
    pub small_clusters: IntGauge,
    pub min_cluster_size: IntGauge,
    pub max_cluster_size: IntGauge,
    pub cluster_size_entropy: Gauge,
    pub cluster_splits: IntCounter,
    pub memory_fill: IntGauge,
    pub memory_capacity: IntGauge,
    pub memory_evictions: IntGauge,
    pub step: IntGauge,
    pub batch_queue_depth: IntGauge,
    pub last_checkpoint_timestamp: Gauge,
    pub checkpoint_failures: IntCounter,
    pub checkpoints: IntCounter,
}

/// A phase of one pass of the training loop, as `odcd_train_loop_seconds_total{phase}` and the
/// progress line's `time` field name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopPhase {
    Forward,
    Backward,
    Optimizer,
    Memory,
    StepOther,
    InputWait,
    Publish,
    Other,
}

impl LoopPhase {
    pub const ALL: [LoopPhase; 8] = [
        LoopPhase::Forward,
        LoopPhase::Backward,
        LoopPhase::Optimizer,
        LoopPhase::Memory,
        LoopPhase::StepOther,
        LoopPhase::InputWait,
        LoopPhase::Publish,
        LoopPhase::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoopPhase::Forward => "forward",
            LoopPhase::Backward => "backward",
            LoopPhase::Optimizer => "optimizer",
            LoopPhase::Memory => "memory",
            LoopPhase::StepOther => "step_other",
            LoopPhase::InputWait => "input_wait",
            LoopPhase::Publish => "publish",
            LoopPhase::Other => "other",
        }
    }
}

/// Seconds per [`LoopPhase`] over some passes of the training loop.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoopTimes([f64; 8]);

impl LoopTimes {
    pub fn add(&mut self, phase: LoopPhase, secs: f64) {
        self.0[phase as usize] += secs.max(0.0);
    }

    pub fn get(&self, phase: LoopPhase) -> f64 {
        self.0[phase as usize]
    }

    pub fn total(&self) -> f64 {
        self.0.iter().sum()
    }

    /// One step's trainer timings: forward, backward, optimizer, memory, and the rest of
    /// the `step_secs` it took as step_other.
    pub fn add_step(&mut self, t: &super::StepTimings, step_secs: f64) {
        self.add(LoopPhase::Forward, t.forward);
        self.add(LoopPhase::Backward, t.backward);
        self.add(LoopPhase::Optimizer, t.optimizer);
        self.add(LoopPhase::Memory, t.memory);
        let known = t.forward + t.backward + t.optimizer + t.memory;
        self.add(LoopPhase::StepOther, step_secs - known);
    }

    /// `forward 41% backward 45% ...`: each phase's share of the total.
    pub fn shares(&self) -> String {
        let total = self.total().max(1e-9);
        LoopPhase::ALL
            .iter()
            .map(|&p| format!("{} {:.1}%", p.name(), 100.0 * self.get(p) / total))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A float counter (seconds spent waiting): prometheus' `Counter` with f64.
pub type IntCounterF = prometheus::Counter;

impl TrainMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            c: T,
        ) -> prometheus::Result<T> {
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let g = |n: &str, h: &str| reg(r, Gauge::new(n, h)?);
        let ig = |n: &str, h: &str| reg(r, IntGauge::new(n, h)?);
        let ic = |n: &str, h: &str| reg(r, IntCounter::new(n, h)?);
        Ok(TrainMetrics {
            steps: ic("odcd_train_steps_total", "Training steps completed")?,
            images_trained: ic("odcd_train_images_total", "Images trained on")?,
            step_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("odcd_train_step_seconds", "Wall time of a training step")
                        .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
                )?,
            )?,
            forward_seconds: g(
                "odcd_train_forward_seconds",
                "Forward time of the last step",
            )?,
            backward_seconds: g(
                "odcd_train_backward_seconds",
                "Backward time of the last step",
            )?,
            memory_seconds: g(
                "odcd_train_memory_seconds",
                "ODC memory work (labels, update, centroids, small clusters) of the last step",
            )?,
            input_wait_seconds: reg(
                r,
                prometheus::Counter::new(
                    "odcd_train_input_wait_seconds_total",
                    "Time the trainer waited for input batches",
                )?,
            )?,
            phase_seconds: {
                let v = reg(
                    r,
                    CounterVec::new(
                        Opts::new(
                            "odcd_train_loop_seconds_total",
                            "Wall time of the training loop by phase: forward (with the loss), \
                             backward, optimizer, memory (labels, update, centroids), step_other \
                             (the rest of the trainer's step: the batch's copy to the device), \
                             input_wait, publish (embeddings to the sinks' queue), other \
                             (metrics, logs, evaluation hand-off, checkpoints)",
                        ),
                        &["phase"],
                    )?,
                )?;
                LoopPhase::ALL
                    .iter()
                    .map(|p| v.get_metric_with_label_values(&[p.name()]))
                    .collect::<prometheus::Result<Vec<_>>>()?
            },
            images_per_second: g(
                "odcd_train_images_per_second",
                "Training throughput over the last log window",
            )?,
            loss: g("odcd_train_loss", "Weighted cross-entropy of the last step")?,
            accuracy: g(
                "odcd_train_accuracy_ratio",
                "Head top-1 accuracy against memory labels, last step",
            )?,
            lr: g("odcd_train_learning_rate", "Learning rate of the last step")?,
            change_ratio: g(
                "odcd_odc_change_ratio",
                "Fraction of re-visited samples whose cluster label changed, last step",
            )?,
            empty_clusters: ig("odcd_odc_empty_clusters", "Clusters with no member")?,
            small_clusters: ig("odcd_odc_small_clusters", "Clusters below min_cluster")?,
            min_cluster_size: ig("odcd_odc_min_cluster_size", "Smallest cluster size")?,
            max_cluster_size: ig("odcd_odc_max_cluster_size", "Largest cluster size")?,
            cluster_size_entropy: g(
                "odcd_odc_cluster_size_entropy_nats",
                "Entropy of the cluster-size distribution",
            )?,
            cluster_splits: ic(
                "odcd_odc_cluster_splits_total",
                "Clusters re-seeded by splitting the largest",
            )?,
            memory_fill: ig("odcd_odc_memory_entries", "Entries in the samples memory")?,
            memory_capacity: ig(
                "odcd_odc_memory_capacity_entries",
                "Capacity of the samples memory",
            )?,
            memory_evictions: ig(
                "odcd_odc_memory_evictions_total",
                "Entries evicted from the samples memory",
            )?,
            step: ig("odcd_train_step", "Current global step")?,
            batch_queue_depth: ig(
                "odcd_batch_queue_depth",
                "Decoded batches waiting for the trainer (bounded by pipeline.batch_queue)",
            )?,
            last_checkpoint_timestamp: g(
                "odcd_checkpoint_last_success_timestamp_seconds",
                "Unix time of the last durable checkpoint",
            )?,
            checkpoint_failures: ic(
                "odcd_checkpoint_failures_total",
                "Checkpoint writes that failed",
            )?,
            checkpoints: ic("odcd_checkpoints_total", "Checkpoints written")?,
        })
    }

    /// Adds one pass's phase times to `odcd_train_loop_seconds_total`.
    pub fn observe_loop(&self, t: &LoopTimes) {
        for (c, p) in self.phase_seconds.iter().zip(LoopPhase::ALL) {
            c.inc_by(t.get(p));
        }
    }

    pub fn observe_step(&self, out: &StepOutput, splits: usize, batch: usize) {
        self.steps.inc();
        self.step.set(out.step as i64 + 1);
        self.images_trained.inc_by(batch as u64);
        let t = &out.timings;
        self.step_seconds
            .observe(t.forward + t.backward + t.optimizer + t.memory);
        self.forward_seconds.set(t.forward);
        self.backward_seconds.set(t.backward);
        self.memory_seconds.set(t.memory);
        self.loss.set(out.loss as f64);
        self.accuracy.set(out.accuracy as f64);
        self.lr.set(out.lr);
        self.change_ratio.set(out.change_ratio);
        self.cluster_splits.inc_by(splits as u64);
    }

    pub fn observe_memory(&self, s: &MemoryStats) {
        self.empty_clusters.set(s.empty_clusters as i64);
        self.small_clusters.set(s.small_clusters as i64);
        self.min_cluster_size.set(s.min_size as i64);
        self.max_cluster_size.set(s.max_size as i64);
        self.cluster_size_entropy.set(s.size_entropy);
        self.memory_fill.set(s.fill as i64);
        self.memory_capacity.set(s.capacity as i64);
        self.memory_evictions.set(s.evictions_total as i64);
    }
}
