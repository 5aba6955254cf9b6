//! One protocol-neutral face for every meter: what the command and collection code call.
//!
//! A [`Link`] is the open physical link (one per channel); a [`Driver`] is one meter's
//! protocol state on it. Keeping them apart is what lets several meters share one
//! RS-485 bus or gateway connection, one request at a time.

use dlms_cosem_rs::obis::Obis;

use crate::config::{LinkConfig, LinkProtocol, MeterConfig, SiteConfig};
use crate::dlms::counter::CounterStore;
use crate::dlms::{DlmsMeter, DlmsSettings};
use crate::link::Port;
use crate::meter::{Identity, LoadProfile, MeterClock, MeterError, Reading, RelayState, RelayStatus, SwitchOutcome};
use crate::modbus::{ModbusMeter, ModbusPort};

/// An open physical link.
#[derive(Debug)]
pub enum Link {
    /// A byte stream carrying DLMS (wrapper or HDLC).
    Dlms(Port),
    /// A Modbus client context.
    Modbus(ModbusPort),
}

impl Link {
    /// Open the link a configuration describes.
    pub async fn open(cfg: &LinkConfig) -> Result<Self, MeterError> {
        Ok(if cfg.protocol.is_dlms() {
            Self::Dlms(Port::open(cfg).await?)
        } else {
            Self::Modbus(ModbusPort::open(cfg).await?)
        })
    }
}

/// One meter's driver.
#[derive(Debug)]
pub enum Driver {
    /// DLMS/COSEM.
    Dlms(Box<DlmsMeter>),
    /// Modbus (boxed like DLMS: a channel holds thousands of drivers, and the enum is as
    /// large as its largest variant).
    Modbus(Box<ModbusMeter>),
}

/// The driver could not be built from configuration.
#[derive(Debug, thiserror::Error)]
#[error("meter {meter}: {problem}")]
pub struct DriverConfigError {
    /// Which meter.
    pub meter: String,
    /// What is wrong.
    pub problem: String,
}

macro_rules! dispatch {
    ($self:ident, $link:ident, $d:ident, $p:ident => $dlms:expr, $modbus:expr) => {
        match (&mut *$self, &mut *$link) {
            (Driver::Dlms($d), Link::Dlms($p)) => $dlms,
            (Driver::Modbus($d), Link::Modbus($p)) => $modbus,
            _ => Err(MeterError::Unsupported("the meter's protocol does not match its link".into())),
        }
    };
}

impl Driver {
    /// Build the driver of a configured meter.
    pub fn from_config(
        site: &SiteConfig,
        meter: &MeterConfig,
        counters: CounterStore,
    ) -> Result<Self, DriverConfigError> {
        let err = |problem: String| DriverConfigError { meter: meter.id.to_string(), problem };
        let link = site.link(&meter.link).ok_or_else(|| err(format!("no link named {:?}", meter.link)))?;
        match link.protocol {
            LinkProtocol::DlmsWrapper | LinkProtocol::DlmsHdlc => {
                let keys = site.keys_of(meter).map_err(|e| err(e.to_string()))?;
                let physical_address = match link.protocol {
                    LinkProtocol::DlmsHdlc => {
                        Some(meter.physical_address.ok_or_else(|| err("physical_address is required on HDLC".into()))?)
                    }
                    _ => None,
                };
                let settings = DlmsSettings {
                    meter: meter.id.clone(),
                    client_sap: meter.client_sap,
                    logical_device: meter.logical_device,
                    physical_address,
                    auth: meter.auth,
                    keys,
                    timeout_ms: link.timeout_ms,
                    hdlc: link.hdlc,
                    utc_offset_minutes: meter.timezone_offset_minutes,
                    max_pdu_size: 1024,
                };
                Ok(Self::Dlms(Box::new(DlmsMeter::new(settings, counters))))
            }
            LinkProtocol::ModbusTcp | LinkProtocol::ModbusRtu => {
                let profile_name =
                    meter.modbus_profile.as_deref().ok_or_else(|| err("modbus_profile is required".into()))?;
                let profile = site
                    .modbus_profiles
                    .get(profile_name)
                    .ok_or_else(|| err(format!("no [modbus_profile.{profile_name}]")))?;
                Ok(Self::Modbus(Box::new(ModbusMeter {
                    id: meter.id.clone(),
                    unit: meter.unit_id.ok_or_else(|| err("unit_id is required".into()))?,
                    profile: profile.clone(),
                    utc_offset_minutes: meter.timezone_offset_minutes,
                })))
            }
        }
    }

    /// Who the meter says it is.
    pub async fn read_identity(&mut self, link: &mut Link) -> Result<Identity, MeterError> {
        dispatch!(self, link, d, p => d.read_identity(p).await, d.read_identity(p).await)
    }

    /// Fail with `IdentityMismatch` unless the meter answers `expected`.
    pub async fn verify_identity(&mut self, link: &mut Link, expected: &str) -> Result<(), MeterError> {
        let actual = match (&mut *self, &mut *link) {
            (Driver::Dlms(d), Link::Dlms(p)) => return d.verify_identity(p, expected).await,
            _ => self.read_identity(link).await?.name,
        };
        if actual == expected {
            Ok(())
        } else {
            Err(MeterError::IdentityMismatch { expected: expected.to_owned(), actual })
        }
    }

    /// The relay as the meter reports it.
    pub async fn read_relay(&mut self, link: &mut Link) -> Result<RelayStatus, MeterError> {
        dispatch!(self, link, d, p => d.read_relay(p).await, d.read_relay(p).await)
    }

    /// Open the relay and read it back.
    pub async fn disconnect(&mut self, link: &mut Link) -> Result<SwitchOutcome, MeterError> {
        self.switch(link, RelayState::Disconnected).await
    }

    /// Close the relay (or arm it for the customer's button) and read it back.
    pub async fn reconnect(&mut self, link: &mut Link) -> Result<SwitchOutcome, MeterError> {
        self.switch(link, RelayState::Connected).await
    }

    async fn switch(&mut self, link: &mut Link, to: RelayState) -> Result<SwitchOutcome, MeterError> {
        dispatch!(self, link, d, p => d.switch(p, to).await, d.switch(p, to).await)?;
        // The ACTION's success code is not proof: read attributes 2 and 3 back.
        let after = self.read_relay(link).await?;
        judge_switch(to, after.state)
    }

    /// Energy registers, scaled.
    pub async fn read_registers(&mut self, link: &mut Link) -> Result<Vec<Reading>, MeterError> {
        dispatch!(self, link, d, p => d.read_registers(p).await, d.read_registers(p).await)
    }

    /// The meter's clock.
    pub async fn read_clock(&mut self, link: &mut Link) -> Result<MeterClock, MeterError> {
        dispatch!(self, link, d, p => d.read_clock(p).await, d.read_clock(p).await)
    }

    /// Set the meter's clock to `unix` seconds (the meter's configured offset).
    pub async fn set_clock(&mut self, link: &mut Link, unix: i64) -> Result<(), MeterError> {
        dispatch!(self, link, d, p => d.set_clock(p, unix).await, d.set_clock(p, unix).await)
    }

    /// The load profile over `[from, to]` (Unix seconds). DLMS only: Modbus meters have
    /// no profile; the head-end takes snapshots instead.
    pub async fn read_profile(
        &mut self,
        link: &mut Link,
        obis: Obis,
        from: i64,
        to: i64,
    ) -> Result<LoadProfile, MeterError> {
        dispatch!(self, link, d, p => d.read_profile(p, obis, from, to).await,
            { let _ = (d, p, obis, from, to); Err(MeterError::Unsupported("Modbus meters keep no load profile".into())) })
    }

    /// Forget protocol state after the link was lost (it is reopened before the next use).
    pub fn reset(&mut self) {
        if let Driver::Dlms(d) = self {
            d.reset();
        }
    }

    /// Release the association / close the link politely.
    pub async fn close(&mut self, link: &mut Link) {
        if let (Driver::Dlms(d), Link::Dlms(p)) = (self, link) {
            d.close(p).await;
        }
    }
}

/// What a switch ended in, from the relay read back after it.
pub fn judge_switch(asked: RelayState, read_back: RelayState) -> Result<SwitchOutcome, MeterError> {
    match (asked, read_back) {
        (RelayState::Disconnected, RelayState::Disconnected) => Ok(SwitchOutcome::Done),
        (RelayState::Connected, RelayState::Connected) => Ok(SwitchOutcome::Done),
        (RelayState::Connected, RelayState::ReadyForReconnection) => Ok(SwitchOutcome::Armed),
        (asked, actual) => Err(MeterError::VerifyMismatch { asked, actual }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_outcomes_from_the_read_back() {
        use RelayState::*;
        assert_eq!(judge_switch(Disconnected, Disconnected).ok(), Some(SwitchOutcome::Done));
        assert_eq!(judge_switch(Connected, Connected).ok(), Some(SwitchOutcome::Done));
        assert_eq!(judge_switch(Connected, ReadyForReconnection).ok(), Some(SwitchOutcome::Armed));
        assert!(matches!(judge_switch(Disconnected, Connected), Err(MeterError::VerifyMismatch { .. })));
        assert!(matches!(judge_switch(Disconnected, ReadyForReconnection), Err(MeterError::VerifyMismatch { .. })));
        assert!(matches!(judge_switch(Connected, Disconnected), Err(MeterError::VerifyMismatch { .. })));
        assert!(matches!(judge_switch(Connected, Unknown), Err(MeterError::VerifyMismatch { .. })));
    }
}
