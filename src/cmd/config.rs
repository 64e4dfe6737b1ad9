//! `odcd config check FILE`: parse and validate a config; print the effective configuration.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCmd {
    /// Parse and validate a config file; prints the effective configuration.
    Check { file: PathBuf },
}

impl ConfigCmd {
    pub fn execute(self) -> anyhow::Result<()> {
        let ConfigCmd::Check { file } = self;
        let cfg = Config::load(&file)?;
        let text = toml::to_string_pretty(&cfg).context("cannot print the configuration")?;
        println!(
            "# {} is valid; effective configuration:\n{text}",
            file.display()
        );
        Ok(())
    }
}
