//! Streaming form of the ODC memory (DESIGN.md §1 "Streaming extension", ODC_SPEC §5).
//!
//! Entries are keyed by a stable sample key and live in a bounded [`OdcMemory`] of capacity M.
//! A key already in memory follows the reference path exactly (stale label for the loss,
//! momentum update, relabel); a new key is labelled by its nearest centroid before the loss
//! and then inserted, evicting per [`EvictionPolicy`]. Counts, centroids and `min_cluster`
//! are computed over what is in memory.
//!
//! Per step the trainer calls [`StreamingMemory::prepare`] (labels + weights for the loss),
//! then [`StreamingMemory::update`] (memory update), then [`StreamingMemory::after_step`]
//! (centroids, small clusters, weights).

use super::compute::MemoryCompute;
use super::linalg::{check_finite, check_rows, normalise_into};
use super::memory::{OdcMemory, SmallClusterReport};
use super::{OdcError, Result, WEIGHT_EPS, WEIGHT_POWER};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Which entry makes room for a new key once the memory is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EvictionPolicy {
    /// Evict the oldest inserted entry, skipping entries used by the current batch.
    #[default]
    Fifo,
    /// Vitter's algorithm R: the n-th new key replaces a uniformly random slot with
    /// probability M/n, otherwise it is not stored (it still got a label for the loss).
    /// The memory stays a uniform sample of every key offered.
    Reservoir { seed: u64 },
}

/// The small-cluster threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MinCluster {
    /// Absolute member count (OSS ODC: 20 of 1.28M).
    Count(usize),
    /// `max(1, floor(f × fill))`, resolved against the current fill every step
    /// (ODC's 20/1.28M ≈ 1.6e-5). At least 1, so empty clusters are always re-seeded.
    FractionOfFill(f64),
}

impl MinCluster {
    /// The threshold for a memory holding `fill` entries.
    pub fn resolve(&self, fill: usize) -> usize {
        match *self {
            MinCluster::Count(n) => n,
            MinCluster::FractionOfFill(f) => ((f * fill as f64).floor() as usize).max(1),
        }
    }
}

/// Settings of a [`StreamingMemory`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Capacity M (slots).
    pub capacity: usize,
    /// Feature length D.
    pub dim: usize,
    /// Number of clusters K.
    pub k: usize,
    pub eviction: EvictionPolicy,
    pub min_cluster: MinCluster,
    /// Full centroid recompute when `(step + 1) % centroid_interval == 0` (OSS: 10; 0 = never).
    pub centroid_interval: u64,
    /// Weight of the NEW feature in the momentum update (OSS: 0.5).
    pub momentum: f64,
    /// Class weights `(n_c + weight_eps)^(−weight_power)` (OSS: 1e-5, 0.5).
    pub weight_eps: f64,
    pub weight_power: f64,
}

impl StreamConfig {
    /// OSS defaults for everything but the sizes.
    pub fn new(capacity: usize, dim: usize, k: usize) -> Self {
        Self {
            capacity,
            dim,
            k,
            eviction: EvictionPolicy::Fifo,
            min_cluster: MinCluster::Count(20),
            centroid_interval: 10,
            momentum: 0.5,
            weight_eps: WEIGHT_EPS,
            weight_power: WEIGHT_POWER,
        }
    }
}

/// What the loss of a step needs, from [`StreamingMemory::prepare`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Per batch row: the stored (stale) label of a key in memory, or the nearest centroid
    /// of the normalised feature for a new key.
    pub labels: Vec<u32>,
    /// Per batch row: whether the key was in memory.
    pub seen: Vec<bool>,
    /// Class weights for the loss (computed at the end of the previous step).
    pub weights: Vec<f32>,
}

/// Counters of one [`StreamingMemory::update`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub batch: usize,
    /// Batch rows whose key was in memory (momentum update + relabel).
    pub seen: usize,
    /// Seen rows whose label changed.
    pub change_count: usize,
    /// `change_count / seen` (0 when no row was seen).
    pub change_ratio: f64,
    /// New keys stored.
    pub inserted: usize,
    /// Entries evicted to make room.
    pub evicted: usize,
    /// New keys not stored (reservoir rejection, or every slot in use by this batch).
    pub not_stored: usize,
}

/// Result of [`StreamingMemory::after_step`].
#[derive(Debug, Clone, PartialEq)]
pub struct AfterStep {
    pub centroids_recomputed: bool,
    /// The resolved small-cluster threshold used this step.
    pub min_cluster: usize,
    pub report: SmallClusterReport,
    /// Cluster ids re-seeded this step: re-initialise their head rows if configured.
    pub reseeded: Vec<u32>,
    /// Class weights for the next step's loss.
    pub weights: Vec<f32>,
}

/// Health metrics of the memory, O(K).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub fill: usize,
    pub capacity: usize,
    pub inserted_total: u64,
    pub evictions_total: u64,
    pub not_stored_total: u64,
    pub empty_clusters: usize,
    /// Clusters below the resolved `min_cluster` (empty ones included).
    pub small_clusters: usize,
    pub min_cluster: usize,
    pub min_size: usize,
    pub max_size: usize,
    /// Entropy of the cluster-size distribution in nats (ln K when perfectly balanced).
    pub size_entropy: f64,
}

/// The whole streaming state as plain vectors, for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamingState {
    pub config: StreamConfig,
    /// Occupied slots, ascending; `keys`, `labels` and the rows of `bank` follow this order.
    pub slots: Vec<u32>,
    pub keys: Vec<String>,
    pub labels: Vec<u32>,
    /// slots.len() × dim.
    pub bank: Vec<f32>,
    /// k × dim.
    pub centroids: Vec<f32>,
    pub weights: Vec<f32>,
    /// FIFO insertion order, oldest first (empty under the reservoir policy).
    pub fifo: Vec<u32>,
    /// New keys offered so far (the reservoir's n).
    pub offered: u64,
    /// Reservoir RNG: seed, stream and word position (high and low 64 bits).
    pub rng_seed: [u8; 32],
    pub rng_stream: u64,
    pub rng_word_pos: [u64; 2],
    pub inserted_total: u64,
    pub evictions_total: u64,
    pub not_stored_total: u64,
}

/// One occupied slot of a [`StreamingMemory`], borrowed (see [`StreamingMemory::entries`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEntry<'a> {
    pub slot: u32,
    pub key: &'a str,
    pub label: u32,
    /// The bank row (dim values).
    pub row: &'a [f32],
}

/// The scalar fields of a [`StreamingState`] (see [`StreamingMemory::scalars`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingScalars {
    pub offered: u64,
    pub rng_seed: [u8; 32],
    pub rng_stream: u64,
    pub rng_word_pos: [u64; 2],
    pub inserted_total: u64,
    pub evictions_total: u64,
    pub not_stored_total: u64,
}

/// Bounded, key-addressed ODC memory.
#[derive(Debug, Clone)]
pub struct StreamingMemory {
    cfg: StreamConfig,
    mem: OdcMemory,
    /// One shared allocation per entry serves both directions of the key map.
    key_of_slot: Vec<Option<Arc<str>>>,
    slot_of_key: HashMap<Arc<str>, u32>,
    fifo: VecDeque<u32>,
    /// Never-filled slots, highest first so `pop` fills from slot 0 upwards.
    free: Vec<u32>,
    offered: u64,
    rng: ChaCha8Rng,
    weights: Vec<f32>,
    inserted_total: u64,
    evictions_total: u64,
    not_stored_total: u64,
}

impl StreamingMemory {
    /// An empty memory. Call [`Self::init_from_clustering`] after the warm-up k-means.
    pub fn new(cfg: StreamConfig) -> Result<Self> {
        Self::check_config(&cfg)?;
        let mem = OdcMemory::new(cfg.capacity, cfg.dim, cfg.k)?;
        Ok(Self::with_memory(cfg, mem))
    }

    fn check_config(cfg: &StreamConfig) -> Result<()> {
        if !(0.0..=1.0).contains(&cfg.momentum) {
            return Err(OdcError::InvalidParameter(format!(
                "momentum must be in [0, 1], got {}",
                cfg.momentum
            )));
        }
        if let MinCluster::FractionOfFill(f) = cfg.min_cluster {
            if !(0.0..=1.0).contains(&f) {
                return Err(OdcError::InvalidParameter(format!(
                    "min_cluster fraction must be in [0, 1], got {f}"
                )));
            }
        }
        if !(cfg.weight_eps > 0.0 && cfg.weight_power.is_finite()) {
            return Err(OdcError::InvalidParameter(format!(
                "weight_eps must be > 0 and weight_power finite (got {}, {})",
                cfg.weight_eps, cfg.weight_power
            )));
        }
        Ok(())
    }

    /// A memory around `mem` (which must have `cfg`'s sizes), with empty key maps.
    fn with_memory(cfg: StreamConfig, mem: OdcMemory) -> Self {
        let seed = match cfg.eviction {
            EvictionPolicy::Reservoir { seed } => seed,
            EvictionPolicy::Fifo => 0,
        };
        let weights = mem.class_weights(cfg.weight_eps, cfg.weight_power);
        Self {
            key_of_slot: vec![None; cfg.capacity],
            slot_of_key: HashMap::new(),
            fifo: VecDeque::new(),
            free: (0..cfg.capacity as u32).rev().collect(),
            offered: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            weights,
            inserted_total: 0,
            evictions_total: 0,
            not_stored_total: 0,
            mem,
            cfg,
        }
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }
    /// Where the heavy work runs (relabel, new-key scoring, phase-A scoring, full centroid
    /// recompute): host kernels, or the training device with device-side copies of the
    /// centroids and bank. The state and its semantics are the same either way; a memory
    /// built by [`Self::new`] or [`Self::import`] starts on the host.
    pub fn set_compute(&mut self, compute: &MemoryCompute) {
        self.mem.set_compute(compute);
    }
    /// The choice of [`Self::set_compute`].
    pub fn compute(&self) -> MemoryCompute {
        self.mem.compute()
    }
    /// The underlying slot memory (read-only).
    pub fn memory(&self) -> &OdcMemory {
        &self.mem
    }
    pub fn fill(&self) -> usize {
        self.mem.len()
    }
    /// Current class weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }
    pub fn slot_of(&self, key: &str) -> Option<u32> {
        self.slot_of_key.get(key).copied()
    }
    /// Stored label of a key.
    pub fn label_of(&self, key: &str) -> Option<u32> {
        self.slot_of(key).and_then(|s| self.mem.label(s))
    }

    /// Warm start after the initial k-means: replaces the whole memory with `keys` (distinct,
    /// at most M) in slots 0..n, bank = normalise(feats), the given labels, centroids = means,
    /// weights from the sizes. Empty clusters are allowed (zero centroid); the first
    /// [`Self::after_step`] re-seeds them.
    pub fn init_from_clustering(
        &mut self,
        keys: &[String],
        feats: &[f32],
        labels: &[u32],
    ) -> Result<()> {
        let n = check_rows("feats", feats, self.cfg.dim)?;
        if n != keys.len() {
            return Err(OdcError::LengthMismatch {
                what: "feats rows vs keys",
                expected: keys.len(),
                got: n,
            });
        }
        let mut map = HashMap::with_capacity(n);
        for (i, k) in keys.iter().enumerate() {
            if map.insert(Arc::<str>::from(k.as_str()), i as u32).is_some() {
                return Err(OdcError::DuplicateKey(k.clone()));
            }
        }
        self.mem.init_memory(feats, labels)?;
        self.key_of_slot.fill(None);
        for (k, &s) in &map {
            self.key_of_slot[s as usize] = Some(k.clone());
        }
        self.slot_of_key = map;
        self.free = (n as u32..self.cfg.capacity as u32).rev().collect();
        self.fifo = match self.cfg.eviction {
            EvictionPolicy::Fifo => (0..n as u32).collect(),
            EvictionPolicy::Reservoir { .. } => VecDeque::new(),
        };
        self.offered = n as u64;
        self.inserted_total += n as u64;
        self.weights = self.current_weights();
        Ok(())
    }

    fn current_weights(&self) -> Vec<f32> {
        self.mem
            .class_weights(self.cfg.weight_eps, self.cfg.weight_power)
    }

    fn check_batch(&self, keys: &[String], feats: &[f32]) -> Result<()> {
        let b = check_rows("feats", feats, self.cfg.dim)?;
        if b != keys.len() {
            return Err(OdcError::LengthMismatch {
                what: "feats rows vs keys",
                expected: keys.len(),
                got: b,
            });
        }
        check_finite("feats", feats, self.cfg.dim)
    }

    /// Step (a): labels and weights for this step's loss. `feats` (B × D) are this step's
    /// train-mode features. Does not change the memory.
    pub fn prepare(&self, keys: &[String], feats: &[f32]) -> Result<Prepared> {
        self.check_batch(keys, feats)?;
        let d = self.cfg.dim;
        let mut labels = vec![0u32; keys.len()];
        let mut seen = vec![false; keys.len()];
        let mut unseen_rows = Vec::new();
        let mut unseen_idx = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.label_of(key) {
                Some(l) => {
                    labels[i] = l;
                    seen[i] = true;
                }
                None => {
                    unseen_idx.push(i);
                    unseen_rows.extend_from_slice(&feats[i * d..(i + 1) * d]);
                }
            }
        }
        if !unseen_idx.is_empty() {
            let nearest = self.mem.nearest_centroid(&unseen_rows)?;
            for (i, l) in unseen_idx.into_iter().zip(nearest) {
                labels[i] = l;
            }
        }
        Ok(Prepared {
            labels,
            seen,
            weights: self.weights.clone(),
        })
    }

    /// Step (b): memory update. Keys in memory get the reference momentum update and relabel
    /// (a repeated key: last copy wins). New keys are inserted with bank row = normalise(f)
    /// and the label `prepared` gave them (a new key repeated in the batch: last copy wins),
    /// evicting per policy; slots used by this batch are never evicted.
    pub fn update(
        &mut self,
        keys: &[String],
        feats: &[f32],
        prepared: &Prepared,
    ) -> Result<StepStats> {
        self.check_batch(keys, feats)?;
        if prepared.labels.len() != keys.len() {
            return Err(OdcError::LengthMismatch {
                what: "prepared labels vs keys",
                expected: keys.len(),
                got: prepared.labels.len(),
            });
        }
        if let Some(&label) = prepared.labels.iter().find(|&&l| l as usize >= self.cfg.k) {
            return Err(OdcError::LabelOutOfRange {
                what: "prepared labels",
                label,
                k: self.cfg.k,
            });
        }
        let d = self.cfg.dim;
        let mut stats = StepStats {
            batch: keys.len(),
            ..Default::default()
        };
        let mut seen_slots = Vec::new();
        let mut seen_feats = Vec::new();
        let mut last_new: HashMap<&str, usize> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            match self.slot_of(key) {
                Some(s) => {
                    seen_slots.push(s);
                    seen_feats.extend_from_slice(&feats[i * d..(i + 1) * d]);
                }
                None => {
                    last_new.insert(key.as_str(), i);
                }
            }
        }
        if !seen_slots.is_empty() {
            let up = self
                .mem
                .update_samples(&seen_slots, &seen_feats, self.cfg.momentum)?;
            stats.seen = seen_slots.len();
            stats.change_count = up.change_count;
            stats.change_ratio = up.change_ratio;
        }
        // slots of this batch must survive it: the trainer holds their labels
        let mut protected = seen_slots;
        protected.sort_unstable();
        protected.dedup();
        let mut new_rows: Vec<usize> = last_new.into_values().collect();
        new_rows.sort_unstable();
        let mut row = vec![0f32; d];
        for i in new_rows {
            let Some((slot, evicted)) = self.claim_slot(&protected)? else {
                stats.not_stored += 1;
                continue;
            };
            normalise_into(&feats[i * d..(i + 1) * d], &mut row);
            self.mem.insert(slot, &row, prepared.labels[i])?;
            let key: Arc<str> = Arc::from(keys[i].as_str());
            self.slot_of_key.insert(key.clone(), slot);
            self.key_of_slot[slot as usize] = Some(key);
            if matches!(self.cfg.eviction, EvictionPolicy::Fifo) {
                self.fifo.push_back(slot);
            }
            if let Err(p) = protected.binary_search(&slot) {
                protected.insert(p, slot);
            }
            stats.inserted += 1;
            stats.evicted += usize::from(evicted);
        }
        self.inserted_total += stats.inserted as u64;
        self.evictions_total += stats.evicted as u64;
        self.not_stored_total += stats.not_stored as u64;
        Ok(stats)
    }

    /// Finds a slot for one new key: a never-used slot, or an evicted one. Returns the slot
    /// (now empty) and whether an entry was evicted; `None` when the key is not stored.
    fn claim_slot(&mut self, protected: &[u32]) -> Result<Option<(u32, bool)>> {
        if let EvictionPolicy::Reservoir { .. } = self.cfg.eviction {
            self.offered += 1;
        }
        if let Some(s) = self.free.pop() {
            return Ok(Some((s, false)));
        }
        let victim = match self.cfg.eviction {
            EvictionPolicy::Fifo => {
                let mut skipped = Vec::new();
                let mut victim = None;
                while let Some(s) = self.fifo.pop_front() {
                    if protected.binary_search(&s).is_ok() {
                        skipped.push(s);
                    } else {
                        victim = Some(s);
                        break;
                    }
                }
                // skipped entries keep their place at the head of the queue
                for s in skipped.into_iter().rev() {
                    self.fifo.push_front(s);
                }
                victim
            }
            EvictionPolicy::Reservoir { .. } => {
                let j = self.rng.random_range(0..self.offered);
                (j < self.cfg.capacity as u64 && protected.binary_search(&(j as u32)).is_err())
                    .then_some(j as u32)
            }
        };
        let Some(slot) = victim else {
            return Ok(None);
        };
        self.evict(slot)?;
        Ok(Some((slot, true)))
    }

    fn evict(&mut self, slot: u32) -> Result<()> {
        self.mem.remove(slot)?;
        if let Some(key) = self.key_of_slot[slot as usize].take() {
            self.slot_of_key.remove(&key);
        }
        Ok(())
    }

    /// Step (c), after [`Self::update`] with the same 0-based `step`: full centroid recompute
    /// when `(step + 1) % centroid_interval == 0`, then small-cluster handling with the
    /// resolved `min_cluster`, then the class weights for the next step.
    pub fn after_step(&mut self, step: u64) -> Result<AfterStep> {
        let interval = self.cfg.centroid_interval;
        let centroids_recomputed = interval > 0 && (step + 1).is_multiple_of(interval);
        if centroids_recomputed {
            self.mem.update_centroids(None)?;
        }
        let min_cluster = self.cfg.min_cluster.resolve(self.mem.len());
        let report = self.mem.deal_with_small_clusters(min_cluster)?;
        self.weights = self.current_weights();
        Ok(AfterStep {
            centroids_recomputed,
            min_cluster,
            reseeded: report.reseeded_ids(),
            report,
            weights: self.weights.clone(),
        })
    }

    /// Small-cluster handling outside the step schedule: right after the initial clustering,
    /// so that no cluster starts empty (the reference asserts instead). Updates the weights.
    pub fn handle_small_clusters(&mut self) -> Result<SmallClusterReport> {
        let min_cluster = self.cfg.min_cluster.resolve(self.mem.len());
        let report = self.mem.deal_with_small_clusters(min_cluster)?;
        self.weights = self.current_weights();
        Ok(report)
    }

    /// Health metrics, O(K).
    pub fn stats(&self) -> MemoryStats {
        let sizes = self.mem.sizes();
        let fill = self.mem.len();
        let min_cluster = self.cfg.min_cluster.resolve(fill);
        let size_entropy = if fill == 0 {
            0.0
        } else {
            sizes
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| {
                    let p = n as f64 / fill as f64;
                    -p * p.ln()
                })
                .sum()
        };
        MemoryStats {
            fill,
            capacity: self.cfg.capacity,
            inserted_total: self.inserted_total,
            evictions_total: self.evictions_total,
            not_stored_total: self.not_stored_total,
            empty_clusters: sizes.iter().filter(|&&n| n == 0).count(),
            small_clusters: sizes.iter().filter(|&&n| n < min_cluster).count(),
            min_cluster,
            min_size: sizes.iter().copied().min().unwrap_or(0),
            max_size: sizes.iter().copied().max().unwrap_or(0),
            size_entropy,
        }
    }

    /// The scalar part of the state (everything but the per-entry arrays, centroids and
    /// weights), as a checkpoint stores it.
    pub fn scalars(&self) -> StreamingScalars {
        let w = self.rng.get_word_pos();
        StreamingScalars {
            offered: self.offered,
            rng_seed: self.rng.get_seed(),
            rng_stream: self.rng.get_stream(),
            rng_word_pos: [(w >> 64) as u64, w as u64],
            inserted_total: self.inserted_total,
            evictions_total: self.evictions_total,
            not_stored_total: self.not_stored_total,
        }
    }

    /// Every occupied slot in ascending order, borrowed from the live memory: the order and
    /// content of [`StreamingState`]'s `slots`, `keys`, `labels` and `bank` rows, without
    /// copying them (a checkpoint streams these straight to the store).
    pub fn entries(&self) -> impl Iterator<Item = MemoryEntry<'_>> + '_ {
        self.key_of_slot
            .iter()
            .enumerate()
            .filter_map(|(slot, key)| {
                let slot = slot as u32;
                Some(MemoryEntry {
                    slot,
                    key: key.as_deref()?,
                    label: self.mem.label(slot)?,
                    row: self.mem.row(slot)?,
                })
            })
    }

    /// FIFO insertion order, oldest first (empty under the reservoir policy).
    pub fn fifo_order(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.fifo.iter().copied()
    }

    /// The whole state as plain vectors (copies the occupied part of the bank and every key).
    /// A checkpoint does not need it: it streams [`Self::entries`] instead.
    pub fn export(&self) -> StreamingState {
        let d = self.cfg.dim;
        let sc = self.scalars();
        let mut state = StreamingState {
            config: self.cfg.clone(),
            slots: Vec::with_capacity(self.fill()),
            keys: Vec::with_capacity(self.fill()),
            labels: Vec::with_capacity(self.fill()),
            bank: Vec::with_capacity(self.fill() * d),
            centroids: self.mem.centroids().to_vec(),
            weights: self.weights.clone(),
            fifo: self.fifo_order().collect(),
            offered: sc.offered,
            rng_seed: sc.rng_seed,
            rng_stream: sc.rng_stream,
            rng_word_pos: sc.rng_word_pos,
            inserted_total: sc.inserted_total,
            evictions_total: sc.evictions_total,
            not_stored_total: sc.not_stored_total,
        };
        for e in self.entries() {
            state.slots.push(e.slot);
            state.keys.push(e.key.to_string());
            state.labels.push(e.label);
            state.bank.extend_from_slice(e.row);
        }
        state
    }

    fn check_state_lengths(state: &StreamingState) -> Result<()> {
        let d = state.config.dim;
        let n = state.slots.len();
        if state.keys.len() != n || state.labels.len() != n || state.bank.len() != n * d {
            return Err(OdcError::BadState(format!(
                "{n} slots but {} keys, {} labels, {} bank values (dim {d})",
                state.keys.len(),
                state.labels.len(),
                state.bank.len()
            )));
        }
        if state.weights.len() != state.config.k {
            return Err(OdcError::BadState(format!(
                "{} weights for k = {}",
                state.weights.len(),
                state.config.k
            )));
        }
        Ok(())
    }

    /// Rebuilds a memory from [`Self::export`]'s output, checking it for consistency. Copies
    /// the state; [`Self::from_state`] takes it over instead.
    pub fn import(state: &StreamingState) -> Result<Self> {
        let mut me = Self::new(state.config.clone())?;
        let d = state.config.dim;
        Self::check_state_lengths(state)?;
        me.mem.set_centroids(&state.centroids)?;
        for (i, (&slot, key)) in state.slots.iter().zip(&state.keys).enumerate() {
            me.mem
                .insert(slot, &state.bank[i * d..(i + 1) * d], state.labels[i])?;
            me.adopt_key(slot, Arc::from(key.as_str()))?;
        }
        me.restore_rest(state)?;
        Ok(me)
    }

    /// [`Self::import`] without a second copy of the bank: the state's bank vector becomes
    /// the memory's bank (rows moved in place to their slots), and each key is moved into the
    /// key map as the state is consumed. Peak memory is one bank, not two, which is what lets
    /// a restore of an M = 10 M memory fit beside the rest of the process. Same checks and
    /// result as [`Self::import`]; a state whose slots are not ascending (never written by
    /// [`Self::export`] or a checkpoint) falls back to it.
    pub fn from_state(mut state: StreamingState) -> Result<Self> {
        if !state.slots.windows(2).all(|w| w[0] < w[1]) {
            return Self::import(&state);
        }
        Self::check_state_lengths(&state)?;
        let cfg = state.config.clone();
        Self::check_config(&cfg)?;
        let mem = OdcMemory::from_slot_rows(
            cfg.capacity,
            cfg.dim,
            cfg.k,
            std::mem::take(&mut state.bank),
            &state.slots,
            &state.labels,
            &state.centroids,
        )?;
        let mut me = Self::with_memory(cfg, mem);
        let keys = std::mem::take(&mut state.keys);
        for (&slot, key) in state.slots.iter().zip(keys) {
            me.adopt_key(slot, Arc::from(key))?;
        }
        me.restore_rest(&state)?;
        Ok(me)
    }

    fn adopt_key(&mut self, slot: u32, key: Arc<str>) -> Result<()> {
        if self.slot_of_key.insert(key.clone(), slot).is_some() {
            return Err(OdcError::DuplicateKey(key.to_string()));
        }
        self.key_of_slot[slot as usize] = Some(key);
        Ok(())
    }

    /// The part of a restore after the entries: FIFO, free list, RNG, weights, counters.
    fn restore_rest(&mut self, state: &StreamingState) -> Result<()> {
        let (cap, n) = (state.config.capacity, state.slots.len());
        let mut in_fifo = vec![false; cap];
        for &s in &state.fifo {
            let ok = self.mem.is_occupied(s) && !std::mem::replace(&mut in_fifo[s as usize], true);
            if !ok {
                return Err(OdcError::BadState(format!(
                    "fifo entry {s} is empty, out of range or repeated"
                )));
            }
        }
        if matches!(state.config.eviction, EvictionPolicy::Fifo) && state.fifo.len() != n {
            return Err(OdcError::BadState(format!(
                "fifo holds {} entries for {n} occupied slots",
                state.fifo.len()
            )));
        }
        self.fifo = state.fifo.iter().copied().collect();
        self.free = (0..cap as u32)
            .rev()
            .filter(|&s| !self.mem.is_occupied(s))
            .collect();
        self.offered = state.offered;
        self.rng = ChaCha8Rng::from_seed(state.rng_seed);
        self.rng.set_stream(state.rng_stream);
        self.rng
            .set_word_pos(((state.rng_word_pos[0] as u128) << 64) | state.rng_word_pos[1] as u128);
        self.weights = state.weights.clone();
        self.inserted_total = state.inserted_total;
        self.evictions_total = state.evictions_total;
        self.not_stored_total = state.not_stored_total;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn keys(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("k{i}")).collect()
    }

    fn feats(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        (0..n * d).map(|_| normal.sample(rng).abs()).collect()
    }

    fn warm(cfg: StreamConfig, n: usize, rng: &mut ChaCha8Rng) -> StreamingMemory {
        let mut m = StreamingMemory::new(cfg.clone()).unwrap();
        let f = feats(n, cfg.dim, rng);
        let labels: Vec<u32> = (0..n).map(|i| (i % cfg.k) as u32).collect();
        m.init_from_clustering(&keys(0..n), &f, &labels).unwrap();
        m
    }

    fn step(m: &mut StreamingMemory, ks: &[String], rng: &mut ChaCha8Rng, s: u64) -> StepStats {
        let f = feats(ks.len(), m.config().dim, rng);
        let p = m.prepare(ks, &f).unwrap();
        let st = m.update(ks, &f, &p).unwrap();
        m.after_step(s).unwrap();
        st
    }

    /// Largest distance in f32 ulps between two equal-length f32 arrays of finite values.
    fn max_ulps(a: &[f32], b: &[f32]) -> u32 {
        let key = |x: f32| {
            let i = x.to_bits() as i32;
            // map the sign-magnitude bits onto a monotonic integer line (−0 and +0 meet)
            if i < 0 {
                i32::MIN.wrapping_sub(i) as i64
            } else {
                i as i64
            }
        };
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (key(x) - key(y)).unsigned_abs() as u32)
            .max()
            .unwrap_or(0)
    }

    /// The device path (candle tensors on candle's CPU device: what `train.kernels = "generic"`
    /// selects on CPU) against the host path over a step sequence with new keys, FIFO
    /// evictions, keys repeated within a batch, full centroid recomputes and small-cluster
    /// splits. Labels, step counters, small-cluster reports and weights must be identical,
    /// the bank identical (both paths mix rows on the host); centroids within 1 f32 ulp (the
    /// device sums in f64 in another order, see compute.rs).
    #[test]
    fn device_path_follows_the_host_path_step_by_step() {
        let (cap, d, k, warm_n, b) = (120usize, 8usize, 6usize, 90usize, 16usize);
        let mut cfg = StreamConfig::new(cap, d, k);
        cfg.min_cluster = MinCluster::Count(10);
        cfg.centroid_interval = 3;
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut host = warm(cfg, warm_n, &mut rng);
        let mut dev = host.clone();
        dev.set_compute(&MemoryCompute::generic(&candle_core::Device::Cpu));
        assert!(dev.compute().device().is_some() && host.compute().is_host());
        let (mut recomputes, mut splits, mut evicted, mut unseen) = (0, 0, 0, 0);
        for s in 0..30u64 {
            let ks: Vec<String> = (0..b)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        format!("k{}", rng.random_range(0..warm_n))
                    } else {
                        format!("n{}", rng.random_range(0..20 * (s as usize + 1)))
                    }
                })
                .collect();
            let f = feats(b, d, &mut rng);
            let ph = host.prepare(&ks, &f).unwrap();
            let pd = dev.prepare(&ks, &f).unwrap();
            assert_eq!(ph, pd, "step {s}: prepare");
            unseen += ph.seen.iter().filter(|&&x| !x).count();
            let uh = host.update(&ks, &f, &ph).unwrap();
            let ud = dev.update(&ks, &f, &pd).unwrap();
            assert_eq!(uh, ud, "step {s}: update");
            evicted += uh.evicted;
            let ah = host.after_step(s).unwrap();
            let ad = dev.after_step(s).unwrap();
            assert_eq!(ah.report, ad.report, "step {s}: small clusters");
            assert_eq!(ah.weights, ad.weights, "step {s}: weights");
            assert_eq!(ah.centroids_recomputed, ad.centroids_recomputed);
            recomputes += usize::from(ah.centroids_recomputed);
            splits += ah.report.splits.len();
            let (mh, md) = (host.memory(), dev.memory());
            assert_eq!(mh.labels(), md.labels(), "step {s}: labels");
            assert_eq!(mh.bank(), md.bank(), "step {s}: bank");
            let ulps = max_ulps(mh.centroids(), md.centroids());
            assert!(ulps <= 1, "step {s}: centroids {ulps} ulps apart");
        }
        // the sequence exercised every part of the device path
        assert!(recomputes >= 9 && splits > 0 && evicted > 0 && unseen > 0);
        // a clone re-sends its device copies and keeps following
        let mut clone = dev.clone();
        let ks = keys(0..8);
        let f = feats(8, d, &mut rng);
        let p1 = dev.prepare(&ks, &f).unwrap();
        let p2 = clone.prepare(&ks, &f).unwrap();
        assert_eq!(p1, p2);
        assert_eq!(
            dev.update(&ks, &f, &p1).unwrap(),
            clone.update(&ks, &f, &p2).unwrap()
        );
    }

    #[test]
    fn fifo_evicts_oldest_but_not_batch_members() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut cfg = StreamConfig::new(6, 4, 2);
        cfg.min_cluster = MinCluster::Count(0);
        let mut m = warm(cfg, 6, &mut rng);
        // k0 is the oldest but is in the batch, so k1 and k2 go
        let batch = vec!["k0".to_string(), "n1".into(), "n2".into()];
        let st = step(&mut m, &batch, &mut rng, 0);
        assert_eq!((st.seen, st.inserted, st.evicted), (1, 2, 2));
        assert!(m.slot_of("k0").is_some());
        assert!(m.slot_of("k1").is_none() && m.slot_of("k2").is_none());
        assert!(m.slot_of("n1").is_some() && m.slot_of("n2").is_some());
        // next oldest is k0 again
        step(&mut m, &["n3".to_string()], &mut rng, 1);
        assert!(m.slot_of("k0").is_none());
        assert_eq!(m.fill(), 6);
        assert_eq!(m.stats().evictions_total, 3);
    }

    #[test]
    fn unseen_key_gets_nearest_centroid_and_is_stored_with_it() {
        let mut cfg = StreamConfig::new(20, 3, 2);
        cfg.min_cluster = MinCluster::Count(0);
        let mut m = StreamingMemory::new(cfg).unwrap();
        let f = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.1, 0.0, 0.1, 1.0, 0.0];
        m.init_from_clustering(&keys(0..4), &f, &[0, 1, 0, 1])
            .unwrap();
        let new = vec!["x".to_string(), "y".into(), "x".into()];
        let nf = vec![0.0, 2.0, 0.1, 3.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let p = m.prepare(&new, &nf).unwrap();
        assert_eq!(p.labels, vec![1, 0, 1]);
        assert_eq!(p.seen, vec![false; 3]);
        let st = m.update(&new, &nf, &p).unwrap();
        assert_eq!(st.inserted, 2, "a repeated new key is stored once");
        assert_eq!(m.label_of("x"), Some(1));
        assert_eq!(m.label_of("y"), Some(0));
        let row = m.memory().row(m.slot_of("x").unwrap()).unwrap();
        assert_eq!(row, &[0.0, 1.0, 0.0], "last copy of x wins");
    }

    #[test]
    fn reservoir_keeps_a_uniform_sample() {
        // insert 0..N one at a time into M slots many times; each key should survive with
        // probability M/N
        let (m_cap, n, runs) = (10usize, 50usize, 400u64);
        let mut hits = vec![0u32; n];
        for run in 0..runs {
            let mut cfg = StreamConfig::new(m_cap, 2, 1);
            cfg.eviction = EvictionPolicy::Reservoir { seed: run };
            cfg.min_cluster = MinCluster::Count(0);
            let mut mem = StreamingMemory::new(cfg).unwrap();
            for i in 0..n {
                let k = vec![format!("k{i}")];
                let p = mem.prepare(&k, &[1.0, 0.5]).unwrap();
                mem.update(&k, &[1.0, 0.5], &p).unwrap();
            }
            assert_eq!(mem.fill(), m_cap);
            let st = mem.stats();
            assert_eq!(st.inserted_total + st.not_stored_total, n as u64);
            for (i, h) in hits.iter_mut().enumerate() {
                *h += u32::from(mem.slot_of(&format!("k{i}")).is_some());
            }
        }
        let expect = runs as f64 * m_cap as f64 / n as f64; // 80
        for (i, &h) in hits.iter().enumerate() {
            // binomial sd ≈ 8; 5 sd bounds
            assert!((h as f64 - expect).abs() < 40.0, "key {i}: {h} vs {expect}");
        }
        let early: u32 = hits[..10].iter().sum();
        let late: u32 = hits[40..].iter().sum();
        assert!(
            (early as f64 - late as f64).abs() < 160.0,
            "{early} vs {late}"
        );
    }

    #[test]
    fn min_cluster_fraction_resolves_against_fill() {
        assert_eq!(MinCluster::FractionOfFill(0.01).resolve(1000), 10);
        assert_eq!(MinCluster::FractionOfFill(0.01).resolve(50), 1);
        assert_eq!(MinCluster::FractionOfFill(0.0).resolve(0), 1);
        assert_eq!(MinCluster::Count(20).resolve(5), 20);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut cfg = StreamConfig::new(100, 4, 4);
        cfg.min_cluster = MinCluster::FractionOfFill(0.1);
        let mut m = StreamingMemory::new(cfg).unwrap();
        let f = feats(40, 4, &mut rng);
        // sizes 34, 3, 2, 1 with 40 filled: threshold 4, clusters 1, 2, 3 are small
        let labels: Vec<u32> = (0..40)
            .map(|i| match i {
                0..=33 => 0,
                34..=36 => 1,
                37..=38 => 2,
                _ => 3,
            })
            .collect();
        m.init_from_clustering(&keys(0..40), &f, &labels).unwrap();
        let a = m.after_step(0).unwrap();
        assert_eq!(a.min_cluster, 4);
        assert_eq!(a.report.small_ids, vec![1, 2, 3]);
        assert_eq!(a.reseeded.len(), 3);
        assert!(m.memory().sizes().iter().all(|&s| s > 0));
    }

    #[test]
    fn export_import_round_trip_continues_identically() {
        for eviction in [EvictionPolicy::Fifo, EvictionPolicy::Reservoir { seed: 9 }] {
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let mut cfg = StreamConfig::new(40, 6, 4);
            cfg.eviction = eviction;
            cfg.min_cluster = MinCluster::Count(3);
            cfg.centroid_interval = 2;
            let mut a = warm(cfg, 30, &mut rng);
            for s in 0..5 {
                let ks: Vec<String> = (0..8)
                    .map(|j| format!("k{}", (s * 7 + j * 5) % 60))
                    .collect();
                step(&mut a, &ks, &mut rng, s);
            }
            let state = a.export();
            let json = serde_json::to_string(&state).unwrap();
            let back: StreamingState = serde_json::from_str(&json).unwrap();
            assert_eq!(back, state);
            let mut b = StreamingMemory::import(&back).unwrap();
            assert_eq!(b.export(), state);
            let mut rng_b = rng.clone();
            for s in 5..12 {
                let ks: Vec<String> = (0..8)
                    .map(|j| format!("k{}", (s * 11 + j * 3) % 90))
                    .collect();
                let sa = step(&mut a, &ks, &mut rng, s);
                let sb = step(&mut b, &ks, &mut rng_b, s);
                assert_eq!(sa, sb, "step {s}");
            }
            assert_eq!(a.export(), b.export(), "{eviction:?}");
        }
    }

    #[test]
    fn from_state_takes_over_the_state_like_import() {
        for eviction in [EvictionPolicy::Fifo, EvictionPolicy::Reservoir { seed: 3 }] {
            let mut rng = ChaCha8Rng::seed_from_u64(8);
            let mut cfg = StreamConfig::new(60, 5, 4);
            cfg.eviction = eviction;
            cfg.min_cluster = MinCluster::Count(2);
            cfg.centroid_interval = 3;
            let mut a = warm(cfg, 30, &mut rng);
            for s in 0..4 {
                let ks: Vec<String> = (0..6)
                    .map(|j| format!("k{}", (s * 5 + j * 7) % 45))
                    .collect();
                step(&mut a, &ks, &mut rng, s);
            }
            // Spread the entries over the slots (holes between them), so that rows have to
            // move to their slots.
            let mut state = a.export();
            let spread = |s: u32| s + s / 3;
            assert!(state.slots.iter().all(|&s| (spread(s) as usize) < 60));
            state.slots.iter_mut().for_each(|s| *s = spread(*s));
            state.fifo.iter_mut().for_each(|s| *s = spread(*s));
            let imported = StreamingMemory::import(&state).unwrap();
            let mut taken = StreamingMemory::from_state(state.clone()).unwrap();
            assert_eq!(taken.export(), state);
            assert_eq!(taken.memory().bank(), imported.memory().bank());
            assert_eq!(taken.memory().sizes(), imported.memory().sizes());
            let mut imported = imported;
            let mut rng_b = rng.clone();
            for s in 4..10 {
                let ks: Vec<String> = (0..6)
                    .map(|j| format!("k{}", (s * 3 + j * 11) % 70))
                    .collect();
                let sa = step(&mut imported, &ks, &mut rng, s);
                let sb = step(&mut taken, &ks, &mut rng_b, s);
                assert_eq!(sa, sb, "step {s}");
            }
            assert_eq!(imported.export(), taken.export(), "{eviction:?}");
        }
        // The same refusals as import.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let m = warm(StreamConfig::new(10, 3, 2), 6, &mut rng);
        let mut s = m.export();
        s.labels.pop();
        assert!(StreamingMemory::from_state(s).is_err());
        let mut s = m.export();
        s.keys[1] = s.keys[0].clone();
        assert!(matches!(
            StreamingMemory::from_state(s),
            Err(OdcError::DuplicateKey(_))
        ));
        let mut s = m.export();
        s.slots[5] = 10;
        assert!(matches!(
            StreamingMemory::from_state(s),
            Err(OdcError::SlotOutOfRange { .. })
        ));
        let mut s = m.export();
        s.bank[4] = f32::NAN;
        assert!(StreamingMemory::from_state(s).is_err());
        // Slots out of order (never written by export) go through import and still load.
        let mut s = m.export();
        s.slots.swap(0, 1);
        s.keys.swap(0, 1);
        s.labels.swap(0, 1);
        let (d, b) = (3, s.bank.clone());
        s.bank[..d].copy_from_slice(&b[d..2 * d]);
        s.bank[d..2 * d].copy_from_slice(&b[..d]);
        assert_eq!(StreamingMemory::from_state(s).unwrap().export(), m.export());
    }

    #[test]
    fn import_rejects_inconsistent_state() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let m = warm(StreamConfig::new(10, 3, 2), 6, &mut rng);
        let mut s = m.export();
        s.labels.pop();
        assert!(StreamingMemory::import(&s).is_err());
        let mut s = m.export();
        s.keys[1] = s.keys[0].clone();
        assert!(matches!(
            StreamingMemory::import(&s),
            Err(OdcError::DuplicateKey(_))
        ));
        let mut s = m.export();
        s.fifo.push(9);
        assert!(StreamingMemory::import(&s).is_err());
    }

    #[test]
    fn bad_batches_are_errors() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let mut m = warm(StreamConfig::new(10, 3, 2), 6, &mut rng);
        let ks = keys(0..2);
        assert!(m.prepare(&ks, &[0.0; 5]).is_err());
        assert!(m
            .prepare(&ks, &[0.0, 0.0, f32::NAN, 1.0, 1.0, 1.0])
            .is_err());
        let p = m.prepare(&ks, &[1.0; 6]).unwrap();
        assert!(m.update(&keys(0..3), &[1.0; 9], &p).is_err());
        let dup = vec!["a".to_string(), "a".into()];
        assert!(m.init_from_clustering(&dup, &[1.0; 6], &[0, 1]).is_err());
    }
}
