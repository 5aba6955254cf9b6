//! Links the device opens: concentrators and cellular meters behind NAT dial in to the
//! head-end. The listener accepts such a connection, identifies the device by reading
//! its logical device name over the public client, and hands over the open link.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::{AuthKind, HdlcOptions};
use crate::dlms::counter::CounterStore;
use crate::dlms::{DlmsMeter, DlmsSettings};
use crate::link::Port;
use crate::meter::{MeterError, MeterId};

/// How a dialling-in device is spoken to until it is identified.
#[derive(Debug, Clone, Copy)]
pub enum DialInTransport {
    /// The wrapper, to this logical device.
    Wrapper {
        /// wPort of the device's management logical device (usually 1).
        logical_device: u16,
    },
    /// HDLC, to this server address.
    Hdlc {
        /// Upper address.
        logical_device: u16,
        /// Lower address.
        physical_address: u16,
    },
}

/// An identified inbound link.
#[derive(Debug)]
pub struct DialIn {
    /// The logical device name the device gave.
    pub identity: String,
    /// Who connected.
    pub peer: SocketAddr,
    /// The open link, ready for the device's channel.
    pub port: Port,
}

/// Accepts and identifies inbound device links.
#[derive(Debug)]
pub struct InboundListener {
    listener: TcpListener,
    transport: DialInTransport,
    timeout_ms: u64,
}

impl InboundListener {
    /// Listen on `addr` (use port 0 in tests).
    pub async fn bind(addr: &str, transport: DialInTransport, timeout_ms: u64) -> std::io::Result<Self> {
        Ok(Self { listener: TcpListener::bind(addr).await?, transport, timeout_ms })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept the next connection and identify the device on it. An error concerns that
    /// one connection only (it is dropped); the listener goes on.
    pub async fn accept(&self) -> Result<DialIn, MeterError> {
        let (stream, peer) =
            self.listener.accept().await.map_err(|e| MeterError::LinkClosed(format!("accept: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut port = Port::from_io(stream, format!("dial-in {peer}"));
        let (logical_device, physical_address) = match self.transport {
            DialInTransport::Wrapper { logical_device } => (logical_device, None),
            DialInTransport::Hdlc { logical_device, physical_address } => (logical_device, Some(physical_address)),
        };
        let settings = DlmsSettings {
            // The public client needs no counter; this id only labels log lines.
            meter: MeterId::new("dial-in").map_err(|e| MeterError::Protocol(e.to_string()))?,
            client_sap: 0x10,
            logical_device,
            physical_address,
            auth: AuthKind::None,
            keys: None,
            timeout_ms: self.timeout_ms,
            hdlc: HdlcOptions::default(),
            utc_offset_minutes: None,
            max_pdu_size: 1024,
        };
        let mut probe = DlmsMeter::new(settings, CounterStore::new(std::env::temp_dir()));
        let identity = probe.read_identity(&mut port).await;
        // Release the public association so the device's own channel starts clean.
        probe.close(&mut port).await;
        let identity = identity?.name;
        tracing::info!(%peer, %identity, "device dialled in");
        Ok(DialIn { identity, peer, port })
    }
}
