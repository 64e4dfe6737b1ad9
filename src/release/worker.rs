//! The labour of releases: embedding catalog shards into them, one shard = one Parquet part.
//!
//! Each [`Worker::step`] does one piece of work, in this order:
//! 1. **fresh arrivals**: a shard of the catalog the current release does not hold yet (a new
//!    shard landed) is embedded into the current release, so a new image has a consumable
//!    vector soon after it arrives;
//! 2. **backfill**: a shard the pending release does not hold yet is embedded into it;
//! 3. **completion**: a pending release that holds every shard of a fresh listing gets its
//!    manifest, then becomes `CURRENT` (atomically), and old releases are pruned.
//!
//! Progress is the store itself: a shard is held once its part is published and its
//! `done/` record written, so a crash (or `kill -9`) resumes where the work stopped, and a
//! shard done twice replaces its own part. Workers of a fleet (`odcd release work --worker
//! I --workers N`) each take the shards [`shard_rank`] gives them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use tokio_util::sync::CancellationToken;

use super::kafka::{Announcer, ReleaseKafkaConfig, ReleaseState};
use super::layout::{
    now_secs, now_secs_f64, part_name, Covers, PartRecord, Pointer, ReleaseManifest, ReleaseSpec,
    CENTRING, MODEL,
};
use super::metrics::ReleaseMetrics;
use super::part::PartWriter;
use super::share::CpuShare;
use super::store::{ReleaseInfo, ReleaseStore};
use super::ReleaseError;
use crate::deadletter::{DeadLetter, DeadLetterConfig};
use crate::decode::BatchStream;
use crate::infer::FrozenEmbedder;
use crate::model::OdcModel;
use crate::sink::{EmbeddingBatch, KafkaSink};
use crate::source::{
    is_shard_name, shard_rank, DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig,
    RejectReason, SourceMode, SourceState,
};

/// One shard of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogShard {
    /// Its name relative to the catalog prefix (what part names and records use).
    pub name: String,
    pub location: Path,
    pub size: u64,
    /// Last-modified time (unix seconds): when it landed.
    pub modified: f64,
}

/// The shards under one prefix: what every release embeds.
#[derive(Clone)]
pub struct Catalog {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl Catalog {
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Self, ReleaseError> {
        let bad = |e: &dyn std::fmt::Display| ReleaseError::BadUrl {
            url: url.to_string(),
            message: e.to_string(),
        };
        let url =
            crate::store::local_path_to_url(url, "releases.catalog_url").map_err(|e| bad(&e))?;
        let (store, prefix) = crate::store::open_store(&url, options).map_err(|e| bad(&e))?;
        Ok(Catalog { url, store, prefix })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every shard (`*.tar`, `*.tar.gz`, `*.tgz`) under the prefix, sorted by name.
    pub async fn list(&self) -> Result<Vec<CatalogShard>, ReleaseError> {
        let err = |e: object_store::Error| ReleaseError::Store {
            url: self.url.clone(),
            path: self.prefix.to_string(),
            message: format!("cannot list the catalog: {e}"),
        };
        if is_shard_name(self.prefix.as_ref()) {
            let m = self.store.head(&self.prefix).await.map_err(err)?;
            return Ok(vec![CatalogShard {
                name: self.prefix.filename().unwrap_or_default().to_string(),
                location: m.location,
                size: m.size,
                modified: m.last_modified.timestamp_millis() as f64 / 1000.0,
            }]);
        }
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<_> = self.store.list(prefix).try_collect().await.map_err(err)?;
        let strip = if self.prefix.as_ref().is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix.as_ref())
        };
        let mut out: Vec<CatalogShard> = metas
            .into_iter()
            .filter(|m| is_shard_name(m.location.as_ref()))
            .map(|m| CatalogShard {
                name: m
                    .location
                    .as_ref()
                    .strip_prefix(&strip)
                    .unwrap_or(m.location.as_ref())
                    .to_string(),
                size: m.size,
                modified: m.last_modified.timestamp_millis() as f64 / 1000.0,
                location: m.location,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// A release's network, ready to embed.
struct Loaded {
    embedder: FrozenEmbedder,
}

/// What one [`Worker::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Embedded `shard` into `release` (`fresh`: a new arrival for the current release).
    Embedded {
        release: String,
        shard: String,
        rows: u64,
        fresh: bool,
    },
    /// `release` is complete and current.
    Completed { release: String, rows: u64 },
    /// Nothing to do now (or, in a fleet, only other workers' shards are left).
    Idle,
}

/// The releases a worker serves: the current one (fresh arrivals) and the pending one.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub current: Option<ReleaseInfo>,
    pub pending: Option<ReleaseInfo>,
    /// A complete release newer than the current one (not rolled back) that `CURRENT` does
    /// not name yet: a process stopped between its manifest and the pointer.
    pub unswitched: Option<ReleaseInfo>,
}

impl Targets {
    /// Reads `CURRENT` and the release folders: the pending release is the newest one that
    /// is incomplete, not rolled back and newer than the current one.
    pub async fn read(store: &ReleaseStore) -> Result<Self, ReleaseError> {
        let (pointer, _) = store.current().await?;
        let all = store.list().await?;
        let p = pointer.as_ref();
        let current = p
            .and_then(|p| all.iter().find(|r| r.id == p.release))
            .cloned();
        // The latest decision first: an operator's promotion of an older step, or the
        // daemon's newest candidate.
        let latest = |a: &&ReleaseInfo, b: &&ReleaseInfo| {
            (a.spec.created_unix_secs, &a.id).cmp(&(b.spec.created_unix_secs, &b.id))
        };
        let pending = all.iter().filter(|r| r.building(p)).max_by(latest).cloned();
        let unswitched = all
            .iter()
            .filter(|r| r.owed_switch(p))
            .max_by(latest)
            .cloned();
        Ok(Targets {
            current,
            pending,
            unswitched,
        })
    }
}

/// Embeds catalog shards into releases. Lives on a thread of its own (tensor math is run on
/// its [`CpuShare`], I/O on the runtime through `rt`).
pub struct Worker {
    store: ReleaseStore,
    catalog: Catalog,
    /// A fleet member: (this worker, workers).
    split: Option<(usize, usize)>,
    dead_letter: Option<DeadLetterConfig>,
    batch: usize,
    device_name: String,
    poll: Duration,
    keep: usize,
    pub share: CpuShare,
    metrics: ReleaseMetrics,
    cancel: CancellationToken,
    loaded: HashMap<String, Loaded>,
    /// `[releases.kafka]`: every row to a topic as well, and the release states.
    kafka: Option<KafkaSink>,
    announcer: Option<Announcer>,
    /// Shards each release holds, as read from its `done/` records and added to since.
    held: HashMap<String, BTreeMap<String, PartRecord>>,
    listing: Option<(Instant, Vec<CatalogShard>)>,
}

/// What a worker is given.
pub struct WorkerSettings {
    pub store: ReleaseStore,
    pub catalog: Catalog,
    pub split: Option<(usize, usize)>,
    pub dead_letter: Option<DeadLetterConfig>,
    pub batch: usize,
    /// `train.device`: where the release networks run.
    pub device: String,
    pub poll: Duration,
    pub keep: usize,
    pub share: f64,
    pub kafka: Option<ReleaseKafkaConfig>,
}

impl Worker {
    pub fn new(
        s: WorkerSettings,
        metrics: ReleaseMetrics,
        cancel: CancellationToken,
    ) -> Result<Self, ReleaseError> {
        let share = CpuShare::new(s.share).map_err(|e| ReleaseError::Model(e.to_string()))?;
        metrics.share.set(share.share());
        let (kafka, announcer) = match &s.kafka {
            Some(k) => {
                let mut sink = KafkaSink::open(&k.sink_config(), true, false)?;
                // A shard counts as embedded only once its rows are acknowledged: keep
                // re-sending rather than drop one.
                sink.resend_forever(true);
                (Some(sink), Some(Announcer::open(k)?))
            }
            None => (None, None),
        };
        Ok(Worker {
            store: s.store,
            catalog: s.catalog,
            split: s.split,
            dead_letter: s.dead_letter,
            batch: s.batch,
            device_name: s.device,
            poll: s.poll,
            keep: s.keep,
            share,
            metrics,
            cancel,
            loaded: HashMap::new(),
            kafka,
            announcer,
            held: HashMap::new(),
            listing: None,
        })
    }

    pub fn store(&self) -> &ReleaseStore {
        &self.store
    }

    /// Runs the release work at `share` of the cores from now on.
    pub fn set_share(&mut self, share: f64) -> Result<(), ReleaseError> {
        if (share - self.share.share()).abs() > 1e-9 {
            self.share = CpuShare::new(share).map_err(|e| ReleaseError::Model(e.to_string()))?;
            self.metrics.share.set(share);
        }
        Ok(())
    }

    /// The catalog listing, refreshed when older than the poll interval (or when `fresh`).
    async fn listing(&mut self, fresh: bool) -> Result<Vec<CatalogShard>, ReleaseError> {
        match &self.listing {
            Some((t, l)) if !fresh && t.elapsed() < self.poll => Ok(l.clone()),
            _ => {
                let l = self.catalog.list().await?;
                self.listing = Some((Instant::now(), l.clone()));
                Ok(l)
            }
        }
    }

    /// The shards `id` holds (read from the store once, then kept up to date; `reread`
    /// re-reads them, for shards other workers embedded).
    async fn held(
        &mut self,
        id: &str,
        reread: bool,
    ) -> Result<&BTreeMap<String, PartRecord>, ReleaseError> {
        if reread || !self.held.contains_key(id) {
            let done = self.store.done_parts(id).await?;
            self.held.insert(id.to_string(), done);
        }
        Ok(self.held.entry(id.to_string()).or_default())
    }

    fn mine(&self, shard: &str) -> bool {
        self.split.is_none_or(|(i, n)| shard_rank(shard, n) == i)
    }

    /// The first shard of `listing` that `id` lacks and this worker may take.
    async fn next_shard(
        &mut self,
        id: &str,
        listing: &[CatalogShard],
    ) -> Result<Option<CatalogShard>, ReleaseError> {
        let held = self.held(id, false).await?.clone();
        Ok(listing
            .iter()
            .find(|s| !held.contains_key(&s.name) && self.mine(&s.name))
            .cloned())
    }

    /// Announces `state` on the releases topic, if `[releases.kafka]` is set.
    pub async fn announce(&self, state: &ReleaseState) -> Result<(), ReleaseError> {
        match &self.announcer {
            Some(a) => a.announce(state).await,
            None => Ok(()),
        }
    }

    /// One piece of work (module docs). Errors are the caller's to log and retry.
    pub async fn step(&mut self, targets: &Targets) -> Result<Step, ReleaseError> {
        if let Some(m) = targets
            .unswitched
            .as_ref()
            .and_then(|u| u.manifest.as_ref())
        {
            self.switch(m).await?;
            return Ok(Step::Completed {
                release: m.spec.release.clone(),
                rows: m.rows,
            });
        }
        self.metrics
            .pending
            .set(i64::from(targets.pending.is_some()));
        if let Some(cur) = &targets.current {
            self.metrics
                .current_step
                .set(cur.spec.checkpoint.step as i64);
            let listing = self.listing(false).await?;
            if let Some(shard) = self.next_shard(&cur.id, &listing).await? {
                let rec = self.embed(&cur.spec, &shard).await?;
                // A shard that arrived after the release was complete: its delay matters.
                if cur
                    .manifest
                    .as_ref()
                    .is_some_and(|m| !m.files.iter().any(|f| f.shard == shard.name))
                {
                    self.metrics
                        .fresh_delay
                        .observe((rec.published_unix_secs - shard.modified).max(0.0));
                }
                return Ok(Step::Embedded {
                    release: cur.id.clone(),
                    shard: shard.name,
                    rows: rec.rows,
                    fresh: true,
                });
            }
        }
        let Some(pending) = &targets.pending else {
            return Ok(Step::Idle);
        };
        let listing = self.listing(false).await?;
        self.observe_backfill(&pending.id, &listing).await?;
        if let Some(shard) = self.next_shard(&pending.id, &listing).await? {
            let rec = self.embed(&pending.spec, &shard).await?;
            self.observe_backfill(&pending.id, &listing).await?;
            return Ok(Step::Embedded {
                release: pending.id.clone(),
                shard: shard.name,
                rows: rec.rows,
                fresh: false,
            });
        }
        // Nothing of ours left: complete it if every shard of a fresh listing is held (by
        // this worker or others).
        let listing = self.listing(true).await?;
        let held = self.held(&pending.id, true).await?.clone();
        if listing.iter().any(|s| !held.contains_key(&s.name)) {
            return Ok(Step::Idle);
        }
        let rows = self.complete(pending, &listing, &held).await?;
        Ok(Step::Completed {
            release: pending.id.clone(),
            rows,
        })
    }

    async fn observe_backfill(
        &mut self,
        id: &str,
        listing: &[CatalogShard],
    ) -> Result<(), ReleaseError> {
        let held = self.held(id, false).await?;
        let done = listing
            .iter()
            .filter(|s| held.contains_key(&s.name))
            .count();
        let rows: u64 = held.values().map(|r| r.rows).sum();
        self.metrics
            .backfill_shards
            .with_label_values(&["done"])
            .set(done as i64);
        self.metrics
            .backfill_shards
            .with_label_values(&["todo"])
            .set((listing.len() - done) as i64);
        self.metrics.backfill_rows.set(rows as i64);
        Ok(())
    }

    /// The manifest (written last), then `CURRENT`, then retention.
    async fn complete(
        &mut self,
        pending: &ReleaseInfo,
        listing: &[CatalogShard],
        held: &BTreeMap<String, PartRecord>,
    ) -> Result<u64, ReleaseError> {
        let files: Vec<PartRecord> = listing
            .iter()
            .filter_map(|s| held.get(&s.name).cloned())
            .collect();
        let rows = files.iter().map(|f| f.rows).sum();
        let manifest = ReleaseManifest {
            spec: pending.spec.clone(),
            completed_unix_secs: now_secs(),
            rows,
            rejected: files.iter().map(|f| f.rejected).sum(),
            covers: Covers {
                catalog_url: self.catalog.url().to_string(),
                shards: files.len(),
                last_shard: listing.last().map(|s| s.name.clone()),
            },
            files,
            centring_file: CENTRING.into(),
            model_file: MODEL.into(),
        };
        self.store.write_manifest(&manifest).await?;
        self.switch(&manifest).await?;
        Ok(rows)
    }

    /// Makes complete release `m` current: announced on Kafka (its rows are all there), then
    /// `CURRENT`, then the release it replaced is announced retired; old releases pruned.
    async fn switch(&mut self, m: &ReleaseManifest) -> Result<(), ReleaseError> {
        let (cur, _) = self.store.current().await?;
        let previous = cur.map(|p| p.release).filter(|p| p != &m.spec.release);
        self.announce(&ReleaseState::current(
            &Pointer::to(m, previous.clone()),
            self.store.url(),
        ))
        .await?;
        make_current(&self.store, m).await?;
        if let Some(prev) = &previous {
            if let Some(spec) = self.store.spec(prev).await? {
                self.announce(&ReleaseState::retired(&spec, self.store.url()))
                    .await?;
            }
        }
        self.metrics.current_step.set(m.spec.checkpoint.step as i64);
        self.metrics.pending.set(0);
        tracing::info!(
            release = %m.spec.release,
            rows = m.rows,
            shards = m.covers.shards,
            rejected = m.rejected,
            previous = ?previous,
            "release complete: it is now CURRENT"
        );
        match self.store.prune(self.keep).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(?gone, "old releases deleted (releases.keep)")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("release retention failed (tried again at the next release): {e}")
            }
        }
        Ok(())
    }

    /// The network of release `spec` (loaded once).
    async fn load(&mut self, spec: &ReleaseSpec) -> Result<(), ReleaseError> {
        if self.loaded.contains_key(&spec.release) {
            return Ok(());
        }
        let id = &spec.release;
        let weights = self.store.read_model(id).await?;
        let (mean, centroids) = self.store.read_centring(id).await?;
        let device = crate::device::select_device(&self.device_name)
            .map_err(|e| ReleaseError::Model(format!("train.device: {e}")))?;
        let model = OdcModel::new(&spec.model, spec.num_clusters, &device, 0)
            .map_err(|e| ReleaseError::Model(format!("release {id}: {e}")))?;
        model
            .load_safetensors(&weights)
            .map_err(|e| ReleaseError::Model(format!("release {id}: {e}")))?;
        let embedder = FrozenEmbedder::new(model, spec.feature, centroids).with_mean(mean);
        // Only the releases in use stay loaded.
        if self.loaded.len() >= 2 {
            self.loaded.clear();
        }
        self.loaded.insert(id.clone(), Loaded { embedder });
        Ok(())
    }

    /// Embeds `shard` into release `spec`: its records through the release's eval
    /// transform and network into one Parquet part, published whole, then its `done/`
    /// record. Rejected records go to the dead letters, as in training.
    async fn embed(
        &mut self,
        spec: &ReleaseSpec,
        shard: &CatalogShard,
    ) -> Result<PartRecord, ReleaseError> {
        self.load(spec).await?;
        let id = spec.release.clone();
        let part = part_name(&shard.name);
        let (rel_path, path) = self.store.part_path(&id, &part);
        let child = self.cancel.child_token();
        let _stop = child.clone().drop_guard();
        let registry = prometheus::Registry::new();
        let data_metrics = DataMetrics::register(&registry)?;
        let mut cfg = ObjectStoreSourceConfig::new(format!("{}{}", self.catalog.url(), shard.name));
        cfg.mode = SourceMode::Once;
        let rx =
            ObjectStoreSource::with_store(self.catalog.store.clone(), shard.location.clone(), cfg)
                .with_metrics(data_metrics.clone())
                .spawn(SourceState::default(), child.clone());
        let mut pipeline = spec.pipeline.clone();
        pipeline.batch_size = self.batch;
        pipeline.threads = self.share.threads();
        pipeline.dead_letter = self.dead_letter.clone();
        let dead_letter = pipeline
            .dead_letter
            .as_ref()
            .map(DeadLetter::open)
            .transpose()?;
        let mut stream = BatchStream::spawn(
            rx,
            pipeline,
            data_metrics.clone(),
            dead_letter,
            SourceState::default(),
            child.clone(),
        )?;
        let (store, _) = self.store.object("");
        let mut writer =
            PartWriter::create(store, path.clone(), &id, spec.checkpoint.step, spec.dim)
                .map_err(|m| self.write_err(&path, m))?
                .spawn(2);
        let busy0 = self.share.busy();
        // Where the shard's time went: waiting for decoded images, the forward, the writes.
        let (mut waited, mut forward, mut written) = (0f64, 0f64, 0f64);
        loop {
            let t = Instant::now();
            let batch = tokio::select! {
                b = stream.next() => b,
                _ = self.cancel.cancelled() => {
                    writer.abort().await;
                    return Err(ReleaseError::Cancelled);
                }
            };
            let Some(batch) = batch else { break };
            waited += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let Some(loaded) = self.loaded.get(&id) else {
                writer.abort().await;
                return Err(ReleaseError::Model(format!("release {id} is not loaded")));
            };
            let embedder = &loaded.embedder;
            let rows = match self.share.run(|| embedder.embed(&batch.images)) {
                Ok(r) => r,
                Err(e) => {
                    writer.abort().await;
                    return Err(e.into());
                }
            };
            forward += t.elapsed().as_secs_f64();
            let t = Instant::now();
            // Kafka first (it needs a copy), then the values move into the Parquet column.
            if let Some(k) = &mut self.kafka {
                let out = EmbeddingBatch {
                    keys: batch.keys.clone(),
                    step: spec.checkpoint.step,
                    model_version: id.clone(),
                    clusters: rows.clusters.clone(),
                    class_labels: batch.class_labels.clone(),
                    dim: rows.dim,
                    embeddings: rows.values.clone(),
                };
                if let Err(e) = k.write(&out).await {
                    writer.abort().await;
                    return Err(e.into());
                }
            }
            let n = batch.keys.len() as u64;
            if let Err(m) = writer.write(batch.keys, batch.class_labels, rows).await {
                return Err(self.write_err(&path, m));
            }
            written += t.elapsed().as_secs_f64();
            self.metrics.rows.inc_by(n);
        }
        self.metrics
            .busy_seconds
            .inc_by((self.share.busy() - busy0).as_secs_f64());
        let t = Instant::now();
        let (rows, bytes) = writer
            .finish()
            .await
            .map_err(|m| self.write_err(&path, m))?;
        written += t.elapsed().as_secs_f64();
        if let Some(k) = &mut self.kafka {
            let failed = k.flush().await?;
            if failed > 0 {
                return Err(crate::sink::SinkError::Kafka {
                    topic: k.topic().to_string(),
                    message: format!("{failed} row(s) of shard {} were not delivered; the shard is embedded again", shard.name),
                }
                .into());
            }
        }
        let rejected: u64 = RejectReason::ALL
            .iter()
            .map(|&r| data_metrics.rejected_count(r))
            .sum();
        self.metrics.rejected.inc_by(rejected);
        let record = PartRecord {
            shard: shard.name.clone(),
            path: rel_path,
            rows,
            bytes,
            rejected,
            shard_modified_unix_secs: shard.modified,
            published_unix_secs: now_secs_f64(),
        };
        self.store.write_done(&id, &part, &record).await?;
        self.held
            .entry(id.clone())
            .or_default()
            .insert(shard.name.clone(), record.clone());
        tracing::info!(
            release = %id,
            shard = %shard.name,
            rows,
            rejected,
            input_wait_s = format!("{waited:.2}"),
            forward_s = format!("{forward:.2}"),
            write_s = format!("{written:.2}"),
            "shard embedded into the release"
        );
        Ok(record)
    }

    fn write_err(&self, path: &Path, m: impl std::fmt::Display) -> ReleaseError {
        ReleaseError::Store {
            url: self.store.url().to_string(),
            path: path.to_string(),
            message: m.to_string(),
        }
    }
}

/// Points `CURRENT` at complete release `m` (the previous current release becomes its
/// `previous`). If another process moved `CURRENT` meanwhile, it is read again and the
/// replacement tried once more.
pub async fn make_current(store: &ReleaseStore, m: &ReleaseManifest) -> Result<(), ReleaseError> {
    for attempt in 0..2 {
        let (cur, version) = store.current().await?;
        if cur.as_ref().is_some_and(|p| p.release == m.spec.release) {
            return Ok(());
        }
        let pointer = Pointer::to(m, cur.map(|p| p.release));
        match store.set_current(&pointer, &version).await {
            Ok(()) => return Ok(()),
            Err(ReleaseError::CurrentMoved { .. }) if attempt == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{EvalConfig, PipelineConfig, TransformConfig};
    use crate::model::{FeatureKind, ModelConfig};
    use crate::release::layout::{release_id, CheckpointRef, Quality, FORMAT_VERSION};
    use object_store::memory::InMemory;

    fn spec(step: u64) -> ReleaseSpec {
        ReleaseSpec {
            format_version: FORMAT_VERSION,
            release: release_id(step, FeatureKind::Neck),
            created_unix_secs: step,
            checkpoint: CheckpointRef {
                url: "memory:///ck/".into(),
                id: format!("step-{step:012}-x"),
                step,
            },
            feature: FeatureKind::Neck,
            dim: 4,
            model: ModelConfig::default(),
            num_clusters: 2,
            pipeline: PipelineConfig::new(
                8,
                TransformConfig::Eval(EvalConfig {
                    resize: 8,
                    size: 8,
                    mean: vec![0.5],
                    std: vec![0.5],
                }),
            ),
            reference_samples: 2,
            catalog_url: "memory:///catalog/".into(),
            quality: Quality::default(),
        }
    }

    fn manifest(step: u64) -> ReleaseManifest {
        ReleaseManifest {
            spec: spec(step),
            completed_unix_secs: step,
            rows: 1,
            rejected: 0,
            covers: Covers {
                catalog_url: "memory:///catalog/".into(),
                shards: 1,
                last_shard: None,
            },
            files: Vec::new(),
            centring_file: CENTRING.into(),
            model_file: MODEL.into(),
        }
    }

    #[tokio::test]
    async fn targets_are_the_current_the_latest_pending_and_a_complete_release_left_unswitched() {
        let store =
            ReleaseStore::with_store("memory:///r/", Arc::new(InMemory::new()), Path::from("r"));
        let ids = |t: &Targets| {
            (
                t.current.as_ref().map(|r| r.spec.checkpoint.step),
                t.pending.as_ref().map(|r| r.spec.checkpoint.step),
                t.unswitched.as_ref().map(|r| r.spec.checkpoint.step),
            )
        };
        let t0 = now_secs() - 100;
        let point = |step: u64, at: u64| {
            let mut p = Pointer::to(&manifest(step), None);
            p.updated_unix_secs = at;
            p
        };
        let set = |p: Pointer| {
            let store = store.clone();
            async move {
                let (_, v) = store.current().await.unwrap();
                store.set_current(&p, &v).await.unwrap();
            }
        };
        // Step 10 complete and current since t0; step 20 was being built when step 30 was
        // created: the latest decision is built.
        store.write_spec(&spec(10)).await.unwrap();
        store.write_manifest(&manifest(10)).await.unwrap();
        set(point(10, t0)).await;
        store.write_spec(&spec(20)).await.unwrap();
        store.write_spec(&spec(30)).await.unwrap();
        assert_eq!(
            ids(&Targets::read(&store).await.unwrap()),
            (Some(10), Some(30), None)
        );
        // Step 30 completed, but the process died before CURRENT moved: the switch is owed.
        let mut m30 = manifest(30);
        m30.completed_unix_secs = t0 + 10;
        store.write_manifest(&m30).await.unwrap();
        assert_eq!(
            ids(&Targets::read(&store).await.unwrap()),
            (Some(10), Some(20), Some(30))
        );
        make_current(&store, &m30).await.unwrap();
        let (p, _) = store.current().await.unwrap();
        assert_eq!(
            p.unwrap().previous.as_deref(),
            Some(release_id(10, FeatureKind::Neck).as_str())
        );
        // The build of step 20 was abandoned when 30 became current: retention deletes it.
        assert_eq!(
            ids(&Targets::read(&store).await.unwrap()),
            (Some(30), None, None)
        );
        assert_eq!(
            store.prune(3).await.unwrap(),
            vec![release_id(20, FeatureKind::Neck)]
        );
        // An operator made 10 current again: 30, complete before that, stays passed over,
        // and an operator's release of an older step is built.
        set(point(10, now_secs())).await;
        assert_eq!(
            ids(&Targets::read(&store).await.unwrap()),
            (Some(10), None, None)
        );
        let mut s5 = spec(5);
        s5.created_unix_secs = now_secs();
        store.write_spec(&s5).await.unwrap();
        assert_eq!(
            ids(&Targets::read(&store).await.unwrap()),
            (Some(10), Some(5), None)
        );
        // Retention keeps the current release whatever its age, and the one being built.
        store.write_spec(&spec(40)).await.unwrap();
        store.write_manifest(&manifest(40)).await.unwrap();
        let gone = store.prune(1).await.unwrap();
        assert_eq!(gone, vec![release_id(30, FeatureKind::Neck)]);
        assert!(store
            .spec(&release_id(10, FeatureKind::Neck))
            .await
            .unwrap()
            .is_some());
        assert!(store
            .spec(&release_id(5, FeatureKind::Neck))
            .await
            .unwrap()
            .is_some());
    }
}
