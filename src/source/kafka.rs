//! Kafka source: one message = one image (key = sample key, optional class-label and
//! content-type headers) or one whole WebDataset tar shard, read by a consumer group.
//!
//! Positions are partition offsets ([`Position::Kafka`]); the consumer of the items keeps them
//! in [`SourceState::kafka`] and stores them in checkpoints. Offsets are committed to Kafka only
//! through [`KafkaHandle::commit`], which the daemon calls once the checkpoint that covers them is
//! durable (and `odcd embed` once the outputs of a batch are delivered), so a restart neither
//! loses nor skips records. On (re)assignment a partition resumes from the position in the
//! checkpoint, else from the committed offset, else from `start`.
//!
//! Each partition's messages are read from its own librdkafka queue by its own task (split off
//! when the partition is first assigned), so polling, the largest cost per message, runs on
//! every core; records of one partition stay in offset order. Those queues are read in batches
//! ([`super::kafka_partition`]: one librdkafka call per burst instead of an event object and
//! an allocation per message).
//!
//! Broker outages are librdkafka's to ride out (it reconnects with backoff); the source reports
//! the connection state ([`KafkaHandle::connected`], shown by `/readyz`) and never ends on an
//! error. Consumer lag per partition is exported as `odcd_source_lag_records{topic,partition}`.

// `SourceItem`'s Err is no larger than its Ok; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, MessageStream,
    StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::kafka_partition::{PartitionQueue, RawMessage};
use super::webdataset::{read_shard, ReadOptions, TransportFault};
use super::{DataMetrics, RejectReason, RejectedRecord, SourceError, SourceItem, SourceState};
use crate::record::{Position, Record};

/// What one Kafka message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// One encoded image (jpg/png/webp); key = sample key.
    #[default]
    Image,
    /// One WebDataset tar shard (plain or gzip), read like an object-store shard.
    Shard,
}

/// Where a partition with neither a checkpointed nor a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

/// `[source]` with `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port...]` (librdkafka `bootstrap.servers`).
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group: processes with the same group share the partitions.
    pub group_id: String,
    /// `image` (one image per message) or `shard` (one tar shard per message).
    #[serde(default)]
    pub message_format: MessageFormat,
    /// Header holding an optional integer class label (evaluation only).
    #[serde(default = "default_label_header")]
    pub label_header: String,
    /// Header holding an optional content type (`image/png`, `image/jpeg`, `image/webp`);
    /// without it the format is sniffed from the bytes.
    #[serde(default = "default_content_type_header")]
    pub content_type_header: String,
    /// `earliest` or `latest`: where a partition with no checkpointed or committed offset starts.
    #[serde(default)]
    pub start: StartFrom,
    /// librdkafka properties passed through (`security.protocol`, `sasl.mechanisms`,
    /// `ssl.ca.location`, `session.timeout.ms`, ...). Never put secrets here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// librdkafka properties read from environment variables: property = variable name,
    /// e.g. `{ "sasl.password" = "ODCD_KAFKA_PASSWORD" }`.
    #[serde(default)]
    pub options_env: BTreeMap<String, String>,
    /// Larger messages (or tar members of a shard message) are rejected as `too_large`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Items buffered between the source and the decoder (backpressure bound).
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// How often the lag and the broker connection state are refreshed (librdkafka statistics).
    #[serde(default = "default_stats_interval_ms")]
    pub stats_interval_ms: u64,
    /// First wait after a consumer error; doubles on each further error up to 30 s.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
}

fn default_label_header() -> String {
    "class_label".into()
}
fn default_content_type_header() -> String {
    "content_type".into()
}
fn default_max_message_bytes() -> u64 {
    32 << 20
}
fn default_channel_capacity() -> usize {
    1024
}
fn default_stats_interval_ms() -> u64 {
    1000
}
fn default_retry_backoff_ms() -> u64 {
    500
}

/// Properties odcd manages itself; setting them in `options` would break the offset contract.
const RESERVED: [&str; 4] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

impl KafkaSourceConfig {
    /// A config with defaults for everything but brokers, topics and group.
    pub fn new(brokers: &str, topics: &[&str], group_id: &str) -> Self {
        KafkaSourceConfig {
            brokers: brokers.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            group_id: group_id.into(),
            message_format: MessageFormat::Image,
            label_header: default_label_header(),
            content_type_header: default_content_type_header(),
            start: StartFrom::Earliest,
            options: BTreeMap::new(),
            options_env: BTreeMap::new(),
            max_message_bytes: default_max_message_bytes(),
            channel_capacity: default_channel_capacity(),
            stats_interval_ms: default_stats_interval_ms(),
            retry_backoff_ms: default_retry_backoff_ms(),
        }
    }

    /// Field checks; errors name the field under `source.`.
    pub fn validate(&self) -> Result<(), SourceError> {
        let bad = |field: &str, message: String| {
            Err(SourceError::KafkaConfig {
                field: format!("source.{field}"),
                message,
            })
        };
        if self.brokers.trim().is_empty() {
            return bad("brokers", "is empty: give host:port[,host:port]".into());
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return bad("topics", "needs at least one non-empty topic name".into());
        }
        if self.group_id.trim().is_empty() {
            return bad("group_id", "is empty: name the consumer group".into());
        }
        if self.channel_capacity == 0 || self.stats_interval_ms == 0 || self.max_message_bytes == 0
        {
            return bad(
                "channel_capacity",
                "channel_capacity, stats_interval_ms and max_message_bytes must be > 0".into(),
            );
        }
        if self
            .options
            .get("partition.assignment.strategy")
            .is_some_and(|s| s.contains("cooperative"))
        {
            return bad(
                "options",
                "partition.assignment.strategy: the cooperative protocol is not supported (odcd assigns eagerly, resuming from checkpoints): use range or roundrobin".into(),
            );
        }
        for k in self.options.keys().chain(self.options_env.keys()) {
            if RESERVED.contains(&k.as_str()) {
                return bad(
                    "options",
                    format!("`{k}` is set by odcd (brokers, group_id, and manual commits after checkpoints): remove it"),
                );
            }
        }
        client_config(
            &self.brokers,
            &self.options,
            &self.options_env,
            "source.options_env",
        )?;
        Ok(())
    }
}

/// A librdkafka client config: brokers, then `options`, then `options_env` (property =
/// environment variable); a missing variable is an error naming `env_field`.
pub fn client_config(
    brokers: &str,
    options: &BTreeMap<String, String>,
    options_env: &BTreeMap<String, String>,
    env_field: &str,
) -> Result<ClientConfig, SourceError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in options {
        c.set(k, v);
    }
    for (k, var) in options_env {
        let v = std::env::var(var).map_err(|_| SourceError::KafkaConfig {
            field: format!("{env_field}.\"{k}\""),
            message: format!("environment variable {var} is not set (or not UTF-8): export it"),
        })?;
        c.set(k, v);
    }
    Ok(c)
}

/// Where the consumer stands on one partition, kept in [`SourceState::kafka`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionMark {
    /// Offset of the last message consumed (fully, for `image` messages).
    pub offset: i64,
    /// Items of that message consumed so far (a `shard` message yields several).
    pub records: u64,
}

impl PartitionMark {
    /// Offset to resume from and items of that message to skip.
    pub fn resume(&self, format: MessageFormat) -> (i64, u64) {
        match format {
            MessageFormat::Image => (self.offset + 1, 0),
            MessageFormat::Shard => (self.offset, self.records),
        }
    }

    /// Offset to commit to Kafka for this mark (the next message to read). For a shard
    /// message, its own offset: a restart without the checkpoint re-reads it (at-least-once).
    pub fn commit_offset(&self, format: MessageFormat) -> i64 {
        match format {
            MessageFormat::Image => self.offset + 1,
            MessageFormat::Shard => self.offset,
        }
    }
}

/// State shared between the consumer's callbacks, the source task and [`KafkaHandle`].
struct Shared {
    format: MessageFormat,
    /// Positions from the checkpoint, used the first time a partition is assigned.
    resume: Mutex<HashMap<(String, i32), PartitionMark>>,
    /// Items of a shard message to skip on resume: (topic, partition) → (offset, items).
    skip: Mutex<HashMap<(String, i32), (i64, u64)>>,
    connected: AtomicBool,
    metrics: DataMetrics,
    /// The consumer, for splitting partition queues in the rebalance callback (weak: the
    /// consumer owns its context, which owns this).
    consumer: OnceLock<Weak<Consumer_>>,
    /// Partitions whose queue was split off (a queue is split once and read for the source's
    /// life: it stays empty while the partition is not assigned).
    split: Mutex<HashSet<(String, i32)>>,
    /// Split queues, to the source task, which starts a reader for each.
    split_tx: mpsc::UnboundedSender<PartitionQueue>,
}

impl Shared {
    /// Gives each partition of `tpl` not seen before its own queue, before it is assigned, so
    /// that none of its messages reach the main queue (where they could interleave with the
    /// partition queue's and break per-partition order).
    fn split_partition_queues(&self, tpl: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(|w| w.upgrade()) else {
            return;
        };
        let mut split = self.split.lock().unwrap_or_else(|p| p.into_inner());
        for el in tpl.elements() {
            let key = (el.topic().to_string(), el.partition());
            if split.contains(&key) {
                continue;
            }
            // None (a topic name with a NUL byte): its messages stay on the main queue.
            if let Some(q) = PartitionQueue::split(&consumer, el.topic(), el.partition(), BURST) {
                if self.split_tx.send(q).is_ok() {
                    split.insert(key);
                }
            }
        }
    }

    fn set_connected(&self, v: bool) {
        let was = self.connected.swap(v, Ordering::Relaxed);
        if was != v {
            if v {
                tracing::info!("kafka source: connected to the brokers");
            } else {
                tracing::warn!("kafka source: lost the brokers; librdkafka keeps retrying");
            }
        }
    }
}

/// Consumer callbacks: assignment from checkpoints, statistics (lag, connection), errors.
struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.shared.set_connected(up);
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || !part.desired {
                    continue;
                }
                let pos = if part.app_offset >= 0 {
                    part.app_offset
                } else {
                    part.committed_offset
                };
                if part.hi_offset < 0 || pos < 0 {
                    continue;
                }
                self.shared
                    .metrics
                    .source_lag
                    .with_label_values(&[topic.as_str(), &p.to_string()])
                    .set((part.hi_offset - pos).max(0));
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let down = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
                | Some(RDKafkaErrorCode::BrokerTransportFailure)
                | Some(RDKafkaErrorCode::OperationTimedOut)
                | Some(RDKafkaErrorCode::RequestTimedOut)
        );
        if down {
            self.shared.set_connected(false);
        }
        tracing::warn!("kafka source: {error}: {reason}");
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.shared.metrics.source_rebalances.inc();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut resume = self.shared.resume.lock().unwrap_or_else(|p| p.into_inner());
                let mut skip = self.shared.skip.lock().unwrap_or_else(|p| p.into_inner());
                let mut assigned = Vec::new();
                for el in tpl.elements() {
                    let key = (el.topic().to_string(), el.partition());
                    // The checkpoint's position wins the first time; later (re)assignments
                    // start from the committed offset, which follows the checkpoints.
                    let from = match resume.remove(&key) {
                        Some(m) => {
                            let (off, n) = m.resume(self.shared.format);
                            if n > 0 {
                                skip.insert(key.clone(), (off, n));
                            }
                            Some(off)
                        }
                        None => None,
                    };
                    assigned.push((key, from));
                }
                for ((topic, p), from) in &assigned {
                    if let Some(off) = from {
                        if let Err(e) = tpl.set_partition_offset(topic, *p, Offset::Offset(*off)) {
                            tracing::error!(
                                "kafka source: cannot resume {topic}/{p} at {off}: {e}"
                            );
                        }
                    }
                }
                tracing::info!(partitions = ?assigned, "kafka source: partitions assigned (offset from the checkpoint, else committed)");
                self.shared.split_partition_queues(tpl);
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!("kafka source: assign failed: {e}");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Items already handed downstream are still trained / embedded; their offsets
                // are committed with the next durable checkpoint while we still own the
                // partition, otherwise the new owner re-reads them (at-least-once).
                let parts: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                tracing::info!(partitions = ?parts, "kafka source: partitions revoked");
                for el in tpl.elements() {
                    let _ = self
                        .shared
                        .metrics
                        .source_lag
                        .remove_label_values(&[el.topic(), &el.partition().to_string()]);
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!("kafka source: unassign failed: {e}");
                }
            }
            other => {
                tracing::error!("kafka source: rebalance error {other:?}; unassigning");
                let _ = consumer.unassign();
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                self.shared.metrics.source_commits.inc();
                tracing::debug!(?offsets, "kafka source: offsets committed");
            }
            Err(e) => {
                self.shared.metrics.source_commit_failures.inc();
                tracing::warn!(
                    "kafka source: offset commit failed (retried with the next checkpoint): {e}"
                );
            }
        }
    }
}

type Consumer_ = StreamConsumer<Ctx>;

/// Control of a running Kafka source: commit offsets covered by durable state, connection state,
/// group metadata for transactions.
#[derive(Clone)]
pub struct KafkaHandle {
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
}

impl KafkaHandle {
    /// True while a broker connection is up.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// The offsets `state` covers, for the partitions this consumer owns now (committing a
    /// partition another member owns would rewind it).
    pub fn offsets(&self, state: &SourceState) -> TopicPartitionList {
        let owned = self.consumer.assignment().unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for el in owned.elements() {
            if let Some(m) = state
                .kafka
                .get(el.topic())
                .and_then(|t| t.get(&el.partition()))
            {
                let _ = tpl.add_partition_offset(
                    el.topic(),
                    el.partition(),
                    Offset::Offset(m.commit_offset(self.shared.format)),
                );
            }
        }
        tpl
    }

    /// Commit (asynchronously) the offsets covered by `state`: call it only once `state` is
    /// durable (a checkpoint written, or the outputs of the items delivered). Failures are
    /// counted and logged; the next call commits again.
    pub fn commit(&self, state: &SourceState) {
        let tpl = self.offsets(state);
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            self.shared.metrics.source_commit_failures.inc();
            tracing::warn!("kafka source: offset commit failed: {e}");
        }
    }

    /// Commit synchronously (for `odcd embed`, which must know the commit landed).
    pub fn commit_sync(&self, state: &SourceState) -> Result<(), KafkaError> {
        let tpl = self.offsets(state);
        if tpl.count() == 0 {
            return Ok(());
        }
        self.consumer.commit(&tpl, CommitMode::Sync)?;
        self.shared.metrics.source_commits.inc();
        Ok(())
    }

    /// Consumer group metadata (for `send_offsets_to_transaction`).
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// Keep `/readyz`'s source flag in step with the connection state until `cancel` fires.
    pub fn report_to(&self, health: crate::metrics::Health, cancel: CancellationToken) {
        let h = self.clone();
        tokio::spawn(async move {
            loop {
                health.set_source_ok(h.connected());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        });
    }
}

/// A consumer-group source over Kafka topics.
pub struct KafkaSource {
    cfg: KafkaSourceConfig,
    metrics: DataMetrics,
}

impl KafkaSource {
    pub fn new(cfg: KafkaSourceConfig, metrics: DataMetrics) -> Result<Self, SourceError> {
        cfg.validate()?;
        Ok(KafkaSource { cfg, metrics })
    }

    /// Start consuming on a tokio task, resuming from `resume.kafka`; items go to the returned
    /// bounded channel. Runs until `cancel` fires (a Kafka source never ends by itself).
    pub fn spawn(
        self,
        resume: &SourceState,
        cancel: CancellationToken,
    ) -> Result<(mpsc::Receiver<SourceItem>, KafkaHandle), SourceError> {
        let cfg = self.cfg;
        let mut marks = HashMap::new();
        for (topic, parts) in &resume.kafka {
            for (p, m) in parts {
                marks.insert((topic.clone(), *p), *m);
            }
        }
        let (split_tx, split_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            format: cfg.message_format,
            resume: Mutex::new(marks),
            skip: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            metrics: self.metrics.clone(),
            consumer: OnceLock::new(),
            split: Mutex::new(HashSet::new()),
            split_tx,
        });
        let mut cc = client_config(
            &cfg.brokers,
            &cfg.options,
            &cfg.options_env,
            "source.options_env",
        )?;
        cc.set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match cfg.start {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            )
            .set("statistics.interval.ms", cfg.stats_interval_ms.to_string());
        let consumer: Consumer_ = cc
            .create_with_context(Ctx {
                shared: shared.clone(),
            })
            .map_err(|e| SourceError::KafkaConfig {
                field: "source.options".into(),
                message: format!("librdkafka refused the consumer config: {e}"),
            })?;
        let topics: Vec<&str> = cfg.topics.iter().map(|s| s.as_str()).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| SourceError::KafkaConfig {
                field: "source.topics".into(),
                message: format!("cannot subscribe to {topics:?}: {e}"),
            })?;
        let consumer = Arc::new(consumer);
        let _ = shared.consumer.set(Arc::downgrade(&consumer));
        let handle = KafkaHandle {
            consumer: consumer.clone(),
            shared: shared.clone(),
        };
        let (tx, rx) = mpsc::channel(cfg.channel_capacity);
        let metrics = self.metrics;
        tokio::spawn(async move {
            consume(consumer, cfg, shared, split_rx, metrics, tx, cancel).await;
        });
        Ok((rx, handle))
    }
}

/// Messages taken from librdkafka's queue per hand-off when more are already waiting: one
/// channel reservation and one wake-up of the decode stage per burst instead of per message.
const BURST: usize = 256;

/// The source task: serves the consumer's main queue (group events, statistics, errors, and
/// the messages of any partition whose queue could not be split off) and starts one reader
/// task per assigned partition queue, so that polling librdkafka (the largest cost per message)
/// runs on every core instead of one.
async fn consume(
    consumer: Arc<Consumer_>,
    cfg: KafkaSourceConfig,
    shared: Arc<Shared>,
    mut split: mpsc::UnboundedReceiver<PartitionQueue>,
    metrics: DataMetrics,
    tx: mpsc::Sender<SourceItem>,
    cancel: CancellationToken,
) {
    let cfg = Arc::new(cfg);
    let mut main = Reader::new(cfg.clone(), shared.clone(), metrics.clone(), tx.clone());
    // One stream for the task's life: `recv()` registers and unregisters a waker slot (two
    // mutex round trips) for every message.
    let mut stream = consumer.stream();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(mut queue) = split.recv() => {
                let mut reader = Reader::new(cfg.clone(), shared.clone(), metrics.clone(), tx.clone());
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    while !cancel.is_cancelled() {
                        let Some(first) = queue.next_ready(reader.room()) else {
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = queue.ready() => continue,
                            }
                        };
                        if !reader.burst(first, &mut queue, &cancel).await {
                            return;
                        }
                    }
                });
            }
            m = stream.next() => {
                let Some(msg) = m else { return };
                if !main.burst(msg, &mut stream, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Messages already waiting in a queue, taken without waiting.
trait Waiting {
    type Msg: Message;
    /// `room`: how many messages the caller handles before it next awaits.
    fn next_waiting(&mut self, room: usize) -> Option<KafkaResult<Self::Msg>>;
}

/// The main queue, through rdkafka's event API (it also serves group events).
impl<'a> Waiting for MessageStream<'a, Ctx> {
    type Msg = BorrowedMessage<'a>;
    fn next_waiting(&mut self, _room: usize) -> Option<KafkaResult<BorrowedMessage<'a>>> {
        self.next().now_or_never().flatten()
    }
}

/// A partition's own queue, taken from in batches.
impl Waiting for PartitionQueue {
    type Msg = RawMessage;
    fn next_waiting(&mut self, room: usize) -> Option<KafkaResult<RawMessage>> {
        self.next_ready(room)
    }
}

/// One reading loop's state between bursts (the main queue's, or one partition queue's).
struct Reader {
    cfg: Arc<KafkaSourceConfig>,
    shared: Arc<Shared>,
    metrics: DataMetrics,
    tx: mpsc::Sender<SourceItem>,
    items: Vec<SourceItem>,
    copy: MessageCopier,
    base: Duration,
    backoff: Duration,
    burst: usize,
}

impl Reader {
    fn new(
        cfg: Arc<KafkaSourceConfig>,
        shared: Arc<Shared>,
        metrics: DataMetrics,
        tx: mpsc::Sender<SourceItem>,
    ) -> Self {
        let base = Duration::from_millis(cfg.retry_backoff_ms.max(1));
        let burst = BURST.min(cfg.channel_capacity.max(1));
        Reader {
            cfg,
            shared,
            metrics,
            tx,
            items: Vec::with_capacity(burst),
            copy: MessageCopier::default(),
            base,
            backoff: base,
            burst,
        }
    }

    /// Messages this reader handles before it next awaits: the rest of its burst, or one at
    /// a time for shard messages (each ends a burst).
    fn room(&self) -> usize {
        match self.cfg.message_format {
            MessageFormat::Image => self.burst.saturating_sub(self.items.len()),
            MessageFormat::Shard => 1,
        }
    }

    /// Handles `first` and whatever `queue` already holds after it (up to a burst), and hands
    /// the items downstream in order. False when the source must stop (downstream gone, or
    /// cancelled during an error back-off).
    async fn burst<W: Waiting>(
        &mut self,
        first: KafkaResult<W::Msg>,
        queue: &mut W,
        cancel: &CancellationToken,
    ) -> bool {
        let mut shard = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Ok(m) => {
                    self.backoff = self.base;
                    match message_items(&m, &self.cfg, &self.shared, &mut self.copy) {
                        Parsed::Ready(item) => self.items.push(item),
                        Parsed::Shard(s) => {
                            shard = Some(s);
                            break;
                        }
                    }
                }
                Err(e) => {
                    // librdkafka reconnects by itself; wait so a persistent error does not spin.
                    self.metrics.retries.inc();
                    tracing::warn!(
                        "kafka source: {e}; retrying in {} ms",
                        self.backoff.as_millis()
                    );
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(RDKafkaErrorCode::AllBrokersDown)
                            | Some(RDKafkaErrorCode::BrokerTransportFailure)
                    ) {
                        self.shared.set_connected(false);
                    }
                    if !send_all(&self.tx, &self.metrics, &mut self.items).await {
                        return false;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                    return true;
                }
            }
            if self.items.len() < self.burst {
                next = queue.next_waiting(self.room());
            }
        }
        if !self.items.is_empty() || shard.is_some() {
            self.shared.set_connected(true);
        }
        if let Some(ShardMessage {
            payload,
            topic,
            partition,
            offset,
            skip,
        }) = shard
        {
            // Items of earlier messages go first: positions stay in order.
            if !send_all(&self.tx, &self.metrics, &mut self.items).await {
                return false;
            }
            let opts = ReadOptions {
                max_member_bytes: self.cfg.max_message_bytes,
            };
            // Tar parsing is CPU work: off the async workers.
            let res = tokio::task::spawn_blocking(move || {
                shard_items(&payload, &topic, partition, offset, skip, &opts)
            })
            .await;
            match res {
                Ok(v) => self.items.extend(v),
                Err(e) => tracing::error!("kafka source: shard reader failed: {e}"),
            }
        }
        send_all(&self.tx, &self.metrics, &mut self.items).await
    }
}

/// Hands `items` downstream in order, reserving channel slots for as many as fit at once.
/// No select on `cancel` (hot path): on cancel the decode stage drops its receiver, which
/// ends the wait. False when the receiver is gone.
async fn send_all(
    tx: &mpsc::Sender<SourceItem>,
    metrics: &DataMetrics,
    items: &mut Vec<SourceItem>,
) -> bool {
    metrics.records_read.inc_by(items.len() as u64);
    let mut rest = items.drain(..);
    loop {
        let n = rest.len().min(tx.max_capacity());
        if n == 0 {
            return true;
        }
        let Ok(permits) = tx.reserve_many(n).await else {
            return false;
        };
        for (permit, item) in permits.zip(rest.by_ref()) {
            permit.send(item);
        }
    }
}

/// What one message becomes.
enum Parsed {
    Ready(SourceItem),
    /// A whole tar shard: parsed off the runtime.
    Shard(ShardMessage),
}

struct ShardMessage {
    payload: Bytes,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    skip: u64,
}

/// Copies message payloads out of librdkafka's buffers: small payloads go back to back into
/// one shared 64 KiB block (one allocation per block instead of one per record; a block is
/// freed when its last record is dropped), and the topic name is shared by every record of
/// the topic.
#[derive(Default)]
struct MessageCopier {
    block: BytesMut,
    topic: Option<Arc<str>>,
}

impl MessageCopier {
    const BLOCK: usize = 64 * 1024;

    fn payload(&mut self, p: &[u8]) -> Bytes {
        if p.len() > Self::BLOCK / 8 {
            return Bytes::copy_from_slice(p);
        }
        if self.block.capacity() - self.block.len() < p.len() {
            self.block = BytesMut::with_capacity(Self::BLOCK);
        }
        self.block.extend_from_slice(p);
        self.block.split().freeze()
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        match &self.topic {
            Some(t) if &**t == name => t.clone(),
            _ => {
                let t: Arc<str> = Arc::from(name);
                self.topic = Some(t.clone());
                t
            }
        }
    }
}

/// Turn one message into items (or a shard to parse off the runtime).
fn message_items<M: Message>(
    m: &M,
    cfg: &KafkaSourceConfig,
    shared: &Shared,
    copy: &mut MessageCopier,
) -> Parsed {
    let topic = m.topic();
    let (partition, offset) = (m.partition(), m.offset());
    let position = Position::Kafka {
        topic: copy.topic(topic),
        partition,
        offset,
    };
    let key = match m.key() {
        Some(k) if !k.is_empty() => String::from_utf8_lossy(k).into_owned(),
        _ => format!("{topic}/{partition}/{offset}"),
    };
    let reject = |reason, message: String, payload: Option<Bytes>, format: Option<String>| {
        Parsed::Ready(Err(RejectedRecord {
            key: key.clone(),
            reason,
            message,
            position: position.clone(),
            payload,
            format,
        }))
    };
    let raw = m.payload().unwrap_or_default();
    // Checked before copying: an oversized message is never copied.
    if raw.len() as u64 > cfg.max_message_bytes {
        return reject(
            RejectReason::TooLarge,
            format!(
                "message {topic}/{partition}@{offset} has {} bytes, more than source.max_message_bytes = {}",
                raw.len(),
                cfg.max_message_bytes
            ),
            None,
            None,
        );
    }
    let payload = if cfg.message_format == MessageFormat::Shard {
        // A whole shard: its own buffer (its records are parsed out of it).
        Bytes::copy_from_slice(raw)
    } else {
        copy.payload(raw)
    };
    if cfg.message_format == MessageFormat::Shard {
        let skip = {
            let mut s = shared.skip.lock().unwrap_or_else(|p| p.into_inner());
            match s.remove(&(topic.to_string(), partition)) {
                Some((o, n)) if o == offset => n,
                Some(other) if other.0 > offset => {
                    s.insert((topic.to_string(), partition), other);
                    0
                }
                _ => 0,
            }
        };
        return Parsed::Shard(ShardMessage {
            payload,
            topic: copy.topic(topic),
            partition,
            offset,
            skip,
        });
    }
    // Header values borrowed from the message (copied only when not UTF-8).
    let mut label: Option<std::borrow::Cow<str>> = None;
    let mut content_type: Option<std::borrow::Cow<str>> = None;
    if let Some(h) = m.headers() {
        for i in 0..h.count() {
            let hd = h.get(i);
            let v = hd.value.map(|v| match String::from_utf8_lossy(v) {
                std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.trim()),
                std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.trim().to_string()),
            });
            if hd.key == cfg.label_header {
                label = v;
            } else if hd.key == cfg.content_type_header {
                content_type = v;
            }
        }
    }
    let format: &'static str = content_type
        .as_deref()
        .and_then(format_from_content_type)
        .or_else(|| sniff_format(&payload))
        .unwrap_or("bin");
    if payload.is_empty() {
        return reject(
            RejectReason::MissingImage,
            format!("message {topic}/{partition}@{offset} has no payload (tombstone?)"),
            None,
            None,
        );
    }
    let class_label = match label.as_deref() {
        None | Some("") => None,
        Some(s) => match s.parse::<i64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return reject(
                    RejectReason::BadLabel,
                    format!(
                    "header `{}` of message {topic}/{partition}@{offset} is {s:?}, not an integer",
                    cfg.label_header
                ),
                    Some(payload),
                    Some(format.to_string()),
                )
            }
        },
    };
    Parsed::Ready(Ok(Record {
        key,
        image: payload,
        format: std::borrow::Cow::Borrowed(format),
        class_label,
        position,
    }))
}

/// Items of a tar shard held in one message, positions rewritten to the message's offset;
/// the first `skip` items (consumed before a restart) are dropped.
fn shard_items(
    payload: &[u8],
    topic: &Arc<str>,
    partition: i32,
    offset: i64,
    skip: u64,
    opts: &ReadOptions,
) -> Vec<SourceItem> {
    let name = format!("{topic}/{partition}@{offset}");
    let mut out = Vec::new();
    let mut n = 0u64;
    let fault = TransportFault::default();
    read_shard(std::io::Cursor::new(payload), &name, opts, &fault, |item| {
        n += 1;
        if n > skip {
            let pos = Position::Kafka {
                topic: topic.clone(),
                partition,
                offset,
            };
            out.push(match item {
                Ok(mut r) => {
                    r.position = pos;
                    Ok(r)
                }
                Err(mut r) => {
                    r.position = pos;
                    Err(r)
                }
            });
        }
        std::ops::ControlFlow::Continue(())
    });
    out
}

/// `image/png` → `png`, ... (parameters after `;` ignored).
fn format_from_content_type(ct: &str) -> Option<&'static str> {
    let base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "image/png" => Some("png"),
        "image/jpeg" | "image/jpg" => Some("jpg"),
        "image/webp" => Some("webp"),
        _ => None,
    }
}

/// Format from magic bytes.
fn sniff_format(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if b.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpg")
    } else if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn shared(format: MessageFormat) -> Shared {
        Shared {
            format,
            resume: Mutex::new(HashMap::new()),
            skip: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            metrics: DataMetrics::register(&prometheus::Registry::new()).expect("metrics"),
            consumer: OnceLock::new(),
            split: Mutex::new(HashSet::new()),
            split_tx: mpsc::unbounded_channel().0,
        }
    }

    fn msg(key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        OwnedMessage::new(
            Some(payload.to_vec()),
            key.map(|k| k.to_vec()),
            "images".into(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(h),
        )
    }

    /// An image-format message as the source parses it.
    fn parse(m: &OwnedMessage, cfg: &KafkaSourceConfig) -> Parsed {
        let shared = shared(MessageFormat::Image);
        message_items(m, cfg, &shared, &mut MessageCopier::default())
    }

    fn one(p: Parsed) -> SourceItem {
        match p {
            Parsed::Ready(item) => item,
            Parsed::Shard(_) => panic!("expected one item"),
        }
    }

    #[test]
    fn image_message_becomes_a_record_with_label_and_position() {
        let cfg = KafkaSourceConfig::new("x:1", &["images"], "g");
        let png = b"\x89PNG\r\n\x1a\nrest";
        let m = msg(Some(b"sample-1"), png, &[("class_label", "7")]);
        let r = one(parse(&m, &cfg)).expect("record");
        assert_eq!(r.key, "sample-1");
        assert_eq!(r.class_label, Some(7));
        assert_eq!(r.format, "png");
        assert_eq!(
            r.position,
            Position::Kafka {
                topic: "images".into(),
                partition: 2,
                offset: 41
            }
        );
        // No key: topic/partition/offset; content type header names the format.
        let m = msg(None, b"abc", &[("content_type", "image/jpeg")]);
        let r = one(parse(&m, &cfg)).expect("record");
        assert_eq!((r.key.as_str(), &*r.format), ("images/2/41", "jpg"));
    }

    #[test]
    fn copied_payloads_keep_their_bytes_across_blocks_and_share_the_topic() {
        let mut c = MessageCopier::default();
        // 300-byte payloads: ~218 per 64 KiB block, so 1,000 of them span several blocks.
        let originals: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| (0..300u32).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        let copies: Vec<Bytes> = originals.iter().map(|o| c.payload(o)).collect();
        for (o, b) in originals.iter().zip(&copies) {
            assert_eq!(&b[..], &o[..]);
        }
        // Dropping the early copies frees nothing the later ones still read.
        let mut copies = copies;
        let later = copies.split_off(500);
        drop(copies);
        for (o, b) in originals[500..].iter().zip(&later) {
            assert_eq!(&b[..], &o[..]);
        }
        let big = vec![9u8; MessageCopier::BLOCK];
        assert_eq!(&c.payload(&big)[..], &big[..]);
        assert_eq!(&c.payload(b"")[..], b"");
        let (a, b) = (c.topic("images"), c.topic("images"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*c.topic("other"), "other");
    }

    #[test]
    fn bad_label_empty_and_oversized_messages_are_rejected_with_a_reason() {
        let mut cfg = KafkaSourceConfig::new("x:1", &["images"], "g");
        let m = msg(Some(b"k"), b"img", &[("class_label", "seven")]);
        let e = one(parse(&m, &cfg)).err();
        assert_eq!(e.map(|e| e.reason), Some(RejectReason::BadLabel));
        let m = msg(Some(b"k"), b"", &[]);
        let e = one(parse(&m, &cfg)).err();
        assert_eq!(e.map(|e| e.reason), Some(RejectReason::MissingImage));
        cfg.max_message_bytes = 2;
        let m = msg(Some(b"k"), b"img", &[]);
        let e = one(parse(&m, &cfg)).err();
        assert_eq!(e.map(|e| e.reason), Some(RejectReason::TooLarge));
    }

    #[test]
    fn shard_message_yields_its_records_and_skips_consumed_ones() {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data) in [("a.png", &b"A"[..]), ("a.cls", b"1"), ("b.png", b"B")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data).expect("append");
        }
        let bytes = tar.into_inner().expect("tar");
        let opts = ReadOptions::default();
        let all = shard_items(&bytes, &Arc::from("t"), 0, 5, 0, &opts);
        let keys: Vec<String> = all
            .iter()
            .filter_map(|i| i.as_ref().ok().map(|r| r.key.clone()))
            .collect();
        assert_eq!(keys, ["a", "b"]);
        assert!(all.iter().all(|i| matches!(
            i.as_ref().map(|r| &r.position),
            Ok(Position::Kafka { offset: 5, .. })
        )));
        let rest = shard_items(&bytes, &Arc::from("t"), 0, 5, 1, &opts);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].as_ref().map(|r| r.key.as_str()).ok(), Some("b"));
    }

    #[test]
    fn marks_resume_and_commit_per_format() {
        let m = PartitionMark {
            offset: 9,
            records: 3,
        };
        assert_eq!(m.resume(MessageFormat::Image), (10, 0));
        assert_eq!(m.commit_offset(MessageFormat::Image), 10);
        assert_eq!(m.resume(MessageFormat::Shard), (9, 3));
        assert_eq!(m.commit_offset(MessageFormat::Shard), 9);
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = KafkaSourceConfig::new("", &["t"], "g");
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("source.brokers"), "{e}");
        c.brokers = "h:1".into();
        c.options.insert("enable.auto.commit".into(), "true".into());
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("source.options") && e.contains("enable.auto.commit"),
            "{e}"
        );
        c.options.clear();
        c.options_env
            .insert("sasl.password".into(), "ODCD_TEST_SURELY_UNSET_VAR".into());
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("ODCD_TEST_SURELY_UNSET_VAR"), "{e}");
    }
}
