//! Runs every ODC conformance vector in `shared/conformance/odc/vectors` against `odcd::odc`
//! (README there, §2–4). Labels, counts and split records must match exactly; floats within
//! the tolerances written in each file.
//!
//! Every vector runs twice: on the host kernels and on the device path (candle tensors on
//! candle's CPU device, what `train.kernels = "generic"` selects on CPU and what runs on a GPU).
//! The device path scores in f32 with another summation order and sums centroids in f64 in
//! another order. Whether that can flip a decision: the vectors keep every relabel and phase-A
//! decision at least 1.75e-4 apart (`min_decision_margin`: relabel 3.3e-4 in case 08, 3.9e-4
//! in 02; phase A 1.75e-4 in 08) with no exact ties of those kinds, while reordering an f32 dot
//! product of length D ≤ 16 over unit-length rows moves it by at most ~16 ulps ≈ 1e-6, and the
//! f64 centroid sums move by ~1e-16 relative. So the vectors are not sensitive to the order:
//! both paths must reproduce them exactly, with the same tolerances. The 2-means (the only
//! decisions with exact ties, cases 06 and 07) runs on the host on both paths.

use candle_core::Device;
use odcd::odc::{
    class_weights, two_means, weighted_cross_entropy, EvictionPolicy, MemoryCompute, MinCluster,
    OdcMemory, SmallClusterReport, StreamConfig, StreamingMemory,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/conformance/odc/vectors"
);

type Check = Result<(), String>;

struct Tol {
    f32_abs: f64,
    weights_rel: f64,
    ce_abs: f64,
    checksum_abs: f64,
}

impl Tol {
    fn of(v: &Value) -> Result<Tol, String> {
        let t = &v["tolerance"];
        let g = |k: &str| t[k].as_f64().ok_or(format!("tolerance.{k} missing"));
        if t["labels_and_counts"].as_str() != Some("exact") {
            return Err("tolerance.labels_and_counts is not \"exact\"".into());
        }
        Ok(Tol {
            f32_abs: g("float32_abs")?,
            weights_rel: g("weights_rel")?,
            ce_abs: g("cross_entropy_abs")?,
            checksum_abs: g("checksum_abs")?,
        })
    }
}

fn field<'a>(v: &'a Value, path: &str) -> Result<&'a Value, String> {
    let mut cur = v;
    for p in path.split('.') {
        cur = cur.get(p).ok_or(format!("field {path} missing"))?;
    }
    Ok(cur)
}

fn f64s(v: &Value, what: &str) -> Result<Vec<f64>, String> {
    let arr = v.as_array().ok_or(format!("{what}: not an array"))?;
    let mut out = Vec::new();
    for x in arr {
        match x.as_array() {
            Some(row) => {
                for y in row {
                    out.push(y.as_f64().ok_or(format!("{what}: not a number"))?);
                }
            }
            None => out.push(x.as_f64().ok_or(format!("{what}: not a number"))?),
        }
    }
    Ok(out)
}

fn f32s(v: &Value, what: &str) -> Result<Vec<f32>, String> {
    Ok(f64s(v, what)?.into_iter().map(|x| x as f32).collect())
}

fn u32s(v: &Value, what: &str) -> Result<Vec<u32>, String> {
    v.as_array()
        .ok_or(format!("{what}: not an array"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|u| u as u32)
                .ok_or(format!("{what}: not an unsigned integer"))
        })
        .collect()
}

fn num(v: &Value, what: &str) -> Result<f64, String> {
    v.as_f64().ok_or(format!("{what}: not a number"))
}

fn exact<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Check {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} vs expected {}",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => Err(format!(
            "{what}[{i}]: got {:?}, expected {:?}",
            got[i], want[i]
        )),
        None => Ok(()),
    }
}

fn close(what: &str, got: &[f64], want: &[f64], abs: f64) -> Check {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} vs expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        // written so that NaN fails
        let within = (a - b).abs() <= abs;
        if !within {
            return Err(format!(
                "{what}[{i}]: got {a}, expected {b} (abs tol {abs})"
            ));
        }
    }
    Ok(())
}

fn close32(what: &str, got: &[f32], want: &Value, abs: f64) -> Check {
    let g: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    close(what, &g, &f64s(want, what)?, abs)
}

fn close_rel(what: &str, got: &[f32], want: &Value, rel: f64) -> Check {
    let want = f64s(want, what)?;
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} vs expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
        let within = (a as f64 - b).abs() <= rel * b.abs();
        if !within {
            return Err(format!(
                "{what}[{i}]: got {a}, expected {b} (rel tol {rel})"
            ));
        }
    }
    Ok(())
}

fn usizes_as_u32(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

fn params(v: &Value, key: &str) -> Result<usize, String> {
    v["params"][key]
        .as_u64()
        .map(|x| x as usize)
        .ok_or(format!("params.{key} missing"))
}

/// `sum` and `checksum` of README §4 ("Checksums"), in f64.
/// For a row-major array, (r·cols + c) mod 7 is the flat index mod 7.
fn checksums(a: &[f32]) -> (f64, f64) {
    let mut sum = 0f64;
    let mut chk = 0f64;
    for (i, &x) in a.iter().enumerate() {
        sum += x as f64;
        chk += x as f64 * ((i % 7) + 1) as f64;
    }
    (sum, chk)
}

fn memory_from_input(v: &Value, compute: &MemoryCompute) -> Result<OdcMemory, String> {
    let (d, k) = (params(v, "d")?, params(v, "k")?);
    let mut mem = OdcMemory::from_parts(
        d,
        k,
        f32s(field(v, "input.bank")?, "input.bank")?,
        &u32s(field(v, "input.labels")?, "input.labels")?,
        f32s(field(v, "input.centroids")?, "input.centroids")?,
    )
    .map_err(|e| e.to_string())?;
    mem.set_compute(compute);
    Ok(mem)
}

fn op_init_memory(v: &Value, tol: &Tol, compute: &MemoryCompute) -> Check {
    let (d, k) = (params(v, "d")?, params(v, "k")?);
    let feats = f32s(field(v, "input.features")?, "features")?;
    let labels = u32s(field(v, "input.labels")?, "labels")?;
    let mut mem = OdcMemory::new(labels.len(), d, k).map_err(|e| e.to_string())?;
    mem.set_compute(compute);
    mem.init_memory(&feats, &labels)
        .map_err(|e| e.to_string())?;
    close32("bank", mem.bank(), field(v, "expected.bank")?, tol.f32_abs)?;
    close32(
        "centroids",
        mem.centroids(),
        field(v, "expected.centroids")?,
        tol.f32_abs,
    )?;
    exact(
        "sizes",
        &usizes_as_u32(&mem.sizes()),
        &u32s(field(v, "expected.sizes")?, "sizes")?,
    )
}

fn op_update_samples(v: &Value, tol: &Tol, compute: &MemoryCompute) -> Check {
    let mut mem = memory_from_input(v, compute)?;
    let momentum = num(&v["params"]["momentum"], "params.momentum")?;
    let idx = u32s(field(v, "input.batch_idx")?, "batch_idx")?;
    let feats = f32s(field(v, "input.batch_features")?, "batch_features")?;
    let up = mem
        .update_samples(&idx, &feats, momentum)
        .map_err(|e| e.to_string())?;
    let e = field(v, "expected")?;
    close32("batch_rows", &up.rows, &e["batch_rows"], tol.f32_abs)?;
    exact(
        "batch_labels",
        &up.labels,
        &u32s(&e["batch_labels"], "batch_labels")?,
    )?;
    exact(
        "change_count",
        &[up.change_count as u64],
        &[e["change_count"].as_u64().unwrap_or(u64::MAX)],
    )?;
    close(
        "change_ratio",
        &[up.change_ratio],
        &[num(&e["change_ratio"], "change_ratio")?],
        1e-12,
    )?;
    close32("bank", mem.bank(), &e["bank"], tol.f32_abs)?;
    exact("labels", mem.labels(), &u32s(&e["labels"], "labels")?)
}

fn op_update_centroids(v: &Value, tol: &Tol, compute: &MemoryCompute) -> Check {
    let e = field(v, "expected")?;
    let mut full = memory_from_input(v, compute)?;
    full.update_centroids(None).map_err(|e| e.to_string())?;
    close32(
        "centroids_full",
        full.centroids(),
        &e["centroids_full"],
        tol.f32_abs,
    )?;
    let mut part = memory_from_input(v, compute)?;
    let cinds = u32s(field(v, "input.cinds")?, "cinds")?;
    part.update_centroids(Some(&cinds))
        .map_err(|e| e.to_string())?;
    close32(
        "centroids_partial",
        part.centroids(),
        &e["centroids_partial"],
        tol.f32_abs,
    )?;
    let sizes = full.sizes();
    exact(
        "sizes",
        &usizes_as_u32(&sizes),
        &u32s(&e["sizes"], "sizes")?,
    )?;
    let empty: Vec<u32> = (0..sizes.len() as u32)
        .filter(|&c| sizes[c as usize] == 0)
        .collect();
    exact(
        "empty_clusters",
        &empty,
        &u32s(&e["empty_clusters"], "empty_clusters")?,
    )
}

fn op_reweight_ce(v: &Value, tol: &Tol, compute: &MemoryCompute) -> Check {
    let k = params(v, "k")?;
    let eps = num(&v["params"]["eps"], "params.eps")?;
    let power = num(&v["params"]["power"], "params.power")?;
    let labels = u32s(field(v, "input.labels")?, "labels")?;
    // sizes through the memory's incremental counts (zero features: only labels matter)
    let mut mem = OdcMemory::new(labels.len(), 1, k).map_err(|e| e.to_string())?;
    mem.set_compute(compute);
    mem.init_memory(&vec![0.0; labels.len()], &labels)
        .map_err(|e| e.to_string())?;
    let e = field(v, "expected")?;
    exact(
        "sizes",
        &usizes_as_u32(&mem.sizes()),
        &u32s(&e["sizes"], "sizes")?,
    )?;
    let w = mem.class_weights(eps, power);
    close_rel("weights", &w, &e["weights"], tol.weights_rel)?;
    close_rel(
        "weights (loss helper)",
        &class_weights(&mem.sizes(), eps, power),
        &e["weights"],
        tol.weights_rel,
    )?;
    let logits = f32s(field(v, "input.logits")?, "logits")?;
    let targets = u32s(field(v, "input.targets")?, "targets")?;
    let (ce, loss) = weighted_cross_entropy(&logits, &targets, &w).map_err(|e| e.to_string())?;
    close(
        "per_sample_ce",
        &ce,
        &f64s(&e["per_sample_ce"], "per_sample_ce")?,
        tol.ce_abs,
    )?;
    close("loss", &[loss], &[num(&e["loss"], "loss")?], tol.ce_abs)?;
    let unweighted = ce.iter().sum::<f64>() / ce.len() as f64;
    close(
        "unweighted_mean_ce",
        &[unweighted],
        &[num(&e["unweighted_mean_ce"], "unweighted_mean_ce")?],
        tol.ce_abs,
    )
}

fn check_splits(what: &str, r: &SmallClusterReport, want: &Value) -> Check {
    let want = want.as_array().ok_or(format!("{what}: not an array"))?;
    if r.splits.len() != want.len() {
        return Err(format!(
            "{what}: {} splits, expected {}",
            r.splits.len(),
            want.len()
        ));
    }
    for (i, (s, w)) in r.splits.iter().zip(want).enumerate() {
        let got = match w {
            // multistep form: [empty_id, big, big_size, moved, fallback]
            Value::Array(_) => vec![
                s.empty_id as u64,
                s.big as u64,
                s.big_size as u64,
                s.moved as u64,
                s.fallback as u64,
            ],
            _ => vec![
                s.empty_id as u64,
                s.big as u64,
                s.big_size as u64,
                s.moved as u64,
                s.fallback as u64,
                s.rounds as u64,
                s.seed_row as u64,
            ],
        };
        let expected: Vec<u64> = match w {
            Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap_or(u64::MAX)).collect(),
            _ => [
                "empty_id", "big", "big_size", "moved", "fallback", "rounds", "seed_row",
            ]
            .iter()
            .map(|k| match &w[*k] {
                Value::Bool(b) => *b as u64,
                x => x.as_u64().unwrap_or(u64::MAX),
            })
            .collect(),
        };
        exact(
            &format!("{what}[{i}] (empty_id, big, big_size, moved, fallback[, rounds, seed_row])"),
            &got,
            &expected,
        )?;
    }
    Ok(())
}

fn op_small_clusters(v: &Value, tol: &Tol, compute: &MemoryCompute) -> Check {
    let min_cluster = params(v, "min_cluster")?;
    let e = field(v, "expected")?;
    // phase A alone is not exposed; check it by re-running phase A's rule on the moves
    let mut mem = memory_from_input(v, compute)?;
    let r = mem
        .deal_with_small_clusters(min_cluster)
        .map_err(|e| e.to_string())?;
    exact(
        "small_ids",
        &r.small_ids,
        &u32s(&e["small_ids"], "small_ids")?,
    )?;
    let moves: Vec<[u32; 2]> = e["phase_a_moves"]
        .as_array()
        .ok_or("phase_a_moves: not an array")?
        .iter()
        .map(|m| {
            let m = u32s(m, "phase_a_moves")?;
            Ok([m[0], m[1]])
        })
        .collect::<Result<_, String>>()?;
    exact("phase_a_moves", &r.phase_a_moves, &moves)?;
    let mut after_a = u32s(field(v, "input.labels")?, "labels")?;
    for [s, t] in &r.phase_a_moves {
        after_a[*s as usize] = *t;
    }
    exact(
        "labels_after_phase_a",
        &after_a,
        &u32s(&e["labels_after_phase_a"], "labels_after_phase_a")?,
    )?;
    check_splits("splits", &r, &e["splits"])?;
    exact("labels", mem.labels(), &u32s(&e["labels"], "labels")?)?;
    close32("centroids", mem.centroids(), &e["centroids"], tol.f32_abs)?;
    exact(
        "sizes",
        &usizes_as_u32(&mem.sizes()),
        &u32s(&e["sizes"], "sizes")?,
    )
}

fn op_split_cluster(v: &Value, _tol: &Tol, _compute: &MemoryCompute) -> Check {
    let d = params(v, "d")?;
    let subs = field(v, "input.subcases")?
        .as_array()
        .ok_or("input.subcases")?;
    let want = field(v, "expected.subcases")?
        .as_array()
        .ok_or("expected.subcases")?;
    if subs.len() != want.len() {
        return Err("subcase count differs between input and expected".into());
    }
    for (i, (s, w)) in subs.iter().zip(want).enumerate() {
        let rows = f32s(&s["rows"], "rows")?;
        let n = rows.len() / d;
        let r = two_means(n, d, |j| &rows[j * d..(j + 1) * d]).map_err(|e| e.to_string())?;
        let label = s["label"].as_str().unwrap_or("?");
        let part: Vec<u32> = r.part.iter().map(|&p| p as u32).collect();
        exact(
            &format!("subcase {i} ({label}) part"),
            &part,
            &u32s(&w["part"], "part")?,
        )?;
        exact(
            &format!("subcase {i} ({label}) fallback"),
            &[r.fallback],
            &[w["fallback"].as_bool().ok_or("fallback")?],
        )?;
        exact(
            &format!("subcase {i} ({label}) rounds"),
            &[r.rounds as u64],
            &[w["rounds"].as_u64().ok_or("rounds")?],
        )?;
        exact(
            &format!("subcase {i} ({label}) seed_row"),
            &[r.seed_row as u64],
            &[w["seed_row"].as_u64().ok_or("seed_row")?],
        )?;
    }
    Ok(())
}

/// One multistep state snapshot to compare, whichever front end produced it.
struct Snapshot<'a> {
    mem: &'a OdcMemory,
    weights: &'a [f32],
}

fn check_state(prefix: &str, s: &Snapshot, e: &Value, tol: &Tol) -> Check {
    let f = |name: &str| format!("{prefix}{name}");
    exact(&f("labels"), s.mem.labels(), &u32s(&e["labels"], "labels")?)?;
    exact(
        &f("sizes"),
        &usizes_as_u32(&s.mem.sizes()),
        &u32s(&e["sizes"], "sizes")?,
    )?;
    if let Some(c) = e.get("centroids") {
        close32(&f("centroids"), s.mem.centroids(), c, tol.f32_abs)?;
    }
    if e.get("centroids_sum").is_some() {
        let (sum, chk) = checksums(s.mem.centroids());
        close(
            &f("centroids_sum"),
            &[sum],
            &[num(&e["centroids_sum"], "centroids_sum")?],
            tol.checksum_abs,
        )?;
        close(
            &f("centroids_checksum"),
            &[chk],
            &[num(&e["centroids_checksum"], "centroids_checksum")?],
            tol.checksum_abs,
        )?;
    }
    let (sum, chk) = checksums(s.mem.bank());
    close(
        &f("bank_sum"),
        &[sum],
        &[num(&e["bank_sum"], "bank_sum")?],
        tol.checksum_abs,
    )?;
    close(
        &f("bank_checksum"),
        &[chk],
        &[num(&e["bank_checksum"], "bank_checksum")?],
        tol.checksum_abs,
    )?;
    if let Some(idx) = e.get("bank_rows_idx") {
        let idx = u32s(idx, "bank_rows_idx")?;
        let mut rows = Vec::new();
        for &i in &idx {
            rows.extend_from_slice(s.mem.row(i).ok_or(format!("{prefix}slot {i} empty"))?);
        }
        close32(&f("bank_rows"), &rows, &e["bank_rows"], tol.f32_abs)?;
    }
    close_rel(&f("weights"), s.weights, &e["weights"], tol.weights_rel)
}

/// Case 08 through the slot memory and, separately, through the keyed streaming memory
/// (every key is already stored, so it must follow the reference path exactly).
fn op_multistep(v: &Value, tol: &Tol, compute: &MemoryCompute) -> Check {
    let (n, d, k) = (params(v, "n")?, params(v, "d")?, params(v, "k")?);
    let momentum = num(&v["params"]["momentum"], "momentum")?;
    let interval = params(v, "centroid_interval")? as u64;
    let min_cluster = params(v, "min_cluster")?;
    let eps = num(&v["params"]["eps"], "eps")?;
    let power = num(&v["params"]["power"], "power")?;
    let feats = f32s(field(v, "input.features")?, "features")?;
    let labels = u32s(field(v, "input.labels")?, "labels")?;
    let batches = field(v, "input.batches")?
        .as_array()
        .ok_or("input.batches")?;
    let steps = field(v, "expected.steps")?
        .as_array()
        .ok_or("expected.steps")?;
    if batches.len() != steps.len() {
        return Err("batches and expected steps differ in count".into());
    }

    // --- slot memory
    let mut mem = OdcMemory::new(n, d, k).map_err(|e| e.to_string())?;
    mem.set_compute(compute);
    mem.init_memory(&feats, &labels)
        .map_err(|e| e.to_string())?;
    let mut weights = mem.class_weights(eps, power);
    check_state(
        "start: ",
        &Snapshot {
            mem: &mem,
            weights: &weights,
        },
        field(v, "expected.start")?,
        tol,
    )?;

    // --- streaming memory over the same data, keys "s{i}"
    let keys: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let mut cfg = StreamConfig::new(n, d, k);
    cfg.eviction = EvictionPolicy::Fifo;
    cfg.min_cluster = MinCluster::Count(min_cluster);
    cfg.centroid_interval = interval;
    cfg.momentum = momentum;
    cfg.weight_eps = eps;
    cfg.weight_power = power;
    let mut stream = StreamingMemory::new(cfg).map_err(|e| e.to_string())?;
    stream.set_compute(compute);
    stream
        .init_from_clustering(&keys, &feats, &labels)
        .map_err(|e| e.to_string())?;

    for (step, (b, e)) in batches.iter().zip(steps).enumerate() {
        let at = |front: &str| format!("step {step} ({front}): ");
        let idx = u32s(&b["batch_idx"], "batch_idx")?;
        let bf = f32s(&b["batch_features"], "batch_features")?;
        if e["step"].as_u64() != Some(step as u64) {
            return Err(format!("{}expected.steps out of order", at("file")));
        }

        // slot memory, README step order
        let p = at("slot memory");
        let for_loss: Vec<u32> = idx.iter().map(|&i| mem.labels()[i as usize]).collect();
        exact(
            &format!("{p}labels_for_loss"),
            &for_loss,
            &u32s(&e["labels_for_loss"], "labels_for_loss")?,
        )?;
        close_rel(
            &format!("{p}weights_for_loss"),
            &weights,
            &e["weights_for_loss"],
            tol.weights_rel,
        )?;
        let up = mem
            .update_samples(&idx, &bf, momentum)
            .map_err(|er| format!("{p}{er}"))?;
        exact(
            &format!("{p}change_count"),
            &[up.change_count as u64],
            &[e["change_count"].as_u64().unwrap_or(u64::MAX)],
        )?;
        exact(
            &format!("{p}batch_labels"),
            &up.labels,
            &u32s(&e["batch_labels"], "batch_labels")?,
        )?;
        let recompute = (step as u64 + 1).is_multiple_of(interval);
        exact(
            &format!("{p}centroids_recomputed"),
            &[recompute],
            &[e["centroids_recomputed"]
                .as_bool()
                .ok_or("centroids_recomputed")?],
        )?;
        if recompute {
            mem.update_centroids(None)
                .map_err(|er| format!("{p}{er}"))?;
        }
        let r = mem
            .deal_with_small_clusters(min_cluster)
            .map_err(|er| format!("{p}{er}"))?;
        exact(
            &format!("{p}small_ids"),
            &r.small_ids,
            &u32s(&e["small_ids"], "small_ids")?,
        )?;
        check_splits(&format!("{p}splits"), &r, &e["splits"])?;
        weights = mem.class_weights(eps, power);
        check_state(
            &p,
            &Snapshot {
                mem: &mem,
                weights: &weights,
            },
            e,
            tol,
        )?;

        // streaming memory, trainer call order
        let p = at("streaming memory");
        let bkeys: Vec<String> = idx.iter().map(|&i| keys[i as usize].clone()).collect();
        let prep = stream
            .prepare(&bkeys, &bf)
            .map_err(|er| format!("{p}{er}"))?;
        exact(
            &format!("{p}labels_for_loss"),
            &prep.labels,
            &u32s(&e["labels_for_loss"], "labels_for_loss")?,
        )?;
        exact(&format!("{p}seen"), &prep.seen, &vec![true; idx.len()])?;
        close_rel(
            &format!("{p}weights_for_loss"),
            &prep.weights,
            &e["weights_for_loss"],
            tol.weights_rel,
        )?;
        let st = stream
            .update(&bkeys, &bf, &prep)
            .map_err(|er| format!("{p}{er}"))?;
        exact(
            &format!("{p}change_count"),
            &[st.change_count as u64],
            &[e["change_count"].as_u64().unwrap_or(u64::MAX)],
        )?;
        exact(
            &format!("{p}inserted/evicted"),
            &[st.inserted, st.evicted],
            &[0, 0],
        )?;
        let a = stream
            .after_step(step as u64)
            .map_err(|er| format!("{p}{er}"))?;
        exact(
            &format!("{p}centroids_recomputed"),
            &[a.centroids_recomputed],
            &[recompute],
        )?;
        exact(
            &format!("{p}small_ids"),
            &a.report.small_ids,
            &u32s(&e["small_ids"], "small_ids")?,
        )?;
        check_splits(&format!("{p}splits"), &a.report, &e["splits"])?;
        exact(&format!("{p}reseeded"), &a.reseeded, &r.reseeded_ids())?;
        check_state(
            &p,
            &Snapshot {
                mem: stream.memory(),
                weights: &a.weights,
            },
            e,
            tol,
        )?;
    }
    close32(
        "final_bank",
        mem.bank(),
        field(v, "expected.final_bank")?,
        tol.f32_abs,
    )?;
    close32(
        "final_bank (streaming)",
        stream.memory().bank(),
        field(v, "expected.final_bank")?,
        tol.f32_abs,
    )
}

fn run_file(path: &Path, compute: &MemoryCompute) -> Check {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read: {e}"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("parse: {e}"))?;
    let tol = Tol::of(&v)?;
    let op = v["op"].as_str().ok_or("field op missing")?;
    match op {
        "init_memory" => op_init_memory(&v, &tol, compute),
        "update_samples_memory" => op_update_samples(&v, &tol, compute),
        "update_centroids" => op_update_centroids(&v, &tol, compute),
        "class_weights+weighted_cross_entropy" => op_reweight_ce(&v, &tol, compute),
        "deal_with_small_clusters" => op_small_clusters(&v, &tol, compute),
        "split_cluster" => op_split_cluster(&v, &tol, compute),
        "multistep" => op_multistep(&v, &tol, compute),
        other => Err(format!("unknown op {other:?}")),
    }
}

fn vector_files() -> Vec<PathBuf> {
    let dir = Path::new(VECTORS);
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("conformance vectors directory {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no vector file in {}", dir.display());
    files
}

fn run_all(compute: &MemoryCompute, path_name: &str) {
    let files = vector_files();
    let mut failures = Vec::new();
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match run_file(f, compute) {
            Ok(()) => println!("ok   {name} ({path_name})"),
            Err(e) => {
                println!("FAIL {name} ({path_name}): {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vector files failed on the {path_name} path:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn every_conformance_vector_passes() {
    run_all(&MemoryCompute::Host, "host");
}

#[test]
fn every_conformance_vector_passes_on_the_device_path() {
    run_all(&MemoryCompute::generic(&Device::Cpu), "device");
}

#[test]
fn unknown_op_is_rejected() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let p = dir.path().join("99_bogus.json");
    let tol = r#""tolerance": {"labels_and_counts": "exact", "float32_abs": 1e-5, "weights_rel": 1e-5, "cross_entropy_abs": 1e-5, "checksum_abs": 1e-3}"#;
    std::fs::write(&p, format!(r#"{{"op": "frobnicate", {tol}}}"#))
        .unwrap_or_else(|e| panic!("write: {e}"));
    let err = run_file(&p, &MemoryCompute::Host).expect_err("an unknown op must fail");
    assert!(err.contains("unknown op"), "{err}");
}
