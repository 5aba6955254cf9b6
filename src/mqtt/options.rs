//! Connection options from `[mqtt]`, for either protocol version.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};

use super::{MqttSetupError, Protocol, QoS, DEFAULT_INFLIGHT, MAX_INCOMING_PACKET, SESSION_NEVER_EXPIRES};
use crate::config::MqttConfig;

/// What the broker keeps of us between connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// Nothing: a one-shot client, or a connection that resends from its own store.
    Clean,
    /// Subscriptions and QoS 1 messages not yet acknowledged, so that commands published
    /// while the daemon is down wait at the broker. MQTT 5: for `[mqtt] session_expiry_s`.
    Persistent,
}

/// Options of one connection, for the protocol `[mqtt]` names.
#[derive(Clone)]
pub struct ConnectOptions {
    pub(super) inner: Inner,
    /// MQTT 5 session expiry interval for [`Session::Persistent`], s.
    session_expiry_s: u32,
}

#[derive(Clone)]
// Boxed: the two differ in size by hundreds of bytes.
pub(super) enum Inner {
    V311(Box<rumqttc::MqttOptions>),
    V5(Box<rumqttc::v5::MqttOptions>),
}

impl std::fmt::Debug for ConnectOptions {
    // Not derived: the options hold the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("protocol", &self.protocol())
            .field("client_id", &self.client_id())
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// The protocol version spoken.
    pub fn protocol(&self) -> Protocol {
        match self.inner {
            Inner::V311(_) => Protocol::V311,
            Inner::V5(_) => Protocol::V5,
        }
    }

    /// The client id.
    pub fn client_id(&self) -> String {
        match &self.inner {
            Inner::V311(o) => o.client_id(),
            Inner::V5(o) => o.client_id(),
        }
    }

    /// Clean or persistent session. MQTT 5 needs a session expiry interval besides the
    /// clean-start flag: with none, the broker ends the session when the connection ends.
    pub fn set_session(&mut self, session: Session) -> &mut Self {
        let clean = session == Session::Clean;
        match &mut self.inner {
            Inner::V311(o) => {
                o.set_clean_session(clean);
            }
            Inner::V5(o) => {
                o.set_clean_start(clean);
                o.set_session_expiry_interval((!clean).then_some(self.session_expiry_s));
            }
        }
        self
    }

    /// The MQTT 5 session expiry interval asked for a persistent session, s (none for
    /// 3.1.1 or a clean session).
    pub fn session_expiry(&self) -> Option<u32> {
        match &self.inner {
            Inner::V311(_) => None,
            Inner::V5(o) => o.session_expiry_interval(),
        }
    }

    /// Inbound messages are acknowledged by [`super::Client::ack`] only.
    pub fn set_manual_acks(&mut self, manual: bool) -> &mut Self {
        match &mut self.inner {
            Inner::V311(o) => {
                o.set_manual_acks(manual);
            }
            Inner::V5(o) => {
                o.set_manual_acks(manual);
            }
        }
        self
    }

    /// Publishes not yet acknowledged by the broker, at most (at least 1). An MQTT 5
    /// broker may ask for fewer (receive maximum).
    pub fn set_inflight(&mut self, n: u16) -> &mut Self {
        let n = n.max(1);
        match &mut self.inner {
            Inner::V311(o) => {
                o.set_inflight(n);
            }
            Inner::V5(o) => {
                o.set_outgoing_inflight_upper_limit(n);
            }
        }
        self
    }
}

/// Options for a connection to `url` as `client_id` in the protocol of `cfg`, with
/// credentials and TLS from `cfg` (files relative to `base_dir`). `will`: topic and
/// payload of the last will (QoS 1, retained). The session is clean until
/// [`ConnectOptions::set_session`] says otherwise.
pub fn options(
    cfg: &MqttConfig,
    url: &super::BrokerUrl,
    client_id: &str,
    will: Option<(String, String)>,
    base_dir: &Path,
) -> Result<ConnectOptions, MqttSetupError> {
    let password = match (&cfg.username, &cfg.password_file) {
        (Some(user), Some(f)) => {
            let path = resolve(base_dir, f);
            // The error names the file and the system's reason, never its content.
            let text = std::fs::read_to_string(&path)
                .map_err(|e| MqttSetupError::File { path: path.display().to_string(), message: e.to_string() })?;
            Some((user.clone(), text.trim().to_owned()))
        }
        (Some(user), None) => Some((user.clone(), String::new())),
        (None, _) => None,
    };
    let transport = if url.tls { Some(Transport::Tls(tls_config(cfg, base_dir)?)) } else { None };
    let keep_alive = Duration::from_secs(30);
    let inner = match cfg.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, url.host.clone(), url.port);
            o.set_keep_alive(keep_alive);
            o.set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET);
            o.set_inflight(DEFAULT_INFLIGHT);
            if let Some((topic, payload)) = will {
                o.set_last_will(rumqttc::LastWill::new(topic, payload, QoS::AtLeastOnce.into(), true));
            }
            if let Some((user, pw)) = password {
                o.set_credentials(user, pw);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            Inner::V311(Box::new(o))
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, url.host.clone(), url.port);
            o.set_keep_alive(keep_alive);
            // Also tells the broker: a message larger than this is not sent to us at all.
            o.set_max_packet_size(Some(MAX_INCOMING_PACKET as u32));
            o.set_outgoing_inflight_upper_limit(DEFAULT_INFLIGHT);
            if let Some((topic, payload)) = will {
                // No will delay: `status` says offline as soon as the connection is lost,
                // as with 3.1.1.
                o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    topic,
                    payload,
                    QoS::AtLeastOnce.into(),
                    true,
                    None,
                ));
            }
            if let Some((user, pw)) = password {
                o.set_credentials(user, pw);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            Inner::V5(Box::new(o))
        }
    };
    Ok(ConnectOptions { inner, session_expiry_s: cfg.session_expiry_s.unwrap_or(SESSION_NEVER_EXPIRES) })
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn tls_config(cfg: &MqttConfig, base_dir: &Path) -> Result<TlsConfiguration, MqttSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(f) => {
            let path = resolve(base_dir, f);
            let file_err = |m: String| MqttSetupError::File { path: path.display().to_string(), message: m };
            let pem = std::fs::read(&path).map_err(|e| file_err(e.to_string()))?;
            for cert in pem_certs(&pem) {
                roots.add(cert).map_err(|e| file_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(file_err("no PEM certificate in the file".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // One unusable system certificate must not disable the others.
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// Certificates from PEM text (the `CERTIFICATE` blocks; anything else is skipped).
fn pem_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(protocol: Protocol, expiry: Option<u32>) -> MqttConfig {
        MqttConfig { protocol, session_expiry_s: expiry, ..MqttConfig::default() }
    }

    fn url() -> super::super::BrokerUrl {
        super::super::BrokerUrl { host: "127.0.0.1".into(), port: 1883, tls: false }
    }

    #[test]
    fn a_persistent_v5_session_asks_for_the_configured_expiry_and_a_clean_one_for_none() {
        let mut o = options(&cfg(Protocol::V5, Some(3600)), &url(), "id", None, Path::new(".")).expect("options");
        assert_eq!(o.protocol(), Protocol::V5);
        assert_eq!(o.session_expiry(), None, "clean until asked");
        o.set_session(Session::Persistent);
        assert_eq!(o.session_expiry(), Some(3600));
        let Inner::V5(v5) = &o.inner else { panic!("v5 options") };
        assert!(!v5.clean_start());
        o.set_session(Session::Clean);
        assert_eq!(o.session_expiry(), None);
        let mut never = options(&cfg(Protocol::V5, None), &url(), "id", None, Path::new(".")).expect("options");
        never.set_session(Session::Persistent);
        assert_eq!(never.session_expiry(), Some(SESSION_NEVER_EXPIRES), "default: as long as 3.1.1 keeps one");
    }

    #[test]
    fn a_persistent_311_session_is_not_clean() {
        let mut o = options(&cfg(Protocol::V311, None), &url(), "id", None, Path::new(".")).expect("options");
        assert_eq!(o.protocol(), Protocol::V311);
        o.set_session(Session::Persistent);
        let Inner::V311(v4) = &o.inner else { panic!("3.1.1 options") };
        assert!(!v4.clean_session());
        assert_eq!(o.session_expiry(), None);
    }

    #[test]
    fn the_password_never_shows_in_debug_output_or_errors() {
        let dir = std::env::temp_dir().join(format!("headend-mqtt-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("pw"), "s3cret-Pa55\n").expect("pw");
        for protocol in [Protocol::V311, Protocol::V5] {
            let c = MqttConfig {
                protocol,
                username: Some("daemon".into()),
                password_file: Some("pw".into()),
                ..MqttConfig::default()
            };
            let o = options(&c, &url(), "id", None, &dir).expect("options");
            assert!(!format!("{o:?}").contains("s3cret"), "{o:?}");
            let missing = MqttConfig { password_file: Some("nope".into()), ..c };
            let e = options(&missing, &url(), "id", None, &dir).expect_err("no such file").to_string();
            assert!(e.contains("nope") && !e.contains("s3cret"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
