//! The HTTP endpoint every stage reports through: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (source connected, training, checkpoints succeeding),
//! and [`Health`], the readiness inputs the stages set. The stages' own counters live beside
//! them (`train::TrainMetrics`, `source::DataMetrics`, the sinks').
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
use prometheus::{Encoder, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

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

impl MetricsConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), crate::validate::FieldError> {
        if self.enabled && self.listen.parse::<SocketAddr>().is_err() {
            return Err(crate::validate::FieldError::new(
                "metrics.listen",
                format!(
                    "`{}` is not an address: use HOST:PORT such as 127.0.0.1:9898",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_listen(),
            enabled: true,
        }
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
    /// Why the source cannot reach its data, while it cannot.
    source_error: Mutex<Option<String>>,
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
    /// The source cannot reach its data (`Some(why)`: it waits and retries), or can again.
    pub fn set_source_error(&self, why: Option<String>) {
        if let Ok(mut g) = self.inner.source_error.lock() {
            *g = why;
        }
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
        if let Some(e) = self.inner.source_error.lock().ok().and_then(|g| g.clone()) {
            why.push(format!("source unreachable, waiting for it: {e}"));
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
