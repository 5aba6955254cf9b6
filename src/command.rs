//! A command's life, sans-IO: accepted → deferred → executing → retrying → a final status.
//!
//! The [`Engine`] holds every command that has not ended, one relay intent per meter,
//! the policy state and what it knows of each meter's relay. The daemon feeds it
//! [`Input`]s with the time they happened and carries out the [`Output`]s, in this
//! order: write every [`Output::Persist`] of one `handle` call to the journal in one
//! commit, then publish and execute the rest. So a status is in the journal before
//! anyone hears of it, and a republish for a repeated id always finds it there.
//!
//! Rules kept here: at most one relay command runs per meter; the newest intent wins
//! and a waiting one it replaces ends `superseded`; a command in the middle of an
//! attempt is never interrupted, the newer one waits for it. A cleared payment voids
//! waiting arrears cuts of the account and reconnects every meter whose present
//! disconnection was for arrears, and only those. A command found executing after a
//! restart is first re-verified by reading the relay, so a restart never switches twice
//! blindly.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;

use crate::contract::{
    format_at, json_number, AccountId, Action, CommandId, CommandRequest, ErrorBody, ErrorCode, Payment, PaymentId,
    Reason, RegisterValue, ResultMessage, Status, Supersessor, Timestamp, Trigger,
};
use crate::meter::{MeterError, MeterId, Reading, RelayState, SwitchOutcome};
use crate::policy::{ArrearsCase, Arrival, Gate, Policy, PolicyConfig, QuarantineEvent, QuarantineState, Registry};

/// `[commands]`: expiry and retry settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// `expires_at` of a command that gives none: arrival + this (default 24 h).
    pub default_expiry_s: u64,
    /// Expiry of payment-driven reconnects (default 7 days: a paying customer's
    /// reconnect keeps being tried long after an operator's command would give up).
    pub payment_reconnect_expiry_s: u64,
    /// First retry delay after a failed attempt (default 5 s).
    pub retry_initial_s: u64,
    /// Retry delays double up to this (default 300 s).
    pub retry_max_s: u64,
    /// An attempt whose answer has not come back after this long is taken as failed on
    /// its link (default 120 s: a switch is five exchanges plus opening the link and an
    /// association, each bounded by the link's timeout). A channel actor that died, or
    /// hangs, then cannot hold a command or its link forever.
    pub attempt_timeout_s: u64,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            default_expiry_s: 86_400,
            payment_reconnect_expiry_s: 7 * 86_400,
            retry_initial_s: 5,
            retry_max_s: 300,
            attempt_timeout_s: 120,
        }
    }
}

impl CommandsConfig {
    /// What cannot work.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.default_expiry_s == 0 || self.payment_reconnect_expiry_s == 0 {
            out.push("[commands] expiry values must be at least 1 second".into());
        }
        if self.attempt_timeout_s == 0 {
            out.push("[commands] attempt_timeout_s must be at least 1 second".into());
        }
        if self.retry_initial_s == 0 || self.retry_max_s < self.retry_initial_s {
            out.push("[commands] retry_initial_s must be at least 1 and at most retry_max_s".into());
        }
        out
    }

    /// The wait after the `attempts`-th failed attempt: exponential, capped.
    pub fn backoff_ms(&self, attempts: u32) -> i64 {
        let shift = attempts.saturating_sub(1).min(30);
        let s = self.retry_initial_s.saturating_mul(1 << shift).min(self.retry_max_s);
        i64::try_from(s).unwrap_or(i64::MAX / 1000).saturating_mul(1000)
    }
}

fn secs_ms(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX / 1000).saturating_mul(1000)
}

/// A command the head-end has taken: from MQTT, or derived from a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The meter (from the topic).
    pub meter: MeterId,
    /// The validated request.
    pub request: CommandRequest,
    /// When it arrived, Unix ms.
    pub received_ms: i64,
    /// When it gives up, Unix ms (its `expires_at`, else arrival + the default).
    pub expires_ms: i64,
    /// The payment behind a derived reconnect.
    pub trigger: Option<PaymentId>,
}

impl Command {
    /// A command received over MQTT.
    pub fn new(meter: MeterId, request: CommandRequest, received_ms: i64, cfg: &CommandsConfig) -> Self {
        let expires_ms = request
            .expires_at
            .map_or_else(|| received_ms.saturating_add(secs_ms(cfg.default_expiry_s)), Timestamp::unix_ms);
        Self { meter, request, received_ms, expires_ms, trigger: None }
    }

    /// Its id.
    pub fn id(&self) -> &CommandId {
        &self.request.id
    }

    /// Same id with the same content: a repeat, not a conflict. Arrival time does not
    /// count, so a resent command without `requested_at` is still the same command.
    pub fn same_content(&self, meter: &MeterId, request: &CommandRequest) -> bool {
        &self.meter == meter && &self.request == request
    }

    fn arrears_as_of_ms(&self) -> i64 {
        let r = &self.request;
        r.arrears_as_of.or(r.requested_at).map_or(self.received_ms, Timestamp::unix_ms)
    }
}

/// The id of the reconnect a payment makes for a meter: `pay:{payment}:{meter}` when it
/// fits in 64 characters, else `pay:` + a 64-bit FNV-1a hash of both + as much of the
/// meter id as fits. Deterministic, so a replayed payment derives the same ids.
pub fn derived_command_id(payment: &PaymentId, meter: &MeterId) -> CommandId {
    let readable = format!("pay:{payment}:{meter}");
    if readable.len() <= 64 {
        return CommandId::from_valid(readable);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in payment.as_str().bytes().chain([b'\n']).chain(meter.as_str().bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let tail: String = meter.as_str().chars().take(64 - 21).collect();
    CommandId::from_valid(format!("pay:{h:016x}:{tail}"))
}

/// What the channel actor is asked to do on a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Check identity, open the relay, read it back.
    Disconnect,
    /// Check identity, close (or arm) the relay, read it back.
    Reconnect,
    /// Read the relay, energy registers and clock.
    Read,
    /// Only read the relay: recovery of a command that was executing at a restart.
    VerifyRelay,
}

/// One request to the channel actor (control lane). Its answer comes back as
/// [`Input::Executed`] with the same command and attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// The command.
    pub command: CommandId,
    /// The meter.
    pub meter: MeterId,
    /// Attempt number, to match the answer.
    pub attempt: u32,
    /// What to do.
    pub op: Op,
}

/// What a `read` found.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadResult {
    /// The relay.
    pub relay: RelayState,
    /// Registers read.
    pub registers: Vec<Reading>,
    /// The meter's clock as it wrote it.
    pub meter_clock: Option<String>,
}

/// How an execution ended.
#[derive(Debug)]
pub enum Outcome {
    /// A switch done and read back (for Disconnect / Reconnect).
    Switched(SwitchOutcome),
    /// The relay as read (for VerifyRelay).
    Relay(RelayState),
    /// A read (for Read).
    Read(ReadResult),
    /// The exchange failed.
    Error(MeterError),
}

/// Something that happened, for [`Engine::handle`].
#[derive(Debug)]
pub enum Input {
    /// A new command, already durable in the journal (its id was not seen before).
    Command(Command),
    /// A new payment, already durable (or one seen before as not cleared, now cleared).
    Payment {
        /// The payment.
        payment: Payment,
        /// When it arrived, Unix ms.
        received_ms: i64,
    },
    /// The channel actor's answer to an [`Execution`].
    Executed {
        /// The command.
        command: CommandId,
        /// The attempt it answers.
        attempt: u32,
        /// How it went.
        outcome: Outcome,
    },
    /// Time passed: run what is due (call at [`Engine::next_wakeup`]).
    Tick,
    /// An operator lifts the disconnect quarantine.
    LiftQuarantine {
        /// Who.
        by: String,
        /// Why.
        why: String,
    },
}

/// One status change of one command, as the journal keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRecord {
    /// The command.
    pub command: CommandId,
    /// Its meter.
    pub meter: MeterId,
    /// The new status.
    pub status: Status,
    /// Attempts so far.
    pub attempts: u32,
    /// When the engine wants to look at it again (deferred / retrying), Unix ms.
    pub wake_ms: Option<i64>,
    /// When, Unix ms.
    pub at_ms: i64,
    /// The message published for it (the latest one is what a repeat republishes).
    pub message: ResultMessage,
}

/// What the head-end knows of a meter's relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterRecord {
    /// The meter.
    pub meter: MeterId,
    /// The relay as last read.
    pub relay: RelayState,
    /// Why the head-end cut it, while it is cut (what a payment looks at).
    pub cut_reason: Option<Reason>,
    /// Since when the relay is where it is, Unix ms.
    pub since_ms: Option<i64>,
}

/// What must be in the journal before the rest of a batch's outputs are acted on.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A command the engine made (payment-driven reconnect).
    Command(Command),
    /// A command's status change.
    Status(StatusRecord),
    /// A meter's relay knowledge changed.
    Meter(MeterRecord),
    /// A cleared payment was acted on: committed with the reconnects it derived, so that
    /// recovery feeds again exactly the payments whose reconnects were lost.
    PaymentProcessed(PaymentId),
    /// The quarantine tripped or was lifted.
    Quarantine(QuarantineEvent),
    /// An audit entry that is not a status of a stored command (a duplicate_id refusal,
    /// a repeat, unparseable input).
    Note {
        /// The meter (raw topic text when the topic's meter id was invalid).
        meter: String,
        /// What was published.
        message: ResultMessage,
    },
}

/// What the daemon must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Write to the journal; all of one batch in one commit, before anything else.
    Persist(Record),
    /// Publish on `{p}/result/{meter}`.
    Publish {
        /// The meter.
        meter: MeterId,
        /// The message.
        message: ResultMessage,
    },
    /// Hand to the meter's channel actor, control lane.
    Execute(Execution),
}

/// A command that had not ended when the daemon stopped, as the journal returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCommand {
    /// The command.
    pub command: Command,
    /// Its last status.
    pub status: Status,
    /// Attempts made.
    pub attempts: u32,
    /// When it was to be looked at again.
    pub wake_ms: Option<i64>,
    /// The last message recorded for it; None when the daemon stopped between taking
    /// the command and recording `accepted` (restore then publishes `accepted`).
    pub latest: Option<ResultMessage>,
}

/// Everything the engine needs back after a restart.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Non-final commands in acceptance order.
    pub commands: Vec<StoredCommand>,
    /// Meters' relay knowledge.
    pub meters: Vec<MeterRecord>,
    /// Latest cleared payment's `confirmed_at` per account, Unix ms.
    pub cleared: Vec<(AccountId, i64)>,
    /// The quarantine, if it was on.
    pub quarantine: Option<QuarantineState>,
    /// Cleared payments whose reconnects were never committed (a crash between the
    /// payment's commit and its records'), with their arrival time: fed again.
    pub payments: Vec<(Payment, i64)>,
}

/// The answer to a command whose id the journal has seen: the latest status again with
/// `duplicate: true` when the content is the same, else `rejected` with `duplicate_id`.
pub fn answer_repeat(
    meter: &MeterId,
    request: &CommandRequest,
    same_content: bool,
    latest: Option<&ResultMessage>,
    now_ms: i64,
    offset_min: i16,
) -> ResultMessage {
    match latest {
        Some(l) if same_content => l.as_duplicate(),
        _ => {
            let mut m = ResultMessage::new(
                Some(request.id.to_string()),
                meter.as_str(),
                Status::Rejected,
                format_at(now_ms, offset_min),
            );
            m.action = Some(request.action);
            m.duplicate = true;
            m.error = Some(ErrorBody::new(ErrorCode::DuplicateId, "this id was used before for a different command"));
            m
        }
    }
}

/// The engine's view of one command that has not ended.
#[derive(Debug, Clone)]
struct Live {
    cmd: Command,
    status: Status,
    attempts: u32,
    /// The attempt in flight and what it does.
    running: Option<(u32, Op)>,
    /// When the attempt in flight is given up on if no answer came.
    deadline_ms: Option<i64>,
    /// Waiting in its link's queue for the link to be free.
    queued: bool,
    wake_ms: Option<i64>,
    not_before_ms: Option<i64>,
    /// A rate-limit slot booked for it (deferred until then).
    booked_ms: Option<i64>,
    /// Executing at a restart: read the relay before anything else.
    needs_verify: bool,
    last_error: Option<ErrorBody>,
    latest: Option<ResultMessage>,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    relay: Option<RelayState>,
    cut_reason: Option<Reason>,
    since_ms: Option<i64>,
    /// The relay intent that runs, or runs first.
    current: Option<CommandId>,
    /// A newer intent waiting for `current`'s attempt to end (only while it runs).
    next: Option<CommandId>,
}

/// What the engine knows of a meter, for `{p}/state/{meter}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterView {
    /// The relay as last read.
    pub relay: RelayState,
    /// Why the head-end cut it, while cut.
    pub cut_reason: Option<Reason>,
    /// Since when, Unix ms.
    pub since_ms: Option<i64>,
}

/// Extra fields of a status message.
#[derive(Default)]
struct Extra {
    error: Option<ErrorBody>,
    by: Option<Supersessor>,
    trigger: Option<PaymentId>,
    registers: Option<BTreeMap<String, RegisterValue>>,
    meter_clock: Option<String>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> Extra {
    Extra { error: Some(ErrorBody::new(code, message)), ..Extra::default() }
}

/// Turn-taking on one link: at most one attempt in flight, so that everything about a
/// command (its turn, expiry, policy gates, supersede, a payment voiding it) is decided
/// when the link is free to run it, not when it was queued behind slow meters.
#[derive(Debug, Clone, Default)]
struct LinkTurn {
    /// The command whose attempt is on the link.
    busy: Option<CommandId>,
    /// Waiting reconnects: they go first (a paying customer is without power).
    first: std::collections::VecDeque<CommandId>,
    /// Everything else waiting, in arrival order.
    rest: std::collections::VecDeque<CommandId>,
}

/// The command life-cycle state machine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: CommandsConfig,
    registry: Registry,
    policy: Policy,
    live: HashMap<CommandId, Live>,
    slots: HashMap<MeterId, Slot>,
    timers: BTreeSet<(i64, CommandId)>,
    cleared: HashMap<AccountId, i64>,
    /// Per link (the registry's channel): see [`LinkTurn`].
    links: HashMap<String, LinkTurn>,
}

mod links;
mod restore;
mod run;
