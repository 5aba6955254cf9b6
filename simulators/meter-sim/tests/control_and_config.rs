//! The control API over real HTTP, the head-end configuration writer, and garbage on
//! every listener.

use std::net::SocketAddr;
use std::time::Duration;

use meter_sim::{serve_control, FleetConfig, FleetPorts, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn http(addr: SocketAddr, request: &str) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

async fn fleet(n: usize) -> Simulator {
    Simulator::start(FleetConfig::generate(n, 9, &FleetPorts::default())).await.unwrap()
}

#[test]
fn the_simulator_can_be_shared_between_tasks() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Simulator>();
    shareable::<meter_sim::MeterView>();
}

#[tokio::test]
async fn the_control_api() {
    let sim = fleet(5).await;
    let api = serve_control(&sim, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (status, all) = http(api, "GET /meters HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((status, all.as_array().map(Vec::len)), (200, Some(5)));
    let (status, page) = http(api, "GET /meters?offset=1&limit=2 HTTP/1.1\r\n\r\n").await;
    assert_eq!((status, page[0]["id"].as_str()), (200, Some("SIM0000000002")));

    // Meter 2 is in control mode 1: the button disconnects it by hand.
    let (status, view) = http(api, "POST /meters/SIM0000000002/button HTTP/1.1\r\n\r\n").await;
    assert_eq!((status, view["output_state"].as_bool()), (200, Some(false)));
    assert_eq!(view["control_state"], "ready_for_reconnection");

    let body = r#"{"offline":true,"response_delay_ms":20}"#;
    let put = format!("PUT /meters/SIM0000000001/faults HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let (status, view) = http(api, &put).await;
    assert_eq!((status, view["faults"]["offline"].as_bool()), (200, Some(true)));
    assert!(sim.meter("SIM0000000001").unwrap().faults.offline);

    assert_eq!(http(api, "GET /meters/NOPE HTTP/1.1\r\n\r\n").await.0, 404);
    assert_eq!(http(api, "GET /nowhere HTTP/1.1\r\n\r\n").await.0, 404);
    assert_eq!(http(api, "DELETE /meters HTTP/1.1\r\n\r\n").await.0, 405);
    assert_eq!(http(api, "PUT /meters/SIM0000000001/faults HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}").await.0, 400);
    assert_eq!(http(api, "garbage\r\n\r\n").await.0, 400);
    let (status, endpoints) = http(api, "GET /endpoints HTTP/1.1\r\n\r\n").await;
    assert_eq!((status, endpoints.as_array().map(Vec::len)), (200, Some(3)));
    sim.shutdown().await;
    assert!(TcpStream::connect(api).await.is_err(), "the port is released at shutdown");
}

#[tokio::test]
async fn the_headend_configuration_matches_the_fleet() {
    let sim = fleet(10).await;
    let dir = std::env::temp_dir().join(format!("meter-sim-config-{}", std::process::id()));
    let path = dir.join("site.toml");
    std::fs::create_dir_all(&dir).unwrap();
    sim.write_headend_config(&path).unwrap();
    let site: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

    let links = site["link"].as_array().unwrap();
    for (link, endpoint) in links.iter().zip(sim.endpoints()) {
        assert_eq!(link["address"].as_str(), endpoint.addr.map(|a| a.to_string()).as_deref());
    }
    let meters = site["meter"].as_array().unwrap();
    assert_eq!(meters.len(), 10);
    for (i, (entry, spec)) in meters.iter().zip(&sim.config().meters).enumerate() {
        assert_eq!(entry["id"].as_str(), Some(meter_sim::headend_id(i).as_str()));
        assert_eq!(entry["identity"].as_str(), Some(spec.id.as_str()));
        if let Some(keys) = entry.get("keys").and_then(|k| k.as_str()) {
            let key: toml::Value = toml::from_str(&std::fs::read_to_string(dir.join(keys)).unwrap()).unwrap();
            match &spec.auth {
                meter_sim::SimAuth::Lls { password } => assert_eq!(key["password"].as_str(), Some(password.as_str())),
                meter_sim::SimAuth::HlsGmac { guek, .. } => {
                    assert_eq!(key["guek"].as_str(), Some(meter_sim::hex(guek).as_str()));
                    assert_eq!(key["client_system_title"].as_str(), Some("4844454E44000001"));
                }
                meter_sim::SimAuth::None => panic!("no keys for a meter without authentication"),
            }
        }
    }
    assert_eq!(site["modbus_profile"]["meter-sim"]["energy_import"]["register"].as_integer(), Some(256));
    let _ = std::fs::remove_dir_all(&dir);
    sim.shutdown().await;
}

#[tokio::test]
async fn garbage_on_every_listener_harms_nothing() {
    let sim = fleet(5).await;
    let api = serve_control(&sim, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut targets: Vec<SocketAddr> = sim.endpoints().iter().filter_map(|e| e.addr).collect();
    targets.push(api);
    let mut x: u64 = 0x9E37_79B9;
    for round in 0..40 {
        for &addr in &targets {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let junk: Vec<u8> = (0..(round * 37 % 700))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // The listener may close on garbage; that is fine, crashing is not.
            let _ = stream.write_all(&junk).await;
        }
    }
    // Everything still answers.
    let (status, _) = http(api, "GET /meters/SIM0000000001 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 200);
    let modbus = sim.endpoints().iter().find(|e| e.kind == meter_sim::EndpointKind::ModbusTcp).unwrap();
    let mut ctx = tokio_modbus::client::tcp::connect_slave(modbus.addr.unwrap(), tokio_modbus::Slave(1)).await.unwrap();
    use tokio_modbus::client::Reader;
    let regs = tokio::time::timeout(Duration::from_secs(5), ctx.read_holding_registers(0, 6)).await.unwrap();
    assert!(regs.unwrap().is_ok());
    sim.shutdown().await;
}
