//! The site configuration: links, meters, Modbus device profiles (TOML).
//!
//! Loading checks everything that can be checked without touching a meter, so that the
//! daemon and the `meter` verbs refuse a broken file up front with a message that names
//! the file and says what to write instead.

mod checks;
pub mod diagnostics;
mod load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::collect::CollectionConfig;
use crate::command::CommandsConfig;
use crate::contract::AccountId;
use crate::meter::MeterId;
use crate::mqtt::Protocol;
use crate::policy::{PolicyConfig, Protection};
use crate::secrets::{KeyFileError, MeterKeys};
pub use checks::BAUD_RATES;
pub use diagnostics::{Diagnostic, KeyPath, Problem, Problems};

/// Default time allowed for one exchange (request sent to complete answer).
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;

fn default_drain_timeout_s() -> u64 {
    20
}

/// The whole site configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Where state that must survive restarts lives; relative to the config file.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// On SIGTERM, how long (s) exchanges in progress may take to finish before the
    /// daemon exits anyway (at most an hour); unfinished commands stay resumable in the
    /// journal.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// Physical links.
    #[serde(default, rename = "link")]
    pub links: Vec<LinkConfig>,
    /// Meters.
    #[serde(default, rename = "meter")]
    pub meters: Vec<MeterConfig>,
    /// Modbus device profiles by name.
    #[serde(default, rename = "modbus_profile")]
    pub modbus_profiles: BTreeMap<String, ModbusProfile>,
    /// Billing accounts that need more than a name: protection flags. A meter's account
    /// that is not listed here is an ordinary, unprotected account.
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountConfig>,
    /// Policy gates on disconnections (service window, notice, rate limits).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Command life-cycle settings (expiry, retries).
    #[serde(default)]
    pub commands: CommandsConfig,
    /// The MQTT broker and topic prefix. Without a `broker`, the daemon starts an embedded
    /// broker on loopback.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Interval collection: schedules, catch-up, clock checks.
    #[serde(default)]
    pub collection: CollectionConfig,
    /// `[observability]`: the HTTP endpoints (metrics, health).
    #[serde(default)]
    pub observability: crate::observe::ObservabilityConfig,
    /// The directory of the file this was loaded from (for relative paths).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Which protocol stack runs on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkProtocol {
    /// DLMS/COSEM with the IEC 62056-47 wrapper over TCP.
    DlmsWrapper,
    /// DLMS/COSEM over HDLC (serial, or TCP through a transparent gateway).
    DlmsHdlc,
    /// Modbus TCP (also RTU devices behind a TCP gateway, by unit id).
    ModbusTcp,
    /// Modbus RTU on a serial port.
    ModbusRtu,
}

impl LinkProtocol {
    /// True for the DLMS stacks.
    pub fn is_dlms(self) -> bool {
        matches!(self, Self::DlmsWrapper | Self::DlmsHdlc)
    }

    /// The name written in the file.
    pub fn name(self) -> &'static str {
        match self {
            Self::DlmsWrapper => "dlms-wrapper",
            Self::DlmsHdlc => "dlms-hdlc",
            Self::ModbusTcp => "modbus-tcp",
            Self::ModbusRtu => "modbus-rtu",
        }
    }
}

/// One physical link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// The link's name, referenced by meters.
    pub name: String,
    /// The protocol stack.
    pub protocol: LinkProtocol,
    /// TCP endpoint `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// Serial device path.
    #[serde(default)]
    pub serial: Option<String>,
    /// Serial speed.
    #[serde(default)]
    pub baud: Option<u32>,
    /// Time allowed for one exchange.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// HDLC link parameters proposed in SNRM.
    #[serde(default)]
    pub hdlc: HdlcOptions,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// HDLC parameters a head-end proposes; the meter may lower them in its UA.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HdlcOptions {
    /// Largest information field sent and accepted.
    #[serde(default = "default_max_info")]
    pub max_info: u16,
    /// Frames in flight before an acknowledgement.
    #[serde(default = "default_window")]
    pub window: u8,
    /// Retransmissions of an unanswered frame before the exchange fails.
    #[serde(default = "default_retries")]
    pub retries: u8,
}

impl Default for HdlcOptions {
    fn default() -> Self {
        Self { max_info: default_max_info(), window: default_window(), retries: default_retries() }
    }
}

fn default_max_info() -> u16 {
    128
}
fn default_window() -> u8 {
    1
}
fn default_retries() -> u8 {
    2
}

/// How a DLMS client authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthKind {
    /// No authentication (the public client).
    #[default]
    None,
    /// Low level security: a password.
    Lls,
    /// High level security with GMAC, security suite 0 (authenticated and encrypted).
    HlsGmac,
}

impl AuthKind {
    /// The name written in the file.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lls => "lls",
            Self::HlsGmac => "hls-gmac",
        }
    }
}

/// One meter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// The registry id.
    pub id: MeterId,
    /// The link it is reached over.
    pub link: String,
    /// The identity the meter must answer before it is switched.
    #[serde(default)]
    pub identity: Option<String>,
    /// The billing account (used by payment-driven reconnects).
    #[serde(default)]
    pub account: Option<String>,
    /// DLMS: wrapper destination wPort / HDLC upper (logical device) address.
    #[serde(default = "default_logical_device")]
    pub logical_device: u16,
    /// DLMS over HDLC: lower (physical device) address.
    #[serde(default)]
    pub physical_address: Option<u16>,
    /// DLMS: the client SAP (16 public, 1 management).
    #[serde(default = "default_client_sap")]
    pub client_sap: u8,
    /// DLMS authentication.
    #[serde(default)]
    pub auth: AuthKind,
    /// The key file (password or HLS keys).
    #[serde(default)]
    pub keys: Option<PathBuf>,
    /// Applied when the meter's clock gives no deviation.
    #[serde(default)]
    pub timezone_offset_minutes: Option<i16>,
    /// Modbus unit id.
    #[serde(default)]
    pub unit_id: Option<u8>,
    /// Modbus device profile name.
    #[serde(default)]
    pub modbus_profile: Option<String>,
    /// DLMS: the load profile collected from this meter (default `[collection] profile`).
    #[serde(default)]
    pub profile: Option<String>,
}

fn default_logical_device() -> u16 {
    1
}
fn default_client_sap() -> u8 {
    16
}

/// How the daemon and the client verbs reach the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`; none: an embedded broker on loopback.
    #[serde(default)]
    pub broker: Option<String>,
    /// Topic prefix `{p}` of the contract.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// MQTT client id; default `headend-{prefix}` with `/` replaced.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (never the password itself in this file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) for `mqtts://`; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Port of the embedded broker when no `broker` is set (0: any free port).
    #[serde(default = "default_embedded_port")]
    pub embedded_port: u16,
    /// MQTT version spoken to the broker: "3.1.1" (default) or "5".
    #[serde(default)]
    pub protocol: Protocol,
    /// MQTT 5: how long the broker keeps the daemon's session (subscriptions, commands
    /// and payments queued) after a disconnection, s; default: never expires, as a
    /// 3.1.1 persistent session.
    #[serde(default)]
    pub session_expiry_s: Option<u32>,
}

impl MqttConfig {
    /// What is wrong in [mqtt], each with what to write instead.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match (self.protocol, self.session_expiry_s) {
            (Protocol::V311, Some(_)) => out.push(
                "[mqtt] session_expiry_s is an MQTT 5 setting (a 3.1.1 session is kept until the broker drops it): \
                 set protocol = \"5\" or remove it"
                    .to_owned(),
            ),
            (Protocol::V5, Some(0)) => out.push(
                "[mqtt] session_expiry_s = 0 ends the session with the connection, so commands and payments \
                 published while the daemon is down are lost: remove it (never expires) or give seconds, e.g. 604800"
                    .to_owned(),
            ),
            _ => {}
        }
        if self.username.is_none() && self.password_file.is_some() {
            out.push("[mqtt] password_file without username: add username = \"...\"".to_owned());
        }
        if let Some(b) = &self.broker {
            if b.contains('@') {
                // Not echoed: it would carry a password.
                out.push("[mqtt] broker must not carry credentials: set username and password_file instead".to_owned());
            } else if let Err(e) = crate::mqtt::BrokerUrl::parse(b) {
                out.push(format!("[mqtt] {e}"));
            }
        }
        out
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: None,
            prefix: default_prefix(),
            client_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            embedded_port: default_embedded_port(),
            protocol: Protocol::default(),
            session_expiry_s: None,
        }
    }
}

fn default_prefix() -> String {
    "ami".to_owned()
}
fn default_embedded_port() -> u16 {
    1883
}

/// One billing account's flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// The account id, as billing writes it in payments.
    pub id: AccountId,
    /// Set for accounts that must never be cut for arrears (medical, life_support,
    /// hospital, guaranteed_power).
    #[serde(default)]
    pub protection: Option<Protection>,
}

/// Where a Modbus model keeps what the head-end needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusProfile {
    /// Serial number registers (ASCII, two characters per register).
    #[serde(default)]
    pub serial: Option<RegisterSpan>,
    /// Active energy import.
    #[serde(default)]
    pub energy_import: Option<ValueRegister>,
    /// Active energy export.
    #[serde(default)]
    pub energy_export: Option<ValueRegister>,
    /// The coil that switches the relay (on = connect).
    #[serde(default)]
    pub relay_coil: Option<u16>,
    /// Or a holding register that switches it.
    #[serde(default)]
    pub relay_register: Option<RelayRegister>,
    /// Where the relay state is read back.
    #[serde(default)]
    pub relay_status: Option<RelayReadback>,
    /// Clock registers: Y, M, D, h, m, s in local time.
    #[serde(default)]
    pub clock: Option<ClockRegisters>,
}

/// A run of holding registers.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpan {
    /// First register address.
    pub register: u16,
    /// How many registers.
    pub words: u16,
}

/// Which register table a value lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterTable {
    /// Function 0x03.
    #[default]
    Holding,
    /// Function 0x04.
    Input,
}

/// A numeric value in registers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRegister {
    /// First register address.
    pub register: u16,
    /// Holding or input registers.
    #[serde(default)]
    pub table: RegisterTable,
    /// Encoding.
    #[serde(rename = "type")]
    pub kind: ValueType,
    /// Order of the 16-bit words.
    #[serde(default)]
    pub word_order: WordOrder,
    /// Multiply the raw value by this to get `unit`.
    #[serde(default = "one")]
    pub scale: f64,
    /// The unit after scaling.
    pub unit: String,
}

fn one() -> f64 {
    1.0
}

/// How a value is encoded in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// Unsigned 16 bits, one register.
    U16,
    /// Unsigned 32 bits, two registers.
    U32,
    /// Signed 32 bits, two registers.
    I32,
    /// IEEE 754 single, two registers.
    F32,
    /// Unsigned 64 bits, four registers.
    U64,
}

impl ValueType {
    /// Registers occupied.
    pub fn words(self) -> u16 {
        match self {
            Self::U16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U64 => 4,
        }
    }
}

/// Word order of multi-register values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// Most significant word first (the Modbus convention).
    #[default]
    Big,
    /// Least significant word first (common in meters too).
    Little,
}

/// A holding register that switches the relay by writing a value.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRegister {
    /// Register address.
    pub register: u16,
    /// Value that connects.
    pub connect: u16,
    /// Value that disconnects.
    pub disconnect: u16,
}

/// Where the relay state is read back.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayReadback {
    /// A discrete input: 1 = closed.
    #[serde(default)]
    pub discrete_input: Option<u16>,
    /// A coil: 1 = closed.
    #[serde(default)]
    pub coil: Option<u16>,
    /// A holding register whose value `connected_value` means closed.
    #[serde(default)]
    pub register: Option<u16>,
    /// See `register`.
    #[serde(default = "one_u16")]
    pub connected_value: u16,
}

fn one_u16() -> u16 {
    1
}

/// Six holding registers with the local time.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRegisters {
    /// First register (year).
    pub register: u16,
}

/// A configuration that cannot be used, with what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Syntax, types, and everything that parses but cannot work: each problem with its
    /// line and column, and what to write instead.
    #[error("{}", diagnostics::render(path, diagnostics))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The problems, in file order.
        diagnostics: Vec<Diagnostic>,
    },
    /// A key file is missing or malformed.
    #[error(transparent)]
    Keys(#[from] KeyFileError),
}

impl SiteConfig {
    /// Read, parse and check a configuration file: every problem, each at its line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        load::load_text(&text, path)
    }

    /// Parse TOML text (no semantic checks).
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Everything wrong with this configuration, each with what to write instead; the
    /// registry's problems name their key, the sections' start with `[section]`.
    pub fn problems(&self) -> Problems {
        let mut out = Problems::default();
        checks::registry(self, &mut out);
        out.extend(self.mqtt.problems());
        out.extend(self.policy.problems());
        out.extend(self.commands.problems());
        out.extend(self.collection.problems());
        out
    }

    /// A path from the file, relative to the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The state directory, resolved.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(self.state_dir.as_deref().unwrap_or(Path::new("state")))
    }

    /// The command journal (SQLite) under the state directory.
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir().join("journal.sqlite3")
    }

    /// A meter by id.
    pub fn meter(&self, id: &str) -> Option<&MeterConfig> {
        self.meters.iter().find(|m| m.id.as_str() == id)
    }

    /// A link by name.
    pub fn link(&self, name: &str) -> Option<&LinkConfig> {
        self.links.iter().find(|l| l.name == name)
    }

    /// The keys of a meter, loaded from its key file.
    pub fn keys_of(&self, meter: &MeterConfig) -> Result<Option<MeterKeys>, KeyFileError> {
        meter.keys.as_ref().map(|k| MeterKeys::load(&self.resolve(k))).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../config/site.toml");
        let cfg = SiteConfig::parse(text).expect("example parses");
        assert_eq!(cfg.links.len(), 4);
        assert_eq!(cfg.meters.len(), 3);
        assert!(cfg.modbus_profiles.contains_key("meter-sim"));
    }

    #[test]
    fn problems_say_what_to_write() {
        let cfg = SiteConfig::parse(
            r#"
            [[link]]
            name = "a"
            protocol = "dlms-hdlc"
            [[meter]]
            id = "M1"
            link = "a"
            [[meter]]
            id = "M2"
            link = "nowhere"
            "#,
        )
        .expect("parses");
        let p = cfg.problems().join("\n");
        assert!(p.contains("neither `address` nor `serial`"), "{p}");
        assert!(p.contains("physical_address"), "{p}");
        assert!(p.contains("link \"nowhere\" is not defined; defined links: a"), "{p}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = SiteConfig::parse("[[link]]\nname = 3\n").expect_err("wrong type");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn accounts_and_policy_are_optional_with_safe_defaults() {
        let cfg = SiteConfig::parse("").expect("empty parses");
        assert!(cfg.accounts.is_empty());
        assert_eq!(cfg.policy.notice_hours, 72);
        assert!(cfg.problems().is_empty());
        let cfg = SiteConfig::parse(
            r#"
            [[account]]
            id = "ACC-1"
            protection = "life_support"
            [policy]
            utc_offset_minutes = 480
            notice_hours = 120
            [policy.window]
            days = ["mon", "tue"]
            start = "08:30"
            end = "17:00"
            holidays = ["2026-10-01"]
            [policy.rate]
            global_per_hour = 100
            [commands]
            default_expiry_s = 3600
            "#,
        )
        .expect("parses");
        assert_eq!(cfg.accounts[0].protection, Some(Protection::LifeSupport));
        assert_eq!(cfg.policy.window.days.len(), 2);
        assert_eq!(cfg.policy.rate.global_per_hour, 100);
        assert_eq!(cfg.policy.rate.channel_burst, 10);
        assert_eq!(cfg.commands.default_expiry_s, 3600);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    }

    #[test]
    fn unusable_policy_is_refused() {
        let cfg =
            SiteConfig::parse("[policy.window]\ndays = []\nstart = \"16:00\"\nend = \"09:00\"\n").expect("parses");
        let p = cfg.problems().join("\n");
        assert!(p.contains("days is empty"), "{p}");
        assert!(p.contains("start must be before end"), "{p}");
        assert!(SiteConfig::parse("[policy.window]\nholidays = [\"2026-02-30\"]\n").is_err());
        assert!(SiteConfig::parse("[policy.window]\nstart = \"9am\"\n").is_err());
    }

    #[test]
    fn bad_ids_are_refused() {
        let err = SiteConfig::parse("[[meter]]\nid = \"no spaces\"\nlink = \"x\"\n").expect_err("bad id");
        assert!(err.contains("invalid id"), "{err}");
    }

    #[test]
    fn mqtt_protocol_defaults_to_311_and_5_takes_a_session_expiry() {
        let cfg = SiteConfig::parse("[mqtt]\nbroker = \"mqtt://b:1883\"\n").expect("parses");
        assert_eq!(cfg.mqtt.protocol, Protocol::V311);
        assert_eq!(cfg.mqtt.session_expiry_s, None);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let cfg = SiteConfig::parse("[mqtt]\nprotocol = \"5\"\nsession_expiry_s = 86400\n").expect("parses");
        assert_eq!((cfg.mqtt.protocol, cfg.mqtt.session_expiry_s), (Protocol::V5, Some(86_400)));
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    }

    #[test]
    fn mqtt_problems_say_what_to_write() {
        let err = SiteConfig::parse("[mqtt]\nprotocol = \"3.1\"\n").expect_err("no such version");
        assert!(err.contains("line 2") && err.contains(r#"protocol = "3.1.1" or protocol = "5""#), "{err}");
        let problems = |text: &str| SiteConfig::parse(text).expect("parses").problems().join("\n");
        let p = problems("[mqtt]\nsession_expiry_s = 60\n");
        assert!(p.contains("MQTT 5 setting") && p.contains(r#"protocol = "5""#), "{p}");
        let p = problems("[mqtt]\nprotocol = \"5\"\nsession_expiry_s = 0\n");
        assert!(p.contains("session_expiry_s = 0") && p.contains("lost"), "{p}");
        let p = problems("[mqtt]\npassword_file = \"pw\"\n");
        assert!(p.contains("without username"), "{p}");
        let p = problems("[mqtt]\nbroker = \"tcp://b:1883\"\n");
        assert!(p.contains("expected mqtt://host:port"), "{p}");
        let p = problems("[mqtt]\nbroker = \"mqtt://u:hunter2@b:1883\"\n");
        assert!(p.contains("must not carry credentials") && !p.contains("hunter2"), "{p}");
    }
}
