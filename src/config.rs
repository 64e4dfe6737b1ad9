//! The daemon's TOML configuration: one section per stage, unknown fields rejected, every
//! value checked at start with an error that names the field and says what is allowed.
//! `configs/*.toml` document every field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointConfig;
use crate::decode::PipelineConfig;
use crate::eval::KnnEvalConfig;
use crate::logging::LogConfig;
use crate::metrics::MetricsConfig;
use crate::model::ModelConfig;
use crate::optim::SgdConfig;
use crate::release::ReleasesConfig;
use crate::sink::EmbeddingsConfig;
use crate::source::SourceConfig;
use crate::store::local_path_to_url;
use crate::train::{OdcConfig, TrainConfig};
use crate::validate::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error(transparent)]
    Invalid(#[from] FieldError),
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(FieldError::new(field, message))
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub model: ModelConfig,
    pub odc: OdcConfig,
    #[serde(default)]
    pub optimizer: SgdConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
    #[serde(default)]
    pub embeddings: Option<EmbeddingsConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// In-daemon k-NN evaluation on a labelled set (absent = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<KnnEvalConfig>,
    /// Versioned, quality-gated releases of clean embeddings (absent = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releases: Option<ReleasesConfig>,
}

/// Sets `key` (dotted path) in `table` to `value`, parsed as a TOML value (a bare word that is
/// not one is taken as a string), creating missing tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |message: String| invalid(key, message);
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad(
            "is not a dotted config key such as odc.num_clusters".into()
        ));
    }
    let parsed = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v"),
        Err(_) => None,
    }
    .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let (last, path) = parts.split_last().ok_or_else(|| bad("is empty".into()))?;
    let mut cur = table;
    for p in path {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| bad(format!("cannot be set: `{p}` holds a value, not a section")))?;
    }
    cur.insert(last.to_string(), parsed);
    Ok(())
}

impl Config {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        // Plain paths become file:// URLs once, here: the components see URLs only.
        let to_url = |s: &mut String, field: &str| -> Result<(), ConfigError> {
            *s = local_path_to_url(s, field).map_err(|e| invalid(field, e.to_string()))?;
            Ok(())
        };
        if let SourceConfig::ObjectStore(s) = &mut cfg.source {
            to_url(&mut s.url, "source.url")?;
        }
        if let Some(c) = cfg.checkpoint.as_mut() {
            to_url(&mut c.url, "checkpoint.url")?;
        }
        if let Some(u) = cfg.embeddings.as_mut().and_then(|e| e.url.as_mut()) {
            to_url(u, "embeddings.url")?;
        }
        if let Some(e) = cfg.eval.as_mut() {
            to_url(&mut e.train_url, "eval.train_url")?;
            to_url(&mut e.test_url, "eval.test_url")?;
        }
        if let Some(r) = cfg.releases.as_mut() {
            to_url(&mut r.url, "releases.url")?;
            if let Some(c) = r.catalog_url.as_mut() {
                to_url(c, "releases.catalog_url")?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// [`Self::load`], then each `KEY=VALUE` of `overrides` (a dotted key such as
    /// `odc.num_clusters`; the value in TOML syntax, or a bare string) replaces that key's
    /// value before the config is checked, as if the file said so.
    pub fn load_with_overrides(
        path: &Path,
        overrides: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            source: e,
        })?;
        if overrides.is_empty() {
            return Self::from_toml(&text, &shown);
        }
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        for (key, value) in overrides {
            set_dotted(&mut table, key, value)?;
        }
        let text = toml::to_string(&table).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, &format!("{shown} with --set overrides"))
    }

    /// This process as rank `rank` of `ranks` in a data-parallel run (docs/distributed.md):
    /// `pipeline.batch_size` is the GLOBAL batch, so each rank builds `batch_size / ranks`;
    /// an object-store source reads only this rank's shards; the metrics endpoint listens on
    /// its port + `rank` (ranks may share a host). A Kafka source needs nothing: the ranks
    /// join the same consumer group, which splits the partitions between them.
    pub fn data_parallel_rank(&mut self, rank: usize, ranks: usize) -> Result<(), ConfigError> {
        if ranks <= 1 {
            return Ok(());
        }
        let b = self.pipeline.batch_size;
        if !b.is_multiple_of(ranks) || b / ranks < 2 {
            return Err(invalid(
                "pipeline.batch_size",
                format!(
                    "{b} is the global batch of a run of {ranks} ranks; it must split into \
                     equal parts of at least 2 images per rank: use a multiple of {ranks}, at \
                     least {}",
                    2 * ranks
                ),
            ));
        }
        self.pipeline.batch_size = b / ranks;
        if let SourceConfig::ObjectStore(s) = &mut self.source {
            s.rank_split = Some((rank, ranks));
        }
        if self.metrics.enabled {
            if let Ok(mut addr) = self.metrics.listen.parse::<std::net::SocketAddr>() {
                if addr.port() != 0 {
                    let port = usize::from(addr.port()) + rank;
                    let port = u16::try_from(port).map_err(|_| {
                        invalid(
                            "metrics.listen",
                            format!("port + rank {rank} exceeds 65535: use a lower port"),
                        )
                    })?;
                    addr.set_port(port);
                    self.metrics.listen = addr.to_string();
                }
            }
        }
        Ok(())
    }

    /// The sections that define the run's network, for an evaluation of its checkpoints.
    pub fn eval_model(&self) -> crate::eval::EvalModel {
        crate::eval::EvalModel {
            model: self.model.clone(),
            num_clusters: self.odc.num_clusters,
            device: self.train.device.clone(),
            seed: self.train.seed,
            pipeline: self.pipeline.clone(),
        }
    }

    /// What releases embed: `releases.catalog_url` (with `catalog_options`, else the
    /// source's options), or the object-store source's URL.
    pub fn release_catalog(
        &self,
    ) -> Result<(String, std::collections::BTreeMap<String, String>), ConfigError> {
        let Some(r) = &self.releases else {
            return Err(invalid("releases", "is not configured"));
        };
        let source_options = match &self.source {
            SourceConfig::ObjectStore(s) => s.options.clone(),
            SourceConfig::Kafka(_) => Default::default(),
        };
        match (&r.catalog_url, &self.source) {
            (Some(url), _) => Ok((
                url.clone(),
                r.catalog_options.clone().unwrap_or(source_options),
            )),
            (None, SourceConfig::ObjectStore(s)) => Ok((
                s.url.clone(),
                r.catalog_options.clone().unwrap_or(source_options),
            )),
            (None, SourceConfig::Kafka(_)) => Err(invalid(
                "releases.catalog_url",
                "a release embeds a catalog of shards, and a Kafka source has none to list: set catalog_url to the object-store prefix that holds the images as shards",
            )),
        }
    }

    /// Each section's own checks, then the checks across sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.optimizer.validate()?;
        self.odc.validate()?;
        self.train.validate()?;
        self.source.validate()?;
        self.pipeline.validate()?;
        self.metrics.validate()?;
        if let Some(c) = &self.checkpoint {
            c.validate()?;
        }
        if let Some(e) = &self.embeddings {
            e.validate()?;
        }
        if let Some(e) = &self.eval {
            e.validate()?;
        }
        if let Some(r) = &self.releases {
            r.validate()?;
            self.release_catalog()?;
        }
        let channels = self.pipeline.decode.channels as usize;
        if channels != self.model.in_channels {
            return Err(invalid(
                "model.in_channels",
                format!(
                    "is {} but pipeline.decode produces {} channel(s): set both to grey (1) or RGB (3)",
                    self.model.in_channels, channels
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::decode::TransformConfig;

    const QUICKSTART: &str = include_str!("../configs/quickstart.toml");

    #[test]
    fn set_overrides_replace_keys_and_are_checked_like_the_file() -> Result<(), ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| invalid("tempdir", e.to_string()))?;
        let path = dir.path().join("q.toml");
        std::fs::write(&path, QUICKSTART).map_err(|e| invalid("write", e.to_string()))?;
        let set = |k: &str, v: &str| (k.to_string(), v.to_string());
        let cfg = Config::load_with_overrides(
            &path,
            &[
                set("odc.num_clusters", "37"),
                set("model.small_stem", "false"),
                set("pipeline.transform.train.scale", "[0.5, 1.0]"),
                set("source.url", "data/other/"),
            ],
        )?;
        assert_eq!(cfg.odc.num_clusters, 37);
        assert!(!cfg.model.small_stem);
        assert!(
            matches!(&cfg.pipeline.transform, TransformConfig::Train(a) if a.scale == (0.5, 1.0))
        );
        // a bare word is a string, and a plain path still becomes a file:// URL
        assert!(
            matches!(&cfg.source, SourceConfig::ObjectStore(s) if s.url.starts_with("file:///") && s.url.ends_with("data/other/"))
        );
        // values are checked as if the file said them, naming the field
        let err = Config::load_with_overrides(&path, &[set("model.width", "0")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("model.width"), "{err}");
        let err = Config::load_with_overrides(&path, &[set("odc.num_clusters.x", "1")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("odc.num_clusters.x"), "{err}");
        Ok(())
    }

    #[test]
    fn quickstart_config_is_valid() -> Result<(), ConfigError> {
        let cfg = Config::from_toml(QUICKSTART, "configs/quickstart.toml")?;
        assert!(
            matches!(&cfg.source, SourceConfig::ObjectStore(s) if s.url.starts_with("file:///"))
        );
        assert_eq!(cfg.model.in_channels, 1);
        Ok(())
    }

    #[test]
    fn every_shipped_config_survives_the_json_round_trip_of_checkpoints() {
        // Checkpoints keep the run's config as JSON (`None` = null); `odcd eval` / `report` /
        // `embed` read it back.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            if p.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            // Loop mode has an Option field (passes), the case that broke.
            let text = text.replace("mode = \"follow\"", "mode = { loop = {} }");
            let cfg: Config = toml::from_str(&text).expect("shipped config parses");
            let json = serde_json::to_value(&cfg).expect("to JSON");
            let back: Config = serde_json::from_value(json.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(serde_json::to_value(&back).expect("to JSON"), json);
            n += 1;
        }
        assert!(n >= 3);
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            n += 1;
            match Config::load(&p) {
                Ok(_) => {}
                // A CPU build refuses a CUDA device, with a message naming the field.
                Err(ConfigError::Invalid(FieldError { field, .. }))
                    if field == "train.device" && !candle_core::utils::cuda_is_available() => {}
                Err(e) => panic!("{}: {e}", p.display()),
            }
        }
        assert!(n >= 3, "expected the shipped configs in {}", dir.display());
    }

    const KAFKA: &str = include_str!("../configs/kafka.toml");

    #[test]
    fn kafka_config_round_trips_and_names_bad_fields() {
        let cfg = Config::from_toml(KAFKA, "configs/kafka.toml").expect("kafka.toml is valid");
        let SourceConfig::Kafka(k) = &cfg.source else {
            panic!("kind = \"kafka\" gives a Kafka source")
        };
        assert_eq!(k.topics, ["odcd-images"]);
        assert!(cfg.embeddings.as_ref().is_some_and(|e| e.kafka.is_some()));
        // The effective config printed by `config check` (and stored in checkpoints) parses back.
        let text = toml::to_string_pretty(&cfg).expect("serialise");
        Config::from_toml(&text, "printed").expect("printed config parses back");
        let bad = KAFKA.replace("group_id = ", "grup_id = ");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|m| m.contains("grup_id")), "{e:?}");
        let bad = KAFKA.replace("kind = \"kafka\"", "kind = \"kafkaa\"");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("source.kind")),
            "{e:?}"
        );
        let bad = KAFKA.replace("topics = [\"odcd-images\"]", "topics = []");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("source.topics")),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let bad = QUICKSTART.replace("[train]", "[train]\nbogus = 1");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|m| m.contains("bogus")), "{e:?}");
        let bad = QUICKSTART.replace("in_channels = 1", "in_channels = 3");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("model.in_channels")),
            "{e:?}"
        );
        let bad = QUICKSTART.replace("device = \"cpu\"", "device = \"tpu\"");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("train.device")),
            "{e:?}"
        );
        let bad = QUICKSTART.replace("kernels = \"auto\"", "kernels = \"fast\"");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("train.kernels") && m.contains("`fast`")),
            "{e:?}"
        );
        let generic = QUICKSTART.replace("kernels = \"auto\"", "kernels = \"generic\"");
        let cfg = Config::from_toml(&generic, "x.toml").map_err(|e| e.to_string());
        assert_eq!(
            cfg.map(|c| c.train.kernels().ok()),
            Ok(Some(crate::device::Kernels::Generic))
        );
        let bad = QUICKSTART.replace("batch_size = 64", "batch_size = 0");
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("pipeline.batch_size")),
            "{e:?}"
        );
        let bad = QUICKSTART.replace("num_clusters = 100", "num_clusters = 100000");
        assert_ne!(bad, QUICKSTART);
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|m| m.contains("odc")), "{e:?}");
    }
}
