//! [`KafkaHandle`]: what the daemon and `odcd embed` hold of a running Kafka source (offset
//! commits once state is durable, the connection state, group metadata for transactions).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::group::{ConsumerState, GroupConsumer};
use crate::source::SourceState;

/// Control of a running Kafka source: commit offsets covered by durable state, connection state,
/// group metadata for transactions.
#[derive(Clone)]
pub struct KafkaHandle {
    pub(super) consumer: Arc<GroupConsumer>,
    pub(super) shared: Arc<ConsumerState>,
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
