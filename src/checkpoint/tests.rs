use super::*;
use crate::odc::{StreamConfig, StreamingMemory};
use candle_core::{Device, Tensor};

fn memory() -> StreamingMemory {
    let (cap, d, k) = (40, 6, 4);
    let mut cfg = StreamConfig::new(cap, d, k);
    cfg.min_cluster = crate::odc::MinCluster::Count(0);
    let mut m = StreamingMemory::new(cfg).unwrap();
    let feat = |i: usize| -> Vec<f32> {
        (0..d)
            .map(|j| ((i * 7 + j * 3) % 11) as f32 / 11.0 + 0.05)
            .collect()
    };
    let keys: Vec<String> = (0..cap)
        .map(|i| format!("shard-{i:03}/sample with ünïcode {i}"))
        .collect();
    let feats: Vec<f32> = (0..cap).flat_map(feat).collect();
    let labels: Vec<u32> = (0..cap).map(|i| (i % k) as u32).collect();
    m.init_from_clustering(&keys, &feats, &labels).unwrap();
    // A step with new keys: evictions, a non-trivial FIFO order and counters.
    let batch: Vec<String> = vec!["k0".into(), "new-a".into(), "new-b".into(), keys[5].clone()];
    let f: Vec<f32> = (100..104).flat_map(feat).collect();
    let p = m.prepare(&batch, &f).unwrap();
    m.update(&batch, &f, &p).unwrap();
    m.after_step(0).unwrap();
    m
}

fn checkpoint(step: u64, mem: Option<&StreamingMemory>) -> Checkpoint {
    let dev = Device::Cpu;
    let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let model = safetensors::serialize([("fc.weight", &w)], None).unwrap();
    let mut c = Checkpoint::new(step, model);
    c.optimizer.insert(
        "velocity.fc.weight".into(),
        Tensor::new(&[[0.5f32, -0.5], [0.25, step as f32]], &dev).unwrap(),
    );
    c.memory = mem.map(|m| m.export());
    c.source_state = serde_json::json!({"pass": 1, "completed": ["a.tar"], "current": {"shard": "b.tar", "next_index": step}});
    c.rng = serde_json::json!({"seed": 7});
    c.config = serde_json::json!({"model": {"arch": "resnet18"}});
    c.extra = serde_json::json!({"note": "hi"});
    c.metadata = serde_json::json!({"arch": "resnet18", "k": 4});
    c
}

fn mem_store(keep: usize) -> CheckpointStore {
    CheckpointStore::open("memory://", &BTreeMap::new(), keep).unwrap()
}

fn file_store(dir: &std::path::Path, keep: usize) -> CheckpointStore {
    // A plain path is accepted and turned into a file:// URL.
    CheckpointStore::open(dir.to_str().unwrap(), &BTreeMap::new(), keep).unwrap()
}

async fn round_trip(store: &CheckpointStore) {
    let mem = memory();
    let before = mem.export();
    let ck = checkpoint(1234, Some(&mem));
    let m = store.save(&ck).await.unwrap();
    assert_eq!(m.step, 1234);
    assert!(m.id.starts_with("step-000000001234-"), "{}", m.id);
    assert_eq!(
        m.memory.as_ref().map(|s| (s.fill, s.k, s.dim)),
        Some((40, 4, 6))
    );
    let latest = store.latest().await.unwrap().unwrap();
    assert_eq!(latest, m);
    let back = store.load(&latest).await.unwrap();
    assert_eq!(back.step, 1234);
    assert_eq!(back.model_safetensors, ck.model_safetensors);
    assert_eq!(back.source_state, ck.source_state);
    assert_eq!(
        (back.rng.clone(), back.config.clone(), back.extra.clone()),
        (ck.rng, ck.config, ck.extra)
    );
    assert_eq!(back.metadata, ck.metadata);
    let v = back.optimizer["velocity.fc.weight"]
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(v, vec![vec![0.5, -0.5], vec![0.25, 1234.0]]);
    let st = back.memory.unwrap();
    assert_eq!(
        st, before,
        "the whole exported state survives byte for byte"
    );
    assert!(!st.fifo.is_empty() && st.evictions_total > 0);
    // Import and re-export: the memory is the same memory.
    let again = StreamingMemory::import(&st).unwrap();
    let re = again.export();
    assert_eq!(re.labels, before.labels);
    assert_eq!(re.keys, before.keys);
    assert_eq!(re.fifo, before.fifo);
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(bytes(&re.bank), bytes(&before.bank));
    assert_eq!(
        (
            re.inserted_total,
            re.evictions_total,
            re.not_stored_total,
            re.offered
        ),
        (
            before.inserted_total,
            before.evictions_total,
            before.not_stored_total,
            before.offered
        )
    );
    assert_eq!(again.label_of("new-a"), mem.label_of("new-a"));
}

#[tokio::test]
async fn round_trip_memory_store() {
    round_trip(&mem_store(2)).await;
}

#[tokio::test]
async fn round_trip_file_store() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(&file_store(dir.path(), 2)).await;
    // The files are where the layout says.
    let ckdirs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ckdirs.iter().any(|n| n == MANIFEST_DIR), "{ckdirs:?}");
    let ck = ckdirs.iter().find(|n| n.starts_with("step-")).unwrap();
    for p in [
        PART_MODEL,
        PART_OPTIMIZER,
        PART_MEMORY,
        PART_MEMORY_KEYS,
        PART_STATE,
    ] {
        assert!(dir.path().join(ck).join(p).is_file(), "{p}");
    }
    // memory.safetensors is a valid safetensors file for any reader.
    let b = std::fs::read(dir.path().join(ck).join(PART_MEMORY)).unwrap();
    let t = candle_core::safetensors::load_buffer(&b, &Device::Cpu).unwrap();
    assert_eq!(t["bank"].dims(), &[40, 6]);
    assert_eq!(t["centroids"].dims(), &[4, 6]);
}

#[tokio::test]
async fn large_memory_goes_through_multipart() {
    // Bigger than one chunk, so the bank is streamed as a multipart upload.
    let (cap, d, k) = (20_000, 256, 8);
    let mut cfg = StreamConfig::new(cap, d, k);
    cfg.min_cluster = crate::odc::MinCluster::Count(0);
    let mut m = StreamingMemory::new(cfg).unwrap();
    let keys: Vec<String> = (0..cap).map(|i| format!("k{i}")).collect();
    let feats: Vec<f32> = (0..cap * d).map(|i| (i % 97) as f32 + 1.0).collect();
    let labels: Vec<u32> = (0..cap).map(|i| (i % k) as u32).collect();
    m.init_from_clustering(&keys, &feats, &labels).unwrap();
    let before = m.export();
    assert!(before.bank.len() * 4 > format::CHUNK_BYTES);
    let dir = tempfile::tempdir().unwrap();
    for store in [mem_store(1), file_store(dir.path(), 1)] {
        let mut ck = checkpoint(5, None);
        ck.memory = Some(before.clone());
        let man = store.save(&ck).await.unwrap();
        assert!(man.part(PART_MEMORY).unwrap().size > format::CHUNK_BYTES as u64);
        let back = store.load(&man).await.unwrap();
        assert!(back.memory.as_ref() == Some(&before));
    }
}

async fn keep_two(store: &CheckpointStore) {
    for s in [10, 20, 30, 40] {
        store.save(&checkpoint(s, None)).await.unwrap();
    }
    let steps: Vec<u64> = store.list().await.unwrap().iter().map(|m| m.step).collect();
    assert_eq!(steps, vec![30, 40]);
    // The parts of the deleted checkpoints are gone too.
    let (os, prefix) = store.object_store();
    let all: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(os.list(Some(prefix)))
        .await
        .unwrap();
    assert!(
        all.iter()
            .all(|o| !o.location.as_ref().contains("step-000000000010")
                && !o.location.as_ref().contains("step-000000000020")),
        "{all:?}"
    );
    assert_eq!(
        all.len(),
        2 * 4,
        "2 × (model, optimizer, state, manifest): {all:?}"
    );
}

#[tokio::test]
async fn keeps_the_last_n_memory() {
    keep_two(&mem_store(2)).await;
}

#[tokio::test]
async fn keeps_the_last_n_file() {
    let dir = tempfile::tempdir().unwrap();
    keep_two(&file_store(dir.path(), 2)).await;
}

async fn corrupt_falls_back(store: &CheckpointStore, how: &str) {
    let old = store.save(&checkpoint(1, None)).await.unwrap();
    let new = store.save(&checkpoint(2, None)).await.unwrap();
    let (os, _) = store.object_store();
    let part = new.part(PART_OPTIMIZER).unwrap().clone();
    let path = store.part_path(&part);
    match how {
        "missing" => os.delete(&path).await.unwrap(),
        "truncated" => {
            let b = os.get(&path).await.unwrap().bytes().await.unwrap();
            os.put(&path, b.slice(..b.len() / 2).into()).await.unwrap();
        }
        "flipped" => {
            let b = os.get(&path).await.unwrap().bytes().await.unwrap();
            let mut v = b.to_vec();
            let last = v.len() - 1;
            v[last] ^= 0x40;
            os.put(&path, v.into()).await.unwrap();
        }
        _ => unreachable!(),
    }
    let err = store.load(&new).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&part.path), "error names the part: {msg}");
    match (how, &err) {
        ("missing", CheckpointError::MissingPart { .. })
        | ("truncated", CheckpointError::SizeMismatch { .. })
        | ("flipped", CheckpointError::CrcMismatch { .. }) => {}
        _ => panic!("{how}: unexpected error {err:?}"),
    }
    let (m, c) = store.load_latest_valid().await.unwrap().unwrap();
    assert_eq!(m, old);
    assert_eq!(c.step, 1);
}

#[tokio::test]
async fn corrupt_part_memory() {
    for how in ["missing", "truncated", "flipped"] {
        corrupt_falls_back(&mem_store(0), how).await;
    }
}

#[tokio::test]
async fn corrupt_part_file() {
    for how in ["missing", "truncated", "flipped"] {
        let dir = tempfile::tempdir().unwrap();
        corrupt_falls_back(&file_store(dir.path(), 0), how).await;
    }
}

#[tokio::test]
async fn half_written_checkpoint_is_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path(), 2);
    let m = store.save(&checkpoint(1, None)).await.unwrap();
    // A crash after the parts of step 2, before its manifest.
    let half = dir.path().join("step-000000000002-deadbeef");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join(PART_MODEL), b"partial").unwrap();
    std::fs::write(half.join(PART_STATE), b"{}").unwrap();
    // And a manifest being written by hand that is garbage.
    std::fs::write(
        dir.path()
            .join(MANIFEST_DIR)
            .join("step-000000000003-x.json"),
        b"{\"format_ver",
    )
    .unwrap();
    assert_eq!(store.latest().await.unwrap(), Some(m.clone()));
    let listing = store.list_report().await.unwrap();
    assert_eq!(listing.manifests, vec![m]);
    assert_eq!(listing.unreadable.len(), 1);
    assert!(listing.unreadable[0]
        .path
        .contains("step-000000000003-x.json"));
    // Once newer checkpoints push step 1 out, the orphan folder of step 2 is cleaned up.
    for s in [3, 4] {
        store.save(&checkpoint(s, None)).await.unwrap();
    }
    assert!(
        !half.join(PART_MODEL).exists() && !half.join(PART_STATE).exists(),
        "orphan parts older than the kept checkpoints are removed"
    );
}

#[tokio::test]
async fn newer_format_is_refused_with_upgrade_hint() {
    let store = mem_store(0);
    let m = store.save(&checkpoint(1, None)).await.unwrap();
    let (os, _) = store.object_store();
    let mut v = serde_json::to_value(&m).unwrap();
    v["format_version"] = serde_json::json!(FORMAT_VERSION + 1);
    os.put(
        &store.manifest_path(&m.id),
        serde_json::to_vec(&v).unwrap().into(),
    )
    .await
    .unwrap();
    let listing = store.list_report().await.unwrap();
    assert!(listing.manifests.is_empty());
    assert!(matches!(
        listing.unreadable[0].error,
        CheckpointError::UnsupportedVersion { .. }
    ));
    assert!(listing.unreadable[0].error.to_string().contains("upgrade"));
}

#[tokio::test]
async fn unwritable_location_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    // A prefix below a regular file cannot be created (even by root).
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let store = file_store(&blocker.join("ckpts"), 2);
    let err = store.save(&checkpoint(1, None)).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Write { .. }), "{err:?}");
    assert!(err.to_string().contains(PART_MODEL), "{err}");

    // A read-only directory: refused unless we are root (root ignores the mode bits).
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe_ok = std::fs::write(ro.join("probe"), b"x").is_ok();
    if !probe_ok {
        let store = file_store(&ro, 2);
        let err = store.save(&checkpoint(1, None)).await.unwrap_err();
        assert!(matches!(err, CheckpointError::Write { .. }), "{err:?}");
        assert!(store.list().await.unwrap().is_empty());
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn inspect_finds_steps() {
    let store = mem_store(0);
    for s in [3, 7] {
        store.save(&checkpoint(s, None)).await.unwrap();
    }
    assert_eq!(store.find(Some(3)).await.unwrap().map(|m| m.step), Some(3));
    assert_eq!(store.find(None).await.unwrap().map(|m| m.step), Some(7));
    assert!(store.find(Some(5)).await.unwrap().is_none());
    let m = store.find(Some(7)).await.unwrap().unwrap();
    assert_eq!(
        store.read_state(&m).await.unwrap().source_state["current"]["next_index"],
        7
    );
}

async fn decode_keys(b: &[u8]) -> Result<Vec<String>, format::ReadError> {
    let mut r = format::PartReader::from_chunks(vec![bytes::Bytes::copy_from_slice(b)]);
    format::read_keys(&mut r, b.len() as u64).await
}

#[tokio::test]
async fn keys_file_rejects_garbage() {
    assert!(decode_keys(b"nope").await.is_err());
    let mut b = format::KEYS_MAGIC.to_vec();
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        decode_keys(&b).await.is_err(),
        "a huge count is refused, not allocated"
    );
    let mut b = format::KEYS_MAGIC.to_vec();
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&10u32.to_le_bytes());
    b.extend_from_slice(b"abc");
    assert!(decode_keys(&b).await.is_err());
}

/// The parts of the memory as stored under `m`.
async fn memory_part_bytes(store: &CheckpointStore, m: &Manifest) -> (bytes::Bytes, bytes::Bytes) {
    (
        store.read_part(m, PART_MEMORY).await.unwrap(),
        store.read_part(m, PART_MEMORY_KEYS).await.unwrap(),
    )
}

#[tokio::test]
async fn a_live_save_writes_the_bytes_of_an_exported_one() {
    let store = mem_store(0);
    let mem = memory();
    let exported = store.save(&checkpoint(1, Some(&mem))).await.unwrap();
    let live = store.save_live(&checkpoint(2, None), &mem).await.unwrap();
    assert_eq!(live.memory, exported.memory);
    for part in [PART_MEMORY, PART_MEMORY_KEYS] {
        let (a, b) = (exported.part(part).unwrap(), live.part(part).unwrap());
        assert_eq!((a.size, a.crc32), (b.size, b.crc32), "{part}");
    }
    assert_eq!(
        memory_part_bytes(&store, &exported).await,
        memory_part_bytes(&store, &live).await
    );
    let back = store.load(&live).await.unwrap();
    assert_eq!(back.memory.unwrap(), mem.export());
}

#[tokio::test]
async fn memory_parts_decode_across_any_chunking() {
    // An S3 body arrives in frames of any size: words and keys split across frames must
    // decode the same.
    let store = mem_store(0);
    let mem = memory();
    let m = store.save_live(&checkpoint(1, None), &mem).await.unwrap();
    let (mb, kb) = memory_part_bytes(&store, &m).await;
    let split = |b: &bytes::Bytes, n: usize| -> Vec<bytes::Bytes> {
        (0..b.len())
            .step_by(n)
            .map(|i| b.slice(i..(i + n).min(b.len())))
            .collect()
    };
    for n in [1, 3, 7, 4096] {
        let mut r = format::PartReader::from_chunks(split(&kb, n));
        let keys = format::read_keys(&mut r, kb.len() as u64).await.unwrap();
        assert!(!r.has_more().await.unwrap());
        let mut r = format::PartReader::from_chunks(split(&mb, n));
        let st = format::read_memory(&mut r, mb.len() as u64, keys)
            .await
            .unwrap();
        assert_eq!(st, mem.export(), "chunks of {n} bytes");
        assert_eq!(r.size_crc(), (mb.len() as u64, crc32fast::hash(&mb)));
    }
}

#[tokio::test]
async fn damaged_memory_parts_fall_back_to_the_previous_checkpoint() {
    let mem = memory();
    // (part, damage, reseal the manifest with the damaged part's size and CRC)
    let cases: [(&str, &str, bool); 6] = [
        (PART_MEMORY, "truncated", false),
        (PART_MEMORY, "flipped", false),
        (PART_MEMORY, "truncated", true),
        (PART_MEMORY, "header", true),
        (PART_MEMORY_KEYS, "truncated", false),
        (PART_MEMORY_KEYS, "truncated", true),
    ];
    for (part, how, reseal) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(dir.path(), 0);
        let old = store.save_live(&checkpoint(1, None), &mem).await.unwrap();
        let mut new = store.save_live(&checkpoint(2, None), &mem).await.unwrap();
        let (os, _) = store.object_store();
        let info = new.part(part).unwrap().clone();
        let path = store.part_path(&info);
        let b = os.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
        let damaged = match how {
            "truncated" => b[..b.len() - 5].to_vec(),
            "flipped" => {
                let mut v = b.clone();
                let at = v.len() / 2;
                v[at] ^= 0x10;
                v
            }
            // a header length pointing past the end of the part
            _ => {
                let mut v = b.clone();
                v[..8].copy_from_slice(&(b.len() as u64).to_le_bytes());
                v
            }
        };
        os.put(&path, damaged.clone().into()).await.unwrap();
        if reseal {
            for p in &mut new.parts {
                if p.name == part {
                    p.size = damaged.len() as u64;
                    p.crc32 = crc32fast::hash(&damaged);
                }
            }
            os.put(
                &store.manifest_path(&new.id),
                serde_json::to_vec(&new).unwrap().into(),
            )
            .await
            .unwrap();
        }
        let err = store.load(&new).await.unwrap_err();
        let ok = matches!(
            (how, reseal, &err),
            (_, true, CheckpointError::Corrupt { .. })
                | ("truncated", false, CheckpointError::SizeMismatch { .. })
                | ("flipped", false, CheckpointError::CrcMismatch { .. })
        );
        assert!(ok, "{part} {how} reseal={reseal}: {err:?}");
        assert!(err.to_string().contains(part), "names the part: {err}");
        let (m, c) = store.load_latest_valid().await.unwrap().unwrap();
        assert_eq!(m, old, "{part} {how} reseal={reseal}");
        assert_eq!(c.memory.unwrap(), mem.export());
    }
}

#[tokio::test]
async fn cli_parses_and_runs_on_a_local_path() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: crate::cmd::checkpoint::CheckpointCmd,
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let store = file_store(dir.path(), 0);
    store.save(&checkpoint(9, Some(&memory()))).await.unwrap();

    let list = Cli::try_parse_from(["odcd", "list", path]).unwrap().cmd;
    assert!(matches!(&list, crate::cmd::checkpoint::CheckpointCmd::List { url } if url == path));
    list.run().await.unwrap();
    let inspect = Cli::try_parse_from(["odcd", "inspect", path, "--step", "9"])
        .unwrap()
        .cmd;
    assert!(matches!(
        inspect,
        crate::cmd::checkpoint::CheckpointCmd::Inspect { step: Some(9), .. }
    ));
    inspect.run().await.unwrap();
    let missing = Cli::try_parse_from(["odcd", "inspect", path, "--step", "8"])
        .unwrap()
        .cmd;
    let err = missing.run().await.unwrap_err();
    assert!(err.to_string().contains("no checkpoint at step 8"), "{err}");
    assert!(Cli::try_parse_from(["odcd", "inspect", path, "--step", "x"]).is_err());
}

/// Heap accounting for the test below, per thread and only while switched on for that
/// thread: the largest single allocation and the bytes allocated in all. Other tests run on
/// other threads at the same time, so global counters would mix their allocations in.
mod tally {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Tally;

    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
        static TOTAL: Cell<usize> = const { Cell::new(0) };
    }

    fn note(bytes: usize) {
        // `try_with`: allocations during thread teardown are not counted.
        let _ = ON.try_with(|on| {
            if on.get() {
                LARGEST.with(|l| l.set(l.get().max(bytes)));
                TOTAL.with(|t| t.set(t.get() + bytes));
            }
        });
    }

    // SAFETY: every method forwards to the system allocator with the caller's arguments
    // unchanged; the counters are const-initialised thread-locals without destructors, so
    // touching them never allocates or re-enters the allocator.
    unsafe impl GlobalAlloc for Tally {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size.saturating_sub(layout.size()));
            // SAFETY: same contract as the caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Runs `f` with this thread's accounting on; returns its result, the largest single
    /// allocation and the bytes allocated in all (a realloc counts its growth).
    pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
        LARGEST.with(|l| l.set(0));
        TOTAL.with(|t| t.set(0));
        ON.with(|on| on.set(true));
        let r = f();
        ON.with(|on| on.set(false));
        (r, LARGEST.with(Cell::get), TOTAL.with(Cell::get))
    }
}

#[global_allocator]
static TALLY: tally::Tally = tally::Tally;

/// A save streams the live memory without copying its bank or keys, and a restore makes the
/// decoded bank the memory's own. A save through `export()` (a second bank) or a restore
/// through `import` (a second bank) fails this.
#[test]
fn a_save_and_a_restore_hold_no_second_copy_of_the_bank() {
    // 128 MiB of bank: far above the writer's chunk buffers (16 MiB parts, 32 MiB at most).
    let (cap, d, k) = (131_072, 256, 16);
    let mut cfg = StreamConfig::new(cap, d, k);
    cfg.min_cluster = crate::odc::MinCluster::Count(0);
    let mut m = StreamingMemory::new(cfg).unwrap();
    let keys: Vec<String> = (0..cap)
        .map(|i| format!("shard-{:04}/{i}", i / 1000))
        .collect();
    let feats: Vec<f32> = (0..cap * d).map(|i| (i % 89) as f32 + 1.0).collect();
    let labels: Vec<u32> = (0..cap).map(|i| (i % k) as u32).collect();
    m.init_from_clustering(&keys, &feats, &labels).unwrap();
    drop((keys, feats, labels));
    let bank_bytes = cap * d * 4;
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path(), 0);
    // A current-thread runtime: the encoding and decoding run on this thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (man, largest, _) =
        tally::measure(|| rt.block_on(store.save_live(&checkpoint(1, None), &m)));
    let man = man.unwrap();
    assert!(man.part(PART_MEMORY).unwrap().size > bank_bytes as u64);
    assert!(
        largest < bank_bytes / 2,
        "the save made a {largest}-byte allocation for a {bank_bytes}-byte bank"
    );
    let (restored, _, total) = tally::measure(|| {
        let ck = rt.block_on(store.load(&man)).unwrap();
        StreamingMemory::from_state(ck.memory.unwrap()).unwrap()
    });
    // One bank, plus slots, labels, keys and the key map (about 25% here); two banks would
    // be over 200%.
    assert!(
        total < bank_bytes * 3 / 2,
        "load + restore allocated {total} bytes for a {bank_bytes}-byte bank"
    );
    assert_eq!(restored.memory().bank(), m.memory().bank());
    assert_eq!(restored.export(), m.export());
}
