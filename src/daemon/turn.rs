//! One turn of the daemon's loop: every input ready at once (commands and payments from
//! the broker, channels' answers, due timers) is taken together.
//!
//! 1. Every new command and payment is written in one journal job ([`Journal::accept_all`]).
//! 2. The engine handles each input in order; its records, and every message that
//!    announces them (results, payment outcomes, the meters' states as the turn left
//!    them), are committed in one more job ([`Journal::commit`]), messages into the
//!    publish outbox.
//! 3. Only then: the messages go to the publisher task, work goes to the channels, and
//!    the inbound messages are acknowledged to the broker.
//!
//! So a burst costs two commits per turn instead of about three per command, and nothing
//! is heard of, run or acknowledged before it is durable.
//!
//! [`Journal::accept_all`]: crate::journal::Journal::accept_all
//! [`Journal::commit`]: crate::journal::Journal::commit

use std::collections::{HashMap, HashSet};

use tokio::sync::mpsc;

use super::{json, publish, Daemon, DaemonError, FromBroker};
use crate::command::{answer_repeat, Command, Execution, Input, Output, Record};
use crate::contract::{
    format_at, CommandRequest, ErrorBody, ErrorCode, Inbound, Payment, PaymentId, PaymentOutcome, PaymentReconnect,
    Rejection, ResultMessage, MAX_PAYLOAD,
};
use crate::journal::{Accepted, Arrival, JournalError, OutMessage, PaymentAccepted, Pending, Taken};
use crate::meter::MeterId;
use crate::mqtt::Message;
use crate::observe;

/// What one turn produced, carried out after its commit.
#[derive(Default)]
pub(super) struct Turn {
    records: Vec<Record>,
    messages: Vec<OutMessage>,
    executes: Vec<Execution>,
    acks: Vec<Message>,
    /// Meters whose state is published with the commit, as the turn left them.
    states: Vec<MeterId>,
    states_seen: HashSet<MeterId>,
    /// The latest message of each command in this turn: a repeat of a command first
    /// seen in the same turn finds it here (the journal's copy is older).
    latest: HashMap<String, ResultMessage>,
}

impl Turn {
    fn state(&mut self, meter: MeterId) {
        if self.states_seen.insert(meter.clone()) {
            self.states.push(meter);
        }
    }

    fn message<T: serde::Serialize>(&mut self, topic: String, msg: &T) {
        let payload = json(msg);
        if payload.len() > MAX_PAYLOAD {
            tracing::error!(%topic, "message larger than the contract allows; not published");
            return;
        }
        self.messages.push(OutMessage { topic, payload, retain: false });
    }
}

/// An inbound message, sorted before the journal is asked.
enum Kind {
    /// A valid command for a registered meter: taken by the journal.
    Command(Command),
    /// A valid payment: taken by the journal.
    Payment(Payment),
    /// Everything else, handled without a prior journal job.
    Other,
}

/// A turn whose commit is on its way.
pub(super) struct Committing {
    pending: Option<Pending<Vec<i64>>>,
    messages: Vec<OutMessage>,
    executes: Vec<Execution>,
    acks: Vec<Message>,
}

/// A turn whose commit resolved, to carry out.
pub(super) struct Committed {
    result: Result<Vec<i64>, JournalError>,
    messages: Vec<OutMessage>,
    executes: Vec<Execution>,
    acks: Vec<Message>,
}

/// A task that awaits each turn's commit in turn order and hands the turn back to the
/// loop, so that nothing of a turn is published, run or acknowledged before its commit,
/// and turns are carried out in order.
pub(super) fn spawn_committer() -> (mpsc::UnboundedSender<Committing>, mpsc::UnboundedReceiver<Committed>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Committing>();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(c) = rx.recv().await {
            let result = match c.pending {
                Some(p) => p.await,
                None => Ok(Vec::new()),
            };
            let done = Committed { result, messages: c.messages, executes: c.executes, acks: c.acks };
            if done_tx.send(done).is_err() {
                break;
            }
        }
    });
    (tx, done_rx)
}

/// Most inputs in one turn: bounds the latency of its first input.
pub(super) const MAX_TURN: usize = 1024;

fn journal_err(e: crate::journal::JournalError) -> DaemonError {
    DaemonError::Journal(e.to_string())
}

impl Daemon {
    /// Carry out one turn (see the module documentation).
    pub(super) async fn turn(&mut self, inbound: Vec<FromBroker>, answers: Vec<Input>) -> Result<(), DaemonError> {
        let now = self.now();
        let mut t = Turn::default();
        for input in answers {
            if let Input::Executed { command, attempt, outcome } = &input {
                if let Some(m) = self.note_contact(command, *attempt, outcome) {
                    t.state(m);
                }
            }
            let out = self.engine.handle(input, now);
            self.take(out, &mut t);
        }
        let mut sorted = Vec::new();
        let mut arrivals = Vec::new();
        for msg in inbound {
            match msg {
                FromBroker::Connected { session_present } => self.on_connected(session_present),
                FromBroker::Publish(p) => {
                    let kind = self.sort(&p, now, &mut t);
                    match &kind {
                        Kind::Command(c) => arrivals.push(Arrival::Command(c.clone())),
                        Kind::Payment(pay) => arrivals.push(Arrival::Payment(pay.clone(), now)),
                        Kind::Other => {}
                    }
                    sorted.push((p, kind));
                }
            }
        }
        let taken = if arrivals.is_empty() {
            Vec::new()
        } else {
            self.journal.accept_all(arrivals).await.map_err(journal_err)?
        };
        let mut taken = taken.into_iter();
        for (p, kind) in sorted {
            // A new command or payment is acknowledged as soon as it is in the journal:
            // recovery resumes it from there (a payment until its reconnects commit), and
            // the broker sends the next ones meanwhile. Anything else is acknowledged
            // after the turn's commit, when its answer is durable.
            let durable = match kind {
                Kind::Command(cmd) => match taken.next() {
                    Some(Taken::Command(a)) => {
                        let new = a == Accepted::New;
                        self.on_command(cmd, a, now, &mut t);
                        new
                    }
                    _ => return Err(DaemonError::Journal("accept_all answered out of order".into())),
                },
                Kind::Payment(pay) => match taken.next() {
                    Some(Taken::Payment(a)) => {
                        let new = matches!(a, PaymentAccepted::New | PaymentAccepted::NowCleared);
                        self.on_payment(pay, a, now, &mut t);
                        new
                    }
                    _ => return Err(DaemonError::Journal("accept_all answered out of order".into())),
                },
                Kind::Other => {
                    self.on_other(&p, now, &mut t);
                    false
                }
            };
            if durable {
                self.ack(&p);
            } else {
                t.acks.push(p);
            }
        }
        if self.engine.next_wakeup().is_some_and(|w| w <= now) {
            let out = self.engine.handle(Input::Tick, now);
            self.take(out, &mut t);
        }
        self.finish_turn(t);
        Ok(())
    }

    /// Commit the turn; it is carried out ([`Daemon::after_commit`]) once the commit
    /// resolved. The loop takes the next turn meanwhile, whose arrivals then join the
    /// same journal transaction.
    pub(super) fn finish_turn(&mut self, mut t: Turn) {
        for m in std::mem::take(&mut t.states) {
            if let Some(msg) = self.state_message(&m) {
                t.messages.push(msg);
            }
        }
        let Turn { records, messages, executes, acks, .. } = t;
        let pending =
            (!records.is_empty() || !messages.is_empty()).then(|| self.journal.commit(records, messages.clone()));
        let _ = self.committer.send(Committing { pending, messages, executes, acks });
    }

    /// A turn's commit resolved: publish, execute and acknowledge.
    pub(super) fn after_commit(&mut self, c: Committed) -> Result<(), DaemonError> {
        let seqs = c.result.map_err(journal_err)?;
        for (message, seq) in c.messages.into_iter().zip(seqs) {
            let _ = self.outbox.send(publish::Message { seq: Some(seq), message });
        }
        for w in c.executes {
            // Draining: nothing new starts; the journal keeps it for the restart.
            if !self.draining {
                self.execute(w);
            }
        }
        observe::quarantine(self.engine.policy().quarantine().is_some());
        for p in &c.acks {
            self.ack(p);
        }
        self.publish_status();
        Ok(())
    }

    /// Sort the engine's outputs into the turn.
    pub(super) fn take(&mut self, out: Vec<Output>, t: &mut Turn) {
        for o in out {
            match o {
                Output::Persist(r) => {
                    if let Record::Meter(m) = &r {
                        t.state(m.meter.clone());
                    }
                    t.records.push(r);
                }
                Output::Publish { meter, message } => {
                    observe::command_status(&message);
                    if let Some(id) = &message.id {
                        t.latest.insert(id.clone(), message.clone());
                    }
                    t.message(self.topics.result(&meter), &message);
                }
                Output::Execute(w) => t.executes.push(w),
            }
        }
    }

    fn sort(&mut self, p: &Message, now: i64, t: &mut Turn) -> Kind {
        let topic = p.topic.clone();
        match self.topics.parse_inbound(&topic) {
            Some(Inbound::Command(meter)) => self.sort_command(Some(meter), &topic, p, now, t),
            Some(Inbound::CommandBadMeter(_)) => self.sort_command(None, &topic, p, now, t),
            Some(Inbound::Payments) => match Payment::parse(&p.payload) {
                Ok(payment) => Kind::Payment(payment),
                Err(r) => {
                    let outcome = PaymentOutcome {
                        id: r.id.clone(),
                        account: None,
                        cleared: false,
                        duplicate: false,
                        reconnects: Vec::new(),
                        error: Some(ErrorBody::new(r.code, r.message)),
                    };
                    self.payment_outcome(&outcome, t);
                    Kind::Other
                }
            },
            _ => Kind::Other,
        }
    }

    /// A command that is valid for a registered meter goes to the journal; any other
    /// is answered `rejected` on the meter's result topic.
    fn sort_command(&mut self, meter: Option<MeterId>, topic: &str, p: &Message, now: i64, t: &mut Turn) -> Kind {
        let raw_meter = topic.rsplit('/').next().unwrap_or_default().to_owned();
        // `pay:` ids are the daemon's own (payment-driven reconnects): a caller taking one
        // first could block the reconnect a payment is owed.
        let parsed = CommandRequest::parse(&p.payload).and_then(|r| {
            if r.id.as_str().starts_with("pay:") {
                Err(Rejection {
                    id: Some(r.id.to_string()),
                    code: ErrorCode::InvalidPayload,
                    message: "command ids starting with `pay:` are reserved for payment-driven reconnects".into(),
                })
            } else {
                Ok(r)
            }
        });
        let rejection = match (&meter, parsed) {
            (Some(m), Ok(r)) if self.engine.registry().meter(m).is_some() => {
                return Kind::Command(Command::new(m.clone(), r, now, self.engine.config()));
            }
            (_, Err(r)) => r,
            (None, Ok(r)) => Rejection {
                id: Some(r.id.to_string()),
                code: ErrorCode::InvalidPayload,
                message: format!("{raw_meter:?} is not a valid meter id"),
            },
            (Some(m), Ok(r)) => Rejection {
                id: Some(r.id.to_string()),
                code: ErrorCode::UnknownMeter,
                message: format!("meter {m} is not in the registry"),
            },
        };
        let offset = self.site.policy.utc_offset_minutes;
        let msg = ResultMessage::for_rejection(&raw_meter, &rejection, format_at(now, offset));
        observe::command_status(&msg);
        t.records.push(Record::Note { meter: raw_meter.clone(), message: msg.clone() });
        let topic = match &meter {
            Some(m) => Some(self.topics.result(m)),
            None => self.topics.result_raw(&raw_meter),
        };
        if let Some(topic) = topic {
            t.message(topic, &msg);
        }
        Kind::Other
    }

    fn on_command(&mut self, cmd: Command, accepted: Accepted, now: i64, t: &mut Turn) {
        match accepted {
            Accepted::New => {
                let out = self.engine.handle(Input::Command(cmd), now);
                self.take(out, t);
            }
            Accepted::Seen { same_content, latest } => {
                let latest = t.latest.get(cmd.id().as_str()).cloned().or(latest.map(|b| *b));
                let offset = self.engine.offset_of(&cmd.meter);
                let msg = answer_repeat(&cmd.meter, &cmd.request, same_content, latest.as_ref(), now, offset);
                t.records.push(Record::Note { meter: cmd.meter.to_string(), message: msg.clone() });
                t.message(self.topics.result(&cmd.meter), &msg);
            }
        }
    }

    fn on_payment(&mut self, payment: Payment, accepted: PaymentAccepted, now: i64, t: &mut Turn) {
        let mut outcome = PaymentOutcome {
            id: Some(payment.id.to_string()),
            account: Some(payment.account.to_string()),
            cleared: payment.cleared,
            duplicate: false,
            reconnects: Vec::new(),
            error: None,
        };
        match accepted {
            PaymentAccepted::New | PaymentAccepted::NowCleared => {
                let out = self.engine.handle(Input::Payment { payment, received_ms: now }, now);
                outcome.reconnects = out
                    .iter()
                    .filter_map(|o| match o {
                        Output::Persist(Record::Command(c)) => {
                            Some(PaymentReconnect { id: c.id().to_string(), meter: c.meter.to_string() })
                        }
                        _ => None,
                    })
                    .collect();
                self.take(out, t);
            }
            PaymentAccepted::Duplicate => outcome.duplicate = true,
            PaymentAccepted::Conflict => {
                outcome.duplicate = true;
                outcome.error = Some(ErrorBody::new(
                    ErrorCode::DuplicateId,
                    "this payment id was used before with different content",
                ));
            }
        }
        self.payment_outcome(&outcome, t);
    }

    fn payment_outcome(&self, outcome: &PaymentOutcome, t: &mut Turn) {
        observe::payment(outcome);
        if let Some(id) = outcome.id.as_deref().and_then(|i| PaymentId::new(i).ok()) {
            t.message(format!("{}/payment/{}", self.topics.prefix(), id.as_str()), outcome);
        }
    }

    fn on_other(&mut self, p: &Message, now: i64, t: &mut Turn) {
        let topic = p.topic.as_str();
        if topic == self.admin_topic() {
            self.on_lift_quarantine(p, now, t);
        } else if topic == self.collect_topic() {
            self.on_collect_now(p);
        } else if self.topics.parse_inbound(topic).is_none() {
            tracing::debug!(%topic, "ignored");
        }
    }

    /// `{p}/admin/lift-quarantine` (an extension; the broker's ACL lets only operators
    /// publish there): `{"by": "...", "why": "..."}` lifts the disconnect quarantine. The
    /// engine records who and why in the journal.
    pub(super) fn admin_topic(&self) -> String {
        format!("{}/admin/lift-quarantine", self.topics.prefix())
    }

    fn on_lift_quarantine(&mut self, p: &Message, now: i64, t: &mut Turn) {
        #[derive(serde::Deserialize)]
        struct Lift {
            by: String,
            why: String,
        }
        let lift = serde_json::from_slice::<Lift>(&p.payload).ok().filter(|l| {
            let by = l.by.trim();
            !by.is_empty() && by.chars().count() <= 256 && !l.why.trim().is_empty() && l.why.chars().count() <= 1024
        });
        let Some(lift) = lift else {
            tracing::warn!("lift-quarantine refused: expected {{\"by\": name, \"why\": reason}}");
            return;
        };
        tracing::warn!(by = %lift.by, why = %lift.why, "quarantine lifted by an operator");
        let out = self.engine.handle(Input::LiftQuarantine { by: lift.by, why: lift.why }, now);
        self.take(out, t);
    }
}
