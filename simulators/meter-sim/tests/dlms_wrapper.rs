//! Loopback: the dlms-cosem-rs client against the simulator over the wrapper.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{as_u64, Auth, Client, Link, CLOCK, DISCONNECT, IC, IMPORT, LDN, LOG, PROFILE};
use dlms_cosem_rs::axdr::{DataBuf, DateTime};
use dlms_cosem_rs::client::AssociationStep;
use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::cosem::RangeDescriptor;
use dlms_cosem_rs::transport::wrapper::Wpdu;
use dlms_cosem_rs::xdlms::ActionResult;
use meter_sim::{
    ControlState, EndpointSpec, Faults, FleetConfig, ManualClock, MeterSpec, SimAuth, SimEventKind, SimOptions,
    Simulator,
};

const T0: i64 = 1_717_225_200_000; // 2024-06-01 07:00 UTC
const GUEK: [u8; 16] = [7; 16];
const GAK: [u8; 16] = [9; 16];

fn meter(id: &str, mode: u8, auth: SimAuth, ld: u16) -> MeterSpec {
    MeterSpec { control_mode: mode, auth, logical_device: ld, ..MeterSpec::dlms(id, usize::from(ld)) }
}

async fn start() -> (Simulator, Arc<ManualClock>, SocketAddr) {
    let cfg = FleetConfig {
        meters: vec![
            meter("SIM0000000001", 1, SimAuth::None, 1),
            meter("SIM0000000002", 2, SimAuth::Lls { password: "secret12".into() }, 2),
            meter("SIM0000000003", 3, SimAuth::HlsGmac { guek: GUEK, gak: GAK }, 3),
            meter("SIM0000000004", 0, SimAuth::None, 4),
        ],
        endpoints: vec![EndpointSpec::DlmsWrapperTcp {
            bind: "127.0.0.1:0".parse().unwrap(),
            meters: vec![0, 1, 2, 3],
        }],
        seed: 11,
        ..FleetConfig::default()
    };
    let clock = Arc::new(ManualClock::new(T0));
    let sim = Simulator::start_with(cfg, SimOptions { clock: clock.clone(), utc_offset_minutes: 120 }).await.unwrap();
    let addr = sim.endpoints()[0].addr.unwrap();
    (sim, clock, addr)
}

async fn client(addr: SocketAddr, sap: u8, ld: u16, auth: &Auth) -> Client {
    let mut c = Client::new(Link::wrapper(addr, u16::from(sap), ld).await, sap, auth);
    assert_eq!(c.associate().await, Ok(AssociationStep::Established));
    c
}

#[tokio::test]
async fn the_public_client_reads_identity_clock_and_energy() {
    let (sim, clock, addr) = start().await;
    let mut c = client(addr, 0x10, 1, &Auth::None).await;
    assert_eq!(c.get(1, LDN, 2, None).await, Ok(DataBuf::OctetString(b"SIM0000000001".to_vec())));
    // The clock is the standard 12-byte octet string, with the deviation set.
    let Ok(DataBuf::OctetString(raw)) = c.get(8, CLOCK, 2, None).await else { panic!("clock is an octet string") };
    let dt = DateTime::from_bytes(raw.try_into().unwrap());
    assert_eq!((dt.hour, dt.deviation), (9, -120));
    assert_eq!(dt.to_unix_seconds(), Some(T0 / 1000));
    assert_eq!(c.get(8, CLOCK, 3, None).await, Ok(DataBuf::Long(-120)));

    let first = as_u64(&c.get(3, IMPORT, 2, None).await.unwrap()).unwrap();
    assert_eq!(first, sim.meter("SIM0000000001").unwrap().import_wh);
    clock.advance(3_600_000);
    let later = as_u64(&c.get(3, IMPORT, 2, None).await.unwrap()).unwrap();
    assert!(later > first, "energy flows: {first} -> {later}");
    assert_eq!(c.get(3, IMPORT, 3, None).await, Ok(DataBuf::Structure(vec![DataBuf::Integer(0), DataBuf::Enum(30)])));
    // The invocation-counter object is readable without authentication.
    assert_eq!(c.get(1, IC, 2, None).await, Ok(DataBuf::DoubleLongUnsigned(0)));
    // Unknown objects and wrong classes are refused, not crashed on.
    assert!(c.get(1, dlms_cosem_rs::obis::Obis::new(9, 9, 9, 9, 9, 9), 2, None).await.is_err());
    assert!(c.get(3, LDN, 2, None).await.is_err());
    c.release().await.unwrap();
    assert!(sim.meter("SIM0000000001").unwrap().last_request.is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn the_public_client_switches_only_meters_without_authentication() {
    let (sim, _clock, addr) = start().await;
    let mut events = sim.subscribe();
    let mut hls = client(addr, 0x10, 3, &Auth::None).await;
    assert_eq!(hls.action(70, DISCONNECT, 1).await, Ok(ActionResult::ReadWriteDenied));

    let mut c = client(addr, 0x10, 1, &Auth::None).await;
    assert_eq!(c.action(70, DISCONNECT, 1).await, Ok(ActionResult::Success));
    assert_eq!(c.get(70, DISCONNECT, 2, None).await, Ok(DataBuf::Boolean(false)));
    assert_eq!(c.get(70, DISCONNECT, 3, None).await, Ok(DataBuf::Enum(0)));
    loop {
        let e = events.recv().await.unwrap();
        if let SimEventKind::Switched { output_state, .. } = e.kind {
            assert_eq!((e.meter.as_str(), output_state), ("SIM0000000001", false));
            break;
        }
    }
    // Mode 1: a remote reconnect only arms the meter; the customer's button closes it.
    assert_eq!(c.action(70, DISCONNECT, 2).await, Ok(ActionResult::Success));
    assert_eq!(c.get(70, DISCONNECT, 3, None).await, Ok(DataBuf::Enum(2)));
    assert!(!sim.meter("SIM0000000001").unwrap().output_state);
    sim.press_button("SIM0000000001").unwrap();
    assert_eq!(c.get(70, DISCONNECT, 2, None).await, Ok(DataBuf::Boolean(true)));
    let DataBuf::Array(rows) = c.get(7, LOG, 2, None).await.unwrap() else { panic!("log buffer") };
    let codes: Vec<_> = rows
        .iter()
        .map(|r| match r {
            DataBuf::Structure(cells) => as_u64(&cells[1]).unwrap(),
            _ => 0,
        })
        .collect();
    assert_eq!(codes, vec![62, 59, 61]);
    assert_eq!(sim.control_log("SIM0000000001").unwrap().len(), 3);

    // Mode 0: always connected, the methods are refused.
    let mut zero = client(addr, 0x10, 4, &Auth::None).await;
    assert_eq!(zero.action(70, DISCONNECT, 1).await, Ok(ActionResult::ReadWriteDenied));
    assert_eq!(zero.get(70, DISCONNECT, 4, None).await, Ok(DataBuf::Enum(0)));
    sim.shutdown().await;
}

#[tokio::test]
async fn low_level_security_checks_the_password() {
    let (sim, _clock, addr) = start().await;
    let mut wrong = Client::new(Link::wrapper(addr, 1, 2).await, 1, &Auth::Lls("nope".into()));
    assert!(matches!(wrong.associate().await, Ok(AssociationStep::Rejected { .. })));
    let mut c = client(addr, 1, 2, &Auth::Lls("secret12".into())).await;
    assert_eq!(c.action(70, DISCONNECT, 1).await, Ok(ActionResult::Success));
    // Mode 2: remote reconnect closes directly.
    assert_eq!(c.action(70, DISCONNECT, 2).await, Ok(ActionResult::Success));
    let view = sim.meter("SIM0000000002").unwrap();
    assert_eq!((view.output_state, view.control_state), (true, ControlState::Connected));

    // Management may set the clock (it becomes the drift) and the control mode.
    let later = meter_sim::clock::cosem_datetime(T0 + 90_000, 120).to_bytes();
    c.set(8, CLOCK, 2, dlms_cosem_rs::axdr::Data::OctetString(&later)).await.unwrap();
    assert_eq!(sim.meter("SIM0000000002").unwrap().faults.clock_drift_s, 90);
    c.set(70, DISCONNECT, 4, dlms_cosem_rs::axdr::Data::Enum(3)).await.unwrap();
    assert_eq!(sim.meter("SIM0000000002").unwrap().control_mode, 3);
    assert!(c.set(70, DISCONNECT, 4, dlms_cosem_rs::axdr::Data::Enum(9)).await.is_err());
    assert!(c.set(3, IMPORT, 2, dlms_cosem_rs::axdr::Data::DoubleLongUnsigned(0)).await.is_err());
    // The public client may not write.
    let mut public = client(addr, 0x10, 2, &Auth::None).await;
    assert!(public.set(8, CLOCK, 2, dlms_cosem_rs::axdr::Data::OctetString(&later)).await.is_err());
    sim.shutdown().await;
}

#[tokio::test]
async fn high_level_security_and_the_invocation_counter() {
    let (sim, _clock, addr) = start().await;
    let hls = |counter| Auth::Hls { guek: GUEK, gak: GAK, counter };
    let mut c = client(addr, 1, 3, &hls(0)).await;
    assert_eq!(c.action(70, DISCONNECT, 1).await, Ok(ActionResult::Success));
    assert_eq!(c.get(70, DISCONNECT, 3, None).await, Ok(DataBuf::Enum(0)));
    let used = c.session.invocation_counter();
    c.release().await.unwrap();
    assert_eq!(sim.meter("SIM0000000003").unwrap().control_state, ControlState::Disconnected);

    // The public client learns where the management client must resume...
    let mut public = client(addr, 0x10, 3, &Auth::None).await;
    let expected = as_u64(&public.get(1, IC, 2, None).await.unwrap()).unwrap();
    assert_eq!(expected, u64::from(used) + 1);
    // ...a client that restarted from zero is told the same...
    let mut stale = Client::new(Link::wrapper(addr, 1, 3).await, 1, &hls(0));
    match stale.associate().await {
        Ok(AssociationStep::Exception(e)) => assert_eq!(e.expected_invocation_counter.map(u64::from), Some(expected)),
        other => panic!("a replayed counter is refused: {other:?}"),
    }
    // ...and one that resumes from there gets in.
    let resumed = u32::try_from(expected).unwrap() - 1;
    let mut c = client(addr, 1, 3, &hls(resumed)).await;
    assert_eq!(c.get(1, LDN, 2, None).await, Ok(DataBuf::OctetString(b"SIM0000000003".to_vec())));
    // A wrong key is refused.
    let mut wrong =
        Client::new(Link::wrapper(addr, 1, 3).await, 1, &Auth::Hls { guek: [1; 16], gak: GAK, counter: 1000 });
    assert!(!matches!(wrong.associate().await, Ok(AssociationStep::Established)));
    sim.shutdown().await;
}

#[tokio::test]
async fn the_load_profile_by_range_arrives_in_blocks() {
    let (sim, clock, addr) = start().await;
    clock.advance(2 * 86_400_000);
    let mut c = client(addr, 0x10, 1, &Auth::None).await;
    assert_eq!(c.get(7, PROFILE, 7, None).await, Ok(DataBuf::DoubleLongUnsigned(60 * 96)));
    assert_eq!(c.get(7, PROFILE, 4, None).await, Ok(DataBuf::DoubleLongUnsigned(900)));
    let Ok(DataBuf::Array(columns)) = c.get(7, PROFILE, 3, None).await else { panic!("capture objects") };
    assert_eq!(columns.len(), 4);

    let to = T0 + 2 * 86_400_000;
    let from = to - 86_400_000;
    let mut params = [0u8; 128];
    let sa = RangeDescriptor::by_clock(
        meter_sim::clock::cosem_datetime(from, 120),
        meter_sim::clock::cosem_datetime(to, 120),
    )
    .to_selective_access(&mut params)
    .unwrap();
    let Ok(DataBuf::Array(rows)) = c.get(7, PROFILE, 2, Some(sa)).await else { panic!("profile rows") };
    assert_eq!(rows.len(), 97, "a day of quarter hours, both ends included");
    let imports: Vec<u64> = rows
        .iter()
        .map(|r| match r {
            DataBuf::Structure(cells) => as_u64(&cells[2]).unwrap(),
            _ => 0,
        })
        .collect();
    assert!(imports.windows(2).all(|w| w[1] >= w[0]));
    assert_eq!(*imports.last().unwrap(), sim.meter("SIM0000000001").unwrap().import_wh);
    // The whole 60-day buffer does not fit one value: refused, not truncated.
    assert!(c.get(7, PROFILE, 2, None).await.is_err());
    sim.shutdown().await;
}

#[tokio::test]
async fn faults_refuse_associations_and_move_the_clock() {
    let (sim, _clock, addr) = start().await;
    sim.set_faults("SIM0000000001", Faults { refuse_association: true, ..Faults::default() }).unwrap();
    let mut c = Client::new(Link::wrapper(addr, 0x10, 1).await, 0x10, &Auth::None);
    assert!(matches!(c.associate().await, Ok(AssociationStep::Rejected { .. })));
    sim.set_faults("SIM0000000001", Faults { clock_drift_s: 3600, ..Faults::default() }).unwrap();
    let mut c = client(addr, 0x10, 1, &Auth::None).await;
    let Ok(DataBuf::OctetString(raw)) = c.get(8, CLOCK, 2, None).await else { panic!("clock") };
    assert_eq!(DateTime::from_bytes(raw.try_into().unwrap()).to_unix_seconds(), Some(T0 / 1000 + 3600));
    assert!(matches!(sim.set_faults("nope", Faults::default()), Err(meter_sim::SimError::UnknownMeter(_))));
    sim.shutdown().await;
}

#[tokio::test]
async fn silence_for_unknown_devices_clients_and_offline_or_dropped_requests() {
    let (sim, _clock, addr) = start().await;
    let mut c = client(addr, 0x10, 1, &Auth::None).await;
    let mut junk = Vec::new();
    // A GET for logical device 99, then one from client SAP 0x20: neither is answered...
    let get_ldn = [0xC0, 0x01, 0xC1, 0x00, 0x01, 0, 0, 42, 0, 0, 255, 0x02, 0x00];
    Wpdu::new(0x10, 99, &get_ldn).unwrap().encode(&mut junk).unwrap();
    Wpdu::new(0x20, 1, &get_ldn).unwrap().encode(&mut junk).unwrap();
    c.link.send_raw(&junk).await;
    // ...so the first answer to arrive is the clock's.
    assert!(matches!(c.get(8, CLOCK, 2, None).await, Ok(DataBuf::OctetString(v)) if v.len() == 12));

    let mut events = sim.subscribe();
    for faults in [Faults { offline: true, ..Faults::default() }, Faults { drop_every_nth: 1, ..Faults::default() }] {
        sim.set_faults("SIM0000000001", faults).unwrap();
        let mut lost = Vec::new();
        Wpdu::new(0x10, 1, &get_ldn).unwrap().encode(&mut lost).unwrap();
        c.link.send_raw(&lost).await;
        // Wait until the meter has swallowed it.
        while !matches!(events.recv().await.unwrap().kind, SimEventKind::Unanswered { .. }) {}
        sim.set_faults("SIM0000000001", Faults::default()).unwrap();
        assert!(matches!(c.get(8, CLOCK, 2, None).await, Ok(DataBuf::OctetString(v)) if v.len() == 12));
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once_on_worker_threads() {
    let (sim, _clock, addr) = start().await;
    let mut tasks = Vec::new();
    for k in 0..40u32 {
        tasks.push(tokio::spawn(async move {
            let (sap, ld, auth) = match k % 3 {
                0 => (0x10, 1, Auth::None),
                1 => (1, 2, Auth::Lls("secret12".into())),
                _ => (0x10, 3, Auth::None),
            };
            let mut c = client(addr, sap, ld, &auth).await;
            let mut params = [0u8; 64];
            let sa = dlms_cosem_rs::cosem::EntryDescriptor::entries(1, 576).to_selective_access(&mut params).ok();
            match c.get(7, PROFILE, 2, sa).await {
                Ok(DataBuf::Array(rows)) => rows.len(),
                _ => 0,
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 576);
    }
    sim.shutdown().await;
}
