//! Output sinks for embeddings (DESIGN.md §3 "Embeddings").
//!
//! [`parquet::ParquetSink`] writes Parquet files onto any object store; each file is
//! published atomically (it appears under its final name only when complete).

pub mod parquet;

pub use self::parquet::{
    EmbeddingBatch, ParquetCompression, ParquetSink, ParquetSinkConfig, SinkError, SinkMetrics,
};
