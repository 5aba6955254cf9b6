//! The MQTT contract of `spec/mqtt-api.md`, version 1, as types: what the daemon reads
//! (commands, payments), what it publishes (results, state, readings, status), and the
//! topics they travel on.
//!
//! Inbound payloads are parsed by hand from a `serde_json::Value` rather than by a derived
//! `Deserialize`: the contract asks for a `rejected` message carrying whatever `id` could
//! be read, and for `unsupported_action` to be told apart from `invalid_payload`, which a
//! derived deserializer cannot do. Nothing here panics on outside data.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::meter::InvalidId;
use crate::time::{format_rfc3339_ms, parse_rfc3339_ms, BadTimestamp};

mod outbound;
mod topics;

pub use outbound::*;
pub use topics::*;

/// Largest inbound payload accepted (1 MiB); larger ones are rejected unread.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Longest `operator` and `override.by` accepted (not in the spec; keeps the audit sane).
pub const MAX_NAME_CHARS: usize = 256;
/// Longest `override.why` accepted.
pub const MAX_WHY_CHARS: usize = 1024;
/// An unreadable id is echoed in a rejection only up to this many bytes.
const MAX_ECHOED_ID: usize = 256;

/// True when `id` follows the contract's id rule: 1 to 64 of `A-Z a-z 0-9 . _ : -`.
pub fn is_valid_id(id: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    !id.is_empty() && id.len() <= 64 && id.chars().all(ok_char)
}

macro_rules! contract_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Check and wrap an id.
            pub fn new(id: &str) -> Result<Self, InvalidId> {
                if is_valid_id(id) {
                    Ok(Self(id.to_owned()))
                } else {
                    Err(InvalidId(id.chars().take(80).collect()))
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Wrap text built only from already-valid ids (derived ids).
            #[allow(dead_code)]
            pub(crate) fn from_valid(id: String) -> Self {
                debug_assert!(is_valid_id(&id), "{id:?}");
                Self(id)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

contract_id!(
    /// A command's id: the caller's idempotency key.
    CommandId
);
contract_id!(
    /// A payment's id: billing's idempotency key.
    PaymentId
);
contract_id!(
    /// A billing account.
    AccountId
);

/// A point in time as the contract writes it: RFC 3339 with an offset. The offset is
/// kept so that the journal and audit show what the caller wrote; equality is on the
/// instant alone, so `09:00+08:00` and `01:00Z` are the same content.
#[derive(Debug, Clone, Copy)]
pub struct Timestamp {
    unix_ms: i64,
    offset_min: i16,
}

impl Timestamp {
    /// Parse RFC 3339 with a mandatory offset.
    pub fn parse(text: &str) -> Result<Self, BadTimestamp> {
        let unix_ms = parse_rfc3339_ms(text)?;
        let offset_min = match text.len().checked_sub(6).and_then(|i| text.get(i..)) {
            Some(tail) if !text.ends_with(['Z', 'z']) => {
                let b = tail.as_bytes();
                let digits = |i: usize| b.get(i).map_or(0, |c| i16::from(c.wrapping_sub(b'0')));
                let m = (digits(1) * 10 + digits(2)) * 60 + digits(4) * 10 + digits(5);
                if b.first() == Some(&b'-') {
                    -m
                } else {
                    m
                }
            }
            _ => 0,
        };
        Ok(Self { unix_ms, offset_min })
    }

    /// A time at an offset (minutes east of UTC).
    pub fn from_ms(unix_ms: i64, offset_min: i16) -> Self {
        Self { unix_ms, offset_min }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(self) -> i64 {
        self.unix_ms
    }

    /// The offset it was written with.
    pub fn offset_min(self) -> i16 {
        self.offset_min
    }

    /// RFC 3339 at the original offset, with milliseconds only when there are some.
    pub fn to_rfc3339(self) -> String {
        format_rfc3339_ms(self.unix_ms, self.offset_min, self.unix_ms.rem_euclid(1000) != 0)
    }
}

impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.unix_ms == other.unix_ms
    }
}
impl Eq for Timestamp {}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `at`, `not_before` and friends in outbound messages: milliseconds and an offset.
pub fn format_at(unix_ms: i64, offset_min: i16) -> String {
    format_rfc3339_ms(unix_ms, offset_min, true)
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Open the relay.
    Disconnect,
    /// Close the relay (or arm it for the customer's button).
    Reconnect,
    /// Read the relay state and the active-energy register now.
    Read,
}

impl Action {
    fn from_wire(s: &str) -> Option<Self> {
        Some(match s {
            "disconnect" => Self::Disconnect,
            "reconnect" => Self::Reconnect,
            "read" => Self::Read,
            _ => return None,
        })
    }

    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnect => "disconnect",
            Self::Reconnect => "reconnect",
            Self::Read => "read",
        }
    }

    /// True for the actions that switch the relay (one intent per meter).
    pub fn switches_relay(self) -> bool {
        !matches!(self, Self::Read)
    }
}

/// Why a disconnect was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Unpaid bills: the policy gates apply.
    Arrears,
    /// The customer asked.
    CustomerRequest,
    /// Danger to people or plant.
    Safety,
    /// Work on the installation.
    Maintenance,
    /// Interference with the meter.
    Tamper,
}

impl Reason {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Arrears => "arrears",
            Self::CustomerRequest => "customer_request",
            Self::Safety => "safety",
            Self::Maintenance => "maintenance",
            Self::Tamper => "tamper",
        }
    }

    /// Parse the contract's spelling.
    pub fn from_wire(s: &str) -> Option<Self> {
        Some(match s {
            "arrears" => Self::Arrears,
            "customer_request" => Self::CustomerRequest,
            "safety" => Self::Safety,
            "maintenance" => Self::Maintenance,
            "tamper" => Self::Tamper,
            _ => return None,
        })
    }
}

/// A named person lifting the time-window policy for one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// Who (required, non-empty).
    pub by: String,
    /// Why.
    pub why: String,
}

/// `{p}/cmd/{meter}`: a command for one meter, validated. The meter comes from the topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandRequest {
    /// The caller's id, the idempotency key.
    pub id: CommandId,
    /// What to do.
    pub action: Action,
    /// Why (required for disconnect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Who asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// When the caller decided (default: arrival).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Timestamp>,
    /// When the arrears list behind an arrears cut was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrears_as_of: Option<Timestamp>,
    /// When the customer was notified of the coming cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice_sent_at: Option<Timestamp>,
    /// Give up after this (default from configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// A named person lifting the time window.
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    pub override_: Option<Override>,
}

/// Why an inbound payload was not taken, with what the `rejected` message needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// The `id` as far as it could be read (maybe not a valid id), or None.
    pub id: Option<String>,
    /// `invalid_payload` or `unsupported_action`.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
}

/// Field access on a JSON object that turns every mismatch into a [`Rejection`].
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    id: Option<String>,
}

impl<'a> Fields<'a> {
    fn of(value: &'a Value) -> Result<Self, Rejection> {
        let obj = value.as_object().ok_or_else(|| invalid(None, "the payload is not a JSON object".into()))?;
        let id = obj.get("id").and_then(Value::as_str).filter(|s| s.len() <= MAX_ECHOED_ID).map(str::to_owned);
        Ok(Self { obj, id })
    }

    fn reject(&self, message: String) -> Rejection {
        invalid(self.id.clone(), message)
    }

    /// A field that is absent or JSON null reads as None: null is "not given".
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn str(&self, name: &str) -> Result<Option<&'a str>, Rejection> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.reject(format!("`{name}` must be a string, not {}", kind(other)))),
        }
    }

    fn required_str(&self, name: &str) -> Result<&'a str, Rejection> {
        self.str(name)?.ok_or_else(|| self.reject(format!("missing field `{name}`")))
    }

    fn text(&self, name: &str, max_chars: usize) -> Result<Option<String>, Rejection> {
        match self.str(name)? {
            Some(s) if s.chars().count() > max_chars => {
                Err(self.reject(format!("`{name}` is longer than {max_chars} characters")))
            }
            other => Ok(other.map(str::to_owned)),
        }
    }

    fn time(&self, name: &str) -> Result<Option<Timestamp>, Rejection> {
        self.str(name)?.map(|s| Timestamp::parse(s).map_err(|e| self.reject(format!("`{name}`: {e}")))).transpose()
    }

    fn id<T>(&self, name: &str, make: fn(&str) -> Result<T, InvalidId>) -> Result<T, Rejection> {
        make(self.required_str(name)?).map_err(|e| self.reject(format!("`{name}`: {e}")))
    }
}

fn invalid(id: Option<String>, message: String) -> Rejection {
    Rejection { id, code: ErrorCode::InvalidPayload, message }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Read the bytes as one JSON object, refusing oversize payloads unread.
fn json(bytes: &[u8]) -> Result<Value, Rejection> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(invalid(None, format!("payload of {} bytes is over the 1 MiB limit", bytes.len())));
    }
    // serde_json refuses nesting deeper than 128 levels, so hostile input cannot
    // overflow the stack here.
    serde_json::from_slice(bytes).map_err(|e| invalid(None, format!("not JSON: {e}")))
}

impl CommandRequest {
    /// Parse and validate a `{p}/cmd/{meter}` payload. Unknown fields are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self, Rejection> {
        let value = json(bytes)?;
        let f = Fields::of(&value)?;
        let id = f.id("id", CommandId::new)?;
        let action_text = f.required_str("action")?;
        let action = Action::from_wire(action_text).ok_or_else(|| Rejection {
            id: f.id.clone(),
            code: ErrorCode::UnsupportedAction,
            message: format!(
                "action {:?} is not one of disconnect, reconnect, read",
                action_text.chars().take(64).collect::<String>()
            ),
        })?;
        // An unknown reason is refused for every action: a value outside the list has
        // no defined meaning, and guessing one for a switch command is not safe.
        let reason = match f.str("reason")? {
            None => None,
            Some(r) => Some(Reason::from_wire(r).ok_or_else(|| {
                f.reject("`reason` must be one of arrears, customer_request, safety, maintenance, tamper".into())
            })?),
        };
        if action == Action::Disconnect && reason.is_none() {
            return Err(f.reject("a disconnect needs a `reason`".into()));
        }
        let override_ = match f.get("override") {
            None => None,
            Some(Value::Object(o)) => {
                let inner = Fields { obj: o, id: f.id.clone() };
                let by = inner.text("by", MAX_NAME_CHARS)?.filter(|b| !b.trim().is_empty());
                let by = by.ok_or_else(|| f.reject("`override.by` must name the person".into()))?;
                let why = inner.text("why", MAX_WHY_CHARS)?.unwrap_or_default();
                Some(Override { by, why })
            }
            Some(other) => return Err(f.reject(format!("`override` must be an object, not {}", kind(other)))),
        };
        Ok(Self {
            id,
            action,
            reason,
            operator: f.text("operator", MAX_NAME_CHARS)?,
            requested_at: f.time("requested_at")?,
            arrears_as_of: f.time("arrears_as_of")?,
            notice_sent_at: f.time("notice_sent_at")?,
            expires_at: f.time("expires_at")?,
            override_,
        })
    }

    /// The canonical JSON form (what the journal stores); [`CommandRequest::parse`] reads it back.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, enums and timestamps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// True for a disconnect for arrears, the only command the arrears gates look at.
    pub fn is_arrears_cut(&self) -> bool {
        self.action == Action::Disconnect && self.reason == Some(Reason::Arrears)
    }
}

/// An amount of money as the contract carries it: a decimal string, never a float.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Amount(String);

impl Amount {
    /// Check a decimal string: optional minus, digits, optional fraction.
    pub fn new(s: &str) -> Option<Self> {
        let body = s.strip_prefix('-').unwrap_or(s);
        let (int, frac) = body.split_once('.').unwrap_or((body, "0"));
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        (s.len() <= 32 && digits(int) && digits(frac)).then(|| Self(s.to_owned()))
    }

    /// The amount as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `{p}/payments`: a payment confirmation from billing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payment {
    /// Billing's id, the idempotency key.
    pub id: PaymentId,
    /// The account paid into.
    pub account: AccountId,
    /// How much (optional here: nothing the head-end decides depends on it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
    /// ISO 4217 code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// True when the money is cleared: only then does the head-end reconnect.
    pub cleared: bool,
    /// When billing confirmed it (default: arrival); compared with `arrears_as_of`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<Timestamp>,
}

impl Payment {
    /// Parse and validate a `{p}/payments` payload. Unknown fields are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self, Rejection> {
        let value = json(bytes)?;
        let f = Fields::of(&value)?;
        let id = f.id("id", PaymentId::new)?;
        let account = f.id("account", AccountId::new)?;
        let amount = match f.str("amount")? {
            None => None,
            Some(a) => Some(Amount::new(a).ok_or_else(|| f.reject("`amount` must be a decimal string".into()))?),
        };
        let cleared = match f.get("cleared") {
            Some(Value::Bool(b)) => *b,
            None => return Err(f.reject("missing field `cleared`".into())),
            Some(other) => return Err(f.reject(format!("`cleared` must be true or false, not {}", kind(other)))),
        };
        Ok(Self {
            id,
            account,
            amount,
            currency: f.text("currency", 16)?,
            cleared,
            confirmed_at: f.time("confirmed_at")?,
        })
    }

    /// The canonical JSON form (what the journal stores).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_rule() {
        assert!(CommandId::new("c-20261128-000731").is_ok());
        assert!(PaymentId::new(&"p".repeat(64)).is_ok());
        assert!(AccountId::new(&"a".repeat(65)).is_err());
        assert!(CommandId::new("a b").is_err());
        assert!(CommandId::new("").is_err());
    }

    #[test]
    fn timestamps_keep_offset_and_compare_by_instant() {
        let a = Timestamp::parse("2026-11-28T09:00:00+08:00").expect("valid");
        let b = Timestamp::parse("2026-11-28T01:00:00Z").expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.offset_min(), 480);
        assert_eq!(Timestamp::parse("2026-11-28T01:00:00-05:30").map(|t| t.offset_min()).ok(), Some(-330));
        assert_eq!(a.to_rfc3339(), "2026-11-28T09:00:00+08:00");
    }

    #[test]
    fn amounts_are_decimal_strings() {
        for ok in ["120.50", "0", "-3.1", "1000"] {
            assert!(Amount::new(ok).is_some(), "{ok}");
        }
        for bad in ["", "1.", ".5", "1e3", "12,50", "--1", "1.2.3"] {
            assert!(Amount::new(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn whole_readings_are_integers() {
        assert_eq!(json_number(1_234_567.0).map(|n| n.to_string()), Some("1234567".into()));
        assert_eq!(json_number(1.5).map(|n| n.to_string()), Some("1.5".into()));
        assert_eq!(json_number(f64::NAN), None);
    }
}
