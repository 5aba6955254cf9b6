//! Collection jobs against the simulator, without a broker: a restore on a shared link
//! during a long back-fill waits for at most one request; bad profile rows are dropped,
//! counted and reported as gaps; clocks are checked and set; Modbus snapshots.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::site::{addr_of, site};
use common::TempDir;
use headend::channel::{self, ChannelMeter, CollectLane};
use headend::collect::clean::{clean_profile, Context};
use headend::collect::job::{CollectJob, Collected, JobDone, JobRun};
use headend::collect::schedule::JobWhat;
use headend::command::{Execution, Input, Op, Outcome};
use headend::config::SiteConfig;
use headend::contract::CommandId;
use headend::dlms::cosem::parse_obis;
use headend::dlms::counter::CounterStore;
use headend::driver::{Driver, Link};
use headend::meter::MeterId;
use headend::time::{Clock, SystemClock};
use meter_sim::{EndpointKind, EndpointSpec, Faults, FleetConfig, MeterSpec, SimEventKind, Simulator};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

const PROFILE: &str = "1.0.99.1.0.255";

fn any_port() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn job(meter: &str, from_s: i64, to_s: i64, read_clock: bool, set_over: Option<u32>) -> CollectJob {
    CollectJob {
        meter: MeterId::new(meter).expect("id"),
        index: 0,
        what: JobWhat::Profile { from_s, to_s, boundary_s: to_s },
        read_clock,
        set_clock_over_s: set_over,
        profile: parse_obis(PROFILE).expect("obis"),
        rows_per_request: 24,
        interval_s: 900,
    }
}

fn boundary_now() -> i64 {
    SystemClock.now().div_euclid(900) * 900
}

fn drivers(site: &SiteConfig) -> Vec<ChannelMeter> {
    let counters = CounterStore::new(site.state_dir().join("invocation-counters"));
    site.meters
        .iter()
        .map(|m| ChannelMeter {
            id: m.id.clone(),
            identity: m.identity.clone(),
            driver: Driver::from_config(site, m, counters.clone()).expect("driver"),
        })
        .collect()
}

/// Run a job to its end directly on a driver (no channel).
async fn run_job(site: &SiteConfig, meter: &str, job: CollectJob) -> JobDone {
    let (mut driver, mut link) = common::site::open(site, meter).await;
    let mut run = JobRun::new(job);
    while run.has_step() {
        if let Err(e) = run.step(&mut driver, &mut link, &SystemClock).await {
            run.fail(e);
        }
    }
    driver.close(&mut link).await;
    run.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_on_a_shared_bus_waits_for_at_most_one_request_of_a_long_back_fill() {
    // Two meters behind a concentrator in front of a 38,400-baud bus: every answer takes
    // its wire time, one request at a time.
    let fleet = FleetConfig {
        meters: vec![MeterSpec::dlms("SIMA0000001", 0), MeterSpec::dlms("SIMB0000002", 1)],
        endpoints: vec![EndpointSpec::DlmsHdlcTcp { bind: any_port(), meters: vec![0, 1], baud: Some(38_400) }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(fleet).await.expect("simulator");
    let dir = TempDir::new("preempt");
    let addr = addr_of(&sim, EndpointKind::DlmsHdlcTcp);
    let site = site(
        &dir,
        &format!(
            "state_dir = \"state\"\n[[link]]\nname = \"bus\"\nprotocol = \"dlms-hdlc\"\naddress = \"{addr}\"\n\
             timeout_ms = 5000\n\n[[meter]]\nid = \"A\"\nlink = \"bus\"\nidentity = \"SIMA0000001\"\n\
             physical_address = 16\n\n[[meter]]\nid = \"B\"\nlink = \"bus\"\nidentity = \"SIMB0000002\"\n\
             physical_address = 17\n"
        ),
        &[],
    );
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let lane = CollectLane { done: done_tx, permits: Arc::new(Semaphore::new(4)), clock: Arc::new(SystemClock) };
    let stop = CancellationToken::new();
    let link = site.links[0].clone();
    let (handle, task) = channel::spawn(link, drivers(&site), answers_tx, Some(lane), stop.clone());

    // Two days of quarter hours: 192 rows, 8 requests of 24.
    let b = boundary_now();
    let mut events = sim.subscribe();
    handle.collect(job("A", b - 2 * 86_400 + 1, b, true, None)).expect("queued");
    let is_profile_get = |what: &str| what.starts_with("GET 7/1-0:99.1.0.255/2");
    loop {
        let e = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("in time").expect("event");
        if let (true, SimEventKind::Request { what }) = (e.meter == "SIMA0000001", &e.kind) {
            if is_profile_get(what) {
                break;
            }
        }
    }
    // The first profile request is on the bus: the restore arrives now.
    let restore = Execution {
        command: CommandId::new("r-1").expect("id"),
        meter: MeterId::new("B").expect("id"),
        attempt: 1,
        op: Op::Reconnect,
    };
    handle.execute(restore).expect("queued");

    let mut a_gets_before_b = 0;
    let mut seen_b = false;
    let mut a_gets_after_b = 0;
    let mut restore_done = false;
    let finished = loop {
        tokio::select! {
            e = events.recv() => {
                let e = e.expect("event");
                if let SimEventKind::Request { what } = &e.kind {
                    match (e.meter.as_str(), seen_b) {
                        ("SIMB0000002", _) => seen_b = true,
                        ("SIMA0000001", false) if is_profile_get(what) => a_gets_before_b += 1,
                        ("SIMA0000001", true) if is_profile_get(what) => a_gets_after_b += 1,
                        _ => {}
                    }
                }
            }
            a = answers.recv() => {
                let Some(Input::Executed { outcome, .. }) = a else { panic!("answer") };
                assert!(matches!(outcome, Outcome::Switched(_)), "{outcome:?}");
                restore_done = true;
            }
            d = done.recv() => break d.expect("job done"),
            _ = tokio::time::sleep(Duration::from_secs(60)) => panic!("the back-fill did not end"),
        }
    };
    eprintln!("profile requests of A before B: {a_gets_before_b}, after: {a_gets_after_b}");
    assert!(restore_done, "the restore was answered before the back-fill ended");
    assert!(a_gets_before_b <= 1, "the restore waited for {a_gets_before_b} more profile requests");
    assert!(a_gets_after_b >= 5, "the back-fill went on after the restore ({a_gets_after_b} requests)");
    assert_eq!(finished.preempted_by, 1);
    assert!(finished.error.is_none(), "{:?}", finished.error);
    let Collected::Profile { profile, read_to_s } = finished.collected else { panic!("profile rows") };
    assert_eq!(read_to_s, Some(b));
    let times: Vec<i64> = profile.rows.iter().filter_map(|r| r.unix_seconds).collect();
    let expected: Vec<i64> = (0..192).map(|i| b - 2 * 86_400 + 900 * (i + 1)).collect();
    assert_eq!(times, expected, "every interval once, in order, nothing lost to the interruption");
    stop.cancel();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_profile_rows_are_dropped_counted_and_reported_as_gaps() {
    let fleet = FleetConfig {
        meters: vec![MeterSpec::dlms("SIMBAD00001", 0)],
        endpoints: vec![EndpointSpec::DlmsWrapperTcp { bind: any_port(), meters: vec![0] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(fleet).await.expect("simulator");
    sim.set_faults("SIMBAD00001", Faults { bad_profile_rows: true, ..Faults::default() }).expect("fault");
    let dir = TempDir::new("badrows");
    let addr = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
    let site = site(
        &dir,
        &format!(
            "state_dir = \"state\"\n[[link]]\nname = \"w\"\nprotocol = \"dlms-wrapper\"\naddress = \"{addr}\"\n\n\
             [[meter]]\nid = \"BAD\"\nlink = \"w\"\n"
        ),
        &[],
    );
    let b = boundary_now();
    let from = b - 86_400 + 1;
    let done = run_job(&site, "BAD", job("BAD", from, b, false, None)).await;
    assert!(done.error.is_none(), "{:?}", done.error);
    let Collected::Profile { profile, .. } = done.collected else { panic!("rows") };
    let cx =
        Context { after_s: None, after_values: None, now_s: SystemClock.now(), future_tolerance_s: 300, offset_min: 0 };
    let clean = clean_profile(&profile, &cx);
    let n = |t: i64| (t / 900).rem_euclid(11);
    let all: Vec<i64> = (0..96).map(|i| from - 1 + 900 * (i + 1)).collect();
    let expected: BTreeSet<i64> = all.iter().copied().filter(|t| ![3, 7, 9].contains(&n(*t))).collect();
    let kept: BTreeSet<i64> = clean.rows.iter().map(|r| r.0).collect();
    assert_eq!(kept, expected, "exactly the good rows are kept");
    let count = |k: i64| all.iter().filter(|t| n(**t) == k).count() as u64;
    assert_eq!(clean.bad.bad_time, count(3), "unspecified clocks");
    assert_eq!(clean.bad.clock_invalid, count(7), "clock-invalid status");
    // A duplicate of a time before the range is outside the range, not a duplicate.
    assert!((count(9).saturating_sub(1)..=count(9)).contains(&clean.bad.duplicate), "{:?}", clean.bad);
    let (first, last) = (kept.first().copied().unwrap_or(0), kept.last().copied().unwrap_or(0));
    let missing_inside = all.iter().filter(|t| **t > first && **t < last && !kept.contains(t)).count() as u64;
    let gaps: u64 = clean.gaps.iter().map(|g| g.intervals).sum();
    assert_eq!(gaps, missing_inside, "no silent hole: every missing interval is in a gap");
    assert_eq!(clean.bad.gap_intervals, gaps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_drift_is_measured_and_set_over_the_threshold() {
    let fleet = FleetConfig {
        meters: vec![MeterSpec::dlms("SIMCLK00001", 0)],
        endpoints: vec![EndpointSpec::DlmsWrapperTcp { bind: any_port(), meters: vec![0] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(fleet).await.expect("simulator");
    sim.set_faults("SIMCLK00001", Faults { clock_drift_s: 120, ..Faults::default() }).expect("fault");
    let dir = TempDir::new("clock");
    let addr = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
    // The management client (SAP 1) may write the clock; this meter has no authentication.
    let site = site(
        &dir,
        &format!(
            "state_dir = \"state\"\n[[link]]\nname = \"w\"\nprotocol = \"dlms-wrapper\"\naddress = \"{addr}\"\n\n\
             [[meter]]\nid = \"CLK\"\nlink = \"w\"\nclient_sap = 1\n"
        ),
        &[],
    );
    let b = boundary_now();
    let done = run_job(&site, "CLK", job("CLK", b - 900 + 1, b, true, None)).await;
    let check = done.clock.expect("clock checked");
    assert!(check.drift_s.is_some_and(|d| (119..=121).contains(&d)), "{check:?}");
    assert_eq!(check.set, None, "setting is off");
    let done = run_job(&site, "CLK", job("CLK", b - 900 + 1, b, true, Some(60))).await;
    assert_eq!(done.clock.as_ref().and_then(|c| c.set.clone()), Some(Ok(())));
    let view = sim.meter("SIMCLK00001").expect("meter");
    assert!((view.meter_time_ms - sim.now_ms()).abs() < 2_000, "the meter's clock was set");
    let done = run_job(&site, "CLK", job("CLK", b - 900 + 1, b, true, Some(60))).await;
    let check = done.clock.expect("clock checked");
    assert!(check.drift_s.is_some_and(|d| d.abs() <= 1) && check.set.is_none(), "{check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_snapshot_reads_the_energy_registers() {
    let fleet = FleetConfig {
        meters: vec![MeterSpec::modbus("SIMMB0000001", 1)],
        endpoints: vec![EndpointSpec::ModbusTcp { bind: any_port(), meters: vec![0] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(fleet).await.expect("simulator");
    let dir = TempDir::new("snapshot");
    let addr = addr_of(&sim, EndpointKind::ModbusTcp);
    let text = format!(
        "state_dir = \"state\"\n[[link]]\nname = \"mb\"\nprotocol = \"modbus-tcp\"\naddress = \"{addr}\"\n\n\
         [[meter]]\nid = \"MB\"\nlink = \"mb\"\nunit_id = 1\nmodbus_profile = \"sim\"\ntimezone_offset_minutes = 0\n\n\
         [modbus_profile.sim]\nenergy_import = {{ register = 256, type = \"u32\", scale = 10, unit = \"Wh\" }}\n\
         energy_export = {{ register = 258, type = \"u32\", scale = 10, unit = \"Wh\" }}\nclock = {{ register = 768 }}\n"
    );
    let site = site(&dir, &text, &[]);
    let mut j = job("MB", 0, 0, true, None);
    j.what = JobWhat::Snapshot { at_s: boundary_now() };
    let done = run_job(&site, "MB", j).await;
    assert!(done.error.is_none(), "{:?}", done.error);
    let Collected::Snapshot { registers, .. } = done.collected else { panic!("a snapshot") };
    assert_eq!(registers.iter().map(|r| r.obis.as_str()).collect::<Vec<_>>(), vec!["1.0.1.8.0.255", "1.0.2.8.0.255"]);
    assert!(done.clock.and_then(|c| c.drift_s).is_some_and(|d| d.abs() <= 1));
    let _ = Link::open(&site.links[0]).await.expect("still usable");
}
