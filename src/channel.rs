//! Channel actors: one tokio task owns one physical link and the drivers of the meters
//! on it, and serialises their work, because an RS-485 bus or a gateway serves one
//! request at a time. The control lane (cut, restore, read) is always served before
//! collection work, so a restore waits at most for the exchange in progress.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::command::{Execution, Input, Op, Outcome, ReadResult};
use crate::config::LinkConfig;
use crate::driver::{Driver, Link};
use crate::meter::{MeterError, MeterId};

/// Whether a channel's link is usable, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHealth {
    /// Not tried yet.
    Unknown,
    /// The last exchange (or opening) worked.
    Up,
    /// The link could not be opened, or the last exchange failed on it.
    Down,
}

/// One meter served by a channel.
#[derive(Debug)]
pub struct ChannelMeter {
    /// Registry id.
    pub id: MeterId,
    /// The identity the meter must answer before it is switched (`None`: switching is
    /// refused, because an unverified switch is how the wrong meter gets cut).
    pub identity: Option<String>,
    /// Its driver.
    pub driver: Driver,
}

/// The handle the daemon keeps for a running channel.
#[derive(Debug, Clone)]
pub struct ChannelHandle {
    /// The link's name.
    pub name: String,
    control: mpsc::UnboundedSender<Execution>,
    health: watch::Receiver<LinkHealth>,
}

impl ChannelHandle {
    /// Queue work on the control lane. Fails only when the channel has stopped.
    pub fn execute(&self, work: Execution) -> Result<(), Execution> {
        self.control.send(work).map_err(|e| e.0)
    }

    /// The link's health now.
    pub fn health(&self) -> LinkHealth {
        *self.health.borrow()
    }

    /// A receiver that sees health changes.
    pub fn watch_health(&self) -> watch::Receiver<LinkHealth> {
        self.health.clone()
    }
}

/// Start the actor of one link. Answers go to `answers` as [`Input::Executed`].
pub fn spawn(
    link: LinkConfig,
    meters: Vec<ChannelMeter>,
    answers: mpsc::UnboundedSender<Input>,
    shutdown: CancellationToken,
) -> (ChannelHandle, tokio::task::JoinHandle<()>) {
    let (control, control_rx) = mpsc::unbounded_channel();
    let (health_tx, health) = watch::channel(LinkHealth::Unknown);
    let name = link.name.clone();
    let actor = Actor {
        link,
        open: None,
        meters: meters.into_iter().map(|m| (m.id.clone(), m)).collect(),
        health: health_tx,
        answers,
    };
    let task = tokio::spawn(actor.run(control_rx, shutdown));
    (ChannelHandle { name, control, health }, task)
}

struct Actor {
    link: LinkConfig,
    open: Option<Link>,
    meters: HashMap<MeterId, ChannelMeter>,
    health: watch::Sender<LinkHealth>,
    answers: mpsc::UnboundedSender<Input>,
}

impl Actor {
    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Execution>, shutdown: CancellationToken) {
        loop {
            let work = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                w = control.recv() => match w { Some(w) => w, None => break },
            };
            // An exchange in progress is allowed to finish even on shutdown (bounded by
            // the link's timeouts), so a switch is never cut off between ACTION and read-back.
            let outcome = self.execute(&work).await;
            let _ = self.answers.send(Input::Executed { command: work.command, attempt: work.attempt, outcome });
        }
        self.close().await;
    }

    async fn execute(&mut self, work: &Execution) -> Outcome {
        if !self.meters.contains_key(&work.meter) {
            return Outcome::Error(MeterError::Unsupported(format!(
                "meter {} is not on link {}",
                work.meter, self.link.name
            )));
        }
        if self.open.is_none() {
            match Link::open(&self.link).await {
                Ok(l) => self.open = Some(l),
                Err(e) => {
                    self.health.send_replace(LinkHealth::Down);
                    return Outcome::Error(e);
                }
            }
        }
        let (Some(link), Some(meter)) = (self.open.as_mut(), self.meters.get_mut(&work.meter)) else {
            return Outcome::Error(MeterError::Unreachable(self.link.name.clone()));
        };
        let span = tracing::info_span!("exchange", command = %work.command, meter = %work.meter, op = ?work.op);
        let result = run_op(meter, link, work.op).instrument(span).await;
        match &result {
            Outcome::Error(e) if e.is_link_failure() => {
                tracing::warn!(link = %self.link.name, error = %e, "link failure; the link is reopened for the next request");
                meter.driver.reset();
                self.open = None;
                self.health.send_replace(LinkHealth::Down);
            }
            _ => {
                self.health.send_replace(LinkHealth::Up);
            }
        }
        result
    }

    async fn close(&mut self) {
        if let Some(mut link) = self.open.take() {
            for m in self.meters.values_mut() {
                // Release associations politely, but never hang a shutdown on a dead meter.
                let _ = tokio::time::timeout(Duration::from_secs(2), m.driver.close(&mut link)).await;
            }
        }
    }
}

async fn run_op(meter: &mut ChannelMeter, link: &mut Link, op: Op) -> Outcome {
    let d = &mut meter.driver;
    match op {
        Op::Disconnect | Op::Reconnect => {
            let Some(expected) = meter.identity.as_deref() else {
                return Outcome::Error(MeterError::IdentityMismatch {
                    expected: "(no identity registered: set `identity` in the configuration)".into(),
                    actual: "(not read)".into(),
                });
            };
            if let Err(e) = d.verify_identity(link, expected).await {
                return Outcome::Error(e);
            }
            let r = if op == Op::Disconnect { d.disconnect(link).await } else { d.reconnect(link).await };
            match r {
                Ok(o) => Outcome::Switched(o),
                Err(e) => Outcome::Error(e),
            }
        }
        Op::VerifyRelay => match d.read_relay(link).await {
            Ok(r) => Outcome::Relay(r.state),
            Err(e) => Outcome::Error(e),
        },
        Op::Read => {
            let relay = match d.read_relay(link).await {
                Ok(r) => r.state,
                Err(e) => return Outcome::Error(e),
            };
            let registers = match d.read_registers(link).await {
                Ok(r) => r,
                Err(e) => return Outcome::Error(e),
            };
            let meter_clock = match d.read_clock(link).await {
                Ok(c) => Some(c.text),
                Err(MeterError::Unsupported(_)) => None,
                Err(e) => return Outcome::Error(e),
            };
            Outcome::Read(ReadResult { relay, registers, meter_clock })
        }
    }
}
