//! `[checkpoint]`: where and how often checkpoints are written, how many are kept, resume.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::FieldError;

fn default_true() -> bool {
    true
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
    pub options: BTreeMap<String, String>,
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

impl CheckpointConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        url::Url::parse(&self.url)
            .map_err(|e| FieldError::new("checkpoint.url", format!("`{}`: {e}", self.url)))?;
        if self.every_steps == 0 && self.every_secs == 0 {
            return Err(FieldError::new(
                "checkpoint.every_steps",
                "every_steps and every_secs are both 0: set at least one (checkpoints are also written at shutdown)",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(FieldError::new("checkpoint.timeout_secs", "must be > 0"));
        }
        Ok(())
    }
}
