//! Dead letters: records the data path rejected (undecodable, too large, bad label, ...),
//! written with their reason for later inspection, to an object-store prefix
//! ([`store::StoreDeadLetter`]) or a Kafka topic ([`kafka::KafkaDeadLetter`]). The decode stage
//! hands rejects to [`spawn_writer`] through a bounded queue: a slow destination drops (and
//! counts) dead letters, it never slows training.

mod config;
pub mod kafka;
pub mod store;

use std::sync::Arc;

use object_store::{path::Path, ObjectStore};
use tokio::sync::mpsc;

pub use self::config::{DeadLetterConfig, KafkaTopicConfig};
use self::kafka::KafkaDeadLetter;
use self::store::StoreDeadLetter;
use crate::source::{DataMetrics, RejectedRecord};

/// A dead letter that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error("dead-letter topic `{topic}`: {message}")]
    Kafka { topic: String, message: String },
    #[error(transparent)]
    Field(#[from] crate::validate::FieldError),
    #[error("pipeline.dead_letter: {0}")]
    Config(String),
}

/// Where rejected records go.
#[derive(Clone)]
pub enum DeadLetter {
    Store(StoreDeadLetter),
    Kafka(Arc<KafkaDeadLetter>),
}

impl DeadLetter {
    /// Dead letters under `prefix` of `store`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        DeadLetter::Store(StoreDeadLetter::new(store, prefix))
    }

    /// The destination `cfg` names (exactly one of `url` and `kafka`).
    pub fn open(cfg: &DeadLetterConfig) -> Result<Self, DeadLetterError> {
        match (&cfg.url, &cfg.kafka) {
            (_, Some(k)) => Ok(DeadLetter::Kafka(Arc::new(KafkaDeadLetter::open(k)?))),
            (Some(url), None) => {
                let (store, prefix) = crate::store::open_store(url, &cfg.options)
                    .map_err(|e| DeadLetterError::Config(format!("url `{url}`: {e}")))?;
                Ok(DeadLetter::new(store, prefix))
            }
            (None, None) => Err(DeadLetterError::Config("needs `url` or `kafka`".into())),
        }
    }

    /// Write one rejected record (and its context) to the destination.
    pub async fn write(&self, r: &RejectedRecord) -> Result<(), DeadLetterError> {
        match self {
            DeadLetter::Store(s) => Ok(s.write(r).await?),
            DeadLetter::Kafka(k) => Ok(k.write(r).await?),
        }
    }
}

/// Starts the writer task; rejects sent to the returned queue (capacity `cap`) are written in
/// order, each success or failure counted in `metrics`.
pub fn spawn_writer(
    dl: DeadLetter,
    cap: usize,
    metrics: DataMetrics,
) -> mpsc::Sender<RejectedRecord> {
    let (tx, mut rx) = mpsc::channel::<RejectedRecord>(cap);
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            match dl.write(&r).await {
                Ok(()) => metrics.deadletter_written.inc(),
                Err(e) => {
                    metrics.deadletter_dropped.inc();
                    tracing::warn!(key = %r.key, "dead-letter write failed: {e}");
                }
            }
        }
    });
    tx
}
