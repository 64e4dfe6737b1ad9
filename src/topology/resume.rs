//! Resume at start: the latest valid checkpoint is read (retried while the store is
//! unreachable) and restored into the trainer; its source position is where the data path
//! starts.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::TopologyError;
use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use crate::eval::history::History;
use crate::metrics::Health;
use crate::odc::StreamingMemory;
use crate::source::SourceState;
use crate::train::Trainer;

/// Retries a start-up read of the checkpoint store while the store is unreachable: starting
/// fresh instead would silently throw away the training the store holds. `/readyz` says why the
/// daemon is waiting; a damaged checkpoint or a bad configuration is not retried.
pub(crate) struct StartupRetry {
    /// Give up after this long (zero: never).
    pub timeout: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl StartupRetry {
    /// `Ok(None)` when `cancel` fired while waiting.
    pub async fn run<T, F, Fut>(
        &self,
        health: &Health,
        cancel: &CancellationToken,
        mut attempt: F,
    ) -> Result<Option<T>, CheckpointError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, CheckpointError>>,
    {
        let started = Instant::now();
        let mut backoff = self.first_backoff.min(self.max_backoff);
        loop {
            let res = tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                r = attempt() => r,
            };
            match res {
                Ok(v) => {
                    health.set_startup_blocked(None);
                    return Ok(Some(v));
                }
                Err(e)
                    if e.is_transport()
                        && (self.timeout.is_zero() || started.elapsed() < self.timeout) =>
                {
                    tracing::error!(
                        retry_in_secs = backoff.as_secs_f64(),
                        "cannot read the checkpoint store to resume: {e}; retrying (checkpoint.startup_timeout_secs bounds the wait)"
                    );
                    health.set_startup_blocked(Some(format!(
                        "checkpoint store unreachable, retrying: {e}"
                    )));
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where a run starts: the step it resumed from (none: a fresh start), the source position
/// and the training curves so far.
#[derive(Default)]
pub struct Resumed {
    pub step: Option<u64>,
    pub source: SourceState,
    pub history: History,
    /// The checkpoint's `extra` (a multi-rank run's per-rank positions live there).
    pub extra: serde_json::Value,
}

/// Restores `trainer` from the latest valid checkpoint in `store`, waiting up to
/// `startup_timeout` (zero: for ever) while the store cannot be read. `Ok(None)` when `cancel`
/// fired meanwhile; a store without checkpoints is a fresh start.
pub async fn resume_latest(
    store: &CheckpointStore,
    startup_timeout: Duration,
    trainer: &mut Trainer,
    health: &Health,
    cancel: &CancellationToken,
) -> Result<Option<Resumed>, TopologyError> {
    let retry = StartupRetry {
        timeout: startup_timeout,
        first_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(30),
    };
    let latest = retry
        .run(health, cancel, || store.load_latest_valid())
        .await?;
    Ok(match latest {
        None => None,
        Some(None) => Some(Resumed::default()),
        Some(Some((m, ckpt))) => {
            let (step, history) = (ckpt.step, History::from_extra(&ckpt.extra));
            let extra = ckpt.extra.clone();
            let source = restore(trainer, ckpt)?;
            tracing::info!(step, id = %m.id, "resumed from checkpoint");
            Some(Resumed {
                step: Some(step),
                source,
                history,
                extra,
            })
        }
    })
}

/// Restores trainer state from a checkpoint; returns the source resume position. Takes the
/// checkpoint so that its memory becomes the trainer's without a second copy.
pub fn restore(trainer: &mut Trainer, mut ckpt: Checkpoint) -> Result<SourceState, TopologyError> {
    let step = ckpt.step;
    let err = |message: String| TopologyError::Resume { step, message };
    trainer
        .model()
        .load_safetensors(&ckpt.model_safetensors)
        .map_err(|e| err(format!("model: {e}")))?;
    trainer
        .optimizer_mut()
        .load_state(&ckpt.optimizer)
        .map_err(|e| err(format!("optimizer: {e}")))?;
    let Some(state) = ckpt.memory.take() else {
        return Err(err("the checkpoint holds no ODC memory".into()));
    };
    let mem = StreamingMemory::from_state(state).map_err(|e| err(format!("ODC memory: {e}")))?;
    if mem.config().k != trainer.memory().config().k
        || mem.config().dim != trainer.memory().config().dim
    {
        return Err(err(format!(
            "its memory has K = {}, D = {} but the config asks for K = {}, D = {}: use another checkpoint.url for a new configuration",
            mem.config().k,
            mem.config().dim,
            trainer.memory().config().k,
            trainer.memory().config().dim
        )));
    }
    trainer.replace_memory(mem);
    trainer.set_step(ckpt.step);
    let source: SourceState = if ckpt.source_state.is_null() {
        SourceState::default()
    } else {
        serde_json::from_value(ckpt.source_state.clone())
            .map_err(|e| err(format!("source position: {e}")))?
    };
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn unreachable() -> CheckpointError {
        CheckpointError::List {
            url: "s3://ckpt/".into(),
            path: "manifests".into(),
            message: "connection refused".into(),
        }
    }

    fn retry(timeout_ms: u64) -> StartupRetry {
        StartupRetry {
            timeout: Duration::from_millis(timeout_ms),
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn startup_waits_out_an_unreachable_store_and_says_so() {
        let health = Health::new();
        let calls = AtomicU32::new(0);
        let seen_blocked = std::sync::Mutex::new(None);
        let got = retry(0)
            .run(&health, &CancellationToken::new(), || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n == 3 {
                    *seen_blocked.lock().unwrap() = health.not_ready();
                }
                async move {
                    if n < 3 {
                        Err(unreachable())
                    } else {
                        Ok(7u64)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(got, Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let why = seen_blocked.lock().unwrap().clone().unwrap();
        assert!(why.contains("checkpoint store unreachable"), "{why}");
        // Once through, start-up no longer holds readiness back.
        assert!(!health.not_ready().unwrap().contains("unreachable"));
    }

    #[tokio::test]
    async fn a_damaged_checkpoint_or_timeout_is_an_error_not_a_fresh_start() {
        let health = Health::new();
        let corrupt = retry(0)
            .run(&health, &CancellationToken::new(), || async {
                Err::<(), _>(CheckpointError::NoSuchStep {
                    url: "file:///c".into(),
                    step: 3,
                })
            })
            .await;
        assert!(matches!(corrupt, Err(CheckpointError::NoSuchStep { .. })));

        let timed_out = retry(50)
            .run(&health, &CancellationToken::new(), || async {
                Err::<(), _>(unreachable())
            })
            .await;
        assert!(matches!(timed_out, Err(CheckpointError::List { .. })));
    }

    #[tokio::test]
    async fn shutdown_while_waiting_ends_cleanly() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            c2.cancel();
        });
        let got = retry(0)
            .run(&Health::new(), &cancel, || async {
                Err::<(), _>(unreachable())
            })
            .await
            .unwrap();
        assert_eq!(got, None);
    }
}
