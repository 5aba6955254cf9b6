//! The embedded broker (rumqttd) for installations that have none.

use std::time::Duration;

use super::{MqttSetupError, Protocol, MAX_INCOMING_PACKET};

/// Start the embedded broker (rumqttd) on `127.0.0.1:port` (0: a free port), serving
/// MQTT 3.1.1, and return the port. It runs on its own threads for the life of the
/// process.
pub fn start_embedded(port: u16) -> Result<u16, MqttSetupError> {
    start_embedded_with(port, Protocol::V311)
}

/// [`start_embedded`] serving `protocol`. It runs on its own threads for the life of the
/// process.
///
/// rumqttd serves one protocol version per listener, and the daemon, its readings
/// connection and the client verbs all read the one `[mqtt] protocol`: the listener on
/// `embedded_port` speaks that version.
pub fn start_embedded_with(port: u16, protocol: Protocol) -> Result<u16, MqttSetupError> {
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
        name: format!("embedded-mqtt-{}", protocol.as_str()),
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
        v4: None,
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let listeners = Some([("loopback".to_owned(), server)].into_iter().collect());
    let config = match protocol {
        Protocol::V311 => rumqttd::Config { v4: listeners, ..config },
        Protocol::V5 => rumqttd::Config { v5: listeners, ..config },
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
