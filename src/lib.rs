//! odcd: Online Deep Clustering (Zhan et al., CVPR 2020) as a streaming daemon.
//!
//! # Layout
//!
//! Data flows one way: `source` (object-store shards or Kafka) → `decode` (rayon decode +
//! augment into batches) → `train` (candle model + `odc` memory) → `sink` (embeddings) and
//! `checkpoint`. Modules are listed from the top floor down; a module imports only from the
//! floors below it (`tests/layout.rs` checks this).
//!
//! - [`cmd`]: one file per command (`run`, `embed`, `eval`, `report`, `config`, `checkpoint`,
//!   `shards`); the only place that reads a whole [`config::Config`].
//! - [`config`]: assembles the sections of the TOML file and validates across them.
//! - [`topology`]: builds the stages from their sections and joins them with bounded
//!   channels (data path, embeddings task, resume) and runs the training loop's phases.
//! - [`eval`]: k-NN, linear probe, cluster metrics, in-daemon evaluation, training history,
//!   the report page. [`shards`]: IDX import, folder packing, inspection, the shard writer.
//! - [`release`]: versioned, quality-gated releases of clean embeddings (judge, backfill,
//!   fresh arrivals, the `CURRENT` pointer).
//! - [`decode`]: decode + augment on a rayon pool into batches.
//! - [`checkpoint`]: the checkpoint format and store. [`sink`]: Parquet and Kafka embeddings.
//!   [`deadletter`]: rejected records to a store prefix or a topic.
//! - [`source`]: object-store and Kafka sources, the WebDataset reader, resumable positions.
//! - [`train`]: the trainer (one ODC step), its config and metrics. [`infer`]: eval-mode
//!   embedding with a frozen network (`odcd embed`, releases).
//! - [`model`] (ResNet, neck, head; `model::ops` the CPU kernels), [`odc`] (the memory,
//!   k-means, loss), [`optim`] (momentum SGD).
//! - Ground floor, shared by everything above: [`kafka`] (librdkafka client config),
//!   [`store`] (object-store URLs), [`metrics`] (the `/metrics` endpoint and readiness),
//!   [`record`], [`device`], [`logging`], [`validate`] (the one config field error),
//!   [`dist`] (collectives for data-parallel training: one process or MPI ranks).

pub mod checkpoint;
pub mod cmd;
pub mod config;
pub mod deadletter;
pub mod decode;
pub mod device;
pub mod dist;
pub mod eval;
pub mod infer;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod odc;
pub mod optim;
pub mod record;
pub mod release;
pub mod shards;
pub mod sink;
pub mod source;
pub mod store;
pub mod topology;
pub mod train;
pub mod validate;
