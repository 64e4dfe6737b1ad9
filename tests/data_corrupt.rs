//! Corrupt inputs: each is counted under its reason while the good records around it arrive.

use object_store::{local::LocalFileSystem, path::Path};
use odcd::deadletter::DeadLetter;
use odcd::decode::{AugmentConfig, BatchStream, PipelineConfig, TransformConfig};
use odcd::shards::ShardWriter;
use odcd::source::{
    DataMetrics, ObjectStoreSource, ObjectStoreSourceConfig, RejectReason, SourceState,
};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn png(v: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &[v; 20 * 20],
        20,
        20,
        image::ExtendedColorType::L8,
    )
    .unwrap();
    out
}

/// A valid PNG header (with correct CRC) claiming 100000×100000 pixels: a decompression bomb.
fn png_bomb() -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |ty: &[u8], data: &[u8]| {
        v.extend((data.len() as u32).to_be_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(ty);
        h.update(data);
        v.extend(ty);
        v.extend(data);
        v.extend(h.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    v
}

fn tar_raw(members: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_inputs_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let w = |name: &str, bytes: &[u8]| std::fs::write(data.join(name), bytes).unwrap();

    // 00: three good records.
    let mut sw = ShardWriter::new();
    for i in 0..3 {
        sw.append_sample(
            &format!("good0-{i}"),
            "png",
            &png(i * 10),
            Some(i64::from(i)),
        )
        .unwrap();
    }
    w("00-good.tar", &sw.finish().unwrap());
    // 01: truncated inside the third record: two good, one truncated_shard.
    let mut sw = ShardWriter::new();
    for i in 0..3 {
        sw.append_sample(&format!("trunc-{i}"), "png", &png(i), None)
            .unwrap();
    }
    let full = sw.finish().unwrap();
    let first_two: usize = (0..2).map(|i| 512 + png(i).len().div_ceil(512) * 512).sum();
    // Cut 10 bytes into the third member's data.
    w("01-truncated.tar", &full[..first_two + 512 + 10]);
    // 02: empty object.
    w("02-empty.tar", b"");
    // 03: labels only.
    w(
        "03-labels-only.tar",
        &tar_raw(&[(b"l1.cls", b"1".to_vec()), (b"l2.cls", b"2".to_vec())]),
    );
    // 04: bad members between good ones (gzip-compressed, named .tgz).
    let mixed = tar_raw(&[
        (b"ok-a.png", png(1)),
        (
            b"random.jpg",
            (0..997u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        (b"bomb.png", png_bomb()),
        (b"zero.png", Vec::new()),
        (b"bad\xffname.png", png(2)),
        (b"badlabel.png", png(3)),
        (b"badlabel.cls", b"seven".to_vec()),
        (b"ok-b.png", png(4)),
    ]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &mixed).unwrap();
    w("04-mixed.tgz", &gz.finish().unwrap());
    // 05: good again, after all the damage.
    let mut sw = ShardWriter::new();
    sw.append_sample("good5-0", "png", &png(9), Some(5))
        .unwrap();
    w("05-good.tar", &sw.finish().unwrap());

    let registry = prometheus::Registry::new();
    let metrics = DataMetrics::register(&registry).unwrap();
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let cancel = CancellationToken::new();
    let rx = ObjectStoreSource::with_store(
        store.clone(),
        Path::from("data"),
        ObjectStoreSourceConfig::new("file:///data"),
    )
    .with_metrics(metrics.clone())
    .spawn(SourceState::default(), cancel.clone());
    let mut cfg = PipelineConfig::new(4, TransformConfig::Train(AugmentConfig::new(16)));
    cfg.decode.channels = 3;
    cfg.threads = 2;
    let dl = DeadLetter::new(store.clone(), Path::from("dead"));
    let mut stream = BatchStream::spawn(
        rx,
        cfg,
        metrics.clone(),
        Some(dl),
        SourceState::default(),
        cancel,
    )
    .unwrap();
    let mut keys = Vec::new();
    while let Some(b) = stream.next().await {
        assert_eq!(b.images.dims()[1..], [3, 16, 16]);
        keys.extend(b.keys);
    }
    assert_eq!(
        keys,
        ["good0-0", "good0-1", "good0-2", "trunc-0", "trunc-1", "ok-a", "ok-b", "good5-0"]
    );
    let count = |r| metrics.rejected_count(r);
    assert_eq!(
        count(RejectReason::TruncatedShard),
        2,
        "truncated + empty shard"
    );
    assert_eq!(count(RejectReason::MissingImage), 2, "labels-only shard");
    assert_eq!(
        count(RejectReason::Undecodable),
        2,
        "random bytes + 0-byte image"
    );
    assert_eq!(count(RejectReason::TooLarge), 1, "100000x100000 png");
    assert_eq!(count(RejectReason::BadName), 1);
    assert_eq!(count(RejectReason::BadLabel), 1);
    assert_eq!(count(RejectReason::ReadError), 0);
    assert_eq!(metrics.records_decoded.get(), 8);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("odcd_records_rejected_total{reason=\"too_large\"} 1"),
        "{text}"
    );

    // Dead letters: payload + JSON sidecar per reject, under <prefix>/<reason>/.
    let mut sidecars = 0;
    for _ in 0..50 {
        sidecars = walk(&dir.path().join("dead"))
            .iter()
            .filter(|p| p.ends_with(".json"))
            .count();
        if sidecars == 9 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(sidecars, 9);
    let bomb = walk(&dir.path().join("dead/too_large"));
    assert!(
        bomb.iter()
            .any(|p| p.contains("bomb-") && p.ends_with(".png")),
        "{bomb:?}"
    );
    let side = bomb.iter().find(|p| p.ends_with(".json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(side).unwrap()).unwrap();
    assert_eq!(v["key"], "bomb");
    assert_eq!(v["reason"], "too_large");
    assert_eq!(v["position"]["Shard"]["shard"], "data/04-mixed.tgz");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}
