//! The shared test kit: the real `odcd` binary, Prometheus and a config here; test data and
//! shards in [`data`]; the Kafka broker in [`kafka`]; the S3 server in [`s3`].
#![allow(dead_code)]

pub mod data;
pub mod kafka;
pub mod s3;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

pub fn odcd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_odcd")
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Minimal HTTP/1.1 GET on 127.0.0.1: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = match text.find("\r\n\r\n") {
        Some(i) => text[i + 4..].to_string(),
        None => String::new(),
    };
    // chunked bodies: good enough to search in, the chunk sizes stay in the text
    Some((status, body))
}

/// Value of an unlabelled (or fully written) series in Prometheus text format.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok()).flatten()
    })
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A daemon config for tests: the committed Fashion-MNIST fixture (200 images), a tiny K,
/// ResNet-18 at 32 px, metrics on `port`.
pub fn test_config(source_url: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
[source]
url = "{source_url}"
mode = {{ loop = {{}} }}
[pipeline]
batch_size = 16
threads = 1
[pipeline.decode]
channels = 1
[pipeline.transform.train]
size = 32
scale = [0.5, 1.0]
mean = [0.286]
std = [0.353]
[model]
arch = "resnet18"
in_channels = 1
neck_hidden = 64
feat_dim = 32
[odc]
num_clusters = 4
memory_capacity = 200
warmup_samples = 48
min_cluster = {{ count = 2 }}
[optimizer]
lr = 0.02
[metrics]
listen = "127.0.0.1:{port}"
[log]
format = "json"
{extra}
"#
    )
}

/// The daemon as a child process; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Waits until `/metrics` on `port` shows `series` ≥ `min` and returns that scrape;
    /// panics with the daemon's log if it exits first.
    pub fn wait_metric(&mut self, port: u16, series: &str, min: f64, timeout: Duration) -> String {
        wait_until(&format!("{series} >= {min}"), timeout, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("daemon exited ({st}); log:\n{}", self.log_text());
            }
            let (_, body) = http_get(port, "/metrics")?;
            (metric_value(&body, series)? >= min).then_some(body)
        })
    }

    /// Panics with the daemon's log if it has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("daemon exited ({st}); log:\n{}", self.log_text());
        }
    }

    pub fn start(config: &Path, log: &Path) -> Daemon {
        let out = std::fs::File::create(log).expect("create log file");
        let child = Command::new(odcd_bin())
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn odcd");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for exit; returns the exit code (None if killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            assert!(
                t0.elapsed() < timeout,
                "daemon did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server (Debian package `prometheus`) on 127.0.0.1 scraping `targets`
/// every second; killed on drop.
pub struct Prometheus {
    child: Child,
    pub port: u16,
}

impl Prometheus {
    pub fn start(dir: &Path, targets: &[u16]) -> Prometheus {
        let port = free_port();
        let cfg = dir.join("prometheus.yml");
        let list = targets
            .iter()
            .map(|p| format!("'127.0.0.1:{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: odcd\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .expect("write prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start prometheus ({e}): install it with `apt-get install -y prometheus` (scripts/setup.sh does)")
            });
        Prometheus { child, port }
    }

    /// GET an API path (already URL-encoded); the body when Prometheus answered 200.
    pub fn api(&self, path_and_query: &str) -> Option<String> {
        match http_get(self.port, path_and_query)? {
            (200, body) => Some(body),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Waits until the daemon on `port` answers `/readyz` with 200 (it trains); panics with its log
/// if it exits first.
pub fn wait_ready(daemon: &mut Daemon, port: u16, timeout: Duration) {
    wait_until("daemon /readyz", timeout, || {
        match http_get(port, "/readyz") {
            Some((200, _)) => Some(()),
            _ => {
                if let Ok(Some(st)) = daemon.child.try_wait() {
                    panic!("daemon exited early ({st}); log:\n{}", daemon.log_text());
                }
                None
            }
        }
    });
}
