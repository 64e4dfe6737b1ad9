//! Per-step ODC memory work at ImageNet scale (plain bench binary, prints a table).
//!
//! `cargo bench --bench memory_step` — sizes from env: ODC_BENCH_M (1281167), ODC_BENCH_K
//! (10000), ODC_BENCH_D (256), ODC_BENCH_B (512), ODC_BENCH_STEPS (20), ODC_BENCH_RECOMPUTES (3),
//! ODC_BENCH_SMALL (clusters made small before each small-cluster call, 5).
//! Compare with `benches/memory_numpy.py` (same operations the way the reference does them).

use odcd::odc::OdcMemory;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{env, features, time};

struct Timing {
    name: &'static str,
    ms: Vec<f64>,
}

impl Timing {
    fn row(&self) -> String {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let med = v.get(v.len() / 2).copied().unwrap_or(0.0);
        let max = v.last().copied().unwrap_or(0.0);
        format!(
            "{:<44} {:>6} {:>10.3} {:>10.3} {:>10.3}",
            self.name,
            v.len(),
            mean,
            med,
            max
        )
    }
}

/// Makes `count` clusters small (3 members left) by moving their other members to the next
/// cluster, through the public remove/insert API. Not timed.
fn make_small(mem: &mut OdcMemory, rng: &mut ChaCha8Rng, count: usize) {
    let k = mem.k() as u32;
    for _ in 0..count {
        let c = rng.random_range(0..k);
        let members: Vec<u32> = mem.members(c).iter().skip(3).copied().collect();
        for s in members {
            let row = mem.row(s).map(<[f32]>::to_vec).unwrap_or_default();
            if mem.remove(s).is_ok() {
                let _ = mem.insert(s, &row, (c + 1) % k);
            }
        }
    }
}

fn main() {
    let m = env("ODC_BENCH_M", 1_281_167);
    let k = env("ODC_BENCH_K", 10_000);
    let d = env("ODC_BENCH_D", 256);
    let b = env("ODC_BENCH_B", 512);
    let steps = env("ODC_BENCH_STEPS", 20);
    let recomputes = env("ODC_BENCH_RECOMPUTES", 3);
    let n_small = env("ODC_BENCH_SMALL", 5);
    let min_cluster = 20;
    println!(
        "odc memory bench: M={m} K={k} D={d} B={b} steps={steps} threads={}",
        rayon::current_num_threads()
    );

    let (feats, gen_ms) = time(|| features(m, d, 1));
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let labels: Vec<u32> = (0..m).map(|_| rng.random_range(0..k as u32)).collect();
    let mut mem = match OdcMemory::new(m, d, k) {
        Ok(mem) => mem,
        Err(e) => {
            eprintln!("cannot build memory: {e}");
            std::process::exit(1);
        }
    };
    let (r, init_ms) = time(|| mem.init_memory(&feats, &labels));
    if let Err(e) = r {
        eprintln!("init_memory: {e}");
        std::process::exit(1);
    }
    drop(feats);
    println!("setup: features {gen_ms:.0} ms, init_memory {init_ms:.0} ms");
    // a first small-cluster pass so the timed state only has the clusters we make small
    let _ = mem.deal_with_small_clusters(min_cluster);

    let mut upd = Timing {
        name: "update_samples (momentum + relabel, B rows)",
        ms: vec![],
    };
    let mut weights = Timing {
        name: "class_weights (incremental sizes)",
        ms: vec![],
    };
    let mut small = Timing {
        name: "deal_with_small_clusters (few small)",
        ms: vec![],
    };
    let mut none_small = Timing {
        name: "deal_with_small_clusters (none small)",
        ms: vec![],
    };
    let mut step_total = Timing {
        name: "per-step total (upd + small + weights)",
        ms: vec![],
    };
    let mut recompute = Timing {
        name: "update_centroids (full recompute)",
        ms: vec![],
    };
    let mut splits = 0usize;
    for step in 0..steps {
        let slots: Vec<u32> = (0..b).map(|_| rng.random_range(0..m as u32)).collect();
        let f = features(b, d, 100 + step as u64);
        make_small(&mut mem, &mut rng, n_small);
        let (_, t_u) = time(|| mem.update_samples(&slots, &f, 0.5));
        let (r, t_s) = time(|| mem.deal_with_small_clusters(min_cluster));
        splits += r.map(|r| r.splits.len()).unwrap_or(0);
        let (_, t_w) = time(|| mem.class_weights(1e-5, 0.5));
        let (_, t_n) = time(|| mem.deal_with_small_clusters(min_cluster));
        upd.ms.push(t_u);
        small.ms.push(t_s);
        weights.ms.push(t_w);
        none_small.ms.push(t_n);
        step_total.ms.push(t_u + t_s + t_w);
    }
    for _ in 0..recomputes {
        let (_, t) = time(|| mem.update_centroids(None));
        recompute.ms.push(t);
    }
    println!("splits during the timed small-cluster calls: {splits}");
    println!(
        "{:<44} {:>6} {:>10} {:>10} {:>10}",
        "operation", "runs", "mean ms", "median ms", "max ms"
    );
    for t in [&upd, &small, &none_small, &weights, &step_total, &recompute] {
        println!("{}", t.row());
    }
}
