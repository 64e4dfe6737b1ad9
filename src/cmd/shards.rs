//! `odcd shards ...`: the shard tools as a clap subcommand.

use crate::shards::{import_idx, inspect, pack_dir, IdxRange};
use crate::store::open_store;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Make and check WebDataset shards.
#[derive(Debug, clap::Subcommand)]
pub enum ShardsCmd {
    /// Convert IDX files (MNIST / Fashion-MNIST, gz or plain) into PNG shards with `.cls` labels.
    ImportIdx {
        /// IDX images file (N×H×W unsigned bytes).
        images: PathBuf,
        /// IDX labels file (N unsigned bytes).
        labels: PathBuf,
        /// Output prefix URL (`file:///data/fmnist`, `s3://bucket/fmnist`, ...).
        out_url: String,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        per_shard: usize,
        /// Key and shard-name prefix, e.g. `fmnist-train` → keys `fmnist-train-000123`.
        #[arg(long, default_value = "sample")]
        prefix: String,
        /// Skip the first N samples (carve a validation set from a train file: keys keep
        /// each sample's index in the file, so the parts never share a key).
        #[arg(long, default_value_t = 0)]
        skip: usize,
        /// Import at most N samples (after --skip).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Pack a folder of images (class sub-folders → labels in sorted order) into shards.
    Pack {
        /// Folder of images, or of class sub-folders of images.
        dir: PathBuf,
        /// Output prefix URL.
        out_url: String,
        #[arg(long, default_value_t = 1000)]
        per_shard: usize,
        #[arg(long, default_value = "sample")]
        prefix: String,
    },
    /// Read shards under a URL (or one shard) and print records, labels, decode check, errors.
    Inspect {
        url: String,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl ShardsCmd {
    /// Run the command (inside a tokio runtime). Credentials/endpoints come from the usual
    /// `AWS_*` / `GOOGLE_*` / `AZURE_*` environment variables.
    pub async fn run(self) -> anyhow::Result<()> {
        let none = BTreeMap::new();
        match self {
            ShardsCmd::ImportIdx {
                images,
                labels,
                out_url,
                per_shard,
                prefix,
                skip,
                limit,
            } => {
                let (store, out) = open_store(&out_url, &none)?;
                let s = import_idx(
                    &images,
                    &labels,
                    store,
                    &out,
                    &prefix,
                    per_shard,
                    IdxRange { skip, limit },
                )
                .await?;
                println!(
                    "wrote {} records in {} shards under {out_url}",
                    s.records,
                    s.shards.len()
                );
            }
            ShardsCmd::Pack {
                dir,
                out_url,
                per_shard,
                prefix,
            } => {
                let (store, out) = open_store(&out_url, &none)?;
                let s = pack_dir(&dir, store, &out, &prefix, per_shard).await?;
                println!(
                    "wrote {} records in {} shards under {out_url}",
                    s.records,
                    s.shards.len()
                );
            }
            ShardsCmd::Inspect { url, json } => {
                let (store, path) = open_store(&url, &none)?;
                let s = inspect(store, path).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print!("{s}");
                }
            }
        }
        Ok(())
    }
}
