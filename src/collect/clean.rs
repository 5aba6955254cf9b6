//! Bad data in, never a crash and never a silent hole out: profile rows and snapshots are
//! checked before they reach the outbox. What cannot be placed in time is dropped; what
//! is doubtful is kept and flagged; every drop, flag and gap is counted, and the batch
//! carries the flags and the gaps so that billing sees them too.
//!
//! Dropped: no usable timestamp (unspecified, or not a date), a clock marked invalid (the
//! date-time's status bit 0, or bit 1 of the IDIS profile status), a time beyond the
//! head-end's clock plus a tolerance, a row at or before the newest one stored, a second
//! row with the same time. Flagged: data not valid, clock adjusted, power down (IDIS
//! status bits 2, 5, 7), a doubtful clock, a capture off the period's grid, a value that
//! is not a number (published as null), negative, or a cumulative register going backwards.

use crate::contract::{ReadingColumn, RowFlags, RowGap};
use crate::meter::{LoadProfile, ProfileRow, Reading};
use crate::time::format_rfc3339;

/// Why rows were dropped or flagged, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BadData {
    /// Dropped: no usable timestamp.
    pub bad_time: u64,
    /// Dropped: the clock was marked invalid.
    pub clock_invalid: u64,
    /// Dropped: stamped in the future.
    pub future_time: u64,
    /// Dropped: a time already stored, or twice in one answer.
    pub duplicate: u64,
    /// Rows that came out of time order (sorted, kept).
    pub out_of_order: u64,
    /// Intervals missing between rows (reported as gaps).
    pub gap_intervals: u64,
    /// Rows kept with at least one flag.
    pub flagged: u64,
    /// Values that were not finite numbers (published as null).
    pub bad_value: u64,
}

impl BadData {
    /// Rows dropped.
    pub fn dropped(&self) -> u64 {
        self.bad_time + self.clock_invalid + self.future_time + self.duplicate
    }

    /// Add another count.
    pub fn add(&mut self, o: &BadData) {
        self.bad_time += o.bad_time;
        self.clock_invalid += o.clock_invalid;
        self.future_time += o.future_time;
        self.duplicate += o.duplicate;
        self.out_of_order += o.out_of_order;
        self.gap_intervals += o.gap_intervals;
        self.flagged += o.flagged;
        self.bad_value += o.bad_value;
    }

    /// True when nothing was wrong.
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }
}

/// Flag names, as published.
pub mod flag {
    /// IDIS status bit 2.
    pub const DATA_NOT_VALID: &str = "data_not_valid";
    /// IDIS status bit 5.
    pub const CLOCK_ADJUSTED: &str = "clock_adjusted";
    /// IDIS status bit 7 (meter-sim: the relay was open during the interval).
    pub const POWER_DOWN: &str = "power_down";
    /// The date-time's status bit 1.
    pub const CLOCK_DOUBTFUL: &str = "clock_doubtful";
    /// Captured off the period's grid (an asynchronous capture).
    pub const OFF_BOUNDARY: &str = "off_boundary";
    /// A value that is not a finite number (null in the row).
    pub const BAD_VALUE: &str = "bad_value";
    /// A negative value.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// A cumulative register lower than in the row before.
    pub const DECREASING: &str = "decreasing";
    /// A snapshot read later than `snapshot_late_s` after its boundary.
    pub const LATE: &str = "late";
}

/// Rows ready for the outbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Clean {
    /// The value columns, units normalised (kWh → Wh).
    pub columns: Vec<ReadingColumn>,
    /// Rows in time order: capture time (Unix s) and values.
    pub rows: Vec<(i64, Vec<Option<f64>>)>,
    /// Flags of the rows that have any.
    pub flags: Vec<RowFlags>,
    /// Missing intervals.
    pub gaps: Vec<RowGap>,
    /// What was wrong.
    pub bad: BadData,
}

/// What the checks need besides the rows.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The newest row stored before, s.
    pub after_s: Option<i64>,
    /// Its values (for the cumulative check across batches).
    pub after_values: Option<&'a [Option<f64>]>,
    /// The head-end's clock, s.
    pub now_s: i64,
    /// Rows beyond `now_s` + this are dropped.
    pub future_tolerance_s: i64,
    /// Offset for the published times, minutes east.
    pub offset_min: i16,
}

/// A column name from the driver's `class/obis/attribute` (the contract names the OBIS
/// code), and the factor that brings its unit to the base unit.
fn column_of(name: &str, unit: Option<&str>) -> (ReadingColumn, f64) {
    let mut parts = name.split('/');
    let obis = match (parts.next(), parts.next(), parts.next()) {
        (Some(_class), Some(obis), Some(_attr)) => obis,
        _ => name,
    };
    let (unit, factor) = normalise_unit(unit.unwrap_or(""));
    (ReadingColumn { name: obis.to_owned(), unit }, factor)
}

/// kWh and MWh (and the var and VA kin) to the base unit the contract names.
pub fn normalise_unit(unit: &str) -> (String, f64) {
    for base in ["Wh", "varh", "VAh", "W", "var", "VA"] {
        if unit == format!("k{base}") {
            return (base.to_owned(), 1e3);
        }
        if unit == format!("M{base}") {
            return (base.to_owned(), 1e6);
        }
    }
    (unit.to_owned(), 1.0)
}

/// Cumulative registers (OBIS value group D = 8, "time integral 1") never go backwards.
fn is_cumulative(obis: &str) -> bool {
    obis.split('.').nth(3) == Some("8")
}

/// Check a profile read. `rows` may hold anything the meter sent.
pub fn clean_profile(p: &LoadProfile, cx: &Context<'_>) -> Clean {
    let (columns, factors): (Vec<_>, Vec<_>) = p.columns.iter().map(|c| column_of(&c.name, c.unit.as_deref())).unzip();
    let mut bad = BadData::default();
    let mut kept: Vec<(&ProfileRow, i64)> = Vec::with_capacity(p.rows.len());
    for row in &p.rows {
        let Some(at) = row.unix_seconds else {
            bad.bad_time += 1;
            continue;
        };
        let clock_invalid =
            row.clock_status.is_some_and(|s| s & 0x01 != 0) || row.status.is_some_and(|s| s & 0x02 != 0);
        if clock_invalid {
            bad.clock_invalid += 1;
        } else if at > cx.now_s + cx.future_tolerance_s {
            bad.future_time += 1;
        } else if cx.after_s.is_some_and(|a| at <= a) {
            bad.duplicate += 1;
        } else {
            kept.push((row, at));
        }
    }
    if kept.windows(2).any(|w| w[1].1 < w[0].1) {
        bad.out_of_order += kept.windows(2).filter(|w| w[1].1 < w[0].1).count() as u64;
        kept.sort_by_key(|(_, at)| *at);
    }
    let before = kept.len();
    kept.dedup_by_key(|(_, at)| *at);
    bad.duplicate += (before - kept.len()) as u64;

    let period = i64::from(p.capture_period_s);
    let cumulative: Vec<bool> = columns.iter().map(|c| is_cumulative(&c.name)).collect();
    let mut out = Clean { columns, bad, ..Clean::default() };
    let mut prev_at = cx.after_s;
    let mut prev_values: Option<Vec<Option<f64>>> = cx.after_values.map(<[Option<f64>]>::to_vec);
    for (row, at) in kept {
        let mut flags: Vec<&'static str> = Vec::new();
        if let Some(s) = row.status {
            for (bit, name) in [(0x04, flag::DATA_NOT_VALID), (0x20, flag::CLOCK_ADJUSTED), (0x80, flag::POWER_DOWN)] {
                if s & bit != 0 {
                    flags.push(name);
                }
            }
        }
        if row.clock_status.is_some_and(|s| s & 0x02 != 0) {
            flags.push(flag::CLOCK_DOUBTFUL);
        }
        let on_grid = period > 0 && at.rem_euclid(period) == 0;
        if period > 0 && !on_grid {
            flags.push(flag::OFF_BOUNDARY);
        }
        let values = check_values(&row.values, &factors, &cumulative, prev_values.as_deref(), &mut flags, &mut out.bad);
        if let (Some(p_at), true) = (prev_at, on_grid) {
            let missing = (at - p_at) / period - 1;
            if p_at.rem_euclid(period) == 0 && missing > 0 {
                out.bad.gap_intervals += missing as u64;
                out.gaps.push(RowGap {
                    from: format_rfc3339(p_at + period, cx.offset_min),
                    to: format_rfc3339(at - period, cx.offset_min),
                    intervals: missing as u64,
                });
            }
        }
        if !flags.is_empty() {
            out.bad.flagged += 1;
            out.flags.push(RowFlags {
                at: format_rfc3339(at, cx.offset_min),
                flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            });
        }
        prev_at = Some(at);
        prev_values = Some(values.clone());
        out.rows.push((at, values));
    }
    out
}

fn check_values(
    raw: &[Option<f64>],
    factors: &[f64],
    cumulative: &[bool],
    prev: Option<&[Option<f64>]>,
    flags: &mut Vec<&'static str>,
    bad: &mut BadData,
) -> Vec<Option<f64>> {
    let mut values = Vec::with_capacity(raw.len());
    for (i, v) in raw.iter().enumerate() {
        let v = v.map(|v| v * factors.get(i).copied().unwrap_or(1.0));
        let v = match v {
            Some(x) if !x.is_finite() => {
                bad.bad_value += 1;
                push_once(flags, flag::BAD_VALUE);
                None
            }
            other => other,
        };
        if let Some(x) = v {
            if x < 0.0 {
                push_once(flags, flag::OUT_OF_RANGE);
            }
            if cumulative.get(i).copied().unwrap_or(false)
                && prev.and_then(|p| p.get(i).copied().flatten()).is_some_and(|p| x < p)
            {
                push_once(flags, flag::DECREASING);
            }
        }
        values.push(v);
    }
    values
}

fn push_once(flags: &mut Vec<&'static str>, f: &'static str) {
    if !flags.contains(&f) {
        flags.push(f);
    }
}

/// Check a snapshot taken for the boundary `at_s`, read at `read_s`.
pub fn clean_snapshot(
    registers: &[Reading],
    at_s: i64,
    read_s: i64,
    late_s: i64,
    interval_s: i64,
    cx: &Context<'_>,
) -> Clean {
    let (columns, factors): (Vec<_>, Vec<_>) = registers.iter().map(|r| column_of(&r.obis, Some(&r.unit))).unzip();
    let mut out = Clean { columns, ..Clean::default() };
    if cx.after_s.is_some_and(|a| at_s <= a) {
        out.bad.duplicate += 1;
        return out;
    }
    let mut flags = Vec::new();
    if read_s - at_s > late_s {
        flags.push(flag::LATE);
    }
    let raw: Vec<Option<f64>> = registers.iter().map(|r| Some(r.value)).collect();
    let cumulative: Vec<bool> = out.columns.iter().map(|c| is_cumulative(&c.name)).collect();
    let values = check_values(&raw, &factors, &cumulative, cx.after_values, &mut flags, &mut out.bad);
    if let Some(a) = cx.after_s {
        let missing = (at_s - a) / interval_s.max(1) - 1;
        if missing > 0 {
            out.bad.gap_intervals += missing as u64;
            out.gaps.push(RowGap {
                from: format_rfc3339(a + interval_s, cx.offset_min),
                to: format_rfc3339(at_s - interval_s, cx.offset_min),
                intervals: missing as u64,
            });
        }
    }
    if !flags.is_empty() {
        out.bad.flagged += 1;
        out.flags.push(RowFlags {
            at: format_rfc3339(at_s, cx.offset_min),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        });
    }
    out.rows.push((at_s, values));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::ProfileColumn;

    const B: i64 = 1_795_824_000; // a quarter-hour boundary

    fn row(at: Option<i64>, status: u8, import: f64) -> ProfileRow {
        ProfileRow { unix_seconds: at, status: Some(status), clock_status: None, values: vec![Some(import), Some(0.0)] }
    }

    fn profile(rows: Vec<ProfileRow>) -> LoadProfile {
        let col = |obis: &str, unit: &str| ProfileColumn { name: format!("3/{obis}/2"), unit: Some(unit.into()) };
        LoadProfile {
            obis: "1.0.99.1.0.255".into(),
            capture_period_s: 900,
            columns: vec![col("1.0.1.8.0.255", "kWh"), col("1.0.2.8.0.255", "Wh")],
            rows,
        }
    }

    fn cx(after: Option<i64>) -> Context<'static> {
        Context { after_s: after, after_values: None, now_s: B + 10 * 900, future_tolerance_s: 300, offset_min: 480 }
    }

    #[test]
    fn good_rows_pass_with_columns_named_by_obis_in_base_units() {
        let p = profile(vec![row(Some(B), 0, 1.5), row(Some(B + 900), 0, 1.75)]);
        let c = clean_profile(&p, &cx(Some(B - 900)));
        assert!(c.bad.is_clean(), "{:?}", c.bad);
        assert_eq!(c.columns[0], ReadingColumn { name: "1.0.1.8.0.255".into(), unit: "Wh".into() });
        assert_eq!(c.rows, vec![(B, vec![Some(1500.0), Some(0.0)]), (B + 900, vec![Some(1750.0), Some(0.0)])]);
        assert!(c.flags.is_empty() && c.gaps.is_empty());
    }

    #[test]
    fn rows_that_cannot_be_placed_in_time_are_dropped_and_counted() {
        let mut invalid_clock = row(Some(B + 2 * 900), 0, 3.0);
        invalid_clock.clock_status = Some(0x01);
        let p = profile(vec![
            row(None, 0, 1.0),                // unspecified time
            row(Some(B + 900), 0x02, 2.0),    // IDIS: clock invalid
            invalid_clock,                    // date-time status: invalid
            row(Some(B + 3 * 900), 0, 4.0),   // good
            row(Some(B + 3 * 900), 0, 4.0),   // the same again
            row(Some(B - 900), 0, 0.5),       // already stored
            row(Some(B + 100 * 900), 0, 9.0), // far in the future
        ]);
        let c = clean_profile(&p, &cx(Some(B)));
        assert_eq!(c.rows.len(), 1);
        assert_eq!(
            (c.bad.bad_time, c.bad.clock_invalid, c.bad.duplicate, c.bad.future_time),
            (1, 2, 2, 1),
            "{:?}",
            c.bad
        );
        assert_eq!(c.bad.dropped(), 6);
        // The rows between the stored one and the good one are a gap, not a silent hole.
        assert_eq!(c.gaps.len(), 1);
        assert_eq!(c.gaps[0].intervals, 2);
        assert_eq!(c.gaps[0].from, "2026-11-28T08:15:00+08:00");
        assert_eq!(c.gaps[0].to, "2026-11-28T08:30:00+08:00");
        assert_eq!(c.bad.gap_intervals, 2);
    }

    #[test]
    fn doubtful_rows_are_kept_and_flagged() {
        let mut doubtful = row(Some(B + 2 * 900), 0, 3.0);
        doubtful.clock_status = Some(0x02);
        let mut nan = row(Some(B + 3 * 900), 0, 4.0);
        nan.values[1] = Some(f64::NAN);
        let p = profile(vec![
            row(Some(B + 900), 0x80 | 0x20, 2.0),
            doubtful,
            nan,
            row(Some(B + 4 * 900), 0x04, 3.5),   // goes backwards
            row(Some(B + 4 * 900 + 17), 0, 3.6), // off the grid
            row(Some(B + 5 * 900), 0, -1.0),
        ]);
        let c = clean_profile(&p, &cx(Some(B)));
        assert_eq!(c.rows.len(), 6);
        let flags: Vec<Vec<String>> = c.flags.iter().map(|f| f.flags.clone()).collect();
        assert_eq!(
            flags,
            vec![
                vec!["clock_adjusted".to_owned(), "power_down".to_owned()],
                vec!["clock_doubtful".to_owned()],
                vec!["bad_value".to_owned()],
                vec!["data_not_valid".to_owned(), "decreasing".to_owned()],
                vec!["off_boundary".to_owned()],
                vec!["out_of_range".to_owned(), "decreasing".to_owned()],
            ]
        );
        assert_eq!(c.rows[2].1[1], None, "not a number: null");
        assert_eq!((c.bad.flagged, c.bad.bad_value, c.bad.dropped()), (6, 1, 0));
        assert!(c.gaps.is_empty(), "an off-grid row is not a gap");
    }

    #[test]
    fn rows_out_of_order_are_sorted_and_counted() {
        let p = profile(vec![row(Some(B + 1800), 0, 2.0), row(Some(B + 900), 0, 1.0), row(Some(B + 2700), 0, 3.0)]);
        let c = clean_profile(&p, &cx(None));
        assert_eq!(c.rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![B + 900, B + 1800, B + 2700]);
        assert_eq!(c.bad.out_of_order, 1);
    }

    #[test]
    fn snapshots_late_and_missed() {
        let regs = vec![Reading { obis: "1.0.1.8.0.255".into(), value: 1234.0, unit: "Wh".into() }];
        let c = clean_snapshot(&regs, B, B + 5, 60, 900, &cx(Some(B - 900)));
        assert!(c.bad.is_clean() && c.flags.is_empty());
        let c = clean_snapshot(&regs, B, B + 120, 60, 900, &cx(Some(B - 3 * 900)));
        assert_eq!(c.flags[0].flags, vec!["late".to_owned()]);
        assert_eq!(c.gaps[0].intervals, 2);
        let c = clean_snapshot(&regs, B, B + 5, 60, 900, &cx(Some(B)));
        assert!(c.rows.is_empty());
        assert_eq!(c.bad.duplicate, 1);
    }
}
