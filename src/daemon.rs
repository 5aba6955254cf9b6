//! The daemon: the MQTT bridge, the command engine, the journal and the channel actors,
//! wired together.
//!
//! One task owns the engine. Each turn of its loop takes every input ready (commands and
//! payments from the broker, answers from channels, timers), runs the engine on them,
//! commits everything the engine wants recorded, with the messages announcing it, to the
//! journal in one transaction, and only then publishes (through the publisher task and
//! its journal-backed outbox, [`publish`]), executes and acknowledges ([`turn`]). An
//! inbound MQTT message is acknowledged to the broker only after it is in the journal,
//! and the session is persistent, so a crash at any point loses nothing: either the
//! broker redelivers it, or the journal has it. The loop never waits on the broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::channel::{self, ChannelHandle, ChannelMeter, HealthCounts, LinkHealth};
use crate::collect::{self, CollectCommand, Lanes, StartArgs};
use crate::command::{Engine, Execution, Input, Outcome};
use crate::config::SiteConfig;
use crate::contract::{format_at, StateMessage, StatusMessage, Topics};
use crate::dlms::counter::CounterStore;
use crate::driver::Driver;
use crate::journal::{Journal, OutMessage};
use crate::meter::MeterId;
use crate::mqtt::{self, BrokerUrl, Client, Event, Message, QoS, Session};
use crate::observe;
use crate::policy::Registry;
use crate::time::Clock;

mod collection;
mod lifecycle;
mod publish;
mod turn;

use turn::{spawn_committer, Committing, Turn, MAX_TURN};

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
    /// CONNACK; `session_present`: the broker kept our session (and so, likely, its
    /// retained messages).
    Connected {
        session_present: bool,
    },
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
    /// Channels up and down, kept by the channels.
    health: Arc<HealthCounts>,
    /// To the publisher task.
    outbox: mpsc::UnboundedSender<publish::Message>,
    /// Turns whose commit is on its way, to the committer task (see `turn`).
    committer: mpsc::UnboundedSender<Committing>,
    meter_link: HashMap<MeterId, String>,
    answers: mpsc::UnboundedSender<Input>,
    /// What the state message says of each meter besides its relay: last contact, newest
    /// reading, clock drift. One map, because a fleet's worth of keys costs.
    seen: HashMap<MeterId, Seen>,
    /// Which meter each execution in flight is for (answers carry only the command).
    in_flight: HashMap<(crate::contract::CommandId, u32), MeterId>,
    published_status: Option<StatusMessage>,
    /// Subscribed (the first CONNACK came): `status` may say online.
    subscribed: bool,
    /// Shutting down: answers are still taken, nothing new is sent to a channel.
    draining: bool,
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
    let health = Arc::new(HealthCounts::default());
    for link in &site.links {
        let meters = by_link.remove(&link.name).unwrap_or_default();
        let lane = lanes.as_ref().map(Lanes::lane);
        let stop = channel_stop.clone();
        let (handle, task) =
            channel::spawn_counted(link.clone(), meters, answers.clone(), lane, stop, Arc::clone(&health));
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
    // Results, payment outcomes and states: a connection and a task of their own, fed
    // from the journal's publish outbox (see `publish`).
    let backlog = journal.unpublished().await.map_err(|e| DaemonError::Journal(e.to_string()))?;
    let popts = mqtt::options(&site.mqtt, &url, &format!("{client_id}-results"), None, &site.base_dir)
        .map_err(|e| setup(e.to_string()))?;
    let (outbox, outbox_rx) = mpsc::unbounded_channel();
    let publish_stop = CancellationToken::new();
    let publisher = publish::spawn(popts, journal.clone(), backlog, outbox_rx, publish_stop.clone());
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
                    let _ = from_broker_tx.send(FromBroker::Connected { session_present });
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
    let (committer, mut committed) = spawn_committer();
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
        health,
        outbox,
        committer,
        meter_link,
        answers,
        seen: HashMap::new(),
        in_flight: HashMap::new(),
        published_status: None,
        subscribed: false,
        draining: false,
        config_generation: 0,
        collect: collection.as_ref().map(|c| c.commands.clone()),
    };
    let mut reload = opts.reload;
    let result = async {
        let mut t = Turn::default();
        d.take(restored, &mut t);
        d.finish_turn(t);
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
            let mut inbound = Vec::new();
            let mut answers = Vec::new();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(msg) = from_broker.recv() => inbound.push(msg),
                Some(input) = answers_rx.recv() => answers.push(input),
                Some(done) = committed.recv() => {
                    d.after_commit(done)?;
                    continue;
                }
                _ = timer => {}
                Some(new) = next_config => {
                    d.reload(new);
                    d.publish_status();
                    continue;
                }
                Some(note) = next_note => {
                    d.on_collect_note(note).await;
                    continue;
                }
            }
            // Group commit: whatever else is ready joins this turn, which costs two
            // journal commits (the arrivals, then the engine's records with the messages
            // announcing them) however many inputs it holds.
            while inbound.len() + answers.len() < MAX_TURN {
                let (a, b) = (from_broker.try_recv(), answers_rx.try_recv());
                let more = a.is_ok() || b.is_ok();
                inbound.extend(a.ok());
                answers.extend(b.ok());
                if !more {
                    break;
                }
            }
            d.turn(inbound, answers).await?;
        }
        Ok::<(), DaemonError>(())
    }
    .await;
    // Drain (see `lifecycle`): no new work; exchanges in progress finish within the bound
    // and their commands stay resumable in the journal. Readings and results not yet
    // acknowledged stay in their outboxes and are published after the restart.
    observe::draining();
    d.draining = true;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(d.site.drain_timeout_s.min(3600));
    collect_stop.cancel();
    if let Some(c) = collection {
        let _ =
            tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_secs(5)), c.join()).await;
    }
    channel_stop.cancel();
    let drained = d.drain_channels(&mut answers_rx, &mut committed, channel_tasks, deadline, result.is_ok()).await;
    // Turns committed or committing are carried out (their results published) before
    // the publisher stops.
    d.committer = mpsc::unbounded_channel().0;
    let carry_out = async {
        while let Some(done) = committed.recv().await {
            let _ = d.after_commit(done);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), carry_out).await;
    publish_stop.cancel();
    let _ =
        tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_secs(2)), publisher).await;
    d.go_offline(poller, poller_stop).await;
    observe::stop(endpoints).await;
    result.and(drained)
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Daemon {
    /// The main connection is up. Subscriptions are renewed; when the broker kept no
    /// session for us (first start, or a broker restarted without persistence) it may
    /// have lost the retained `state/{meter}` messages too, so every meter's state is
    /// published again (retained, not stored: the current value is recomputed anyway).
    fn on_connected(&mut self, session_present: bool) {
        let admin = self.admin_topic();
        let mut topics = vec![self.topics.cmd_filter(), self.topics.payments(), admin];
        if self.collect.is_some() {
            topics.push(self.collect_topic());
        }
        for topic in topics {
            if let Err(e) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
                tracing::error!(error = %e, "subscribe");
            }
        }
        self.subscribed = true;
        self.published_status = None;
        self.publish_status();
        if !session_present {
            let meters: Vec<MeterId> = self.meter_link.keys().cloned().collect();
            let mut n = 0;
            for m in meters {
                if let Some(msg) = self.state_message(&m) {
                    let _ = self.outbox.send(publish::Message { seq: None, message: msg });
                    n += 1;
                }
            }
            if n > 0 {
                tracing::info!(meters = n, "the broker kept no session: meters' states published again");
            }
        }
    }

    /// The daemon's retained status, republished when it changes. Never waits: when the
    /// connection cannot take it now, it is tried again after the next change or
    /// reconnect.
    fn publish_status(&mut self) {
        // Not before the subscriptions: `online` tells callers they may send commands.
        if !self.subscribed {
            return;
        }
        let status = StatusMessage {
            online: true,
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            meters: Some(self.meter_link.len() as u64),
            channels_up: Some(self.health.up()),
            channels_down: Some(self.health.down()),
            config_generation: Some(self.config_generation),
        };
        if self.published_status.as_ref() == Some(&status) {
            return;
        }
        if self.client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, json(&status)).is_ok() {
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

    /// Acknowledge an inbound message to the broker; never waits (a message whose ack
    /// could not be queued is redelivered by the broker, and the journal makes the
    /// repeat harmless).
    fn ack(&self, p: &Message) {
        if let Err(e) = self.client.try_ack(&p.ack) {
            tracing::warn!(error = %e, "ack");
        }
    }

    /// Hand work to its meter's channel; a channel that is gone answers at once.
    fn execute(&mut self, work: Execution) {
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
            let _ = self.answers.send(Input::Executed { command: work.command, attempt: work.attempt, outcome });
        }
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

    /// What `state/{meter}` says now, if anything is known of the meter.
    fn state_message(&self, meter: &MeterId) -> Option<OutMessage> {
        let view = self.engine.meter(meter);
        let seen = self.seen.get(meter).copied().unwrap_or_default();
        let (last_reading, drift_s) = (seen.reading_s, seen.drift_s);
        if view.is_none() && last_reading.is_none() && drift_s.is_none() {
            return None;
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
        Some(OutMessage { topic: self.topics.state(meter), payload: json(&state), retain: true })
    }

    /// Publish a meter's state now without storing it (collection's notes: contact,
    /// newest reading, drift; recomputed after a restart anyway).
    async fn publish_state(&self, meter: &MeterId) {
        if let Some(message) = self.state_message(meter) {
            let _ = self.outbox.send(publish::Message { seq: None, message });
        }
    }
}
