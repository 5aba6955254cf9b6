//! The benchmark driver (issue 7): one command starts a simulated fleet, a broker and the
//! daemon, runs a scenario, and prints a table and one JSON line (the last line of
//! stdout). See BENCHMARKS.md for the figures and how they were taken.
//!
//! ```sh
//! cargo run --release --example bench -- payment-latency --meters 10000 --rate 100
//! cargo run --release --example bench -- payment-burst --meters 10000
//! cargo run --release --example bench -- payment-burst --meters 10000 --broker mosquitto
//! cargo run --release --example bench -- client-cpu     # the driver vs Gurux, per reconnect
//! cargo run --release --example bench -- collection --meters 10000          # direct TCP
//! cargo run --release --example bench -- collection --meters 100000 --concentrators 500
//! cargo run --release --example bench -- collection --meters 1000 --concentrators 5 --rows 96
//! cargo run --release --example bench -- serial-bus --meters 10 --baud 9600 --rows 96
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
#[path = "bench/collect_fleet.rs"]
mod collect_fleet;
#[path = "bench/collection.rs"]
mod collection;
#[path = "bench/collection_client.rs"]
mod collection_client;
#[path = "bench/payment.rs"]
mod payment;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/rig.rs"]
mod rig;
#[path = "bench/serial_bus.rs"]
mod serial_bus;

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
    /// One interval-collection cycle over N meters (direct TCP, or behind concentrators):
    /// wall time, daemon CPU per 1,000 reads, daemon memory per meter.
    Collection {
        #[command(flatten)]
        c: CollectArgs,
        /// DLMS meters behind this many HDLC gateways (default: the mixed fleet, direct TCP).
        #[arg(long)]
        concentrators: Option<usize>,
        /// Wrapper meters per daemon link in the mixed fleet.
        #[arg(long, default_value_t = 50)]
        wrapper_group: usize,
        /// Reads of a 96-row profile by the DLMS client alone, ours and Gurux's (0: skip).
        #[arg(long, default_value_t = 200)]
        client_reads: usize,
    },
    /// An emulated serial bus busy with collection: restore latency, and the cycle time
    /// against the wire time of the bytes exchanged.
    SerialBus {
        #[command(flatten)]
        c: CollectArgs,
        /// The bus's baud rate.
        #[arg(long, default_value_t = 9600)]
        baud: u32,
        /// Pause between a restore's final status and the next restore, ms.
        #[arg(long, default_value_t = 1000)]
        restore_gap_ms: u64,
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

/// What the collection scenarios set up.
#[derive(Args, Debug)]
struct CollectArgs {
    /// Simulated meters.
    #[arg(long, default_value_t = 10_000)]
    meters: usize,
    /// Intervals per meter per cycle: 1 (the 15-minute cycle) or 96 (a day).
    #[arg(long, default_value_t = 1)]
    rows: u64,
    /// `[collection] max_associations`.
    #[arg(long, default_value_t = 64)]
    max_associations: u64,
    /// `[collection] rows_per_request`.
    #[arg(long, default_value_t = 24)]
    rows_per_request: u64,
    /// HDLC parameters proposed on gateway links, e.g. "max_info = 512, window = 7".
    #[arg(long)]
    hdlc: Option<String>,
    /// Where the configuration, state and the daemon's log go.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run this `headend` binary (`headend run`) as the daemon instead of this executable.
    #[arg(long)]
    daemon_exe: Option<PathBuf>,
}

impl CollectArgs {
    fn setup(&self, fleet: collection::Fleet, tag: &str) -> anyhow::Result<collection::RigSetup> {
        Ok(collection::RigSetup {
            meters: self.meters,
            fleet,
            rows: self.rows,
            max_associations: self.max_associations,
            rows_per_request: self.rows_per_request,
            hdlc: self.hdlc.clone(),
            daemon: daemon_command(self.daemon_exe.as_ref())?,
            dir: self.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("headend-bench-{tag}"))),
            progress: true,
        })
    }
}

fn daemon_command(exe: Option<&PathBuf>) -> anyhow::Result<DaemonCommand> {
    Ok(match exe {
        Some(exe) => DaemonCommand { program: exe.clone(), args: vec!["run".into()] },
        None => DaemonCommand { program: std::env::current_exe()?, args: vec!["daemon".into()] },
    })
}

impl RigArgs {
    fn options(&self) -> anyhow::Result<RigOptions> {
        let daemon = daemon_command(self.daemon_exe.as_ref())?;
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
    // As `headend`'s main: one malloc arena, before any thread allocates.
    headend::collect::limit_allocator_arenas();
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
            Scenario::Collection { c, concentrators, wrapper_group, client_reads } => {
                let machine = report::Machine::read();
                let fleet = match concentrators {
                    Some(k) => collection::Fleet::Concentrators(k),
                    None => collection::Fleet::Direct { wrapper_group },
                };
                let o = collection::CollectionOptions { setup: c.setup(fleet, "collection")?, client_reads };
                let report = tokio::select! {
                    r = collection::run(&o, machine) => r?,
                    _ = interrupted() => anyhow::bail!("interrupted"),
                };
                print!("{}", report.table());
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Scenario::SerialBus { c, baud, restore_gap_ms } => {
                let machine = report::Machine::read();
                let o = serial_bus::BusOptions {
                    setup: c.setup(collection::Fleet::Bus(baud), "serial-bus")?,
                    baud,
                    restore_gap: std::time::Duration::from_millis(restore_gap_ms),
                };
                let report = tokio::select! {
                    r = serial_bus::run(&o, machine) => r?,
                    _ = interrupted() => anyhow::bail!("interrupted"),
                };
                print!("{}", report.table());
                println!("{}", serde_json::to_string(&report)?);
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
