//! One broker connection in either protocol version: a cloneable [`Client`] handle for
//! requests, and an [`EventLoop`] that yields the few [`Event`]s the head-end acts on.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use rumqttc::Outgoing;

use super::options::{ConnectOptions, Inner};
use super::{Protocol, QoS};

/// A request that could not be handed to the event loop (it stopped, or its queue is
/// full for a `try_` call).
#[derive(Debug, thiserror::Error)]
#[error("MQTT request not queued: {0}")]
pub struct ClientError(String);

/// The connection to the broker failed or was refused; polling again reconnects.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectionError(String);

/// What acknowledging an inbound message needs: its packet id and QoS on the connection
/// that delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    protocol: Protocol,
    qos: QoS,
    pkid: u16,
}

/// An inbound message.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic (lossily decoded if the broker sent one that is not UTF-8: such a
    /// topic matches none of ours and the message is ignored and acknowledged).
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// The retain flag.
    pub retain: bool,
    /// Hand to [`Client::ack`] once the message is dealt with (manual acks).
    pub ack: AckToken,
}

/// What the event loop reports.
#[derive(Debug)]
pub enum Event {
    /// CONNACK: connected. `session_present`: the broker kept our session (subscriptions
    /// and messages queued while we were away).
    Connected {
        /// The broker resumed a session.
        session_present: bool,
    },
    /// A message on one of our subscriptions.
    Message(Message),
    /// SUBACK; `granted` when every filter of the request was granted.
    Subscribed {
        /// Every filter granted.
        granted: bool,
    },
    /// A publish (QoS > 0) went out with this packet id. Publishes leave in the order
    /// they were requested.
    Sent(u16),
    /// The broker acknowledged the publish with this packet id.
    PubAck(u16),
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// The connection was lost or refused. Polling again reconnects at once: pace it.
    Disconnected(ConnectionError),
}

/// Requests to the broker; clones share the connection.
#[derive(Clone)]
pub struct Client(ClientInner);

#[derive(Clone)]
enum ClientInner {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Drives the connection: must be polled for anything to happen.
pub struct EventLoop {
    inner: LoopInner,
    /// MQTT 5: the session expiry interval asked for, to warn when the broker grants less.
    asked_expiry: Option<u32>,
}

// Boxed: the two differ in size by hundreds of bytes.
enum LoopInner {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A client and its event loop; up to `cap` requests wait between the two.
pub fn connect(options: ConnectOptions, cap: usize) -> (Client, EventLoop) {
    let asked_expiry = options.session_expiry();
    match options.inner {
        Inner::V311(o) => {
            let (c, e) = rumqttc::AsyncClient::new(*o, cap);
            (Client(ClientInner::V311(c)), EventLoop { inner: LoopInner::V311(Box::new(e)), asked_expiry })
        }
        Inner::V5(o) => {
            let (c, e) = rumqttc::v5::AsyncClient::new(*o, cap);
            (Client(ClientInner::V5(c)), EventLoop { inner: LoopInner::V5(Box::new(e)), asked_expiry })
        }
    }
}

fn client_err(e: impl std::fmt::Display) -> ClientError {
    ClientError(e.to_string())
}

impl Client {
    /// Queue a publish; waits while the request queue is full.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => {
                c.publish_bytes(topic, qos.into(), retain, payload.into()).await.map_err(client_err)
            }
            ClientInner::V5(c) => c.publish_bytes(topic, qos.into(), retain, payload.into()).await.map_err(client_err),
        }
    }

    /// Queue a publish, or fail at once when the request queue is full.
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => {
                c.try_publish(topic, qos.into(), retain, Vec::from(payload.into())).map_err(client_err)
            }
            ClientInner::V5(c) => c.try_publish(topic, qos.into(), retain, payload.into()).map_err(client_err),
        }
    }

    /// Queue a subscription.
    pub async fn subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => c.subscribe(filter, qos.into()).await.map_err(client_err),
            ClientInner::V5(c) => c.subscribe(filter, qos.into()).await.map_err(client_err),
        }
    }

    /// Queue a subscription, or fail at once when the request queue is full.
    pub fn try_subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => c.try_subscribe(filter, qos.into()).map_err(client_err),
            ClientInner::V5(c) => c.try_subscribe(filter, qos.into()).map_err(client_err),
        }
    }

    /// Acknowledge an inbound message (with manual acks, nothing else does).
    pub async fn ack(&self, token: &AckToken) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => c.ack(&v4_publish(token)).await.map_err(client_err),
            ClientInner::V5(c) => c.ack(&v5_publish(token)).await.map_err(client_err),
        }
    }

    /// [`Client::ack`], or fail at once when the request queue is full (the broker
    /// then delivers the message again).
    pub fn try_ack(&self, token: &AckToken) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => c.try_ack(&v4_publish(token)).map_err(client_err),
            ClientInner::V5(c) => c.try_ack(&v5_publish(token)).map_err(client_err),
        }
    }

    /// Queue a DISCONNECT: the broker drops the last will, and (MQTT 5) keeps a
    /// persistent session for its expiry interval.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => c.disconnect().await.map_err(client_err),
            ClientInner::V5(c) => c.disconnect().await.map_err(client_err),
        }
    }

    /// [`Client::disconnect`], or fail at once when the request queue is full.
    pub fn try_disconnect(&self) -> Result<(), ClientError> {
        match &self.0 {
            ClientInner::V311(c) => c.try_disconnect().map_err(client_err),
            ClientInner::V5(c) => c.try_disconnect().map_err(client_err),
        }
    }
}

// rumqttc acknowledges a `Publish`, of which it reads the QoS and the packet id alone:
// the token keeps those, not the payload.
fn v4_publish(t: &AckToken) -> rumqttc::Publish {
    let mut p = rumqttc::Publish::new("", t.qos.into(), Vec::new());
    p.pkid = t.pkid;
    p
}

fn v5_publish(t: &AckToken) -> v5b::Publish {
    let mut p = v5b::Publish::new("", t.qos.into(), Bytes::new(), None);
    p.pkid = t.pkid;
    p
}

impl EventLoop {
    /// The protocol version spoken.
    pub fn protocol(&self) -> Protocol {
        match self.inner {
            LoopInner::V311(_) => Protocol::V311,
            LoopInner::V5(_) => Protocol::V5,
        }
    }

    /// The next event; connects (again) first when not connected. Events the head-end
    /// does not act on (pings, acks we send) are passed over. Cancel-safe as rumqttc's
    /// `poll`: nothing is awaited between taking an event and returning it.
    pub async fn poll(&mut self) -> Event {
        loop {
            let event = match &mut self.inner {
                LoopInner::V311(e) => match e.poll().await {
                    Ok(ev) => map_v4(ev),
                    Err(err) => Some(Event::Disconnected(ConnectionError(err.to_string()))),
                },
                LoopInner::V5(e) => match e.poll().await {
                    Ok(ev) => map_v5(ev, self.asked_expiry),
                    Err(err) => Some(Event::Disconnected(ConnectionError(v5_error(&err)))),
                },
            };
            if let Some(ev) = event {
                return ev;
            }
        }
    }

    /// Forget every request not yet acknowledged by the broker and every request still
    /// queued, so that nothing requested before this call is sent by the event loop on
    /// the next connection (the caller resends what it must, in its own order).
    pub fn forget_pending(&mut self) {
        match &mut self.inner {
            LoopInner::V311(e) => {
                e.clean();
                e.pending.clear();
            }
            LoopInner::V5(e) => {
                e.clean();
                e.pending.clear();
            }
        }
    }
}

fn map_v4(ev: rumqttc::Event) -> Option<Event> {
    use rumqttc::{Event as E, Packet as P};
    Some(match ev {
        E::Incoming(P::ConnAck(c)) => Event::Connected { session_present: c.session_present },
        E::Incoming(P::Publish(p)) => Event::Message(Message {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            ack: AckToken { protocol: Protocol::V311, qos: p.qos.into(), pkid: p.pkid },
        }),
        E::Incoming(P::SubAck(s)) => Event::Subscribed {
            granted: s.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
        },
        E::Incoming(P::PubAck(a)) => Event::PubAck(a.pkid),
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Sent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        _ => return None,
    })
}

fn map_v5(ev: rumqttc::v5::Event, asked_expiry: Option<u32>) -> Option<Event> {
    use rumqttc::v5::{Event as E, Incoming as P};
    Some(match ev {
        E::Incoming(P::ConnAck(c)) => {
            let granted = c.properties.as_ref().and_then(|p| p.session_expiry_interval);
            if let (Some(asked), Some(granted)) = (asked_expiry, granted) {
                if granted < asked {
                    tracing::warn!(
                        asked_s = asked,
                        granted_s = granted,
                        "the broker keeps our MQTT session for less than asked: commands published while we are \
                         away longer than that are lost at the broker"
                    );
                }
            }
            Event::Connected { session_present: c.session_present }
        }
        E::Incoming(P::Publish(p)) => Event::Message(Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            retain: p.retain,
            ack: AckToken { protocol: Protocol::V5, qos: p.qos.into(), pkid: p.pkid },
        }),
        E::Incoming(P::SubAck(s)) => Event::Subscribed {
            granted: s.return_codes.iter().all(|c| matches!(c, v5b::SubscribeReasonCode::Success(_))),
        },
        E::Incoming(P::PubAck(a)) => {
            // An MQTT 5 broker may refuse a publish in its PUBACK (not authorised, quota):
            // say so. The message is as gone as a 3.1.1 broker's silent drop would make it.
            if !matches!(a.reason, v5b::PubAckReason::Success | v5b::PubAckReason::NoMatchingSubscribers) {
                tracing::warn!(pkid = a.pkid, reason = ?a.reason, "the broker refused a publish");
            }
            Event::PubAck(a.pkid)
        }
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Sent(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectSent,
        _ => return None,
    })
}

/// rumqttc's v5 errors print refusals as Rust debug text; say what the broker meant.
fn v5_error(e: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) | E::ConnectionRefused(C::NotAuthorized) => {
            format!("the broker refused us ({e}): check [mqtt] username and password_file")
        }
        E::ConnectionRefused(C::ClientIdentifierNotValid | C::BadClientId) => {
            format!("the broker refused us ({e}): check [mqtt] client_id")
        }
        E::ConnectionRefused(C::UnsupportedProtocolVersion | C::RefusedProtocolVersion) => {
            format!("the broker does not speak MQTT 5 ({e}): set [mqtt] protocol = \"3.1.1\"")
        }
        other => other.to_string(),
    }
}
