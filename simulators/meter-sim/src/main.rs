//! `meter-sim`: simulated smart meters for the head-end, on a laptop or in CI.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use meter_sim::{console, serve_control, FleetConfig, FleetPorts, SimOptions, Simulator, SystemClock};

const ABOUT: &str = "Simulated DLMS/COSEM and Modbus smart meters, gateways and concentrators";

const LONG_ABOUT: &str = "\
Simulated DLMS/COSEM and Modbus smart meters, gateways and concentrators, for testing,
commissioning and training with the head-end.

--meters N generates a mixed fleet: two in five DLMS meters over the wrapper (TCP,
addressed by destination wPort = logical device 1, 2, 3, ...), two in five DLMS meters
behind HDLC gateways (TCP, addressed by HDLC physical address 16, 17, ...; with --serial,
every other one of those on the serial device instead), one in five Modbus meters behind
TCP gateways (unit ids 1, 2, ...). Control modes 0-6 and authentication (none, LLS,
HLS-GMAC suite 0) are mixed. The same --seed gives the same fleet and keys.

DLMS client SAPs: 16 = public (no authentication, read-only; may also switch meters that
have no authentication), 1 = management (the meter's LLS password or HLS keys).

Every address is printed at start. --write-config writes the head-end's site.toml for the
fleet, with one key file per authenticated meter in keys/ next to it.

Without --headless a table of the most recently active meters is refreshed every second
and commands are read from stdin:
  b <meter>                   press the meter's button (completes a reconnection; in modes
                              1, 2 and 5 disconnects a connected meter)
  f <meter> offline|stuck|refuse|drop [n]|corrupt [n]|delay <ms>|drift <s>|clear
                              toggle or set that meter's faults
  q                           quit
<meter> is a meter id (SIM0000000001), the head-end name (MTR-0001) or its number.

The control API (JSON over HTTP on --control-port): GET /meters, GET /meters/{id},
POST /meters/{id}/button, PUT /meters/{id}/faults (JSON body), GET /endpoints.

See simulators/meter-sim/README.md for the object list and the Modbus register map.";

#[derive(Debug, Parser)]
#[command(name = "meter-sim", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// Generate a mixed fleet of this many meters (ignored with --config).
    #[arg(long, default_value_t = 10)]
    meters: usize,
    /// Load the fleet from a TOML file instead (the format --dump-fleet writes).
    #[arg(long, value_name = "FLEET.toml")]
    config: Option<PathBuf>,
    /// Seed of the generated fleet, its keys and its load model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Address every listener binds.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// DLMS wrapper port (0 = any free port).
    #[arg(long, default_value_t = 4059)]
    wrapper_port: u16,
    /// First HDLC gateway port; further gateways (1000 meters each) take the next ones.
    #[arg(long, default_value_t = 4060)]
    hdlc_port: u16,
    /// First Modbus TCP gateway port; further gateways (247 meters each) the next ones.
    #[arg(long, default_value_t = 5020)]
    modbus_port: u16,
    /// Emulate bus timing on the HDLC gateways at this baud rate (one request at a time).
    #[arg(long, value_name = "BAUD")]
    bus_baud: Option<u32>,
    /// Serial device (RS-485 adapter, pty) for part of the HDLC meters.
    #[arg(long, value_name = "PATH")]
    serial: Option<String>,
    /// Serial baud rate.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Control API port (0 = any free port).
    #[arg(long, default_value_t = 8059)]
    control_port: u16,
    /// The meters' time zone, minutes ahead of UTC (480 = UTC+8).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    utc_offset: i16,
    /// No console: print the addresses and run until Ctrl-C.
    #[arg(long)]
    headless: bool,
    /// Write the head-end configuration for this fleet to FILE (key files next to it).
    #[arg(long, value_name = "FILE")]
    write_config: Option<PathBuf>,
    /// Write the fleet (generated or loaded) as a fleet TOML file, to edit and reuse.
    #[arg(long, value_name = "FILE")]
    dump_fleet: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let fleet = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<FleetConfig>(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => {
            if args.meters == 0 {
                bail!("--meters must be at least 1");
            }
            let ports = FleetPorts {
                host: args.host,
                wrapper_port: args.wrapper_port,
                hdlc_port: args.hdlc_port,
                modbus_port: args.modbus_port,
                serial: args.serial.clone().map(|p| (p, args.baud)),
                hdlc_bus_baud: args.bus_baud,
            };
            FleetConfig::generate(args.meters, args.seed, &ports)
        }
    };
    if let Some(path) = &args.dump_fleet {
        let text = toml::to_string(&fleet).context("encoding the fleet")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("fleet written to {}", path.display());
    }

    let options = SimOptions { clock: std::sync::Arc::new(SystemClock), utc_offset_minutes: args.utc_offset };
    let sim = Simulator::start_with(fleet, options).await.context("starting the simulator")?;
    println!("meter-sim: {} meters", sim.config().meters.len());
    for e in sim.endpoints() {
        let place = match (&e.addr, &e.serial_path) {
            (Some(addr), _) => addr.to_string(),
            (None, Some(path)) => format!("{path} @ {} baud", e.baud.unwrap_or(0)),
            (None, None) => String::new(),
        };
        println!("  {:<18} {:<28} {} meters", format!("{:?}", e.kind), place, e.meters.len());
    }
    let control = serve_control(&sim, SocketAddr::new(args.host, args.control_port)).await?;
    println!("  control API        http://{control}/meters");
    if let Some(path) = &args.write_config {
        sim.write_headend_config(path)?;
        println!("head-end config written to {}", path.display());
    }

    if args.headless {
        println!("running; Ctrl-C stops");
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    } else {
        tokio::select! {
            () = console::run(&sim, Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    sim.shutdown().await;
    Ok(())
}
