//! Configuration of decoding, augmentation and batching: what the user writes.

use serde::{Deserialize, Serialize};

/// Decoding limits and output channels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// 1 = grey, 3 = RGB. Images are converted to this on decode.
    #[serde(default = "default_channels")]
    pub channels: u8,
    /// Encoded images larger than this are rejected (`too_large`) without decoding.
    #[serde(default = "default_max_encoded_bytes")]
    pub max_encoded_bytes: u64,
    /// Images with more pixels than this are rejected from their header, before decoding
    /// (decompression bombs).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Images wider or taller than this are rejected from their header.
    #[serde(default = "default_max_side")]
    pub max_side: u32,
}

fn default_channels() -> u8 {
    3
}
fn default_max_encoded_bytes() -> u64 {
    32 << 20
}
fn default_max_pixels() -> u64 {
    40_000_000
}
fn default_max_side() -> u32 {
    16_384
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            channels: default_channels(),
            max_encoded_bytes: default_max_encoded_bytes(),
            max_pixels: default_max_pixels(),
            max_side: default_max_side(),
        }
    }
}

/// Train-time augmentation, torchvision semantics (RandomResizedCrop → RandomHorizontalFlip →
/// RandomRotation → ColorJitter → RandomGrayscale → Normalize).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Output side length in pixels (square).
    pub size: u32,
    /// RandomResizedCrop area fraction range.
    #[serde(default = "default_scale")]
    pub scale: (f32, f32),
    /// RandomResizedCrop aspect-ratio range (w/h).
    #[serde(default = "default_ratio")]
    pub ratio: (f32, f32),
    /// Probability of a horizontal flip.
    #[serde(default = "default_half")]
    pub hflip_p: f32,
    /// Rotation drawn uniformly from ±`rotation_degrees` (0 disables); corners fill with 0.
    #[serde(default)]
    pub rotation_degrees: f32,
    /// ColorJitter brightness factor range [max(0, 1-b), 1+b]; 0 disables.
    #[serde(default)]
    pub brightness: f32,
    /// ColorJitter contrast, as brightness.
    #[serde(default)]
    pub contrast: f32,
    /// ColorJitter saturation, as brightness (RGB only).
    #[serde(default)]
    pub saturation: f32,
    /// ColorJitter hue shift range [-hue, hue], hue ≤ 0.5 (RGB only).
    #[serde(default)]
    pub hue: f32,
    /// Probability that the colour jitter is applied at all (torchvision RandomApply).
    #[serde(default = "default_one")]
    pub jitter_p: f32,
    /// Apply the four jitter ops in a random order per sample (torchvision does).
    #[serde(default = "default_true")]
    pub jitter_random_order: bool,
    /// Probability of converting to grayscale (RGB only).
    #[serde(default)]
    pub grayscale_p: f32,
    /// Per-channel mean for normalisation (1 or `channels` values).
    #[serde(default = "default_mean")]
    pub mean: Vec<f32>,
    /// Per-channel std for normalisation (1 or `channels` values).
    #[serde(default = "default_std")]
    pub std: Vec<f32>,
}

fn default_scale() -> (f32, f32) {
    (0.08, 1.0)
}
fn default_ratio() -> (f32, f32) {
    (3.0 / 4.0, 4.0 / 3.0)
}
fn default_half() -> f32 {
    0.5
}
fn default_one() -> f32 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_mean() -> Vec<f32> {
    vec![0.5]
}
fn default_std() -> Vec<f32> {
    vec![0.5]
}

impl AugmentConfig {
    /// Defaults for everything but the output size (no rotation, no jitter).
    pub fn new(size: u32) -> Self {
        AugmentConfig {
            size,
            scale: default_scale(),
            ratio: default_ratio(),
            hflip_p: default_half(),
            rotation_degrees: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            jitter_p: default_one(),
            jitter_random_order: true,
            grayscale_p: 0.0,
            mean: default_mean(),
            std: default_std(),
        }
    }
}

/// Eval transform: resize the shorter side to `resize`, centre-crop `size`, normalise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub resize: u32,
    pub size: u32,
    #[serde(default = "default_mean")]
    pub mean: Vec<f32>,
    #[serde(default = "default_std")]
    pub std: Vec<f32>,
}

/// Which transform a pipeline applies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TransformConfig {
    Train(AugmentConfig),
    Eval(EvalConfig),
}

impl TransformConfig {
    /// The eval transform matching this one (resize + centre crop at the train size, same
    /// normalisation): what `odcd embed`, `odcd eval` and the in-daemon evaluation use.
    pub fn for_eval(&self) -> TransformConfig {
        match self {
            TransformConfig::Train(a) => TransformConfig::Eval(EvalConfig {
                resize: a.size,
                size: a.size,
                mean: a.mean.clone(),
                std: a.std.clone(),
            }),
            TransformConfig::Eval(e) => TransformConfig::Eval(e.clone()),
        }
    }

    /// Output side length.
    pub fn size(&self) -> u32 {
        match self {
            TransformConfig::Train(a) => a.size,
            TransformConfig::Eval(e) => e.size,
        }
    }
}

/// Batching, threads and queue bounds of the decode stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Images per batch.
    pub batch_size: usize,
    #[serde(default)]
    pub decode: DecodeConfig,
    pub transform: TransformConfig,
    /// Global augmentation seed; per-sample seed = hash(seed, key, pass).
    #[serde(default)]
    pub seed: u64,
    /// Decode threads (rayon); 0 = one per core.
    #[serde(default)]
    pub threads: usize,
    /// Decoded batches buffered ahead of the trainer.
    #[serde(default = "default_batch_queue")]
    pub batch_queue: usize,
    /// A partial batch is emitted after waiting this long for more records (follow mode idles).
    #[serde(default = "default_max_batch_wait_ms")]
    pub max_batch_wait_ms: u64,
    /// Queue of rejects waiting to be written to the dead-letter store; full = dropped (counted).
    #[serde(default = "default_dead_letter_queue")]
    pub dead_letter_queue: usize,
    /// Where rejected records go (`<url>/<reason>/<key>-<crc32>.<ext>` + `.json`); none = only
    /// counted and logged.
    #[serde(default)]
    pub dead_letter: Option<crate::deadletter::DeadLetterConfig>,
}

fn default_batch_queue() -> usize {
    4
}
fn default_max_batch_wait_ms() -> u64 {
    2_000
}
fn default_dead_letter_queue() -> usize {
    256
}

impl PipelineConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), crate::validate::FieldError> {
        use crate::validate::FieldError;
        if self.batch_size == 0 {
            return Err(FieldError::new("pipeline.batch_size", "must be > 0"));
        }
        if self.batch_size < 2 {
            return Err(FieldError::new(
                "pipeline.batch_size",
                "must be at least 2: BatchNorm needs two samples to compute batch statistics",
            ));
        }
        if let Some(d) = &self.dead_letter {
            d.validate()?;
        }
        Ok(())
    }

    /// The same pipeline with the eval transform, batches of `batch` and no dead letters (an
    /// evaluation reads labelled sets, not the training stream).
    pub fn for_eval(&self, batch: usize) -> PipelineConfig {
        let mut p = self.clone();
        p.transform = self.transform.for_eval();
        p.batch_size = batch.max(1);
        p.dead_letter = None;
        p
    }

    /// Defaults around a batch size and a transform.
    pub fn new(batch_size: usize, transform: TransformConfig) -> Self {
        PipelineConfig {
            batch_size,
            decode: DecodeConfig::default(),
            transform,
            seed: 0,
            threads: 0,
            batch_queue: default_batch_queue(),
            max_batch_wait_ms: default_max_batch_wait_ms(),
            dead_letter_queue: default_dead_letter_queue(),
            dead_letter: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{ObjectStoreSourceConfig, SourceMode};

    /// The config shape the daemon reads (TOML), with defaults filled in.
    #[derive(Deserialize)]
    struct Daemon {
        source: ObjectStoreSourceConfig,
        pipeline: PipelineConfig,
    }

    #[test]
    fn toml_config_parses_with_defaults() {
        let cfg: Daemon = toml::from_str(
            r#"
            [source]
            url = "s3://bucket/shards"
            mode = { loop = { passes = 3 } }
            [source.options]
            aws_endpoint = "http://127.0.0.1:9000"
            aws_allow_http = "true"

            [pipeline]
            batch_size = 256
            seed = 7
            [pipeline.decode]
            channels = 1
            [pipeline.transform.train]
            size = 28
            rotation_degrees = 10.0
            brightness = 0.4
            "#,
        )
        .unwrap();
        assert_eq!(cfg.source.mode, SourceMode::Loop { passes: Some(3) });
        assert_eq!(cfg.source.max_member_bytes, 32 << 20);
        assert_eq!(cfg.source.options["aws_allow_http"], "true");
        assert_eq!(cfg.pipeline.decode.channels, 1);
        assert_eq!(cfg.pipeline.decode.max_pixels, 40_000_000);
        let TransformConfig::Train(a) = &cfg.pipeline.transform else {
            panic!("expected train transform")
        };
        assert_eq!((a.size, a.scale, a.hflip_p), (28, (0.08, 1.0), 0.5));
        let follow: ObjectStoreSourceConfig =
            toml::from_str("url = \"file:///data\"\nmode = \"follow\"").unwrap();
        assert_eq!(follow.mode, SourceMode::Follow);
        // Typos are errors, not silently ignored settings.
        assert!(
            toml::from_str::<ObjectStoreSourceConfig>("url = \"x\"\npol_interval_ms = 1").is_err()
        );
    }
}
