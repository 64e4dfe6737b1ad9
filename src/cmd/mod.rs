//! The commands, on the top floor: each file parses nothing itself (clap does, in
//! `main.rs`), reads what the command needs (a config file, a checkpoint), calls the library
//! with only the sections it needs, and reports. Errors end here as `anyhow` reports.
//!
//! | command | file |
//! |---|---|
//! | `odcd run` | [`run`] |
//! | `odcd embed` | [`embed`] |
//! | `odcd eval` | [`eval`] |
//! | `odcd report` | [`report`] |
//! | `odcd release list/promote/rollback/work` | [`release`] |
//! | `odcd config check` | [`config`] |
//! | `odcd checkpoint list/inspect` | [`checkpoint`] |
//! | `odcd shards import-idx/pack/inspect` | [`shards`] |
//! | `odcd bench train-step/data-parallel/embed` | [`bench`] |

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod embed;
pub mod eval;
pub mod release;
pub mod report;
pub mod run;
pub mod shards;

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointStore, Manifest};
use crate::config::Config;
use crate::eval::EvalError;

/// `KEY=VALUE` of a repeatable `--option` flag.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))
}

/// A token cancelled on SIGINT or SIGTERM (must be called inside the runtime).
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        cancel.cancel();
    });
    token
}

/// Loads checkpoint `step` (or the latest) under `url` and the daemon config it was trained
/// with (kept in its state.json): what `odcd eval` and `odcd report` start from.
pub async fn load_checkpoint(
    url: &str,
    options: &BTreeMap<String, String>,
    step: Option<u64>,
) -> Result<(Manifest, Checkpoint, Config), EvalError> {
    let store = CheckpointStore::open(url, options, 0)?;
    let manifest = store
        .find(step)
        .await?
        .ok_or_else(|| EvalError::NoCheckpoint {
            url: url.to_string(),
            step,
        })?;
    let ckpt = store.load(&manifest).await?;
    let cfg: Config =
        serde_json::from_value(ckpt.config.clone()).map_err(|e| EvalError::CheckpointContent {
            id: manifest.id.clone(),
            message: format!(
                "its state.json holds no usable daemon config ({e}); it was not written by `odcd run`"
            ),
        })?;
    Ok((manifest, ckpt, cfg))
}
