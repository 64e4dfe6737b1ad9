//! The committed Fashion-MNIST fixture: reproducible with `import-idx`, and read end to end
//! (source → decode → batches), including an exact resume.

mod common;

use common::data::{fmnist, FIXTURE_SHARD};
use common::fixtures_dir;
use object_store::{local::LocalFileSystem, path::Path};
use odcd::decode::{BatchStream, EvalConfig, PipelineConfig, TransformConfig};
use odcd::shards::{import_idx, read_idx, IdxRange};
use odcd::source::{
    DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig, SourceMode, SourceState,
};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn fixture_is_reproducible_with_import_idx() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap());
    let s = import_idx(
        &fmnist("t10k-images-idx3-ubyte.gz"),
        &fmnist("t10k-labels-idx1-ubyte.gz"),
        store,
        &Path::from(""),
        "fmnist-test",
        200,
        IdxRange {
            skip: 0,
            limit: Some(200),
        },
    )
    .await
    .unwrap();
    assert_eq!(s.records, 200);
    assert_eq!(s.shards, vec![FIXTURE_SHARD.to_string()]);
    let fresh = std::fs::read(tmp.path().join(FIXTURE_SHARD)).unwrap();
    let committed = fixtures_dir().join(FIXTURE_SHARD);
    if std::env::var_os("ODCD_WRITE_FIXTURES").is_some() {
        std::fs::write(&committed, &fresh).unwrap();
    }
    let old = std::fs::read(&committed).unwrap();
    assert!(
        old == fresh,
        "import-idx output changed: regenerate with ODCD_WRITE_FIXTURES=1"
    );
}

fn eval_cfg(batch: usize) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(
        batch,
        TransformConfig::Eval(EvalConfig {
            resize: 32,
            size: 28,
            mean: vec![0.286],
            std: vec![0.353],
        }),
    );
    cfg.decode.channels = 1;
    cfg.threads = 2;
    cfg
}

async fn run(
    resume: SourceState,
    max_batches: usize,
) -> (Vec<String>, Vec<Option<i64>>, SourceState, DataMetrics) {
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let store = Arc::new(LocalFileSystem::new_with_prefix(fixtures_dir()).unwrap());
    let mut scfg = ObjectStoreSourceConfig::new("file:///fixtures");
    scfg.channel_capacity = 32;
    let cancel = CancellationToken::new();
    let rx = ObjectStoreSource::with_store(store, Path::from(""), scfg)
        .with_metrics(metrics.clone())
        .spawn(resume.clone(), cancel.clone());
    let mut stream = BatchStream::spawn(
        rx,
        eval_cfg(64),
        metrics.clone(),
        None,
        resume,
        cancel.clone(),
    )
    .unwrap();
    let (mut keys, mut labels) = (Vec::new(), Vec::new());
    let mut n = 0;
    while n < max_batches {
        let Some(b) = stream.next().await else { break };
        let dims = b.images.dims().to_vec();
        assert_eq!(&dims[1..], &[1, 28, 28]);
        assert_eq!(dims[0], b.keys.len());
        keys.extend(b.keys);
        labels.extend(b.class_labels);
        n += 1;
    }
    let state = stream.state().clone();
    cancel.cancel();
    (keys, labels, state, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_reads_end_to_end_and_resumes_exactly() {
    let labels_idx = read_idx(&fmnist("t10k-labels-idx1-ubyte.gz")).unwrap();
    let (keys, labels, state, metrics) = run(SourceState::default(), usize::MAX).await;
    assert_eq!(keys.len(), 200);
    for (i, (k, l)) in keys.iter().zip(&labels).enumerate() {
        assert_eq!(k, &format!("fmnist-test-{i:06}"));
        assert_eq!(*l, Some(i64::from(labels_idx.data[i])));
    }
    assert_eq!(metrics.records_read.get(), 200);
    assert_eq!(metrics.records_decoded.get(), 200);
    assert_eq!(metrics.batches.get(), 4);
    assert_eq!(state.current.as_ref().map(|c| c.next_index), Some(200));

    // Stop after one batch, resume from its state: exactly the other 136 records follow.
    let (first, _, state1, _) = run(SourceState::default(), 1).await;
    assert_eq!(first.len(), 64);
    let json = serde_json::to_string(&state1).unwrap();
    let resumed: SourceState = serde_json::from_str(&json).unwrap();
    let (rest, _, _, m2) = run(resumed, usize::MAX).await;
    assert_eq!(rest.len(), 136);
    assert_eq!(m2.records_read.get(), 136);
    let all: Vec<String> = first.into_iter().chain(rest).collect();
    assert_eq!(all, keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_mode_reads_n_passes_with_fresh_augmentations() {
    use odcd::decode::AugmentConfig;
    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let store = Arc::new(LocalFileSystem::new_with_prefix(fixtures_dir()).unwrap());
    let mut scfg = ObjectStoreSourceConfig::new("file:///fixtures");
    scfg.mode = SourceMode::Loop { passes: Some(2) };
    let cancel = CancellationToken::new();
    let rx = ObjectStoreSource::with_store(store, Path::from(""), scfg)
        .with_metrics(metrics.clone())
        .spawn(SourceState::default(), cancel.clone());
    let mut cfg = PipelineConfig::new(200, TransformConfig::Train(AugmentConfig::new(24)));
    cfg.decode.channels = 1;
    cfg.seed = 42;
    let mut stream = BatchStream::spawn(
        rx,
        cfg,
        metrics.clone(),
        None,
        SourceState::default(),
        cancel,
    )
    .unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(stream.state().pass, 0);
    let second = stream.next().await.unwrap();
    assert_eq!(stream.state().pass, 1);
    assert!(stream.next().await.is_none(), "two passes, then the end");
    assert_eq!(first.keys, second.keys);
    // Same keys, next visit: different random crops.
    let (a, b) = (
        first.images.flatten_all().unwrap(),
        second.images.flatten_all().unwrap(),
    );
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff > 1.0, "augmentation did not change between passes");
    assert_eq!(metrics.records_read.get(), 400);
}
