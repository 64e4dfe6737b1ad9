//! The docker/ stack cannot run here (no Docker engine), so this checks what can be checked
//! without one: the compose file parses and wires the services the README promises, the image
//! definition is multi-stage, non-root and health-checked, the stack's odcd config is valid,
//! and every series the Grafana dashboard queries is one a running odcd exports, read back
//! through a real Prometheus that scrapes it.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn compose_file_parses_and_wires_the_stack() {
    // PyYAML comes with moto (scripts/setup.sh installs it).
    let check = r#"
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
s = c["services"]
need = {"kafka", "minio", "minio-init", "odcd", "prometheus", "grafana"}
missing = need - set(s)
assert not missing, f"services missing: {missing}"
assert "controller" in s["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "kafka is not in KRaft mode"
assert s["odcd"]["build"]["dockerfile"] == "docker/Dockerfile"
assert s["odcd"]["command"][-1] == "/etc/odcd/docker.toml"
assert "9898:9898" in s["odcd"]["ports"]
for v in s["grafana"]["volumes"] + s["prometheus"]["volumes"]:
    src = v.split(":")[0]
    import os
    assert os.path.exists(os.path.join(os.path.dirname(sys.argv[1]), src)), f"missing {src}"
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(repo("docker/compose.yml"))
        .output()
        .expect("run python3 (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "compose.yml check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dockerfile = std::fs::read_to_string(repo("docker/Dockerfile")).expect("read Dockerfile");
    let froms = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(froms >= 2, "the Dockerfile must be multi-stage");
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("the runtime stage must set USER");
    assert!(!user.contains("root") && user.trim() != "USER 0", "{user}");
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/healthz"));

    // The config the image runs is valid.
    let out = Command::new(odcd_bin())
        .args(["config", "check"])
        .arg(repo("configs/docker.toml"))
        .output()
        .expect("run odcd config check");
    assert!(
        out.status.success(),
        "configs/docker.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `odcd_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("odcd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn dashboard_queries_only_series_odcd_exports() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("docker/grafana/dashboards/odcd.json"))
            .expect("read dashboard"),
    )
    .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(wanted.len() >= 20, "{wanted:?}");

    // The daemon as the stack runs it, but fed from a Kafka topic (a real Tansu broker) so the
    // Kafka-only series exist too: checkpoints, Parquet and Kafka embeddings, Kafka dead letters.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let k = common::kafka::Tansu::start();
    k.create_topic("images", 2);
    for t in ["embeddings", "dead-letter"] {
        k.create_topic(t, 1);
    }
    k.produce("images", &common::kafka::fixture_records());
    let extra = format!(
        "[checkpoint]\nurl = \"{0}/ckpt/\"\nevery_steps = 2\n[embeddings]\nurl = \"{0}/emb/\"\n[embeddings.kafka]\nbrokers = \"{1}\"\ntopic = \"embeddings\"\n[pipeline.dead_letter.kafka]\nbrokers = \"{1}\"\ntopic = \"dead-letter\"\n",
        dir.path().display(),
        k.brokers
    );
    let cfg = dir.path().join("odcd.toml");
    std::fs::write(
        &cfg,
        common::kafka::kafka_test_config(&k.brokers, "images", "dash", port, &extra),
    )
    .expect("write config");
    let mut daemon = Daemon::start(&cfg, &dir.path().join("odcd.log"));
    let prom = Prometheus::start(dir.path(), &[port]);
    wait_ready(&mut daemon, port, Duration::from_secs(180));

    // Every series the dashboard names has arrived in Prometheus.
    let missing = wait_until_or_last(Duration::from_secs(60), || {
        let body = prom.api("/api/v1/label/__name__/values")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let have: BTreeSet<String> = v["data"]
            .as_array()?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect();
        Some(wanted.difference(&have).cloned().collect::<Vec<_>>())
    });
    assert!(
        missing.is_empty(),
        "the dashboard queries series odcd does not export: {missing:?}"
    );
    // And every panel query is valid PromQL that Prometheus evaluates.
    for e in &exprs {
        let body = prom
            .api(&format!("/api/v1/query?query={}", url_encode(e)))
            .unwrap_or_else(|| panic!("Prometheus rejected the dashboard query {e}"));
        assert!(body.contains("\"status\":\"success\""), "{e}: {body}");
    }
    daemon.signal("-TERM");
    assert_eq!(daemon.wait(Duration::from_secs(60)), Some(0));
}

/// Polls `f` until it returns an empty list or `timeout` passes; returns the last list.
fn wait_until_or_last(
    timeout: Duration,
    mut f: impl FnMut() -> Option<Vec<String>>,
) -> Vec<String> {
    let t0 = std::time::Instant::now();
    let mut last = vec!["(no answer from Prometheus)".to_string()];
    while t0.elapsed() < timeout {
        if let Some(v) = f() {
            if v.is_empty() {
                return v;
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    last
}
