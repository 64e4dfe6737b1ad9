//! `[pipeline.dead_letter]`: where rejected records go, an object-store prefix or a topic.

use std::collections::BTreeMap;

use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Serialize};

use crate::kafka::{check_producer, producer_config};
use crate::validate::FieldError;

/// The config path of the Kafka destination, named in its errors.
pub(crate) const FIELD_KAFKA: &str = "pipeline.dead_letter.kafka";

/// Dead-letter destination: an object-store prefix (`url`) or a Kafka topic (`kafka`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Prefix URL, e.g. `s3://bucket/dead-letter` or `file:///var/lib/odcd/dead-letter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// object_store options overriding the environment (as for the source).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// A Kafka topic instead: value = the original bytes, reason and context in headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTopicConfig>,
}

impl DeadLetterConfig {
    /// Exactly one destination, and a valid one.
    pub fn validate(&self) -> Result<(), FieldError> {
        match (&self.url, &self.kafka) {
            (Some(_), None) => Ok(()),
            (None, Some(k)) => k.validate(FIELD_KAFKA),
            _ => Err(FieldError::new(
                "pipeline.dead_letter",
                "set exactly one of `url` (object store) and `kafka` (a topic)",
            )),
        }
    }
}

/// `[pipeline.dead_letter.kafka]`: brokers, topic and client properties.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTopicConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    pub topic: String,
    /// librdkafka properties passed through (TLS / SASL, `linger.ms`, ...). No secrets here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// librdkafka properties from environment variables: property = variable name.
    #[serde(default)]
    pub options_env: BTreeMap<String, String>,
}

impl KafkaTopicConfig {
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        check_producer(
            field,
            &self.brokers,
            &self.topic,
            &self.options,
            &self.options_env,
        )
    }

    /// An idempotent producer for this topic.
    pub fn producer(&self, field: &str) -> Result<FutureProducer, FieldError> {
        let cc = producer_config(
            &self.brokers,
            &self.options,
            &self.options_env,
            &format!("{field}.options_env"),
        )?;
        cc.create().map_err(|e| {
            FieldError::new(
                format!("{field}.options"),
                format!("librdkafka refused the producer config: {e}"),
            )
        })
    }
}
