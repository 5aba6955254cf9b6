//! `headend run`: the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use headend::config::SiteConfig;
use headend::daemon::{self, DaemonOptions};
use headend::time::SystemClock;

/// Arguments of `headend run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The site configuration (TOML).
    #[arg(long, short, default_value = "site.toml")]
    config: PathBuf,
    /// The broker (`mqtt://host:port`, `mqtts://host:port`); overrides [mqtt] broker.
    #[arg(long)]
    broker: Option<String>,
}

/// Run the daemon until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let site = match SiteConfig::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: draining work in progress");
        stop.cancel();
        // A second signal does not wait for the drain: what is unfinished resumes from
        // the journal at the next start, as after a crash.
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(1);
    });
    let (reload_tx, reload) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(reload_on_sighup(args.config.clone(), reload_tx));
    let opts = DaemonOptions { broker: args.broker, clock: Arc::new(SystemClock), reload: Some(reload) };
    match daemon::run(site, opts, shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// SIGHUP: read the configuration again; a file that does not check is refused, and
/// the running configuration stays.
async fn reload_on_sighup(path: PathBuf, tx: tokio::sync::mpsc::UnboundedSender<SiteConfig>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            match SiteConfig::load(&path) {
                Ok(site) => {
                    if tx.send(site).is_err() {
                        return;
                    }
                }
                Err(e) => headend::observe::config_refused(&e),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, tx);
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
