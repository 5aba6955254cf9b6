//! Modbus RTU on a serial line (RS-485 bus): framing, CRC, and the serial driver.
//!
//! tokio-modbus's RTU server stops at the first undecodable frame and cannot be told to
//! corrupt a CRC, so the framing is ours; the register map is the same
//! [`ModbusService`] the TCP side uses.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_modbus::{ExceptionCode, Request, Response};

use crate::meter::Fleet;
use crate::modbus::{ModbusService, Routing};
use crate::net;

/// CRC-16/MODBUS, sent low byte first.
#[must_use]
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for b in data {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc
}

/// What the start of a receive buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Not enough bytes yet.
    Incomplete,
    /// Garbage: drop this many bytes and look again.
    Skip(usize),
    /// A frame with a valid CRC, `len` bytes long.
    Frame { unit: u8, request: Result<Request<'static>, (u8, ExceptionCode)>, len: usize },
}

fn word(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b.get(at).copied().unwrap_or(0), b.get(at + 1).copied().unwrap_or(0)])
}

/// Find the request frame at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let (Some(&unit), Some(&function)) = (buf.first(), buf.get(1)) else {
        return Parsed::Incomplete;
    };
    let len = match function {
        1..=6 => 8,
        15 | 16 => match buf.get(6) {
            Some(&count) => 9 + usize::from(count),
            None => return Parsed::Incomplete,
        },
        _ => {
            // An unknown function has no known length: accept the first length whose CRC
            // checks, so it can be refused with "illegal function".
            return match (4..=buf.len().min(256)).find(|&n| crc_ok(&buf[..n])) {
                Some(len) => Parsed::Frame { unit, request: Err((function, ExceptionCode::IllegalFunction)), len },
                None if buf.len() >= 256 => Parsed::Skip(1),
                None => Parsed::Incomplete,
            };
        }
    };
    let Some(frame) = buf.get(..len) else { return Parsed::Incomplete };
    if !crc_ok(frame) {
        return Parsed::Skip(1);
    }
    let (a, q) = (word(frame, 2), word(frame, 4));
    let bad = |code| Err((function, code));
    let request = match function {
        1 => Ok(Request::ReadCoils(a, q)),
        2 => Ok(Request::ReadDiscreteInputs(a, q)),
        3 => Ok(Request::ReadHoldingRegisters(a, q)),
        4 => Ok(Request::ReadInputRegisters(a, q)),
        5 => match q {
            0xFF00 => Ok(Request::WriteSingleCoil(a, true)),
            0x0000 => Ok(Request::WriteSingleCoil(a, false)),
            _ => bad(ExceptionCode::IllegalDataValue),
        },
        6 => Ok(Request::WriteSingleRegister(a, q)),
        15 => {
            let data = frame.get(7..len - 2).unwrap_or(&[]);
            if q == 0 || data.len() != usize::from(q).div_ceil(8) {
                bad(ExceptionCode::IllegalDataValue)
            } else {
                let bits = (0..usize::from(q)).map(|i| data.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1));
                Ok(Request::WriteMultipleCoils(a, Cow::Owned(bits.collect())))
            }
        }
        _ => {
            let data = frame.get(7..len - 2).unwrap_or(&[]);
            if q == 0 || data.len() != usize::from(q) * 2 {
                bad(ExceptionCode::IllegalDataValue)
            } else {
                let words = data.chunks(2).map(|c| word(c, 0));
                Ok(Request::WriteMultipleRegisters(a, Cow::Owned(words.collect())))
            }
        }
    };
    Parsed::Frame { unit, request, len }
}

fn crc_ok(frame: &[u8]) -> bool {
    let Some(split) = frame.len().checked_sub(2) else { return false };
    let (body, crc) = frame.split_at(split);
    crc16(body).to_le_bytes() == [crc[0], crc[1]]
}

fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, bit) in bits.iter().enumerate() {
        if *bit {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// Encode an answer as an RTU frame.
pub(crate) fn encode(unit: u8, function: u8, answer: &Result<Response, ExceptionCode>) -> Vec<u8> {
    let mut out = vec![unit];
    let registers = |out: &mut Vec<u8>, fc: u8, words: &[u16]| {
        out.push(fc);
        out.push(u8::try_from(words.len() * 2).unwrap_or(0));
        words.iter().for_each(|w| out.extend_from_slice(&w.to_be_bytes()));
    };
    match answer {
        Ok(Response::ReadCoils(bits)) | Ok(Response::ReadDiscreteInputs(bits)) => {
            let packed = pack_bits(bits);
            out.push(function);
            out.push(u8::try_from(packed.len()).unwrap_or(0));
            out.extend_from_slice(&packed);
        }
        Ok(Response::ReadHoldingRegisters(words)) => registers(&mut out, 3, words),
        Ok(Response::ReadInputRegisters(words)) => registers(&mut out, 4, words),
        Ok(Response::WriteSingleCoil(a, on)) => {
            out.push(5);
            out.extend_from_slice(&a.to_be_bytes());
            out.extend_from_slice(if *on { &[0xFF, 0x00] } else { &[0x00, 0x00] });
        }
        Ok(Response::WriteSingleRegister(a, v)) => {
            out.push(6);
            out.extend_from_slice(&a.to_be_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
        Ok(Response::WriteMultipleCoils(a, q)) | Ok(Response::WriteMultipleRegisters(a, q)) => {
            out.push(function);
            out.extend_from_slice(&a.to_be_bytes());
            out.extend_from_slice(&q.to_be_bytes());
        }
        Ok(_) | Err(_) => {
            let code = answer.as_ref().err().map_or(u8::from(ExceptionCode::ServerDeviceFailure), |c| u8::from(*c));
            out.push(function | 0x80);
            out.push(code);
        }
    }
    let crc = crc16(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Drive one serial stream until it fails.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, service: ModbusService, baud: u32) {
    // 3.5 character times end a frame; a pty or USB adapter delivers in bursts, so never
    // less than 50 ms.
    let gap = Duration::from_micros((35_000_000 / u64::from(baud.max(1))).max(50_000));
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1024];
    loop {
        let read = if buffer.is_empty() {
            Ok(stream.read(&mut chunk).await)
        } else {
            tokio::time::timeout(gap, stream.read(&mut chunk)).await
        };
        match read {
            Err(_) => {
                // Silence in the middle of a frame: whatever was buffered was noise.
                buffer.clear();
                continue;
            }
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => buffer.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
        }
        loop {
            match parse(&buffer) {
                Parsed::Incomplete => break,
                Parsed::Skip(n) => {
                    buffer.drain(..n.min(buffer.len()));
                }
                Parsed::Frame { unit, request, len } => {
                    buffer.drain(..len.min(buffer.len()));
                    let function = buffer_function(&request);
                    let (answer, delay_ms) = match &request {
                        _ if unit == 0 => continue, // broadcasts are not answered, nor acted on
                        Ok(req) => service.serve(unit, req),
                        Err((_, code)) => (Err(*code), 0),
                    };
                    let answer = match answer {
                        Ok(None) => continue,
                        Ok(Some(resp)) => Ok(resp),
                        Err(code) => Err(code),
                    };
                    let mut bytes = encode(unit, function, &answer);
                    if service.corrupt.swap(false, Ordering::SeqCst) {
                        if let Some(last) = bytes.last_mut() {
                            *last ^= 0xFF;
                        }
                    }
                    net::delay(u64::from(delay_ms)).await;
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn buffer_function(request: &Result<Request<'static>, (u8, ExceptionCode)>) -> u8 {
    match request {
        Ok(r) => r.function_code().value(),
        Err((f, _)) => *f,
    }
}

/// Serve a Modbus RTU bus on a serial device until shutdown, reopening it after errors.
pub(crate) async fn serve_serial(
    first: tokio_serial::SerialStream,
    path: String,
    baud: u32,
    fleet: Arc<Fleet>,
    meters: Vec<usize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = ModbusService::new(fleet, &meters, Routing::Bus);
    let mut port = Some(first);
    loop {
        if let Some(stream) = port.take() {
            tokio::select! {
                () = net::stopped(&mut shutdown) => return,
                () = run(stream, service.clone(), baud) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_framing() {
        // The classic example: read 10 holding registers of unit 1.
        let frame = [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD];
        assert_eq!(crc16(&frame[..6]).to_le_bytes(), [0xC5, 0xCD]);
        assert_eq!(parse(&frame), Parsed::Frame { unit: 1, request: Ok(Request::ReadHoldingRegisters(0, 10)), len: 8 });
        for cut in 0..frame.len() {
            assert_eq!(parse(&frame[..cut]), Parsed::Incomplete);
        }
        let mut bad = frame;
        bad[7] ^= 1;
        assert_eq!(parse(&bad), Parsed::Skip(1));
    }

    #[test]
    fn writes_and_unknown_functions() {
        let mut frame = vec![0x02, 0x10, 0x03, 0x00, 0x00, 0x02, 0x04, 0x07, 0xE8, 0x00, 0x06];
        let crc = crc16(&frame).to_le_bytes();
        frame.extend_from_slice(&crc);
        let Parsed::Frame { request: Ok(Request::WriteMultipleRegisters(768, words)), .. } = parse(&frame) else {
            panic!("a write of two registers")
        };
        assert_eq!(words.as_ref(), &[2024, 6]);
        let mut odd = vec![0x02, 0x2B, 0x0E, 0x01];
        let crc = crc16(&odd).to_le_bytes();
        odd.extend_from_slice(&crc);
        assert!(matches!(parse(&odd), Parsed::Frame { request: Err((0x2B, ExceptionCode::IllegalFunction)), .. }));
        let answer = encode(2, 0x2B, &Err(ExceptionCode::IllegalFunction));
        assert_eq!(&answer[..3], &[0x02, 0xAB, 0x01]);
        assert!(crc_ok(&answer));
        let coils = encode(2, 1, &Ok(Response::ReadCoils(vec![true, false, true])));
        assert_eq!(&coils[..4], &[0x02, 0x01, 0x01, 0b101]);
    }
}
