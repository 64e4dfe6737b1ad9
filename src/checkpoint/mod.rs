//! Crash-safe checkpoints on any object store (`file://`, `s3://`, `gs://`, `az://`,
//! `memory://`).
//!
//! A checkpoint is a set of parts written first, then a small JSON manifest written LAST:
//!
//! ```text
//! <prefix>/step-<step:012>-<unique>/model.safetensors      model parameters + buffers
//! <prefix>/step-<step:012>-<unique>/optimizer.safetensors  SGD momentum buffers
//! <prefix>/step-<step:012>-<unique>/memory.safetensors     ODC memory tensors (optional)
//! <prefix>/step-<step:012>-<unique>/memory-keys.bin        ODC memory keys (optional)
//! <prefix>/step-<step:012>-<unique>/state.json             step, source positions, RNG, config
//! <prefix>/manifests/step-<step:012>-<unique>.json         the manifest: parts, sizes, CRC32s
//! ```
//!
//! Readers trust only manifests, so a crash at any point leaves either a whole checkpoint or
//! one that is invisible. Every part is verified (size and CRC32) on load.

mod config;
mod format;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::odc::{StreamingMemory, StreamingState};
pub use config::CheckpointConfig;
use format::{MemorySrc, PartReader, PartWriter, ReadError, WriteError};

/// Version of the manifest / part layout written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// Folder (under the prefix) holding the manifests.
pub const MANIFEST_DIR: &str = "manifests";

/// Part names inside a checkpoint folder.
pub const PART_MODEL: &str = "model.safetensors";
pub const PART_OPTIMIZER: &str = "optimizer.safetensors";
pub const PART_MEMORY: &str = "memory.safetensors";
pub const PART_MEMORY_KEYS: &str = "memory-keys.bin";
pub const PART_STATE: &str = "state.json";

/// Errors of the checkpoint store. Each names the store URL and the part or manifest, and
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint URL `{url}` is not usable: {message} (use file:///abs/path, s3://bucket/prefix, gs://..., az://..., memory:// or a local path)")]
    BadUrl { url: String, message: String },
    #[error("checkpoint store `{url}`: cannot write `{part}`: {message} (check that the location exists and is writable with these credentials; no manifest was written, so the previous checkpoint stays the latest)")]
    Write {
        url: String,
        part: String,
        message: String,
    },
    #[error("checkpoint store `{url}`: cannot encode `{part}`: {message}")]
    Encode {
        url: String,
        part: String,
        message: String,
    },
    #[error("checkpoint store `{url}`: cannot read `{path}`: {message} (check connectivity and read permissions)")]
    Read {
        url: String,
        path: String,
        message: String,
    },
    #[error("checkpoint store `{url}`: cannot list `{path}`: {message} (check connectivity and list permissions)")]
    List {
        url: String,
        path: String,
        message: String,
    },
    #[error("checkpoint `{id}` in `{url}`: part `{part}` is missing (deleted or never uploaded); use an older checkpoint (`load_latest_valid` does)")]
    MissingPart {
        url: String,
        id: String,
        part: String,
    },
    #[error("checkpoint `{id}` in `{url}`: part `{part}` is {found} bytes, the manifest says {expected} (truncated or overwritten); use an older checkpoint")]
    SizeMismatch {
        url: String,
        id: String,
        part: String,
        expected: u64,
        found: u64,
    },
    #[error("checkpoint `{id}` in `{url}`: part `{part}` has CRC32 {found:08x}, the manifest says {expected:08x} (corrupted); use an older checkpoint")]
    CrcMismatch {
        url: String,
        id: String,
        part: String,
        expected: u32,
        found: u32,
    },
    #[error("checkpoint `{id}` in `{url}`: part `{part}` cannot be decoded: {message}")]
    Corrupt {
        url: String,
        id: String,
        part: String,
        message: String,
    },
    #[error("checkpoint store `{url}`: manifest `{path}` is unreadable: {message}")]
    BadManifest {
        url: String,
        path: String,
        message: String,
    },
    #[error("checkpoint store `{url}`: manifest `{path}` has format version {found}; this build reads up to {supported} (upgrade odcd)")]
    UnsupportedVersion {
        url: String,
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("checkpoint store `{url}`: no checkpoint at step {step}")]
    NoSuchStep { url: String, step: u64 },
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

impl CheckpointError {
    /// The store could not be reached or read (network, permissions), as opposed to a
    /// checkpoint that was read and found damaged. Worth retrying; never a reason to skip to an
    /// older checkpoint.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            CheckpointError::Read { .. } | CheckpointError::List { .. }
        )
    }
}

/// Everything needed to resume training exactly.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// Model parameters and buffers (`ParamStore::to_safetensors`).
    pub model_safetensors: Vec<u8>,
    /// Optimizer state (`Sgd::state`); moved to the CPU on save, loaded on the CPU.
    pub optimizer: BTreeMap<String, candle_core::Tensor>,
    /// The streaming ODC memory (`StreamingMemory::export`), if the run has one.
    pub memory: Option<StreamingState>,
    /// Source positions (e.g. a serialised `SourceState`, or Kafka offsets).
    pub source_state: serde_json::Value,
    /// Trainer RNG state / seed.
    pub rng: serde_json::Value,
    /// Snapshot of the daemon config the run used.
    pub config: serde_json::Value,
    /// Anything else the caller wants back on resume.
    pub extra: serde_json::Value,
    /// Free-form summary copied into the manifest (model / ODC config summary); shown by
    /// `odcd checkpoint inspect` without reading the parts.
    pub metadata: serde_json::Value,
}

impl Checkpoint {
    /// A checkpoint with the model only; fill in the other fields as needed.
    pub fn new(step: u64, model_safetensors: Vec<u8>) -> Self {
        Checkpoint {
            step,
            model_safetensors,
            optimizer: BTreeMap::new(),
            memory: None,
            source_state: serde_json::Value::Null,
            rng: serde_json::Value::Null,
            config: serde_json::Value::Null,
            extra: serde_json::Value::Null,
            metadata: serde_json::Value::Null,
        }
    }
}

/// One part as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// Part name (`model.safetensors`, ...).
    pub name: String,
    /// Path relative to the store prefix.
    pub path: String,
    pub size: u64,
    pub crc32: u32,
}

/// Shape of the saved ODC memory, for inspection without reading the bank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySummary {
    pub fill: u64,
    pub capacity: u64,
    pub k: u64,
    pub dim: u64,
}

/// The manifest: the only object readers trust. Written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// `step-<step:012>-<unique>`: names the parts folder and the manifest object.
    pub id: String,
    pub step: u64,
    /// Unix seconds.
    pub created_unix_secs: u64,
    pub parts: Vec<PartInfo>,
    #[serde(default)]
    pub memory: Option<MemorySummary>,
    /// Free-form metadata (`Checkpoint::metadata`).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

impl Manifest {
    /// Sum of the part sizes.
    pub fn total_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }

    pub fn part(&self, name: &str) -> Option<&PartInfo> {
        self.parts.iter().find(|p| p.name == name)
    }
}

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format_version: u32,
    pub step: u64,
    pub source_state: serde_json::Value,
    pub rng: serde_json::Value,
    pub config: serde_json::Value,
    pub extra: serde_json::Value,
}

/// A manifest that could not be read, reported by [`CheckpointStore::list_report`].
#[derive(Debug)]
pub struct UnreadableManifest {
    pub path: String,
    pub error: CheckpointError,
}

/// Result of [`CheckpointStore::list_report`].
#[derive(Debug, Default)]
pub struct Listing {
    /// Readable manifests, sorted by step (then creation time, then id).
    pub manifests: Vec<Manifest>,
    pub unreadable: Vec<UnreadableManifest>,
}

/// Checkpoints under one object-store prefix.
pub struct CheckpointStore {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    keep: usize,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{:04x}{n:04x}", std::process::id() & 0xffff)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `prefix` + a relative `a/b/c` path.
fn join(prefix: &Path, rel: &str) -> Path {
    let mut p = prefix.clone();
    for seg in rel.split('/').filter(|s| !s.is_empty()) {
        p = p.child(seg);
    }
    p
}

/// The step encoded in `step-<step:012>-...`.
fn step_of_id(id: &str) -> Option<u64> {
    id.strip_prefix("step-")?.split('-').next()?.parse().ok()
}

impl CheckpointStore {
    /// Opens the store at `url` (a plain local path is accepted too). `options` override the
    /// `AWS_*` / `GOOGLE_*` / `AZURE_*` environment variables. `keep`: how many checkpoints
    /// [`Self::save`] keeps (0 = keep all).
    pub fn open(url: &str, options: &BTreeMap<String, String>, keep: usize) -> Result<Self> {
        let url = crate::store::local_path_to_url(url, "checkpoint.url").map_err(|e| {
            CheckpointError::BadUrl {
                url: url.to_string(),
                message: e.to_string(),
            }
        })?;
        let (store, prefix) =
            crate::store::open_store(&url, options).map_err(|e| CheckpointError::BadUrl {
                url: url.clone(),
                message: e.to_string(),
            })?;
        Ok(CheckpointStore {
            url,
            store,
            prefix,
            keep,
        })
    }

    /// The normalised URL of the store.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store and prefix (for tools and tests).
    pub fn object_store(&self) -> (&Arc<dyn ObjectStore>, &Path) {
        (&self.store, &self.prefix)
    }

    /// Object path of a manifest.
    pub fn manifest_path(&self, id: &str) -> Path {
        self.prefix.child(MANIFEST_DIR).child(format!("{id}.json"))
    }

    /// Object path of a part of a manifest.
    pub fn part_path(&self, part: &PartInfo) -> Path {
        join(&self.prefix, &part.path)
    }

    fn write_err(&self, part: &str, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Write {
            url: self.url.clone(),
            part: part.to_string(),
            message: e.to_string(),
        }
    }

    async fn write_part_bytes(&self, dir: &str, name: &str, data: &[u8]) -> Result<PartInfo> {
        let rel = format!("{dir}/{name}");
        let mut w = PartWriter::new(self.store.clone(), join(&self.prefix, &rel));
        for chunk in data.chunks(format::CHUNK_BYTES) {
            if let Err(e) = w.write(chunk).await {
                w.abort().await;
                return Err(self.write_err(&rel, e));
            }
        }
        let (size, crc32) = w.finish().await.map_err(|e| self.write_err(&rel, e))?;
        Ok(PartInfo {
            name: name.to_string(),
            path: rel,
            size,
            crc32,
        })
    }

    async fn write_part_streamed(
        &self,
        dir: &str,
        name: &str,
        src: MemorySrc<'_>,
        keys: bool,
    ) -> Result<PartInfo> {
        let rel = format!("{dir}/{name}");
        let mut w = PartWriter::new(self.store.clone(), join(&self.prefix, &rel));
        let res = if keys {
            format::write_keys(&mut w, src).await
        } else {
            format::write_memory(&mut w, src).await
        };
        match res {
            Ok(()) => {}
            Err(WriteError::Store(e)) => {
                w.abort().await;
                return Err(self.write_err(&rel, e));
            }
            Err(WriteError::Encode(m)) => {
                w.abort().await;
                return Err(CheckpointError::Encode {
                    url: self.url.clone(),
                    part: rel,
                    message: m,
                });
            }
        }
        let (size, crc32) = w.finish().await.map_err(|e| self.write_err(&rel, e))?;
        Ok(PartInfo {
            name: name.to_string(),
            path: rel,
            size,
            crc32,
        })
    }

    /// Writes the parts, then the manifest, then deletes checkpoints beyond the last `keep`
    /// (manifest first, then parts). A failure before the manifest leaves nothing visible;
    /// a failure while pruning is logged, not returned (the new checkpoint is whole).
    /// The memory, if any, is `ckpt.memory` (an exported copy); the daemon uses
    /// [`Self::save_live`] instead.
    pub async fn save(&self, ckpt: &Checkpoint) -> Result<Manifest> {
        self.save_from(ckpt, ckpt.memory.as_ref().map(MemorySrc::State))
            .await
    }

    /// [`Self::save`] with the memory read in place from the live `memory` (`ckpt.memory` is
    /// ignored): the bank, labels and keys go to the store chunk by chunk, and no copy of them
    /// is made, so a save costs a few chunk buffers on top of the memory instead of a second
    /// memory. The borrow keeps the memory unchanged for the whole save: the daemon saves
    /// between steps, with training paused, so the checkpoint is one consistent step. Same
    /// bytes as saving `memory.export()`.
    pub async fn save_live(&self, ckpt: &Checkpoint, memory: &StreamingMemory) -> Result<Manifest> {
        self.save_from(ckpt, Some(MemorySrc::Live(memory))).await
    }

    async fn save_from(&self, ckpt: &Checkpoint, mem: Option<MemorySrc<'_>>) -> Result<Manifest> {
        let id = format!("step-{:012}-{}", ckpt.step, unique_suffix());
        let mut parts = Vec::new();
        parts.push(
            self.write_part_bytes(&id, PART_MODEL, &ckpt.model_safetensors)
                .await?,
        );
        let opt =
            format::optimizer_bytes(&ckpt.optimizer).map_err(|m| CheckpointError::Encode {
                url: self.url.clone(),
                part: format!("{id}/{PART_OPTIMIZER}"),
                message: m,
            })?;
        parts.push(self.write_part_bytes(&id, PART_OPTIMIZER, &opt).await?);
        drop(opt);
        let mut memory = None;
        if let Some(src) = mem {
            parts.push(
                self.write_part_streamed(&id, PART_MEMORY, src, false)
                    .await?,
            );
            parts.push(
                self.write_part_streamed(&id, PART_MEMORY_KEYS, src, true)
                    .await?,
            );
            let cfg = src.config();
            memory = Some(MemorySummary {
                fill: src.fill() as u64,
                capacity: cfg.capacity as u64,
                k: cfg.k as u64,
                dim: cfg.dim as u64,
            });
        }
        let state = StateFile {
            format_version: FORMAT_VERSION,
            step: ckpt.step,
            source_state: ckpt.source_state.clone(),
            rng: ckpt.rng.clone(),
            config: ckpt.config.clone(),
            extra: ckpt.extra.clone(),
        };
        let state_bytes =
            serde_json::to_vec_pretty(&state).map_err(|e| CheckpointError::Encode {
                url: self.url.clone(),
                part: format!("{id}/{PART_STATE}"),
                message: e.to_string(),
            })?;
        parts.push(self.write_part_bytes(&id, PART_STATE, &state_bytes).await?);

        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            id: id.clone(),
            step: ckpt.step,
            created_unix_secs: now_secs(),
            parts,
            memory,
            metadata: ckpt.metadata.clone(),
        };
        let mbytes = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Encode {
            url: self.url.clone(),
            part: format!("{MANIFEST_DIR}/{id}.json"),
            message: e.to_string(),
        })?;
        self.store
            .put(&self.manifest_path(&id), mbytes.into())
            .await
            .map_err(|e| self.write_err(&format!("{MANIFEST_DIR}/{id}.json"), e))?;
        tracing::info!(url = %self.url, step = ckpt.step, id = %id, bytes = manifest.total_bytes(), "checkpoint saved");

        if let Err(e) = self.prune().await {
            tracing::warn!(url = %self.url, error = %e, "could not delete old checkpoints; they will be retried at the next save");
        }
        Ok(manifest)
    }

    /// Deletes checkpoints beyond the last `keep` (manifest first, then its parts), and part
    /// folders without a manifest that are older than the oldest kept checkpoint (left by a
    /// crash mid-save).
    pub async fn prune(&self) -> Result<()> {
        if self.keep == 0 {
            return Ok(());
        }
        let manifests = self.list().await?;
        if manifests.len() <= self.keep {
            return Ok(());
        }
        let cut = manifests.len() - self.keep;
        let oldest_kept = manifests[cut].step;
        for m in &manifests[..cut] {
            let mp = self.manifest_path(&m.id);
            match self.store.delete(&mp).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.write_err(&format!("{MANIFEST_DIR}/{}.json", m.id), e)),
            }
            self.delete_dir(&m.id).await?;
        }
        // Orphaned folders (parts but no manifest) from crashed saves.
        let listed = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|e| self.list_err(&self.prefix, e))?;
        let live: std::collections::BTreeSet<&str> =
            manifests[cut..].iter().map(|m| m.id.as_str()).collect();
        for dir in listed.common_prefixes {
            let Some(name) = dir.filename() else { continue };
            if live.contains(name) {
                continue;
            }
            if step_of_id(name).is_some_and(|s| s < oldest_kept) {
                self.delete_dir(name).await?;
            }
        }
        Ok(())
    }

    async fn delete_dir(&self, id: &str) -> Result<()> {
        let dir = self.prefix.child(id);
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.list_err(&dir, e))?;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.write_err(o.location.as_ref(), e)),
            }
        }
        Ok(())
    }

    fn list_err(&self, path: &Path, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::List {
            url: self.url.clone(),
            path: path.to_string(),
            message: e.to_string(),
        }
    }

    /// Every manifest, sorted by step, plus those that could not be read.
    pub async fn list_report(&self) -> Result<Listing> {
        let dir = self.prefix.child(MANIFEST_DIR);
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.list_err(&dir, e))?;
        let mut out = Listing::default();
        for o in objects {
            if !o.location.as_ref().ends_with(".json") {
                continue;
            }
            match self.read_manifest(&o.location).await {
                Ok(m) => out.manifests.push(m),
                Err(e) => out.unreadable.push(UnreadableManifest {
                    path: o.location.to_string(),
                    error: e,
                }),
            }
        }
        out.manifests.sort_by(|a, b| {
            (a.step, a.created_unix_secs, &a.id).cmp(&(b.step, b.created_unix_secs, &b.id))
        });
        Ok(out)
    }

    /// Readable manifests sorted by step; unreadable ones are logged and skipped.
    pub async fn list(&self) -> Result<Vec<Manifest>> {
        let listing = self.list_report().await?;
        for u in &listing.unreadable {
            tracing::warn!(url = %self.url, path = %u.path, error = %u.error, "skipping unreadable checkpoint manifest");
        }
        Ok(listing.manifests)
    }

    /// The manifest with the highest step.
    pub async fn latest(&self) -> Result<Option<Manifest>> {
        Ok(self.list().await?.pop())
    }

    async fn read_manifest(&self, path: &Path) -> Result<Manifest> {
        let bytes = self
            .store
            .get(path)
            .await
            .map_err(|e| self.read_err(path, e))?
            .bytes()
            .await
            .map_err(|e| self.read_err(path, e))?;
        let bad = |message: String| CheckpointError::BadManifest {
            url: self.url.clone(),
            path: path.to_string(),
            message,
        };
        // Check the version before the shape, so a newer format says "upgrade".
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let version = v
            .get("format_version")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| bad("no format_version".into()))?;
        if version > FORMAT_VERSION as u64 {
            return Err(CheckpointError::UnsupportedVersion {
                url: self.url.clone(),
                path: path.to_string(),
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: FORMAT_VERSION,
            });
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        if path.filename() != Some(format!("{}.json", m.id).as_str()) {
            return Err(bad(format!("names id `{}`, not its own file name", m.id)));
        }
        for p in &m.parts {
            if p.path.split('/').any(|s| s == ".." || s == ".") {
                return Err(bad(format!("part path `{}` escapes the prefix", p.path)));
            }
        }
        Ok(m)
    }

    fn read_err(&self, path: &Path, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Read {
            url: self.url.clone(),
            path: path.to_string(),
            message: e.to_string(),
        }
    }

    /// Reads one part and checks its size and CRC32 against the manifest.
    pub async fn read_part(&self, m: &Manifest, name: &str) -> Result<bytes::Bytes> {
        let part = m.part(name).ok_or_else(|| CheckpointError::MissingPart {
            url: self.url.clone(),
            id: m.id.clone(),
            part: name.to_string(),
        })?;
        let path = self.part_path(part);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| self.read_err(&path, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::MissingPart {
                    url: self.url.clone(),
                    id: m.id.clone(),
                    part: part.path.clone(),
                })
            }
            Err(e) => return Err(self.read_err(&path, e)),
        };
        if bytes.len() as u64 != part.size {
            return Err(CheckpointError::SizeMismatch {
                url: self.url.clone(),
                id: m.id.clone(),
                part: part.path.clone(),
                expected: part.size,
                found: bytes.len() as u64,
            });
        }
        let crc = crc32fast::hash(&bytes);
        if crc != part.crc32 {
            return Err(CheckpointError::CrcMismatch {
                url: self.url.clone(),
                id: m.id.clone(),
                part: part.path.clone(),
                expected: part.crc32,
                found: crc,
            });
        }
        Ok(bytes)
    }

    /// Reads one part and decodes it as it streams in (never holding the whole part), then
    /// checks its size and CRC32 against the manifest. A size or CRC32 mismatch is reported
    /// before a decoding error, as [`Self::read_part`] would, and the object's size is
    /// checked before anything is decoded, so what the decoder allocates is bounded by the
    /// manifest.
    async fn read_part_decoded<T>(
        &self,
        m: &Manifest,
        name: &str,
        decode: impl for<'r> FnOnce(
            &'r mut PartReader,
            u64,
        )
            -> futures::future::BoxFuture<'r, std::result::Result<T, ReadError>>,
    ) -> Result<T> {
        let part = m.part(name).ok_or_else(|| CheckpointError::MissingPart {
            url: self.url.clone(),
            id: m.id.clone(),
            part: name.to_string(),
        })?;
        let path = self.part_path(part);
        let get = match self.store.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::MissingPart {
                    url: self.url.clone(),
                    id: m.id.clone(),
                    part: part.path.clone(),
                })
            }
            Err(e) => return Err(self.read_err(&path, e)),
        };
        let size_mismatch = |found: u64| CheckpointError::SizeMismatch {
            url: self.url.clone(),
            id: m.id.clone(),
            part: part.path.clone(),
            expected: part.size,
            found,
        };
        if get.meta.size != part.size {
            return Err(size_mismatch(get.meta.size));
        }
        let mut r = PartReader::new(get).map_err(|e| self.read_err(&path, e))?;
        let decoded = match decode(&mut r, part.size).await {
            Ok(v) => match r.has_more().await {
                Ok(false) => Ok(v),
                Ok(true) => Err("trailing bytes after the data".to_string()),
                Err(e) => return Err(self.read_err(&path, e)),
            },
            Err(ReadError::Store(e)) => return Err(self.read_err(&path, e)),
            Err(ReadError::Corrupt(msg)) => Err(msg),
        };
        r.drain().await.map_err(|e| self.read_err(&path, e))?;
        let (size, crc) = r.size_crc();
        if size != part.size {
            return Err(size_mismatch(size));
        }
        if crc != part.crc32 {
            return Err(CheckpointError::CrcMismatch {
                url: self.url.clone(),
                id: m.id.clone(),
                part: part.path.clone(),
                expected: part.crc32,
                found: crc,
            });
        }
        decoded.map_err(|msg| self.corrupt(m, name, msg))
    }

    fn corrupt(&self, m: &Manifest, part: &str, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Corrupt {
            url: self.url.clone(),
            id: m.id.clone(),
            part: format!("{}/{part}", m.id),
            message: message.into(),
        }
    }

    /// Reads `state.json` only (cheap; used by `inspect`).
    pub async fn read_state(&self, m: &Manifest) -> Result<StateFile> {
        let bytes = self.read_part(m, PART_STATE).await?;
        serde_json::from_slice(&bytes).map_err(|e| self.corrupt(m, PART_STATE, e.to_string()))
    }

    /// Reads and verifies every part of `m`.
    pub async fn load(&self, m: &Manifest) -> Result<Checkpoint> {
        if m.format_version > FORMAT_VERSION {
            return Err(CheckpointError::UnsupportedVersion {
                url: self.url.clone(),
                path: self.manifest_path(&m.id).to_string(),
                found: m.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let state = self.read_state(m).await?;
        if state.step != m.step {
            return Err(self.corrupt(
                m,
                PART_STATE,
                format!("step {} but the manifest says {}", state.step, m.step),
            ));
        }
        let model = self.read_part(m, PART_MODEL).await?.to_vec();
        let opt_bytes = self.read_part(m, PART_OPTIMIZER).await?;
        let optimizer = format::optimizer_from_bytes(&opt_bytes)
            .map_err(|e| self.corrupt(m, PART_OPTIMIZER, e))?;
        drop(opt_bytes);
        let memory = if m.part(PART_MEMORY).is_some() {
            let keys = self
                .read_part_decoded(m, PART_MEMORY_KEYS, |r, size| {
                    Box::pin(format::read_keys(r, size))
                })
                .await?;
            Some(
                self.read_part_decoded(m, PART_MEMORY, move |r, size| {
                    Box::pin(format::read_memory(r, size, keys))
                })
                .await?,
            )
        } else {
            None
        };
        Ok(Checkpoint {
            step: m.step,
            model_safetensors: model,
            optimizer,
            memory,
            source_state: state.source_state,
            rng: state.rng,
            config: state.config,
            extra: state.extra,
            metadata: m.metadata.clone(),
        })
    }

    /// Loads the newest checkpoint that verifies, falling back to older ones when a part is
    /// missing or corrupt (each skip is logged). `Ok(None)` when there is none.
    pub async fn load_latest_valid(&self) -> Result<Option<(Manifest, Checkpoint)>> {
        let manifests = self.list().await?;
        for m in manifests.into_iter().rev() {
            match self.load(&m).await {
                Ok(c) => return Ok(Some((m, c))),
                // The store itself failing says nothing about this checkpoint: falling back to an
                // older one (or to none, a fresh start) would silently rewind training.
                Err(e) if e.is_transport() => return Err(e),
                Err(e) => {
                    tracing::warn!(url = %self.url, id = %m.id, error = %e, "checkpoint does not verify; trying the previous one")
                }
            }
        }
        Ok(None)
    }

    /// The manifest at `step` (the newest one if several), or the latest when `None`.
    pub async fn find(&self, step: Option<u64>) -> Result<Option<Manifest>> {
        let all = self.list().await?;
        Ok(match step {
            None => all.into_iter().last(),
            Some(s) => all.into_iter().rev().find(|m| m.step == s),
        })
    }
}
