//! The daemon's side of the journal for group commit and the publish outbox.
//!
//! One loop turn of the daemon makes two journal jobs, whatever the number of inputs it
//! took: [`Journal::accept_all`] for every command and payment that arrived, then
//! [`Journal::commit`] for everything the engine wants recorded together with every
//! message to publish about it. A message is thus durable with the record it announces;
//! the publisher sends it after the commit, deletes it after the broker's PUBACK
//! ([`Journal::published`]) and, after a crash, finds it again with
//! [`Journal::unpublished`].

use rusqlite::params;

use super::{store, Accepted, Journal, JournalError, PaymentAccepted, Pending};
use crate::command::{Command, Record};
use crate::contract::Payment;

/// One input to take in [`Journal::accept_all`].
#[derive(Debug, Clone)]
pub enum Arrival {
    /// A command received over MQTT.
    Command(Command),
    /// A payment, with when it arrived (Unix ms).
    Payment(Payment, i64),
}

/// What [`Journal::accept_all`] found for one [`Arrival`], in the same order.
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    /// See [`Journal::accept_command`].
    Command(Accepted),
    /// See [`Journal::accept_payment`].
    Payment(PaymentAccepted),
}

/// A message to publish, stored with the records it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    /// The topic.
    pub topic: String,
    /// The JSON payload.
    pub payload: String,
    /// Retained.
    pub retain: bool,
}

/// A stored message not yet acknowledged by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpublished {
    /// Its place in the publishing order.
    pub seq: i64,
    /// The message.
    pub message: OutMessage,
}

impl Journal {
    /// Take every command and payment of a turn in one job (one transaction): each is
    /// durable when this resolves, answered in order.
    pub fn accept_all(&self, arrivals: Vec<Arrival>) -> Pending<Vec<Taken>> {
        self.submit(true, move |c| {
            arrivals
                .iter()
                .map(|a| match a {
                    Arrival::Command(cmd) => store::accept_command(c, cmd).map(Taken::Command),
                    Arrival::Payment(p, at) => store::accept_payment(c, p, *at).map(Taken::Payment),
                })
                .collect()
        })
    }

    /// Write the engine's records of a turn and the messages that announce them, all or
    /// none; resolves with each message's outbox sequence number, in order.
    pub fn commit(&self, records: Vec<Record>, messages: Vec<OutMessage>) -> Pending<Vec<i64>> {
        self.submit(true, move |c| {
            records.iter().try_for_each(|r| store::apply(c, r))?;
            let mut st = c.prepare_cached("INSERT INTO publish_outbox (topic, payload, retain) VALUES (?1, ?2, ?3)")?;
            let mut seqs = Vec::with_capacity(messages.len());
            for m in &messages {
                st.execute(params![m.topic, m.payload, m.retain])?;
                seqs.push(c.last_insert_rowid());
            }
            Ok(seqs)
        })
    }

    /// Messages stored and not acknowledged (published before a crash, or never), in
    /// publishing order.
    pub fn unpublished(&self) -> Pending<Vec<Unpublished>> {
        self.submit(false, |c| {
            let mut st = c.prepare("SELECT seq, topic, payload, retain FROM publish_outbox ORDER BY seq")?;
            let rows = st.query_map([], |r| {
                Ok(Unpublished {
                    seq: r.get(0)?,
                    message: OutMessage { topic: r.get(1)?, payload: r.get(2)?, retain: r.get(3)? },
                })
            })?;
            rows.collect::<Result<_, _>>().map_err(JournalError::from)
        })
    }

    /// Forget messages the broker acknowledged.
    pub fn published(&self, seqs: Vec<i64>) -> Pending<()> {
        self.submit(true, move |c| {
            let mut st = c.prepare_cached("DELETE FROM publish_outbox WHERE seq = ?1")?;
            for s in seqs {
                st.execute([s])?;
            }
            Ok(())
        })
    }
}
