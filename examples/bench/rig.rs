//! The benchmark rig: a simulated fleet in this process, a broker (embedded in this
//! process, a mosquitto this rig starts, or an external one), the daemon as a process of
//! its own (so its CPU time can be read from /proc/<pid>/stat), and two MQTT clients:
//! [`Publisher`] sends, [`Events`] listens and stamps each message with the instant it
//! arrived. Every scenario starts one with [`Rig::start`]; the payment scenarios are in
//! `payment.rs`, and interval collection or the serial bus add theirs the same way.
//!
//! The fleet: DLMS meters over the wrapper, `meters_per_link` meters behind each wrapper
//! endpoint. The daemon runs one channel actor per configured link and a link serves one
//! request at a time, so this is what sets how many meters the daemon can talk to at once
//! (10 per link: 1,000 links, 1,000 concurrent exchanges at 10,000 meters).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use meter_sim::{EndpointSpec, FleetConfig, MeterSpec, SimAuth, SimOptions, Simulator};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::report::{cpu_seconds, peak_rss_mib, thread_cpu_seconds};

/// Which broker the rig uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// rumqttd embedded in the benchmark's process (`headend::mqtt::start_embedded`),
    /// the broker `headend run` starts when none is configured.
    Embedded,
    /// A `mosquitto` the rig starts on a free loopback port (its CPU time is reported).
    Mosquitto,
    /// A broker already running, `mqtt://host:port` (its CPU time is not known here).
    External(String),
}

impl Broker {
    /// `embedded`, `mosquitto`, or `mqtt://host:port`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "embedded" => Ok(Self::Embedded),
            "mosquitto" => Ok(Self::Mosquitto),
            url if url.starts_with("mqtt://") => {
                headend::mqtt::BrokerUrl::parse(url).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(Self::External(url.to_owned()))
            }
            other => bail!("--broker {other:?}: expected embedded, mosquitto or mqtt://host:port"),
        }
    }
}

/// How to start the daemon process: `program args... --config FILE --broker URL`.
#[derive(Debug, Clone)]
pub struct DaemonCommand {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before `--config`: `["run"]` for the `headend` binary, `["daemon"]` for
    /// the benchmark's own re-execution of itself.
    pub args: Vec<String>,
}

/// What fleet and broker to set up.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// Simulated meters.
    pub meters: usize,
    /// Meters behind one wrapper endpoint, i.e. on one link of the daemon.
    pub meters_per_link: usize,
    /// Meters of one account (a cleared payment reconnects all of them).
    pub meters_per_account: usize,
    /// The broker.
    pub broker: Broker,
    /// Where the site configuration, key files, journal and logs go.
    pub dir: PathBuf,
    /// Seed of the fleet's keys and energy.
    pub seed: u64,
    /// The daemon's command.
    pub daemon: DaemonCommand,
    /// Leave the daemon's interval collection on, with its default `[collection]`
    /// settings; the payment scenarios then ask it to collect every meter at once as the
    /// payments start (on a fresh journal: a back-fill over the horizon, 7 days by
    /// default). Off: `[collection] enabled = false`, so a figure is the payments' alone.
    pub collection: bool,
    /// Print progress on stderr.
    pub progress: bool,
}

/// A meter of the benchmark fleet.
#[derive(Debug, Clone)]
pub struct BenchMeter {
    /// The head-end's id (`MTR-0001`).
    pub id: String,
    /// The simulator's id, the meter's logical device name (`SIM0000000001`).
    pub identity: String,
    /// Index of its account (`ACC-` + index + 1).
    pub account: usize,
}

/// A `{p}/result/{meter}` message (the fields the benchmark looks at).
#[derive(Debug, Clone, Deserialize)]
pub struct ResultMsg {
    /// Command id.
    #[serde(default)]
    pub id: Option<String>,
    /// Meter id.
    #[serde(default)]
    pub meter: String,
    /// Status.
    #[serde(default)]
    pub status: String,
    /// The payment behind a derived reconnect.
    #[serde(default)]
    pub trigger: Option<TriggerMsg>,
    /// `{code, message}` when something failed.
    #[serde(default)]
    pub error: Option<serde_json::Value>,
    /// A repeat of an earlier status.
    #[serde(default)]
    pub duplicate: bool,
}

impl ResultMsg {
    /// A final status of the contract.
    pub fn is_final(&self) -> bool {
        ["succeeded", "armed", "superseded", "rejected", "failed", "expired"].contains(&self.status.as_str())
    }

    /// The error code, or "".
    pub fn code(&self) -> &str {
        self.error.as_ref().and_then(|e| e["code"].as_str()).unwrap_or("")
    }
}

/// `trigger` of a result.
#[derive(Debug, Clone, Deserialize)]
pub struct TriggerMsg {
    /// The payment id.
    pub payment: String,
}

/// A `{p}/payment/{id}` message: what became of a payment.
#[derive(Debug, Clone, Deserialize)]
pub struct PaymentMsg {
    /// Payment id.
    #[serde(default)]
    pub id: Option<String>,
    /// The reconnects it made.
    #[serde(default)]
    pub reconnects: Vec<serde_json::Value>,
    /// A repeat.
    #[serde(default)]
    pub duplicate: bool,
    /// Why it was refused.
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

/// What arrived.
#[derive(Debug, Clone)]
pub enum Msg {
    /// `{p}/result/{meter}`.
    Result(ResultMsg),
    /// `{p}/payment/{id}`.
    Payment(PaymentMsg),
    /// `{p}/status`.
    Status {
        /// `online`.
        online: bool,
    },
    /// Anything else, or a payload that is not what the contract says.
    Other,
}

/// A message and when it arrived (stamped in the client's event loop, before parsing).
#[derive(Debug, Clone)]
pub struct Seen {
    /// Arrival.
    pub at: Instant,
    /// The message.
    pub msg: Msg,
}

/// The listening client's output.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Seen>,
    idle: Duration,
    /// When the last result or payment outcome arrived. The retained `status` comes
    /// again at every reconnection of the listener, so it does not count as progress.
    last_progress: tokio::time::Instant,
}

impl Events {
    fn new(rx: mpsc::UnboundedReceiver<Seen>) -> Self {
        Self { rx, idle: Duration::from_secs(60), last_progress: tokio::time::Instant::now() }
    }

    /// The next message; an error when no result or payment outcome has arrived for the
    /// idle timeout (the daemon or the broker stalled, or the daemon died). Cancel-safe.
    pub async fn next(&mut self) -> anyhow::Result<Seen> {
        match tokio::time::timeout_at(self.last_progress + self.idle, self.rx.recv()).await {
            Ok(Some(seen)) => {
                if matches!(seen.msg, Msg::Result(_) | Msg::Payment(_)) {
                    self.last_progress = tokio::time::Instant::now();
                }
                Ok(seen)
            }
            Ok(None) => bail!("the listening MQTT client stopped"),
            Err(_) => bail!("no result from the daemon for {} s", self.idle.as_secs()),
        }
    }
}

/// The sending client.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    prefix: String,
}

impl Publisher {
    /// Publish QoS 1 on `{p}/{suffix}` (queued to the client's event loop).
    pub async fn publish(&self, suffix: &str, payload: String) -> anyhow::Result<()> {
        let topic = format!("{}/{suffix}", self.prefix);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into_bytes()).await.context("publish")
    }
}

/// CPU seconds used so far by each process of the rig.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    /// The daemon process.
    pub daemon: f64,
    /// The daemon's threads by name.
    pub daemon_threads: BTreeMap<String, f64>,
    /// This process: the simulator, the MQTT clients and, when embedded, the broker.
    pub bench: f64,
    /// A mosquitto the rig started.
    pub broker: Option<f64>,
}

impl CpuSnapshot {
    /// What was used between `self` and `later`: (daemon, bench, broker) seconds.
    pub fn used_until(&self, later: &CpuSnapshot) -> (f64, f64, Option<f64>) {
        let broker = match (self.broker, later.broker) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        (later.daemon - self.daemon, later.bench - self.bench, broker)
    }

    /// The daemon's CPU between `self` and `later` by thread name, seconds.
    pub fn threads_until(&self, later: &CpuSnapshot) -> BTreeMap<String, f64> {
        later
            .daemon_threads
            .iter()
            .map(|(name, t)| (name.clone(), t - self.daemon_threads.get(name).copied().unwrap_or(0.0)))
            .collect()
    }
}

/// Everything running.
pub struct Rig {
    /// The simulated fleet.
    pub sim: Simulator,
    /// The fleet as the head-end knows it, in order.
    pub meters: Vec<BenchMeter>,
    /// How many accounts.
    pub accounts: usize,
    /// How many links (wrapper endpoints) the daemon has.
    pub links: usize,
    /// The broker, described for the report.
    pub broker_desc: String,
    /// Whether the daemon's interval collection runs.
    pub collection: bool,
    /// Sends.
    pub publisher: Publisher,
    /// Receives.
    pub events: Events,
    /// The daemon's pid.
    pub daemon_pid: u32,
    /// How long the daemon took from start to `online` (loading the configuration and
    /// key files, opening the journal, connecting).
    pub daemon_startup: Duration,
    daemon: Proc,
    mosquitto: Option<Proc>,
    log: PathBuf,
    progress: bool,
}

/// The benchmark fleet: DLMS meters, control mode 2 (a remote reconnect closes the relay
/// at once, so every payment ends `succeeded`, not `armed`), authentication none, LLS and
/// HLS-GMAC in turn as in the generated fleet, `per_link` meters behind each wrapper
/// endpoint.
pub fn bench_fleet(n: usize, per_link: usize, seed: u64) -> FleetConfig {
    let per_link = per_link.clamp(1, 0xFFFF);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let meters = (0..n)
        .map(|i| {
            let mut m = MeterSpec::dlms(format!("SIM{:010}", i + 1), i);
            m.logical_device = u16::try_from(i % per_link + 1).unwrap_or(1);
            m.control_mode = 2;
            m.auth = match i % 3 {
                0 => SimAuth::HlsGmac { guek: rng.gen(), gak: rng.gen() },
                1 => SimAuth::None,
                _ => SimAuth::Lls { password: format!("{:08X}", rng.gen::<u32>()) },
            };
            m.initial_import_wh = rng.gen_range(1_000_000..40_000_000);
            m
        })
        .collect();
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let endpoints = (0..n)
        .collect::<Vec<_>>()
        .chunks(per_link)
        .map(|c| EndpointSpec::DlmsWrapperTcp { bind: any, meters: c.to_vec() })
        .collect();
    FleetConfig { meters, endpoints, seed, ..FleetConfig::default() }
}

/// Policy for the benchmark: the arrears window open all day every day, and rate
/// limits and the quarantine far above what a run asks for, so that every arrears cut of
/// the setup runs at once. (Reconnects are never rate-limited.) Collection off unless
/// asked for.
fn bench_settings(prefix: &str, client_id: &str, collection: bool) -> String {
    let collection = if collection { "" } else { "\n[collection]\nenabled = false\n" };
    format!(
        "\n[mqtt]\nprefix = \"{prefix}\"\nclient_id = \"{client_id}\"\n\n\
         [policy]\nutc_offset_minutes = 480\nnotice_hours = 72\n\n\
         [policy.window]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
         start = \"00:00\"\nend = \"24:00\"\nno_cut_before_holiday = false\n\n\
         [policy.rate]\nglobal_per_hour = 36000000\nglobal_burst = 1000000\n\
         channel_per_hour = 36000000\nchannel_burst = 1000000\n\
         quarantine_threshold = 1000000\nquarantine_window_s = 600\n{collection}"
    )
}

impl Rig {
    /// Start the fleet, the broker, the listener and the daemon; returns once the daemon
    /// says it is online (it subscribes before it says so).
    pub async fn start(o: &RigOptions) -> anyhow::Result<Self> {
        if o.meters == 0 || o.meters_per_account == 0 {
            bail!("--meters and --meters-per-account must be at least 1");
        }
        let _ = std::fs::remove_dir_all(o.dir.join("state"));
        let _ = std::fs::remove_dir_all(o.dir.join("keys"));
        std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
        let note = |s: &str| {
            if o.progress {
                eprintln!("bench: {s}");
            }
        };

        note(&format!("starting {} simulated meters, {} per link", o.meters, o.meters_per_link));
        let fleet = bench_fleet(o.meters, o.meters_per_link, o.seed);
        let options = SimOptions { clock: Arc::new(meter_sim::SystemClock), utc_offset_minutes: 480 };
        let sim = Simulator::start_with(fleet, options).await.context("starting the simulated fleet")?;
        let links = sim.endpoints().len();

        // A prefix and client ids of this run only, so that an external broker's
        // sessions and retained messages from an earlier run play no part.
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let prefix = format!("bench/r{run}");
        let config = o.dir.join("site.toml");
        sim.write_headend_config(&config).context("writing the site configuration")?;
        let mut meters = Vec::with_capacity(o.meters);
        let text = std::fs::read_to_string(&config)?;
        let mut out = String::with_capacity(text.len() + o.meters * 24);
        for line in text.lines() {
            out.push_str(line);
            out.push('\n');
            if let Some(id) = line.strip_prefix("id = \"").and_then(|r| r.strip_suffix('"')) {
                let i = meters.len();
                let account = i / o.meters_per_account;
                out.push_str(&format!("account = \"ACC-{}\"\n", account + 1));
                let identity = sim.config().meters.get(i).map(|m| m.id.clone()).unwrap_or_default();
                meters.push(BenchMeter { id: id.to_owned(), identity, account });
            }
        }
        out.push_str(&bench_settings(&prefix, &format!("headend-bench-r{run}"), o.collection));
        std::fs::write(&config, out)?;
        if meters.len() != o.meters {
            bail!("the written configuration has {} meters, expected {}", meters.len(), o.meters);
        }
        let accounts = meters.last().map_or(0, |m| m.account + 1);

        let (broker_url, broker_desc, mosquitto) = match &o.broker {
            Broker::Embedded => {
                let port = headend::mqtt::start_embedded(0).context("starting the embedded broker")?;
                (format!("mqtt://127.0.0.1:{port}"), "embedded rumqttd, in the benchmark's process".to_owned(), None)
            }
            Broker::Mosquitto => {
                let (child, port, version) = start_mosquitto(&o.dir)?;
                (format!("mqtt://127.0.0.1:{port}"), format!("{version}, started by the benchmark"), Some(Proc(child)))
            }
            Broker::External(url) => (url.clone(), format!("external broker at {url}"), None),
        };
        let parsed = headend::mqtt::BrokerUrl::parse(&broker_url).map_err(|e| anyhow::anyhow!("{e}"))?;

        let mut events = listen(&parsed, &prefix, &format!("bench-listen-r{run}")).await?;
        let publisher = Publisher { client: publisher(&parsed, &format!("bench-send-r{run}")), prefix };

        note(&format!("starting the daemon ({})", o.daemon.program.display()));
        let log = o.dir.join("daemon.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let mut daemon = Proc(
            Command::new(&o.daemon.program)
                .args(&o.daemon.args)
                .arg("--config")
                .arg(&config)
                .args(["--broker", &broker_url])
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,rumqttd=off".into()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log_file))
                .spawn()
                .with_context(|| format!("starting {}", o.daemon.program.display()))?,
        );
        // Until online, a longer idle allowance: 10,000 key files are read at start.
        events.idle = Duration::from_secs(120);
        loop {
            let seen = match events.next().await {
                Ok(s) => s,
                Err(e) => return Err(explain(&mut daemon, &log, e)),
            };
            if matches!(seen.msg, Msg::Status { online: true }) {
                break;
            }
        }
        events.idle = Duration::from_secs(60);
        events.last_progress = tokio::time::Instant::now();
        let daemon_startup = started.elapsed();
        note(&format!("daemon online after {:.1} s", daemon_startup.as_secs_f64()));
        Ok(Self {
            sim,
            meters,
            accounts,
            links,
            broker_desc,
            collection: o.collection,
            publisher,
            events,
            daemon_pid: daemon.0.id(),
            daemon_startup,
            daemon,
            mosquitto,
            log,
            progress: o.progress,
        })
    }

    /// Print progress on stderr (when asked to).
    pub fn note(&self, s: &str) {
        if self.progress {
            eprintln!("bench: {s}");
        }
    }

    /// `ACC-n` of account index `a`.
    pub fn account_id(a: usize) -> String {
        format!("ACC-{}", a + 1)
    }

    /// CPU used so far by each process.
    pub fn cpu(&self) -> CpuSnapshot {
        CpuSnapshot {
            daemon: cpu_seconds(self.daemon_pid).unwrap_or(0.0),
            daemon_threads: thread_cpu_seconds(self.daemon_pid),
            bench: cpu_seconds(std::process::id()).unwrap_or(0.0),
            broker: self.mosquitto.as_ref().and_then(|c| cpu_seconds(c.0.id())),
        }
    }

    /// The daemon's peak resident memory so far, MiB.
    pub fn daemon_peak_rss_mib(&self) -> Option<f64> {
        peak_rss_mib(self.daemon_pid)
    }

    /// An error with what the daemon said and whether it is still running.
    pub fn explain(&mut self, e: anyhow::Error) -> anyhow::Error {
        explain(&mut self.daemon, &self.log, e)
    }

    /// Stop everything (the daemon with SIGKILL: nothing of it is measured any more).
    pub async fn stop(self) {
        let Self { sim, daemon, mosquitto, publisher, .. } = self;
        drop(daemon);
        drop(mosquitto);
        let _ = publisher.client.disconnect().await;
        sim.shutdown().await;
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn explain(daemon: &mut Proc, log: &Path, e: anyhow::Error) -> anyhow::Error {
    let state = match daemon.0.try_wait() {
        Ok(Some(status)) => format!("the daemon exited ({status})"),
        _ => "the daemon is still running".to_owned(),
    };
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
    e.context(format!("{state}; the end of its log ({}):\n{}", log.display(), tail.join("\n")))
}

fn mqtt_options(url: &headend::mqtt::BrokerUrl, client_id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(4 << 20, 4 << 20);
    o
}

/// The sending client: a deep request queue and a wide in-flight window, so that a burst
/// of payments is limited by the broker and the daemon, not by the benchmark's client.
fn publisher(url: &headend::mqtt::BrokerUrl, client_id: &str) -> AsyncClient {
    let mut o = mqtt_options(url, client_id);
    o.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(o, 20_000);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                // The broker went away; rumqttc reconnects on the next poll.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    client
}

/// The listening client: results, payment outcomes and the daemon's status; returns once
/// the subscription is acknowledged.
async fn listen(url: &headend::mqtt::BrokerUrl, prefix: &str, client_id: &str) -> anyhow::Result<Events> {
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(url, client_id), 1024);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let filters = [format!("{prefix}/result/+"), format!("{prefix}/payment/+"), format!("{prefix}/status")];
    let result_prefix = format!("{prefix}/result/");
    let payment_prefix = format!("{prefix}/payment/");
    let status_topic = format!("{prefix}/status");
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let subs = filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    let _ = client.subscribe_many(subs).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    let msg = if p.topic.starts_with(&result_prefix) {
                        serde_json::from_slice(&p.payload).map(Msg::Result).ok()
                    } else if p.topic.starts_with(&payment_prefix) {
                        serde_json::from_slice(&p.payload).map(Msg::Payment).ok()
                    } else if p.topic == status_topic {
                        serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .ok()
                            .map(|v| Msg::Status { online: v["online"] == true })
                    } else {
                        None
                    };
                    let msg = msg.unwrap_or(Msg::Other);
                    if tx.send(Seen { at, msg }).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .context("the broker did not acknowledge the subscription in 10 s")?
        .context("the listening client stopped")?;
    Ok(Events::new(rx))
}

/// Start `mosquitto` on a free loopback port with queues deep enough for a burst (the
/// defaults, 1000 queued messages per client, would drop QoS 1 messages of a 10,000
/// payment burst); returns once it says it is running.
pub fn start_mosquitto(dir: &Path) -> anyhow::Result<(Child, u16, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nmax_inflight_messages 100\nset_tcp_nodelay true\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        ),
    )?;
    let mut child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mosquitto (is it installed? .ci/run installs it)")?;
    let stderr = child.stderr.take().context("mosquitto's stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" running") || line.contains("Error") {
                if let Some(t) = tx.take() {
                    let _ = t.send(line);
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.contains(" running") => {
            let version = line
                .split_whitespace()
                .skip_while(|w| *w != "version")
                .nth(1)
                .map_or_else(|| "mosquitto".to_owned(), |v| format!("mosquitto {v}"));
            Ok((child, port, version))
        }
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mosquitto did not start: {other:?}")
        }
    }
}
