//! What the daemon publishes: result, state, status and readings messages.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AccountId, Action, CommandId, PaymentId, Reason, Rejection};
use crate::meter::{MeterError, MeterId, RelayState};

/// A command's status on `{p}/result/{meter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Valid and durable.
    Accepted,
    /// Held by a policy until `not_before`.
    Deferred,
    /// Being sent to the meter.
    Executing,
    /// An attempt failed; another follows.
    Retrying,
    /// Done and read back.
    Succeeded,
    /// Reconnect armed; the customer presses the button.
    Armed,
    /// Replaced before it ran.
    Superseded,
    /// Not valid, or refused by policy.
    Rejected,
    /// Gave up.
    Failed,
    /// `expires_at` passed first.
    Expired,
}

impl Status {
    /// True when the command's life is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Accepted | Self::Deferred | Self::Executing | Self::Retrying)
    }

    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Deferred => "deferred",
            Self::Executing => "executing",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Armed => "armed",
            Self::Superseded => "superseded",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    /// Parse the contract's spelling.
    pub fn from_wire(s: &str) -> Option<Self> {
        [
            Self::Accepted,
            Self::Deferred,
            Self::Executing,
            Self::Retrying,
            Self::Succeeded,
            Self::Armed,
            Self::Superseded,
            Self::Rejected,
            Self::Failed,
            Self::Expired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// `error.code` values of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, wrong types, missing fields, oversize, invalid ids.
    InvalidPayload,
    /// The meter is not in the registry.
    UnknownMeter,
    /// The action is not one the contract knows.
    UnsupportedAction,
    /// Same id, different content.
    DuplicateId,
    /// The account is protected from arrears cuts.
    PolicyProtected,
    /// No notice, or not early enough.
    PolicyNoNotice,
    /// A cleared payment arrived after `arrears_as_of`.
    PolicyStaleArrears,
    /// A burst tripped the disconnect quarantine.
    PolicyRateLimit,
    /// The meter could not be reached.
    MeterUnreachable,
    /// The meter said no.
    MeterRefused,
    /// The meter at that address is not the one registered.
    IdentityMismatch,
    /// The relay did not change.
    VerifyMismatch,
    /// The head-end itself failed.
    Internal,
}

impl ErrorCode {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidPayload => "invalid_payload",
            Self::UnknownMeter => "unknown_meter",
            Self::UnsupportedAction => "unsupported_action",
            Self::DuplicateId => "duplicate_id",
            Self::PolicyProtected => "policy_protected",
            Self::PolicyNoNotice => "policy_no_notice",
            Self::PolicyStaleArrears => "policy_stale_arrears",
            Self::PolicyRateLimit => "policy_rate_limit",
            Self::MeterUnreachable => "meter_unreachable",
            Self::MeterRefused => "meter_refused",
            Self::IdentityMismatch => "identity_mismatch",
            Self::VerifyMismatch => "verify_mismatch",
            Self::Internal => "internal",
        }
    }

    /// The code a meter failure maps to (the same table as [`MeterError::code`], typed).
    pub fn of_meter_error(e: &MeterError) -> Self {
        match e {
            MeterError::Unreachable(_) | MeterError::Timeout(_) | MeterError::LinkClosed(_) => Self::MeterUnreachable,
            MeterError::Protocol(_) => Self::MeterUnreachable,
            MeterError::Refused(_) | MeterError::AssociationRefused(_) | MeterError::Unsupported(_) => {
                Self::MeterRefused
            }
            MeterError::IdentityMismatch { .. } => Self::IdentityMismatch,
            MeterError::VerifyMismatch { .. } => Self::VerifyMismatch,
            MeterError::Storage(_) => Self::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `error` of a result message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One of the contract's codes.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ErrorBody {
    /// Build one.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// `trigger` of a payment-driven command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// The payment behind it.
    pub payment: PaymentId,
}

/// A register value in a `read` result: `{"value": 1234567, "unit": "Wh"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterValue {
    /// Whole numbers are written as JSON integers (as in the spec's example); null if not finite.
    pub value: Option<serde_json::Number>,
    /// Unit symbol.
    pub unit: String,
}

/// A reading as a JSON number: an integer when it is whole, so `1234567.0` reads `1234567`.
pub fn json_number(v: f64) -> Option<serde_json::Number> {
    // 2^53: beyond it an f64 no longer holds every integer exactly.
    if v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
        Some(serde_json::Number::from(v as i64))
    } else {
        serde_json::Number::from_f64(v)
    }
}

/// Who replaced a superseded command: a later command, or a payment. On the wire both
/// are a plain id, so a message read back always yields `Command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Supersessor {
    /// A later command for the same meter.
    Command(CommandId),
    /// A cleared payment that voided an arrears cut.
    Payment(PaymentId),
}

/// `{p}/result/{meter}`: one status change of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    /// The command's id; for unparseable input whatever could be read, or null.
    pub id: Option<String>,
    /// The meter (from the topic; raw text when the topic's meter id is invalid).
    pub meter: String,
    /// The action, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The status.
    pub status: Status,
    /// The relay as last read, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayState>,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// When this status was reached: RFC 3339 with milliseconds and offset.
    pub at: String,
    /// Why, for retrying / rejected / failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// For deferred: when it may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// For superseded: what replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Supersessor>,
    /// True on a republish for a repeated id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// For payment-driven commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// For a successful read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registers: Option<BTreeMap<String, RegisterValue>>,
    /// For a successful read: the meter's clock as it wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter_clock: Option<String>,
}

impl ResultMessage {
    /// A bare message; fill the optional fields as needed.
    pub fn new(id: Option<String>, meter: &str, status: Status, at: String) -> Self {
        Self {
            id,
            meter: meter.to_owned(),
            action: None,
            status,
            relay: None,
            attempts: 0,
            at,
            error: None,
            not_before: None,
            by: None,
            duplicate: false,
            trigger: None,
            registers: None,
            meter_clock: None,
        }
    }

    /// The `rejected` message for input that did not parse.
    pub fn for_rejection(meter: &str, r: &Rejection, at: String) -> Self {
        let mut m = Self::new(r.id.clone(), meter, Status::Rejected, at);
        m.error = Some(ErrorBody::new(r.code, r.message.clone()));
        m
    }

    /// The republish for a repeated id with the same content: the latest status as it was.
    pub fn as_duplicate(&self) -> Self {
        Self { duplicate: true, ..self.clone() }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `{p}/state/{meter}` (retained): what the head-end knows of a meter now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateMessage {
    /// The meter.
    pub meter: MeterId,
    /// Its account, if registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountId>,
    /// The relay as last known.
    pub relay: RelayState,
    /// Why it is disconnected, when the head-end cut it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Since when the relay is where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Whether its link is up.
    pub online: bool,
    /// Last successful exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Time of the newest stored reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reading: Option<String>,
    /// An extension: the meter's clock minus the head-end's, seconds, as last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_s: Option<i64>,
}

/// `{p}/status` (retained): the daemon itself. The last will is `{"online": false}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusMessage {
    /// Up or not.
    pub online: bool,
    /// The daemon's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Meters in the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meters: Option<u64>,
    /// Links up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels_up: Option<u64>,
    /// Links down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels_down: Option<u64>,
    /// How many times the configuration was reloaded (SIGHUP) since start (an extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_generation: Option<u64>,
}

impl StatusMessage {
    /// The MQTT last will: `{"online":false}`.
    pub fn last_will() -> Self {
        Self::default()
    }
}

/// A column of a readings batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadingColumn {
    /// OBIS code of the quantity.
    pub name: String,
    /// Unit after scaling.
    pub unit: String,
}

/// A row of a readings batch; on the wire `["<time>", v1, v2, ...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingRow {
    /// Interval end, RFC 3339.
    pub at: String,
    /// One value per column, scaled; None where the meter gave none.
    pub values: Vec<Option<f64>>,
}

impl Serialize for ReadingRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.values.len() + 1))?;
        seq.serialize_element(&self.at)?;
        for v in &self.values {
            seq.serialize_element(&v.and_then(json_number))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for ReadingRow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let cells = Vec::<Value>::deserialize(d)?;
        let mut it = cells.into_iter();
        let at = match it.next() {
            Some(Value::String(s)) => s,
            _ => return Err(serde::de::Error::custom("a readings row starts with its time")),
        };
        Ok(Self { at, values: it.map(|v| v.as_f64()).collect() })
    }
}

/// `{p}/readings/{meter}`: interval readings in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadingsBatch {
    /// The meter.
    pub meter: MeterId,
    /// The profile they come from (OBIS), or the snapshot source.
    pub source: String,
    /// Interval length in seconds.
    pub interval_s: u32,
    /// The value columns.
    pub columns: Vec<ReadingColumn>,
    /// Rows in time order.
    pub rows: Vec<ReadingRow>,
    /// An extension: the outbox's id of this batch. A batch published again after a
    /// broker or daemon restart carries the same id and the same rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<i64>,
    /// An extension: rows kept with a doubt (`power_down`, `clock_adjusted`, `late`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<RowFlags>,
    /// An extension: intervals missing before or between these rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<RowGap>,
}

/// The flags of one row of a readings batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowFlags {
    /// The row's time, as in the row.
    pub at: String,
    /// What is doubtful about it.
    pub flags: Vec<String>,
}

/// Intervals the meter did not deliver (or could not be read for), reported rather than
/// left as a silent hole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGap {
    /// The first missing interval's time.
    pub from: String,
    /// The last missing interval's time.
    pub to: String,
    /// How many intervals.
    pub intervals: u64,
}

/// `{p}/payment/{id}`: what became of one payment. An extension of the contract (which
/// allows new topics and fields), published by the daemon with QoS 1, not retained.
/// Text fields are raw so that a refusal can echo what it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentOutcome {
    /// The payment's id, when it could be read.
    pub id: Option<String>,
    /// The account, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Whether the payment is cleared (only then are meters reconnected).
    #[serde(default)]
    pub cleared: bool,
    /// True when this payment id was seen before (its reconnects were made then).
    #[serde(default)]
    pub duplicate: bool,
    /// The reconnects the payment caused: the account's meters cut for arrears.
    #[serde(default)]
    pub reconnects: Vec<PaymentReconnect>,
    /// Present when the payment was refused (`duplicate_id`, `invalid_payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// One reconnect a payment caused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentReconnect {
    /// The derived command id (`headend::command::derived_command_id`).
    pub id: String,
    /// The meter.
    pub meter: String,
}
