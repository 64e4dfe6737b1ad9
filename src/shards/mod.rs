//! Shard tooling: write deterministic WebDataset shards (from IDX files or an image folder) and
//! inspect existing ones. Mounted as `odcd shards ...` by `crate::cmd::shards`.

mod idx;
mod inspect;
mod write;

pub use self::idx::{import_idx, read_idx, Idx, IdxRange};
pub use self::inspect::{inspect, InspectSummary};
pub use self::write::{pack_dir, ShardWriter, WriteSummary};

/// Errors of the shard tools, naming the file or object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ShardsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid IDX file: {message}")]
    BadIdx { path: String, message: String },
    #[error("{message}")]
    Mismatch { message: String },
    #[error("cannot encode image {key}: {message}")]
    Encode { key: String, message: String },
    #[error("cannot write {path} to the output store: {source} (check the URL, credentials and permissions)")]
    Put {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("background task failed: {0}")]
    Join(String),
}
