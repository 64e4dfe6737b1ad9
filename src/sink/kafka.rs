//! Embeddings to a Kafka topic.
//!
//! Embeddings topic: key = sample key (`odcd embed`: sample key + `@` + model version), value
//! in a versioned encoding (docs/embeddings.md):
//!
//! | offset | size  | type      | field                                              |
//! |--------|-------|-----------|----------------------------------------------------|
//! | 0      | 4     | bytes     | magic `ODCE`                                       |
//! | 4      | 2     | u16 LE    | format version (1)                                 |
//! | 6      | 2     | u16 LE    | flags: bit 0 cluster present, bit 1 class present  |
//! | 8      | 8     | u64 LE    | model step                                         |
//! | 16     | 4     | u32 LE    | cluster label (0 when absent)                      |
//! | 20     | 4     | u32 LE    | D, the embedding dimension                         |
//! | 24     | 8     | i64 LE    | class label (0 when absent)                        |
//! | 32     | 4 × D | f32 LE    | the L2-normalised embedding                        |
//!
//! or JSON (`encoding = "json"`): `{"v":1,"key":..,"step":..,"model_version":..,"cluster":..,
//! "class_label":..,"embedding":[..]}`. Every record carries the headers `content_type`
//! (`application/x-odcd-embedding` or `application/json`) and `model_version`.
//!
//! The producer is idempotent (`enable.idempotence`); at most `max_in_flight` records wait for
//! their delivery report, beyond that a write waits (backpressure, bounded memory). A failed
//! delivery is re-sent up to `delivery_retries` times, then counted and dropped, or, for
//! `odcd run` ([`KafkaSink::resend_forever`]), re-sent after growing pauses until delivered.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::Message;
use serde::{Deserialize, Serialize};

use super::{EmbeddingBatch, SinkError};
use crate::kafka::{check_producer, producer_config};
use crate::validate::FieldError;

/// Magic bytes of the binary embedding value.
pub const MAGIC: &[u8; 4] = b"ODCE";
/// Version of the binary (and JSON) embedding value.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the f32 values.
pub const HEADER_BYTES: usize = 32;
/// `content_type` header of binary values.
pub const CONTENT_TYPE_BINARY: &str = "application/x-odcd-embedding";

/// Value encoding of the embeddings topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The compact binary layout (32-byte header + D little-endian f32).
    #[default]
    Binary,
    /// JSON, for humans and quick scripts.
    Json,
}

/// `[embeddings.kafka]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    pub topic: String,
    /// `binary` (default) or `json`.
    #[serde(default)]
    pub encoding: Encoding,
    /// librdkafka properties passed through (TLS / SASL, `linger.ms`, `compression.type`, ...).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// librdkafka properties from environment variables: property = variable name.
    #[serde(default)]
    pub options_env: BTreeMap<String, String>,
    /// Records waiting for their delivery report before a write waits (backpressure bound).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Re-sends of a record whose delivery failed, before it is counted and dropped.
    #[serde(default = "default_delivery_retries")]
    pub delivery_retries: u32,
    /// `odcd embed` from a Kafka source: each batch is one transaction (embeddings +
    /// input offsets). Needs a broker with full transaction support (Apache Kafka).
    #[serde(default)]
    pub exactly_once: bool,
    /// `transactional.id` with `exactly_once`; unique per process. Default
    /// `odcd-embed-<hostname>-<pid>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
}

fn default_max_in_flight() -> usize {
    10_000
}
fn default_delivery_retries() -> u32 {
    3
}

impl KafkaSinkConfig {
    pub fn new(brokers: &str, topic: &str) -> Self {
        KafkaSinkConfig {
            brokers: brokers.into(),
            topic: topic.into(),
            encoding: Encoding::Binary,
            options: BTreeMap::new(),
            options_env: BTreeMap::new(),
            max_in_flight: default_max_in_flight(),
            delivery_retries: default_delivery_retries(),
            exactly_once: false,
            transactional_id: None,
        }
    }

    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if self.max_in_flight == 0 {
            return Err(FieldError::new(
                format!("{field}.max_in_flight"),
                "must be > 0",
            ));
        }
        if self.options.contains_key("transactional.id") {
            return Err(FieldError::new(
                format!("{field}.options"),
                "set `transactional_id` (with exactly_once = true) instead of options.\"transactional.id\"",
            ));
        }
        check_producer(
            field,
            &self.brokers,
            &self.topic,
            &self.options,
            &self.options_env,
        )
    }
}

/// One decoded embedding value (binary or JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingValue {
    pub step: u64,
    pub cluster: Option<u32>,
    pub class_label: Option<i64>,
    pub embedding: Vec<f32>,
}

/// The binary value of one embedding.
pub fn encode_binary(
    step: u64,
    cluster: Option<u32>,
    class_label: Option<i64>,
    emb: &[f32],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_BYTES + 4 * emb.len());
    encode_binary_into(&mut v, step, cluster, class_label, emb);
    v
}

/// [`encode_binary`] into `v` (cleared first), so a sink reuses one buffer for every record.
pub fn encode_binary_into(
    v: &mut Vec<u8>,
    step: u64,
    cluster: Option<u32>,
    class_label: Option<i64>,
    emb: &[f32],
) {
    v.clear();
    v.reserve(HEADER_BYTES + 4 * emb.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let flags = u16::from(cluster.is_some()) | (u16::from(class_label.is_some()) << 1);
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&step.to_le_bytes());
    v.extend_from_slice(&cluster.unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&(emb.len() as u32).to_le_bytes());
    v.extend_from_slice(&class_label.unwrap_or(0).to_le_bytes());
    // Sized once and filled in place: a per-value extend checks the capacity every time and
    // does not vectorise.
    let start = v.len();
    v.resize(start + 4 * emb.len(), 0);
    for (out, x) in v[start..].chunks_exact_mut(4).zip(emb) {
        out.copy_from_slice(&x.to_le_bytes());
    }
}

/// Parse a binary value; errors say what is wrong.
pub fn decode_binary(b: &[u8]) -> Result<EmbeddingValue, String> {
    if b.len() < HEADER_BYTES || &b[0..4] != MAGIC {
        return Err(format!(
            "not an odcd embedding: {} bytes, magic {:?}",
            b.len(),
            b.get(0..4)
        ));
    }
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let version = u16_at(4);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}; this reader knows {FORMAT_VERSION}"
        ));
    }
    let flags = u16_at(6);
    let d = u32_at(20) as usize;
    if b.len() != HEADER_BYTES + 4 * d {
        return Err(format!(
            "D = {d} needs {} bytes, got {}",
            HEADER_BYTES + 4 * d,
            b.len()
        ));
    }
    let embedding = b[HEADER_BYTES..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(EmbeddingValue {
        step: u64_at(8),
        cluster: (flags & 1 != 0).then(|| u32_at(16)),
        class_label: (flags & 2 != 0).then(|| u64_at(24) as i64),
        embedding,
    })
}

/// The JSON value of one embedding.
pub fn encode_json(
    key: &str,
    model_version: &str,
    v: &EmbeddingValue,
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&serde_json::json!({
        "v": FORMAT_VERSION,
        "key": key,
        "step": v.step,
        "model_version": model_version,
        "cluster": v.cluster,
        "class_label": v.class_label,
        "embedding": v.embedding,
    }))
}

/// Counters of one Kafka sink (`odcd_sink_records_total{sink="kafka"}` etc. are fed from them).
#[derive(Debug, Default)]
pub struct KafkaSinkCounters {
    pub delivered: std::sync::atomic::AtomicU64,
    pub retried: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
}

struct InFlight {
    fut: DeliveryFuture,
    attempts: u32,
    /// Which producer sent it (see [`KafkaSink::replace_if_fatal`]).
    producer: u64,
}

/// Embeddings to a topic through an idempotent (optionally transactional) producer.
pub struct KafkaSink {
    producer: FutureProducer,
    /// Producers replaced after a fatal error, kept until their delivery reports are in.
    retired: Vec<FutureProducer>,
    /// Producers started so far, minus one.
    generation: u64,
    cfg: KafkaSinkConfig,
    /// Key = sample key + `@` + model version (`odcd embed`) instead of the sample key.
    versioned_keys: bool,
    transactional: bool,
    inflight: VecDeque<InFlight>,
    counters: std::sync::Arc<KafkaSinkCounters>,
    /// Past `delivery_retries`, keep re-sending a failed record (with a growing pause) instead
    /// of dropping it: `odcd run`, whose checkpoints must not move past an undelivered row.
    resend_forever: bool,
}

impl KafkaSink {
    /// Connect (lazily: librdkafka connects on first use). With `transactional` (exactly-once
    /// `odcd embed`) the producer gets a `transactional.id`; call
    /// [`KafkaSink::init_transactions`] before the first batch.
    pub fn open(
        cfg: &KafkaSinkConfig,
        versioned_keys: bool,
        transactional: bool,
    ) -> Result<Self, SinkError> {
        cfg.validate("embeddings.kafka")?;
        let producer = Self::producer(cfg, transactional)?;
        Ok(KafkaSink {
            producer,
            retired: Vec::new(),
            generation: 0,
            cfg: cfg.clone(),
            versioned_keys,
            transactional,
            inflight: VecDeque::new(),
            counters: Default::default(),
            resend_forever: false,
        })
    }

    fn producer(cfg: &KafkaSinkConfig, transactional: bool) -> Result<FutureProducer, SinkError> {
        let mut cc = producer_config(
            &cfg.brokers,
            &cfg.options,
            &cfg.options_env,
            "embeddings.kafka.options_env",
        )?;
        if transactional {
            let id = cfg.transactional_id.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "host".into());
                format!("odcd-embed-{host}-{}", std::process::id())
            });
            cc.set("transactional.id", id);
        }
        cc.create().map_err(|e| {
            SinkError::Config(FieldError::new(
                "embeddings.kafka.options",
                format!("librdkafka refused the producer config: {e}"),
            ))
        })
    }

    /// Never drop a record whose delivery failed: after `delivery_retries` quick re-sends it is
    /// re-sent after a pause of 100 ms doubling to 5 s, for as long as it takes (the in-flight
    /// bound then holds the writer back). Not for transactional sinks, which abort instead.
    pub fn resend_forever(&mut self, on: bool) {
        self.resend_forever = on && !self.transactional;
    }

    /// Register the transactional id with the broker (fences older producers with it).
    pub async fn init_transactions(&self) -> Result<(), SinkError> {
        let p = self.producer.clone();
        blocking(&self.cfg.topic, move || {
            p.init_transactions(Duration::from_secs(30))
        })
        .await
    }

    pub fn counters(&self) -> std::sync::Arc<KafkaSinkCounters> {
        self.counters.clone()
    }

    pub fn topic(&self) -> &str {
        &self.cfg.topic
    }

    /// Encode and enqueue every row of `b`; waits only while `max_in_flight` records are
    /// unconfirmed or librdkafka's queue is full.
    pub async fn write(&mut self, b: &EmbeddingBatch) -> Result<(), SinkError> {
        let d = b.dim;
        if b.embeddings.len() != b.len() * d {
            return Err(SinkError::BadBatch(format!(
                "{} keys × D = {d} but {} values",
                b.len(),
                b.embeddings.len()
            )));
        }
        // One value and one key buffer for the batch (librdkafka copies both on enqueue).
        let mut payload = Vec::new();
        let mut versioned = String::new();
        for (i, key) in b.keys.iter().enumerate() {
            let cluster = b.clusters.get(i).copied().flatten();
            let class_label = b.class_labels.get(i).copied().flatten();
            let emb = &b.embeddings[i * d..(i + 1) * d];
            let ct = match self.cfg.encoding {
                Encoding::Binary => {
                    encode_binary_into(&mut payload, b.step, cluster, class_label, emb);
                    CONTENT_TYPE_BINARY
                }
                Encoding::Json => {
                    let v = EmbeddingValue {
                        step: b.step,
                        cluster,
                        class_label,
                        embedding: emb.to_vec(),
                    };
                    payload = encode_json(key, &b.model_version, &v)
                        .map_err(|e| SinkError::BadBatch(e.to_string()))?;
                    "application/json"
                }
            };
            let key = if self.versioned_keys {
                versioned.clear();
                versioned.push_str(key);
                versioned.push('@');
                versioned.push_str(&b.model_version);
                versioned.as_str()
            } else {
                key.as_str()
            };
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "content_type",
                    value: Some(ct),
                })
                .insert(Header {
                    key: "model_version",
                    value: Some(b.model_version.as_str()),
                });
            self.send(key.as_bytes(), &payload, headers, 0).await?;
        }
        self.reap().await
    }

    /// Enqueue one record, waiting on deliveries while the bound or librdkafka's queue is full.
    async fn send(
        &mut self,
        key: &[u8],
        payload: &[u8],
        headers: OwnedHeaders,
        attempts: u32,
    ) -> Result<(), SinkError> {
        while self.inflight.len() >= self.cfg.max_in_flight {
            self.settle_front().await?;
        }
        let mut headers = Some(headers);
        loop {
            let rec = FutureRecord::to(&self.cfg.topic)
                .key(key)
                .payload(payload)
                .headers(headers.take().unwrap_or_default());
            match self.producer.send_result(rec) {
                Ok(fut) => {
                    self.inflight.push_back(InFlight {
                        fut,
                        attempts,
                        producer: self.generation,
                    });
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    headers = rec.headers;
                    if !self.inflight.is_empty() {
                        self.settle_front().await?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                // A producer that hit a fatal error refuses every record: start a new one.
                Err((e, rec))
                    if self.resend_forever && self.producer.client().fatal_error().is_some() =>
                {
                    headers = rec.headers;
                    self.replace_if_fatal(&e, self.generation)?;
                }
                Err((e, _)) => {
                    return Err(kerr(
                        &self.cfg.topic,
                        format!("cannot enqueue a record: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Settle the deliveries already confirmed, without waiting (once per batch: polling a
    /// delivery future touches state the producer's thread writes, which per record cost more
    /// than the send itself).
    async fn reap(&mut self) -> Result<(), SinkError> {
        if self.inflight.is_empty() {
            self.retired.clear();
        }
        while let Some(front) = self.inflight.front_mut() {
            match (&mut front.fut).now_or_never() {
                None => break,
                Some(res) => {
                    let (attempts, producer) = (front.attempts, front.producer);
                    self.inflight.pop_front();
                    self.settled(res, attempts, producer).await?;
                }
            }
        }
        Ok(())
    }

    /// An idempotent producer that hit a fatal error (e.g. fenced by the broker after its
    /// records timed out during an outage) fails every send for good: re-sending on it would
    /// hold the checkpoint barrier for ever. Start a new producer (a new producer id) instead;
    /// the old one is kept until its outstanding reports have come back.
    /// `producer`: the generation that sent the failed record (one replacement per producer).
    fn replace_if_fatal(&mut self, e: &KafkaError, producer: u64) -> Result<(), SinkError> {
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::Fatal
            )
        );
        if producer != self.generation
            || !(fenced || self.producer.client().fatal_error().is_some())
        {
            return Ok(());
        }
        tracing::warn!(
            topic = %self.cfg.topic,
            "kafka sink: the producer cannot send any more ({e}); starting a new one"
        );
        self.generation += 1;
        let fresh = Self::producer(&self.cfg, self.transactional)?;
        self.retired
            .push(std::mem::replace(&mut self.producer, fresh));
        Ok(())
    }

    /// Wait for the oldest delivery report.
    async fn settle_front(&mut self) -> Result<(), SinkError> {
        let Some(f) = self.inflight.pop_front() else {
            return Ok(());
        };
        let res = f.fut.await;
        self.settled(res, f.attempts, f.producer).await
    }

    async fn settled(
        &mut self,
        res: Result<
            rdkafka::producer::future_producer::OwnedDeliveryResult,
            futures::channel::oneshot::Canceled,
        >,
        attempts: u32,
        producer: u64,
    ) -> Result<(), SinkError> {
        use std::sync::atomic::Ordering::Relaxed;
        match res {
            Ok(Ok(_)) => {
                self.counters.delivered.fetch_add(1, Relaxed);
                Ok(())
            }
            Ok(Err((e, msg))) => {
                let beyond = attempts.saturating_sub(self.cfg.delivery_retries);
                if self.resend_forever && attempts >= self.cfg.delivery_retries {
                    self.counters.retried.fetch_add(1, Relaxed);
                    let pause = Duration::from_millis(100)
                        .saturating_mul(1u32 << beyond.min(6))
                        .min(Duration::from_secs(5));
                    tracing::warn!(
                        topic = %self.cfg.topic,
                        attempt = attempts + 1,
                        pause_ms = pause.as_millis() as u64,
                        "kafka sink: delivery failed ({e}); re-sending after a pause (nothing is dropped)"
                    );
                    tokio::time::sleep(pause).await;
                    self.replace_if_fatal(&e, producer)?;
                    let (key, payload, headers) = parts(&msg);
                    Box::pin(self.send(&key, &payload, headers, attempts.saturating_add(1))).await
                } else if attempts < self.cfg.delivery_retries && !self.transactional {
                    self.counters.retried.fetch_add(1, Relaxed);
                    tracing::warn!(
                        topic = %self.cfg.topic,
                        attempt = attempts + 1,
                        "kafka sink: delivery failed ({e}); re-sending"
                    );
                    let (key, payload, headers) = parts(&msg);
                    Box::pin(self.send(&key, &payload, headers, attempts + 1)).await
                } else {
                    self.counters.failed.fetch_add(1, Relaxed);
                    tracing::error!(
                        topic = %self.cfg.topic,
                        key = %String::from_utf8_lossy(msg.key().unwrap_or_default()),
                        "kafka sink: delivery failed after {attempts} re-sends, record dropped: {e}"
                    );
                    Ok(())
                }
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Relaxed);
                Err(kerr(&self.cfg.topic, "the producer went away".into()))
            }
        }
    }

    /// Wait for every delivery report (re-sending failures); returns how many records failed
    /// for good since the sink was opened.
    pub async fn flush(&mut self) -> Result<u64, SinkError> {
        while !self.inflight.is_empty() {
            self.settle_front().await?;
        }
        Ok(self
            .counters
            .failed
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Exactly-once batch: one transaction holding the batch's embeddings and the input offsets
    /// (`send_offsets_to_transaction` with the consumer's group metadata), then commit. On any
    /// error the transaction is aborted and the error returned (nothing of the batch is
    /// visible to read_committed readers, and the input offsets are not committed).
    pub async fn write_transaction(
        &mut self,
        b: &EmbeddingBatch,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), SinkError> {
        let topic = self.cfg.topic.clone();
        let p = self.producer.clone();
        blocking(&topic, move || p.begin_transaction()).await?;
        let res = async {
            self.write(b).await?;
            self.flush().await?;
            let p = self.producer.clone();
            blocking(&topic, move || {
                p.send_offsets_to_transaction(&offsets, &group, Duration::from_secs(30))?;
                p.commit_transaction(Duration::from_secs(30))
            })
            .await
        }
        .await;
        if let Err(e) = &res {
            tracing::error!(topic = %topic, "kafka sink: transaction failed, aborting: {e}");
            let p = self.producer.clone();
            let _ = blocking(&topic, move || p.abort_transaction(Duration::from_secs(30))).await;
        }
        res
    }

    /// Flush and wait for librdkafka's own queue.
    pub async fn close(mut self) -> Result<(), SinkError> {
        self.flush().await?;
        let p = self.producer.clone();
        let topic = self.cfg.topic.clone();
        blocking(&topic, move || p.flush(Duration::from_secs(30))).await
    }
}

fn kerr(topic: &str, message: String) -> SinkError {
    SinkError::Kafka {
        topic: topic.into(),
        message,
    }
}

async fn blocking(
    topic: &str,
    f: impl FnOnce() -> Result<(), KafkaError> + Send + 'static,
) -> Result<(), SinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| kerr(topic, e.to_string()))?
        .map_err(|e| kerr(topic, e.to_string()))
}

/// Key, payload and headers of a failed record, to re-send it.
fn parts(m: &OwnedMessage) -> (Vec<u8>, Vec<u8>, OwnedHeaders) {
    let mut h = OwnedHeaders::new();
    if let Some(hs) = m.headers() {
        for i in 0..hs.count() {
            let x = hs.get(i);
            h = h.insert(Header {
                key: x.key,
                value: x.value,
            });
        }
    }
    (
        m.key().unwrap_or_default().to_vec(),
        m.payload().unwrap_or_default().to_vec(),
        h,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer that hit a fatal error (what an idempotent producer gets when the broker
    /// fences it after an outage) fails every send for good; the sink of `odcd run` replaces
    /// it and delivers every record instead of re-sending on it for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fatal_producer_error_is_ridden_out_with_a_new_producer() {
        let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        mock.create_topic("out", 1, 1).expect("topic");
        let mut cfg = KafkaSinkConfig::new(&mock.bootstrap_servers(), "out");
        cfg.delivery_retries = 0;
        let mut sink = KafkaSink::open(&cfg, false, false).expect("sink");
        sink.resend_forever(true);
        let reason = std::ffi::CString::new("fenced by the test").expect("reason");
        // SAFETY: the client pointer is valid while `sink` lives, and `reason` outlives the
        // call; librdkafka copies it.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                sink.producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                reason.as_ptr(),
            );
        }
        assert!(sink.producer.client().fatal_error().is_some());
        let batch = EmbeddingBatch {
            keys: vec!["a".into(), "b".into()],
            step: 1,
            model_version: "step-000000000001".into(),
            clusters: vec![Some(0), Some(1)],
            class_labels: vec![None, None],
            dim: 2,
            embeddings: vec![1.0, 0.0, 0.0, 1.0],
        };
        let delivered = tokio::time::timeout(Duration::from_secs(30), async {
            sink.write(&batch).await?;
            sink.flush().await
        })
        .await
        .expect("delivered within 30 s, not re-sent on the dead producer for ever")
        .expect("flush");
        assert_eq!(delivered, 0, "nothing failed for good");
        let c = sink.counters();
        assert_eq!(c.delivered.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert!(sink.producer.client().fatal_error().is_none());
    }

    #[test]
    fn binary_value_follows_the_documented_layout() {
        let v = encode_binary(1234, Some(7), Some(-3), &[1.0, -0.5, 0.25]);
        assert_eq!(v.len(), 32 + 12);
        assert_eq!(&v[0..4], b"ODCE");
        assert_eq!(u16::from_le_bytes([v[4], v[5]]), 1);
        assert_eq!(u16::from_le_bytes([v[6], v[7]]), 0b11);
        assert_eq!(u64::from_le_bytes(v[8..16].try_into().unwrap()), 1234);
        assert_eq!(u32::from_le_bytes(v[16..20].try_into().unwrap()), 7);
        assert_eq!(u32::from_le_bytes(v[20..24].try_into().unwrap()), 3);
        assert_eq!(i64::from_le_bytes(v[24..32].try_into().unwrap()), -3);
        assert_eq!(f32::from_le_bytes(v[36..40].try_into().unwrap()), -0.5);
        let back = decode_binary(&v).unwrap();
        assert_eq!(back.embedding, [1.0, -0.5, 0.25]);
        assert_eq!(
            (back.step, back.cluster, back.class_label),
            (1234, Some(7), Some(-3))
        );
        let none = decode_binary(&encode_binary(1, None, None, &[0.0])).unwrap();
        assert_eq!((none.cluster, none.class_label), (None, None));
        assert!(decode_binary(&v[..40]).is_err());
        assert!(decode_binary(b"nope").is_err());
    }

    #[test]
    fn json_value_carries_the_same_fields() {
        let v = EmbeddingValue {
            step: 5,
            cluster: None,
            class_label: Some(2),
            embedding: vec![0.5, 0.5],
        };
        let j: serde_json::Value =
            serde_json::from_slice(&encode_json("k1", "step-000000000005", &v).unwrap()).unwrap();
        assert_eq!(j["v"], 1);
        assert_eq!(j["key"], "k1");
        assert_eq!(j["step"], 5);
        assert!(j["cluster"].is_null());
        assert_eq!(j["class_label"], 2);
        assert_eq!(j["embedding"][1], 0.5);
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = KafkaSinkConfig::new("h:1", "");
        let e = c.validate("embeddings.kafka").err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("embeddings.kafka.topic")));
        c.topic = "t".into();
        c.max_in_flight = 0;
        let e = c.validate("embeddings.kafka").err().map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("embeddings.kafka.max_in_flight")));
    }

    /// `rdkafka::mocking` (librdkafka's mock cluster) implements transactions far enough to
    /// show the commit path: init, begin, produce, send_offsets_to_transaction and commit all
    /// succeed for a consumer that joined its group, and the batch's records become readable
    /// to a read_committed reader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transactional_batch_delivers_records_and_offsets_on_the_mock_cluster() {
        use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
        use rdkafka::topic_partition_list::Offset;
        use rdkafka::ClientConfig;
        let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        mock.create_topic("in", 1, 1).expect("topic in");
        mock.create_topic("out", 1, 1).expect("topic out");
        let brokers = mock.bootstrap_servers();
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "embedders")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        // Join the group for real (a generation id), with one input record to read.
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("producer");
        p.send(
            FutureRecord::to("in").key("x").payload("y"),
            Duration::from_secs(10),
        )
        .await
        .expect("input record");
        consumer.subscribe(&["in"]).expect("subscribe");
        tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("joined the group and read the input")
            .expect("input record");
        let group = consumer.group_metadata().expect("group metadata");

        let mut cfg = KafkaSinkConfig::new(&brokers, "out");
        cfg.exactly_once = true;
        cfg.transactional_id = Some("odcd-embed-test".into());
        let mut sink = KafkaSink::open(&cfg, true, true).expect("sink");
        sink.init_transactions().await.expect("init_transactions");
        let batch = EmbeddingBatch {
            keys: vec!["a".into(), "b".into()],
            step: 3,
            model_version: "step-000000000003".into(),
            clusters: vec![Some(1), None],
            class_labels: vec![None, Some(4)],
            dim: 2,
            embeddings: vec![1.0, 0.0, 0.0, 1.0],
        };
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset("in", 0, Offset::Offset(7))
            .expect("offset");
        sink.write_transaction(&batch, offsets, group)
            .await
            .expect("transaction commits");

        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "reader")
            .set("isolation.level", "read_committed")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("out", 0, rdkafka::Offset::Beginning)
            .expect("partition");
        reader.assign(&tpl).expect("assign");
        let mut got = Vec::new();
        let t0 = std::time::Instant::now();
        while got.len() < 2 && t0.elapsed() < Duration::from_secs(20) {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
                let v = decode_binary(m.payload().unwrap_or_default()).expect("binary value");
                got.push((
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    v,
                ));
            }
        }
        assert_eq!(got.len(), 2, "both committed records are readable");
        assert_eq!(got[0].0, "a@step-000000000003");
        assert_eq!(got[1].1.class_label, Some(4));
        // The offsets half (`send_offsets_to_transaction`) returned Ok above, but the mock
        // cluster does not make transactional offset commits readable (committed() gives
        // Invalid), so it is left to Apache Kafka (the docker stack) to show.
    }
}
