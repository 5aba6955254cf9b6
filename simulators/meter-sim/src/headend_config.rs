//! `--write-config`: the head-end's site configuration for a running fleet, in the format
//! of `config/site.toml`, with one key file per authenticated meter next to it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{SimAuth, SimProtocol};
use crate::sim::{EndpointKind, Simulator};
use crate::{hex, SimError};

/// The client system title written into every HLS key file: "HDEND" and 000001, as in
/// `config/keys.example.toml`. The simulated meters accept any client title.
pub const CLIENT_SYSTEM_TITLE: [u8; 8] = *b"HDEND\x00\x00\x01";

/// The head-end's name for meter number `index` (0-based).
#[must_use]
pub fn headend_id(index: usize) -> String {
    format!("MTR-{:04}", index + 1)
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::File { path: path.to_path_buf(), source }
}

/// Write the configuration. See [`Simulator::write_headend_config`].
pub(crate) fn write(sim: &Simulator, path: &Path) -> Result<(), SimError> {
    let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let keys_dir = dir.join("keys");
    let fleet = sim.fleet();
    let mut out = String::new();
    let _ =
        writeln!(out, "# Written by meter-sim --write-config for a simulated fleet of {} meters.", fleet.meters.len());
    let _ = writeln!(out, "# Addresses are the ones actually bound. Key files are in keys/.\n");
    let _ = writeln!(out, "state_dir = \"state\"\n");

    let mut counters = [0usize; 5];
    let mut placed = vec![None::<String>; fleet.meters.len()];
    for endpoint in sim.endpoints() {
        let (slot, prefix, protocol) = match endpoint.kind {
            EndpointKind::DlmsWrapperTcp => (0, "wrapper", "dlms-wrapper"),
            EndpointKind::DlmsHdlcTcp => (1, "hdlc-gateway", "dlms-hdlc"),
            EndpointKind::DlmsHdlcSerial => (2, "rs485", "dlms-hdlc"),
            EndpointKind::ModbusTcp => (3, "modbus-gw", "modbus-tcp"),
            EndpointKind::ModbusRtuSerial => (4, "modbus-rtu", "modbus-rtu"),
        };
        counters[slot] += 1;
        let name = format!("{prefix}-{}", counters[slot]);
        let _ = writeln!(out, "[[link]]\nname = {}\nprotocol = \"{protocol}\"", quoted(&name));
        if let Some(addr) = endpoint.addr {
            let _ = writeln!(out, "address = \"{addr}\"");
        }
        if let Some(serial) = &endpoint.serial_path {
            let _ = writeln!(out, "serial = {}\nbaud = {}", quoted(serial), endpoint.baud.unwrap_or(9600));
        }
        // An emulated bus answers at line speed: give the head-end room for long reads.
        let slow = endpoint.baud.is_some();
        let _ = writeln!(out, "timeout_ms = {}\n", if slow { 20_000 } else { 5000 });
        for &i in &endpoint.meters {
            if let Some(slot) = placed.get_mut(i).filter(|p| p.is_none()) {
                *slot = Some(name.clone());
            }
        }
    }

    let mut key_files = Vec::new();
    for (i, (meter, link)) in fleet.meters.iter().zip(&placed).enumerate() {
        let Some(link) = link else { continue };
        let id = headend_id(i);
        let spec = &meter.spec;
        let _ = writeln!(out, "[[meter]]\nid = \"{id}\"\nlink = {}\nidentity = {}", quoted(link), quoted(&spec.id));
        if spec.protocol == SimProtocol::Modbus {
            let _ = writeln!(out, "unit_id = {}\nmodbus_profile = \"meter-sim\"\n", spec.unit_id);
            continue;
        }
        let _ = writeln!(out, "logical_device = {}", spec.logical_device);
        let on_hdlc = sim.endpoints().iter().any(|e| {
            matches!(e.kind, EndpointKind::DlmsHdlcTcp | EndpointKind::DlmsHdlcSerial) && e.meters.contains(&i)
        });
        if on_hdlc {
            let _ = writeln!(out, "physical_address = {}", spec.physical_address);
        }
        // Without authentication the public client may switch; otherwise management.
        let sap = if spec.auth == SimAuth::None { 16 } else { 1 };
        let _ = writeln!(out, "client_sap = {sap}\nauth = \"{}\"", spec.auth.name());
        let key = match &spec.auth {
            SimAuth::None => None,
            SimAuth::Lls { password } => Some(format!("password = {}\n", quoted(password))),
            SimAuth::HlsGmac { guek, gak } => Some(format!(
                "guek = \"{}\"\ngak = \"{}\"\nclient_system_title = \"{}\"\n",
                hex(guek),
                hex(gak),
                hex(&CLIENT_SYSTEM_TITLE)
            )),
        };
        if let Some(key) = key {
            let _ = writeln!(out, "keys = \"keys/{id}.toml\"");
            key_files.push((keys_dir.join(format!("{id}.toml")), key));
        }
        let _ = writeln!(out, "timezone_offset_minutes = {}\n", fleet.utc_offset_min);
    }

    out.push_str(MODBUS_PROFILE);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    if !key_files.is_empty() {
        std::fs::create_dir_all(&keys_dir).map_err(io_error(&keys_dir))?;
    }
    for (file, body) in key_files {
        let text = format!("# Secrets of one simulated meter (meter-sim).\n{body}");
        std::fs::write(&file, text).map_err(io_error(&file))?;
    }
    std::fs::write(path, out).map_err(io_error(path))
}

/// meter-sim's register map, as the head-end's Modbus profile (README: "Modbus").
const MODBUS_PROFILE: &str = r#"# meter-sim's register map (simulators/meter-sim/README.md).
[modbus_profile.meter-sim]
serial = { register = 0, words = 6 }                  # ASCII, 2 chars per register
energy_import = { register = 256, type = "u32", word_order = "big", scale = 10, unit = "Wh" }
energy_export = { register = 258, type = "u32", word_order = "big", scale = 10, unit = "Wh" }
relay_coil = 0                                        # write: on = connect, off = disconnect
relay_status = { discrete_input = 0 }                 # read back: 1 = closed (connected)
clock = { register = 768 }                            # 6 registers: Y, M, D, h, m, s (local)
"#;
