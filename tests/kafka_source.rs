//! odcd's Kafka source against a real Kafka-protocol broker (Tansu on 127.0.0.1): every
//! message of every partition arrives exactly once and in offset order per partition, with
//! its key, bytes and headers (label, content type) intact; malformed messages become
//! rejections with their reason.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::kafka::*;
use odcd::record::{Position, Record};
use odcd::source::{DataMetrics, KafkaSource, KafkaSourceConfig, RejectReason, SourceState};
use tokio_util::sync::CancellationToken;

#[test]
fn every_message_arrives_once_in_partition_order_with_key_bytes_and_headers() {
    let k = Tansu::start();
    k.create_topic("images", 3);
    let mut records = fixture_records();
    let png = records[0].1.clone();
    // Edge cases beside the 200 images: no key (the position becomes the key), no payload,
    // a class label that is not an integer, no headers at all (format sniffed).
    records.push((String::new(), png.clone(), vec![]));
    records.push(("empty-1".into(), vec![], vec![]));
    records.push((
        "badlabel-1".into(),
        png.clone(),
        vec![("class_label".into(), "seven".into())],
    ));
    k.produce("images", &records);
    let sent: HashMap<&str, &InRec> = records.iter().map(|r| (r.0.as_str(), r)).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let items = rt.block_on(async {
        let mut cfg = KafkaSourceConfig::new(&k.brokers, &["images"], "source-test");
        cfg.options
            .insert("session.timeout.ms".into(), "6000".into());
        // A small channel: the readers wait on backpressure many times along the way.
        cfg.channel_capacity = 16;
        let metrics = DataMetrics::register(&prometheus::Registry::new()).expect("metrics");
        let cancel = CancellationToken::new();
        let (mut rx, _handle) = KafkaSource::new(cfg, metrics)
            .expect("source config")
            .spawn(&SourceState::default(), cancel.clone())
            .expect("spawn source");
        let mut items = Vec::new();
        let all = tokio::time::timeout(Duration::from_secs(120), async {
            while items.len() < records.len() {
                match rx.recv().await {
                    Some(i) => items.push(i),
                    None => break,
                }
            }
        })
        .await;
        assert!(
            all.is_ok(),
            "only {} of {} messages arrived within 120 s",
            items.len(),
            records.len()
        );
        // Nothing more (no message delivered twice).
        let extra = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert!(extra.is_err(), "an extra item arrived: {extra:?}");
        cancel.cancel();
        items
    });

    // Per partition, offsets arrive in order with no gap and no repeat.
    let mut offsets: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for item in &items {
        let pos = match item {
            Ok(r) => &r.position,
            Err(r) => &r.position,
        };
        let Position::Kafka {
            topic,
            partition,
            offset,
        } = pos
        else {
            panic!("not a Kafka position: {pos:?}");
        };
        assert_eq!(&**topic, "images");
        offsets.entry(*partition).or_default().push(*offset);
    }
    assert!(
        offsets.len() > 1,
        "the records spread over several partitions"
    );
    for (p, offs) in &offsets {
        let want: Vec<i64> = (0..offs.len() as i64).collect();
        assert_eq!(offs, &want, "partition {p}: offsets in arrival order");
    }

    let ok: HashMap<String, &Record> = items
        .iter()
        .filter_map(|i| i.as_ref().ok())
        .map(|r| (r.key.clone(), r))
        .collect();
    assert_eq!(ok.len(), 201, "200 images and the keyless one");
    for (key, _, headers) in &records[..200] {
        let r = ok.get(key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(&r.image[..], &sent[key.as_str()].1[..], "{key}: bytes");
        let label = headers
            .iter()
            .find(|(h, _)| h == "class_label")
            .and_then(|(_, v)| v.parse::<i64>().ok());
        assert_eq!(r.class_label, label, "{key}: label from the header");
        assert_eq!(r.format, "png", "{key}: format from content_type");
    }
    // The keyless message is named by its position and its format sniffed from the bytes.
    let keyless = ok
        .values()
        .find(|r| r.key.starts_with("images/"))
        .expect("the keyless message");
    let Position::Kafka {
        partition, offset, ..
    } = &keyless.position
    else {
        unreachable!()
    };
    assert_eq!(keyless.key, format!("images/{partition}/{offset}"));
    assert_eq!(keyless.format, "png");
    assert_eq!(&keyless.image[..], &png[..]);

    let rejected: HashMap<&str, _> = items
        .iter()
        .filter_map(|i| i.as_ref().err())
        .map(|r| (r.key.as_str(), r))
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected["empty-1"].reason, RejectReason::MissingImage);
    let bad = rejected["badlabel-1"];
    assert_eq!(bad.reason, RejectReason::BadLabel);
    assert!(bad.message.contains("seven"), "{}", bad.message);
    assert_eq!(
        bad.payload.as_deref(),
        Some(&png[..]),
        "original bytes kept"
    );
}
