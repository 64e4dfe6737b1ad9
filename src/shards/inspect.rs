//! Read shards and report what is in them (records, labels, decode check, errors).

use super::ShardsError;
use crate::decode::{decode_into, DecodeConfig, DecodeError};
use crate::source::{ObjectStoreSource, ObjectStoreSourceConfig, RejectReason, SourceState};
use object_store::{path::Path, ObjectStore};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What `inspect` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InspectSummary {
    pub shards: Vec<String>,
    /// Records read (good + rejected).
    pub records: u64,
    /// Records whose image decoded.
    pub decoded: u64,
    /// Rejects by reason (read-time and decode-time).
    pub rejected: BTreeMap<String, u64>,
    /// Count per class label (`none` for unlabelled).
    pub labels: BTreeMap<String, u64>,
    /// Count per decoded size `WxH`.
    pub sizes: BTreeMap<String, u64>,
    /// The first keys seen.
    pub first_keys: Vec<String>,
    /// The first error messages.
    pub errors: Vec<String>,
}

impl std::fmt::Display for InspectSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "shards:   {}", self.shards.len())?;
        writeln!(f, "records:  {}", self.records)?;
        writeln!(f, "decoded:  {}", self.decoded)?;
        writeln!(f, "rejected: {:?}", self.rejected)?;
        writeln!(f, "labels:   {:?}", self.labels)?;
        writeln!(f, "sizes:    {:?}", self.sizes)?;
        writeln!(f, "keys:     {:?}", self.first_keys)?;
        for e in &self.errors {
            writeln!(f, "error:    {e}")?;
        }
        Ok(())
    }
}

const MAX_LISTED: usize = 10;

/// Inspect the shards under `prefix` (or the single shard `prefix` names).
pub async fn inspect(
    store: Arc<dyn ObjectStore>,
    prefix: Path,
) -> Result<InspectSummary, ShardsError> {
    let mut cfg = ObjectStoreSourceConfig::new("inspect");
    cfg.max_retries = 2;
    let src = ObjectStoreSource::with_store(store, prefix, cfg);
    let shards = src.list_shards().await?;
    let rx = src.spawn(SourceState::default(), CancellationToken::new());
    // Decoding is CPU work: consume on a blocking thread.
    let mut summary = tokio::task::spawn_blocking(move || {
        let mut rx = rx;
        let mut s = InspectSummary::default();
        let dcfg = DecodeConfig::default();
        let (mut pix, mut tmp) = (Vec::new(), Vec::new());
        let reject = |s: &mut InspectSummary, reason: RejectReason, msg: String| {
            *s.rejected.entry(reason.to_string()).or_default() += 1;
            if s.errors.len() < MAX_LISTED {
                s.errors.push(msg);
            }
        };
        while let Some(item) = rx.blocking_recv() {
            s.records += 1;
            match item {
                Err(r) => reject(&mut s, r.reason, r.to_string()),
                Ok(rec) => {
                    if s.first_keys.len() < MAX_LISTED {
                        s.first_keys.push(rec.key.clone());
                    }
                    let label = rec
                        .class_label
                        .map_or("none".to_string(), |l| l.to_string());
                    *s.labels.entry(label).or_default() += 1;
                    match decode_into(&rec.image, &dcfg, &mut pix, &mut tmp) {
                        Ok((w, h)) => {
                            s.decoded += 1;
                            *s.sizes.entry(format!("{w}x{h}")).or_default() += 1;
                        }
                        Err(e) => {
                            let reason = match e {
                                DecodeError::TooLarge(_) => RejectReason::TooLarge,
                                DecodeError::Undecodable(_) => RejectReason::Undecodable,
                            };
                            reject(&mut s, reason, format!("key {}: {e}", rec.key));
                        }
                    }
                }
            }
        }
        s
    })
    .await
    .map_err(|e| ShardsError::Join(e.to_string()))?;
    summary.shards = shards;
    Ok(summary)
}
