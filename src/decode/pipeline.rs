//! source → bounded channel → decode + augment on rayon → bounded channel of `Batch`.

use super::augment::{eval_transform, sample_rng, train_transform};
use super::config::{PipelineConfig, TransformConfig};
use super::image::{decode_into, DecodeError};
use crate::deadletter::DeadLetter;
use crate::record::{Batch, Record};
use crate::source::{DataMetrics, RejectReason, RejectedRecord, SourceItem, SourceState};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Errors building a pipeline (bad config); bad data never errors, it is rejected and counted.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline config: {0}")]
    Config(String),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("could not start the decode thread pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

/// Decodes and transforms a batch of records on the current rayon pool.
#[derive(Debug, Clone)]
pub struct BatchDecoder {
    cfg: Arc<PipelineConfig>,
}

thread_local! {
    // Per-thread scratch: decoding and warping allocate nothing per image once warm.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

impl BatchDecoder {
    /// Check the config (channels, sizes, mean/std lengths).
    pub fn new(cfg: PipelineConfig) -> Result<Self, PipelineError> {
        let c = cfg.decode.channels;
        if c != 1 && c != 3 {
            return Err(PipelineError::Config(format!(
                "decode.channels = {c}, must be 1 or 3"
            )));
        }
        if cfg.batch_size == 0 {
            return Err(PipelineError::Config("batch_size must be ≥ 1".into()));
        }
        let (size, mean, std) = match &cfg.transform {
            TransformConfig::Train(a) => {
                if !(a.scale.0 > 0.0
                    && a.scale.0 <= a.scale.1
                    && a.ratio.0 > 0.0
                    && a.ratio.0 <= a.ratio.1)
                {
                    return Err(PipelineError::Config(format!(
                        "transform.train scale {:?} / ratio {:?} must be positive, ordered (lo ≤ hi)",
                        a.scale, a.ratio
                    )));
                }
                if !(0.0..=0.5).contains(&a.hue) {
                    return Err(PipelineError::Config(format!(
                        "transform.train.hue = {} must be in [0, 0.5]",
                        a.hue
                    )));
                }
                (a.size, &a.mean, &a.std)
            }
            TransformConfig::Eval(e) => {
                if e.resize < e.size {
                    return Err(PipelineError::Config(format!(
                        "transform.eval.resize = {} must be ≥ size = {}",
                        e.resize, e.size
                    )));
                }
                (e.size, &e.mean, &e.std)
            }
        };
        if size == 0 {
            return Err(PipelineError::Config("transform size must be ≥ 1".into()));
        }
        for (name, v) in [("mean", mean), ("std", std)] {
            if v.len() != 1 && v.len() != c as usize {
                return Err(PipelineError::Config(format!(
                    "transform {name} has {} values; give 1 or {c} (one per channel)",
                    v.len()
                )));
            }
        }
        if std.contains(&0.0) {
            return Err(PipelineError::Config(
                "transform std must not contain 0".into(),
            ));
        }
        Ok(BatchDecoder { cfg: Arc::new(cfg) })
    }

    /// The config this decoder runs.
    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// Decode + transform `records` in parallel on the current rayon pool, keeping their order.
    /// `visits[i]` (the source pass that read record i; missing = 0) varies the augmentation
    /// between passes. Returns the batch of the good records (None if none) and the rejected ones.
    pub fn decode_batch(
        &self,
        records: Vec<Record>,
        visits: &[u64],
    ) -> (Option<Batch>, Vec<RejectedRecord>) {
        let cfg = &*self.cfg;
        let c = cfg.decode.channels as usize;
        let s = cfg.transform.size() as usize;
        let per = c * s * s;
        let mut data = vec![0f32; per * records.len()];
        let results: Vec<Result<(), DecodeError>> = data
            .par_chunks_mut(per)
            .zip(records.par_iter())
            .enumerate()
            .map(|(i, (dst, rec))| {
                let visit = visits.get(i).copied().unwrap_or(0);
                // A decoder bug on hostile bytes must cost one record, not the daemon.
                let run = std::panic::AssertUnwindSafe(|| {
                    SCRATCH.with(|cell| {
                        let mut guard = cell.borrow_mut();
                        let (pix, tmp, fbuf) = &mut *guard;
                        let (w, h) = decode_into(&rec.image, &cfg.decode, pix, tmp)?;
                        match &cfg.transform {
                            TransformConfig::Train(a) => {
                                let mut rng = sample_rng(cfg.seed, &rec.key, visit);
                                train_transform(pix, w, h, c, a, &mut rng, fbuf, dst);
                            }
                            TransformConfig::Eval(e) => eval_transform(pix, w, h, c, e, fbuf, dst),
                        }
                        Ok(())
                    })
                });
                std::panic::catch_unwind(run).unwrap_or_else(|_| {
                    Err(DecodeError::Undecodable(
                        "the image decoder panicked on this input".into(),
                    ))
                })
            })
            .collect();
        let mut rejects = Vec::new();
        let mut keep = Vec::with_capacity(records.len());
        for (rec, res) in records.into_iter().zip(results) {
            match res {
                Ok(()) => keep.push(Some(rec)),
                Err(e) => {
                    let (reason, msg) = match e {
                        DecodeError::TooLarge(m) => (RejectReason::TooLarge, m),
                        DecodeError::Undecodable(m) => (RejectReason::Undecodable, m),
                    };
                    rejects.push(RejectedRecord {
                        message: format!("{} image of key {}: {msg}", rec.format, rec.key),
                        key: rec.key,
                        reason,
                        position: rec.position,
                        payload: Some(rec.image),
                        format: Some(rec.format.into_owned()),
                    });
                    keep.push(None);
                }
            }
        }
        if !rejects.is_empty() {
            // Compact the good images to the front, keeping order.
            let mut out = 0;
            for (i, k) in keep.iter().enumerate() {
                if k.is_some() {
                    if i != out {
                        data.copy_within(i * per..(i + 1) * per, out * per);
                    }
                    out += 1;
                }
            }
            data.truncate(out * per);
        }
        let good: Vec<Record> = keep.into_iter().flatten().collect();
        if good.is_empty() {
            return (None, rejects);
        }
        let n = good.len();
        let images = match Tensor::from_vec(data, (n, c, s, s), &Device::Cpu) {
            Ok(t) => t,
            Err(e) => {
                // Shape is computed above, so this is a bug; reject rather than panic the daemon.
                tracing::error!("building batch tensor failed: {e}");
                return (None, rejects);
            }
        };
        let mut keys = Vec::with_capacity(n);
        let mut class_labels = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        for r in good {
            keys.push(r.key);
            class_labels.push(r.class_label);
            positions.push(r.position);
        }
        let batch = Batch {
            images,
            keys,
            class_labels,
            positions,
        };
        (Some(batch), rejects)
    }
}

/// Batches out of a running pipeline, with the source state as of the last batch handed out.
pub struct BatchStream {
    rx: mpsc::Receiver<(Batch, SourceState)>,
    state: SourceState,
}

impl BatchStream {
    /// Next batch; `None` when the source ended (once/loop) or the pipeline was cancelled.
    pub async fn next(&mut self) -> Option<Batch> {
        let (batch, state) = self.rx.recv().await?;
        self.state = state;
        Some(batch)
    }

    /// Decoded batches waiting in the bounded queue (for the queue-depth metric).
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Resume point covering every batch returned so far (and the rejects before them):
    /// store it in checkpoints and pass it back to the source on restart.
    pub fn state(&self) -> &SourceState {
        &self.state
    }

    /// Start decoding `source` (a source's receiver) into batches. The decode runs on its own
    /// rayon pool (`cfg.threads`); the stages are joined by bounded channels, so a slow consumer
    /// slows the source instead of growing memory. `resume` must be the state the source was
    /// started from.
    pub fn spawn(
        source: mpsc::Receiver<SourceItem>,
        cfg: PipelineConfig,
        metrics: DataMetrics,
        dead_letter: Option<DeadLetter>,
        resume: SourceState,
        cancel: CancellationToken,
    ) -> Result<BatchStream, PipelineError> {
        let decoder = BatchDecoder::new(cfg)?;
        let cfg = decoder.config().clone();
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(cfg.threads)
                .thread_name(|i| format!("odcd-decode-{i}"))
                .build()?,
        );
        let (tx, rx) = mpsc::channel(cfg.batch_queue.max(1));
        let dl_tx = dead_letter.map(|dl| {
            crate::deadletter::spawn_writer(dl, cfg.dead_letter_queue.max(1), metrics.clone())
        });
        let stage = Stage {
            source,
            decoder,
            pool,
            out: Outlet {
                metrics,
                dl_tx,
                tx,
                cancel,
            },
            state: resume.clone(),
        };
        tokio::spawn(stage.run());
        Ok(BatchStream { rx, state: resume })
    }
}

/// The async side of the decode stage: only moves records and waits; CPU work goes to rayon.
struct Stage {
    source: mpsc::Receiver<SourceItem>,
    decoder: BatchDecoder,
    pool: Arc<rayon::ThreadPool>,
    state: SourceState,
    out: Outlet,
}

/// Where decoded batches and rejected records go.
#[derive(Clone)]
struct Outlet {
    metrics: DataMetrics,
    dl_tx: Option<mpsc::Sender<RejectedRecord>>,
    tx: mpsc::Sender<(Batch, SourceState)>,
    cancel: CancellationToken,
}

impl Outlet {
    fn reject(&self, r: RejectedRecord) {
        self.metrics.reject(&r);
        if let Some(dl) = &self.dl_tx {
            // Never block the data path on the dead-letter store.
            if dl.try_send(r).is_err() {
                self.metrics.deadletter_dropped.inc();
            }
        }
    }

    /// Waits for a decoded batch and sends it on. False when the pipeline must stop.
    async fn deliver(self, orx: oneshot::Receiver<Decoded>, state: SourceState) -> bool {
        let Ok((batch, rejects)) = orx.await else {
            tracing::error!("decode worker vanished; stopping the pipeline");
            return false;
        };
        for r in rejects {
            self.reject(r);
        }
        let Some(batch) = batch else { return true };
        self.metrics.records_decoded.inc_by(batch.keys.len() as u64);
        self.metrics.batches.inc();
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            r = self.tx.send((batch, state)) => r.is_ok(),
        }
    }
}

impl Stage {
    async fn run(mut self) {
        let cfg = self.decoder.config().clone();
        let wait = Duration::from_millis(cfg.max_batch_wait_ms.max(1));
        let mut ended = false;
        let mut inbox: Vec<SourceItem> = Vec::with_capacity(cfg.batch_size);
        // The previous batch's decode + send, running while the next batch is collected.
        // At most one: the collector waits for it before starting another, so a slow
        // trainer still slows the source (backpressure) and batches keep their order.
        let mut in_flight: Option<tokio::task::JoinHandle<bool>> = None;
        while !ended {
            let mut records = Vec::with_capacity(cfg.batch_size);
            // The pass that read each record: the augmentation's visit counter.
            let mut visits = Vec::with_capacity(cfg.batch_size);
            let mut deadline = None;
            while records.len() < cfg.batch_size {
                // Everything already queued, up to what the batch still needs: one wake-up
                // per burst, not per record.
                let want = cfg.batch_size - records.len();
                let got = tokio::select! {
                    _ = self.out.cancel.cancelled() => return,
                    _ = sleep_until(deadline) => break,
                    n = self.source.recv_many(&mut inbox, want) => n,
                };
                if got == 0 {
                    ended = true;
                    break;
                }
                for item in inbox.drain(..) {
                    match item {
                        Ok(rec) => {
                            self.state.observe(&rec.position);
                            visits.push(self.state.pass);
                            records.push(rec);
                        }
                        Err(rej) => {
                            self.state.observe(&rej.position);
                            self.out.reject(rej);
                        }
                    }
                }
                if !records.is_empty() {
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
                }
            }
            if let Some(prev) = in_flight.take() {
                if !prev.await.unwrap_or(false) {
                    return;
                }
            }
            if records.is_empty() {
                continue;
            }
            let (otx, orx) = oneshot::channel();
            let decoder = self.decoder.clone();
            self.pool.spawn(move || {
                let _ = otx.send(decoder.decode_batch(records, &visits));
            });
            in_flight = Some(tokio::spawn(
                self.out.clone().deliver(orx, self.state.clone()),
            ));
        }
        if let Some(last) = in_flight.take() {
            let _ = last.await;
        }
    }
}

/// A decoded batch (None when every record was rejected) and the rejected records.
type Decoded = (Option<Batch>, Vec<RejectedRecord>);

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
