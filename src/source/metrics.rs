//! Counters of the data path, registered on a caller-provided registry (no globals, so tests
//! and several pipelines in one process do not collide).

use super::{RejectReason, RejectedRecord};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::{Arc, Mutex};

/// Counters for records read, rejected (by reason), decoded and batches out.
#[derive(Clone, Debug)]
pub struct DataMetrics {
    /// `odcd_records_rejected_total{reason}`.
    pub rejected: IntCounterVec,
    /// `odcd_records_read_total`: records (good or bad) yielded by sources.
    pub records_read: IntCounter,
    /// `odcd_records_decoded_total`: records decoded and augmented into a batch.
    pub records_decoded: IntCounter,
    /// `odcd_batches_total`: batches handed to the consumer.
    pub batches: IntCounter,
    /// `odcd_shards_read_total`: shards read to their end (or to their damage).
    pub shards_read: IntCounter,
    /// `odcd_source_retries_total`: transient read/list failures that were retried.
    pub retries: IntCounter,
    /// `odcd_deadletter_dropped_total`: rejects not written to the dead-letter store
    /// (queue full or write failed).
    pub deadletter_dropped: IntCounter,
    /// `odcd_source_lag_shards`: shards listed under an object-store prefix and not yet read
    /// to their end (this pass; in `follow` mode, new shards waiting).
    pub lag_shards: IntGauge,
    /// `odcd_source_lag_bytes`: the size of those shards (the current one counted whole).
    pub lag_bytes: IntGauge,
    /// `odcd_source_lag_records{topic,partition}`: Kafka high watermark minus the consumer's
    /// position.
    pub source_lag: IntGaugeVec,
    /// `odcd_source_rebalances_total`: Kafka consumer-group rebalances (assign and revoke).
    pub source_rebalances: IntCounter,
    /// `odcd_source_commits_total`: Kafka offset commits that succeeded.
    pub source_commits: IntCounter,
    /// `odcd_source_commit_failures_total`: Kafka offset commits that failed.
    pub source_commit_failures: IntCounter,
    /// `odcd_deadletter_records_total`: rejects written to the dead-letter store or topic.
    pub deadletter_written: IntCounter,
    /// `odcd_source_store_unreachable`: 1 while the object-store source cannot reach its store
    /// and waits for it.
    pub store_unreachable: IntGauge,
    /// Why the store cannot be reached, while it cannot (what `/readyz` says).
    store_error: Arc<Mutex<Option<String>>>,
}

impl DataMetrics {
    /// Create the counters and register them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let rejected = IntCounterVec::new(
            Opts::new(
                "odcd_records_rejected_total",
                "Records dropped by the data path, by reason",
            ),
            &["reason"],
        )?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        registry.register(Box::new(rejected.clone()))?;
        // Pre-create each label so dashboards see zeros instead of missing series.
        for r in RejectReason::ALL {
            rejected.with_label_values(&[r.as_str()]);
        }
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let source_lag = IntGaugeVec::new(
            Opts::new(
                "odcd_source_lag_records",
                "Kafka source: high watermark minus the consumer position, per partition",
            ),
            &["topic", "partition"],
        )?;
        registry.register(Box::new(source_lag.clone()))?;
        Ok(DataMetrics {
            lag_shards: gauge(
                "odcd_source_lag_shards",
                "Object-store shards listed and not yet read to their end",
            )?,
            lag_bytes: gauge(
                "odcd_source_lag_bytes",
                "Bytes of the object-store shards not yet read to their end",
            )?,
            rejected,
            source_lag,
            source_rebalances: counter(
                "odcd_source_rebalances_total",
                "Kafka consumer-group rebalances (assign and revoke)",
            )?,
            source_commits: counter(
                "odcd_source_commits_total",
                "Kafka offset commits that succeeded",
            )?,
            source_commit_failures: counter(
                "odcd_source_commit_failures_total",
                "Kafka offset commits that failed",
            )?,
            store_unreachable: gauge(
                "odcd_source_store_unreachable",
                "1 while the object-store source cannot reach its store and waits for it",
            )?,
            store_error: Arc::new(Mutex::new(None)),
            deadletter_written: counter(
                "odcd_deadletter_records_total",
                "Rejected records written to the dead-letter store or topic",
            )?,
            records_read: counter("odcd_records_read_total", "Records yielded by sources")?,
            records_decoded: counter(
                "odcd_records_decoded_total",
                "Records decoded and augmented into batches",
            )?,
            batches: counter("odcd_batches_total", "Batches handed to the trainer")?,
            shards_read: counter("odcd_shards_read_total", "Shards read to their end")?,
            retries: counter(
                "odcd_source_retries_total",
                "Transient source failures that were retried",
            )?,
            deadletter_dropped: counter(
                "odcd_deadletter_dropped_total",
                "Rejected records not written to the dead-letter store",
            )?,
        })
    }

    /// Count one rejection and log it (with its key) at warn level.
    pub fn reject(&self, r: &RejectedRecord) {
        self.rejected.with_label_values(&[r.reason.as_str()]).inc();
        tracing::warn!(key = %r.key, position = ?r.position, reason = %r.reason, "{}", r.message);
    }

    /// The object-store source cannot reach its store (`Some(why)`), or can again (`None`).
    pub fn set_store_error(&self, why: Option<String>) {
        self.store_unreachable.set(i64::from(why.is_some()));
        if let Ok(mut g) = self.store_error.lock() {
            *g = why;
        }
    }

    /// Why the object-store source cannot reach its store, while it cannot.
    pub fn store_error(&self) -> Option<String> {
        self.store_error.lock().ok().and_then(|g| g.clone())
    }

    /// Keep `/readyz` in step with the object-store source's outage state until `cancel`.
    pub fn report_to(
        &self,
        health: crate::metrics::Health,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let m = self.clone();
        tokio::spawn(async move {
            loop {
                health.set_source_error(m.store_error());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
            }
        });
    }

    /// Current count for one reason (for tests and the `inspect` summary).
    pub fn rejected_count(&self, reason: RejectReason) -> u64 {
        self.rejected.with_label_values(&[reason.as_str()]).get()
    }
}
