//! The COSEM objects a simulated meter hosts, behind dlms-cosem-rs's `ObjectStore`.
//!
//! One store exists per open association; it holds no meter state of its own, only which
//! meter and which client it serves, and reads the shared [`Meter`] on every call.

use std::sync::Arc;

use dlms_cosem_rs::axdr::{Data, DateTime};
use dlms_cosem_rs::codec::{Encode, Writer};
use dlms_cosem_rs::cosem::{AttributeAccess, CaptureObject, MethodAccess};
use dlms_cosem_rs::obis::Obis;
use dlms_cosem_rs::server::{AuditEvent, ObjectStore, StoreResult};
use dlms_cosem_rs::xdlms::{ActionResult, DataAccessResult, SelectiveAccess};

use crate::clock::{cosem_datetime, cosem_to_unix};
use crate::config::SimAuth;
use crate::control::{Refused, Trigger};
use crate::meter::{Activity, Fleet, Meter, LOG_DEPTH};
use crate::profile::{self, EventLog, LoadProfile, Rows, CLOCK, EVENT_CODE, EXPORT, IMPORT, PROFILE_STATUS};

/// The server's value buffer: the largest attribute it can produce. A whole day of load
/// profile is about 2.7 KB; this holds six days.
pub const DLMS_N: usize = 16 * 1024;

/// Logical device name.
pub const LOGICAL_DEVICE_NAME: Obis = Obis::new(0, 0, 42, 0, 0, 255);
/// Meter serial number.
pub const SERIAL_NUMBER: Obis = Obis::new(0, 0, 96, 1, 0, 255);
/// Disconnect control.
pub const DISCONNECT_CONTROL: Obis = Obis::new(0, 0, 96, 3, 10, 255);
/// Disconnector control log.
pub const DISCONNECT_LOG: Obis = Obis::new(0, 0, 99, 98, 2, 255);
/// The invocation counter the meter expects next from the management client.
pub const INVOCATION_COUNTER: Obis = Obis::new(0, 0, 43, 1, 0, 255);
/// The load profile.
pub const LOAD_PROFILE: Obis = Obis::new(1, 0, 99, 1, 0, 255);

/// The interface class of each hosted object.
#[must_use]
pub fn class_of(obis: Obis) -> Option<u16> {
    Some(match obis {
        LOGICAL_DEVICE_NAME | SERIAL_NUMBER | INVOCATION_COUNTER | EVENT_CODE | PROFILE_STATUS => 1,
        IMPORT | EXPORT => 3,
        CLOCK => 8,
        DISCONNECT_CONTROL => 70,
        DISCONNECT_LOG | LOAD_PROFILE => 7,
        _ => return None,
    })
}

/// Which client an association serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// SAP 0x10: no authentication, read-only (plus switching when the meter has no auth).
    Public,
    /// SAP 0x01: the meter's configured authentication, full access.
    Management,
}

/// One association's view of one meter.
pub struct MeterStore {
    fleet: Arc<Fleet>,
    meter: usize,
    client: Client,
}

impl MeterStore {
    pub(crate) fn new(fleet: Arc<Fleet>, meter: usize, client: Client) -> Self {
        Self { fleet, meter, client }
    }

    fn meter(&self) -> StoreResult<&Meter> {
        self.fleet.meters.get(self.meter).ok_or(DataAccessResult::ObjectUnavailable)
    }

    fn may_switch(&self) -> bool {
        self.client == Client::Management
            || self.fleet.meters.get(self.meter).is_some_and(|m| m.spec.auth == SimAuth::None)
    }

    fn load_profile(&self, meter: &Meter) -> LoadProfile {
        let basis = meter.energy(&self.fleet);
        let meter_now = self.fleet.now_ms().saturating_add(basis.drift_ms);
        let mut p =
            LoadProfile::new(basis, self.fleet.period_s, self.fleet.depth_days, meter_now, self.fleet.utc_offset_min);
        p.glitches = meter.faults().bad_profile_rows;
        p
    }

    fn event_log(&self, meter: &Meter) -> EventLog {
        EventLog { rows: meter.lock().log.iter().copied().collect(), offset_min: self.fleet.utc_offset_min }
    }

    fn profile_attribute(
        &self,
        rows: &dyn Rows,
        attr: i8,
        period: u32,
        capacity: u32,
        access: Option<SelectiveAccess<'_>>,
        w: &mut dyn Writer,
    ) -> StoreResult<()> {
        let bad = |_| DataAccessResult::OtherReason;
        match attr {
            2 if access.is_some_and(|a| a.selector == 1) && self.meter()?.faults().refuse_range_access => {
                Err(DataAccessResult::ObjectUnavailable)
            }
            2 => profile::write_buffer(rows, access, self.fleet.utc_offset_min, DLMS_N, w),
            3 => profile::write_capture_objects(rows, w).map_err(bad),
            4 => Data::DoubleLongUnsigned(period).encode(w).map_err(bad),
            // sort_method: fifo; sort_object: the clock column.
            5 => Data::Enum(1).encode(w).map_err(bad),
            6 => CaptureObject::new(8, CLOCK, 2, 0).encode(w).map_err(bad),
            7 => Data::DoubleLongUnsigned(rows.len()).encode(w).map_err(bad),
            8 => Data::DoubleLongUnsigned(capacity).encode(w).map_err(bad),
            _ => Err(DataAccessResult::ObjectUndefined),
        }
    }
}

impl ObjectStore for MeterStore {
    fn get_attribute(
        &self,
        class_id: u16,
        logical_name: Obis,
        attribute_id: i8,
        access: Option<SelectiveAccess<'_>>,
        w: &mut dyn Writer,
    ) -> StoreResult<()> {
        let expected = class_of(logical_name).ok_or(DataAccessResult::ObjectUndefined)?;
        if class_id != expected {
            return Err(DataAccessResult::ObjectClassInconsistent);
        }
        let bad = |_| DataAccessResult::OtherReason;
        if attribute_id == 1 {
            return Data::OctetString(logical_name.as_bytes()).encode(w).map_err(bad);
        }
        let meter = self.meter()?;
        let fleet = &*self.fleet;
        let now = fleet.now_ms();
        let offset = fleet.utc_offset_min;
        let value = match (logical_name, attribute_id) {
            (LOGICAL_DEVICE_NAME | SERIAL_NUMBER, 2) => Data::OctetString(meter.spec.id.as_bytes()),
            (INVOCATION_COUNTER, 2) => {
                let expected = meter.lock().mgmt_peer.map_or(0, |(_, highest)| highest.saturating_add(1));
                Data::DoubleLongUnsigned(expected)
            }
            (EVENT_CODE, 2) => Data::Unsigned(meter.lock().log.back().map_or(0, |e| e.1)),
            (PROFILE_STATUS, 2) => Data::Unsigned(if meter.lock().control.relay_closed() { 0 } else { 0x80 }),
            (IMPORT, 2) => Data::DoubleLongUnsigned(meter.energy(fleet).import_wh(now) as u32),
            (EXPORT, 2) => Data::DoubleLongUnsigned(meter.energy(fleet).export_wh(now) as u32),
            (IMPORT | EXPORT, 3) => {
                // scaler_unit: structure { integer 0, enum Wh }: the value is in Wh.
                return w.write_bytes(&[0x02, 0x02, 0x0F, 0x00, 0x16, 30]).map_err(bad);
            }
            (CLOCK, 2) => {
                let dt = cosem_datetime(meter.meter_ms(now), offset);
                return Data::OctetString(&dt.to_bytes()).encode(w).map_err(bad);
            }
            (CLOCK, 3) => Data::Long(-offset),
            (CLOCK, 4) => Data::Unsigned(0),
            (CLOCK, 8) => Data::Boolean(false),
            (CLOCK, 9) => Data::Enum(1),
            (DISCONNECT_CONTROL, 2) => Data::Boolean(meter.lock().control.relay_closed()),
            (DISCONNECT_CONTROL, 3) => Data::Enum(meter.lock().control.as_u8()),
            (DISCONNECT_CONTROL, 4) => Data::Enum(meter.lock().mode),
            (LOAD_PROFILE, a) => {
                let rows = self.load_profile(meter);
                let entries = rows.len();
                return self.profile_attribute(&rows, a, fleet.period_s, entries, access, w);
            }
            (DISCONNECT_LOG, a) => {
                let rows = self.event_log(meter);
                return self.profile_attribute(&rows, a, 0, LOG_DEPTH as u32, access, w);
            }
            _ => return Err(DataAccessResult::ObjectUndefined),
        };
        value.encode(w).map_err(bad)
    }

    fn set_attribute(
        &mut self,
        class_id: u16,
        logical_name: Obis,
        attribute_id: i8,
        _access: Option<SelectiveAccess<'_>>,
        value: Data<'_>,
    ) -> StoreResult<()> {
        let meter = self.meter()?;
        match (class_id, logical_name, attribute_id, value) {
            (8, CLOCK, 2, Data::OctetString(b)) if b.len() == 12 => {
                let mut raw = [0u8; 12];
                raw.copy_from_slice(b);
                self.set_clock(meter, &DateTime::from_bytes(raw))
            }
            (8, CLOCK, 2, Data::DateTime(dt)) => self.set_clock(meter, &dt),
            (70, DISCONNECT_CONTROL, 4, Data::Enum(mode)) if mode <= 6 => {
                meter.set_mode(&self.fleet, mode);
                Ok(())
            }
            (8, CLOCK, 2, _) | (70, DISCONNECT_CONTROL, 4, _) => Err(DataAccessResult::TypeUnmatched),
            _ => Err(DataAccessResult::ReadWriteDenied),
        }
    }

    fn invoke_method(
        &mut self,
        class_id: u16,
        logical_name: Obis,
        method_id: i8,
        parameters: Option<Data<'_>>,
        _w: &mut dyn Writer,
    ) -> Result<bool, ActionResult> {
        if (class_id, logical_name) != (70, DISCONNECT_CONTROL) {
            return Err(ActionResult::ObjectUndefined);
        }
        let trigger = match method_id {
            1 => Trigger::RemoteDisconnect,
            2 => Trigger::RemoteReconnect,
            _ => return Err(ActionResult::ObjectUndefined),
        };
        // The standard parameter is integer(0); some clients send nothing or null-data.
        if !matches!(parameters, None | Some(Data::Null | Data::Integer(_))) {
            return Err(ActionResult::TypeUnmatched);
        }
        let meter = self.fleet.meters.get(self.meter).ok_or(ActionResult::ObjectUnavailable)?;
        match meter.trigger(&self.fleet, trigger) {
            Ok(_) => Ok(false),
            Err(Refused::ModeZero) => Err(ActionResult::ReadWriteDenied),
        }
    }

    fn attribute_access(&self, class_id: u16, logical_name: Obis, attribute_id: i8) -> AttributeAccess {
        // Everything is readable, so the store (not a blanket denial) says what is missing.
        let writable = self.client == Client::Management
            && matches!((class_id, logical_name, attribute_id), (8, CLOCK, 2) | (70, DISCONNECT_CONTROL, 4));
        if writable {
            AttributeAccess::READ | AttributeAccess::WRITE
        } else {
            AttributeAccess::READ
        }
    }

    fn method_access(&self, class_id: u16, logical_name: Obis, _method_id: i8) -> MethodAccess {
        if (class_id, logical_name) == (70, DISCONNECT_CONTROL) && self.may_switch() {
            MethodAccess::ACCESS
        } else {
            MethodAccess::empty()
        }
    }

    fn audit(&mut self, event: AuditEvent) {
        let sap = if self.client == Client::Public { 0x10 } else { 0x01 };
        let activity = match event {
            AuditEvent::Associated { mechanism, .. } => Activity::Associated { sap, mechanism: mechanism.arc() },
            AuditEvent::AssociationRefused { diagnostic } => {
                Activity::AssociationRefused { sap, diagnostic: diagnostic.as_u8() }
            }
            AuditEvent::Released => Activity::Released,
            AuditEvent::AttributeRead { class_id, logical_name, attribute_id, outcome } => Activity::Get {
                class: class_id,
                obis: *logical_name.as_bytes(),
                attr: attribute_id,
                result: outcome.as_u8(),
            },
            AuditEvent::AttributeWritten { class_id, logical_name, attribute_id, outcome } => Activity::Set {
                class: class_id,
                obis: *logical_name.as_bytes(),
                attr: attribute_id,
                result: outcome.as_u8(),
            },
            AuditEvent::MethodInvoked { class_id, logical_name, method_id, outcome } => Activity::Action {
                class: class_id,
                obis: *logical_name.as_bytes(),
                method: method_id,
                result: outcome.as_u8(),
            },
            _ => return,
        };
        if let Some(meter) = self.fleet.meters.get(self.meter) {
            meter.record(&self.fleet, activity);
        }
    }
}

impl MeterStore {
    fn set_clock(&self, meter: &Meter, dt: &DateTime) -> StoreResult<()> {
        let s = cosem_to_unix(dt, self.fleet.utc_offset_min).ok_or(DataAccessResult::TypeUnmatched)?;
        meter.set_clock(&self.fleet, s.saturating_mul(1000));
        Ok(())
    }
}
