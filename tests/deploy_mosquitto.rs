//! The shipped broker configuration (`deploy/mosquitto/`) with a real mosquitto: only the
//! dispatch desk gets a command executed, only billing gets a payment honoured, only the
//! head-end speaks for the head-end. The daemon runs as a process, as the `headend` user,
//! over TLS; the simulator stands in for the meters.
//!
//! The broker runs the shipped `mosquitto.conf` with these changes, and no others
//! (`test_conf` asserts that each line it rewrites is there, so that a reshaped shipped
//! file fails here instead of going untested):
//! - `listener 8883` becomes a free loopback port (tests never take fixed ports);
//! - `certfile`, `keyfile`, `cafile` point at `tests/fixtures/mqtt-tls` (a test CA, a
//!   certificate for `localhost`);
//! - `password_file` is a file of the shipped ACL's users with passwords made up by this
//!   run (hashed by `mosquitto_passwd -U`, as the deploy README says);
//! - `acl_file` is the shipped `deploy/mosquitto/acl`, unchanged;
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
/// The users of the shipped ACL this test connects as.
const USERS: [&str; 5] = ["headend", "desk", "billing", "operator", "viewer"];
const WITHIN: Duration = Duration::from_secs(30);
const NOTICE: &str = "2020-01-01T00:00:00Z";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The shipped `mosquitto.conf`, changed as the module documentation lists.
fn test_conf(tls_port: u16, passwd: &Path) -> String {
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
            "acl_file" => format!("acl_file {}", repo("deploy/mosquitto/acl").display()),
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
    fn new() -> Self {
        Self(USERS.iter().map(|u| (*u, format!("{:032x}", rand::random::<u128>()))).collect())
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

struct Rig {
    sim: Simulator,
    broker: Mosquitto,
    users: Users,
    _dir: TempDir,
    _daemon: DaemonProcess,
}

impl Rig {
    /// Simulator (M-1 of ACC-1, M-2 of ACC-2, direct reconnect), the broker on the shipped
    /// configuration, and the daemon connected as `headend` over TLS.
    async fn start(tag: &str) -> Self {
        let meters = ["SIMDEP000001", "SIMDEP000002"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut m = MeterSpec::dlms(*name, i);
                m.logical_device = i as u16 + 1;
                m.control_mode = 2;
                m
            })
            .collect();
        let fleet = FleetConfig {
            meters,
            endpoints: vec![EndpointSpec::DlmsWrapperTcp {
                bind: "127.0.0.1:0".parse().expect("addr"),
                meters: vec![0, 1],
            }],
            profile_period_s: 2,
            profile_depth_days: 1,
            ..FleetConfig::default()
        };
        let sim = Simulator::start(fleet).await.expect("simulator");
        let dir = TempDir::new(tag);
        let users = Users::new();
        let passwd = dir.path("passwd");
        users.write_password_file(&passwd);
        let tls_port = free_port();
        let broker = Mosquitto::start_with(&test_conf(tls_port, &passwd));
        std::fs::write(dir.path("headend.pw"), format!("{}\n", users.password("headend"))).expect("password file");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let config = dir.path("site.toml");
        let mut text = format!(
            "state_dir = \"state\"\n\n[mqtt]\nbroker = \"mqtts://localhost:{tls_port}\"\nprefix = \"{P}\"\n\
             client_id = \"headend-{tag}\"\nusername = \"headend\"\npassword_file = \"headend.pw\"\nca_file = \"{}\"\n\n\
             [policy.window]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
             start = \"00:00\"\nend = \"24:00\"\nno_cut_before_holiday = false\n\n\
             [collection]\ninterval_s = 2\nspread_s = 1\nsettle_s = 0\nhorizon_s = 20\n\n\
             [[link]]\nname = \"wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 2000\n\n",
            repo("tests/fixtures/mqtt-tls/ca.pem").display()
        );
        for (i, name) in ["SIMDEP000001", "SIMDEP000002"].iter().enumerate() {
            text.push_str(&format!(
                "[[meter]]\nid = \"M-{n}\"\nlink = \"wrapper\"\nidentity = \"{name}\"\naccount = \"ACC-{n}\"\n\
                 logical_device = {n}\nclient_sap = 16\n\n",
                n = i + 1
            ));
        }
        std::fs::write(&config, text).expect("config");
        let daemon = DaemonProcess::start_with(&config, &[]);
        Self { sim, broker, users, _dir: dir, _daemon: daemon }
    }

    /// A client of the plain loopback listener as `user`, with the client id `id`.
    async fn client(&self, user: &str, id: &str, filters: &[&str]) -> TestClient {
        TestClient::connect_user(self.broker.port(), id, user, self.users.password(user), filters).await
    }

    /// The operator's view: everything under the prefix (the ACL lets operators read all).
    async fn operator(&self) -> TestClient {
        let mut op = self.client("operator", "operator-1", &[&format!("{P}/#")]).await;
        let online = |m: &Message| m.topic == format!("{P}/status") && m.json()["online"] == true;
        op.expect(WITHIN, online).await;
        op
    }

    /// Wait for the broker to log that it dropped `client`'s publish on `topic`.
    fn denied(&self, client: &str, topic: &str) {
        let (who, what) = (format!("Denied PUBLISH from {client} "), format!("'{topic}'"));
        tokio::task::block_in_place(|| self.broker.wait_log(WITHIN, |l| l.contains(&who) && l.contains(&what)));
    }

    fn relay_closed(&self, name: &str) -> bool {
        self.sim.meter(name).expect("simulated meter").output_state
    }
}

fn is_final(m: &Message, id: &str) -> bool {
    let finals = ["succeeded", "armed", "superseded", "rejected", "failed", "expired"];
    m.topic.starts_with(&format!("{P}/result/"))
        && m.json()["id"] == id
        && finals.iter().any(|f| m.json()["status"] == *f)
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
    let rig = Rig::start("deploy-cmd").await;
    let mut op = rig.operator().await;
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
    assert!(rig.relay_closed("SIMDEP000001"), "nothing switched the meter");

    // The desk's cut is executed.
    desk.publish(&cmd, cut("cut-by-desk")).await;
    let done = op.expect(WITHIN, |m| is_final(m, "cut-by-desk")).await.json();
    assert_eq!((done["status"].as_str(), done["relay"].as_str()), (Some("succeeded"), Some("disconnected")), "{done}");
    assert!(!rig.relay_closed("SIMDEP000001"), "the desk's cut opened the relay");

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
    let rig = Rig::start("deploy-pay").await;
    let mut op = rig.operator().await;
    let desk = rig.client("desk", "desk-1", &[]).await;
    let arrears =
        format!(r#"{{"id":"cut-arrears","action":"disconnect","reason":"arrears","notice_sent_at":"{NOTICE}"}}"#);
    desk.publish(&format!("{P}/cmd/M-1"), arrears).await;
    let cut = op.expect(WITHIN, |m| is_final(m, "cut-arrears")).await.json();
    assert_eq!(cut["status"], "succeeded", "{cut}");
    assert!(!rig.relay_closed("SIMDEP000001"));

    let payments = format!("{P}/payments");
    let pay = |id: &str| {
        format!(
            r#"{{"id":"{id}","account":"ACC-1","amount":"120.50","currency":"CNY","cleared":true,"confirmed_at":"2026-11-28T09:00:00Z"}}"#
        )
    };
    // The desk and the operator are not billing: their payments are dropped.
    desk.publish(&payments, pay("pay-by-desk")).await;
    rig.denied("desk-1", &payments);
    let operator = rig.client("operator", "operator-2", &[]).await;
    operator.publish(&payments, pay("pay-by-operator")).await;
    rig.denied("operator-2", &payments);
    assert!(!rig.relay_closed("SIMDEP000001"), "no payment reconnected the meter yet");

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
    let done = op.expect(WITHIN, |m| is_final(m, &id)).await.json();
    assert_eq!((done["status"].as_str(), done["relay"].as_str()), (Some("succeeded"), Some("connected")), "{done}");
    assert_eq!(done["trigger"]["payment"], "pay-by-billing");
    assert!(rig.relay_closed("SIMDEP000001"), "billing's payment reconnected the meter");
}
