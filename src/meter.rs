//! What the rest of the head-end asks of a meter, independent of the protocol that
//! carries it: identities, relay states, readings, profiles, and the errors a meter
//! exchange can end in.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A meter's id in the head-end's registry: 1 to 64 characters of `A-Z a-z 0-9 . _ : -`
/// (the MQTT contract's rule, so an id from configuration can always appear in a topic).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct MeterId(String);

impl MeterId {
    /// Check and wrap an id.
    pub fn new(id: &str) -> Result<Self, InvalidId> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if id.is_empty() || id.len() > 64 || !id.chars().all(ok_char) {
            return Err(InvalidId(id.chars().take(80).collect()));
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MeterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MeterId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MeterId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// An id that breaks the id rule.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid id {0:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ : -")]
pub struct InvalidId(pub String);

/// Whether the relay lets power through, as the meter reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Power flows.
    Connected,
    /// Cut.
    Disconnected,
    /// Cut, and the customer may close it with the meter's button.
    ReadyForReconnection,
    /// Not known (never read, or the meter answered something we cannot interpret).
    Unknown,
}

impl fmt::Display for RelayState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::ReadyForReconnection => "ready_for_reconnection",
            Self::Unknown => "unknown",
        })
    }
}

/// The disconnect control's control mode (IEC 62056-6-2 class 70, attribute 4).
///
/// It decides whether a remote reconnect closes the relay or only arms it for the
/// customer's button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ControlMode(pub u8);

impl ControlMode {
    /// True when `remote_reconnect` only moves the meter to ready_for_reconnection and
    /// the customer must press the button (modes 1, 3, 5, 6).
    pub fn reconnect_needs_button(self) -> bool {
        matches!(self.0, 1 | 3 | 5 | 6)
    }

    /// Mode 0: the relay is always connected and the remote methods are refused.
    pub fn is_fixed_connected(self) -> bool {
        self.0 == 0
    }
}

/// What a meter says about its relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Where the relay is (output state and control state combined).
    pub state: RelayState,
    /// The raw output state (true = connected), where the protocol has one.
    pub output_state: Option<bool>,
    /// The control mode, where the protocol has one (DLMS class 70).
    pub control_mode: Option<ControlMode>,
}

/// What a switch request ended in, after reading the relay back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchOutcome {
    /// The relay is where it was asked to be.
    Done,
    /// Reconnect accepted, but the meter waits for the customer's button.
    Armed,
}

/// Who the meter says it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The logical device name (DLMS 0.0.42.0.0.255) or the serial number (Modbus).
    pub name: String,
    /// The serial number, where the meter has a separate one.
    pub serial: Option<String>,
}

/// A register value with its unit, already scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The OBIS code of the quantity (`1.0.1.8.0.255`), also for Modbus meters, so that
    /// readings are named the same whatever carried them.
    pub obis: String,
    /// The value in `unit`, scaler applied.
    pub value: f64,
    /// The unit symbol (`Wh`).
    pub unit: String,
}

/// A meter's clock, as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterClock {
    /// Seconds since the Unix epoch, UTC, when the meter's answer names a point in time.
    pub unix_seconds: Option<i64>,
    /// The local civil time as the meter wrote it (`2026-11-28T09:00:00+08:00`, or
    /// without offset when the meter gives none).
    pub text: String,
    /// The offset from UTC in minutes east that the meter reported, if any.
    pub utc_offset_minutes: Option<i16>,
    /// The clock status byte: bit 0 invalid, bit 1 doubtful, bit 7 DST.
    pub status: Option<u8>,
}

/// One column of a load profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileColumn {
    /// `class/obis/attribute`, for example `3/1.0.1.8.0.255/2`.
    pub name: String,
    /// The unit after scaling, when the column is a register with a scaler_unit.
    pub unit: Option<String>,
}

/// One row of a load profile: its capture time and the values, scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRow {
    /// Capture time, Unix seconds UTC (None when the row's clock is unusable).
    pub unix_seconds: Option<i64>,
    /// The status column, where the profile has one.
    pub status: Option<u8>,
    /// The status byte of the row's date-time (bit 0 invalid, bit 1 doubtful), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_status: Option<u8>,
    /// The other columns, in capture order, scaled; None where a cell is not a number.
    pub values: Vec<Option<f64>>,
}

/// A load profile read over a range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadProfile {
    /// The profile's OBIS code.
    pub obis: String,
    /// Capture period in seconds (0 = asynchronous).
    pub capture_period_s: u32,
    /// The value columns (the clock and status columns are not repeated here).
    pub columns: Vec<ProfileColumn>,
    /// Rows in the meter's order.
    pub rows: Vec<ProfileRow>,
}

/// How a meter exchange failed.
///
/// A meter saying "no" ([`MeterError::Refused`]) is not a transport failure: callers
/// retry the latter and report the former.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The link could not be opened (connection refused, no such serial device).
    #[error("meter unreachable: {0}")]
    Unreachable(String),
    /// No (complete) answer within the exchange timeout.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The link broke during the exchange.
    #[error("link closed: {0}")]
    LinkClosed(String),
    /// The meter answered and refused, with its reason.
    #[error("meter refused: {0}")]
    Refused(String),
    /// The association was rejected (wrong password or keys, unknown client).
    #[error("association refused: {0}")]
    AssociationRefused(String),
    /// The answer did not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The meter at this address is not the one registered.
    #[error("identity mismatch: expected {expected:?}, meter answered {actual:?}")]
    IdentityMismatch {
        /// What the registry says.
        expected: String,
        /// What the meter said.
        actual: String,
    },
    /// After switching, the relay is not where it was asked to be.
    #[error("relay did not change: asked {asked}, meter reports {actual}")]
    VerifyMismatch {
        /// What was asked.
        asked: RelayState,
        /// What was read back.
        actual: RelayState,
    },
    /// The request makes no sense for this meter (for example no relay in its profile).
    #[error("not supported by this meter: {0}")]
    Unsupported(String),
    /// Local state (invocation counter storage) failed; nothing was sent.
    #[error("local storage: {0}")]
    Storage(String),
}

impl MeterError {
    /// True when the failure concerns the link, so that the link should be reopened
    /// before the next exchange and the request may be retried.
    pub fn is_link_failure(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Timeout(_) | Self::LinkClosed(_) | Self::Protocol(_))
    }

    /// A stable code for scripts and the MQTT contract's `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreachable(_) | Self::Timeout(_) | Self::LinkClosed(_) => "meter_unreachable",
            Self::Refused(_) | Self::AssociationRefused(_) | Self::Unsupported(_) => "meter_refused",
            Self::Protocol(_) => "meter_unreachable",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::VerifyMismatch { .. } => "verify_mismatch",
            Self::Storage(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_ids_follow_the_contract() {
        assert!(MeterId::new("MTR-0001").is_ok());
        assert!(MeterId::new("a.b_c:d-e").is_ok());
        assert!(MeterId::new("").is_err());
        assert!(MeterId::new("has space").is_err());
        assert!(MeterId::new(&"x".repeat(65)).is_err());
        assert!(MeterId::new("ami/cmd").is_err());
    }

    #[test]
    fn control_modes_that_need_the_button() {
        let needs: Vec<u8> = (0..=6).filter(|m| ControlMode(*m).reconnect_needs_button()).collect();
        assert_eq!(needs, vec![1, 3, 5, 6]);
        assert!(ControlMode(0).is_fixed_connected());
    }
}
