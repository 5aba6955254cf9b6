//! DLMS over HDLC (IEC 62056-46) on one byte stream shared by several meters: a
//! transparent TCP gateway, a concentrator, or a serial RS-485 bus.
//!
//! The crate's `Framer` finds frames and `Frame`/`Parameters` encode them; the secondary
//! station logic is ours, because the crate's `Connection` neither enforces windows nor
//! retransmits, and a simulated meter must do both: answers are segmented by the
//! negotiated information length, sent `window_tx` frames at a time, continued on RR,
//! rewound when an RR says frames were lost, and re-sent when the client repeats an
//! I-frame whose answer it never got.
//!
//! Addressing: the lower (physical) address selects the meter on the bus, the upper must
//! be its logical device. A frame for another physical address gets silence (another
//! station on the bus); an unknown client SAP or logical device gets DM. A bad FCS gets
//! silence (the framer drops it), as on a real meter.

use std::collections::HashMap;
use std::sync::Arc;

use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::transport::hdlc::{
    Address, Control, Found, Frame, Framer, Parameters, FLAG, LLC_REQUEST, LLC_RESPONSE,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};

use crate::dlms::Association;
use crate::meter::{Fleet, Verdict};
use crate::net::{self, Step};

/// What the simulated meters propose in UA; the client's SNRM can only lower it.
const PROPOSED: Parameters = Parameters { max_info_tx: 512, max_info_rx: 512, window_tx: 7, window_rx: 7 };
/// A request LSDU larger than this is nonsense from a client.
const MAX_LSDU: usize = 8192;
/// Bytes kept waiting for a frame to complete; a frame is at most 2049 bytes.
const MAX_BUFFER: usize = 16384;

/// Which meters are on the bus, by physical address.
pub(crate) struct BusTable {
    by_physical: HashMap<u16, usize>,
    /// The meter, when the bus has only one: it may be addressed with a 1-byte address.
    single: Option<usize>,
}

impl BusTable {
    pub(crate) fn new(fleet: &Fleet, meters: &[usize]) -> Self {
        let by_physical: HashMap<u16, usize> =
            meters.iter().filter_map(|&i| fleet.meters.get(i).map(|m| (m.spec.physical_address, i))).collect();
        let single = if meters.len() == 1 { meters.first().copied() } else { None };
        Self { by_physical, single }
    }
}

/// A frame copied out of the receive buffer.
struct Received {
    segmented: bool,
    destination: Address,
    source: Address,
    control: Control,
    information: Vec<u8>,
}

/// Where a frame is going.
enum Route {
    /// Not for any meter here: silence.
    Elsewhere,
    /// For a meter here that has no such logical device or client: DM.
    Refuse,
    /// For meter `meter`, from client `sap`.
    Meter { meter: usize, sap: u8 },
}

/// The secondary station of one (meter, client) pair.
struct Link {
    local: Address,
    peer: Address,
    connected: bool,
    ns: u8,
    nr: u8,
    params: Parameters,
    rx: Vec<u8>,
    rx_unacked: u32,
    /// The answer being sent, as information fields.
    tx: Vec<Vec<u8>>,
    tx_next: usize,
    window_start: usize,
    window_len: usize,
    window_base_ns: u8,
    /// What was last sent, for a client that repeats its I-frame.
    last_sent: Vec<u8>,
    association: Option<Association>,
}

impl Link {
    fn new(local: Address, peer: Address) -> Self {
        Self {
            local,
            peer,
            connected: false,
            ns: 0,
            nr: 0,
            params: Parameters::DEFAULT,
            rx: Vec::new(),
            rx_unacked: 0,
            tx: Vec::new(),
            tx_next: 0,
            window_start: 0,
            window_len: 0,
            window_base_ns: 0,
            last_sent: Vec::new(),
            association: None,
        }
    }

    fn control(&self, control: Control, information: &[u8]) -> Vec<u8> {
        let frame = Frame { segmented: false, destination: self.peer, source: self.local, control, information };
        let mut out = Vec::with_capacity(frame.encoded_len());
        // Encoding into a Vec only fails for an over-long information field, which the
        // segmentation below never produces.
        let _ = frame.encode(&mut out);
        out
    }

    fn rr(&self) -> Vec<u8> {
        self.control(Control::Rr { nr: self.nr, pf: true }, &[])
    }

    /// Send the next window of the pending answer.
    fn send_window(&mut self) -> Vec<u8> {
        let end = self.tx.len().min(self.tx_next + self.params.window_tx.max(1) as usize);
        self.window_start = self.tx_next;
        self.window_len = end.saturating_sub(self.tx_next);
        self.window_base_ns = self.ns;
        let mut out = Vec::new();
        for i in self.tx_next..end {
            let information = self.tx.get(i).map_or(&[][..], Vec::as_slice);
            let frame = Frame {
                segmented: i + 1 < self.tx.len(),
                destination: self.peer,
                source: self.local,
                // The final bit hands the line back: on the last frame of the window.
                control: Control::I { ns: self.ns, nr: self.nr, pf: i + 1 == end },
                information,
            };
            let _ = frame.encode(&mut out);
            self.ns = (self.ns + 1) % 8;
        }
        self.tx_next = end;
        out
    }

    fn on_frame(&mut self, fleet: &Arc<Fleet>, meter: usize, sap: u8, f: &Received) -> Vec<u8> {
        match f.control {
            Control::Snrm => {
                let peer = Parameters::decode(&f.information).unwrap_or_default();
                let mut params = PROPOSED.negotiate(peer);
                // A peer claiming zero-length fields or a zero window would deadlock.
                params.max_info_tx = params.max_info_tx.max(32);
                params.window_tx = params.window_tx.max(1);
                params.window_rx = params.window_rx.max(1);
                *self = Self::new(f.destination, f.source);
                self.params = params;
                self.connected = true;
                let mut info = Vec::new();
                let _ = params.encode(&mut info);
                self.control(Control::Ua, &info)
            }
            Control::Disc => {
                let was = self.connected;
                *self = Self::new(f.destination, f.source);
                self.control(if was { Control::Ua } else { Control::Dm }, &[])
            }
            Control::I { ns, .. } => self.on_information(fleet, meter, sap, ns, f),
            Control::Rr { nr, pf } => {
                if self.connected && self.window_len > 0 {
                    let acked = usize::from((nr + 8 - self.window_base_ns) % 8);
                    if acked < self.window_len {
                        // Frames of the last window were lost: go back to the first one
                        // the client does not have.
                        self.tx_next = self.window_start + acked;
                        self.ns = nr;
                    }
                    if self.tx_next < self.tx.len() {
                        return self.send_window();
                    }
                }
                if pf && self.connected {
                    self.rr()
                } else {
                    Vec::new()
                }
            }
            // Nothing to say to these from the secondary's side.
            _ => Vec::new(),
        }
    }

    fn on_information(&mut self, fleet: &Arc<Fleet>, meter: usize, sap: u8, ns: u8, f: &Received) -> Vec<u8> {
        if !self.connected {
            return self.control(Control::Dm, &[]);
        }
        if ns == (self.nr + 7) % 8 && !self.last_sent.is_empty() {
            // A repeat: the client did not get our answer. Send it again.
            return self.last_sent.clone();
        }
        if ns != self.nr {
            // Out of sequence: tell the client which frame we expect.
            return self.rr();
        }
        self.nr = (self.nr + 1) % 8;
        // Whatever was still going out is abandoned: the client has moved on.
        self.tx.clear();
        self.tx_next = 0;
        self.window_len = 0;
        if self.rx.len() + f.information.len() > MAX_LSDU {
            self.rx.clear();
            return self.control(Control::Frmr, &[]);
        }
        self.rx.extend_from_slice(&f.information);
        self.rx_unacked += 1;
        let polled = matches!(f.control, Control::I { pf: true, .. });
        if f.segmented {
            if polled || self.rx_unacked >= self.params.window_rx.max(1) {
                self.rx_unacked = 0;
                return self.rr();
            }
            return Vec::new();
        }
        self.rx_unacked = 0;
        let lsdu = std::mem::take(&mut self.rx);
        let Some(apdu) = lsdu.strip_prefix(&LLC_REQUEST[..]) else {
            return self.rr();
        };
        if self.association.is_none() {
            self.association = Association::new(fleet, meter, u16::from(sap));
        }
        let Some(answer) = self.association.as_mut().and_then(|a| a.handle(apdu)) else {
            return self.rr();
        };
        let mut lsdu = Vec::with_capacity(answer.len() + 3);
        lsdu.extend_from_slice(&LLC_RESPONSE);
        lsdu.extend_from_slice(&answer);
        self.tx = lsdu.chunks(usize::from(self.params.max_info_tx.max(32))).map(<[u8]>::to_vec).collect();
        self.tx_next = 0;
        self.send_window()
    }
}

/// All HDLC traffic on one byte stream: the sans-I/O part, fed arbitrary bytes in tests.
pub(crate) struct HdlcBus {
    fleet: Arc<Fleet>,
    table: Arc<BusTable>,
    framer: Framer,
    buffer: Vec<u8>,
    links: HashMap<(usize, u8), Link>,
}

impl HdlcBus {
    pub(crate) fn new(fleet: Arc<Fleet>, table: Arc<BusTable>) -> Self {
        Self { fleet, table, framer: Framer::new(), buffer: Vec::new(), links: HashMap::new() }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() > MAX_BUFFER {
            // Only noise can make this happen: keep the tail, where a frame may start.
            let cut = self.buffer.len() - MAX_BUFFER / 2;
            self.buffer.drain(..cut);
        }
    }

    /// Consume the next frame, if a whole one is buffered, and say what to answer.
    pub(crate) fn next_answer(&mut self) -> Step {
        let (received, consumed) = match self.framer.next_frame(&self.buffer) {
            Ok(Found::Frame { frame, consumed }) => (
                Received {
                    segmented: frame.segmented,
                    destination: frame.destination,
                    source: frame.source,
                    control: frame.control,
                    information: frame.information.to_vec(),
                },
                consumed,
            ),
            Ok(Found::Incomplete { discard }) => {
                self.buffer.drain(..discard.min(self.buffer.len()));
                return Step::Idle;
            }
            Err(_) => {
                self.buffer.clear();
                return Step::Idle;
            }
        };
        // Frames may share one flag (`7E f1 7E f2 7E`): keep the closing flag so it can
        // open the next frame; the framer otherwise loses every second frame.
        let keep_flag = consumed > 1 && self.buffer.get(consumed - 1) == Some(&FLAG);
        self.buffer.drain(..if keep_flag { consumed - 1 } else { consumed.min(self.buffer.len()) });
        self.answer(&received)
    }

    fn route(&self, f: &Received) -> Route {
        let (logical, physical) = match f.destination {
            Address::Double { upper, lower } => (u16::from(upper), Some(u16::from(lower))),
            Address::Quad { upper, lower } => (upper, Some(lower)),
            Address::Single(v) => (u16::from(v), None),
        };
        let meter = match physical {
            Some(p) => self.table.by_physical.get(&p).copied(),
            None => self.table.single,
        };
        let Some(meter) = meter else { return Route::Elsewhere };
        let Address::Single(sap) = f.source else {
            // Clients have 1-byte addresses; anything else is our own echo or another
            // server's answer on the bus.
            return Route::Elsewhere;
        };
        let Some(m) = self.fleet.meters.get(meter) else { return Route::Elsewhere };
        if m.spec.logical_device != logical {
            // With a 1-byte address there is no physical part to be sure it is for us.
            return if physical.is_some() { Route::Refuse } else { Route::Elsewhere };
        }
        if !matches!(u16::from(sap), crate::dlms::PUBLIC_SAP | crate::dlms::MANAGEMENT_SAP) {
            return Route::Refuse;
        }
        Route::Meter { meter, sap }
    }

    fn answer(&mut self, f: &Received) -> Step {
        let (meter, sap) = match self.route(f) {
            Route::Elsewhere => return Step::Silent,
            Route::Refuse => {
                let dm = Frame::control_only(f.source, f.destination, Control::Dm);
                let mut bytes = Vec::new();
                let _ = dm.encode(&mut bytes);
                return Step::Answer { bytes, delay_ms: 0 };
            }
            Route::Meter { meter, sap } => (meter, sap),
        };
        let Some(m) = self.fleet.meters.get(meter) else { return Step::Silent };
        let verdict = m.admit(&self.fleet);
        if verdict == Verdict::Offline {
            return Step::Silent;
        }
        let link = self.links.entry((meter, sap)).or_insert_with(|| Link::new(f.destination, f.source));
        let mut bytes = link.on_frame(&self.fleet, meter, sap, f);
        if !bytes.is_empty() {
            link.last_sent.clone_from(&bytes);
        }
        let Verdict::Answer { corrupt, delay_ms } = verdict else { return Step::Silent };
        if bytes.is_empty() {
            return Step::Silent;
        }
        if corrupt {
            corrupt_first_fcs(&mut bytes);
        }
        Step::Answer { bytes, delay_ms }
    }
}

/// An emulated bus behind a concentrator: one request at a time, at `baud`.
pub(crate) struct BusLine {
    baud: u32,
    busy: Mutex<()>,
}

/// Serve an HDLC gateway on `listener` until shutdown.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    fleet: Arc<Fleet>,
    meters: Vec<usize>,
    baud: Option<u32>,
    shutdown: watch::Receiver<bool>,
) {
    let table = Arc::new(BusTable::new(&fleet, &meters));
    let line = baud.filter(|b| *b > 0).map(|baud| Arc::new(BusLine { baud, busy: Mutex::new(()) }));
    net::accept_loop(listener, shutdown, move |stream| {
        run(stream, HdlcBus::new(Arc::clone(&fleet), Arc::clone(&table)), line.clone())
    })
    .await;
}

/// Serve an HDLC bus on a serial device until shutdown, reopening it after errors.
pub(crate) async fn serve_serial(
    first: tokio_serial::SerialStream,
    path: String,
    baud: u32,
    fleet: Arc<Fleet>,
    meters: Vec<usize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let table = Arc::new(BusTable::new(&fleet, &meters));
    let mut port = Some(first);
    loop {
        if let Some(stream) = port.take() {
            tokio::select! {
                () = net::stopped(&mut shutdown) => return,
                () = run(stream, HdlcBus::new(Arc::clone(&fleet), Arc::clone(&table)), None) => {}
            }
            tracing::warn!(%path, "serial device closed; reopening");
        }
        tokio::select! {
            () = net::stopped(&mut shutdown) => return,
            () = net::delay(1000) => {}
        }
        port = crate::sim::open_serial(&path, baud).ok();
    }
}

/// Drive one byte stream until it closes.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut bus: HdlcBus,
    line: Option<Arc<BusLine>>,
) {
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(l) = &line {
            // The request crosses the bus too, before the meter can hear it.
            let _guard = l.busy.lock().await;
            tokio::time::sleep(std::time::Duration::from_micros(n as u64 * 10_000_000 / u64::from(l.baud))).await;
        }
        bus.push(chunk.get(..n).unwrap_or(&[]));
        loop {
            // On an emulated bus the whole exchange holds the line, across connections.
            let _guard = match &line {
                Some(l) => Some(l.busy.lock().await),
                None => None,
            };
            match bus.next_answer() {
                Step::Idle => break,
                Step::Close => return,
                Step::Silent => {}
                Step::Answer { bytes, delay_ms } => {
                    let wire_us = line.as_ref().map_or(0, |l| bytes.len() as u64 * 10_000_000 / u64::from(l.baud));
                    net::delay(u64::from(delay_ms)).await;
                    if wire_us > 0 {
                        tokio::time::sleep(std::time::Duration::from_micros(wire_us)).await;
                    }
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Flip a bit of the first frame's FCS: the client must drop it as line noise.
fn corrupt_first_fcs(bytes: &mut [u8]) {
    let len = bytes.get(1..3).map(|f| usize::from(u16::from_be_bytes([f[0], f[1]]) & 0x07FF)).unwrap_or(0);
    // The FCS is the two bytes before the closing flag at 1 + len.
    if let Some(b) = bytes.get_mut(len.saturating_sub(1)) {
        *b ^= 0x01;
    }
}
