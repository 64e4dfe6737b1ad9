//! Outages ridden out by the real `odcd` binary, each 30 s long, on real servers:
//!
//! - the S3 server (moto) unreachable while the source reads its shards, while a checkpoint is
//!   being written and while Parquet files are published. moto keeps everything in memory and
//!   has no persistence option, so a stopped moto would come back empty. Two ways: a TCP
//!   forwarder in front of it that refuses connections and cuts the open ones
//!   ([`common::s3::Forwarder`]), which the daemon sees exactly as a stopped server; and the
//!   moto process really stopped and restarted, the test restoring its bucket as a disk would;
//! - the Kafka broker (Tansu) stopped (SIGKILL) and restarted under the Kafka source and the
//!   Kafka embeddings sink. Tansu runs on its `s3://` storage engine in a moto bucket, so the
//!   restarted broker has its topics, records, groups and producer state, as a broker
//!   restarting from its disk;
//! - a full disk (a tmpfs filled to the last byte) under local checkpoints and Parquet files.
//!
//! Each time the daemon keeps running, `/readyz` and the metrics say what is wrong, work
//! resumes when the server or the space is back, and nothing is lost or skipped.

mod common;

use common::data::{add_parquet_rows, rt, Shard};
use common::kafka::*;
use common::s3::*;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::{path::Path as ObjPath, ObjectStore, PutPayload};
use odcd::checkpoint::CheckpointStore;
use odcd::sink::kafka::decode_binary;

const BATCH: usize = 16;
const OUTAGE: Duration = Duration::from_secs(30);

fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics")?;
    metric_value(&body, name)
}

fn readyz(port: u16) -> (u16, String) {
    http_get(port, "/readyz").unwrap_or((0, String::new()))
}

/// Waits (during an outage) until `f` holds, failing with the daemon's log if it exits or
/// `deadline` passes.
fn wait_during(d: &mut Daemon, what: &str, deadline: Instant, mut f: impl FnMut() -> bool) {
    loop {
        d.assert_alive();
        if f() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "during the outage, timed out waiting for {what}; log tail:\n{}",
            tail(&d.log_text(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `/readyz` answers 200 again after `what`, failing if the daemon exits.
fn wait_ready_again(d: &mut Daemon, port: u16, what: &str, timeout: Duration) {
    wait_until(&format!("/readyz 200 after {what}"), timeout, || {
        d.assert_alive();
        (readyz(port).0 == 200).then_some(())
    });
}

/// Waits for the daemon to exit 0, printing the log's tail if it does not.
fn assert_exits_zero(d: &mut Daemon, timeout: Duration) {
    assert_eq!(
        d.wait(timeout),
        Some(0),
        "log tail:\n{}",
        tail(&d.log_text(), 40)
    );
}

/// Every step 1..=last has its whole batch of rows in `rows`.
fn missing_steps(rows: &BTreeMap<u64, BTreeSet<String>>, last: u64) -> Vec<u64> {
    (1..=last)
        .filter(|s| rows.get(s).map_or(0, |k| k.len()) < BATCH)
        .collect()
}

fn all_keys(rows: &BTreeMap<u64, BTreeSet<String>>) -> BTreeSet<String> {
    rows.values().flatten().cloned().collect()
}

/// `n` records as WebDataset shards of 40 under `prefix` in `store` (the fixture's 200 images
/// reused, each with its own key); returns the keys.
fn put_shards(store: &Arc<dyn ObjectStore>, prefix: &str, n: usize) -> BTreeSet<String> {
    let recs = fixture_records();
    let mut keys = BTreeSet::new();
    rt().block_on(async {
        for j in 0..n.div_ceil(40) {
            let mut s = Shard::new();
            for i in (j * 40)..((j + 1) * 40).min(n) {
                let (_, img, hs) = &recs[i % recs.len()];
                let label = hs
                    .iter()
                    .find(|(k, _)| k == "class_label")
                    .and_then(|(_, v)| v.parse().ok());
                let key = format!("r{i:04}");
                s.sample(&key, "png", img, label);
                keys.insert(key);
            }
            store
                .put(
                    &ObjPath::from(format!("{prefix}/{j:03}.tar")),
                    PutPayload::from(s.bytes()),
                )
                .await
                .expect("put shard");
        }
    });
    keys
}

/// The objects under `prefix`.
fn list(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    rt().block_on(
        store
            .list(Some(&ObjPath::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect::<Vec<_>>(),
    )
    .unwrap_or_default()
}

/// (step → keys) of every `*.parquet` object under `prefix`, panicking on one that does not
/// read completely; plus the names of any other objects.
fn s3_parquet_rows(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    tmp: &Path,
) -> (BTreeMap<u64, BTreeSet<String>>, Vec<String>) {
    let mut rows = BTreeMap::new();
    let mut others = Vec::new();
    for name in list(store, prefix) {
        if !name.ends_with(".parquet") {
            others.push(name);
            continue;
        }
        let bytes = rt()
            .block_on(async {
                store
                    .get(&ObjPath::from(name.as_str()))
                    .await?
                    .bytes()
                    .await
            })
            .expect("get parquet object");
        let local = tmp.join("one.parquet");
        std::fs::write(&local, &bytes).expect("write parquet copy");
        add_parquet_rows(&local, &mut rows);
    }
    (rows, others)
}

/// (step → keys) of every `*.parquet` file in `dir`, panicking on one that does not read
/// completely; plus the names of any other files (staging leftovers).
fn local_parquet_rows(dir: &Path) -> (BTreeMap<u64, BTreeSet<String>>, Vec<String>) {
    let mut rows = BTreeMap::new();
    let mut others = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            add_parquet_rows(&e.path(), &mut rows);
        } else {
            others.push(name);
        }
    }
    (rows, others)
}

/// Every manifest under the checkpoint store `url` loads; returns their steps.
fn checkpoint_steps(url: &str, options: &BTreeMap<String, String>) -> Vec<u64> {
    let st = CheckpointStore::open(url, options, 0).expect("open checkpoint store");
    let ms = rt().block_on(st.list()).expect("list checkpoints");
    for m in &ms {
        rt().block_on(st.load(m))
            .unwrap_or_else(|e| panic!("checkpoint {} does not load: {e}", m.id));
    }
    ms.iter().map(|m| m.step).collect()
}

fn s3_options(endpoint: &str) -> BTreeMap<String, String> {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_virtual_hosted_style_request", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The S3 server unreachable for 30 s behind a closed forwarder (moto keeps its state),
/// starting while a checkpoint is being written (its first part stored, its manifest not yet),
/// with the source part-way through its shards and Parquet files published every step. `once`
/// mode: at the end every record was trained and has its row, every step is published, and the
/// last checkpoint is at the last step.
#[test]
fn an_s3_outage_under_the_source_a_checkpoint_and_parquet_is_ridden_out() {
    s3_outage(false);
}

/// The same with the moto process really stopped (SIGKILL) and started again 30 s later on the
/// same port. moto has no persistence, so the test restores what the bucket held when it
/// stopped (taken with the daemon frozen for that moment, and put back with the daemon frozen
/// again), as a server restarting from its disk would; uploads in progress are lost, as their
/// multipart upload ids are.
#[test]
fn an_s3_server_stopped_and_restarted_under_the_source_a_checkpoint_and_parquet_is_ridden_out() {
    s3_outage(true);
}

/// Every object of the bucket (a stopped server's disk).
fn snapshot(store: &Arc<dyn ObjectStore>) -> Vec<(String, bytes::Bytes)> {
    rt().block_on(async {
        let names: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .expect("list the bucket");
        let mut out = Vec::new();
        for n in names {
            let b = store
                .get(&ObjPath::from(n.as_str()))
                .await
                .expect("get object")
                .bytes()
                .await
                .expect("object bytes");
            out.push((n, b));
        }
        out
    })
}

fn restore(store: &Arc<dyn ObjectStore>, objects: Vec<(String, bytes::Bytes)>) {
    rt().block_on(async {
        for (n, b) in objects {
            store
                .put(&ObjPath::from(n.as_str()), PutPayload::from(b))
                .await
                .expect("restore object");
        }
    });
}

fn s3_outage(restart: bool) {
    const RECORDS: usize = 640;
    let t0 = Instant::now();
    let moto_port = free_port();
    let mut moto = Some(Moto::start(moto_port));
    let mut fwd = (!restart).then(|| Forwarder::start(moto_port));
    let direct = moto.as_ref().expect("moto").store();
    let keys = put_shards(&direct, "shards", RECORDS);
    let moto_endpoint = format!("http://127.0.0.1:{moto_port}");
    let opts = s3_options_toml(&fwd.as_ref().map_or(moto_endpoint.clone(), |f| f.endpoint()));
    let port = free_port();
    let extra = format!(
        "[train]\nlog_every = 1\n\
         [checkpoint]\nurl = \"s3://{BUCKET}/ck/\"\noptions = {opts}\nevery_steps = 3\nevery_secs = 0\ntimeout_secs = 10\nkeep = 2\n\
         [embeddings]\nurl = \"s3://{BUCKET}/emb/\"\noptions = {opts}\n\
         [embeddings.parquet]\nmax_file_age_secs = 0\nmax_rows_per_file = {BATCH}\n"
    );
    // A small source buffer and batch queue: the source is still reading when the outage
    // starts. A retry budget of 2 × 200 ms that alone would skip a shard within a second.
    let text = test_config(&format!("s3://{BUCKET}/shards/"), port, &extra)
        .replace(
            "mode = { loop = {} }\n",
            &format!("mode = \"once\"\noptions = {opts}\nchannel_capacity = 8\nmax_retries = 2\nretry_backoff_ms = 200\n"),
        )
        .replace("threads = 1\n", "threads = 1\nbatch_queue = 2\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(&cfg, text).expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));

    // The outage starts while a checkpoint is being written.
    let caught = wait_until("a checkpoint write", Duration::from_secs(240), || {
        d.assert_alive();
        let objs = list(&direct, "ck");
        let manifests: BTreeSet<String> = objs
            .iter()
            .filter_map(|o| o.strip_prefix("ck/manifests/"))
            .map(|m| m.trim_end_matches(".json").to_string())
            .collect();
        objs.iter()
            .filter_map(|o| o.strip_prefix("ck/"))
            .filter(|o| o.starts_with("step-"))
            .find(|o| !manifests.iter().any(|m| o.starts_with(m.as_str())))
            .map(|o| o.to_string())
    });
    let saved = match &mut fwd {
        Some(f) => {
            f.close();
            None
        }
        None => {
            d.signal("-STOP");
            let objects = snapshot(&direct);
            drop(moto.take());
            d.signal("-CONT");
            Some(objects)
        }
    };
    let down = Instant::now();
    let trained_before = metric(port, "odcd_records_read_total").unwrap_or(0.0);
    println!(
        "S3 down ({}) at {:.1} s: {caught} stored, its manifest not yet; {trained_before} records read of {RECORDS}",
        if restart { "moto stopped" } else { "forwarder closed" },
        t0.elapsed().as_secs_f64()
    );
    let failures = metric(port, "odcd_checkpoint_failures_total").unwrap_or(0.0);
    let deadline = down + OUTAGE - Duration::from_secs(2);
    wait_during(&mut d, "/readyz naming the source", deadline, || {
        let (code, why) = readyz(port);
        code == 503 && why.contains("source unreachable")
    });
    wait_during(&mut d, "a failed checkpoint", deadline, || {
        metric(port, "odcd_checkpoint_failures_total").is_some_and(|v| v > failures)
    });
    wait_during(&mut d, "a retried Parquet publish", deadline, || {
        metric(port, "odcd_sink_retries_total").is_some_and(|v| v >= 1.0)
    });
    let (code, why) = readyz(port);
    println!("during the outage: /readyz {code}: {}", why.trim());
    assert_eq!(code, 503);
    assert!(why.contains("last checkpoint failed"), "{why}");
    assert_eq!(metric(port, "odcd_source_store_unreachable"), Some(1.0));
    assert!(metric(port, "odcd_source_retries_total").unwrap_or(0.0) >= 1.0);
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    d.assert_alive();
    match (&mut fwd, saved) {
        (Some(f), _) => f.open(),
        (None, objects) => {
            d.signal("-STOP");
            moto = Some(Moto::start(moto_port));
            let objects = objects.unwrap_or_default();
            let n = objects.len();
            restore(&direct, objects);
            d.signal("-CONT");
            println!("moto restarted, {n} objects restored");
        }
    }
    println!(
        "S3 back at {:.1} s after {:.1} s down",
        t0.elapsed().as_secs_f64(),
        down.elapsed().as_secs_f64()
    );
    wait_ready_again(&mut d, port, "the outage", Duration::from_secs(120));
    assert_eq!(metric(port, "odcd_source_store_unreachable"), Some(0.0));
    assert_exits_zero(&mut d, Duration::from_secs(240));
    let last = (RECORDS / BATCH) as u64;
    println!("run done at {:.1} s", t0.elapsed().as_secs_f64());

    let (rows, others) = s3_parquet_rows(&direct, "emb", dir.path());
    assert!(
        others.is_empty(),
        "objects that are not Parquet: {others:?}"
    );
    let trained = all_keys(&rows);
    let missing: Vec<_> = keys.difference(&trained).collect();
    assert!(missing.is_empty(), "records never trained: {missing:?}");
    assert_eq!(
        missing_steps(&rows, last),
        Vec::<u64>::new(),
        "steps without their rows"
    );
    let steps = checkpoint_steps(&format!("s3://{BUCKET}/ck/"), &s3_options(&moto_endpoint));
    drop(moto);
    assert_eq!(steps.last(), Some(&last), "checkpoints: {steps:?}");
    assert!(
        !d.log_text().contains("could not be read after"),
        "a shard was skipped"
    );
}

/// The Kafka broker stopped for 30 s and restarted (its storage kept), under the Kafka source
/// and the Kafka embeddings sink. Records produced before and after the outage are all
/// trained; every step's rows reach the topic; checkpoints resume.
#[test]
fn a_kafka_broker_restart_under_the_source_and_the_sink_is_ridden_out() {
    let t0 = Instant::now();
    let moto = Moto::start(free_port());
    moto.create_bucket("tansu");
    let mut k = Tansu::start_on_s3(&moto.endpoint(), "tansu");
    k.create_topic("in", 1);
    k.create_topic("emb", 1);
    let recs = fixture_records();
    let early: Vec<InRec> = recs
        .iter()
        .map(|(key, v, h)| (format!("early-{key}"), v.clone(), h.clone()))
        .collect();
    let late: Vec<InRec> = recs
        .iter()
        .map(|(key, v, h)| (format!("late-{key}"), v.clone(), h.clone()))
        .collect();
    k.produce("in", &early);

    let dir = tempfile::tempdir().expect("tempdir");
    let (ck, emb) = (dir.path().join("ckpt"), dir.path().join("emb"));
    let port = free_port();
    let extra = format!(
        "[train]\nlog_every = 1\n\
         [checkpoint]\nurl = \"{}\"\nevery_steps = 2\nevery_secs = 0\ntimeout_secs = 5\nkeep = 2\n\
         [embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nmax_file_age_secs = 0\n\
         [embeddings.kafka]\nbrokers = \"{}\"\ntopic = \"emb\"\n\
         options = {{ \"message.timeout.ms\" = \"3000\", \"socket.timeout.ms\" = \"1000\", \"request.timeout.ms\" = \"1000\" }}\n",
        ck.display(),
        emb.display(),
        k.brokers
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(
        &cfg,
        kafka_test_config(&k.brokers, "in", "odcd", port, &extra),
    )
    .expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    d.wait_metric(
        port,
        "odcd_checkpoints_total",
        2.0,
        Duration::from_secs(240),
    );

    k.stop();
    let down = Instant::now();
    println!(
        "broker stopped at {:.1} s (records read so far: {:?})",
        t0.elapsed().as_secs_f64(),
        metric(port, "odcd_records_read_total")
    );
    let failures = metric(port, "odcd_checkpoint_failures_total").unwrap_or(0.0);
    let deadline = down + OUTAGE - Duration::from_secs(2);
    wait_during(&mut d, "/readyz naming the source", deadline, || {
        let (code, why) = readyz(port);
        code == 503 && why.contains("source not connected")
    });
    wait_during(&mut d, "a failed checkpoint", deadline, || {
        metric(port, "odcd_checkpoint_failures_total").is_some_and(|v| v > failures)
    });
    let (code, why) = readyz(port);
    println!("during the outage: /readyz {code}: {}", why.trim());
    assert!(why.contains("embeddings sinks did not publish"), "{why}");
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    d.assert_alive();
    let checkpoints = metric(port, "odcd_checkpoints_total").unwrap_or(0.0);
    k.restart();
    println!(
        "broker back at {:.1} s after {:.1} s down",
        t0.elapsed().as_secs_f64(),
        down.elapsed().as_secs_f64()
    );
    k.produce("in", &late);
    // Work resumes: every record, before and after the outage, is trained and its row
    // published (Parquet files are published at each checkpoint).
    let produced: BTreeSet<String> = early.iter().chain(&late).map(|r| r.0.clone()).collect();
    wait_until("every record trained", Duration::from_secs(240), || {
        d.assert_alive();
        produced
            .is_subset(&all_keys(&local_parquet_rows(&emb).0))
            .then_some(())
    });
    println!(
        "every record trained at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(metric(port, "odcd_checkpoints_total").unwrap_or(0.0) > checkpoints);
    wait_ready_again(&mut d, port, "the outage", Duration::from_secs(60));
    d.signal("-TERM");
    assert_exits_zero(&mut d, Duration::from_secs(120));
    println!("run done at {:.1} s", t0.elapsed().as_secs_f64());

    // Every record produced was trained (its row is in Parquet).
    let (rows, others) = local_parquet_rows(&emb);
    assert!(
        others.iter().all(|n| !n.ends_with(".parquet")),
        "{others:?}"
    );
    let trained = all_keys(&rows);
    let missing: Vec<_> = early
        .iter()
        .chain(&late)
        .map(|(key, _, _)| key)
        .filter(|key| !trained.contains(*key))
        .collect();
    assert!(missing.is_empty(), "records never trained: {missing:?}");
    // Every trained step's rows are on the topic.
    let want: usize = rows.values().map(|k| k.len()).sum();
    let recs = k.read_all("emb", 1, Duration::from_secs(90), |r| r.len() >= want);
    let mut topic: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in &recs {
        let v = decode_binary(&r.value).unwrap_or_else(|e| panic!("key {}: {e}", r.key));
        topic.entry(v.step).or_default().insert(r.key.clone());
    }
    let absent: Vec<_> = rows
        .iter()
        .flat_map(|(s, ks)| ks.iter().map(move |key| (*s, key)))
        .filter(|(s, key)| !topic.get(s).is_some_and(|t| t.contains(*key)))
        .collect();
    assert!(absent.is_empty(), "rows not on the topic: {absent:?}");
    let steps = checkpoint_steps(&ck.display().to_string(), &BTreeMap::new());
    assert_eq!(
        steps.last().copied(),
        rows.keys().last().copied(),
        "the last checkpoint covers the last step"
    );
}

/// A tmpfs mounted for the test (root only), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `Err(why)` when mounting is not permitted here.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `path` to the last byte; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create ballast");
    let chunk = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    let _ = f.flush();
    n
}

/// Local checkpoints and Parquet files on a full disk (a 400 MiB tmpfs, filled to the last
/// byte mid-run): failures are counted and named by `/readyz`, no partial file is visible,
/// and once space returns checkpoints and files resume with every step published.
#[test]
fn a_full_disk_under_checkpoints_and_parquet_is_ridden_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = match Tmpfs::mount(&dir.path().join("disk"), "400m") {
        Ok(t) => t,
        Err(why) => {
            println!(
                "SKIPPED the full-disk test: `mount -t tmpfs` is not permitted here ({why}); \
                 it needs root (CAP_SYS_ADMIN)"
            );
            return;
        }
    };
    let (ck, emb) = (disk.0.join("ckpt"), disk.0.join("emb"));
    let port = free_port();
    let extra = format!(
        "[train]\nlog_every = 1\n\
         [checkpoint]\nurl = \"{}\"\nevery_steps = 2\nevery_secs = 0\ntimeout_secs = 5\nkeep = 1\n\
         [embeddings]\nurl = \"{}\"\n[embeddings.parquet]\nmax_file_age_secs = 0\nmax_rows_per_file = {BATCH}\n",
        ck.display(),
        emb.display()
    );
    let cfg = dir.path().join("odcd.toml");
    let src = format!("file://{}/", fixtures_dir().display());
    std::fs::write(&cfg, test_config(&src, port, &extra)).expect("config");
    let mut d = Daemon::start(&cfg, &dir.path().join("run.log"));
    d.wait_metric(
        port,
        "odcd_checkpoints_total",
        1.0,
        Duration::from_secs(240),
    );

    let ballast = disk.0.join("ballast");
    let filled = fill(&ballast);
    let full = Instant::now();
    println!("disk full: {filled} bytes of ballast");
    let failures = metric(port, "odcd_checkpoint_failures_total").unwrap_or(0.0);
    let retries = metric(port, "odcd_sink_retries_total").unwrap_or(0.0);
    let deadline = full + Duration::from_secs(60);
    wait_during(&mut d, "a failed checkpoint", deadline, || {
        metric(port, "odcd_checkpoint_failures_total").is_some_and(|v| v > failures)
    });
    wait_during(&mut d, "a retried Parquet publish", deadline, || {
        metric(port, "odcd_sink_retries_total").is_some_and(|v| v > retries)
    });
    let (code, why) = readyz(port);
    println!("disk full: /readyz {code}: {}", why.trim());
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("last checkpoint failed"), "{why}");
    // Nothing partial is visible: every Parquet file reads whole, no staging file is left.
    let (_, others) = local_parquet_rows(&emb);
    assert!(others.is_empty(), "partial files left: {others:?}");
    let checkpoints = metric(port, "odcd_checkpoints_total").unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs(5));
    d.assert_alive();

    std::fs::remove_file(&ballast).expect("free the space");
    println!("space back after {:.1} s", full.elapsed().as_secs_f64());
    d.wait_metric(
        port,
        "odcd_checkpoints_total",
        checkpoints + 1.0,
        Duration::from_secs(120),
    );
    wait_ready_again(&mut d, port, "the disk-full", Duration::from_secs(60));
    d.signal("-TERM");
    assert_exits_zero(&mut d, Duration::from_secs(120));
    let (rows, others) = local_parquet_rows(&emb);
    assert!(others.is_empty(), "partial files left: {others:?}");
    let steps = checkpoint_steps(&ck.display().to_string(), &BTreeMap::new());
    let last = *steps.last().expect("a checkpoint");
    assert_eq!(rows.keys().last().copied(), Some(last));
    assert_eq!(missing_steps(&rows, last), Vec::<u64>::new());
}
