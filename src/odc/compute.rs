//! Where the memory's heavy work runs: host kernels on f32 slices, or candle tensors on a
//! device (the training GPU; candle's CPU device exercises the same code in tests).
//!
//! The device path keeps the memory's exact semantics:
//! - **argmax, lowest index on ties.** candle's own `argmax` does not promise the lowest index
//!   on CUDA (its block reduction keeps whichever thread's candidate wins the tree), so
//!   [`first_argmax`] takes the row maximum, marks the entries equal to it and keeps the
//!   smallest marked index: the host's strict-`>` scan, whatever the reduction order.
//! - **f64 means.** Cluster sums are accumulated in f64 ([`cluster_sums`]) and rounded to f32
//!   once, as the host does. Only the summation order differs (blocks of [`SUM_BLOCK`] rows,
//!   then blocks of blocks), which moves an f64 sum of unit-length rows by ~1e-16 relative:
//!   the f32 mean comes out equal, or 1 ulp apart in rare rounding-boundary cases.
//! - **f32 dot products.** A relabel scores with an f32 GEMM on both paths; the summation
//!   order differs (cuBLAS, or candle's CPU GEMM, against the host `gemm` call), so scores
//!   differ by a few f32 ulps. Only a near tie (two centroids within ~1e-6 of each other for
//!   one row) can then resolve differently; the conformance vectors keep every decision at
//!   least 1e-4 apart (their README §3), so both paths reproduce them exactly.

use super::OdcError;
use candle_core::{DType, Device, Tensor};

/// Score-matrix elements (rows × K) per device product: bounds the device memory that a
/// relabel or an assignment pass holds at once (64 MiB of f32 scores plus a few same-sized
/// temporaries), whatever the number of rows.
pub(crate) const DEVICE_SCORE_ELEMS: usize = 1 << 24;

/// Rows summed together per gather when computing cluster sums on the device.
pub(crate) const SUM_BLOCK: usize = 64;

/// Gathered elements (rows × D) per device call in [`cluster_sums`]: 64 MiB of f32 rows,
/// 128 MiB once widened to f64.
const GATHER_ELEMS: usize = 1 << 24;

/// Where the ODC memory and the initial k-means do their heavy work: the relabel products,
/// the full centroid recompute and the k-means assignment/update passes.
#[derive(Debug, Clone, Default)]
pub enum MemoryCompute {
    /// Host kernels on f32 slices (`gemm` + rayon). The default, and the choice on CPU.
    #[default]
    Host,
    /// candle tensors on this device, with device-side mirrors of the centroids and the bank.
    /// On CUDA this is the training GPU; on `Device::Cpu` it tests the same path.
    Device(Device),
}

impl MemoryCompute {
    /// `train.kernels = "auto"`: host kernels when training on CPU, device kernels elsewhere.
    pub fn auto(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Host
        } else {
            Self::Device(device.clone())
        }
    }

    /// `train.kernels = "generic"`: the device (candle-tensor) path even on CPU.
    pub fn generic(device: &Device) -> Self {
        Self::Device(device.clone())
    }

    /// The device of the device path; `None` on the host path.
    pub fn device(&self) -> Option<&Device> {
        match self {
            Self::Host => None,
            Self::Device(d) => Some(d),
        }
    }

    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host)
    }
}

/// Wraps a candle error with the operation that failed.
pub(crate) fn device_error(what: &str, e: candle_core::Error) -> OdcError {
    OdcError::Device(format!("{what}: {e}"))
}

/// Per row of `scores` (r × k), the index of the largest entry, lowest index on ties, and that
/// largest value. Both are r-long device tensors (u32, and the scores' dtype).
pub(crate) fn first_argmax(scores: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, k) = scores.dims2()?;
    let dev = scores.device();
    let max = scores.max_keepdim(1)?;
    let hit = scores.broadcast_eq(&max)?;
    let ids = Tensor::arange(0u32, k as u32, dev)?
        .unsqueeze(0)?
        .broadcast_as(scores.shape())?;
    let none = Tensor::full(k as u32, scores.shape(), dev)?;
    let idx = hit.where_cond(&ids, &none)?.min(1)?;
    Ok((idx, max.squeeze(1)?))
}

/// For every row of `rows` (r × d, host), the row of `centroids` (k × d, on the device) with
/// the largest raw dot product, restricted to `mask` when given (at least one entry must be
/// allowed). Chunked so the score matrix stays within [`DEVICE_SCORE_ELEMS`].
/// Moves r × d × 4 bytes up and r × 4 bytes down.
pub(crate) fn nearest_by_dot(
    rows: &[f32],
    d: usize,
    centroids: &Tensor,
    mask: Option<&[bool]>,
) -> candle_core::Result<Vec<u32>> {
    let r = rows.len().checked_div(d).unwrap_or(0);
    if r == 0 {
        return Ok(Vec::new());
    }
    let dev = centroids.device();
    let k = centroids.dim(0)?;
    let bias = match mask {
        Some(m) => {
            let b: Vec<f32> = m
                .iter()
                .map(|&ok| if ok { 0.0 } else { f32::NEG_INFINITY })
                .collect();
            Some(Tensor::from_vec(b, (1, k), dev)?)
        }
        None => None,
    };
    let x = Tensor::from_slice(rows, (r, d), dev)?;
    let ct = centroids.t()?;
    let chunk = (DEVICE_SCORE_ELEMS / k.max(1)).max(1);
    let mut parts = Vec::with_capacity(r.div_ceil(chunk));
    for start in (0..r).step_by(chunk) {
        let len = chunk.min(r - start);
        let mut s = x.narrow(0, start, len)?.matmul(&ct)?;
        if let Some(b) = &bias {
            s = s.broadcast_add(b)?;
        }
        parts.push(first_argmax(&s)?.0);
    }
    Tensor::cat(&parts, 0)?.to_vec1::<u32>()
}

/// The k-means assignment pass on the device: for every row of `data` (n × d), the centroid
/// with the smallest `‖c‖² − 2 x·c` (ties: lowest id) and the squared distance
/// `max(0, ‖x‖² + ‖c‖² − 2 x·c)`. `c_norms` (1 × k) are the squared centroid norms. The same
/// f32 arithmetic as the host: `2s − ‖c‖²` is exactly the negation of `‖c‖² − 2s`, so the
/// argmax of one is the argmin of the other. Chunked within [`DEVICE_SCORE_ELEMS`]; labels and
/// distances are gathered on the device and copied down once (n × 8 bytes).
pub(crate) fn assign_l2(
    data: &Tensor,
    centroids: &Tensor,
    c_norms: &Tensor,
) -> candle_core::Result<(Vec<u32>, Vec<f32>)> {
    let (n, _) = data.dims2()?;
    let k = centroids.dim(0)?;
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let ct = centroids.t()?;
    let chunk = (DEVICE_SCORE_ELEMS / k.max(1)).max(1);
    let (mut labels, mut dists) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let x = data.narrow(0, start, len)?;
        let s = x.matmul(&ct)?;
        let neg_dist = (&s + &s)?.broadcast_sub(c_norms)?;
        let (idx, best) = first_argmax(&neg_dist)?;
        let xn = x.sqr()?.sum(1)?;
        labels.push(idx);
        dists.push((xn - best)?.relu()?);
    }
    Ok((
        Tensor::cat(&labels, 0)?.to_vec1::<u32>()?,
        Tensor::cat(&dists, 0)?.to_vec1::<f32>()?,
    ))
}

/// Per-cluster f64 sums of rows of `src` ((n + 1) × d on the device, f32 or f64; its last row
/// must be zero: it pads short blocks). The rows of cluster c are `order[start[c]..start[c+1]]`
/// (CSR form, k = `start.len() − 1`). Returns k × d f64; a cluster without rows sums to zero.
///
/// GPU-friendly and deterministic: every cluster's rows are cut into blocks of `block`, one
/// gather + sum per batch of blocks gives one partial sum per block, and the partials are
/// reduced the same way until each cluster has one row. No atomics, no per-row loop. Moves
/// the row ids up once per level (about (n + k·block/2) × 4 bytes at the first level).
pub(crate) fn cluster_sums(
    src: &Tensor,
    order: &[u32],
    start: &[usize],
    block: usize,
) -> candle_core::Result<Tensor> {
    let dev = src.device().clone();
    let (rows_plus_pad, d) = src.dims2()?;
    let k = start.len().saturating_sub(1);
    let block = block.max(2);
    let mut src = src.clone();
    let mut pad = rows_plus_pad.saturating_sub(1) as u32;
    let mut order = order.to_vec();
    let mut start = start.to_vec();
    loop {
        let most = (0..k).map(|c| start[c + 1] - start[c]).max().unwrap_or(0);
        if most <= 1 {
            break;
        }
        let mut idx = Vec::with_capacity(order.len() + k * block);
        let mut next_start = vec![0usize; k + 1];
        for c in 0..k {
            let rows = &order[start[c]..start[c + 1]];
            for blk in rows.chunks(block) {
                idx.extend_from_slice(blk);
                idx.extend(std::iter::repeat_n(pad, block - blk.len()));
            }
            next_start[c + 1] = next_start[c] + rows.len().div_ceil(block);
        }
        let nblocks = next_start[k];
        let per_call = (GATHER_ELEMS / (block * d.max(1))).max(1);
        let mut parts = Vec::with_capacity(nblocks.div_ceil(per_call) + 1);
        for b0 in (0..nblocks).step_by(per_call) {
            let nb = per_call.min(nblocks - b0);
            let ids = Tensor::from_slice(&idx[b0 * block..(b0 + nb) * block], nb * block, &dev)?;
            let partial = src
                .index_select(&ids, 0)?
                .to_dtype(DType::F64)?
                .reshape((nb, block, d))?
                .sum(1)?;
            parts.push(partial);
        }
        parts.push(Tensor::zeros((1, d), DType::F64, &dev)?);
        src = Tensor::cat(&parts, 0)?;
        pad = nblocks as u32;
        order = (0..nblocks as u32).collect();
        start = next_start;
    }
    let last: Vec<u32> = (0..k)
        .map(|c| {
            if start[c + 1] > start[c] {
                order[start[c]]
            } else {
                pad
            }
        })
        .collect();
    src.index_select(&Tensor::from_vec(last, k, &dev)?, 0)?
        .to_dtype(DType::F64)
}

/// `sums / sizes` in f64, rounded to f32 once (k × d f32 on the device). A cluster of size 0
/// gets a zero row; callers that keep the old centroid there overwrite it.
pub(crate) fn cluster_means(sums: &Tensor, sizes: &[usize]) -> candle_core::Result<Tensor> {
    let k = sizes.len();
    let n: Vec<f64> = sizes.iter().map(|&s| s.max(1) as f64).collect();
    let n = Tensor::from_vec(n, (k, 1), sums.device())?;
    sums.broadcast_div(&n)?.to_dtype(DType::F32)
}

/// Upload of host rows into a device mirror, in chunks of rows so the temporary device
/// tensor stays within [`GATHER_ELEMS`]: a `(rows + pad_rows) × d` f32 tensor whose first
/// `rows` rows are `host` and the rest zero.
pub(crate) fn upload_rows(
    host: &[f32],
    d: usize,
    pad_rows: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let rows = host.len().checked_div(d).unwrap_or(0);
    let t = Tensor::zeros((rows + pad_rows, d), DType::F32, dev)?;
    let per = (GATHER_ELEMS / d.max(1)).max(1);
    for r0 in (0..rows).step_by(per) {
        let n = per.min(rows - r0);
        let part = Tensor::from_slice(&host[r0 * d..(r0 + n) * d], (n, d), dev)?;
        t.slice_set(&part, 0, r0)?;
    }
    Ok(t)
}

/// Overwrites rows `ids` (distinct, ascending) of the device mirror `t` (contiguous, rows × d)
/// with the same rows of `host`: `ids.len() × (d + 1) × 4` bytes up.
pub(crate) fn refresh_rows(
    t: &Tensor,
    host: &[f32],
    d: usize,
    ids: &[u32],
) -> candle_core::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let dev = t.device();
    let mut rows = Vec::with_capacity(ids.len() * d);
    for &i in ids {
        rows.extend_from_slice(&host[i as usize * d..(i as usize + 1) * d]);
    }
    let src = Tensor::from_vec(rows, (ids.len(), d), dev)?;
    let idx = Tensor::from_slice(ids, (ids.len(), 1), dev)?
        .broadcast_as((ids.len(), d))?
        .contiguous()?;
    t.scatter_set(&idx, &src, 0)
}

/// Rows of a device mirror that no longer match the host copy.
#[derive(Debug, Clone)]
pub(crate) struct DirtyRows {
    all: bool,
    flag: Vec<bool>,
    list: Vec<u32>,
}

impl DirtyRows {
    /// Every one of `rows` rows is stale (nothing uploaded yet).
    pub(crate) fn all(rows: usize) -> Self {
        Self {
            all: true,
            flag: vec![false; rows],
            list: Vec::new(),
        }
    }
    /// Number of rows tracked.
    pub(crate) fn len(&self) -> usize {
        self.flag.len()
    }
    pub(crate) fn mark(&mut self, row: u32) {
        if self.all {
            return;
        }
        if let Some(f) = self.flag.get_mut(row as usize) {
            if !*f {
                *f = true;
                self.list.push(row);
            }
        }
    }
    pub(crate) fn mark_all(&mut self) {
        self.clear();
        self.all = true;
    }
    pub(crate) fn clear(&mut self) {
        for &r in &self.list {
            self.flag[r as usize] = false;
        }
        self.list.clear();
        self.all = false;
    }
    /// Whether a whole upload is due: everything is stale, or more than a quarter of the rows
    /// (one bulk copy then beats a scatter of that many rows).
    pub(crate) fn wants_full(&self) -> bool {
        self.all || self.list.len() * 4 > self.flag.len()
    }
    /// Stale rows, ascending.
    pub(crate) fn sorted(&self) -> Vec<u32> {
        let mut v = self.list.clone();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn first_argmax_keeps_the_lowest_index_on_ties_and_respects_the_mask() {
        let dev = Device::Cpu;
        let s = Tensor::from_vec(
            vec![
                0.5f32, 2.0, 1.0, 2.0, /**/ 3.0, 3.0, 3.0, 3.0, /**/ -1.0, -2.0, -3.0,
                -0.5,
            ],
            (3, 4),
            &dev,
        )
        .unwrap();
        let (idx, max) = first_argmax(&s).unwrap();
        assert_eq!(idx.to_vec1::<u32>().unwrap(), vec![1, 0, 3]);
        assert_eq!(max.to_vec1::<f32>().unwrap(), vec![2.0, 3.0, -0.5]);

        // centroid 1 wins the raw dot product, but is masked out; 0 and 2 tie -> 0
        let c = Tensor::from_vec(vec![1.0f32, 0.0, 2.0, 0.0, 1.0, 0.0], (3, 2), &dev).unwrap();
        let rows = [1.0f32, 0.0];
        assert_eq!(nearest_by_dot(&rows, 2, &c, None).unwrap(), vec![1]);
        assert_eq!(
            nearest_by_dot(&rows, 2, &c, Some(&[true, false, true])).unwrap(),
            vec![0]
        );
    }

    /// Host reference: f64 sums in ascending row order.
    fn host_sums(data: &[f32], d: usize, order: &[u32], start: &[usize]) -> Vec<f64> {
        let k = start.len() - 1;
        let mut out = vec![0f64; k * d];
        for c in 0..k {
            for &r in &order[start[c]..start[c + 1]] {
                for j in 0..d {
                    out[c * d + j] += data[r as usize * d + j] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn cluster_sums_match_ascending_f64_sums_over_several_block_levels() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, d, k) = (500usize, 5usize, 7usize);
        let data: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        // cluster 4 empty, cluster 0 large (several levels with block 4), cluster 6 single
        let labels: Vec<u32> = (0..n)
            .map(|i| match i {
                0 => 6,
                _ if i % 3 == 0 => 0,
                _ => [1, 2, 3, 5][rng.random_range(0..4)],
            })
            .collect();
        let mut sizes = vec![0usize; k];
        for &l in &labels {
            sizes[l as usize] += 1;
        }
        let mut start = vec![0usize; k + 1];
        for c in 0..k {
            start[c + 1] = start[c] + sizes[c];
        }
        let mut fill = start.clone();
        let mut order = vec![0u32; n];
        for (i, &l) in labels.iter().enumerate() {
            order[fill[l as usize]] = i as u32;
            fill[l as usize] += 1;
        }
        let want = host_sums(&data, d, &order, &start);
        let src = upload_rows(&data, d, 1, &Device::Cpu).unwrap();
        for block in [2usize, 4, 64] {
            let got = cluster_sums(&src, &order, &start, block)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                // f64 sums of ≤ 500 values in [-1, 1]: order changes only the last bits
                assert!((g - w).abs() <= 1e-12, "block {block}: {g} vs {w}");
            }
            let means = cluster_means(
                &Tensor::from_vec(got, (k, d), &Device::Cpu).unwrap(),
                &sizes,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            for c in 0..k {
                for j in 0..d {
                    let host = if sizes[c] == 0 {
                        0.0
                    } else {
                        (want[c * d + j] / sizes[c] as f64) as f32
                    };
                    assert_eq!(means[c * d + j], host, "block {block} mean [{c}][{j}]");
                }
            }
        }
    }

    #[test]
    fn refresh_rows_overwrites_only_the_named_rows() {
        let dev = Device::Cpu;
        let d = 3;
        let mut host: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let t = upload_rows(&host, d, 1, &dev).unwrap();
        host[3..6].copy_from_slice(&[-1.0, -2.0, -3.0]);
        host[9..12].copy_from_slice(&[7.5, 7.5, 7.5]);
        refresh_rows(&t, &host, d, &[1, 3]).unwrap();
        let mut want = host.clone();
        want.extend([0.0; 3]);
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}
