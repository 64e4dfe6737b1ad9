//! Kafka source: one message = one image (key = sample key, optional class-label and
//! content-type headers) or one whole WebDataset tar shard, read by a consumer group.
//!
//! Positions are partition offsets ([`Position::Kafka`](crate::record::Position::Kafka)); the
//! consumer of the items keeps them in
//! [`SourceState::kafka`](crate::source::SourceState::kafka) and stores them in checkpoints.
//! Offsets are committed to Kafka only through [`KafkaHandle::commit`], which the daemon calls
//! once the checkpoint that covers them is durable (and `odcd embed` once the outputs of a
//! batch are delivered), so a restart neither loses nor skips records. On (re)assignment a
//! partition resumes from the position in the checkpoint, else from the committed offset, else
//! from `start`.
//!
//! Each partition's messages are read from its own librdkafka queue by its own task (split off
//! when the partition is first assigned), so polling, the largest cost per message, runs on
//! every core; records of one partition stay in offset order. Those queues are read in batches
//! (`partition`: one librdkafka call per burst instead of an event object and an allocation
//! per message).
//!
//! Broker outages are librdkafka's to ride out (it reconnects with backoff); the source reports
//! the connection state ([`KafkaHandle::connected`], shown by `/readyz`) and never ends on an
//! error. Consumer lag per partition is exported as `odcd_source_lag_records{topic,partition}`.
//!
//! Layout: `config` (the `[source]` section), `group` (resume positions and the group
//! callbacks), `handle` ([`KafkaHandle`]), `reader` ([`KafkaSource`] and the read loop),
//! `message` (message → items), `partition` (the batch-queue FFI, this source's only unsafe
//! code).

// `SourceItem`'s Err is no larger than its Ok; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

mod config;
mod group;
mod handle;
mod message;
mod partition;
mod reader;
#[cfg(test)]
mod tests;

pub use self::config::{KafkaSourceConfig, MessageFormat, StartFrom};
pub use self::group::PartitionMark;
pub use self::handle::KafkaHandle;
pub use self::message::parse_message;
pub use self::reader::KafkaSource;
