//! Output sinks for embeddings (DESIGN.md §3 "Embeddings").
//!
//! [`parquet::ParquetSink`] writes Parquet files onto any object store; each file is
//! published atomically (it appears under its final name only when complete).
//! [`kafka::KafkaSink`] writes one record per sample to a Kafka topic. [`EmbeddingSinks`]
//! feeds whichever of the two `[embeddings]` configures.

mod config;
pub mod kafka;
pub mod parquet;
#[cfg(test)]
pub(crate) mod testing;

pub use self::config::EmbeddingsConfig;
pub use self::kafka::{KafkaSink, KafkaSinkConfig};
pub use self::parquet::{
    EmbeddingBatch, ParquetCompression, ParquetSink, ParquetSinkConfig, SinkError, SinkMetrics,
};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// The configured embeddings sinks: Parquet files, a Kafka topic, or both.
pub struct EmbeddingSinks {
    parquet: Option<ParquetSink>,
    kafka: Option<KafkaSink>,
    parquet_metrics: Arc<SinkMetrics>,
    kafka_metrics: Option<KafkaSinkMetrics>,
    /// Kafka records dropped for good when the sinks were opened: a later count above it means
    /// rows were lost, and a flush says so instead of succeeding.
    kafka_failed_seen: u64,
}

/// The wait before the next attempt of a failed sink write: 100 ms, doubling up to 5 s. Each
/// wait is counted in [`SinkMetrics::retries`], logged, and the error kept in
/// [`SinkMetrics::last_error`].
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// Records the failure of `what` and sleeps before the next attempt.
    pub async fn wait(&mut self, what: &str, err: &SinkError, metrics: &SinkMetrics) {
        metrics.retries.fetch_add(1, Relaxed);
        if let Ok(mut g) = metrics.last_error.lock() {
            *g = Some(format!("{what}: {err}"));
        }
        tracing::warn!(
            retry_in_ms = self.next.as_millis() as u64,
            "embeddings sink: {what} failed, retrying (nothing is dropped): {err}"
        );
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `$attempt` until it succeeds, waiting with a [`Backoff`] after each transient error;
/// a permanent error is returned.
macro_rules! retrying {
    ($what:expr, $metrics:expr, $attempt:expr) => {{
        let mut backoff = Backoff::new();
        loop {
            match $attempt.await {
                Ok(v) => break Ok(v),
                Err(e) if e.is_transient() => backoff.wait($what, &e, $metrics).await,
                Err(e) => break Err(e),
            }
        }
    }};
}

/// Prometheus series of the Kafka embeddings sink (`sink="kafka"`).
#[derive(Clone)]
pub struct KafkaSinkMetrics {
    counters: Arc<kafka::KafkaSinkCounters>,
    /// `odcd_sink_records_total{sink="kafka"}`: records delivered (acknowledged by the broker).
    pub records: prometheus::IntCounterVec,
    /// `odcd_sink_delivery_retries_total{sink="kafka"}`: failed deliveries that were re-sent.
    pub retries: prometheus::IntCounterVec,
    /// `odcd_sink_delivery_errors_total{sink="kafka"}`: records dropped after the re-sends.
    pub errors: prometheus::IntCounterVec,
}

impl KafkaSinkMetrics {
    fn register(
        registry: &prometheus::Registry,
        counters: Arc<kafka::KafkaSinkCounters>,
    ) -> Result<Self, prometheus::Error> {
        let vec = |name: &str,
                   help: &str|
         -> Result<prometheus::IntCounterVec, prometheus::Error> {
            let v = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), &["sink"])?;
            registry.register(Box::new(v.clone()))?;
            v.with_label_values(&["kafka"]);
            Ok(v)
        };
        Ok(KafkaSinkMetrics {
            counters,
            records: vec(
                "odcd_sink_records_total",
                "Embedding records delivered, by sink",
            )?,
            retries: vec(
                "odcd_sink_delivery_retries_total",
                "Embedding records re-sent after a failed delivery, by sink",
            )?,
            errors: vec(
                "odcd_sink_delivery_errors_total",
                "Embedding records dropped after failed deliveries and re-sends, by sink",
            )?,
        })
    }

    /// Copy the sink's counters into the Prometheus series.
    pub fn sync(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let up = |c: &prometheus::IntCounterVec, v: u64| {
            let s = c.with_label_values(&["kafka"]);
            s.inc_by(v.saturating_sub(s.get()));
        };
        up(&self.records, self.counters.delivered.load(Relaxed));
        up(&self.retries, self.counters.retried.load(Relaxed));
        up(&self.errors, self.counters.failed.load(Relaxed));
    }
}

impl EmbeddingSinks {
    /// Open the sinks of `cfg`. `versioned_keys`: Kafka keys are `<sample key>@<model version>`
    /// (`odcd embed`); `transactional`: exactly-once batches (`odcd embed` from Kafka with
    /// `exactly_once = true`).
    pub fn open(
        cfg: &EmbeddingsConfig,
        registry: Option<&prometheus::Registry>,
        versioned_keys: bool,
        transactional: bool,
    ) -> Result<Self, SinkError> {
        if let Some(k) = &cfg.kafka {
            if k.exactly_once && !transactional {
                return Err(SinkError::Config(crate::validate::FieldError::new(
                    "embeddings.kafka.exactly_once",
                    "applies to `odcd embed` from a Kafka source only; `odcd run` publishes embeddings at-least-once: remove it from this config",
                )));
            }
        }
        let parquet = match &cfg.url {
            Some(url) => Some(ParquetSink::open(url, &cfg.options, cfg.parquet.clone())?),
            None => None,
        };
        let kafka = match &cfg.kafka {
            Some(k) => Some(KafkaSink::open(k, versioned_keys, transactional)?),
            None => None,
        };
        let kafka_metrics = match (&kafka, registry) {
            (Some(k), Some(r)) => {
                Some(KafkaSinkMetrics::register(r, k.counters()).map_err(|err| {
                    SinkError::Kafka {
                        topic: k.topic().into(),
                        message: format!("metrics: {err}"),
                    }
                })?)
            }
            _ => None,
        };
        Ok(Self::from_parts(parquet, kafka, kafka_metrics))
    }

    /// The sinks from already opened parts ([`EmbeddingSinks::open`] opens them from a config;
    /// a test passes a Parquet sink on a wrapped store).
    pub fn from_parts(
        parquet: Option<ParquetSink>,
        kafka: Option<KafkaSink>,
        kafka_metrics: Option<KafkaSinkMetrics>,
    ) -> Self {
        let parquet_metrics = parquet.as_ref().map(|p| p.metrics()).unwrap_or_default();
        let kafka_failed_seen = kafka
            .as_ref()
            .map_or(0, |k| k.counters().failed.load(Relaxed));
        EmbeddingSinks {
            parquet,
            kafka,
            parquet_metrics,
            kafka_metrics,
            kafka_failed_seen,
        }
    }

    /// Counters of the Parquet sink (zeros without one), with the retries and last error of
    /// every sink.
    pub fn metrics(&self) -> Arc<SinkMetrics> {
        self.parquet_metrics.clone()
    }

    pub fn kafka(&mut self) -> Option<&mut KafkaSink> {
        self.kafka.as_mut()
    }

    /// Write to every sink (both are tried; the first error is returned).
    pub async fn write(&mut self, b: EmbeddingBatch) -> Result<(), SinkError> {
        let mut res = Ok(());
        if let Some(k) = &mut self.kafka {
            res = k.write(&b).await;
        }
        if let Some(p) = &mut self.parquet {
            let r = p.write(b).await;
            res = res.and(r);
        }
        self.sync();
        res
    }

    /// Writes `b` to every sink, retrying a failed write with [`Backoff`] until it succeeds:
    /// a batch is never dropped because a write failed (while it retries, the caller's bounded
    /// queue fills and the producer of the rows waits). Only an error that no retry can fix (a
    /// malformed batch) is returned. A Kafka write that failed half-way is sent again whole:
    /// some records may be delivered twice (consumers drop duplicates by key and step).
    pub async fn write_retrying(&mut self, b: EmbeddingBatch) -> Result<(), SinkError> {
        let metrics = self.parquet_metrics.clone();
        if let Some(k) = &mut self.kafka {
            retrying!("kafka write", &metrics, k.write(&b))?;
            if let Some(m) = &self.kafka_metrics {
                m.sync();
            }
        }
        if let Some(p) = &mut self.parquet {
            match p.write(b).await {
                Ok(()) => {}
                // The rows are accepted and kept: what is retried is writing them out.
                Err(e) if e.is_transient() => {
                    Backoff::new().wait("parquet write", &e, &metrics).await;
                    retrying!("parquet write", &metrics, p.resume())?;
                }
                Err(e) => return Err(e),
            }
        }
        self.succeeded();
        Ok(())
    }

    /// The barrier: every row written so far is durably published when this returns `Ok`
    /// (the Parquet file closed and uploaded, every Kafka delivery acknowledged). Failed
    /// attempts are retried with [`Backoff`] until they succeed, so the caller bounds the wait.
    /// Kafka records dropped after their re-sends cannot be published again: that is an error.
    pub async fn flush_retrying(&mut self) -> Result<(), SinkError> {
        let metrics = self.parquet_metrics.clone();
        if let Some(k) = &mut self.kafka {
            let failed = retrying!("kafka flush", &metrics, k.flush())?;
            if let Some(m) = &self.kafka_metrics {
                m.sync();
            }
            if failed > self.kafka_failed_seen {
                return Err(SinkError::Kafka {
                    topic: k.topic().into(),
                    message: format!(
                        "{} embedding record(s) were dropped after failed deliveries; the rows since the last checkpoint are published again after a restart",
                        failed - self.kafka_failed_seen
                    ),
                });
            }
        }
        if let Some(p) = &mut self.parquet {
            retrying!("parquet publish", &metrics, p.flush())?;
        }
        self.succeeded();
        Ok(())
    }

    /// [`EmbeddingSinks::flush_if_older`], retried with [`Backoff`] until it succeeds.
    pub async fn flush_if_older_retrying(&mut self, max_age_secs: u64) -> Result<(), SinkError> {
        let metrics = self.parquet_metrics.clone();
        if let Some(p) = &mut self.parquet {
            retrying!("parquet publish", &metrics, p.flush_if_older(max_age_secs))?;
        }
        self.succeeded();
        Ok(())
    }

    /// Clears the last error once every sink is healthy again.
    fn succeeded(&self) {
        if let Ok(mut g) = self.parquet_metrics.last_error.lock() {
            *g = None;
        }
    }

    /// Exactly-once batch: the Kafka part is one transaction with the input `offsets`
    /// ([`KafkaSink::write_transaction`]); Parquet rows (if configured) follow its commit.
    pub async fn write_transaction(
        &mut self,
        b: EmbeddingBatch,
        offsets: rdkafka::TopicPartitionList,
        group: rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<(), SinkError> {
        if let Some(k) = &mut self.kafka {
            k.write_transaction(&b, offsets, group).await?;
        }
        self.sync();
        let metrics = self.parquet_metrics.clone();
        match &mut self.parquet {
            // The transaction is committed: the Parquet rows must follow, so a failure is
            // retried (the sink keeps the rows) rather than returned.
            Some(p) => match p.write(b).await {
                Err(e) if e.is_transient() => {
                    retrying!("parquet write", &metrics, p.resume())
                }
                r => r,
            },
            None => Ok(()),
        }
    }

    /// Publish an old Parquet file (see [`ParquetSink::flush_if_older`]).
    pub async fn flush_if_older(&mut self, max_age_secs: u64) -> Result<(), SinkError> {
        self.sync();
        match &mut self.parquet {
            Some(p) => p.flush_if_older(max_age_secs).await.map(|_| ()),
            None => Ok(()),
        }
    }

    fn sync(&self) {
        if let Some(m) = &self.kafka_metrics {
            m.sync();
        }
    }

    /// Flush and close every sink.
    pub async fn close(self) -> Result<(), SinkError> {
        let mut res = Ok(());
        if let Some(k) = self.kafka {
            res = k.close().await;
        }
        if let Some(m) = &self.kafka_metrics {
            m.sync();
        }
        if let Some(p) = self.parquet {
            let r = p.close().await;
            res = res.and(r);
        }
        res
    }
}
