//! A real Prometheus server (Debian package `prometheus`, started here on 127.0.0.1) scrapes
//! the real daemon; odcd's series must arrive in Prometheus, read back through its HTTP API.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn prometheus_scrapes_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = dir.path().join("odcd.toml");
    let src = format!("file://{}/", fixtures_dir().display());
    std::fs::write(&cfg, test_config(&src, port, "")).expect("write config");
    let mut daemon = Daemon::start(&cfg, &dir.path().join("odcd.log"));

    let prom = Prometheus::start(dir.path(), &[port]);
    let prom_port = prom.port;
    wait_ready(&mut daemon, port, Duration::from_secs(180));
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
    // Where the loop's time went: one series per phase, the step's phases above zero.
    let (_, body) = http_get(port, "/metrics").expect("scrape the daemon");
    for phase in [
        "forward",
        "backward",
        "optimizer",
        "memory",
        "step_other",
        "input_wait",
        "publish",
        "other",
    ] {
        let v = metric_value(
            &body,
            &format!("odcd_train_loop_seconds_total{{phase=\"{phase}\"}}"),
        );
        assert!(v.is_some(), "no loop-time series for {phase}:\n{body}");
        if ["forward", "backward"].contains(&phase) {
            assert!(v > Some(0.0), "{phase}: {v:?}");
        }
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
