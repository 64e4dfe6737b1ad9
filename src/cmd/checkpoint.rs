//! `odcd checkpoint list|inspect`: look at the checkpoints under a URL or local path.
//! Store credentials / options come from the `AWS_*`, `GOOGLE_*`, `AZURE_*` environment.

use std::collections::BTreeMap;

use crate::checkpoint::{CheckpointError, CheckpointStore, Manifest, StateFile};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CheckpointCmd {
    /// List the checkpoints (readable manifests) under a URL or local path.
    List {
        /// `file:///...`, `s3://bucket/prefix`, `gs://...`, `az://...` or a local path.
        url: String,
    },
    /// Show one checkpoint: metadata, parts, memory shape, source position.
    Inspect {
        /// `file:///...`, `s3://bucket/prefix`, `gs://...`, `az://...` or a local path.
        url: String,
        /// Step to inspect (default: the latest).
        #[arg(long)]
        step: Option<u64>,
    },
}

impl CheckpointCmd {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            CheckpointCmd::List { url } => {
                let store = CheckpointStore::open(&url, &BTreeMap::new(), 0)?;
                let listing = store.list_report().await?;
                print!("{}", list_table(&listing.manifests));
                for u in &listing.unreadable {
                    eprintln!("warning: skipped {}: {}", u.path, u.error);
                }
                if listing.manifests.is_empty() {
                    eprintln!("no checkpoints under {}", store.url());
                }
                Ok(())
            }
            CheckpointCmd::Inspect { url, step } => {
                let store = CheckpointStore::open(&url, &BTreeMap::new(), 0)?;
                let m = match store.find(step).await? {
                    Some(m) => m,
                    None => {
                        return Err(match step {
                            Some(step) => CheckpointError::NoSuchStep {
                                url: store.url().to_string(),
                                step,
                            }
                            .into(),
                            None => anyhow::anyhow!("no checkpoints under {}", store.url()),
                        })
                    }
                };
                let state = match store.read_state(&m).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        eprintln!("warning: {e}");
                        None
                    }
                };
                print!("{}", inspect_text(store.url(), &m, state.as_ref()));
                Ok(())
            }
        }
    }
}

/// `1234567` → `1.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn list_table(ms: &[Manifest]) -> String {
    let mut s = format!(
        "{:>12}  {:<20}  {:>10}  {:>5}  {}\n",
        "STEP", "CREATED", "SIZE", "PARTS", "ID"
    );
    for m in ms {
        s.push_str(&format!(
            "{:>12}  {:<20}  {:>10}  {:>5}  {}\n",
            m.step,
            format_utc(m.created_unix_secs),
            human_bytes(m.total_bytes()),
            m.parts.len(),
            m.id
        ));
    }
    s
}

fn inspect_text(url: &str, m: &Manifest, state: Option<&StateFile>) -> String {
    let mut s = String::new();
    s.push_str(&format!("store:     {url}\n"));
    s.push_str(&format!("id:        {}\n", m.id));
    s.push_str(&format!("step:      {}\n", m.step));
    s.push_str(&format!(
        "created:   {} ({})\n",
        format_utc(m.created_unix_secs),
        m.created_unix_secs
    ));
    s.push_str(&format!("format:    v{}\n", m.format_version));
    s.push_str(&format!("size:      {}\n", human_bytes(m.total_bytes())));
    s.push_str("parts:\n");
    for p in &m.parts {
        s.push_str(&format!(
            "  {:<24} {:>12} B  crc32 {:08x}\n",
            p.name, p.size, p.crc32
        ));
    }
    match &m.memory {
        Some(mem) => {
            let pct = if mem.capacity > 0 {
                100.0 * mem.fill as f64 / mem.capacity as f64
            } else {
                0.0
            };
            s.push_str(&format!(
                "memory:    fill {} / {} ({pct:.1}%), K = {}, D = {}\n",
                mem.fill, mem.capacity, mem.k, mem.dim
            ));
        }
        None => s.push_str("memory:    (none)\n"),
    }
    let pretty =
        |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push_str(&format!("metadata:  {}\n", pretty(&m.metadata)));
    if let Some(st) = state {
        s.push_str(&format!("source:    {}\n", pretty(&st.source_state)));
        s.push_str(&format!("rng:       {}\n", pretty(&st.rng)));
        if !st.extra.is_null() {
            s.push_str(&format!("extra:     {}\n", pretty(&st.extra)));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_and_sizes() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn table_and_inspect_show_the_fields() {
        let m = Manifest {
            format_version: 1,
            id: "step-000000000042-abc".into(),
            step: 42,
            created_unix_secs: 0,
            parts: vec![crate::checkpoint::PartInfo {
                name: "model.safetensors".into(),
                path: "step-000000000042-abc/model.safetensors".into(),
                size: 2048,
                crc32: 7,
            }],
            memory: Some(crate::checkpoint::MemorySummary {
                fill: 5,
                capacity: 10,
                k: 3,
                dim: 4,
            }),
            metadata: serde_json::json!({"arch": "resnet18"}),
        };
        let t = list_table(std::slice::from_ref(&m));
        assert!(t.contains("42") && t.contains("2.0 KiB") && t.contains("step-000000000042-abc"));
        let i = inspect_text("memory://", &m, None);
        assert!(i.contains("fill 5 / 10 (50.0%), K = 3, D = 4"), "{i}");
        assert!(i.contains("resnet18"));
    }
}
