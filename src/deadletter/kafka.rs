//! Dead letters to a Kafka topic: key = record key, value = the original bytes, the reason and
//! its context in headers.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::config::{KafkaTopicConfig, FIELD_KAFKA};
use super::DeadLetterError;
use crate::source::RejectedRecord;

/// Dead letters to a topic: key = record key, value = the original bytes, headers
/// `odcd_reason`, `odcd_message`, `odcd_position` (JSON), `odcd_format`.
pub struct KafkaDeadLetter {
    producer: FutureProducer,
    topic: String,
}

impl KafkaDeadLetter {
    pub fn open(cfg: &KafkaTopicConfig) -> Result<Self, DeadLetterError> {
        cfg.validate(FIELD_KAFKA)?;
        Ok(KafkaDeadLetter {
            producer: cfg.producer(FIELD_KAFKA)?,
            topic: cfg.topic.clone(),
        })
    }

    /// Send one rejected record and wait for its delivery.
    pub async fn write(&self, r: &RejectedRecord) -> Result<(), DeadLetterError> {
        let position = serde_json::to_string(&r.position).unwrap_or_default();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "odcd_reason",
                value: Some(r.reason.as_str()),
            })
            .insert(Header {
                key: "odcd_message",
                value: Some(r.message.as_str()),
            })
            .insert(Header {
                key: "odcd_position",
                value: Some(position.as_str()),
            })
            .insert(Header {
                key: "odcd_format",
                value: Some(r.format.as_deref().unwrap_or("")),
            });
        let payload: &[u8] = r.payload.as_deref().unwrap_or_default();
        let rec = FutureRecord::to(&self.topic)
            .key(r.key.as_bytes())
            .payload(payload)
            .headers(headers);
        self.producer
            .send(rec, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| DeadLetterError::Kafka {
                topic: self.topic.clone(),
                message: format!("dead letter not delivered: {e}"),
            })
    }
}
