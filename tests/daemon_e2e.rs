//! The daemon end to end: a real mosquitto, the daemon as a process, the simulator
//! in-process. Every status and error code of the MQTT contract, payments, SIGKILL
//! between accept and execute and between execute and verify, and broker restarts.

mod common;

use std::time::Duration;

use common::daemon::{DaemonProcess, Observer};
use common::mosquitto::Mosquitto;
use common::site::addr_of;
use common::TempDir;
use meter_sim::{EndpointKind, EndpointSpec, Faults, FleetConfig, MeterSpec, SimEventKind, Simulator};
use serde_json::Value;

/// The simulated meters: (registry id, logical device name, control mode, account).
const METERS: [(&str, &str, u8, &str); 9] = [
    ("M-A", "SIM0000000001", 2, "ACC-1"),
    ("M-B", "SIM0000000002", 1, "ACC-1"),
    ("M-FIXED", "SIM0000000003", 0, "ACC-3"),
    ("M-STUCK", "SIM0000000004", 2, "ACC-4"),
    ("M-WRONG", "SIM0000000005", 2, "ACC-5"),
    ("M-P", "SIM0000000006", 2, "ACC-P"),
    ("M-OFF", "SIM0000000007", 2, "ACC-7"),
    ("M-C", "SIM0000000008", 2, "ACC-2"),
    ("M-SLOW", "SIM0000000009", 2, "ACC-9"),
];

fn fleet() -> FleetConfig {
    let meters = METERS
        .iter()
        .enumerate()
        .map(|(i, (_, name, mode, _))| {
            let mut m = MeterSpec::dlms(*name, i);
            m.logical_device = i as u16 + 1;
            m.control_mode = *mode;
            m
        })
        .collect();
    FleetConfig {
        meters,
        endpoints: vec![EndpointSpec::DlmsWrapperTcp {
            bind: "127.0.0.1:0".parse().expect("addr"),
            meters: (0..METERS.len()).collect(),
        }],
        ..FleetConfig::default()
    }
}

struct Rig {
    sim: Simulator,
    _dir: TempDir,
    config: std::path::PathBuf,
    broker: Mosquitto,
    prefix: String,
}

impl Rig {
    /// The simulator, a broker and a configuration; `extra` is appended (policy etc.).
    async fn start(tag: &str, extra: &str) -> Self {
        let sim = Simulator::start(fleet()).await.expect("simulator");
        sim.set_faults("SIM0000000004", Faults { stuck_relay: true, ..Faults::default() }).expect("fault");
        sim.set_faults("SIM0000000007", Faults { offline: true, ..Faults::default() }).expect("fault");
        sim.set_faults("SIM0000000009", Faults { response_delay_ms: 300, ..Faults::default() }).expect("fault");
        let broker = Mosquitto::start();
        let dir = TempDir::new(tag);
        let prefix = format!("e2e/{tag}");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let mut text = format!(
            "state_dir = \"state\"\n\n[mqtt]\nprefix = \"{prefix}\"\nclient_id = \"headend-{tag}\"\n\n\
             [commands]\nretry_initial_s = 1\nretry_max_s = 2\n\n\
             [[account]]\nid = \"ACC-P\"\nprotection = \"medical\"\n\n\
             [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 400\n\n"
        );
        for (i, (id, name, _, account)) in METERS.iter().enumerate() {
            let identity = if *id == "M-WRONG" { "SIM0000009999" } else { name };
            text.push_str(&format!(
                "[[meter]]\nid = \"{id}\"\nlink = \"wrapper\"\nidentity = \"{identity}\"\naccount = \"{account}\"\n\
                 logical_device = {}\nclient_sap = 16\n\n",
                i + 1
            ));
        }
        text.push_str(extra);
        let config = dir.path("site.toml");
        std::fs::write(&config, text).expect("config");
        Self { sim, _dir: dir, config, broker, prefix }
    }

    fn daemon(&self) -> DaemonProcess {
        DaemonProcess::start(&self.config, &self.broker.url())
    }

    async fn observer(&self, name: &str) -> Observer {
        Observer::connect(self.broker.port(), &self.prefix, name).await
    }

    fn cmd(&self, meter: &str) -> String {
        format!("{}/cmd/{meter}", self.prefix)
    }

    fn relay_closed(&self, name: &str) -> bool {
        self.sim.meter(name).expect("simulated meter").output_state
    }
}

/// Wait until the daemon says it is online (retained status).
async fn online(obs: &Observer) {
    obs.wait_for(20, "daemon online", |m| m.topic.ends_with("/status") && m.json["online"] == true).await;
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

const NOTICE: &str = "2020-01-01T00:00:00Z";
/// Every day, all day: the arrears window never defers in these tests unless asked.
const ALWAYS_OPEN: &str = "[policy.window]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
                           start = \"00:00\"\nend = \"24:00\"\nno_cut_before_holiday = false\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_and_error_code_of_the_contract() {
    let rig = Rig::start("codes", ALWAYS_OPEN).await;
    let obs = rig.observer("obs-codes").await;
    let _daemon = rig.daemon();
    online(&obs).await;

    // Bad input: each gets its `rejected` on the meter's result topic.
    obs.publish(&rig.cmd("M-A"), "this is not JSON").await;
    let r =
        obs.wait_for(10, "invalid_payload", |m| m.topic.ends_with("/result/M-A") && m.json["id"].is_null()).await.json;
    assert_eq!((r["status"].as_str(), code(&r)), (Some("rejected"), "invalid_payload"));
    obs.publish(&rig.cmd("M-A"), r#"{"id":"u1","action":"explode"}"#).await;
    assert_eq!(code(&obs.final_status("u1", 10).await), "unsupported_action");
    obs.publish(&rig.cmd("NO-SUCH-METER"), r#"{"id":"u2","action":"read"}"#).await;
    assert_eq!(code(&obs.final_status("u2", 10).await), "unknown_meter");
    let oversize = format!(r#"{{"id":"u3","action":"read","operator":"{}"}}"#, "x".repeat(1024 * 1024));
    obs.publish(&rig.cmd("M-A"), &oversize).await;
    // Refused unread, so with `id: null`.
    let r = obs
        .wait_for(10, "oversize", |m| m.json["error"]["message"].as_str().is_some_and(|t| t.contains("1 MiB")))
        .await
        .json;
    assert_eq!((r["status"].as_str(), code(&r), r["id"].is_null()), (Some("rejected"), "invalid_payload", true));
    obs.publish(&rig.cmd("M-A"), r#"{"id":"pay:stolen:M-A","action":"disconnect","reason":"safety"}"#).await;
    assert_eq!(code(&obs.final_status("pay:stolen:M-A", 10).await), "invalid_payload", "pay: ids are reserved");
    obs.publish(&rig.cmd("M-A"), r#"{"id":"bad id with spaces","action":"read"}"#).await;
    let r = obs
        .wait_for(10, "invalid id", |m| {
            m.topic.ends_with("/result/M-A") && code(&m.json) == "invalid_payload" && !m.json["id"].is_null()
        })
        .await;
    assert_eq!(r.json["status"], "rejected");

    // A cut that works: accepted, executing, succeeded, and the relay really opened.
    let a1 = r#"{"id":"a1","action":"disconnect","reason":"customer_request","operator":"95598/test"}"#;
    obs.publish(&rig.cmd("M-A"), a1).await;
    let r = obs.final_status("a1", 15).await;
    assert_eq!((r["status"].as_str(), r["relay"].as_str()), (Some("succeeded"), Some("disconnected")));
    assert_eq!(obs.statuses("a1"), vec!["accepted", "executing", "succeeded"]);
    assert!(!rig.relay_closed("SIM0000000001"));
    obs.wait_for(10, "retained state", |m| {
        m.topic.ends_with("/state/M-A") && m.json["relay"] == "disconnected" && m.json["reason"] == "customer_request"
    })
    .await;

    // The same id again: republished with duplicate; different content: duplicate_id.
    obs.publish(&rig.cmd("M-A"), a1).await;
    let dup = obs.wait_for(10, "duplicate", |m| m.json["id"] == "a1" && m.json["duplicate"] == true).await.json;
    assert_eq!(dup["status"], "succeeded");
    obs.publish(&rig.cmd("M-A"), r#"{"id":"a1","action":"read"}"#).await;
    let dup = obs.wait_for(10, "duplicate_id", |m| m.json["id"] == "a1" && code(&m.json) == "duplicate_id").await.json;
    assert_eq!(dup["status"], "rejected");

    // Mode 1: a reconnect is armed, waiting for the customer.
    obs.publish(&rig.cmd("M-B"), r#"{"id":"b1","action":"disconnect","reason":"customer_request"}"#).await;
    assert_eq!(obs.final_status("b1", 15).await["status"], "succeeded");
    obs.publish(&rig.cmd("M-B"), r#"{"id":"b2","action":"reconnect"}"#).await;
    let r = obs.final_status("b2", 15).await;
    assert_eq!((r["status"].as_str(), r["relay"].as_str()), (Some("armed"), Some("ready_for_reconnection")));

    // A read carries what it read.
    obs.publish(&rig.cmd("M-C"), r#"{"id":"rd1","action":"read"}"#).await;
    let r = obs.final_status("rd1", 15).await;
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["registers"]["1.0.1.8.0.255"]["unit"], "Wh");
    assert!(r["meter_clock"].is_string());

    // Meters that say no, lie, or are not who they should be.
    obs.publish(&rig.cmd("M-FIXED"), r#"{"id":"f1","action":"disconnect","reason":"maintenance"}"#).await;
    let r = obs.final_status("f1", 15).await;
    assert_eq!((r["status"].as_str(), code(&r)), (Some("failed"), "meter_refused"));
    obs.publish(&rig.cmd("M-STUCK"), r#"{"id":"s1","action":"disconnect","reason":"safety"}"#).await;
    let r = obs.final_status("s1", 15).await;
    assert_eq!((r["status"].as_str(), code(&r)), (Some("failed"), "verify_mismatch"));
    obs.publish(&rig.cmd("M-WRONG"), r#"{"id":"w1","action":"disconnect","reason":"tamper"}"#).await;
    let r = obs.final_status("w1", 15).await;
    assert_eq!((r["status"].as_str(), code(&r)), (Some("failed"), "identity_mismatch"));
    assert!(rig.relay_closed("SIM0000000005"), "the wrong meter was not switched");

    // Policy.
    let arrears = |id: &str, extra: &str| {
        format!(r#"{{"id":"{id}","action":"disconnect","reason":"arrears","notice_sent_at":"{NOTICE}"{extra}}}"#)
    };
    obs.publish(&rig.cmd("M-P"), &arrears("p1", "")).await;
    assert_eq!(code(&obs.final_status("p1", 10).await), "policy_protected");
    assert!(rig.relay_closed("SIM0000000006"));
    obs.publish(&rig.cmd("M-C"), r#"{"id":"n1","action":"disconnect","reason":"arrears"}"#).await;
    assert_eq!(code(&obs.final_status("n1", 10).await), "policy_no_notice");
    obs.publish(
        &format!("{}/payments", rig.prefix),
        r#"{"id":"pay-stale","account":"ACC-2","amount":"1.00","currency":"CNY","cleared":true,"confirmed_at":"2026-01-02T00:00:00Z"}"#,
    )
    .await;
    obs.wait_for(10, "payment outcome", |m| m.topic.ends_with("/payment/pay-stale")).await;
    obs.publish(&rig.cmd("M-C"), &arrears("st1", r#","arrears_as_of":"2026-01-01T00:00:00Z""#)).await;
    assert_eq!(code(&obs.final_status("st1", 10).await), "policy_stale_arrears");

    // An unreachable meter: retried until its expiry, then failed.
    let soon = headend::contract::format_at(headend::time::SystemClock.now_ms() + 3500, 0);
    obs.publish(&rig.cmd("M-OFF"), &format!(r#"{{"id":"o1","action":"read","expires_at":"{soon}"}}"#)).await;
    let r = obs.final_status("o1", 20).await;
    assert_eq!((r["status"].as_str(), code(&r)), (Some("failed"), "meter_unreachable"));
    assert!(obs.statuses("o1").contains(&"retrying".to_owned()), "{:?}", obs.statuses("o1"));
}

use headend::time::Clock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_superseded_expired_and_quarantine() {
    let extra = format!(
        "{ALWAYS_OPEN}[policy.rate]\nchannel_burst = 1\nchannel_per_hour = 1\nquarantine_threshold = 3\nquarantine_window_s = 600\n\n"
    );
    let rig = Rig::start("defer", &extra).await;
    let obs = rig.observer("obs-defer").await;
    let _daemon = rig.daemon();
    online(&obs).await;

    obs.publish(&rig.cmd("M-A"), r#"{"id":"d1","action":"disconnect","reason":"customer_request"}"#).await;
    assert_eq!(obs.final_status("d1", 15).await["status"], "succeeded");
    // The channel's one disconnect per hour is spent: the next waits.
    obs.publish(&rig.cmd("M-B"), r#"{"id":"d2","action":"disconnect","reason":"customer_request"}"#).await;
    let deferred = obs.wait_for(10, "deferred", |m| m.json["id"] == "d2" && m.json["status"] == "deferred").await.json;
    assert!(deferred["not_before"].is_string(), "{deferred}");
    assert!(rig.relay_closed("SIM0000000002"));
    // A newer intent for the meter replaces it.
    obs.publish(&rig.cmd("M-B"), r#"{"id":"r2","action":"reconnect"}"#).await;
    let r = obs.final_status("d2", 10).await;
    assert_eq!((r["status"].as_str(), r["by"].as_str()), (Some("superseded"), Some("r2")), "{r}");
    assert_eq!(obs.final_status("r2", 15).await["status"], "succeeded");
    // Deferred past its expiry.
    let soon = headend::contract::format_at(headend::time::SystemClock.now_ms() + 1500, 0);
    obs.publish(
        &rig.cmd("M-C"),
        &format!(r#"{{"id":"e1","action":"disconnect","reason":"customer_request","expires_at":"{soon}"}}"#),
    )
    .await;
    assert_eq!(obs.final_status("e1", 10).await["status"], "expired");
    // A burst beyond the quarantine threshold: rejected, and nothing more is cut.
    obs.publish(&rig.cmd("M-SLOW"), r#"{"id":"q1","action":"disconnect","reason":"customer_request"}"#).await;
    let r = obs.final_status("q1", 10).await;
    assert_eq!((r["status"].as_str(), code(&r)), (Some("rejected"), "policy_rate_limit"), "{r}");
    obs.publish(&rig.cmd("M-C"), r#"{"id":"q2","action":"disconnect","reason":"safety"}"#).await;
    assert_eq!(code(&obs.final_status("q2", 10).await), "policy_rate_limit");
    // Reconnects are never held back.
    obs.publish(&rig.cmd("M-A"), r#"{"id":"q3","action":"reconnect"}"#).await;
    assert_eq!(obs.final_status("q3", 15).await["status"], "succeeded");
    assert!(rig.relay_closed("SIM0000000008") && rig.relay_closed("SIM0000000009"));
    // An operator lifts the quarantine (audited); disconnects are possible again, within
    // the rate limit (the channel's slot is still spent: deferred, not rejected).
    obs.publish(&format!("{}/admin/lift-quarantine", rig.prefix), r#"{"by":"ops/zhang","why":"caller fixed"}"#).await;
    obs.publish(&rig.cmd("M-C"), r#"{"id":"q4","action":"disconnect","reason":"safety"}"#).await;
    let r = obs
        .wait_for(10, "q4 after the lift", |m| {
            m.topic.contains("/result/") && m.json["id"] == "q4" && m.json["status"] != "accepted"
        })
        .await
        .json;
    assert_eq!(r["status"], "deferred", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_payment_reconnects_only_the_meters_cut_for_arrears() {
    let rig = Rig::start("pay", ALWAYS_OPEN).await;
    let obs = rig.observer("obs-pay").await;
    let _daemon = rig.daemon();
    online(&obs).await;
    let arrears = format!(
        r#"{{"id":"x1","action":"disconnect","reason":"arrears","notice_sent_at":"{NOTICE}","arrears_as_of":"2026-11-01T00:00:00Z"}}"#
    );
    obs.publish(&rig.cmd("M-A"), &arrears).await;
    assert_eq!(obs.final_status("x1", 15).await["status"], "succeeded");
    obs.publish(&rig.cmd("M-B"), r#"{"id":"x2","action":"disconnect","reason":"customer_request"}"#).await;
    assert_eq!(obs.final_status("x2", 15).await["status"], "succeeded");

    let pay = r#"{"id":"pay-889120","account":"ACC-1","amount":"120.50","currency":"CNY","cleared":true,"confirmed_at":"2026-11-28T21:40:00+08:00"}"#;
    obs.publish(&format!("{}/payments", rig.prefix), pay).await;
    let outcome = obs.wait_for(10, "payment outcome", |m| m.topic.ends_with("/payment/pay-889120")).await.json;
    let reconnects = outcome["reconnects"].as_array().cloned().unwrap_or_default();
    assert_eq!(reconnects.len(), 1, "{outcome}");
    let id = reconnects[0]["id"].as_str().unwrap_or_default().to_owned();
    let r = obs.final_status(&id, 15).await;
    assert_eq!((r["status"].as_str(), r["trigger"]["payment"].as_str()), (Some("succeeded"), Some("pay-889120")));
    assert!(rig.relay_closed("SIM0000000001"), "the meter cut for arrears is back");
    assert!(!rig.relay_closed("SIM0000000002"), "the meter cut at the customer's request stays cut");

    // The same payment again changes nothing.
    obs.publish(&format!("{}/payments", rig.prefix), pay).await;
    obs.wait_for(10, "duplicate payment", |m| m.topic.ends_with("/payment/pay-889120") && m.json["duplicate"] == true)
        .await;
    assert_eq!(obs.statuses(&id).iter().filter(|s| *s == "succeeded").count(), 1);
}

/// A restart after SIGKILL: every accepted command reaches exactly one final status and
/// no relay is left against the newest intent.
fn assert_exactly_one_final(obs: &Observer, ids: &[&str]) {
    let finals = ["succeeded", "armed", "superseded", "rejected", "failed", "expired"];
    for id in ids {
        let n = obs.statuses(id).iter().filter(|s| finals.contains(&s.as_str())).count();
        assert_eq!(n, 1, "{id}: {:?}", obs.statuses(id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_accept_and_execute() {
    let rig = Rig::start("kill1", ALWAYS_OPEN).await;
    let obs = rig.observer("obs-kill1").await;
    let mut daemon = rig.daemon();
    online(&obs).await;
    // The slow meter keeps the link busy, so the cut of M-A is accepted but not executed.
    obs.publish(&rig.cmd("M-SLOW"), r#"{"id":"k0","action":"read"}"#).await;
    obs.wait_for(10, "k0 executing", |m| m.json["id"] == "k0" && m.json["status"] == "executing").await;
    obs.publish(&rig.cmd("M-A"), r#"{"id":"k1","action":"disconnect","reason":"customer_request"}"#).await;
    obs.wait_for(10, "k1 accepted", |m| m.json["id"] == "k1" && m.json["status"] == "accepted").await;
    daemon.kill();
    assert!(rig.relay_closed("SIM0000000001"), "killed before it executed");
    let _daemon = rig.daemon();
    assert_eq!(obs.final_status("k1", 20).await["status"], "succeeded");
    assert_eq!(obs.final_status("k0", 20).await["status"], "succeeded");
    assert!(!rig.relay_closed("SIM0000000001"));
    assert_exactly_one_final(&obs, &["k0", "k1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_execute_and_verify() {
    let rig = Rig::start("kill2", ALWAYS_OPEN).await;
    let obs = rig.observer("obs-kill2").await;
    let mut daemon = rig.daemon();
    online(&obs).await;
    let mut events = rig.sim.subscribe();
    // M-SLOW answers after 300 ms: the relay moves, then the daemon dies before it has
    // read the relay back.
    obs.publish(&rig.cmd("M-SLOW"), r#"{"id":"v1","action":"disconnect","reason":"customer_request"}"#).await;
    loop {
        let e = tokio::time::timeout(Duration::from_secs(15), events.recv()).await.expect("switch").expect("event");
        if e.meter == "SIM0000000009" && matches!(e.kind, SimEventKind::Switched { .. }) {
            break;
        }
    }
    daemon.kill();
    let switches_before = rig.sim.control_log("SIM0000000009").map(|l| l.len()).unwrap_or(0);
    let _daemon = rig.daemon();
    let r = obs.final_status("v1", 20).await;
    assert_eq!((r["status"].as_str(), r["relay"].as_str()), (Some("succeeded"), Some("disconnected")));
    assert_exactly_one_final(&obs, &["v1"]);
    // Re-verified by reading, not switched twice blindly.
    assert_eq!(rig.sim.control_log("SIM0000000009").map(|l| l.len()).unwrap_or(0), switches_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_broker_and_daemon_restarts() {
    let mut rig = Rig::start("restart", ALWAYS_OPEN).await;
    let obs = rig.observer("obs-restart").await;
    let mut daemon = rig.daemon();
    online(&obs).await;
    // The broker restarts while a command runs.
    obs.publish(&rig.cmd("M-SLOW"), r#"{"id":"g1","action":"read"}"#).await;
    obs.wait_for(10, "g1 executing", |m| m.json["id"] == "g1" && m.json["status"] == "executing").await;
    rig.broker.restart();
    assert_eq!(obs.final_status("g1", 30).await["status"], "succeeded");
    // A command published while the daemon is down waits at the broker.
    assert_eq!(daemon.terminate(), Some(0), "SIGTERM drains and exits cleanly");
    obs.wait_for(10, "offline status", |m| m.topic.ends_with("/status") && m.json["online"] == false).await;
    obs.publish(&rig.cmd("M-A"), r#"{"id":"g2","action":"disconnect","reason":"customer_request"}"#).await;
    let _daemon = rig.daemon();
    assert_eq!(obs.final_status("g2", 30).await["status"], "succeeded");
    assert!(!rig.relay_closed("SIM0000000001"));
    let _ = &mut rig;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_protection_flags_without_dropping_work() {
    let rig = Rig::start("hup", ALWAYS_OPEN).await;
    let obs = rig.observer("obs-hup").await;
    let daemon = rig.daemon();
    online(&obs).await;
    // Work in progress on the slow meter while the configuration changes.
    obs.publish(&rig.cmd("M-SLOW"), r#"{"id":"h0","action":"read"}"#).await;
    obs.wait_for(10, "h0 executing", |m| m.json["id"] == "h0" && m.json["status"] == "executing").await;
    let text = std::fs::read_to_string(&rig.config).expect("config");
    std::fs::write(&rig.config, format!("{text}\n[[account]]\nid = \"ACC-1\"\nprotection = \"life_support\"\n"))
        .expect("rewrite");
    daemon.hup();
    obs.wait_for(10, "reloaded", |m| m.topic.ends_with("/status") && m.json["config_generation"] == 1).await;
    let arrears = format!(r#"{{"id":"h1","action":"disconnect","reason":"arrears","notice_sent_at":"{NOTICE}"}}"#);
    obs.publish(&rig.cmd("M-A"), &arrears).await;
    assert_eq!(code(&obs.final_status("h1", 10).await), "policy_protected");
    assert_eq!(obs.final_status("h0", 20).await["status"], "succeeded", "the read in progress went on");
    assert!(rig.relay_closed("SIM0000000001"));
    // A broken file is refused and the running configuration stays.
    std::fs::write(&rig.config, "this is not toml [").expect("break");
    daemon.hup();
    obs.publish(&rig.cmd("M-C"), r#"{"id":"h2","action":"read"}"#).await;
    assert_eq!(obs.final_status("h2", 10).await["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_connects_over_tls_with_the_configured_ca() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mqtt-tls");
    let f = |name: &str| fixtures.join(name).to_string_lossy().into_owned();
    let tls_port = common::mosquitto::free_port();
    // The harness's plain listener stays open for the observer; the daemon uses TLS.
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        f("ca.pem"),
        f("server.pem"),
        f("server.key")
    ));
    let dir = TempDir::new("tls-daemon");
    let config = dir.path("site.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"state\"\n[mqtt]\nbroker = \"mqtts://localhost:{tls_port}\"\nprefix = \"e2e/tls\"\nca_file = \"{}\"\n",
            f("ca.pem")
        ),
    )
    .expect("config");
    let obs = Observer::connect(broker.port(), "e2e/tls", "obs-tls").await;
    let _daemon = DaemonProcess::start_with(&config, &[]);
    online(&obs).await;
    obs.publish("e2e/tls/cmd/MTR-9", r#"{"id":"t1","action":"read"}"#).await;
    assert_eq!(code(&obs.final_status("t1", 10).await), "unknown_meter", "commands arrive over TLS");
}

/// Review finding: a status committed but not yet published when the daemon died was
/// never published. Messages are committed to the journal's publish outbox with what
/// they announce; one left there by a crash (seeded here, as a SIGKILL right after the
/// commit would leave it) goes out after the restart, and is deleted once acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_committed_before_a_crash_is_published_after_the_restart() {
    use headend::journal::{Journal, OutMessage};
    let rig = Rig::start("outbox", ALWAYS_OPEN).await;
    let journal_path = rig.config.with_file_name("state").join("journal.sqlite3");
    std::fs::create_dir_all(journal_path.parent().expect("state dir")).expect("state dir");
    let topic = format!("{}/result/M-A", rig.prefix);
    let payload =
        r#"{"id":"c-crash","meter":"M-A","status":"succeeded","attempts":1,"at":"2026-11-28T09:00:01+08:00"}"#;
    {
        let j = Journal::open(&journal_path).expect("journal");
        let m = OutMessage { topic: topic.clone(), payload: payload.into(), retain: false };
        j.commit(Vec::new(), vec![m]).await.expect("committed, never published");
    }
    let obs = rig.observer("obs-outbox").await;
    let mut daemon = rig.daemon();
    let got = obs.wait_for(20, "the stored result", |m| m.topic == topic && m.json["id"] == "c-crash").await;
    assert_eq!(got.json["status"], "succeeded");
    // Acknowledged, so deleted: a clean stop leaves nothing to publish again.
    online(&obs).await;
    daemon.terminate();
    let j = Journal::open(&journal_path).expect("journal");
    assert!(j.unpublished().await.expect("outbox").is_empty());
}
