//! Unit tests of the Kafka source's parts that run without a broker: message parsing, shard
//! messages, offsets per format and config checks (the broker tests are tests/kafka_*.rs).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use tokio::sync::mpsc;

use super::group::ConsumerState;
use super::message::{message_items, shard_items, MessageCopier, Parsed};
use super::{KafkaSourceConfig, MessageFormat, PartitionMark};
use crate::record::Position;
use crate::shards::ShardWriter;
use crate::source::webdataset::ReadOptions;
use crate::source::{DataMetrics, RejectReason, SourceItem};

fn shared(format: MessageFormat) -> ConsumerState {
    ConsumerState {
        format,
        resume: Mutex::new(HashMap::new()),
        skip: Mutex::new(HashMap::new()),
        connected: AtomicBool::new(false),
        metrics: DataMetrics::register(&prometheus::Registry::new()).expect("metrics"),
        consumer: OnceLock::new(),
        split: Mutex::new(HashSet::new()),
        split_tx: mpsc::unbounded_channel().0,
    }
}

fn msg(key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &str)]) -> OwnedMessage {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    OwnedMessage::new(
        Some(payload.to_vec()),
        key.map(|k| k.to_vec()),
        "images".into(),
        Timestamp::NotAvailable,
        2,
        41,
        Some(h),
    )
}

/// An image-format message as the source parses it.
fn parse(m: &OwnedMessage, cfg: &KafkaSourceConfig) -> Parsed {
    let shared = shared(MessageFormat::Image);
    message_items(m, cfg, &shared, &mut MessageCopier::default())
}

fn one(p: Parsed) -> SourceItem {
    match p {
        Parsed::Ready(item) => item,
        Parsed::Shard(_) => panic!("expected one item"),
    }
}

#[test]
fn image_message_becomes_a_record_with_label_and_position() {
    let cfg = KafkaSourceConfig::new("x:1", &["images"], "g");
    let png = b"\x89PNG\r\n\x1a\nrest";
    let m = msg(Some(b"sample-1"), png, &[("class_label", "7")]);
    let r = one(parse(&m, &cfg)).expect("record");
    assert_eq!(r.key, "sample-1");
    assert_eq!(r.class_label, Some(7));
    assert_eq!(r.format, "png");
    assert_eq!(
        r.position,
        Position::Kafka {
            topic: "images".into(),
            partition: 2,
            offset: 41
        }
    );
    // No key: topic/partition/offset; content type header names the format.
    let m = msg(None, b"abc", &[("content_type", "image/jpeg")]);
    let r = one(parse(&m, &cfg)).expect("record");
    assert_eq!((r.key.as_str(), &*r.format), ("images/2/41", "jpg"));
}

#[test]
fn copied_payloads_keep_their_bytes_across_blocks_and_share_the_topic() {
    let mut c = MessageCopier::default();
    // 300-byte payloads: ~218 per 64 KiB block, so 1,000 of them span several blocks.
    let originals: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| (0..300u32).map(|j| (i * 7 + j) as u8).collect())
        .collect();
    let copies: Vec<Bytes> = originals.iter().map(|o| c.payload(o)).collect();
    for (o, b) in originals.iter().zip(&copies) {
        assert_eq!(&b[..], &o[..]);
    }
    // Dropping the early copies frees nothing the later ones still read.
    let mut copies = copies;
    let later = copies.split_off(500);
    drop(copies);
    for (o, b) in originals[500..].iter().zip(&later) {
        assert_eq!(&b[..], &o[..]);
    }
    let big = vec![9u8; MessageCopier::BLOCK];
    assert_eq!(&c.payload(&big)[..], &big[..]);
    assert_eq!(&c.payload(b"")[..], b"");
    let (a, b) = (c.topic("images"), c.topic("images"));
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(&*c.topic("other"), "other");
}

#[test]
fn bad_label_empty_and_oversized_messages_are_rejected_with_a_reason() {
    let mut cfg = KafkaSourceConfig::new("x:1", &["images"], "g");
    let m = msg(Some(b"k"), b"img", &[("class_label", "seven")]);
    let e = one(parse(&m, &cfg)).err();
    assert_eq!(e.map(|e| e.reason), Some(RejectReason::BadLabel));
    let m = msg(Some(b"k"), b"", &[]);
    let e = one(parse(&m, &cfg)).err();
    assert_eq!(e.map(|e| e.reason), Some(RejectReason::MissingImage));
    cfg.max_message_bytes = 2;
    let m = msg(Some(b"k"), b"img", &[]);
    let e = one(parse(&m, &cfg)).err();
    assert_eq!(e.map(|e| e.reason), Some(RejectReason::TooLarge));
}

#[test]
fn shard_message_yields_its_records_and_skips_consumed_ones() {
    // Members a.png, a.cls, b.png.
    let mut shard = ShardWriter::new();
    shard
        .append_sample("a", "png", b"A", Some(1))
        .expect("append");
    shard.append_sample("b", "png", b"B", None).expect("append");
    let bytes = shard.finish().expect("tar");
    let opts = ReadOptions::default();
    let all = shard_items(&bytes, &Arc::from("t"), 0, 5, 0, &opts);
    let keys: Vec<String> = all
        .iter()
        .filter_map(|i| i.as_ref().ok().map(|r| r.key.clone()))
        .collect();
    assert_eq!(keys, ["a", "b"]);
    assert!(all.iter().all(|i| matches!(
        i.as_ref().map(|r| &r.position),
        Ok(Position::Kafka { offset: 5, .. })
    )));
    let rest = shard_items(&bytes, &Arc::from("t"), 0, 5, 1, &opts);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].as_ref().map(|r| r.key.as_str()).ok(), Some("b"));
}

#[test]
fn marks_resume_and_commit_per_format() {
    let m = PartitionMark {
        offset: 9,
        records: 3,
    };
    assert_eq!(m.resume(MessageFormat::Image), (10, 0));
    assert_eq!(m.commit_offset(MessageFormat::Image), 10);
    assert_eq!(m.resume(MessageFormat::Shard), (9, 3));
    assert_eq!(m.commit_offset(MessageFormat::Shard), 9);
}

#[test]
fn config_errors_name_the_field() {
    let mut c = KafkaSourceConfig::new("", &["t"], "g");
    let e = c
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("source.brokers"), "{e}");
    c.brokers = "h:1".into();
    c.options.insert("enable.auto.commit".into(), "true".into());
    let e = c
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("source.options") && e.contains("enable.auto.commit"),
        "{e}"
    );
    c.options.clear();
    c.options_env
        .insert("sasl.password".into(), "ODCD_TEST_SURELY_UNSET_VAR".into());
    let e = c
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("ODCD_TEST_SURELY_UNSET_VAR"), "{e}");
}
