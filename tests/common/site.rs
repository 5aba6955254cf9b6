//! Building head-end configurations for a running simulator.
#![allow(dead_code)]

use headend::config::SiteConfig;
use headend::dlms::counter::CounterStore;
use headend::driver::{Driver, Link};
use meter_sim::{EndpointKind, EndpointSpec, FleetConfig, MeterSpec, Simulator};

use super::TempDir;

/// DLMS meters with these serial numbers behind one wrapper endpoint (logical devices 1,
/// 2, ... in order; no authentication; disconnect control mode 2).
pub fn wrapper_fleet(names: &[&str]) -> FleetConfig {
    let meters = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut m = MeterSpec::dlms(*name, i);
            m.logical_device = i as u16 + 1;
            m.control_mode = 2;
            m
        })
        .collect();
    FleetConfig {
        meters,
        endpoints: vec![EndpointSpec::DlmsWrapperTcp {
            bind: "127.0.0.1:0".parse().expect("addr"),
            meters: (0..names.len()).collect(),
        }],
        ..FleetConfig::default()
    }
}

/// The first bound TCP address of an endpoint kind.
pub fn addr_of(sim: &Simulator, kind: EndpointKind) -> String {
    sim.endpoints().iter().find(|e| e.kind == kind).and_then(|e| e.addr).map(|a| a.to_string()).expect("endpoint bound")
}

/// A site configuration from TOML text, with key files, in a fresh directory.
pub fn site(dir: &TempDir, toml: &str, keys: &[(&str, &str)]) -> SiteConfig {
    for (name, body) in keys {
        std::fs::write(dir.path(name), body).expect("key file");
    }
    let path = dir.path("site.toml");
    std::fs::write(&path, toml).expect("site file");
    SiteConfig::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"))
}

/// The driver of a meter, with its link open.
pub async fn open(site: &SiteConfig, id: &str) -> (Driver, Link) {
    let meter = site.meter(id).expect("meter in config");
    let link = site.link(&meter.link).expect("link");
    let counters = CounterStore::new(site.state_dir().join("invocation-counters"));
    let driver = Driver::from_config(site, meter, counters).expect("driver");
    let link = Link::open(link).await.expect("link opens");
    (driver, link)
}

/// Hex of 16 bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}
