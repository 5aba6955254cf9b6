//! Time: where "now" comes from, and civil (calendar) arithmetic.
//!
//! Every meter derives its clock, its energy and its profile rows from one [`Clock`], so
//! a test that injects a [`ManualClock`] gets byte-identical answers run after run.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dlms_cosem_rs::axdr::DateTime;

/// The source of true (UTC) time for the whole simulated fleet.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch, UTC.
    fn now_ms(&self) -> i64;
}

/// The host's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to: for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    #[must_use]
    pub fn new(now_ms: i64) -> Self {
        Self { now_ms: AtomicI64::new(now_ms) }
    }

    /// Jump to `now_ms`.
    pub fn set(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Move forward (or back, with a negative step) by `delta_ms`.
    pub fn advance(&self, delta_ms: i64) {
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// A broken-down local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year.
    pub year: i32,
    /// Month 1-12.
    pub month: u8,
    /// Day 1-31.
    pub day: u8,
    /// Hour 0-23.
    pub hour: u8,
    /// Minute 0-59.
    pub minute: u8,
    /// Second 0-59.
    pub second: u8,
    /// Day of week, 1 = Monday .. 7 = Sunday (the COSEM numbering).
    pub weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
#[must_use]
pub fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
#[must_use]
pub fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // The ranges are guaranteed by the algorithm: day 1..=31, month 1..=12.
    (i32::try_from(year).unwrap_or(i32::MAX), month as u8, day as u8)
}

/// Break `unix_s` (UTC) down into local time `offset_min` minutes ahead of UTC.
#[must_use]
pub fn civil(unix_s: i64, offset_min: i16) -> Civil {
    let local = unix_s + i64::from(offset_min) * 60;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (4 in COSEM numbering).
    let weekday = ((days + 3).rem_euclid(7) + 1) as u8;
    Civil {
        year,
        month,
        day,
        hour: (secs / 3600) as u8,
        minute: (secs / 60 % 60) as u8,
        second: (secs % 60) as u8,
        weekday,
    }
}

/// The COSEM date-time of `unix_ms` in local time `offset_min` minutes ahead of UTC.
///
/// The deviation follows dlms-cosem-rs (minutes *behind* UTC, so UTC+8 is -480), which is
/// the convention the head-end decodes with.
#[must_use]
pub fn cosem_datetime(unix_ms: i64, offset_min: i16) -> DateTime {
    let c = civil(unix_ms.div_euclid(1000), offset_min);
    DateTime {
        year: u16::try_from(c.year).unwrap_or(0xFFFF),
        month: c.month,
        day_of_month: c.day,
        day_of_week: c.weekday,
        hour: c.hour,
        minute: c.minute,
        second: c.second,
        hundredths: (unix_ms.rem_euclid(1000) / 10) as u8,
        deviation: -offset_min,
        status: dlms_cosem_rs::axdr::ClockStatus(0),
    }
}

/// Seconds since the epoch of a COSEM date-time, applying `default_offset_min` when the
/// value carries no deviation (which many head-ends send in range selections).
#[must_use]
pub fn cosem_to_unix(dt: &DateTime, default_offset_min: i16) -> Option<i64> {
    let mut dt = *dt;
    if dt.deviation == dlms_cosem_rs::axdr::DEVIATION_NOT_SPECIFIED {
        dt.deviation = -default_offset_min;
    }
    dt.to_unix_seconds()
}

/// Unix seconds of a local civil time.
#[must_use]
pub fn unix_from_local(year: i32, month: u8, day: u8, h: u8, m: u8, s: u8, offset_min: i16) -> i64 {
    days_from_civil(year, month, day) * 86_400 + i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s)
        - i64::from(offset_min) * 60
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips_through_day_counts() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn known_dates() {
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let c = civil(1_709_210_096, 0);
        assert_eq!((c.year, c.month, c.day, c.hour, c.minute, c.second), (2024, 2, 29, 12, 34, 56));
        assert_eq!(c.weekday, 4);
        let dt = cosem_datetime(1_709_210_096_000, 480);
        assert_eq!((dt.hour, dt.deviation), (20, -480));
        assert_eq!(dt.to_unix_seconds(), Some(1_709_210_096));
        assert_eq!(unix_from_local(2024, 2, 29, 20, 34, 56, 480), 1_709_210_096);
    }

    #[test]
    fn unspecified_deviation_uses_the_default() {
        let mut dt = cosem_datetime(1_709_210_096_000, 60);
        dt.deviation = dlms_cosem_rs::axdr::DEVIATION_NOT_SPECIFIED;
        assert_eq!(cosem_to_unix(&dt, 60), Some(1_709_210_096));
    }
}
