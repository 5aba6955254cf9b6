//! Like with like for `collection`: the DLMS client alone reading a day's load profile
//! (96 rows) and the clock from one simulated meter over HDLC, on a fresh association
//! each time, as a collection job does; the head-end's driver against Gurux (Python,
//! `tests/interop/gurux_client.py`). Both keep one TCP connection (the gateway's) and
//! read the capture objects once, before the timed loop.
//!
//! Each does what it does in the field: the head-end reads the range in sub-ranges of
//! `rows_per_request` (so that control work can run between two requests); Gurux reads
//! it in one request (datablocks or HDLC segments as the meter sends them). The
//! simulator's CPU is in neither figure.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};
use meter_sim::{EndpointSpec, FleetConfig, MeterSpec, Simulator};
use serde::Serialize;

use crate::report::round;

/// Rows in a day's profile.
const ROWS: i64 = 96;
const PERIOD_S: i64 = 900;

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct ClientAlone {
    /// Reads timed per client.
    pub reads: usize,
    /// HDLC parameters both proposed.
    pub hdlc: String,
    /// Rows per read the head-end's driver got (96 expected).
    pub headend_rows: usize,
    /// Head-end driver CPU per read, ms.
    pub headend_cpu_ms_per_read: f64,
    /// Its wall time per read, ms.
    pub headend_wall_ms_per_read: f64,
    /// Gurux CPU per read, ms.
    pub gurux_cpu_ms_per_read: Option<f64>,
    /// Its wall time per read, ms.
    pub gurux_wall_ms_per_read: Option<f64>,
    /// Rows per read Gurux got.
    pub gurux_rows: Option<usize>,
    /// Gurux CPU / head-end CPU.
    pub ratio: Option<f64>,
    /// Why Gurux was not measured.
    pub gurux_error: Option<String>,
}

impl ClientAlone {
    /// One line for the table.
    pub fn line(&self) -> String {
        let gurux = match (self.gurux_cpu_ms_per_read, self.ratio) {
            (Some(g), Some(r)) => format!("Gurux {g:.2} ms ({r:.1}x)"),
            _ => format!("Gurux not measured: {}", self.gurux_error.as_deref().unwrap_or("?")),
        };
        format!(
            "head-end driver {:.3} ms CPU ({:.2} ms wall) per read of {} rows; {gurux}; {} reads each, HDLC {}",
            self.headend_cpu_ms_per_read, self.headend_wall_ms_per_read, self.headend_rows, self.reads, self.hdlc
        )
    }
}

/// Measure both.
pub async fn run(reads: usize, rows_per_request: u64, hdlc: Option<&str>, dir: &Path) -> anyhow::Result<ClientAlone> {
    let dir = dir.join("client-alone");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut spec = MeterSpec::dlms("SIM0000000001", 0);
    spec.physical_address = 16;
    let fleet = FleetConfig {
        meters: vec![spec],
        endpoints: vec![EndpointSpec::DlmsHdlcTcp {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            meters: vec![0],
            baud: None,
        }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(fleet).await?;
    let addr = sim.endpoints().first().and_then(|e| e.addr).context("the gateway's port")?;
    let hdlc_text = hdlc.unwrap_or("max_info = 128, window = 1").to_owned();
    let (max_info, window) = parse_hdlc(&hdlc_text);
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"state\"\n\n[[link]]\nname = \"dc\"\nprotocol = \"dlms-hdlc\"\naddress = \"{addr}\"\n\
             timeout_ms = 5000\nhdlc = {{ {hdlc_text} }}\n\n[[meter]]\nid = \"MTR-1\"\nlink = \"dc\"\n\
             physical_address = 16\n"
        ),
    )?;
    let site = headend::config::SiteConfig::load(&config)?;
    let now = sim.now_ms().div_euclid(1000);
    let to = now - now.rem_euclid(PERIOD_S);
    let from = to - (ROWS - 1) * PERIOD_S;
    let gurux = tokio::task::spawn_blocking(move || gurux(reads, addr.port(), max_info, window, from, to)).await?;
    let (cpu_ns, wall, rows) =
        tokio::task::spawn_blocking(move || headend_driver(reads, &site, rows_per_request, from, to)).await??;
    sim.shutdown().await;
    let reads_f = reads.max(1) as f64;
    let headend_cpu = cpu_ns as f64 / 1e6 / reads_f;
    let (gurux_cpu, gurux_wall, gurux_rows, gurux_error) = match gurux {
        Ok((c, w, r)) => (Some(round(c * 1e3 / reads_f, 3)), Some(round(w * 1e3 / reads_f, 3)), Some(r), None),
        Err(e) => (None, None, None, Some(format!("{e:#}"))),
    };
    Ok(ClientAlone {
        reads,
        hdlc: hdlc_text,
        headend_rows: rows,
        headend_cpu_ms_per_read: round(headend_cpu, 3),
        headend_wall_ms_per_read: round(wall * 1e3 / reads_f, 3),
        gurux_cpu_ms_per_read: gurux_cpu,
        gurux_wall_ms_per_read: gurux_wall,
        gurux_rows,
        ratio: gurux_cpu.map(|g| round(g / headend_cpu.max(1e-9), 1)),
        gurux_error,
    })
}

/// `max_info = 512, window = 7` → (512, 7); defaults 128 and 1.
fn parse_hdlc(text: &str) -> (u16, u8) {
    let mut out = (128u16, 1u8);
    for part in text.split(',') {
        let Some((k, v)) = part.split_once('=') else { continue };
        match (k.trim(), v.trim()) {
            ("max_info", v) => out.0 = v.parse().unwrap_or(out.0),
            ("window", v) => out.1 = v.parse().unwrap_or(out.1),
            _ => {}
        }
    }
    out
}

/// CPU time of the calling thread so far, ns.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The head-end's driver on this thread: (CPU ns, wall s, rows per read).
fn headend_driver(
    reads: usize,
    site: &headend::config::SiteConfig,
    rows_per_request: u64,
    from: i64,
    to: i64,
) -> anyhow::Result<(u64, f64, usize)> {
    use headend::driver::{Driver, Link};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let meter = site.meters.first().context("one meter")?;
        let link_cfg = site.link(&meter.link).context("its link")?;
        let counters = headend::dlms::counter::CounterStore::new(site.state_dir().join("invocation-counters"));
        let mut d = Driver::from_config(site, meter, counters)?;
        let mut link = Link::open(link_cfg).await?;
        let obis = headend::dlms::cosem::parse_obis("1.0.99.1.0.255").context("OBIS")?;
        let span = i64::try_from(rows_per_request.max(1))? * PERIOD_S;
        // Warm-up: capture objects, period and scalers are read here, once.
        let mut rows = read_day(&mut d, &mut link, obis, (from, to), span).await?;
        let (cpu0, t0) = (thread_cpu_ns(), Instant::now());
        for _ in 0..reads {
            rows = read_day(&mut d, &mut link, obis, (from, to), span).await?;
        }
        Ok((thread_cpu_ns().saturating_sub(cpu0), t0.elapsed().as_secs_f64(), rows))
    })
}

/// One read as a collection job does it: the clock, the day in sub-ranges, release.
async fn read_day(
    d: &mut headend::driver::Driver,
    link: &mut headend::driver::Link,
    obis: dlms_cosem_rs::obis::Obis,
    (from, to): (i64, i64),
    span: i64,
) -> anyhow::Result<usize> {
    d.read_clock(link).await?;
    let mut rows = 0;
    let mut at = from;
    while at <= to {
        let end = to.min(at + span - 1);
        rows += d.read_profile(link, obis, at, end).await?.rows.len();
        at = end + 1;
    }
    d.close(link).await;
    Ok(rows)
}

const GURUX_LOOP: &str = r#"
import datetime, json, sys, time
sys.path.insert(0, sys.argv[1])
import gurux_client as g
reads, max_info, window, t_from, t_to = (int(v) for v in sys.argv[2:7])
args = g.parse_args(sys.argv[7:])
out = sys.stdout
sys.stdout = g.GuruxPrints(sys.stderr, False)
s = g.Session(args)
h = s.client.hdlcSettings
h.maxInfoRX = h.maxInfoTX = max_info
h.windowSizeRX = h.windowSizeTX = window
s.connect()
pg = g.GXDLMSProfileGeneric(g.LOAD_PROFILE)
clock = g.GXDLMSClock(g.CLOCK)
utc = datetime.timezone.utc
start = datetime.datetime.fromtimestamp(t_from, utc)
end = datetime.datetime.fromtimestamp(t_to, utc)
def one(first):
    s.associate()
    if first:
        s.read(pg, 3)
        s.read(pg, 4)
    s.read(clock, 2)
    reply = s.request(s.client.readRowsByRange(pg, start, end))
    s.client.updateValue(pg, 2, reply.value)
    n = len(pg.buffer)
    err = s.release()
    if err:
        raise Exception(err)
    return n
rows = one(True)
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(reads):
    rows = one(False)
c1, w1 = time.process_time(), time.perf_counter()
s.close()
out.write(json.dumps({"cpu_s": c1 - c0, "wall_s": w1 - w0, "rows": rows}) + "\n")
"#;

/// Gurux's loop in python3: (CPU s, wall s, rows per read).
fn gurux(reads: usize, port: u16, max_info: u16, window: u8, from: i64, to: i64) -> anyhow::Result<(f64, f64, usize)> {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    let out = Command::new("python3")
        .arg("-c")
        .arg(GURUX_LOOP)
        .arg(&interop)
        .args([reads.to_string(), max_info.to_string(), window.to_string(), from.to_string(), to.to_string()])
        .args(["--port", &port.to_string(), "--transport", "hdlc", "--logical", "1", "--physical", "16"])
        .args(["--client", "16", "--auth", "none"])
        .output()
        .context("running python3")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("python3 exited {}: {}", out.status, err.lines().last().unwrap_or(""));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("the Gurux loop's JSON")?;
    match (v["cpu_s"].as_f64(), v["wall_s"].as_f64(), v["rows"].as_u64()) {
        (Some(c), Some(w), Some(r)) => Ok((c, w, r as usize)),
        _ => bail!("unexpected output {v}"),
    }
}
