//! The Modbus driver against the bundled simulator: a TCP gateway with several unit ids,
//! RTU on a serial pty, exceptions as clear errors.

mod common;

use common::site::{addr_of, open, site};
use common::{PtyPair, TempDir};
use headend::meter::{MeterError, RelayState, SwitchOutcome};
use meter_sim::{EndpointKind, EndpointSpec, Faults, FleetConfig, MeterSpec, Simulator};

const PROFILE: &str = r#"
[modbus_profile.meter-sim]
serial = { register = 0, words = 6 }
energy_import = { register = 256, type = "u32", word_order = "big", scale = 10, unit = "Wh" }
energy_export = { register = 258, type = "u32", word_order = "big", scale = 10, unit = "Wh" }
relay_coil = 0
relay_status = { discrete_input = 0 }
clock = { register = 768 }

# A model whose registers are not where this profile says: exceptions, not crashes.
[modbus_profile.wrong-map]
serial = { register = 9000, words = 6 }
energy_import = { register = 9100, type = "u32", unit = "Wh" }
"#;

fn gateway_fleet() -> FleetConfig {
    FleetConfig {
        // Unit 3 is a model whose register map differs from the one the registry names.
        meters: vec![
            MeterSpec::modbus("SIMMB0000001", 1),
            MeterSpec::modbus("SIMMB0000002", 2),
            MeterSpec::modbus("SIMMB0000003", 3),
        ],
        endpoints: vec![EndpointSpec::ModbusTcp { bind: "127.0.0.1:0".parse().expect("addr"), meters: vec![0, 1, 2] }],
        ..FleetConfig::default()
    }
}

fn gateway_site(dir: &TempDir, sim: &Simulator) -> headend::config::SiteConfig {
    let addr = addr_of(sim, EndpointKind::ModbusTcp);
    let toml = format!(
        "[[link]]\nname = \"gw\"\nprotocol = \"modbus-tcp\"\naddress = \"{addr}\"\ntimeout_ms = 2000\n\n\
         [[meter]]\nid = \"MB-1\"\nlink = \"gw\"\nidentity = \"SIMMB0000001\"\nunit_id = 1\nmodbus_profile = \"meter-sim\"\n\n\
         [[meter]]\nid = \"MB-2\"\nlink = \"gw\"\nidentity = \"SIMMB0000002\"\nunit_id = 2\nmodbus_profile = \"meter-sim\"\n\n\
         [[meter]]\nid = \"MB-GONE\"\nlink = \"gw\"\nunit_id = 77\nmodbus_profile = \"meter-sim\"\n\n\
         [[meter]]\nid = \"MB-WRONG-MAP\"\nlink = \"gw\"\nunit_id = 3\nmodbus_profile = \"wrong-map\"\n\n{PROFILE}"
    );
    site(dir, &toml, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_gateway_serves_several_unit_ids() {
    let sim = Simulator::start(gateway_fleet()).await.expect("sim");
    let dir = TempDir::new("modbus");
    let site = gateway_site(&dir, &sim);
    let (mut one, mut link) = open(&site, "MB-1").await;
    let (mut two, _) = open(&site, "MB-2").await;
    assert_eq!(one.read_identity(&mut link).await.expect("serial 1").name, "SIMMB0000001");
    assert_eq!(two.read_identity(&mut link).await.expect("serial 2").name, "SIMMB0000002");
    let regs = one.read_registers(&mut link).await.expect("energy");
    let import = regs.iter().find(|r| r.obis == "1.0.1.8.0.255").expect("import");
    let sim_wh = sim.meter("SIMMB0000001").expect("view").import_wh as f64;
    // The map carries 10 Wh steps.
    assert!((import.value - sim_wh).abs() <= 20.0, "{} vs {}", import.value, sim_wh);
    assert_eq!(import.unit, "Wh");
    assert!(one.read_clock(&mut link).await.expect("clock").text.starts_with("20"));

    assert_eq!(one.disconnect(&mut link).await.expect("cut"), SwitchOutcome::Done);
    assert!(!sim.meter("SIMMB0000001").expect("view").output_state);
    assert!(sim.meter("SIMMB0000002").expect("view").output_state, "only unit 1 was cut");
    assert_eq!(two.read_relay(&mut link).await.expect("relay 2").state, RelayState::Connected);
    assert_eq!(one.reconnect(&mut link).await.expect("restore"), SwitchOutcome::Done);
    assert!(sim.meter("SIMMB0000001").expect("view").output_state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_are_clear_errors_and_the_link_goes_on() {
    let sim = Simulator::start(gateway_fleet()).await.expect("sim");
    let dir = TempDir::new("modbus-exc");
    let site = gateway_site(&dir, &sim);
    let (mut gone, mut link) = open(&site, "MB-GONE").await;
    let err = gone.read_relay(&mut link).await.expect_err("no such unit behind the gateway");
    // The gateway could not reach the device: retryable, like a timeout.
    assert!(matches!(&err, MeterError::Unreachable(m) if m.contains("exception 11")), "{err:?}");
    assert_eq!(err.code(), "meter_unreachable");
    let (mut wrong, _) = open(&site, "MB-WRONG-MAP").await;
    let err = wrong.read_identity(&mut link).await.expect_err("no such register");
    assert!(matches!(&err, MeterError::Refused(m) if m.contains("exception 2")), "{err:?}");
    let (mut one, _) = open(&site, "MB-1").await;
    assert_eq!(one.read_identity(&mut link).await.expect("same link still works").name, "SIMMB0000001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_modbus_relay_is_a_verify_mismatch() {
    let sim = Simulator::start(gateway_fleet()).await.expect("sim");
    sim.set_faults("SIMMB0000002", Faults { stuck_relay: true, ..Faults::default() }).expect("fault");
    let dir = TempDir::new("modbus-stuck");
    let site = gateway_site(&dir, &sim);
    let (mut two, mut link) = open(&site, "MB-2").await;
    let err = two.disconnect(&mut link).await.expect_err("coil write accepted, relay did not move");
    assert!(matches!(err, MeterError::VerifyMismatch { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_on_a_serial_pty() {
    let pty = PtyPair::new();
    let cfg = FleetConfig {
        meters: vec![MeterSpec::modbus("SIMMB0000007", 7)],
        endpoints: vec![EndpointSpec::ModbusRtuSerial { path: pty.a.clone(), baud: 9600, meters: vec![0] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(cfg).await.expect("sim on the pty");
    let dir = TempDir::new("rtu");
    let toml = format!(
        "[[link]]\nname = \"bus\"\nprotocol = \"modbus-rtu\"\nserial = \"{}\"\nbaud = 9600\ntimeout_ms = 2000\n\n\
         [[meter]]\nid = \"RTU-7\"\nlink = \"bus\"\nidentity = \"SIMMB0000007\"\nunit_id = 7\nmodbus_profile = \"meter-sim\"\n\n{PROFILE}",
        pty.b
    );
    let site = site(&dir, &toml, &[]);
    let (mut d, mut link) = open(&site, "RTU-7").await;
    d.verify_identity(&mut link, "SIMMB0000007").await.expect("identity over RTU");
    assert_eq!(d.disconnect(&mut link).await.expect("cut over RTU"), SwitchOutcome::Done);
    assert!(!sim.meter("SIMMB0000007").expect("view").output_state);
    sim.shutdown().await;
}
