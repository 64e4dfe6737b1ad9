//! The consumer group: where each partition resumes ([`PartitionMark`]), the state the
//! consumer's callbacks share with the readers and the handle, and the callbacks themselves
//! (rebalance, offset commits, statistics, errors).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::partition::{PartitionQueue, BURST};
use super::MessageFormat;
use crate::source::DataMetrics;

/// Where the consumer stands on one partition, kept in
/// [`SourceState::kafka`](crate::source::SourceState::kafka).
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

/// State shared between the consumer's callbacks, the source task and
/// [`KafkaHandle`](super::KafkaHandle).
pub(super) struct ConsumerState {
    pub(super) format: MessageFormat,
    /// Positions from the checkpoint, used the first time a partition is assigned.
    pub(super) resume: Mutex<HashMap<(String, i32), PartitionMark>>,
    /// Items of a shard message to skip on resume: (topic, partition) → (offset, items).
    pub(super) skip: Mutex<HashMap<(String, i32), (i64, u64)>>,
    pub(super) connected: AtomicBool,
    pub(super) metrics: DataMetrics,
    /// The consumer, for splitting partition queues in the rebalance callback (weak: the
    /// consumer owns its context, which owns this).
    pub(super) consumer: OnceLock<Weak<GroupConsumer>>,
    /// Partitions whose queue was split off (a queue is split once and read for the source's
    /// life: it stays empty while the partition is not assigned).
    pub(super) split: Mutex<HashSet<(String, i32)>>,
    /// Split queues, to the source task, which starts a reader for each.
    pub(super) split_tx: mpsc::UnboundedSender<PartitionQueue>,
}

impl ConsumerState {
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

    pub(super) fn set_connected(&self, v: bool) {
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
pub(super) struct GroupContext {
    pub(super) shared: Arc<ConsumerState>,
}

impl ClientContext for GroupContext {
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

impl ConsumerContext for GroupContext {
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

/// The consumer, with the group callbacks as its context.
pub(super) type GroupConsumer = StreamConsumer<GroupContext>;
