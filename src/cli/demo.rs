//! `headend demo`: the whole head-end on one machine. A simulated fleet in-process (300
//! meters by default: DLMS over the wrapper, DLMS behind an HDLC concentrator, Modbus
//! behind a gateway; authentication none, LLS and HLS-GMAC; mixed control modes), the
//! embedded MQTT broker, and the daemon. It cuts a meter for arrears, takes a payment and
//! watches the meter come back, prints every status as it happens, then leaves
//! everything running for a second terminal, with a live view (relays, commands,
//! readings) and the exact commands to try. `--headless` skips the tour and prints the
//! view as blocks instead of redrawing it (for scripts and tests).

mod view;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use meter_sim::{EndpointKind, FleetConfig, FleetPorts, SimOptions, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use headend::config::SiteConfig;
use headend::daemon::{self, DaemonOptions};
use headend::time::{Clock as _, SystemClock};
use view::{LinkRow, View};

/// Arguments of `headend demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many simulated meters (at least 15).
    #[arg(long, default_value_t = 300)]
    meters: usize,
    /// Where the generated site configuration and state go.
    #[arg(long, default_value = "demo-site")]
    dir: PathBuf,
    /// Run the tour and exit, instead of keeping everything up for a second terminal.
    #[arg(long, conflicts_with = "headless")]
    once: bool,
    /// No tour, no redrawing: print what to try, then the live view as a block whenever
    /// something changed, until Ctrl-C or SIGTERM (for scripts and tests).
    #[arg(long)]
    headless: bool,
    /// Seed of the simulated fleet (keys, load).
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Run the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let fleet = FleetConfig::generate(args.meters.max(15), args.seed, &FleetPorts::default());
    let options = SimOptions { clock: Arc::new(meter_sim::SystemClock), utc_offset_minutes: 480 };
    let sim = Simulator::start_with(fleet, options).await.context("starting the simulated fleet")?;
    // A fresh state directory: the demo's journal starts empty every time.
    let _ = std::fs::remove_dir_all(args.dir.join("state"));
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let config = args.dir.join("site.toml");
    sim.write_headend_config(&config).context("writing the site configuration")?;
    let port = headend::mqtt::start_embedded(0).context("starting the embedded broker")?;
    let broker = format!("mqtt://127.0.0.1:{port}");
    add_demo_settings(&config, &broker)?;
    let site = SiteConfig::load(&config)?;
    let config = std::fs::canonicalize(&config).unwrap_or(config);

    println!("headend demo");
    println!("  simulated fleet: {} meters", site.meters.len());
    let links = link_rows(&sim, &site);
    for l in &links {
        println!("    {:<16} {:<38} {} meter(s)", l.name, l.what, l.meters.len());
    }
    println!("  MQTT broker:     {broker} (embedded)");
    println!("  configuration:   {}\n", config.display());
    let header = vec![format!(
        "headend demo: {} meters, broker {broker}, prefix ami, config {}",
        site.meters.len(),
        config.display()
    )];
    let view = Arc::new(Mutex::new(View::new(header, links)));

    let stop = CancellationToken::new();
    let daemon_stop = stop.clone();
    let daemon_site = site.clone();
    let daemon = tokio::spawn(async move {
        let opts = DaemonOptions { broker: None, clock: Arc::new(SystemClock), reload: None };
        daemon::run(daemon_site, opts, daemon_stop).await
    });

    let watcher = Watcher::connect(port, view.clone()).await?;
    // The daemon subscribes before it says it is online: only then are commands heard.
    let online = watcher.until(30, |t, v| t.ends_with("/status") && v["online"] == true).await;
    let result = match online {
        Ok(_) if args.headless => Ok(()),
        Ok(_) => tour(&watcher, &sim).await,
        Err(e) => Err(e.context("the daemon did not come online")),
    };
    match &result {
        Ok(()) if args.headless => println!("The daemon is online."),
        Ok(()) => println!("\nThe tour is done: every command reached its final status."),
        Err(e) => println!("\nThe tour stopped: {e:#}"),
    }

    if !args.once && result.is_ok() {
        let hints = hints(&config, port);
        println!("\n{hints}");
        let redraw = !args.headless && std::io::stdout().is_terminal();
        tokio::select! {
            _ = wait_for_stop() => {}
            _ = live(&watcher, &view, &sim, redraw, &hints) => {}
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), daemon).await;
    sim.shutdown().await;
    Ok(if result.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The fleet's links as the view groups them: the site file's names, in words.
fn link_rows(sim: &Simulator, site: &SiteConfig) -> Vec<LinkRow> {
    sim.endpoints()
        .iter()
        .map(|e| {
            let first = e.meters.first().map(|&i| meter_sim::headend_id(i));
            let name = first.and_then(|id| site.meter(&id)).map_or_else(|| "?".to_owned(), |m| m.link.clone());
            let at = e.addr.map(|a| a.to_string()).or(e.serial_path.clone()).unwrap_or_default();
            let kind = match e.kind {
                EndpointKind::DlmsWrapperTcp => "DLMS wrapper",
                EndpointKind::DlmsHdlcTcp => "DLMS/HDLC concentrator",
                EndpointKind::DlmsHdlcSerial => "DLMS/HDLC RS-485",
                EndpointKind::ModbusTcp => "Modbus gateway",
                EndpointKind::ModbusRtuSerial => "Modbus RTU",
            };
            LinkRow { name, what: format!("{kind} {at}"), meters: e.meters.clone() }
        })
        .collect()
}

/// What to try from a second terminal: the exact commands, against this demo.
fn hints(config: &Path, port: u16) -> String {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let exe = match (&exe, &cwd) {
        (Some(e), Some(d)) => e.strip_prefix(d).map(Path::to_path_buf).unwrap_or_else(|_| e.clone()),
        (Some(e), None) => e.clone(),
        _ => PathBuf::from("headend"),
    };
    let (exe, cfg) = (exe.display(), config.display());
    let week_ago = headend::time::format_rfc3339(SystemClock.now_ms() / 1000 - 7 * 86_400, 480);
    format!(
        "Try from a second terminal (everything stays up until Ctrl-C):\n\
         \x20 # cut MTR-0011 (DLMS over the wrapper) for arrears, notice sent a week ago; then its account pays:\n\
         \x20 {exe} cut --config {cfg} MTR-0011 --reason arrears --notice-sent-at {week_ago}\n\
         \x20 {exe} pay --config {cfg} --account ACC-0006 --amount 50.00\n\
         \x20 # a meter behind the HDLC concentrator, at the customer's request, and back:\n\
         \x20 {exe} cut --config {cfg} MTR-0014 --reason customer_request\n\
         \x20 {exe} restore --config {cfg} MTR-0014\n\
         \x20 # MTR-0013 is in control mode 3: a restore arms it for the customer's button:\n\
         \x20 {exe} restore --config {cfg} MTR-0013\n\
         \x20 {exe} read --config {cfg} MTR-0010 --json        # a Modbus meter\n\
         \x20 {exe} audit --config {cfg} --meter MTR-0011\n\
         \x20 mosquitto_sub -p {port} -t 'ami/#' -v              # everything the daemon publishes\n\
         (--broker mqtt://127.0.0.1:{port} works in place of --config.)"
    )
}

/// Until Ctrl-C or SIGTERM.
async fn wait_for_stop() {
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

/// The live view: redrawn every second on a terminal; otherwise printed as a block
/// whenever something changed (at most once a second).
async fn live(w: &Watcher, view: &Mutex<View>, sim: &Simulator, redraw: bool, hints: &str) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut rx = w.rx.lock().await;
    let mut shown = u64::MAX;
    let mut relays = Vec::new();
    loop {
        tokio::select! {
            msg = rx.recv() => if msg.is_none() { return },
            _ = tick.tick() => {
                let meters = sim.meters();
                let now_relays: Vec<u8> = meters.iter().map(|m| m.control_state.as_u8()).collect();
                let text = {
                    let Ok(v) = view.lock() else { return };
                    if !redraw && v.generation == shown && now_relays == relays {
                        continue;
                    }
                    shown = v.generation;
                    let now = headend::time::format_rfc3339(SystemClock.now_ms() / 1000, 480);
                    v.render(&meters, &now)
                };
                relays = now_relays;
                if redraw {
                    // Clear the screen and home the cursor: a plain redraw, no TUI.
                    print!("\x1b[2J\x1b[H{text}\n{hints}\n");
                } else {
                    println!("----- live view -----\n{text}----- end of view -----");
                }
            }
        }
    }
}

/// Accounts (two meters each; ACC-0003 protected), a service window open every day so the
/// tour works at any hour, the broker, and collection that catches up two hours only and
/// spreads a cycle over a minute, so that readings show soon and the fleet stays light.
fn add_demo_settings(config: &Path, broker: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if let Some(n) = line.strip_prefix("id = \"MTR-").and_then(|r| r.trim_end_matches('"').parse::<usize>().ok()) {
            out.push_str(&format!("account = \"ACC-{:04}\"\n", n.div_ceil(2)));
        }
    }
    out.push_str(&format!(
        "\n[mqtt]\nbroker = \"{broker}\"\n\n[policy]\nutc_offset_minutes = 480\n\n[policy.window]\n\
         days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"00:00\"\nend = \"24:00\"\n\n\
         [[account]]\nid = \"ACC-0003\"\nprotection = \"medical\"\n\n\
         [collection]\nhorizon_s = 7200\nspread_s = 60\n"
    ));
    std::fs::write(config, out)?;
    Ok(())
}

/// A subscriber to everything the daemon publishes, printing as it goes.
struct Watcher {
    client: AsyncClient,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Value)>>,
}

impl Watcher {
    async fn connect(port: u16, view: Arc<Mutex<View>>) -> anyhow::Result<Self> {
        let mut o = MqttOptions::new("headend-demo-watcher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(2 << 20, 2 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let sub = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.subscribe("ami/#", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = ready_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if let Ok(mut view) = view.lock() {
                            view.on_message(&p.topic, &v);
                        }
                        if tx.send((p.topic.clone(), v)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await.context("the broker did not answer")??;
        Ok(Self { client, rx: tokio::sync::Mutex::new(rx) })
    }

    async fn publish(&self, topic: &str, payload: &str) -> anyhow::Result<()> {
        println!("> {topic} {payload}");
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec()).await?;
        Ok(())
    }

    /// Print messages until one matches `done`; returns it.
    async fn until(&self, secs: u64, done: impl Fn(&str, &Value) -> bool) -> anyhow::Result<Value> {
        let mut rx = self.rx.lock().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (topic, v) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .context("no answer in time")?
                .context("the watcher stopped")?;
            print_message(&topic, &v);
            if done(&topic, &v) {
                return Ok(v);
            }
        }
    }
}

fn print_message(topic: &str, v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    if topic.contains("/result/") {
        let mut line = format!("  {:<8} {:<24} {:<10} {:<12}", s("meter"), s("id"), s("action"), s("status"));
        if let Some(r) = v["relay"].as_str() {
            line.push_str(&format!(" relay={r}"));
        }
        if let Some(e) = v["error"]["code"].as_str() {
            line.push_str(&format!(" error={e}"));
        }
        if let Some(p) = v["trigger"]["payment"].as_str() {
            line.push_str(&format!(" (payment {p})"));
        }
        println!("{line}");
    } else if topic.contains("/state/") && v["relay"] != "unknown" {
        println!("  {:<8} state: relay {} online {}", s("meter"), s("relay"), v["online"]);
    }
}

fn is_final(v: &Value) -> bool {
    ["succeeded", "armed", "superseded", "rejected", "failed", "expired"].iter().any(|f| v["status"] == *f)
}

async fn tour(w: &Watcher, sim: &Simulator) -> anyhow::Result<()> {
    let done = |id: &'static str| move |t: &str, v: &Value| t.contains("/result/") && v["id"] == id && is_final(v);
    println!("1. The 95598 desk cuts MTR-0001 for arrears (notice sent a week ago):");
    w.publish(
        "ami/cmd/MTR-0001",
        r#"{"id":"demo-cut-1","action":"disconnect","reason":"arrears","operator":"95598/demo","notice_sent_at":"2026-01-01T09:00:00+08:00","arrears_as_of":"2026-01-01T08:00:00+08:00"}"#,
    )
    .await?;
    let v = w.until(30, done("demo-cut-1")).await?;
    anyhow::ensure!(v["status"] == "succeeded", "the cut did not succeed: {v}");

    println!("\n2. Billing confirms the payment of account ACC-0001; the meter comes back at once:");
    w.publish(
        "ami/payments",
        r#"{"id":"demo-pay-1","account":"ACC-0001","amount":"120.50","currency":"CNY","cleared":true}"#,
    )
    .await?;
    let v =
        w.until(30, |t, v| t.contains("/result/") && v["trigger"]["payment"] == "demo-pay-1" && is_final(v)).await?;
    anyhow::ensure!(v["status"] == "succeeded", "the reconnect did not succeed: {v}");

    println!("\n3. A protected account (medical) is never cut for arrears:");
    w.publish(
        "ami/cmd/MTR-0005",
        r#"{"id":"demo-cut-2","action":"disconnect","reason":"arrears","notice_sent_at":"2026-01-01T09:00:00+08:00"}"#,
    )
    .await?;
    let v = w.until(30, done("demo-cut-2")).await?;
    anyhow::ensure!(v["error"]["code"] == "policy_protected", "expected policy_protected: {v}");

    println!("\n4. MTR-0002 (control mode 1) is cut at the customer's request, then restored: armed for the button:");
    w.publish("ami/cmd/MTR-0002", r#"{"id":"demo-cut-3","action":"disconnect","reason":"customer_request"}"#).await?;
    w.until(30, done("demo-cut-3")).await?;
    w.publish("ami/cmd/MTR-0002", r#"{"id":"demo-restore-3","action":"reconnect"}"#).await?;
    let v = w.until(30, done("demo-restore-3")).await?;
    if v["status"] == "armed" {
        println!("  ... the customer presses the meter's button");
        let _ = sim.press_button("SIM0000000002");
    }

    println!("\n5. A read on demand of the Modbus meter MTR-0005:");
    w.publish("ami/cmd/MTR-0005", r#"{"id":"demo-read-5","action":"read"}"#).await?;
    let v = w.until(30, done("demo-read-5")).await?;
    if let Some(r) = v["registers"].as_object() {
        for (obis, reading) in r {
            println!("  {obis}: {} {}", reading["value"], reading["unit"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}
