//! `headend demo`: the whole head-end on one machine. A simulated fleet in-process
//! (DLMS over the wrapper, DLMS behind an HDLC gateway, Modbus; authentication none, LLS
//! and HLS-GMAC; mixed control modes), the embedded MQTT broker, and the daemon. It cuts
//! a meter for arrears, takes a payment and watches the meter come back, prints every
//! status as it happens, then leaves everything running for a second terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use meter_sim::{FleetConfig, FleetPorts, SimOptions, Simulator};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use headend::config::SiteConfig;
use headend::daemon::{self, DaemonOptions};
use headend::time::SystemClock;

/// Arguments of `headend demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many simulated meters.
    #[arg(long, default_value_t = 10)]
    meters: usize,
    /// Where the generated site configuration and state go.
    #[arg(long, default_value = "demo-site")]
    dir: PathBuf,
    /// Run the tour and exit, instead of keeping everything up for a second terminal.
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
    // A fresh state directory: the demo's journal starts empty every time.
    let _ = std::fs::remove_dir_all(args.dir.join("state"));
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let config = args.dir.join("site.toml");
    sim.write_headend_config(&config).context("writing the site configuration")?;
    let port = headend::mqtt::start_embedded(0).context("starting the embedded broker")?;
    let broker = format!("mqtt://127.0.0.1:{port}");
    add_demo_settings(&config, &broker)?;
    let site = SiteConfig::load(&config)?;

    println!("headend demo");
    println!("  simulated fleet: {} meters", site.meters.len());
    for e in sim.endpoints() {
        let at = e.addr.map(|a| a.to_string()).or(e.serial_path.clone()).unwrap_or_default();
        println!("    {:<18} {at:<22} {} meter(s)", format!("{:?}", e.kind), e.meters.len());
    }
    println!("  MQTT broker:     {broker} (embedded)");
    println!("  configuration:   {}\n", config.display());

    let stop = CancellationToken::new();
    let daemon_stop = stop.clone();
    let daemon_site = site.clone();
    let daemon = tokio::spawn(async move {
        let opts = DaemonOptions { broker: None, clock: Arc::new(SystemClock), reload: None };
        daemon::run(daemon_site, opts, daemon_stop).await
    });

    let watcher = Watcher::connect(port).await?;
    // The daemon subscribes before it says it is online: only then are commands heard.
    let online = watcher.until(30, |t, v| t.ends_with("/status") && v["online"] == true).await;
    let result = match online {
        Ok(_) => tour(&watcher, &sim).await,
        Err(e) => Err(e.context("the daemon did not come online")),
    };
    match &result {
        Ok(()) => println!("\nThe tour is done: every command reached its final status."),
        Err(e) => println!("\nThe tour stopped: {e:#}"),
    }

    if !args.once && result.is_ok() {
        let cfg = config.display();
        println!("\nTry from a second terminal (everything stays up until Ctrl-C):");
        println!("  cargo run --release -- cut --config {cfg} MTR-0002 --reason customer_request");
        println!("  cargo run --release -- restore --config {cfg} MTR-0002");
        println!("  cargo run --release -- pay --config {cfg} --account ACC-0001 --amount 50.00");
        println!("  cargo run --release -- read --config {cfg} MTR-0005");
        println!("  cargo run --release -- audit --config {cfg} --meter MTR-0001");
        println!("  cargo run --release -- meter --config {cfg} profile MTR-0001 --hours 3");
        println!("  mosquitto_sub -p {port} -t 'ami/#' -v        # everything the daemon publishes\n");
        println!("Live:");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = watcher.print_forever() => {}
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), daemon).await;
    sim.shutdown().await;
    Ok(if result.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Accounts (two meters each; ACC-0003 protected), a service window open every day so the
/// tour works at any hour, and the broker.
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
         [[account]]\nid = \"ACC-0003\"\nprotection = \"medical\"\n"
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
    async fn connect(port: u16) -> anyhow::Result<Self> {
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

    async fn print_forever(&self) {
        let mut rx = self.rx.lock().await;
        while let Some((topic, v)) = rx.recv().await {
            print_message(&topic, &v);
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
    } else if topic.contains("/state/") {
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
