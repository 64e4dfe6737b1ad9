//! `odcd run` on the generic training path (`train.kernels = "generic"`: the candle ops a GPU
//! runs, here on CPU): it trains, checkpoints, and a restart resumes from the checkpoint.

mod common;

use common::*;
use std::time::Duration;

use odcd::checkpoint::CheckpointStore;

fn fixture_url() -> String {
    format!("file://{}/", fixtures_dir().display())
}

/// The fields of the "run finished" JSON log line.
fn finished(log: &str) -> serde_json::Value {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "run finished")
        .map(|v| v["fields"].clone())
        .unwrap_or_else(|| panic!("no `run finished` line in log:\n{log}"))
}

/// A loss logged as `Some(1.23)`.
fn loss(fields: &serde_json::Value, key: &str) -> f64 {
    fields[key]
        .as_str()
        .and_then(|s| s.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {fields}"))
}

fn config(dir: &std::path::Path, ck: &std::path::Path, max_steps: u64) -> std::path::PathBuf {
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 3\nevery_secs = 0\nkeep = 5\n",
        ck.display()
    );
    let text = test_config(&fixture_url(), free_port(), &extra).replace(
        "[metrics]",
        &format!("[train]\nkernels = \"generic\"\nmax_steps = {max_steps}\n[metrics]"),
    );
    let path = dir.join(format!("odcd-{max_steps}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn generic_kernels_train_checkpoint_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = dir.path().join("ckpt");

    let mut d = Daemon::start(&config(dir.path(), &ck, 6), &dir.path().join("run1.log"));
    assert_eq!(
        d.wait(Duration::from_secs(300)),
        Some(0),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("\"kernels\":\"generic\"") && log.contains("\"memory\":\"device\""),
        "the run did not take the generic path for the model and the memory:\n{log}"
    );
    let fin = finished(&log);
    assert_eq!(fin["steps"], 6, "{fin}");
    let (first, last) = (loss(&fin, "first_loss"), loss(&fin, "last_loss"));
    assert!(first.is_finite() && last.is_finite(), "{fin}");

    let store = CheckpointStore::open(&ck.display().to_string(), &Default::default(), 0)
        .expect("open checkpoint store");
    let rt = common::data::rt();
    let steps: Vec<u64> = rt
        .block_on(store.list())
        .expect("list checkpoints")
        .iter()
        .map(|m| m.step)
        .collect();
    assert!(steps.contains(&6), "checkpoints at steps {steps:?}");

    // A restart resumes at step 6 (no warm-up again) and trains on to 9.
    let mut d2 = Daemon::start(&config(dir.path(), &ck, 9), &dir.path().join("run2.log"));
    assert_eq!(
        d2.wait(Duration::from_secs(300)),
        Some(0),
        "{}",
        d2.log_text()
    );
    let log2 = d2.log_text();
    assert!(
        !log2.contains("collecting the warm-up buffer"),
        "warm-up ran again:\n{log2}"
    );
    let fin2 = finished(&log2);
    assert_eq!(fin2["resumed_from"], "Some(6)", "{fin2}");
    assert_eq!(fin2["steps"], 9, "{fin2}");
    assert!(loss(&fin2, "last_loss").is_finite(), "{fin2}");
    let latest = rt
        .block_on(store.list())
        .expect("list checkpoints")
        .pop()
        .map(|m| m.step);
    assert_eq!(latest, Some(9));
}
