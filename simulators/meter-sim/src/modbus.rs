//! Modbus meters: meter-sim's register map behind a tokio-modbus `Service`, and the Modbus
//! TCP listener (a single meter, or a gateway addressed by unit id).
//!
//! | table | address | meaning |
//! |---|---|---|
//! | holding (and input) registers | 0-5 | serial number, ASCII, 2 chars per register, high byte first |
//! | | 256-257 | import energy, u32, high word first, unit 10 Wh |
//! | | 258-259 | export energy, same |
//! | | 768-773 | clock, local time: year, month, day, hour, minute, second (writable as a block) |
//! | coil | 0 | relay command: write 1 = connect, 0 = disconnect |
//! | discrete input | 0 | relay closed |

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::clock::{civil, unix_from_local};
use crate::control::{Refused, Trigger};
use crate::meter::{Activity, Fleet, Meter, Verdict};
use crate::net;

/// How requests find their meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routing {
    /// A Modbus TCP meter: its own unit id, 0 and 255 all reach it.
    Device(usize),
    /// A TCP-to-RTU gateway: by unit id; an unknown one is exception 0x0B.
    Gateway,
    /// An RTU bus: by unit id; an unknown one (or a broadcast) gets silence.
    Bus,
}

/// The register map of the meters on one endpoint.
#[derive(Clone)]
pub(crate) struct ModbusService {
    fleet: Arc<Fleet>,
    units: Arc<HashMap<u8, usize>>,
    routing: Routing,
    /// Set to make the transport corrupt the next answer.
    pub(crate) corrupt: Arc<AtomicBool>,
}

type Answer = Result<Option<Response>, ExceptionCode>;

impl ModbusService {
    pub(crate) fn new(fleet: Arc<Fleet>, meters: &[usize], routing: Routing) -> Self {
        let units = meters.iter().filter_map(|&i| fleet.meters.get(i).map(|m| (m.spec.unit_id, i))).collect();
        Self { fleet, units: Arc::new(units), routing, corrupt: Arc::new(AtomicBool::new(false)) }
    }

    fn resolve(&self, unit: u8) -> Option<usize> {
        match self.routing {
            Routing::Device(i) => {
                let own = self.fleet.meters.get(i).map(|m| m.spec.unit_id);
                (unit == 0 || unit == 255 || Some(unit) == own).then_some(i)
            }
            Routing::Gateway | Routing::Bus => self.units.get(&unit).copied(),
        }
    }

    /// Serve one request: `(answer, delay_ms)`, where `Ok(None)` is silence.
    pub(crate) fn serve(&self, unit: u8, request: &Request<'_>) -> (Answer, u32) {
        let Some(meter) = self.resolve(unit).and_then(|i| self.fleet.meters.get(i)) else {
            let answer = if self.routing == Routing::Bus { Ok(None) } else { Err(ExceptionCode::GatewayTargetDevice) };
            return (answer, 0);
        };
        let verdict = meter.admit(&self.fleet);
        if verdict == Verdict::Offline {
            return (Ok(None), 0);
        }
        let result = execute(&self.fleet, meter, request);
        match verdict {
            Verdict::Answer { corrupt, delay_ms } => {
                if corrupt {
                    self.corrupt.store(true, Ordering::SeqCst);
                }
                (result.map(Some), delay_ms)
            }
            Verdict::Offline | Verdict::Lost => (Ok(None), 0),
        }
    }
}

impl tokio_modbus::server::Service for ModbusService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let (answer, delay_ms) = self.serve(req.slave, &req.request);
        Box::pin(async move {
            net::delay(u64::from(delay_ms)).await;
            answer
        })
    }
}

/// The holding/input register at `address`, if the map defines one.
fn register(fleet: &Fleet, meter: &Meter, address: u16) -> Option<u16> {
    let now = fleet.now_ms();
    let word = |v: u64, high: bool| {
        let v = (v / 10) as u32; // units of 10 Wh, wrapping like a 32-bit register
        if high {
            (v >> 16) as u16
        } else {
            v as u16
        }
    };
    match address {
        0..=5 => {
            let id = meter.spec.id.as_bytes();
            let at = usize::from(address) * 2;
            let byte = |i: usize| id.get(i).copied().unwrap_or(b' ');
            Some(u16::from_be_bytes([byte(at), byte(at + 1)]))
        }
        256 | 257 => Some(word(meter.energy(fleet).import_wh(now), address == 256)),
        258 | 259 => Some(word(meter.energy(fleet).export_wh(now), address == 258)),
        768..=773 => {
            let c = civil(meter.meter_ms(now).div_euclid(1000), fleet.utc_offset_min);
            let fields = [
                c.year.clamp(0, 65535) as u16,
                c.month.into(),
                c.day.into(),
                c.hour.into(),
                c.minute.into(),
                c.second.into(),
            ];
            fields.get(usize::from(address - 768)).copied()
        }
        _ => None,
    }
}

fn read_registers(fleet: &Fleet, meter: &Meter, address: u16, quantity: u16) -> Result<Vec<u16>, ExceptionCode> {
    if quantity == 0 || quantity > 125 {
        return Err(ExceptionCode::IllegalDataValue);
    }
    (0..quantity)
        .map(|k| {
            address.checked_add(k).and_then(|a| register(fleet, meter, a)).ok_or(ExceptionCode::IllegalDataAddress)
        })
        .collect()
}

fn read_bit(meter: &Meter, address: u16, quantity: u16) -> Result<Vec<bool>, ExceptionCode> {
    if quantity == 0 || quantity > 2000 {
        return Err(ExceptionCode::IllegalDataValue);
    }
    if address != 0 || quantity != 1 {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(vec![meter.lock().control.relay_closed()])
}

fn switch(fleet: &Fleet, meter: &Meter, on: bool) -> Result<(), ExceptionCode> {
    let trigger = if on { Trigger::DirectConnect } else { Trigger::DirectDisconnect };
    match meter.trigger(fleet, trigger) {
        Ok(_) => Ok(()),
        // Mode 0 has no switchable disconnector.
        Err(Refused::ModeZero) => Err(ExceptionCode::IllegalFunction),
    }
}

fn set_clock(fleet: &Fleet, meter: &Meter, v: &[u16]) -> Result<(), ExceptionCode> {
    let small = |x: u16| u8::try_from(x).map_err(|_| ExceptionCode::IllegalDataValue);
    let (y, mo, d, h, mi, s) = (i32::from(v[0]), small(v[1])?, small(v[2])?, small(v[3])?, small(v[4])?, small(v[5])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 59 {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let unix = unix_from_local(y, mo, d, h, mi, s, fleet.utc_offset_min);
    meter.set_clock(fleet, unix.saturating_mul(1000));
    Ok(())
}

/// Carry out one request against one meter (register map above).
pub(crate) fn execute(fleet: &Fleet, meter: &Meter, request: &Request<'_>) -> Result<Response, ExceptionCode> {
    let read = |function: u8, address: u16, quantity: u16| {
        meter.record(fleet, Activity::ModbusRead { function, address, quantity });
    };
    let write = |function: u8, address: u16| meter.record(fleet, Activity::ModbusWrite { function, address });
    match request {
        Request::ReadHoldingRegisters(a, q) => {
            read(3, *a, *q);
            read_registers(fleet, meter, *a, *q).map(Response::ReadHoldingRegisters)
        }
        Request::ReadInputRegisters(a, q) => {
            read(4, *a, *q);
            read_registers(fleet, meter, *a, *q).map(Response::ReadInputRegisters)
        }
        Request::ReadCoils(a, q) => {
            read(1, *a, *q);
            read_bit(meter, *a, *q).map(Response::ReadCoils)
        }
        Request::ReadDiscreteInputs(a, q) => {
            read(2, *a, *q);
            read_bit(meter, *a, *q).map(Response::ReadDiscreteInputs)
        }
        Request::WriteSingleCoil(a, on) => {
            write(5, *a);
            if *a != 0 {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            switch(fleet, meter, *on).map(|()| Response::WriteSingleCoil(*a, *on))
        }
        Request::WriteMultipleCoils(a, bits) => {
            write(15, *a);
            match (*a, bits.as_ref()) {
                (0, [on]) => switch(fleet, meter, *on).map(|()| Response::WriteMultipleCoils(0, 1)),
                (_, []) => Err(ExceptionCode::IllegalDataValue),
                _ => Err(ExceptionCode::IllegalDataAddress),
            }
        }
        Request::WriteMultipleRegisters(a, words) => {
            write(16, *a);
            if *a != 768 || words.len() != 6 {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            set_clock(fleet, meter, words).map(|()| Response::WriteMultipleRegisters(768, 6))
        }
        Request::WriteSingleRegister(a, _) => {
            write(6, *a);
            Err(ExceptionCode::IllegalDataAddress)
        }
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

/// Serve Modbus TCP on `listener` until shutdown.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    fleet: Arc<Fleet>,
    meters: Vec<usize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let routing = match meters.as_slice() {
        [only] => Routing::Device(*only),
        _ => Routing::Gateway,
    };
    let service = ModbusService::new(fleet, &meters, routing);
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let on_connected = move |stream: TcpStream, _peer| {
        let _ = stream.set_nodelay(true);
        // One service per connection, so a corruption lands on that connection's answer.
        let service = ModbusService { corrupt: Arc::new(AtomicBool::new(false)), ..service.clone() };
        let transport = Corrupting { inner: stream, flag: Arc::clone(&service.corrupt), pending: false };
        async move { Ok(Some((service, transport))) }
    };
    loop {
        tokio::select! {
            () = net::stopped(&mut shutdown) => return,
            result = server.serve(&on_connected, |e| tracing::debug!(error = %e, "modbus connection ended")) => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "modbus accept failed");
                    net::delay(50).await;
                }
            }
        }
    }
}

/// A TCP stream that garbles the protocol identifier of one answer when told to: Modbus
/// TCP has no checksum, and that is the corruption a client detects.
struct Corrupting {
    inner: TcpStream,
    flag: Arc<AtomicBool>,
    pending: bool,
}

impl AsyncRead for Corrupting {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Corrupting {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.flag.swap(false, Ordering::SeqCst) {
            this.pending = true;
        }
        if this.pending && buf.len() > 2 {
            let mut garbled = buf.to_vec();
            garbled[2] ^= 0xFF;
            let result = Pin::new(&mut this.inner).poll_write(cx, &garbled);
            if let Poll::Ready(Ok(_)) = result {
                this.pending = false;
            }
            return result;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
