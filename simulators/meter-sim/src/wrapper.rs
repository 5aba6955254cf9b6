//! DLMS over TCP with the wrapper (IEC 62056-47): eight bytes of header per APDU.
//!
//! One listener fronts any number of logical devices, addressed by destination wPort (the
//! meter's `logical_device`); the source wPort is the client SAP. A WPDU for an unknown
//! wPort or SAP is dropped silently, like a real device; a malformed header closes the
//! connection, since the byte stream can no longer be trusted.

use std::collections::HashMap;
use std::sync::Arc;

use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::transport::wrapper::{StreamReassembler, Wpdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dlms::Association;
use crate::meter::{Fleet, Verdict};
use crate::net::{self, Step};

/// The largest APDU the reassembler takes; anything larger is a broken stream.
const MAX_WRAPPED_APDU: u16 = 4096;

/// Route table: destination wPort to meter index.
pub(crate) type Routes = Arc<HashMap<u16, usize>>;

/// Serve `listener` until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    fleet: Arc<Fleet>,
    meters: Vec<usize>,
    shutdown: watch::Receiver<bool>,
) {
    let routes: Routes =
        Arc::new(meters.iter().filter_map(|&i| fleet.meters.get(i).map(|m| (m.spec.logical_device, i))).collect());
    net::accept_loop(listener, shutdown, move |stream| connection(stream, Arc::clone(&fleet), Arc::clone(&routes)))
        .await;
}

/// One client connection: any byte stream carrying WPDUs.
pub(crate) async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, fleet: Arc<Fleet>, routes: Routes) {
    let mut link = WrapperLink::new(fleet, routes);
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        link.push(chunk.get(..n).unwrap_or(&[]));
        loop {
            match link.next_answer() {
                Step::Idle => break,
                Step::Close => return,
                Step::Silent => {}
                Step::Answer { bytes, delay_ms } => {
                    net::delay(u64::from(delay_ms)).await;
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The sans-I/O part of a wrapper connection, so it can be fed arbitrary bytes in tests.
pub(crate) struct WrapperLink {
    fleet: Arc<Fleet>,
    routes: Routes,
    buffer: Vec<u8>,
    sessions: HashMap<(usize, u16), Association>,
}

impl WrapperLink {
    pub(crate) fn new(fleet: Arc<Fleet>, routes: Routes) -> Self {
        Self { fleet, routes, buffer: Vec::new(), sessions: HashMap::new() }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    pub(crate) fn next_answer(&mut self) -> Step {
        let reassembler = StreamReassembler::new(MAX_WRAPPED_APDU);
        let (header, apdu, used) = match reassembler.next_pdu(&self.buffer) {
            Ok(None) => return Step::Idle,
            Err(_) => return Step::Close,
            Ok(Some((wpdu, used))) => (wpdu.header, wpdu.apdu.to_vec(), used),
        };
        self.buffer.drain(..used);
        let (client, device) = (header.source, header.destination);
        let Some(&meter) = self.routes.get(&device) else {
            return Step::Silent;
        };
        let session = match self.sessions.entry((meter, client)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match Association::new(&self.fleet, meter, client) {
                Some(a) => e.insert(a),
                None => return Step::Silent,
            },
        };
        let Some(m) = self.fleet.meters.get(meter) else {
            return Step::Silent;
        };
        let verdict = m.admit(&self.fleet);
        if verdict == Verdict::Offline {
            return Step::Silent;
        }
        let Some(reply) = session.handle(&apdu) else {
            return Step::Silent;
        };
        let Verdict::Answer { corrupt, delay_ms } = verdict else {
            return Step::Silent;
        };
        let mut bytes = Vec::with_capacity(reply.len() + 8);
        if Wpdu::new(device, client, &reply).and_then(|w| w.encode(&mut bytes)).is_err() {
            return Step::Silent;
        }
        if corrupt {
            // TCP has no checksum to break: an invalid wrapper version is the detectable
            // corruption a client can act on.
            if let Some(b) = bytes.get_mut(1) {
                *b ^= 0xFF;
            }
        }
        Step::Answer { bytes, delay_ms }
    }
}
