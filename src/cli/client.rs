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

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::{timeout_at, Instant};

use headend::config::{MqttConfig, SiteConfig};
use headend::contract::{
    AccountId, Action, Amount, CommandId, CommandRequest, ErrorBody, Override, Payment, PaymentId, Reason,
    ResultMessage, Status, Supersessor, Timestamp, Topics,
};
use headend::meter::MeterId;
use headend::mqtt::{self, BrokerUrl};
use headend::time::{Clock, SystemClock};

const EXIT_FAILED: u8 = 1;
const EXIT_INPUT: u8 = 2;
const EXIT_BROKER: u8 = 3;
const EXIT_TIMEOUT: u8 = 4;
/// Pause between reconnection attempts while the broker is away (after the request was
/// acknowledged; before that, a lost broker is exit 3).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

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

/// `{p}/payment/{id}`: what became of one payment. An extension of the contract (which
/// allows new topics and fields), published by the daemon with QoS 1, not retained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentOutcome {
    /// The payment's id (raw text, so that a refusal can echo what it read).
    pub id: String,
    /// The account, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Whether the payment is cleared (only then are meters reconnected).
    #[serde(default)]
    pub cleared: bool,
    /// True when this payment id was seen before with the same content.
    #[serde(default)]
    pub duplicate: bool,
    /// The reconnects the payment caused: the account's meters cut for arrears.
    #[serde(default)]
    pub reconnects: Vec<PaymentReconnect>,
    /// Present when the payment was refused (`duplicate_id`, `invalid_payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// One reconnect a payment caused: its derived command id and the meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentReconnect {
    /// The derived command id (see `headend::command::derived_command_id`).
    pub id: CommandId,
    /// The meter.
    pub meter: MeterId,
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
    options: MqttOptions,
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
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--timeout {}: give a positive number of seconds", c.timeout))?;
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
        (None, None) => return Err("the daemon's embedded broker has a random port (embedded_port = 0): pass --broker URL".into()),
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

fn client_options(cfg: &MqttConfig, broker: &BrokerUrl, base_dir: &Path) -> Result<MqttOptions, String> {
    // Our own client id, never [mqtt] client_id: that one is the daemon's, and a broker
    // drops the older connection when a client id connects twice. 20 characters, inside
    // MQTT 3.1.1's guaranteed 23.
    let client_id = format!("headend-cli-{:08x}", rand::random::<u32>());
    let mut o = mqtt::options(cfg, broker, &client_id, None, base_dir).map_err(|e| e.to_string())?;
    // A clean session: a one-shot client must not leave a session behind on the broker.
    o.set_clean_session(true);
    Ok(o)
}

/// One connection to the broker for one request: subscriptions first, then the publish.
struct Link {
    client: AsyncClient,
    events: EventLoop,
    filters: Vec<String>,
    topic: String,
    payload: String,
    inbox: VecDeque<Publish>,
    /// SUBACKs still due on the current connection; the publish waits for all of them.
    subacks_due: usize,
    published: bool,
    pkid: Option<u16>,
    acked: bool,
    /// A lost connection was reported since the last CONNACK (report it once).
    warned: bool,
}

impl Link {
    /// Connect, subscribe, publish; return once the broker acknowledged the publish.
    /// Errors (all exit 3) say what is known of the request's fate.
    async fn open(s: &Settings, filters: Vec<String>, topic: String, payload: String, until: Instant) -> Result<Self, String> {
        let (client, events) = AsyncClient::new(s.options.clone(), 16);
        let mut link = Self {
            client,
            events,
            filters,
            topic,
            payload,
            inbox: VecDeque::new(),
            subacks_due: 0,
            published: false,
            pkid: None,
            acked: false,
            warned: false,
        };
        let mut connected = false;
        while !link.acked {
            let event = match timeout_at(until, link.events.poll()).await {
                Err(_) if link.published => {
                    return Err("the broker did not acknowledge the request in time: it may or may not have been delivered; re-run with the same --id (safe)".into());
                }
                Err(_) => return Err("no connection to the broker in time; nothing was sent".into()),
                Ok(Err(e)) if connected => {
                    return Err(format!("lost the broker before it acknowledged the request ({e}); re-run with the same --id (safe)"));
                }
                Ok(Err(e)) => return Err(format!("cannot reach the broker: {e}; nothing was sent")),
                Ok(Ok(ev)) => ev,
            };
            connected |= matches!(event, Event::Incoming(Packet::ConnAck(_)));
            link.handle(event)?;
        }
        Ok(link)
    }

    fn handle(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                // Every connection is a new session: subscribe (again) before publishing (again).
                self.warned = false;
                self.subacks_due = self.filters.len();
                self.published = false;
                self.pkid = None;
                for f in &self.filters {
                    self.client.try_subscribe(f.clone(), QoS::AtLeastOnce).map_err(|e| e.to_string())?;
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    return Err("the broker refused to subscribe us to the answer topics (not authorised?)".into());
                }
                self.subacks_due = self.subacks_due.saturating_sub(1);
                if self.subacks_due == 0 && !self.published {
                    let payload = self.payload.clone().into_bytes();
                    self.client.try_publish(&self.topic, QoS::AtLeastOnce, false, payload).map_err(|e| e.to_string())?;
                    self.published = true;
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) if self.published && self.pkid.is_none() => self.pkid = Some(pkid),
            Event::Incoming(Packet::PubAck(ack)) if Some(ack.pkid) == self.pkid => self.acked = true,
            Event::Incoming(Packet::Publish(p)) => self.inbox.push_back(p),
            _ => {}
        }
        Ok(())
    }

    /// The next message on our subscriptions, or None at `until`. A lost connection is
    /// made again, subscribed again and the request published again: the same id makes
    /// the daemon answer with its latest status, so a final status is not missed.
    async fn next(&mut self, until: Instant) -> Option<Publish> {
        loop {
            if let Some(p) = self.inbox.pop_front() {
                return Some(p);
            }
            match timeout_at(until, self.events.poll()).await {
                Err(_) => return None,
                Ok(Ok(event)) => {
                    if let Err(e) = self.handle(event) {
                        eprintln!("warning: {e}");
                    }
                }
                Ok(Err(e)) => {
                    if !self.warned {
                        eprintln!("warning: connection to the broker lost ({e}); reconnecting");
                        self.warned = true;
                    }
                    // poll() reconnects at once; pace the attempts while the broker is away.
                    if timeout_at(until, tokio::time::sleep(RECONNECT_PAUSE)).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Say goodbye, so the broker does not log a dropped connection.
    async fn close(mut self) {
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while !matches!(self.events.poll().await, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {}
            })
            .await;
        }
    }
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
    for (obis, v) in r.registers.iter().flatten() {
        let value = v.value.as_ref().map_or_else(|| "?".to_owned(), ToString::to_string);
        s.push_str(&format!("\n      {:<16} {value} {}", clean(obis), clean(&v.unit)));
    }
    if let Some(c) = &r.meter_clock {
        s.push_str(&format!("\n      meter clock      {}", clean(c)));
    }
    s
}

fn button_note(meter: &MeterId) -> String {
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

fn conclude_command(out: Out, meter: &MeterId, req: &CommandRequest, seen: &[ResultMessage], wait: Duration) -> ExitCode {
    let last = seen.last();
    let follow = format!("re-run with --id {} to follow it", req.id);
    let secs = wait.as_secs_f64();
    let (code, outcome, text) = match last.map(|r| r.status) {
        Some(Status::Succeeded) => {
            let relay = last.and_then(|r| r.relay).map(|r| format!(": relay {r}")).unwrap_or_default();
            (0, "succeeded", format!("{meter}: {} succeeded{relay}", req.action.as_str()))
        }
        Some(Status::Armed) => (0, "armed", button_note(meter)),
        Some(st) if st.is_final() => (EXIT_FAILED, st.as_str(), format!("{meter}: {} {st}", req.action.as_str())),
        Some(Status::Deferred) => {
            let nb = last.and_then(|r| r.not_before.as_deref()).map_or_else(|| "later".to_owned(), clean);
            let text = format!("{meter}: deferred until {nb}; the command is safely in the journal and runs then ({follow})");
            (EXIT_TIMEOUT, "deferred", text)
        }
        Some(st) => {
            let text = format!("{meter}: no final status within {secs} s; the last was {st} ({follow})");
            (EXIT_TIMEOUT, "timeout", text)
        }
        None => {
            let text = format!("{meter}: no answer within {secs} s: is the daemon running? ({follow}; the same id is safe)");
            (EXIT_TIMEOUT, "timeout", text)
        }
    };
    if out.json {
        eprintln!("{text}");
        let summary = json!({
            "id": req.id, "meter": meter, "action": req.action, "outcome": outcome, "exit_code": code,
            "customer_must_press_button": outcome == "armed",
            "not_before": last.and_then(|r| r.not_before.clone()), "last": last, "statuses": seen,
        });
        println!("{summary}");
    } else {
        println!("{text}");
    }
    ExitCode::from(code)
}

fn build_payment(a: &PayArgs) -> Result<Payment, String> {
    let id = a.id.clone().unwrap_or_else(|| generated_id("cli-pay"));
    let currency_ok = a.currency.len() == 3 && a.currency.bytes().all(|b| b.is_ascii_uppercase());
    if !currency_ok {
        return Err(format!("--currency {:?}: use an ISO 4217 code such as CNY", a.currency));
    }
    let payment = Payment {
        id: PaymentId::new(&id).map_err(|e| format!("--id: {e}"))?,
        account: AccountId::new(&a.account).map_err(|e| format!("--account: {e}"))?,
        amount: Some(Amount::new(&a.amount).ok_or_else(|| format!("--amount {:?}: write a decimal like 120.50", a.amount))?),
        currency: Some(a.currency.clone()),
        cleared: a.cleared,
        confirmed_at: time("--confirmed-at", a.confirmed_at.as_deref())?,
    };
    // Through the daemon's own parser, as for commands.
    Payment::parse(payment.to_json().as_bytes()).map_err(|r| r.message)
}

/// `headend pay`.
pub async fn pay(a: PayArgs) -> ExitCode {
    let out = Out { json: a.common.json };
    let payment = match build_payment(&a) {
        Ok(p) => p,
        Err(e) => return out.fail(EXIT_INPUT, "bad_input", &e),
    };
    let s = match settings(&a.common) {
        Ok(s) => s,
        Err(e) => return out.fail(EXIT_INPUT, "bad_input", &e),
    };
    let until = Instant::now() + s.timeout;
    let p = s.topics.prefix();
    let outcome_topic = format!("{p}/payment/{}", payment.id);
    let results = format!("{p}/result/");
    let filters = vec![outcome_topic.clone(), format!("{p}/result/+")];
    let mut link = match Link::open(&s, filters, s.topics.payments(), payment.to_json(), until).await {
        Ok(l) => l,
        Err(e) => return out.fail(EXIT_BROKER, "broker_unreachable", &e),
    };
    out.say(&format!(
        "payment {} for {}: published on {}; waiting up to {} s",
        payment.id,
        payment.account,
        s.topics.payments(),
        s.timeout.as_secs_f64()
    ));
    let mut outcome: Option<PaymentOutcome> = None;
    // Statuses by command id. Results may come before the payment's own message, so until
    // then everything that may be a payment's reconnect is kept.
    let mut statuses: BTreeMap<String, Vec<ResultMessage>> = BTreeMap::new();
    loop {
        if outcome.as_ref().is_some_and(|o| settled(o, &statuses)) {
            break;
        }
        let Some(msg) = link.next(until).await else { break };
        if msg.topic == outcome_topic {
            let o = match serde_json::from_slice::<PaymentOutcome>(&msg.payload) {
                Ok(o) if o.id == payment.id.as_str() => o,
                Ok(_) => continue,
                Err(e) => {
                    link.close().await;
                    let raw = clean(&String::from_utf8_lossy(&msg.payload));
                    return out.fail(EXIT_FAILED, "unreadable", &format!("unreadable answer on {outcome_topic} ({e}): {raw}"));
                }
            };
            out.say(&outcome_line(&o));
            for r in &o.reconnects {
                let earlier = statuses.get(r.id.as_str()).into_iter().flatten();
                for m in earlier.filter(|m| m.meter == r.meter.as_str()) {
                    out.say(&format!("{:<14}{}", r.meter, status_line(m)));
                }
            }
            outcome = Some(o);
        } else if msg.topic.starts_with(&results) {
            let Ok(r) = serde_json::from_slice::<ResultMessage>(&msg.payload) else { continue };
            let Some(id) = r.id.clone() else { continue };
            let ours = match &outcome {
                Some(o) => o.reconnects.iter().any(|x| x.id.as_str() == id && x.meter.as_str() == r.meter),
                None => r.trigger.as_ref().is_some_and(|t| t.payment == payment.id) || id.starts_with("pay:"),
            };
            if !ours {
                continue;
            }
            if outcome.is_some() {
                out.say(&format!("{:<14}{}", clean(&r.meter), status_line(&r)));
            }
            statuses.entry(id).or_default().push(r);
        }
    }
    link.close().await;
    conclude_payment(out, &payment, outcome.as_ref(), &statuses, s.timeout)
}

fn last_of<'a>(statuses: &'a BTreeMap<String, Vec<ResultMessage>>, r: &PaymentReconnect) -> Option<&'a ResultMessage> {
    statuses.get(r.id.as_str()).and_then(|v| v.iter().rev().find(|m| m.meter == r.meter.as_str()))
}

fn settled(o: &PaymentOutcome, statuses: &BTreeMap<String, Vec<ResultMessage>>) -> bool {
    o.error.is_some() || !o.cleared || o.reconnects.iter().all(|r| last_of(statuses, r).is_some_and(|m| m.status.is_final()))
}

fn outcome_line(o: &PaymentOutcome) -> String {
    let repeat = if o.duplicate { " (repeat: this payment id was seen before)" } else { "" };
    match &o.error {
        Some(e) => format!("payment {}: refused: {}: {}{repeat}", clean(&o.id), e.code, clean(&e.message)),
        None if !o.cleared => format!("payment {}: recorded, not cleared: nothing changes{repeat}", clean(&o.id)),
        None if o.reconnects.is_empty() => {
            format!("payment {}: taken; no meter of this account was cut for arrears{repeat}", clean(&o.id))
        }
        None => {
            let meters: Vec<String> = o.reconnects.iter().map(|r| format!("{} ({})", r.meter, r.id)).collect();
            format!("payment {}: taken; reconnecting {}{repeat}", clean(&o.id), meters.join(", "))
        }
    }
}

fn conclude_payment(
    out: Out,
    payment: &Payment,
    outcome: Option<&PaymentOutcome>,
    statuses: &BTreeMap<String, Vec<ResultMessage>>,
    wait: Duration,
) -> ExitCode {
    let follow = format!("re-run with --id {} to follow it (the same id is safe)", payment.id);
    let mut lines = Vec::new();
    let mut reconnects = Vec::new();
    let (code, result) = match outcome {
        None => {
            lines.push(format!("no answer to payment {} within {} s: is the daemon running? ({follow})", payment.id, wait.as_secs_f64()));
            (EXIT_TIMEOUT, "timeout")
        }
        Some(o) if o.error.is_some() => (EXIT_FAILED, "refused"),
        Some(o) if !o.cleared => (0, "not_cleared"),
        Some(o) if o.reconnects.is_empty() => {
            lines.push(format!("{}: no meter of this account was cut for arrears", payment.account));
            (0, "no_reconnects")
        }
        Some(o) => {
            let mut code = 0;
            for r in &o.reconnects {
                let last = last_of(statuses, r);
                let status = last.map(|m| m.status);
                lines.push(match status {
                    Some(Status::Succeeded) => format!("{}: reconnected", r.meter),
                    Some(Status::Armed) => button_note(&r.meter),
                    Some(st) if st.is_final() => format!("{}: reconnect {st}", r.meter),
                    Some(st) => format!("{}: no final status within {} s; the last was {st}", r.meter, wait.as_secs_f64()),
                    None => format!("{}: no status within {} s", r.meter, wait.as_secs_f64()),
                });
                let this = match status {
                    Some(Status::Succeeded | Status::Armed) => 0,
                    Some(st) if st.is_final() => EXIT_FAILED,
                    _ => EXIT_TIMEOUT,
                };
                code = code.max(this);
                let all: &[ResultMessage] = statuses.get(r.id.as_str()).map_or(&[], Vec::as_slice);
                reconnects.push(json!({"id": r.id, "meter": r.meter, "status": status, "last": last, "statuses": all}));
            }
            if code == EXIT_TIMEOUT {
                lines.push(format!("payment {}: some reconnects are not final yet ({follow})", payment.id));
            }
            (code, ["reconnected", "failed", "bad_input", "bad_input", "timeout"][usize::from(code)])
        }
    };
    for l in &lines {
        out.say(l);
    }
    if out.json {
        let summary = json!({
            "id": payment.id, "account": payment.account, "outcome": result, "exit_code": code,
            "payment": outcome, "reconnects": reconnects,
        });
        println!("{summary}");
    }
    ExitCode::from(code)
}
