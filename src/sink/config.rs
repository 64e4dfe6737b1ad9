//! `[embeddings]`: where the trained samples' embeddings are published (Parquet files on an
//! object store, a Kafka topic, or both) and how often.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{KafkaSinkConfig, ParquetSinkConfig};
use crate::validate::FieldError;

fn default_embed_every() -> u64 {
    1
}

/// `[embeddings]`: where the trained samples' embeddings are published: Parquet files
/// (`url`), a Kafka topic (`[embeddings.kafka]`), or both.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsConfig {
    /// Parquet files on an object store: a local path or file:///, s3://, gs://, az:// URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Kafka topic (key = sample key, value in the documented binary or JSON encoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSinkConfig>,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Publish the embeddings of every N-th training step (1 = every step).
    #[serde(default = "default_embed_every")]
    pub every_steps: u64,
    /// Rolling, compression and row groups of the Parquet files.
    #[serde(default)]
    pub parquet: ParquetSinkConfig,
    /// Batches queued for the sink before the trainer waits (backpressure bound).
    #[serde(default = "default_sink_queue")]
    pub queue: usize,
}

fn default_sink_queue() -> usize {
    16
}

impl EmbeddingsConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(u) = &self.url {
            url::Url::parse(u)
                .map_err(|err| FieldError::new("embeddings.url", format!("`{u}`: {err}")))?;
        }
        if self.url.is_none() && self.kafka.is_none() {
            return Err(FieldError::new(
                "embeddings.url",
                "[embeddings] needs a destination: `url` (Parquet files) and/or an [embeddings.kafka] table (a topic)",
            ));
        }
        if let Some(k) = &self.kafka {
            k.validate("embeddings.kafka")?;
        }
        if self.every_steps == 0 || self.queue == 0 {
            return Err(FieldError::new(
                "embeddings.every_steps",
                "every_steps and queue must be > 0",
            ));
        }
        self.parquet.validate()
    }
}
