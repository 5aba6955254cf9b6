//! Serial endpoints on a pseudo-terminal: the simulator opens the slave side by path, the
//! test talks on the master side, as a head-end would through an RS-485 adapter.

mod common;

use std::time::Duration;

use common::{Auth, Client, Link, LDN};
use dlms_cosem_rs::axdr::DataBuf;
use dlms_cosem_rs::client::AssociationStep;
use dlms_cosem_rs::transport::hdlc::{Address, Parameters};
use meter_sim::{EndpointSpec, FleetConfig, MeterSpec, Simulator};
use tokio_modbus::client::{rtu, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tokio_serial::{SerialPort, SerialStream};

/// A pty pair: the master stream and the slave's path. The slave handle is closed so the
/// simulator can open it exclusively; the pty lives as long as the master.
fn pty() -> Option<(SerialStream, String)> {
    let (master, slave) = SerialStream::pair().ok()?;
    let path = slave.name()?;
    drop(slave);
    Some((master, path))
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f).await.expect("an answer")
}

#[tokio::test]
async fn dlms_hdlc_on_a_serial_bus() {
    let Some((master, path)) = pty() else {
        eprintln!("no pty available; skipped");
        return;
    };
    let cfg = FleetConfig {
        meters: vec![
            MeterSpec { physical_address: 16, ..MeterSpec::dlms("SIM0000000016", 0) },
            MeterSpec { physical_address: 17, ..MeterSpec::dlms("SIM0000000017", 1) },
        ],
        endpoints: vec![EndpointSpec::DlmsHdlcSerial { path, baud: 9600, meters: vec![0, 1] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(cfg).await.unwrap();
    let link = Link::hdlc_on(master, 0x10, Address::server(1, 17), Parameters::DEFAULT).await.unwrap();
    let mut c = Client::new(link, 0x10, &Auth::None);
    assert_eq!(c.associate().await, Ok(AssociationStep::Established));
    assert_eq!(c.get(1, LDN, 2, None).await, Ok(DataBuf::OctetString(b"SIM0000000017".to_vec())));
    sim.shutdown().await;
}

#[tokio::test]
async fn modbus_rtu_on_a_serial_bus() {
    let Some((master, path)) = pty() else {
        eprintln!("no pty available; skipped");
        return;
    };
    let cfg = FleetConfig {
        meters: vec![MeterSpec::modbus("SIMMB0000003", 3), MeterSpec::modbus("SIMMB0000004", 4)],
        endpoints: vec![EndpointSpec::ModbusRtuSerial { path, baud: 19200, meters: vec![0, 1] }],
        ..FleetConfig::default()
    };
    let sim = Simulator::start(cfg).await.unwrap();
    let mut ctx = rtu::attach_slave(master, Slave(4));
    let serial = within(ctx.read_holding_registers(0, 6)).await.unwrap().unwrap();
    assert_eq!(serial[5].to_be_bytes(), *b"04");
    within(ctx.write_single_coil(0, false)).await.unwrap().unwrap();
    assert!(!sim.meter("SIMMB0000004").unwrap().output_state);
    ctx.set_slave(Slave(3));
    assert_eq!(within(ctx.read_discrete_inputs(0, 1)).await.unwrap().unwrap(), vec![true]);
    sim.shutdown().await;
}
