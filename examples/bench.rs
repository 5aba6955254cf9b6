//! The benchmark driver (issue 7): one command starts a simulated fleet, a broker and the
//! daemon, runs a scenario, and prints a table and one JSON line (the last line of
//! stdout). See BENCHMARKS.md for the figures and how they were taken.
//!
//! ```sh
//! cargo run --release --example bench -- payment-latency --meters 10000 --rate 100
//! cargo run --release --example bench -- payment-burst --meters 10000
//! cargo run --release --example bench -- payment-burst --meters 10000 --broker mosquitto
//! cargo run --release --example bench -- client-cpu     # the driver vs Gurux, per reconnect
//! ```
//!
//! The daemon runs as a process of its own, so that its CPU time is read from
//! /proc/<pid>/stat apart from the simulator's and the broker's: by default this same
//! executable, re-run as `bench daemon --config FILE --broker URL`, which calls
//! `headend::daemon::run` exactly as `headend run` does (`--daemon-exe target/release/headend`
//! runs the real binary instead). Scenarios are subcommands; each is a module under
//! `examples/bench/` that starts a [`rig::Rig`] and reports through [`report`].

#[path = "bench/client_cpu.rs"]
mod client_cpu;
#[path = "bench/payment.rs"]
mod payment;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/rig.rs"]
mod rig;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use payment::{Pace, PaymentOptions};
use rig::{Broker, DaemonCommand, Rig, RigOptions};

/// Benchmarks of the head-end daemon against a simulated fleet.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Cleared payments at a steady rate; latency from payment to `succeeded`.
    PaymentLatency {
        #[command(flatten)]
        rig: RigArgs,
        /// Payments per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// How many payments (default: 60 seconds' worth, at most one per account).
        #[arg(long)]
        payments: Option<usize>,
    },
    /// Cleared payments all at once; time until every meter is reconnected, and the rate.
    PaymentBurst {
        #[command(flatten)]
        rig: RigArgs,
        /// How many payments (default: one per account, i.e. every meter).
        #[arg(long)]
        payments: Option<usize>,
    },
    /// DLMS client CPU per reconnect operation: the head-end's driver vs Gurux (Python).
    ClientCpu {
        /// Operations per authentication kind.
        #[arg(long, default_value_t = 2000)]
        ops: usize,
        /// Where the simulated meter's configuration goes.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// (internal) The daemon process of a run: `headend::daemon::run`, as `headend run`.
    #[command(hide = true)]
    Daemon {
        /// The site configuration.
        #[arg(long)]
        config: PathBuf,
        /// The broker.
        #[arg(long)]
        broker: Option<String>,
    },
}

/// What every scenario sets up.
#[derive(Args, Debug)]
struct RigArgs {
    /// Simulated meters.
    #[arg(long, default_value_t = 10_000)]
    meters: usize,
    /// Meters behind one wrapper endpoint, i.e. on one daemon link (channel actor).
    #[arg(long, default_value_t = 10)]
    meters_per_link: usize,
    /// Meters per account (a cleared payment reconnects all of them).
    #[arg(long, default_value_t = 1)]
    meters_per_account: usize,
    /// `embedded` (rumqttd in this process), `mosquitto` (started here), or mqtt://host:port.
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// Where the configuration, key files, journal and the daemon's log go.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed of the fleet's keys and energy.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Run this `headend` binary (`headend run`) as the daemon instead of this executable.
    #[arg(long)]
    daemon_exe: Option<PathBuf>,
    /// Collection beside the payments: the daemon's default [collection], and every meter
    /// asked to collect now (`{p}/admin/collect`) as the payments start.
    #[arg(long)]
    with_collection: bool,
    /// Arrears cuts outstanding at once during the setup.
    #[arg(long, default_value_t = 1000)]
    setup_window: usize,
}

impl RigArgs {
    fn options(&self) -> anyhow::Result<RigOptions> {
        let daemon = match &self.daemon_exe {
            Some(exe) => DaemonCommand { program: exe.clone(), args: vec!["run".into()] },
            None => DaemonCommand { program: std::env::current_exe()?, args: vec!["daemon".into()] },
        };
        Ok(RigOptions {
            meters: self.meters,
            meters_per_link: self.meters_per_link,
            meters_per_account: self.meters_per_account,
            broker: Broker::parse(&self.broker)?,
            dir: self.dir.clone().unwrap_or_else(|| std::env::temp_dir().join("headend-bench")),
            seed: self.seed,
            daemon,
            collection: self.with_collection,
            progress: true,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        match cli.scenario {
            Scenario::Daemon { config, broker } => daemon(config, broker).await,
            Scenario::PaymentLatency { rig, rate, payments } => {
                let payments = Some(payments.unwrap_or((rate * 60.0).ceil() as usize));
                let o = PaymentOptions { pace: Pace::Steady(rate), payments, setup_window: rig.setup_window };
                payments_scenario(&rig, o).await
            }
            Scenario::ClientCpu { ops, dir } => {
                let machine = report::Machine::read();
                let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("headend-bench-client-cpu"));
                let rows = client_cpu::run(ops, &dir).await?;
                print!("{}", client_cpu::table(&rows));
                println!("  machine: {}", machine.line());
                let json = serde_json::json!({"scenario": "client-cpu", "machine": machine, "rows": rows});
                println!("{json}");
                Ok(())
            }
            Scenario::PaymentBurst { rig, payments } => {
                let o = PaymentOptions { pace: Pace::Burst, payments, setup_window: rig.setup_window };
                payments_scenario(&rig, o).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn payments_scenario(args: &RigArgs, o: PaymentOptions) -> anyhow::Result<()> {
    let machine = report::Machine::read();
    let mut rig = Rig::start(&args.options()?).await?;
    // Ctrl-C or SIGTERM still stops the daemon and the broker this run started.
    let result = tokio::select! {
        r = payment::run(&mut rig, o, args.meters_per_account, machine) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    rig.stop().await;
    let report = result?;
    print!("{}", report.table());
    println!("{}", serde_json::to_string(&report)?);
    if report.figures.failures > 0 {
        anyhow::bail!("{} reconnects did not succeed", report.figures.failures);
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The daemon process: what `headend run --config FILE --broker URL` does, until SIGTERM
/// or SIGINT (the rig ends it with SIGKILL).
async fn daemon(config: PathBuf, broker: Option<String>) -> anyhow::Result<()> {
    let site = headend::config::SiteConfig::load(&config)?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        interrupted().await;
        stop.cancel();
    });
    let clock = Arc::new(headend::time::SystemClock);
    let opts = headend::daemon::DaemonOptions { broker, clock, reload: None };
    headend::daemon::run(site, opts, shutdown).await?;
    Ok(())
}
