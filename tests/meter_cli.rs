//! The `headend meter` verbs as a field engineer runs them: against `meter-sim`, with the
//! configuration the simulator writes, in text and JSON; and `check-config`, `demo`.

mod common;

use std::process::Command;

use common::TempDir;
use meter_sim::{FleetConfig, FleetPorts, Simulator};

fn headend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_headend")).args(args).output().expect("headend runs")
}

async fn run(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || headend(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("joined")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verbs_work_against_the_simulator_with_the_config_it_writes() {
    let sim = Simulator::start(FleetConfig::generate(5, 3, &FleetPorts::default())).await.expect("sim");
    let dir = TempDir::new("cli");
    let config = dir.path("site.toml");
    sim.write_headend_config(&config).expect("config written");
    let cfg = config.to_string_lossy().into_owned();
    let verb = |v: &[&str]| {
        let mut a = vec!["meter".to_owned(), "--config".to_owned(), cfg.clone()];
        a.extend(v.iter().map(|s| (*s).to_owned()));
        a
    };

    // MTR-0001 is HLS-GMAC over the wrapper in a generated fleet; MTR-0005 is Modbus.
    let out = run(verb(&["identify", "MTR-0001", "--json"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["identity"]["name"], "SIM0000000001");
    assert_eq!(v["matches"], true);

    let out = run(verb(&["read", "MTR-0001"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("relay connected") && text.contains("1.0.1.8.0.255"), "{text}");

    let out = run(verb(&["disconnect", "MTR-0001", "--json"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["relay"]["state"], "disconnected");
    assert!(!sim.meter("SIM0000000001").expect("view").output_state, "the simulated relay is open");

    let out = run(verb(&["reconnect", "MTR-0001"])).await;
    assert!(out.status.success());
    assert!(sim.meter("SIM0000000001").expect("view").output_state);

    let out = run(verb(&["profile", "MTR-0001", "--hours", "2", "--json"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = json(&out)["profile"]["rows"].as_array().map(Vec::len).unwrap_or(0);
    assert!((7..=9).contains(&rows), "{rows} rows for 2 hours");

    let out = run(verb(&["read", "MTR-0005", "--json"])).await;
    assert!(out.status.success(), "Modbus read: {}", String::from_utf8_lossy(&out.stderr));

    // Bad input: exit 2 with a message, not a panic.
    let out = run(verb(&["read", "NO-SUCH-METER"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no meter \"NO-SUCH-METER\""));
    let out = run(verb(&["profile", "MTR-0001", "--from", "yesterday"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));

    // The meter gone: exit 1 with the contract's error code.
    sim.shutdown().await;
    let out = run(verb(&["read", "MTR-0001", "--json"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "meter_unreachable");
}

#[test]
fn check_config_reports_problems_with_what_to_write() {
    let dir = TempDir::new("check");
    let good = dir.path("good.toml");
    std::fs::write(&good, "[[link]]\nname = \"a\"\nprotocol = \"dlms-wrapper\"\naddress = \"127.0.0.1:4059\"\n")
        .expect("write");
    assert!(headend(&["check-config", &good.to_string_lossy()]).status.success());
    let bad = dir.path("bad.toml");
    std::fs::write(&bad, "[[link]]\nname = \"a\"\nprotocol = \"carrier-pigeon\"\n").expect("write");
    let out = headend(&["check-config", &bad.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:") && err.contains("dlms-wrapper"), "{err}");
}

#[test]
fn the_demo_runs_its_tour_through_the_daemon_and_exits() {
    let dir = TempDir::new("demo");
    let out = headend(&["demo", "--once", "--meters", "5", "--dir", &dir.0.to_string_lossy()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("The tour is done"), "{text}");
    assert!(text.contains("(payment demo-pay-1)") && text.contains("policy_protected"), "{text}");
}
