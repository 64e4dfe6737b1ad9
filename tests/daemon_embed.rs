//! `odcd embed` with a frozen checkpoint written by a real `odcd run`: every record of the
//! source gets one Parquet row tagged with the checkpoint's step and a cluster label.

mod common;

use common::kafka::Tansu;
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

    let neck = read_embeddings(&out);
    assert_eq!(neck.len(), 200, "one row per fixture record");
    for (key, row) in &neck {
        assert_eq!(row.step, 4, "{key}: tagged with the checkpoint's step");
        assert!(
            row.cluster.is_some_and(|c| c < 4),
            "{key}: cluster label from the memory"
        );
        assert_eq!(row.embedding.len(), 32, "{key}: the neck's feat_dim");
        assert_eq!(row.version, "step-000000000004");
    }

    // The same checkpoint publishing stage 2's map instead: ResNet-18, standard stem, 32 px
    // → 128 channels × 4 × 4, normalised, and each record keeps the neck's cluster.
    let out2 = dir.path().join("inference-stage2");
    let cfg3 = dir.path().join("embed-stage2.toml");
    std::fs::write(
        &cfg3,
        std::fs::read_to_string(&cfg2)
            .expect("read config")
            .replace(&out.display().to_string(), &out2.display().to_string()),
    )
    .expect("write config");
    let status = std::process::Command::new(odcd_bin())
        .args(["embed", "--once", "--feature", "stage2", "--checkpoint"])
        .arg(&ck)
        .arg("--config")
        .arg(&cfg3)
        .status()
        .expect("run odcd embed --feature stage2");
    assert!(status.success());
    let stage2 = read_embeddings(&out2);
    assert_eq!(stage2.len(), 200, "one row per fixture record");
    for (key, row) in &stage2 {
        assert_eq!(row.embedding.len(), 128 * 4 * 4, "{key}: stage 2's map");
        let norm = row.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{key}: norm {norm}");
        assert_eq!(row.cluster, neck[key].cluster, "{key}: cluster of the neck");
        assert_eq!(
            row.version, "step-000000000004-stage2",
            "{key}: the feature tagged"
        );
    }
}

struct EmbeddingRow {
    step: u64,
    version: String,
    cluster: Option<u32>,
    embedding: Vec<f32>,
}

/// Every row of the Parquet embedding files in `dir`, by key.
fn read_embeddings(dir: &std::path::Path) -> std::collections::HashMap<String, EmbeddingRow> {
    use arrow_array::{FixedSizeListArray, Float32Array};
    let mut rows = std::collections::HashMap::new();
    for e in std::fs::read_dir(dir).expect("embeddings dir") {
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
            let (k, step, cl, emb) = (col("key"), col("step"), col("cluster"), col("embedding"));
            let version = col("model_version");
            let version = version
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("model_version utf8");
            let k = k.as_any().downcast_ref::<StringArray>().expect("key utf8");
            let step = step
                .as_any()
                .downcast_ref::<UInt64Array>()
                .expect("step u64");
            let cl = cl
                .as_any()
                .downcast_ref::<UInt32Array>()
                .expect("cluster u32");
            let emb = emb
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .expect("embedding list");
            for i in 0..b.num_rows() {
                let v = emb.value(i);
                let v = v
                    .as_any()
                    .downcast_ref::<Float32Array>()
                    .expect("f32 values");
                let row = EmbeddingRow {
                    step: step.value(i),
                    version: version.value(i).to_string(),
                    cluster: (!cl.is_null(i)).then(|| cl.value(i)),
                    embedding: v.values().to_vec(),
                };
                assert!(
                    rows.insert(k.value(i).to_string(), row).is_none(),
                    "one row per key"
                );
            }
        }
    }
    rows
}

/// A 2-step `odcd run` on the fixture with a checkpoint in `dir/ckpt`; returns that folder and
/// the run's config text, which the embed configs extend with their `[embeddings]`.
fn two_step_checkpoint(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let ck = dir.join("ckpt");
    let src = format!("file://{}/", fixtures_dir().display());
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 1000\n",
        ck.display()
    );
    let text = test_config(&src, free_port(), &extra)
        .replace("[metrics]", "[train]\nmax_steps = 2\n[metrics]");
    let cfg = dir.join("odcd.toml");
    std::fs::write(&cfg, &text).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.join("run.log"));
    assert_eq!(
        d.wait(Duration::from_secs(240)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    (ck, text)
}

/// `odcd embed --once` with `config` (written to `dir/embed.toml`), its log in `dir/embed.log`.
struct Embed {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Embed {
    fn start(dir: &std::path::Path, ck: &std::path::Path, config: &str) -> Embed {
        let cfg = dir.join("embed.toml");
        std::fs::write(&cfg, config).expect("write config");
        let log = dir.join("embed.log");
        let child = std::process::Command::new(odcd_bin())
            .args(["embed", "--once", "--checkpoint"])
            .arg(ck)
            .arg("--config")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("run odcd embed");
        Embed { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has at least `min` lines containing `needle` (returns how many),
    /// failing if the command exits first: `while` says what was going on.
    fn wait_for_lines(&mut self, needle: &str, min: usize, while_: &str) -> usize {
        wait_until(needle, Duration::from_secs(120), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "odcd embed exited ({st}) while {while_}; log:\n{}",
                    self.log_text()
                );
            }
            let n = self
                .log_text()
                .lines()
                .filter(|l| l.contains(needle))
                .count();
            (n >= min).then_some(n)
        })
    }

    /// Waits for the command to end and asserts it exited 0.
    fn assert_exits_zero(&mut self) {
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!("odcd embed did not finish; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(status.success(), "log:\n{}", self.log_text());
    }
}

/// `odcd embed`'s publish retry: its Parquet location refuses writes (a regular file where the
/// files' folder should be, which fails even as root) while it runs; once the location is back,
/// every record has its row and the command exits 0.
#[test]
fn embed_rides_out_a_refusing_parquet_location_without_losing_a_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ck, text) = two_step_checkpoint(dir.path());

    // Files of 50 rows, so several publishes meet the refusal before the end of the data.
    let out = dir.path().join("inference");
    std::fs::create_dir_all(&out).expect("mkdir");
    let block = out.join("sub");
    std::fs::write(&block, b"in the way").expect("block");
    let mut embed = Embed::start(
        dir.path(),
        &ck,
        &format!(
            "{text}[embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nfile_prefix = \"sub/part\"\nmax_rows_per_file = 50\n",
            out.display()
        ),
    );
    let refused = embed.wait_for_lines(
        "failed, retrying (nothing is dropped)",
        2,
        "its sink refused",
    );
    std::fs::remove_file(&block).expect("unblock");
    embed.assert_exits_zero();

    let mut rows = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(out.join("sub")).expect("published files") {
        let p = e.expect("entry").path();
        assert!(
            p.extension().is_some_and(|x| x == "parquet"),
            "not a published file: {}",
            p.display()
        );
        common::data::add_parquet_rows(&p, &mut rows);
    }
    let keys: std::collections::BTreeSet<&String> = rows.values().flatten().collect();
    println!(
        "{refused} refused publishes retried; {} keys published",
        keys.len()
    );
    assert_eq!(keys.len(), 200, "one row per fixture record, none lost");
    assert_eq!(
        rows.keys().copied().collect::<Vec<_>>(),
        [2],
        "tagged with the checkpoint's step"
    );
}

/// `odcd embed`'s Kafka sink against a broker that is frozen (SIGSTOP) when the command starts:
/// deliveries time out and are re-sent, the command neither exits nor drops a batch, and once
/// the broker is back every record's row is on the topic and the command exits 0.
#[test]
fn embed_rides_out_a_frozen_kafka_broker_without_losing_a_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ck, text) = two_step_checkpoint(dir.path());

    let k = Tansu::start();
    k.create_topic("emb", 1);
    k.pause();
    let mut embed = Embed::start(
        dir.path(),
        &ck,
        &format!(
            "{text}[embeddings]\n[embeddings.kafka]\nbrokers = \"{}\"\ntopic = \"emb\"\n\
             options = {{ \"message.timeout.ms\" = \"2000\", \"socket.timeout.ms\" = \"1000\", \"request.timeout.ms\" = \"1000\" }}\n",
            k.brokers
        ),
    );
    let failed = embed.wait_for_lines(
        "re-sending after a pause (nothing is dropped)",
        2,
        "the broker was frozen",
    );
    k.resume();
    embed.assert_exits_zero();

    let recs = k.read_all("emb", 1, Duration::from_secs(60), |r| {
        r.iter()
            .map(|x| x.key.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 200
    });
    let keys: std::collections::BTreeSet<&str> = recs.iter().map(|r| r.key.as_str()).collect();
    println!(
        "{failed} failed deliveries re-sent; {} records, {} keys on the topic",
        recs.len(),
        keys.len()
    );
    assert_eq!(keys.len(), 200, "one row per fixture record, none lost");
}
