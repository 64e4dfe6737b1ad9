//! Sources: where encoded records come from.
//!
//! A source yields [`SourceItem`]s in a stable order, each with a resumable [`Position`].
//! Bad input is an item too (`Err(RejectedRecord)`), so one broken shard never stops the stream.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::record::{Position, Record};

mod config;
pub mod kafka;
pub mod metrics;
mod object_store;
mod state;
pub mod webdataset;

pub use self::config::{ObjectStoreSourceConfig, SourceMode};
pub use self::kafka::{KafkaHandle, KafkaSource, KafkaSourceConfig};
pub use self::metrics::DataMetrics;
pub use self::object_store::{is_shard_name, shard_rank, ObjectStoreSource};
pub use self::state::SourceState;

/// `[source]`: object-store shards (the default, `kind` absent or `"object_store"`) or Kafka
/// (`kind = "kafka"`). Object-store configs keep their original form (no `kind` field).
#[derive(Debug, Clone)]
pub enum SourceConfig {
    ObjectStore(ObjectStoreSourceConfig),
    Kafka(KafkaSourceConfig),
}

impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // A JSON value, not a TOML table: configs come back from checkpoints as JSON, where
        // `None` fields are nulls that TOML cannot hold.
        let mut t = match serde_json::Value::deserialize(d)? {
            serde_json::Value::Object(m) => m,
            other => {
                return Err(D::Error::custom(format!(
                    "[source] must be a table, not {other}"
                )))
            }
        };
        let kind = match t.remove("kind") {
            None => "object_store".to_string(),
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(D::Error::custom(format!(
                "source.kind = {other} must be a string: \"object_store\" (default) or \"kafka\""
            )))
            }
        };
        let t = serde_json::Value::Object(t);
        match kind.as_str() {
            "object_store" => serde_json::from_value(t)
                .map(SourceConfig::ObjectStore)
                .map_err(|e| D::Error::custom(format!("[source]: {e}"))),
            "kafka" => serde_json::from_value(t)
                .map(SourceConfig::Kafka)
                .map_err(|e| D::Error::custom(format!("[source] (kind = \"kafka\"): {e}"))),
            other => Err(D::Error::custom(format!(
                "source.kind = {other:?} is unknown: use \"object_store\" (default) or \"kafka\""
            ))),
        }
    }
}

impl Serialize for SourceConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        match self {
            SourceConfig::ObjectStore(c) => c.serialize(s),
            SourceConfig::Kafka(c) => {
                let mut t = toml::Table::try_from(c).map_err(S::Error::custom)?;
                t.insert("kind".into(), toml::Value::String("kafka".into()));
                t.serialize(s)
            }
        }
    }
}

/// What a source hands downstream: a record, or the reason a record (or shard) was dropped.
pub type SourceItem = Result<Record, RejectedRecord>;

/// Errors building or listing a source (reading errors become `read_error` items instead).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source url {url:?} is not usable: {message} (expected file:///dir, s3://bucket/prefix, gs://..., az://..., memory:///)")]
    BadUrl { url: String, message: String },
    #[error(transparent)]
    Config(#[from] crate::validate::FieldError),
    #[error("listing shards under {prefix:?} failed: {source} (check credentials, endpoint and that the prefix exists)")]
    List {
        prefix: String,
        #[source]
        source: ::object_store::Error,
    },
}

/// Why a record was dropped. The label value of `odcd_records_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The image bytes could not be decoded (corrupt, empty, unknown format).
    Undecodable,
    /// A member or decoded image exceeds the configured byte/pixel limits.
    TooLarge,
    /// A key had no jpg/jpeg/png/webp member.
    MissingImage,
    /// `<key>.cls` is not an integer.
    BadLabel,
    /// The shard ended early or its tar/gzip structure is corrupt; records after the damage are lost.
    TruncatedShard,
    /// A member name is not UTF-8 or yields an empty key.
    BadName,
    /// The shard could not be read after retries (network, permissions, deleted).
    ReadError,
}

impl RejectReason {
    /// Every reason, for pre-registering metric label values.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::Undecodable,
        RejectReason::TooLarge,
        RejectReason::MissingImage,
        RejectReason::BadLabel,
        RejectReason::TruncatedShard,
        RejectReason::BadName,
        RejectReason::ReadError,
    ];

    /// The metric label / dead-letter folder name.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Undecodable => "undecodable",
            RejectReason::TooLarge => "too_large",
            RejectReason::MissingImage => "missing_image",
            RejectReason::BadLabel => "bad_label",
            RejectReason::TruncatedShard => "truncated_shard",
            RejectReason::BadName => "bad_name",
            RejectReason::ReadError => "read_error",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record (or a whole shard) that was dropped, with enough context to find and fix it.
#[derive(Debug, Clone)]
pub struct RejectedRecord {
    /// Sample key (lossy UTF-8), or the shard path when no key is known.
    pub key: String,
    pub reason: RejectReason,
    /// Human-readable detail: what was wrong and where.
    pub message: String,
    pub position: Position,
    /// The offending bytes when there are some (for the dead-letter store).
    pub payload: Option<Bytes>,
    /// Extension of the payload (`jpg`, `png`, ...), if any.
    pub format: Option<String>,
}

impl std::fmt::Display for RejectedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record {:?} at {:?} rejected ({}): {}",
            self.key, self.position, self.reason, self.message
        )
    }
}
