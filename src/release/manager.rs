//! The daemon's release manager, on a thread of its own: it judges the candidate
//! checkpoints the training loop offers (promoting one creates a pending release), and in
//! between does the release work ([`Worker`]: fresh arrivals, backfill, completion) on
//! `releases.cpu_share` of the cores, so training keeps going. When a run ends by itself it
//! finishes the pending release at full speed before the daemon exits; on SIGTERM it stops
//! at once and the next start resumes the work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config::{Backfill, ReleasesConfig};
use super::judge::{Candidate, Judge, Verdict};
use super::layout::{now_secs, release_id, CheckpointRef, ReleaseSpec, FORMAT_VERSION};
use super::metrics::{RejectReason, ReleaseMetrics};
use super::store::ReleaseStore;
use super::worker::{Catalog, Step, Targets, Worker, WorkerSettings};
use super::ReleaseError;
use crate::deadletter::DeadLetterConfig;
use crate::eval::{EvalModel, KnnEvalConfig};

/// What the manager is built from (sections of the run's config).
pub struct ManagerSettings {
    pub cfg: ReleasesConfig,
    /// The run's network (candidates and the untrained baseline are built from it).
    pub net: EvalModel,
    /// A labelled set for promotion by k-NN (`[eval]`), if any.
    pub eval: Option<KnnEvalConfig>,
    /// `[checkpoint] url`: named in each release's spec.
    pub checkpoint_url: String,
    pub catalog_url: String,
    pub catalog_options: std::collections::BTreeMap<String, String>,
    /// `pipeline.dead_letter`: records a release cannot embed go there too.
    pub dead_letter: Option<DeadLetterConfig>,
}

#[derive(Default)]
struct InboxState {
    candidate: Option<Candidate>,
    /// `Some(true)`: the run ended by itself, finish the pending release; `Some(false)`: stop.
    finish: Option<bool>,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    wake: Condvar,
}

impl Inbox {
    fn take(&self) -> (Option<Candidate>, Option<bool>) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (g.candidate.take(), g.finish)
    }

    /// Waits until something arrives or `d` passes.
    fn wait(&self, d: Duration) {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if g.candidate.is_some() || g.finish.is_some() {
            return;
        }
        let _ = self.wake.wait_timeout(g, d);
    }

    fn put(&self, f: impl FnOnce(&mut InboxState)) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
        self.wake.notify_all();
    }
}

/// The manager thread's handle. Dropping it without [`ReleaseManager::finish`] stops it.
pub struct ReleaseManager {
    inbox: Arc<Inbox>,
    every: u64,
    offered: AtomicU64,
    join: Option<std::thread::JoinHandle<()>>,
}

impl ReleaseManager {
    /// Registers the `odcd_release_*` series and starts the thread. `rt` runs its I/O.
    pub fn spawn(
        s: ManagerSettings,
        registry: &prometheus::Registry,
        rt: tokio::runtime::Handle,
        cancel: CancellationToken,
    ) -> Result<Self, ReleaseError> {
        let metrics = ReleaseMetrics::register(registry)?;
        let store = ReleaseStore::open(&s.cfg.url, &s.cfg.options)?;
        let catalog = Catalog::open(&s.catalog_url, &s.catalog_options)?;
        let worker = Worker::new(
            WorkerSettings {
                store: store.clone(),
                catalog,
                split: None,
                dead_letter: s.dead_letter.clone(),
                batch: s.cfg.batch_size,
                device: s.net.device.clone(),
                poll: Duration::from_millis(s.cfg.poll_interval_ms),
                keep: s.cfg.keep,
                share: s.cfg.cpu_share,
                kafka: s.cfg.kafka.clone(),
            },
            metrics.clone(),
            cancel.clone(),
        )?;
        let inbox = Arc::new(Inbox::default());
        let every = s.cfg.every_checkpoints;
        let mut m = Manager {
            s,
            store,
            worker,
            judge: None,
            deferred: None,
            judged: None,
            metrics,
            rt,
            cancel,
        };
        let thread_inbox = inbox.clone();
        let join = std::thread::Builder::new()
            .name("odcd-releases".into())
            .spawn(move || m.run(&thread_inbox))
            .map_err(|e| ReleaseError::Model(format!("cannot start the release thread: {e}")))?;
        Ok(ReleaseManager {
            inbox,
            every,
            offered: AtomicU64::new(0),
            join: Some(join),
        })
    }

    /// Offers checkpoint `c`: every `every_checkpoints`-th one (and the last of a run) is
    /// judged. A candidate not judged yet is replaced by a newer one. Never blocks.
    pub fn offer(&self, c: Candidate) {
        let n = self.offered.fetch_add(1, Ordering::Relaxed) + 1;
        if c.last_of_run || n.is_multiple_of(self.every) {
            self.inbox.put(|s| s.candidate = Some(c));
        }
    }

    /// Ends the manager: with `complete`, after finishing the pending release at full speed
    /// (the run ended by itself); else at once. Waits for the thread.
    pub fn finish(mut self, complete: bool) {
        self.stop(complete);
    }

    fn stop(&mut self, complete: bool) {
        self.inbox.put(|s| s.finish = Some(complete));
        if let Some(j) = self.join.take() {
            if j.join().is_err() {
                tracing::error!("the release thread panicked");
            }
        }
    }
}

impl Drop for ReleaseManager {
    fn drop(&mut self) {
        self.stop(false);
    }
}

struct Manager {
    s: ManagerSettings,
    store: ReleaseStore,
    worker: Worker,
    judge: Option<Judge>,
    /// The newest candidate that arrived while a release was being built: judged once that
    /// release is complete.
    deferred: Option<Candidate>,
    /// The last step whose judgement was final (promoted, or rejected on its figures): the
    /// last checkpoint of a run is often also a scheduled one, and is offered twice.
    judged: Option<u64>,
    metrics: ReleaseMetrics,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
}

/// Consecutive failures after which a finishing manager gives up (the pending release stays
/// pending and the next start resumes it).
const FINISH_MAX_FAILURES: u32 = 8;

impl Manager {
    fn run(&mut self, inbox: &Inbox) {
        let poll = Duration::from_millis(self.s.cfg.poll_interval_ms);
        let in_process = self.s.cfg.backfill == Backfill::InProcess;
        let mut finishing = false;
        let mut failures = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            let (candidate, finish) = inbox.take();
            if let Some(c) = candidate {
                self.consider(c);
            }
            match finish {
                Some(false) => break,
                Some(true) if !finishing => {
                    finishing = true;
                    if let Err(e) = self.worker.set_share(1.0) {
                        tracing::warn!("release work stays at its share: {e}");
                    }
                }
                _ => {}
            }
            let targets = match self.rt.block_on(Targets::read(&self.store)) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("cannot read the releases (tried again): {e}");
                    None
                }
            };
            if targets.as_ref().is_some_and(|t| t.pending.is_none()) {
                if let Some(d) = self.deferred.take() {
                    self.consider(d);
                    continue;
                }
            }
            let step = match &targets {
                // A fleet builds releases: the daemon only judges and notices completion.
                Some(_) if !in_process => Ok(Step::Idle),
                Some(t) => self.rt.block_on(self.worker.step(t)),
                None => Err(ReleaseError::Model("the releases could not be read".into())),
            };
            let pause = match step {
                Ok(Step::Idle) => {
                    failures = 0;
                    if finishing {
                        break;
                    }
                    Some(poll)
                }
                Ok(_) => {
                    failures = 0;
                    None
                }
                Err(ReleaseError::Cancelled) => break,
                Err(e) => {
                    failures += 1;
                    self.metrics.errors.inc();
                    tracing::warn!(
                        failures,
                        "release work failed, tried again (training is not affected): {e}"
                    );
                    if finishing && failures >= FINISH_MAX_FAILURES {
                        tracing::error!("giving up the release work at shutdown: the pending release stays pending and the next start resumes it");
                        break;
                    }
                    Some(Duration::from_millis(100 << failures.min(6)).min(poll))
                }
            };
            if let Some(p) = pause {
                inbox.wait(p);
            }
        }
    }

    fn reject(&self, step: u64, reason: RejectReason, why: &str) {
        self.metrics.rejected(reason);
        tracing::info!(
            step,
            reason = reason.as_str(),
            "release candidate rejected: {why}"
        );
    }

    /// Judges candidate `c` and, if it passes, creates its release (pending).
    fn consider(&mut self, c: Candidate) {
        self.metrics.candidate_step.set(c.step as i64);
        match self.try_consider(&c) {
            Ok(()) => {}
            Err(ReleaseError::Cancelled) => {}
            Err(e) => {
                self.metrics.errors.inc();
                self.reject(c.step, RejectReason::Failed, &e.to_string());
            }
        }
    }

    fn try_consider(&mut self, c: &Candidate) -> Result<(), ReleaseError> {
        let p = self.s.cfg.promote.clone();
        if self.judged == Some(c.step) {
            tracing::debug!(step = c.step, "release candidate already judged");
            return Ok(());
        }
        if c.step < p.min_steps {
            self.reject(
                c.step,
                RejectReason::TooEarly,
                &format!(
                    "step {} < releases.promote.min_steps = {}",
                    c.step, p.min_steps
                ),
            );
            return Ok(());
        }
        let (targets, all) = self.rt.block_on(async {
            let t = Targets::read(&self.store).await?;
            let all = self.store.list().await?;
            Ok::<_, ReleaseError>((t, all))
        })?;
        if let Some(pending) = &targets.pending {
            if let Some(old) = self.deferred.replace(c.clone()) {
                if old.step != c.step {
                    self.reject(
                        old.step,
                        RejectReason::Building,
                        &format!(
                            "step {} arrived while release {} was being built",
                            c.step, pending.id
                        ),
                    );
                }
            }
            tracing::info!(
                step = c.step,
                "release candidate deferred: release {} is still being built; judged once it is complete",
                pending.id
            );
            return Ok(());
        }
        if let Some(cur) = &targets.current {
            if c.step <= cur.spec.checkpoint.step {
                self.reject(
                    c.step,
                    RejectReason::TooEarly,
                    &format!("not newer than the current release {}", cur.id),
                );
                return Ok(());
            }
        }
        let last_created = all.iter().map(|r| r.spec.created_unix_secs).max();
        if let Some(t) = last_created.filter(|_| !c.last_of_run) {
            let since = now_secs().saturating_sub(t);
            if since < p.min_interval_secs {
                self.reject(
                    c.step,
                    RejectReason::Interval,
                    &format!("the last release was made {since} s ago (releases.promote.min_interval_secs = {})", p.min_interval_secs),
                );
                return Ok(());
            }
        }
        if self.judge.is_none() {
            let judge = self.rt.block_on(Judge::load(
                self.s.net.clone(),
                self.s.cfg.feature,
                &self.s.catalog_url,
                &self.s.catalog_options,
                self.s.cfg.reference_samples,
                self.s.eval.as_ref(),
                self.s.cfg.batch_size,
                &self.cancel,
            ))?;
            self.judge = Some(judge);
        }
        let Some(judge) = self.judge.as_mut() else {
            return Ok(());
        };
        let current = match &targets.current {
            Some(cur) => {
                let (weights, (mean, _)) = self.rt.block_on(async {
                    Ok::<_, ReleaseError>((
                        self.store.read_model(&cur.id).await?,
                        self.store.read_centring(&cur.id).await?,
                    ))
                })?;
                Some((cur.id.clone(), weights, mean))
            }
            None => None,
        };
        let a = judge.assess(
            &c.weights,
            self.s.cfg.calibrate_bn,
            current
                .as_ref()
                .map(|(id, w, m)| (id.as_str(), &w[..], &m[..])),
            &mut self.worker.share,
            &self.cancel,
        )?;
        a.export(&self.metrics);
        self.judged = Some(c.step);
        let why = match a.verdict(&p) {
            Verdict::Reject(reason, why) => {
                self.reject(c.step, reason, &why);
                return Ok(());
            }
            Verdict::Promote(why) => why,
        };
        let spec = ReleaseSpec {
            format_version: FORMAT_VERSION,
            release: release_id(c.step, self.s.cfg.feature),
            created_unix_secs: now_secs(),
            checkpoint: CheckpointRef {
                url: self.s.checkpoint_url.clone(),
                id: c.checkpoint_id.clone(),
                step: c.step,
            },
            feature: self.s.cfg.feature,
            dim: a.candidate.dim,
            model: self.s.net.model.clone(),
            num_clusters: self.s.net.num_clusters,
            pipeline: self.s.net.pipeline.for_eval(self.s.cfg.batch_size),
            reference_samples: judge.reference_len(),
            catalog_url: self.s.catalog_url.clone(),
            quality: a.quality(why.clone()),
        };
        self.rt.block_on(super::create(
            &self.store,
            &spec,
            a.weights,
            &a.candidate.mean,
            c.centroids.as_ref(),
        ))?;
        self.metrics.promoted();
        self.metrics.pending.set(1);
        let building = super::ReleaseState::building(&spec, self.store.url());
        if let Err(e) = self.rt.block_on(self.worker.announce(&building)) {
            tracing::warn!(
                "release {} is pending but could not be announced: {e}",
                spec.release
            );
        }
        tracing::info!(step = c.step, release = %spec.release, "release candidate promoted: {why}; building the release");
        Ok(())
    }
}
