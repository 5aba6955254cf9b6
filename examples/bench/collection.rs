//! `collection`: one interval cycle of the daemon over a simulated fleet, direct TCP (the
//! generated mixed fleet) or `--concentrators K` (DLMS meters behind K HDLC gateways):
//! wall time until every meter's rows are on the broker, the daemon's CPU per 1,000 meter
//! reads and its memory per configured meter; beside it, like with like, the DLMS client
//! alone reading the same 96-row profile: the head-end's driver against Gurux (Python).
//!
//! The rig ([`CollectRig`], shared with `serial-bus`): the simulator in this process, a
//! mosquitto started here, the daemon as a child process (so that its CPU and memory are
//! its own, from /proc), an observer subscribed to `{p}/readings/+` and `{p}/result/+`.
//! Each cycle is started with `{p}/admin/collect` and is over when every meter's rows are
//! on the broker. Two cycles: in the first the meters' clocks are a cycle behind and the
//! head-end reads capture objects, periods and scalers (cold); then the clocks catch up
//! and the second, the steady state, is the one measured.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use meter_sim::{FleetConfig, FleetPorts, SimOptions, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::collect_fleet::{hdlc_fleet, hdlc_site, regroup_wrapper, rss_kib};
use crate::report::{cpu_seconds, round, target_rows, Machine, Table, Target};
use crate::rig::{start_mosquitto, DaemonCommand};

/// The simulator's clock, `behind_ms` behind the system's (see the module's doc).
pub struct Behind {
    behind_ms: AtomicI64,
}

impl meter_sim::Clock for Behind {
    fn now_ms(&self) -> i64 {
        meter_sim::SystemClock.now_ms() - self.behind_ms.load(Ordering::SeqCst)
    }
}

/// Bytes through the counting proxy in front of a bus, both ways.
#[derive(Debug, Default)]
pub struct Wire {
    /// Head-end to meters.
    pub to_meter: AtomicU64,
    /// Meters to head-end.
    pub from_meter: AtomicU64,
}

impl Wire {
    /// Both counters now.
    pub fn now(&self) -> (u64, u64) {
        (self.to_meter.load(Ordering::Relaxed), self.from_meter.load(Ordering::Relaxed))
    }
}

/// The fleet a run sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fleet {
    /// `FleetConfig::generate`: 40 % DLMS over the wrapper (`wrapper_group` meters per
    /// link), 40 % DLMS behind HDLC gateways of 1,000, 20 % Modbus; HLS / none / LLS.
    Direct {
        /// Wrapper meters per daemon link (one TCP connection).
        wrapper_group: usize,
    },
    /// DLMS meters without authentication behind this many HDLC gateways.
    Concentrators(usize),
    /// DLMS meters (control mode 2) on one emulated serial bus at this baud rate, behind a
    /// proxy that counts the bytes.
    Bus(u32),
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct RigSetup {
    /// Meters.
    pub meters: usize,
    /// Which fleet.
    pub fleet: Fleet,
    /// Intervals per meter per cycle (1: a 15-minute cycle; 96: a day).
    pub rows: u64,
    /// `[collection] max_associations`.
    pub max_associations: u64,
    /// `[collection] rows_per_request`.
    pub rows_per_request: u64,
    /// HDLC parameters of the gateway links, e.g. `max_info = 512, window = 7`.
    pub hdlc: Option<String>,
    /// The daemon process.
    pub daemon: DaemonCommand,
    /// Configuration, state and the daemon's log.
    pub dir: PathBuf,
    /// Progress on stderr.
    pub progress: bool,
}

/// A message the observer saw.
#[derive(Debug)]
pub struct Seen {
    /// When it arrived.
    pub at: Instant,
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: serde_json::Value,
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The simulator, the broker, the daemon and an observer.
pub struct CollectRig {
    /// The simulated fleet.
    pub sim: Simulator,
    /// Bytes through the bus proxy (zero without a bus).
    pub wire: Arc<Wire>,
    /// Topic prefix.
    pub prefix: String,
    /// Publishes.
    pub client: AsyncClient,
    /// What the observer saw, in order.
    pub events: mpsc::UnboundedReceiver<Result<Seen, String>>,
    /// The daemon's pid.
    pub daemon_pid: u32,
    /// Registry ids of the meters, in the simulator's order.
    pub meter_ids: Vec<String>,
    /// Daemon links.
    pub links: usize,
    /// Rows seen per meter so far.
    pub per_meter: HashMap<String, u64>,
    /// Meters that publish snapshots (Modbus), not profile rows.
    pub snapshot_meters: usize,
    /// The daemon's log.
    pub log: PathBuf,
    behind: Arc<Behind>,
    progress: bool,
    _daemon: Kill,
    _broker: Kill,
}

/// What one cycle took.
#[derive(Debug, Clone, Serialize)]
pub struct Cycle {
    /// Meters whose rows all arrived.
    pub meters_complete: usize,
    /// Rows that arrived.
    pub rows: u64,
    /// From `admin/collect` to the last meter's rows, s.
    pub wall_s: f64,
    /// The daemon's CPU in that time, s.
    pub daemon_cpu_s: f64,
    /// The daemon's CPU per 1,000 meter reads, s.
    pub cpu_s_per_1000_reads: f64,
}

impl CollectRig {
    /// Start everything; returns once the daemon says it is online.
    pub async fn start(s: &RigSetup) -> anyhow::Result<Self> {
        if s.meters == 0 || s.rows == 0 {
            bail!("--meters and --rows must be at least 1");
        }
        let _ = std::fs::remove_dir_all(s.dir.join("state"));
        std::fs::create_dir_all(&s.dir).with_context(|| format!("creating {}", s.dir.display()))?;
        let note = |t: &str| {
            if s.progress {
                eprintln!("bench: {t}");
            }
        };
        let behind = Arc::new(Behind { behind_ms: AtomicI64::new(i64::try_from(s.rows * 900_000)?) });
        let options = SimOptions { clock: Arc::clone(&behind) as Arc<dyn meter_sim::Clock>, utc_offset_minutes: 0 };
        let wire = Arc::new(Wire::default());
        let site = s.dir.join("site.toml");
        note(&format!("starting {} simulated meters ({:?})", s.meters, s.fleet));
        let (sim, mut text) = match s.fleet {
            Fleet::Direct { wrapper_group } => {
                let fleet = FleetConfig::generate(s.meters, 1, &FleetPorts::default());
                let sim = Simulator::start_with(fleet, options).await?;
                sim.write_headend_config(&site)?;
                let text = regroup_wrapper(&std::fs::read_to_string(&site)?, wrapper_group.max(1))?;
                (sim, text)
            }
            Fleet::Concentrators(k) => {
                let sim = Simulator::start_with(hdlc_fleet(s.meters, k, None), options).await?;
                let text = hdlc_site(&sim, s, None).await?;
                (sim, text)
            }
            Fleet::Bus(baud) => {
                let sim = Simulator::start_with(hdlc_fleet(s.meters, 1, Some(baud)), options).await?;
                let text = hdlc_site(&sim, s, Some(&wire)).await?;
                (sim, text)
            }
        };
        let meter_ids: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id = \"").and_then(|r| r.strip_suffix('"')).map(str::to_owned))
            .collect();
        let links = text.lines().filter(|l| *l == "[[link]]").count();
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let prefix = format!("bench/c{run}");
        text.push_str(&format!(
            "\n[mqtt]\nprefix = \"{prefix}\"\nclient_id = \"headend-bench-c{run}\"\n\n[collection]\n\
             interval_s = 900\nspread_s = 0\nsettle_s = 0\nhorizon_s = {}\nrows_per_job = {}\n\
             rows_per_request = {}\nmax_associations = {}\n",
            2 * s.rows * 900,
            (2 * s.rows).max(96),
            s.rows_per_request,
            s.max_associations
        ));
        std::fs::write(&site, &text)?;

        let (broker, port, _version) = start_mosquitto(&s.dir)?;
        let broker = Kill(broker);
        let mut o = MqttOptions::new(format!("bench-observer-c{run}"), "127.0.0.1", port);
        o.set_max_packet_size(16 << 20, 16 << 20);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(o, 1024);
        client.subscribe(format!("{prefix}/readings/+"), QoS::AtLeastOnce).await?;
        client.subscribe(format!("{prefix}/result/+"), QoS::AtLeastOnce).await?;
        client.subscribe(format!("{prefix}/status"), QoS::AtLeastOnce).await?;
        let mut events = observe(eventloop);

        note(&format!("starting the daemon ({})", s.daemon.program.display()));
        let log = s.dir.join("daemon.log");
        let daemon = Command::new(&s.daemon.program)
            .args(&s.daemon.args)
            .arg("--config")
            .arg(&site)
            .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,rumqttd=off".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .with_context(|| format!("starting {}", s.daemon.program.display()))?;
        let daemon_pid = daemon.id();
        let daemon = Kill(daemon);
        let t0 = Instant::now();
        loop {
            let seen = next(&mut events, Duration::from_secs(300))
                .await
                .with_context(|| format!("waiting for the daemon to be online (log: {})", log.display()))?;
            if seen.topic.ends_with("/status") && seen.payload["online"] == true {
                break;
            }
        }
        note(&format!("daemon online after {:.1} s", t0.elapsed().as_secs_f64()));
        Ok(Self {
            sim,
            wire,
            prefix,
            client,
            events,
            daemon_pid,
            meter_ids,
            links,
            per_meter: HashMap::new(),
            snapshot_meters: 0,
            log,
            behind,
            progress: s.progress,
            _daemon: daemon,
            _broker: broker,
        })
    }

    /// Print progress on stderr (when asked to).
    pub fn note(&self, t: &str) {
        if self.progress {
            eprintln!("bench: {t}");
        }
    }

    /// Ask the daemon to collect every meter now.
    pub async fn collect_now(&self) -> anyhow::Result<()> {
        self.client.publish(format!("{}/admin/collect", self.prefix), QoS::AtLeastOnce, false, "{}").await?;
        Ok(())
    }

    /// Let the meters' clocks catch up with the head-end's (after the cold cycle).
    pub fn catch_up(&self) {
        self.behind.behind_ms.store(0, Ordering::SeqCst);
    }

    /// Count a readings message; true when it completed its meter (`want` rows in all).
    pub fn tally(&mut self, seen: &Seen, want: u64) -> bool {
        let rows = seen.payload["rows"].as_array().map_or(0, Vec::len) as u64;
        let meter = seen.topic.rsplit('/').next().unwrap_or_default().to_owned();
        if seen.payload["source"] == "snapshot" && !self.per_meter.contains_key(&meter) {
            self.snapshot_meters += 1;
        }
        let e = self.per_meter.entry(meter).or_default();
        let was = *e >= want;
        *e += rows;
        !was && *e >= want
    }

    /// Meters with at least `want` rows.
    pub fn complete(&self, want: u64) -> usize {
        self.per_meter.values().filter(|r| **r >= want).count()
    }

    /// Run one cycle: start it, wait until `meters` meters hold `want` rows (or nothing
    /// arrives for a minute). Other messages go to `other`.
    pub async fn cycle(&mut self, meters: usize, want: u64, mut other: impl FnMut(&Seen)) -> anyhow::Result<Cycle> {
        let cpu0 = cpu_seconds(self.daemon_pid).unwrap_or(0.0);
        let before: u64 = self.per_meter.values().sum();
        let t0 = Instant::now();
        self.collect_now().await?;
        let mut complete = self.complete(want);
        while complete < meters {
            let Ok(seen) = next(&mut self.events, Duration::from_secs(60)).await else { break };
            if seen.topic.contains("/readings/") {
                if self.tally(&seen, want) {
                    complete += 1;
                }
            } else {
                other(&seen);
            }
        }
        let wall_s = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(self.daemon_pid).unwrap_or(0.0) - cpu0;
        Ok(Cycle {
            meters_complete: complete,
            rows: self.per_meter.values().sum::<u64>() - before,
            wall_s: round(wall_s, 2),
            daemon_cpu_s: round(cpu, 2),
            cpu_s_per_1000_reads: round(cpu * 1000.0 / complete.max(1) as f64, 3),
        })
    }

    /// Stop the simulator (the daemon and the broker stop when the rig is dropped).
    pub async fn stop(self) {
        let CollectRig { sim, _daemon, _broker, .. } = self;
        drop(_daemon);
        sim.shutdown().await;
    }
}

/// The next message, or an error after `idle` without one.
pub async fn next(events: &mut mpsc::UnboundedReceiver<Result<Seen, String>>, idle: Duration) -> anyhow::Result<Seen> {
    match tokio::time::timeout(idle, events.recv()).await {
        Ok(Some(Ok(s))) => Ok(s),
        Ok(Some(Err(e))) => Err(anyhow!("observer: {e}")),
        Ok(None) => Err(anyhow!("observer stopped")),
        Err(_) => Err(anyhow!("nothing from the broker for {} s", idle.as_secs())),
    }
}

/// Poll the observer's event loop on a task of its own, stamping each message on arrival.
fn observe(mut ev: rumqttc::EventLoop) -> mpsc::UnboundedReceiver<Result<Seen, String>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    let payload = serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                    if tx.send(Ok(Seen { at, topic: p.topic, payload })).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    rx
}

/// Memory of the daemon, KiB, from /proc/<pid>/status.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Resident before the first cycle.
    pub idle_rss_kib: u64,
    /// Resident after the measured cycle.
    pub rss_kib: u64,
    /// Peak resident.
    pub peak_kib: u64,
    /// `rss_kib` per configured meter.
    pub kib_per_meter: f64,
}

/// Options of the `collection` scenario.
#[derive(Debug, Clone)]
pub struct CollectionOptions {
    /// The rig.
    pub setup: RigSetup,
    /// Reads of the 96-row profile by each client alone (head-end driver, Gurux); 0: none.
    pub client_reads: usize,
}

/// What the `collection` scenario reports (the JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct CollectionReport {
    /// `collection`.
    pub scenario: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// `direct` or `concentrators`.
    pub fleet: String,
    /// Configured meters.
    pub meters: usize,
    /// Daemon links.
    pub links: usize,
    /// Intervals per meter per cycle.
    pub rows_per_meter: u64,
    /// HDLC parameters proposed on gateway links (None: the defaults, 128 bytes, window 1).
    pub hdlc: Option<String>,
    /// Modbus meters (a snapshot per boundary: nothing new in the measured cycle).
    pub snapshot_meters: usize,
    /// The first cycle.
    pub cold: Cycle,
    /// The measured cycle.
    pub steady: Cycle,
    /// The daemon's memory.
    pub memory: Memory,
    /// The DLMS client alone, like with like.
    pub client_alone: Option<crate::collection_client::ClientAlone>,
    /// Issue 5's targets.
    pub targets: Vec<Target>,
}

impl CollectionReport {
    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut t = Table::default();
        t.row("machine", self.machine.line());
        t.row(
            "fleet",
            format!(
                "{} meters, {} ({} links), {} row(s) per meter per cycle, HDLC {}",
                self.meters,
                self.fleet,
                self.links,
                self.rows_per_meter,
                self.hdlc.as_deref().unwrap_or("defaults")
            ),
        );
        for (name, c) in [("cycle 1 (cold)", &self.cold), ("cycle 2 (steady)", &self.steady)] {
            t.row(
                name,
                format!(
                    "{} meters, {} rows in {:.2} s; daemon CPU {:.2} s = {:.3} s per 1,000 reads",
                    c.meters_complete, c.rows, c.wall_s, c.daemon_cpu_s, c.cpu_s_per_1000_reads
                ),
            );
        }
        let m = &self.memory;
        t.row(
            "daemon memory",
            format!(
                "{} KiB idle, {} KiB after cycle 2 = {:.2} KiB per meter; peak {} KiB",
                m.idle_rss_kib, m.rss_kib, m.kib_per_meter, m.peak_kib
            ),
        );
        if let Some(c) = &self.client_alone {
            t.row("client alone, 96-row read", c.line());
        }
        target_rows(&mut t, &self.targets);
        format!("collection\n{}", t.render())
    }
}

/// Run the scenario.
pub async fn run(o: &CollectionOptions, machine: Machine) -> anyhow::Result<CollectionReport> {
    let s = &o.setup;
    let mut rig = CollectRig::start(s).await?;
    let n = s.meters;
    let (idle_rss, _) = rss_kib(rig.daemon_pid);
    let cold = rig.cycle(n, s.rows, |_| {}).await;
    let cold = match cold {
        Ok(c) => c,
        Err(e) => {
            rig.stop().await;
            return Err(e);
        }
    };
    rig.note(&format!("cycle 1 (cold): {} meters in {:.1} s", cold.meters_complete, cold.wall_s));
    rig.catch_up();
    // Modbus meters snapshot once per boundary: the measured cycle reads the others.
    let profile_meters = n - rig.snapshot_meters;
    let steady = rig.cycle(profile_meters, 2 * s.rows, |_| {}).await;
    let (rss, peak) = rss_kib(rig.daemon_pid);
    let snapshot_meters = rig.snapshot_meters;
    let links = rig.links;
    rig.note(&format!("daemon log: {}", rig.log.display()));
    rig.stop().await;
    let steady = steady?;
    rig_complete(&cold, n, "cycle 1")?;
    rig_complete(&steady, profile_meters, "cycle 2")?;
    let client_alone = if o.client_reads > 0 {
        Some(crate::collection_client::run(o.client_reads, s.rows_per_request, s.hdlc.as_deref(), &s.dir).await?)
    } else {
        None
    };
    let memory =
        Memory { idle_rss_kib: idle_rss, rss_kib: rss, peak_kib: peak, kib_per_meter: round(rss as f64 / n as f64, 2) };
    let mut targets = Vec::new();
    let (fleet, wall_target, size) = match s.fleet {
        Fleet::Concentrators(k) => (format!("concentrators ({k})"), 60.0, 100_000),
        Fleet::Direct { .. } => ("direct".to_owned(), 10.0, 10_000),
        Fleet::Bus(b) => (format!("bus ({b} baud)"), f64::INFINITY, usize::MAX),
    };
    if wall_target.is_finite() && s.rows == 1 {
        targets.push(Target {
            figure: format!("{size} meters' interval collected, s"),
            target: format!("< {wall_target}"),
            value: steady.wall_s,
            met: steady.wall_s < wall_target,
            at_target_size: n >= size,
        });
    }
    targets.push(Target {
        figure: "daemon memory per configured meter, KiB".into(),
        target: "< 4".into(),
        value: memory.kib_per_meter,
        met: memory.kib_per_meter < 4.0,
        at_target_size: n >= 10_000,
    });
    if s.rows == 96 {
        targets.push(Target {
            figure: "daemon CPU per 1,000 reads of a 96-row profile, s".into(),
            target: "< 0.25".into(),
            value: steady.cpu_s_per_1000_reads,
            met: steady.cpu_s_per_1000_reads < 0.25,
            at_target_size: n >= 1000,
        });
    }
    Ok(CollectionReport {
        scenario: "collection",
        machine,
        fleet,
        meters: n,
        links,
        rows_per_meter: s.rows,
        hdlc: s.hdlc.clone(),
        snapshot_meters,
        cold,
        steady,
        memory,
        client_alone,
        targets,
    })
}

fn rig_complete(c: &Cycle, want: usize, what: &str) -> anyhow::Result<()> {
    if c.meters_complete < want {
        bail!("{what}: only {} of {want} meters' readings arrived", c.meters_complete);
    }
    Ok(())
}
