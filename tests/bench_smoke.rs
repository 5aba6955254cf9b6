//! The benchmark driver's scenarios (`examples/bench.rs`) at a small size, as a smoke
//! test: each runs to the end; every payment gets its reconnects, confirmed by the
//! daemon's `succeeded` and by the simulator's relays; every meter's readings arrive in
//! the collection scenarios, and the bus's ratio is computed. Nothing about time is
//! asserted. The daemon is the `headend` binary (`headend run`); the payment scenarios use
//! the embedded broker, the collection scenarios mosquitto.

mod common;

#[allow(dead_code)]
#[path = "../examples/bench/collect_fleet.rs"]
mod collect_fleet;
#[allow(dead_code)]
#[path = "../examples/bench/collection.rs"]
mod collection;
#[allow(dead_code)]
#[path = "../examples/bench/collection_client.rs"]
mod collection_client;
#[allow(dead_code)]
#[path = "../examples/bench/payment.rs"]
mod payment;
#[allow(dead_code)]
#[path = "../examples/bench/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../examples/bench/rig.rs"]
mod rig;
#[allow(dead_code)]
#[path = "../examples/bench/serial_bus.rs"]
mod serial_bus;

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

fn collect_setup(dir: &TempDir, meters: usize, fleet: collection::Fleet, rows: u64) -> collection::RigSetup {
    collection::RigSetup {
        meters,
        fleet,
        rows,
        max_associations: 4,
        rows_per_request: 24,
        hdlc: None,
        daemon: DaemonCommand { program: env!("CARGO_BIN_EXE_headend").into(), args: vec!["run".into()] },
        dir: dir.0.clone(),
        progress: false,
    }
}

fn json_of<T: serde::Serialize>(report: &T) -> serde_json::Value {
    serde_json::from_str(&serde_json::to_string(report).expect("json")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_behind_concentrators_reads_every_meter_and_the_client_alone() {
    let dir = TempDir::new("bench-collect-dc");
    let (meters, rows) = (12, 2);
    let o = collection::CollectionOptions {
        setup: collect_setup(&dir, meters, collection::Fleet::Concentrators(3), rows),
        client_reads: 2,
    };
    let r = collection::run(&o, report::Machine::read()).await.expect("the scenario runs to the end");
    assert_eq!(r.links, 3);
    assert_eq!((r.cold.meters_complete, r.cold.rows), (meters, meters as u64 * rows), "{r:?}");
    assert_eq!((r.steady.meters_complete, r.steady.rows), (meters, meters as u64 * rows), "{r:?}");
    assert!(r.memory.rss_kib > 0 && r.memory.kib_per_meter > 0.0);
    let c = r.client_alone.as_ref().expect("the client alone was measured");
    assert_eq!(c.headend_rows, 96, "the driver read the whole day: {c:?}");
    if let Some(g) = c.gurux_rows {
        assert_eq!(g, 96, "Gurux read the whole day: {c:?}");
    }
    assert!(r.table().contains("cycle 2 (steady)"));
    let json = json_of(&r);
    assert_eq!(json["scenario"], "collection");
    assert!(json["machine"]["cores"].as_u64().is_some_and(|c| c >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_direct_reads_every_meter_of_the_mixed_fleet() {
    let dir = TempDir::new("bench-collect-direct");
    let meters = 20;
    let o = collection::CollectionOptions {
        setup: collect_setup(&dir, meters, collection::Fleet::Direct { wrapper_group: 4 }, 1),
        client_reads: 0,
    };
    let r = collection::run(&o, report::Machine::read()).await.expect("the scenario runs to the end");
    assert_eq!(r.cold.meters_complete, meters, "{r:?}");
    assert!(r.snapshot_meters > 0, "the mixed fleet has Modbus meters: {r:?}");
    assert_eq!(r.steady.meters_complete, meters - r.snapshot_meters, "every profile meter again: {r:?}");
    assert!(r.client_alone.is_none());
    assert_eq!(json_of(&r)["meters"], meters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_bus_collects_every_meter_serves_restores_and_computes_the_ratio() {
    let dir = TempDir::new("bench-bus");
    let (meters, rows) = (3, 2);
    let o = serial_bus::BusOptions {
        setup: collect_setup(&dir, meters, collection::Fleet::Bus(38_400), rows),
        baud: 38_400,
        restore_gap: std::time::Duration::from_millis(50),
    };
    let r = serial_bus::run(&o, report::Machine::read()).await.expect("the scenario runs to the end");
    assert_eq!((r.steady.meters_complete, r.steady.rows), (meters, meters as u64 * rows), "{r:?}");
    assert!(r.bytes_to_meters > 0 && r.bytes_from_meters > r.bytes_to_meters, "{r:?}");
    assert!(r.wire_s > 0.0 && r.ratio.is_finite() && r.ratio > 0.0, "{r:?}");
    assert!(r.restores.count >= 1, "a restore ran during the cycle: {r:?}");
    assert_eq!(r.restore_failures, 0, "{r:?}");
    let json = json_of(&r);
    assert_eq!(json["scenario"], "serial-bus");
    assert!(json["ratio"].as_f64().is_some());
}
