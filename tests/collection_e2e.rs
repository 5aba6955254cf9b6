//! Interval collection end to end: a real mosquitto, the daemon as a process, the
//! simulator in-process with a 2-second load profile (so that a test sees many intervals
//! in real time), and `[collection] interval_s = 2`. Tests wait on MQTT messages and
//! simulator events, never on sleeps.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::daemon::{DaemonProcess, Observer, Seen};
use common::mosquitto::Mosquitto;
use common::site::addr_of;
use common::TempDir;
use headend::time::parse_rfc3339;
use meter_sim::{EndpointKind, EndpointSpec, Faults, FleetConfig, MeterSpec, SimEventKind, Simulator};
use serde_json::Value;

const PERIOD: i64 = 2;

/// (registry id, simulated id)
const DLMS: [(&str, &str); 3] = [("A", "SIMCOL00001"), ("B", "SIMCOL00002"), ("BAD", "SIMCOL00003")];

fn fleet() -> FleetConfig {
    let mut meters: Vec<MeterSpec> = DLMS
        .iter()
        .enumerate()
        .map(|(i, (_, sim))| {
            let mut m = MeterSpec::dlms(*sim, i);
            m.logical_device = i as u16 + 1;
            m
        })
        .collect();
    meters.push(MeterSpec::modbus("SIMMBCOL0001", 1));
    let any = "127.0.0.1:0".parse().expect("addr");
    FleetConfig {
        meters,
        endpoints: vec![
            EndpointSpec::DlmsWrapperTcp { bind: any, meters: vec![0, 1, 2] },
            EndpointSpec::ModbusTcp { bind: any, meters: vec![3] },
        ],
        profile_period_s: PERIOD as u32,
        profile_depth_days: 1,
        ..FleetConfig::default()
    }
}

struct Rig {
    sim: Simulator,
    dir: TempDir,
    config: PathBuf,
    broker: Mosquitto,
    prefix: String,
}

impl Rig {
    /// The broker keeps sessions across its own restarts (persistence, saved on every
    /// change), so that the observer misses nothing published while it reconnects.
    async fn start(tag: &str) -> Self {
        let sim = Simulator::start(fleet()).await.expect("simulator");
        let dir = TempDir::new(tag);
        let store = dir.path("mosquitto");
        std::fs::create_dir_all(&store).expect("broker store");
        // mosquitto drops root privileges before it writes its store.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let broker = Mosquitto::start_with(&format!(
            "persistence true\npersistence_location {}/\nautosave_interval 1\nautosave_on_changes true\n",
            store.display()
        ));
        let prefix = format!("col/{tag}");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let modbus = addr_of(&sim, EndpointKind::ModbusTcp);
        let mut text = format!(
            "state_dir = \"state\"\n\n[mqtt]\nprefix = \"{prefix}\"\nclient_id = \"headend-{tag}\"\n\n\
             [collection]\ninterval_s = 2\nspread_s = 1\nsettle_s = 0\nhorizon_s = 40\nsnapshot_late_s = 4\n\n\
             [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 300\n\n\
             [[link]]\nname = \"modbus\"\nprotocol = \"modbus-tcp\"\naddress = \"{modbus}\"\ntimeout_ms = 300\n\n"
        );
        for (i, (id, sim_id)) in DLMS.iter().enumerate() {
            text.push_str(&format!(
                "[[meter]]\nid = \"{id}\"\nlink = \"wrapper\"\nidentity = \"{sim_id}\"\nlogical_device = {}\n\n",
                i + 1
            ));
        }
        text.push_str(
            "[[meter]]\nid = \"MB\"\nlink = \"modbus\"\nunit_id = 1\nmodbus_profile = \"sim\"\n\n\
             [modbus_profile.sim]\nenergy_import = { register = 256, type = \"u32\", scale = 10, unit = \"Wh\" }\n\
             energy_export = { register = 258, type = \"u32\", scale = 10, unit = \"Wh\" }\n\
             clock = { register = 768 }\n",
        );
        let config = dir.path("site.toml");
        std::fs::write(&config, text).expect("config");
        Self { sim, dir, config, broker, prefix }
    }

    fn daemon(&self) -> DaemonProcess {
        DaemonProcess::start(&self.config, &self.broker.url())
    }

    async fn observer(&self) -> Observer {
        Observer::connect(self.broker.port(), &self.prefix, &format!("obs-{}", self.prefix.replace('/', "-"))).await
    }
}

fn row_time(row: &Value) -> i64 {
    row[0].as_str().and_then(|t| parse_rfc3339(t).ok()).expect("a row starts with its time")
}

fn last_time(m: &Seen) -> Option<i64> {
    m.json["rows"].as_array().and_then(|r| r.last()).map(row_time)
}

/// The distinct batches of a meter, in the order they first arrived. A batch seen again
/// (published again after a restart) must be the same batch.
fn batches(obs: &Observer, meter: &str) -> Vec<Value> {
    let mut seen: BTreeMap<i64, Value> = BTreeMap::new();
    let mut out = Vec::new();
    for m in obs.all().into_iter().filter(|m| m.topic.ends_with(&format!("/readings/{meter}"))) {
        let id = m.json["batch"].as_i64().expect("every batch has its id");
        match seen.get(&id) {
            Some(before) => assert_eq!(before, &m.json, "batch {id} published again with other content"),
            None => {
                seen.insert(id, m.json.clone());
                out.push(m.json);
            }
        }
    }
    out
}

/// Every row of the batches, in publishing order.
fn times(batches: &[Value]) -> Vec<i64> {
    batches.iter().flat_map(|b| b["rows"].as_array().cloned().unwrap_or_default()).map(|r| row_time(&r)).collect()
}

/// Every interval from the first to the last exactly once, in order.
fn assert_every_interval_once_in_order(meter: &str, t: &[i64]) {
    assert!(!t.is_empty(), "{meter}: no rows");
    for w in t.windows(2) {
        assert_eq!(w[1] - w[0], PERIOD, "{meter}: after {} came {} (a hole, a repeat or disorder)", w[0], w[1]);
    }
}

async fn profile_reads(events: &mut tokio::sync::broadcast::Receiver<meter_sim::SimEvent>, meter: &str, n: usize) {
    let mut seen = 0;
    while seen < n {
        let e = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("in time").expect("event");
        if let (true, SimEventKind::Request { what }) = (e.meter == meter, &e.kind) {
            if what.starts_with("GET 7/1-0:99.1.0.255/2") {
                seen += 1;
            }
        }
    }
}

async fn wait_rows_until(obs: &Observer, meter: &str, t: i64, secs: u64) {
    let suffix = format!("/readings/{meter}");
    obs.wait_for(secs, &format!("{meter} readings up to {t}"), |m| {
        m.topic.ends_with(&suffix) && last_time(m).is_some_and(|l| l >= t)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_back_fill_after_a_meter_outage_and_bad_rows_are_reported() {
    let rig = Rig::start("sched").await;
    rig.sim.set_faults("SIMCOL00003", Faults { bad_profile_rows: true, ..Faults::default() }).expect("fault");
    let obs = rig.observer().await;
    let daemon = rig.daemon();
    let start = rig.sim.now_ms() / 1000;
    // The first cycle back-fills the horizon (40 s: 20 intervals), then one per cycle.
    wait_rows_until(&obs, "A", start + PERIOD, 20).await;
    wait_rows_until(&obs, "B", start + PERIOD, 20).await;
    let first = batches(&obs, "A");
    assert!(times(&first).len() >= 19, "the horizon was back-filled: {:?}", times(&first));

    // A goes offline; B goes on.
    let mut events = rig.sim.subscribe();
    rig.sim.set_faults("SIMCOL00001", Faults { offline: true, ..Faults::default() }).expect("fault");
    let mut unanswered = 0;
    while unanswered < 3 {
        let e = tokio::time::timeout(Duration::from_secs(20), events.recv()).await.expect("in time").expect("event");
        if e.meter == "SIMCOL00001" && matches!(e.kind, SimEventKind::Unanswered { .. }) {
            unanswered += 1;
        }
    }
    let outage_from = rig.sim.now_ms() / 1000;
    wait_rows_until(&obs, "B", outage_from + 4 * PERIOD, 20).await;
    rig.sim.set_faults("SIMCOL00001", Faults::default()).expect("back");
    let back_at = rig.sim.now_ms() / 1000;
    wait_rows_until(&obs, "A", back_at, 20).await;

    let a = batches(&obs, "A");
    let ta = times(&a);
    assert_every_interval_once_in_order("A", &ta);
    assert!(ta.iter().any(|t| *t > outage_from && *t < back_at), "the outage was back-filled");
    assert!(
        a.iter().any(|b| b["rows"].as_array().is_some_and(|r| r.len() >= 4) && row_time(&b["rows"][0]) > start),
        "one batch after the outage carries the missed intervals"
    );
    assert_every_interval_once_in_order("B", &times(&batches(&obs, "B")));
    let first_batch = &a[0];
    assert_eq!(first_batch["source"], "1.0.99.1.0.255");
    assert_eq!(first_batch["interval_s"], PERIOD);
    assert_eq!(first_batch["columns"][0]["name"], "1.0.1.8.0.255");
    assert_eq!(first_batch["columns"][0]["unit"], "Wh");

    // The bad meter: glitched intervals never published, reported as gaps; counted in the log.
    let bad = batches(&obs, "BAD");
    let tb = times(&bad);
    assert!(tb.len() >= 10, "{tb:?}");
    assert!(tb.windows(2).all(|w| w[1] > w[0]), "in order, never twice");
    assert!(tb.iter().all(|t| ![3, 7, 9].contains(&(t / PERIOD).rem_euclid(11))), "no bad row published");
    let gaps: i64 = bad
        .iter()
        .flat_map(|b| b["gaps"].as_array().cloned().unwrap_or_default())
        .map(|g| g["intervals"].as_i64().unwrap_or(0))
        .sum();
    let missing: i64 = tb.windows(2).map(|w| (w[1] - w[0]) / PERIOD - 1).sum();
    assert_eq!(gaps, missing, "every hole is a reported gap");
    assert!(daemon.log_text().contains("rows dropped or flagged"), "a log line counts them");

    // Modbus: snapshots stamped with the boundaries.
    wait_rows_until(&obs, "MB", start + 2 * PERIOD, 20).await;
    let mb = times(&batches(&obs, "MB"));
    assert!(mb.iter().all(|t| t % PERIOD == 0) && mb.windows(2).all(|w| w[1] > w[0]), "{mb:?}");
    assert_eq!(batches(&obs, "MB")[0]["source"], "snapshot");

    // The state carries the newest reading and the clock drift.
    let state = obs
        .wait_for(10, "state with readings", |m| {
            m.topic.ends_with("/state/A") && m.json["last_reading"].is_string() && m.json["drift_s"].is_i64()
        })
        .await;
    assert!(state.json["drift_s"].as_i64().is_some_and(|d| d.abs() <= 1), "{}", state.json);
    drop(daemon);
    drop(rig.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_survives_broker_restarts_and_a_daemon_kill() {
    let mut rig = Rig::start("outbox").await;
    let obs = rig.observer().await;
    let mut daemon = rig.daemon();
    let start = rig.sim.now_ms() / 1000;
    wait_rows_until(&obs, "A", start + PERIOD, 20).await;

    // Count A's profile reads (each stores a batch) while the broker is away.
    let mut events = rig.sim.subscribe();

    // 1. The broker goes away while the daemon runs, and comes back.
    rig.broker.stop();
    profile_reads(&mut events, "SIMCOL00001", 3).await;
    let down_until = rig.sim.now_ms() / 1000;
    rig.broker.restart();
    wait_rows_until(&obs, "A", down_until, 30).await;

    // 2. The broker goes away, the daemon is killed with rows in its outbox, then both
    //    come back.
    rig.broker.stop();
    profile_reads(&mut events, "SIMCOL00001", 3).await;
    daemon.kill();
    let killed_at = rig.sim.now_ms() / 1000;
    rig.broker.restart();
    let _daemon = rig.daemon();
    wait_rows_until(&obs, "A", killed_at + 2 * PERIOD, 30).await;

    let a = batches(&obs, "A");
    let t = times(&a);
    assert_every_interval_once_in_order("A", &t);
    assert!(t.first().is_some_and(|f| *f <= start) && t.last().is_some_and(|l| *l >= killed_at));
    assert_every_interval_once_in_order("B", &times(&batches(&obs, "B")));
    let ids: Vec<i64> = a.iter().filter_map(|b| b["batch"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "batches in the order they were stored: {ids:?}");
}
