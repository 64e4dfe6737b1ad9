//! Releases: what a consumer indexes. A release is one frozen checkpoint + one feature + the
//! eval transform + a centring mean, and the vectors of the whole catalog under it,
//! `normalise(feature − mean)`, ready for cosine / dot product. Releases are built aside and
//! published by moving one pointer (`CURRENT`), as vector databases switch an alias: two
//! model versions are two incompatible spaces, never mixed in one table.
//!
//! - [`config`]: the `[releases]` section.
//! - [`layout`]: the objects of a release on the store, the spec, manifest and pointer.
//! - [`store`]: reading and writing them; `CURRENT`'s atomic replacement; retention.
//! - [`judge`]: a candidate checkpoint measured (collapse guard; k-NN with labels) and the
//!   promotion rule.
//! - [`worker`]: embedding catalog shards into releases (backfill, fresh arrivals) and
//!   completing a release; [`share`]: the bounded CPU share it runs on; [`part`]: one
//!   Parquet part.
//! - [`kafka`]: rows and release states on Kafka (`[releases.kafka]`).
//! - [`manager`]: the daemon's thread that judges candidates and does the work beside
//!   training. `odcd release ...` (`cmd/release.rs`) lists, promotes, rolls back and runs
//!   fleet workers.

pub mod config;
pub mod judge;
pub mod kafka;
pub mod layout;
pub mod manager;
pub mod metrics;
pub mod part;
pub mod share;
pub mod store;
pub mod worker;

pub use config::{Backfill, PromoteConfig, ReleasesConfig};
pub use judge::{Candidate, Judge, Measured, Verdict};
pub use kafka::{Announcer, ReleaseKafkaConfig, ReleaseState};
pub use layout::{Pointer, ReleaseManifest, ReleaseSpec};
pub use manager::{ManagerSettings, ReleaseManager};
pub use metrics::ReleaseMetrics;
pub use store::{ReleaseInfo, ReleaseStore};
pub use worker::{Catalog, Step, Targets, Worker, WorkerSettings};

use crate::infer::Centroids;

/// Errors of releases; each names the store, object or field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("releases URL `{url}` is not usable: {message} (use file:///abs/path, s3://bucket/prefix, gs://..., az://... or a local path)")]
    BadUrl { url: String, message: String },
    #[error("releases store `{url}`: `{path}`: {message} (check connectivity and permissions; the work is tried again)")]
    Store {
        url: String,
        path: String,
        message: String,
    },
    #[error("releases store `{url}`: `{path}` is not usable: {message}")]
    BadObject {
        url: String,
        path: String,
        message: String,
    },
    #[error(
        "releases store `{url}`: CURRENT was replaced by another process meanwhile ({message})"
    )]
    CurrentMoved { url: String, message: String },
    #[error("no release `{id}` under `{url}` (see `odcd release list`)")]
    NoRelease { url: String, id: String },
    #[error("release network: {0}")]
    Model(String),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("release evaluation: {0}")]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    #[error("release data path: {0}")]
    Pipeline(#[from] crate::decode::PipelineError),
    #[error("release dead letters: {0}")]
    DeadLetter(#[from] crate::deadletter::DeadLetterError),
    #[error("release metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("releases on Kafka: {0}")]
    Kafka(#[from] crate::sink::SinkError),
    #[error(transparent)]
    Config(#[from] crate::validate::FieldError),
    #[error("cancelled")]
    Cancelled,
}

/// Creates release `spec` (pending): its network, its centring and centroids, then its spec,
/// written last, so a crash leaves either a whole pending release or debris that is not one.
pub async fn create(
    store: &ReleaseStore,
    spec: &ReleaseSpec,
    weights: Vec<u8>,
    mean: &[f32],
    centroids: Option<&Centroids>,
) -> Result<(), ReleaseError> {
    store.write_model(&spec.release, weights).await?;
    store.write_centring(&spec.release, mean, centroids).await?;
    store.write_spec(spec).await
}
