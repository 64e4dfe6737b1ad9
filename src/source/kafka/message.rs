//! One Kafka message → items: an image message becomes one record (key, label and content-type
//! headers), a shard message the records of its tar; payloads are copied out of librdkafka's
//! buffers here.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rdkafka::message::{Headers, Message};

use super::group::ConsumerState;
use super::{KafkaSourceConfig, MessageFormat};
use crate::record::{Position, Record};
use crate::source::webdataset::{read_shard, ReadOptions, TransportFault};
use crate::source::{RejectReason, RejectedRecord, SourceItem};

/// What one message becomes.
pub(super) enum Parsed {
    Ready(SourceItem),
    /// A whole tar shard: parsed off the runtime.
    Shard(ShardMessage),
}

/// A shard message's payload and where it came from; `skip`: its items consumed before a
/// restart.
pub(super) struct ShardMessage {
    pub(super) payload: Bytes,
    pub(super) topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) skip: u64,
}

/// Copies message payloads out of librdkafka's buffers: small payloads go back to back into
/// one shared 64 KiB block (one allocation per block instead of one per record; a block is
/// freed when its last record is dropped), and the topic name is shared by every record of
/// the topic.
#[derive(Default)]
pub(super) struct MessageCopier {
    block: BytesMut,
    topic: Option<Arc<str>>,
}

impl MessageCopier {
    pub(super) const BLOCK: usize = 64 * 1024;

    pub(super) fn payload(&mut self, p: &[u8]) -> Bytes {
        if p.len() > Self::BLOCK / 8 {
            return Bytes::copy_from_slice(p);
        }
        if self.block.capacity() - self.block.len() < p.len() {
            self.block = BytesMut::with_capacity(Self::BLOCK);
        }
        self.block.extend_from_slice(p);
        self.block.split().freeze()
    }

    pub(super) fn topic(&mut self, name: &str) -> Arc<str> {
        match &self.topic {
            Some(t) if &**t == name => t.clone(),
            _ => {
                let t: Arc<str> = Arc::from(name);
                self.topic = Some(t.clone());
                t
            }
        }
    }
}

/// Turn one message into items (or a shard to parse off the runtime).
pub(super) fn message_items<M: Message>(
    m: &M,
    cfg: &KafkaSourceConfig,
    shared: &ConsumerState,
    copy: &mut MessageCopier,
) -> Parsed {
    let topic = m.topic();
    let (partition, offset) = (m.partition(), m.offset());
    let position = Position::Kafka {
        topic: copy.topic(topic),
        partition,
        offset,
    };
    let key = match m.key() {
        Some(k) if !k.is_empty() => String::from_utf8_lossy(k).into_owned(),
        _ => format!("{topic}/{partition}/{offset}"),
    };
    let reject = |reason, message: String, payload: Option<Bytes>, format: Option<String>| {
        Parsed::Ready(Err(RejectedRecord {
            key: key.clone(),
            reason,
            message,
            position: position.clone(),
            payload,
            format,
        }))
    };
    let raw = m.payload().unwrap_or_default();
    // Checked before copying: an oversized message is never copied.
    if raw.len() as u64 > cfg.max_message_bytes {
        return reject(
            RejectReason::TooLarge,
            format!(
                "message {topic}/{partition}@{offset} has {} bytes, more than source.max_message_bytes = {}",
                raw.len(),
                cfg.max_message_bytes
            ),
            None,
            None,
        );
    }
    let payload = if cfg.message_format == MessageFormat::Shard {
        // A whole shard: its own buffer (its records are parsed out of it).
        Bytes::copy_from_slice(raw)
    } else {
        copy.payload(raw)
    };
    if cfg.message_format == MessageFormat::Shard {
        let skip = {
            let mut s = shared.skip.lock().unwrap_or_else(|p| p.into_inner());
            match s.remove(&(topic.to_string(), partition)) {
                Some((o, n)) if o == offset => n,
                Some(other) if other.0 > offset => {
                    s.insert((topic.to_string(), partition), other);
                    0
                }
                _ => 0,
            }
        };
        return Parsed::Shard(ShardMessage {
            payload,
            topic: copy.topic(topic),
            partition,
            offset,
            skip,
        });
    }
    // Header values borrowed from the message (copied only when not UTF-8).
    let mut label: Option<std::borrow::Cow<str>> = None;
    let mut content_type: Option<std::borrow::Cow<str>> = None;
    if let Some(h) = m.headers() {
        for i in 0..h.count() {
            let hd = h.get(i);
            let v = hd.value.map(|v| match String::from_utf8_lossy(v) {
                std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.trim()),
                std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.trim().to_string()),
            });
            if hd.key == cfg.label_header {
                label = v;
            } else if hd.key == cfg.content_type_header {
                content_type = v;
            }
        }
    }
    let format: &'static str = content_type
        .as_deref()
        .and_then(format_from_content_type)
        .or_else(|| sniff_format(&payload))
        .unwrap_or("bin");
    if payload.is_empty() {
        return reject(
            RejectReason::MissingImage,
            format!("message {topic}/{partition}@{offset} has no payload (tombstone?)"),
            None,
            None,
        );
    }
    let class_label = match label.as_deref() {
        None | Some("") => None,
        Some(s) => match s.parse::<i64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return reject(
                    RejectReason::BadLabel,
                    format!(
                    "header `{}` of message {topic}/{partition}@{offset} is {s:?}, not an integer",
                    cfg.label_header
                ),
                    Some(payload),
                    Some(format.to_string()),
                )
            }
        },
    };
    Parsed::Ready(Ok(Record {
        key,
        image: payload,
        format: std::borrow::Cow::Borrowed(format),
        class_label,
        position,
    }))
}

/// The items one message becomes, parsed exactly as the source parses it but without a consumer
/// or a broker: an image message gives one item, a shard message the items of its tar (read
/// with `max_member_bytes = cfg.max_message_bytes`, as the source does). A seam for tests that
/// feed hostile keys, headers and payloads (`tests/hostile_inputs.rs`); the source itself goes
/// through `message_items` and `shard_items`.
pub fn parse_message<M: Message>(m: &M, cfg: &KafkaSourceConfig) -> Vec<SourceItem> {
    let registry = prometheus::Registry::new();
    let Ok(metrics) = crate::source::DataMetrics::register(&registry) else {
        return Vec::new();
    };
    let shared = ConsumerState {
        format: cfg.message_format,
        resume: Default::default(),
        skip: Default::default(),
        connected: Default::default(),
        metrics,
        consumer: Default::default(),
        split: Default::default(),
        split_tx: tokio::sync::mpsc::unbounded_channel().0,
    };
    match message_items(m, cfg, &shared, &mut MessageCopier::default()) {
        Parsed::Ready(item) => vec![item],
        Parsed::Shard(s) => {
            let opts = ReadOptions {
                max_member_bytes: cfg.max_message_bytes,
            };
            shard_items(&s.payload, &s.topic, s.partition, s.offset, s.skip, &opts)
        }
    }
}

/// Items of a tar shard held in one message, positions rewritten to the message's offset;
/// the first `skip` items (consumed before a restart) are dropped.
pub(super) fn shard_items(
    payload: &[u8],
    topic: &Arc<str>,
    partition: i32,
    offset: i64,
    skip: u64,
    opts: &ReadOptions,
) -> Vec<SourceItem> {
    let name = format!("{topic}/{partition}@{offset}");
    let mut out = Vec::new();
    let mut n = 0u64;
    let fault = TransportFault::default();
    read_shard(std::io::Cursor::new(payload), &name, opts, &fault, |item| {
        n += 1;
        if n > skip {
            let pos = Position::Kafka {
                topic: topic.clone(),
                partition,
                offset,
            };
            out.push(match item {
                Ok(mut r) => {
                    r.position = pos;
                    Ok(r)
                }
                Err(mut r) => {
                    r.position = pos;
                    Err(r)
                }
            });
        }
        std::ops::ControlFlow::Continue(())
    });
    out
}

/// `image/png` → `png`, ... (parameters after `;` ignored).
fn format_from_content_type(ct: &str) -> Option<&'static str> {
    let base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "image/png" => Some("png"),
        "image/jpeg" | "image/jpg" => Some("jpg"),
        "image/webp" => Some("webp"),
        _ => None,
    }
}

/// Format from magic bytes.
fn sniff_format(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if b.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpg")
    } else if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}
