//! meter-sim: simulated DLMS/COSEM and Modbus smart meters, gateways and concentrators.
//!
//! Used in-process by the head-end's integration tests and, through `main.rs`, by a person
//! at a terminal. See `README.md` for the object list, the Modbus register map and the
//! control API.

pub mod clock;
pub mod config;
pub mod console;
pub mod control;
mod control_api;
pub mod cosem;
mod dlms;
mod hdlc;
mod headend_config;
pub mod load;
mod meter;
mod modbus;
mod modbus_rtu;
mod net;
mod profile;
#[cfg(test)]
mod robustness;
mod sim;
mod wrapper;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{EndpointSpec, Faults, FleetConfig, FleetPorts, MeterSpec, SimAuth, SimProtocol};
pub use control::ControlState;
pub use control_api::serve_control;
pub use dlms::{MANAGEMENT_SAP, PUBLIC_SAP};
pub use headend_config::{headend_id, CLIENT_SYSTEM_TITLE};
pub use meter::{MeterView, SimEvent, SimEventKind};
pub use sim::{BoundEndpoint, EndpointKind, SimOptions, Simulator};

/// What can go wrong in the simulator's own API (never because of what a client sends).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No meter with that id.
    #[error("no meter with id {0:?}")]
    UnknownMeter(String),
    /// The fleet description does not make sense.
    #[error("invalid fleet: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Where.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A serial device could not be opened.
    #[error("cannot open serial device {path}: {source}")]
    Serial {
        /// Which.
        path: String,
        /// Why.
        source: tokio_serial::Error,
    },
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    File {
        /// Which.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Upper-case hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Bytes of a hex string, `None` if it is not one.
#[must_use]
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}
