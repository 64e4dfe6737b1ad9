//! A hostile-input campaign on stable Rust: seeded random-mutation loops over real valid inputs
//! (bit flips, truncation, inserted / deleted bytes, splices, reordered ranges, size fields that
//! lie) and random bytes, against every parser that reads outside data: the WebDataset tar reader
//! (plain and gzip), the image decoder (PNG, JPEG, WebP, decompression bombs), IDX import, Kafka
//! message parsing, the config parser and the checkpoint loader.
//!
//! Each input runs on its own thread under `catch_unwind` and a time bound: a panic or a hang
//! fails the target and names the seed and input size. Targets run one at a time (a lock) so the
//! peak RSS each prints (`VmHWM`, reset per target through `/proc/self/clear_refs`) is its own.
//!
//! Short by default (CI); `ODCD_HOSTILE_ITERS=N` multiplies every target's iteration count, and
//! `ODCD_HOSTILE_SEED=S` replays one seed.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::{Path as FsPath, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::data::{fixture_members, png_grey, png_rgb, Shard};
use odcd::decode::{decode_into, BatchDecoder, DecodeConfig, DecodeError, EvalConfig};
use odcd::decode::{PipelineConfig, TransformConfig};
use odcd::source::webdataset::{read_shard, ReadOptions, TransportFault};
use odcd::source::{RejectReason, SourceItem};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One input longer than this is a hang.
const BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

/// Targets run one at a time: the peak RSS each reports is its own.
static SERIAL: Mutex<()> = Mutex::new(());

fn multiplier() -> usize {
    std::env::var("ODCD_HOSTILE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Only this seed, when replaying a failure.
fn only_seed() -> Option<u64> {
    std::env::var("ODCD_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Panics of case threads are counted, not printed (the summary names them); every other
/// thread keeps the default report.
fn quiet_case_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some("hostile-case") {
                default(info);
            }
        }));
    });
}

fn vm_hwm_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

enum Fail {
    Panic(String),
    Hang,
}

/// Runs `f` on its own thread under `catch_unwind`, waiting at most [`BOUND`].
fn run_case<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, Fail> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("hostile-case".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn case thread");
    match rx.recv_timeout(BOUND) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(p)) => Err(Fail::Panic(
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic)".into()),
        )),
        // A hung case thread is left behind; the target fails anyway.
        Err(_) => Err(Fail::Hang),
    }
}

struct Campaign {
    name: &'static str,
    base_seed: u64,
    iters: u64,
    tried: u64,
    panics: u64,
    hangs: u64,
    failures: Vec<String>,
    started: Instant,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Campaign {
    fn new(name: &'static str, base_seed: u64, iters: usize) -> Campaign {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        quiet_case_panics();
        // Reset the peak RSS to the current RSS (Linux ≥ 4.0).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Campaign {
            name,
            base_seed,
            iters: (iters * multiplier()) as u64,
            tried: 0,
            panics: 0,
            hangs: 0,
            failures: Vec::new(),
            started: Instant::now(),
            _serial: serial,
        }
    }

    /// The seeds to run: `base_seed + i`, or only the replayed one.
    fn seeds(&self) -> Vec<u64> {
        match only_seed() {
            Some(s) => vec![s],
            None => (0..self.iters).map(|i| self.base_seed + i).collect(),
        }
    }

    /// One input: `None` if it panicked or hung (recorded).
    fn case<R: Send + 'static>(
        &mut self,
        seed: u64,
        size: usize,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        self.tried += 1;
        match run_case(f) {
            Ok(r) => Some(r),
            Err(Fail::Panic(msg)) => {
                self.panics += 1;
                self.failures.push(format!(
                    "{}: PANIC at seed {seed}, input {size} bytes: {msg} \
                     (replay: ODCD_HOSTILE_SEED={seed} cargo test --test hostile_inputs {})",
                    self.name, self.name
                ));
                None
            }
            Err(Fail::Hang) => {
                self.hangs += 1;
                self.failures.push(format!(
                    "{}: HANG (> {BOUND:?}) at seed {seed}, input {size} bytes \
                     (replay: ODCD_HOSTILE_SEED={seed} cargo test --test hostile_inputs {})",
                    self.name, self.name
                ));
                None
            }
        }
    }

    /// A property that failed without a panic (counted as a failure, reported the same way).
    fn violation(&mut self, seed: u64, what: String) {
        self.failures
            .push(format!("{}: VIOLATION at seed {seed}: {what}", self.name));
    }

    /// Prints the one summary line and fails on any panic, hang or violation.
    fn finish(self, extra: &str) {
        let line = format!(
            "hostile target={} inputs={} panics={} hangs={} peak_rss_mib={:.0} secs={:.1} {extra}",
            self.name,
            self.tried,
            self.panics,
            self.hangs,
            vm_hwm_mib(),
            self.started.elapsed().as_secs_f64()
        );
        println!("{line}");
        eprintln!("{line}");
        let shown: Vec<&String> = self.failures.iter().take(20).collect();
        assert!(
            self.failures.is_empty(),
            "{} failures ({} not shown):\n{}",
            self.failures.len(),
            self.failures.len().saturating_sub(shown.len()),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Mutators
// ---------------------------------------------------------------------------------------------

/// Values that make size and dimension fields lie.
const INTERESTING: [u32; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

fn range(rng: &mut ChaCha8Rng, len: usize) -> (usize, usize) {
    if len == 0 {
        return (0, 0);
    }
    let a = rng.random_range(0..len);
    let max = (len - a).min(if rng.random_bool(0.8) { 64 } else { 4096 });
    (a, a + rng.random_range(0..=max))
}

/// One to four mutations: bit flips, random bytes, truncation, insertion, deletion, splices from
/// a donor, lying 32-bit fields, duplicated or swapped ranges.
fn mutate(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, donors: &[&[u8]]) {
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        match rng.random_range(0..10) {
            0 | 1 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] ^= 1 << rng.random_range(0..8);
            }
            2 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] = rng.random();
            }
            3 => data.truncate(rng.random_range(0..=len)),
            4 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=64);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(at..at, bytes);
            }
            5 => {
                let (a, b) = range(rng, len);
                data.drain(a..b);
            }
            6 if !donors.is_empty() => {
                let d = donors[rng.random_range(0..donors.len())];
                let (a, b) = range(rng, d.len());
                let at = rng.random_range(0..=len);
                if rng.random_bool(0.5) {
                    data.splice(at..at, d[a..b].iter().copied());
                } else {
                    let end = (at + (b - a)).min(len);
                    data.splice(at..end, d[a..b].iter().copied());
                }
            }
            7 if len >= 4 => {
                let at = rng.random_range(0..=len - 4);
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let b = if rng.random_bool(0.5) {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                data[at..at + 4].copy_from_slice(&b);
            }
            8 => {
                let (a, b) = range(rng, len);
                let chunk = data[a..b].to_vec();
                data.splice(b..b, chunk);
            }
            _ if len >= 2 => {
                // Swap two ranges of equal length (reordered content).
                let n = rng.random_range(1..=(len / 2).min(512));
                let a = rng.random_range(0..=len - n);
                let b = rng.random_range(0..=len - n);
                if a + n <= b || b + n <= a {
                    let tmp = data[a..a + n].to_vec();
                    data.copy_within(b..b + n, a);
                    data[b..b + n].copy_from_slice(&tmp);
                }
            }
            _ => data.push(rng.random()),
        }
    }
}

fn random_bytes(rng: &mut ChaCha8Rng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. The WebDataset tar reader, plain and gzip, with decode behind it (conservation)
// ---------------------------------------------------------------------------------------------

/// Offsets of every member header, and per key the header offset of its first member.
fn tar_layout(tar: &[u8]) -> (Vec<usize>, Vec<(String, usize)>) {
    let mut headers = Vec::new();
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut ar = tar::Archive::new(tar);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let pos = e.raw_header_position() as usize;
        headers.push(pos);
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let key = name.split('.').next().unwrap().to_string();
        if keys.last().map(|(k, _)| k != &key).unwrap_or(true) {
            keys.push((key, pos));
        }
    }
    (headers, keys)
}

/// Rewrites the checksum of the 512-byte tar header at `at`.
fn fix_tar_checksum(tar: &mut [u8], at: usize) {
    if at + 512 > tar.len() {
        return;
    }
    let h = &mut tar[at..at + 512];
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

/// Header-aware damage: a size field that lies (octal or base-256), a random name, or a random
/// entry type (GNU long name, pax, ...), with a valid checksum so the tar crate believes it.
fn mutate_tar_header(rng: &mut ChaCha8Rng, tar: &mut [u8], headers: &[usize]) {
    let Some(&at) = headers.get(rng.random_range(0..headers.len().max(1))) else {
        return;
    };
    if at + 512 > tar.len() {
        return;
    }
    match rng.random_range(0..4) {
        0 => {
            let v: u64 = rng.random::<u64>() >> rng.random_range(0..64);
            let s = format!("{:011o}\0", v % 0o77777777777);
            tar[at + 124..at + 136].copy_from_slice(s.as_bytes());
        }
        1 => {
            // Base-256 size: 0x80 then big-endian.
            tar[at + 124] = 0x80;
            let v: u64 = rng.random::<u64>() >> rng.random_range(0..64);
            tar[at + 128..at + 136].copy_from_slice(&v.to_be_bytes());
            tar[at + 125..at + 128].fill(0);
        }
        2 => {
            let n = rng.random_range(0..100);
            for b in &mut tar[at..at + n] {
                *b = rng.random();
            }
            tar[at + n] = 0;
        }
        _ => {
            const TYPES: &[u8] = b"0123456LKxgSDMNV\0";
            tar[at + 156] = TYPES[rng.random_range(0..TYPES.len())];
        }
    }
    fix_tar_checksum(tar, at);
}

struct ShardBase {
    tar: Vec<u8>,
    headers: Vec<usize>,
    keys: Vec<(String, usize)>,
    /// The clean read: key → image bytes.
    clean: BTreeMap<String, Vec<u8>>,
}

fn read_items(bytes: &[u8]) -> Vec<SourceItem> {
    let mut items = Vec::new();
    read_shard(
        bytes,
        "hostile.tar",
        &ReadOptions::default(),
        &TransportFault::default(),
        |i| {
            items.push(i);
            ControlFlow::Continue(())
        },
    );
    items
}

fn shard_base(tar: Vec<u8>) -> ShardBase {
    let (headers, keys) = tar_layout(&tar);
    let clean = read_items(&tar)
        .into_iter()
        .filter_map(|i| i.ok())
        .map(|r| (r.key, r.image.to_vec()))
        .collect();
    ShardBase {
        tar,
        headers,
        keys,
        clean,
    }
}

fn small_shard() -> Vec<u8> {
    let members = fixture_members();
    let mut s = Shard::new();
    // The first 12 fixture records (png + cls), then colour, JPEG and WebP samples.
    for (name, data) in members.iter().take(24) {
        s.member(name, data);
    }
    s.sample("rgb-0", "png", &png_rgb(90, 17, 13), Some(3));
    s.sample("jpeg-0", "jpg", &jpeg(), Some(4));
    s.sample("webp-0", "webp", &webp(), None);
    s.bytes()
}

fn eval_decoder() -> BatchDecoder {
    let mut cfg = PipelineConfig::new(
        64,
        TransformConfig::Eval(EvalConfig {
            resize: 32,
            size: 28,
            mean: vec![0.286],
            std: vec![0.353],
        }),
    );
    cfg.decode.channels = 1;
    BatchDecoder::new(cfg).unwrap()
}

struct ShardOutcome {
    items: usize,
    decoded: usize,
    /// (reason, count) of source and decode rejects.
    rejected: Vec<&'static str>,
    ok: BTreeMap<String, Vec<u8>>,
    truncated_not_last: bool,
    decoder_panics: usize,
}

fn read_and_decode(bytes: Vec<u8>, decoder: Arc<BatchDecoder>) -> ShardOutcome {
    let items = read_items(&bytes);
    let n = items.len();
    let truncated_not_last = items.iter().enumerate().any(|(i, it)| {
        matches!(it, Err(r) if r.reason == RejectReason::TruncatedShard) && i + 1 != n
    });
    let mut rejected = Vec::new();
    let mut records = Vec::new();
    for it in items {
        match it {
            Ok(r) => records.push(r),
            Err(r) => rejected.push(r.reason.as_str()),
        }
    }
    let ok = records
        .iter()
        .map(|r| (r.key.clone(), r.image.to_vec()))
        .collect();
    let (batch, rejects) = decoder.decode_batch(records, &[]);
    let decoder_panics = rejects
        .iter()
        .filter(|r| r.message.contains("decoder panicked"))
        .count();
    rejected.extend(rejects.iter().map(|r| r.reason.as_str()));
    ShardOutcome {
        items: n,
        decoded: batch.map_or(0, |b| b.keys.len()),
        rejected,
        ok,
        truncated_not_last,
        decoder_panics,
    }
}

#[test]
fn tar_reader() {
    let mut c = Campaign::new("tar_reader", 1_000_000, 2500);
    let fixture = std::fs::read(common::fixtures_dir().join(common::data::FIXTURE_SHARD)).unwrap();
    let bases = [shard_base(small_shard()), shard_base(fixture)];
    let donors: Vec<&[u8]> = bases.iter().map(|b| b.tar.as_slice()).collect();
    let decoder = Arc::new(eval_decoder());
    let (mut read, mut decoded, mut good_expected, mut good_found) = (0u64, 0u64, 0u64, 0u64);
    let mut gz_cases = 0u64;
    let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in c.seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // The big fixture one time in eight: mostly the small mixed shard.
        let base = &bases[usize::from(rng.random_ratio(1, 8))];
        let mode = rng.random_range(0..10);
        let mut tar = base.tar.clone();
        let input = match mode {
            // Random bytes, sometimes behind a gzip header.
            0 => {
                let r = random_bytes(&mut rng, 4096);
                if rng.random_bool(0.5) {
                    gzip(&r)
                } else {
                    r
                }
            }
            // The gzip stream itself damaged.
            1 | 2 => {
                let mut g = gzip(&tar);
                mutate(&mut rng, &mut g, &[]);
                g
            }
            _ => {
                if rng.random_bool(0.4) {
                    mutate_tar_header(&mut rng, &mut tar, &base.headers);
                }
                if rng.random_bool(0.8) {
                    mutate(&mut rng, &mut tar, &donors);
                }
                if rng.random_bool(0.3) {
                    gzip(&tar)
                } else {
                    tar.clone()
                }
            }
        };
        if input.starts_with(&[0x1f, 0x8b]) {
            gz_cases += 1;
        }
        // The records whose members and the next key's header lie before the first damaged byte
        // must come through unchanged.
        let expect: Vec<String> = if mode >= 3 {
            let first = tar
                .iter()
                .zip(&base.tar)
                .position(|(a, b)| a != b)
                .unwrap_or(tar.len().min(base.tar.len()));
            base.keys
                .windows(2)
                .filter(|w| w[1].1 + 512 <= first)
                .map(|w| w[0].0.clone())
                .filter(|k| base.clean.contains_key(k))
                .collect()
        } else {
            Vec::new()
        };
        let size = input.len();
        let dec = decoder.clone();
        let Some(out) = c.case(seed, size, move || read_and_decode(input, dec)) else {
            continue;
        };
        read += out.items as u64;
        decoded += out.decoded as u64;
        for r in &out.rejected {
            *reasons.entry(r).or_default() += 1;
        }
        if out.decoded + out.rejected.len() != out.items {
            c.violation(
                seed,
                format!(
                    "{} items read but {} decoded + {} rejected",
                    out.items,
                    out.decoded,
                    out.rejected.len()
                ),
            );
        }
        if out.truncated_not_last {
            c.violation(seed, "a truncated_shard item is not the last item".into());
        }
        if out.decoder_panics > 0 {
            c.panics += out.decoder_panics as u64;
            c.failures.push(format!(
                "tar_reader: the image decoder panicked at seed {seed} (caught by decode_batch)"
            ));
        }
        good_expected += expect.len() as u64;
        for k in &expect {
            if out.ok.get(k) == base.clean.get(k) {
                good_found += 1;
            } else {
                c.violation(seed, format!("good record {k} before the damage is lost"));
            }
        }
    }
    let rejected: u64 = reasons.values().sum();
    c.finish(&format!(
        "gzip_inputs={gz_cases} records_read={read} decoded={decoded} rejected={rejected} \
         (read = decoded + rejected: {}) by_reason={reasons:?} good_before_damage={good_found}/{good_expected}",
        read == decoded + rejected
    ));
}

// ---------------------------------------------------------------------------------------------
// 2. The image decoder: PNG, JPEG, WebP, lying headers, decompression bombs
// ---------------------------------------------------------------------------------------------

fn jpeg() -> Vec<u8> {
    let (w, h) = (24u32, 16u32);
    let px: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80),
        &px,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

fn webp() -> Vec<u8> {
    let (w, h) = (20u32, 12u32);
    let px: Vec<u8> = (0..w * h * 4).map(|i| (i * 13 % 253) as u8).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::webp::WebPEncoder::new_lossless(&mut out),
        &px,
        w,
        h,
        image::ExtendedColorType::Rgba8,
    )
    .unwrap();
    out
}

/// A PNG with a valid IHDR (correct CRC) claiming `w`×`h` and a tiny IDAT.
fn png_claiming(w: u32, h: u32, colour: u8) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |ty: &[u8], data: &[u8]| {
        v.extend((data.len() as u32).to_be_bytes());
        let mut hs = crc32fast::Hasher::new();
        hs.update(ty);
        hs.update(data);
        v.extend(ty);
        v.extend(data);
        v.extend(hs.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, colour, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    v
}

/// Rewrites the frame size of the first SOF marker of a JPEG.
fn jpeg_claiming(mut j: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
    if let Some(p) = j
        .windows(2)
        .position(|m| m[0] == 0xff && (0xc0..=0xc2).contains(&m[1]))
    {
        j[p + 5..p + 7].copy_from_slice(&h.to_be_bytes());
        j[p + 7..p + 9].copy_from_slice(&w.to_be_bytes());
    }
    j
}

/// An extended (VP8X) WebP whose canvas claims `w`×`h` (24-bit fields), the lossless image after.
fn webp_vp8x_claiming(w: u32, h: u32) -> Vec<u8> {
    let inner = webp();
    let mut body = b"WEBP".to_vec();
    body.extend(b"VP8X");
    body.extend(10u32.to_le_bytes());
    body.extend([0, 0, 0, 0]);
    body.extend(&(w - 1).to_le_bytes()[..3]);
    body.extend(&(h - 1).to_le_bytes()[..3]);
    body.extend(&inner[12..]);
    let mut v = b"RIFF".to_vec();
    v.extend((body.len() as u32).to_le_bytes());
    v.extend(body);
    v
}

/// Rewrites the 14-bit width and height of a lossless (VP8L) WebP.
fn webp_claiming(mut b: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    if b.len() >= 25 && &b[12..16] == b"VP8L" {
        let mut v = u32::from_le_bytes([b[21], b[22], b[23], b[24]]);
        v = (v & !((1 << 28) - 1)) | ((w - 1) & 0x3fff) | (((h - 1) & 0x3fff) << 14);
        b[21..25].copy_from_slice(&v.to_le_bytes());
    }
    b
}

#[test]
fn image_decoder() {
    let mut c = Campaign::new("image_decoder", 2_000_000, 2500);
    let valid: Vec<Vec<u8>> = vec![
        png_grey(77, 28, 28),
        png_rgb(5, 33, 9),
        jpeg(),
        webp(),
        fixture_members()[0].1.clone(),
    ];
    let donors: Vec<&[u8]> = valid.iter().map(|v| v.as_slice()).collect();
    // Bombs: headers claiming far more pixels than max_pixels; each must be TooLarge.
    let bombs: Vec<(&str, Vec<u8>)> = vec![
        ("png 100000x100000", png_claiming(100_000, 100_000, 0)),
        ("png 16384x16384 rgba", png_claiming(16_384, 16_384, 6)),
        ("png 2^31x1", png_claiming(0x7fff_ffff, 1, 2)),
        ("jpeg 65500x65500", jpeg_claiming(jpeg(), 65_500, 65_500)),
        ("jpeg 16000x16000", jpeg_claiming(jpeg(), 16_000, 16_000)),
        ("webp 16384x16384", webp_claiming(webp(), 16_384, 16_384)),
        ("webp vp8x 2^24x2^24", webp_vp8x_claiming(1 << 24, 1 << 24)),
        ("webp vp8x 10000x10000", webp_vp8x_claiming(10_000, 10_000)),
    ];
    let (mut ok, mut too_large, mut undecodable) = (0u64, 0u64, 0u64);
    let (mut bombs_too_large, mut bombs_undecodable) = (0u64, 0u64);
    for (name, bytes) in &bombs {
        let b = bytes.clone();
        let r = c.case(0, b.len(), move || {
            decode_into(
                &b,
                &DecodeConfig::default(),
                &mut Vec::new(),
                &mut Vec::new(),
            )
        });
        match r {
            // Rejected from the header either way; the peak RSS below shows nothing was
            // allocated for the claimed size.
            Some(Err(DecodeError::TooLarge(_))) => bombs_too_large += 1,
            Some(Err(DecodeError::Undecodable(_))) => bombs_undecodable += 1,
            Some(Ok(wh)) => c.violation(0, format!("bomb {name} decoded as {wh:?}")),
            None => {}
        }
    }
    for seed in c.seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut input = match rng.random_range(0..12) {
            0 => random_bytes(&mut rng, 2048),
            // Random dimensions in a valid header, for every format.
            1 => png_claiming(
                rng.random::<u32>() >> rng.random_range(0..32),
                rng.random::<u32>() >> rng.random_range(0..32),
                [0u8, 2, 3, 4, 6][rng.random_range(0..5)],
            ),
            2 => jpeg_claiming(jpeg(), rng.random(), rng.random()),
            3 => webp_claiming(
                webp(),
                rng.random_range(1..=16_384),
                rng.random_range(1..=16_384),
            ),
            _ => valid[rng.random_range(0..valid.len())].clone(),
        };
        if rng.random_bool(0.9) {
            mutate(&mut rng, &mut input, &donors);
        }
        let channels = if rng.random_bool(0.5) { 1 } else { 3 };
        let size = input.len();
        let r = c.case(seed, size, move || {
            let cfg = DecodeConfig {
                channels,
                ..DecodeConfig::default()
            };
            let (mut out, mut tmp) = (Vec::new(), Vec::new());
            let r = decode_into(&input, &cfg, &mut out, &mut tmp);
            if let Ok((w, h)) = r {
                assert_eq!(
                    out.len(),
                    w as usize * h as usize * channels as usize,
                    "decoded buffer size"
                );
            }
            r.map(|_| ())
        });
        match r {
            Some(Ok(())) => ok += 1,
            Some(Err(DecodeError::TooLarge(_))) => too_large += 1,
            Some(Err(DecodeError::Undecodable(_))) => undecodable += 1,
            None => {}
        }
    }
    let peak = vm_hwm_mib();
    if peak > 768.0 {
        c.violation(0, format!("peak RSS {peak:.0} MiB: a bomb was allocated"));
    }
    c.finish(&format!(
        "decoded={ok} too_large={too_large} undecodable={undecodable} bombs={} (too_large={bombs_too_large} undecodable={bombs_undecodable})",
        bombs.len()
    ));
}

// ---------------------------------------------------------------------------------------------
// 3. IDX import
// ---------------------------------------------------------------------------------------------

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

#[test]
fn idx_import() {
    let mut c = Campaign::new("idx_import", 3_000_000, 800);
    let dir = tempfile::tempdir().unwrap();
    let (n, h, w) = (6u32, 5u32, 4u32);
    let pixels: Vec<u8> = (0..n * h * w).map(|i| (i * 37 % 256) as u8).collect();
    let images = idx(&[n, h, w], &pixels);
    let labels = idx(&[n], &[0, 1, 2, 3, 4, 9]);
    let donors: Vec<&[u8]> = vec![&images, &labels];
    let (mut imported, mut rejected) = (0u64, 0u64);
    for seed in c.seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut im, mut lb) = (images.clone(), labels.clone());
        match rng.random_range(0..6) {
            0 => im = random_bytes(&mut rng, 256),
            // Dimensions that lie: any count, any sizes.
            1 | 2 => {
                let nd = rng.random_range(0..=6u8);
                let dims: Vec<u32> = (0..nd)
                    .map(|_| INTERESTING[rng.random_range(0..INTERESTING.len())])
                    .collect();
                im = idx(&dims, &pixels);
                im[3] = if rng.random_bool(0.1) {
                    rng.random()
                } else {
                    nd
                };
            }
            _ => {}
        }
        for f in [&mut im, &mut lb] {
            if rng.random_bool(0.6) {
                mutate(&mut rng, f, &donors);
            }
        }
        if rng.random_bool(0.3) {
            im = gzip(&im);
        }
        if rng.random_bool(0.3) {
            lb = gzip(&lb);
        }
        let case_dir = dir.path().join(format!("{seed}"));
        std::fs::create_dir_all(case_dir.join("out")).unwrap();
        let (ip, lp) = (case_dir.join("images.idx"), case_dir.join("labels.idx"));
        std::fs::write(&ip, &im).unwrap();
        std::fs::write(&lp, &lb).unwrap();
        let size = im.len() + lb.len();
        let out_dir = case_dir.join("out");
        let r = c.case(seed, size, move || {
            let _ = odcd::shards::read_idx(&ip);
            let _ = odcd::shards::read_idx(&lp);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let store =
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&out_dir).unwrap());
            rt.block_on(odcd::shards::import_idx(
                &ip,
                &lp,
                store,
                &object_store::path::Path::from("shards"),
                "x",
                4,
                odcd::shards::IdxRange::default(),
            ))
            .is_ok()
        });
        match r {
            Some(true) => imported += 1,
            Some(false) => rejected += 1,
            None => {}
        }
        let _ = std::fs::remove_dir_all(&case_dir);
    }
    c.finish(&format!("imported={imported} rejected={rejected}"));
}

// ---------------------------------------------------------------------------------------------
// 4. Kafka messages: keys, headers, sizes, formats
// ---------------------------------------------------------------------------------------------

#[test]
fn kafka_messages() {
    use odcd::source::kafka::parse_message;
    use odcd::source::KafkaSourceConfig;
    let mut c = Campaign::new("kafka_messages", 4_000_000, 4000);
    let shard = small_shard();
    let images = [png_grey(3, 28, 28), jpeg(), webp()];
    let mut donors: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
    donors.push(&shard);
    let (mut records, mut rejected, mut shard_msgs) = (0u64, 0u64, 0u64);
    for seed in c.seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shard_format = rng.random_bool(0.4);
        let mut cfg = KafkaSourceConfig::new("x:1", &["images"], "g");
        if shard_format {
            cfg.message_format = odcd::source::kafka::MessageFormat::Shard;
        }
        if rng.random_bool(0.2) {
            cfg.max_message_bytes = rng.random_range(1..=8192);
        }
        let mut payload = match (shard_format, rng.random_range(0..8)) {
            (_, 0) => random_bytes(&mut rng, 2048),
            (true, _) => shard.clone(),
            (false, _) => images[rng.random_range(0..images.len())].clone(),
        };
        if rng.random_bool(0.8) {
            mutate(&mut rng, &mut payload, &donors);
        }
        let key = match rng.random_range(0..4) {
            0 => None,
            1 => Some(Vec::new()),
            2 => Some(random_bytes(&mut rng, 64)),
            _ => Some(format!("sample-{seed}").into_bytes()),
        };
        let values: [&[u8]; 12] = [
            b"7",
            b" -3 ",
            b"",
            b"99999999999999999999999",
            b"seven",
            b"\xff\xfe",
            b"image/png",
            b"IMAGE/JPEG; q=0.9",
            b"image/webp",
            b"text/plain",
            b";;;",
            b"image/png\0",
        ];
        let mut headers = rdkafka::message::OwnedHeaders::new();
        for _ in 0..rng.random_range(0..8) {
            let key = match rng.random_range(0..4) {
                0 => cfg.label_header.clone(),
                1 => cfg.content_type_header.clone(),
                2 => String::from_utf8_lossy(&random_bytes(&mut rng, 16)).into_owned(),
                _ => String::new(),
            };
            let value: Option<Vec<u8>> = match rng.random_range(0..4) {
                0 => None,
                1 => Some(random_bytes(&mut rng, 32)),
                _ => Some(values[rng.random_range(0..values.len())].to_vec()),
            };
            headers = headers.insert(rdkafka::message::Header {
                key: &key,
                value: value.as_deref(),
            });
        }
        let payload_opt = if rng.random_ratio(1, 20) {
            None
        } else {
            Some(payload)
        };
        let size = payload_opt.as_ref().map_or(0, |p| p.len());
        let (partition, offset) = (rng.random::<i32>(), rng.random::<i64>());
        let m = rdkafka::message::OwnedMessage::new(
            payload_opt,
            key,
            "images".into(),
            rdkafka::message::Timestamp::NotAvailable,
            partition,
            offset,
            Some(headers),
        );
        let Some(items) = c.case(seed, size, move || parse_message(&m, &cfg)) else {
            continue;
        };
        if shard_format {
            shard_msgs += 1;
        } else if items.len() != 1 {
            c.violation(seed, format!("an image message gave {} items", items.len()));
        }
        for it in items {
            match it {
                Ok(_) => records += 1,
                Err(_) => rejected += 1,
            }
        }
    }
    c.finish(&format!(
        "shard_messages={shard_msgs} records={records} rejected={rejected}"
    ));
}

// ---------------------------------------------------------------------------------------------
// 5. The config parser
// ---------------------------------------------------------------------------------------------

fn config_texts() -> Vec<(PathBuf, String)> {
    let dir = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut v: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let t = std::fs::read_to_string(&p).unwrap();
            (p, t)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// Values that break assumptions: zeros, negatives, overflow, NaN, wrong types.
const TOML_VALUES: [&str; 22] = [
    "0",
    "-1",
    "1",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "-0.0",
    "0.5",
    "\"\"",
    "\"x\"",
    "\"file:///\"",
    "\"s3://\"",
    "[]",
    "[0, -1]",
    "{}",
    "true",
    "\"\\u0000\"",
    "1979-05-27T07:32:00Z",
];

#[test]
fn config_parser() {
    let mut c = Campaign::new("config_parser", 5_000_000, 3000);
    let texts = config_texts();
    let donors: Vec<&[u8]> = texts.iter().map(|(_, t)| t.as_bytes()).collect();
    let (mut accepted, mut rejected) = (0u64, 0u64);
    for seed in c.seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (path, base) = &texts[rng.random_range(0..texts.len())];
        let text = match rng.random_range(0..10) {
            0 => String::from_utf8_lossy(&random_bytes(&mut rng, 512)).into_owned(),
            // Deep nesting.
            1 => format!(
                "{}\n{}",
                base,
                "x = ".to_string() + &"[".repeat(rng.random_range(1..3000))
            ),
            // Byte-level damage.
            2 | 3 => {
                let mut b = base.clone().into_bytes();
                mutate(&mut rng, &mut b, &donors);
                String::from_utf8_lossy(&b).into_owned()
            }
            // Values replaced, lines deleted, duplicated, swapped.
            _ => {
                let mut lines: Vec<String> = base.lines().map(String::from).collect();
                for _ in 0..rng.random_range(1..=4) {
                    if lines.is_empty() {
                        break;
                    }
                    let i = rng.random_range(0..lines.len());
                    match rng.random_range(0..5) {
                        0 | 1 => {
                            if let Some(eq) = lines[i].find('=') {
                                let v = TOML_VALUES[rng.random_range(0..TOML_VALUES.len())];
                                lines[i] = format!("{}= {v}", &lines[i][..eq]);
                            }
                        }
                        2 => {
                            lines.remove(i);
                        }
                        3 => {
                            let l = lines[i].clone();
                            lines.insert(i, l);
                        }
                        _ => {
                            let j = rng.random_range(0..lines.len());
                            lines.swap(i, j);
                        }
                    }
                }
                lines.join("\n")
            }
        };
        let size = text.len();
        let name = path.display().to_string();
        match c.case(seed, size, move || {
            odcd::config::Config::from_toml(&text, &name).is_ok()
        }) {
            Some(true) => accepted += 1,
            Some(false) => rejected += 1,
            None => {}
        }
    }
    c.finish(&format!(
        "configs={} accepted={accepted} rejected={rejected}",
        texts.len()
    ));
}

// ---------------------------------------------------------------------------------------------
// 6. The checkpoint loader
// ---------------------------------------------------------------------------------------------

fn files_under(root: &FsPath) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let b = std::fs::read(&p).unwrap();
                out.push((p, b));
            }
        }
    }
    out.sort();
    out
}

fn small_checkpoint(step: u64) -> odcd::checkpoint::Checkpoint {
    use candle_core::{Device, Tensor};
    use odcd::odc::{MinCluster, StreamConfig, StreamingMemory};
    let (cap, d, k) = (24, 4, 3);
    let mut cfg = StreamConfig::new(cap, d, k);
    cfg.min_cluster = MinCluster::Count(0);
    let mut m = StreamingMemory::new(cfg).unwrap();
    let feat = |i: usize| -> Vec<f32> {
        (0..d)
            .map(|j| ((i * 7 + j * 3) % 11) as f32 / 11.0 + 0.05)
            .collect()
    };
    let keys: Vec<String> = (0..cap).map(|i| format!("s-{i:03}")).collect();
    let feats: Vec<f32> = (0..cap).flat_map(feat).collect();
    let labels: Vec<u32> = (0..cap).map(|i| (i % k) as u32).collect();
    m.init_from_clustering(&keys, &feats, &labels).unwrap();
    let dev = Device::Cpu;
    let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let model = safetensors::serialize([("fc.weight", &w)], None).unwrap();
    let mut c = odcd::checkpoint::Checkpoint::new(step, model);
    c.optimizer.insert(
        "velocity.fc.weight".into(),
        Tensor::new(&[[0.5f32, -0.5], [0.25, step as f32]], &dev).unwrap(),
    );
    c.memory = Some(m.export());
    c.source_state =
        serde_json::json!({"pass": 1, "current": {"shard": "b.tar", "next_index": step}});
    c.config = serde_json::json!({"model": {"arch": "resnet18"}});
    c
}

#[test]
fn checkpoint_loader() {
    use odcd::checkpoint::CheckpointStore;
    let mut c = Campaign::new("checkpoint_loader", 6_000_000, 400);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let rt = common::data::rt();
    let open = |root: &FsPath| {
        CheckpointStore::open(root.to_str().unwrap(), &BTreeMap::new(), 10).unwrap()
    };
    let store = open(&root);
    let m1 = rt.block_on(store.save(&small_checkpoint(1))).unwrap();
    let m2 = rt.block_on(store.save(&small_checkpoint(2))).unwrap();
    let pristine = files_under(&root);
    // The step-2 files: its manifest and its parts.
    let targets: Vec<usize> = pristine
        .iter()
        .enumerate()
        .filter(|(_, (p, _))| p.to_string_lossy().contains(&m2.id))
        .map(|(i, _)| i)
        .collect();
    assert!(targets.len() >= 5, "{targets:?}");
    let manifest_idx = *targets
        .iter()
        .find(|&&i| pristine[i].0.to_string_lossy().contains("manifests"))
        .unwrap();
    let donors: Vec<&[u8]> = pristine.iter().map(|(_, b)| b.as_slice()).collect();
    let (mut step2, mut step1, mut none, mut load_err, mut resealed) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in c.seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Restore, then damage one or two step-2 files.
        for (p, b) in &pristine {
            std::fs::write(p, b).unwrap();
        }
        let mut changed_parts = Vec::new();
        for _ in 0..rng.random_range(1..=2) {
            let i = targets[rng.random_range(0..targets.len())];
            let mut bytes = std::fs::read(&pristine[i].0).unwrap();
            match rng.random_range(0..4) {
                // Reordered: another part's bytes in its place.
                0 => {
                    let j = targets[rng.random_range(0..targets.len())];
                    bytes = pristine[j].1.clone();
                }
                1 => bytes.truncate(rng.random_range(0..=bytes.len())),
                _ => mutate(&mut rng, &mut bytes, &donors),
            }
            std::fs::write(&pristine[i].0, &bytes).unwrap();
        }
        // Compared at the end: a second damage can undo the first (e.g. a part "reordered"
        // back into its own place).
        for &i in &targets {
            if i != manifest_idx && std::fs::read(&pristine[i].0).unwrap() != pristine[i].1 {
                changed_parts.push(i);
            }
        }
        // Half the time, reseal: the manifest gets the damaged parts' sizes and CRCs, so the
        // part parsers (safetensors, keys, state JSON) see the damage instead of the CRC check.
        let reseal = !changed_parts.is_empty() && rng.random_bool(0.5);
        if reseal {
            let mp = &pristine[manifest_idx].0;
            if let Ok(mut v) =
                serde_json::from_slice::<serde_json::Value>(&std::fs::read(mp).unwrap())
            {
                if let Some(parts) = v.get_mut("parts").and_then(|p| p.as_array_mut()) {
                    for part in parts {
                        let Some(path) = part.get("path").and_then(|p| p.as_str()) else {
                            continue;
                        };
                        let path = path.to_string();
                        for &i in &changed_parts {
                            if pristine[i].0.ends_with(&path) {
                                let b = std::fs::read(&pristine[i].0).unwrap();
                                part["size"] = serde_json::json!(b.len());
                                part["crc32"] = serde_json::json!(crc32fast::hash(&b));
                            }
                        }
                    }
                }
                std::fs::write(mp, serde_json::to_vec(&v).unwrap()).unwrap();
                resealed += 1;
            }
        }
        let size: usize = targets
            .iter()
            .map(|&i| std::fs::metadata(&pristine[i].0).map_or(0, |m| m.len() as usize))
            .sum();
        let root_c = root.clone();
        let m2c = m2.clone();
        let r = c.case(seed, size, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let store =
                CheckpointStore::open(root_c.to_str().unwrap(), &BTreeMap::new(), 10).unwrap();
            rt.block_on(async {
                let direct = store.load(&m2c).await;
                if let Ok(ck) = &direct {
                    if let Some(mem) = &ck.memory {
                        let _ = odcd::odc::StreamingMemory::import(mem);
                    }
                }
                let latest = store.load_latest_valid().await.map(|o| {
                    o.map(|(m, ck)| {
                        if let Some(mem) = &ck.memory {
                            let _ = odcd::odc::StreamingMemory::import(mem);
                        }
                        m.step
                    })
                });
                (direct.is_ok(), latest.map_err(|e| e.to_string()))
            })
        });
        let Some((direct_ok, latest)) = r else {
            continue;
        };
        if !direct_ok {
            load_err += 1;
        }
        match latest {
            Ok(Some(2)) => {
                step2 += 1;
                if !reseal && !changed_parts.is_empty() {
                    c.violation(seed, "a damaged part passed its size and CRC check".into());
                }
            }
            Ok(Some(1)) => step1 += 1,
            Ok(other) => {
                none += 1;
                c.violation(
                    seed,
                    format!("load_latest_valid gave {other:?}, not step 1 or 2"),
                );
            }
            Err(e) => {
                none += 1;
                c.violation(seed, format!("load_latest_valid failed: {e}"));
            }
        }
    }
    let _ = m1;
    c.finish(&format!(
        "resealed={resealed} direct_load_errors={load_err} latest_valid_step2={step2} \
         fell_back_to_step1={step1} none={none}"
    ));
}
