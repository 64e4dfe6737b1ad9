//! Releases on Kafka (`[releases.kafka]`): every row of every release to a topic, and one
//! record per release state to a releases topic, so a Kafka consumer switches releases as a
//! Parquet consumer does through `CURRENT`.
//!
//! - **Rows** (`topic`): key `<sample key>@<release id>`; headers `content_type` and
//!   `model_version` = the release id; the value in the embeddings encoding
//!   (docs/embeddings.md): binary (its step is the release's checkpoint step) or JSON (its
//!   `model_version` is the release id). A shard's rows are all acknowledged before the shard
//!   counts as embedded; after a crash a shard may be sent again (same keys, same vectors).
//! - **States** (`releases_topic`): key = release id, JSON value [`ReleaseState`]:
//!   `building` when a release is created, `current` when it becomes current (before the
//!   previous one's `retired`), `retired` when it is replaced or rolled back. A consumer keeps
//!   the latest record per release id; the current release is the one whose latest state is
//!   `current` (the largest `since_unix_ms` if two are, during a switch). Nothing depends on
//!   the broker compacting the topic.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use super::layout::{Pointer, ReleaseSpec};
use super::ReleaseError;
use crate::model::FeatureKind;
use crate::sink::kafka::Encoding;
use crate::sink::KafkaSinkConfig;
use crate::validate::FieldError;

/// `[releases.kafka]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseKafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// The rows of every release.
    pub topic: String,
    /// One record per release state, keyed by release id.
    pub releases_topic: String,
    /// `binary` (default) or `json`, as `[embeddings.kafka]`.
    #[serde(default)]
    pub encoding: Encoding,
    /// librdkafka properties passed through (TLS / SASL, `linger.ms`, ...).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// librdkafka properties from environment variables: property = variable name.
    #[serde(default)]
    pub options_env: BTreeMap<String, String>,
}

impl ReleaseKafkaConfig {
    /// The rows' producer settings.
    pub fn sink_config(&self) -> KafkaSinkConfig {
        let mut k = KafkaSinkConfig::new(&self.brokers, &self.topic);
        k.encoding = self.encoding;
        k.options = self.options.clone();
        k.options_env = self.options_env.clone();
        k
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.topic == self.releases_topic {
            return Err(FieldError::new(
                "releases.kafka.releases_topic",
                format!(
                    "`{}` is also the rows' topic: give the states a topic of their own",
                    self.topic
                ),
            ));
        }
        for (field, v) in [
            ("brokers", &self.brokers),
            ("topic", &self.topic),
            ("releases_topic", &self.releases_topic),
        ] {
            if v.trim().is_empty() {
                return Err(FieldError::new(
                    format!("releases.kafka.{field}"),
                    "is empty",
                ));
            }
        }
        self.sink_config().validate("releases.kafka")
    }
}

/// A release state, as announced on the releases topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseState {
    pub release: String,
    /// `building`, `current` or `retired`.
    pub state: String,
    pub step: u64,
    pub feature: FeatureKind,
    pub dim: usize,
    /// Rows when it was completed (`current`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// The releases store and the release's folder in it.
    pub url: String,
    pub prefix: String,
    /// `current`: the release it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub since_unix_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ReleaseState {
    pub fn building(spec: &ReleaseSpec, url: &str) -> Self {
        ReleaseState {
            release: spec.release.clone(),
            state: "building".into(),
            step: spec.checkpoint.step,
            feature: spec.feature,
            dim: spec.dim,
            rows: None,
            url: url.to_string(),
            prefix: format!("{}/", spec.release),
            previous: None,
            since_unix_ms: now_ms(),
        }
    }

    pub fn current(p: &Pointer, url: &str) -> Self {
        ReleaseState {
            release: p.release.clone(),
            state: "current".into(),
            step: p.step,
            feature: p.feature,
            dim: p.dim,
            rows: Some(p.rows),
            url: url.to_string(),
            prefix: p.prefix.clone(),
            previous: p.previous.clone(),
            since_unix_ms: now_ms(),
        }
    }

    pub fn retired(spec: &ReleaseSpec, url: &str) -> Self {
        ReleaseState {
            state: "retired".into(),
            ..ReleaseState::building(spec, url)
        }
    }
}

/// The releases topic's producer.
pub struct Announcer {
    producer: FutureProducer,
    topic: String,
}

impl Announcer {
    pub fn open(cfg: &ReleaseKafkaConfig) -> Result<Self, ReleaseError> {
        let producer = crate::kafka::producer_config(
            &cfg.brokers,
            &cfg.options,
            &cfg.options_env,
            "releases.kafka",
        )
        .and_then(|c| {
            c.create::<FutureProducer>()
                .map_err(|e| FieldError::new("releases.kafka", e.to_string()))
        })?;
        Ok(Announcer {
            producer,
            topic: cfg.releases_topic.clone(),
        })
    }

    /// Publishes `s` and waits for the broker's acknowledgement (retried for up to a minute).
    pub async fn announce(&self, s: &ReleaseState) -> Result<(), ReleaseError> {
        let value = serde_json::to_vec(s).map_err(|e| ReleaseError::Model(e.to_string()))?;
        let mut wait = Duration::from_millis(200);
        let mut last = String::new();
        for _ in 0..8 {
            let rec = FutureRecord::to(&self.topic)
                .key(&s.release)
                .payload(&value);
            match self.producer.send(rec, Duration::from_secs(10)).await {
                Ok(_) => {
                    tracing::info!(release = %s.release, state = %s.state, topic = %self.topic, "release state announced");
                    return Ok(());
                }
                Err((e, _)) => last = e.to_string(),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        Err(ReleaseError::Store {
            url: self.topic.clone(),
            path: s.release.clone(),
            message: format!(
                "cannot announce state `{}` on the releases topic: {last}",
                s.state
            ),
        })
    }
}
