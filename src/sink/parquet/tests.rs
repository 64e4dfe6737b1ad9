use super::*;
use arrow_array::Array;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn batch(step: u64, first: usize, n: usize, dim: usize) -> EmbeddingBatch {
    EmbeddingBatch {
        keys: (first..first + n)
            .map(|i| format!("shard-0/{i:06}"))
            .collect(),
        step,
        model_version: format!("step-{step:012}"),
        clusters: (first..first + n)
            .map(|i| (!i.is_multiple_of(5)).then_some((i % 7) as u32))
            .collect(),
        class_labels: (first..first + n)
            .map(|i| (!i.is_multiple_of(3)).then_some(i as i64 - 10))
            .collect(),
        dim,
        embeddings: (first * dim..(first + n) * dim)
            .map(|v| v as f32 * 0.5)
            .collect(),
    }
}

fn parquet_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    v.sort();
    v
}

fn cfg(max_rows: usize) -> ParquetSinkConfig {
    ParquetSinkConfig {
        max_rows_per_file: max_rows,
        max_file_age_secs: 0,
        row_group_rows: 7,
        ..ParquetSinkConfig::default()
    }
}

#[tokio::test]
async fn rolls_by_rows_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let dim = 16;
    let mut sink =
        ParquetSink::open(dir.path().to_str().unwrap(), &BTreeMap::new(), cfg(25)).unwrap();
    let m = sink.metrics();
    // 60 rows in batches of 12 across steps 100..: files of 25, 25, 10 (two roll-overs).
    for (i, first) in (0..60).step_by(12).enumerate() {
        sink.write(batch(100 + i as u64, first, 12, dim))
            .await
            .unwrap();
    }
    assert_eq!(
        parquet_files(dir.path()).len(),
        2,
        "two full files published"
    );
    sink.close().await.unwrap();
    let files = parquet_files(dir.path());
    assert_eq!(files.len(), 3);
    assert_eq!(m.files_published.load(Ordering::Relaxed), 3);
    assert_eq!(m.rows_written.load(Ordering::Relaxed), 60);
    assert_eq!(m.rows_published.load(Ordering::Relaxed), 60);
    assert_eq!(m.errors.load(Ordering::Relaxed), 0);
    // Names sort by time: first step, then sequence.
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names[0].starts_with("part-000000000100-000000-"),
        "{names:?}"
    );
    assert!(
        names[1].starts_with("part-000000000102-000001-"),
        "{names:?}"
    );
    assert!(
        names[2].starts_with("part-000000000104-000002-"),
        "{names:?}"
    );

    let mut counts = Vec::new();
    let mut row = 0usize;
    for f in &files {
        let file = std::fs::File::open(f).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let schema = builder.schema().clone();
        assert_eq!(*schema, *ParquetSink::schema_for(dim).unwrap().as_ref());
        let emb = schema.field_with_name("embedding").unwrap();
        match emb.data_type() {
            DataType::FixedSizeList(item, d) => {
                assert_eq!(*d, dim as i32);
                assert_eq!(item.data_type(), &DataType::Float32);
            }
            t => panic!("embedding is {t:?}"),
        }
        assert!(schema.field_with_name("class_label").unwrap().is_nullable());
        assert!(schema.field_with_name("cluster").unwrap().is_nullable());
        assert!(!schema.field_with_name("key").unwrap().is_nullable());
        let mut n = 0;
        for rb in builder.build().unwrap() {
            let rb = rb.unwrap();
            let keys = rb.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let steps = rb.column(1).as_any().downcast_ref::<UInt64Array>().unwrap();
            let versions = rb.column(2).as_any().downcast_ref::<StringArray>().unwrap();
            let clusters = rb.column(3).as_any().downcast_ref::<UInt32Array>().unwrap();
            let labels = rb.column(4).as_any().downcast_ref::<Int64Array>().unwrap();
            let embs = rb
                .column(5)
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .unwrap();
            for r in 0..rb.num_rows() {
                let i = row;
                assert_eq!(keys.value(r), format!("shard-0/{i:06}"));
                let step = 100 + (i / 12) as u64;
                assert_eq!(steps.value(r), step);
                assert_eq!(versions.value(r), format!("step-{step:012}"));
                assert_eq!(clusters.is_null(r), i.is_multiple_of(5));
                if !i.is_multiple_of(5) {
                    assert_eq!(clusters.value(r), (i % 7) as u32);
                }
                assert_eq!(labels.is_null(r), i.is_multiple_of(3));
                if !i.is_multiple_of(3) {
                    assert_eq!(labels.value(r), i as i64 - 10);
                }
                let e = embs.value(r);
                let e = e.as_any().downcast_ref::<Float32Array>().unwrap();
                let want: Vec<f32> = (i * dim..(i + 1) * dim).map(|v| v as f32 * 0.5).collect();
                assert_eq!(e.values().to_vec(), want);
                row += 1;
            }
            n += rb.num_rows();
        }
        counts.push(n);
    }
    assert_eq!(counts, vec![25, 25, 10]);
}

#[tokio::test]
async fn nothing_visible_before_flush() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink =
        ParquetSink::open(dir.path().to_str().unwrap(), &BTreeMap::new(), cfg(1000)).unwrap();
    sink.write(batch(1, 0, 50, 8)).await.unwrap();
    sink.write(batch(2, 50, 50, 8)).await.unwrap();
    assert_eq!(sink.pending_rows(), 100);
    let all: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        parquet_files(dir.path()).is_empty(),
        "no partial .parquet: {all:?}"
    );
    sink.flush().await.unwrap();
    assert_eq!(parquet_files(dir.path()).len(), 1);
    assert_eq!(sink.pending_rows(), 0);
    // Only the published file: no staging leftovers.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // Flushing with nothing open publishes nothing.
    sink.flush().await.unwrap();
    assert_eq!(parquet_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn big_file_goes_multipart_and_is_invisible_until_close() {
    // > 10 MiB: object_store's BufWriter switches to a multipart upload mid-file.
    let dir = tempfile::tempdir().unwrap();
    let dim = 256;
    let mut c = cfg(1_000_000);
    c.compression = ParquetCompression::None;
    c.row_group_rows = 4096;
    let mut sink = ParquetSink::open(dir.path().to_str().unwrap(), &BTreeMap::new(), c).unwrap();
    for k in 0..4 {
        sink.write(batch(k, k as usize * 4096, 4096, dim))
            .await
            .unwrap();
    }
    assert!(parquet_files(dir.path()).is_empty());
    sink.close().await.unwrap();
    let files = parquet_files(dir.path());
    assert_eq!(files.len(), 1);
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 16 << 20);
    let r =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&files[0]).unwrap()).unwrap();
    assert_eq!(r.metadata().file_metadata().num_rows(), 4 * 4096);
}

#[tokio::test]
async fn rolls_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(1000);
    c.max_file_age_secs = 1;
    let mut sink = ParquetSink::open(dir.path().to_str().unwrap(), &BTreeMap::new(), c).unwrap();
    sink.write(batch(1, 0, 3, 4)).await.unwrap();
    assert!(!sink.flush_if_older(1).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(sink.flush_if_older(1).await.unwrap());
    assert_eq!(parquet_files(dir.path()).len(), 1);
    sink.write(batch(2, 3, 3, 4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The next write notices the age and publishes.
    sink.write(batch(3, 6, 3, 4)).await.unwrap();
    assert_eq!(parquet_files(dir.path()).len(), 2);
    assert_eq!(sink.pending_rows(), 0);
}

#[tokio::test]
async fn bad_batches_and_configs_are_errors() {
    let mut sink = ParquetSink::open("memory://", &BTreeMap::new(), cfg(10)).unwrap();
    let mut b = batch(1, 0, 4, 3);
    b.embeddings.pop();
    assert!(matches!(sink.write(b).await, Err(SinkError::BadBatch(_))));
    let mut b = batch(1, 0, 4, 3);
    b.clusters.pop();
    assert!(matches!(sink.write(b).await, Err(SinkError::BadBatch(_))));
    assert!(matches!(sink.write(batch(1, 0, 0, 0)).await, Ok(())));
    sink.write(batch(1, 0, 4, 3)).await.unwrap();
    assert!(
        matches!(
            sink.write(batch(1, 0, 4, 5)).await,
            Err(SinkError::BadBatch(_))
        ),
        "dim changes are refused"
    );
    for bad in [
        ParquetSinkConfig {
            max_rows_per_file: 0,
            ..cfg(1)
        },
        ParquetSinkConfig {
            file_prefix: "../x".into(),
            ..cfg(1)
        },
        ParquetSinkConfig {
            file_prefix: "".into(),
            ..cfg(1)
        },
    ] {
        assert!(matches!(
            ParquetSink::open("memory://", &BTreeMap::new(), bad),
            Err(SinkError::Config(_))
        ));
    }
    let err = serde_json::from_str::<ParquetSinkConfig>(r#"{"max_rows": 5}"#).unwrap_err();
    assert!(err.to_string().contains("max_rows"), "{err}");
    let c: ParquetSinkConfig = serde_json::from_str(r#"{"compression": "none"}"#).unwrap();
    assert_eq!(c.compression, ParquetCompression::None);
    assert_eq!(c.max_rows_per_file, 1_000_000);
}

#[tokio::test]
async fn unwritable_location_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let mut sink = ParquetSink::open(
        blocker.join("out").to_str().unwrap(),
        &BTreeMap::new(),
        cfg(10),
    )
    .unwrap();
    let m = sink.metrics();
    sink.write(batch(1, 0, 4, 3)).await.unwrap(); // buffered in memory
    let err = sink.flush().await.unwrap_err();
    assert!(matches!(err, SinkError::Write { .. }), "{err:?}");
    assert_eq!(m.errors.load(Ordering::Relaxed), 1);
    assert_eq!(m.files_published.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn sub_folder_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(10);
    c.file_prefix = "emb/run1".into();
    let mut sink = ParquetSink::open(dir.path().to_str().unwrap(), &BTreeMap::new(), c).unwrap();
    sink.write(batch(7, 0, 2, 3)).await.unwrap();
    sink.close().await.unwrap();
    let files = parquet_files(&dir.path().join("emb"));
    assert_eq!(files.len(), 1);
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("run1-000000000007-000000-"));
}

/// A store that refuses the publish of a file (and, on roll-over, the next one) must not cost
/// a row: the abandoned files' rows are written again into new files, each row exactly once,
/// and nothing partial is ever visible.
#[tokio::test]
async fn a_refused_publish_keeps_every_row_for_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let store = crate::sink::testing::FailingPuts::new(local, 3);
    let mut sink =
        ParquetSink::with_store("test://refusing", store.clone(), Path::from(""), cfg(25)).unwrap();
    let m = sink.metrics();
    // 5 batches of 8 rows: the 4th fills the first file (25 rows), whose publish is refused;
    // the 5th writes the kept rows again into a new file, refused too.
    let mut failed = 0;
    for s in 0..5u64 {
        if let Err(e) = sink.write(batch(1 + s, s as usize * 8, 8, 4)).await {
            assert!(e.is_transient(), "{e}");
            failed += 1;
        }
    }
    assert_eq!(failed, 2, "the roll-over publish was refused twice");
    assert!(
        parquet_files(dir.path()).is_empty(),
        "nothing published yet"
    );
    assert_eq!(sink.unpublished_rows(), 40, "every accepted row is kept");
    // The third refusal, then the store is back.
    assert!(sink.flush().await.is_err());
    assert_eq!(sink.unpublished_rows(), 40);
    sink.flush().await.unwrap();
    assert_eq!(sink.unpublished_rows(), 0);
    assert_eq!(store.refused.load(Ordering::SeqCst), 3);
    assert_eq!(m.errors.load(Ordering::Relaxed), 3);
    assert_eq!(m.rows_published.load(Ordering::Relaxed), 40);
    let mut rows = crate::sink::testing::published_rows(dir.path());
    rows.sort();
    let want: Vec<(String, u64)> = (0..40)
        .map(|i| (format!("shard-0/{i:06}"), 1 + i as u64 / 8))
        .collect();
    assert_eq!(
        rows, want,
        "every row published exactly once, with its step"
    );
}
