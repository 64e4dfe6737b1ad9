//! Corrupt inputs: each is counted under its reason while the good records around it arrive.

mod common;

use common::data::{noise, png_grey, Shard};
use object_store::{local::LocalFileSystem, path::Path};
use odcd::deadletter::DeadLetter;
use odcd::decode::{AugmentConfig, BatchStream, PipelineConfig, TransformConfig};
use odcd::source::{
    DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig, RejectReason, SourceState,
};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_inputs_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let w = |name: &str, bytes: &[u8]| std::fs::write(data.join(name), bytes).unwrap();

    let png = |v: u8| png_grey(v, 20, 20);

    // 00: three good records.
    let mut good = Shard::new();
    for i in 0..3 {
        good.sample(
            &format!("good0-{i}"),
            "png",
            &png(i * 10),
            Some(i64::from(i)),
        );
    }
    w("00-good.tar", &good.bytes());
    // 01: truncated inside the third record: two good, one truncated_shard.
    let mut trunc = Shard::new();
    for i in 0..3 {
        trunc.sample(&format!("trunc-{i}"), "png", &png(i), None);
    }
    // Cut 10 bytes into the third member's data.
    w("01-truncated.tar", &trunc.truncated(2, 10));
    // 02: empty object.
    w("02-empty.tar", b"");
    // 03: labels only.
    w(
        "03-labels-only.tar",
        &Shard::new()
            .label_only("l1", "1")
            .label_only("l2", "2")
            .bytes(),
    );
    // 04: bad members between good ones (gzip-compressed, named .tgz).
    let mixed = Shard::new()
        .sample("ok-a", "png", &png(1), None)
        .undecodable("random", "jpg", &noise(997, 0))
        .bomb("bomb")
        .undecodable("zero", "png", &[])
        .raw_name(b"bad\xffname.png", &png(2))
        .bad_label("badlabel", "png", &png(3), "seven")
        .sample("ok-b", "png", &png(4), None)
        .gzip();
    w("04-mixed.tgz", &mixed);
    // 05: good again, after all the damage.
    w(
        "05-good.tar",
        &Shard::new()
            .sample("good5-0", "png", &png(9), Some(5))
            .bytes(),
    );

    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let cancel = CancellationToken::new();
    let rx = ObjectStoreSource::with_store(
        store.clone(),
        Path::from("data"),
        ObjectStoreSourceConfig::new("file:///data"),
    )
    .with_metrics(metrics.clone())
    .spawn(SourceState::default(), cancel.clone());
    let mut cfg = PipelineConfig::new(4, TransformConfig::Train(AugmentConfig::new(16)));
    cfg.decode.channels = 3;
    cfg.threads = 2;
    let dl = DeadLetter::new(store.clone(), Path::from("dead"));
    let mut stream = BatchStream::spawn(
        rx,
        cfg,
        metrics.clone(),
        Some(dl),
        SourceState::default(),
        cancel,
    )
    .unwrap();
    let mut keys = Vec::new();
    while let Some(b) = stream.next().await {
        assert_eq!(b.images.dims()[1..], [3, 16, 16]);
        keys.extend(b.keys);
    }
    assert_eq!(
        keys,
        ["good0-0", "good0-1", "good0-2", "trunc-0", "trunc-1", "ok-a", "ok-b", "good5-0"]
    );
    let count = |r| metrics.rejected_count(r);
    assert_eq!(
        count(RejectReason::TruncatedShard),
        2,
        "truncated + empty shard"
    );
    assert_eq!(count(RejectReason::MissingImage), 2, "labels-only shard");
    assert_eq!(
        count(RejectReason::Undecodable),
        2,
        "random bytes + 0-byte image"
    );
    assert_eq!(count(RejectReason::TooLarge), 1, "100000x100000 png");
    assert_eq!(count(RejectReason::BadName), 1);
    assert_eq!(count(RejectReason::BadLabel), 1);
    assert_eq!(count(RejectReason::ReadError), 0);
    assert_eq!(metrics.records_decoded.get(), 8);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("odcd_records_rejected_total{reason=\"too_large\"} 1"),
        "{text}"
    );

    // Dead letters: payload + JSON sidecar per reject, under <prefix>/<reason>/.
    let mut sidecars = 0;
    for _ in 0..50 {
        sidecars = walk(&dir.path().join("dead"))
            .iter()
            .filter(|p| p.ends_with(".json"))
            .count();
        if sidecars == 9 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(sidecars, 9);
    let bomb = walk(&dir.path().join("dead/too_large"));
    assert!(
        bomb.iter()
            .any(|p| p.contains("bomb-") && p.ends_with(".png")),
        "{bomb:?}"
    );
    let side = bomb.iter().find(|p| p.ends_with(".json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(side).unwrap()).unwrap();
    assert_eq!(v["key"], "bomb");
    assert_eq!(v["reason"], "too_large");
    assert_eq!(v["position"]["Shard"]["shard"], "data/04-mixed.tgz");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}
