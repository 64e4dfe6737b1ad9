//! The loop's phases with more than one rank (`mpirun -np N odcd run`). Every rank runs the
//! same loop on its own part of the stream; they stay in step through small agreements:
//!
//! - before each batch, one all-reduce of (has a batch, its stream ended, stop requested):
//!   a rank waiting for data (a `follow` source, a quiet Kafka topic) keeps the others
//!   waiting, polling once a second; one rank's end of data or stop request stops all of
//!   them at the same step;
//! - the warm-up gathers each batch's eval-mode features from every rank, so every rank holds
//!   the same warm-up buffer, in the order one process reading the same records would;
//! - checkpoints are due when rank 0 says so; every rank flushes its embeddings sinks and
//!   sends its source position; rank 0 writes one checkpoint holding all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Progress, TrainLoop, WarmupBuffer};
use crate::checkpoint::Checkpoint;
use crate::dist::{decode_strings, encode_strings, Collective};
use crate::record::Batch;
use crate::source::SourceState;
use crate::topology::TopologyError;
use crate::train::TrainError;

/// Where a checkpoint keeps what a multi-rank run needs to resume: the world size and every
/// rank's source position (`Checkpoint::extra`).
pub const DATA_PARALLEL_KEY: &str = "data_parallel";

/// How long a rank waits for its next batch before telling the others it has none yet.
const POLL: Duration = Duration::from_secs(1);

/// The world size and per-rank positions a checkpoint's `extra` holds (none: one process).
pub fn checkpoint_world(extra: &serde_json::Value) -> Option<(usize, Vec<SourceState>)> {
    let dp = extra.get(DATA_PARALLEL_KEY)?;
    let size = dp.get("world_size")?.as_u64()? as usize;
    let states = serde_json::from_value(dp.get("source_states")?.clone()).ok()?;
    Some((size, states))
}

impl TrainLoop {
    pub(super) fn collective(&self) -> &Arc<dyn Collective> {
        self.trainer.collective()
    }

    /// The next batch to train, agreed with the other ranks: `None` when any rank's stream
    /// ended or any rank was asked to stop (then every rank stops at this step). One process:
    /// the next batch (the warm-up's buffered ones first).
    pub(super) fn next_batch_agreed(
        &mut self,
        p: &mut Progress,
    ) -> Result<Option<(Batch, SourceState)>, TopologyError> {
        if self.collective().size() == 1 {
            return Ok(self.next_batch(p));
        }
        self.agreed_read(p, true)
    }

    /// A batch on every rank, or `None` on every rank (module docs). `from_pending`: the
    /// warm-up's buffered batches come first.
    fn agreed_read(
        &mut self,
        p: &mut Progress,
        from_pending: bool,
    ) -> Result<Option<(Batch, SourceState)>, TopologyError> {
        let c = self.collective().clone();
        let mut held = None;
        loop {
            let stop = self.cancel.is_cancelled();
            if held.is_none() && !stop {
                if let Some(b) = from_pending.then(|| p.pending.pop_front()).flatten() {
                    held = Some(b);
                } else if !p.ended {
                    match self.poll_batch() {
                        Some(Some(batch)) => {
                            p.summary.records += batch.keys.len() as u64;
                            held = Some((batch, self.batches.state().clone()));
                        }
                        Some(None) => p.ended = true,
                        None => {}
                    }
                }
            }
            let ended = p.ended && held.is_none();
            let mut v = [
                f32::from(u8::from(held.is_some())),
                f32::from(u8::from(ended)),
                f32::from(u8::from(stop)),
            ];
            c.all_reduce_sum(&mut v)?;
            if v[1] > 0.0 || v[2] > 0.0 {
                if v[1] > 0.0 && !ended {
                    tracing::info!(
                        "another rank's part of the stream ended: stopping with it at this step"
                    );
                }
                return Ok(None);
            }
            if v[0] as usize == c.size() {
                return Ok(held);
            }
        }
    }

    /// The stream's next batch within [`POLL`]: `Some(Some)` a batch, `Some(None)` the stream
    /// ended, `None` nothing yet (or a stop was requested).
    fn poll_batch(&mut self) -> Option<Option<Batch>> {
        let (batches, cancel) = (&mut self.batches, &self.cancel);
        self.rt.block_on(async {
            tokio::select! {
                b = batches.next() => Some(b),
                _ = cancel.cancelled() => None,
                _ = tokio::time::sleep(POLL) => None,
            }
        })
    }

    /// Whether the checkpoint is due: rank 0's schedule decides for every rank.
    pub(super) fn agree_checkpoint(&self, due_here: bool) -> Result<bool, TopologyError> {
        let c = self.collective();
        if c.size() == 1 {
            return Ok(due_here);
        }
        let mut v = [f32::from(u8::from(due_here && c.is_root()))];
        c.all_reduce_sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Phase 1 with several ranks: as [`TrainLoop::warm_up`], but each batch's features are
    /// gathered from every rank (rank order), so every rank builds the same buffer; BatchNorm
    /// calibration runs per rank and its statistics are averaged; rank 0 clusters.
    pub(super) fn warm_up_distributed(&mut self, p: &mut Progress) -> Result<bool, TopologyError> {
        let odc = &self.settings.odc;
        let (warmup, k, calibrate) = (
            odc.warmup_samples.max(odc.num_clusters),
            odc.num_clusters,
            odc.bn_calibration_batches,
        );
        let d = self.settings.feat_dim;
        let c = self.collective().clone();
        if c.is_root() {
            tracing::info!(warmup, k, ranks = c.size(), "collecting the warm-up buffer");
        }
        if calibrate > 0 {
            while p.pending.len() < calibrate {
                match self.agreed_read(p, false)? {
                    Some(b) => p.pending.push_back(b),
                    None if self.cancel.is_cancelled() => return Ok(false),
                    None => break,
                }
            }
            let images: Vec<&candle_core::Tensor> =
                p.pending.iter().map(|(b, _)| &b.images).collect();
            let used = self.trainer.calibrate_batchnorm(&images)?;
            self.trainer.average_running_statistics()?;
            tracing::info!(
                batches = used,
                "BatchNorm calibrated on this rank's first warm-up batches (averaged over ranks)"
            );
        }
        let mut buffer = WarmupBuffer::new(warmup, d);
        for (batch, _) in &p.pending {
            add_gathered(&mut buffer, &self.trainer, c.as_ref(), batch)?;
        }
        while !buffer.full() {
            match self.agreed_read(p, false)? {
                Some(b) => {
                    add_gathered(&mut buffer, &self.trainer, c.as_ref(), &b.0)?;
                    p.pending.push_back(b);
                }
                None if self.cancel.is_cancelled() => return Ok(false),
                None => break,
            }
        }
        self.cluster_warmup(buffer, k, c.is_root())?;
        Ok(true)
    }

    /// Phase 5 with several ranks: every rank flushes its sinks and sends its position; rank 0
    /// writes one checkpoint with all of them (`extra.data_parallel`) and tells the others
    /// how it went. Returns (step, id, bytes) of the checkpoint written.
    pub(super) fn checkpoint_distributed(
        &self,
        source: &SourceState,
        unqueued: Option<u64>,
        save: impl FnOnce(Checkpoint) -> Result<(u64, String, u64), String>,
    ) -> Result<(u64, String, u64), String> {
        let c = self.collective();
        let t0 = Instant::now();
        let mine = serde_json::json!({
            "state": source,
            "error": self.barrier(unqueued).err(),
        });
        let gathered = c
            .all_gather_bytes(&encode_strings(&[mine.to_string()]))
            .map_err(|e| e.to_string())?;
        let mut states = Vec::with_capacity(gathered.len());
        let mut errors = Vec::new();
        for (r, bytes) in gathered.iter().enumerate() {
            let v: serde_json::Value = decode_strings(bytes)
                .map_err(|e| e.to_string())?
                .first()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                errors.push(format!("rank {r}: {e}"));
            }
            states.push(v.get("state").cloned().unwrap_or_default());
        }
        let mut packet = Vec::new();
        if c.is_root() {
            let res: Result<(u64, String, u64), String> = if errors.is_empty() {
                self.build_checkpoint(source).and_then(|mut ck| {
                    if !ck.extra.is_object() {
                        ck.extra = serde_json::json!({});
                    }
                    ck.extra[DATA_PARALLEL_KEY] = serde_json::json!({
                        "world_size": c.size(),
                        "source_states": states,
                    });
                    save(ck)
                })
            } else {
                Err(errors.join("; "))
            };
            packet = serde_json::to_vec(&res).unwrap_or_default();
        }
        c.broadcast_bytes(0, &mut packet)
            .map_err(|e| e.to_string())?;
        let res: Result<(u64, String, u64), String> = serde_json::from_slice(&packet)
            .map_err(|e| format!("rank 0's checkpoint result does not decode: {e}"))?;
        tracing::debug!(
            seconds = t0.elapsed().as_secs_f64(),
            "checkpoint agreed over the ranks"
        );
        res
    }
}

/// Embeds this rank's `batch`, gathers every rank's keys and features, and adds them to the
/// buffer in rank order.
fn add_gathered(
    buffer: &mut WarmupBuffer,
    trainer: &crate::train::Trainer,
    c: &dyn Collective,
    batch: &Batch,
) -> Result<(), TopologyError> {
    let f = trainer.embed(&batch.images)?;
    let keys = c.all_gather_bytes(&encode_strings(&batch.keys))?;
    let feats = c.all_gather_f32(&f)?;
    for (ks, fs) in keys.iter().zip(feats.iter()) {
        let ks = decode_strings(ks).map_err(TrainError::from)?;
        buffer.add_rows(&ks, fs);
    }
    Ok(())
}
