//! `[collection]`: schedules, catch-up, concurrency, clock checks. Every field has a
//! default, so a site file without the section collects every 15 minutes.

use serde::Deserialize;

use crate::dlms::cosem::parse_obis;

/// The load profile read from DLMS meters unless a meter names another.
pub const DEFAULT_PROFILE: &str = "1.0.99.1.0.255";
/// The simulator (and many meters) refuse more than 576 rows in one answer.
pub const MAX_ROWS_PER_REQUEST: u32 = 576;

/// `[collection]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectionConfig {
    /// Collect at all (default true).
    pub enabled: bool,
    /// The interval: a cycle starts at every multiple of it (default 900 s).
    pub interval_s: u32,
    /// Each meter's slot is `settle_s + hash(meter id) % spread_s` after the boundary, so
    /// that a fleet does not hit its links in the same second (default 300 s).
    pub spread_s: u32,
    /// Wait this long after a boundary before the first read, so the meter has closed
    /// the interval (default 10 s).
    pub settle_s: u32,
    /// Missed intervals are back-filled up to this far back (default 7 days).
    pub horizon_s: u64,
    /// A catch-up proceeds in jobs of at most this many intervals, so one meter's
    /// back-fill does not hold its link while the others wait (default 96: one day).
    pub rows_per_job: u32,
    /// Intervals asked for in one GET (default 24: the answer fits one 1024-byte APDU,
    /// so a control command waits for at most one exchange). At most 576.
    pub rows_per_request: u32,
    /// Collection jobs (associations) running at once over the whole fleet (default 64).
    /// Control commands never wait for this.
    pub max_associations: u32,
    /// The load profile's OBIS code (default 1.0.99.1.0.255); a meter's `profile` wins.
    pub profile: String,
    /// Read the meter's clock every this many cycles (default 1; 0: never).
    pub clock_check_every: u32,
    /// Set the meter's clock when it is off by more than this (default: never set).
    pub clock_set_threshold_s: Option<u32>,
    /// A Modbus snapshot read more than this after its boundary is flagged `late`
    /// (default 60 s).
    pub snapshot_late_s: u32,
    /// Rows stamped further than this ahead of the head-end's clock are dropped (default 300 s).
    pub future_tolerance_s: u32,
}

impl Default for CollectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_s: 900,
            spread_s: 300,
            settle_s: 10,
            horizon_s: 7 * 86_400,
            rows_per_job: 96,
            rows_per_request: 24,
            max_associations: 64,
            profile: DEFAULT_PROFILE.to_owned(),
            clock_check_every: 1,
            clock_set_threshold_s: None,
            snapshot_late_s: 60,
            future_tolerance_s: 300,
        }
    }
}

impl CollectionConfig {
    /// What cannot work, each with what to write instead.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.interval_s == 0 || 86_400 % self.interval_s != 0 {
            out.push("[collection] interval_s must divide a day (e.g. 300, 900, 3600)".into());
        }
        if u64::from(self.settle_s) + u64::from(self.spread_s) > u64::from(self.interval_s) {
            out.push("[collection] settle_s + spread_s must not exceed interval_s".into());
        }
        if self.horizon_s < u64::from(self.interval_s) {
            out.push("[collection] horizon_s must be at least one interval".into());
        }
        if self.rows_per_request == 0 || self.rows_per_request > MAX_ROWS_PER_REQUEST {
            out.push(format!("[collection] rows_per_request must be 1..={MAX_ROWS_PER_REQUEST} (default 24)"));
        }
        if self.rows_per_job < self.rows_per_request {
            out.push("[collection] rows_per_job must be at least rows_per_request".into());
        }
        if self.max_associations == 0 {
            out.push("[collection] max_associations must be at least 1 (default 64)".into());
        }
        if parse_obis(&self.profile).is_none() {
            out.push(format!("[collection] profile {:?} is not an OBIS code like 1.0.99.1.0.255", self.profile));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_usable_and_bad_values_are_named() {
        assert!(CollectionConfig::default().problems().is_empty());
        let bad = CollectionConfig {
            interval_s: 7,
            rows_per_request: 600,
            max_associations: 0,
            profile: "x".into(),
            ..CollectionConfig::default()
        };
        let p = bad.problems().join("\n");
        for what in ["divide a day", "rows_per_request", "max_associations", "OBIS", "spread_s"] {
            assert!(p.contains(what), "{what}: {p}");
        }
    }
}
