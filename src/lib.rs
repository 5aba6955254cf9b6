//! `headend`: the head-end a power utility runs to read smart meters and to cut and
//! restore supply remotely, over DLMS/COSEM and Modbus.
//!
//! Layers, bottom up: [`link`] (byte streams), [`dlms`] and [`modbus`] (protocol
//! drivers), [`driver`] (one protocol-neutral face), [`config`] and [`secrets`] (the
//! site), [`meter`] (the types every layer shares).

pub mod channel;
pub mod collect;
pub mod command;
pub mod config;
pub mod contract;
pub mod daemon;
pub mod dlms;
pub mod driver;
pub mod inbound;
pub mod journal;
pub mod link;
pub mod meter;
pub mod modbus;
pub mod mqtt;
pub mod observe;
pub mod policy;
pub mod secrets;
pub mod time;
