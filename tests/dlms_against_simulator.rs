//! The DLMS/COSEM driver against the bundled simulator, in-process on loopback: the
//! wrapper, HDLC through a TCP gateway (two meters on one link), HDLC on a serial pty,
//! authentication none / LLS / HLS-GMAC, the disconnect control in several modes, the
//! load profile, faults, and dial-in links.

mod common;

use common::site::{addr_of, hex, open, site};
use common::{PtyPair, TempDir};
use headend::dlms::cosem;
use headend::driver::Link;
use headend::meter::{MeterError, RelayState, SwitchOutcome};
use meter_sim::{ControlState, EndpointKind, EndpointSpec, Faults, FleetConfig, MeterSpec, SimAuth, Simulator};

const GUEK: [u8; 16] = [0x11; 16];
const GAK: [u8; 16] = [0x22; 16];
const TITLE: &str = "4844454E44000001";

fn any_port() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Five meters behind one wrapper endpoint, two behind an HDLC gateway.
fn fleet() -> FleetConfig {
    let mut m = Vec::new();
    let mut none = MeterSpec::dlms("SIM0000000001", 0);
    none.control_mode = 2;
    m.push(none);
    let mut lls = MeterSpec::dlms("SIM0000000002", 1);
    lls.logical_device = 2;
    lls.auth = SimAuth::Lls { password: "secret12".into() };
    lls.control_mode = 1;
    m.push(lls);
    let mut hls = MeterSpec::dlms("SIM0000000003", 2);
    hls.logical_device = 3;
    hls.auth = SimAuth::HlsGmac { guek: GUEK, gak: GAK };
    hls.control_mode = 4;
    m.push(hls);
    let mut fixed = MeterSpec::dlms("SIM0000000004", 3);
    fixed.logical_device = 4;
    fixed.control_mode = 0;
    m.push(fixed);
    let mut bus_a = MeterSpec::dlms("SIM0000000005", 4);
    bus_a.physical_address = 17;
    m.push(bus_a);
    let mut bus_b = MeterSpec::dlms("SIM0000000006", 5);
    bus_b.physical_address = 18;
    bus_b.auth = SimAuth::HlsGmac { guek: GUEK, gak: GAK };
    m.push(bus_b);
    // The device the registry wrongly names M-WRONG (whose registered identity is
    // SIM0000000099): a meter installed where another was expected.
    let mut swapped = MeterSpec::dlms("SIM0000000007", 6);
    swapped.logical_device = 5;
    m.push(swapped);
    FleetConfig {
        meters: m,
        endpoints: vec![
            EndpointSpec::DlmsWrapperTcp { bind: any_port(), meters: vec![0, 1, 2, 3, 6] },
            EndpointSpec::DlmsHdlcTcp { bind: any_port(), meters: vec![4, 5], baud: None },
        ],
        ..FleetConfig::default()
    }
}

fn config_for(sim: &Simulator, timeout_ms: u64) -> String {
    let wrapper = addr_of(sim, EndpointKind::DlmsWrapperTcp);
    let hdlc = addr_of(sim, EndpointKind::DlmsHdlcTcp);
    format!(
        r#"
[[link]]
name = "wrapper"
protocol = "dlms-wrapper"
address = "{wrapper}"
timeout_ms = {timeout_ms}

[[link]]
name = "gateway"
protocol = "dlms-hdlc"
address = "{hdlc}"
timeout_ms = {timeout_ms}

[[meter]]
id = "M-NONE"
link = "wrapper"
identity = "SIM0000000001"
logical_device = 1
client_sap = 16

[[meter]]
id = "M-LLS"
link = "wrapper"
identity = "SIM0000000002"
logical_device = 2
client_sap = 1
auth = "lls"
keys = "lls.toml"

[[meter]]
id = "M-HLS"
link = "wrapper"
identity = "SIM0000000003"
logical_device = 3
client_sap = 1
auth = "hls-gmac"
keys = "hls.toml"

[[meter]]
id = "M-FIXED"
link = "wrapper"
identity = "SIM0000000004"
logical_device = 4

[[meter]]
id = "M-WRONG"
link = "wrapper"
identity = "SIM0000000099"
logical_device = 5

[[meter]]
id = "BUS-A"
link = "gateway"
identity = "SIM0000000005"
physical_address = 17

[[meter]]
id = "BUS-B"
link = "gateway"
identity = "SIM0000000006"
physical_address = 18
client_sap = 1
auth = "hls-gmac"
keys = "hls.toml"
"#
    )
}

fn keys(password: &str, guek: &[u8; 16]) -> Vec<(&'static str, String)> {
    vec![
        ("lls.toml", format!("password = \"{password}\"\n")),
        ("hls.toml", format!("guek = \"{}\"\ngak = \"{}\"\nclient_system_title = \"{TITLE}\"\n", hex(guek), hex(&GAK))),
    ]
}

struct Setup {
    sim: Simulator,
    dir: TempDir,
    site: headend::config::SiteConfig,
}

async fn setup_with(timeout_ms: u64, password: &str, guek: &[u8; 16]) -> Setup {
    let sim = Simulator::start(fleet()).await.expect("simulator starts");
    let dir = TempDir::new("dlms");
    let k = keys(password, guek);
    let k: Vec<(&str, &str)> = k.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let site = site(&dir, &config_for(&sim, timeout_ms), &k);
    Setup { sim, dir, site }
}

async fn setup() -> Setup {
    setup_with(3000, "secret12", &GUEK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapper_reads_identity_relay_registers_and_clock() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    let id = d.read_identity(&mut link).await.expect("identity");
    assert_eq!(id.name, "SIM0000000001");
    let relay = d.read_relay(&mut link).await.expect("relay");
    assert_eq!(relay.state, RelayState::Connected);
    assert_eq!(relay.control_mode.map(|m| m.0), Some(2));
    let regs = d.read_registers(&mut link).await.expect("registers");
    let import = regs.iter().find(|r| r.obis == "1.0.1.8.0.255").expect("import register");
    assert_eq!(import.unit, "Wh");
    let sim_import = s.sim.meter("SIM0000000001").expect("view").import_wh as f64;
    assert!((import.value - sim_import).abs() < 1000.0, "read {} vs simulator {}", import.value, sim_import);
    let clock = d.read_clock(&mut link).await.expect("clock");
    let now = headend::time::Clock::now(&headend::time::SystemClock);
    let t = clock.unix_seconds.expect("clock is a point in time");
    assert!((t - now).abs() < 60, "meter clock {t} vs now {now}");
    d.close(&mut link).await;
    // Only ciphered associations keep invocation counters.
    assert!(!s.site.state_dir().join("invocation-counters").join("M-NONE.ic").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_reconnect_are_verified_by_read_back() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    d.verify_identity(&mut link, "SIM0000000001").await.expect("right meter");
    assert_eq!(d.disconnect(&mut link).await.expect("disconnect"), SwitchOutcome::Done);
    let v = s.sim.meter("SIM0000000001").expect("view");
    assert!(!v.output_state);
    assert_eq!(v.control_state, ControlState::Disconnected);
    // Mode 2 closes directly.
    assert_eq!(d.reconnect(&mut link).await.expect("reconnect"), SwitchOutcome::Done);
    assert!(s.sim.meter("SIM0000000001").expect("view").output_state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_in_mode_1_is_armed_until_the_customer_presses_the_button() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-LLS").await;
    assert_eq!(d.disconnect(&mut link).await.expect("disconnect over LLS"), SwitchOutcome::Done);
    assert_eq!(d.reconnect(&mut link).await.expect("reconnect"), SwitchOutcome::Armed);
    assert_eq!(d.read_relay(&mut link).await.expect("relay").state, RelayState::ReadyForReconnection);
    s.sim.press_button("SIM0000000002").expect("button");
    assert_eq!(d.read_relay(&mut link).await.expect("relay").state, RelayState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_lls_password_is_refused() {
    let s = setup_with(3000, "wrong-pw", &GUEK).await;
    let (mut d, mut link) = open(&s.site, "M-LLS").await;
    let err = d.read_relay(&mut link).await.expect_err("refused");
    assert!(matches!(err, MeterError::AssociationRefused(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-pw"), "the password never appears in errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_gmac_associates_and_the_counter_survives_a_restart() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-HLS").await;
    assert_eq!(d.read_relay(&mut link).await.expect("relay over HLS").state, RelayState::Connected);
    assert_eq!(d.disconnect(&mut link).await.expect("ciphered ACTION"), SwitchOutcome::Done);
    d.close(&mut link).await;
    let file = s.site.state_dir().join("invocation-counters").join("M-HLS.ic");
    let stored: u32 = std::fs::read_to_string(&file).expect("counter stored").trim().parse().expect("number");
    assert!(stored > 0);
    // A new driver (a restarted head-end) resumes beyond every value used: the meter,
    // which refuses replays, accepts it.
    let (mut d2, mut link2) = open(&s.site, "M-HLS").await;
    assert_eq!(d2.reconnect(&mut link2).await.expect("after restart"), SwitchOutcome::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_hls_keys_are_refused() {
    let s = setup_with(3000, "secret12", &[0x99; 16]).await;
    let (mut d, mut link) = open(&s.site, "M-HLS").await;
    let err = d.read_relay(&mut link).await.expect_err("refused");
    assert!(matches!(err, MeterError::AssociationRefused(_)), "{err:?}");
    assert!(!err.to_string().contains("9999"), "keys never appear in errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_counter_is_resynchronised_from_the_meters_counter_object() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-HLS").await;
    d.read_relay(&mut link).await.expect("first association");
    d.close(&mut link).await;
    let file = s.site.state_dir().join("invocation-counters").join("M-HLS.ic");
    let used: u32 = std::fs::read_to_string(&file).expect("stored").trim().parse().expect("number");
    // A restore from an old backup: the stored counter goes back to zero.
    std::fs::write(&file, "0\n").expect("rewind");
    let (mut d2, mut link2) = open(&s.site, "M-HLS").await;
    d2.read_relay(&mut link2).await.expect("resynchronised and associated");
    d2.close(&mut link2).await;
    let now: u32 = std::fs::read_to_string(&file).expect("stored").trim().parse().expect("number");
    // Without the resynchronisation the rewound store would have come back to exactly `used`.
    assert!(now > used, "moved forward from the meter's counter (was {used} before the rewind, now {now})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_0_refuses_switching() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-FIXED").await;
    let err = d.disconnect(&mut link).await.expect_err("mode 0 refuses");
    assert!(matches!(err, MeterError::Refused(_)), "{err:?}");
    assert!(s.sim.meter("SIM0000000004").expect("view").output_state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_relay_is_a_verify_mismatch() {
    let s = setup().await;
    s.sim.set_faults("SIM0000000001", Faults { stuck_relay: true, ..Faults::default() }).expect("fault");
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    let err = d.disconnect(&mut link).await.expect_err("the relay did not move");
    assert!(
        matches!(err, MeterError::VerifyMismatch { asked: RelayState::Disconnected, actual: RelayState::Connected }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_meter_is_detected_before_switching() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-WRONG").await;
    let err = d.verify_identity(&mut link, "SIM0000000099").await.expect_err("mismatch");
    assert!(matches!(err, MeterError::IdentityMismatch { .. }), "{err:?}");
    assert_eq!(err.code(), "identity_mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_profile_is_read_by_range() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    let now = headend::time::Clock::now(&headend::time::SystemClock);
    let from = now - 6 * 3600;
    let p = d.read_profile(&mut link, cosem::LOAD_PROFILE, from, now).await.expect("profile");
    assert_eq!(p.capture_period_s, 900);
    assert!((23..=25).contains(&p.rows.len()), "{} rows for 6 hours", p.rows.len());
    assert!(p.columns.iter().any(|c| c.unit.as_deref() == Some("Wh")), "{:?}", p.columns);
    let mut last: Option<(i64, f64)> = None;
    for r in &p.rows {
        let t = r.unix_seconds.expect("row time");
        assert!(t >= from && t <= now && t % 900 == 0, "row at {t}");
        let import = r.values.first().copied().flatten().expect("import value");
        if let Some((lt, li)) = last {
            assert_eq!(t - lt, 900);
            assert!(import >= li, "energy never decreases");
        }
        last = Some((t, import));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meters_share_one_hdlc_gateway_link() {
    let s = setup().await;
    let (mut a, mut link) = open(&s.site, "BUS-A").await;
    let (mut b, _) = open(&s.site, "BUS-B").await;
    // One link, turns taken: A, B, A, B.
    assert_eq!(a.read_identity(&mut link).await.expect("A").name, "SIM0000000005");
    assert_eq!(b.read_identity(&mut link).await.expect("B over HLS").name, "SIM0000000006");
    assert_eq!(a.disconnect(&mut link).await.expect("A cut"), SwitchOutcome::Done);
    assert_eq!(b.read_relay(&mut link).await.expect("B relay").state, RelayState::Connected);
    assert!(!s.sim.meter("SIM0000000005").expect("A").output_state);
    assert!(s.sim.meter("SIM0000000006").expect("B").output_state);
    // A day of profile over 128-byte HDLC frames: segmentation and datablocks together.
    let now = headend::time::Clock::now(&headend::time::SystemClock);
    let p = b.read_profile(&mut link, cosem::LOAD_PROFILE, now - 24 * 3600, now).await.expect("profile over HDLC");
    assert!((95..=97).contains(&p.rows.len()), "{} rows", p.rows.len());
    a.close(&mut link).await;
    b.close(&mut link).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_answers_are_timeouts_and_the_link_recovers() {
    let s = setup_with(400, "secret12", &GUEK).await;
    let (mut d, mut link) = open(&s.site, "BUS-A").await;
    d.read_identity(&mut link).await.expect("healthy first");
    s.sim.set_faults("SIM0000000005", Faults { corrupt_every_nth: 1, ..Faults::default() }).expect("fault");
    let err = d.read_relay(&mut link).await.expect_err("every answer has a bad FCS");
    assert!(matches!(err, MeterError::Timeout(400)), "{err:?}");
    s.sim.set_faults("SIM0000000005", Faults::default()).expect("clear");
    // Same link, no reopen: the driver associates again and the answer comes through.
    assert_eq!(d.read_relay(&mut link).await.expect("recovered").state, RelayState::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_meter_is_a_timeout_not_a_hang() {
    let s = setup_with(300, "secret12", &GUEK).await;
    s.sim.set_faults("SIM0000000001", Faults { offline: true, ..Faults::default() }).expect("fault");
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    let err = d.read_relay(&mut link).await.expect_err("no answer");
    assert_eq!(err.code(), "meter_unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hdlc_on_a_serial_pty() {
    let pty = PtyPair::new();
    let mut meter = MeterSpec::dlms("SIM0000000042", 0);
    meter.physical_address = 33;
    meter.control_mode = 3;
    let cfg = FleetConfig {
        meters: vec![meter],
        endpoints: vec![EndpointSpec::DlmsHdlcSerial { path: pty.a.clone(), baud: 9600, meters: vec![0] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(cfg).await.expect("simulator on the pty");
    let dir = TempDir::new("serial");
    let site = site(
        &dir,
        &format!(
            "[[link]]\nname = \"rs485\"\nprotocol = \"dlms-hdlc\"\nserial = \"{}\"\nbaud = 9600\ntimeout_ms = 3000\n\n\
             [[meter]]\nid = \"SER-1\"\nlink = \"rs485\"\nidentity = \"SIM0000000042\"\nphysical_address = 33\n",
            pty.b
        ),
        &[],
    );
    let (mut d, mut link) = open(&site, "SER-1").await;
    d.verify_identity(&mut link, "SIM0000000042").await.expect("identity over serial");
    assert_eq!(d.disconnect(&mut link).await.expect("cut"), SwitchOutcome::Done);
    assert_eq!(d.reconnect(&mut link).await.expect("mode 3 arms"), SwitchOutcome::Armed);
    d.close(&mut link).await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_dials_in_is_identified_and_served() {
    use headend::inbound::{DialInTransport, InboundListener};
    let s = setup().await;
    let listener = InboundListener::bind("127.0.0.1:0", DialInTransport::Wrapper { logical_device: 1 }, 3000)
        .await
        .expect("listener");
    let headend_addr = listener.local_addr().expect("addr");
    let meter_addr = addr_of(&s.sim, EndpointKind::DlmsWrapperTcp);
    // A cellular modem: it dials the head-end and bridges the call to its meter.
    let modem = tokio::spawn(async move {
        let mut up = tokio::net::TcpStream::connect(headend_addr).await.expect("dial the head-end");
        let mut meter = tokio::net::TcpStream::connect(meter_addr).await.expect("meter port");
        let _ = tokio::io::copy_bidirectional(&mut up, &mut meter).await;
    });
    let dial_in = listener.accept().await.expect("identified");
    assert_eq!(dial_in.identity, "SIM0000000001");
    // The identity maps to the registry entry, whose driver now uses the same link.
    let meter = s.site.meters.iter().find(|m| m.identity.as_deref() == Some(dial_in.identity.as_str())).expect("known");
    let counters = headend::dlms::counter::CounterStore::new(s.dir.path("ic"));
    let mut d = headend::driver::Driver::from_config(&s.site, meter, counters).expect("driver");
    let mut link = Link::Dlms(dial_in.port);
    assert_eq!(d.read_relay(&mut link).await.expect("relay over the dial-in link").state, RelayState::Connected);
    d.close(&mut link).await;
    drop(link);
    modem.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_the_meter_closed_is_reopened_and_the_association_re_established() {
    let sim = Simulator::start(fleet()).await.expect("simulator starts");
    let target: std::net::SocketAddr = addr_of(&sim, EndpointKind::DlmsWrapperTcp).parse().expect("addr");
    let proxy = common::proxy::Proxy::start(target).await;
    let dir = TempDir::new("reopen");
    let text = config_for(&sim, 3000).replacen(&target.to_string(), &proxy.addr.to_string(), 1);
    let k = keys("secret12", &GUEK);
    let k: Vec<(&str, &str)> = k.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let site = site(&dir, &text, &k);
    let (mut d, mut link) = open(&site, "M-HLS").await;
    d.read_relay(&mut link).await.expect("first request");
    assert_eq!(proxy.accepted(), 1);
    // The meter (or its modem) drops the line while the association is idle.
    proxy.cut_all().await;
    assert_eq!(d.read_relay(&mut link).await.expect("transparently re-established").state, RelayState::Connected);
    assert_eq!(proxy.accepted(), 2, "the link was opened again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_hdlc_frames_and_a_window_of_three_segment_both_ways() {
    let s = setup().await;
    let hdlc = addr_of(&s.sim, EndpointKind::DlmsHdlcTcp);
    let dir = TempDir::new("window");
    // 32-byte information fields: the ciphered AARQ and every answer span several frames.
    let text = format!(
        "[[link]]\nname = \"gw\"\nprotocol = \"dlms-hdlc\"\naddress = \"{hdlc}\"\ntimeout_ms = 3000\n\
         hdlc = {{ max_info = 32, window = 3 }}\n\n\
         [[meter]]\nid = \"BUS-B\"\nlink = \"gw\"\nidentity = \"SIM0000000006\"\nphysical_address = 18\n\
         client_sap = 1\nauth = \"hls-gmac\"\nkeys = \"hls.toml\"\n"
    );
    let k = keys("secret12", &GUEK);
    let k: Vec<(&str, &str)> = k.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let site = site(&dir, &text, &k);
    let (mut d, mut link) = open(&site, "BUS-B").await;
    assert_eq!(d.read_identity(&mut link).await.expect("identity in small frames").name, "SIM0000000006");
    let now = headend::time::Clock::now(&headend::time::SystemClock);
    let p = d.read_profile(&mut link, cosem::LOAD_PROFILE, now - 4 * 3600, now).await.expect("profile");
    assert!((15..=17).contains(&p.rows.len()), "{} rows", p.rows.len());
    assert_eq!(d.disconnect(&mut link).await.expect("cut"), SwitchOutcome::Done);
    d.close(&mut link).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_refuses_range_access_is_read_by_entry() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    let now = headend::time::Clock::now(&headend::time::SystemClock);
    let by_range = d.read_profile(&mut link, cosem::LOAD_PROFILE, now - 5 * 3600, now).await.expect("by range");
    s.sim.set_faults("SIM0000000001", Faults { refuse_range_access: true, ..Faults::default() }).expect("fault");
    let by_entry = d.read_profile(&mut link, cosem::LOAD_PROFILE, now - 5 * 3600, now).await.expect("by entry");
    // The same rows, whichever way they were selected (values may only grow at the end).
    let times = |p: &headend::meter::LoadProfile| p.rows.iter().map(|r| r.unix_seconds).collect::<Vec<_>>();
    assert_eq!(times(&by_entry), times(&by_range));
    assert!(!by_entry.rows.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_and_profile_in_one_get_with_list_and_separately_where_the_meter_has_no_lists() {
    let s = setup().await;
    let (mut d, mut link) = open(&s.site, "M-NONE").await;
    let now = headend::time::Clock::now(&headend::time::SystemClock);
    let (from, to) = (now - 6 * 3600, now);
    // The profile's description is read first (as a job's first read of a meter does).
    let alone = d.read_profile(&mut link, cosem::LOAD_PROFILE, from, to).await.expect("profile alone");
    let (headend::driver::Driver::Dlms(m), Link::Dlms(port)) = (&mut d, &mut link) else { panic!("a DLMS meter") };
    let (with_list, listed) = read_both(m, port, (from, to), now).await;
    s.sim.set_faults("SIM0000000001", Faults { no_multiple_references: true, ..Faults::default() }).expect("fault");
    // The simulator's conformance block is set per connection.
    port.reopen().await.expect("reopened");
    let (without, separate) = read_both(m, port, (from, to), now).await;
    let times = |p: &headend::meter::LoadProfile| p.rows.iter().map(|r| r.unix_seconds).collect::<Vec<_>>();
    assert!(!alone.rows.is_empty());
    assert_eq!(times(&listed), times(&alone), "the same rows in one GET-with-list");
    assert_eq!(times(&separate), times(&alone), "the same rows in two GETs");
    // One request (one wrapper header, one GET header) instead of two.
    assert!(with_list < without, "with a list {with_list} bytes sent, without {without}");
}

/// On a fresh association: the clock and the profile, and the bytes sent for them.
async fn read_both(
    m: &mut headend::dlms::DlmsMeter,
    port: &mut headend::link::Port,
    (from, to): (i64, i64),
    now: i64,
) -> (u64, headend::meter::LoadProfile) {
    m.close(port).await;
    let before = port.bytes_out;
    let (clock, profile) = m.read_clock_and_profile(port, cosem::LOAD_PROFILE, from, to).await.expect("both");
    let clock = clock.expect("the clock");
    assert!(clock.unix_seconds.is_some_and(|t| (t - now).abs() < 60), "{clock:?}");
    (port.bytes_out - before, profile)
}
