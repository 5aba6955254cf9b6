//! Publishing the outbox: every stored batch goes to `{p}/readings/{meter}` (QoS 1), in the
//! order it was stored, and is deleted only after the broker's PUBACK.
//!
//! Readings have their own MQTT connection (client id `{client_id}-readings`), so that a
//! back-log of readings never queues in front of command results, and so that every
//! outgoing publish on it is a batch: the event loop reports `Event::Sent(pkid)` in the
//! order publishes were queued, which binds each batch to its packet id, and the PUBACK
//! with that id deletes it. The session is clean and rumqttc never resends on its own:
//! when the connection drops, the event-loop task stops, tells the publisher (which takes
//! back every batch not yet acknowledged, in order), waits for its answer, then empties
//! rumqttc's queues. After the reconnect the publisher sends those batches again, the
//! same stored messages with the same batch ids, then the rest. So a batch is sent again
//! only when its PUBACK may have been lost: at least once, and a consumer sees a repeat
//! as the same `batch` id with the same rows (billing also keys rows by meter and time).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::mqtt::{self, Client, ConnectOptions, Event, EventLoop, QoS, Session};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use crate::contract::Topics;
use crate::journal::{Journal, OutboxEntry};

/// Batches published and not yet acknowledged, at most.
const WINDOW: usize = 64;
/// Batches read from the journal at a time.
const PAGE: u32 = 256;
/// Acknowledged batches are deleted in groups of up to this many ...
const DELETE_GROUP: usize = 256;
/// ... or after this long.
const DELETE_AFTER: Duration = Duration::from_millis(100);

/// What the event-loop task reports.
#[derive(Debug)]
enum Net {
    /// Connected (CONNACK).
    Up,
    /// Disconnected: stop publishing, take back what is in flight, then answer.
    Down(oneshot::Sender<()>),
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
}

/// Which batch each packet id carries: publishes are bound to packet ids in the order
/// they were queued.
#[derive(Debug, Default)]
pub struct Correlator {
    unbound: VecDeque<OutboxEntry>,
    bound: HashMap<u16, OutboxEntry>,
}

impl Correlator {
    /// A batch was queued for publishing.
    pub fn published(&mut self, e: OutboxEntry) {
        self.unbound.push_back(e);
    }

    /// The oldest queued publish went out as `pkid`.
    pub fn sent(&mut self, pkid: u16) -> bool {
        match self.unbound.pop_front() {
            Some(e) => {
                self.bound.insert(pkid, e);
                true
            }
            None => false,
        }
    }

    /// The broker acknowledged `pkid`: its batch, if it was one of ours.
    pub fn acked(&mut self, pkid: u16) -> Option<OutboxEntry> {
        self.bound.remove(&pkid)
    }

    /// Batches queued or sent and not acknowledged.
    pub fn len(&self) -> usize {
        self.unbound.len() + self.bound.len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take back everything not acknowledged, in store order.
    pub fn drain(&mut self) -> Vec<OutboxEntry> {
        let mut all: Vec<OutboxEntry> = self.unbound.drain(..).chain(self.bound.drain().map(|(_, e)| e)).collect();
        all.sort_by_key(|e| e.seq);
        all
    }
}

/// Start the readings connection and its publisher. `wake` is notified after every
/// stored batch.
pub fn spawn(
    options: ConnectOptions,
    journal: Journal,
    topics: Topics,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut options = options;
    options.set_session(Session::Clean);
    options.set_inflight(u16::try_from(WINDOW * 2).unwrap_or(u16::MAX));
    let (client, eventloop) = mqtt::connect(options, WINDOW * 2);
    let (net_tx, net_rx) = mpsc::unbounded_channel();
    let poller = tokio::spawn(poll(eventloop, net_tx, shutdown.clone()));
    let publisher = Publisher {
        journal,
        topics,
        client,
        metrics,
        connected: false,
        ready: VecDeque::new(),
        loaded_to: 0,
        more: true,
        corr: Correlator::default(),
        acked: Vec::new(),
    };
    tokio::spawn(async move {
        publisher.run(net_rx, wake, shutdown).await;
        let _ = poller.await;
    })
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
            Event::Disconnected(e) => {
                tracing::warn!(error = %e, "readings connection lost; reconnecting");
                let (done_tx, done_rx) = oneshot::channel();
                if tx.send(Net::Down(done_tx)).is_err() {
                    break;
                }
                // Once the publisher has taken back what was in flight, nothing queued
                // before this point may go out again by rumqttc's hand: the publisher
                // sends it again itself, in order.
                let _ = done_rx.await;
                eventloop.forget_pending();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Event::Message(_) | Event::Subscribed { .. } | Event::DisconnectSent => {}
        }
    }
}

struct Publisher {
    journal: Journal,
    topics: Topics,
    client: Client,
    metrics: Arc<Metrics>,
    connected: bool,
    /// Loaded from the journal, not yet published, in store order.
    ready: VecDeque<OutboxEntry>,
    /// The highest batch id loaded so far.
    loaded_to: i64,
    /// The journal may hold batches after `loaded_to`.
    more: bool,
    corr: Correlator,
    /// Acknowledged, not yet deleted.
    acked: Vec<i64>,
}

impl Publisher {
    async fn run(mut self, mut net: mpsc::UnboundedReceiver<Net>, wake: Arc<Notify>, shutdown: CancellationToken) {
        match self.journal.outbox_depth().await {
            Ok(n) => {
                self.metrics.outbox_depth.store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(batches = n, "readings outbox: batches stored before the restart will be published");
                }
            }
            Err(e) => tracing::error!(error = %e, "readings outbox: cannot count"),
        }
        loop {
            if self.connected {
                self.fill().await;
            }
            let flush_soon = !self.acked.is_empty();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = net.recv() => match ev {
                    Some(ev) => self.on_net(ev),
                    None => break,
                },
                _ = wake.notified() => self.more = true,
                _ = tokio::time::sleep(DELETE_AFTER), if flush_soon => self.flush_acked(),
            }
            if self.acked.len() >= DELETE_GROUP {
                self.flush_acked();
            }
        }
        self.flush_acked();
        let _ = self.client.disconnect().await;
    }

    fn on_net(&mut self, ev: Net) {
        match ev {
            Net::Up => {
                self.connected = true;
                tracing::info!(waiting = self.ready.len(), "readings connection up");
            }
            Net::Down(done) => {
                self.connected = false;
                let back = self.corr.drain();
                if !back.is_empty() {
                    tracing::info!(batches = back.len(), "readings: unacknowledged batches will be published again");
                    self.metrics.batches_republished.fetch_add(back.len() as u64, Ordering::Relaxed);
                }
                for e in back.into_iter().rev() {
                    self.ready.push_front(e);
                }
                let _ = done.send(());
            }
            Net::Sent(pkid) => {
                if !self.corr.sent(pkid) {
                    tracing::error!(pkid, "readings: a publish went out that the publisher did not queue");
                }
            }
            Net::Acked(pkid) => {
                if let Some(e) = self.corr.acked(pkid) {
                    self.acked.push(e.seq);
                    self.metrics.batches_acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Publish until the window is full or nothing is left.
    async fn fill(&mut self) {
        while self.connected && self.corr.len() < WINDOW {
            if self.ready.is_empty() && !self.load().await {
                return;
            }
            let Some(e) = self.ready.pop_front() else { return };
            let Ok(meter) = crate::meter::MeterId::new(&e.meter) else {
                // Only ids that passed the id rule are stored; drop rather than jam the queue.
                tracing::error!(seq = e.seq, "readings outbox: batch with an invalid meter id dropped");
                self.acked.push(e.seq);
                continue;
            };
            let topic = self.topics.readings(&meter);
            match self.client.try_publish(topic, QoS::AtLeastOnce, false, e.payload.clone().into_bytes()) {
                Ok(()) => self.corr.published(e),
                Err(err) => {
                    tracing::warn!(error = %err, "readings: publish not queued; trying again shortly");
                    self.ready.push_front(e);
                    return;
                }
            }
        }
    }

    /// Read the next page of the outbox; false when there is nothing more.
    async fn load(&mut self) -> bool {
        if !self.more {
            return false;
        }
        match self.journal.outbox_page(self.loaded_to, PAGE).await {
            Ok(page) => {
                if page.len() < PAGE as usize {
                    self.more = false;
                }
                if let Some(last) = page.last() {
                    self.loaded_to = last.seq;
                }
                let got = !page.is_empty();
                self.ready.extend(page);
                got
            }
            Err(e) => {
                tracing::error!(error = %e, "readings outbox: cannot read; trying again on the next batch");
                self.more = false;
                false
            }
        }
    }

    fn flush_acked(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.acked);
        let n = seqs.len() as i64;
        self.metrics.outbox_depth.fetch_sub(n, Ordering::Relaxed);
        let pending = self.journal.outbox_remove(seqs);
        tokio::spawn(async move {
            // A failed delete only means a batch is published again after a restart.
            if let Err(e) = pending.await {
                tracing::error!(error = %e, "readings outbox: acknowledged batches not deleted");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: i64) -> OutboxEntry {
        OutboxEntry { seq, meter: "M".into(), payload: String::new() }
    }

    #[test]
    fn packet_ids_bind_in_publish_order_and_a_drop_takes_everything_back_in_order() {
        let mut c = Correlator::default();
        for s in 1..=4 {
            c.published(e(s));
        }
        assert!(c.sent(7) && c.sent(8) && c.sent(9));
        assert_eq!(c.acked(8).map(|e| e.seq), Some(2));
        assert_eq!(c.acked(8), None, "acknowledged once");
        assert_eq!(c.acked(42), None, "not ours");
        assert_eq!(c.len(), 3);
        assert_eq!(c.drain().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3, 4]);
        assert!(c.is_empty());
        assert!(!c.sent(1), "nothing queued");
    }
}
