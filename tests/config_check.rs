//! `odcd config check` accepts every shipped config in configs/ (the CUDA one only fails on a
//! CPU build, and then names `train.device`).

mod common;

use common::*;

#[test]
fn odcd_config_check_accepts_every_shipped_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut checked = Vec::new();
    for e in std::fs::read_dir(&dir).expect("configs/") {
        let p = e.expect("entry").path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let out = std::process::Command::new(odcd_bin())
            .args(["config", "check"])
            .arg(&p)
            .output()
            .expect("run odcd config check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            assert!(stdout.contains("is valid"), "{}: {stdout}", p.display());
        } else {
            // A CPU build refuses `device = "cuda:0"`, naming the field.
            assert!(
                stderr.contains("train.device") && stdout.is_empty(),
                "{} is not valid:\n{stderr}",
                p.display()
            );
        }
        checked.push(p.file_name().map(|n| n.to_string_lossy().into_owned()));
    }
    for want in ["quickstart.toml", "s3.toml", "kafka.toml"] {
        assert!(
            checked.iter().flatten().any(|n| n == want),
            "configs/{want} checked: {checked:?}"
        );
    }
}
