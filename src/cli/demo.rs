//! `headend demo`: a simulated fleet in-process and a tour of what the head-end does
//! with it, using the same drivers and configuration as production. It leaves the fleet
//! running and prints what to try from a second terminal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use meter_sim::{FleetConfig, FleetPorts, SimOptions, Simulator};

use headend::config::SiteConfig;
use headend::dlms::cosem;
use headend::dlms::counter::CounterStore;
use headend::driver::{Driver, Link};
use headend::meter::{MeterError, SwitchOutcome};
use headend::time::{Clock, SystemClock};

/// Arguments of `headend demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many simulated meters.
    #[arg(long, default_value_t = 10)]
    meters: usize,
    /// Where the generated site configuration goes.
    #[arg(long, default_value = "demo-site")]
    dir: PathBuf,
    /// Run the tour and exit, instead of keeping the fleet up for a second terminal.
    #[arg(long)]
    once: bool,
    /// Seed of the simulated fleet (keys, load).
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Run the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let fleet = FleetConfig::generate(args.meters.max(5), args.seed, &FleetPorts::default());
    let options = SimOptions { clock: Arc::new(meter_sim::SystemClock), utc_offset_minutes: 480 };
    let sim = Simulator::start_with(fleet, options).await.context("starting the simulated fleet")?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let config = args.dir.join("site.toml");
    sim.write_headend_config(&config).context("writing the site configuration")?;
    let site = SiteConfig::load(&config)?;

    println!("A simulated fleet of {} meters is up:", site.meters.len());
    for e in sim.endpoints() {
        let at = e.addr.map(|a| a.to_string()).or(e.serial_path.clone()).unwrap_or_default();
        println!("  {:<18} {at:<22} {} meter(s)", format!("{:?}", e.kind), e.meters.len());
    }
    println!("Site configuration: {}\n", config.display());

    let mut failures = 0;
    let mut seen_links = Vec::new();
    for meter in &site.meters {
        // One meter of each link kind is enough for a tour.
        if seen_links.contains(&meter.link) {
            continue;
        }
        seen_links.push(meter.link.clone());
        if let Err(e) = tour(&site, &meter.id.to_string(), &sim).await {
            println!("  {} failed: {e}", meter.id);
            failures += 1;
        }
    }

    let first = site.meters.first().map(|m| m.id.to_string()).unwrap_or_default();
    println!("\nTry from a second terminal:");
    let cmd = format!("cargo run --release -- meter --config {}", config.display());
    println!("  {cmd} identify {first}");
    println!("  {cmd} read {first}");
    println!("  {cmd} profile {first} --hours 3");
    println!("  {cmd} disconnect {first}");
    println!("  {cmd} reconnect {first} --json");
    if args.once {
        sim.shutdown().await;
    } else {
        println!("\nThe fleet stays up until Ctrl-C.");
        let _ = tokio::signal::ctrl_c().await;
        sim.shutdown().await;
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Identify, read, cut and restore one meter, and read its last hours of profile.
async fn tour(site: &SiteConfig, id: &str, sim: &Simulator) -> Result<(), MeterError> {
    let meter = site.meter(id).ok_or_else(|| MeterError::Unsupported(format!("no meter {id}")))?;
    let link_cfg = site.link(&meter.link).ok_or_else(|| MeterError::Unsupported("no link".into()))?;
    let counters = CounterStore::new(site.state_dir().join("invocation-counters"));
    let mut driver = Driver::from_config(site, meter, counters).map_err(|e| MeterError::Unsupported(e.to_string()))?;
    let mut link = Link::open(link_cfg).await?;
    let result = async {
        let identity = driver.read_identity(&mut link).await?;
        let relay = driver.read_relay(&mut link).await?;
        let registers = driver.read_registers(&mut link).await?;
        let energy = registers.first().map(|r| format!("{:.0} {}", r.value, r.unit)).unwrap_or_default();
        println!(
            "{id} on {} ({:?}, auth {:?}): {} relay {}{}, import {energy}",
            meter.link,
            link_cfg.protocol,
            meter.auth,
            identity.name,
            relay.state,
            relay.control_mode.map(|m| format!(" (mode {})", m.0)).unwrap_or_default(),
        );
        if relay.control_mode.is_some_and(|m| m.is_fixed_connected()) {
            println!("  control mode 0: this meter cannot be switched remotely");
        } else {
            if let Some(expected) = &meter.identity {
                driver.verify_identity(&mut link, expected).await?;
            }
            let cut = driver.disconnect(&mut link).await?;
            println!("  disconnect: {cut:?}, relay read back");
            match driver.reconnect(&mut link).await? {
                SwitchOutcome::Done => println!("  reconnect: closed directly"),
                SwitchOutcome::Armed => {
                    println!("  reconnect: armed; the customer presses the button ...");
                    sim.press_button(&identity.name).map_err(|e| MeterError::Unsupported(e.to_string()))?;
                    println!("  relay now {}", driver.read_relay(&mut link).await?.state);
                }
            }
        }
        let now = SystemClock.now();
        match driver.read_profile(&mut link, cosem::LOAD_PROFILE, now - 3 * 3600, now).await {
            Ok(p) => {
                println!("  load profile: {} rows of {} s over the last 3 hours", p.rows.len(), p.capture_period_s)
            }
            Err(MeterError::Unsupported(why)) => println!("  load profile: {why}"),
            Err(e) => return Err(e),
        }
        Ok(())
    }
    .await;
    driver.close(&mut link).await;
    result
}
