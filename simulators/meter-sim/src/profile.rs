//! Profile generic buffers (class 7), computed on demand, and their selective access.
//!
//! The load profile is never stored: row `i` is a capture time and the energy registers
//! at that instant, both closed-form. Selection by range (selector 1) and by entry
//! (selector 2) is therefore arithmetic on row indices, not a scan.

use dlms_cosem_rs::axdr::{Data, DateTime};
use dlms_cosem_rs::codec::{Encode, Writer};
use dlms_cosem_rs::cosem::CaptureObject;
use dlms_cosem_rs::obis::Obis;
use dlms_cosem_rs::server::StoreResult;
use dlms_cosem_rs::xdlms::{DataAccessResult, SelectiveAccess};

use crate::clock::{cosem_datetime, cosem_to_unix};
use crate::meter::EnergyBasis;

/// The clock object.
pub const CLOCK: Obis = Obis::new(0, 0, 1, 0, 0, 255);
/// Active energy import (+A).
pub const IMPORT: Obis = Obis::new(1, 0, 1, 8, 0, 255);
/// Active energy export (-A).
pub const EXPORT: Obis = Obis::new(1, 0, 2, 8, 0, 255);
/// The profile status object captured in the load profile.
pub const PROFILE_STATUS: Obis = Obis::new(0, 0, 96, 10, 1, 255);
/// The disconnector control event code object.
pub const EVENT_CODE: Obis = Obis::new(0, 0, 96, 11, 2, 255);

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// The capture time, octet-string(12).
    Clock,
    /// Status bits, unsigned: 0x80 = the supply was disconnected during the interval.
    Status,
    /// +A, double-long-unsigned Wh.
    Import,
    /// -A, double-long-unsigned Wh.
    Export,
    /// Event code, unsigned.
    EventCode,
}

impl Cell {
    /// Encoded size of one cell.
    const fn size(self) -> usize {
        match self {
            Self::Clock => 14,
            Self::Status | Self::EventCode => 2,
            Self::Import | Self::Export => 5,
        }
    }
}

/// The load profile's capture objects.
pub const LOAD_PROFILE_COLUMNS: [(CaptureObject, Cell); 4] = [
    (CaptureObject::new(8, CLOCK, 2, 0), Cell::Clock),
    (CaptureObject::new(1, PROFILE_STATUS, 2, 0), Cell::Status),
    (CaptureObject::new(3, IMPORT, 2, 0), Cell::Import),
    (CaptureObject::new(3, EXPORT, 2, 0), Cell::Export),
];

/// The disconnector control log's capture objects.
pub const EVENT_LOG_COLUMNS: [(CaptureObject, Cell); 2] =
    [(CaptureObject::new(8, CLOCK, 2, 0), Cell::Clock), (CaptureObject::new(1, EVENT_CODE, 2, 0), Cell::EventCode)];

/// A buffer whose rows can be produced one at a time.
pub trait Rows {
    /// Its capture objects.
    fn columns(&self) -> &'static [(CaptureObject, Cell)];
    /// How many rows it holds (entries_in_use).
    fn len(&self) -> u32;
    /// The capture time of row `i` (0 = oldest), meter-clock ms.
    fn clock_ms(&self, i: u32) -> i64;
    /// The half-open range of rows whose capture time lies in `[from_ms, to_ms]`.
    fn range(&self, from_ms: i64, to_ms: i64) -> (u32, u32);
    /// Write one cell.
    fn cell(&self, i: u32, cell: Cell, w: &mut dyn Writer) -> dlms_cosem_rs::codec::Result<()>;
}

/// The load profile of one meter, as of one instant.
pub struct LoadProfile {
    /// Energy as a function of time.
    pub basis: EnergyBasis,
    /// Capture period, seconds.
    pub period_s: u32,
    /// Rows held.
    pub entries: u32,
    /// Capture time of the newest row, meter-clock ms.
    pub last_ms: i64,
    /// UTC offset of the meter's local time.
    pub offset_min: i16,
    /// The `bad_profile_rows` fault: some rows carry a bad clock or status.
    pub glitches: bool,
}

impl LoadProfile {
    /// The profile as it stands at meter time `meter_now_ms`.
    #[must_use]
    pub fn new(basis: EnergyBasis, period_s: u32, depth_days: u32, meter_now_ms: i64, offset_min: i16) -> Self {
        let period_ms = i64::from(period_s.max(1)) * 1000;
        // Periods are aligned in local time, so a daily profile captures at local midnight.
        let local = meter_now_ms + i64::from(offset_min) * 60_000;
        let last_ms = local.div_euclid(period_ms) * period_ms - i64::from(offset_min) * 60_000;
        let entries = u32::try_from(u64::from(depth_days) * 86_400 / u64::from(period_s.max(1))).unwrap_or(u32::MAX);
        Self { basis, period_s: period_s.max(1), entries, last_ms, offset_min, glitches: false }
    }

    fn period_ms(&self) -> i64 {
        i64::from(self.period_s) * 1000
    }
}

impl Rows for LoadProfile {
    fn columns(&self) -> &'static [(CaptureObject, Cell)] {
        &LOAD_PROFILE_COLUMNS
    }

    fn len(&self) -> u32 {
        self.entries
    }

    fn clock_ms(&self, i: u32) -> i64 {
        let back = i64::from(self.entries.saturating_sub(1).saturating_sub(i));
        self.last_ms - back * self.period_ms()
    }

    fn range(&self, from_ms: i64, to_ms: i64) -> (u32, u32) {
        if self.entries == 0 || from_ms > to_ms {
            return (0, 0);
        }
        // Wide arithmetic: the bounds come from the client and may be absurd.
        let first = i128::from(self.clock_ms(0));
        let p = i128::from(self.period_ms());
        let lo = (i128::from(from_ms) - first + p - 1).div_euclid(p).max(0);
        let hi = (i128::from(to_ms) - first).div_euclid(p) + 1;
        let clamp = |v: i128| u32::try_from(v.clamp(0, i128::from(self.entries))).unwrap_or(0);
        let (lo, hi) = (clamp(lo), clamp(hi));
        if lo >= hi {
            (0, 0)
        } else {
            (lo, hi)
        }
    }

    fn cell(&self, i: u32, cell: Cell, w: &mut dyn Writer) -> dlms_cosem_rs::codec::Result<()> {
        let at = self.clock_ms(i);
        let true_ms = at - self.basis.drift_ms;
        // The fault is a function of the interval, so every read of a row agrees.
        let glitch = if self.glitches { at.div_euclid(self.period_ms()).rem_euclid(11) } else { -1 };
        match cell {
            Cell::Clock if glitch == 3 => Data::OctetString(&UNSPECIFIED_CLOCK).encode(w),
            Cell::Clock if glitch == 9 => write_clock(at - self.period_ms(), self.offset_min, w),
            Cell::Clock => write_clock(at, self.offset_min, w),
            Cell::Status => {
                let open = self.basis.open_during(true_ms - self.period_ms(), true_ms);
                let clock_invalid = if glitch == 7 { 0x02 } else { 0 };
                Data::Unsigned(if open { 0x80 } else { 0 } | clock_invalid).encode(w)
            }
            // The register is 32 bits on the wire and wraps like a real one.
            Cell::Import => Data::DoubleLongUnsigned(self.basis.import_wh(true_ms) as u32).encode(w),
            Cell::Export => Data::DoubleLongUnsigned(self.basis.export_wh(true_ms) as u32).encode(w),
            Cell::EventCode => Data::Unsigned(0).encode(w),
        }
    }
}

/// The disconnector control log, copied out of the meter.
pub struct EventLog {
    /// (meter-clock ms, event code), oldest first.
    pub rows: Vec<(i64, u8)>,
    /// UTC offset of the meter's local time.
    pub offset_min: i16,
}

impl Rows for EventLog {
    fn columns(&self) -> &'static [(CaptureObject, Cell)] {
        &EVENT_LOG_COLUMNS
    }

    fn len(&self) -> u32 {
        u32::try_from(self.rows.len()).unwrap_or(u32::MAX)
    }

    fn clock_ms(&self, i: u32) -> i64 {
        self.rows.get(i as usize).map_or(0, |r| r.0)
    }

    fn range(&self, from_ms: i64, to_ms: i64) -> (u32, u32) {
        // Seconds resolution, as the selector's date-times have.
        let inside = |t: i64| (from_ms..=to_ms).contains(&(t.div_euclid(1000) * 1000));
        let lo = self.rows.iter().position(|r| inside(r.0));
        let hi = self.rows.iter().rposition(|r| inside(r.0));
        match (lo, hi) {
            (Some(lo), Some(hi)) => (lo as u32, hi as u32 + 1),
            _ => (0, 0),
        }
    }

    fn cell(&self, i: u32, cell: Cell, w: &mut dyn Writer) -> dlms_cosem_rs::codec::Result<()> {
        let (at, code) = self.rows.get(i as usize).copied().unwrap_or((0, 0));
        match cell {
            Cell::Clock => write_clock(at, self.offset_min, w),
            _ => Data::Unsigned(code).encode(w),
        }
    }
}

/// A date-time with every field "not specified" (the `bad_profile_rows` fault).
const UNSPECIFIED_CLOCK: [u8; 12] = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x80, 0x00, 0xFF];

/// A date-time as the standard 12-byte octet string.
pub fn write_clock(ms: i64, offset_min: i16, w: &mut dyn Writer) -> dlms_cosem_rs::codec::Result<()> {
    let mut dt = cosem_datetime(ms, offset_min);
    dt.hundredths = 0;
    Data::OctetString(&dt.to_bytes()).encode(w)
}

/// Encode the capture objects (attribute 3).
pub fn write_capture_objects(rows: &dyn Rows, w: &mut dyn Writer) -> dlms_cosem_rs::codec::Result<()> {
    w.write_u8(0x01)?;
    w.write_length(rows.columns().len())?;
    for (object, _) in rows.columns() {
        object.encode(w)?;
    }
    Ok(())
}

/// Encode the buffer (attribute 2), honouring selective access, into at most `capacity`
/// bytes.
///
/// # Errors
/// A [`DataAccessResult`] for a malformed or unsupported selector, and
/// `ScopeOfAccessViolated` for a selection that does not fit `capacity`.
pub fn write_buffer(
    rows: &dyn Rows,
    access: Option<SelectiveAccess<'_>>,
    default_offset_min: i16,
    capacity: usize,
    w: &mut dyn Writer,
) -> StoreResult<()> {
    let columns = rows.columns();
    let all: Vec<usize> = (0..columns.len()).collect();
    let (lo, hi, cols) = match access {
        None => (0, rows.len(), all),
        Some(sa) if sa.selector == 1 => select_range(rows, &sa.parameters, default_offset_min)?,
        Some(sa) if sa.selector == 2 => select_entries(rows, &sa.parameters)?,
        Some(_) => return Err(DataAccessResult::ScopeOfAccessViolated),
    };
    let count = hi.saturating_sub(lo) as usize;
    let row_size = 2 + cols.iter().map(|&c| columns[c].1.size()).sum::<usize>();
    if count.saturating_mul(row_size).saturating_add(6) > capacity {
        // Answering would need more than the server's value buffer: refuse rather than
        // truncate. README: "reading the load profile" gives the limit.
        return Err(DataAccessResult::ScopeOfAccessViolated);
    }
    let bad = |_| DataAccessResult::OtherReason;
    w.write_u8(0x01).map_err(bad)?;
    w.write_length(count).map_err(bad)?;
    for i in lo..hi {
        w.write_u8(0x02).map_err(bad)?;
        w.write_length(cols.len()).map_err(bad)?;
        for &c in &cols {
            rows.cell(i, columns[c].1, w).map_err(bad)?;
        }
    }
    Ok(())
}

type Selection = (u32, u32, Vec<usize>);

fn field<'a>(d: &Data<'a>, i: usize) -> StoreResult<Data<'a>> {
    d.as_structure().and_then(|s| s.get(i).ok()).ok_or(DataAccessResult::TypeUnmatched)
}

fn date_time(d: &Data<'_>) -> Option<DateTime> {
    match d {
        Data::DateTime(dt) => Some(*dt),
        Data::OctetString(b) => <[u8; 12]>::try_from(*b).ok().map(DateTime::from_bytes),
        _ => None,
    }
}

/// Selector 1: `structure { restricting_object, from_value, to_value, selected_values }`.
fn select_range(rows: &dyn Rows, p: &Data<'_>, offset_min: i16) -> StoreResult<Selection> {
    let restricting = CaptureObject::from_data(&field(p, 0)?).map_err(|_| DataAccessResult::TypeUnmatched)?;
    let clock = rows.columns()[0].0;
    if (restricting.class_id, restricting.logical_name, restricting.attribute_index)
        != (clock.class_id, clock.logical_name, clock.attribute_index)
    {
        // Only the clock column is sorted, so only it can restrict.
        return Err(DataAccessResult::ScopeOfAccessViolated);
    }
    let bound = |i| -> StoreResult<i64> {
        let dt = date_time(&field(p, i)?).ok_or(DataAccessResult::TypeUnmatched)?;
        cosem_to_unix(&dt, offset_min).map(|s| s.saturating_mul(1000)).ok_or(DataAccessResult::TypeUnmatched)
    };
    let (from, to) = (bound(1)?, bound(2)?);
    let cols = selected_columns(rows, p.as_structure().and_then(|s| s.get(3).ok()))?;
    let (lo, hi) = rows.range(from, to);
    Ok((lo, hi, cols))
}

fn selected_columns(rows: &dyn Rows, selected: Option<Data<'_>>) -> StoreResult<Vec<usize>> {
    let columns = rows.columns();
    let Some(list) = selected.as_ref().and_then(Data::as_array).filter(|a| !a.is_empty()) else {
        return Ok((0..columns.len()).collect());
    };
    let mut wanted = vec![false; columns.len()];
    for item in list.iter() {
        let item = item.map_err(|_| DataAccessResult::TypeUnmatched)?;
        let object = CaptureObject::from_data(&item).map_err(|_| DataAccessResult::TypeUnmatched)?;
        let at = columns
            .iter()
            .position(|(c, _)| {
                (c.class_id, c.logical_name, c.attribute_index)
                    == (object.class_id, object.logical_name, object.attribute_index)
            })
            .ok_or(DataAccessResult::ScopeOfAccessViolated)?;
        wanted[at] = true;
    }
    Ok((0..columns.len()).filter(|&c| wanted[c]).collect())
}

/// Selector 2: `structure { from_entry, to_entry, from_selected_value, to_selected_value }`,
/// entries and values counting from 1, 0 meaning "to the last".
fn select_entries(rows: &dyn Rows, p: &Data<'_>) -> StoreResult<Selection> {
    let num = |i| -> StoreResult<u64> { field(p, i)?.as_u64().ok_or(DataAccessResult::TypeUnmatched) };
    let (from, to, from_col, to_col) = (num(0)?, num(1)?, num(2)?, num(3)?);
    let len = u64::from(rows.len());
    let to = if to == 0 { len } else { to.min(len) };
    let from = from.max(1);
    let ncols = rows.columns().len() as u64;
    let to_col = if to_col == 0 { ncols } else { to_col.min(ncols) };
    let from_col = from_col.max(1);
    let cols: Vec<usize> = (from_col..=to_col).map(|c| (c - 1) as usize).collect();
    if cols.is_empty() {
        return Err(DataAccessResult::ScopeOfAccessViolated);
    }
    if from > to {
        return Ok((0, 0, cols));
    }
    // Both bounds are within 1..=len here, so the conversions cannot fail.
    Ok((u32::try_from(from - 1).unwrap_or(0), u32::try_from(to).unwrap_or(0), cols))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dlms_cosem_rs::codec::SliceWriter;
    use dlms_cosem_rs::cosem::{EntryDescriptor, RangeDescriptor};

    const NOW: i64 = 1_717_200_123_000; // a little after 2024-06-01 00:00 UTC

    fn profile() -> LoadProfile {
        use crate::clock::ManualClock;
        use crate::config::MeterSpec;
        use std::sync::Arc;
        let clock = Arc::new(ManualClock::new(NOW - 10 * 86_400_000));
        let fleet = crate::meter::tests_support::fleet(vec![MeterSpec::dlms("P", 0)], clock.clone());
        clock.set(NOW);
        let basis = fleet.meters[0].energy(&fleet);
        LoadProfile::new(basis, 900, 60, NOW, 0)
    }

    fn rows_of(bytes: &[u8]) -> Vec<Vec<u64>> {
        let data = Data::from_bytes_in(bytes).unwrap_or(Data::Null);
        let mut out = Vec::new();
        for row in data.as_array().map(|a| a.iter().flatten().collect::<Vec<_>>()).unwrap_or_default() {
            let cells = row.as_structure().map(|s| s.iter().flatten().collect::<Vec<_>>()).unwrap_or_default();
            out.push(
                cells
                    .iter()
                    .map(|c| match c {
                        Data::OctetString(b) => <[u8; 12]>::try_from(*b)
                            .ok()
                            .and_then(|b| DateTime::from_bytes(b).to_unix_seconds())
                            .map_or(0, |s| s as u64),
                        other => other.as_u64().unwrap_or(u64::MAX),
                    })
                    .collect(),
            );
        }
        out
    }

    fn read(p: &LoadProfile, sa: Option<SelectiveAccess<'_>>) -> Result<Vec<Vec<u64>>, DataAccessResult> {
        let mut buf = vec![0u8; 16384];
        let mut w = SliceWriter::new(&mut buf);
        write_buffer(p, sa, 0, 16384, &mut w)?;
        let n = w.written();
        Ok(rows_of(&buf[..n]))
    }

    #[test]
    fn the_profile_is_full_and_aligned() {
        let p = profile();
        assert_eq!(p.len(), 60 * 96);
        assert_eq!(p.clock_ms(p.len() - 1), 1_717_200_000_000);
        assert_eq!(p.clock_ms(0), 1_717_200_000_000 - (60 * 96 - 1) * 900_000);
    }

    #[test]
    fn range_selection_is_inclusive_on_both_ends() {
        let p = profile();
        let from = crate::clock::cosem_datetime(1_717_200_000_000 - 4 * 900_000, 0);
        let to = crate::clock::cosem_datetime(1_717_200_000_000, 0);
        let mut params = [0u8; 128];
        let sa = RangeDescriptor::by_clock(from, to).to_selective_access(&mut params).ok();
        let rows = read(&p, sa).unwrap_or_default();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0][0], 1_717_200_000 - 3600);
        assert_eq!(rows[4][0], 1_717_200_000);
        assert!(rows.windows(2).all(|w| w[1][2] >= w[0][2]), "+A never decreases");
        assert!(rows.windows(2).any(|w| w[1][2] > w[0][2]));
        // A range between two captures selects nothing, and is not an error.
        let from = crate::clock::cosem_datetime(1_717_200_000_000 - 800_000, 0);
        let to = crate::clock::cosem_datetime(1_717_200_000_000 - 100_000, 0);
        let sa = RangeDescriptor::by_clock(from, to).to_selective_access(&mut params).ok();
        assert_eq!(read(&p, sa).map(|r| r.len()), Ok(0));
    }

    #[test]
    fn entry_selection_counts_from_one_and_zero_means_last() {
        let p = profile();
        let mut params = [0u8; 64];
        let sa = EntryDescriptor::entries(1, 3).to_selective_access(&mut params).ok();
        let rows = read(&p, sa).unwrap_or_default();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0][0] as i64 * 1000, p.clock_ms(0));
        let sa = EntryDescriptor::entries(p.len() - 1, 0).to_selective_access(&mut params).ok();
        let rows = read(&p, sa).unwrap_or_default();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1][0] as i64 * 1000, p.clock_ms(p.len() - 1));
        let mut cols = EntryDescriptor::entries(1, 2);
        cols.from_value = 3;
        cols.to_value = 3;
        let sa = cols.to_selective_access(&mut params).ok();
        let rows = read(&p, sa).unwrap_or_default();
        assert_eq!(rows.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1], "only +A");
    }

    #[test]
    fn the_bad_rows_fault_spoils_three_rows_in_eleven_the_same_way_every_time() {
        let mut p = profile();
        p.glitches = true;
        let first = p.len() - 22;
        let mut params = [0u8; 64];
        let sa = EntryDescriptor::entries(first + 1, 0).to_selective_access(&mut params).ok();
        let rows = read(&p, sa).unwrap_or_default();
        assert_eq!(rows.len(), 22);
        let n = |i: usize| (p.clock_ms(first + i as u32) / 900_000).rem_euclid(11);
        for (i, r) in rows.iter().enumerate() {
            let at = p.clock_ms(first + i as u32) / 1000;
            match n(i) {
                3 => assert_eq!(r[0], 0, "unspecified clock"),
                7 => assert_eq!((r[0] as i64, r[1] & 0x02), (at, 0x02), "clock invalid"),
                9 => assert_eq!(r[0] as i64, at - 900, "the time of the row before"),
                _ => assert_eq!((r[0] as i64, r[1] & 0x02), (at, 0)),
            }
        }
        assert_eq!(
            read(&p, EntryDescriptor::entries(first + 1, 0).to_selective_access(&mut params).ok()).ok(),
            Some(rows)
        );
    }

    #[test]
    fn too_much_is_refused_not_truncated() {
        let p = profile();
        assert_eq!(read(&p, None), Err(DataAccessResult::ScopeOfAccessViolated));
        let mut params = [0u8; 64];
        let sa = EntryDescriptor::entries(1, 96 * 6).to_selective_access(&mut params).ok();
        assert_eq!(read(&p, sa).map(|r| r.len()), Ok(96 * 6), "six days fit");
    }
}
