//! The results publisher: everything the daemon says about commands, payments and meters
//! (`{p}/result/..`, `{p}/payment/..`, `{p}/state/..`) goes out from this task, so the
//! engine's loop never waits on the broker (a full MQTT request queue while the broker is
//! down used to stall it).
//!
//! Messages come already committed to the journal's publish outbox (with their `seq`),
//! or without one for what need not survive a crash (a meter's contact or drift). They
//! go out in order on a connection of their own (`{client_id}-results`, clean session),
//! so that, as for readings (`collect::outbox`), every publish on it is ours: rumqttc
//! reports `Outgoing::Publish(pkid)` in the order publishes were queued, which binds
//! each message to its packet id, and the PUBACK with that id deletes it from the
//! outbox. When the connection drops, everything not acknowledged is taken back and
//! sent again after the reconnect; after a crash the outbox is read at start. So a
//! status may arrive twice: the contract's consumers key results by command id and
//! status (a repeat of a status already seen changes nothing), and a `state/{meter}`
//! repeat is the same retained value.
//!
//! The broker-facing parts are [`connect`] (the client and its event loop, reporting
//! [`Net`] events) and [`Publisher::send`]; the rest does not know the MQTT library.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::journal::{Journal, OutMessage, Unpublished};
use crate::mqtt::{self, Client, ConnectOptions, Event, EventLoop, QoS, Session};

/// Messages sent and not yet acknowledged, at most.
const WINDOW: usize = 256;
/// Acknowledged messages are deleted from the outbox in groups of up to this many ...
const DELETE_GROUP: usize = 512;
/// ... or after this long.
const DELETE_AFTER: Duration = Duration::from_millis(50);

/// One message for the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// Its outbox sequence number; None when it is not stored.
    pub seq: Option<i64>,
    /// The message.
    pub message: OutMessage,
}

/// What the connection reports.
#[derive(Debug)]
pub(crate) enum Net {
    /// Connected (CONNACK).
    Up,
    /// Disconnected: stop sending, take back what is in flight, then answer.
    Down(oneshot::Sender<()>),
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
}

/// Which message each packet id carries.
#[derive(Debug, Default)]
struct Correlator {
    unbound: VecDeque<Message>,
    bound: HashMap<u16, Message>,
}

impl Correlator {
    fn len(&self) -> usize {
        self.unbound.len() + self.bound.len()
    }

    /// Everything not acknowledged, in the order it was queued (bound ones were queued
    /// before unbound ones).
    fn drain(&mut self) -> Vec<Message> {
        let mut bound: Vec<(u64, Message)> = Vec::new();
        for (_, m) in self.bound.drain() {
            // Bound messages: order by seq when stored; unstored ones keep no order
            // among themselves, which only a meter's contact state could notice.
            bound.push((m.seq.map_or(0, |s| s as u64), m));
        }
        bound.sort_by_key(|(k, _)| *k);
        bound.into_iter().map(|(_, m)| m).chain(self.unbound.drain(..)).collect()
    }
}

/// Start the results connection and its publisher; `backlog` (the outbox as found at
/// start) goes out first, then what arrives on `rx`.
pub(crate) fn spawn(
    options: ConnectOptions,
    journal: Journal,
    backlog: Vec<Unpublished>,
    rx: mpsc::UnboundedReceiver<Message>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    // The connection outlives the publisher's stop by its final drain.
    let poll_stop = CancellationToken::new();
    let (client, net, poller) = connect(options, poll_stop.clone());
    if !backlog.is_empty() {
        tracing::info!(messages = backlog.len(), "results stored before the restart and not acknowledged: sent again");
    }
    let ready = backlog.into_iter().map(|u| Message { seq: Some(u.seq), message: u.message }).collect();
    let publisher =
        Publisher { journal, client, connected: false, ready, corr: Correlator::default(), acked: Vec::new() };
    tokio::spawn(async move {
        publisher.run(rx, net, shutdown).await;
        poll_stop.cancel();
        let _ = poller.await;
    })
}

/// The client and a task polling its event loop.
fn connect(
    options: ConnectOptions,
    stop: CancellationToken,
) -> (Client, mpsc::UnboundedReceiver<Net>, tokio::task::JoinHandle<()>) {
    let mut options = options;
    options.set_session(Session::Clean);
    options.set_inflight(u16::try_from(WINDOW).unwrap_or(u16::MAX));
    let (client, eventloop) = mqtt::connect(options, WINDOW * 2);
    let (tx, rx) = mpsc::unbounded_channel();
    (client, rx, tokio::spawn(poll(eventloop, tx, stop)))
}

async fn poll(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Net>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Event::Connected { .. } => {
                backoff = Duration::from_millis(100);
                let _ = tx.send(Net::Up);
            }
            Event::Sent(pkid) => {
                let _ = tx.send(Net::Sent(pkid));
            }
            Event::PubAck(pkid) => {
                let _ = tx.send(Net::Acked(pkid));
            }
            Event::Message(_) | Event::Subscribed { .. } | Event::DisconnectSent => {}
            Event::Disconnected(e) => {
                tracing::warn!(error = %e, "results connection lost; reconnecting");
                let (done_tx, done_rx) = oneshot::channel();
                if tx.send(Net::Down(done_tx)).is_err() {
                    break;
                }
                // The publisher sends again, in order, whatever was not acknowledged:
                // rumqttc must not resend any of it on its own.
                let _ = done_rx.await;
                eventloop.forget_pending();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Publisher {
    journal: Journal,
    client: Client,
    connected: bool,
    /// Not yet sent, in order.
    ready: VecDeque<Message>,
    corr: Correlator,
    /// Acknowledged, not yet deleted from the outbox.
    acked: Vec<i64>,
}

impl Publisher {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Message>,
        mut net: mpsc::UnboundedReceiver<Net>,
        shutdown: CancellationToken,
    ) {
        loop {
            self.fill();
            let flush_soon = !self.acked.is_empty();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                m = rx.recv() => match m {
                    Some(m) => {
                        self.ready.push_back(m);
                        while let Ok(m) = rx.try_recv() {
                            self.ready.push_back(m);
                        }
                    }
                    None => break,
                },
                ev = net.recv() => match ev {
                    Some(ev) => self.on_net(ev),
                    None => break,
                },
                _ = tokio::time::sleep(DELETE_AFTER), if flush_soon => self.flush_acked(),
            }
            if self.acked.len() >= DELETE_GROUP {
                self.flush_acked();
            }
        }
        // Whatever the daemon queued before it stopped still goes out if the broker is
        // there; what is not acknowledged stays in the outbox for the next start.
        while let Ok(m) = rx.try_recv() {
            self.ready.push_back(m);
        }
        self.fill();
        let drain = async {
            while self.connected && self.corr.len() > 0 {
                match net.recv().await {
                    Some(ev) => self.on_net(ev),
                    None => break,
                }
                self.fill();
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        self.flush_acked();
        let _ = self.client.disconnect().await;
    }

    fn on_net(&mut self, ev: Net) {
        match ev {
            Net::Up => {
                self.connected = true;
                tracing::info!(waiting = self.ready.len(), "results connection up");
            }
            Net::Down(done) => {
                self.connected = false;
                let back = self.corr.drain();
                if !back.is_empty() {
                    tracing::info!(
                        messages = back.len(),
                        "results not acknowledged are sent again after the reconnect"
                    );
                }
                for m in back.into_iter().rev() {
                    self.ready.push_front(m);
                }
                let _ = done.send(());
            }
            Net::Sent(pkid) => match self.corr.unbound.pop_front() {
                Some(m) => {
                    self.corr.bound.insert(pkid, m);
                }
                None => tracing::error!(pkid, "results: a publish went out that the publisher did not queue"),
            },
            Net::Acked(pkid) => {
                if let Some(seq) = self.corr.bound.remove(&pkid).and_then(|m| m.seq) {
                    self.acked.push(seq);
                }
            }
        }
    }

    /// Send until the window is full or nothing is left.
    fn fill(&mut self) {
        while self.connected && self.corr.len() < WINDOW {
            let Some(m) = self.ready.pop_front() else { return };
            if !self.send(&m.message) {
                self.ready.push_front(m);
                return;
            }
            self.corr.unbound.push_back(m);
        }
    }

    /// Queue one publish on the connection; false when it cannot take it now.
    fn send(&self, m: &OutMessage) -> bool {
        let payload = m.payload.clone().into_bytes();
        match self.client.try_publish(m.topic.clone(), QoS::AtLeastOnce, m.retain, payload) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "results: publish not queued; trying again shortly");
                false
            }
        }
    }

    fn flush_acked(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let pending = self.journal.published(std::mem::take(&mut self.acked));
        tokio::spawn(async move {
            // A failed delete only means a message is published again after a restart.
            if let Err(e) = pending.await {
                tracing::error!(error = %e, "results outbox: acknowledged messages not deleted");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: i64) -> Message {
        Message { seq: Some(seq), message: OutMessage { topic: "t".into(), payload: String::new(), retain: false } }
    }

    #[test]
    fn a_drop_takes_back_sent_then_unsent_messages_in_order() {
        let mut c = Correlator::default();
        for s in 1..=4 {
            c.unbound.push_back(m(s));
        }
        for pkid in [9, 7] {
            let x = c.unbound.pop_front().expect("queued");
            c.bound.insert(pkid, x);
        }
        assert_eq!(c.drain().iter().map(|x| x.seq).collect::<Vec<_>>(), vec![Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(c.len(), 0);
    }
}
