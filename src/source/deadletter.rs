//! Dead-letter store: rejected records written next to their reason for later inspection, on
//! an object store or to a Kafka topic.

use super::RejectedRecord;
use bytes::Bytes;
use object_store::{path::Path, ObjectStore, PutPayload};
use std::sync::Arc;

/// Writes `<prefix>/<reason>/<sanitised key>-<crc32>.<ext>` (the payload, when there is one) and
/// `<...>.json` (key, reason, position, message); or, built with [`DeadLetter::kafka`], sends
/// the payload to a topic with the reason in headers.
#[derive(Clone)]
pub struct DeadLetter {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    kafka: Option<Arc<crate::sink::kafka::KafkaDeadLetter>>,
}

/// A dead letter that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error(transparent)]
    Kafka(#[from] crate::sink::SinkError),
}

/// Keep `[A-Za-z0-9._-]`, map the rest to `_`, cap the length: object names stay portable.
pub fn sanitise_key(key: &str) -> String {
    let s: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

impl DeadLetter {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        DeadLetter {
            store,
            prefix,
            kafka: None,
        }
    }

    /// Dead letters to a Kafka topic.
    pub fn kafka(k: crate::sink::kafka::KafkaDeadLetter) -> Self {
        DeadLetter {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: Path::default(),
            kafka: Some(Arc::new(k)),
        }
    }

    /// The object path stem (without extension) used for `r`.
    pub fn stem(&self, r: &RejectedRecord) -> Path {
        let mut h = crc32fast::Hasher::new();
        h.update(r.key.as_bytes());
        if let Some(p) = &r.payload {
            h.update(p);
        }
        let name = format!("{}-{:08x}", sanitise_key(&r.key), h.finalize());
        self.prefix.child(r.reason.as_str()).child(name)
    }

    /// Write the record and its sidecar (or send it to the topic).
    pub async fn write(&self, r: &RejectedRecord) -> Result<(), DeadLetterError> {
        if let Some(k) = &self.kafka {
            return Ok(k.write(r).await?);
        }
        let stem = self.stem(r);
        if let Some(p) = &r.payload {
            let ext = r
                .format
                .as_deref()
                .map(sanitise_key)
                .unwrap_or_else(|| "bin".into());
            let path = Path::from(format!("{stem}.{ext}"));
            self.store.put(&path, PutPayload::from(p.clone())).await?;
        }
        let side = serde_json::json!({
            "key": r.key,
            "reason": r.reason,
            "position": r.position,
            "message": r.message,
            "format": r.format,
        });
        let path = Path::from(format!("{stem}.json"));
        self.store
            .put(&path, PutPayload::from(Bytes::from(side.to_string())))
            .await?;
        Ok(())
    }
}
