//! The daemon's TOML configuration: one section per stage, unknown fields rejected, every
//! value checked at start with an error that names the field and says what is allowed.
//! `configs/*.toml` document every field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::decode::PipelineConfig;
use crate::metrics::MetricsConfig;
use crate::model::ModelConfig;
use crate::optim::SgdConfig;
use crate::source::SourceConfig;
use crate::train::OdcConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_log_every() -> u64 {
    10
}

/// `[train]`: the step loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `cpu`, `cuda:N` or `auto` (CUDA when built with `--features cuda` and a GPU answers).
    #[serde(default = "default_device")]
    pub device: String,
    /// Seed of the model init, dropout and k-means: same seed + same input order = same run.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many training steps (absent = train for ever).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Log a progress line every N steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Where to write the final model weights (safetensors) when the run ends; absent = none.
    #[serde(default)]
    pub save_weights: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            device: default_device(),
            seed: 0,
            max_steps: None,
            log_every: default_log_every(),
            save_weights: None,
        }
    }
}

fn default_ckpt_keep() -> usize {
    3
}
fn default_ckpt_every_steps() -> u64 {
    500
}
fn default_ckpt_every_secs() -> u64 {
    600
}
fn default_ckpt_timeout_secs() -> u64 {
    300
}

/// `[checkpoint]`: crash-safe checkpoints (model, optimizer, ODC memory, source positions).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Where checkpoints go: a local path or file:///, s3://, gs://, az:// URL.
    pub url: String,
    /// object_store options (aws_endpoint, aws_allow_http, ...); they override the
    /// AWS_* / GOOGLE_* / AZURE_* environment variables, where secrets belong.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Write a checkpoint every N steps (0 = not by steps).
    #[serde(default = "default_ckpt_every_steps")]
    pub every_steps: u64,
    /// ... and/or every T seconds (0 = not by time). Whichever comes first.
    #[serde(default = "default_ckpt_every_secs")]
    pub every_secs: u64,
    /// Checkpoints kept; older ones are deleted after a successful save (0 = keep all).
    #[serde(default = "default_ckpt_keep")]
    pub keep: usize,
    /// Resume from the latest valid checkpoint at start.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// A save that takes longer is abandoned (counted as a failure; training goes on).
    #[serde(default = "default_ckpt_timeout_secs")]
    pub timeout_secs: u64,
    /// At start, how long to keep retrying while the store cannot be read (network down,
    /// server restarting) before giving up with an error; 0 = retry for ever. `/readyz` says
    /// why meanwhile. Training never starts fresh over checkpoints it could not read.
    #[serde(default = "default_ckpt_startup_timeout_secs")]
    pub startup_timeout_secs: u64,
}

fn default_ckpt_startup_timeout_secs() -> u64 {
    600
}

fn default_true() -> bool {
    true
}

fn default_embed_every() -> u64 {
    1
}

/// `[embeddings]`: where the trained samples' embeddings are published: Parquet files
/// (`url`), a Kafka topic (`[embeddings.kafka]`), or both.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsConfig {
    /// Parquet files on an object store: a local path or file:///, s3://, gs://, az:// URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Kafka topic (key = sample key, value in the documented binary or JSON encoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<crate::sink::KafkaSinkConfig>,
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Publish the embeddings of every N-th training step (1 = every step).
    #[serde(default = "default_embed_every")]
    pub every_steps: u64,
    /// Rolling, compression and row groups of the Parquet files.
    #[serde(default)]
    pub parquet: crate::sink::ParquetSinkConfig,
    /// Batches queued for the sink before the trainer waits (backpressure bound).
    #[serde(default = "default_sink_queue")]
    pub queue: usize,
}

fn default_sink_queue() -> usize {
    16
}

/// `[log]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    #[serde(default)]
    pub format: LogFormat,
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
    pub eval: Option<crate::eval::KnnEvalConfig>,
}

impl Config {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        if let SourceConfig::ObjectStore(s) = &mut cfg.source {
            s.url = local_path_to_url(&s.url, "source.url")?;
        }
        if let Some(c) = cfg.checkpoint.as_mut() {
            c.url = local_path_to_url(&c.url, "checkpoint.url")?;
        }
        if let Some(u) = cfg.embeddings.as_mut().and_then(|e| e.url.as_mut()) {
            *u = local_path_to_url(u, "embeddings.url")?;
        }
        if let Some(e) = cfg.eval.as_mut() {
            e.train_url = local_path_to_url(&e.train_url, "eval.train_url")?;
            e.test_url = local_path_to_url(&e.test_url, "eval.test_url")?;
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

    /// Cross-field checks; each section's own checks run too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model
            .validate()
            .map_err(|e| invalid("model", e.to_string()))?;
        self.optimizer
            .validate()
            .map_err(|e| invalid("optimizer", e.to_string()))?;
        self.odc
            .validate()
            .map_err(|e| invalid("odc", e.to_string()))?;
        if let Some(e) = &self.eval {
            e.validate().map_err(|e| match e {
                crate::eval::EvalError::Invalid { field, message } => invalid(&field, message),
                other => invalid("eval", other.to_string()),
            })?;
        }
        match &self.source {
            SourceConfig::ObjectStore(s) => {
                url::Url::parse(&s.url).map_err(|e| {
                    invalid(
                        "source.url",
                        format!(
                            "`{}` is not a URL ({e}): use file:///abs/path, s3://bucket/prefix, gs://, az:// or memory:///",
                            s.url
                        ),
                    )
                })?;
            }
            SourceConfig::Kafka(k) => k.validate().map_err(|e| match e {
                crate::source::SourceError::KafkaConfig { field, message } => {
                    invalid(&field, message)
                }
                other => invalid("source", other.to_string()),
            })?,
        }
        if let Some(d) = &self.pipeline.dead_letter {
            d.validate().map_err(|e| match e {
                crate::sink::SinkError::KafkaConfig { field, message } => invalid(&field, message),
                other => invalid("pipeline.dead_letter", other.to_string()),
            })?;
        }
        if self.pipeline.batch_size == 0 {
            return Err(invalid("pipeline.batch_size", "must be > 0"));
        }
        if self.pipeline.batch_size < 2 {
            return Err(invalid(
                "pipeline.batch_size",
                "must be at least 2: BatchNorm needs two samples to compute batch statistics",
            ));
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
        crate::device::select_device(&self.train.device)
            .map_err(|e| invalid("train.device", e.to_string()))?;
        if self.metrics.enabled && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "`{}` is not an address: use HOST:PORT such as 127.0.0.1:9898",
                    self.metrics.listen
                ),
            ));
        }
        if let Some(c) = &self.checkpoint {
            url::Url::parse(&c.url)
                .map_err(|e| invalid("checkpoint.url", format!("`{}`: {e}", c.url)))?;
            if c.every_steps == 0 && c.every_secs == 0 {
                return Err(invalid(
                    "checkpoint.every_steps",
                    "every_steps and every_secs are both 0: set at least one (checkpoints are also written at shutdown)",
                ));
            }
            if c.timeout_secs == 0 {
                return Err(invalid("checkpoint.timeout_secs", "must be > 0"));
            }
        }
        if let Some(e) = &self.embeddings {
            if let Some(u) = &e.url {
                url::Url::parse(u)
                    .map_err(|err| invalid("embeddings.url", format!("`{u}`: {err}")))?;
            }
            if e.url.is_none() && e.kafka.is_none() {
                return Err(invalid(
                    "embeddings.url",
                    "[embeddings] needs a destination: `url` (Parquet files) and/or an [embeddings.kafka] table (a topic)",
                ));
            }
            if let Some(k) = &e.kafka {
                k.validate("embeddings.kafka").map_err(|err| match err {
                    crate::sink::SinkError::KafkaConfig { field, message } => {
                        invalid(&field, message)
                    }
                    other => invalid("embeddings.kafka", other.to_string()),
                })?;
            }
            if e.every_steps == 0 || e.queue == 0 {
                return Err(invalid(
                    "embeddings.every_steps",
                    "every_steps and queue must be > 0",
                ));
            }
            e.parquet
                .validate()
                .map_err(|err| invalid("embeddings.parquet", err.to_string()))?;
        }
        if self.train.log_every == 0 {
            return Err(invalid("train.log_every", "must be > 0"));
        }
        if let Some(0) = self.train.max_steps {
            return Err(invalid(
                "train.max_steps",
                "must be > 0 (omit it to train for ever)",
            ));
        }
        Ok(())
    }
}

/// A URL stays as it is; a plain path (no `scheme://`) becomes a `file://` URL, relative
/// paths resolved against the working directory.
pub fn local_path_to_url(s: &str, field: &str) -> Result<String, ConfigError> {
    if s.contains("://") {
        return Ok(s.to_string());
    }
    let p = Path::new(s);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| {
                invalid(
                    field,
                    format!("cannot resolve the relative path `{s}`: {e}"),
                )
            })?
            .join(p)
    };
    let mut url = url::Url::from_file_path(&abs)
        .map_err(|_| invalid(field, format!("`{s}` is not a usable local path")))?
        .to_string();
    if s.ends_with('/') && !url.ends_with('/') {
        url.push('/');
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICKSTART: &str = include_str!("../configs/quickstart.toml");

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
                Err(ConfigError::Invalid { field, .. })
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
        let e = Config::from_toml(&bad, "x.toml")
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|m| m.contains("odc")), "{e:?}");
    }
}
