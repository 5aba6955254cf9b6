//! What the simulated fleet is: meters, the links they sit behind, and their faults.
//!
//! These types are both the library's API and, through serde, the `--config` fleet file.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::SimError;

/// A whole simulated fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetConfig {
    /// The meters; endpoints refer to them by index.
    pub meters: Vec<MeterSpec>,
    /// The links the meters are reachable over.
    pub endpoints: Vec<EndpointSpec>,
    /// Load-profile capture period in seconds (900 = 15 minutes).
    #[serde(default = "default_period")]
    pub profile_period_s: u32,
    /// How many days the load profile holds.
    #[serde(default = "default_depth")]
    pub profile_depth_days: u32,
    /// Seed of the load model and of generated keys.
    #[serde(default)]
    pub seed: u64,
}

const fn default_period() -> u32 {
    900
}

const fn default_depth() -> u32 {
    60
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            meters: Vec::new(),
            endpoints: Vec::new(),
            profile_period_s: default_period(),
            profile_depth_days: default_depth(),
            seed: 0,
        }
    }
}

/// One meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterSpec {
    /// Logical device name (DLMS 0.0.42.0.0.255), and the Modbus serial number.
    pub id: String,
    /// Disconnect-control mode 0..=6 (IEC 62056-6-2 class 70).
    #[serde(default = "default_mode")]
    pub control_mode: u8,
    /// What the management client (SAP 1) must present.
    #[serde(default)]
    pub auth: SimAuth,
    /// Wrapper destination wPort / HDLC upper address. 0 in a fleet file means 1.
    #[serde(default)]
    pub logical_device: u16,
    /// HDLC lower (physical) address. 0 in a fleet file means 16 + the meter's index.
    #[serde(default)]
    pub physical_address: u16,
    /// Modbus unit id. 0 in a fleet file means 1 + the meter's index modulo 247.
    #[serde(default)]
    pub unit_id: u8,
    /// Which protocol the meter speaks.
    #[serde(default)]
    pub protocol: SimProtocol,
    /// Import energy register at simulator start, in Wh.
    #[serde(default)]
    pub initial_import_wh: u64,
}

const fn default_mode() -> u8 {
    2
}

impl MeterSpec {
    /// A DLMS meter with defaults: mode 2, no authentication, logical device 1.
    #[must_use]
    pub fn dlms(id: impl Into<String>, index: usize) -> Self {
        Self {
            id: id.into(),
            control_mode: 2,
            auth: SimAuth::None,
            logical_device: 1,
            physical_address: 16 + u16::try_from(index).unwrap_or(0),
            unit_id: (index % 247) as u8 + 1,
            protocol: SimProtocol::Dlms,
            initial_import_wh: 1_000_000,
        }
    }

    /// A Modbus meter with defaults.
    #[must_use]
    pub fn modbus(id: impl Into<String>, unit_id: u8) -> Self {
        Self { protocol: SimProtocol::Modbus, unit_id, ..Self::dlms(id, 0) }
    }
}

/// How the management client authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SimAuth {
    /// No authentication (and then the public client may switch the relay too).
    #[default]
    None,
    /// Low-level security: a password.
    Lls {
        /// The password, as ASCII.
        password: String,
    },
    /// High-level security, GMAC (mechanism 5), suite 0, authenticated and encrypted.
    HlsGmac {
        /// Global unicast encryption key.
        #[serde(with = "hex16")]
        guek: [u8; 16],
        /// Authentication key.
        #[serde(with = "hex16")]
        gak: [u8; 16],
    },
}

impl SimAuth {
    /// The head-end config's name for it.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lls { .. } => "lls",
            Self::HlsGmac { .. } => "hls-gmac",
        }
    }
}

/// Which protocol a meter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimProtocol {
    /// DLMS/COSEM, logical-name referencing.
    #[default]
    Dlms,
    /// Modbus with meter-sim's register map.
    Modbus,
}

/// A link the meters are reachable over. `meters` are indices into [`FleetConfig::meters`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EndpointSpec {
    /// DLMS wrapper over TCP; meters by destination wPort (their logical device).
    DlmsWrapperTcp {
        /// Where to listen.
        bind: SocketAddr,
        /// Which meters.
        meters: Vec<usize>,
    },
    /// DLMS HDLC over TCP: a transparent gateway or concentrator in front of an RS-485 bus.
    DlmsHdlcTcp {
        /// Where to listen.
        bind: SocketAddr,
        /// Which meters, by HDLC physical address.
        meters: Vec<usize>,
        /// When set, answers are delayed by their wire time at this rate and the bus
        /// carries one request at a time, across all connections.
        #[serde(default)]
        baud: Option<u32>,
    },
    /// DLMS HDLC over a serial device (RS-485 adapter, pty).
    DlmsHdlcSerial {
        /// Device path.
        path: String,
        /// Line rate.
        baud: u32,
        /// Which meters.
        meters: Vec<usize>,
    },
    /// Modbus TCP: one meter, or a gateway by unit id.
    ModbusTcp {
        /// Where to listen.
        bind: SocketAddr,
        /// Which meters.
        meters: Vec<usize>,
    },
    /// Modbus RTU over a serial device.
    ModbusRtuSerial {
        /// Device path.
        path: String,
        /// Line rate.
        baud: u32,
        /// Which meters.
        meters: Vec<usize>,
    },
}

impl EndpointSpec {
    /// The meters behind this endpoint.
    #[must_use]
    pub fn meters(&self) -> &[usize] {
        match self {
            Self::DlmsWrapperTcp { meters, .. }
            | Self::DlmsHdlcTcp { meters, .. }
            | Self::DlmsHdlcSerial { meters, .. }
            | Self::ModbusTcp { meters, .. }
            | Self::ModbusRtuSerial { meters, .. } => meters,
        }
    }

    /// The protocol its meters must speak.
    #[must_use]
    pub const fn protocol(&self) -> SimProtocol {
        match self {
            Self::ModbusTcp { .. } | Self::ModbusRtuSerial { .. } => SimProtocol::Modbus,
            _ => SimProtocol::Dlms,
        }
    }
}

/// Misbehaviour injected into one meter. Applies on every link the meter is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Delay every answer by this long.
    pub response_delay_ms: u32,
    /// Swallow every n-th request (0 = off).
    pub drop_every_nth: u32,
    /// Corrupt every n-th answer: bad HDLC FCS / Modbus CRC / invalid header (0 = off).
    pub corrupt_every_nth: u32,
    /// Reject every association (AARE rejected-permanent).
    pub refuse_association: bool,
    /// The relay is welded: ACTIONs and coil writes succeed, nothing moves.
    pub stuck_relay: bool,
    /// No answer at all, on any link.
    pub offline: bool,
    /// The meter's clock runs this many seconds ahead (negative: behind) of true time.
    pub clock_drift_s: i64,
    /// The load profile refuses selective access by range (selector 1), as some meters
    /// do; by entry (selector 2) still works.
    pub refuse_range_access: bool,
    /// The meter's conformance block leaves out multiple-references, as many meters' do:
    /// a GET-with-list is refused; single GETs work.
    pub no_multiple_references: bool,
    /// Some load-profile rows are bad, by interval number n (capture time / period):
    /// n % 11 == 3 has an unspecified clock, n % 11 == 7 the status bit "clock invalid"
    /// (0x02), n % 11 == 9 the clock of the row before (a duplicate time).
    pub bad_profile_rows: bool,
}

/// Where [`FleetConfig::generate`] puts its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetPorts {
    /// Address to bind every listener on.
    pub host: IpAddr,
    /// First wrapper port (0 = any).
    pub wrapper_port: u16,
    /// First HDLC gateway port (0 = any); further gateways take the next ports.
    pub hdlc_port: u16,
    /// First Modbus TCP gateway port (0 = any); further gateways take the next ports.
    pub modbus_port: u16,
    /// A serial device to put part of the HDLC meters on, with its baud rate.
    pub serial: Option<(String, u32)>,
    /// Emulated bus rate for the HDLC TCP gateways.
    pub hdlc_bus_baud: Option<u32>,
}

impl Default for FleetPorts {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            wrapper_port: 0,
            hdlc_port: 0,
            modbus_port: 0,
            serial: None,
            hdlc_bus_baud: None,
        }
    }
}

/// Meters per HDLC gateway and per Modbus gateway in a generated fleet: a large
/// concentrator, and the Modbus unit-id space.
const HDLC_PER_GATEWAY: usize = 1000;
const MODBUS_PER_GATEWAY: usize = 247;
/// Control modes handed out in turn, so a small fleet already covers all of them.
const MODES: [u8; 10] = [2, 1, 3, 4, 2, 5, 6, 1, 0, 4];

impl FleetConfig {
    /// A mixed fleet of `n` meters: two in five DLMS over the wrapper, two in five DLMS
    /// behind HDLC gateways (every other one of those on `ports.serial` when given), one
    /// in five Modbus behind TCP gateways; mixed control modes and authentication. The
    /// same `seed` gives the same fleet, keys included.
    #[must_use]
    pub fn generate(n: usize, seed: u64, ports: &FleetPorts) -> Self {
        let mut meters = Vec::with_capacity(n);
        let (mut wrapper, mut hdlc, mut serial, mut modbus) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let mut rng = rand::rngs::StdRng::seed_from_u64(crate::load::mix(seed ^ i as u64));
            let initial_import_wh = rng.gen_range(1_000_000..40_000_000);
            let auth = match i % 3 {
                0 => SimAuth::HlsGmac { guek: rng.gen(), gak: rng.gen() },
                1 => SimAuth::None,
                _ => SimAuth::Lls { password: format!("{:08X}", rng.gen::<u32>()) },
            };
            let group = i % 5;
            let spec = if group == 4 {
                let k = modbus.len();
                modbus.push(i);
                MeterSpec {
                    id: format!("SIMMB{:07}", i + 1),
                    control_mode: 2,
                    auth: SimAuth::None,
                    logical_device: 1,
                    physical_address: 0,
                    unit_id: (k % MODBUS_PER_GATEWAY) as u8 + 1,
                    protocol: SimProtocol::Modbus,
                    initial_import_wh,
                }
            } else {
                let (logical_device, physical_address) = if group < 2 {
                    wrapper.push(i);
                    (u16::try_from(wrapper.len()).unwrap_or(u16::MAX), 0)
                } else if ports.serial.is_some() && group == 3 {
                    serial.push(i);
                    (1, 16 + u16::try_from(serial.len() - 1).unwrap_or(0))
                } else {
                    hdlc.push(i);
                    (1, 16 + ((hdlc.len() - 1) % HDLC_PER_GATEWAY) as u16)
                };
                MeterSpec {
                    id: format!("SIM{:010}", i + 1),
                    control_mode: MODES[i % MODES.len()],
                    auth,
                    logical_device,
                    physical_address,
                    unit_id: 0,
                    protocol: SimProtocol::Dlms,
                    initial_import_wh,
                }
            };
            meters.push(spec);
        }

        let at = |port: u16, k: usize| {
            let port = if port == 0 { 0 } else { port.saturating_add(u16::try_from(k).unwrap_or(u16::MAX)) };
            SocketAddr::new(ports.host, port)
        };
        let mut endpoints = Vec::new();
        if !wrapper.is_empty() {
            endpoints.push(EndpointSpec::DlmsWrapperTcp { bind: at(ports.wrapper_port, 0), meters: wrapper });
        }
        for (k, chunk) in hdlc.chunks(HDLC_PER_GATEWAY).enumerate() {
            endpoints.push(EndpointSpec::DlmsHdlcTcp {
                bind: at(ports.hdlc_port, k),
                meters: chunk.to_vec(),
                baud: ports.hdlc_bus_baud,
            });
        }
        if let (Some((path, baud)), false) = (&ports.serial, serial.is_empty()) {
            endpoints.push(EndpointSpec::DlmsHdlcSerial { path: path.clone(), baud: *baud, meters: serial });
        }
        for (k, chunk) in modbus.chunks(MODBUS_PER_GATEWAY).enumerate() {
            endpoints.push(EndpointSpec::ModbusTcp { bind: at(ports.modbus_port, k), meters: chunk.to_vec() });
        }
        Self { meters, endpoints, profile_period_s: 900, profile_depth_days: 60, seed }
    }

    /// Fill in defaults written as 0 in a fleet file and check that the fleet makes
    /// sense: known meter indices, unique ids and addresses per link, matching protocols.
    ///
    /// # Errors
    /// [`SimError::Config`] naming the first problem found.
    pub fn normalize(&mut self) -> Result<(), SimError> {
        let bad = |msg: String| Err(SimError::Config(msg));
        if self.profile_period_s == 0 || self.profile_depth_days == 0 {
            return bad("profile_period_s and profile_depth_days must be positive".into());
        }
        if u64::from(self.profile_depth_days) * 86_400 / u64::from(self.profile_period_s) > u64::from(u32::MAX) {
            return bad("the load profile would hold more than 2^32 entries".into());
        }
        let mut ids = HashSet::new();
        for (i, m) in self.meters.iter_mut().enumerate() {
            if m.logical_device == 0 {
                m.logical_device = 1;
            }
            if m.physical_address == 0 {
                // 16.. upwards, wrapping inside the 14-bit HDLC range.
                m.physical_address = 16 + (i % 0x3FE0) as u16;
            }
            if m.unit_id == 0 {
                m.unit_id = (i % 247) as u8 + 1;
            }
            if m.control_mode > 6 {
                return bad(format!("meter {}: control_mode {} is not 0..=6", m.id, m.control_mode));
            }
            if let SimAuth::Lls { password } = &m.auth {
                if password.len() > 64 {
                    return bad(format!("meter {}: an LLS password holds at most 64 bytes", m.id));
                }
            }
            if !ids.insert(m.id.clone()) {
                return bad(format!("meter id {} appears twice", m.id));
            }
        }
        for (e, endpoint) in self.endpoints.iter().enumerate() {
            let mut seen = HashSet::new();
            for &i in endpoint.meters() {
                let Some(m) = self.meters.get(i) else {
                    return bad(format!("endpoint {e} names meter {i}, which does not exist"));
                };
                if m.protocol != endpoint.protocol() {
                    return bad(format!("endpoint {e}: meter {} speaks {:?}", m.id, m.protocol));
                }
                let key = match endpoint {
                    EndpointSpec::DlmsWrapperTcp { .. } => u32::from(m.logical_device),
                    EndpointSpec::DlmsHdlcTcp { .. } | EndpointSpec::DlmsHdlcSerial { .. } => {
                        if m.physical_address > 0x3FFD || m.logical_device > 0x3FFF {
                            return bad(format!("meter {}: HDLC addresses are 14 bits", m.id));
                        }
                        u32::from(m.physical_address)
                    }
                    EndpointSpec::ModbusTcp { .. } | EndpointSpec::ModbusRtuSerial { .. } => u32::from(m.unit_id),
                };
                if !seen.insert(key) {
                    return bad(format!("endpoint {e}: two meters share address {key}"));
                }
            }
        }
        Ok(())
    }
}

/// Serde for 16-byte keys as hex strings.
mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::hex(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let text = String::deserialize(d)?;
        crate::unhex(&text)
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .ok_or_else(|| serde::de::Error::custom("expected 32 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_fleet_is_valid_and_mixed() {
        let mut fleet = FleetConfig::generate(50, 3, &FleetPorts::default());
        fleet.normalize().map_err(|e| e.to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fleet.meters.len(), 50);
        assert_eq!(fleet, {
            let mut again = FleetConfig::generate(50, 3, &FleetPorts::default());
            let _ = again.normalize();
            again
        });
        let modes: HashSet<u8> = fleet.meters.iter().map(|m| m.control_mode).collect();
        assert_eq!(modes.len(), 7, "every control mode appears");
        assert!(fleet.meters.iter().any(|m| matches!(m.auth, SimAuth::HlsGmac { .. })));
        assert!(fleet.endpoints.iter().any(|e| matches!(e, EndpointSpec::ModbusTcp { .. })));
    }

    #[test]
    fn a_fleet_file_round_trips_through_toml() {
        let fleet = FleetConfig::generate(6, 1, &FleetPorts::default());
        let text = toml::to_string(&fleet).unwrap_or_default();
        let back: FleetConfig = toml::from_str(&text).unwrap_or_default();
        assert_eq!(back, fleet);
    }

    #[test]
    fn bad_fleets_are_refused() {
        let mut fleet = FleetConfig::generate(3, 1, &FleetPorts::default());
        fleet.endpoints.push(EndpointSpec::ModbusTcp {
            bind: "127.0.0.1:0".parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            meters: vec![0],
        });
        assert!(fleet.normalize().is_err());
        let mut fleet = FleetConfig::generate(3, 1, &FleetPorts::default());
        fleet.meters[1].id = fleet.meters[0].id.clone();
        assert!(fleet.normalize().is_err());
    }
}
