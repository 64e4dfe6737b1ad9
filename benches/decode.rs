//! Decode + augment throughput (images/s) for 1 and 2 threads, on the same inputs and with the
//! same transforms as benches/decode_pillow.py.
//!
//! cargo bench --bench decode -- [FMNIST_TAR] [JPEG_TAR] [SECONDS]
//! (JPEG_TAR from scripts/make_bench_data.py; see scripts/bench-decode.sh)

use odcd::decode::{
    decode_into, AugmentConfig, BatchDecoder, DecodeConfig, PipelineConfig, TransformConfig,
};
use odcd::record::Record;
use odcd::source::webdataset::{read_shard, ReadOptions, TransportFault};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

fn load(path: &str) -> Result<Vec<Record>, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!("cannot read {path}: {e} (run scripts/make_bench_data.py for the JPEG tar)")
    })?;
    let mut out = Vec::new();
    read_shard(
        &bytes[..],
        path,
        &ReadOptions::default(),
        &TransportFault::default(),
        |i| {
            if let Ok(r) = i {
                out.push(r);
            }
            ControlFlow::Continue(())
        },
    );
    if out.is_empty() {
        return Err(format!("{path} holds no images"));
    }
    Ok(out)
}

/// CPU seconds used by this process (all threads), from /proc/self/stat (Linux, 100 Hz ticks):
/// on a shared machine, images per CPU-second is the fair per-core figure.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" of the command name: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    f.get(10)
        .zip(f.get(11))
        .map_or(f64::NAN, |(u, s)| (u + s) / 100.0)
}

fn bench(name: &str, records: &[Record], cfg: PipelineConfig, secs: f64) -> Result<(), String> {
    let batch = cfg.batch_size;
    let decoder = BatchDecoder::new(cfg.clone()).map_err(|e| e.to_string())?;
    let mut line = format!("rust   {name}:");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| e.to_string())?;
        let (mut n, mut visit) = (0usize, 0u64);
        let (t0, c0) = (Instant::now(), cpu_secs());
        while t0.elapsed() < Duration::from_secs_f64(secs) {
            for chunk in records.chunks(batch) {
                let (b, rej) = pool
                    .install(|| decoder.decode_batch(chunk.to_vec(), &vec![visit; chunk.len()]));
                assert!(rej.is_empty() && b.is_some());
                n += chunk.len();
            }
            visit += 1;
        }
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        let per_cpu = n as f64 / (cpu_secs() - c0);
        line += &format!("  {threads} thread(s) {rate:7.0} img/s ({per_cpu:7.0}/cpu-s)");
    }
    // Decode alone, one thread, for comparison with Pillow's decode-only figure.
    let (mut pix, mut tmp, mut n) = (Vec::new(), Vec::new(), 0usize);
    let (t0, c0) = (Instant::now(), cpu_secs());
    while t0.elapsed() < Duration::from_secs_f64(secs / 2.0) {
        for r in records {
            decode_into(&r.image, &cfg.decode, &mut pix, &mut tmp).map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    line += &format!(
        "   decode only {:7.0} img/s ({:7.0}/cpu-s)",
        n as f64 / t0.elapsed().as_secs_f64(),
        n as f64 / (cpu_secs() - c0)
    );
    println!("{line}");
    Ok(())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let fm = args
        .first()
        .cloned()
        .unwrap_or("tests/fixtures/fmnist-test-000000.tar".into());
    let jp = args
        .get(1)
        .cloned()
        .unwrap_or("target/bench-data/jpeg256.tar".into());
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);

    let mut aug = AugmentConfig::new(28);
    aug.rotation_degrees = 10.0;
    aug.brightness = 0.4;
    aug.contrast = 0.4;
    let mut cfg = PipelineConfig::new(64, TransformConfig::Train(aug));
    cfg.decode = DecodeConfig {
        channels: 1,
        ..DecodeConfig::default()
    };
    bench("fmnist 28x28 png -> 28 grey", &load(&fm)?, cfg, secs)?;

    let mut aug = AugmentConfig::new(224);
    aug.rotation_degrees = 10.0;
    aug.brightness = 0.4;
    aug.contrast = 0.4;
    aug.saturation = 0.4;
    aug.hue = 0.1;
    aug.grayscale_p = 0.2;
    aug.mean = vec![0.485, 0.456, 0.406];
    aug.std = vec![0.229, 0.224, 0.225];
    if std::env::var_os("ODCD_BENCH_PLAIN").is_some() {
        // Ablation: crop + flip + normalise only, to see what the colour ops cost.
        (aug.rotation_degrees, aug.brightness, aug.contrast) = (0.0, 0.0, 0.0);
        (aug.saturation, aug.hue, aug.grayscale_p) = (0.0, 0.0, 0.0);
    }
    let mut cfg = PipelineConfig::new(32, TransformConfig::Train(aug));
    cfg.decode = DecodeConfig {
        channels: 3,
        ..DecodeConfig::default()
    };
    bench("jpeg 256x256 q90 -> 224 rgb", &load(&jp)?, cfg, secs)?;
    Ok(())
}
