//! The IEC 62056-47 wrapper over TCP: an 8-byte header (version 1, source wPort,
//! destination wPort, length) in front of each APDU.

use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::transport::wrapper::{Header, StreamReassembler, Wpdu, VERSION};

use crate::link::{deadline_in, Port};
use crate::meter::MeterError;

/// The largest APDU accepted from a meter; a larger announced length is garbage.
const MAX_APDU: u16 = 65_000;

/// One client-to-logical-device conversation on a wrapper connection.
#[derive(Debug, Clone, Copy)]
pub struct WrapperLink {
    /// Our wPort (the client SAP).
    pub client: u16,
    /// The logical device's wPort.
    pub server: u16,
    /// Time allowed for an answer.
    pub timeout_ms: u64,
    /// PDUs from other logical devices or for other clients, dropped.
    pub foreign_pdus: u64,
}

impl WrapperLink {
    /// A conversation from `client` to `server`.
    pub fn new(client: u16, server: u16, timeout_ms: u64) -> Self {
        Self { client, server, timeout_ms, foreign_pdus: 0 }
    }

    /// Send an APDU and wait for this logical device's answer to this client.
    pub async fn exchange(&mut self, port: &mut Port, apdu: &[u8]) -> Result<Vec<u8>, MeterError> {
        let mut framed = Vec::with_capacity(apdu.len() + Header::LEN);
        Wpdu::new(self.client, self.server, apdu)
            .and_then(|w| w.encode(&mut framed))
            .map_err(|e| MeterError::Protocol(format!("wrapper: {e}")))?;
        port.send(&framed, deadline_in(self.timeout_ms)).await?;
        let deadline = deadline_in(self.timeout_ms);
        loop {
            match next_wpdu(port.received()) {
                Next::Pdu { source, destination, apdu, used } => {
                    port.consume(used);
                    if source == self.server && destination == self.client {
                        return Ok(apdu);
                    }
                    self.foreign_pdus += 1;
                }
                Next::Garbage { skip } => port.consume(skip),
                Next::NeedMore => port.fill(deadline).await.map_err(|e| match e {
                    MeterError::Timeout(_) => MeterError::Timeout(self.timeout_ms),
                    other => other,
                })?,
            }
        }
    }
}

/// What the front of a receive buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A complete PDU.
    Pdu {
        /// Source wPort.
        source: u16,
        /// Destination wPort.
        destination: u16,
        /// The APDU.
        apdu: Vec<u8>,
        /// Bytes it occupied.
        used: usize,
    },
    /// Not a header: skip to the next place a header (version 0x0001) could start.
    Garbage {
        /// Bytes to drop.
        skip: usize,
    },
    /// Wait for more bytes.
    NeedMore,
}

/// Find the next PDU, resynchronising past bytes that cannot start a header instead of
/// dropping the connection.
pub fn next_wpdu(buf: &[u8]) -> Next {
    match StreamReassembler::new(MAX_APDU).next_pdu(buf) {
        Ok(Some((pdu, used))) => {
            Next::Pdu { source: pdu.header.source, destination: pdu.header.destination, apdu: pdu.apdu.to_vec(), used }
        }
        Ok(None) => Next::NeedMore,
        Err(_) => {
            let version = VERSION.to_be_bytes();
            let skip =
                buf.windows(2).skip(1).position(|w| w == version).map_or(buf.len().saturating_sub(1).max(1), |p| p + 1);
            Next::Garbage { skip }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wpdu(src: u16, dst: u16, apdu: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        Wpdu::new(src, dst, apdu).and_then(|w| w.encode(&mut v)).expect("encodes");
        v
    }

    #[test]
    fn garbage_before_a_pdu_is_skipped() {
        let mut buf = vec![0xFF, 0x13, 0x00];
        buf.extend(wpdu(1, 16, &[0xC4, 0x01]));
        let mut at = 0;
        loop {
            match next_wpdu(buf.get(at..).unwrap_or(&[])) {
                Next::Garbage { skip } => at += skip,
                Next::Pdu { source, apdu, .. } => {
                    assert_eq!((source, apdu), (1, vec![0xC4, 0x01]));
                    break;
                }
                Next::NeedMore => panic!("the PDU is complete"),
            }
        }
    }

    #[test]
    fn an_absurd_length_is_garbage_not_a_wait() {
        let buf = [0x00, 0x01, 0x00, 0x01, 0x00, 0x10, 0xFF, 0xFF];
        assert!(matches!(next_wpdu(&buf), Next::Garbage { .. }));
    }
}
