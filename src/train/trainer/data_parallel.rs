//! The training step with more than one rank (OpenSelfSup's `odc_memory.py` split, adapted to
//! odcd's keyed, bounded memory):
//!
//! 1. every rank runs the forward pass on its own part of the global batch;
//! 2. the (key, feature) pairs of all ranks are all-gathered, in rank order: the global batch;
//! 3. rank 0 alone holds the ODC memory: it labels the global batch (`prepare`) and sends the
//!    labels and class weights to every rank;
//! 4. each rank's loss is its rows' share of the global weighted cross-entropy
//!    `Σ w[y]·CE / Σ w[y]` (the denominator over the GLOBAL batch), so the all-reduced SUM of
//!    the gradients is exactly the gradient one process would get with the whole batch;
//! 5. gradients, BatchNorm running statistics (averaged) and the loss/accuracy counts travel in
//!    ONE all-reduce; every rank then takes the same SGD step, so parameters stay identical;
//! 6. rank 0 updates its memory with the global batch (momentum rows, relabel, centroids,
//!    small clusters) and sends the labels after the step, the re-seeded clusters (every rank
//!    re-draws the same head rows from its identically seeded generator) and its statistics.
//!
//! BatchNorm is synchronised (SyncBN, as the reference's `r50_v1.py`): on odcd's CPU kernels
//! every BatchNorm normalises with the statistics of the global batch (`model::ops::BnSync`),
//! so the step is the one-process step on the whole batch up to floating-point order. On the
//! generic path (`train.kernels = "generic"`, CUDA) BatchNorm stays per rank. Either way the
//! running statistics are averaged over the ranks every step (a no-op under SyncBN, where
//! they are equal), so eval-mode features (warm-up clustering, embeddings) agree on every
//! rank.

use std::time::Instant;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{InitReport, StepOutput, StepTimings, TrainError, Trainer};
use crate::dist::{decode_strings, encode_strings, DistError};
use crate::odc::{self, MemoryStats};

/// What rank 0 sends after its memory update.
#[derive(Serialize, Deserialize)]
struct AfterUpdate {
    labels_after: Vec<u32>,
    reseeded: Vec<u32>,
    change_ratio: f64,
    revisited: usize,
    stats: MemoryStats,
}

/// What rank 0 sends after the initial clustering.
#[derive(Serialize, Deserialize)]
struct AfterInit {
    report: InitReport,
    stats: MemoryStats,
}

/// A packet from rank 0: `Ok(payload)`, or its error's message so that every rank fails
/// with it instead of waiting for a broadcast that never comes.
fn pack<T: Serialize>(r: &Result<T, TrainError>) -> Vec<u8> {
    let mut out = Vec::new();
    match r {
        Ok(v) => match serde_json::to_vec(v) {
            Ok(b) => {
                out.push(1);
                out.extend(b);
            }
            Err(e) => {
                out.push(0);
                out.extend(format!("cannot encode rank 0's result: {e}").into_bytes());
            }
        },
        Err(e) => {
            out.push(0);
            out.extend(e.to_string().into_bytes());
        }
    }
    out
}

fn unpack<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &'static str) -> Result<T, TrainError> {
    match bytes.split_first() {
        Some((1, body)) => serde_json::from_slice(body).map_err(|e| {
            TrainError::Dist(DistError::Protocol {
                op: what,
                message: format!("rank 0's packet does not decode: {e}"),
            })
        }),
        Some((_, body)) => Err(TrainError::RootFailed(
            String::from_utf8_lossy(body).into_owned(),
        )),
        None => Err(TrainError::Dist(DistError::Protocol {
            op: what,
            message: "empty packet from rank 0".into(),
        })),
    }
}

impl Trainer {
    /// The initial clustering with several ranks: every rank passes the same gathered warm-up
    /// buffer; rank 0 clusters it into its memory, the others only re-draw the head (the same
    /// draws as rank 0: identically seeded generators).
    pub(super) fn initial_clustering_distributed(
        &mut self,
        keys: Vec<String>,
        features: Vec<f32>,
    ) -> Result<InitReport, TrainError> {
        let c = self.collective.clone();
        let mut packet = if c.is_root() {
            let r = self
                .initial_clustering_local(keys, features)
                .map(|report| AfterInit {
                    report,
                    stats: self.memory.stats(),
                });
            let p = pack(&r);
            c.broadcast_bytes(0, &mut p.clone())?;
            return r.map(|a| a.report);
        } else {
            Vec::new()
        };
        c.broadcast_bytes(0, &mut packet)?;
        let init: AfterInit = unpack(&packet, "initial clustering")?;
        self.model.reinit_head()?;
        self.remote_stats = Some(init.stats);
        Ok(init.report)
    }

    /// One data-parallel step on this rank's part of the global batch (module docs).
    pub(super) fn step_distributed(
        &mut self,
        images: &Tensor,
        keys: &[String],
    ) -> Result<StepOutput, TrainError> {
        let c = self.collective.clone();
        let (rank, root) = (c.rank(), c.is_root());
        let b = images.dim(0)?;
        if b != keys.len() {
            return Err(TrainError::BatchMismatch {
                images: b,
                keys: keys.len(),
            });
        }
        let step = self.step;
        let d = self.model.config().feat_dim;
        let k = self.odc_cfg.num_clusters;
        let dev = self.model.device().clone();
        let images = images.to_device(&dev)?;

        let t0 = Instant::now();
        let dropout_seed = self.seed
            ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let out = self.model.forward_train(&images, dropout_seed)?;
        let features = out.features.detach().flatten_all()?.to_vec1::<f32>()?;

        // 2. the global batch, in rank order
        let t_mem0 = Instant::now();
        let gathered_keys = c.all_gather_bytes(&encode_strings(keys))?;
        let gathered_feats = c.all_gather_f32(&features)?;
        let mut all_keys = Vec::new();
        let mut offset = 0usize;
        for (r, bytes) in gathered_keys.iter().enumerate() {
            let ks = decode_strings(bytes)?;
            if gathered_feats[r].len() != ks.len() * d {
                return Err(TrainError::Dist(DistError::Protocol {
                    op: "all-gather features",
                    message: format!(
                        "rank {r} sent {} keys but {} feature values (D = {d})",
                        ks.len(),
                        gathered_feats[r].len()
                    ),
                }));
            }
            if r < rank {
                offset += ks.len();
            }
            all_keys.extend(ks);
        }
        let all_feats: Vec<f32> = gathered_feats.concat();
        let total = all_keys.len();

        // 3. labels and class weights from rank 0's memory
        let mut packet = Vec::new();
        let prepared = if root {
            let p = self.memory.prepare(&all_keys, &all_feats);
            let mut bytes = Vec::with_capacity(1 + 4 * (total + k));
            match &p {
                Ok(p) => {
                    bytes.push(1);
                    p.labels
                        .iter()
                        .for_each(|l| bytes.extend_from_slice(&l.to_le_bytes()));
                    p.weights
                        .iter()
                        .for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
                }
                Err(e) => {
                    bytes.push(0);
                    bytes.extend(e.to_string().into_bytes());
                }
            }
            packet = bytes;
            Some(p)
        } else {
            None
        };
        c.broadcast_bytes(0, &mut packet)?;
        let prepared = prepared.transpose()?;
        let (labels_all, weights) = match packet.split_first() {
            Some((1, body)) if body.len() == 4 * (total + k) => {
                let word = |i: usize| {
                    [
                        body[4 * i],
                        body[4 * i + 1],
                        body[4 * i + 2],
                        body[4 * i + 3],
                    ]
                };
                let labels: Vec<u32> = (0..total).map(|i| u32::from_le_bytes(word(i))).collect();
                let weights: Vec<f32> = (total..total + k)
                    .map(|i| f32::from_le_bytes(word(i)))
                    .collect();
                (labels, weights)
            }
            Some((0, body)) => {
                return Err(TrainError::RootFailed(
                    String::from_utf8_lossy(body).into_owned(),
                ))
            }
            _ => {
                return Err(TrainError::Dist(DistError::Protocol {
                    op: "broadcast labels",
                    message: format!(
                        "rank 0's labels packet has {} bytes, expected {}",
                        packet.len(),
                        1 + 4 * (total + k)
                    ),
                }))
            }
        };
        let labels: Vec<u32> = labels_all[offset..offset + b].to_vec();
        let mem_prepare = t_mem0.elapsed().as_secs_f64();

        // 4. this rank's share of the global weighted loss
        let weight_of = |l: &u32| f64::from(weights.get(*l as usize).copied().unwrap_or(0.0));
        let w_global: f64 = labels_all.iter().map(weight_of).sum();
        let w_local: f64 = labels.iter().map(weight_of).sum();
        let targets = Tensor::from_vec(labels.clone(), b, &dev)?;
        let w = Tensor::from_vec(weights, k, &dev)?;
        let local = odc::weighted_cross_entropy_tensor(&out.logits, &targets, &w)?;
        let loss = (local * (w_local / w_global))?;
        let loss_local = loss.to_scalar::<f32>()?;
        let hits = {
            let pred = out.logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
            pred.iter()
                .zip(labels.iter())
                .filter(|(a, b)| a == b)
                .count()
        };
        let t1 = Instant::now();
        let mut grads = self.model.backward(&loss)?;
        let t2 = Instant::now();

        // 5. one all-reduce: gradients (summed), BN running statistics (averaged), loss, hits
        let params = self.model.params();
        let mut flat: Vec<f32> = Vec::new();
        let mut grad_parts = Vec::new();
        for var in params.params().values() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let v = g.flatten_all()?.to_vec1::<f32>()?;
                grad_parts.push((var.as_tensor().clone(), g.shape().clone(), v.len()));
                flat.extend(v);
            }
        }
        let grads_len = flat.len();
        let mut buffer_parts = Vec::new();
        for buf in params.buffers().values() {
            let t = buf.get();
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            buffer_parts.push((buf.clone(), t.shape().clone(), v.len()));
            flat.extend(v);
        }
        flat.push(loss_local);
        flat.push(hits as f32);
        c.all_reduce_sum(&mut flat)?;
        let mut at = 0usize;
        for (var, shape, n) in grad_parts {
            let g = Tensor::from_vec(flat[at..at + n].to_vec(), shape, &dev)?;
            grads.insert(&var, g);
            at += n;
        }
        debug_assert_eq!(at, grads_len);
        let ranks = c.size() as f32;
        for (buf, shape, n) in buffer_parts {
            let v: Vec<f32> = flat[at..at + n].iter().map(|x| x / ranks).collect();
            buf.set(Tensor::from_vec(v, shape, &dev)?);
            at += n;
        }
        let loss_v = flat[at];
        let accuracy = flat[at + 1] / total.max(1) as f32;
        if !loss_v.is_finite() {
            return Err(TrainError::NonFinite(loss_v, step));
        }
        let lr = self.opt.step(&grads, step)?;
        drop(grads);
        let t3 = Instant::now();

        // 6. rank 0 updates the memory; everyone learns the outcome
        let mut packet = Vec::new();
        if let Some(prepared) = &prepared {
            let r = self
                .memory
                .update(&all_keys, &all_feats, prepared)
                .map_err(TrainError::from)
                .and_then(|upd| {
                    let after = self.memory.after_step(step)?;
                    let labels_after = all_keys
                        .iter()
                        .zip(prepared.labels.iter())
                        .map(|(key, &l)| self.memory.label_of(key).unwrap_or(l))
                        .collect();
                    Ok(AfterUpdate {
                        labels_after,
                        reseeded: after.reseeded,
                        change_ratio: upd.change_ratio,
                        revisited: upd.seen,
                        stats: self.memory.stats(),
                    })
                });
            packet = pack(&r);
        }
        c.broadcast_bytes(0, &mut packet)?;
        let after: AfterUpdate = unpack(&packet, "memory update")?;
        if after.labels_after.len() != total {
            return Err(TrainError::Dist(DistError::Protocol {
                op: "broadcast memory update",
                message: format!(
                    "rank 0 sent {} labels for a global batch of {total}",
                    after.labels_after.len()
                ),
            }));
        }
        if self.odc_cfg.reinit_reseeded_heads && !after.reseeded.is_empty() {
            let rows: Vec<usize> = after.reseeded.iter().map(|&r| r as usize).collect();
            self.model.reinit_head_rows(&rows)?;
        }
        let t4 = Instant::now();
        self.step += 1;
        self.remote_stats = (!root).then_some(after.stats);
        Ok(StepOutput {
            step,
            loss: loss_v,
            accuracy,
            features,
            labels_used: labels,
            labels_after: after.labels_after[offset..offset + b].to_vec(),
            change_ratio: after.change_ratio,
            revisited: after.revisited,
            lr,
            reseeded: after.reseeded,
            timings: StepTimings {
                forward: (t1 - t0).as_secs_f64() - mem_prepare,
                backward: (t2 - t1).as_secs_f64(),
                optimizer: (t3 - t2).as_secs_f64(),
                memory: (t4 - t3).as_secs_f64() + mem_prepare,
            },
        })
    }
}

impl Trainer {
    /// Averages the BatchNorm running statistics over the ranks (after a per-rank BatchNorm
    /// calibration), so that eval-mode features agree on every rank. One process: nothing.
    pub fn average_running_statistics(&self) -> Result<(), TrainError> {
        let c = &self.collective;
        if c.size() == 1 {
            return Ok(());
        }
        let mut parts = Vec::new();
        let mut flat = Vec::new();
        for buf in self.model.params().buffers().values() {
            let t = buf.get();
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            parts.push((buf.clone(), t.shape().clone(), v.len()));
            flat.extend(v);
        }
        c.all_reduce_sum(&mut flat)?;
        let (ranks, dev) = (c.size() as f32, self.model.device().clone());
        let mut at = 0;
        for (buf, shape, n) in parts {
            let v: Vec<f32> = flat[at..at + n].iter().map(|x| x / ranks).collect();
            buf.set(Tensor::from_vec(v, shape, &dev)?);
            at += n;
        }
        Ok(())
    }

    /// Drops the ODC memory's contents on a rank other than 0 (after a resume loaded the
    /// checkpoint's memory): with several ranks only rank 0 keeps one.
    pub fn release_memory_unless_root(&mut self) -> Result<(), TrainError> {
        if self.collective.is_root() {
            return Ok(());
        }
        let cfg = self.memory.config().clone();
        self.replace_memory(odc::StreamingMemory::new(cfg)?);
        Ok(())
    }
}
