//! Observability end to end: a real mosquitto, the daemon as a process with
//! `[observability] listen = "127.0.0.1:0"`, the simulator in-process. `/metrics` after
//! commands, a payment, a collection cycle and a reload; `/healthz` and `/readyz` as the
//! broker goes and comes back; bad requests. Everything waits on messages or polls with a
//! deadline.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::daemon::{DaemonProcess, Observer};
use common::mosquitto::Mosquitto;
use common::observe::{endpoint, get, metric, request, wait_metric, wait_status};
use common::site::addr_of;
use common::TempDir;
use meter_sim::{EndpointKind, Faults, FleetConfig, Simulator};

/// (registry id, logical device name)
const METERS: [(&str, &str); 2] = [("A", "SIMOBS00001"), ("OFF", "SIMOBS00002")];

struct Rig {
    sim: Simulator,
    _dir: TempDir,
    config: PathBuf,
    broker: Mosquitto,
    prefix: String,
}

impl Rig {
    async fn start(tag: &str, collection: bool) -> Self {
        let names = METERS.map(|(_, name)| name);
        let fleet = FleetConfig { profile_period_s: 2, profile_depth_days: 1, ..common::site::wrapper_fleet(&names) };
        let sim = Simulator::start(fleet).await.expect("simulator");
        sim.set_faults("SIMOBS00002", Faults { offline: true, ..Faults::default() }).expect("fault");
        let broker = Mosquitto::start();
        let dir = TempDir::new(tag);
        let prefix = format!("obs/{tag}");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let collection = if collection {
            "[collection]\ninterval_s = 2\nspread_s = 1\nsettle_s = 0\nhorizon_s = 40\n\n"
        } else {
            "[collection]\nenabled = false\n\n"
        };
        let mut text = format!(
            "state_dir = \"state\"\n\n[observability]\nlisten = \"127.0.0.1:0\"\n\n\
             [mqtt]\nprefix = \"{prefix}\"\nclient_id = \"headend-{tag}\"\n\n{collection}\
             [commands]\nretry_initial_s = 1\nretry_max_s = 2\n\n\
             [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 300\n\n"
        );
        for (i, (id, name)) in METERS.iter().enumerate() {
            text.push_str(&format!(
                "[[meter]]\nid = \"{id}\"\nlink = \"wrapper\"\nidentity = \"{name}\"\naccount = \"ACC-{id}\"\n\
                 logical_device = {}\n\n",
                i + 1
            ));
        }
        let config = dir.path("site.toml");
        std::fs::write(&config, text).expect("config");
        Self { sim, _dir: dir, config, broker, prefix }
    }

    async fn daemon(&self) -> (DaemonProcess, SocketAddr) {
        let d = DaemonProcess::start(&self.config, &self.broker.url());
        let addr = endpoint(&d, 20).await;
        (d, addr)
    }

    async fn observer(&self, name: &str) -> Observer {
        let obs = Observer::connect(self.broker.port(), &self.prefix, name).await;
        obs.wait_for(20, "daemon online", |m| m.topic.ends_with("/status") && m.json["online"] == true).await;
        obs
    }

    fn cmd(&self, meter: &str) -> String {
        format!("{}/cmd/{meter}", self.prefix)
    }
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_commands_payments_and_collection() {
    let rig = Rig::start("metrics", true).await;
    let (_daemon, addr) = rig.daemon().await;
    let obs = rig.observer("obs-metrics").await;

    let (code, before) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(metric(&before, "headend_commands_total", &[]), None, "no command has ended yet:\n{before}");
    assert_eq!(value(&before, "headend_broker_connected", &[]), 1.0);
    assert_eq!(value(&before, "headend_quarantine_active", &[]), 0.0);
    assert!(value(&before, "headend_journal_bytes", &[]) > 0.0);

    // A read that succeeds, one for a meter not in the registry, and one that fails on
    // the meter until it expires.
    obs.publish(&rig.cmd("A"), r#"{"id":"r1","action":"read"}"#).await;
    assert_eq!(obs.final_status("r1", 15).await["status"], "succeeded");
    obs.publish(&rig.cmd("NOPE"), r#"{"id":"r2","action":"read"}"#).await;
    assert_eq!(obs.final_status("r2", 15).await["status"], "rejected");
    let (_, after) = get(addr, "/metrics").await;
    assert_eq!(value(&after, "headend_commands_total", &[("action", "read"), ("status", "succeeded")]), 1.0);
    assert_eq!(value(&after, "headend_commands_total", &[("status", "rejected")]), 1.0);
    assert_eq!(value(&after, "headend_command_duration_seconds_count", &[("action", "read")]), 1.0);
    assert!(value(&after, "headend_command_duration_seconds_sum", &[("action", "read")]) > 0.0);
    let all = [("action", "read"), ("le", "+Inf")];
    assert_eq!(value(&after, "headend_command_duration_seconds_bucket", &all), 1.0, "a histogram");
    assert!(after.contains("# TYPE headend_commands_total counter"), "{after}");
    assert!(value(&after, "headend_meter_exchanges_total", &[("protocol", "dlms")]) >= 1.0);
    // The one channel has been tried (up or down: the offline meter's collection jobs
    // time out on it now and then).
    assert_eq!(value(&after, "headend_channels", &[("state", "unknown")]), 0.0);
    assert_eq!(value(&after, "headend_channels", &[]), 1.0);

    obs.publish(&rig.cmd("OFF"), r#"{"id":"r3","action":"read"}"#).await;
    obs.wait_for(15, "r3 retrying", |m| m.json["id"] == "r3" && m.json["status"] == "retrying").await;
    wait_metric(addr, "headend_meter_errors_total", &[("kind", "meter_unreachable")], 10, |v| v >= Some(1.0)).await;

    // Payments by outcome.
    let pay = r#"{"id":"p1","account":"ACC-A","amount":"10.00","currency":"CNY","cleared":true,"confirmed_at":"2026-11-28T21:40:00+08:00"}"#;
    obs.publish(&format!("{}/payments", rig.prefix), pay).await;
    obs.wait_for(10, "payment outcome", |m| m.topic.ends_with("/payment/p1")).await;
    obs.publish(&format!("{}/payments", rig.prefix), pay).await;
    obs.wait_for(10, "duplicate payment", |m| m.topic.ends_with("/payment/p1") && m.json["duplicate"] == true).await;
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(value(&text, "headend_payments_total", &[("outcome", "cleared")]), 1.0);
    assert_eq!(value(&text, "headend_payments_total", &[("outcome", "duplicate")]), 1.0);

    // A collection cycle: rows stored, published, and the channel's lag known.
    obs.wait_for(20, "readings of A", |m| m.topic == format!("{}/readings/A", rig.prefix)).await;
    let rows = wait_metric(addr, "headend_readings_collected_total", &[], 10, |v| v > Some(0.0)).await;
    wait_metric(addr, "headend_readings_batches_published_total", &[], 10, |v| v > Some(0.0)).await;
    let (_, text) = get(addr, "/metrics").await;
    assert!(value(&text, "headend_readings_collected_total", &[]) >= rows.unwrap_or_default());
    let lag = value(&text, "headend_collection_lag_seconds", &[("channel", "wrapper")]);
    assert!(lag >= 0.0, "{lag}");
    assert!(metric(&text, "headend_outbox_rows", &[]).is_some(), "{text}");
    // The offline meter's jobs fail.
    wait_metric(addr, "headend_collection_failures_total", &[], 20, |v| v >= Some(1.0)).await;
    let _ = &rig.sim;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_shows_in_the_metrics() {
    let rig = Rig::start("reload", false).await;
    let (daemon, addr) = rig.daemon().await;
    let _obs = rig.observer("obs-reload").await;
    wait_metric(addr, "headend_config_generation", &[], 10, |v| v == Some(0.0)).await;
    daemon.hup();
    wait_metric(addr, "headend_config_generation", &[], 10, |v| v == Some(1.0)).await;
    std::fs::write(&rig.config, "this is not toml [").expect("break");
    daemon.hup();
    wait_metric(addr, "headend_config_reload_failures_total", &[], 10, |v| v == Some(1.0)).await;
    wait_metric(addr, "headend_config_generation", &[], 10, |v| v == Some(1.0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_and_health_stays() {
    let mut rig = Rig::start("ready", false).await;
    let (_daemon, addr) = rig.daemon().await;
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!((code, body.trim()), (200, r#"{"alive":true}"#));
    wait_status(addr, "/readyz", 200, 20).await;

    rig.broker.stop();
    let body = wait_status(addr, "/readyz", 503, 20).await;
    let why: serde_json::Value = serde_json::from_str(&body).expect("JSON reason");
    assert_eq!(why["ready"], false);
    assert!(why["reasons"].as_array().is_some_and(|r| r.iter().any(|r| r == "broker not connected")), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive without the broker");
    wait_metric(addr, "headend_broker_connected", &[], 10, |v| v == Some(0.0)).await;

    rig.broker.restart();
    assert_eq!(wait_status(addr, "/readyz", 200, 30).await.trim(), r#"{"ready":true}"#);
    wait_metric(addr, "headend_broker_connected", &[], 10, |v| v == Some(1.0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_answer_or_a_close_and_never_stop_the_endpoints() {
    let rig = Rig::start("badhttp", false).await;
    let (_daemon, addr) = rig.daemon().await;
    // A client that connects and says nothing holds one connection, not the listener.
    let _silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert_eq!(get(addr, "/nope").await.0, 404);
    assert_eq!(request(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.0, 405);
    assert_eq!(request(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").await.0, 400);
    assert_eq!(request(addr, b"GET /metrics\r\n\r\n").await.0, 400);
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 64 * 1024));
    assert_eq!(request(addr, &huge).await.0, 431);
    // A client that stops sending half-way is told so, and the next one is served.
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /metr").await.expect("send");
    half.shutdown().await.expect("half close");
    let mut answer = String::new();
    half.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let (code, head) = request(addr, b"HEAD /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!((code, head.as_str()), (200, ""));
    assert_eq!(get(addr, "/metrics").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_follow_a_command_in_its_span() {
    let rig = Rig::start("jsonlog", false).await;
    let daemon = DaemonProcess::start_with(&rig.config, &["--broker", &rig.broker.url(), "--log-format", "json"]);
    let obs = rig.observer("obs-jsonlog").await;
    obs.publish(&rig.cmd("A"), r#"{"id":"j1","action":"read"}"#).await;
    assert_eq!(obs.final_status("j1", 15).await["status"], "succeeded");
    // The final status is logged before it is published.
    let log = daemon.log_text();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let in_command = |l: &&serde_json::Value| {
        l["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "command" && s["id"] == "j1" && s["meter"] == "A"))
    };
    let mine: Vec<&serde_json::Value> = lines.iter().filter(in_command).collect();
    let statuses: Vec<&str> = mine
        .iter()
        .filter(|l| l["fields"]["message"] == "command status")
        .filter_map(|l| l["fields"]["status"].as_str())
        .collect();
    assert_eq!(statuses, ["accepted", "executing", "succeeded"], "{log}");
    assert!(mine.iter().any(|l| l["fields"]["message"] == "exchange done"), "{log}");
}
