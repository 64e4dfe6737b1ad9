//! Object-store source against a real S3-compatible server (moto_server, started by the test):
//! listing, streaming reads, a retry across a server restart, and `follow` mode.

mod common;

use common::data::{noise, Shard};
use common::free_port;
use common::s3::{Moto, BUCKET};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use odcd::source::{
    DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig, RejectReason, SourceItem, SourceMode,
    SourceState,
};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn shard(prefix: &str, n: usize, payload: usize) -> Vec<u8> {
    let mut s = Shard::new();
    for i in 0..n {
        // Incompressible-ish payload so socket buffers cannot hold a whole big shard.
        s.sample(
            &format!("{prefix}-{i:04}"),
            "png",
            &noise(payload, i),
            Some(i as i64),
        );
    }
    s.bytes()
}

async fn put(store: &Arc<dyn ObjectStore>, path: &str, bytes: Vec<u8>) {
    store
        .put(&Path::from(path), PutPayload::from(bytes))
        .await
        .unwrap();
}

fn key(item: &SourceItem) -> String {
    match item {
        Ok(r) => r.key.clone(),
        Err(r) => panic!("unexpected reject: {r}"),
    }
}

async fn take(rx: &mut mpsc::Receiver<SourceItem>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("timed out waiting for records")
            .expect("source ended early");
        out.push(key(&item));
    }
    out
}

fn cfg_for(moto: &Moto, prefix: &str) -> ObjectStoreSourceConfig {
    let mut cfg = ObjectStoreSourceConfig::new(format!("s3://{BUCKET}/{prefix}"));
    for (k, v) in [
        ("aws_endpoint", moto.endpoint()),
        ("aws_allow_http", "true".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", "test".into()),
        ("aws_secret_access_key", "test".into()),
        ("aws_virtual_hosted_style_request", "false".into()),
    ] {
        cfg.options.insert(k.into(), v);
    }
    cfg.retry_backoff_ms = 100;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_streams_shards_from_url_config() {
    let moto = Moto::start(free_port());
    let store = moto.store();
    put(&store, "ds/b.tar", shard("b", 5, 100)).await;
    put(&store, "ds/a.tar.gz", {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&shard("a", 3, 100)).unwrap();
        gz.finish().unwrap()
    })
    .await;
    put(&store, "ds/sub/c.tgz", {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&shard("c", 2, 100)).unwrap();
        gz.finish().unwrap()
    })
    .await;
    put(&store, "ds/readme.txt", b"not a shard".to_vec()).await;

    // The URL + options path (parse_url_opts), as the daemon config uses it.
    let src = ObjectStoreSource::from_config(cfg_for(&moto, "ds")).unwrap();
    assert_eq!(
        src.list_shards().await.unwrap(),
        ["ds/a.tar.gz", "ds/b.tar", "ds/sub/c.tgz"]
    );
    let mut rx = src.spawn(SourceState::default(), CancellationToken::new());
    let keys = take(&mut rx, 10).await;
    assert_eq!(keys[..3], ["a-0000", "a-0001", "a-0002"]);
    assert_eq!(
        keys[3..8],
        ["b-0000", "b-0001", "b-0002", "b-0003", "b-0004"]
    );
    assert_eq!(keys[8..], ["c-0000", "c-0001"]);
    assert!(
        rx.recv().await.is_none(),
        "once mode ends after the last shard"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_a_server_restart_without_losing_or_repeating_records() {
    let port = free_port();
    let mut moto = Moto::start(port);
    let big = shard("big", 300, 100_000); // ~30 MB
    put(&moto.store(), "r/big.tar", big.clone()).await;

    let mut cfg = cfg_for(&moto, "r");
    cfg.channel_capacity = 2; // hold the reader back so the GET is still streaming
    cfg.max_retries = 20;
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let src = ObjectStoreSource::with_store(moto.store_with_retries(0), Path::from("r"), cfg)
        .with_metrics(metrics.clone());
    let mut rx = src.spawn(SourceState::default(), CancellationToken::new());
    let mut keys = take(&mut rx, 20).await;

    // Kill the server mid-shard, restart it on the same port with the same data.
    drop(moto);
    tokio::time::sleep(Duration::from_millis(500)).await;
    moto = Moto::start(port);
    put(&moto.store(), "r/big.tar", big).await;

    loop {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("stalled")
        {
            Some(Ok(r)) => keys.push(r.key),
            Some(Err(r)) => panic!("shard was not retried: {r}"),
            None => break,
        }
    }
    let want: Vec<String> = (0..300).map(|i| format!("big-{i:04}")).collect();
    assert_eq!(keys, want, "every record exactly once, in order");
    assert!(
        metrics.retries.get() >= 1,
        "the restart did not interrupt the stream"
    );
    assert_eq!(metrics.records_read.get(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_shard_is_reported_and_skipped() {
    let moto = Moto::start(free_port());
    let store = moto.store();
    put(&store, "u/a.tar", shard("a", 3, 10)).await;
    put(&store, "u/b.tar", shard("b", 2, 10)).await;
    put(&store, "u/c.tar", shard("c", 1, 10)).await;
    let mut cfg = cfg_for(&moto, "u");
    cfg.max_retries = 1;
    cfg.channel_capacity = 1;
    let src = ObjectStoreSource::with_store(store.clone(), Path::from("u"), cfg);
    let mut rx = src.spawn(SourceState::default(), CancellationToken::new());
    // With a 1-slot channel the source is now blocked inside a.tar: b.tar is listed, not read.
    let first = take(&mut rx, 1).await;
    store.delete(&Path::from("u/b.tar")).await.unwrap();
    let mut items = Vec::new();
    while let Some(i) = rx.recv().await {
        items.push(i);
    }
    assert_eq!(first, ["a-0000"]);
    let goods: Vec<_> = items
        .iter()
        .filter_map(|i| i.as_ref().ok().map(|r| r.key.as_str()))
        .collect();
    assert_eq!(goods, ["a-0001", "a-0002", "c-0000"]);
    let rejects: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].reason, RejectReason::ReadError);
    assert_eq!(rejects[0].key, "u/b.tar");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_picks_up_new_shards_once() {
    let moto = Moto::start(free_port());
    let store = moto.store();
    put(&store, "f/000.tar", shard("s0", 3, 50)).await;
    let mut cfg = cfg_for(&moto, "f");
    cfg.mode = SourceMode::Follow;
    cfg.poll_interval_ms = 200;
    let cancel = CancellationToken::new();
    let mut rx = ObjectStoreSource::with_store(store.clone(), Path::from("f"), cfg)
        .spawn(SourceState::default(), cancel.clone());
    assert_eq!(take(&mut rx, 3).await, ["s0-0000", "s0-0001", "s0-0002"]);
    // Nothing more until a new shard appears (and the old one is not re-read).
    assert!(tokio::time::timeout(Duration::from_millis(800), rx.recv())
        .await
        .is_err());
    put(&store, "f/001.tar", shard("s1", 2, 50)).await;
    assert_eq!(take(&mut rx, 2).await, ["s1-0000", "s1-0001"]);
    assert!(tokio::time::timeout(Duration::from_millis(800), rx.recv())
        .await
        .is_err());
    cancel.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("cancel stops the source");
    assert!(end.is_none());
}
