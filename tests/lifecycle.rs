//! The daemon's life cycle with a real mosquitto and the daemon as a process: SIGTERM
//! while a command executes on a slow meter, with a drain bound shorter and longer than
//! the exchange; the retained `status` after the exit; exactly one final status after the
//! restart. (SIGHUP reload: `daemon_e2e.rs` and `observability.rs`; journal migrations:
//! `journal.rs`.)

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::daemon::{DaemonProcess, Observer};
use common::mosquitto::Mosquitto;
use common::site::addr_of;
use common::TempDir;
use meter_sim::{EndpointKind, Faults, SimEventKind, Simulator};

/// (registry id, logical device name)
const METERS: [(&str, &str); 2] = [("SLOW", "SIMLIFE0001"), ("FAST", "SIMLIFE0002")];

struct Rig {
    sim: Simulator,
    _dir: TempDir,
    config: PathBuf,
    broker: Mosquitto,
    prefix: String,
}

impl Rig {
    /// The slow meter answers each request after `delay_ms`; the daemon drains for at
    /// most `drain_s`.
    async fn start(tag: &str, delay_ms: u32, drain_s: u64) -> Self {
        let names = METERS.map(|(_, name)| name);
        let fleet = common::site::wrapper_fleet(&names);
        let sim = Simulator::start(fleet).await.expect("simulator");
        sim.set_faults("SIMLIFE0001", Faults { response_delay_ms: delay_ms, ..Faults::default() }).expect("fault");
        let broker = Mosquitto::start();
        let dir = TempDir::new(tag);
        let prefix = format!("life/{tag}");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let timeout_ms = delay_ms * 3 + 500;
        let mut text = format!(
            "state_dir = \"state\"\ndrain_timeout_s = {drain_s}\n\n\
             [mqtt]\nprefix = \"{prefix}\"\nclient_id = \"headend-{tag}\"\n\n[collection]\nenabled = false\n\n\
             [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = {timeout_ms}\n\n"
        );
        for (i, (id, name)) in METERS.iter().enumerate() {
            text.push_str(&format!(
                "[[meter]]\nid = \"{id}\"\nlink = \"wrapper\"\nidentity = \"{name}\"\nlogical_device = {}\n\n",
                i + 1
            ));
        }
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
}

async fn online(obs: &Observer) {
    obs.wait_for(20, "daemon online", |m| m.topic.ends_with("/status") && m.json["online"] == true).await;
}

/// SIGTERM, and wait for the exit; panics when the process outlives `secs` (the drain
/// bound plus the goodbye, with room for a loaded machine).
async fn terminate(mut daemon: DaemonProcess, secs: u64) -> (Option<i32>, String) {
    let waited = tokio::task::spawn_blocking(move || {
        let code = daemon.terminate();
        (code, daemon.log_text())
    });
    tokio::time::timeout(Duration::from_secs(secs), waited)
        .await
        .expect("the daemon exits after SIGTERM within the drain bound")
        .expect("join")
}

/// The retained status a newcomer to the broker sees.
async fn retained_status(rig: &Rig, name: &str) -> serde_json::Value {
    let obs = rig.observer(name).await;
    obs.wait_for(10, "retained status", |m| m.topic.ends_with("/status") && m.retain).await.json
}

fn finals(obs: &Observer, id: &str) -> usize {
    let finals = ["succeeded", "armed", "superseded", "rejected", "failed", "expired"];
    obs.statuses(id).iter().filter(|s| finals.contains(&s.as_str())).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_drain_bound_leaves_the_command_resumable() {
    // Every request to the slow meter takes two seconds; a read is several requests (at
    // least association, relay, registers), and the daemon may drain for one second only.
    let rig = Rig::start("bound", 2000, 1).await;
    let obs = rig.observer("obs-bound").await;
    let daemon = rig.daemon();
    online(&obs).await;
    obs.publish(&rig.cmd("SLOW"), r#"{"id":"t1","action":"read"}"#).await;
    obs.wait_for(10, "t1 executing", |m| m.json["id"] == "t1" && m.json["status"] == "executing").await;

    let (code, log) = terminate(daemon, 30).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("drain bound reached"), "{log}");
    assert_eq!(finals(&obs, "t1"), 0, "cut off by the bound: {:?}", obs.statuses("t1"));
    assert_eq!(retained_status(&rig, "obs-bound-2").await["online"], false);

    // The restart resumes it from the journal: one final status, not two.
    let _daemon = rig.daemon();
    assert_eq!(obs.final_status("t1", 30).await["status"], "succeeded");
    obs.publish(&rig.cmd("FAST"), r#"{"id":"t2","action":"read"}"#).await;
    assert_eq!(obs.final_status("t2", 30).await["status"], "succeeded");
    assert_eq!(finals(&obs, "t1"), 1, "{:?}", obs.statuses("t1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_exchange_in_progress_finish_and_releases_associations() {
    let rig = Rig::start("finish", 300, 30).await;
    let obs = rig.observer("obs-finish").await;
    let daemon = rig.daemon();
    online(&obs).await;
    let mut events = rig.sim.subscribe();
    obs.publish(&rig.cmd("SLOW"), r#"{"id":"f1","action":"disconnect","reason":"customer_request"}"#).await;
    obs.wait_for(10, "f1 executing", |m| m.json["id"] == "f1" && m.json["status"] == "executing").await;
    let is_release = |e: &meter_sim::SimEvent| {
        e.meter == "SIMLIFE0001" && matches!(&e.kind, SimEventKind::Request { what } if what.contains("release"))
    };
    while let Ok(e) = events.try_recv() {
        assert!(!is_release(&e), "released before SIGTERM");
    }

    let (code, log) = terminate(daemon, 60).await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("drain bound reached"), "{log}");
    // Finished, journaled and published during the drain.
    assert_eq!(obs.final_status("f1", 10).await["status"], "succeeded");
    assert!(!rig.sim.meter("SIMLIFE0001").expect("meter").output_state, "the relay is open");
    // The association was released on the way out.
    let mut released = false;
    while let Ok(e) = events.try_recv() {
        released |= is_release(&e);
    }
    assert!(released, "the slow meter's association was released");
    let status = retained_status(&rig, "obs-finish-2").await;
    assert_eq!(status["online"], false, "{status}");
    assert!(!log.contains("could not say goodbye"), "{log}");

    // After the restart nothing is done twice.
    let switches = rig.sim.control_log("SIMLIFE0001").map(|l| l.len()).unwrap_or(0);
    let _daemon = rig.daemon();
    obs.publish(&rig.cmd("FAST"), r#"{"id":"f2","action":"read"}"#).await;
    assert_eq!(obs.final_status("f2", 30).await["status"], "succeeded");
    assert_eq!(finals(&obs, "f1"), 1, "{:?}", obs.statuses("f1"));
    assert_eq!(rig.sim.control_log("SIMLIFE0001").map(|l| l.len()).unwrap_or(0), switches);
}
