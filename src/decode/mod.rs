//! Decode + augment: encoded records → normalised f32 batches, on a rayon pool, off the async
//! runtime.

pub mod augment;
mod config;
mod image;
mod pipeline;

pub use self::config::{
    AugmentConfig, DeadLetterConfig, DecodeConfig, EvalConfig, PipelineConfig, TransformConfig,
};
pub use self::image::{decode_into, DecodeError};
pub use self::pipeline::{BatchDecoder, BatchStream, PipelineError};
