//! The running simulator: binds every endpoint, spawns its tasks, and is the handle tests
//! and the binary drive meters through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::{EndpointSpec, Faults, FleetConfig};
use crate::meter::{Fleet, Meter, MeterView, SimEvent};
use crate::{hdlc, modbus, modbus_rtu, wrapper, SimError};

/// How a simulator runs, beyond what the fleet is.
#[derive(Clone)]
pub struct SimOptions {
    /// Where true time comes from.
    pub clock: Arc<dyn Clock>,
    /// The meters' local time zone, minutes ahead of UTC (480 = UTC+8).
    pub utc_offset_minutes: i16,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self { clock: Arc::new(SystemClock), utc_offset_minutes: 0 }
    }
}

/// Which kind of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointKind {
    /// DLMS wrapper over TCP.
    DlmsWrapperTcp,
    /// DLMS HDLC over TCP (gateway, concentrator).
    DlmsHdlcTcp,
    /// DLMS HDLC over a serial device.
    DlmsHdlcSerial,
    /// Modbus TCP.
    ModbusTcp,
    /// Modbus RTU over a serial device.
    ModbusRtuSerial,
}

/// An endpoint as actually bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BoundEndpoint {
    /// What it is.
    pub kind: EndpointKind,
    /// The address actually bound (TCP endpoints).
    pub addr: Option<SocketAddr>,
    /// The device path (serial endpoints).
    pub serial_path: Option<String>,
    /// Serial line rate, or the emulated bus rate of an HDLC gateway.
    pub baud: Option<u32>,
    /// Indices of the meters behind it.
    pub meters: Vec<usize>,
}

/// A running fleet.
pub struct Simulator {
    fleet: Arc<Fleet>,
    config: FleetConfig,
    endpoints: Vec<BoundEndpoint>,
    shutdown: watch::Sender<bool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Open a serial device for the simulator's use.
pub(crate) fn open_serial(path: &str, baud: u32) -> Result<tokio_serial::SerialStream, SimError> {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(path, baud)
        .open_native_async()
        .map_err(|source| SimError::Serial { path: path.to_owned(), source })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, SimError> {
    TcpListener::bind(addr).await.map_err(|source| SimError::Bind { addr, source })
}

impl Simulator {
    /// Bind every endpoint of `cfg` and start serving, on the system clock at UTC.
    ///
    /// # Errors
    /// An invalid fleet, or an endpoint that cannot be bound or opened.
    pub async fn start(cfg: FleetConfig) -> Result<Self, SimError> {
        Self::start_with(cfg, SimOptions::default()).await
    }

    /// As [`Simulator::start`], with an injected clock and time zone.
    ///
    /// # Errors
    /// An invalid fleet, or an endpoint that cannot be bound or opened.
    pub async fn start_with(mut cfg: FleetConfig, options: SimOptions) -> Result<Self, SimError> {
        cfg.normalize()?;
        let start_ms = options.clock.now_ms();
        let by_id: HashMap<String, usize> = cfg.meters.iter().enumerate().map(|(i, m)| (m.id.clone(), i)).collect();
        let meters = cfg.meters.iter().enumerate().map(|(i, s)| Meter::new(s.clone(), i, cfg.seed)).collect();
        let fleet = Arc::new(Fleet {
            meters,
            by_id,
            clock: options.clock,
            utc_offset_min: options.utc_offset_minutes,
            period_s: cfg.profile_period_s,
            depth_days: cfg.profile_depth_days,
            start_ms,
            events: broadcast::channel(1024).0,
        });
        let (shutdown, _) = watch::channel(false);
        let mut sim = Self { fleet, config: cfg.clone(), endpoints: Vec::new(), shutdown, tasks: Arc::default() };
        for spec in &cfg.endpoints {
            if let Err(e) = sim.start_endpoint(spec).await {
                sim.stop().await;
                return Err(e);
            }
        }
        Ok(sim)
    }

    async fn start_endpoint(&mut self, spec: &EndpointSpec) -> Result<(), SimError> {
        let fleet = Arc::clone(&self.fleet);
        let stop = self.shutdown.subscribe();
        let meters = spec.meters().to_vec();
        let (kind, addr, serial_path, baud, task) = match spec.clone() {
            EndpointSpec::DlmsWrapperTcp { bind: at, meters } => {
                let listener = bind(at).await?;
                let addr = listener.local_addr().ok();
                let task = tokio::spawn(wrapper::serve(listener, fleet, meters, stop));
                (EndpointKind::DlmsWrapperTcp, addr, None, None, task)
            }
            EndpointSpec::DlmsHdlcTcp { bind: at, meters, baud } => {
                let listener = bind(at).await?;
                let addr = listener.local_addr().ok();
                let task = tokio::spawn(hdlc::serve_tcp(listener, fleet, meters, baud, stop));
                (EndpointKind::DlmsHdlcTcp, addr, None, baud, task)
            }
            EndpointSpec::DlmsHdlcSerial { path, baud, meters } => {
                let port = open_serial(&path, baud)?;
                let task = tokio::spawn(hdlc::serve_serial(port, path.clone(), baud, fleet, meters, stop));
                (EndpointKind::DlmsHdlcSerial, None, Some(path), Some(baud), task)
            }
            EndpointSpec::ModbusTcp { bind: at, meters } => {
                let listener = bind(at).await?;
                let addr = listener.local_addr().ok();
                let task = tokio::spawn(modbus::serve_tcp(listener, fleet, meters, stop));
                (EndpointKind::ModbusTcp, addr, None, None, task)
            }
            EndpointSpec::ModbusRtuSerial { path, baud, meters } => {
                let port = open_serial(&path, baud)?;
                let task = tokio::spawn(modbus_rtu::serve_serial(port, path.clone(), baud, fleet, meters, stop));
                (EndpointKind::ModbusRtuSerial, None, Some(path), Some(baud), task)
            }
        };
        self.add_task(task);
        self.endpoints.push(BoundEndpoint { kind, addr, serial_path, baud, meters });
        Ok(())
    }

    pub(crate) fn add_task(&self, task: JoinHandle<()>) {
        self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(task);
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The endpoints, with the addresses actually bound.
    #[must_use]
    pub fn endpoints(&self) -> &[BoundEndpoint] {
        &self.endpoints
    }

    /// The fleet as started (defaults filled in).
    #[must_use]
    pub const fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// A snapshot of one meter.
    #[must_use]
    pub fn meter(&self, id: &str) -> Option<MeterView> {
        self.fleet.meter(id).map(|m| m.view(&self.fleet))
    }

    /// Snapshots of every meter, in fleet order.
    #[must_use]
    pub fn meters(&self) -> Vec<MeterView> {
        self.fleet.meters.iter().map(|m| m.view(&self.fleet)).collect()
    }

    /// True time now, on the simulator's clock, ms since the epoch.
    #[must_use]
    pub fn now_ms(&self) -> i64 {
        self.fleet.now_ms()
    }

    /// Up to `n` meters: the most recently asked ones (then the first ones), in fleet order.
    #[must_use]
    pub fn most_recent(&self, n: usize) -> Vec<MeterView> {
        let mut keyed: Vec<(i64, usize)> =
            self.fleet.meters.iter().map(|m| (m.lock().last.map_or(i64::MIN, |l| l.0), m.index)).collect();
        keyed.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        keyed.truncate(n);
        keyed.sort_unstable_by_key(|k| k.1);
        keyed.iter().filter_map(|&(_, i)| self.fleet.meters.get(i)).map(|m| m.view(&self.fleet)).collect()
    }

    /// The DLMS server system title of a meter: "SIM" and its 1-based number in 5 bytes.
    #[must_use]
    pub fn system_title(&self, id: &str) -> Option<[u8; 8]> {
        self.fleet.meter(id).map(|m| m.system_title)
    }

    /// The disconnector control log of a meter: (meter-clock ms, event code), oldest first.
    #[must_use]
    pub fn control_log(&self, id: &str) -> Option<Vec<(i64, u8)>> {
        self.fleet.meter(id).map(|m| m.lock().log.iter().copied().collect())
    }

    /// Events as they happen (relay moves, requests, fault changes).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<SimEvent> {
        self.fleet.events.subscribe()
    }

    /// The customer presses the meter's button: ready_for_reconnection becomes connected;
    /// connected becomes ready_for_reconnection in modes 1, 2 and 5 (manual disconnect);
    /// otherwise nothing happens.
    ///
    /// # Errors
    /// [`SimError::UnknownMeter`].
    pub fn press_button(&self, id: &str) -> Result<(), SimError> {
        self.fleet.press_button(id)
    }

    /// Replace a meter's faults.
    ///
    /// # Errors
    /// [`SimError::UnknownMeter`].
    pub fn set_faults(&self, id: &str, faults: Faults) -> Result<(), SimError> {
        self.fleet.set_faults(id, faults)
    }

    /// Write the head-end's configuration for this fleet to `path`, with key files in
    /// `keys/` next to it.
    ///
    /// # Errors
    /// [`SimError::File`] when a file cannot be written.
    pub fn write_headend_config(&self, path: &Path) -> Result<(), SimError> {
        crate::headend_config::write(self, path)
    }

    /// Stop every task and wait for them; the ports are free when this returns.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        // A simulator dropped without shutdown() still stops serving.
        let _ = self.shutdown.send(true);
    }
}
