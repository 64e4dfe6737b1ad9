//! The checkpoint barrier between the training loop and the embeddings task, on real Parquet
//! files (a real local store; the fault injector wraps it).

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::ObjectStore;

use super::{BarrierError, EmbeddingsTask};
use crate::sink::testing::{published_rows, FailingPuts};
use crate::sink::{EmbeddingBatch, EmbeddingSinks, ParquetSink, ParquetSinkConfig};

const PER_STEP: usize = 8;

fn rows(step: u64) -> EmbeddingBatch {
    EmbeddingBatch {
        keys: (0..PER_STEP).map(|i| format!("k{step}-{i}")).collect(),
        step,
        model_version: format!("step-{step:012}"),
        clusters: vec![Some(1); PER_STEP],
        class_labels: vec![None; PER_STEP],
        dim: 4,
        embeddings: vec![0.5; PER_STEP * 4],
    }
}

/// A task on a Parquet sink whose file would roll neither by rows nor by age.
fn task(store: Arc<dyn ObjectStore>, queue: usize) -> (EmbeddingsTask, prometheus::Registry) {
    let cfg = ParquetSinkConfig {
        max_rows_per_file: 1_000_000,
        max_file_age_secs: 0,
        ..ParquetSinkConfig::default()
    };
    let p = ParquetSink::with_store("test://barrier", store, Path::from(""), cfg).expect("sink");
    let registry = prometheus::Registry::new();
    let sinks = EmbeddingSinks::from_parts(Some(p), None, None);
    let t = EmbeddingsTask::start(sinks, queue, 0, &registry).expect("task");
    (t, registry)
}

fn local(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
    Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).expect("local store"))
}

/// Steps of the published rows, each checked to hold all its keys exactly once.
fn published_steps(dir: &std::path::Path) -> Vec<u64> {
    let mut got = published_rows(dir);
    got.sort();
    let n = got.len();
    got.dedup();
    assert_eq!(got.len(), n, "a row was published twice");
    let steps: std::collections::BTreeSet<u64> = got.iter().map(|r| r.1).collect();
    for s in &steps {
        let keys = got.iter().filter(|r| r.1 == *s).count();
        assert_eq!(keys, PER_STEP, "step {s} has {keys} of its {PER_STEP} rows");
    }
    steps.into_iter().collect()
}

fn retries(registry: &prometheus::Registry) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "odcd_sink_retries_total")
        .map_or(0.0, |f| f.get_metric()[0].get_counter().get_value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_barrier_every_row_up_to_the_checkpoint_step_is_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (t, _registry) = task(local(dir.path()), 4);
    let h = t.handle();
    for step in 1..=10 {
        assert!(h.send(rows(step)).await);
    }
    // Neither the row bound nor the age would publish the file: only the barrier does.
    assert!(published_steps(dir.path()).is_empty());
    h.barrier(Duration::from_secs(30)).await.expect("barrier");
    assert_eq!(published_steps(dir.path()), (1..=10).collect::<Vec<_>>());
    // Rows after the checkpoint are published at shutdown.
    for step in 11..=12 {
        assert!(h.send(rows(step)).await);
    }
    drop(h);
    t.finish(Duration::from_secs(30)).await.expect("finish");
    assert_eq!(published_steps(dir.path()), (1..=12).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_store_holds_the_barrier_and_loses_nothing_once_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FailingPuts::new(local(dir.path()), usize::MAX);
    let (t, registry) = task(store.clone(), 2);
    let h = t.handle();
    for step in 1..=6 {
        assert!(h.send(rows(step)).await);
    }
    // The store refuses every write: the barrier fails (a checkpoint would not be written),
    // naming the sink's error, and nothing is published.
    match h.barrier(Duration::from_secs(1)).await {
        Err(BarrierError::Timeout { last: Some(e), .. }) => {
            assert!(e.contains("injected fault"), "{e}")
        }
        other => panic!("expected a barrier timeout naming the error, got {other:?}"),
    }
    assert!(published_steps(dir.path()).is_empty());
    let t0 = std::time::Instant::now();
    while retries(&registry) < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "retries are counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The sink keeps retrying: the queue (2) fills and the producer of rows waits.
    assert!(h.send(rows(7)).await);
    assert!(h.send(rows(8)).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), h.send(rows(9)))
            .await
            .is_err(),
        "back-pressure: a full queue makes the sender wait"
    );
    // The store comes back: the rows held through the failures are all published.
    store.fail_next(0);
    assert!(h.send(rows(9)).await);
    h.barrier(Duration::from_secs(30)).await.expect("barrier");
    assert_eq!(published_steps(dir.path()), (1..=9).collect::<Vec<_>>());
    assert!(store.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    drop(h);
    t.finish(Duration::from_secs(30)).await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_a_sink_that_cannot_publish_with_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FailingPuts::new(local(dir.path()), usize::MAX);
    let (t, _registry) = task(store, 2);
    let h = t.handle();
    assert!(h.send(rows(1)).await);
    drop(h);
    let t0 = std::time::Instant::now();
    let e = t
        .finish(Duration::from_secs(1))
        .await
        .expect_err("a sink that cannot publish fails the shutdown");
    assert!(t0.elapsed() < Duration::from_secs(10), "bounded wait");
    let msg = e.to_string();
    assert!(
        msg.contains("8 row(s) unpublished") && msg.contains("injected fault"),
        "{msg}"
    );
}
