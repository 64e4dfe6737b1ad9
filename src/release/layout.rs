//! What a release is on the store: its folder's objects, the spec written when it is created,
//! the manifest written last when its backfill is complete, the `CURRENT` pointer, and how a
//! catalog shard names its Parquet part.
//!
//! ```text
//! <url>/CURRENT                                   {"release": ..., "prefix": ..., ...}: what consumers read
//! <url>/<id>/model.safetensors                    the frozen network
//! <url>/<id>/centring.safetensors                 `mean` (the centring, D) and `centroids` (K × D_neck)
//! <url>/<id>/release.json                         the spec: written last at creation; a folder without it is debris
//! <url>/<id>/parts/<shard part>.parquet           one file per catalog shard (key, release, step, cluster, class_label, embedding)
//! <url>/<id>/done/<shard part>.json               written after its part: the shard is embedded (rows, rejects, times)
//! <url>/<id>/manifest.json                        written last: the release is complete
//! <url>/<id>/ROLLED_BACK                          an operator rolled it back: never made current again automatically
//! ```

use serde::{Deserialize, Serialize};

use crate::decode::PipelineConfig;
use crate::eval::knn::KnnResult;
use crate::model::{FeatureKind, ModelConfig};

/// Version of the spec, manifest and pointer layout written by this build.
pub const FORMAT_VERSION: u32 = 1;
pub const CURRENT: &str = "CURRENT";
pub const SPEC: &str = "release.json";
pub const MANIFEST: &str = "manifest.json";
pub const MODEL: &str = "model.safetensors";
pub const CENTRING: &str = "centring.safetensors";
pub const PARTS: &str = "parts";
pub const DONE: &str = "done";
pub const ROLLED_BACK: &str = "ROLLED_BACK";

/// `step-<step:012>-<feature>`: sorts by step; the same checkpoint and feature always make
/// the same release (so a restart resumes the release it was building).
pub fn release_id(step: u64, feature: FeatureKind) -> String {
    format!("step-{step:012}-{feature}")
}

/// The checkpoint a release froze.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// The checkpoint store it came from.
    pub url: String,
    /// Its manifest id (`step-<step>-<unique>`).
    pub id: String,
    pub step: u64,
}

/// The figures that promoted a release (and that a later candidate is compared with).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Quality {
    /// Why it was promoted (`first release`, `k-NN +0.8 points`, `schedule`, `operator`).
    pub decision: String,
    /// Effective rank (RankMe) of its vectors on the reference sample.
    pub effective_rank: f64,
    /// The untrained network's effective rank on the same sample (the collapse guard's
    /// reference for a first release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untrained_effective_rank: Option<f64>,
    /// With a labelled `[eval]` set: weighted k-NN top-1 of its vectors (test vs train).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub knn: Vec<KnnResult>,
    /// ... and of the baselines on the same sets (`raw_pixels`, `untrained`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub baselines: std::collections::BTreeMap<String, Vec<KnnResult>>,
    /// The current release's figures when this one was promoted over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousQuality>,
}

/// The release a promotion replaced, as measured then.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PreviousQuality {
    pub release: String,
    pub effective_rank: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub knn: Vec<KnnResult>,
}

/// Written when a release is created (`release.json`): everything a worker needs to embed
/// its catalog, whatever its own config says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseSpec {
    pub format_version: u32,
    pub release: String,
    pub created_unix_secs: u64,
    pub checkpoint: CheckpointRef,
    pub feature: FeatureKind,
    /// D of the published vectors.
    pub dim: usize,
    /// The network's shape (`[model]` of the run) and K (`odc.num_clusters`).
    pub model: ModelConfig,
    pub num_clusters: usize,
    /// The decode + eval transform every image goes through (resize, centre crop, normalise).
    pub pipeline: PipelineConfig,
    /// Vectors are `normalise(feature - mean)`: the mean (tensor `mean` of `centring.safetensors`)
    /// was measured on this many images of the catalog.
    pub reference_samples: usize,
    /// The shards this release embeds: every shard under this prefix.
    pub catalog_url: String,
    pub quality: Quality,
}

/// One embedded shard (`done/<part>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartRecord {
    /// The shard, relative to the catalog prefix.
    pub shard: String,
    /// The Parquet file, relative to the release folder (`parts/<part>.parquet`).
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// Records of the shard that could not be embedded (undecodable, ...; see the dead letters).
    pub rejected: u64,
    /// When the shard object was last modified (its arrival) and when its rows were published.
    pub shard_modified_unix_secs: f64,
    pub published_unix_secs: f64,
}

/// The catalog a complete release covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Covers {
    pub catalog_url: String,
    /// Shards embedded when the release was completed (later arrivals are appended to it).
    pub shards: usize,
    /// The last shard of the catalog listing it covers (listing order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_shard: Option<String>,
}

/// Written last (`manifest.json`): the release is complete and may become current.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseManifest {
    #[serde(flatten)]
    pub spec: ReleaseSpec,
    pub completed_unix_secs: u64,
    pub rows: u64,
    pub rejected: u64,
    pub covers: Covers,
    /// The Parquet files at completion; fresh arrivals add files under `parts/` later.
    pub files: Vec<PartRecord>,
    /// `centring.safetensors` and `model.safetensors`, relative to the release folder.
    pub centring_file: String,
    pub model_file: String,
}

/// `CURRENT`: the one object consumers read. Replaced atomically (a conditional write where
/// the store supports it), only ever naming a complete release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pointer {
    pub format_version: u32,
    pub release: String,
    /// The release's folder, relative to the releases URL (`<id>/`); its rows are
    /// `<prefix>parts/*.parquet`.
    pub prefix: String,
    pub manifest: String,
    pub step: u64,
    pub feature: FeatureKind,
    pub dim: usize,
    /// Rows when the release was completed.
    pub rows: u64,
    /// The release this one replaced (the target of a rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub updated_unix_secs: u64,
}

impl Pointer {
    /// The pointer to complete release `m`, replacing `previous`.
    pub fn to(m: &ReleaseManifest, previous: Option<String>) -> Self {
        let id = &m.spec.release;
        Pointer {
            format_version: FORMAT_VERSION,
            release: id.clone(),
            prefix: format!("{id}/"),
            manifest: format!("{id}/{MANIFEST}"),
            step: m.spec.checkpoint.step,
            feature: m.spec.feature,
            dim: m.spec.dim,
            rows: m.rows,
            previous,
            updated_unix_secs: now_secs(),
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn now_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The part name of catalog shard `shard` (relative to the catalog prefix): its file stem,
/// cleaned to `[A-Za-z0-9_-]` and cut to 64 characters, then FNV-1a of the whole name, so
/// two shards never share a part and the same shard always makes the same part (a shard
/// embedded twice, by a restart or by two workers, replaces its file instead of adding one).
pub fn part_name(shard: &str) -> String {
    let base = shard.rsplit('/').next().unwrap_or(shard);
    let stem = base
        .strip_suffix(".tar.gz")
        .or_else(|| base.strip_suffix(".tgz"))
        .or_else(|| base.strip_suffix(".tar"))
        .unwrap_or(base);
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in shard.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{clean}-{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_step_and_parts_are_stable_and_distinct() {
        assert_eq!(
            release_id(1200, FeatureKind::Stage(2)),
            "step-000000001200-stage2"
        );
        assert!(release_id(99, FeatureKind::Neck) < release_id(100, FeatureKind::Neck));
        let a = part_name("train/fmnist-000001.tar");
        assert!(a.starts_with("fmnist-000001-"), "{a}");
        assert_eq!(a, part_name("train/fmnist-000001.tar"));
        assert_ne!(a, part_name("val/fmnist-000001.tar"));
        let odd = part_name("x/we ird.name.tar.gz");
        assert!(odd.starts_with("we_ird_name-"), "{odd}");
        assert!(part_name(&"a".repeat(300)).len() <= 64 + 17);
    }
}
