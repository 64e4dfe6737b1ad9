//! The real `odcd` binary under crashes, signals, bad data and failing storage.

mod common;

use common::data::{fixture_members, rt, Shard};
use common::*;
use std::path::Path;
use std::time::Duration;

use odcd::checkpoint::CheckpointStore;

fn manifests(dir: &Path) -> Vec<odcd::checkpoint::Manifest> {
    let store = CheckpointStore::open(&dir.display().to_string(), &Default::default(), 0)
        .expect("open checkpoint store");
    rt().block_on(store.list()).unwrap_or_default()
}

fn load(dir: &Path, m: &odcd::checkpoint::Manifest) -> odcd::checkpoint::Checkpoint {
    let store = CheckpointStore::open(&dir.display().to_string(), &Default::default(), 0)
        .expect("open checkpoint store");
    rt().block_on(store.load(m)).expect("load checkpoint")
}

/// The "run finished" JSON log line.
fn finished_line(log: &str) -> serde_json::Value {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "run finished")
        .unwrap_or_else(|| panic!("no `run finished` line in log:\n{log}"))
}

fn fixture_url() -> String {
    format!("file://{}/", fixtures_dir().display())
}

#[test]
fn kill_9_then_restart_resumes_step_memory_and_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = dir.path().join("ckpt");
    let port = free_port();
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 3\nevery_secs = 0\nkeep = 5\n",
        ck.display()
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, test_config(&fixture_url(), port, &extra)).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run1.log"));
    wait_until("two checkpoints", Duration::from_secs(240), || {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("daemon exited early ({st}); log:\n{}", d.log_text());
        }
        (manifests(&ck).len() >= 2).then_some(())
    });
    d.signal("-KILL");
    assert_eq!(d.wait(Duration::from_secs(10)), None, "killed by a signal");
    let last = manifests(&ck).pop().expect("a manifest");
    let s = last.step;
    let before = load(&ck, &last);
    let mem_before = before.memory.clone().expect("memory in checkpoint");

    // Restart for two more steps: it must resume at S, not redo the warm-up.
    let cfg2 = dir.path().join("odcd2.toml");
    let extra2 = format!("{extra}\n");
    let text = test_config(&fixture_url(), free_port(), &extra2).replace(
        "[metrics]",
        &format!("[train]\nmax_steps = {}\n[metrics]", s + 2),
    );
    std::fs::write(&cfg2, text).expect("write config");
    let mut d2 = Daemon::start(&cfg2, &dir.path().join("run2.log"));
    assert_eq!(
        d2.wait(Duration::from_secs(240)),
        Some(0),
        "log:\n{}",
        d2.log_text()
    );
    let log = d2.log_text();
    assert!(
        !log.contains("collecting the warm-up buffer"),
        "warm-up ran again:\n{log}"
    );
    let fin = finished_line(&log);
    assert_eq!(fin["fields"]["resumed_from"], format!("Some({s})"), "{fin}");
    assert_eq!(fin["fields"]["steps"], s + 2, "{fin}");

    let after_m = manifests(&ck).pop().expect("final manifest");
    assert_eq!(after_m.step, s + 2);
    let mem_after = load(&ck, &after_m).memory.expect("memory");
    // The fixture has 200 keys and capacity 200: nothing is evicted, so the key set is the
    // one checkpointed, and rows of keys the two new steps did not touch are bit-identical.
    let row = |m: &odcd::odc::StreamingState, i: usize| {
        m.bank[i * m.config.dim..(i + 1) * m.config.dim].to_vec()
    };
    let before_rows: std::collections::HashMap<&str, Vec<f32>> = mem_before
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), row(&mem_before, i)))
        .collect();
    let mut same = 0;
    for (i, k) in mem_after.keys.iter().enumerate() {
        if before_rows.get(k.as_str()) == Some(&row(&mem_after, i)) {
            same += 1;
        }
    }
    assert!(
        mem_after.keys.len() >= mem_before.keys.len(),
        "memory shrank: {} -> {}",
        mem_before.keys.len(),
        mem_after.keys.len()
    );
    let touched = 2 * 16;
    assert!(
        same + touched >= mem_before.keys.len(),
        "only {same} of {} memory rows survived the restart unchanged",
        mem_before.keys.len()
    );
}

#[test]
fn sigterm_exits_zero_with_final_checkpoint_and_flushed_parquet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = dir.path().join("ckpt");
    let emb = dir.path().join("emb");
    let port = free_port();
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 1000\nevery_secs = 0\n[embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nmax_file_age_secs = 0\n",
        ck.display(),
        emb.display()
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, test_config(&fixture_url(), port, &extra)).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    wait_until("3 training steps", Duration::from_secs(240), || {
        let (_, body) = http_get(port, "/metrics")?;
        (metric_value(&body, "odcd_train_steps_total")? >= 3.0).then_some(())
    });
    d.signal("-TERM");
    let t0 = std::time::Instant::now();
    assert_eq!(
        d.wait(Duration::from_secs(60)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
    let fin = finished_line(&d.log_text());
    let steps = fin["fields"]["steps"].as_u64().expect("steps");
    let m = manifests(&ck).pop().expect("final checkpoint");
    assert_eq!(m.step, steps, "final checkpoint is at the last step");

    // Every trained row is in a published Parquet file (16 per step), and no staging file.
    let mut rows = 0usize;
    for e in std::fs::read_dir(&emb).expect("embeddings dir") {
        let p = e.expect("entry").path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        assert!(name.ends_with(".parquet"), "unexpected file {name}");
        let f = std::fs::File::open(&p).expect("open parquet");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .expect("parquet reader")
            .build()
            .expect("build reader");
        for b in reader {
            rows += b.expect("record batch").num_rows();
        }
    }
    assert_eq!(rows as u64, steps * 16, "rows published vs steps × batch");
}

#[test]
fn five_percent_corrupt_records_are_counted_exactly_and_training_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).expect("mkdir");
    // 95 good records from the fixture + 5 random-byte "jpg"s, interleaved.
    let mut out = Shard::new();
    let mut images = 0;
    let mut bad = 0;
    for (name, data) in &fixture_members() {
        if name.ends_with(".png") {
            if images == 95 {
                break;
            }
            images += 1;
            if images % 19 == 0 {
                bad += 1;
                out.undecodable(
                    &format!("corrupt-{bad}"),
                    "jpg",
                    b"\xff\xd8 this is not a jpeg at all",
                );
            }
        }
        out.member(name, data);
    }
    out.write(&shards.join("mixed-000.tar"));
    assert_eq!(bad, 5);

    let port = free_port();
    let src = format!("file://{}/", shards.display());
    let text = test_config(&src, port, "").replace("mode = { loop = {} }", "mode = \"once\"");
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, text).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    assert_eq!(
        d.wait(Duration::from_secs(240)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let fin = finished_line(&d.log_text());
    assert_eq!(fin["fields"]["rejected"], 5, "{fin}");
    // Every good image was decoded into a batch and trained on.
    assert_eq!(fin["fields"]["records"], 95, "{fin}");
    assert!(fin["fields"]["steps"].as_u64().unwrap_or(0) >= 6, "{fin}");
}

#[test]
fn failing_checkpoint_storage_is_reported_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A regular file where the checkpoint directory should be: every save fails (even as root).
    let ck = dir.path().join("ckpt");
    std::fs::write(&ck, b"in the way").expect("block path");
    let port = free_port();
    let extra = format!(
        // resume = false: nothing to read at start, the failure is in the writes
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 2\nevery_secs = 0\ntimeout_secs = 30\nresume = false\n",
        ck.display()
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, test_config(&fixture_url(), port, &extra)).expect("write config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    let body = d.wait_metric(
        port,
        "odcd_checkpoint_failures_total",
        1.0,
        Duration::from_secs(240),
    );
    let steps_then = metric_value(&body, "odcd_train_steps_total").unwrap_or(0.0);
    let (code, why) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "readyz while checkpoints fail: {why}");
    assert!(why.contains("checkpoint"), "{why}");
    // Storage comes back.
    std::fs::remove_file(&ck).expect("unblock");
    wait_until("a successful checkpoint", Duration::from_secs(240), || {
        let (_, body) = http_get(port, "/metrics")?;
        (metric_value(&body, "odcd_checkpoints_total")? >= 1.0).then_some(())
    });
    let (_, body) = http_get(port, "/metrics").expect("metrics");
    assert!(
        metric_value(&body, "odcd_train_steps_total").unwrap_or(0.0) > steps_then,
        "training went on"
    );
    assert_eq!(http_get(port, "/readyz").map(|r| r.0), Some(200));
    d.signal("-TERM");
    assert_eq!(d.wait(Duration::from_secs(60)), Some(0));
    assert!(!manifests(&ck).is_empty());
}
