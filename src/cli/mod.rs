//! Command-line verbs.

pub mod audit;
pub mod client;
pub mod demo;
pub mod meter;
pub mod run;

use std::path::Path;
use std::process::ExitCode;

use headend::config::SiteConfig;

/// `headend check-config FILE`.
pub fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    match SiteConfig::load(path) {
        Ok(cfg) => {
            println!("{}: ok ({} links, {} meters)", path.display(), cfg.links.len(), cfg.meters.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}
