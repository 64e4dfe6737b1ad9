//! All 70k Fashion-MNIST images: import to shards, read back, check counts, keys and labels.
//! Needs `apt-get install -y dataset-fashion-mnist`; run with --release (decoding 70k PNGs).

mod common;

use common::data::{fmnist, members};
use object_store::{local::LocalFileSystem, path::Path};
use odcd::shards::{import_idx, inspect, read_idx, IdxRange};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_all_70k_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap());
    let mut total = 0;
    for (split, n, per_class) in [("train", 60_000u64, 6_000u64), ("t10k", 10_000, 1_000)] {
        let images = fmnist(&format!("{split}-images-idx3-ubyte.gz"));
        let labels = fmnist(&format!("{split}-labels-idx1-ubyte.gz"));
        let out = Path::from(split);
        let s = import_idx(
            &images,
            &labels,
            store.clone(),
            &out,
            &format!("fmnist-{split}"),
            1000,
            IdxRange::default(),
        )
        .await
        .unwrap();
        assert_eq!(s.records as u64, n);
        assert_eq!(s.shards.len() as u64, n / 1000);
        assert_eq!(s.shards[0], format!("{split}/fmnist-{split}-000000.tar"));

        let sum = inspect(store.clone(), out).await.unwrap();
        assert_eq!(sum.records, n);
        assert_eq!(sum.decoded, n, "errors: {:?}", sum.errors);
        assert!(sum.rejected.is_empty(), "{:?}", sum.rejected);
        assert_eq!(sum.sizes.get("28x28"), Some(&n));
        assert_eq!(sum.labels.len(), 10);
        for l in 0..10 {
            assert_eq!(
                sum.labels.get(&l.to_string()),
                Some(&per_class),
                "class {l}"
            );
        }
        assert_eq!(sum.first_keys[0], format!("fmnist-{split}-000000"));
        // The labels are the IDX labels, key by key (checked on the last shard).
        let idx = read_idx(&labels).unwrap();
        let last = std::fs::read(tmp.path().join(s.shards.last().unwrap())).unwrap();
        for (name, v) in members(&last) {
            if let Some(stem) = name.strip_suffix(".cls") {
                let i: usize = stem.rsplit('-').next().unwrap().parse().unwrap();
                let v = String::from_utf8(v).unwrap();
                assert_eq!(v, idx.data[i].to_string(), "{name}");
            }
        }
        total += n;
    }
    assert_eq!(total, 70_000);
}
