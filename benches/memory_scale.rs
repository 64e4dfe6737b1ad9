//! The streaming ODC memory at scale on one host: RSS once full, a step's memory work, and a
//! checkpoint of it (size, save time, peak RSS during the save, load time and peak RSS).
//! Plain bench binary, prints one table.
//!
//! `cargo bench --bench memory_scale` — sizes from env: ODC_SCALE_M (capacity, filled
//! completely, 10000000), ODC_SCALE_D (128), ODC_SCALE_K (10000), ODC_SCALE_B (512),
//! ODC_SCALE_STEPS (steps timed, 10; every 10th ends with the full centroid recompute, timed
//! apart). ODC_SCALE_DIR: where the checkpoint is written (`target/memscale-ckpt`, emptied
//! first and removed at the end). ODC_SCALE_CKPT: `live` (default: `save_live` streams the
//! memory in place, the load decodes as it reads and `from_state` takes the decoded state
//! over) or `export` (the copying path: `save` of `export()`, then `import` of the loaded
//! state).
//!
//! The memory is filled with synthetic non-negative features through `init_from_clustering`
//! (not by training); keys look like `shard-000123/000456`. Peak RSS is the kernel's
//! high-water mark (`VmHWM`), reset before each phase through `/proc/self/clear_refs`.

use std::collections::BTreeMap;
use std::time::Instant;

use odcd::checkpoint::{Checkpoint, CheckpointStore};
use odcd::odc::{StreamConfig, StreamingMemory};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{env, features, time};

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn rss_hwm() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the high-water mark to the current RSS (Linux >= 4.0).
fn reset_hwm() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset VmHWM ({e}); peak figures include earlier phases");
    }
}

/// Runs `f`, returning its result, its time in s and the peak RSS during it in MiB.
fn phase<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    reset_hwm();
    let t = Instant::now();
    let r = f();
    let secs = t.elapsed().as_secs_f64();
    (r, secs, rss_hwm().1)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("{what}: {e}");
    std::process::exit(1)
}

fn main() {
    let m = env("ODC_SCALE_M", 10_000_000);
    let d = env("ODC_SCALE_D", 128);
    let k = env("ODC_SCALE_K", 10_000);
    let b = env("ODC_SCALE_B", 512);
    let steps = env("ODC_SCALE_STEPS", 10) as u64;
    let live = std::env::var("ODC_SCALE_CKPT").map_or(true, |v| v != "export");
    let dir = std::env::var("ODC_SCALE_DIR").unwrap_or_else(|_| "target/memscale-ckpt".into());
    println!(
        "odc memory at scale: M={m} D={d} K={k} B={b} steps={steps} checkpoint={} threads={}",
        if live { "live" } else { "export" },
        rayon::current_num_threads()
    );
    let (rss0, _) = rss_hwm();

    // Fill: every slot, through the warm start the daemon uses after its k-means.
    let mut cfg = StreamConfig::new(m, d, k);
    cfg.centroid_interval = 10;
    let mut mem = StreamingMemory::new(cfg).unwrap_or_else(|e| fail("memory", e));
    let ((), fill_s, fill_peak) = phase(|| {
        let keys: Vec<String> = (0..m)
            .map(|i| format!("shard-{:06}/{:06}", i / 100_000, i % 100_000))
            .collect();
        let feats = features(m, d, 1);
        let labels: Vec<u32> = (0..m).map(|i| (i % k) as u32).collect();
        if let Err(e) = mem.init_from_clustering(&keys, &feats, &labels) {
            fail("init_from_clustering", e);
        }
    });
    let (rss_full, _) = rss_hwm();
    println!(
        "fill: {fill_s:.1} s (peak {fill_peak:.0} MiB, with the generated features); RSS full {rss_full:.0} MiB (process before the memory: {rss0:.0} MiB; bank alone {:.0} MiB)",
        (m * d * 4) as f64 / 1048576.0
    );

    // Steps: half the batch keys already in memory, half new (FIFO evictions).
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut plain, mut recompute) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let keys: Vec<String> = (0..b)
            .map(|j| {
                if j % 2 == 0 {
                    let i = rng.random_range(0..m);
                    format!("shard-{:06}/{:06}", i / 100_000, i % 100_000)
                } else {
                    format!("new-{step}-{j}")
                }
            })
            .collect();
        let f = features(b, d, 100 + step);
        let (r, ms) = time(|| -> Result<bool, odcd::odc::OdcError> {
            let p = mem.prepare(&keys, &f)?;
            mem.update(&keys, &f, &p)?;
            Ok(mem.after_step(step)?.centroids_recomputed)
        });
        match r {
            Ok(true) => recompute.push(ms),
            Ok(false) => plain.push(ms),
            Err(e) => fail("step", e),
        }
    }

    // Checkpoint: save, drop the memory, load.
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        fail(&dir, e);
    }
    let store = CheckpointStore::open(&dir, &BTreeMap::new(), 1).unwrap_or_else(|e| fail(&dir, e));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail("tokio", e));
    let ck = Checkpoint::new(steps, vec![0u8; 64]);
    let (rss_before_save, _) = rss_hwm();
    let (manifest, save_s, save_peak) = phase(|| {
        if live {
            rt.block_on(store.save_live(&ck, &mem))
        } else {
            let mut ck = ck.clone();
            ck.memory = Some(mem.export());
            rt.block_on(store.save(&ck))
        }
    });
    let manifest = manifest.unwrap_or_else(|e| fail("save", e));
    let fill = mem.fill();
    drop(mem);
    let (rss_empty, _) = rss_hwm();
    let (restored, load_s, load_peak) = phase(|| {
        let ck = rt
            .block_on(store.load(&manifest))
            .unwrap_or_else(|e| fail("load", e));
        let state = ck
            .memory
            .unwrap_or_else(|| fail("load", "no memory in the checkpoint"));
        if live {
            StreamingMemory::from_state(state)
        } else {
            StreamingMemory::import(&state)
        }
    });
    let restored = restored.unwrap_or_else(|e| fail("restore", e));
    let (rss_restored, _) = rss_hwm();
    if restored.fill() != fill {
        fail(
            "restore",
            format!("{} entries, saved {fill}", restored.fill()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mib = |b: u64| b as f64 / 1048576.0;
    println!("{:<52} {:>12}", "what", "value");
    let rows: Vec<(String, String)> = vec![
        (
            "RSS with the memory full".into(),
            format!("{rss_full:.0} MiB"),
        ),
        (
            format!(
                "step memory work, mean of {} (prepare+update+after_step)",
                plain.len()
            ),
            format!("{:.1} ms", mean(&plain)),
        ),
        (
            format!(
                "step with the full centroid recompute, mean of {}",
                recompute.len()
            ),
            format!("{:.1} ms", mean(&recompute)),
        ),
        (
            "checkpoint size (all parts)".into(),
            format!("{:.0} MiB", mib(manifest.total_bytes())),
        ),
        ("save time".into(), format!("{save_s:.1} s")),
        (
            "peak RSS during save (RSS before it)".into(),
            format!("{save_peak:.0} MiB ({rss_before_save:.0})"),
        ),
        ("load + restore time".into(), format!("{load_s:.1} s")),
        (
            "peak RSS during load + restore (RSS before it)".into(),
            format!("{load_peak:.0} MiB ({rss_empty:.0})"),
        ),
        (
            "RSS after the restore".into(),
            format!("{rss_restored:.0} MiB"),
        ),
    ];
    for (what, v) in rows {
        println!("{what:<52} {v:>12}");
    }
}
