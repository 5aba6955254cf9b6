//! Byte links to devices: TCP connections and serial ports, behind one type.
//!
//! A [`Port`] owns the byte stream and what has been received but not yet consumed.
//! Every read has a deadline: nothing here waits forever on a silent meter.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::LinkConfig;
use crate::meter::MeterError;

/// A bidirectional byte stream (TCP socket, serial port, pty, in-memory duplex).
pub trait ByteIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteIo for T {}

/// The largest receive backlog a port keeps. A device that chatters without ever
/// completing a frame cannot make the head-end hold more than this.
const MAX_BACKLOG: usize = 64 * 1024;
/// Room made in the receive buffer before each read: a window of seven 512-byte HDLC
/// frames, or a whole profile answer over the wrapper, in one system call.
const READ_CHUNK: usize = 8 * 1024;

/// One open link.
pub struct Port {
    io: Box<dyn ByteIo>,
    rx: Vec<u8>,
    label: String,
    /// How to open the link again after the peer closed it (none for inbound links).
    origin: Option<LinkConfig>,
    /// The stream ended or failed; only [`Port::reopen`] makes it usable again.
    closed: bool,
    /// Unique per opened stream: a driver whose association was made on another stream
    /// (before a reopen) knows it must associate again.
    id: u64,
    /// Bytes written and read since opening, for wire-time accounting.
    pub bytes_out: u64,
    /// See `bytes_out`.
    pub bytes_in: u64,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("label", &self.label).field("buffered", &self.rx.len()).finish()
    }
}

impl Port {
    /// Wrap an already open stream (an accepted inbound connection, a test pipe).
    pub fn from_io(io: impl ByteIo + 'static, label: impl Into<String>) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            io: Box::new(io),
            rx: Vec::new(),
            label: label.into(),
            origin: None,
            closed: false,
            id,
            bytes_out: 0,
            bytes_in: 0,
        }
    }

    /// Open the link a configuration describes, within its timeout.
    pub async fn open(link: &LinkConfig) -> Result<Self, MeterError> {
        let timeout = Duration::from_millis(link.timeout_ms);
        if let Some(addr) = &link.address {
            let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| MeterError::Unreachable(format!("{addr}: no connection within {} ms", link.timeout_ms)))?
                .map_err(|e| MeterError::Unreachable(format!("{addr}: {e}")))?;
            // Requests are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            let mut port = Self::from_io(stream, addr.clone());
            port.origin = Some(link.clone());
            return Ok(port);
        }
        if let Some(path) = &link.serial {
            let mut port = Self::open_serial(path, link.baud.unwrap_or(9600))?;
            port.origin = Some(link.clone());
            return Ok(port);
        }
        Err(MeterError::Unreachable(format!("link {} has no address", link.name)))
    }

    /// Open a serial device (8N1, no flow control, as meters and RS-485 adapters use).
    pub fn open_serial(path: &str, baud: u32) -> Result<Self, MeterError> {
        use tokio_serial::SerialPortBuilderExt;
        let stream = tokio_serial::new(path, baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::None)
            .stop_bits(tokio_serial::StopBits::One)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
            .map_err(|e| MeterError::Unreachable(format!("{path}: {e}")))?;
        Ok(Self::from_io(stream, path.to_owned()))
    }

    /// Open the link again (after the peer closed it). A link the peer opened (dial-in)
    /// cannot be reopened from here.
    pub async fn reopen(&mut self) -> Result<(), MeterError> {
        let Some(origin) = self.origin.clone() else {
            return Err(MeterError::LinkClosed(format!("{}: an inbound link cannot be reopened", self.label)));
        };
        *self = Self::open(&origin).await?;
        Ok(())
    }

    /// Where this port goes, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Write all of `bytes` before `deadline`.
    pub async fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), MeterError> {
        let io = &mut self.io;
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => {
                self.bytes_out += bytes.len() as u64;
                Ok(())
            }
            Ok(Err(e)) => {
                self.closed = true;
                Err(MeterError::LinkClosed(format!("{}: {e}", self.label)))
            }
            Err(_) => Err(MeterError::Timeout(0)),
        }
    }

    /// This stream's identity (changes when the link is reopened).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True when the stream has ended and must be reopened.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Read at least one more byte into the receive buffer before `deadline`: whatever
    /// the stream has ready, up to [`READ_CHUNK`] at a time, straight into the buffer.
    pub async fn fill(&mut self, deadline: Instant) -> Result<(), MeterError> {
        self.rx.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rx)).await {
            Ok(Ok(0)) => {
                self.closed = true;
                Err(MeterError::LinkClosed(format!("{}: closed by the peer", self.label)))
            }
            Ok(Ok(n)) => {
                self.bytes_in += n as u64;
                if self.rx.len() > MAX_BACKLOG {
                    // Keep the newest bytes: a frame in progress is at the end.
                    let excess = self.rx.len() - MAX_BACKLOG;
                    self.rx.drain(..excess);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.closed = true;
                Err(MeterError::LinkClosed(format!("{}: {e}", self.label)))
            }
            Err(_) => Err(MeterError::Timeout(0)),
        }
    }

    /// What has been received and not consumed.
    pub fn received(&self) -> &[u8] {
        &self.rx
    }

    /// Drop `n` bytes from the front of the receive buffer.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.rx.len());
        self.rx.drain(..n);
    }

    /// Forget everything received so far (before a new request on a half-duplex line,
    /// where anything still buffered is a stale answer or an echo).
    pub fn discard_input(&mut self) {
        self.rx.clear();
    }
}

/// A deadline `ms` from now.
pub fn deadline_in(ms: u64) -> Instant {
    let now = Instant::now();
    // A day is longer than any exchange; it also keeps an absurd configured timeout
    // from overflowing the clock.
    now.checked_add(Duration::from_millis(ms.min(86_400_000))).unwrap_or(now)
}
