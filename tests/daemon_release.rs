//! Releases end to end, with the real daemon on real files (docs/embeddings.md, "Releases"):
//! a run that ends publishes a complete release through `CURRENT`, which a real Python
//! consumer (pyarrow, DuckDB, FAISS) indexes; `kill -9` during the backfill and the
//! promotion never exposes a partial release and the resumed backfill completes; a shard
//! landing in follow mode reaches the current release; a fleet of `odcd release work`
//! processes splits a pending release; operators list, promote and roll back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use arrow_array::{Array, FixedSizeListArray, Float32Array, StringArray};
use common::data::{fmnist, png_grey, Shard};
use common::*;

/// `count` Fashion-MNIST train images from `first` as shards of `per` under `dir` (keys
/// `fm-<index>`), through `odcd shards import-idx`.
fn import(dir: &Path, first: usize, count: usize, per: usize, prefix: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let out = Command::new(odcd_bin())
        .args(["shards", "import-idx"])
        .arg(fmnist("train-images-idx3-ubyte.gz"))
        .arg(fmnist("train-labels-idx1-ubyte.gz"))
        .arg(format!("file://{}/", dir.display()))
        .args(["--per-shard", &per.to_string(), "--prefix", prefix])
        .args(["--skip", &first.to_string(), "--limit", &count.to_string()])
        .output()
        .expect("run odcd shards import-idx");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config: the test network on `catalog` (loop mode), checkpoints every `every` steps,
/// releases of stage 2 under `dir/releases`, then `extra`.
fn config(
    dir: &Path,
    catalog: &Path,
    port: u16,
    max_steps: Option<u64>,
    every: u64,
    extra: &str,
) -> PathBuf {
    let train = max_steps.map_or(String::new(), |m| format!("max_steps = {m}\n"));
    let text = test_config(
        &format!("file://{}/", catalog.display()),
        port,
        &format!(
            r#"
[train]
{train}
[checkpoint]
url = "{ck}"
every_steps = {every}
[releases]
url = "{rel}"
feature = "stage2"
reference_samples = 64
batch_size = 32
poll_interval_ms = 200
{extra}
"#,
            ck = dir.join("ckpt").display(),
            rel = dir.join("releases").display(),
        ),
    );
    let path = dir.join("odcd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The JSON object at `path`, if it exists and parses.
fn json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// One row of a release.
struct Row {
    release: String,
    norm: f32,
}

/// Every row of release folder `dir` (its `parts/*.parquet`, read whole: a partial file fails).
fn release_rows(dir: &Path) -> BTreeMap<String, Vec<Row>> {
    let mut out: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir.join("parts")) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("parquet") {
            continue; // a staging file of an upload in flight, never under a final name
        }
        let f = std::fs::File::open(&p).expect("open part");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap_or_else(|e| panic!("{} is not a whole Parquet file: {e}", p.display()))
            .build()
            .expect("reader");
        for b in reader {
            let b = b.unwrap_or_else(|e| panic!("{} does not read completely: {e}", p.display()));
            let col = |name: &str| b.column(b.schema().index_of(name).expect("column")).clone();
            let keys = col("key");
            let keys = keys.as_any().downcast_ref::<StringArray>().expect("key");
            let rel = col("release");
            let rel = rel.as_any().downcast_ref::<StringArray>().expect("release");
            let emb = col("embedding");
            let emb = emb
                .as_any()
                .downcast_ref::<FixedSizeListArray>()
                .expect("embedding");
            for i in 0..b.num_rows() {
                let v = emb.value(i);
                let v = v.as_any().downcast_ref::<Float32Array>().expect("f32");
                let norm = v.values().iter().map(|x| x * x).sum::<f32>().sqrt();
                out.entry(keys.value(i).to_string()).or_default().push(Row {
                    release: rel.value(i).to_string(),
                    norm,
                });
            }
        }
    }
    out
}

/// Checks what `CURRENT` names under `releases`: a complete release (its manifest exists)
/// whose manifest's files are all there with its rows (fresh arrivals may add more), one
/// row per key, all of that release, of unit length. Returns (release id, keys).
fn check_current(releases: &Path) -> Option<(String, BTreeSet<String>)> {
    let current = json(&releases.join("CURRENT"))?;
    let id = current["release"]
        .as_str()
        .expect("CURRENT names a release")
        .to_string();
    let manifest = json(&releases.join(&id).join("manifest.json")).unwrap_or_else(|| {
        panic!("CURRENT names {id}, which has no manifest: a partial release is visible")
    });
    let rows = release_rows(&releases.join(&id));
    let total: usize = rows.values().map(Vec::len).sum();
    // The files of the manifest are there whole; fresh arrivals may have added more since.
    let mut listed = 0;
    for f in manifest["files"].as_array().expect("files") {
        let path = releases.join(&id).join(f["path"].as_str().expect("path"));
        assert!(
            path.exists(),
            "{id}: {} is in the manifest, not on the store",
            path.display()
        );
        listed += f["rows"].as_u64().expect("rows");
    }
    assert_eq!(
        listed,
        manifest["rows"].as_u64().expect("rows"),
        "{id}: manifest rows"
    );
    assert!(
        total as u64 >= listed,
        "{id}: {total} rows stored, {listed} in the manifest"
    );
    assert_eq!(total, rows.len(), "{id}: one row per key");
    for (key, rs) in &rows {
        for r in rs {
            assert_eq!(r.release, id, "{key}: a row of another release in {id}");
            assert!((r.norm - 1.0).abs() < 1e-3, "{key}: |v| = {}", r.norm);
        }
    }
    Some((id, rows.into_keys().collect()))
}

fn run_cli(args: &[&str], config: &Path) -> String {
    let out = Command::new(odcd_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run odcd release");
    assert!(
        out.status.success(),
        "odcd {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fixture_keys() -> BTreeSet<String> {
    common::data::fixture_members()
        .into_iter()
        .filter_map(|(n, _)| n.strip_suffix(".png").map(str::to_string))
        .collect()
}

#[test]
fn a_finished_run_publishes_one_complete_release_that_a_python_consumer_indexes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        dir.path(),
        &fixtures_dir(),
        free_port(),
        Some(30),
        10,
        "[releases.promote]\nmin_interval_secs = 0\n",
    );
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    assert_eq!(
        d.wait(Duration::from_secs(600)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("release candidate promoted"), "log:\n{log}");

    // The run ended by itself: its last checkpoint (step 30) is the current release, and
    // it holds every image of the catalog once.
    let releases = dir.path().join("releases");
    let (id, keys) = check_current(&releases).expect("a CURRENT release");
    assert_eq!(id, "step-000000000030-stage2", "log:\n{log}");
    assert_eq!(keys, fixture_keys());
    let manifest = json(&releases.join(&id).join("manifest.json")).expect("manifest");
    // ResNet-18 with the standard stem at 32 px: stage 2 is 128 channels × 4 × 4.
    assert_eq!(manifest["dim"], 2048);
    assert_eq!(manifest["checkpoint"]["step"], 30);
    assert!(manifest["quality"]["effective_rank"]
        .as_f64()
        .is_some_and(|r| r > 1.0));

    // A real consumer reads only what CURRENT names and indexes it.
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/release-consumer.py"))
        .arg(&releases)
        .arg("--json")
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the consumer failed (pip install pyarrow duckdb faiss-cpu numpy; scripts/setup.sh does):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("consumer JSON");
    assert_eq!(c["release"], id.as_str());
    assert_eq!(c["releases"], serde_json::json!([id]));
    assert_eq!(
        (c["rows"].as_u64(), c["keys"].as_u64()),
        (Some(200), Some(200))
    );
    assert_eq!(
        (c["duckdb_rows"].as_u64(), c["duckdb_keys"].as_u64()),
        (Some(200), Some(200))
    );
    // 10 classes, 200 images: chance is 10%; vectors that keep what an image shows do far
    // better (keys shuffled against vectors, or un-normalised rows, would not).
    let knn = c["knn_loo"].as_f64().expect("k-NN figure");
    assert!(knn > 0.4, "leave-one-out k-NN@20 of the release: {knn}");

    // Operators: list, promote an older checkpoint, roll back to the release it replaced.
    let listed = run_cli(&["release", "list"], &cfg);
    assert!(
        listed.contains(&id) && listed.contains("current"),
        "{listed}"
    );
    run_cli(&["release", "promote", "--step", "20"], &cfg);
    let (now, _) = check_current(&releases).expect("CURRENT");
    assert_eq!(now, "step-000000000020-stage2");
    let p = json(&releases.join("CURRENT")).expect("CURRENT");
    assert_eq!(p["previous"], id.as_str());
    run_cli(&["release", "rollback"], &cfg);
    let (back, _) = check_current(&releases).expect("CURRENT");
    assert_eq!(back, id, "rolled back to the release step 20 replaced");
    assert!(releases
        .join("step-000000000020-stage2/ROLLED_BACK")
        .exists());
    let listed = run_cli(&["release", "list"], &cfg);
    assert!(listed.contains("rolled back"), "{listed}");
}

#[test]
fn kill_9_during_backfill_and_promotion_never_exposes_a_partial_release_and_the_backfill_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = dir.path().join("catalog");
    import(&catalog, 0, 480, 40, "fm");
    // One more shard with a record that does not decode: dead-lettered, never a row.
    Shard::new()
        .sample("zz-good", "png", &png_grey(90, 28, 28), Some(1))
        .undecodable("zz-bad", "png", b"not a png at all")
        .write(&catalog.join("zz-000000.tar"));
    let dead = dir.path().join("dead");
    let extra = format!(
        "cpu_share = 0.05\n[releases.promote]\nmin_interval_secs = 0\n[pipeline.dead_letter]\nurl = \"file://{}/\"\n",
        dead.display()
    );
    let cfg = config(dir.path(), &catalog, free_port(), Some(20), 10, &extra);
    let releases = dir.path().join("releases");
    let embedded = |d: &Daemon| {
        d.log_text()
            .matches("shard embedded into the release")
            .count()
    };
    // Kill -9 at different moments: right after the promotion, then after 1, 2, ... shards
    // of the backfill (a shard half written, its record not yet, the manifest, CURRENT).
    for round in 0..5u64 {
        let log = dir.path().join(format!("run-{round}.log"));
        let mut d = Daemon::start(&cfg, &log);
        let finished = wait_until(
            "the next piece of release work",
            Duration::from_secs(600),
            || {
                if let Ok(Some(st)) = d.child.try_wait() {
                    // Nothing was left to do: the releases are complete.
                    assert_eq!(st.code(), Some(0), "log:\n{}", d.log_text());
                    return Some(true);
                }
                let text = d.log_text();
                let ready = match round {
                    0 => text.contains("release candidate promoted"),
                    _ => embedded(&d) as u64 > round % 3,
                };
                ready.then_some(false)
            },
        );
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(37 * round));
        d.signal("-9");
        d.wait(Duration::from_secs(30));
        // Whatever the moment: CURRENT is absent or names a whole release.
        if let Some((id, keys)) = check_current(&releases) {
            assert_eq!(keys.len(), 481, "{id}: every good record of the catalog");
        }
    }
    // The last start finishes: the run resumes at step 20 (its end), completes the pending
    // release at full speed and exits.
    let mut d = Daemon::start(&cfg, &dir.path().join("run-last.log"));
    assert_eq!(
        d.wait(Duration::from_secs(600)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let (id, keys) = check_current(&releases).expect("CURRENT after the resumed backfill");
    let mut want: BTreeSet<String> = (0..480).map(|i| format!("fm-{i:06}")).collect();
    want.insert("zz-good".into());
    assert_eq!(keys, want, "{id}: nothing missing, nothing twice");
    let manifest = json(&releases.join(&id).join("manifest.json")).expect("manifest");
    assert_eq!(manifest["rejected"], 1, "the undecodable record");
    assert_eq!(manifest["covers"]["shards"], 13);
    assert!(
        std::fs::read_dir(dead.join("undecodable"))
            .map(|r| r
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("zz-bad")))
            .unwrap_or(false),
        "the undecodable record is in the dead letters"
    );
}

#[test]
fn a_shard_landing_in_follow_mode_reaches_the_current_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = dir.path().join("catalog");
    import(&catalog, 0, 160, 80, "fm");
    let port = free_port();
    let cfg = config(dir.path(), &catalog, port, None, 10, "cpu_share = 0.5\n");
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "mode = { loop = {} }",
        "mode = \"follow\"\npoll_interval_ms = 200",
    );
    std::fs::write(&cfg, text).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    let releases = dir.path().join("releases");
    // The first release (nothing to beat yet), then no other within the hour.
    let first = wait_until("the first release", Duration::from_secs(600), || {
        d.assert_alive();
        check_current(&releases)
    });
    assert_eq!(first.1.len(), 160);
    // A new shard lands (written aside, then renamed: it appears whole).
    let fresh = dir.path().join("fresh");
    import(&fresh, 1000, 40, 40, "new");
    let name = std::fs::read_dir(&fresh)
        .expect("fresh")
        .flatten()
        .next()
        .expect("a shard")
        .file_name();
    std::fs::rename(fresh.join(&name), catalog.join(&name)).expect("land the shard");
    let (id, keys) = wait_until(
        "the new shard's rows in the current release",
        Duration::from_secs(300),
        || {
            d.assert_alive();
            check_current(&releases).filter(|(_, k)| k.len() == 200)
        },
    );
    assert_eq!(id, first.0, "appended to the release that was current");
    assert!(keys.contains("new-001000") && keys.contains("new-001039"));
    let body = d.wait_metric(
        port,
        "odcd_release_fresh_delay_seconds_count",
        1.0,
        Duration::from_secs(60),
    );
    assert!(
        metric_value(&body, "odcd_release_current_step").is_some_and(|s| s >= 10.0),
        "{body}"
    );
    assert!(
        metric_value(
            &body,
            "odcd_release_decisions_total{decision=\"promoted\",reason=\"\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    d.signal("-TERM");
    assert_eq!(
        d.wait(Duration::from_secs(120)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
}

#[test]
fn two_release_workers_split_a_pending_release_and_complete_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = dir.path().join("catalog");
    import(&catalog, 0, 320, 40, "fm");
    // A checkpoint to release, from a short run without releases.
    let cfg = config(
        dir.path(),
        &catalog,
        free_port(),
        Some(10),
        10,
        "backfill = \"fleet\"\n",
    );
    let plain = dir.path().join("train.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    let cut = text.find("[releases]").expect("[releases]");
    std::fs::write(&plain, &text[..cut]).expect("write config");
    let mut d = Daemon::start(&plain, &dir.path().join("train.log"));
    assert_eq!(
        d.wait(Duration::from_secs(600)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    // The operator's decision: pending, built by the fleet.
    let out = run_cli(&["release", "promote", "--step", "10", "--no-work"], &cfg);
    assert!(out.contains("pending"), "{out}");
    let releases = dir.path().join("releases");
    assert!(
        check_current(&releases).is_none(),
        "nothing is current before it is complete"
    );
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let log =
                std::fs::File::create(dir.path().join(format!("worker-{i}.log"))).expect("log");
            Command::new(odcd_bin())
                .args([
                    "release",
                    "work",
                    "--once",
                    "--workers",
                    "2",
                    "--worker",
                    &i.to_string(),
                    "--config",
                ])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn a worker")
        })
        .collect();
    for (i, mut w) in workers.into_iter().enumerate() {
        let st = w.wait().expect("worker exit");
        let log =
            std::fs::read_to_string(dir.path().join(format!("worker-{i}.log"))).unwrap_or_default();
        assert!(st.success(), "worker {i}: {st}\n{log}");
        assert!(
            log.contains("shard embedded into the release"),
            "worker {i} took shards too:\n{log}"
        );
    }
    let (id, keys) = check_current(&releases).expect("CURRENT once the fleet is done");
    assert_eq!(id, "step-000000000010-stage2");
    assert_eq!(keys.len(), 320);
    let done = std::fs::read_dir(releases.join(&id).join("done"))
        .expect("done")
        .count();
    assert_eq!(done, 8, "each shard embedded once");
}

#[test]
fn a_kafka_consumer_sees_every_row_of_each_release_and_switches_on_its_state_records() {
    let k = common::kafka::Tansu::start();
    k.create_topic("release-rows", 1);
    k.create_topic("release-states", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[releases.promote]\nmin_interval_secs = 0\n[releases.kafka]\nbrokers = \"{}\"\ntopic = \"release-rows\"\nreleases_topic = \"release-states\"\n",
        k.brokers
    );
    let cfg = config(
        dir.path(),
        &fixtures_dir(),
        free_port(),
        Some(20),
        10,
        &extra,
    );
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    assert_eq!(
        d.wait(Duration::from_secs(600)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let (id, keys) = check_current(&dir.path().join("releases")).expect("CURRENT");
    assert_eq!(id, "step-000000000020-stage2");
    // The states: the latest record per release; exactly one is current, and it is the
    // release CURRENT names; the one it replaced is retired.
    let latest = |recs: &[common::kafka::Rec]| {
        let mut m: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for r in recs {
            let v: serde_json::Value = serde_json::from_slice(&r.value).expect("state JSON");
            assert_eq!(
                v["release"].as_str(),
                Some(r.key.as_str()),
                "keyed by release id"
            );
            m.insert(r.key.clone(), v);
        }
        m
    };
    let states = k.read_all("release-states", 1, Duration::from_secs(90), |r| {
        latest(r).get(&id).is_some_and(|v| v["state"] == "current")
            && latest(r)
                .values()
                .filter(|v| v["state"] == "retired")
                .count()
                == 1
    });
    let states = latest(&states);
    let current: Vec<_> = states
        .iter()
        .filter(|(_, v)| v["state"] == "current")
        .collect();
    assert_eq!(current.len(), 1, "{states:?}");
    assert_eq!(current[0].0, &id);
    assert_eq!(current[0].1["rows"], 200);
    assert_eq!(current[0].1["previous"], "step-000000000010-stage2");
    assert_eq!(states["step-000000000010-stage2"]["state"], "retired");
    // The rows: every catalog key once per release, each naming its release.
    let of = |recs: &[common::kafka::Rec], rel: &str| -> BTreeSet<String> {
        recs.iter()
            .filter_map(|r| r.key.strip_suffix(&format!("@{rel}")).map(str::to_string))
            .collect()
    };
    let rows = k.read_all("release-rows", 1, Duration::from_secs(120), |r| {
        of(r, &id).len() == 200
    });
    assert_eq!(of(&rows, &id), keys);
    for r in rows.iter().filter(|r| r.key.ends_with(&format!("@{id}"))) {
        assert_eq!(
            r.header("model_version").as_deref(),
            Some(id.as_str()),
            "{}",
            r.key
        );
        let v = odcd::sink::kafka::decode_binary(&r.value).expect("binary value");
        assert_eq!((v.step, v.embedding.len()), (20, 2048));
    }
}

#[test]
fn an_s3_outage_under_the_releases_holds_the_release_pending_while_training_goes_on() {
    use common::s3::{s3_options_toml, Forwarder, Moto, BUCKET};
    let moto = Moto::start(free_port());
    let mut fwd = Forwarder::start(moto.port);
    // The catalog (also the training source) and the checkpoints on the server directly;
    // the releases through the forwarder, whose outage training never sees.
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("catalog");
    import(&local, 0, 240, 40, "fm");
    let direct = moto.store();
    common::data::rt().block_on(async {
        for e in std::fs::read_dir(&local).expect("catalog").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).expect("shard");
            direct
                .put(
                    &object_store::path::Path::from(format!("catalog/{name}")),
                    bytes.into(),
                )
                .await
                .expect("upload a shard");
        }
    });
    let opts = s3_options_toml(&moto.endpoint());
    let outage_opts = s3_options_toml(&fwd.endpoint());
    let port = free_port();
    let text = test_config(
        &format!("s3://{BUCKET}/catalog/"),
        port,
        &format!(
            r#"
[checkpoint]
url = "s3://{BUCKET}/ck/"
options = {opts}
every_steps = 5
[releases]
url = "s3://{BUCKET}/releases/"
options = {outage_opts}
catalog_options = {opts}
feature = "stage2"
reference_samples = 32
batch_size = 32
poll_interval_ms = 200
cpu_share = 0.1
"#
        ),
    )
    .replace(
        "mode = { loop = {} }\n",
        &format!("mode = {{ loop = {{}} }}\noptions = {opts}\n"),
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, text).expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    wait_until("a promotion", Duration::from_secs(600), || {
        d.assert_alive();
        d.log_text()
            .contains("release candidate promoted")
            .then_some(())
    });
    fwd.close();
    // Down: the release work fails and is retried, the release stays pending, nothing is
    // current; training goes on and /readyz does not mention the releases.
    let steps_before = d
        .wait_metric(port, "odcd_train_steps_total", 1.0, Duration::from_secs(60))
        .lines()
        .find_map(|l| {
            l.strip_prefix("odcd_train_steps_total ")
                .and_then(|v| v.parse::<f64>().ok())
        })
        .expect("steps");
    let body = d.wait_metric(
        port,
        "odcd_release_errors_total",
        2.0,
        Duration::from_secs(120),
    );
    assert_eq!(
        metric_value(&body, "odcd_release_pending"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric_value(&body, "odcd_release_current_step"),
        Some(0.0),
        "{body}"
    );
    let current = |store: &std::sync::Arc<dyn object_store::ObjectStore>| {
        common::data::rt().block_on(async {
            match store
                .get(&object_store::path::Path::from("releases/CURRENT"))
                .await
            {
                Ok(r) => Some(r.bytes().await.expect("CURRENT bytes")),
                Err(_) => None,
            }
        })
    };
    assert!(
        current(&direct).is_none(),
        "no release is current during the outage"
    );
    d.wait_metric(
        port,
        "odcd_train_steps_total",
        steps_before + 5.0,
        Duration::from_secs(300),
    );
    let (status, why) = http_get(port, "/readyz").expect("/readyz");
    assert_eq!(status, 200, "training is not affected: {why}");
    // Back: the backfill resumes and the release becomes current through a conditional write.
    fwd.open();
    let pointer = wait_until("CURRENT after the outage", Duration::from_secs(300), || {
        d.assert_alive();
        current(&direct)
    });
    let p: serde_json::Value = serde_json::from_slice(&pointer).expect("CURRENT JSON");
    let id = p["release"].as_str().expect("release").to_string();
    assert_eq!(p["rows"], 240, "{p}");
    let manifest = common::data::rt().block_on(async {
        direct
            .get(&object_store::path::Path::from(format!(
                "releases/{id}/manifest.json"
            )))
            .await
            .expect("manifest")
            .bytes()
            .await
            .expect("manifest bytes")
    });
    let m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    assert_eq!(
        (m["rows"].as_u64(), m["covers"]["shards"].as_u64()),
        (Some(240), Some(6))
    );
    d.signal("-TERM");
    assert_eq!(
        d.wait(Duration::from_secs(120)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
}
