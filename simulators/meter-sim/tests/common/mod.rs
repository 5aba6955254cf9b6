//! A DLMS client for the loopback tests: dlms-cosem-rs's client engine over the wrapper
//! or over HDLC (the crate's client `Connection`), on a tokio TcpStream.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use dlms_cosem_rs::acse::AuthMechanism;
use dlms_cosem_rs::axdr::DataBuf;
use dlms_cosem_rs::client::{AssociationStep, BlockCollector, ClientConfig, ClientSession, Response};
use dlms_cosem_rs::codec::Encode;
use dlms_cosem_rs::obis::Obis;
use dlms_cosem_rs::security::{
    FixedRandom, KeyRing, RustCryptoProvider, Secret, SecurityPolicy, SecuritySuite, SystemTitle,
};
use dlms_cosem_rs::transport::hdlc::{self, Address, Connection, Event, Found, Framer, Parameters, Reassembler, Role};
use dlms_cosem_rs::transport::wrapper::{StreamReassembler, Wpdu};
use dlms_cosem_rs::xdlms::{ActionResult, AttributeDescriptor, MethodDescriptor, SelectiveAccess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for an answer before failing (never reached when things work).
pub const PATIENCE: Duration = Duration::from_secs(30);

pub const CLOCK: Obis = Obis::new(0, 0, 1, 0, 0, 255);
pub const LDN: Obis = Obis::new(0, 0, 42, 0, 0, 255);
pub const IMPORT: Obis = Obis::new(1, 0, 1, 8, 0, 255);
pub const DISCONNECT: Obis = Obis::new(0, 0, 96, 3, 10, 255);
pub const PROFILE: Obis = Obis::new(1, 0, 99, 1, 0, 255);
pub const IC: Obis = Obis::new(0, 0, 43, 1, 0, 255);
pub const LOG: Obis = Obis::new(0, 0, 99, 98, 2, 255);

pub const CLIENT_TITLE: [u8; 8] = *b"TESTCL\x00\x01";

/// What the client presents.
#[derive(Clone)]
pub enum Auth {
    None,
    Lls(String),
    Hls { guek: [u8; 16], gak: [u8; 16], counter: u32 },
}

/// Any byte stream: TCP, or the master side of a pty.
pub trait ByteStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ByteStream for T {}

pub enum Link {
    Wrapper { stream: Box<dyn ByteStream>, buffered: Vec<u8>, client: u16, device: u16 },
    Hdlc { stream: Box<dyn ByteStream>, conn: Connection, framer: Framer, buffered: Vec<u8> },
}

async fn read_some(stream: &mut Box<dyn ByteStream>, into: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(PATIENCE, stream.read(&mut chunk)).await {
        Ok(Ok(0)) => Err("connection closed".into()),
        Ok(Ok(n)) => {
            into.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

impl Link {
    pub async fn wrapper(addr: SocketAddr, client: u16, device: u16) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Self::Wrapper { stream: Box::new(stream), buffered: Vec::new(), client, device }
    }

    /// Connect and open the HDLC link (SNRM/UA) to `server` as client `sap`.
    pub async fn hdlc(addr: SocketAddr, sap: u8, server: Address) -> Result<Self, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        Self::hdlc_on(stream, sap, server, Parameters::DEFAULT).await
    }

    pub async fn hdlc_on(
        stream: impl ByteStream + 'static,
        sap: u8,
        server: Address,
        params: Parameters,
    ) -> Result<Self, String> {
        let conn = Connection::new(Role::Client, Address::client(sap), server, params);
        let mut link = Self::Hdlc { stream: Box::new(stream), conn, framer: Framer::new(), buffered: Vec::new() };
        link.snrm().await?;
        Ok(link)
    }

    async fn snrm(&mut self) -> Result<(), String> {
        let Self::Hdlc { stream, conn, .. } = self else { return Err("not HDLC".into()) };
        let mut out = [0u8; 64];
        let n = conn.connect(&mut out).map_err(|e| format!("{e:?}"))?;
        stream.write_all(&out[..n]).await.map_err(|e| e.to_string())?;
        match self.next_event(&mut Vec::new()).await? {
            Event::Connected => Ok(()),
            other => Err(format!("SNRM answered with {other:?}")),
        }
    }

    /// Read frames until the connection reports something other than Idle.
    async fn next_event(&mut self, lsdu: &mut Vec<u8>) -> Result<Event, String> {
        let Self::Hdlc { stream, conn, framer, buffered } = self else { return Err("not HDLC".into()) };
        let mut storage = vec![0u8; 16384];
        let mut into = Reassembler::new(&mut storage);
        loop {
            let step = match framer.next_frame(buffered).map_err(|e| format!("{e:?}"))? {
                Found::Frame { frame, consumed } => {
                    let event = conn.handle(&frame, &mut into).map_err(|e| format!("{e:?}"))?;
                    Some((event, consumed))
                }
                Found::Incomplete { discard } => {
                    buffered.drain(..discard);
                    None
                }
            };
            match step {
                Some((event, consumed)) => {
                    let keep_flag = buffered.get(consumed - 1) == Some(&hdlc::FLAG);
                    buffered.drain(..if keep_flag { consumed - 1 } else { consumed });
                    match event {
                        Event::Idle => {}
                        Event::PollRequired => {
                            let mut out = [0u8; 64];
                            let n = conn.poll(&mut out).map_err(|e| format!("{e:?}"))?;
                            stream.write_all(&out[..n]).await.map_err(|e| e.to_string())?;
                        }
                        Event::Lsdu => {
                            *lsdu = into.lsdu().to_vec();
                            return Ok(Event::Lsdu);
                        }
                        other => return Ok(other),
                    }
                }
                None => read_some(stream, buffered).await?,
            }
        }
    }

    /// Send raw bytes on the link.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let (Self::Wrapper { stream, .. } | Self::Hdlc { stream, .. }) = self;
        stream.write_all(bytes).await.unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// One APDU out, one back.
    pub async fn exchange(&mut self, apdu: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Self::Wrapper { stream, buffered, client, device } => {
                let mut framed = Vec::new();
                Wpdu::new(*client, *device, apdu).and_then(|w| w.encode(&mut framed)).map_err(|e| format!("{e:?}"))?;
                stream.write_all(&framed).await.map_err(|e| e.to_string())?;
                let reassembler = StreamReassembler::new(8192);
                loop {
                    if let Some((wpdu, used)) = reassembler.next_pdu(buffered).map_err(|e| format!("{e:?}"))? {
                        let answer = wpdu.apdu.to_vec();
                        buffered.drain(..used);
                        return Ok(answer);
                    }
                    read_some(stream, buffered).await?;
                }
            }
            Self::Hdlc { stream, conn, .. } => {
                let mut lsdu = hdlc::LLC_REQUEST.to_vec();
                lsdu.extend_from_slice(apdu);
                let mut segmenter = conn.segmenter(&lsdu).map_err(|e| format!("{e:?}"))?;
                let mut out = vec![0u8; 2200];
                let n = conn.next_frame(&mut segmenter, &mut out).map_err(|e| format!("{e:?}"))?.unwrap_or(0);
                if !segmenter.is_done() {
                    return Err("the test client sends requests of one segment only".into());
                }
                stream.write_all(&out[..n]).await.map_err(|e| e.to_string())?;
                let mut answer = Vec::new();
                match self.next_event(&mut answer).await? {
                    Event::Lsdu => Ok(answer.get(3..).unwrap_or(&[]).to_vec()),
                    other => Err(format!("expected an answer, got {other:?}")),
                }
            }
        }
    }

    /// HDLC: send an APDU as one I-frame without waiting; returns the frame's bytes.
    pub async fn send_apdu(&mut self, apdu: &[u8]) -> Result<Vec<u8>, String> {
        let Self::Hdlc { stream, conn, .. } = self else { return Err("not HDLC".into()) };
        let mut lsdu = hdlc::LLC_REQUEST.to_vec();
        lsdu.extend_from_slice(apdu);
        let mut segmenter = conn.segmenter(&lsdu).map_err(|e| format!("{e:?}"))?;
        let mut out = vec![0u8; 2200];
        let n = conn.next_frame(&mut segmenter, &mut out).map_err(|e| format!("{e:?}"))?.unwrap_or(0);
        stream.write_all(&out[..n]).await.map_err(|e| e.to_string())?;
        Ok(out[..n].to_vec())
    }

    /// HDLC: wait for the next complete answer APDU.
    pub async fn receive(&mut self) -> Result<Vec<u8>, String> {
        let mut answer = Vec::new();
        match self.next_event(&mut answer).await? {
            Event::Lsdu => Ok(answer.get(3..).unwrap_or(&[]).to_vec()),
            other => Err(format!("expected an answer, got {other:?}")),
        }
    }

    /// Close the HDLC link with DISC; true when the meter answered UA.
    pub async fn disconnect(&mut self) -> Result<bool, String> {
        let Self::Hdlc { stream, conn, .. } = self else { return Ok(true) };
        let mut out = [0u8; 64];
        let n = conn.disconnect(&mut out).map_err(|e| format!("{e:?}"))?;
        stream.write_all(&out[..n]).await.map_err(|e| e.to_string())?;
        Ok(self.next_event(&mut Vec::new()).await? == Event::Disconnected)
    }
}

/// A DLMS client session over a link.
pub struct Client {
    pub link: Link,
    pub session: ClientSession<RustCryptoProvider<FixedRandom>>,
    request: Vec<u8>,
    plain: Vec<u8>,
}

impl Client {
    pub fn new(link: Link, sap: u8, auth: &Auth) -> Self {
        let mut config = ClientConfig { client_sap: sap, max_pdu_size: 512, ..ClientConfig::default() };
        let mut keys = KeyRing::default();
        match auth {
            Auth::None => {}
            Auth::Lls(password) => {
                config.mechanism = AuthMechanism::Low;
                config.password = Secret::new(password.as_bytes()).ok();
            }
            Auth::Hls { guek, gak, counter } => {
                config.mechanism = AuthMechanism::HighGmac;
                config.security = SecurityPolicy::authenticated_encrypted(SecuritySuite::Suite0);
                config.system_title = Some(SystemTitle::new(CLIENT_TITLE));
                config.invocation_counter = *counter;
                keys = KeyRing::new(*guek, *gak);
            }
        }
        let session = ClientSession::new(config, RustCryptoProvider::with_rng(keys, FixedRandom(0x42)));
        Self { link, session, request: vec![0u8; 2048], plain: vec![0u8; 4096] }
    }

    pub async fn associate(&mut self) -> Result<AssociationStep, String> {
        let n = self.session.associate_request(&mut self.request).map_err(|e| format!("{e:?}"))?;
        let answer = self.link.exchange(&self.request[..n]).await?;
        let step = self.session.handle_associate_response(&answer).map_err(|e| format!("{e:?}"))?;
        if step != AssociationStep::HlsReplyRequired {
            return Ok(step);
        }
        let n = self.session.hls_reply_request(&mut self.request).map_err(|e| format!("{e:?}"))?;
        let answer = self.link.exchange(&self.request[..n]).await?;
        self.session.handle_hls_reply_response(&answer).map_err(|e| format!("{e:?}"))
    }

    /// Read an attribute, following block transfer.
    pub async fn get(
        &mut self,
        class: u16,
        obis: Obis,
        attr: i8,
        sa: Option<SelectiveAccess<'_>>,
    ) -> Result<DataBuf, String> {
        let n = self
            .session
            .get_request(AttributeDescriptor::new(class, obis, attr), sa, &mut self.request)
            .map_err(|e| format!("{e:?}"))?;
        let mut answer = self.link.exchange(&self.request[..n]).await?;
        let mut storage = vec![0u8; 65536];
        let mut blocks = BlockCollector::new(&mut storage);
        loop {
            let next = match self.session.handle_response(&answer, &mut self.plain).map_err(|e| format!("{e:?}"))? {
                Response::Data(d) => return DataBuf::from_data(&d).map_err(|e| format!("{e:?}")),
                Response::DataError(e) => return Err(format!("refused: {e:?}")),
                Response::Block { last, number, data } => {
                    blocks.push(number, data).map_err(|e| format!("{e:?}"))?;
                    if last {
                        None
                    } else {
                        Some(number)
                    }
                }
                other => return Err(format!("unexpected {other:?}")),
            };
            let Some(number) = next else { break };
            let n = self.session.get_next_block_request(number, &mut self.request).map_err(|e| format!("{e:?}"))?;
            answer = self.link.exchange(&self.request[..n]).await?;
        }
        let value = blocks.value().map_err(|e| format!("{e:?}"))?;
        DataBuf::from_data(&value).map_err(|e| format!("{e:?}"))
    }

    pub async fn action(&mut self, class: u16, obis: Obis, method: i8) -> Result<ActionResult, String> {
        let param = dlms_cosem_rs::axdr::Data::Integer(0);
        let n = self
            .session
            .action_request(MethodDescriptor::new(class, obis, method), Some(param), &mut self.request)
            .map_err(|e| format!("{e:?}"))?;
        let answer = self.link.exchange(&self.request[..n]).await?;
        match self.session.handle_response(&answer, &mut self.plain).map_err(|e| format!("{e:?}"))? {
            Response::Ok => Ok(ActionResult::Success),
            Response::ActionResult { result, .. } => Ok(result),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    /// Write an attribute; the server's result.
    pub async fn set(
        &mut self,
        class: u16,
        obis: Obis,
        attr: i8,
        value: dlms_cosem_rs::axdr::Data<'_>,
    ) -> Result<(), String> {
        let n = self
            .session
            .set_request(AttributeDescriptor::new(class, obis, attr), None, value, &mut self.request)
            .map_err(|e| format!("{e:?}"))?;
        let answer = self.link.exchange(&self.request[..n]).await?;
        match self.session.handle_response(&answer, &mut self.plain).map_err(|e| format!("{e:?}"))? {
            Response::Ok => Ok(()),
            Response::DataError(e) => Err(format!("refused: {e:?}")),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    pub async fn release(&mut self) -> Result<(), String> {
        let n = self.session.release_request(&mut self.request).map_err(|e| format!("{e:?}"))?;
        let answer = self.link.exchange(&self.request[..n]).await?;
        self.session.handle_response(&answer, &mut self.plain).map(|_| ()).map_err(|e| format!("{e:?}"))
    }
}

pub fn as_u64(d: &DataBuf) -> Option<u64> {
    match d {
        DataBuf::Boolean(b) => Some(u64::from(*b)),
        DataBuf::DoubleLongUnsigned(v) => Some(u64::from(*v)),
        DataBuf::LongUnsigned(v) => Some(u64::from(*v)),
        DataBuf::Unsigned(v) | DataBuf::Enum(v) => Some(u64::from(*v)),
        _ => None,
    }
}
