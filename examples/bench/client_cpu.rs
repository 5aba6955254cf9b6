//! `client-cpu`: the DLMS client's CPU per reconnect operation, like with like: the
//! head-end's driver against the Gurux Python client (`tests/interop/gurux_client.py`,
//! Gurux as the protocol engine over a plain socket), on the same simulated meter, over
//! one association each, doing the same exchanges per operation: GET the logical device
//! name (identity), ACTION remote_disconnect or remote_reconnect (alternately, so that
//! the relay really moves), GET the disconnect control's attributes 2, 3 and 4 (read-back).
//!
//! The head-end's driver runs on a thread of its own (a current-thread runtime) whose CPU
//! time is read from /proc/thread-self/schedstat (nanoseconds); the simulator serves from
//! other threads. Gurux measures itself with `time.process_time()` around the loop, so
//! the interpreter's start-up is not counted. Neither figure holds the simulator's CPU.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};
use meter_sim::{EndpointSpec, FleetConfig, MeterSpec, SimAuth, Simulator};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::report::{round, Table};

/// One authentication's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCpu {
    /// none, lls or hls-gmac.
    pub auth: String,
    /// Operations timed (after two warm-up operations).
    pub ops: usize,
    /// Head-end driver: CPU per operation, µs.
    pub headend_cpu_us_per_op: f64,
    /// Head-end driver: wall time per operation, µs (round trips to the simulator).
    pub headend_wall_us_per_op: f64,
    /// Gurux: CPU per operation, µs.
    pub gurux_cpu_us_per_op: Option<f64>,
    /// Gurux: wall time per operation, µs.
    pub gurux_wall_us_per_op: Option<f64>,
    /// Gurux CPU / head-end CPU.
    pub ratio: Option<f64>,
    /// Why Gurux could not be measured.
    pub gurux_error: Option<String>,
}

/// Measure each authentication in turn.
pub async fn run(ops: usize, dir: &Path) -> anyhow::Result<Vec<ClientCpu>> {
    let mut out = Vec::new();
    for (k, auth) in ["none", "lls", "hls-gmac"].into_iter().enumerate() {
        out.push(one(ops.max(1), auth, &dir.join(auth), k as u64).await?);
    }
    Ok(out)
}

/// The table.
pub fn table(rows: &[ClientCpu]) -> String {
    let mut t = Table::default();
    for r in rows {
        let gurux = match (r.gurux_cpu_us_per_op, r.gurux_wall_us_per_op, r.ratio) {
            (Some(c), Some(w), Some(x)) => format!("Gurux {c:.0} µs CPU ({w:.0} µs wall); ratio {x:.1}x"),
            _ => format!("Gurux not measured: {}", r.gurux_error.as_deref().unwrap_or("?")),
        };
        t.row(
            format!("{} ({} ops)", r.auth, r.ops),
            format!(
                "head-end driver {:.0} µs CPU ({:.0} µs wall) per reconnect op; {gurux}",
                r.headend_cpu_us_per_op, r.headend_wall_us_per_op
            ),
        );
    }
    format!("DLMS client CPU per reconnect operation (identity GET, ACTION, 3 GETs read-back)\n{}", t.render())
}

async fn one(ops: usize, auth: &str, dir: &Path, seed: u64) -> anyhow::Result<ClientCpu> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut spec = MeterSpec::dlms("SIM0000000001", 0);
    spec.control_mode = 2;
    spec.auth = match auth {
        "none" => SimAuth::None,
        "lls" => SimAuth::Lls { password: format!("{:08X}", rng.gen::<u32>()) },
        _ => SimAuth::HlsGmac { guek: rng.gen(), gak: rng.gen() },
    };
    let fleet = FleetConfig {
        meters: vec![spec.clone()],
        endpoints: vec![EndpointSpec::DlmsWrapperTcp {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            meters: vec![0],
        }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(fleet).await?;
    let port = sim.endpoints().first().and_then(|e| e.addr).map(|a| a.port()).context("the wrapper's port")?;
    let config = dir.join("site.toml");
    sim.write_headend_config(&config)?;

    // Gurux first: it starts its HLS invocation counter at 1, which the meter refuses once
    // it has seen higher ones; the head-end's driver resynchronises by itself.
    let gurux = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || gurux(ops, port, &spec)).await?
    };

    let site = headend::config::SiteConfig::load(&config)?;
    let (elapsed_ns, wall) = {
        let site = site.clone();
        tokio::task::spawn_blocking(move || headend_driver(ops, &site)).await??
    };
    sim.shutdown().await;
    let headend_cpu = elapsed_ns as f64 / 1000.0 / ops as f64;
    let (gurux_cpu, gurux_wall, gurux_error) = match gurux {
        Ok((c, w)) => (Some(round(c * 1e6 / ops as f64, 1)), Some(round(w * 1e6 / ops as f64, 1)), None),
        Err(e) => (None, None, Some(format!("{e:#}"))),
    };
    Ok(ClientCpu {
        auth: auth.to_owned(),
        ops,
        headend_cpu_us_per_op: round(headend_cpu, 1),
        headend_wall_us_per_op: round(wall * 1e6 / ops as f64, 1),
        gurux_cpu_us_per_op: gurux_cpu,
        gurux_wall_us_per_op: gurux_wall,
        ratio: gurux_cpu.map(|g| round(g / headend_cpu.max(1e-9), 1)),
        gurux_error,
    })
}

/// CPU time of the calling thread so far, ns.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The head-end's driver on this (blocking-pool) thread: (CPU ns, wall s) for `ops`.
fn headend_driver(ops: usize, site: &headend::config::SiteConfig) -> anyhow::Result<(u64, f64)> {
    use headend::driver::{Driver, Link};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let meter = site.meters.first().context("one meter")?;
        let link_cfg = site.link(&meter.link).context("its link")?;
        let counters = headend::dlms::counter::CounterStore::new(site.state_dir().join("invocation-counters"));
        let mut d = Driver::from_config(site, meter, counters)?;
        let mut link = Link::open(link_cfg).await?;
        let expected = meter.identity.clone().context("identity")?;
        // Warm-up: the association (and an HLS counter resynchronisation) happen here.
        reconnect_op(&mut d, &mut link, &expected, 0).await?;
        reconnect_op(&mut d, &mut link, &expected, 1).await?;
        let (cpu0, t0) = (thread_cpu_ns(), Instant::now());
        for i in 0..ops {
            reconnect_op(&mut d, &mut link, &expected, i).await?;
        }
        let (cpu, wall) = (thread_cpu_ns().saturating_sub(cpu0), t0.elapsed().as_secs_f64());
        d.close(&mut link).await;
        Ok((cpu, wall))
    })
}

/// One operation as the daemon's channel does it: identity, then the switch and its
/// read-back (disconnect on even `i`, reconnect on odd).
async fn reconnect_op(
    d: &mut headend::driver::Driver,
    link: &mut headend::driver::Link,
    expected: &str,
    i: usize,
) -> anyhow::Result<()> {
    d.verify_identity(link, expected).await?;
    if i.is_multiple_of(2) {
        d.disconnect(link).await?;
    } else {
        d.reconnect(link).await?;
    }
    Ok(())
}

const GURUX_LOOP: &str = r#"
import json, sys, time
sys.path.insert(0, sys.argv[1])
import gurux_client as g
ops = int(sys.argv[2])
args = g.parse_args(sys.argv[3:])
out = sys.stdout
sys.stdout = g.GuruxPrints(sys.stderr, False)
s = g.Session(args)
s.connect()
s.associate()
ldn = g.GXDLMSData(g.LDN)
dc = g.GXDisconnect()
def op(i):
    s.read(ldn, 2)
    s.action(dc.obj.remoteDisconnect(s.client) if i % 2 == 0 else dc.obj.remoteReconnect(s.client))
    dc.read_all(s)
op(0)
op(1)
c0, w0 = time.process_time(), time.perf_counter()
for i in range(ops):
    op(i)
c1, w1 = time.process_time(), time.perf_counter()
s.release()
s.close()
out.write(json.dumps({"cpu_s": c1 - c0, "wall_s": w1 - w0}) + "\n")
"#;

/// Gurux's loop in python3: (CPU s, wall s) for `ops`.
fn gurux(ops: usize, port: u16, spec: &MeterSpec) -> anyhow::Result<(f64, f64)> {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    let mut args: Vec<String> = vec![
        "--port".into(),
        port.to_string(),
        "--transport".into(),
        "wrapper".into(),
        "--logical".into(),
        spec.logical_device.to_string(),
    ];
    match &spec.auth {
        SimAuth::None => args.extend(["--client".into(), "16".into(), "--auth".into(), "none".into()]),
        SimAuth::Lls { password } => {
            args.extend(["--client", "1", "--auth", "lls", "--password", password.as_str()].map(String::from));
        }
        SimAuth::HlsGmac { guek, gak } => args.extend([
            "--client".into(),
            "1".into(),
            "--auth".into(),
            "hls-gmac".into(),
            "--guek".into(),
            meter_sim::hex(guek),
            "--gak".into(),
            meter_sim::hex(gak),
        ]),
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(GURUX_LOOP)
        .arg(&interop)
        .arg(ops.to_string())
        .args(&args)
        .output()
        .context("running python3")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("python3 exited {}: {}", out.status, err.lines().last().unwrap_or(""));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("the Gurux loop's JSON")?;
    match (v["cpu_s"].as_f64(), v["wall_s"].as_f64()) {
        (Some(c), Some(w)) => Ok((c, w)),
        _ => bail!("unexpected output {v}"),
    }
}
