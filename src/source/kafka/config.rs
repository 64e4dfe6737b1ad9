//! The Kafka source's `[source]` section (`kind = "kafka"`) and its field checks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::FieldError;

use crate::kafka::{check_brokers, client_config};
use crate::source::SourceError;

/// What one Kafka message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// One encoded image (jpg/png/webp); key = sample key.
    #[default]
    Image,
    /// One WebDataset tar shard (plain or gzip), read like an object-store shard.
    Shard,
}

/// Where a partition with neither a checkpointed nor a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

/// `[source]` with `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port...]` (librdkafka `bootstrap.servers`).
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group: processes with the same group share the partitions.
    pub group_id: String,
    /// `image` (one image per message) or `shard` (one tar shard per message).
    #[serde(default)]
    pub message_format: MessageFormat,
    /// Header holding an optional integer class label (evaluation only).
    #[serde(default = "default_label_header")]
    pub label_header: String,
    /// Header holding an optional content type (`image/png`, `image/jpeg`, `image/webp`);
    /// without it the format is sniffed from the bytes.
    #[serde(default = "default_content_type_header")]
    pub content_type_header: String,
    /// `earliest` or `latest`: where a partition with no checkpointed or committed offset starts.
    #[serde(default)]
    pub start: StartFrom,
    /// librdkafka properties passed through (`security.protocol`, `sasl.mechanisms`,
    /// `ssl.ca.location`, `session.timeout.ms`, ...). Never put secrets here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// librdkafka properties read from environment variables: property = variable name,
    /// e.g. `{ "sasl.password" = "ODCD_KAFKA_PASSWORD" }`.
    #[serde(default)]
    pub options_env: BTreeMap<String, String>,
    /// Larger messages (or tar members of a shard message) are rejected as `too_large`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Items buffered between the source and the decoder (backpressure bound).
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// How often the lag and the broker connection state are refreshed (librdkafka statistics).
    #[serde(default = "default_stats_interval_ms")]
    pub stats_interval_ms: u64,
    /// First wait after a consumer error; doubles on each further error up to 2 s (or this
    /// value, if longer). librdkafka reconnects by itself; the wait only keeps a persistent
    /// error from spinning.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
}

fn default_label_header() -> String {
    "class_label".into()
}
fn default_content_type_header() -> String {
    "content_type".into()
}
fn default_max_message_bytes() -> u64 {
    32 << 20
}
fn default_channel_capacity() -> usize {
    1024
}
fn default_stats_interval_ms() -> u64 {
    1000
}
fn default_retry_backoff_ms() -> u64 {
    500
}

/// Properties odcd manages itself; setting them in `options` would break the offset contract.
const RESERVED: [&str; 4] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

impl KafkaSourceConfig {
    /// A config with defaults for everything but brokers, topics and group.
    pub fn new(brokers: &str, topics: &[&str], group_id: &str) -> Self {
        KafkaSourceConfig {
            brokers: brokers.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            group_id: group_id.into(),
            message_format: MessageFormat::Image,
            label_header: default_label_header(),
            content_type_header: default_content_type_header(),
            start: StartFrom::Earliest,
            options: BTreeMap::new(),
            options_env: BTreeMap::new(),
            max_message_bytes: default_max_message_bytes(),
            channel_capacity: default_channel_capacity(),
            stats_interval_ms: default_stats_interval_ms(),
            retry_backoff_ms: default_retry_backoff_ms(),
        }
    }

    /// Field checks; errors name the field under `source.`.
    pub fn validate(&self) -> Result<(), SourceError> {
        let bad = |field: &str, message: String| {
            Err(SourceError::Config(FieldError::new(
                format!("source.{field}"),
                message,
            )))
        };
        check_brokers("source.brokers", &self.brokers)?;
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return bad("topics", "needs at least one non-empty topic name".into());
        }
        if self.group_id.trim().is_empty() {
            return bad("group_id", "is empty: name the consumer group".into());
        }
        if self.channel_capacity == 0 || self.stats_interval_ms == 0 || self.max_message_bytes == 0
        {
            return bad(
                "channel_capacity",
                "channel_capacity, stats_interval_ms and max_message_bytes must be > 0".into(),
            );
        }
        if self
            .options
            .get("partition.assignment.strategy")
            .is_some_and(|s| s.contains("cooperative"))
        {
            return bad(
                "options",
                "partition.assignment.strategy: the cooperative protocol is not supported (odcd assigns eagerly, resuming from checkpoints): use range or roundrobin".into(),
            );
        }
        for k in self.options.keys().chain(self.options_env.keys()) {
            if RESERVED.contains(&k.as_str()) {
                return bad(
                    "options",
                    format!("`{k}` is set by odcd (brokers, group_id, and manual commits after checkpoints): remove it"),
                );
            }
        }
        client_config(
            &self.brokers,
            &self.options,
            &self.options_env,
            "source.options_env",
        )?;
        Ok(())
    }
}
