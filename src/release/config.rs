//! `[releases]`: where releases go, which feature they publish, which checkpoints become
//! candidates, how a candidate is judged, and how much of the machine building them may take.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::kafka::ReleaseKafkaConfig;
use crate::model::FeatureKind;
use crate::validate::FieldError;

/// Who embeds a pending release's catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backfill {
    /// The daemon itself, on a bounded share of the CPU while it trains.
    #[default]
    InProcess,
    /// `odcd release work` processes (a fleet); the daemon only decides and finalises.
    Fleet,
}

/// `[releases.promote]`: when a candidate checkpoint becomes the next release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteConfig {
    /// No candidate before this many training steps (ODC needs some epochs before its
    /// features are worth publishing; docs/evaluation.md).
    #[serde(default)]
    pub min_steps: u64,
    /// At most one promotion per this many seconds: each promotion embeds the whole catalog
    /// again. The first release and the last checkpoint of a run that ends by itself are
    /// never held back by it.
    #[serde(default = "default_min_interval_secs")]
    pub min_interval_secs: u64,
    /// With a labelled `[eval]` set: the candidate's k-NN top-1 (0..1, at the first k of
    /// `eval.k`, with the release's feature and centring) must beat the current release's by
    /// this much, and both baselines (raw pixels, the untrained network) by any margin.
    #[serde(default = "default_min_knn_gain")]
    pub min_knn_gain: f64,
    /// Collapse guard, with or without labels: the candidate's effective rank (RankMe) on the
    /// reference sample must be at least this fraction of the current release's ...
    #[serde(default = "default_min_rank_ratio")]
    pub min_rank_ratio: f64,
    /// ... and at least this, always (the first release has no other reference: an untrained
    /// network's random features are near full rank, 757–809 on Fashion-MNIST's stage maps
    /// against 598–629 for trained ones, so it is no yardstick for collapse).
    #[serde(default = "default_min_effective_rank")]
    pub min_effective_rank: f64,
}

fn default_min_interval_secs() -> u64 {
    3600
}
fn default_min_knn_gain() -> f64 {
    0.005
}
fn default_min_rank_ratio() -> f64 {
    0.5
}
fn default_min_effective_rank() -> f64 {
    16.0
}

impl Default for PromoteConfig {
    fn default() -> Self {
        PromoteConfig {
            min_steps: 0,
            min_interval_secs: default_min_interval_secs(),
            min_knn_gain: default_min_knn_gain(),
            min_rank_ratio: default_min_rank_ratio(),
            min_effective_rank: default_min_effective_rank(),
        }
    }
}

/// `[releases]`: versioned, quality-gated releases of clean embeddings (docs/embeddings.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasesConfig {
    /// Where releases go: a local path or a file:///, s3://, gs://, az:// URL. Each release
    /// is a folder `<release id>/`; `CURRENT` names the one consumers read.
    pub url: String,
    /// object_store options for `url` (endpoints; secrets come from the environment).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The feature published: `backbone` (pooled last stage), `neck`, `spatial`, `stageN`,
    /// `stagesN` (docs/evaluation.md: `stage2` for 28–32 px images).
    #[serde(default)]
    pub feature: FeatureKind,
    /// What a release embeds: every shard under this prefix (default: `source.url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_url: Option<String>,
    /// object_store options for `catalog_url` (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_options: Option<BTreeMap<String, String>>,
    /// Every N-th checkpoint is a candidate.
    #[serde(default = "default_every_checkpoints")]
    pub every_checkpoints: u64,
    /// Images of the catalog (its first ones) on which a candidate's centring mean and
    /// effective rank are measured.
    #[serde(default = "default_reference_samples")]
    pub reference_samples: usize,
    /// Complete releases kept (the current one is always kept): rollback targets.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// `in_process` (default) or `fleet` (`odcd release work` processes build releases).
    #[serde(default)]
    pub backfill: Backfill,
    /// Share of the machine's cores the in-process release work may use while training runs
    /// (0 < share <= 1): it runs on ceil(share × cores) threads, paused so that their busy
    /// time stays within share × cores.
    #[serde(default = "default_cpu_share")]
    pub cpu_share: f64,
    /// Re-measure the release network's BatchNorm running statistics on the reference sample
    /// through the eval transform before freezing it (`odcd eval --precise-bn`): training's
    /// come from augmented crops. The untrained baseline is calibrated the same way.
    #[serde(default = "default_true")]
    pub calibrate_bn: bool,
    /// Images per forward pass of the release network.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How often the catalog is listed for shards no release holds yet (milliseconds).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    #[serde(default)]
    pub promote: PromoteConfig,
    /// Rows and release states on Kafka as well (`[releases.kafka]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<ReleaseKafkaConfig>,
}

fn default_true() -> bool {
    true
}
fn default_every_checkpoints() -> u64 {
    1
}
fn default_reference_samples() -> usize {
    2000
}
fn default_keep() -> usize {
    3
}
fn default_cpu_share() -> f64 {
    0.25
}
fn default_batch_size() -> usize {
    256
}
fn default_poll_interval_ms() -> u64 {
    10_000
}

impl ReleasesConfig {
    /// A config with defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        ReleasesConfig {
            url: url.into(),
            options: BTreeMap::new(),
            feature: FeatureKind::default(),
            catalog_url: None,
            catalog_options: None,
            every_checkpoints: default_every_checkpoints(),
            reference_samples: default_reference_samples(),
            keep: default_keep(),
            backfill: Backfill::default(),
            cpu_share: default_cpu_share(),
            calibrate_bn: true,
            batch_size: default_batch_size(),
            poll_interval_ms: default_poll_interval_ms(),
            promote: PromoteConfig::default(),
            kafka: None,
        }
    }

    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        let bad =
            |field: &str, message: String| FieldError::new(format!("releases.{field}"), message);
        url::Url::parse(&self.url).map_err(|e| bad("url", format!("`{}`: {e}", self.url)))?;
        if let Some(c) = &self.catalog_url {
            url::Url::parse(c).map_err(|e| bad("catalog_url", format!("`{c}`: {e}")))?;
        }
        if self.every_checkpoints == 0 {
            return Err(bad("every_checkpoints", "must be >= 1".into()));
        }
        if self.reference_samples < 2 {
            return Err(bad(
                "reference_samples",
                format!("{} is too few: the centring mean and the effective rank need a sample (e.g. 2000)", self.reference_samples),
            ));
        }
        if !(self.cpu_share > 0.0 && self.cpu_share <= 1.0) {
            return Err(bad(
                "cpu_share",
                format!("{} must be in (0, 1]: the share of the machine's cores release work may use while training", self.cpu_share),
            ));
        }
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be >= 1".into()));
        }
        if self.poll_interval_ms == 0 {
            return Err(bad("poll_interval_ms", "must be >= 1".into()));
        }
        let p = &self.promote;
        if !(0.0..=1.0).contains(&p.min_knn_gain) {
            return Err(bad(
                "promote.min_knn_gain",
                format!(
                    "{} must be in [0, 1] (a top-1 accuracy difference; 0.005 = half a point)",
                    p.min_knn_gain
                ),
            ));
        }
        if !(p.min_effective_rank >= 1.0 && p.min_effective_rank.is_finite()) {
            return Err(bad(
                "promote.min_effective_rank",
                format!(
                    "{} must be at least 1 (a single direction)",
                    p.min_effective_rank
                ),
            ));
        }
        if !(0.0..=1.0).contains(&p.min_rank_ratio) {
            return Err(bad(
                "promote.min_rank_ratio",
                format!("{} must be in [0, 1]", p.min_rank_ratio),
            ));
        }
        if let Some(k) = &self.kafka {
            k.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation_name_the_field() {
        let c: ReleasesConfig =
            toml::from_str("url = \"file:///tmp/r/\"\nfeature = \"stage2\"\n").unwrap();
        assert_eq!(c.feature, FeatureKind::Stage(2));
        assert_eq!(
            (c.keep, c.every_checkpoints, c.backfill),
            (3, 1, Backfill::InProcess)
        );
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.cpu_share = 0.0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("releases.cpu_share"));
        let mut bad = c.clone();
        bad.promote.min_rank_ratio = 2.0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("releases.promote.min_rank_ratio"));
        assert!(toml::from_str::<ReleasesConfig>("url = \"x\"\nbogus = 1").is_err());
        let f: ReleasesConfig =
            toml::from_str("url = \"file:///r/\"\nbackfill = \"fleet\"\n").unwrap();
        assert_eq!(f.backfill, Backfill::Fleet);
    }
}
