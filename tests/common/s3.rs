//! A real S3-compatible server for the tests: moto_server (`pip install 'moto[server]'`, which
//! `scripts/setup.sh` does) on 127.0.0.1, killed on drop; and [`Forwarder`], a TCP forwarder
//! in front of a server that a test closes (connections refused, open ones cut) and opens
//! again, for outages of an endpoint whose server must keep its state (moto keeps everything
//! in memory and has no persistence option, so a restarted moto comes back empty).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

/// The bucket [`Moto::start`] creates.
pub const BUCKET: &str = "odcd";

/// A moto_server child process on 127.0.0.1:port, killed on drop.
pub struct Moto {
    pub child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto on `port` and creates the bucket [`BUCKET`].
    pub fn start(port: u16) -> Moto {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}): install it with `pip install 'moto[server]'`"
                )
            });
        let m = Moto { child, port };
        let t0 = Instant::now();
        while m.http("PUT", &format!("/{BUCKET}")).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "moto_server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    /// A bare HTTP request (moto does not check signatures); returns the status line.
    pub fn http(&self, method: &str, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.port).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let line = out.lines().next()?.to_string();
        line.contains(" 200").then_some(line)
    }

    /// Creates another bucket.
    pub fn create_bucket(&self, name: &str) {
        assert!(
            self.http("PUT", &format!("/{name}")).is_some(),
            "create bucket {name}"
        );
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store_with_retries(1)
    }

    /// `max_retries = 0` turns off object_store's own retries (including its resumption of
    /// streaming GETs), so the source's retry layer is what gets exercised.
    pub fn store_with_retries(&self, max_retries: usize) -> Arc<dyn ObjectStore> {
        let s = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries,
                retry_timeout: Duration::from_secs(2),
            })
            .build()
            .expect("s3 store for moto");
        Arc::new(s)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The object_store options of a daemon config (`options = { ... }`) that reach an S3 server at
/// `endpoint`.
pub fn s3_options_toml(endpoint: &str) -> String {
    format!(
        "{{ aws_endpoint = \"{endpoint}\", aws_allow_http = \"true\", aws_region = \"us-east-1\", aws_access_key_id = \"test\", aws_secret_access_key = \"test\", aws_virtual_hosted_style_request = \"false\" }}"
    )
}

/// A TCP forwarder on 127.0.0.1 to `target`: [`Forwarder::close`] stops listening (new
/// connections are refused) and cuts the open ones; [`Forwarder::open`] listens again on the
/// same port.
pub struct Forwarder {
    pub port: u16,
    target: u16,
    closed: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(target: u16) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        let port = listener.local_addr().expect("local addr").port();
        let mut f = Forwarder {
            port,
            target,
            closed: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            acceptor: None,
        };
        f.serve(listener);
        f
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (closed, conns, target) = (self.closed.clone(), self.conns.clone(), self.target);
        self.acceptor = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if closed.load(Ordering::SeqCst) {
                    return; // drops the listener: the port refuses connections
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let Ok(mut g) = conns.lock() {
                    g.extend(client.try_clone().ok());
                    g.extend(server.try_clone().ok());
                }
                pump(client, s2);
                pump(server, c2);
            }
        }));
    }

    /// The outage: refuse new connections and cut the open ones.
    pub fn close(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wake the acceptor so it drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        if let Ok(mut g) = self.conns.lock() {
            for s in g.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// The end of the outage: listen on the same port again.
    pub fn open(&mut self) {
        let t0 = Instant::now();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "cannot listen on {} again: {e}",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        self.closed.store(false, Ordering::SeqCst);
        self.serve(listener);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.close();
        }
    }
}

/// Copies `from` to `to` on a thread until either side ends.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}
