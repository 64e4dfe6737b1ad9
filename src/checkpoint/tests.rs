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

#[test]
fn keys_file_rejects_garbage() {
    assert!(format::read_keys(b"nope").is_err());
    let mut b = format::KEYS_MAGIC.to_vec();
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        format::read_keys(&b).is_err(),
        "a huge count is refused, not allocated"
    );
    let mut b = format::KEYS_MAGIC.to_vec();
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&10u32.to_le_bytes());
    b.extend_from_slice(b"abc");
    assert!(format::read_keys(&b).is_err());
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
