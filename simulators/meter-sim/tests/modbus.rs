//! Loopback: tokio-modbus's TCP client against simulated Modbus meters and gateways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meter_sim::{EndpointSpec, Faults, FleetConfig, ManualClock, MeterSpec, SimEventKind, SimOptions, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_modbus::client::{tcp, Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

const T0: i64 = 1_717_225_200_000; // 2024-06-01 07:00:00 UTC
const PATIENCE: Duration = Duration::from_secs(30);

async fn start() -> (Simulator, Arc<ManualClock>, SocketAddr, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = FleetConfig {
        meters: vec![
            MeterSpec::modbus("SIMMB0000003", 3),
            MeterSpec::modbus("SIMMB0000007", 7),
            MeterSpec::modbus("SIMMB0000001", 1),
        ],
        endpoints: vec![
            EndpointSpec::ModbusTcp { bind: any, meters: vec![0, 1] },
            EndpointSpec::ModbusTcp { bind: any, meters: vec![2] },
        ],
        ..FleetConfig::default()
    };
    let clock = Arc::new(ManualClock::new(T0));
    let sim = Simulator::start_with(cfg, SimOptions { clock: clock.clone(), utc_offset_minutes: 60 }).await.unwrap();
    let (gw, single) = (sim.endpoints()[0].addr.unwrap(), sim.endpoints()[1].addr.unwrap());
    (sim, clock, gw, single)
}

async fn connect(addr: SocketAddr, unit: u8) -> Context {
    tcp::connect_slave(addr, Slave(unit)).await.unwrap()
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f).await.expect("an answer")
}

#[tokio::test]
async fn the_register_map() {
    let (sim, clock, gw, _) = start().await;
    let mut ctx = connect(gw, 3).await;
    let serial = within(ctx.read_holding_registers(0, 6)).await.unwrap().unwrap();
    let text: Vec<u8> = serial.iter().flat_map(|w| w.to_be_bytes()).collect();
    assert_eq!(text, b"SIMMB0000003");

    let words = within(ctx.read_holding_registers(256, 4)).await.unwrap().unwrap();
    let import = (u64::from(words[0]) << 16 | u64::from(words[1])) * 10;
    let view = sim.meter("SIMMB0000003").unwrap();
    assert_eq!(import, view.import_wh / 10 * 10);
    clock.advance(3_600_000);
    let words = within(ctx.read_input_registers(256, 2)).await.unwrap().unwrap();
    assert!((u64::from(words[0]) << 16 | u64::from(words[1])) * 10 > import);

    // Local time (UTC+1), one hour after T0.
    let time = within(ctx.read_holding_registers(768, 6)).await.unwrap().unwrap();
    assert_eq!(time, vec![2024, 6, 1, 9, 0, 0]);
    within(ctx.write_multiple_registers(768, &[2024, 6, 1, 10, 0, 0])).await.unwrap().unwrap();
    assert_eq!(sim.meter("SIMMB0000003").unwrap().faults.clock_drift_s, 3600);

    // The relay.
    assert_eq!(within(ctx.read_discrete_inputs(0, 1)).await.unwrap().unwrap(), vec![true]);
    within(ctx.write_single_coil(0, false)).await.unwrap().unwrap();
    assert_eq!(within(ctx.read_discrete_inputs(0, 1)).await.unwrap().unwrap(), vec![false]);
    assert_eq!(within(ctx.read_coils(0, 1)).await.unwrap().unwrap(), vec![false]);
    assert!(!sim.meter("SIMMB0000003").unwrap().output_state);
    within(ctx.write_single_coil(0, true)).await.unwrap().unwrap();
    assert!(sim.meter("SIMMB0000003").unwrap().output_state);

    // Exceptions, not crashes.
    assert_eq!(within(ctx.read_holding_registers(5, 2)).await.unwrap(), Err(ExceptionCode::IllegalDataAddress));
    assert_eq!(within(ctx.read_holding_registers(1000, 1)).await.unwrap(), Err(ExceptionCode::IllegalDataAddress));
    assert_eq!(within(ctx.write_single_register(256, 1)).await.unwrap(), Err(ExceptionCode::IllegalDataAddress));
    assert_eq!(within(ctx.write_single_coil(1, true)).await.unwrap(), Err(ExceptionCode::IllegalDataAddress));
    assert_eq!(within(ctx.read_holding_registers(0, 200)).await.unwrap(), Err(ExceptionCode::IllegalDataValue));
    sim.shutdown().await;
}

#[tokio::test]
async fn gateways_route_by_unit_id() {
    let (sim, _, gw, single) = start().await;
    let mut ctx = connect(gw, 7).await;
    let serial = within(ctx.read_holding_registers(0, 6)).await.unwrap().unwrap();
    assert_eq!(serial[5].to_be_bytes(), *b"07");
    ctx.set_slave(Slave(9));
    assert_eq!(within(ctx.read_holding_registers(0, 6)).await.unwrap(), Err(ExceptionCode::GatewayTargetDevice));

    // A single meter answers its own unit id and 255; others are not there.
    let mut ctx = connect(single, 255).await;
    assert!(within(ctx.read_holding_registers(0, 6)).await.unwrap().is_ok());
    ctx.set_slave(Slave(1));
    assert!(within(ctx.read_holding_registers(0, 6)).await.unwrap().is_ok());
    ctx.set_slave(Slave(2));
    assert_eq!(within(ctx.read_holding_registers(0, 6)).await.unwrap(), Err(ExceptionCode::GatewayTargetDevice));
    sim.shutdown().await;
}

fn mbap(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = transaction.to_be_bytes().to_vec();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

#[tokio::test]
async fn faults_on_modbus_tcp() {
    let (sim, _, gw, _) = start().await;
    let mut events = sim.subscribe();
    let mut stream = TcpStream::connect(gw).await.unwrap();
    let read_serial = [3, 0, 0, 0, 6];
    // Offline: the first request is never answered; the second one is.
    sim.set_faults("SIMMB0000003", Faults { offline: true, ..Faults::default() }).unwrap();
    stream.write_all(&mbap(1, 3, &read_serial)).await.unwrap();
    while !matches!(events.recv().await.unwrap().kind, SimEventKind::Unanswered { .. }) {}
    sim.set_faults("SIMMB0000003", Faults { corrupt_every_nth: 2, ..Faults::default() }).unwrap();
    stream.write_all(&mbap(2, 3, &read_serial)).await.unwrap();
    let mut buf = [0u8; 64];
    let n = within(stream.read(&mut buf)).await.unwrap();
    assert_eq!((&buf[..2], buf[2], n), (&[0, 2][..], 0, 9 + 12));
    // Every second answer is corrupted: a client sees a broken protocol identifier.
    stream.write_all(&mbap(3, 3, &read_serial)).await.unwrap();
    let n = within(stream.read(&mut buf)).await.unwrap();
    assert_eq!((&buf[..2], n), (&[0, 3][..], 21));
    assert_ne!(buf[2], 0, "protocol identifier garbled");

    // A response delay is honoured.
    sim.set_faults("SIMMB0000007", Faults { response_delay_ms: 150, ..Faults::default() }).unwrap();
    let mut ctx = connect(gw, 7).await;
    let began = std::time::Instant::now();
    within(ctx.read_holding_registers(0, 1)).await.unwrap().unwrap();
    assert!(began.elapsed() >= Duration::from_millis(150));
    sim.shutdown().await;
}
