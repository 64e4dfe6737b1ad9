//! The ODC samples memory (bank + labels) and centroids memory, slot-indexed.
//!
//! Semantics follow `shared/conformance/odc/README.md` §2 exactly. Cluster sizes and member
//! lists are maintained on every label change, so the per-step work (class weights, finding
//! small clusters, finding the largest cluster and its members) never scans the whole memory.
//!
//! With [`MemoryCompute::Device`] the heavy products run on that device (`compute.rs`): the
//! relabel and phase-A scoring against a device copy of the centroids, and the full centroid
//! recompute over a device copy of the bank. The host arrays stay the state of record; the
//! device copies are refreshed lazily, only in the rows that changed since the last use.

use super::compute::{self, device_error, DirtyRows, MemoryCompute};
use super::linalg::{check_finite, check_rows, matmul_abt, nearest_by_dot, normalise_into};
use super::two_means::two_means;
use super::{OdcError, Result, WEIGHT_EPS, WEIGHT_POWER};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Marks "slot not in any member list" in `pos`.
const NO_POS: u32 = u32::MAX;

/// Device copies of the centroids and of the bank, and which of their rows are stale.
///
/// Data movement per training step at ImageNet scale (K = 10,000, M = 1.28 M, D = 256,
/// B = 512, centroid interval 10): the relabel uploads the B mixed rows (512 KiB) and reads
/// back B labels; the rows a step changed on the host (a phase-B recompute of two centroids,
/// the batch's bank rows) are re-sent only when the device copy is next used, so the bank
/// copy receives at most 10 × B rows (5 MiB) plus the slot ids grouped by cluster (~6 MiB)
/// per recompute, and the recomputed centroids come back once (10 MiB). The whole bank
/// (1.3 GB) crosses only at the first use after `init_memory`, a restore or a compute switch.
#[derive(Debug)]
struct DeviceMirror {
    device: Device,
    /// k × dim f32.
    centroids: Option<Tensor>,
    centroids_dirty: DirtyRows,
    /// (capacity + 1) × dim f32; the extra last row stays zero (padding of the cluster sums).
    bank: Option<Tensor>,
    bank_dirty: DirtyRows,
}

impl DeviceMirror {
    fn new(device: Device, k: usize, capacity: usize) -> Self {
        Self {
            device,
            centroids: None,
            centroids_dirty: DirtyRows::all(k),
            bank: None,
            bank_dirty: DirtyRows::all(capacity),
        }
    }

    /// The device centroids, after re-sending the rows that changed on the host.
    fn centroids(&mut self, host: &[f32], d: usize) -> candle_core::Result<&Tensor> {
        sync(
            &mut self.centroids,
            &mut self.centroids_dirty,
            host,
            d,
            0,
            &self.device,
        )
    }

    /// The device bank (plus its zero padding row), after re-sending the changed rows.
    fn bank(&mut self, host: &[f32], d: usize) -> candle_core::Result<&Tensor> {
        sync(
            &mut self.bank,
            &mut self.bank_dirty,
            host,
            d,
            1,
            &self.device,
        )
    }
}

fn sync<'a>(
    mirror: &'a mut Option<Tensor>,
    dirty: &mut DirtyRows,
    host: &[f32],
    d: usize,
    pad_rows: usize,
    dev: &Device,
) -> candle_core::Result<&'a Tensor> {
    let t = match mirror.take() {
        Some(t) if !dirty.wants_full() => {
            compute::refresh_rows(&t, host, d, &dirty.sorted())?;
            t
        }
        _ => compute::upload_rows(host, d, pad_rows, dev)?,
    };
    dirty.clear();
    Ok(mirror.insert(t))
}

/// The device side of an [`OdcMemory`] on the device path. Behind a mutex so that the
/// `&self` scoring of new keys can refresh the centroid copy. A clone starts with nothing on
/// the device: the copies are updated in place, so two memories must never share them.
#[derive(Debug)]
struct MirrorCell(Mutex<DeviceMirror>);

impl Clone for MirrorCell {
    fn clone(&self) -> Self {
        let m = self.lock();
        let (k, cap) = (m.centroids_dirty.len(), m.bank_dirty.len());
        MirrorCell(Mutex::new(DeviceMirror::new(m.device.clone(), k, cap)))
    }
}

impl MirrorCell {
    // A poisoned lock only follows a panic in another thread mid-update; the copies may then
    // be stale, so the next use re-sends them whole.
    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceMirror> {
        self.0.lock().unwrap_or_else(|p| {
            let mut m = p.into_inner();
            m.centroids_dirty.mark_all();
            m.bank_dirty.mark_all();
            m
        })
    }
    fn get_mut(&mut self) -> &mut DeviceMirror {
        self.0.get_mut().unwrap_or_else(|p| {
            let m = p.into_inner();
            m.centroids_dirty.mark_all();
            m.bank_dirty.mark_all();
            m
        })
    }
}

/// Slot-indexed samples memory plus centroids memory, f32 storage.
#[derive(Debug, Clone)]
pub struct OdcMemory {
    dim: usize,
    k: usize,
    /// capacity × dim, row-major; rows of empty slots are zero.
    bank: Vec<f32>,
    /// Label per slot; meaningless for empty slots.
    labels: Vec<u32>,
    occupied: Vec<bool>,
    /// k × dim, the plain (unnormalised) mean of each cluster's bank rows.
    centroids: Vec<f32>,
    /// Unordered member slots of each cluster (swap-remove keeps removal O(1)).
    members: Vec<Vec<u32>>,
    /// Index of each occupied slot inside `members[labels[slot]]`.
    pos: Vec<u32>,
    len: usize,
    /// Device copies when the heavy work runs on a device; `None` on the host path.
    device: Option<MirrorCell>,
}

/// Result of [`OdcMemory::update_samples`].
#[derive(Debug, Clone, PartialEq)]
pub struct SampleUpdate {
    /// B × dim: the new memory row of every batch position (repeated slots included).
    pub rows: Vec<f32>,
    /// New label of every batch position.
    pub labels: Vec<u32>,
    /// Batch rows whose new label differs from the slot's label before the batch.
    pub change_count: usize,
    /// `change_count / B` (0 for an empty batch).
    pub change_ratio: f64,
}

/// One phase-B split of [`OdcMemory::deal_with_small_clusters`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitRecord {
    /// The emptied cluster id that was re-seeded.
    pub empty_id: u32,
    /// The cluster that was split (largest at that moment, ties: lowest id).
    pub big: u32,
    /// Size of `big` before the split.
    pub big_size: usize,
    /// Members that moved to `empty_id`.
    pub moved: usize,
    /// Whether the odd-position fallback was used.
    pub fallback: bool,
    /// 2-means assignment rounds.
    pub rounds: u32,
    /// Position, among big's members in ascending slot order, of the row used as centre 1.
    pub seed_row: usize,
}

/// How a call to [`OdcMemory::deal_with_small_clusters`] ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SmallClusterOutcome {
    /// No cluster was smaller than `min_cluster`.
    NothingToDo,
    /// Every small cluster was emptied and re-seeded.
    Done,
    /// Every cluster is small, so phase A has no target: nothing was changed.
    NoAllowedTarget,
    /// Phase B stopped because the largest cluster had fewer than 2 members; the ids in
    /// `unfilled` stay empty (their centroids unchanged) until a later call.
    TooFewToSplit { unfilled: Vec<u32> },
}

/// What [`OdcMemory::deal_with_small_clusters`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SmallClusterReport {
    /// Clusters with fewer than `min_cluster` members (empty ones included), ascending.
    pub small_ids: Vec<u32>,
    /// Phase-A moves `[slot, target]` in the order they were made.
    pub phase_a_moves: Vec<[u32; 2]>,
    /// Phase-B splits in order.
    pub splits: Vec<SplitRecord>,
    pub outcome: SmallClusterOutcome,
}

impl SmallClusterReport {
    /// Cluster ids that were re-seeded (their classifier rows may be re-initialised).
    pub fn reseeded_ids(&self) -> Vec<u32> {
        self.splits.iter().map(|s| s.empty_id).collect()
    }
}

impl OdcMemory {
    /// An empty memory of `capacity` slots for features of length `dim` and `k` clusters.
    pub fn new(capacity: usize, dim: usize, k: usize) -> Result<Self> {
        let bank_len = Self::check_sizes(capacity, dim, k)?;
        Ok(Self::with_bank(capacity, dim, k, vec![0.0; bank_len]))
    }

    /// Checks the sizes; returns the bank length, capacity × dim.
    fn check_sizes(capacity: usize, dim: usize, k: usize) -> Result<usize> {
        if dim == 0 || k == 0 {
            return Err(OdcError::InvalidParameter(format!(
                "dim and k must be positive (dim = {dim}, k = {k})"
            )));
        }
        if capacity >= u32::MAX as usize {
            return Err(OdcError::InvalidParameter(format!(
                "capacity {capacity} does not fit a u32 slot index"
            )));
        }
        capacity.checked_mul(dim).ok_or_else(|| {
            OdcError::InvalidParameter(format!("capacity {capacity} × dim {dim} overflows"))
        })
    }

    fn with_bank(capacity: usize, dim: usize, k: usize, bank: Vec<f32>) -> Self {
        Self {
            dim,
            k,
            bank,
            labels: vec![0; capacity],
            occupied: vec![false; capacity],
            centroids: vec![0.0; k * dim],
            members: vec![Vec::new(); k],
            pos: vec![NO_POS; capacity],
            len: 0,
            device: None,
        }
    }

    /// A memory of `capacity` slots built from stored rows without a second copy of them:
    /// `bank` (n × dim, the rows of `slots`, which must be strictly ascending) becomes the
    /// memory's own bank, each row moved in place to its slot; `labels` (n) are the slots'
    /// labels and `centroids` (k × dim) the centroids. Rows are taken as given (not
    /// re-normalised). Used to restore a checkpoint, where the bank is the largest thing the
    /// process holds.
    pub fn from_slot_rows(
        capacity: usize,
        dim: usize,
        k: usize,
        mut bank: Vec<f32>,
        slots: &[u32],
        labels: &[u32],
        centroids: &[f32],
    ) -> Result<Self> {
        let full = Self::check_sizes(capacity, dim, k)?;
        let mut mem = Self::with_bank(capacity, dim, k, Vec::new());
        mem.set_centroids(centroids)?;
        let n = check_rows("bank", &bank, dim)?;
        if slots.len() != n {
            return Err(OdcError::LengthMismatch {
                what: "slots vs bank rows",
                expected: n,
                got: slots.len(),
            });
        }
        mem.check_labels("labels", labels, n)?;
        for (i, &s) in slots.iter().enumerate() {
            mem.check_slot(s)?;
            if i > 0 && slots[i - 1] >= s {
                return Err(OdcError::InvalidParameter(format!(
                    "slots must be strictly ascending (slot {s} follows {})",
                    slots[i - 1]
                )));
            }
        }
        check_finite("bank", &bank, dim)?;
        // Exact growth: a large realloc is remapped by the allocator, not copied, and no
        // doubling over-allocates.
        bank.reserve_exact(full - bank.len());
        bank.resize(full, 0.0);
        // Slots ascend and slot(i) >= i, so moving from the last row down never overwrites a
        // row that is still to move.
        let d = dim;
        for (i, &s) in slots.iter().enumerate().rev() {
            let s = s as usize;
            if s != i {
                bank.copy_within(i * d..(i + 1) * d, s * d);
                bank[i * d..(i + 1) * d].fill(0.0);
            }
        }
        mem.bank = bank;
        for (&s, &l) in slots.iter().zip(labels) {
            mem.attach(s, l);
        }
        Ok(mem)
    }

    /// A full memory from stored state, taken as is: `bank` (n × dim, not re-normalised),
    /// `labels` (n) and `centroids` (k × dim). Used to resume from a checkpoint and by tests.
    pub fn from_parts(
        dim: usize,
        k: usize,
        bank: Vec<f32>,
        labels: &[u32],
        centroids: Vec<f32>,
    ) -> Result<Self> {
        let n = check_rows("bank", &bank, dim)?;
        let mut mem = Self::new(n, dim, k)?;
        mem.set_centroids(&centroids)?;
        mem.check_labels("labels", labels, n)?;
        check_finite("bank", &bank, dim)?;
        mem.bank = bank;
        for (slot, &l) in labels.iter().enumerate() {
            mem.attach(slot as u32, l);
        }
        Ok(mem)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn capacity(&self) -> usize {
        self.occupied.len()
    }
    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_occupied(&self, slot: u32) -> bool {
        self.occupied.get(slot as usize).copied().unwrap_or(false)
    }
    /// Label of an occupied slot.
    pub fn label(&self, slot: u32) -> Option<u32> {
        self.is_occupied(slot).then(|| self.labels[slot as usize])
    }
    /// Bank row of an occupied slot.
    pub fn row(&self, slot: u32) -> Option<&[f32]> {
        self.is_occupied(slot).then(|| self.row_unchecked(slot))
    }
    /// The whole bank, capacity × dim (empty slots are zero rows).
    pub fn bank(&self) -> &[f32] {
        &self.bank
    }
    /// Label per slot (meaningless for empty slots; see [`Self::is_occupied`]).
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
    /// k × dim, unnormalised.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
    /// Cluster sizes, O(k).
    pub fn sizes(&self) -> Vec<usize> {
        self.members.iter().map(Vec::len).collect()
    }
    pub fn size(&self, cluster: u32) -> usize {
        self.members.get(cluster as usize).map_or(0, Vec::len)
    }
    /// Member slots of a cluster, in no particular order.
    pub fn members(&self, cluster: u32) -> &[u32] {
        self.members
            .get(cluster as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Where the relabel, phase-A scoring and full centroid recompute run. Switching to a
    /// device sends the whole bank and centroids there at their next use.
    pub fn set_compute(&mut self, compute: &MemoryCompute) {
        self.device = compute.device().map(|d| {
            MirrorCell(Mutex::new(DeviceMirror::new(
                d.clone(),
                self.k,
                self.capacity(),
            )))
        });
    }

    /// The current choice of [`Self::set_compute`].
    pub fn compute(&self) -> MemoryCompute {
        match &self.device {
            None => MemoryCompute::Host,
            Some(cell) => MemoryCompute::Device(cell.lock().device.clone()),
        }
    }

    fn mark_bank_row(&mut self, slot: u32) {
        if let Some(cell) = &mut self.device {
            cell.get_mut().bank_dirty.mark(slot);
        }
    }
    fn mark_bank_all(&mut self) {
        if let Some(cell) = &mut self.device {
            cell.get_mut().bank_dirty.mark_all();
        }
    }
    fn mark_centroid(&mut self, c: u32) {
        if let Some(cell) = &mut self.device {
            cell.get_mut().centroids_dirty.mark(c);
        }
    }
    fn mark_centroids_all(&mut self) {
        if let Some(cell) = &mut self.device {
            cell.get_mut().centroids_dirty.mark_all();
        }
    }

    /// For every row of `rows` (r × dim), the centroid with the largest raw dot product
    /// (restricted to `mask`; ties: lowest id), on the host or on the device.
    fn nearest_rows(&self, rows: &[f32], mask: Option<&[bool]>) -> Result<Vec<Option<u32>>> {
        let Some(cell) = &self.device else {
            return Ok(nearest_by_dot(
                rows,
                self.dim,
                &self.centroids,
                self.k,
                mask,
            ));
        };
        if mask.is_some_and(|m| !m.contains(&true)) {
            return Ok(vec![None; rows.len() / self.dim]);
        }
        let mut mirror = cell.lock();
        let c = mirror
            .centroids(&self.centroids, self.dim)
            .map_err(|e| device_error("centroid upload", e))?;
        let labels = compute::nearest_by_dot(rows, self.dim, c, mask)
            .map_err(|e| device_error("relabel", e))?;
        Ok(labels.into_iter().map(Some).collect())
    }

    /// Full centroid recompute on the device: f64 sums of the device bank grouped by label
    /// (ascending slots within a cluster), divided by the sizes, rounded to f32. A cluster
    /// without members keeps its centroid, as on the host.
    fn update_centroids_on_device(&mut self) -> Result<()> {
        let (d, k) = (self.dim, self.k);
        let sizes = self.sizes();
        let mut start = vec![0usize; k + 1];
        for c in 0..k {
            start[c + 1] = start[c] + sizes[c];
        }
        let mut fill = start.clone();
        let mut order = vec![0u32; self.len];
        for (slot, (&occ, &l)) in self.occupied.iter().zip(&self.labels).enumerate() {
            if occ {
                order[fill[l as usize]] = slot as u32;
                fill[l as usize] += 1;
            }
        }
        let Self {
            bank,
            centroids,
            device,
            ..
        } = self;
        let Some(cell) = device else {
            return Ok(());
        };
        let mirror = cell.get_mut();
        let err = |e| device_error("centroid recompute", e);
        let bank_t = mirror.bank(bank, d).map_err(err)?;
        let sums =
            compute::cluster_sums(bank_t, &order, &start, compute::SUM_BLOCK).map_err(err)?;
        let means = compute::cluster_means(&sums, &sizes).map_err(err)?;
        let host = means
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(err)?;
        mirror.centroids_dirty.clear();
        for c in 0..k {
            if sizes[c] > 0 {
                centroids[c * d..(c + 1) * d].copy_from_slice(&host[c * d..(c + 1) * d]);
            } else {
                // the device copy holds zeros there; the host keeps the old centroid
                mirror.centroids_dirty.mark(c as u32);
            }
        }
        mirror.centroids = Some(means);
        Ok(())
    }

    /// Replaces the centroids (k × dim).
    pub fn set_centroids(&mut self, centroids: &[f32]) -> Result<()> {
        if centroids.len() != self.k * self.dim {
            return Err(OdcError::LengthMismatch {
                what: "centroids",
                expected: self.k * self.dim,
                got: centroids.len(),
            });
        }
        check_finite("centroids", centroids, self.dim)?;
        self.centroids.copy_from_slice(centroids);
        self.mark_centroids_all();
        Ok(())
    }

    fn row_unchecked(&self, slot: u32) -> &[f32] {
        let s = slot as usize * self.dim;
        &self.bank[s..s + self.dim]
    }

    fn check_labels(&self, what: &'static str, labels: &[u32], expected: usize) -> Result<()> {
        if labels.len() != expected {
            return Err(OdcError::LengthMismatch {
                what,
                expected,
                got: labels.len(),
            });
        }
        match labels.iter().find(|&&l| l as usize >= self.k) {
            Some(&label) => Err(OdcError::LabelOutOfRange {
                what,
                label,
                k: self.k,
            }),
            None => Ok(()),
        }
    }

    fn check_slot(&self, slot: u32) -> Result<()> {
        if slot as usize >= self.capacity() {
            return Err(OdcError::SlotOutOfRange {
                slot,
                capacity: self.capacity(),
            });
        }
        Ok(())
    }

    /// Marks an empty slot occupied with `label` and adds it to the member list.
    fn attach(&mut self, slot: u32, label: u32) {
        let s = slot as usize;
        debug_assert!(!self.occupied[s]);
        self.occupied[s] = true;
        self.labels[s] = label;
        let list = &mut self.members[label as usize];
        self.pos[s] = list.len() as u32;
        list.push(slot);
        self.len += 1;
    }

    /// Removes an occupied slot from its member list (O(1) swap-remove).
    fn detach(&mut self, slot: u32) {
        let s = slot as usize;
        debug_assert!(self.occupied[s]);
        let list = &mut self.members[self.labels[s] as usize];
        let p = self.pos[s] as usize;
        list.swap_remove(p);
        if let Some(&moved) = list.get(p) {
            self.pos[moved as usize] = p as u32;
        }
        self.pos[s] = NO_POS;
        self.occupied[s] = false;
        self.len -= 1;
    }

    /// Relabels an occupied slot, keeping sizes and member lists exact.
    fn set_label(&mut self, slot: u32, label: u32) {
        if self.labels[slot as usize] != label {
            self.detach(slot);
            self.attach(slot, label);
        }
    }

    /// Empties the memory and fills slots 0..n with `normalise(features)` and `labels`, then
    /// sets every centroid to the mean of its members' bank rows (a zero row counts in the
    /// mean; a cluster without members gets a zero centroid instead of the official assert).
    pub fn init_memory(&mut self, features: &[f32], labels: &[u32]) -> Result<()> {
        let n = check_rows("features", features, self.dim)?;
        if n > self.capacity() {
            return Err(OdcError::InvalidParameter(format!(
                "init_memory: {n} samples exceed capacity {}",
                self.capacity()
            )));
        }
        self.check_labels("labels", labels, n)?;
        check_finite("features", features, self.dim)?;
        self.clear();
        let d = self.dim;
        self.bank[..n * d]
            .par_chunks_mut(d)
            .zip(features.par_chunks(d))
            .for_each(|(out, x)| normalise_into(x, out));
        for (slot, &l) in labels.iter().enumerate() {
            self.attach(slot as u32, l);
        }
        self.centroids.fill(0.0);
        self.update_centroids(None)
    }

    /// Removes every entry (bank rows zeroed); centroids are kept.
    pub fn clear(&mut self) {
        self.bank.fill(0.0);
        self.mark_bank_all();
        self.occupied.fill(false);
        self.pos.fill(NO_POS);
        for m in &mut self.members {
            m.clear();
        }
        self.len = 0;
    }

    /// Momentum update and relabel of a batch (README §2 `update_samples_memory`).
    ///
    /// `m_i = normalise((1 − momentum)·bank[slot_i] + momentum·normalise(feat_i))`, every row
    /// reading the bank as it was before the batch; new label = argmax of the raw dot product
    /// with the unnormalised centroids (ties: lowest id). Rows and labels are written in batch
    /// order, so for a repeated slot the last copy wins. Every slot must be occupied.
    pub fn update_samples(
        &mut self,
        slots: &[u32],
        feats: &[f32],
        momentum: f64,
    ) -> Result<SampleUpdate> {
        let d = self.dim;
        let b = check_rows("feats", feats, d)?;
        if b != slots.len() {
            return Err(OdcError::LengthMismatch {
                what: "feats rows vs slots",
                expected: slots.len(),
                got: b,
            });
        }
        if !(0.0..=1.0).contains(&momentum) {
            return Err(OdcError::InvalidParameter(format!(
                "momentum must be in [0, 1], got {momentum}"
            )));
        }
        for &s in slots {
            self.check_slot(s)?;
            if !self.occupied[s as usize] {
                return Err(OdcError::SlotEmpty { slot: s });
            }
        }
        check_finite("feats", feats, d)?;

        let mut rows = vec![0f32; b * d];
        {
            let bank = &self.bank;
            rows.par_chunks_mut(d)
                .zip(feats.par_chunks(d))
                .zip(slots.par_iter())
                .for_each(|((out, f), &slot)| {
                    // f̂ is rounded to f32 before mixing, as the reference stores it
                    let mut f_hat = vec![0f32; d];
                    normalise_into(f, &mut f_hat);
                    let old = &bank[slot as usize * d..(slot as usize + 1) * d];
                    let mixed: Vec<f64> = old
                        .iter()
                        .zip(&f_hat)
                        .map(|(&o, &n)| (1.0 - momentum) * o as f64 + momentum * n as f64)
                        .collect();
                    let norm = mixed.iter().map(|v| v * v).sum::<f64>().sqrt() + super::NORM_EPS;
                    for (o, v) in out.iter_mut().zip(mixed) {
                        *o = (v / norm) as f32;
                    }
                });
        }
        let labels: Vec<u32> = self
            .nearest_rows(&rows, None)?
            .into_iter()
            .map(|l| l.unwrap_or(0))
            .collect();
        let change_count = slots
            .iter()
            .zip(&labels)
            .filter(|(&s, &l)| self.labels[s as usize] != l)
            .count();
        for (i, &s) in slots.iter().enumerate() {
            let start = s as usize * d;
            self.bank[start..start + d].copy_from_slice(&rows[i * d..(i + 1) * d]);
            self.mark_bank_row(s);
        }
        for (&s, &l) in slots.iter().zip(&labels) {
            self.set_label(s, l);
        }
        let change_ratio = if b == 0 {
            0.0
        } else {
            change_count as f64 / b as f64
        };
        Ok(SampleUpdate {
            rows,
            labels,
            change_count,
            change_ratio,
        })
    }

    /// Recomputes the centroids of `cinds` (all clusters when `None`) as the f64 mean of their
    /// members' bank rows, stored as f32. Clusters without members keep their centroid.
    /// A full recompute is O(len·dim), parallel over clusters on the host, or runs on the
    /// device on the device path; a partial one (phase B's two clusters) stays on the host.
    pub fn update_centroids(&mut self, cinds: Option<&[u32]>) -> Result<()> {
        if cinds.is_none() && self.device.is_some() {
            return self.update_centroids_on_device();
        }
        let d = self.dim;
        let (bank, members) = (&self.bank, &self.members);
        let mean_into = |c: usize, out: &mut [f32]| {
            if members[c].is_empty() {
                return;
            }
            // ascending slot order makes the f64 sum independent of the operation history,
            // so a memory restored from a checkpoint computes bit-identical centroids
            let mut m = members[c].clone();
            m.sort_unstable();
            let mut acc = vec![0f64; d];
            for &s in &m {
                for (a, &x) in acc
                    .iter_mut()
                    .zip(&bank[s as usize * d..(s as usize + 1) * d])
                {
                    *a += x as f64;
                }
            }
            let n = m.len() as f64;
            for (o, a) in out.iter_mut().zip(acc) {
                *o = (a / n) as f32;
            }
        };
        match cinds {
            None => self
                .centroids
                .par_chunks_mut(d)
                .enumerate()
                .for_each(|(c, out)| mean_into(c, out)),
            Some(ids) => {
                if let Some(&label) = ids.iter().find(|&&c| c as usize >= self.k) {
                    return Err(OdcError::LabelOutOfRange {
                        what: "cinds",
                        label,
                        k: self.k,
                    });
                }
                for &c in ids {
                    let c = c as usize;
                    mean_into(c, &mut self.centroids[c * d..(c + 1) * d]);
                }
                for &c in ids {
                    self.mark_centroid(c);
                }
                return Ok(());
            }
        }
        self.mark_centroids_all();
        Ok(())
    }

    /// Class weights `(n_c + eps)^(−power)` normalised to sum 1, from the incremental sizes.
    pub fn class_weights(&self, eps: f64, power: f64) -> Vec<f32> {
        let sizes: Vec<usize> = self.sizes();
        super::loss::class_weights(&sizes, eps, power)
    }

    /// [`Self::class_weights`] with the OpenSelfSup defaults (eps 1e-5, power 0.5).
    pub fn default_class_weights(&self) -> Vec<f32> {
        self.class_weights(WEIGHT_EPS, WEIGHT_POWER)
    }

    /// Labels of unseen samples: argmax of the raw dot product between `normalise(feat)` and
    /// the unnormalised centroids (ties: lowest id), as a relabel would give.
    pub fn nearest_centroid(&self, feats: &[f32]) -> Result<Vec<u32>> {
        let d = self.dim;
        check_rows("feats", feats, d)?;
        check_finite("feats", feats, d)?;
        let mut rows = vec![0f32; feats.len()];
        rows.par_chunks_mut(d)
            .zip(feats.par_chunks(d))
            .for_each(|(o, f)| normalise_into(f, o));
        Ok(self
            .nearest_rows(&rows, None)?
            .into_iter()
            .map(|l| l.unwrap_or(0))
            .collect())
    }

    /// [`Self::nearest_centroid`] without a memory: the labels `feats` get from the `k`
    /// centroids `centroids` (k × dim, as saved with a checkpoint), by the same rule.
    pub fn nearest_of(centroids: &[f32], k: usize, dim: usize, feats: &[f32]) -> Result<Vec<u32>> {
        if centroids.len() != k * dim || k == 0 {
            return Err(OdcError::LengthMismatch {
                what: "centroids",
                expected: k.max(1) * dim,
                got: centroids.len(),
            });
        }
        check_rows("feats", feats, dim)?;
        check_finite("feats", feats, dim)?;
        let mut rows = vec![0f32; feats.len()];
        rows.par_chunks_mut(dim)
            .zip(feats.par_chunks(dim))
            .for_each(|(o, f)| normalise_into(f, o));
        Ok(nearest_by_dot(&rows, dim, centroids, k, None)
            .into_iter()
            .map(|l| l.unwrap_or(0))
            .collect())
    }

    /// Empties an occupied slot (bank row zeroed) and returns its label. Centroids are not
    /// touched: like the reference, they follow the memory only at the next recompute.
    pub fn remove(&mut self, slot: u32) -> Result<u32> {
        self.check_slot(slot)?;
        if !self.occupied[slot as usize] {
            return Err(OdcError::SlotEmpty { slot });
        }
        let label = self.labels[slot as usize];
        self.detach(slot);
        let s = slot as usize * self.dim;
        self.bank[s..s + self.dim].fill(0.0);
        self.mark_bank_row(slot);
        Ok(label)
    }

    /// Fills an empty slot with `row` (stored as given; the caller normalises) and `label`.
    pub fn insert(&mut self, slot: u32, row: &[f32], label: u32) -> Result<()> {
        self.check_slot(slot)?;
        if self.occupied[slot as usize] {
            return Err(OdcError::SlotOccupied { slot });
        }
        if row.len() != self.dim {
            return Err(OdcError::LengthMismatch {
                what: "row",
                expected: self.dim,
                got: row.len(),
            });
        }
        check_finite("row", row, self.dim)?;
        if label as usize >= self.k {
            return Err(OdcError::LabelOutOfRange {
                what: "label",
                label,
                k: self.k,
            });
        }
        let s = slot as usize * self.dim;
        self.bank[s..s + self.dim].copy_from_slice(row);
        self.mark_bank_row(slot);
        self.attach(slot, label);
        Ok(())
    }

    /// Members of a cluster in ascending slot order (the order every reference rule uses).
    fn sorted_members(&self, cluster: u32) -> Vec<u32> {
        let mut m = self.members[cluster as usize].clone();
        m.sort_unstable();
        m
    }

    /// README §2 `deal_with_small_clusters`: empty every cluster with fewer than
    /// `min_cluster` members (phase A: each member moves to the allowed centroid with the
    /// largest dot product with its bank row), then re-seed each emptied id by splitting the
    /// current largest cluster with [`two_means`] (phase B) and recomputing both centroids.
    ///
    /// Edge cases the reference does not cover: when every cluster is small nothing is changed
    /// ([`SmallClusterOutcome::NoAllowedTarget`]); when the largest cluster has fewer than 2
    /// members phase B stops and the remaining ids stay empty
    /// ([`SmallClusterOutcome::TooFewToSplit`]).
    pub fn deal_with_small_clusters(&mut self, min_cluster: usize) -> Result<SmallClusterReport> {
        let small_ids: Vec<u32> = (0..self.k as u32)
            .filter(|&c| self.members[c as usize].len() < min_cluster)
            .collect();
        let mut report = SmallClusterReport {
            small_ids,
            phase_a_moves: Vec::new(),
            splits: Vec::new(),
            outcome: SmallClusterOutcome::NothingToDo,
        };
        if report.small_ids.is_empty() {
            return Ok(report);
        }
        if report.small_ids.len() == self.k {
            report.outcome = SmallClusterOutcome::NoAllowedTarget;
            return Ok(report);
        }
        let d = self.dim;
        let mut allowed = vec![true; self.k];
        for &s in &report.small_ids {
            allowed[s as usize] = false;
        }

        // Phase A. Centroids do not change during it, so all targets can be scored at once.
        let movers: Vec<u32> = report
            .small_ids
            .iter()
            .flat_map(|&s| self.sorted_members(s))
            .collect();
        let mut rows = Vec::with_capacity(movers.len() * d);
        for &slot in &movers {
            rows.extend_from_slice(self.row_unchecked(slot));
        }
        let targets = self.nearest_rows(&rows, Some(&allowed))?;
        for (&slot, t) in movers.iter().zip(targets) {
            // allowed is non-empty, so a target always exists
            let t = t.unwrap_or(0);
            self.set_label(slot, t);
            report.phase_a_moves.push([slot, t]);
        }

        // Phase B.
        for (i, &e) in report.small_ids.iter().enumerate() {
            let mut big = 0usize;
            for c in 1..self.k {
                if self.members[c].len() > self.members[big].len() {
                    big = c;
                }
            }
            let big_size = self.members[big].len();
            if big_size < 2 {
                report.outcome = SmallClusterOutcome::TooFewToSplit {
                    unfilled: report.small_ids[i..].to_vec(),
                };
                return Ok(report);
            }
            let slots = self.sorted_members(big as u32);
            let split = {
                let bank = &self.bank;
                let slots = &slots;
                two_means(big_size, d, move |j| {
                    let s = slots[j] as usize * d;
                    &bank[s..s + d]
                })?
            };
            let mut moved = 0usize;
            for (&slot, &second) in slots.iter().zip(&split.part) {
                if second {
                    self.set_label(slot, e);
                    moved += 1;
                }
            }
            self.update_centroids(Some(&[big as u32, e]))?;
            report.splits.push(SplitRecord {
                empty_id: e,
                big: big as u32,
                big_size,
                moved,
                fallback: split.fallback,
                rounds: split.rounds,
                seed_row: split.seed_row,
            });
        }
        report.outcome = SmallClusterOutcome::Done;
        Ok(report)
    }

    /// Scores `rows` (r × dim) against the centroids; exposed for benches and diagnostics.
    pub fn centroid_scores(&self, rows: &[f32], out: &mut [f32]) -> Result<()> {
        let r = check_rows("rows", rows, self.dim)?;
        if out.len() != r * self.k {
            return Err(OdcError::LengthMismatch {
                what: "scores",
                expected: r * self.k,
                got: out.len(),
            });
        }
        matmul_abt(rows, r, &self.centroids, self.k, self.dim, out, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Naive model: a label per slot (None = empty); sizes and members by full scans.
    struct Naive {
        labels: Vec<Option<u32>>,
        k: usize,
    }

    impl Naive {
        fn sizes(&self) -> Vec<usize> {
            let mut s = vec![0; self.k];
            for l in self.labels.iter().flatten() {
                s[*l as usize] += 1;
            }
            s
        }
        fn members(&self, c: u32) -> Vec<u32> {
            (0..self.labels.len() as u32)
                .filter(|&s| self.labels[s as usize] == Some(c))
                .collect()
        }
    }

    fn assert_consistent(mem: &OdcMemory, naive: &Naive, when: &str) {
        assert_eq!(mem.sizes(), naive.sizes(), "{when}: sizes");
        for c in 0..naive.k as u32 {
            let mut m = mem.members(c).to_vec();
            m.sort_unstable();
            assert_eq!(m, naive.members(c), "{when}: members of {c}");
            for (p, &s) in mem.members(c).iter().enumerate() {
                assert_eq!(mem.pos[s as usize] as usize, p, "{when}: pos of slot {s}");
            }
        }
        assert_eq!(
            mem.len(),
            naive.labels.iter().flatten().count(),
            "{when}: len"
        );
        for (s, l) in naive.labels.iter().enumerate() {
            assert_eq!(mem.label(s as u32), *l, "{when}: label of {s}");
        }
    }

    fn random_row(rng: &mut ChaCha8Rng, d: usize) -> Vec<f32> {
        (0..d).map(|_| rng.random_range(0.0f32..1.0)).collect()
    }

    #[test]
    fn incremental_sizes_match_a_recount_after_random_operations() {
        let (cap, d, k) = (60usize, 4usize, 5usize);
        for seed in 0..20u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut mem = OdcMemory::new(cap, d, k).unwrap();
            let n0 = rng.random_range(10..cap);
            let feats: Vec<f32> = (0..n0).flat_map(|_| random_row(&mut rng, d)).collect();
            let labels: Vec<u32> = (0..n0).map(|_| rng.random_range(0..k as u32)).collect();
            mem.init_memory(&feats, &labels).unwrap();
            let mut naive = Naive {
                labels: (0..cap).map(|s| labels.get(s).copied()).collect(),
                k,
            };
            assert_consistent(&mem, &naive, "init");
            for op in 0..200 {
                let when = format!("seed {seed} op {op}");
                let occupied: Vec<u32> = (0..cap as u32)
                    .filter(|&s| naive.labels[s as usize].is_some())
                    .collect();
                let empty: Vec<u32> = (0..cap as u32)
                    .filter(|&s| naive.labels[s as usize].is_none())
                    .collect();
                match rng.random_range(0..5) {
                    0 if !occupied.is_empty() => {
                        let s = occupied[rng.random_range(0..occupied.len())];
                        let l = mem.remove(s).unwrap();
                        assert_eq!(Some(l), naive.labels[s as usize].take());
                    }
                    1 if !empty.is_empty() => {
                        let s = empty[rng.random_range(0..empty.len())];
                        let l = rng.random_range(0..k as u32);
                        mem.insert(s, &random_row(&mut rng, d), l).unwrap();
                        naive.labels[s as usize] = Some(l);
                    }
                    2 if !occupied.is_empty() => {
                        // batch with repeats: last copy's label wins
                        let b = rng.random_range(1..8);
                        let slots: Vec<u32> = (0..b)
                            .map(|_| occupied[rng.random_range(0..occupied.len())])
                            .collect();
                        let f: Vec<f32> = (0..b).flat_map(|_| random_row(&mut rng, d)).collect();
                        let up = mem.update_samples(&slots, &f, 0.5).unwrap();
                        for (s, l) in slots.iter().zip(&up.labels) {
                            naive.labels[*s as usize] = Some(*l);
                        }
                    }
                    3 => {
                        let min = rng.random_range(0..(2 * cap / k));
                        let before = naive.labels.iter().flatten().count();
                        let r = mem.deal_with_small_clusters(min).unwrap();
                        for [s, t] in &r.phase_a_moves {
                            naive.labels[*s as usize] = Some(*t);
                        }
                        // replay splits on the naive model: the moved members are exactly
                        // those now labelled empty_id
                        for sp in &r.splits {
                            for s in 0..cap {
                                if mem.label(s as u32) == Some(sp.empty_id) {
                                    naive.labels[s] = Some(sp.empty_id);
                                }
                            }
                        }
                        assert_eq!(naive.labels.iter().flatten().count(), before);
                        if r.outcome == SmallClusterOutcome::Done {
                            assert!(mem.sizes().iter().all(|&s| s > 0), "{when}: empty left");
                        }
                    }
                    _ => mem.update_centroids(None).unwrap(),
                }
                assert_consistent(&mem, &naive, &when);
            }
        }
    }

    #[test]
    fn every_cluster_small_changes_nothing() {
        let mut mem = OdcMemory::from_parts(
            2,
            3,
            vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            &[0, 1, 2],
            vec![0.0; 6],
        )
        .unwrap();
        let r = mem.deal_with_small_clusters(5).unwrap();
        assert_eq!(r.outcome, SmallClusterOutcome::NoAllowedTarget);
        assert_eq!(r.small_ids, vec![0, 1, 2]);
        assert!(r.phase_a_moves.is_empty() && r.splits.is_empty());
        assert_eq!(mem.sizes(), vec![1, 1, 1]);
    }

    #[test]
    fn largest_cluster_too_small_to_split_is_reported() {
        // one member in cluster 0, clusters 1 and 2 empty, min_cluster 1
        let mut mem = OdcMemory::from_parts(2, 3, vec![1.0, 0.0], &[0], vec![0.5; 6]).unwrap();
        let r = mem.deal_with_small_clusters(1).unwrap();
        assert_eq!(r.small_ids, vec![1, 2]);
        assert_eq!(
            r.outcome,
            SmallClusterOutcome::TooFewToSplit {
                unfilled: vec![1, 2]
            }
        );
        assert_eq!(mem.sizes(), vec![1, 0, 0]);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let mut mem = OdcMemory::new(4, 2, 2).unwrap();
        assert!(matches!(
            mem.init_memory(&[1.0, f32::NAN, 0.0, 1.0], &[0, 1]),
            Err(OdcError::NonFinite { row: 0, .. })
        ));
        assert!(mem.init_memory(&[1.0, 0.0, 0.0], &[0]).is_err(), "ragged");
        assert!(mem.init_memory(&[1.0, 0.0], &[2]).is_err(), "label ≥ k");
        assert!(
            mem.init_memory(&[1.0; 10], &[0; 5]).is_err(),
            "over capacity"
        );
        mem.init_memory(&[1.0, 0.0, 0.0, 1.0], &[0, 1]).unwrap();
        assert!(matches!(
            mem.update_samples(&[3], &[1.0, 0.0], 0.5),
            Err(OdcError::SlotEmpty { slot: 3 })
        ));
        assert!(mem.update_samples(&[9], &[1.0, 0.0], 0.5).is_err());
        assert!(mem
            .update_samples(&[0], &[f32::INFINITY, 0.0], 0.5)
            .is_err());
        assert!(mem.update_samples(&[0], &[1.0, 0.0], 1.5).is_err());
        assert!(mem.update_samples(&[0, 1], &[1.0, 0.0], 0.5).is_err());
        assert!(mem.insert(0, &[1.0, 0.0], 0).is_err(), "occupied");
        assert!(mem.insert(2, &[1.0], 0).is_err(), "short row");
        assert!(mem.insert(2, &[1.0, 0.0], 7).is_err(), "label ≥ k");
        assert!(mem.remove(3).is_err(), "empty");
        assert!(mem.update_centroids(Some(&[5])).is_err());
        assert!(mem.nearest_centroid(&[f32::NAN, 0.0]).is_err());
        assert!(OdcMemory::new(3, 0, 2).is_err());
    }

    #[test]
    fn nearest_centroid_uses_raw_dot_product_and_lowest_id_on_ties() {
        // centroid 1 is longer: raw dot product prefers it although cosine would tie
        let mem = OdcMemory::from_parts(
            2,
            3,
            vec![1.0, 0.0],
            &[0],
            vec![1.0, 0.0, 2.0, 0.0, 2.0, 0.0],
        )
        .unwrap();
        assert_eq!(
            mem.nearest_centroid(&[3.0, 0.0, 0.0, 0.0]).unwrap(),
            vec![1, 0]
        );
    }
}
