//! Wall-clock time as a value: RFC 3339 in and out, and the injected clock that policy,
//! scheduling and protocol code read instead of the system clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Where "now" comes from. Production uses [`SystemClock`]; tests use a clock they move.
pub trait Clock: Send + Sync {
    /// Seconds and milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// A time that could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid timestamp {0:?}: expected RFC 3339 with an offset, e.g. 2026-11-28T09:15:00+08:00")]
pub struct BadTimestamp(pub String);

/// Parse RFC 3339 with a mandatory offset (`Z` or `±hh:mm`) into Unix milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, BadTimestamp> {
    let bad = || BadTimestamp(text.chars().take(64).collect());
    let b = text.as_bytes();
    if b.len() < 20 || !text.is_ascii() {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, BadTimestamp> {
        let s = text.get(r).ok_or_else(bad)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let sep_ok = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && matches!(b.get(10), Some(b'T' | b't' | b' '))
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':');
    if !sep_ok {
        return Err(bad());
    }
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return Err(bad());
        }
        let frac = text.get(start..end.min(start + 3)).ok_or_else(bad)?;
        ms = frac.parse::<i64>().map_err(|_| bad())? * 10i64.pow(3 - frac.len() as u32);
        i = end;
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b.get(i + 3) == Some(&b':') => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'-' {
                -m
            } else {
                m
            }
        }
        _ => return Err(bad()),
    };
    let dim = days_in_month(y, mo);
    if !(1..=12).contains(&mo) || d < 1 || d > dim || h > 23 || mi > 59 || s > 60 || offset_min.abs() > 18 * 60 {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + s.min(59) - offset_min * 60;
    Ok(secs * 1000 + ms)
}

/// Parse RFC 3339 into Unix seconds.
pub fn parse_rfc3339(text: &str) -> Result<i64, BadTimestamp> {
    parse_rfc3339_ms(text).map(|ms| ms.div_euclid(1000))
}

/// Format Unix seconds at an offset (minutes east): `2026-11-28T09:15:00+08:00`.
pub fn format_rfc3339(unix: i64, offset_min: i16) -> String {
    format_rfc3339_ms(unix * 1000, offset_min, false)
}

/// Format Unix milliseconds, optionally with the milliseconds shown.
pub fn format_rfc3339_ms(unix_ms: i64, offset_min: i16, show_ms: bool) -> String {
    let local_ms = unix_ms + i64::from(offset_min) * 60_000;
    let secs = local_ms.div_euclid(1000);
    let ms = local_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let off = if offset_min == 0 {
        "Z".to_owned()
    } else {
        let sign = if offset_min < 0 { '-' } else { '+' };
        let a = offset_min.unsigned_abs();
        format!("{sign}{:02}:{:02}", a / 60, a % 60)
    };
    let frac = if show_ms { format!(".{ms:03}") } else { String::new() };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}{off}", tod / 3600, (tod % 3600) / 60, tod % 60)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contracts_examples() {
        assert_eq!(parse_rfc3339("2026-11-28T09:00:00+08:00").ok(), Some(1_795_827_600));
        assert_eq!(parse_rfc3339("2026-11-28T01:00:00Z").ok(), Some(1_795_827_600));
        assert_eq!(parse_rfc3339_ms("2026-11-28T09:00:01.214+08:00").ok(), Some(1_795_827_601_214));
    }

    #[test]
    fn refuses_what_is_not_a_point_in_time() {
        for bad in [
            "",
            "2026-11-28",
            "2026-11-28T09:00:00",
            "2026-02-30T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T09:00:00+8:00",
            "2026-11-28T09:00:00.Z",
            "２０２６-11-28T09:00:00Z",
            "2026-11-28T09:00:00+08:00x",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for t in [0i64, 1_795_827_600, 951_782_400, -86_400] {
            for off in [0i16, 480, -300, 345] {
                assert_eq!(parse_rfc3339(&format_rfc3339(t, off)).ok(), Some(t));
            }
        }
        assert_eq!(format_rfc3339_ms(1_795_827_601_214, 480, true), "2026-11-28T09:00:01.214+08:00");
    }
}
