//! The shipped broker configuration (`deploy/mosquitto/`) with a real mosquitto: only the
//! dispatch desk gets a command executed, only billing gets a payment honoured, only the
//! head-end speaks for the head-end; and with `acl.regions.example` (two instances, one
//! broker), a region's desk and head-end cannot command or speak for another region. The
//! daemon runs as a process, as its broker user, over TLS; the simulator stands in for
//! the meters.
//!
//! The broker runs the shipped `mosquitto.conf` with these changes, and no others
//! (`test_conf` asserts that each line it rewrites is there, so that a reshaped shipped
//! file fails here instead of going untested):
//! - `listener 8883` becomes a free loopback port (tests never take fixed ports);
//! - `certfile`, `keyfile`, `cafile` point at `tests/fixtures/mqtt-tls` (a test CA, a
//!   certificate for `localhost`);
//! - `password_file` is a file of the shipped ACL's users with passwords made up by this
//!   run (hashed by `mosquitto_passwd -U`, as the deploy README says);
//! - `acl_file` is the shipped `deploy/mosquitto/acl` (or `acl.regions.example`), unchanged;
//! - `persistence*`, `autosave_interval` and `log_dest` lines are dropped: the harness keeps
//!   no store and logs everything to stderr, where the test reads "Denied PUBLISH";
//! - the harness puts a plain listener on another loopback port ahead of the file, for the
//!   test's own clients (which speak no TLS). The shipped `allow_anonymous false`, password
//!   file and ACL come later in the file and apply to both listeners.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::DaemonProcess;
use common::mosquitto::{free_port, Message, Mosquitto, TestClient};
use common::site::addr_of;
use common::TempDir;
use meter_sim::{EndpointKind, EndpointSpec, FleetConfig, MeterSpec, Simulator};

/// The prefix the shipped ACL is written for.
const P: &str = "ami";
const WITHIN: Duration = Duration::from_secs(30);
const NOTICE: &str = "2020-01-01T00:00:00Z";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The shipped `mosquitto.conf`, changed as the module documentation lists, with the ACL
/// file `acl` (a path under `deploy/mosquitto/`).
fn test_conf(tls_port: u16, passwd: &Path, acl: &str) -> String {
    let shipped =
        std::fs::read_to_string(repo("deploy/mosquitto/mosquitto.conf")).expect("deploy/mosquitto/mosquitto.conf");
    let fixture = |f: &str| repo("tests/fixtures/mqtt-tls").join(f).display().to_string();
    let mut out = String::new();
    let mut rewritten = Vec::new();
    for line in shipped.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        let new = match key {
            "listener" => format!("listener {tls_port} 127.0.0.1"),
            "certfile" => format!("certfile {}", fixture("server.pem")),
            "keyfile" => format!("keyfile {}", fixture("server.key")),
            "cafile" => format!("cafile {}", fixture("ca.pem")),
            "password_file" => format!("password_file {}", passwd.display()),
            "acl_file" => format!("acl_file {}", repo("deploy/mosquitto").join(acl).display()),
            "persistence" | "persistence_location" | "autosave_interval" | "log_dest" => String::new(),
            _ => line.to_owned(),
        };
        if new != line {
            rewritten.push(key);
        }
        out.push_str(&new);
        out.push('\n');
    }
    for key in ["listener", "certfile", "keyfile", "cafile", "password_file", "acl_file"] {
        assert_eq!(
            rewritten.iter().filter(|k| **k == key).count(),
            1,
            "the shipped mosquitto.conf has one `{key}` line"
        );
    }
    assert!(
        shipped.lines().any(|l| l.trim() == "allow_anonymous false"),
        "the shipped broker refuses anonymous clients"
    );
    out
}

/// A password for each user, made up now; never printed.
struct Users(Vec<(&'static str, String)>);

impl Users {
    fn new(users: &[&'static str]) -> Self {
        Self(users.iter().map(|u| (*u, format!("{:032x}", rand::random::<u128>()))).collect())
    }

    fn password(&self, user: &str) -> &str {
        self.0.iter().find(|(u, _)| *u == user).map(|(_, p)| p.as_str()).expect("a test user")
    }

    /// The broker's password file: plain `user:password` lines hashed in place.
    fn write_password_file(&self, path: &Path) {
        let plain: String = self.0.iter().map(|(u, p)| format!("{u}:{p}\n")).collect();
        std::fs::write(path, plain).expect("password file");
        let out = std::process::Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(path)
            .output()
            .expect("mosquitto_passwd is installed (with mosquitto)");
        assert!(out.status.success(), "mosquitto_passwd -U failed");
        // mosquitto drops root privileges before it reads the file: let it read it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let hashed = std::fs::read_to_string(path).expect("password file");
        assert!(self.0.iter().all(|(_, p)| !hashed.contains(p.as_str())), "the password file holds hashes only");
    }
}

/// One head-end instance: its simulated fleet (direct reconnect, a 2-second load
/// profile) and the daemon, connected over TLS as `user` with the prefix `prefix`.
/// `meters`: (registry id, simulated name); each meter's account is `ACC-{id}`.
struct Instance {
    sim: Simulator,
    _daemon: DaemonProcess,
}

impl Instance {
    async fn start(rig: &Broker, name: &str, prefix: &str, user: &str, meters: &[(&str, &str)]) -> Self {
        let specs = meters
            .iter()
            .enumerate()
            .map(|(i, (_, sim_name))| {
                let mut m = MeterSpec::dlms(*sim_name, i);
                m.logical_device = i as u16 + 1;
                m.control_mode = 2;
                m
            })
            .collect();
        let fleet = FleetConfig {
            meters: specs,
            endpoints: vec![EndpointSpec::DlmsWrapperTcp {
                bind: "127.0.0.1:0".parse().expect("addr"),
                meters: (0..meters.len()).collect(),
            }],
            profile_period_s: 2,
            profile_depth_days: 1,
            ..FleetConfig::default()
        };
        let sim = Simulator::start(fleet).await.expect("simulator");
        let dir = rig.dir.path(name);
        std::fs::create_dir_all(&dir).expect("instance dir");
        std::fs::write(dir.join("mqtt.pw"), format!("{}\n", rig.users.password(user))).expect("password file");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let mut text = format!(
            "state_dir = \"state\"\n\n[mqtt]\nbroker = \"mqtts://localhost:{}\"\nprefix = \"{prefix}\"\n\
             client_id = \"headend-{name}\"\nusername = \"{user}\"\npassword_file = \"mqtt.pw\"\nca_file = \"{}\"\n\n\
             [policy.window]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
             start = \"00:00\"\nend = \"24:00\"\nno_cut_before_holiday = false\n\n\
             [collection]\ninterval_s = 2\nspread_s = 1\nsettle_s = 0\nhorizon_s = 20\n\n\
             [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 2000\n\n",
            rig.tls_port,
            repo("tests/fixtures/mqtt-tls/ca.pem").display()
        );
        for (i, (id, sim_name)) in meters.iter().enumerate() {
            text.push_str(&format!(
                "[[meter]]\nid = \"{id}\"\nlink = \"wrapper\"\nidentity = \"{sim_name}\"\naccount = \"ACC-{id}\"\n\
                 logical_device = {}\nclient_sap = 16\n\n",
                i + 1
            ));
        }
        let config = dir.join("site.toml");
        std::fs::write(&config, text).expect("config");
        Self { sim, _daemon: DaemonProcess::start_with(&config, &[]) }
    }

    fn relay_closed(&self, sim_name: &str) -> bool {
        self.sim.meter(sim_name).expect("simulated meter").output_state
    }
}

/// The broker on the shipped configuration with the ACL `acl`, and passwords for `users`.
struct Broker {
    broker: Mosquitto,
    users: Users,
    tls_port: u16,
    dir: TempDir,
}

impl Broker {
    fn start(tag: &str, acl: &str, users: &[&'static str]) -> Self {
        let dir = TempDir::new(tag);
        let users = Users::new(users);
        let passwd = dir.path("passwd");
        users.write_password_file(&passwd);
        let tls_port = free_port();
        let broker = Mosquitto::start_with(&test_conf(tls_port, &passwd, acl));
        Self { broker, users, tls_port, dir }
    }

    /// A client of the plain loopback listener as `user`, with the client id `id`.
    async fn client(&self, user: &str, id: &str, filters: &[&str]) -> TestClient {
        TestClient::connect_user(self.broker.port(), id, user, self.users.password(user), filters).await
    }

    /// The operator's view of everything (the ACLs let operators read all), once the
    /// daemons publishing `statuses` are online.
    async fn operator(&self, statuses: &[&str]) -> TestClient {
        let mut op = self.client("operator", "operator-1", &["ami/#"]).await;
        let mut waiting: Vec<&str> = statuses.to_vec();
        while !waiting.is_empty() {
            let m = op.expect(WITHIN, |m| waiting.contains(&m.topic.as_str()) && m.json()["online"] == true).await;
            waiting.retain(|s| *s != m.topic);
        }
        op
    }

    /// Wait for the broker to log that it dropped `client`'s publish on `topic`.
    fn denied(&self, client: &str, topic: &str) {
        let (who, what) = (format!("Denied PUBLISH from {client} "), format!("'{topic}'"));
        tokio::task::block_in_place(|| self.broker.wait_log(WITHIN, |l| l.contains(&who) && l.contains(&what)));
    }
}

/// The shipped ACL's users this test connects as.
const USERS: [&str; 5] = ["headend", "desk", "billing", "operator", "viewer"];

/// One instance with the prefix `ami`, as the shipped ACL expects: M-1 and M-2.
async fn shipped(tag: &str) -> (Broker, Instance) {
    let broker = Broker::start(tag, "acl", &USERS);
    let headend =
        Instance::start(&broker, tag, P, "headend", &[("M-1", "SIMDEP000001"), ("M-2", "SIMDEP000002")]).await;
    (broker, headend)
}

fn is_final(m: &Message, id: &str) -> bool {
    let finals = ["succeeded", "armed", "superseded", "rejected", "failed", "expired"];
    m.topic.contains("/result/") && m.json()["id"] == id && finals.iter().any(|f| m.json()["status"] == *f)
}

/// No message (a command seen by the operator, a result, a payment outcome, a trigger)
/// carries `needle`.
fn assert_never_mentioned(seen: &[Message], needle: &str) {
    let hits: Vec<&str> = seen
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.payload).contains(needle))
        .map(|m| m.topic.as_str())
        .collect();
    assert!(hits.is_empty(), "{needle} got through the broker: seen on {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_dispatch_desk_gets_a_command_executed() {
    let (rig, headend) = shipped("deploy-cmd").await;
    let mut op = rig.operator(&["ami/status"]).await;
    let cmd = format!("{P}/cmd/M-1");
    let cut = |id: &str| format!(r#"{{"id":"{id}","action":"disconnect","reason":"safety","operator":"test"}}"#);

    // Authenticated clients without the dispatch role: the broker drops their cuts.
    let viewer = rig.client("viewer", "viewer-1", &[]).await;
    viewer.publish(&cmd, cut("cut-by-viewer")).await;
    rig.denied("viewer-1", &cmd);
    let billing = rig.client("billing", "billing-1", &[]).await;
    billing.publish(&cmd, cut("cut-by-billing")).await;
    rig.denied("billing-1", &cmd);
    let operator = rig.client("operator", "operator-2", &[]).await;
    operator.publish(&cmd, cut("cut-by-operator")).await;
    rig.denied("operator-2", &cmd);

    // The desk's read of the same meter, published after those were dropped: had any of
    // them reached the daemon, its messages would come first (one session, in order).
    let desk = rig.client("desk", "desk-1", &[]).await;
    desk.publish(&cmd, r#"{"id":"read-by-desk","action":"read"}"#).await;
    let seen = op.collect_until(WITHIN, |m| is_final(m, "read-by-desk")).await;
    for rogue in ["cut-by-viewer", "cut-by-billing", "cut-by-operator"] {
        assert_never_mentioned(&seen, rogue);
    }
    let read = seen.last().expect("the final status").json();
    assert_eq!((read["status"].as_str(), read["relay"].as_str()), (Some("succeeded"), Some("connected")), "{read}");
    assert!(headend.relay_closed("SIMDEP000001"), "nothing switched the meter");

    // The desk's cut is executed.
    desk.publish(&cmd, cut("cut-by-desk")).await;
    let done = op.expect(WITHIN, |m| is_final(m, "cut-by-desk")).await.json();
    assert_eq!((done["status"].as_str(), done["relay"].as_str()), (Some("succeeded"), Some("disconnected")), "{done}");
    assert!(!headend.relay_closed("SIMDEP000001"), "the desk's cut opened the relay");

    // Nobody else may speak for the head-end; the head-end's readings get out.
    desk.publish_with(&format!("{P}/status"), r#"{"online":false}"#, true).await;
    rig.denied("desk-1", &format!("{P}/status"));
    viewer.publish(&format!("{P}/result/M-2"), r#"{"id":"fake","status":"succeeded"}"#).await;
    rig.denied("viewer-1", &format!("{P}/result/M-2"));
    let readings = op.expect(WITHIN, |m| m.topic == format!("{P}/readings/M-2")).await.json();
    assert!(readings["rows"].as_array().is_some_and(|r| !r.is_empty()), "{readings}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_billing_gets_a_payment_honoured() {
    let (rig, headend) = shipped("deploy-pay").await;
    let mut op = rig.operator(&["ami/status"]).await;
    let desk = rig.client("desk", "desk-1", &[]).await;
    let arrears =
        format!(r#"{{"id":"cut-arrears","action":"disconnect","reason":"arrears","notice_sent_at":"{NOTICE}"}}"#);
    desk.publish(&format!("{P}/cmd/M-1"), arrears).await;
    let cut = op.expect(WITHIN, |m| is_final(m, "cut-arrears")).await.json();
    assert_eq!(cut["status"], "succeeded", "{cut}");
    assert!(!headend.relay_closed("SIMDEP000001"));

    let payments = format!("{P}/payments");
    let pay = |id: &str| {
        format!(
            r#"{{"id":"{id}","account":"ACC-M-1","amount":"120.50","currency":"CNY","cleared":true,"confirmed_at":"2026-11-28T09:00:00Z"}}"#
        )
    };
    // The desk and the operator are not billing: their payments are dropped.
    desk.publish(&payments, pay("pay-by-desk")).await;
    rig.denied("desk-1", &payments);
    let operator = rig.client("operator", "operator-2", &[]).await;
    operator.publish(&payments, pay("pay-by-operator")).await;
    rig.denied("operator-2", &payments);
    assert!(!headend.relay_closed("SIMDEP000001"), "no payment reconnected the meter yet");

    // Billing's payment reconnects the meter.
    let billing = rig.client("billing", "billing-1", &[]).await;
    billing.publish(&payments, pay("pay-by-billing")).await;
    let seen = op.collect_until(WITHIN, |m| m.topic == format!("{P}/payment/pay-by-billing")).await;
    assert_never_mentioned(&seen, "pay-by-desk");
    assert_never_mentioned(&seen, "pay-by-operator");
    let outcome = seen.last().expect("the outcome").json();
    let reconnects = outcome["reconnects"].as_array().cloned().unwrap_or_default();
    assert_eq!(reconnects.len(), 1, "{outcome}");
    assert_eq!(reconnects[0]["meter"], "M-1", "{outcome}");
    let id = reconnects[0]["id"].as_str().expect("the reconnect's id").to_owned();
    // The reconnect may have finished before the outcome was published.
    let done = match seen.iter().find(|m| is_final(m, &id)) {
        Some(m) => m.json(),
        None => op.expect(WITHIN, |m| is_final(m, &id)).await.json(),
    };
    assert_eq!((done["status"].as_str(), done["relay"].as_str()), (Some("succeeded"), Some("connected")), "{done}");
    assert_eq!(done["trigger"]["payment"], "pay-by-billing");
    assert!(headend.relay_closed("SIMDEP000001"), "billing's payment reconnected the meter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_regional_acl_example_keeps_each_region_to_its_own() {
    let users = ["headend-north", "headend-south", "desk", "desk-north", "operator"];
    let rig = Broker::start("deploy-regions", "acl.regions.example", &users);
    let north = Instance::start(&rig, "north", "ami/north", "headend-north", &[("N-1", "SIMDEPN00001")]).await;
    let south = Instance::start(&rig, "south", "ami/south", "headend-south", &[("S-1", "SIMDEPS00001")]).await;
    let mut op = rig.operator(&["ami/north/status", "ami/south/status"]).await;
    let cut = |id: &str| format!(r#"{{"id":"{id}","action":"disconnect","reason":"safety"}}"#);

    // North's desk and north's head-end cannot command, or speak for, the south.
    let desk_north = rig.client("desk-north", "desk-north-1", &[]).await;
    desk_north.publish("ami/south/cmd/S-1", cut("south-by-north-desk")).await;
    rig.denied("desk-north-1", "ami/south/cmd/S-1");
    let headend_north = rig.client("headend-north", "headend-north-2", &[]).await;
    headend_north.publish("ami/south/cmd/S-1", cut("south-by-north-headend")).await;
    rig.denied("headend-north-2", "ami/south/cmd/S-1");
    headend_north.publish("ami/south/result/S-1", r#"{"id":"fake","status":"succeeded"}"#).await;
    rig.denied("headend-north-2", "ami/south/result/S-1");

    // The national desk commands both regions; north's desk its own.
    let desk = rig.client("desk", "desk-1", &[]).await;
    desk.publish("ami/south/cmd/S-1", r#"{"id":"south-read","action":"read"}"#).await;
    let seen = op.collect_until(WITHIN, |m| is_final(m, "south-read")).await;
    assert_never_mentioned(&seen, "south-by-north-desk");
    assert_never_mentioned(&seen, "south-by-north-headend");
    assert_never_mentioned(&seen, "fake");
    assert_eq!(seen.last().expect("final").json()["relay"], "connected");
    assert!(south.relay_closed("SIMDEPS00001"), "nothing switched the south's meter");
    desk.publish("ami/south/cmd/S-1", cut("south-by-desk")).await;
    assert_eq!(op.expect(WITHIN, |m| is_final(m, "south-by-desk")).await.json()["status"], "succeeded");
    desk_north.publish("ami/north/cmd/N-1", cut("north-by-north-desk")).await;
    assert_eq!(op.expect(WITHIN, |m| is_final(m, "north-by-north-desk")).await.json()["status"], "succeeded");
    assert!(!south.relay_closed("SIMDEPS00001") && !north.relay_closed("SIMDEPN00001"));
}
