//! The broker connection of one client verb: subscribe, publish, listen, reconnect.

use std::collections::VecDeque;
use std::time::Duration;

use headend::mqtt::{self, Client, Event, EventLoop, Message, QoS};
use tokio::time::{timeout_at, Instant};

use super::Settings;

/// Pause between reconnection attempts while the broker is away (after the request was
/// acknowledged; before that, a lost broker is exit 3).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// One connection to the broker for one request: subscriptions first, then the publish.
pub(super) struct Link {
    client: Client,
    events: EventLoop,
    filters: Vec<String>,
    topic: String,
    payload: String,
    inbox: VecDeque<Message>,
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
    pub(super) async fn open(
        s: &Settings,
        filters: Vec<String>,
        topic: String,
        payload: String,
        until: Instant,
    ) -> Result<Self, String> {
        let (client, events) = mqtt::connect(s.options.clone(), 16);
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
                Ok(Event::Disconnected(e)) if connected => {
                    return Err(format!(
                        "lost the broker before it acknowledged the request ({e}); re-run with the same --id (safe)"
                    ));
                }
                Ok(Event::Disconnected(e)) => {
                    return Err(format!("cannot connect to the broker: {e}; nothing was sent"))
                }
                Ok(ev) => ev,
            };
            connected |= matches!(event, Event::Connected { .. });
            link.handle(event)?;
        }
        Ok(link)
    }

    fn handle(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Connected { .. } => {
                // Every connection is a new session: subscribe (again) before publishing (again).
                self.warned = false;
                self.subacks_due = self.filters.len();
                self.published = false;
                self.pkid = None;
                for f in &self.filters {
                    self.client.try_subscribe(f.clone(), QoS::AtLeastOnce).map_err(|e| e.to_string())?;
                }
            }
            Event::Subscribed { granted } => {
                if !granted {
                    return Err("the broker refused to subscribe us to the answer topics (not authorised?)".into());
                }
                self.subacks_due = self.subacks_due.saturating_sub(1);
                if self.subacks_due == 0 && !self.published {
                    let payload = self.payload.clone().into_bytes();
                    self.client
                        .try_publish(&self.topic, QoS::AtLeastOnce, false, payload)
                        .map_err(|e| e.to_string())?;
                    self.published = true;
                }
            }
            Event::Sent(pkid) if self.published && self.pkid.is_none() => self.pkid = Some(pkid),
            Event::PubAck(pkid) if Some(pkid) == self.pkid => self.acked = true,
            Event::Message(p) => self.inbox.push_back(p),
            _ => {}
        }
        Ok(())
    }

    /// The next message on our subscriptions, or None at `until`. A lost connection is
    /// made again, subscribed again and the request published again: the same id makes
    /// the daemon answer with its latest status, so a final status is not missed.
    pub(super) async fn next(&mut self, until: Instant) -> Option<Message> {
        loop {
            if let Some(p) = self.inbox.pop_front() {
                return Some(p);
            }
            match timeout_at(until, self.events.poll()).await {
                Err(_) => return None,
                Ok(Event::Disconnected(e)) => {
                    if !self.warned {
                        eprintln!("warning: connection to the broker lost ({e}); reconnecting");
                        self.warned = true;
                    }
                    // poll() reconnects at once; pace the attempts while the broker is away.
                    if timeout_at(until, tokio::time::sleep(RECONNECT_PAUSE)).await.is_err() {
                        return None;
                    }
                }
                Ok(event) => {
                    if let Err(e) = self.handle(event) {
                        eprintln!("warning: {e}");
                    }
                }
            }
        }
    }

    /// Say goodbye, so the broker does not log a dropped connection.
    pub(super) async fn close(mut self) {
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while !matches!(self.events.poll().await, Event::DisconnectSent | Event::Disconnected(_)) {}
            })
            .await;
        }
    }
}
