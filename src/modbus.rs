//! The Modbus meter driver on `tokio-modbus`: TCP, RTU on serial, and RTU devices
//! behind a TCP gateway by unit id. Register maps come from device profiles in
//! configuration, because Modbus meters have no standard map.

use std::time::Duration;

use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::{LinkConfig, LinkProtocol, ModbusProfile, RegisterTable, ValueRegister, ValueType, WordOrder};
use crate::dlms::cosem;
use crate::meter::{Identity, MeterClock, MeterError, MeterId, Reading, RelayState, RelayStatus};

/// One Modbus link (a TCP connection or a serial port), shared by the unit ids behind it.
pub struct ModbusPort {
    ctx: Option<Context>,
    link: LinkConfig,
    /// After a timeout or transport error the framing state is unknown (a late answer
    /// would be taken for the next one), so the link is reopened before the next call.
    broken: bool,
}

impl std::fmt::Debug for ModbusPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusPort").field("link", &self.link.name).field("broken", &self.broken).finish()
    }
}

impl ModbusPort {
    /// Open the link.
    pub async fn open(link: &LinkConfig) -> Result<Self, MeterError> {
        let mut port = Self { ctx: None, link: link.clone(), broken: true };
        port.reopen().await?;
        Ok(port)
    }

    async fn reopen(&mut self) -> Result<(), MeterError> {
        self.ctx = None;
        let timeout = Duration::from_millis(self.link.timeout_ms);
        let ctx = match (&self.link.address, &self.link.serial) {
            (Some(addr), _) => {
                let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr.as_str()))
                    .await
                    .map_err(|_| {
                        MeterError::Unreachable(format!("{addr}: no connection within {} ms", self.link.timeout_ms))
                    })?
                    .map_err(|e| MeterError::Unreachable(format!("{addr}: {e}")))?;
                let _ = stream.set_nodelay(true);
                if self.link.protocol == LinkProtocol::ModbusRtu {
                    // RTU framing over a transparent TCP-to-serial converter.
                    tokio_modbus::client::rtu::attach(stream)
                } else {
                    tokio_modbus::client::tcp::attach(stream)
                }
            }
            (None, Some(path)) => {
                use tokio_serial::SerialPortBuilderExt;
                let stream = tokio_serial::new(path, self.link.baud.unwrap_or(9600))
                    .open_native_async()
                    .map_err(|e| MeterError::Unreachable(format!("{path}: {e}")))?;
                tokio_modbus::client::rtu::attach(stream)
            }
            (None, None) => return Err(MeterError::Unreachable(format!("link {} has no address", self.link.name))),
        };
        self.ctx = Some(ctx);
        self.broken = false;
        Ok(())
    }

    async fn ctx(&mut self, unit: u8) -> Result<&mut Context, MeterError> {
        if self.broken || self.ctx.is_none() {
            self.reopen().await?;
        }
        let ctx = self.ctx.as_mut().ok_or_else(|| MeterError::Unreachable(self.link.name.clone()))?;
        ctx.set_slave(Slave(unit));
        Ok(ctx)
    }

    fn settle<T>(
        &mut self,
        r: Result<tokio_modbus::Result<T>, tokio::time::error::Elapsed>,
        what: &str,
    ) -> Result<T, MeterError> {
        match r {
            Ok(Ok(Ok(v))) => Ok(v),
            // Busy, or a gateway whose device behind it did not answer: a passing
            // condition, retried like a timeout rather than ending the command.
            Ok(Ok(Err(code))) if is_transient(code) => {
                Err(MeterError::Unreachable(format!("{what}: Modbus exception {}: {code}", u8::from(code))))
            }
            Ok(Ok(Err(code))) => {
                Err(MeterError::Refused(format!("{what}: Modbus exception {}: {code}", u8::from(code))))
            }
            Ok(Err(e)) => {
                self.broken = true;
                Err(match e {
                    tokio_modbus::Error::Transport(io) => MeterError::LinkClosed(format!("{}: {io}", self.link.name)),
                    other => MeterError::Protocol(format!("{what}: {other}")),
                })
            }
            Err(_) => {
                self.broken = true;
                Err(MeterError::Timeout(self.link.timeout_ms))
            }
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.link.timeout_ms)
    }

    /// Read registers from a table.
    pub async fn read_registers(
        &mut self,
        unit: u8,
        table: RegisterTable,
        addr: u16,
        count: u16,
    ) -> Result<Vec<u16>, MeterError> {
        let t = self.timeout();
        let ctx = self.ctx(unit).await?;
        let r = match table {
            RegisterTable::Holding => tokio::time::timeout(t, ctx.read_holding_registers(addr, count)).await,
            RegisterTable::Input => tokio::time::timeout(t, ctx.read_input_registers(addr, count)).await,
        };
        let words = self.settle(r, &format!("read {count} register(s) at {addr}"))?;
        if words.len() != usize::from(count) {
            return Err(MeterError::Protocol(format!("asked {count} registers at {addr}, got {}", words.len())));
        }
        Ok(words)
    }

    /// Read one bit (discrete input or coil).
    pub async fn read_bit(&mut self, unit: u8, coil: bool, addr: u16) -> Result<bool, MeterError> {
        let t = self.timeout();
        let ctx = self.ctx(unit).await?;
        let r = if coil {
            tokio::time::timeout(t, ctx.read_coils(addr, 1)).await
        } else {
            tokio::time::timeout(t, ctx.read_discrete_inputs(addr, 1)).await
        };
        let bits = self.settle(r, &format!("read bit {addr}"))?;
        bits.first().copied().ok_or_else(|| MeterError::Protocol(format!("no bit in the answer for {addr}")))
    }

    /// Write a coil.
    pub async fn write_coil(&mut self, unit: u8, addr: u16, on: bool) -> Result<(), MeterError> {
        let t = self.timeout();
        let ctx = self.ctx(unit).await?;
        let r = tokio::time::timeout(t, ctx.write_single_coil(addr, on)).await;
        self.settle(r, &format!("write coil {addr}"))
    }

    /// Write a run of holding registers in one request (function 16).
    pub async fn write_registers(&mut self, unit: u8, addr: u16, values: &[u16]) -> Result<(), MeterError> {
        let t = self.timeout();
        let ctx = self.ctx(unit).await?;
        let r = tokio::time::timeout(t, ctx.write_multiple_registers(addr, values)).await;
        self.settle(r, &format!("write {} register(s) at {addr}", values.len()))
    }

    /// Write a holding register.
    pub async fn write_register(&mut self, unit: u8, addr: u16, value: u16) -> Result<(), MeterError> {
        let t = self.timeout();
        let ctx = self.ctx(unit).await?;
        let r = tokio::time::timeout(t, ctx.write_single_register(addr, value)).await;
        self.settle(r, &format!("write register {addr}"))
    }
}

/// Whether an exception says "not now" rather than "no": the device is busy
/// (acknowledge, busy), or a gateway could not reach the device behind it.
pub fn is_transient(code: ExceptionCode) -> bool {
    matches!(
        code,
        ExceptionCode::Acknowledge
            | ExceptionCode::ServerDeviceBusy
            | ExceptionCode::GatewayPathUnavailable
            | ExceptionCode::GatewayTargetDevice
    )
}

/// A Modbus meter: a unit id and its device profile.
#[derive(Debug, Clone)]
pub struct ModbusMeter {
    /// Registry id.
    pub id: MeterId,
    /// Unit (slave) id.
    pub unit: u8,
    /// Where things are.
    pub profile: ModbusProfile,
    /// Applied to clock registers (local time).
    pub utc_offset_minutes: Option<i16>,
}

impl ModbusMeter {
    /// The serial number registers as identity.
    pub async fn read_identity(&self, port: &mut ModbusPort) -> Result<Identity, MeterError> {
        let span =
            self.profile.serial.ok_or_else(|| MeterError::Unsupported("no serial registers in the profile".into()))?;
        let words = port.read_registers(self.unit, RegisterTable::Holding, span.register, span.words).await?;
        let name = ascii_of(&words);
        Ok(Identity { serial: Some(name.clone()), name })
    }

    /// Relay read-back.
    pub async fn read_relay(&self, port: &mut ModbusPort) -> Result<RelayStatus, MeterError> {
        let rb = self
            .profile
            .relay_status
            .ok_or_else(|| MeterError::Unsupported("no relay read-back in the profile".into()))?;
        let closed = if let Some(di) = rb.discrete_input {
            port.read_bit(self.unit, false, di).await?
        } else if let Some(coil) = rb.coil {
            port.read_bit(self.unit, true, coil).await?
        } else if let Some(reg) = rb.register {
            port.read_registers(self.unit, RegisterTable::Holding, reg, 1).await?.first().copied()
                == Some(rb.connected_value)
        } else {
            return Err(MeterError::Unsupported("relay_status names no input, coil or register".into()));
        };
        Ok(RelayStatus {
            state: if closed { RelayState::Connected } else { RelayState::Disconnected },
            output_state: Some(closed),
            control_mode: None,
        })
    }

    /// Switch the relay (Modbus meters switch directly; there is no armed state).
    pub async fn switch(&self, port: &mut ModbusPort, to: RelayState) -> Result<(), MeterError> {
        let connect = to != RelayState::Disconnected;
        if let Some(coil) = self.profile.relay_coil {
            port.write_coil(self.unit, coil, connect).await
        } else if let Some(r) = self.profile.relay_register {
            port.write_register(self.unit, r.register, if connect { r.connect } else { r.disconnect }).await
        } else {
            Err(MeterError::Unsupported("no relay coil or register in the profile".into()))
        }
    }

    /// Energy import and export, scaled, named by their OBIS codes.
    pub async fn read_registers(&self, port: &mut ModbusPort) -> Result<Vec<Reading>, MeterError> {
        let mut out = Vec::new();
        for (obis, reg) in
            [(cosem::ENERGY_IMPORT, &self.profile.energy_import), (cosem::ENERGY_EXPORT, &self.profile.energy_export)]
        {
            let Some(reg) = reg else { continue };
            let words = port.read_registers(self.unit, reg.table, reg.register, reg.kind.words()).await?;
            let value = decode_value(&words, reg)?;
            out.push(Reading { obis: cosem::obis_text(obis), value, unit: reg.unit.clone() });
        }
        if out.is_empty() {
            return Err(MeterError::Unsupported("no energy registers in the profile".into()));
        }
        Ok(out)
    }

    /// The clock registers (Y, M, D, h, m, s local time).
    pub async fn read_clock(&self, port: &mut ModbusPort) -> Result<MeterClock, MeterError> {
        let c =
            self.profile.clock.ok_or_else(|| MeterError::Unsupported("no clock registers in the profile".into()))?;
        let w = port.read_registers(self.unit, RegisterTable::Holding, c.register, 6).await?;
        clock_of(&w, self.utc_offset_minutes)
    }

    /// Set the clock registers (one block of six, local time) to `unix` seconds.
    pub async fn set_clock(&self, port: &mut ModbusPort, unix: i64) -> Result<(), MeterError> {
        let c =
            self.profile.clock.ok_or_else(|| MeterError::Unsupported("no clock registers in the profile".into()))?;
        let local = unix + i64::from(self.utc_offset_minutes.unwrap_or(0)) * 60;
        let (y, mo, d) = crate::time::civil_from_days(local.div_euclid(86_400));
        let tod = local.rem_euclid(86_400);
        let words = [y, mo, d, tod / 3600, (tod % 3600) / 60, tod % 60].map(|v| u16::try_from(v).unwrap_or(0));
        port.write_registers(self.unit, c.register, &words).await
    }
}

/// A value from its registers, scaled.
pub fn decode_value(words: &[u16], reg: &ValueRegister) -> Result<f64, MeterError> {
    let n = usize::from(reg.kind.words());
    let mut w: Vec<u16> = words.get(..n).ok_or_else(|| MeterError::Protocol("too few registers".into()))?.to_vec();
    if reg.word_order == WordOrder::Little {
        w.reverse();
    }
    let raw64 = w.iter().fold(0u64, |acc, x| (acc << 16) | u64::from(*x));
    let raw = match reg.kind {
        ValueType::U16 | ValueType::U32 | ValueType::U64 => raw64 as f64,
        ValueType::I32 => f64::from(raw64 as u32 as i32),
        ValueType::F32 => f64::from(f32::from_bits(raw64 as u32)),
    };
    if !raw.is_finite() {
        return Err(MeterError::Protocol(format!("register {} holds no finite number", reg.register)));
    }
    Ok(raw * reg.scale)
}

/// ASCII from registers, high byte first, trailing NULs and spaces dropped.
pub fn ascii_of(words: &[u16]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    String::from_utf8_lossy(&bytes).trim_end_matches(['\0', ' ']).to_owned()
}

fn clock_of(w: &[u16], offset: Option<i16>) -> Result<MeterClock, MeterError> {
    let [y, mo, d, h, mi, s] = w else {
        return Err(MeterError::Protocol("clock needs 6 registers".into()));
    };
    let small = |v: u16| u8::try_from(v).map_err(|_| MeterError::Protocol("clock field out of range".into()));
    let dt = dlms_cosem_rs::axdr::DateTime::from_civil(
        *y,
        small(*mo)?,
        small(*d)?,
        small(*h)?,
        small(*mi)?,
        small(*s)?,
        offset.unwrap_or(0),
    );
    let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
    Ok(MeterClock {
        unix_seconds: offset.and_then(|_| dt.to_unix_seconds()),
        text,
        utc_offset_minutes: offset,
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: ValueType, order: WordOrder, scale: f64) -> ValueRegister {
        ValueRegister { register: 0, table: RegisterTable::Holding, kind, word_order: order, scale, unit: "Wh".into() }
    }

    #[test]
    fn values_decode_in_both_word_orders() {
        let words = [0x0001, 0x0002];
        assert_eq!(decode_value(&words, &reg(ValueType::U32, WordOrder::Big, 1.0)).ok(), Some(65_538.0));
        assert_eq!(decode_value(&words, &reg(ValueType::U32, WordOrder::Little, 1.0)).ok(), Some(131_073.0));
        assert_eq!(decode_value(&[0xFFFF, 0xFFFE], &reg(ValueType::I32, WordOrder::Big, 1.0)).ok(), Some(-2.0));
        let f = 1234.5f32.to_bits();
        let fw = [(f >> 16) as u16, f as u16];
        assert_eq!(decode_value(&fw, &reg(ValueType::F32, WordOrder::Big, 1000.0)).ok(), Some(1_234_500.0));
        assert_eq!(decode_value(&[0, 0, 1, 0], &reg(ValueType::U64, WordOrder::Big, 10.0)).ok(), Some(655_360.0));
        assert!(decode_value(&[1], &reg(ValueType::U32, WordOrder::Big, 1.0)).is_err());
        let nan = f32::NAN.to_bits();
        assert!(decode_value(&[(nan >> 16) as u16, nan as u16], &reg(ValueType::F32, WordOrder::Big, 1.0)).is_err());
    }

    #[test]
    fn ascii_serial_numbers() {
        assert_eq!(ascii_of(&[0x5349, 0x4D30, 0x3100, 0x0000]), "SIM01");
    }

    #[test]
    fn clock_registers() {
        let c = clock_of(&[2026, 11, 28, 9, 0, 0], Some(480)).expect("clock");
        assert_eq!(c.unix_seconds, Some(1_795_827_600));
        assert!(clock_of(&[2026, 300, 28, 9, 0, 0], Some(0)).is_err());
        assert!(clock_of(&[2026, 11], Some(0)).is_err());
    }
}
