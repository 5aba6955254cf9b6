//! The benchmark driver's payment scenarios (`examples/bench.rs`) at a small size, as a
//! smoke test: each runs to the end and every payment gets its reconnects, confirmed by
//! the daemon's `succeeded` and by the simulator's relays. Nothing about time is asserted.
//! The daemon is the `headend` binary (`headend run`), the broker the embedded one.

mod common;

#[allow(dead_code)]
#[path = "../examples/bench/payment.rs"]
mod payment;
#[allow(dead_code)]
#[path = "../examples/bench/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../examples/bench/rig.rs"]
mod rig;

use common::TempDir;
use payment::{Pace, PaymentOptions};
use rig::{Broker, DaemonCommand, Rig, RigOptions};

const METERS: usize = 20;

fn options(dir: &TempDir, meters_per_account: usize) -> RigOptions {
    RigOptions {
        meters: METERS,
        meters_per_link: 5,
        meters_per_account,
        broker: Broker::Embedded,
        dir: dir.0.clone(),
        seed: 3,
        daemon: DaemonCommand { program: env!("CARGO_BIN_EXE_headend").into(), args: vec!["run".into()] },
        collection: false,
        progress: false,
    }
}

async fn run(tag: &str, meters_per_account: usize, pace: Pace) -> payment::Report {
    let dir = TempDir::new(tag);
    let mut rig = Rig::start(&options(&dir, meters_per_account)).await.expect("the rig starts");
    assert_eq!(rig.links, METERS / 5);
    let o = PaymentOptions { pace, payments: None, setup_window: 100 };
    let report = payment::run(&mut rig, o, meters_per_account, report::Machine::read()).await;
    rig.stop().await;
    let report = report.expect("the scenario runs to the end");
    // The table and the JSON line render.
    assert!(report.table().contains("latency p50/p90/p99/max"));
    let json: serde_json::Value = serde_json::from_str(&serde_json::to_string(&report).expect("json")).expect("json");
    assert_eq!(json["meters"], METERS);
    report
}

fn assert_every_meter_reconnected(r: &payment::Report, payments: usize) {
    let f = &r.figures;
    assert_eq!(r.setup.cuts, METERS, "every meter was cut for arrears first");
    assert_eq!(f.payments, payments);
    assert_eq!(f.failures, 0, "{f:?}");
    assert_eq!(f.reconnects, METERS, "every meter reconnected on its account's payment: {f:?}");
    assert_eq!(f.latency.count, METERS as u64);
    assert_eq!(f.relays_closed, METERS, "the simulator's relays are closed again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_latency_runs_and_every_payment_reconnects() {
    let r = run("bench-latency", 1, Pace::Steady(50.0)).await;
    assert_eq!(r.scenario, "payment-latency");
    assert_every_meter_reconnected(&r, METERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_burst_runs_and_every_payment_reconnects_two_meters_per_account() {
    let r = run("bench-burst", 2, Pace::Burst).await;
    assert_eq!(r.scenario, "payment-burst");
    assert_every_meter_reconnected(&r, METERS / 2);
}
