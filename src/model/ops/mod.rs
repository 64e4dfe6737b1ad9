//! The CPU kernels behind the model, kept apart from it (as candle keeps its backends apart
//! from its models): candle custom ops with hand-written backwards for the f32 CPU training
//! step. Off the CPU, and with `train.kernels = "generic"`, the model takes the generic path
//! instead (candle ops, see `model/mod.rs`).
//!
//! - `conv.rs`: the conv2d custom ops (im2col + GEMM forward, two GEMMs + col2im backward),
//!   [`conv2d`] and `conv2d_param`.
//! - `gemm.rs`: GEMM operand plumbing (strided views, product shapes) and the `gemm` calls.
//! - `im2col.rs`: the conv geometry, im2col / col2im and the column-matrix re-layouts.
//! - `batchnorm.rs`: training-mode batch norm (+ ReLU) as one op, [`batch_norm_train_cpu`].
//! - `maxpool.rs`: padded, overlapping max-pool with a backward, [`MaxPool2d`].
//! - `cpu.rs`: helpers the kernels share (buffers written without a zero-fill, contiguous
//!   f32 views) and the process-wide CPU settings (candle's pool, the allocator).

pub mod batchnorm;
pub mod conv;
pub(super) mod cpu;
mod gemm;
mod im2col;
pub mod maxpool;

pub use batchnorm::{batch_norm_train_cpu, batch_norm_train_cpu_sync, BatchStats, BnSync};
pub(crate) use conv::conv2d_param;
pub use conv::{conv2d, WeightGrads};
pub use maxpool::MaxPool2d;
