//! Shard tools through their CLI: pack a class folder (labels, classes.json, determinism),
//! import-idx with --limit, inspect.

mod common;

use clap::Parser;
use common::data::{fmnist, png_rgb};
use object_store::{local::LocalFileSystem, path::Path};
use odcd::cmd::shards::ShardsCmd;
use odcd::shards::inspect;
use std::sync::Arc;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: ShardsCmd,
}

async fn run(args: &[&str]) {
    let cli =
        Cli::try_parse_from(std::iter::once("odcd-shards").chain(args.iter().copied())).unwrap();
    cli.cmd.run().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_class_folders_is_labelled_and_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    for (class, n) in [("zebra", 3u8), ("cat", 2), ("dog", 4)] {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for i in 0..n {
            std::fs::write(
                src.join(class).join(format!("{i}.PNG")),
                png_rgb(i * 20, 12, 10),
            )
            .unwrap();
        }
        std::fs::write(src.join(class).join("notes.txt"), "ignored").unwrap();
    }
    let out = |name: &str| format!("file://{}", tmp.path().join(name).display());
    for name in ["a", "b"] {
        run(&[
            "pack",
            src.to_str().unwrap(),
            &out(name),
            "--per-shard",
            "4",
            "--prefix",
            "pets",
        ])
        .await;
    }
    let names: Vec<_> = (0..3).map(|n| format!("pets-{n:06}.tar")).collect();
    for n in &names {
        let a = std::fs::read(tmp.path().join("a").join(n)).unwrap();
        let b = std::fs::read(tmp.path().join("b").join(n)).unwrap();
        assert!(a == b, "{n} differs between two packs of the same folder");
    }
    let classes: Vec<String> =
        serde_json::from_slice(&std::fs::read(tmp.path().join("a/classes.json")).unwrap()).unwrap();
    assert_eq!(classes, ["cat", "dog", "zebra"]);

    let store = Arc::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap());
    let s = inspect(store, Path::from("a")).await.unwrap();
    assert_eq!(s.shards.len(), 3);
    assert_eq!((s.records, s.decoded), (9, 9));
    let labels: Vec<(String, u64)> = s.labels.into_iter().collect();
    assert_eq!(labels, [("0".into(), 2), ("1".into(), 4), ("2".into(), 3)]);
    assert_eq!(s.sizes.get("12x10"), Some(&9));
    assert_eq!(s.first_keys[0], "pets-000000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_idx_cli_with_limit() {
    let images = fmnist("t10k-images-idx3-ubyte.gz").display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/fm", tmp.path().display());
    let labels = fmnist("t10k-labels-idx1-ubyte.gz").display().to_string();
    run(&[
        "import-idx",
        &images,
        &labels,
        &url,
        "--per-shard",
        "40",
        "--limit",
        "100",
        "--prefix",
        "fmnist-test",
    ])
    .await;
    let mut shards: Vec<_> = std::fs::read_dir(tmp.path().join("fm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    shards.sort();
    assert_eq!(
        shards,
        [
            "fmnist-test-000000.tar",
            "fmnist-test-000001.tar",
            "fmnist-test-000002.tar"
        ]
    );
    run(&["inspect", &url]).await;
    let store = Arc::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap());
    let s = inspect(store, Path::from("fm/fmnist-test-000002.tar"))
        .await
        .unwrap();
    assert_eq!((s.records, s.decoded), (20, 20));
    assert_eq!(s.first_keys[0], "fmnist-test-000080");
}
