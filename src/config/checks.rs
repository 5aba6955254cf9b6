//! The registry's checks: links, meters, accounts, Modbus profiles, key files. Each
//! problem names its key, so `check-config` can say the line, and what to write instead.

use std::collections::HashMap;
use std::path::PathBuf;

use super::diagnostics::{KeyPath, Problem, Problems};
use super::{AuthKind, LinkProtocol, SiteConfig};
use crate::contract::AccountId;
use crate::secrets::{KeyFileError, MeterKeys};

/// Key files already read, by resolved path: the loader reads them on another thread
/// while the main one parses (a 100,000-meter site has tens of thousands).
pub(super) type KeyFiles = HashMap<PathBuf, Result<MeterKeys, String>>;

thread_local! {
    static PRELOADED: std::cell::RefCell<KeyFiles> = std::cell::RefCell::new(HashMap::new());
}

/// Run `f` (the checks) with these key files already read.
pub(super) fn with_preloaded<R>(keys: KeyFiles, f: impl FnOnce() -> R) -> R {
    PRELOADED.with(|p| *p.borrow_mut() = keys);
    let r = f();
    PRELOADED.with(|p| p.borrow_mut().clear());
    r
}

/// Read and check one key file; the error says what to do.
pub(super) fn load_key_file(path: &std::path::Path) -> Result<MeterKeys, String> {
    MeterKeys::load(path).map_err(|e| match e {
        KeyFileError::Read { .. } => {
            format!("{e}: write the key file there (see config/keys/README.md) or fix `keys`")
        }
        _ => e.to_string(),
    })
}

/// Serial line rates the head-end accepts.
pub const BAUD_RATES: [u32; 10] = [300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200];

/// Names listed in a hint before "...".
const LISTED: usize = 8;

/// `a, b, c` (or `a, b, ... (12 in all)`), with a suggestion when one is close to `wrong`.
fn known<'a>(names: impl Iterator<Item = &'a str>, wrong: &str) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        return "none is defined".into();
    }
    let mut s = names.iter().take(LISTED).copied().collect::<Vec<_>>().join(", ");
    if names.len() > LISTED {
        s.push_str(&format!(", ... ({} in all)", names.len()));
    }
    let close = names
        .iter()
        .map(|n| (super::diagnostics::edit_distance(wrong, n), *n))
        .filter(|(d, _)| *d <= (wrong.len() / 3).max(2))
        .min_by_key(|(d, _)| *d);
    if let Some((_, n)) = close {
        s.push_str(&format!("; did you mean {n:?}?"));
    }
    s
}

/// Push every problem of the links, meters, accounts and profiles.
pub(super) fn registry(cfg: &SiteConfig, out: &mut Problems) {
    let mut links: HashMap<&str, usize> = HashMap::with_capacity(cfg.links.len());
    for (i, link) in cfg.links.iter().enumerate() {
        let at = || KeyPath::element("link", i);
        let name = &link.name;
        if let Some(&first) = links.get(name.as_str()) {
            out.push(Problem::duplicate(
                at().key("name"),
                KeyPath::element("link", first).key("name"),
                format!("link {name:?} is defined twice: give each [[link]] its own name"),
            ));
        } else {
            links.insert(name, i);
        }
        match (&link.address, &link.serial) {
            (Some(_), Some(_)) => out.at(
                at().key("serial"),
                format!("link {name:?} has both `address` and `serial`: keep one (TCP host:port, or a serial device)"),
            ),
            (None, None) => out.at(
                at(),
                format!(
                    "link {name:?} has neither `address` nor `serial`: add address = \"host:port\" or serial = \"/dev/ttyUSB0\""
                ),
            ),
            _ => {}
        }
        if let Some(addr) = &link.address {
            let port_ok =
                addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                out.at(
                    at().key("address"),
                    format!("link {name:?}: address {addr:?} is not host:port: write e.g. address = \"10.0.0.5:4059\""),
                );
            }
        }
        if link.serial.is_some() && matches!(link.protocol, LinkProtocol::DlmsWrapper | LinkProtocol::ModbusTcp) {
            out.at(
                at().key("protocol"),
                format!(
                    "link {name:?}: protocol {} runs over TCP only: use address = \"host:port\", or protocol dlms-hdlc / modbus-rtu on a serial port",
                    link.protocol.name()
                ),
            );
        }
        if link.address.is_some() && link.protocol == LinkProtocol::ModbusRtu {
            out.at(
                at().key("protocol"),
                format!("link {name:?}: modbus-rtu is for serial ports; RTU devices behind a TCP gateway are protocol = \"modbus-tcp\", by unit_id"),
            );
        }
        if let Some(baud) = link.baud {
            if link.serial.is_none() {
                out.at(at().key("baud"), format!("link {name:?}: baud applies to serial links only: remove it"));
            } else if !BAUD_RATES.contains(&baud) {
                let rates = BAUD_RATES.map(|b| b.to_string()).join(", ");
                out.at(at().key("baud"), format!("link {name:?}: baud = {baud}: expected one of {rates}"));
            }
        }
        if link.timeout_ms == 0 {
            out.at(
                at().key("timeout_ms"),
                format!("link {name:?}: timeout_ms = 0 never waits for an answer: use e.g. 5000"),
            );
        }
        if !(32..=2030).contains(&link.hdlc.max_info) {
            out.at(
                at().key("hdlc").key("max_info"),
                format!("link {name:?}: hdlc max_info must be 32..=2030 (default 128)"),
            );
        }
        if !(1..=7).contains(&link.hdlc.window) {
            out.at(at().key("hdlc").key("window"), format!("link {name:?}: hdlc window must be 1..=7 (default 1)"));
        }
    }

    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(cfg.meters.len());
    let mut key_files: KeyFiles = PRELOADED.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (i, m) in cfg.meters.iter().enumerate() {
        let at = || KeyPath::element("meter", i);
        let id = m.id.as_str();
        if let Some(&first) = ids.get(id) {
            out.push(Problem::duplicate(
                at().key("id"),
                KeyPath::element("meter", first).key("id"),
                format!("meter {id:?} is defined twice: meter ids are unique"),
            ));
        } else {
            ids.insert(id, i);
        }
        if let Some(Err(e)) = m.account.as_deref().map(AccountId::new) {
            out.at(at().key("account"), format!("meter {id:?}: account: {e}"));
        }
        if let Some(p) = m.profile.as_deref().filter(|p| crate::dlms::cosem::parse_obis(p).is_none()) {
            out.at(at().key("profile"), format!("meter {id:?}: profile {p:?} is not an OBIS code like 1.0.99.1.0.255"));
        }
        if let Some(keys) = &m.keys {
            let path = cfg.resolve(keys);
            let loaded = key_files.entry(path.clone()).or_insert_with(|| load_key_file(&path));
            match loaded {
                Err(e) => out.at(at().key("keys"), format!("meter {id:?}: {e}")),
                Ok(k) => {
                    let missing: Vec<&str> = match m.auth {
                        AuthKind::None => vec![],
                        AuthKind::Lls => {
                            [("password", k.password.is_some())].iter().filter(|f| !f.1).map(|f| f.0).collect()
                        }
                        AuthKind::HlsGmac => [
                            ("guek", k.guek.is_some()),
                            ("gak", k.gak.is_some()),
                            ("client_system_title", k.client_system_title.is_some()),
                        ]
                        .iter()
                        .filter(|f| !f.1)
                        .map(|f| f.0)
                        .collect(),
                    };
                    if !missing.is_empty() {
                        out.at(
                            at().key("keys"),
                            format!(
                                "meter {id:?}: auth {} needs {} in {} (see config/keys/README.md)",
                                m.auth.name(),
                                missing.join(", "),
                                keys.display()
                            ),
                        );
                    }
                }
            }
        }
        let Some(&li) = links.get(m.link.as_str()) else {
            let names = known(cfg.links.iter().map(|l| l.name.as_str()), &m.link);
            out.at(at().key("link"), format!("meter {id:?}: link {:?} is not defined; defined links: {names}", m.link));
            continue;
        };
        let link = &cfg.links[li];
        match link.protocol {
            LinkProtocol::DlmsWrapper | LinkProtocol::DlmsHdlc => {
                if m.auth != AuthKind::None && m.keys.is_none() {
                    out.at(
                        at().key("auth"),
                        format!(
                            "meter {id:?}: auth {} needs keys = \"keys/{id}.toml\" (a key file; see config/keys/README.md)",
                            m.auth.name()
                        ),
                    );
                }
                if m.unit_id.is_some() || m.modbus_profile.is_some() {
                    let key = if m.unit_id.is_some() { "unit_id" } else { "modbus_profile" };
                    out.at(
                        at().key(key),
                        format!("meter {id:?}: {key} is for Modbus links, and link {:?} is DLMS: remove it", link.name),
                    );
                }
                if link.protocol == LinkProtocol::DlmsHdlc {
                    match m.physical_address {
                        None => out.at(
                            at(),
                            format!(
                                "meter {id:?}: on the HDLC link {:?}, set physical_address (the meter's lower HDLC address, e.g. 17)",
                                link.name
                            ),
                        ),
                        Some(p) if p > 0x3FFF => out.at(
                            at().key("physical_address"),
                            format!("meter {id:?}: physical_address = {p}: HDLC addresses are 14 bits (0..=16383)"),
                        ),
                        Some(_) => {}
                    }
                    if m.logical_device > 0x3FFF {
                        out.at(
                            at().key("logical_device"),
                            format!(
                                "meter {id:?}: logical_device = {}: HDLC addresses are 14 bits (0..=16383)",
                                m.logical_device
                            ),
                        );
                    }
                }
            }
            LinkProtocol::ModbusTcp | LinkProtocol::ModbusRtu => {
                match &m.modbus_profile {
                    None => out.at(
                        at(),
                        format!("meter {id:?}: a Modbus meter needs modbus_profile = \"...\" naming a [modbus_profile.NAME]"),
                    ),
                    Some(p) if !cfg.modbus_profiles.contains_key(p) => {
                        let names = known(cfg.modbus_profiles.keys().map(String::as_str), p);
                        out.at(
                            at().key("modbus_profile"),
                            format!("meter {id:?}: modbus_profile {p:?} is not defined; defined profiles: {names}"),
                        );
                    }
                    _ => {}
                }
                match m.unit_id {
                    None => out.at(at(), format!("meter {id:?}: a Modbus meter needs unit_id = 1..=247")),
                    Some(u) if !(1..=247).contains(&u) => out.at(
                        at().key("unit_id"),
                        format!("meter {id:?}: unit_id = {u}: expected 1..=247 (0 is broadcast, 248..=255 reserved)"),
                    ),
                    Some(_) => {}
                }
                if m.auth != AuthKind::None || m.keys.is_some() {
                    let key = if m.keys.is_some() { "keys" } else { "auth" };
                    out.at(at().key(key), format!("meter {id:?}: Modbus has no authentication: remove {key}"));
                }
            }
        }
    }

    let mut accounts: HashMap<&str, usize> = HashMap::new();
    for (i, a) in cfg.accounts.iter().enumerate() {
        if let Some(&first) = accounts.get(a.id.as_str()) {
            out.push(Problem::duplicate(
                KeyPath::element("account", i).key("id"),
                KeyPath::element("account", first).key("id"),
                format!("account {} is defined twice: merge the [[account]] entries", a.id),
            ));
        } else {
            accounts.insert(a.id.as_str(), i);
        }
    }
    for (name, p) in &cfg.modbus_profiles {
        if p.relay_coil.is_some() && p.relay_register.is_some() {
            out.at(
                KeyPath::top("modbus_profile").key(name.clone()).key("relay_register"),
                format!("modbus_profile {name}: set relay_coil or relay_register, not both"),
            );
        }
    }
    for (key, file) in [("password_file", &cfg.mqtt.password_file), ("ca_file", &cfg.mqtt.ca_file)] {
        if let Some(f) = file {
            let path = cfg.resolve(f);
            // Only whether it can be opened: the content is a secret (or a certificate).
            if let Err(e) = std::fs::File::open(&path) {
                out.at(KeyPath::top("mqtt").key(key), format!("[mqtt] {key} {}: cannot read: {e}", path.display()));
            }
        }
    }
}
