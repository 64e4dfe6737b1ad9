//! Types that cross stage boundaries: a record read from a source, and a decoded batch.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where a record came from, precise enough to resume right after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Position {
    /// Record `index` (0-based, counting every record the shard yielded, errors included)
    /// of the shard object at `shard` (its path inside the source's store).
    Shard { shard: String, index: u64 },
    /// A Kafka message. The topic name is shared by every record of the topic (one
    /// allocation per topic, not per record).
    Kafka {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
    },
}

/// One sample as read from a shard or message, before decoding.
#[derive(Debug, Clone)]
pub struct Record {
    /// Stable sample key (WebDataset key, or Kafka message key).
    pub key: String,
    /// Encoded image bytes (jpg/png/webp).
    pub image: Bytes,
    /// Extension of the image member, lower case (`png`, `jpg`, ...): static for the formats
    /// odcd decodes (see [`format_name`]), so most records allocate nothing for it.
    pub format: Cow<'static, str>,
    /// Optional class label from `<key>.cls`; evaluation only, never used for training.
    pub class_label: Option<i64>,
    pub position: Position,
}

/// The format name of an image extension: a static string for the extensions odcd decodes,
/// an owned copy otherwise.
pub fn format_name(ext: &str) -> Cow<'static, str> {
    match ext {
        "png" => Cow::Borrowed("png"),
        "jpg" => Cow::Borrowed("jpg"),
        "jpeg" => Cow::Borrowed("jpeg"),
        "webp" => Cow::Borrowed("webp"),
        other => Cow::Owned(other.to_string()),
    }
}

/// A decoded, augmented batch ready for the trainer.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (N, C, H, W) f32 on the CPU.
    pub images: candle_core::Tensor,
    pub keys: Vec<String>,
    pub class_labels: Vec<Option<i64>>,
    pub positions: Vec<Position>,
}
