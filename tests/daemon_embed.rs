//! `odcd embed` with a frozen checkpoint written by a real `odcd run`: every record of the
//! source gets one Parquet row tagged with the checkpoint's step and a cluster label.

mod common;

use common::*;
use std::time::Duration;

use arrow_array::{Array, StringArray, UInt32Array, UInt64Array};

#[test]
fn embed_with_a_checkpoint_writes_one_row_per_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = dir.path().join("ckpt");
    let emb = dir.path().join("emb");
    let src = format!("file://{}/", fixtures_dir().display());
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 1000\n[embeddings]\nurl = \"{}\"\n",
        ck.display(),
        emb.display()
    );
    let text = test_config(&src, free_port(), &extra)
        .replace("[metrics]", "[train]\nmax_steps = 4\n[metrics]");
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, text).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    assert_eq!(
        d.wait(Duration::from_secs(240)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );

    // Embed the same 200 images into a fresh folder with the step-4 checkpoint.
    let out = dir.path().join("inference");
    let text = std::fs::read_to_string(&cfg)
        .expect("read config")
        .replace(&emb.display().to_string(), &out.display().to_string());
    let cfg2 = dir.path().join("embed.toml");
    std::fs::write(&cfg2, text).expect("write config");
    let status = std::process::Command::new(odcd_bin())
        .args(["embed", "--once", "--checkpoint"])
        .arg(&ck)
        .arg("--config")
        .arg(&cfg2)
        .status()
        .expect("run odcd embed");
    assert!(status.success());

    let mut keys = std::collections::HashSet::new();
    for e in std::fs::read_dir(&out).expect("inference dir") {
        let f = std::fs::File::open(e.expect("entry").path()).expect("open");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .expect("reader")
            .build()
            .expect("build");
        for b in reader {
            let b = b.expect("batch");
            let col = |name: &str| {
                b.column_by_name(name)
                    .unwrap_or_else(|| panic!("column {name}"))
                    .clone()
            };
            let k = col("key");
            let k = k.as_any().downcast_ref::<StringArray>().expect("key utf8");
            let step = col("step");
            let step = step
                .as_any()
                .downcast_ref::<UInt64Array>()
                .expect("step u64");
            let cl = col("cluster");
            let cl = cl
                .as_any()
                .downcast_ref::<UInt32Array>()
                .expect("cluster u32");
            for i in 0..b.num_rows() {
                assert_eq!(step.value(i), 4, "tagged with the checkpoint's step");
                assert!(
                    !cl.is_null(i) && cl.value(i) < 4,
                    "cluster label from the memory"
                );
                keys.insert(k.value(i).to_string());
            }
        }
    }
    assert_eq!(keys.len(), 200, "one row per fixture record");
}
