//! The daemon: the MQTT bridge, the command engine, the journal and the channel actors,
//! wired together.
//!
//! One task owns the engine. For every input (a command or payment from the broker, an
//! answer from a channel, a timer) it runs the engine, commits everything the engine
//! wants recorded to the journal in one transaction, and only then publishes and
//! executes. An inbound MQTT message is acknowledged to the broker only after it is in
//! the journal, and the session is persistent, so a crash at any point loses nothing:
//! either the broker redelivers it, or the journal has it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::channel::{self, ChannelHandle, ChannelMeter, LinkHealth};
use crate::collect::{self, CollectCommand, Lanes, StartArgs};
use crate::command::{answer_repeat, Command, Engine, Input, Outcome, Output, Record};
use crate::config::SiteConfig;
use crate::contract::{
    format_at, CommandRequest, ErrorBody, ErrorCode, Inbound, Payment, PaymentId, PaymentOutcome, PaymentReconnect,
    Rejection, ResultMessage, StateMessage, StatusMessage, Topics, MAX_PAYLOAD,
};
use crate::dlms::counter::CounterStore;
use crate::driver::Driver;
use crate::journal::{Accepted, Journal, PaymentAccepted};
use crate::meter::MeterId;
use crate::mqtt::{self, BrokerUrl, Client, Event, Message, QoS, Session};
use crate::observe;
use crate::policy::Registry;
use crate::time::Clock;

mod collection;
mod lifecycle;

use collection::limit_allocator_arenas;
pub(crate) use collection::release_freed_memory;

/// Why the daemon stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Configuration or broker setup.
    #[error("{0}")]
    Setup(String),
    /// The journal failed: the daemon stops rather than act on what it cannot record.
    #[error("journal: {0}")]
    Journal(String),
}

/// How to run.
pub struct DaemonOptions {
    /// Overrides the configured broker (`headend run --broker URL`).
    pub broker: Option<String>,
    /// Where "now" comes from.
    pub clock: Arc<dyn Clock>,
    /// New configurations to apply (SIGHUP): the account registry, protection flags,
    /// policy and command settings change without dropping work in progress.
    pub reload: Option<mpsc::UnboundedReceiver<SiteConfig>>,
}

enum FromBroker {
    Connected,
    Publish(Message),
}

struct Daemon {
    site: SiteConfig,
    topics: Topics,
    clock: Arc<dyn Clock>,
    journal: Journal,
    engine: Engine,
    client: Client,
    channels: HashMap<String, ChannelHandle>,
    meter_link: HashMap<MeterId, String>,
    answers: mpsc::UnboundedSender<Input>,
    /// What the state message says of each meter besides its relay: last contact, newest
    /// reading, clock drift. One map, because a fleet's worth of keys costs.
    seen: HashMap<MeterId, Seen>,
    /// Which meter each execution in flight is for (answers carry only the command).
    in_flight: HashMap<(crate::contract::CommandId, u32), MeterId>,
    published_status: Option<StatusMessage>,
    config_generation: u64,
    /// Asks the collector to collect now (`{p}/admin/collect`); None when collection is off.
    collect: Option<mpsc::UnboundedSender<CollectCommand>>,
}

/// See [`Daemon::seen`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    /// Last exchange that got an answer, Unix ms.
    last_ms: Option<i64>,
    /// Newest stored reading, Unix s.
    reading_s: Option<i64>,
    /// The meter's clock minus the head-end's, s.
    drift_s: Option<i64>,
}

/// Run until `shutdown` is cancelled.
pub async fn run(site: SiteConfig, opts: DaemonOptions, shutdown: CancellationToken) -> Result<(), DaemonError> {
    limit_allocator_arenas();
    let setup = |e: String| DaemonError::Setup(e);
    let topics = Topics::new(&site.mqtt.prefix).map_err(|e| setup(format!("[mqtt] prefix: {e:?}")))?;
    std::fs::create_dir_all(site.state_dir()).map_err(|e| setup(format!("{}: {e}", site.state_dir().display())))?;
    let endpoints = observe::bind(&site.observability).await.map_err(|e| setup(e.to_string()))?;
    let journal = Journal::open(&site.journal_path()).map_err(|e| DaemonError::Journal(e.to_string()))?;
    let recovered = journal.recover().await.map_err(|e| DaemonError::Journal(e.to_string()))?;
    let now = opts.clock.now_ms();
    let (engine, restored) =
        Engine::restore(site.commands.clone(), Registry::from_config(&site), site.policy.clone(), recovered, now);

    // Channels: one per link, with the drivers of its meters.
    let (answers, mut answers_rx) = mpsc::unbounded_channel();
    let counters = CounterStore::new(site.state_dir().join("invocation-counters"));
    let mut by_link: HashMap<String, Vec<ChannelMeter>> = HashMap::new();
    let mut meter_link = HashMap::new();
    for m in &site.meters {
        let driver = Driver::from_config(&site, m, counters.clone()).map_err(|e| setup(e.to_string()))?;
        meter_link.insert(m.id.clone(), m.link.clone());
        by_link.entry(m.link.clone()).or_default().push(ChannelMeter {
            id: m.id.clone(),
            identity: m.identity.clone(),
            driver,
        });
    }
    let channel_stop = CancellationToken::new();
    let lanes = site.collection.enabled.then(|| Lanes::new(&site.collection, Arc::clone(&opts.clock)));
    let mut channels = HashMap::new();
    let mut channel_tasks = Vec::new();
    for link in &site.links {
        let meters = by_link.remove(&link.name).unwrap_or_default();
        let lane = lanes.as_ref().map(Lanes::lane);
        let (handle, task) = channel::spawn(link.clone(), meters, answers.clone(), lane, channel_stop.clone());
        channels.insert(link.name.clone(), handle);
        channel_tasks.push(task);
    }

    // The broker.
    let url = match opts.broker.clone().or_else(|| site.mqtt.broker.clone()) {
        Some(u) => BrokerUrl::parse(&u).map_err(|e| setup(e.to_string()))?,
        None => {
            let port = mqtt::start_embedded_with(site.mqtt.embedded_port, site.mqtt.protocol)
                .map_err(|e| setup(e.to_string()))?;
            tracing::info!(port, "no broker configured: embedded broker on 127.0.0.1");
            BrokerUrl { host: "127.0.0.1".into(), port, tls: false }
        }
    };
    let client_id =
        site.mqtt.client_id.clone().unwrap_or_else(|| format!("headend-{}", site.mqtt.prefix.replace('/', "-")));
    let will = (topics.status(), json(&StatusMessage::last_will()));
    let mut mqtt_opts =
        mqtt::options(&site.mqtt, &url, &client_id, Some(will), &site.base_dir).map_err(|e| setup(e.to_string()))?;
    // A persistent session: commands published while the daemon is down wait at the broker.
    mqtt_opts.set_session(Session::Persistent);
    mqtt_opts.set_manual_acks(true);
    mqtt_opts.set_inflight(100);
    tracing::info!(protocol = %mqtt_opts.protocol(), host = %url.host, port = url.port, tls = url.tls, "broker");
    let (client, mut eventloop) = mqtt::connect(mqtt_opts, 1024);
    // Readings go over a connection of their own (see `collect::outbox`).
    let collect_stop = CancellationToken::new();
    let mut collection = match lanes {
        Some(lanes) => {
            let ropts = mqtt::options(&site.mqtt, &url, &format!("{client_id}-readings"), None, &site.base_dir)
                .map_err(|e| setup(e.to_string()))?;
            let args = StartArgs {
                site: &site,
                channels: channels.clone(),
                journal: journal.clone(),
                clock: Arc::clone(&opts.clock),
                mqtt: ropts,
                topics: topics.clone(),
            };
            Some(collect::start(args, lanes, collect_stop.clone()))
        }
        None => None,
    };
    let sources = observe::Sources::new(
        &journal,
        site.journal_path(),
        channels.values(),
        collection.as_ref().map(|c| &c.metrics),
        &opts.clock,
    );
    let endpoints = endpoints.map(|e| e.serve(sources));
    let mut notes = collection.as_mut().map(|c| std::mem::replace(&mut c.notes, mpsc::unbounded_channel().1));
    let (from_broker_tx, mut from_broker) = mpsc::unbounded_channel();
    // The connection outlives the main loop: the drain still publishes, and the session
    // ends with a DISCONNECT (see `lifecycle`).
    let poll_stop = CancellationToken::new();
    let poller_stop = poll_stop.clone();
    let poller = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                _ = poll_stop.cancelled() => break,
                e = eventloop.poll() => e,
            };
            match event {
                Event::Connected { session_present } => {
                    observe::broker_connected();
                    backoff = Duration::from_millis(100);
                    // Without a resumed session, whatever was published for us while we were
                    // away (and our subscriptions) is gone at the broker: say so.
                    tracing::info!(session_present, "broker session");
                    let _ = from_broker_tx.send(FromBroker::Connected);
                }
                Event::Message(m) => {
                    let _ = from_broker_tx.send(FromBroker::Publish(m));
                }
                Event::DisconnectSent => break,
                Event::Disconnected(e) => {
                    observe::broker_lost(&e);
                    tokio::select! {
                        _ = poll_stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                _ => {}
            }
        }
    });

    // The drivers, the collector and `meter_link` hold what is needed of each meter; a
    // second copy of the meter list would cost as much again for a large fleet.
    let mut site = site;
    site.meters = Vec::new();
    let _ = release_freed_memory();
    let mut d = Daemon {
        site,
        topics,
        clock: opts.clock,
        journal,
        engine,
        client,
        channels,
        meter_link,
        answers,
        seen: HashMap::new(),
        in_flight: HashMap::new(),
        published_status: None,
        config_generation: 0,
        collect: collection.as_ref().map(|c| c.commands.clone()),
    };
    let mut reload = opts.reload;
    let result = async {
        d.apply(restored).await?;
        loop {
            let next_config = async {
                match reload.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let wake = d.engine.next_wakeup().map(|at| (at - d.clock.now_ms()).max(0) as u64);
            let timer = async {
                match wake {
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    None => std::future::pending().await,
                }
            };
            let next_note = async {
                match notes.as_mut() {
                    Some(n) => n.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(msg) = from_broker.recv() => match msg {
                    FromBroker::Connected => d.on_connected().await,
                    FromBroker::Publish(p) => d.on_publish(p).await?,
                },
                Some(input) = answers_rx.recv() => {
                    let contact = match &input {
                        Input::Executed { command, attempt, outcome } => d.note_contact(command, *attempt, outcome),
                        _ => None,
                    };
                    let out = d.engine.handle(input, d.clock.now_ms());
                    let published = d.apply(out).await?;
                    if let Some(meter) = contact.filter(|m| !published.contains(m)) {
                        d.publish_state(&meter).await;
                    }
                    d.publish_status().await;
                }
                _ = timer => {
                    let out = d.engine.handle(Input::Tick, d.clock.now_ms());
                    d.apply(out).await?;
                }
                Some(new) = next_config => {
                    d.reload(new);
                    d.publish_status().await;
                }
                Some(note) = next_note => d.on_collect_note(note).await,
            }
        }
        Ok::<(), DaemonError>(())
    }
    .await;

    // Drain (see `lifecycle`): no new work; exchanges in progress finish within the bound
    // and their commands stay resumable in the journal. Readings not yet acknowledged
    // stay in the outbox and are published after the restart.
    observe::draining();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(d.site.drain_timeout_s.min(3600));
    collect_stop.cancel();
    if let Some(c) = collection {
        let _ =
            tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_secs(5)), c.join()).await;
    }
    channel_stop.cancel();
    let drained = d.drain_channels(&mut answers_rx, channel_tasks, deadline, result.is_ok()).await;
    d.go_offline(poller, poller_stop).await;
    observe::stop(endpoints).await;
    result.and(drained)
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Daemon {
    async fn on_connected(&mut self) {
        let admin = self.admin_topic();
        let mut topics = vec![
            (self.topics.cmd_filter(), QoS::AtLeastOnce),
            (self.topics.payments(), QoS::AtLeastOnce),
            (admin, QoS::AtLeastOnce),
        ];
        if self.collect.is_some() {
            topics.push((self.collect_topic(), QoS::AtLeastOnce));
        }
        for (topic, qos) in topics {
            if let Err(e) = self.client.subscribe(topic, qos).await {
                tracing::error!(error = %e, "subscribe");
            }
        }
        self.published_status = None;
        self.publish_status().await;
    }

    /// The daemon's retained status, republished when it changes.
    async fn publish_status(&mut self) {
        let up = self.channels.values().filter(|c| c.health() == LinkHealth::Up).count() as u64;
        let down = self.channels.values().filter(|c| c.health() == LinkHealth::Down).count() as u64;
        let status = StatusMessage {
            online: true,
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            meters: Some(self.meter_link.len() as u64),
            channels_up: Some(up),
            channels_down: Some(down),
            config_generation: Some(self.config_generation),
        };
        if self.published_status.as_ref() == Some(&status) {
            return;
        }
        if self.client.publish(self.topics.status(), QoS::AtLeastOnce, true, json(&status)).await.is_ok() {
            self.published_status = Some(status);
        }
    }

    /// Apply a reloaded configuration. Links and drivers stay as they are (a changed
    /// link or a new meter needs a restart, which is said in the log); the registry,
    /// protection flags, policy and command settings take effect at once.
    fn reload(&mut self, new: SiteConfig) {
        let same_meters = new.meters.len() == self.meter_link.len()
            && new.meters.iter().all(|m| self.meter_link.get(&m.id) == Some(&m.link));
        let same_links = new.links.len() == self.site.links.len()
            && new
                .links
                .iter()
                .zip(&self.site.links)
                .all(|(a, b)| a.name == b.name && a.address == b.address && a.serial == b.serial);
        if !same_meters || !same_links {
            tracing::warn!(
                "links or meters changed: restart the daemon to apply them; applying the registry and policy now"
            );
        }
        self.engine.set_registry(Registry::from_config(&new));
        self.engine.set_policy_config(new.policy.clone());
        self.engine.set_config(new.commands.clone());
        self.site.accounts = new.accounts;
        self.site.policy = new.policy;
        self.site.commands = new.commands;
        self.config_generation += 1;
        observe::config_reloaded(self.config_generation);
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn ack(&self, p: &Message) {
        if let Err(e) = self.client.ack(&p.ack).await {
            tracing::warn!(error = %e, "ack");
        }
    }

    async fn on_publish(&mut self, p: Message) -> Result<(), DaemonError> {
        let topic = p.topic.clone();
        match self.topics.parse_inbound(&topic) {
            Some(Inbound::Command(meter)) => self.on_command(Some(meter), &topic, &p).await?,
            Some(Inbound::CommandBadMeter(_)) => self.on_command(None, &topic, &p).await?,
            Some(Inbound::Payments) => self.on_payment(&p).await?,
            None if topic == self.admin_topic() => self.on_lift_quarantine(&p).await?,
            None if topic == self.collect_topic() => self.on_collect_now(&p),
            None => tracing::debug!(%topic, "ignored"),
        }
        // Acked only now: everything above that had to be durable is in the journal.
        self.ack(&p).await;
        Ok(())
    }

    async fn on_command(&mut self, meter: Option<MeterId>, topic: &str, p: &Message) -> Result<(), DaemonError> {
        let now = self.now();
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
        let (meter, request) = match (meter, parsed) {
            (Some(m), Ok(r)) if self.engine.registry().meter(&m).is_some() => (m, r),
            (meter, parsed) => {
                let rejection = match (&meter, parsed) {
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
                self.record(vec![Record::Note { meter: raw_meter.clone(), message: msg.clone() }]).await?;
                let topic = match &meter {
                    Some(m) => Some(self.topics.result(m)),
                    None => self.topics.result_raw(&raw_meter),
                };
                if let Some(t) = topic {
                    self.publish(t, &msg).await;
                }
                return Ok(());
            }
        };
        let cmd = Command::new(meter.clone(), request.clone(), now, self.engine.config());
        match self.journal.accept_command(&cmd).await.map_err(|e| DaemonError::Journal(e.to_string()))? {
            Accepted::New => {
                let out = self.engine.handle(Input::Command(cmd), now);
                self.apply(out).await?;
            }
            Accepted::Seen { same_content, latest } => {
                let offset = self.engine.offset_of(&meter);
                let msg = answer_repeat(&meter, &request, same_content, latest.as_deref(), now, offset);
                self.record(vec![Record::Note { meter: meter.to_string(), message: msg.clone() }]).await?;
                self.publish(self.topics.result(&meter), &msg).await;
            }
        }
        Ok(())
    }

    async fn on_payment(&mut self, p: &Message) -> Result<(), DaemonError> {
        let now = self.now();
        let mut outcome = PaymentOutcome {
            id: None,
            account: None,
            cleared: false,
            duplicate: false,
            reconnects: Vec::new(),
            error: None,
        };
        match Payment::parse(&p.payload) {
            Err(r) => {
                outcome.id = r.id.clone();
                outcome.error = Some(ErrorBody::new(r.code, r.message));
            }
            Ok(payment) => {
                outcome.id = Some(payment.id.to_string());
                outcome.account = Some(payment.account.to_string());
                outcome.cleared = payment.cleared;
                let accepted = self
                    .journal
                    .accept_payment(&payment, now)
                    .await
                    .map_err(|e| DaemonError::Journal(e.to_string()))?;
                match accepted {
                    PaymentAccepted::New | PaymentAccepted::NowCleared => {
                        let out =
                            self.engine.handle(Input::Payment { payment: payment.clone(), received_ms: now }, now);
                        outcome.reconnects = out
                            .iter()
                            .filter_map(|o| match o {
                                Output::Persist(Record::Command(c)) => {
                                    Some(PaymentReconnect { id: c.id().to_string(), meter: c.meter.to_string() })
                                }
                                _ => None,
                            })
                            .collect();
                        self.apply(out).await?;
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
            }
        }
        observe::payment(&outcome);
        if let Some(id) = outcome.id.as_deref().and_then(|i| PaymentId::new(i).ok()) {
            let topic = format!("{}/payment/{}", self.topics.prefix(), id.as_str());
            let _ = self.client.publish(topic, QoS::AtLeastOnce, false, json(&outcome)).await;
        }
        Ok(())
    }

    /// `{p}/admin/lift-quarantine` (an extension; the broker's ACL lets only operators
    /// publish there): `{"by": "...", "why": "..."}` lifts the disconnect quarantine. The
    /// engine records who and why in the journal.
    fn admin_topic(&self) -> String {
        format!("{}/admin/lift-quarantine", self.topics.prefix())
    }

    async fn on_lift_quarantine(&mut self, p: &Message) -> Result<(), DaemonError> {
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
            return Ok(());
        };
        tracing::warn!(by = %lift.by, why = %lift.why, "quarantine lifted by an operator");
        let out = self.engine.handle(Input::LiftQuarantine { by: lift.by, why: lift.why }, self.now());
        self.apply(out).await.map(|_| ())
    }

    async fn record(&self, records: Vec<Record>) -> Result<(), DaemonError> {
        if records.is_empty() {
            return Ok(());
        }
        self.journal.record(records).await.map_err(|e| DaemonError::Journal(e.to_string()))
    }

    async fn publish<T: Serialize>(&self, topic: String, msg: &T) {
        let body = json(msg);
        if body.len() > MAX_PAYLOAD {
            tracing::error!(%topic, "message larger than the contract allows; not published");
            return;
        }
        if let Err(e) = self.client.publish(topic, QoS::AtLeastOnce, false, body).await {
            tracing::error!(error = %e, "publish");
        }
    }

    /// Commit what the engine wants recorded, then publish and execute. Returns the
    /// meters whose state was republished.
    async fn apply(&mut self, outputs: Vec<Output>) -> Result<Vec<MeterId>, DaemonError> {
        let mut records = Vec::new();
        let mut rest = Vec::new();
        for o in outputs {
            match o {
                Output::Persist(r) => records.push(r),
                other => rest.push(other),
            }
        }
        let meters_changed: Vec<MeterId> = records
            .iter()
            .filter_map(|r| match r {
                Record::Meter(m) => Some(m.meter.clone()),
                _ => None,
            })
            .collect();
        self.record(records).await?;
        for o in rest {
            match o {
                Output::Publish { meter, message } => {
                    observe::command_status(&message);
                    self.publish(self.topics.result(&meter), &message).await
                }
                Output::Execute(work) => {
                    self.in_flight.insert((work.command.clone(), work.attempt), work.meter.clone());
                    let channel = self.meter_link.get(&work.meter).and_then(|l| self.channels.get(l));
                    let refused = match channel {
                        Some(c) => c.execute(work).err(),
                        None => Some(work),
                    };
                    if let Some(work) = refused {
                        let outcome = Outcome::Error(crate::meter::MeterError::Unreachable(format!(
                            "no running channel for meter {}",
                            work.meter
                        )));
                        let _ = self.answers.send(Input::Executed {
                            command: work.command,
                            attempt: work.attempt,
                            outcome,
                        });
                    }
                }
                Output::Persist(_) => {}
            }
        }
        observe::quarantine(self.engine.policy().quarantine().is_some());
        let mut meters_changed = meters_changed;
        meters_changed.dedup();
        for m in &meters_changed {
            self.publish_state(m).await;
        }
        Ok(meters_changed)
    }

    /// Remember when a meter last answered; returns the meter when its online state
    /// (as `state/{meter}` shows it) may have changed.
    fn note_contact(
        &mut self,
        command: &crate::contract::CommandId,
        attempt: u32,
        outcome: &Outcome,
    ) -> Option<MeterId> {
        let meter = self.in_flight.remove(&(command.clone(), attempt))?;
        let answered = match outcome {
            Outcome::Error(e) => !e.is_link_failure(),
            _ => true,
        };
        if answered {
            let now = self.now();
            self.seen.entry(meter.clone()).or_default().last_ms = Some(now);
        }
        Some(meter)
    }

    async fn publish_state(&self, meter: &MeterId) {
        let view = self.engine.meter(meter);
        let seen = self.seen.get(meter).copied().unwrap_or_default();
        let (last_reading, drift_s) = (seen.reading_s, seen.drift_s);
        if view.is_none() && last_reading.is_none() && drift_s.is_none() {
            return;
        }
        let offset = self.engine.offset_of(meter);
        let entry = self.engine.registry().meter(meter);
        let online = self
            .meter_link
            .get(meter)
            .and_then(|l| self.channels.get(l))
            .is_some_and(|c| c.health() != LinkHealth::Down);
        let state = StateMessage {
            meter: meter.clone(),
            account: entry.and_then(|e| e.account.clone()),
            relay: view.as_ref().map_or(crate::meter::RelayState::Unknown, |v| v.relay),
            reason: view.as_ref().and_then(|v| v.cut_reason),
            since: view.and_then(|v| v.since_ms).map(|ms| format_at(ms, offset)),
            online,
            last_seen: seen.last_ms.map(|ms| format_at(ms, offset)),
            last_reading: last_reading.map(|s| crate::time::format_rfc3339(s, offset)),
            drift_s,
        };
        let body = json(&state);
        if let Err(e) = self.client.publish(self.topics.state(meter), QoS::AtLeastOnce, true, body).await {
            tracing::error!(error = %e, "publish state");
        }
    }
}
