//! A slow consumer must slow the source down, not grow memory: records in flight (read by the
//! source, not yet handed to the consumer) stay within the sum of the channel bounds.

mod common;

use common::data::{png_grey, Shard};
use object_store::{memory::InMemory, path::Path, ObjectStore, PutPayload};
use odcd::decode::{BatchStream, EvalConfig, PipelineConfig, TransformConfig};
use odcd::source::{DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig, SourceState};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_bounds_records_in_flight() {
    let png = png_grey(128, 8, 8);
    let store = Arc::new(InMemory::new());
    let (shards, per) = (5, 200);
    for s in 0..shards {
        let mut shard = Shard::new();
        for i in 0..per {
            shard.sample(&format!("k{s}-{i:04}"), "png", &png, None);
        }
        let p = Path::from(format!("bp/{s:02}.tar"));
        store
            .put(&p, PutPayload::from(shard.bytes()))
            .await
            .unwrap();
    }
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let (source_cap, batch, batch_queue) = (16usize, 8usize, 2usize);
    let mut scfg = ObjectStoreSourceConfig::new("memory:///bp");
    scfg.channel_capacity = source_cap;
    let cancel = CancellationToken::new();
    let store_after = store.clone();
    let rx = ObjectStoreSource::with_store(store, Path::from("bp"), scfg)
        .with_metrics(metrics.clone())
        .spawn(SourceState::default(), cancel.clone());
    let mut cfg = PipelineConfig::new(
        batch,
        TransformConfig::Eval(EvalConfig {
            resize: 8,
            size: 8,
            mean: vec![0.5],
            std: vec![0.5],
        }),
    );
    cfg.decode.channels = 1;
    cfg.threads = 1;
    cfg.batch_queue = batch_queue;
    let mut stream = BatchStream::spawn(
        rx,
        cfg,
        metrics.clone(),
        None,
        SourceState::default(),
        cancel.clone(),
    )
    .unwrap();

    // Source channel + the item the source is blocked sending + the batch being collected /
    // decoded + the batch channel + the batch the stage is blocked sending.
    let bound = (source_cap + 1 + batch + batch_queue * batch + batch) as u64;
    let (mut consumed, mut max_in_flight) = (0u64, 0u64);
    for _ in 0..40 {
        let b = stream.next().await.expect("stream ended early");
        consumed += b.keys.len() as u64;
        tokio::time::sleep(Duration::from_millis(25)).await; // the slow trainer
        let in_flight = metrics.records_read.get() - consumed;
        max_in_flight = max_in_flight.max(in_flight);
        assert!(
            in_flight <= bound,
            "{in_flight} records in flight > bound {bound}"
        );
    }
    // The pipeline did fill up (the bound is tight, not vacuous) and the source was held back.
    assert!(
        max_in_flight >= (source_cap + batch_queue * batch) as u64,
        "max {max_in_flight}"
    );
    assert!(metrics.records_read.get() < (shards * per) as u64 / 2);
    // Source lag: fewer than half the records were read, so at least 3 of the 5 shards are
    // still waiting (the one in progress counts until its end).
    let lag = metrics.lag_shards.get();
    assert!((3..=5).contains(&lag), "odcd_source_lag_shards = {lag}");
    assert!(metrics.lag_bytes.get() > 0);
    cancel.cancel();
    // Drained to the end, the lag is zero.
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let mut rx = ObjectStoreSource::with_store(
        store_after,
        Path::from("bp"),
        ObjectStoreSourceConfig::new("memory:///bp"),
    )
    .with_metrics(metrics.clone())
    .spawn(SourceState::default(), CancellationToken::new());
    let mut n = 0;
    while rx.recv().await.is_some() {
        n += 1;
    }
    assert_eq!(n, shards * per);
    assert_eq!(metrics.lag_shards.get(), 0);
    assert_eq!(metrics.lag_bytes.get(), 0);
}
