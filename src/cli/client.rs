//! `headend cut | restore | read | pay`: the dispatch desk's and billing's verbs. They speak
//! the MQTT contract (spec/mqtt-api.md) to the daemon through the broker, as any
//! integrator would, and wait for the outcome.
//!
//! Exit status: 0 succeeded, and also `armed` (the head-end did all it can; the customer
//! must press the meter's button, which is printed loudly and is `"outcome": "armed"` in
//! JSON: re-running cannot do more, so it is not an error); 1 any other final status
//! (rejected, failed, expired, superseded; a refused payment or a reconnect that did not
//! succeed); 2 bad input or configuration, checked locally with the contract's own types
//! before anything is sent; 3 the broker could not be reached, refused us, or did not
//! acknowledge the request; 4 no final status within `--timeout` (a `deferred` command is
//! safely journaled and runs at `not_before`).
//!
//! Order: subscribe to the answer topics and wait for the SUBACK before publishing (QoS 1,
//! until the PUBACK), so no answer can slip past. The verbs send no `requested_at`, so a
//! re-run with the same `--id` has the same content and the daemon answers it as a repeat
//! (its latest status, `duplicate: true`) instead of refusing it as `duplicate_id`; that
//! is also what makes it safe to publish the request again after a lost connection.

mod link;
mod pay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args};
use serde_json::json;
use tokio::time::Instant;

use headend::config::{MqttConfig, SiteConfig};
use headend::contract::{
    Action, CommandId, CommandRequest, Override, Reason, ResultMessage, Status, Supersessor, Timestamp, Topics,
};
use headend::meter::MeterId;
use headend::mqtt::{self, BrokerUrl, ConnectOptions, Session};
use headend::time::{Clock, SystemClock};

use link::Link;
pub use pay::pay;

const EXIT_FAILED: u8 = 1;
const EXIT_INPUT: u8 = 2;
const EXIT_BROKER: u8 = 3;
const EXIT_TIMEOUT: u8 = 4;
/// Longest `--timeout`: 30 days (and far from where `Instant + Duration` would overflow).
const MAX_TIMEOUT_S: u64 = 30 * 86_400;

/// The exit status, in every verb's `--help`.
const EXIT_HELP: &str = "Exit status: 0 succeeded, or armed (the customer must press the meter's button: \
printed, and \"outcome\": \"armed\" in JSON); 1 another final status (rejected, failed, expired, superseded) \
or a refused payment; 2 bad input or configuration (nothing sent); 3 broker unreachable or no \
acknowledgement; 4 no final status within --timeout (deferred: safely journaled, runs at not_before). \
Re-running with the same --id is always safe.";

/// Flags every client verb takes.
#[derive(Args, Debug)]
pub struct Common {
    /// Site configuration; only its [mqtt] section is read (broker, prefix, username,
    /// password_file, ca_file), so no meter key files are needed. Default: ./site.toml.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Broker URL, overriding the configuration: mqtt://host:port or mqtts://host:port.
    #[arg(long)]
    broker: Option<String>,
    /// Topic prefix {p}, overriding the configuration.
    #[arg(long)]
    prefix: Option<String>,
    /// Seconds to wait for a final status.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Print one JSON object on stdout at the end; progress lines go to stderr.
    #[arg(long)]
    json: bool,
}

/// `headend cut METER --reason ...`.
#[derive(Args, Debug)]
#[command(after_help = EXIT_HELP)]
pub struct CutArgs {
    /// The meter to disconnect.
    meter: String,
    /// arrears, customer_request, safety, maintenance or tamper.
    #[arg(long)]
    reason: String,
    /// For arrears: when the customer was notified (RFC 3339 with offset).
    #[arg(long)]
    notice_sent_at: Option<String>,
    /// For arrears: when the arrears list behind this cut was computed (RFC 3339).
    #[arg(long)]
    arrears_as_of: Option<String>,
    /// Who asks, for the audit record (e.g. 95598/wang.li).
    #[arg(long)]
    operator: Option<String>,
    /// A named person lifting the time-window policy for this one command.
    #[arg(long, requires = "override_why")]
    override_by: Option<String>,
    /// Why the window is lifted (with --override-by).
    #[arg(long, requires = "override_by")]
    override_why: Option<String>,
    /// Give up (status expired) if not done by then (RFC 3339).
    #[arg(long)]
    expires_at: Option<String>,
    /// The command id, the idempotency key: a re-run with the same id never acts twice.
    /// Default: generated (cli-<unix ms>-<random hex>) and printed.
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `headend restore METER`.
#[derive(Args, Debug)]
#[command(after_help = EXIT_HELP)]
pub struct RestoreArgs {
    /// The meter to reconnect.
    meter: String,
    /// Who asks, for the audit record.
    #[arg(long)]
    operator: Option<String>,
    /// The command id (default: generated).
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `headend read METER`.
#[derive(Args, Debug)]
#[command(after_help = EXIT_HELP)]
pub struct ReadArgs {
    /// The meter to read (relay state and active energy, now).
    meter: String,
    /// The command id (default: generated).
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `headend pay --account ... --amount ...`.
#[derive(Args, Debug)]
#[command(after_help = EXIT_HELP)]
pub struct PayArgs {
    /// The billing account paid into.
    #[arg(long)]
    account: String,
    /// The amount as a decimal string (e.g. 120.50); never a float.
    #[arg(long)]
    amount: String,
    /// ISO 4217 currency code.
    #[arg(long, default_value = "CNY")]
    currency: String,
    /// Whether the money is cleared (only then does the head-end reconnect).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    cleared: bool,
    /// When billing confirmed the payment (RFC 3339); default: its arrival.
    #[arg(long)]
    confirmed_at: Option<String>,
    /// The payment id, billing's idempotency key (default: generated).
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `headend cut`.
pub async fn cut(a: CutArgs) -> ExitCode {
    let built = (|| {
        let meter = meter_id(&a.meter)?;
        let reason = Reason::from_wire(&a.reason).ok_or_else(|| {
            format!("--reason {:?}: use arrears, customer_request, safety, maintenance or tamper", a.reason)
        })?;
        let mut req = blank(command_id(a.id.as_deref())?, Action::Disconnect);
        req.reason = Some(reason);
        req.operator.clone_from(&a.operator);
        req.notice_sent_at = time("--notice-sent-at", a.notice_sent_at.as_deref())?;
        req.arrears_as_of = time("--arrears-as-of", a.arrears_as_of.as_deref())?;
        req.expires_at = time("--expires-at", a.expires_at.as_deref())?;
        req.override_ =
            a.override_by.clone().map(|by| Override { by, why: a.override_why.clone().unwrap_or_default() });
        Ok((meter, checked(req)?))
    })();
    command_verb(&a.common, built).await
}

/// `headend restore`.
pub async fn restore(a: RestoreArgs) -> ExitCode {
    let built = (|| {
        let meter = meter_id(&a.meter)?;
        let mut req = blank(command_id(a.id.as_deref())?, Action::Reconnect);
        req.operator.clone_from(&a.operator);
        Ok((meter, checked(req)?))
    })();
    command_verb(&a.common, built).await
}

/// `headend read`.
pub async fn read(a: ReadArgs) -> ExitCode {
    let built = (|| Ok((meter_id(&a.meter)?, checked(blank(command_id(a.id.as_deref())?, Action::Read))?)))();
    command_verb(&a.common, built).await
}

fn meter_id(text: &str) -> Result<MeterId, String> {
    MeterId::new(text).map_err(|e| format!("meter: {e}"))
}

/// A fresh id that follows the id rule: `{tag}-<unix ms>-<32 random bits in hex>`.
fn generated_id(tag: &str) -> String {
    format!("{tag}-{}-{:08x}", SystemClock.now_ms(), rand::random::<u32>())
}

fn command_id(given: Option<&str>) -> Result<CommandId, String> {
    let id = given.map_or_else(|| generated_id("cli"), str::to_owned);
    CommandId::new(&id).map_err(|e| format!("--id: {e}"))
}

fn time(flag: &str, text: Option<&str>) -> Result<Option<Timestamp>, String> {
    text.map(|t| Timestamp::parse(t).map_err(|e| format!("{flag}: {e}"))).transpose()
}

fn blank(id: CommandId, action: Action) -> CommandRequest {
    CommandRequest {
        id,
        action,
        reason: None,
        operator: None,
        requested_at: None,
        arrears_as_of: None,
        notice_sent_at: None,
        expires_at: None,
        override_: None,
    }
}

/// Run the request through the daemon's own parser, so that whatever the daemon would
/// reject (an over-long operator, an empty override name) is refused here, unsent.
fn checked(req: CommandRequest) -> Result<CommandRequest, String> {
    CommandRequest::parse(req.to_json().as_bytes()).map_err(|r| r.message)
}

/// Where progress and results go: stdout for people; stderr when stdout carries JSON.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn say(self, line: &str) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// End with an error that happened before any answer: message on stderr, and the
    /// outcome as JSON on stdout when asked for.
    fn fail(self, code: u8, outcome: &str, message: &str) -> ExitCode {
        eprintln!("error: {message}");
        if self.json {
            println!("{}", json!({"outcome": outcome, "exit_code": code, "error": message}));
        }
        ExitCode::from(code)
    }
}

/// What a verb needs to reach the daemon.
struct Settings {
    options: ConnectOptions,
    topics: Topics,
    timeout: Duration,
}

/// Read a site file for its [mqtt] and `state_dir` alone. `SiteConfig::load` would also
/// insist on every meter's key file, which a dispatch desk does not have.
pub fn read_site(path: &Path) -> Result<SiteConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut site = SiteConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    site.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(site)
}

fn settings(c: &Common) -> Result<Settings, String> {
    let timeout = Duration::try_from_secs_f64(c.timeout)
        .ok()
        .filter(|d| !d.is_zero() && d.as_secs() <= MAX_TIMEOUT_S)
        .ok_or_else(|| format!("--timeout {}: give seconds, more than 0 and at most 30 days", c.timeout))?;
    let default = Path::new("site.toml");
    let site = match &c.config {
        Some(path) => Some(read_site(path)?),
        None if default.exists() => Some(read_site(default)?),
        None if c.broker.is_some() => None,
        None => return Err("no site.toml in this directory: pass --config FILE or --broker URL".into()),
    };
    let mqtt_cfg = site.as_ref().map(|s| s.mqtt.clone()).unwrap_or_default();
    let url = match (&c.broker, &mqtt_cfg.broker) {
        (Some(url), _) | (None, Some(url)) => url.clone(),
        // No broker configured: the daemon runs its embedded one on loopback.
        (None, None) if mqtt_cfg.embedded_port != 0 => format!("mqtt://127.0.0.1:{}", mqtt_cfg.embedded_port),
        (None, None) => {
            return Err("the daemon's embedded broker has a random port (embedded_port = 0): pass --broker URL".into())
        }
    };
    if url.contains('@') {
        // Not echoed: it would carry a password. Credentials come from [mqtt].
        return Err("the broker URL must not carry credentials: set username and password_file in [mqtt]".into());
    }
    let broker = BrokerUrl::parse(&url).map_err(|e| e.to_string())?;
    let prefix = c.prefix.as_deref().unwrap_or(&mqtt_cfg.prefix);
    let topics = Topics::new(prefix).map_err(|e| e.to_string())?;
    let base_dir = site.as_ref().map(|s| s.base_dir.clone()).unwrap_or_default();
    Ok(Settings { options: client_options(&mqtt_cfg, &broker, &base_dir)?, topics, timeout })
}

fn client_options(cfg: &MqttConfig, broker: &BrokerUrl, base_dir: &Path) -> Result<ConnectOptions, String> {
    // Our own client id, never [mqtt] client_id: that one is the daemon's, and a broker
    // drops the older connection when a client id connects twice. 20 characters, inside
    // MQTT 3.1.1's guaranteed 23.
    let client_id = format!("headend-cli-{:08x}", rand::random::<u32>());
    let mut o = mqtt::options(cfg, broker, &client_id, None, base_dir).map_err(|e| e.to_string())?;
    // A clean session: a one-shot client must not leave a session behind on the broker.
    o.set_session(Session::Clean);
    Ok(o)
}

/// Outside text for a terminal: control characters (escape sequences) replaced, length capped.
fn clean(text: &str) -> String {
    text.chars().take(500).map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn status_line(r: &ResultMessage) -> String {
    let mut s = format!("{}  {:<10}", clean(&r.at), r.status.as_str());
    if let Some(relay) = r.relay {
        s.push_str(&format!(" relay {relay}"));
    }
    if r.attempts > 1 {
        s.push_str(&format!(" attempt {}", r.attempts));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(" error {}: {}", e.code, clean(&e.message)));
    }
    if let Some(nb) = &r.not_before {
        s.push_str(&format!(" not before {}", clean(nb)));
    }
    match &r.by {
        Some(Supersessor::Command(id)) => s.push_str(&format!(" by {id}")),
        Some(Supersessor::Payment(id)) => s.push_str(&format!(" by payment {id}")),
        None => {}
    }
    if r.duplicate {
        s.push_str(" (repeat: this id was seen before)");
    }
    // The status is padded for the eye; a line must not end in blanks.
    s.truncate(s.trim_end().len());
    for (obis, v) in r.registers.iter().flatten() {
        let value = v.value.as_ref().map_or_else(|| "?".to_owned(), ToString::to_string);
        s.push_str(&format!("\n      {:<16} {value} {}", clean(obis), clean(&v.unit)));
    }
    if let Some(c) = &r.meter_clock {
        s.push_str(&format!("\n      meter clock      {}", clean(c)));
    }
    s
}

fn button_note(meter: &str) -> String {
    let meter = clean(meter);
    format!(
        "{meter}: ARMED, NOT YET ON: the meter is ready for reconnection; the customer must press the button on the meter to restore supply"
    )
}

async fn command_verb(common: &Common, built: Result<(MeterId, CommandRequest), String>) -> ExitCode {
    let out = Out { json: common.json };
    let (meter, req) = match built {
        Ok(b) => b,
        Err(e) => return out.fail(EXIT_INPUT, "bad_input", &e),
    };
    let s = match settings(common) {
        Ok(s) => s,
        Err(e) => return out.fail(EXIT_INPUT, "bad_input", &e),
    };
    let until = Instant::now() + s.timeout;
    let result_topic = s.topics.result(&meter);
    let cmd_topic = s.topics.cmd(&meter);
    let mut link = match Link::open(&s, vec![result_topic.clone()], cmd_topic.clone(), req.to_json(), until).await {
        Ok(l) => l,
        Err(e) => return out.fail(EXIT_BROKER, "broker_unreachable", &e),
    };
    out.say(&format!(
        "{} {meter}: command {} published on {cmd_topic}; waiting up to {} s",
        req.action.as_str(),
        req.id,
        s.timeout.as_secs_f64()
    ));
    let mut seen: Vec<ResultMessage> = Vec::new();
    while let Some(msg) = link.next(until).await {
        if msg.topic != result_topic {
            continue;
        }
        let r = match serde_json::from_slice::<ResultMessage>(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("warning: unreadable message on {result_topic}: {e}");
                continue;
            }
        };
        if r.id.as_deref() != Some(req.id.as_str()) {
            continue; // another command for the same meter
        }
        out.say(&status_line(&r));
        let done = r.status.is_final();
        seen.push(r);
        if done {
            break;
        }
    }
    link.close().await;
    conclude_command(out, &meter, &req, &seen, s.timeout)
}

fn conclude_command(
    out: Out,
    meter: &MeterId,
    req: &CommandRequest,
    seen: &[ResultMessage],
    wait: Duration,
) -> ExitCode {
    let last = seen.last();
    let follow = format!("re-run with --id {} to follow it", req.id);
    let secs = wait.as_secs_f64();
    let (code, outcome, text) = match last.map(|r| r.status) {
        Some(Status::Succeeded) => {
            let relay = last.and_then(|r| r.relay).map(|r| format!(": relay {r}")).unwrap_or_default();
            (0, "succeeded", format!("{meter}: {} succeeded{relay}", req.action.as_str()))
        }
        Some(Status::Armed) => (0, "armed", button_note(meter.as_str())),
        Some(st) if st.is_final() => {
            let why = last.and_then(|r| r.error.as_ref()).map(|e| format!(": {}", e.code)).unwrap_or_default();
            (EXIT_FAILED, st.as_str(), format!("{meter}: {} {}{why}", req.action.as_str(), st.as_str()))
        }
        Some(Status::Deferred) => {
            let nb = last.and_then(|r| r.not_before.as_deref()).map_or_else(|| "later".to_owned(), clean);
            let text =
                format!("{meter}: deferred until {nb}; the command is safely in the journal and runs then ({follow})");
            (EXIT_TIMEOUT, "deferred", text)
        }
        Some(st) => {
            let text = format!("{meter}: no final status within {secs} s; the last was {} ({follow})", st.as_str());
            (EXIT_TIMEOUT, "timeout", text)
        }
        None => {
            let text =
                format!("{meter}: no answer within {secs} s: is the daemon running? ({follow}; the same id is safe)");
            (EXIT_TIMEOUT, "timeout", text)
        }
    };
    out.say(&text);
    if out.json {
        let summary = json!({
            "id": req.id, "meter": meter, "action": req.action, "outcome": outcome, "exit_code": code,
            "customer_must_press_button": outcome == "armed",
            "not_before": last.and_then(|r| r.not_before.clone()), "last": last, "statuses": seen,
        });
        println!("{summary}");
    }
    ExitCode::from(code)
}
