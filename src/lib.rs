//! odcd: Online Deep Clustering (Zhan et al., CVPR 2020) as a streaming daemon.
//!
//! Data flows one way: `source` (object store / Kafka shards) → `decode` (rayon decode +
//! augment into batches) → `train` (candle model + `odc` memory) → sinks.

pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod device;
pub mod embed;
pub mod eval;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod odc;
pub mod optim;
pub mod pipeline;
pub mod record;
pub mod shards;
pub mod sink;
pub mod source;
pub mod train;
