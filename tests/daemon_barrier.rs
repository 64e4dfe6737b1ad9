//! Checkpoints are a barrier for the embeddings: the real `odcd` binary, killed with -9 right
//! after a checkpoint, or with its Parquet location refusing writes, never leaves a step
//! without its rows once it has run to the end.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::data::add_parquet_rows;
use odcd::checkpoint::CheckpointStore;

const BATCH: usize = 16;

fn manifests(dir: &Path) -> Vec<odcd::checkpoint::Manifest> {
    let store = CheckpointStore::open(&dir.display().to_string(), &Default::default(), 0)
        .expect("open checkpoint store");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(store.list())
        .unwrap_or_default()
}

fn fixture_url() -> String {
    format!("file://{}/", fixtures_dir().display())
}

/// Distinct keys per step over every published Parquet file under `dir`; panics on any file
/// that is not a whole Parquet file (a staging or partial file left visible).
fn keys_per_step(dir: &Path) -> BTreeMap<u64, BTreeSet<String>> {
    let mut out: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // No folder yet: nothing was ever published.
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            add_parquet_rows(&p, &mut out);
        }
    }
    out
}

/// Every step 1..=last has its whole batch of rows.
fn assert_every_step_published(emb: &Path, last: u64) {
    let got = keys_per_step(emb);
    let missing: Vec<u64> = (1..=last)
        .filter(|s| got.get(s).map_or(0, |k| k.len()) != BATCH)
        .collect();
    assert!(
        missing.is_empty(),
        "steps without their {BATCH} rows in Parquet: {missing:?} (published steps: {:?})",
        got.keys().collect::<Vec<_>>()
    );
}

/// The user's report: checkpoints every 3 steps, Parquet files that neither the row bound nor
/// the age would publish, `kill -9` right after a checkpoint, restart to two steps past it.
#[test]
fn kill_9_after_a_checkpoint_loses_no_step_of_embeddings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ck, emb) = (dir.path().join("ckpt"), dir.path().join("emb"));
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 3\nevery_secs = 0\nkeep = 5\n[embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nmax_file_age_secs = 0\n",
        ck.display(),
        emb.display()
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, test_config(&fixture_url(), free_port(), &extra)).expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run1.log"));
    wait_until("two checkpoints", Duration::from_secs(240), || {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("daemon exited early ({st}); log:\n{}", d.log_text());
        }
        (manifests(&ck).len() >= 2).then_some(())
    });
    d.signal("-KILL");
    assert_eq!(d.wait(Duration::from_secs(10)), None, "killed by a signal");
    let s = manifests(&ck).pop().expect("a manifest").step;
    // What the checkpoint covers is already published, before any restart.
    assert_every_step_published(&emb, s);

    let text = test_config(&fixture_url(), free_port(), &extra).replace(
        "[metrics]",
        &format!("[train]\nmax_steps = {}\n[metrics]", s + 2),
    );
    let cfg2 = dir.path().join("odcd2.toml");
    std::fs::write(&cfg2, text).expect("config");
    let mut d2 = Daemon::start(&cfg2, &dir.path().join("run2.log"));
    assert_eq!(
        d2.wait(Duration::from_secs(240)),
        Some(0),
        "log:\n{}",
        d2.log_text()
    );
    assert_eq!(manifests(&ck).pop().map(|m| m.step), Some(s + 2));
    assert_every_step_published(&emb, s + 2);
}

/// A Parquet location that refuses writes (a regular file where the files' folder should be,
/// which fails even as root) holds the barrier: checkpoints fail, counted and named by
/// `/readyz`, and none is written; once the location is back, checkpoints go on and every
/// step's rows are published.
#[test]
fn a_refusing_parquet_location_holds_checkpoints_until_it_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ck, emb) = (dir.path().join("ckpt"), dir.path().join("emb"));
    std::fs::create_dir_all(&emb).expect("mkdir");
    let block = emb.join("sub");
    std::fs::write(&block, b"in the way").expect("block");
    let port = free_port();
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 2\nevery_secs = 0\ntimeout_secs = 3\nresume = false\n[embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nmax_file_age_secs = 0\nfile_prefix = \"sub/part\"\n",
        ck.display(),
        emb.display()
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, test_config(&fixture_url(), port, &extra)).expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    let body = d.wait_metric(
        port,
        "odcd_checkpoint_failures_total",
        1.0,
        Duration::from_secs(240),
    );
    assert_eq!(metric_value(&body, "odcd_checkpoints_total"), Some(0.0));
    assert!(
        manifests(&ck).is_empty(),
        "no checkpoint past unpublished rows"
    );
    let (code, why) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("embeddings sinks did not publish"), "{why}");
    wait_until("sink retries counted", Duration::from_secs(30), || {
        let (_, body) = http_get(port, "/metrics")?;
        (metric_value(&body, "odcd_sink_retries_total")? >= 1.0).then_some(())
    });

    std::fs::remove_file(&block).expect("unblock");
    wait_until("a checkpoint", Duration::from_secs(240), || {
        let (_, body) = http_get(port, "/metrics")?;
        (metric_value(&body, "odcd_checkpoints_total")? >= 1.0).then_some(())
    });
    d.signal("-TERM");
    assert_eq!(
        d.wait(Duration::from_secs(60)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let last = manifests(&ck).pop().expect("final checkpoint").step;
    assert_every_step_published(&emb, last);
}
