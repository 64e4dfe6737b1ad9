//! Configuration of the object-store source: what the user writes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::SourceError;

/// How the source walks its prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceMode {
    /// Read every shard once, then end.
    Once,
    /// Read the prefix `passes` times (forever when `None`), re-listing before each pass so new
    /// shards join.
    Loop { passes: Option<u64> },
    /// Read the existing shards, then poll the prefix and read each new shard exactly once.
    Follow,
}

/// Object-store source configuration (`[source]` in the daemon config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreSourceConfig {
    /// Prefix holding the shards: `file:///data/shards`, `s3://bucket/prefix`, `gs://...`,
    /// `az://...`. Shards are `*.tar`, `*.tar.gz`, `*.tgz` objects under it, read in
    /// lexicographic order.
    pub url: String,
    /// Extra object_store options (`aws_endpoint`, `aws_allow_http`, `aws_region`, ...). They
    /// override the `AWS_*` / `GOOGLE_*` / `AZURE_*` environment variables.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// once / loop / follow.
    #[serde(default = "default_mode")]
    pub mode: SourceMode,
    /// How often `follow` mode lists the prefix for new shards.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Retries of a failed shard read or listing before the shard is reported and skipped. A
    /// store that cannot be reached at all is waited for instead, without limit.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First retry delay; doubles each retry up to 30 s.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Larger tar members are skipped as `too_large` (bounds memory per record).
    #[serde(default = "default_max_member_bytes")]
    pub max_member_bytes: u64,
    /// Items buffered between the source and its consumer (backpressure bound).
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Data-parallel runs: (rank, ranks); this rank reads the shards whose index in the sorted
    /// listing is `rank` modulo `ranks`. Set by `odcd run` from the launcher, not in the file.
    #[serde(skip)]
    pub rank_split: Option<(usize, usize)>,
}

fn default_mode() -> SourceMode {
    SourceMode::Once
}
fn default_poll_interval_ms() -> u64 {
    10_000
}
fn default_max_retries() -> u32 {
    5
}
fn default_retry_backoff_ms() -> u64 {
    500
}
fn default_max_member_bytes() -> u64 {
    32 << 20
}
fn default_channel_capacity() -> usize {
    1024
}

impl ObjectStoreSourceConfig {
    /// A config with defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        ObjectStoreSourceConfig {
            url: url.into(),
            options: BTreeMap::new(),
            mode: default_mode(),
            poll_interval_ms: default_poll_interval_ms(),
            max_retries: default_max_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            max_member_bytes: default_max_member_bytes(),
            channel_capacity: default_channel_capacity(),
            rank_split: None,
        }
    }
}

impl super::SourceConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), crate::validate::FieldError> {
        use crate::validate::FieldError;
        match self {
            super::SourceConfig::ObjectStore(s) => {
                url::Url::parse(&s.url).map_err(|e| {
                    FieldError::new(
                        "source.url",
                        format!(
                            "`{}` is not a URL ({e}): use file:///abs/path, s3://bucket/prefix, gs://, az:// or memory:///",
                            s.url
                        ),
                    )
                })?;
                Ok(())
            }
            super::SourceConfig::Kafka(k) => k.validate().map_err(|e| match e {
                SourceError::Config(f) => f,
                other => FieldError::new("source", other.to_string()),
            }),
        }
    }
}
