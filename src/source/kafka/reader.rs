//! The running source: [`KafkaSource::spawn`] builds the consumer and starts the source task,
//! which serves the main queue and starts one reader per partition queue; each [`Reader`]
//! turns bursts of messages into items and hands them downstream.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{Consumer, MessageStream};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::group::{ConsumerState, GroupConsumer, GroupContext};
use super::message::{message_items, shard_items, MessageCopier, Parsed, ShardMessage};
use super::partition::{PartitionQueue, RawMessage, BURST};
use super::{KafkaHandle, KafkaSourceConfig, MessageFormat, StartFrom};
use crate::kafka::client_config;
use crate::source::webdataset::ReadOptions;
use crate::source::{DataMetrics, SourceError, SourceItem, SourceState};

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
        let shared = Arc::new(ConsumerState {
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
        let consumer: GroupConsumer = cc
            .create_with_context(GroupContext {
                shared: shared.clone(),
            })
            .map_err(|e| {
                SourceError::Config(crate::validate::FieldError::new(
                    "source.options",
                    format!("librdkafka refused the consumer config: {e}"),
                ))
            })?;
        let topics: Vec<&str> = cfg.topics.iter().map(|s| s.as_str()).collect();
        consumer.subscribe(&topics).map_err(|e| {
            SourceError::Config(crate::validate::FieldError::new(
                "source.topics",
                format!("cannot subscribe to {topics:?}: {e}"),
            ))
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

/// The source task: serves the consumer's main queue (group events, statistics, errors, and
/// the messages of any partition whose queue could not be split off) and starts one reader
/// task per assigned partition queue, so that polling librdkafka (the largest cost per message)
/// runs on every core instead of one.
async fn consume(
    consumer: Arc<GroupConsumer>,
    cfg: KafkaSourceConfig,
    shared: Arc<ConsumerState>,
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
impl<'a> Waiting for MessageStream<'a, GroupContext> {
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
    shared: Arc<ConsumerState>,
    metrics: DataMetrics,
    tx: mpsc::Sender<SourceItem>,
    items: Vec<SourceItem>,
    copy: MessageCopier,
    base: Duration,
    backoff: Duration,
    pacing: ErrorPacing,
    burst: usize,
}

impl Reader {
    fn new(
        cfg: Arc<KafkaSourceConfig>,
        shared: Arc<ConsumerState>,
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
            pacing: ErrorPacing::default(),
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
                    self.pacing.message();
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
                    if !self.pacing.should_pause(Instant::now()) {
                        // Queued during the last pause: an outage queues one every few
                        // seconds, and a pause for each would keep the reader asleep long
                        // after the broker is back.
                        tracing::debug!("kafka source: {e} (queued during the last pause)");
                        return send_all(&self.tx, &self.metrics, &mut self.items).await;
                    }
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
                    self.backoff = next_error_backoff(self.backoff, self.base);
                    self.pacing.woke(Instant::now());
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

/// The longest wait after consumer errors (unless `retry_backoff_ms` is longer): librdkafka
/// reconnects by itself, and the errors of an outage stay queued, so a long wait per error
/// would leave the source asleep long after the broker is back (with 30 s, minutes).
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// An error read this soon after a pause ended was already queued when it ended.
const QUEUED_ERROR_WINDOW: Duration = Duration::from_millis(200);

/// Queued errors skipped in a row before the reader pauses anyway (no spin, whatever comes).
const MAX_QUEUED_ERRORS_SKIPPED: u32 = 10_000;

/// Which consumer errors get a pause: not those already queued when the last pause ended.
#[derive(Default)]
struct ErrorPacing {
    /// When the last pause ended (or the last queued error was skipped).
    woke_at: Option<Instant>,
    skipped: u32,
}

impl ErrorPacing {
    /// True when the error read at `now` gets a pause.
    fn should_pause(&mut self, now: Instant) -> bool {
        let queued = self
            .woke_at
            .is_some_and(|t| now.saturating_duration_since(t) < QUEUED_ERROR_WINDOW);
        if queued && self.skipped < MAX_QUEUED_ERRORS_SKIPPED {
            self.skipped += 1;
            self.woke_at = Some(now);
            return false;
        }
        self.skipped = 0;
        true
    }

    /// A pause ended at `now`.
    fn woke(&mut self, now: Instant) {
        self.woke_at = Some(now);
    }

    /// A message arrived: the next error is a fresh one.
    fn message(&mut self) {
        self.woke_at = None;
        self.skipped = 0;
    }
}

/// The wait after the next consumer error: doubled, at most [`ERROR_BACKOFF_MAX`] or `base`.
fn next_error_backoff(cur: Duration, base: Duration) -> Duration {
    (cur * 2).min(ERROR_BACKOFF_MAX.max(base))
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

#[cfg(test)]
mod backoff_tests {
    use super::*;

    /// After the errors of a long outage the source waits at most 2 s between reads (unless
    /// configured longer), so it reads again within seconds of the broker's return.
    #[test]
    fn the_error_backoff_stays_short_after_many_errors() {
        let base = Duration::from_millis(500);
        let mut b = base;
        for _ in 0..20 {
            b = next_error_backoff(b, base);
        }
        assert_eq!(b, Duration::from_secs(2));
        let slow = Duration::from_secs(5);
        assert_eq!(next_error_backoff(slow, slow), slow);
    }

    /// The errors an outage queued are read one after another right after a pause: only the
    /// first gets a pause, so the reader catches up at once; a fresh error later gets one.
    #[test]
    fn errors_queued_during_a_pause_get_no_pause_of_their_own() {
        let mut p = ErrorPacing::default();
        let t = Instant::now();
        assert!(p.should_pause(t), "a first error pauses");
        p.woke(t + Duration::from_secs(2));
        for i in 1..=100 {
            let at = t + Duration::from_secs(2) + Duration::from_millis(i);
            assert!(!p.should_pause(at), "queued error {i}");
        }
        assert!(
            p.should_pause(t + Duration::from_secs(10)),
            "a fresh error pauses"
        );
        p.woke(t + Duration::from_secs(12));
        p.message();
        assert!(
            p.should_pause(t + Duration::from_secs(12)),
            "after a message, errors are fresh"
        );
    }
}
