//! The broker connection, the same for MQTT 3.1.1 and MQTT 5: options from configuration
//! (TLS, credentials, last will, manual acks, a persistent session), a cloneable client
//! handle and an event loop that yields our own events, and the embedded broker for
//! installations that have none.
//!
//! The rest of the daemon never names a rumqttc type: `[mqtt] protocol` picks rumqttc's
//! v4 (3.1.1) or v5 client here, and everything above sees [`Client`] and [`Event`].

mod embedded;
mod options;
mod session;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

pub use embedded::{start_embedded, start_embedded_with};
pub use options::{options, ConnectOptions, Session};
pub use session::{connect, AckToken, Client, ClientError, ConnectionError, Event, EventLoop, Message};

/// The largest packet accepted from the broker. Larger than the contract's 1 MiB payload
/// limit, so an oversize command reaches us and is rejected with a message, instead of
/// breaking the connection (and coming back, redelivered, forever).
pub const MAX_INCOMING_PACKET: usize = 8 * 1024 * 1024;

/// Messages published (QoS 1) and not yet acknowledged by the broker, at most, unless a
/// user of the connection sets another bound. rumqttc's v5 client sizes a table by this
/// bound and would otherwise take 65,535.
pub const DEFAULT_INFLIGHT: u16 = 100;

/// A session that never expires (MQTT 5: `0xFFFFFFFF`), as a 3.1.1 persistent session.
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;

/// A broker that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    /// The URL is not `mqtt://host:port` or `mqtts://host:port`.
    #[error("broker {0:?}: expected mqtt://host:port or mqtts://host:port")]
    BadUrl(String),
    /// A file named in [mqtt] cannot be read.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// TLS cannot be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// The embedded broker could not start.
    #[error("embedded broker: {0}")]
    Embedded(String),
}

/// Which MQTT version is spoken to the broker (`[mqtt] protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 3.1.1, the default: every broker speaks it, and the contract needs nothing more.
    #[default]
    V311,
    /// MQTT 5: a session expiry interval, reason codes on refusals.
    V5,
}

impl Protocol {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const PROTOCOL_HELP: &str = "write protocol = \"3.1.1\" or protocol = \"5\"";

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Protocol;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"3.1.1\" or \"5\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
                match v.trim() {
                    "3.1.1" => Ok(Protocol::V311),
                    "5" | "5.0" => Ok(Protocol::V5),
                    other => Err(E::custom(format!(
                        "MQTT protocol {:?} is not supported: {PROTOCOL_HELP}",
                        other.chars().take(40).collect::<String>()
                    ))),
                }
            }
            // `protocol = 5` (a TOML integer) means what it says.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                match v {
                    5 => Ok(Protocol::V5),
                    other => Err(E::custom(format!("MQTT protocol {other} is not supported: {PROTOCOL_HELP}"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Protocol, E> {
                if v == 5.0 {
                    Ok(Protocol::V5)
                } else {
                    Err(E::custom(format!("MQTT protocol {v} is not supported: {PROTOCOL_HELP}")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Delivery guarantee of a publish or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QoS {
    /// At most once.
    AtMostOnce,
    /// At least once (everything of the contract).
    AtLeastOnce,
    /// Exactly once.
    ExactlyOnce,
}

impl From<QoS> for rumqttc::QoS {
    fn from(q: QoS) -> Self {
        match q {
            QoS::AtMostOnce => Self::AtMostOnce,
            QoS::AtLeastOnce => Self::AtLeastOnce,
            QoS::ExactlyOnce => Self::ExactlyOnce,
        }
    }
}

impl From<QoS> for rumqttc::v5::mqttbytes::QoS {
    fn from(q: QoS) -> Self {
        match q {
            QoS::AtMostOnce => Self::AtMostOnce,
            QoS::AtLeastOnce => Self::AtLeastOnce,
            QoS::ExactlyOnce => Self::ExactlyOnce,
        }
    }
}

impl From<rumqttc::QoS> for QoS {
    fn from(q: rumqttc::QoS) -> Self {
        match q {
            rumqttc::QoS::AtMostOnce => Self::AtMostOnce,
            rumqttc::QoS::AtLeastOnce => Self::AtLeastOnce,
            rumqttc::QoS::ExactlyOnce => Self::ExactlyOnce,
        }
    }
}

impl From<rumqttc::v5::mqttbytes::QoS> for QoS {
    fn from(q: rumqttc::v5::mqttbytes::QoS) -> Self {
        match q {
            rumqttc::v5::mqttbytes::QoS::AtMostOnce => Self::AtMostOnce,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce => Self::AtLeastOnce,
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce => Self::ExactlyOnce,
        }
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS.
    pub tls: bool,
}

impl BrokerUrl {
    /// Parse `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
    pub fn parse(url: &str) -> Result<Self, MqttSetupError> {
        let bad = || MqttSetupError::BadUrl(url.chars().take(200).collect());
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(Self { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtt://127.0.0.1:1884").ok(),
            Some(BrokerUrl { host: "127.0.0.1".into(), port: 1884, tls: false })
        );
        assert_eq!(BrokerUrl::parse("mqtts://broker.example").ok().map(|u| (u.port, u.tls)), Some((8883, true)));
        for bad in ["127.0.0.1:1883", "mqtt://", "mqtt://host:port", "http://x:1", "mqtt://a/b:1"] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, Deserialize)]
    struct P {
        protocol: Protocol,
    }

    fn parse(v: &str) -> Result<Protocol, String> {
        toml::from_str::<P>(&format!("protocol = {v}")).map(|p| p.protocol).map_err(|e| e.to_string())
    }

    #[test]
    fn protocol_versions_as_written() {
        assert_eq!(parse("\"3.1.1\""), Ok(Protocol::V311));
        assert_eq!(parse("\"5\""), Ok(Protocol::V5));
        assert_eq!(parse("\"5.0\""), Ok(Protocol::V5));
        assert_eq!(parse("5"), Ok(Protocol::V5));
        assert_eq!(Protocol::default(), Protocol::V311);
        for bad in ["\"3.1\"", "\"4\"", "\"v5\"", "4", "3.1", "true", "\"\""] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("\"3.1.1\"") && e.contains("\"5\""), "{bad}: the error says what to write: {e}");
        }
    }
}
