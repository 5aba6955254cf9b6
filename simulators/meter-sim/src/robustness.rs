//! Random and mutated input against every parser a client can reach: nothing panics, and
//! a valid request afterwards still gets its answer.

use std::sync::Arc;

use dlms_cosem_rs::client::{AssociationStep, ClientConfig, ClientSession, Response};
use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::obis::Obis;
use dlms_cosem_rs::security::{FixedRandom, KeyRing, RustCryptoProvider};
use dlms_cosem_rs::transport::hdlc::{self, Address, Connection, Event, Found, Framer, Parameters, Reassembler, Role};
use dlms_cosem_rs::transport::wrapper::{StreamReassembler, Wpdu};
use dlms_cosem_rs::xdlms::AttributeDescriptor;

use crate::clock::ManualClock;
use crate::config::{MeterSpec, SimAuth};
use crate::control_api::{parse_request, Api, Parsed};
use crate::hdlc::{BusTable, HdlcBus};
use crate::meter::tests_support::fleet;
use crate::meter::Fleet;
use crate::net::Step;
use crate::wrapper::WrapperLink;

/// xorshift64*: small, seeded, good enough to shake parsers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.below(max)).map(|_| self.next() as u8).collect()
    }

    /// `seed` damaged: bytes flipped, cut short, spliced with noise.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(4) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                1 => v.truncate(self.below(v.len() + 1)),
                2 => {
                    let at = self.below(v.len() + 1);
                    let noise = self.bytes(8);
                    v.splice(at..at, noise);
                }
                _ if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = self.next() as u8;
                }
                _ => {}
            }
        }
        v
    }
}

fn test_fleet() -> Arc<Fleet> {
    let specs = vec![
        MeterSpec { physical_address: 16, logical_device: 1, ..MeterSpec::dlms("A", 0) },
        MeterSpec {
            physical_address: 300,
            logical_device: 2,
            auth: SimAuth::HlsGmac { guek: [1; 16], gak: [2; 16] },
            ..MeterSpec::dlms("B", 1)
        },
        MeterSpec {
            physical_address: 17,
            logical_device: 3,
            auth: SimAuth::Lls { password: "pw".into() },
            ..MeterSpec::dlms("C", 2)
        },
    ];
    Arc::new(fleet(specs, Arc::new(ManualClock::new(1_717_225_200_000))))
}

fn session() -> ClientSession<RustCryptoProvider<FixedRandom>> {
    let config = ClientConfig { client_sap: 0x10, max_pdu_size: 512, ..ClientConfig::default() };
    ClientSession::new(config, RustCryptoProvider::with_rng(KeyRing::default(), FixedRandom(1)))
}

const LDN: Obis = Obis::new(0, 0, 42, 0, 0, 255);

fn wrap(apdu: &[u8], device: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = Wpdu::new(0x10, device, apdu).and_then(|w| w.encode(&mut out));
    out
}

/// Associate and read the logical device name of meter "A" over a wrapper link.
fn wrapper_works(link: &mut WrapperLink) -> bool {
    let mut s = session();
    let mut req = [0u8; 512];
    let mut plain = [0u8; 1024];
    let exchange = |link: &mut WrapperLink, apdu: &[u8]| -> Option<Vec<u8>> {
        link.push(&wrap(apdu, 1));
        match link.next_answer() {
            Step::Answer { bytes, .. } => {
                let (w, _) = StreamReassembler::new(4096).next_pdu(&bytes).ok()??;
                Some(w.apdu.to_vec())
            }
            _ => None,
        }
    };
    let Ok(n) = s.associate_request(&mut req) else { return false };
    let Some(aare) = exchange(link, &req[..n]) else { return false };
    if s.handle_associate_response(&aare) != Ok(AssociationStep::Established) {
        return false;
    }
    let Ok(n) = s.get_request(AttributeDescriptor::new(1, LDN, 2), None, &mut req) else { return false };
    let Some(answer) = exchange(link, &req[..n]) else { return false };
    matches!(s.handle_response(&answer, &mut plain), Ok(Response::Data(d)) if d.as_bytes() == Some(b"A"))
}

#[test]
fn random_bytes_on_the_wrapper_path() {
    let fleet = test_fleet();
    let routes = Arc::new([(1u16, 0usize), (2, 1), (3, 2)].into_iter().collect());
    let mut rng = Rng(0x5EED_0001);
    let mut s = session();
    let mut req = [0u8; 512];
    let aarq = s.associate_request(&mut req).map(|n| req[..n].to_vec()).unwrap_or_default();
    let seeds = [wrap(&aarq, 1), wrap(&aarq, 2), wrap(&[0xC0, 0x01, 0xC1, 0, 1, 0, 0, 42, 0, 0, 255, 2, 0], 1)];
    let mut link = WrapperLink::new(Arc::clone(&fleet), Arc::clone(&routes));
    for i in 0..4000 {
        let pick = rng.below(seeds.len());
        let input = if i % 3 == 0 { rng.bytes(300) } else { rng.mutate(&seeds[pick]) };
        link.push(&input);
        loop {
            match link.next_answer() {
                Step::Idle => break,
                // A broken stream is closed; the client reconnects.
                Step::Close => {
                    link = WrapperLink::new(Arc::clone(&fleet), Arc::clone(&routes));
                    break;
                }
                Step::Silent | Step::Answer { .. } => {}
            }
        }
        if i % 500 == 0 {
            let mut fresh = WrapperLink::new(Arc::clone(&fleet), Arc::clone(&routes));
            assert!(wrapper_works(&mut fresh), "iteration {i}");
        }
    }
    assert!(wrapper_works(&mut WrapperLink::new(fleet, routes)));
}

/// SNRM, AARQ and a GET of meter "A" (physical 16) on an HDLC bus, the client side played
/// by the crate's client `Connection`.
fn hdlc_works(bus: &mut HdlcBus) -> bool {
    let mut conn = Connection::new(Role::Client, Address::client(0x10), Address::server(1, 16), Parameters::DEFAULT);
    let mut out = [0u8; 2200];
    let mut storage = vec![0u8; 8192];
    let mut feed = |bus: &mut HdlcBus, conn: &mut Connection, bytes: &[u8]| -> Option<(Event, Vec<u8>)> {
        bus.push(bytes);
        let Step::Answer { bytes, .. } = bus.next_answer() else { return None };
        let mut framer = Framer::new();
        let mut into = Reassembler::new(&mut storage);
        let mut rest = &bytes[..];
        loop {
            let Found::Frame { frame, consumed } = framer.next_frame(rest).ok()? else { return None };
            match conn.handle(&frame, &mut into).ok()? {
                Event::Idle => rest = rest.get(consumed..)?,
                Event::Lsdu => return Some((Event::Lsdu, into.lsdu().get(3..)?.to_vec())),
                other => return Some((other, Vec::new())),
            }
        }
    };
    let Ok(n) = conn.connect(&mut out) else { return false };
    if feed(bus, &mut conn, &out[..n]).map(|e| e.0) != Some(Event::Connected) {
        return false;
    }
    let mut s = session();
    let mut req = [0u8; 512];
    let mut plain = [0u8; 1024];
    let mut apdu_exchange = |bus: &mut HdlcBus, conn: &mut Connection, apdu: &[u8]| -> Option<Vec<u8>> {
        let mut lsdu = hdlc::LLC_REQUEST.to_vec();
        lsdu.extend_from_slice(apdu);
        let mut seg = conn.segmenter(&lsdu).ok()?;
        let n = conn.next_frame(&mut seg, &mut out).ok()??;
        feed(bus, conn, &out[..n]).map(|e| e.1)
    };
    let Ok(n) = s.associate_request(&mut req) else { return false };
    let Some(aare) = apdu_exchange(bus, &mut conn, &req[..n]) else { return false };
    if s.handle_associate_response(&aare) != Ok(AssociationStep::Established) {
        return false;
    }
    let Ok(n) = s.get_request(AttributeDescriptor::new(1, LDN, 2), None, &mut req) else { return false };
    let Some(answer) = apdu_exchange(bus, &mut conn, &req[..n]) else { return false };
    matches!(s.handle_response(&answer, &mut plain), Ok(Response::Data(d)) if d.as_bytes() == Some(b"A"))
}

fn hdlc_frame(dest: Address, control: hdlc::Control, info: &[u8]) -> Vec<u8> {
    let frame =
        hdlc::Frame { segmented: false, destination: dest, source: Address::client(0x10), control, information: info };
    let mut out = Vec::new();
    let _ = frame.encode(&mut out);
    out
}

#[test]
fn random_bytes_on_the_hdlc_path() {
    let fleet = test_fleet();
    let table = Arc::new(BusTable::new(&fleet, &[0, 1, 2]));
    let mut rng = Rng(0x5EED_0002);
    let mut s = session();
    let mut req = [0u8; 512];
    let aarq = s.associate_request(&mut req).map(|n| req[..n].to_vec()).unwrap_or_default();
    let mut lsdu = hdlc::LLC_REQUEST.to_vec();
    lsdu.extend_from_slice(&aarq);
    let seeds = [
        hdlc_frame(Address::server(1, 16), hdlc::Control::Snrm, &[]),
        hdlc_frame(
            Address::server(2, 300),
            hdlc::Control::Snrm,
            &[0x81, 0x80, 0x06, 0x05, 0x01, 0x40, 0x07, 0x01, 0x07],
        ),
        hdlc_frame(Address::server(1, 16), hdlc::Control::I { ns: 0, nr: 0, pf: true }, &lsdu),
        hdlc_frame(Address::server(3, 17), hdlc::Control::Rr { nr: 1, pf: true }, &[]),
        hdlc_frame(Address::server(1, 16), hdlc::Control::Disc, &[]),
    ];
    let mut bus = HdlcBus::new(Arc::clone(&fleet), Arc::clone(&table));
    for i in 0..6000 {
        let pick = rng.below(seeds.len());
        let input = match i % 4 {
            0 => rng.bytes(200),
            1 => seeds[pick].clone(),
            _ => rng.mutate(&seeds[pick]),
        };
        bus.push(&input);
        while bus.next_answer() != Step::Idle {}
        if i % 600 == 0 {
            // The same bus, after all that noise: a flag ends whatever half-frame is
            // pending, as the quiet time before a real request would.
            bus.push(&[hdlc::FLAG; 3]);
            while bus.next_answer() != Step::Idle {}
            assert!(hdlc_works(&mut bus), "iteration {i}");
        }
    }
    assert!(hdlc_works(&mut bus));
}

#[test]
fn random_bytes_on_the_control_api_and_the_modbus_rtu_parser() {
    let fleet = test_fleet();
    let api = Api { fleet, endpoints: Vec::new() };
    let mut rng = Rng(0x5EED_0003);
    let seeds: [&[u8]; 4] = [
        b"GET /meters HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /meters/A/faults HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"offline\": true,  }",
        b"POST /meters/A/button HTTP/1.1\r\n\r\n",
        b"GET /meters/%41?limit=1 HTTP/1.1\r\n\r\n",
    ];
    for i in 0..5000 {
        let pick = rng.below(seeds.len());
        let input = if i % 3 == 0 { rng.bytes(200) } else { rng.mutate(seeds[pick]) };
        if let Parsed::Request(req) = parse_request(&input) {
            let (status, body) = api.route(&req);
            assert!(matches!(status, 200 | 400 | 404 | 405), "{status}");
            assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
        }
        let rtu = rng.mutate(&[3, 3, 0, 0, 0, 6, 0xC5, 0xEA]);
        let _ = crate::modbus_rtu::parse(&rtu);
    }
    let Parsed::Request(req) = parse_request(b"GET /meters/A HTTP/1.1\r\n\r\n") else { panic!("valid request") };
    assert_eq!(api.route(&req).0, 200);
}

/// The largest answer (six days of load profile, block transfer) on a thread with a
/// quarter of tokio's default 2 MiB worker stack, in a debug build: the margin the
/// server's `N`-sized stack buffers leave.
#[test]
fn the_largest_answer_fits_a_quarter_of_a_worker_stack() {
    let worker = std::thread::Builder::new().stack_size(512 * 1024).spawn(|| {
        let fleet = test_fleet();
        let routes = Arc::new([(1u16, 0usize)].into_iter().collect());
        let mut link = WrapperLink::new(fleet, routes);
        let mut s = session();
        let mut req = [0u8; 512];
        let n = s.associate_request(&mut req).unwrap_or(0);
        link.push(&wrap(&req[..n], 1));
        let Step::Answer { bytes, .. } = link.next_answer() else { return false };
        if s.handle_associate_response(bytes.get(8..).unwrap_or(&[])) != Ok(AssociationStep::Established) {
            return false;
        }
        let mut params = [0u8; 64];
        let selection = dlms_cosem_rs::cosem::EntryDescriptor::entries(1, 576).to_selective_access(&mut params).ok();
        let profile = Obis::new(1, 0, 99, 1, 0, 255);
        let n = s.get_request(AttributeDescriptor::new(7, profile, 2), selection, &mut req).unwrap_or(0);
        link.push(&wrap(&req[..n], 1));
        let Step::Answer { bytes, .. } = link.next_answer() else { return false };
        // get-response-with-datablock: the value did not fit one APDU and was blocked.
        bytes.get(8..10) == Some(&[0xC4, 0x02][..])
    });
    assert_eq!(worker.ok().map(std::thread::JoinHandle::join).and_then(Result::ok), Some(true));
}
