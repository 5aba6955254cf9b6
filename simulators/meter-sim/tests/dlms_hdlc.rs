//! Loopback: the dlms-cosem-rs client over HDLC through a simulated gateway.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{as_u64, Auth, Client, Link, DISCONNECT, LDN, PROFILE};
use dlms_cosem_rs::axdr::DataBuf;
use dlms_cosem_rs::client::AssociationStep;
use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::cosem::EntryDescriptor;
use dlms_cosem_rs::transport::hdlc::{decode_frame, Address, Control, Found, Frame, Framer, Parameters};
use dlms_cosem_rs::xdlms::ActionResult;
use meter_sim::{
    EndpointSpec, Faults, FleetConfig, ManualClock, MeterSpec, SimAuth, SimEventKind, SimOptions, Simulator,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T0: i64 = 1_717_225_200_000;
const GUEK: [u8; 16] = [3; 16];
const GAK: [u8; 16] = [4; 16];

fn meter(id: &str, phys: u16, mode: u8, auth: SimAuth) -> MeterSpec {
    MeterSpec { physical_address: phys, control_mode: mode, auth, ..MeterSpec::dlms(id, 0) }
}

async fn start() -> (Simulator, SocketAddr, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = FleetConfig {
        meters: vec![
            meter("SIM0000000016", 16, 2, SimAuth::None),
            meter("SIM0000000200", 200, 4, SimAuth::HlsGmac { guek: GUEK, gak: GAK }),
            meter("SIM0000000017", 17, 1, SimAuth::Lls { password: "pw".into() }),
            meter("SIM0000000099", 99, 2, SimAuth::None),
        ],
        endpoints: vec![
            EndpointSpec::DlmsHdlcTcp { bind: any, meters: vec![0, 1, 2], baud: None },
            EndpointSpec::DlmsHdlcTcp { bind: any, meters: vec![3], baud: Some(2400) },
        ],
        ..FleetConfig::default()
    };
    let clock = Arc::new(ManualClock::new(T0));
    let sim = Simulator::start_with(cfg, SimOptions { clock, utc_offset_minutes: 0 }).await.unwrap();
    let (a, b) = (sim.endpoints()[0].addr.unwrap(), sim.endpoints()[1].addr.unwrap());
    (sim, a, b)
}

async fn associated(addr: SocketAddr, sap: u8, server: Address, auth: &Auth) -> Client {
    let link = Link::hdlc(addr, sap, server).await.unwrap();
    let mut c = Client::new(link, sap, auth);
    assert_eq!(c.associate().await, Ok(AssociationStep::Established));
    c
}

fn frame(dest: Address, src: Address, control: Control, info: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Frame { segmented: false, destination: dest, source: src, control, information: info }.encode(&mut out).unwrap();
    out
}

/// Read raw frames until `count` have arrived.
async fn raw_frames(stream: &mut TcpStream, count: usize) -> Vec<(Address, Control)> {
    let mut buf = Vec::new();
    let mut found = Vec::new();
    let mut framer = Framer::new();
    let mut chunk = [0u8; 2048];
    while found.len() < count {
        match framer.next_frame(&buf).unwrap() {
            Found::Frame { frame, consumed } => {
                found.push((frame.source, frame.control));
                buf.drain(..consumed);
            }
            Found::Incomplete { .. } => {
                let n = tokio::time::timeout(common::PATIENCE, stream.read(&mut chunk)).await.unwrap().unwrap();
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    found
}

#[tokio::test]
async fn meters_on_a_gateway_answer_by_physical_address() {
    let (sim, addr, _) = start().await;
    let mut c = associated(addr, 0x10, Address::server(1, 16), &Auth::None).await;
    assert_eq!(c.get(1, LDN, 2, None).await, Ok(DataBuf::OctetString(b"SIM0000000016".to_vec())));
    assert_eq!(c.action(70, DISCONNECT, 1).await, Ok(ActionResult::Success));
    assert!(!sim.meter("SIM0000000016").unwrap().output_state);
    assert!(c.link.disconnect().await.unwrap());

    // Physical address 200 needs the 4-byte form; 16 accepts it too.
    let hls = Auth::Hls { guek: GUEK, gak: GAK, counter: 0 };
    let mut c = associated(addr, 1, Address::server(1, 200), &hls).await;
    assert!(matches!(Address::server(1, 200), Address::Quad { .. }));
    assert_eq!(c.get(1, LDN, 2, None).await, Ok(DataBuf::OctetString(b"SIM0000000200".to_vec())));
    let mut c = associated(addr, 0x10, Address::Quad { upper: 1, lower: 16 }, &Auth::None).await;
    assert_eq!(c.get(70, DISCONNECT, 2, None).await, Ok(DataBuf::Boolean(false)));
    sim.shutdown().await;
}

#[tokio::test]
async fn long_answers_are_segmented_by_window() {
    let (sim, addr, _) = start().await;
    for window in [1, 7] {
        let params = Parameters { max_info_tx: 128, max_info_rx: 128, window_tx: 1, window_rx: window };
        let stream = TcpStream::connect(addr).await.unwrap();
        let link = Link::hdlc_on(stream, 0x10, Address::server(1, 16), params).await.unwrap();
        let mut c = Client::new(link, 0x10, &Auth::None);
        assert_eq!(c.associate().await, Ok(AssociationStep::Established));
        let mut buf = [0u8; 64];
        let sa = EntryDescriptor::entries(1, 200).to_selective_access(&mut buf).unwrap();
        let Ok(DataBuf::Array(rows)) = c.get(7, PROFILE, 2, Some(sa)).await else { panic!("profile") };
        assert_eq!(rows.len(), 200, "window {window}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn strangers_get_silence_or_dm() {
    let (sim, addr, _) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let client = Address::client(0x10);
    // Another station's physical address: silence. An unknown SAP or logical device: DM.
    let mut burst = frame(Address::server(1, 55), client, Control::Snrm, &[]);
    burst.extend(frame(Address::server(1, 16), Address::client(0x20), Control::Snrm, &[]));
    burst.extend(frame(Address::server(5, 16), client, Control::Snrm, &[]));
    burst.extend(frame(Address::server(1, 16), client, Control::Snrm, &[]));
    stream.write_all(&burst).await.unwrap();
    let got = raw_frames(&mut stream, 3).await;
    assert_eq!(got.iter().map(|(_, c)| *c).collect::<Vec<_>>(), vec![Control::Dm, Control::Dm, Control::Ua]);

    // Frames sharing one flag are all seen; a frame with a bad FCS is ignored.
    let f1 = frame(Address::server(1, 16), client, Control::Disc, &[]);
    let mut bad = frame(Address::server(1, 17), client, Control::Snrm, &[]);
    let at = bad.len() - 2;
    bad[at] ^= 0x55;
    let f2 = frame(Address::server(1, 17), client, Control::Snrm, &[]);
    let mut shared = f1.clone();
    shared.extend_from_slice(&bad);
    shared.extend_from_slice(&f2[1..]); // f2 opens on f1's... on bad's closing flag
    stream.write_all(&shared).await.unwrap();
    let got = raw_frames(&mut stream, 2).await;
    assert_eq!(got[0].1, Control::Ua, "DISC of the open link");
    assert_eq!(got[1], (Address::server(1, 17), Control::Ua), "the SNRM behind a shared flag");

    // An I-frame on a link that is not open: DM.
    let i = frame(Address::server(1, 200), client, Control::I { ns: 0, nr: 0, pf: true }, &[0xE6, 0xE6, 0, 0x60]);
    stream.write_all(&i).await.unwrap();
    assert_eq!(raw_frames(&mut stream, 1).await[0].1, Control::Dm);
    sim.shutdown().await;
}

#[tokio::test]
async fn corrupted_and_lost_answers() {
    let (sim, addr, _) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    sim.set_faults("SIM0000000016", Faults { corrupt_every_nth: 1, ..Faults::default() }).unwrap();
    stream.write_all(&frame(Address::server(1, 16), Address::client(0x10), Control::Snrm, &[])).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(common::PATIENCE, stream.read(&mut buf)).await.unwrap().unwrap();
    assert!(decode_frame(&buf[..n]).is_err(), "the UA's FCS is broken");

    // Every second request's answer is lost; repeating the I-frame recovers it.
    sim.set_faults("SIM0000000016", Faults { drop_every_nth: 2, ..Faults::default() }).unwrap();
    let mut events = sim.subscribe();
    let link = Link::hdlc(addr, 0x10, Address::server(1, 16)).await.unwrap(); // request 1
    let mut c = Client::new(link, 0x10, &Auth::None);
    let mut aarq = vec![0u8; 256];
    let len = c.session.associate_request(&mut aarq).unwrap();
    let sent = c.link.send_apdu(&aarq[..len]).await.unwrap(); // request 2: answer lost
    while !matches!(events.recv().await.unwrap().kind, SimEventKind::Unanswered { .. }) {}
    c.link.send_raw(&sent).await; // request 3: the repeat
    let aare = c.link.receive().await.unwrap();
    assert_eq!(c.session.handle_associate_response(&aare), Ok(AssociationStep::Established));
    sim.shutdown().await;
}

#[tokio::test]
async fn an_emulated_bus_answers_at_line_speed() {
    let (sim, _, slow) = start().await;
    let began = Instant::now();
    // The only meter on that bus: a 1-byte server address is enough.
    let link = Link::hdlc(slow, 0x10, Address::Single(1)).await.unwrap();
    let ua_wire_time = Duration::from_millis(20 * 10 * 1000 / 2400);
    assert!(began.elapsed() >= ua_wire_time, "{:?}", began.elapsed());
    let mut c = Client::new(link, 0x10, &Auth::None);
    assert_eq!(c.associate().await, Ok(AssociationStep::Established));
    assert_eq!(as_u64(&c.get(70, DISCONNECT, 4, None).await.unwrap()), Some(2));
    sim.shutdown().await;
}
