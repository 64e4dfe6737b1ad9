//! Representation quality end to end with the real binary: a short `odcd run` on 150 of the
//! fixture's Fashion-MNIST images with an `[eval]` section (in-daemon k-NN metrics, history in
//! checkpoints), then `odcd eval` on the other 50 with both baselines, then `odcd report`
//! rendered by headless Chromium. One daemon run is shared by the tests (debug builds train
//! slowly).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::data::{fixture_members, members, Shard};
use common::*;

struct Trained {
    _dir: tempfile::TempDir,
    root: PathBuf,
    train: PathBuf,
    test: PathBuf,
    ckpt: PathBuf,
    /// /metrics as scraped once an evaluation had finished.
    metrics: String,
}

/// Splits the fixture tar into train (first 150 samples) and test (last 50) shards.
fn split_fixture(train: &Path, test: &Path) {
    let members = fixture_members();
    let key = |name: &str| name.split_once('.').expect("key.ext").0.to_string();
    let mut keys: Vec<String> = Vec::new();
    for (name, _) in &members {
        if keys.last() != Some(&key(name)) {
            keys.push(key(name));
        }
    }
    assert_eq!(keys.len(), 200, "the fixture holds 200 samples");
    for (dir, range) in [(train, 0..150), (test, 150..200)] {
        std::fs::create_dir_all(dir).expect("mkdir");
        let wanted: std::collections::HashSet<&String> = keys[range].iter().collect();
        let mut shard = Shard::new();
        for (name, bytes) in &members {
            if wanted.contains(&key(name)) {
                shard.member(name, bytes);
            }
        }
        shard.write(&dir.join("part-000000.tar"));
    }
}

fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let (train, test, ckpt) = (root.join("train"), root.join("test"), root.join("ckpt"));
        split_fixture(&train, &test);
        let port = free_port();
        let extra = format!(
            r#"
[train]
log_every = 1
[checkpoint]
url = "{}"
every_steps = 1000
every_secs = 0
[eval]
train_url = "{}"
test_url = "{}"
every_steps = 2
k = [5, 20]
"#,
            ckpt.display(),
            train.display(),
            test.display()
        );
        let cfg = root.join("odcd.toml");
        // With BatchNorm calibration on the first 2 of the 3 warm-up batches: the
        // calibrated path of the warm-up runs in the daemon here.
        let config = test_config(&format!("{}", train.display()), port, &extra).replace(
            "warmup_samples = 48",
            "warmup_samples = 48\nbn_calibration_batches = 2",
        );
        std::fs::write(&cfg, config).expect("write config");
        let mut d = Daemon::start(&cfg, &root.join("odcd.log"));
        let metrics = d.wait_metric(port, "odcd_eval_runs_total", 1.0, Duration::from_secs(600));
        // Let a few more progress points (with the k-NN figure) reach the history.
        let step_now = metric_value(&metrics, "odcd_train_step").unwrap_or(0.0);
        wait_until("two more steps", Duration::from_secs(300), || {
            let (_, body) = http_get(port, "/metrics")?;
            (metric_value(&body, "odcd_train_step")? >= step_now + 2.0).then_some(())
        });
        d.signal("-TERM");
        assert_eq!(
            d.wait(Duration::from_secs(300)),
            Some(0),
            "{}",
            d.log_text()
        );
        let log = d.log_text();
        assert!(
            log.contains("BatchNorm calibrated on the first warm-up batches")
                && log.contains("\"batches\":2"),
            "no BatchNorm calibration on 2 batches in the log:\n{log}"
        );
        Trained {
            _dir: dir,
            root,
            train,
            test,
            ckpt,
            metrics,
        }
    })
}

#[test]
fn in_daemon_eval_exports_knn_metrics() {
    let t = trained();
    for k in ["5", "20"] {
        let v = metric_value(&t.metrics, &format!("odcd_eval_knn_top1{{k=\"{k}\"}}"))
            .unwrap_or_else(|| panic!("no k = {k} series in:\n{}", t.metrics));
        // 10 classes: chance is ~10%; even barely trained ResNet features do far better.
        assert!((0.3..=1.0).contains(&v), "k-NN@{k} top-1 = {v}");
    }
    // The guard: the same k-NN without training, beside the trained figure.
    for baseline in ["untrained", "raw_pixels"] {
        for k in ["5", "20"] {
            let name = format!("odcd_eval_baseline_knn_top1{{baseline=\"{baseline}\",k=\"{k}\"}}");
            let v = metric_value(&t.metrics, &name)
                .unwrap_or_else(|| panic!("no {name} in:\n{}", t.metrics));
            assert!((0.3..=1.0).contains(&v), "{name} = {v}");
        }
    }
    let below = metric_value(&t.metrics, "odcd_eval_below_untrained");
    assert!(
        matches!(below, Some(b) if b == 0.0 || b == 1.0),
        "{below:?}"
    );
    assert!(metric_value(&t.metrics, "odcd_eval_last_step").unwrap_or(0.0) >= 2.0);
    assert!(metric_value(&t.metrics, "odcd_eval_seconds").unwrap_or(0.0) > 0.0);
    assert_eq!(
        metric_value(&t.metrics, "odcd_eval_failures_total"),
        Some(0.0)
    );
}

#[test]
fn eval_scores_checkpoint_memory_and_baselines() {
    let t = trained();
    let out = Command::new(odcd_bin())
        .args(["eval", "--checkpoint"])
        .arg(&t.ckpt)
        .arg("--train")
        .arg(&t.train)
        .arg("--test")
        .arg(&t.test)
        .args([
            "--k",
            "5",
            "--k",
            "20",
            "--probe-epochs",
            "20",
            "--baseline-pixels",
            "--baseline-random",
            "--json",
        ])
        .output()
        .expect("run odcd eval");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "odcd eval failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(r["train_samples"], 150, "{r}");
    assert_eq!(r["test_samples"], 50, "{r}");
    assert_eq!(r["feature"], "backbone");
    let methods: Vec<&str> = r["methods"]
        .as_array()
        .expect("methods")
        .iter()
        .map(|m| m["method"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        methods,
        [
            "odc",
            "raw_pixels",
            "random_init",
            "random_init_bn_calibrated"
        ]
    );
    for m in r["methods"].as_array().expect("methods") {
        let knn = m["knn"].as_array().expect("knn");
        assert_eq!(knn.len(), 2);
        for (kv, want_k) in knn.iter().zip([5, 20]) {
            assert_eq!(kv["k"], want_k);
            let top1 = kv["top1"].as_f64().expect("top1");
            assert!((0.0..=1.0).contains(&top1), "{m}");
        }
        let probe = m["probe"]["test_top1"].as_f64().expect("probe");
        assert!((0.0..=1.0).contains(&probe), "{m}");
    }
    // Raw pixels on Fashion-MNIST are a strong baseline (~85% with 60k train images); with
    // 150 train images k-NN still lands far above the 10% chance level, and so does the probe.
    let pixels = &r["methods"][1];
    assert_eq!(pixels["dim"], 32 * 32);
    assert!(
        pixels["knn"][0]["top1"].as_f64().unwrap_or(0.0) > 0.4,
        "{pixels}"
    );
    assert!(
        pixels["probe"]["train_top1"].as_f64().unwrap_or(0.0) > 0.9,
        "a linear probe fits 150 images of 1024 pixels: {pixels}"
    );
    assert_eq!(r["methods"][0]["dim"], 512, "ResNet-18 backbone features");
    // Every memory key was trained from the train shards, so each has a true label.
    let mem = &r["memory"];
    assert!(mem["entries"].as_u64().unwrap_or(0) >= 48, "{mem}");
    assert_eq!(mem["labelled"], mem["entries"], "{mem}");
    let nmi = mem["agreement"]["nmi"].as_f64().expect("nmi");
    let purity = mem["agreement"]["purity"].as_f64().expect("purity");
    assert!(
        (0.0..=1.0).contains(&nmi) && (0.1..=1.0).contains(&purity),
        "{mem}"
    );
    assert!(mem["agreement"]["ari"].as_f64().is_some());
    assert_eq!(mem["clusters"]["k"], 4);
    assert_eq!(
        mem["clusters"]["samples"], mem["entries"],
        "cluster sizes cover the memory: {mem}"
    );

    // The human-readable form names every method and the memory agreement.
    let out = Command::new(odcd_bin())
        .args(["eval", "--checkpoint"])
        .arg(&t.ckpt)
        .arg("--train")
        .arg(&t.train)
        .arg("--test")
        .arg(&t.test)
        .args(["--k", "5", "--probe-epochs", "0", "--baseline-pixels"])
        .output()
        .expect("run odcd eval");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["k-NN@5", "odc", "raw_pixels", "NMI", "ARI", "purity"] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
}

#[test]
fn eval_names_unlabelled_shards() {
    let t = trained();
    // Shards without .cls labels: make one from the test split without its label members.
    let dir = t.root.join("unlabelled");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let data = std::fs::read(t.test.join("part-000000.tar")).expect("test tar");
    let mut shard = Shard::new();
    for (name, bytes) in members(&data) {
        if !name.ends_with(".cls") {
            shard.member(&name, &bytes);
        }
    }
    shard.write(&dir.join("part-000000.tar"));
    let out = Command::new(odcd_bin())
        .args(["eval", "--checkpoint"])
        .arg(&t.ckpt)
        .arg("--train")
        .arg(&t.train)
        .arg("--test")
        .arg(&dir)
        .args(["--probe-epochs", "0"])
        .output()
        .expect("run odcd eval");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no `.cls` label") && stderr.contains("unlabelled"),
        "{stderr}"
    );
}

#[test]
fn report_renders_offline_in_headless_chromium() {
    let t = trained();
    let out_dir = t.root.join("report");
    let out = Command::new(odcd_bin())
        .args(["report", "--checkpoint"])
        .arg(&t.ckpt)
        .arg("--out")
        .arg(&out_dir)
        .args(["--clusters", "4", "--per-cluster", "8"])
        .output()
        .expect("run odcd report");
    assert!(
        out.status.success(),
        "odcd report failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = out_dir.join("index.html");
    let html = std::fs::read_to_string(&page).expect("index.html");
    // History came back from the checkpoint: loss curve and the in-daemon k-NN curve.
    assert!(!html.contains("no data in this checkpoint"), "empty plots");
    assert!(html.matches("<polyline").count() >= 5, "curves missing");
    // The untrained network and raw pixels as lines in the k-NN plot.
    for line in ["untrained k = 5", "raw pixels k = 20"] {
        assert!(html.contains(line), "no `{line}` series in the k-NN plot");
    }
    for remote in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(
            !html.contains(remote),
            "the page loads a remote resource ({remote})"
        );
    }
    let n_img = html.matches("<img ").count();
    assert!(n_img >= 8, "mosaics hold {n_img} images");

    let chromium = which("chromium").unwrap_or_else(|| {
        panic!("`chromium` is not installed: run scripts/setup.sh (installs the Debian package chromium)")
    });
    let profile = t.root.join("chromium-profile");
    let url = format!("file://{}", page.display());
    let common_args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--virtual-time-budget=10000",
    ];
    let dom = Command::new(&chromium)
        .args(common_args)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium --dump-dom");
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom_text.contains(&format!("data-images-loaded=\"{n_img}\""))
            && dom_text.contains(&format!("data-images-total=\"{n_img}\"")),
        "not every image loaded in Chromium (want {n_img}); stderr:\n{}\nDOM head:\n{}",
        String::from_utf8_lossy(&dom.stderr),
        &dom_text[..dom_text.len().min(2000)]
    );
    assert!(
        dom_text.contains("<title>READY "),
        "page did not mark itself ready"
    );

    let shot = t.root.join("report.png");
    let s = Command::new(&chromium)
        .args(common_args)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,2000")
        .arg(&url)
        .output()
        .expect("run chromium --screenshot");
    let img = image::open(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); chromium said:\n{}",
            shot.display(),
            String::from_utf8_lossy(&s.stderr)
        )
    });
    let rgb = img.to_rgb8();
    assert_eq!(rgb.dimensions(), (1280, 2000));
    let first = *rgb.get_pixel(0, 0);
    let differing = rgb.pixels().filter(|p| **p != first).count();
    // Text, plots and mosaics cover far more than 1% of the page.
    assert!(
        differing > (1280 * 2000) / 100,
        "screenshot is blank ({differing} non-background pixels)"
    );
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}
