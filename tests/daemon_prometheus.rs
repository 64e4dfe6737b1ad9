//! A real Prometheus server (Debian package `prometheus`, started here on 127.0.0.1) scrapes
//! the real daemon; odcd's series must arrive in Prometheus, read back through its HTTP API.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Prometheus(std::process::Child);
impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = dir.path().join("odcd.toml");
    let src = format!("file://{}/", fixtures_dir().display());
    std::fs::write(&cfg, test_config(&src, port, "")).expect("write config");
    let mut daemon = Daemon::start(&cfg, &dir.path().join("odcd.log"));

    let prom_port = free_port();
    let prom_cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: odcd\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start prometheus ({e}): install it with `apt-get install -y prometheus` (scripts/setup.sh does)")
        });
    let _prom = Prometheus(prom);

    // The daemon is ready once it trains: /readyz turns 200.
    wait_until(
        "daemon /readyz",
        Duration::from_secs(180),
        || match http_get(port, "/readyz") {
            Some((200, _)) => Some(()),
            _ => {
                if let Ok(Some(st)) = daemon.child.try_wait() {
                    panic!("daemon exited early ({st}); log:\n{}", daemon.log_text());
                }
                None
            }
        },
    );
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));

    // Prometheus must have scraped steps > 0 and the reject counters, via its query API.
    for (query, min) in [
        ("odcd_train_steps_total", 1.0),
        ("odcd_odc_memory_entries", 48.0),
        ("odcd_records_decoded_total", 48.0),
    ] {
        wait_until(query, Duration::from_secs(120), || {
            let (code, body) = http_get(prom_port, &format!("/api/v1/query?query={query}"))?;
            if code != 200 || !body.contains("\"status\":\"success\"") {
                return None;
            }
            // "value":[<ts>,"<v>"]
            let v = body.split("\"value\":[").nth(1)?;
            let v = v.split('"').nth(1)?.parse::<f64>().ok()?;
            (v >= min).then_some(())
        });
    }
    let (_, series) = http_get(prom_port, "/api/v1/query?query=odcd_records_rejected_total")
        .expect("query rejected series");
    assert!(
        series.contains("undecodable"),
        "reject series missing: {series}"
    );
    daemon.signal("-TERM");
    assert_eq!(
        daemon.wait(Duration::from_secs(60)),
        Some(0),
        "log:\n{}",
        daemon.log_text()
    );
}
