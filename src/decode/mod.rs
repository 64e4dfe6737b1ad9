//! Decode + augment: encoded records → normalised f32 batches, on a rayon pool, off the async
//! runtime.
//!
//! Wiring the whole data path from config (inside a tokio runtime):
//!
//! ```text
//! let metrics = DataMetrics::register(&registry)?;            // odcd_records_*_total, ...
//! let resume: SourceState = checkpoint.source_state.unwrap_or_default();
//! let mut batches = BatchStream::from_config(source_cfg, pipeline_cfg, metrics, resume, cancel)?;
//! while let Some(batch) = batches.next().await {              // Batch: (N, C, H, W) f32
//!     train_step(&batch)?;
//!     checkpoint.source_state = Some(batches.state().clone()); // exact resume point
//! }
//! ```

pub mod augment;
mod config;
mod image;
mod pipeline;

pub use self::config::{
    AugmentConfig, DeadLetterConfig, DecodeConfig, EvalConfig, PipelineConfig, TransformConfig,
};
pub use self::image::{decode_into, DecodeError};
pub use self::pipeline::{BatchDecoder, BatchStream, PipelineError};
