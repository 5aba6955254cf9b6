//! The broker connection: options from configuration (TLS, credentials, last will,
//! manual acks, a persistent session), and the embedded broker for installations that
//! have none.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use crate::config::MqttConfig;

/// The largest packet accepted from the broker. Larger than the contract's 1 MiB payload
/// limit, so an oversize command reaches us and is rejected with a message, instead of
/// breaking the connection (and coming back, redelivered, forever).
pub const MAX_INCOMING_PACKET: usize = 8 * 1024 * 1024;

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
    /// The embedded broker could not start.
    #[error("embedded broker: {0}")]
    Embedded(String),
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

/// Options for a connection to `url` as `client_id`, with credentials and TLS from
/// `cfg` (files relative to `base_dir`). `will`: topic and payload of the last will.
pub fn options(
    cfg: &MqttConfig,
    url: &BrokerUrl,
    client_id: &str,
    will: Option<(String, String)>,
    base_dir: &Path,
) -> Result<MqttOptions, MqttSetupError> {
    let mut o = MqttOptions::new(client_id, url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET);
    if let Some((topic, payload)) = will {
        o.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
    }
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(f) => {
                let path = resolve(base_dir, f);
                std::fs::read_to_string(&path)
                    .map_err(|e| MqttSetupError::File { path: path.display().to_string(), message: e.to_string() })?
                    .trim()
                    .to_owned()
            }
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if url.tls {
        o.set_transport(Transport::Tls(tls_config(cfg, base_dir)?));
    }
    Ok(o)
}

fn resolve(base: &Path, p: &Path) -> std::path::PathBuf {
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
            for cert in rustls_pemfile_certs(&pem) {
                roots.add(cert).map_err(|e| file_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(file_err("no PEM certificate in the file".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttSetupError::Embedded(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// Certificates from PEM text (the `CERTIFICATE` blocks; anything else is skipped).
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

/// Start the embedded broker (rumqttd) on `127.0.0.1:port` (0: a free port) and return
/// the port. It runs on its own threads for the life of the process.
pub fn start_embedded(port: u16) -> Result<u16, MqttSetupError> {
    let port = if port == 0 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| MqttSetupError::Embedded(e.to_string()))?;
        probe.local_addr().map_err(|e| MqttSetupError::Embedded(e.to_string()))?.port()
    } else {
        port
    };
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_INCOMING_PACKET,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-loopback".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("loopback".to_owned(), server)].into_iter().collect()),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = ready_tx.send(());
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| MqttSetupError::Embedded(e.to_string()))?;
    let _ = ready_rx.recv();
    // The broker binds on its own threads: wait until it accepts connections.
    for _ in 0..200 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(MqttSetupError::Embedded(format!("nothing listens on {listen} after 2 s")))
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
}
