//! Two head-end instances on one broker, as the README's "Growing past one machine" lays
//! out: each with its own topic prefix (`ami/north`, `ami/south`), its own fleet (a
//! simulator each), its own state directory. A command switches only the meter of the
//! instance whose prefix it was published under; a command under north's prefix for a
//! south meter is north's `unknown_meter`, and south never hears of it; a payment
//! published to both reconnects the account's meter where it is and nothing elsewhere.

mod common;

use std::path::PathBuf;

use common::daemon::{DaemonProcess, Observer, Seen};
use common::mosquitto::Mosquitto;
use common::site::addr_of;
use common::TempDir;
use meter_sim::{EndpointKind, EndpointSpec, FleetConfig, MeterSpec, Simulator};
use serde_json::Value;

/// One region: its simulator and its daemon's configuration.
struct Region {
    prefix: String,
    sim: Simulator,
    _dir: TempDir,
    config: PathBuf,
}

impl Region {
    /// `meters`: (registry id, simulated logical device name).
    async fn start(name: &str, meters: &[(&str, &str)]) -> Self {
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
            ..FleetConfig::default()
        };
        let sim = Simulator::start(fleet).await.expect("simulator");
        let dir = TempDir::new(&format!("region-{name}"));
        let prefix = format!("ami/{name}");
        let wrapper = addr_of(&sim, EndpointKind::DlmsWrapperTcp);
        let mut text = format!(
            "state_dir = \"state\"\n\n[mqtt]\nprefix = \"{prefix}\"\nclient_id = \"headend-{name}\"\n\n\
             [collection]\nenabled = false\n\n\
             [policy.window]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
             start = \"00:00\"\nend = \"24:00\"\nno_cut_before_holiday = false\n\n\
             [[link]]\nname = \"{name}-wrapper\"\nprotocol = \"dlms-wrapper\"\naddress = \"{wrapper}\"\ntimeout_ms = 2000\n\n"
        );
        for (i, (id, sim_name)) in meters.iter().enumerate() {
            text.push_str(&format!(
                "[[meter]]\nid = \"{id}\"\nlink = \"{name}-wrapper\"\nidentity = \"{sim_name}\"\nlogical_device = {}\n\
                 client_sap = 16\naccount = \"ACC-{id}\"\n\n",
                i + 1
            ));
        }
        let config = dir.path("site.toml");
        std::fs::write(&config, text).expect("config");
        Self { prefix, sim, _dir: dir, config }
    }

    fn relay_closed(&self, sim_name: &str) -> bool {
        self.sim.meter(sim_name).expect("simulated meter").output_state
    }
}

fn final_on(m: &Seen, topic: &str, id: &str) -> bool {
    let finals = ["succeeded", "armed", "superseded", "rejected", "failed", "expired"];
    m.topic == topic && m.json["id"] == id && finals.iter().any(|f| m.json["status"] == *f)
}

fn cmd(id: &str, action: &str) -> String {
    format!(r#"{{"id":"{id}","action":"{action}","reason":"safety"}}"#)
}

/// Every message that carries `id`, as `topic status`.
fn mentions(obs: &Observer, id: &str) -> Vec<String> {
    obs.all().iter().filter(|m| m.json["id"] == id).map(|m| format!("{} {}", m.topic, m.json["status"])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_their_own_prefixes_each_serve_only_their_own_fleet() {
    let north = Region::start("north", &[("N-1", "SIMNORTH0001"), ("N-2", "SIMNORTH0002")]).await;
    let south = Region::start("south", &[("S-1", "SIMSOUTH0001")]).await;
    let broker = Mosquitto::start();
    // One observer of both regions.
    let obs = Observer::connect(broker.port(), "ami", "obs-regions").await;
    let _north_daemon = DaemonProcess::start(&north.config, &broker.url());
    let _south_daemon = DaemonProcess::start(&south.config, &broker.url());

    // Each publishes its own status, counting its own fleet.
    for (region, meters) in [(&north, 2), (&south, 1)] {
        let topic = format!("{}/status", region.prefix);
        let status = obs.wait_for(20, &topic, |m| m.topic == topic && m.json["online"] == true).await.json;
        assert_eq!(status["meters"], meters, "{topic}: {status}");
    }

    // A command under each prefix switches that region's meter only.
    let (n_result, s_result) = ("ami/north/result/N-1", "ami/south/result/S-1");
    obs.publish("ami/north/cmd/N-1", &cmd("n-cut", "disconnect")).await;
    let r = obs.wait_for(20, "n-cut", |m| final_on(m, n_result, "n-cut")).await.json;
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(!north.relay_closed("SIMNORTH0001") && north.relay_closed("SIMNORTH0002"));
    assert!(south.relay_closed("SIMSOUTH0001"), "north's cut left the south alone");
    obs.publish("ami/south/cmd/S-1", &cmd("s-cut", "disconnect")).await;
    let r = obs.wait_for(20, "s-cut", |m| final_on(m, s_result, "s-cut")).await.json;
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(!south.relay_closed("SIMSOUTH0001"));
    for (id, region) in [("n-cut", "ami/north/"), ("s-cut", "ami/south/")] {
        let m = mentions(&obs, id);
        assert!(m.iter().all(|t| t.starts_with(region)), "{id} seen outside {region}: {m:?}");
    }

    // A south meter's restore under north's prefix: north does not know the meter.
    obs.publish("ami/north/cmd/S-1", &cmd("cross", "reconnect")).await;
    let r = obs.wait_for(20, "cross", |m| final_on(m, "ami/north/result/S-1", "cross")).await.json;
    assert_eq!((r["status"].as_str(), r["error"]["code"].as_str()), (Some("rejected"), Some("unknown_meter")), "{r}");
    // South's own read, published after: had south been given the cross command, its
    // messages about it would come first (one session, in order).
    obs.publish("ami/south/cmd/S-1", &cmd("s-read", "read")).await;
    let r = obs.wait_for(20, "s-read", |m| final_on(m, s_result, "s-read")).await.json;
    assert_eq!(r["relay"], "disconnected", "south's meter stays cut: {r}");
    assert!(!south.relay_closed("SIMSOUTH0001"));
    let cross: Vec<String> = mentions(&obs, "cross");
    assert!(cross.iter().all(|m| m.starts_with("ami/north/")), "south acted on north's command: {cross:?}");
    assert!(!cross.is_empty());

    // Billing need not know the regions: a payment published to every region reconnects
    // the account's meters where they are, and is recorded, changing nothing, elsewhere.
    let arrears =
        r#"{"id":"n2-arrears","action":"disconnect","reason":"arrears","notice_sent_at":"2020-01-01T00:00:00Z"}"#;
    obs.publish("ami/north/cmd/N-2", arrears).await;
    let r = obs.wait_for(20, "n2-arrears", |m| final_on(m, "ami/north/result/N-2", "n2-arrears")).await.json;
    assert_eq!(r["status"], "succeeded", "{r}");
    assert!(!north.relay_closed("SIMNORTH0002"));
    let pay = r#"{"id":"pay-n2","account":"ACC-N-2","amount":"80.00","currency":"CNY","cleared":true}"#;
    obs.publish("ami/south/payments", pay).await;
    obs.publish("ami/north/payments", pay).await;
    for region in ["ami/north", "ami/south"] {
        let topic = format!("{region}/payment/pay-n2");
        let outcome = obs.wait_for(20, &topic, |m| m.topic == topic).await.json;
        let meters: Vec<&Value> = outcome["reconnects"].as_array().into_iter().flatten().map(|r| &r["meter"]).collect();
        let expected: Vec<&str> = if region == "ami/north" { vec!["N-2"] } else { vec![] };
        assert_eq!(meters, expected, "{topic}: {outcome}");
    }
    let r = obs
        .wait_for(20, "the payment's reconnect", |m| {
            m.topic == "ami/north/result/N-2"
                && m.json["trigger"]["payment"] == "pay-n2"
                && m.json["status"] == "succeeded"
        })
        .await
        .json;
    assert_eq!(r["relay"], "connected", "{r}");
    assert!(north.relay_closed("SIMNORTH0002") && !south.relay_closed("SIMSOUTH0001"));

    let statuses: Vec<Value> = obs.all().into_iter().filter(|m| m.topic.ends_with("/status")).map(|m| m.json).collect();
    assert!(statuses.iter().all(|s| s["online"] == true), "both stayed up: {statuses:?}");
}
