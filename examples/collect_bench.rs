//! One collection cycle of the daemon over a simulated fleet: wall time until every
//! meter's readings are on the broker, the daemon's CPU and memory, and on an emulated
//! bus the cycle against the wire time of the bytes exchanged. Figures in BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release --bin headend --example collect_bench
//! target/release/examples/collect_bench fleet 10000            # meter-sim's mixed fleet
//! target/release/examples/collect_bench concentrators 100000 500
//! target/release/examples/collect_bench bus 20 9600
//! ```
//!
//! The simulator runs in this process, `headend run` as a child (so its CPU and memory
//! are its own), mosquitto as another. The cycle is started with `{p}/admin/collect`.
//! Environment: `ROWS` intervals per meter (default 1: the 15-minute cycle; 96: a day),
//! `ASSOCIATIONS` (`[collection] max_associations`, default 64), `WRAPPER_GROUP` (wrapper
//! meters per link in the mixed fleet, default 50), `PER_REQUEST` (`rows_per_request`,
//! default 24), `HDLC` (HDLC parameters of the
//! concentrator links, e.g. `max_info = 512, window = 7`), `HEADEND` (the daemon binary).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use meter_sim::{EndpointSpec, FleetConfig, FleetPorts, MeterSpec, SimOptions, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::{TcpListener, TcpStream};

/// The simulator's clock, `behind_ms` behind the system's: the first cycle finds the
/// meters a cycle behind (it warms the head-end's caches), the second, after the clock
/// caught up, is the one measured.
struct Behind {
    behind_ms: AtomicI64,
}

impl meter_sim::Clock for Behind {
    fn now_ms(&self) -> i64 {
        meter_sim::SystemClock.now_ms() - self.behind_ms.load(Ordering::SeqCst)
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes through a proxy, both ways.
#[derive(Default)]
struct Wire {
    to_meter: AtomicU64,
    from_meter: AtomicU64,
}

/// Forward `127.0.0.1:0` to `target`, counting bytes.
async fn counting_proxy(target: SocketAddr, wire: Arc<Wire>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let wire = Arc::clone(&wire);
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(target).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let w1 = Arc::clone(&wire);
                let up = async move { copy_counting(&mut cr, &mut uw, &w1.to_meter).await };
                let down = async move { copy_counting(&mut ur, &mut cw, &wire.from_meter).await };
                tokio::join!(up, down);
            });
        }
    });
    Ok(addr)
}

async fn copy_counting(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    n: &AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 4096];
    while let Ok(k) = r.read(&mut buf).await {
        if k == 0 || w.write_all(&buf[..k]).await.is_err() {
            return;
        }
        n.fetch_add(k as u64, Ordering::Relaxed);
    }
}

/// CPU seconds (user + system) and resident / peak memory (KiB) of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("stat"))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?.trim().parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks as f64 / hz, kib("VmRSS:"), kib("VmHWM:")))
}

fn start_mosquitto(dir: &Path) -> anyhow::Result<(Kill, u16)> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"))?;
    let child = Command::new("mosquitto").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((Kill(child), port));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(anyhow!("mosquitto did not start"))
}

/// The generated site config, with wrapper meters spread over links of `group` meters
/// (each link is one TCP connection; in the field each meter is its own endpoint).
fn regroup_wrapper(text: &str, group: usize) -> anyhow::Result<String> {
    let mut t: toml::Table = toml::from_str(text)?;
    let mut wrapper_addr = None;
    if let Some(toml::Value::Array(links)) = t.get("link") {
        for l in links {
            if l.get("name").and_then(|n| n.as_str()) == Some("wrapper-1") {
                wrapper_addr = l.get("address").cloned();
            }
        }
    }
    let Some(addr) = wrapper_addr else { return Ok(text.to_owned()) };
    let mut k = 0usize;
    let mut groups = 0usize;
    if let Some(toml::Value::Array(meters)) = t.get_mut("meter") {
        for m in meters.iter_mut() {
            if m.get("link").and_then(|n| n.as_str()) == Some("wrapper-1") {
                if let Some(tab) = m.as_table_mut() {
                    tab.insert("link".into(), toml::Value::String(format!("wrapper-1-{}", k / group)));
                }
                k += 1;
                groups = k.div_ceil(group);
            }
        }
    }
    if let Some(toml::Value::Array(links)) = t.get_mut("link") {
        links.retain(|l| l.get("name").and_then(|n| n.as_str()) != Some("wrapper-1"));
        for g in 0..groups {
            let mut l = toml::Table::new();
            l.insert("name".into(), toml::Value::String(format!("wrapper-1-{g}")));
            l.insert("protocol".into(), toml::Value::String("dlms-wrapper".into()));
            l.insert("address".into(), addr.clone());
            links.push(toml::Value::Table(l));
        }
    }
    Ok(toml::to_string(&t)?)
}

/// A fleet of `n` DLMS meters without authentication behind `k` HDLC gateways.
fn concentrators(n: usize, k: usize, baud: Option<u32>) -> FleetConfig {
    let per = n.div_ceil(k.max(1));
    let meters = (0..n)
        .map(|i| {
            let mut m = MeterSpec::dlms(format!("SIM{:010}", i + 1), i);
            m.physical_address = 16 + (i % per) as u16;
            m
        })
        .collect();
    let endpoints = (0..k)
        .map(|g| EndpointSpec::DlmsHdlcTcp {
            bind: "127.0.0.1:0".parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            meters: (g * per..((g + 1) * per).min(n)).collect(),
            baud,
        })
        .collect();
    FleetConfig { meters, endpoints, ..FleetConfig::default() }
}

/// What one cycle took.
struct Cycle {
    meters: usize,
    rows: u64,
    wall: f64,
    cpu: f64,
}

impl Cycle {
    fn line(&self, n: usize) -> String {
        format!(
            "{} of {n} meters, {} rows in {:.2} s; daemon CPU {:.2} s = {:.3} s per 1000 reads",
            self.meters,
            self.rows,
            self.wall,
            self.cpu,
            self.cpu * 1000.0 / (self.meters.max(1) as f64)
        )
    }
}

/// Wait until every meter has `want` rows (or nothing arrives for a minute).
async fn cycle(
    ev: &mut rumqttc::EventLoop,
    per_meter: &mut HashMap<String, u64>,
    snapshots: &mut HashSet<String>,
    n: usize,
    want: u64,
    pid: u32,
) -> anyhow::Result<Cycle> {
    let (cpu0, _, _) = usage(pid)?;
    let t0 = Instant::now();
    let before: u64 = per_meter.values().sum();
    let done = |m: &HashMap<String, u64>| m.values().filter(|r| **r >= want).count();
    let mut complete = done(per_meter);
    while complete < n {
        match tokio::time::timeout(Duration::from_secs(60), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.contains("/readings/") => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
                let r = v["rows"].as_array().map_or(0, Vec::len) as u64;
                let meter = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
                if v["source"] == "snapshot" {
                    snapshots.insert(meter.clone());
                }
                let e = per_meter.entry(meter).or_default();
                let was = *e >= want;
                *e += r;
                if !was && *e >= want {
                    complete += 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(anyhow!("observer: {e}")),
            Err(_) => break,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, _, _) = usage(pid)?;
    Ok(Cycle { meters: complete, rows: per_meter.values().sum::<u64>() - before, wall, cpu: cpu1 - cpu0 })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage_text = "usage: collect_bench fleet N | concentrators N K | bus N BAUD";
    let kind = args.first().ok_or_else(|| anyhow!(usage_text))?.clone();
    let n: usize = args.get(1).ok_or_else(|| anyhow!(usage_text))?.parse()?;
    let rows = env_or("ROWS", 1);
    let associations = env_or("ASSOCIATIONS", 64);
    let dir = std::env::temp_dir().join(format!("collect-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let site = dir.join("site.toml");
    let wire = Arc::new(Wire::default());
    let mut baud = None;

    let behind = Arc::new(Behind { behind_ms: AtomicI64::new(i64::try_from(rows * 900_000)?) });
    let options = || SimOptions { clock: Arc::clone(&behind) as Arc<dyn meter_sim::Clock>, utc_offset_minutes: 0 };
    let started = Instant::now();
    let (sim, mut text) = match kind.as_str() {
        "fleet" => {
            let sim = Simulator::start_with(FleetConfig::generate(n, 1, &FleetPorts::default()), options()).await?;
            sim.write_headend_config(&site)?;
            let text = std::fs::read_to_string(&site)?;
            (sim, regroup_wrapper(&text, env_or("WRAPPER_GROUP", 50) as usize)?)
        }
        "concentrators" | "bus" => {
            let (k, b) = if kind == "bus" {
                let b: u32 = args.get(2).ok_or_else(|| anyhow!(usage_text))?.parse()?;
                (1, Some(b))
            } else {
                (args.get(2).ok_or_else(|| anyhow!(usage_text))?.parse()?, None)
            };
            baud = b;
            // HDLC parameters proposed to the meters, e.g. HDLC="max_info = 512, window = 7".
            let hdlc = std::env::var("HDLC").map(|h| format!("hdlc = {{ {h} }}\n")).unwrap_or_default();
            let sim = Simulator::start_with(concentrators(n, k, b), options()).await?;
            let mut text = String::from("state_dir = \"state\"\n\n");
            for (g, e) in sim.endpoints().iter().enumerate() {
                let mut addr = e.addr.ok_or_else(|| anyhow!("unbound"))?;
                if b.is_some() {
                    addr = counting_proxy(addr, Arc::clone(&wire)).await?;
                }
                let timeout = if b.is_some() { 20_000 } else { 5000 };
                text.push_str(&format!(
                    "[[link]]\nname = \"dc-{g}\"\nprotocol = \"dlms-hdlc\"\naddress = \"{addr}\"\ntimeout_ms = {timeout}\n{hdlc}\n"
                ));
                for &i in &e.meters {
                    let m = &sim.config().meters[i];
                    text.push_str(&format!(
                        "[[meter]]\nid = \"MTR-{:06}\"\nlink = \"dc-{g}\"\nidentity = \"{}\"\nphysical_address = {}\n\n",
                        i + 1,
                        m.id,
                        m.physical_address
                    ));
                }
            }
            (sim, text)
        }
        _ => return Err(anyhow!(usage_text)),
    };
    let prefix = "bench";
    text.push_str(&format!(
        "\n[mqtt]\nprefix = \"{prefix}\"\n\n[collection]\ninterval_s = 900\nspread_s = 0\nsettle_s = 0\n\
         horizon_s = {}\nrows_per_job = {}\nrows_per_request = {}\nmax_associations = {associations}\n",
        2 * rows * 900,
        (2 * rows).max(96),
        env_or("PER_REQUEST", 24)
    ));
    std::fs::write(&site, &text)?;
    println!("fleet: {n} meters ({kind}), simulator up in {:.1} s", started.elapsed().as_secs_f64());

    let (_broker, port) = start_mosquitto(&dir)?;
    let bin = std::env::var("HEADEND")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/headend"));
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let daemon = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&site)
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("{} (build it with cargo build --release)", bin.display()))?;
    let pid = daemon.id();
    let _daemon = Kill(daemon);

    let mut o = MqttOptions::new("bench-observer", "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(o, 1024);
    client.subscribe(format!("{prefix}/readings/+"), QoS::AtLeastOnce).await?;
    client.subscribe(format!("{prefix}/status"), QoS::AtLeastOnce).await?;
    let t_start = Instant::now();
    loop {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(Duration::from_secs(300), ev.poll()).await?? {
            if p.topic.ends_with("/status") && p.payload.windows(13).any(|w| w == b"\"online\":true") {
                break;
            }
        }
    }
    println!("daemon online after {:.1} s", t_start.elapsed().as_secs_f64());
    // Cycle 1: the meters are a cycle behind; the head-end reads their capture objects,
    // scalers and the cycle before. Then their clocks catch up, and cycle 2 is measured.
    let topic = format!("{prefix}/admin/collect");
    let mut per_meter: HashMap<String, u64> = HashMap::new();
    let mut snapshots = HashSet::new();
    let (idle_rss, cold) = {
        let (_, rss, _) = usage(pid)?;
        client.publish(&topic, QoS::AtLeastOnce, false, "{}").await?;
        (rss, cycle(&mut ev, &mut per_meter, &mut snapshots, n, rows, pid).await?)
    };
    println!("cycle 1 (cold: capture objects, scalers): {}", cold.line(n));
    behind.behind_ms.store(0, Ordering::SeqCst);
    let (w0, r0) = (wire.to_meter.load(Ordering::Relaxed), wire.from_meter.load(Ordering::Relaxed));
    client.publish(&topic, QoS::AtLeastOnce, false, "{}").await?;
    // Modbus meters take a snapshot per boundary: nothing new within the same interval.
    let profile_meters = n - snapshots.len();
    let warm = cycle(&mut ev, &mut per_meter, &mut snapshots, profile_meters, 2 * rows, pid).await?;
    if !snapshots.is_empty() {
        println!(
            "cycle 2 reads the {profile_meters} profile meters; the {} Modbus meters wait for the next boundary",
            snapshots.len()
        );
    }
    let (_, rss, hwm) = usage(pid)?;
    println!("cycle 2 (measured): {}", warm.line(n));
    println!(
        "daemon memory: {idle_rss} KiB idle before cycle 1, {rss} KiB after cycle 2 = {:.2} KiB per meter; peak {hwm} KiB",
        rss as f64 / n as f64
    );
    if let Some(b) = baud {
        let (w, r) = (wire.to_meter.load(Ordering::Relaxed) - w0, wire.from_meter.load(Ordering::Relaxed) - r0);
        let wire_s = (w + r) as f64 * 10.0 / f64::from(b);
        println!(
            "bus at {b} baud, cycle 2: {w} bytes to the meters, {r} from them = wire time {wire_s:.2} s; cycle / wire time = {:.2}",
            warm.wall / wire_s
        );
    }
    println!("daemon log: {}", dir.join("daemon.log").display());
    drop(client);
    sim.shutdown().await;
    Ok(())
}
