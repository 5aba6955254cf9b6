//! The COSEM objects the head-end uses, and how their values are read out of A-XDR.

use dlms_cosem_rs::axdr::{Data, DateTime, Unit};
use dlms_cosem_rs::cosem::{CaptureObject, ProfileBuffer};
use dlms_cosem_rs::obis::Obis;

use crate::meter::{MeterClock, MeterError, ProfileColumn, ProfileRow, RelayState};

/// Disconnect control (class 70).
pub const DISCONNECT_CONTROL: Obis = Obis::new(0, 0, 96, 3, 10, 255);
/// Clock (class 8).
pub const CLOCK: Obis = Obis::new(0, 0, 1, 0, 0, 255);
/// Logical device name (class 1).
pub const LOGICAL_DEVICE_NAME: Obis = Obis::new(0, 0, 42, 0, 0, 255);
/// Device serial number (class 1).
pub const SERIAL_NUMBER: Obis = Obis::new(0, 0, 96, 1, 0, 255);
/// Active energy import total (class 3).
pub const ENERGY_IMPORT: Obis = Obis::new(1, 0, 1, 8, 0, 255);
/// Active energy export total (class 3).
pub const ENERGY_EXPORT: Obis = Obis::new(1, 0, 2, 8, 0, 255);
/// Load profile 1 (class 7).
pub const LOAD_PROFILE: Obis = Obis::new(1, 0, 99, 1, 0, 255);
/// The invocation counter the meter expects from the client (class 1), readable by the
/// public client, used to resynchronise after an invocation-counter error.
pub const INVOCATION_COUNTER: Obis = Obis::new(0, 0, 43, 1, 0, 255);

/// Text form `a.b.c.d.e.f` as the MQTT contract writes OBIS codes.
pub fn obis_text(o: Obis) -> String {
    let b = o.as_bytes();
    format!("{}.{}.{}.{}.{}.{}", b[0], b[1], b[2], b[3], b[4], b[5])
}

/// Parse `a.b.c.d.e.f` (or the `a-b:c.d.e*f` form the crate accepts).
pub fn parse_obis(text: &str) -> Option<Obis> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() == 6 {
        let mut b = [0u8; 6];
        for (slot, p) in b.iter_mut().zip(parts) {
            *slot = p.parse().ok()?;
        }
        return Some(Obis::from_bytes(b));
    }
    Obis::parse(text).ok()
}

fn bad(what: &str) -> MeterError {
    MeterError::Protocol(format!("unexpected value for {what}"))
}

/// Decode one encoded A-XDR value.
pub fn decode(bytes: &[u8]) -> Result<Data<'_>, MeterError> {
    Data::from_bytes_in(bytes).map_err(|e| MeterError::Protocol(format!("A-XDR: {e}")))
}

/// An octet or visible string as text (meters put ASCII in the logical device name).
pub fn text_of(d: &Data<'_>) -> Option<String> {
    let bytes = match d {
        Data::OctetString(b) | Data::VisibleString(b) | Data::Utf8String(b) => *b,
        _ => return None,
    };
    Some(String::from_utf8_lossy(bytes).trim_end_matches('\0').to_owned())
}

/// A date-time either as the standard 12-byte octet string or with the date-time tag.
pub fn datetime_of(d: &Data<'_>) -> Option<DateTime> {
    match d {
        Data::OctetString(b) if b.len() == 12 => {
            let mut raw = [0u8; 12];
            raw.copy_from_slice(b);
            Some(DateTime::from_bytes(raw))
        }
        Data::DateTime(dt) => Some(*dt),
        _ => None,
    }
}

/// Seconds since the epoch of a meter date-time; `fallback_offset` (minutes east of UTC)
/// applies when the meter leaves the deviation unspecified.
pub fn unix_seconds(dt: &DateTime, fallback_offset: Option<i16>) -> Option<i64> {
    if let Some(s) = dt.to_unix_seconds() {
        return Some(s);
    }
    let offset = fallback_offset?;
    let mut with = *dt;
    with.deviation = -offset;
    with.to_unix_seconds()
}

/// The clock attribute as a [`MeterClock`].
pub fn clock_of(d: &Data<'_>, fallback_offset: Option<i16>) -> Result<MeterClock, MeterError> {
    let dt = datetime_of(d).ok_or_else(|| bad("clock time"))?;
    Ok(MeterClock {
        unix_seconds: unix_seconds(&dt, fallback_offset),
        text: dt.to_string(),
        utc_offset_minutes: dt.utc_offset_minutes(),
        status: (!dt.status.is_not_specified()).then_some(dt.status.0),
    })
}

/// A COSEM date-time for a Unix time at a UTC offset (minutes east).
pub fn datetime_at(unix: i64, offset_minutes: i16) -> DateTime {
    let local = unix + i64::from(offset_minutes) * 60;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let year = u16::try_from(y).unwrap_or(0xFFFF);
    DateTime::from_civil(year, m, d, (secs / 3600) as u8, ((secs % 3600) / 60) as u8, (secs % 60) as u8, offset_minutes)
}

/// Howard Hinnant's days-to-civil.
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A register's scaler_unit (attribute 3): `structure { integer scaler, enum unit }`.
pub fn scaler_unit_of(d: &Data<'_>) -> Result<(i8, Unit), MeterError> {
    let s = d.as_structure().ok_or_else(|| bad("scaler_unit"))?;
    let scaler = s.get(0).ok().and_then(|v| v.as_i64()).ok_or_else(|| bad("scaler"))?;
    let unit = match s.get(1) {
        Ok(Data::Enum(u)) => u,
        _ => return Err(bad("unit")),
    };
    Ok((i8::try_from(scaler).map_err(|_| bad("scaler"))?, Unit(unit)))
}

/// The unit's symbol, or its code when the crate has no name for it.
pub fn unit_symbol(unit: Unit) -> String {
    unit.symbol().map(str::to_owned).unwrap_or_else(|| format!("unit({})", unit.0))
}

/// A number scaled by 10^scaler.
pub fn scaled(d: &Data<'_>, scaler: i8) -> Option<f64> {
    let raw = match d {
        Data::Float32(f) => f64::from(*f),
        Data::Float64(f) => *f,
        other => other.as_i64().map(|v| v as f64).or_else(|| other.as_u64().map(|v| v as f64))?,
    };
    Some(raw * 10f64.powi(i32::from(scaler)))
}

/// Combine output_state (attr 2) and control_state (attr 3) into one relay state. When
/// both are known they must agree (a welded contactor reports control state 0 with
/// output true): disagreement is `Unknown`, which a switch judges as not done.
pub fn relay_state(output: Option<bool>, control_state: Option<u8>) -> RelayState {
    let from_control = match control_state {
        Some(1) => Some(RelayState::Connected),
        Some(2) => Some(RelayState::ReadyForReconnection),
        Some(0) => Some(RelayState::Disconnected),
        _ => None,
    };
    match (from_control, output) {
        (Some(RelayState::Connected), Some(false)) => RelayState::Unknown,
        (Some(RelayState::Disconnected | RelayState::ReadyForReconnection), Some(true)) => RelayState::Unknown,
        (Some(state), _) => state,
        (None, Some(true)) => RelayState::Connected,
        (None, Some(false)) => RelayState::Disconnected,
        (None, None) => RelayState::Unknown,
    }
}

/// The capture objects (attribute 3 of a profile).
pub fn capture_objects_of(d: &Data<'_>) -> Result<Vec<CaptureObject>, MeterError> {
    let arr = d.as_array().ok_or_else(|| bad("capture_objects"))?;
    arr.iter()
        .map(|item| {
            let item = item.map_err(|e| MeterError::Protocol(format!("capture_objects: {e}")))?;
            CaptureObject::from_data(&item).map_err(|e| MeterError::Protocol(format!("capture_objects: {e}")))
        })
        .collect()
}

/// How each column of a profile is interpreted.
#[derive(Debug, Clone)]
pub enum ColumnKind {
    /// The clock: the row's capture time.
    Clock,
    /// A status byte (class 1 data, e.g. 0.0.96.10.x.255).
    Status,
    /// A value with a scaler (1 for none) and a unit name.
    Value {
        /// Power of ten.
        scaler: i8,
        /// Column description.
        column: ProfileColumn,
    },
}

/// Decode a profile buffer (compressions undone) into rows.
pub fn profile_rows(
    buffer: &Data<'_>,
    kinds: &[ColumnKind],
    fallback_offset: Option<i16>,
) -> Result<Vec<ProfileRow>, MeterError> {
    let pb = ProfileBuffer::new(buffer).map_err(|e| MeterError::Protocol(format!("profile buffer: {e}")))?;
    let mut rows: Vec<ProfileRow> = Vec::with_capacity(pb.len());
    let values_per_row = kinds.iter().filter(|k| matches!(k, ColumnKind::Value { .. })).count();
    pb.for_each_cell(kinds.len(), |row, col, cell| {
        if rows.len() <= row {
            rows.push(ProfileRow {
                unix_seconds: None,
                status: None,
                clock_status: None,
                values: Vec::with_capacity(values_per_row),
            });
        }
        if let (Some(r), Some(kind)) = (rows.last_mut(), kinds.get(col)) {
            match kind {
                ColumnKind::Clock => {
                    let dt = datetime_of(&cell);
                    r.unix_seconds = dt.and_then(|dt| unix_seconds(&dt, fallback_offset));
                    r.clock_status = dt.filter(|dt| !dt.status.is_not_specified()).map(|dt| dt.status.0);
                }
                ColumnKind::Status => r.status = cell.as_u64().and_then(|v| u8::try_from(v).ok()),
                ColumnKind::Value { scaler, .. } => r.values.push(scaled(&cell, *scaler)),
            }
        }
        Ok(())
    })
    .map_err(|e| MeterError::Protocol(format!("profile buffer: {e}")))?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlms_cosem_rs::codec::Encode;

    #[test]
    fn obis_text_round_trips() {
        assert_eq!(obis_text(ENERGY_IMPORT), "1.0.1.8.0.255");
        assert_eq!(parse_obis("1.0.1.8.0.255"), Some(ENERGY_IMPORT));
        assert_eq!(parse_obis("1.0.x.8.0.255"), None);
    }

    #[test]
    fn clocks_in_both_encodings_and_without_deviation() {
        let dt = DateTime::from_civil(2026, 11, 28, 9, 0, 0, 480);
        let raw = dt.to_bytes();
        let as_octets = Data::OctetString(&raw);
        let c = clock_of(&as_octets, None).expect("octet string clock");
        assert_eq!(c.unix_seconds, Some(1_795_827_600));
        assert_eq!(c.utc_offset_minutes, Some(480));
        let c2 = clock_of(&Data::DateTime(dt), None).expect("tagged clock");
        assert_eq!(c2.unix_seconds, c.unix_seconds);
        let mut unspecified = dt;
        unspecified.deviation = dlms_cosem_rs::axdr::DEVIATION_NOT_SPECIFIED;
        assert_eq!(clock_of(&Data::DateTime(unspecified), None).expect("parses").unix_seconds, None);
        assert_eq!(clock_of(&Data::DateTime(unspecified), Some(480)).expect("parses").unix_seconds, c.unix_seconds);
        assert!(clock_of(&Data::OctetString(&raw[..5]), None).is_err());
    }

    #[test]
    fn datetime_at_inverts_unix_seconds() {
        for t in [0i64, 1_795_827_600, 951_782_400 /* 2000-02-29 */, 4_102_444_799] {
            for off in [-300i16, 0, 480, 345] {
                let dt = datetime_at(t, off);
                assert_eq!(dt.to_unix_seconds(), Some(t), "t={t} off={off} dt={dt}");
            }
        }
    }

    #[test]
    fn scaler_unit_and_scaling() {
        let bytes = [0x02, 0x02, 0x0F, 0xFE, 0x16, 30];
        let d = decode(&bytes).expect("decodes");
        let (scaler, unit) = scaler_unit_of(&d).expect("scaler_unit");
        assert_eq!((scaler, unit.0), (-2, 30));
        assert_eq!(unit_symbol(unit), "Wh");
        assert_eq!(scaled(&Data::DoubleLongUnsigned(12_345), scaler), Some(123.45));
        assert!(scaler_unit_of(&Data::Integer(3)).is_err());
    }

    #[test]
    fn relay_state_prefers_control_state() {
        assert_eq!(relay_state(Some(false), Some(2)), RelayState::ReadyForReconnection);
        assert_eq!(relay_state(Some(true), Some(1)), RelayState::Connected);
        assert_eq!(relay_state(Some(false), None), RelayState::Disconnected);
        assert_eq!(relay_state(None, None), RelayState::Unknown);
        // Attribute 2 and 3 disagree: not proof of anything.
        assert_eq!(relay_state(Some(true), Some(0)), RelayState::Unknown);
        assert_eq!(relay_state(Some(false), Some(1)), RelayState::Unknown);
        assert_eq!(relay_state(Some(true), Some(2)), RelayState::Unknown);
    }

    #[test]
    fn profile_rows_undo_null_compression() {
        // Two rows: clock, status, +A. The second row repeats status as null-data.
        let t0 = DateTime::from_civil(2026, 11, 28, 9, 0, 0, 480).to_bytes();
        let t1 = DateTime::from_civil(2026, 11, 28, 9, 15, 0, 480).to_bytes();
        let mut buf = vec![0x01, 0x02];
        for (t, status, value) in [(t0, Some(0u8), 100u32), (t1, None, 150)] {
            buf.extend_from_slice(&[0x02, 0x03, 0x09, 0x0C]);
            buf.extend_from_slice(&t);
            match status {
                Some(s) => buf.extend_from_slice(&[0x11, s]),
                None => buf.push(0x00),
            }
            Data::DoubleLongUnsigned(value).encode(&mut buf).expect("encodes");
        }
        let d = decode(&buf).expect("decodes");
        let kinds = [
            ColumnKind::Clock,
            ColumnKind::Status,
            ColumnKind::Value { scaler: 0, column: ProfileColumn { name: "x".into(), unit: None } },
        ];
        let rows = profile_rows(&d, &kinds, None).expect("rows");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].status, Some(0));
        assert_eq!(rows[1].values, vec![Some(150.0)]);
        assert_eq!(rows[1].unix_seconds.zip(rows[0].unix_seconds).map(|(b, a)| b - a), Some(900));
    }
}
