//! The HDLC data link, client side (IEC 62056-46), around the crate's sans-IO
//! `hdlc::Connection`.
//!
//! What the crate leaves to us, and this module does: response timeouts and
//! retransmission, the send window (one frame per RR for window-1 meters), frames that
//! share a flag byte, and filtering by source address on a shared RS-485 bus.

use dlms_cosem_rs::codec::{Encode, SliceWriter};
use dlms_cosem_rs::transport::hdlc::{
    decode_frame, Address, Connection, Control, Event, Found, Frame, Framer, Parameters, Reassembler, Role, FLAG,
    LLC_REQUEST, LLC_RESPONSE,
};

use crate::config::HdlcOptions;
use crate::link::{deadline_in, Port};
use crate::meter::MeterError;

/// The largest APDU reassembled from segments. A meter's negotiated PDU size bounds what
/// it sends in one APDU; 64 KiB covers every PDU size the standard allows.
const MAX_LSDU: usize = 65_535 + 3;
/// The reassembly buffer is at least this large even for a small PDU size (a meter that
/// overshoots the size it was given a little is still understood).
const MIN_LSDU: usize = 8 * 1024;

/// One client-to-server HDLC link on a port (a port may carry several, one per meter on
/// a multi-drop bus; they take turns).
#[derive(Debug)]
pub struct HdlcLink {
    conn: Connection,
    local: Address,
    peer: Address,
    options: HdlcOptions,
    timeout_ms: u64,
    framer: Framer,
    lsdu: Vec<u8>,
    /// The size of `lsdu` while the link is in use.
    max_lsdu: usize,
    /// Frames thrown away because another station sent them (shared bus), counted.
    pub foreign_frames: u64,
}

impl HdlcLink {
    /// A link from client SAP `client_sap` to the server at `logical`/`physical`.
    pub fn new(client_sap: u8, logical: u16, physical: u16, options: HdlcOptions, timeout_ms: u64) -> Self {
        let local = Address::client(client_sap);
        let peer = Address::server(logical, physical);
        let proposed = Parameters {
            max_info_tx: options.max_info,
            max_info_rx: options.max_info,
            window_tx: u32::from(options.window),
            window_rx: u32::from(options.window),
        };
        Self {
            conn: Connection::new(Role::Client, local, peer, proposed),
            local,
            peer,
            options,
            timeout_ms,
            framer: Framer::new(),
            // Allocated on first use and freed when the link closes: a fleet of idle
            // drivers must not hold 64 KiB each.
            lsdu: Vec::new(),
            max_lsdu: MAX_LSDU,
            foreign_frames: 0,
        }
    }

    /// Size reassembly for the largest PDU the client accepts (its max-receive-pdu-size
    /// bounds what the meter sends): a 64 KiB buffer per meter in use is costly in a
    /// fleet, and allocating and freeing one per association more so.
    pub fn with_max_pdu(mut self, max_pdu: u16) -> Self {
        self.max_lsdu = (usize::from(max_pdu) + 3).clamp(MIN_LSDU, MAX_LSDU);
        self
    }

    /// True when SNRM/UA has opened the link.
    pub fn is_connected(&self) -> bool {
        self.conn.is_connected()
    }

    /// What SNRM/UA agreed.
    pub fn parameters(&self) -> Parameters {
        self.conn.parameters()
    }

    /// Open the link (SNRM, wait for UA), retrying an unanswered SNRM.
    pub async fn connect(&mut self, port: &mut Port) -> Result<(), MeterError> {
        self.conn.reset();
        port.discard_input();
        let mut out = [0u8; 64];
        for _attempt in 0..=self.options.retries {
            let n = self.conn.connect(&mut out).map_err(proto("SNRM"))?;
            port.send(out.get(..n).unwrap_or(&[]), deadline_in(self.timeout_ms)).await?;
            match self.await_event(port, |_| false).await {
                Ok(Event::Connected) => return Ok(()),
                Ok(Event::Disconnected) => {
                    return Err(MeterError::Refused("the meter answered SNRM with DM (disconnected mode)".into()))
                }
                Ok(_) => continue,
                Err(MeterError::Timeout(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(MeterError::Timeout(self.timeout_ms))
    }

    /// Send one APDU and return the meter's APDU (LLC headers added and removed).
    pub async fn exchange(&mut self, port: &mut Port, apdu: &[u8]) -> Result<Vec<u8>, MeterError> {
        if !self.conn.is_connected() {
            self.connect(port).await?;
        }
        let mut lsdu = Vec::with_capacity(apdu.len() + 3);
        lsdu.extend_from_slice(&LLC_REQUEST);
        lsdu.extend_from_slice(apdu);
        port.discard_input();
        self.send_lsdu(port, &lsdu).await?;
        let answer = self.receive_lsdu(port).await?;
        match answer.strip_prefix(&LLC_RESPONSE[..]) {
            Some(body) => Ok(body.to_vec()),
            None => Err(MeterError::Protocol("answer without the LLC header E6 E7 00".into())),
        }
    }

    /// Close the link (DISC). Best effort: a meter that does not answer is closed anyway.
    pub async fn disconnect(&mut self, port: &mut Port) {
        self.lsdu = Vec::new();
        if !self.conn.is_connected() {
            return;
        }
        let mut out = [0u8; 32];
        if let Ok(n) = self.conn.disconnect(&mut out) {
            if port.send(out.get(..n).unwrap_or(&[]), deadline_in(self.timeout_ms)).await.is_ok() {
                let _ = self.await_event(port, |_| false).await;
            }
        }
        self.conn.reset();
    }

    /// Forget the link state without telling the meter (after a transport failure).
    pub fn reset(&mut self) {
        self.conn.reset();
        self.lsdu = Vec::new();
    }

    /// Send an LSDU in segments, at most `window` frames before waiting for the meter's
    /// RR, the last frame of each window carrying the poll bit.
    async fn send_lsdu(&mut self, port: &mut Port, lsdu: &[u8]) -> Result<(), MeterError> {
        let window = self.conn.parameters().window_tx.clamp(1, 7) as usize;
        let mut segmenter = self.conn.segmenter(lsdu).map_err(proto("segmenting"))?;
        let mut frame_buf = vec![0u8; usize::from(self.conn.parameters().max_info_tx) + 32];
        // A window's frames go out in one write (one system call, one TCP segment through
        // a gateway), the bytes on the wire are the same.
        let mut burst: Vec<u8> = Vec::new();
        loop {
            burst.clear();
            let mut frames = 0usize;
            let mut last_at = 0usize;
            while frames < window {
                let Some(n) = self.conn.next_frame(&mut segmenter, &mut frame_buf).map_err(proto("framing"))? else {
                    break;
                };
                last_at = burst.len();
                burst.extend_from_slice(frame_buf.get(..n).unwrap_or(&[]));
                frames += 1;
            }
            let done = segmenter.is_done();
            // The crate sets the poll bit only on an APDU's last segment; a meter with a
            // window of one must be polled on every frame, or it never answers.
            if frames > 0 {
                let polled = with_poll_bit(burst.get(last_at..).unwrap_or(&[])).map_err(proto("framing"))?;
                burst.truncate(last_at);
                burst.extend_from_slice(&polled);
            }
            let mut acked = false;
            for _attempt in 0..=self.options.retries {
                port.send(&burst, deadline_in(self.timeout_ms)).await?;
                if done {
                    return Ok(());
                }
                // Mid-APDU: the meter acknowledges the window with RR before we go on.
                match self.await_event(port, |f| matches!(f.control, Control::Rr { .. })).await {
                    Ok(_) => {
                        acked = true;
                        break;
                    }
                    Err(MeterError::Timeout(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
            if !acked {
                return Err(MeterError::Timeout(self.timeout_ms));
            }
        }
    }

    /// Receive one LSDU, polling for further segments when the meter hands over the line.
    async fn receive_lsdu(&mut self, port: &mut Port) -> Result<Vec<u8>, MeterError> {
        let mut storage = std::mem::take(&mut self.lsdu);
        if storage.len() < self.max_lsdu {
            storage = vec![0u8; self.max_lsdu];
        }
        let result = self.receive_into(port, &mut storage).await;
        self.lsdu = storage;
        result
    }

    async fn receive_into(&mut self, port: &mut Port, storage: &mut [u8]) -> Result<Vec<u8>, MeterError> {
        let mut reassembler = Reassembler::new(storage);
        let mut timeouts = 0u8;
        loop {
            let deadline = deadline_in(self.timeout_ms);
            let frame_bytes = match self.next_frame_bytes(port, deadline).await {
                Ok(b) => b,
                Err(MeterError::Timeout(_)) if timeouts < self.options.retries && !reassembler.is_empty() => {
                    // A segment went missing: ask again from where we are.
                    timeouts += 1;
                    let mut out = [0u8; 32];
                    let n = self.conn.poll(&mut out).map_err(proto("RR"))?;
                    port.send(out.get(..n).unwrap_or(&[]), deadline_in(self.timeout_ms)).await?;
                    continue;
                }
                Err(MeterError::Timeout(_)) => return Err(MeterError::Timeout(self.timeout_ms)),
                Err(e) => return Err(e),
            };
            let Ok((frame, _)) = decode_frame(&frame_bytes) else { continue };
            match self.conn.handle(&frame, &mut reassembler) {
                Ok(Event::Lsdu) => return Ok(reassembler.lsdu().to_vec()),
                Ok(Event::PollRequired) => {
                    let mut out = [0u8; 32];
                    let n = self.conn.poll(&mut out).map_err(proto("RR"))?;
                    port.send(out.get(..n).unwrap_or(&[]), deadline_in(self.timeout_ms)).await?;
                }
                Ok(Event::Disconnected) => {
                    return Err(MeterError::LinkClosed("the meter left normal response mode (DM/FRMR)".into()))
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn.reset();
                    return Err(MeterError::Protocol(format!("HDLC: {e}")));
                }
            }
        }
    }

    /// Wait for a frame that `accept` picks (or that changes the link state).
    async fn await_event(&mut self, port: &mut Port, accept: impl Fn(&Frame<'_>) -> bool) -> Result<Event, MeterError> {
        let deadline = deadline_in(self.timeout_ms);
        let mut scratch = [0u8; 256];
        loop {
            let bytes = self.next_frame_bytes(port, deadline).await?;
            let Ok((frame, _)) = decode_frame(&bytes) else { continue };
            if accept(&frame) {
                return Ok(Event::Idle);
            }
            let mut r = Reassembler::new(&mut scratch);
            match self.conn.handle(&frame, &mut r) {
                Ok(ev @ (Event::Connected | Event::Disconnected)) => return Ok(ev),
                Ok(_) => {}
                Err(e) => return Err(MeterError::Protocol(format!("HDLC: {e}"))),
            }
        }
    }

    /// The next checksum-valid frame from this link's peer to this client, as bytes.
    async fn next_frame_bytes(
        &mut self,
        port: &mut Port,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<u8>, MeterError> {
        loop {
            let found = extract_frame(&mut self.framer, port.received());
            match found {
                Extracted::Frame { bytes, drain } => {
                    port.consume(drain);
                    if let Ok((frame, _)) = decode_frame(&bytes) {
                        // On a shared bus every station's frames reach us, including the
                        // echo of our own request on some half-duplex adapters.
                        if frame.source == self.peer && frame.destination == self.local {
                            return Ok(bytes);
                        }
                        self.foreign_frames += 1;
                    }
                }
                Extracted::Need { discard } => {
                    port.consume(discard);
                    port.fill(deadline).await.map_err(|e| match e {
                        MeterError::Timeout(_) => MeterError::Timeout(self.timeout_ms),
                        other => other,
                    })?;
                }
            }
        }
    }
}

/// What the frame finder made of a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Extracted {
    /// A checksum-valid frame, and how many bytes to drop from the buffer.
    Frame {
        /// The frame, flags included.
        bytes: Vec<u8>,
        /// Bytes to drop. One less than consumed when the closing flag may open the next
        /// frame (`7E f1 7E f2 7E`): the crate's finder would otherwise lose `f2`.
        drain: usize,
    },
    /// No complete frame; drop `discard` bytes of noise and read more.
    Need {
        /// Bytes certainly not part of any frame.
        discard: usize,
    },
}

/// Find the next frame in `buf`.
pub fn extract_frame(framer: &mut Framer, buf: &[u8]) -> Extracted {
    match framer.next_frame(buf) {
        Ok(Found::Frame { frame, consumed }) => {
            let len = frame.encoded_len();
            let start = consumed.saturating_sub(len);
            let bytes = buf.get(start..consumed).unwrap_or(&[]).to_vec();
            let shares_flag = consumed > 0 && buf.get(consumed - 1) == Some(&FLAG) && buf.get(consumed) != Some(&FLAG);
            let drain = if shares_flag { consumed - 1 } else { consumed };
            Extracted::Frame { bytes, drain }
        }
        Ok(Found::Incomplete { discard }) => Extracted::Need { discard },
        // The finder documents no error today; treat one as noise to resynchronise past.
        Err(_) => Extracted::Need { discard: 1.min(buf.len()) },
    }
}

/// Re-encode an I-frame with its poll bit set.
fn with_poll_bit(frame_bytes: &[u8]) -> dlms_cosem_rs::Result<Vec<u8>> {
    let (mut frame, _) = decode_frame(frame_bytes)?;
    if let Control::I { ns, nr, .. } = frame.control {
        frame.control = Control::I { ns, nr, pf: true };
    }
    let mut out = vec![0u8; frame.encoded_len()];
    let mut w = SliceWriter::new(&mut out);
    frame.encode(&mut w)?;
    let n = w.as_slice().len();
    out.truncate(n);
    Ok(out)
}

fn proto(what: &'static str) -> impl Fn(dlms_cosem_rs::Error) -> MeterError {
    move |e| MeterError::Protocol(format!("HDLC {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Address, src: Address, control: Control, info: &[u8]) -> Vec<u8> {
        let f = Frame { segmented: false, destination: dst, source: src, control, information: info };
        let mut out = vec![0u8; f.encoded_len()];
        let mut w = SliceWriter::new(&mut out);
        f.encode(&mut w).expect("encodes");
        out
    }

    #[test]
    fn frames_sharing_one_flag_are_both_found() {
        let a = frame(Address::client(16), Address::server(1, 17), Control::Ua, &[]);
        let b = frame(Address::client(16), Address::server(1, 18), Control::Ua, &[]);
        // 7E a.. 7E b.. 7E: the closing flag of `a` opens `b`.
        let mut stream = a.clone();
        stream.extend_from_slice(b.get(1..).unwrap_or(&[]));
        let mut framer = Framer::new();
        let Extracted::Frame { bytes, drain } = extract_frame(&mut framer, &stream) else { panic!("first") };
        assert_eq!(bytes, a);
        let rest = stream.get(drain..).unwrap_or(&[]);
        let Extracted::Frame { bytes, .. } = extract_frame(&mut framer, rest) else { panic!("second") };
        assert_eq!(bytes, b);
    }

    #[test]
    fn noise_is_discarded_and_the_frame_behind_it_found() {
        let a = frame(Address::client(16), Address::server(1, 17), Control::Ua, &[]);
        let mut stream = vec![0x00, 0x7E, 0xA0, 0x55, 0x13];
        stream.extend_from_slice(&a);
        let mut framer = Framer::new();
        let Extracted::Frame { bytes, .. } = extract_frame(&mut framer, &stream) else { panic!("frame") };
        assert_eq!(bytes, a);
    }

    #[test]
    fn the_poll_bit_is_set_on_request() {
        let f = frame(Address::server(1, 17), Address::client(16), Control::I { ns: 3, nr: 2, pf: false }, &[1, 2]);
        let polled = with_poll_bit(&f).expect("re-encodes");
        let (decoded, _) = decode_frame(&polled).expect("valid");
        assert_eq!(decoded.control, Control::I { ns: 3, nr: 2, pf: true });
        assert_eq!(decoded.information, &[1, 2]);
    }
}
