//! Output sinks for embeddings (DESIGN.md §3 "Embeddings").
//!
//! [`parquet::ParquetSink`] writes Parquet files onto any object store; each file is
//! published atomically (it appears under its final name only when complete).
//! [`kafka::KafkaSink`] writes one record per sample to a Kafka topic. [`EmbeddingSinks`]
//! feeds whichever of the two `[embeddings]` configures.

mod config;
pub mod kafka;
pub mod parquet;

pub use self::config::EmbeddingsConfig;
pub use self::kafka::{KafkaSink, KafkaSinkConfig};
pub use self::parquet::{
    EmbeddingBatch, ParquetCompression, ParquetSink, ParquetSinkConfig, SinkError, SinkMetrics,
};

use std::sync::Arc;

/// The configured embeddings sinks: Parquet files, a Kafka topic, or both.
pub struct EmbeddingSinks {
    parquet: Option<ParquetSink>,
    kafka: Option<KafkaSink>,
    parquet_metrics: Arc<SinkMetrics>,
    kafka_metrics: Option<KafkaSinkMetrics>,
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
        let parquet_metrics = parquet.as_ref().map(|p| p.metrics()).unwrap_or_default();
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
        Ok(EmbeddingSinks {
            parquet,
            kafka,
            parquet_metrics,
            kafka_metrics,
        })
    }

    /// Counters of the Parquet sink (zeros without one).
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
        match &mut self.parquet {
            Some(p) => p.write(b).await,
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
