//! ODC memory core: the samples memory and centroids memory of Online Deep Clustering
//! (Zhan et al., CVPR 2020), its streaming form, the initial k-means and the weighted loss.
//!
//! - [`OdcMemory`] (`memory.rs`): slot-indexed bank of unit-length features, labels, centroids,
//!   incremental cluster sizes and member lists. Reproduces the conformance vectors in
//!   `shared/conformance/odc/vectors` (see `tests/odc_conformance.rs`).
//! - [`two_means`] (`two_means.rs`): the project's deterministic 2-means used to split the
//!   largest cluster.
//! - [`class_weights`], [`weighted_cross_entropy`], [`weighted_cross_entropy_tensor`]
//!   (`loss.rs`): ODC re-weighting and its weighted-mean cross-entropy (f64 reference and candle).
//! - [`StreamingMemory`] (`stream.rs`): bounded memory keyed by sample key with FIFO or
//!   reservoir eviction; the API the trainer calls every step.
//! - [`kmeans`] (`kmeans.rs`): faiss-style initial clustering.
//! - [`MemoryCompute`] (`compute.rs`): whether the relabel, the centroid recompute and the
//!   k-means passes run as host kernels or as candle tensors on the training device.
//!
//! Every fallible entry point returns [`OdcError`]; nothing here panics on bad input.

pub(crate) mod linalg;

pub mod compute;

pub mod kmeans;
pub mod loss;
pub mod memory;
pub mod stream;
pub mod two_means;

pub use compute::MemoryCompute;
pub use kmeans::{kmeans, kmeans_on, KMeansConfig, KMeansResult};
pub use linalg::normalise_rows;
pub use loss::{class_weights, weighted_cross_entropy, weighted_cross_entropy_tensor};
pub use memory::{OdcMemory, SampleUpdate, SmallClusterOutcome, SmallClusterReport, SplitRecord};
pub use stream::{
    AfterStep, EvictionPolicy, MemoryEntry, MemoryStats, MinCluster, Prepared, StepStats,
    StreamConfig, StreamingMemory, StreamingScalars, StreamingState,
};
pub use two_means::{two_means, TwoMeansSplit, TWO_MEANS_ROUNDS};

/// `normalise(x) = x / (||x||_2 + NORM_EPS)`; the eps is added to the norm, so a zero row stays zero.
pub const NORM_EPS: f64 = 1e-10;
/// Default class-weight eps (OpenSelfSup value; mmselfsup uses 1e-10).
pub const WEIGHT_EPS: f64 = 1e-5;
/// Default class-weight power.
pub const WEIGHT_POWER: f64 = 0.5;

/// Errors of the ODC memory core. Messages name the argument and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OdcError {
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: row {row} contains NaN or infinity")]
    NonFinite { what: &'static str, row: usize },
    #[error("{what}: label {label} is out of range (k = {k})")]
    LabelOutOfRange {
        what: &'static str,
        label: u32,
        k: usize,
    },
    #[error("slot {slot} is out of range (capacity {capacity})")]
    SlotOutOfRange { slot: u32, capacity: usize },
    #[error("slot {slot} is empty")]
    SlotEmpty { slot: u32 },
    #[error("slot {slot} is already occupied")]
    SlotOccupied { slot: u32 },
    #[error("duplicate sample key {0:?}")]
    DuplicateKey(String),
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    #[error("checkpoint state is inconsistent: {0}")]
    BadState(String),
    #[error("ODC memory on the training device failed: {0} (the device holds a (capacity + 1) × dim f32 copy of the bank; if it is out of memory, run the memory on the host)")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, OdcError>;
