//! Crash tests of the checkpoint barrier with both embeddings sinks on real servers: the real
//! `odcd` binary writing Parquet files and a Kafka topic (Tansu on 127.0.0.1), killed with -9
//! at ten seeded moments across its phases and restarted each time; and the Kafka half of the
//! barrier, with the broker frozen mid-run.
//!
//! `ODCD_CRASH_SEED` picks another schedule of kill moments (the default is fixed).

mod common;

use common::data::rt;
use common::kafka::*;
use common::*;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::data::add_parquet_rows;
use odcd::checkpoint::CheckpointStore;
use odcd::sink::kafka::decode_binary;

const BATCH: usize = 16;

fn store(dir: &Path) -> CheckpointStore {
    CheckpointStore::open(&dir.display().to_string(), &Default::default(), 0)
        .expect("open checkpoint store")
}

fn manifests(dir: &Path) -> Vec<odcd::checkpoint::Manifest> {
    rt().block_on(store(dir).list()).unwrap_or_default()
}

fn last_manifest_step(dir: &Path) -> u64 {
    manifests(dir).last().map_or(0, |m| m.step)
}

fn fixture_url() -> String {
    format!("file://{}/", fixtures_dir().display())
}

/// splitmix64: a seeded schedule without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// The JSON log lines of a run: (message, fields).
fn events(d: &Daemon) -> Vec<serde_json::Value> {
    d.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .collect()
}

fn logged_steps(d: &Daemon) -> Vec<u64> {
    events(d)
        .iter()
        .filter(|f| f["message"] == "step")
        .filter_map(|f| f["step"].as_u64())
        .collect()
}

fn alive(d: &mut Daemon) {
    if let Ok(Some(st)) = d.child.try_wait() {
        panic!(
            "daemon exited before its kill moment ({st}); log:\n{}",
            d.log_text()
        );
    }
}

/// Polls `f` every millisecond (a kill moment is only as sharp as its trigger), failing if the
/// daemon exits first or after `timeout`.
fn poll<T>(
    d: &mut Daemon,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&Daemon) -> Option<T>,
) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f(d) {
            return v;
        }
        alive(d);
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Like `wait_until`, but a timeout shows the end of the daemon's log.
fn wait_logged<T>(
    d: &mut Daemon,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        alive(d);
        if t0.elapsed() > timeout {
            let log = d.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}; log tail:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// (key, step) of every row of every published `*.parquet` under `dir`, panicking on any such
/// file that does not read completely; plus the names of other files (staging leftovers).
fn parquet_rows(dir: &Path) -> (BTreeMap<u64, BTreeSet<String>>, Vec<String>) {
    let mut rows: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut others = Vec::new();
    for name in entries(dir) {
        let p = dir.join(&name);
        if !name.ends_with(".parquet") {
            others.push(name);
            continue;
        }
        add_parquet_rows(&p, &mut rows);
    }
    (rows, others)
}

/// Steps of 1..=last without their whole batch of rows in `got`.
fn missing_steps(got: &BTreeMap<u64, BTreeSet<String>>, last: u64) -> Vec<u64> {
    (1..=last)
        .filter(|s| got.get(s).map_or(0, |k| k.len()) < BATCH)
        .collect()
}

/// (step → keys) of the embeddings topic, read until every step 1..=last has its batch.
fn topic_rows(k: &Tansu, topic: &str, last: u64) -> BTreeMap<u64, BTreeSet<String>> {
    let by_step = |recs: &[Rec]| {
        let mut m: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for r in recs {
            let v = decode_binary(&r.value).unwrap_or_else(|e| panic!("key {}: {e}", r.key));
            m.entry(v.step).or_default().insert(r.key.clone());
        }
        m
    };
    let recs = k.read_all(topic, 1, Duration::from_secs(90), |r| {
        missing_steps(&by_step(r), last).is_empty()
    });
    by_step(&recs)
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    WarmUp,
    MidStep,
    CheckpointWrite,
    ParquetPublish,
    KafkaInFlight,
}

struct Crash {
    dir: PathBuf,
    ck: PathBuf,
    emb: PathBuf,
    cfg: PathBuf,
}

impl Crash {
    fn start(&self, name: &str) -> Daemon {
        Daemon::start(&self.cfg, &self.dir.join(format!("{name}.log")))
    }

    /// Waits for the moment of `phase` in the running daemon `d`, kills it with -9 and says
    /// what the kill hit.
    fn kill_at(&self, d: &mut Daemon, phase: Phase, rng: &mut Rng) -> String {
        let resumed = last_manifest_step(&self.ck);
        let wait = Duration::from_secs(90);
        // Each run first writes one checkpoint of its own, so the ten runs move forward.
        let mut base = resumed;
        if !matches!(phase, Phase::WarmUp) {
            let before = entries(&self.ck.join("manifests"));
            poll(d, "a checkpoint of this run", wait, |_| {
                (entries(&self.ck.join("manifests")) != before).then_some(())
            });
            base = last_manifest_step(&self.ck);
        }
        let hit = match phase {
            Phase::WarmUp => {
                poll(d, "the warm-up", wait, |d| {
                    events(d)
                        .iter()
                        .any(|f| f["message"] == "collecting the warm-up buffer")
                        .then_some(())
                });
                let ms = rng.range(0, 200);
                std::thread::sleep(Duration::from_millis(ms));
                d.signal("-KILL");
                let done = events(d)
                    .iter()
                    .any(|f| f["message"] == "initial clustering done");
                format!(
                    "{ms} ms into the warm-up ({})",
                    if done {
                        "initial clustering already done"
                    } else {
                        "buffer still filling"
                    }
                )
            }
            Phase::MidStep => {
                let after = base + rng.range(0, 4);
                let s = poll(d, "a step", wait, |d| {
                    logged_steps(d).into_iter().find(|&s| s > after)
                });
                let ms = rng.range(20, 140);
                std::thread::sleep(Duration::from_millis(ms));
                d.signal("-KILL");
                let last = logged_steps(d).last().copied().unwrap_or(0);
                format!(
                    "{ms} ms after step {s} was logged, inside step {}",
                    last + 1
                )
            }
            Phase::CheckpointWrite => {
                let before = entries(&self.ck);
                let new = poll(d, "a checkpoint write", wait, |_| {
                    entries(&self.ck)
                        .into_iter()
                        .find(|e| e.starts_with("step-") && !before.contains(e))
                });
                let ms = rng.range(0, 250);
                std::thread::sleep(Duration::from_millis(ms));
                d.signal("-KILL");
                let manifest = self.ck.join("manifests").join(format!("{new}.json"));
                format!(
                    "{ms} ms after {new} appeared ({})",
                    if manifest.exists() {
                        "its manifest was written"
                    } else {
                        "parts only, no manifest yet"
                    }
                )
            }
            Phase::ParquetPublish => {
                let min = base + rng.range(0, 3);
                let before = entries(&self.emb);
                let new = poll(d, "a Parquet publish", wait, |d| {
                    if logged_steps(d).last().copied().unwrap_or(0) <= min {
                        return None;
                    }
                    entries(&self.emb).into_iter().find(|e| !before.contains(e))
                });
                let ms = rng.range(0, 3);
                std::thread::sleep(Duration::from_millis(ms));
                d.signal("-KILL");
                let staging = entries(&self.emb).iter().any(|e| e.contains('#'));
                format!(
                    "{ms} ms after {new} appeared ({})",
                    if staging {
                        "a staging file was being written"
                    } else {
                        "the file was already renamed into place"
                    }
                )
            }
            Phase::KafkaInFlight => {
                let after = base + rng.range(0, 3);
                let s = poll(d, "a step", wait, |d| {
                    logged_steps(d).into_iter().find(|&s| s > after)
                });
                let ms = rng.range(0, 250);
                std::thread::sleep(Duration::from_millis(ms));
                d.signal("-KILL");
                format!("{ms} ms after step {s}'s rows were queued (linger.ms = 300: in flight)")
            }
        };
        assert_eq!(d.wait(Duration::from_secs(10)), None, "killed by a signal");
        format!(
            "{phase:?}: {hit}; resumed from step {resumed}, last manifest now step {}",
            last_manifest_step(&self.ck)
        )
    }
}

/// Ten kill -9 at seeded moments (warm-up, mid-step, checkpoint write, Parquet publish, Kafka
/// deliveries in flight), a restart after each, then a run to `train.max_steps`: every step
/// has its rows in Parquet and on the topic, no Parquet file is partial, the checkpoint chain
/// loads, and the last run resumed from the last manifest.
#[test]
fn ten_kill_9_at_random_moments_lose_no_row_in_parquet_or_kafka() {
    let t0 = Instant::now();
    let seed = std::env::var("ODCD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0dcd_c4a5);
    let mut rng = Rng(seed);
    let k = Tansu::start();
    k.create_topic("emb", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let (ck, emb) = (dir.path().join("ckpt"), dir.path().join("emb"));
    const MAX_STEPS: u64 = 60;
    // Files roll every 2.5 steps, so a checkpoint usually finds rows in the open file; Kafka
    // lingers 300 ms, so a step's records are in flight for that long.
    let extra = format!(
        "[train]\nmax_steps = {MAX_STEPS}\nlog_every = 1\n\
         [checkpoint]\nurl = \"{}\"\nevery_steps = 3\nevery_secs = 0\nkeep = 1000\n\
         [embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nmax_file_age_secs = 0\nmax_rows_per_file = 40\n\
         [embeddings.kafka]\nbrokers = \"{}\"\ntopic = \"emb\"\noptions = {{ \"linger.ms\" = \"300\" }}\n",
        ck.display(),
        emb.display(),
        k.brokers
    );
    let text = test_config(&fixture_url(), free_port(), &extra);
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, text).expect("config");
    let crash = Crash {
        dir: dir.path().to_path_buf(),
        ck: ck.clone(),
        emb: emb.clone(),
        cfg,
    };

    // The first kill is in the warm-up (no checkpoint exists yet, so the restart warms up
    // again); the other nine are a seeded shuffle of the remaining phases.
    let mut rest = vec![
        Phase::MidStep,
        Phase::MidStep,
        Phase::CheckpointWrite,
        Phase::CheckpointWrite,
        Phase::CheckpointWrite,
        Phase::ParquetPublish,
        Phase::ParquetPublish,
        Phase::KafkaInFlight,
        Phase::KafkaInFlight,
    ];
    for i in (1..rest.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        rest.swap(i, j);
    }
    let schedule: Vec<Phase> = std::iter::once(Phase::WarmUp).chain(rest).collect();
    println!("seed {seed:#x}");
    for (i, phase) in schedule.iter().enumerate() {
        let mut d = crash.start(&format!("run{i}"));
        let what = crash.kill_at(&mut d, *phase, &mut rng);
        println!(
            "kill {:>2} at {:>5.1} s: {what}",
            i + 1,
            t0.elapsed().as_secs_f64()
        );
    }

    let resumed = last_manifest_step(&ck);
    let mut d = crash.start("final");
    assert_eq!(
        d.wait(Duration::from_secs(120)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    println!(
        "final run: from step {resumed} to {MAX_STEPS}, done at {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // (e) The model and memory resumed from the last manifest: no second warm-up, and the
    // first trained step follows it.
    let ev = events(&d);
    assert!(resumed > 0, "ten runs wrote at least one checkpoint");
    let from = ev
        .iter()
        .find(|f| f["message"] == "resumed from checkpoint")
        .and_then(|f| f["step"].as_u64());
    assert_eq!(from, Some(resumed), "log:\n{}", d.log_text());
    assert!(
        !ev.iter()
            .any(|f| f["message"] == "collecting the warm-up buffer"),
        "a resumed run does not warm up again"
    );
    assert_eq!(logged_steps(&d).first().copied(), Some(resumed + 1));

    // (c) Every published file reads completely; (a) every step has its rows.
    let (rows, others) = parquet_rows(&emb);
    println!(
        "parquet: {} steps published; other files: {others:?}",
        rows.len()
    );
    assert!(
        others.iter().all(|n| !n.ends_with(".parquet")),
        "{others:?}"
    );
    let missing = missing_steps(&rows, MAX_STEPS);
    assert!(
        missing.is_empty(),
        "steps without their {BATCH} rows in Parquet: {missing:?}"
    );

    // (b) Every trained key, and every step's rows, are on the topic.
    let topic = topic_rows(&k, "emb", MAX_STEPS);
    let missing = missing_steps(&topic, MAX_STEPS);
    assert!(
        missing.is_empty(),
        "steps without their {BATCH} rows on the topic: {missing:?}"
    );
    let on_topic: HashSet<&String> = topic.values().flatten().collect();
    let trained: HashSet<&String> = rows.values().flatten().collect();
    let absent: Vec<_> = trained.difference(&on_topic).collect();
    assert!(
        absent.is_empty(),
        "trained keys not on the topic: {absent:?}"
    );

    // (d) The checkpoint chain: every manifest loads, steps increase, the latest valid one is
    // the last step.
    let st = store(&ck);
    let ms = rt().block_on(st.list()).expect("list");
    let steps: Vec<u64> = ms.iter().map(|m| m.step).collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "checkpoint steps increase: {steps:?}"
    );
    for m in &ms {
        rt().block_on(st.load(m))
            .unwrap_or_else(|e| panic!("checkpoint {} does not load: {e}", m.id));
    }
    let (m, c) = rt()
        .block_on(st.load_latest_valid())
        .expect("load latest")
        .expect("a valid checkpoint");
    assert_eq!((m.step, c.step), (MAX_STEPS, MAX_STEPS));
    println!(
        "checkpoints: {steps:?}; total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// The Kafka half of the barrier: with the broker frozen (SIGSTOP) mid-run, no checkpoint is
/// written while the embeddings are not acknowledged, and `/readyz` and the metrics say why;
/// once it is back, checkpoints resume and every step's rows are on the topic.
///
/// Tansu 0.6 as installed keeps topics only in memory (its sqlite engine is not compiled in),
/// so a killed broker restarts empty: the outage is a freeze, which keeps its data.
#[test]
fn a_frozen_kafka_broker_holds_checkpoints_until_its_rows_are_acknowledged() {
    let k = Tansu::start();
    k.create_topic("emb", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = dir.path().join("ckpt");
    let port = free_port();
    let extra = format!(
        "[checkpoint]\nurl = \"{}\"\nevery_steps = 2\nevery_secs = 0\ntimeout_secs = 3\nkeep = 1000\n\
         [embeddings]\n[embeddings.kafka]\nbrokers = \"{}\"\ntopic = \"emb\"\n\
         options = {{ \"message.timeout.ms\" = \"2000\", \"socket.timeout.ms\" = \"1000\", \"request.timeout.ms\" = \"1000\" }}\n",
        ck.display(),
        k.brokers
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, test_config(&fixture_url(), port, &extra)).expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    let metric = |name: &str| {
        let (_, body) = http_get(port, "/metrics")?;
        metric_value(&body, name)
    };
    wait_until("two checkpoints", Duration::from_secs(120), || {
        alive(&mut d);
        (manifests(&ck).len() >= 2).then_some(())
    });

    k.pause();
    let before = manifests(&ck).len();
    let failures = metric("odcd_checkpoint_failures_total").unwrap_or(0.0);
    wait_until("a checkpoint failure", Duration::from_secs(60), || {
        alive(&mut d);
        (metric("odcd_checkpoint_failures_total")? > failures).then_some(())
    });
    // A checkpoint in flight when the broker froze may still land; none after it.
    let held = manifests(&ck).len();
    assert!(held <= before + 1, "{before} -> {held}");
    let (code, why) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("embeddings sinks did not publish"), "{why}");
    std::thread::sleep(Duration::from_secs(5));
    alive(&mut d);
    assert_eq!(
        manifests(&ck).len(),
        held,
        "no checkpoint while the broker is down"
    );
    let checkpoints = metric("odcd_checkpoints_total").expect("checkpoints metric");

    k.resume();
    wait_logged(
        &mut d,
        "a checkpoint after the outage",
        Duration::from_secs(45),
        || (metric("odcd_checkpoints_total")? > checkpoints).then_some(()),
    );
    wait_until("ready again", Duration::from_secs(60), || {
        matches!(http_get(port, "/readyz"), Some((200, _))).then_some(())
    });
    d.signal("-TERM");
    assert_eq!(
        d.wait(Duration::from_secs(60)),
        Some(0),
        "log:\n{}",
        d.log_text()
    );
    let last = last_manifest_step(&ck);
    let topic = topic_rows(&k, "emb", last);
    let missing = missing_steps(&topic, last);
    assert!(
        missing.is_empty(),
        "steps without their {BATCH} rows on the topic: {missing:?}"
    );
}
