//! Training metrics and the HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (source connected, training, checkpoints succeeding).
//!
//! One `prometheus::Registry` is created by the pipeline and passed to every stage: no
//! global statics, so tests can assert on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::odc::MemoryStats;
use crate::train::StepOutput;

fn default_listen() -> String {
    "127.0.0.1:9898".into()
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); port 0 picks a free
    /// port (logged at start). Use `0.0.0.0:9898` to be scraped from other hosts.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Serve the endpoint at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_listen(),
            enabled: true,
        }
    }
}

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

/// Readiness inputs, set by the stages.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    source_ok: AtomicBool,
    training: AtomicBool,
    checkpoint_ok: AtomicBool,
    checkpoint_error: Mutex<Option<String>>,
    /// Why start-up is held back (e.g. the checkpoint store is unreachable), if it is.
    startup_blocked: Mutex<Option<String>>,
}

impl Health {
    pub fn new() -> Self {
        let h = Health::default();
        h.inner.checkpoint_ok.store(true, Ordering::Relaxed);
        h
    }
    pub fn set_source_ok(&self, v: bool) {
        self.inner.source_ok.store(v, Ordering::Relaxed);
    }
    pub fn set_training(&self, v: bool) {
        self.inner.training.store(v, Ordering::Relaxed);
    }
    pub fn set_checkpoint(&self, err: Option<String>) {
        self.inner
            .checkpoint_ok
            .store(err.is_none(), Ordering::Relaxed);
        if let Ok(mut g) = self.inner.checkpoint_error.lock() {
            *g = err;
        }
    }
    /// Start-up is waiting on something outside (`Some(why)`), or no longer (`None`).
    pub fn set_startup_blocked(&self, why: Option<String>) {
        if let Ok(mut g) = self.inner.startup_blocked.lock() {
            *g = why;
        }
    }
    /// `None` when ready, else what is not.
    pub fn not_ready(&self) -> Option<String> {
        let mut why = Vec::new();
        if let Some(b) = self
            .inner
            .startup_blocked
            .lock()
            .ok()
            .and_then(|g| g.clone())
        {
            why.push(format!("starting: {b}"));
        }
        if !self.inner.source_ok.load(Ordering::Relaxed) {
            why.push("source not connected".to_string());
        }
        if !self.inner.training.load(Ordering::Relaxed) {
            why.push("not training yet".to_string());
        }
        if !self.inner.checkpoint_ok.load(Ordering::Relaxed) {
            let e = self
                .inner
                .checkpoint_error
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_default();
            why.push(format!("last checkpoint failed: {e}"));
        }
        if why.is_empty() {
            None
        } else {
            Some(why.join("; "))
        }
    }
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    health: Health,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let enc = TextEncoder::new();
    match enc.encode(&s.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, enc.format_type().to_string())],
            buf,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds the endpoint and serves it until `cancel`. Returns the bound address.
pub async fn serve(
    listen: &str,
    registry: Registry,
    health: Health,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on metrics.listen = {listen}: {e}"),
        )
    })?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, health });
    tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    Ok(addr)
}
