//! Decode + augment: encoded records → normalised f32 batches, on a rayon pool, off the async
//! runtime.
//!
//! [`BatchStream::spawn`] takes a source's receiver and hands out `(N, C, H, W)` f32 batches
//! with the source position that covers them; `crate::topology` wires it to the configured
//! source and dead letters.

pub mod augment;
mod config;
mod image;
mod pipeline;

pub use self::config::{AugmentConfig, DecodeConfig, EvalConfig, PipelineConfig, TransformConfig};
pub use self::image::{decode_into, DecodeError};
pub use self::pipeline::{BatchDecoder, BatchStream, PipelineError};
