//! The daemon speaking MQTT 5 (`[mqtt] protocol = "5"`), end to end: a real mosquitto
//! (which serves 3.1.1 and 5 on one listener, so the test's 3.1.1 observer stands for an
//! integrator that never upgraded), the daemon as a process, the simulator in-process.
//! mosquitto logs each client's protocol (`p5`) and clean-start flag (`c0`), which is how
//! these tests know the daemon did not quietly fall back to 3.1.1.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::{DaemonProcess, Observer};
use common::mosquitto::{self, Mosquitto};
use common::site::addr_of;
use common::TempDir;
use headend::config::MqttConfig;
use headend::mqtt::{self, BrokerUrl, Client, Event, Protocol, QoS, Session};
use meter_sim::{EndpointKind, Simulator};
use serde_json::Value;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(20);

/// Two DLMS meters behind one wrapper endpoint.
async fn simulator() -> Simulator {
    let fleet = common::site::wrapper_fleet(&["SIM0000000001", "SIM0000000002"]);
    Simulator::start(fleet).await.expect("simulator")
}

/// A site file for the simulator's two meters (M-1, M-2) with `mqtt` as its [mqtt] body.
fn site(dir: &TempDir, sim: &Simulator, mqtt: &str) -> PathBuf {
    let wrapper = addr_of(sim, EndpointKind::DlmsWrapperTcp);
    let mut text = format!(
        "state_dir = \"state\"\n\n[mqtt]\n{mqtt}\n\n\
         [commands]\nretry_initial_s = 1\nretry_max_s = 2\n\n\
         [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 1000\n\n"
    );
    for i in 1..=2 {
        text.push_str(&format!(
            "[[meter]]\nid = \"M-{i}\"\nlink = \"wrapper\"\nidentity = \"SIM000000000{i}\"\naccount = \"ACC-{i}\"\n\
             logical_device = {i}\nclient_sap = 16\n\n"
        ));
    }
    let path = dir.path("site.toml");
    std::fs::write(&path, text).expect("site file");
    path
}

/// Wait until the daemon says it is online (retained status).
async fn online(obs: &Observer) {
    obs.wait_for(20, "daemon online", |m| m.topic.ends_with("/status") && m.json["online"] == true).await;
}

/// The broker's log line of a client's CONNECT: `... as ID (p5, c0, k30...)`.
fn connect_line(broker: &Mosquitto, client_id: &str) -> String {
    let needle = format!(" as {client_id} (");
    tokio::task::block_in_place(|| broker.wait_log(WAIT, |l| l.contains(&needle)))
}

/// Log text without the terminal's colour sequences (`ESC [ ... m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

fn relay_closed(sim: &Simulator, name: &str) -> bool {
    sim.meter(name).expect("simulated meter").output_state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_and_a_restore_run_end_to_end_over_mqtt5() {
    let sim = simulator().await;
    let broker = Mosquitto::start();
    let dir = TempDir::new("m5-e2e");
    let config = site(&dir, &sim, "protocol = \"5\"\nprefix = \"m5/e2e\"\nclient_id = \"headend-m5-e2e\"");
    let obs = Observer::connect(broker.port(), "m5/e2e", "obs-m5-e2e").await;
    let _daemon = DaemonProcess::start(&config, &broker.url());
    online(&obs).await;
    let line = connect_line(&broker, "headend-m5-e2e");
    assert!(line.contains("(p5, c0,"), "the daemon speaks MQTT 5 with a persistent session: {line}");

    obs.publish("m5/e2e/cmd/M-1", r#"{"id":"m5-cut","action":"disconnect","reason":"maintenance"}"#).await;
    let r = obs.final_status("m5-cut", 20).await;
    assert_eq!((r["status"].as_str(), r["relay"].as_str()), (Some("succeeded"), Some("disconnected")), "{r}");
    assert_eq!(obs.statuses("m5-cut"), vec!["accepted", "executing", "succeeded"]);
    assert!(!relay_closed(&sim, "SIM0000000001"), "the relay really opened");
    assert!(relay_closed(&sim, "SIM0000000002"), "and only that one");

    obs.publish("m5/e2e/cmd/M-1", r#"{"id":"m5-restore","action":"reconnect"}"#).await;
    assert_eq!(obs.final_status("m5-restore", 20).await["status"], "succeeded");
    assert!(relay_closed(&sim, "SIM0000000001"));
    // Repeats are answered from the journal over MQTT 5 as over 3.1.1.
    obs.publish("m5/e2e/cmd/M-1", r#"{"id":"m5-cut","action":"disconnect","reason":"maintenance"}"#).await;
    let dup = obs.wait_for(10, "duplicate", |m| m.json["id"] == "m5-cut" && m.json["duplicate"] == true).await;
    assert_eq!(dup.json["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_published_while_the_daemon_is_stopped_runs_when_it_starts_again() {
    let sim = simulator().await;
    let broker = Mosquitto::start();
    let dir = TempDir::new("m5-session");
    let config = site(&dir, &sim, "protocol = \"5\"\nprefix = \"m5/session\"\nclient_id = \"headend-m5-session\"");
    let obs = Observer::connect(broker.port(), "m5/session", "obs-m5-session").await;
    let mut daemon = DaemonProcess::start(&config, &broker.url());
    online(&obs).await;
    // A clean stop sends DISCONNECT. Under MQTT 5 the broker then keeps the session only
    // for its expiry interval: with none asked for, it would end here and the command
    // below would be dropped at the broker.
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log_text());
    obs.wait_for(10, "daemon offline", |m| m.topic.ends_with("/status") && m.json["online"] == false).await;

    // Published and acknowledged by the broker (PUBACK) before the daemon starts again.
    let billing = mosquitto::TestClient::connect(broker.port(), &[]).await;
    billing.publish("m5/session/cmd/M-2", r#"{"id":"while-down","action":"disconnect","reason":"safety"}"#).await;
    let daemon = DaemonProcess::start(&config, &broker.url());
    let r = obs.final_status("while-down", 20).await;
    assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log_text());
    assert!(!relay_closed(&sim, "SIM0000000002"));
    let log = without_colours(&daemon.log_text());
    assert!(log.contains("session_present=true"), "the broker resumed the session: {log}\nBROKER:\n{}", broker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_says_offline_when_the_daemon_is_killed_and_nothing_is_lost() {
    let sim = simulator().await;
    let broker = Mosquitto::start();
    let dir = TempDir::new("m5-will");
    let config = site(&dir, &sim, "protocol = \"5\"\nprefix = \"m5/will\"\nclient_id = \"headend-m5-will\"");
    let obs = Observer::connect(broker.port(), "m5/will", "obs-m5-will").await;
    let mut daemon = DaemonProcess::start(&config, &broker.url());
    online(&obs).await;
    assert!(
        !obs.all().iter().any(|m| m.topic.ends_with("/status") && m.json["online"] == false),
        "not offline before the kill"
    );
    daemon.kill();
    // SIGKILL: no goodbye, so only the broker can say it, from the last will.
    let will = obs.wait_for(10, "last will", |m| m.topic.ends_with("/status") && m.json["online"] == false).await;
    assert_eq!(will.json, serde_json::json!({"online": false}));

    let desk = mosquitto::TestClient::connect(broker.port(), &[]).await;
    desk.publish("m5/will/cmd/M-1", r#"{"id":"after-crash","action":"read"}"#).await;
    let _daemon = DaemonProcess::start(&config, &broker.url());
    let r = obs.final_status("after-crash", 20).await;
    assert_eq!(r["status"], "succeeded", "{r}");
}

/// An MQTT 5 client built from the daemon's own connection layer, for brokers the
/// 3.1.1 observer cannot use (the embedded broker's v5 listener; TLS with credentials).
struct V5Observer {
    client: Client,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl V5Observer {
    /// Connect (retrying until the broker is up), subscribe to `filter`, and return once
    /// the SUBACK is in.
    async fn connect(cfg: &MqttConfig, url: &BrokerUrl, base_dir: &Path, id: &str, filter: &str) -> Self {
        let mut o = mqtt::options(cfg, url, id, None, base_dir).expect("client options");
        assert_eq!(o.protocol(), Protocol::V5);
        o.set_session(Session::Clean);
        let (client, mut events) = mqtt::connect(o, 64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let mut sub_tx = Some(sub_tx);
        let (s, a, c, filter) = (Arc::clone(&seen), Arc::clone(&arrived), client.clone(), filter.to_owned());
        let last_error = Arc::new(Mutex::new(String::new()));
        let error = Arc::clone(&last_error);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Event::Connected { .. } => {
                        let _ = c.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Event::Subscribed { granted } => {
                        if let Some(tx) = sub_tx.take() {
                            let _ = tx.send(granted);
                        }
                    }
                    Event::Message(m) => {
                        let json = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                        if let Ok(mut v) = s.lock() {
                            v.push((m.topic, json));
                        }
                        a.notify_waiters();
                    }
                    Event::Disconnected(e) => {
                        if let Ok(mut l) = error.lock() {
                            *l = e.to_string();
                        }
                        // Paces reconnection while the broker starts; nothing waits on it.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ => {}
                }
            }
        });
        let subscribed = tokio::time::timeout(WAIT, sub_rx).await;
        assert!(
            matches!(subscribed, Ok(Ok(true))),
            "MQTT 5 observer not subscribed ({subscribed:?}); last connection error: {}",
            last_error.lock().map(|e| e.clone()).unwrap_or_default()
        );
        Self { client, seen, arrived, task }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_owned()).await.expect("publish queued");
    }

    /// Wait for a message satisfying `pred`; panics with what was seen.
    async fn wait_for(&self, what: &str, pred: impl Fn(&str, &Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            let seen = self.seen.lock().map(|v| v.clone()).unwrap_or_default();
            if let Some((_, v)) = seen.iter().find(|(t, v)| pred(t, v)) {
                return v.clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen: Vec<String> = seen.iter().map(|(t, v)| format!("{t} {v}")).collect();
                panic!("timed out waiting for {what}; seen:\n{}", seen.join("\n"));
            }
        }
    }
}

impl Drop for V5Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_over_tls_with_username_and_password() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mqtt-tls");
    let f = |name: &str| fixtures.join(name).to_string_lossy().into_owned();
    let tls_port = mosquitto::free_port();
    // Global settings: the harness's plain listener wants credentials too.
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
        f("ca.pem"),
        f("server.pem"),
        f("server.key"),
        f("passwd")
    ));
    let sim = simulator().await;
    let dir = TempDir::new("m5-tls");
    let secret = "desk-s3cret-pw";
    std::fs::write(dir.path("mqtt.pw"), format!("{secret}\n")).expect("password file");
    let mqtt_section = format!(
        "protocol = \"5\"\nbroker = \"mqtts://localhost:{tls_port}\"\nprefix = \"m5/tls\"\nclient_id = \"headend-m5-tls\"\n\
         username = \"desk\"\npassword_file = \"mqtt.pw\"\nca_file = \"{}\"",
        f("ca.pem")
    );
    let config = site(&dir, &sim, &mqtt_section);
    let daemon = DaemonProcess::start_with(&config, &[]);
    let cfg = headend::config::SiteConfig::load(&config).expect("site loads").mqtt;
    let url = BrokerUrl::parse(&format!("mqtts://localhost:{tls_port}")).expect("url");
    let obs = V5Observer::connect(&cfg, &url, &dir.0, "obs-m5-tls", "m5/tls/#").await;
    obs.wait_for("daemon online", |t, v| t.ends_with("/status") && v["online"] == true).await;
    let line = connect_line(&broker, "headend-m5-tls");
    assert!(line.contains("(p5, c0,") && line.contains(", u'desk')"), "MQTT 5 as desk: {line}");

    obs.publish("m5/tls/cmd/M-1", r#"{"id":"tls-read","action":"read"}"#).await;
    let r = obs.wait_for("read over TLS", |_, v| v["id"] == "tls-read" && v["status"] == "succeeded").await;
    assert_eq!(r["registers"]["1.0.1.8.0.255"]["unit"], "Wh", "{r}");
    assert!(!daemon.log_text().contains(secret), "the password was logged: {}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_mqtt5_to_the_daemon_and_the_client_verbs() {
    let sim = simulator().await;
    let dir = TempDir::new("m5-embedded");
    let port = mosquitto::free_port();
    let config = site(&dir, &sim, &format!("protocol = \"5\"\nprefix = \"m5/emb\"\nembedded_port = {port}"));
    let daemon = DaemonProcess::start_with(&config, &[]);
    let cfg = headend::config::SiteConfig::load(&config).expect("site loads").mqtt;
    let url = BrokerUrl::parse(&format!("mqtt://127.0.0.1:{port}")).expect("url");
    let obs = V5Observer::connect(&cfg, &url, &dir.0, "obs-m5-emb", "m5/emb/#").await;
    obs.wait_for("daemon online", |t, v| t.ends_with("/status") && v["online"] == true).await;

    obs.publish("m5/emb/cmd/M-1", r#"{"id":"emb-cut","action":"disconnect","reason":"maintenance"}"#).await;
    let r = obs.wait_for("cut", |_, v| v["id"] == "emb-cut" && v["status"] == "succeeded").await;
    assert_eq!(r["relay"], "disconnected", "{r}\n{}", daemon.log_text());
    assert!(!relay_closed(&sim, "SIM0000000001"));

    // `headend restore` reads protocol and port from the same file, and speaks MQTT 5 to
    // the embedded broker's MQTT 5 listener.
    let cfg_path = config.to_string_lossy().into_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_headend"))
            .args(["restore", "M-1", "--config", &cfg_path, "--timeout", "20", "--json"])
            .output()
            .expect("headend runs")
    })
    .await
    .expect("joined");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("\"outcome\":\"succeeded\""), "{text}");
    assert!(relay_closed(&sim, "SIM0000000001"));
}
