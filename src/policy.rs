//! Policy gates on disconnections, from configuration with safe defaults, in virtual time.
//!
//! Arrears cuts pass four gates (protected account, stale arrears, notice, service
//! window); every disconnect passes the rate limits (global and per channel) and the
//! quarantine. Reconnects and reads pass none: the engine in [`crate::command`] never
//! asks. Everything here is pure: time comes in as `now_ms` (Unix milliseconds), so
//! tests run a week of policy in microseconds. The account registry lives here too,
//! because protection flags are what the gates read.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::SiteConfig;
use crate::contract::{AccountId, ErrorCode};
use crate::meter::MeterId;
use crate::time::{civil_from_days, days_from_civil};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// How far ahead the next window opening is searched (a year and a bit).
const WINDOW_SEARCH_DAYS: i64 = 400;

/// Why an account must never be cut for arrears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// Medical needs at home.
    Medical,
    /// Life-support equipment.
    LifeSupport,
    /// Hospitals and similar institutions.
    Hospital,
    /// "Guaranteed power" (保电): an official order to keep supply on.
    GuaranteedPower,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Weekday {
    /// The weekday of a day count since 1970-01-01 (a Thursday).
    pub fn of_day(days: i64) -> Self {
        const ALL: [Weekday; 7] =
            [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];
        ALL[(days + 3).rem_euclid(7) as usize]
    }
}

/// A local time of day, written `"09:00"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay(u16);

impl TimeOfDay {
    /// From hours and minutes (None when out of range; 24:00 is allowed as end of day).
    pub fn new(h: u16, m: u16) -> Option<Self> {
        (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(Self(h * 60 + m))
    }
    /// Milliseconds after local midnight.
    pub fn ms(self) -> i64 {
        i64::from(self.0) * 60_000
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let parsed = s.split_once(':').and_then(|(h, m)| {
            let ok = |t: &str| t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit());
            (ok(h) && ok(m)).then(|| TimeOfDay::new(h.parse().ok()?, m.parse().ok()?)).flatten()
        });
        parsed.ok_or_else(|| serde::de::Error::custom(format!("invalid time of day {s:?}: write \"HH:MM\"")))
    }
}

/// A civil date, written `"2026-10-01"`, held as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CivilDate(pub i64);

impl CivilDate {
    /// Parse `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
            return None;
        }
        let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let days = days_from_civil(y, m, d);
        // Round-trip to refuse 2026-02-30 and friends.
        (civil_from_days(days) == (y, m, d)).then_some(Self(days))
    }
}

impl<'de> Deserialize<'de> for CivilDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CivilDate::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid date {s:?}: write \"YYYY-MM-DD\"")))
    }
}

/// `[policy.window]`: when arrears cuts may run, in the meters' local time.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Days on which arrears cuts run. Default Monday to Thursday: no Friday cuts, so
    /// that nobody is cut just before a weekend when pay offices are closed.
    pub days: Vec<Weekday>,
    /// Local opening time (default 09:00).
    pub start: TimeOfDay,
    /// Local closing time, exclusive (default 16:00, leaving time to pay the same day).
    pub end: TimeOfDay,
    /// Public holidays: no arrears cuts on them.
    pub holidays: Vec<CivilDate>,
    /// No arrears cuts on the day before a holiday either (default true).
    pub no_cut_before_holiday: bool,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            days: vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu],
            start: TimeOfDay(9 * 60),
            end: TimeOfDay(16 * 60),
            holidays: Vec::new(),
            no_cut_before_holiday: true,
        }
    }
}

/// `[policy.rate]`: limits on disconnections of any reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    /// Sustained disconnects per hour, whole site (default 600).
    pub global_per_hour: u32,
    /// Disconnects that may run back to back, whole site (default 60).
    pub global_burst: u32,
    /// Sustained disconnects per hour on one channel (default 60).
    pub channel_per_hour: u32,
    /// Back-to-back disconnects on one channel (default 10).
    pub channel_burst: u32,
    /// More disconnect requests than this within `quarantine_window_s` trips the
    /// quarantine (default 300 in 600 s: several times a normal morning's arrears run
    /// on a 10 000-meter site, and far below a fleet-wide attack).
    pub quarantine_threshold: u32,
    /// The sliding window for `quarantine_threshold`, seconds.
    pub quarantine_window_s: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            global_per_hour: 600,
            global_burst: 60,
            channel_per_hour: 60,
            channel_burst: 10,
            quarantine_threshold: 300,
            quarantine_window_s: 600,
        }
    }
}

/// `[policy]`: the gates' configuration. Every field has a safe default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The meters' offset from UTC in minutes, for meters without their own
    /// `timezone_offset_minutes` (default 0; a site in China sets 480).
    pub utc_offset_minutes: i16,
    /// A notice must have been sent at least this many hours before an arrears cut
    /// (default 72: China's rules ask for 3 to 7 days).
    pub notice_hours: u32,
    /// The service window.
    pub window: WindowConfig,
    /// Rate limits and quarantine.
    pub rate: RateConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { utc_offset_minutes: 0, notice_hours: 72, window: WindowConfig::default(), rate: RateConfig::default() }
    }
}

impl PolicyConfig {
    /// What cannot work, with what to write instead.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let w = &self.window;
        if w.days.is_empty() {
            out.push("[policy.window] days is empty, so arrears cuts could never run: list days, e.g. [\"mon\", \"tue\", \"wed\", \"thu\"]".into());
        }
        if w.start >= w.end {
            out.push("[policy.window] start must be before end, e.g. start = \"09:00\", end = \"16:00\"".into());
        }
        if self.utc_offset_minutes.abs() > 18 * 60 {
            out.push("[policy] utc_offset_minutes must be within ±1080".into());
        }
        let r = &self.rate;
        if r.global_per_hour == 0 || r.channel_per_hour == 0 || r.global_burst == 0 || r.channel_burst == 0 {
            out.push("[policy.rate] per_hour and burst values must be at least 1".into());
        }
        if r.quarantine_threshold == 0 || r.quarantine_window_s == 0 {
            out.push("[policy.rate] quarantine_threshold and quarantine_window_s must be at least 1".into());
        }
        out
    }
}

/// One meter as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEntry {
    /// Its billing account.
    pub account: Option<AccountId>,
    /// The channel (link name) it is reached over: the per-channel rate limit's key.
    pub channel: String,
    /// Its local offset from UTC, minutes east.
    pub utc_offset_min: i16,
}

/// One account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountEntry {
    /// Set when the account must never be cut for arrears.
    pub protection: Option<Protection>,
    /// Its meters.
    pub meters: Vec<MeterId>,
}

/// The account registry: meters, accounts, protection flags. Built from configuration
/// and swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    meters: HashMap<MeterId, MeterEntry>,
    accounts: HashMap<AccountId, AccountEntry>,
}

impl Registry {
    /// The registry a (checked) configuration describes. Account ids that break the id
    /// rule were refused by [`SiteConfig::problems`]; here they are skipped.
    pub fn from_config(site: &SiteConfig) -> Self {
        let mut r = Self::default();
        for a in &site.accounts {
            r.accounts.entry(a.id.clone()).or_default().protection = a.protection;
        }
        for m in &site.meters {
            let account = m.account.as_deref().and_then(|a| AccountId::new(a).ok());
            let offset = m.timezone_offset_minutes.unwrap_or(site.policy.utc_offset_minutes);
            r.add_meter(m.id.clone(), account, &m.link, offset);
        }
        r
    }

    /// Add a meter (also how tests build one).
    pub fn add_meter(&mut self, meter: MeterId, account: Option<AccountId>, channel: &str, utc_offset_min: i16) {
        if let Some(a) = &account {
            self.accounts.entry(a.clone()).or_default().meters.push(meter.clone());
        }
        self.meters.insert(meter, MeterEntry { account, channel: channel.to_owned(), utc_offset_min });
    }

    /// Flag an account as protected.
    pub fn protect(&mut self, account: AccountId, protection: Protection) {
        self.accounts.entry(account).or_default().protection = Some(protection);
    }

    /// A meter, if registered.
    pub fn meter(&self, id: &MeterId) -> Option<&MeterEntry> {
        self.meters.get(id)
    }

    /// The meters of an account (empty if unknown).
    pub fn meters_of(&self, account: &AccountId) -> &[MeterId] {
        self.accounts.get(account).map_or(&[], |a| a.meters.as_slice())
    }

    /// The protection of an account, if any.
    pub fn protection(&self, account: &AccountId) -> Option<Protection> {
        self.accounts.get(account).and_then(|a| a.protection)
    }

    /// How many meters.
    pub fn len(&self) -> usize {
        self.meters.len()
    }

    /// True when no meter is registered.
    pub fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }
}

/// What a gate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead.
    Allow,
    /// Not now; try again at `not_before_ms`.
    Defer {
        /// Unix milliseconds.
        not_before_ms: i64,
    },
    /// Never: the command ends rejected.
    Reject {
        /// A `policy_*` code (or `internal` for an unusable window).
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

/// The facts the arrears gates weigh for one arrears cut.
#[derive(Debug, Clone, Default)]
pub struct ArrearsCase {
    /// The account's protection, if any.
    pub protection: Option<Protection>,
    /// When the arrears list was computed (the command's `arrears_as_of`, else its
    /// `requested_at`, else its arrival).
    pub arrears_as_of_ms: i64,
    /// The `confirmed_at` of the account's latest cleared payment.
    pub latest_cleared_ms: Option<i64>,
    /// When the notice was sent, if it was.
    pub notice_sent_ms: Option<i64>,
    /// A named person lifted the window for this command.
    pub overridden: bool,
    /// The meter's local offset.
    pub utc_offset_min: i16,
}

/// Is local time `now_ms` (at `offset`) inside the service window?
pub fn in_window(w: &WindowConfig, now_ms: i64, offset_min: i16) -> bool {
    let local = now_ms + i64::from(offset_min) * 60_000;
    let day = local.div_euclid(DAY_MS);
    let tod = local.rem_euclid(DAY_MS);
    day_allowed(w, day) && w.start.ms() <= tod && tod < w.end.ms()
}

fn day_allowed(w: &WindowConfig, day: i64) -> bool {
    let holiday = |d: i64| w.holidays.contains(&CivilDate(d));
    w.days.contains(&Weekday::of_day(day)) && !holiday(day) && !(w.no_cut_before_holiday && holiday(day + 1))
}

/// The earliest instant at or after `now_ms` inside the window, or None when there is
/// none within a year (a configuration `problems()` refuses).
pub fn next_window_opening(w: &WindowConfig, now_ms: i64, offset_min: i16) -> Option<i64> {
    let off = i64::from(offset_min) * 60_000;
    let local = now_ms + off;
    let today = local.div_euclid(DAY_MS);
    (today..=today + WINDOW_SEARCH_DAYS).filter(|d| day_allowed(w, *d)).find_map(|d| {
        let open = d * DAY_MS + w.start.ms();
        let close = d * DAY_MS + w.end.ms();
        (local < close).then(|| open.max(local) - off)
    })
}

/// Generic cell rate algorithm: a token bucket kept as one "theoretical arrival time",
/// integer milliseconds only, so virtual time is exact.
#[derive(Debug, Clone, Copy, Default)]
struct Gcra {
    tat_ms: i64,
}

impl Gcra {
    fn interval(per_hour: u32) -> i64 {
        HOUR_MS / i64::from(per_hour.max(1))
    }
    /// The earliest instant >= now at which one more may go.
    fn allowed_at(self, now: i64, per_hour: u32, burst: u32) -> i64 {
        let tolerance = Self::interval(per_hour) * i64::from(burst.max(1) - 1);
        now.max(self.tat_ms - tolerance)
    }
    /// Book a slot at `at` (>= allowed_at).
    fn book(&mut self, at: i64, per_hour: u32) {
        self.tat_ms = self.tat_ms.max(at) + Self::interval(per_hour);
    }
}

/// A tripped quarantine: no disconnect runs until an operator lifts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineState {
    /// When it tripped.
    pub since_ms: i64,
    /// Disconnect requests in the window when it tripped.
    pub requests: u32,
}

/// A quarantine event, for the journal and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum QuarantineEvent {
    /// A burst tripped it.
    Tripped {
        /// When.
        at_ms: i64,
        /// Requests in the window.
        requests: u32,
    },
    /// An operator lifted it.
    Lifted {
        /// When.
        at_ms: i64,
        /// Who.
        by: String,
        /// Why.
        why: String,
    },
}

/// What counting one more disconnect request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Within limits.
    Counted,
    /// This request tripped the quarantine.
    Tripped(QuarantineEvent),
    /// The quarantine was already on.
    Quarantined,
}

/// The policy: configuration plus the state of rate limits and quarantine.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    cfg: PolicyConfig,
    global: Gcra,
    channels: HashMap<String, Gcra>,
    recent: VecDeque<i64>,
    quarantine: Option<QuarantineState>,
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Medical => "medical",
            Self::LifeSupport => "life_support",
            Self::Hospital => "hospital",
            Self::GuaranteedPower => "guaranteed_power",
        })
    }
}

impl Policy {
    /// A policy with fresh rate state and no quarantine.
    pub fn new(cfg: PolicyConfig) -> Self {
        Self { cfg, ..Self::default() }
    }

    /// Swap the configuration (reload), keeping rate state and quarantine.
    pub fn set_config(&mut self, cfg: PolicyConfig) {
        self.cfg = cfg;
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The arrears gates, in order: protected, stale arrears, notice, service window.
    /// Only for `reason: arrears`; pure.
    pub fn check_arrears(&self, c: &ArrearsCase, now_ms: i64) -> Gate {
        if let Some(p) = c.protection {
            return reject(ErrorCode::PolicyProtected, format!("the account is protected ({p}): no arrears cuts"));
        }
        if c.latest_cleared_ms.is_some_and(|paid| paid > c.arrears_as_of_ms) {
            return reject(
                ErrorCode::PolicyStaleArrears,
                "a cleared payment was confirmed after the arrears were computed".into(),
            );
        }
        let notice_ms = i64::from(self.cfg.notice_hours) * HOUR_MS;
        match c.notice_sent_ms {
            None => return reject(ErrorCode::PolicyNoNotice, "no notice was recorded (notice_sent_at)".into()),
            Some(sent) if sent.saturating_add(notice_ms) > now_ms => {
                return reject(
                    ErrorCode::PolicyNoNotice,
                    format!("the notice must precede an arrears cut by at least {} hours", self.cfg.notice_hours),
                )
            }
            Some(_) => {}
        }
        if c.overridden || in_window(&self.cfg.window, now_ms, c.utc_offset_min) {
            return Gate::Allow;
        }
        match next_window_opening(&self.cfg.window, now_ms, c.utc_offset_min) {
            Some(not_before_ms) => Gate::Defer { not_before_ms },
            None => reject(ErrorCode::Internal, "the service window never opens: check [policy.window]".into()),
        }
    }

    /// Count one new disconnect request toward the quarantine threshold.
    pub fn note_disconnect_request(&mut self, now_ms: i64) -> Arrival {
        if self.quarantine.is_some() {
            return Arrival::Quarantined;
        }
        let window = i64::from(self.cfg.rate.quarantine_window_s) * 1000;
        while self.recent.front().is_some_and(|t| *t <= now_ms - window) {
            self.recent.pop_front();
        }
        self.recent.push_back(now_ms);
        let requests = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if requests > self.cfg.rate.quarantine_threshold {
            self.quarantine = Some(QuarantineState { since_ms: now_ms, requests });
            self.recent.clear();
            return Arrival::Tripped(QuarantineEvent::Tripped { at_ms: now_ms, requests });
        }
        Arrival::Counted
    }

    /// Book a rate-limit slot for one disconnect on `channel`: the returned instant is
    /// `now_ms` when it may run at once, later when it must wait (deferred). Booking a
    /// future slot, rather than refusing, gives each waiting command its own honest
    /// `not_before` instead of a herd that retries together.
    pub fn book_disconnect(&mut self, channel: &str, now_ms: i64) -> i64 {
        let r = &self.cfg.rate;
        let ch = self.channels.entry(channel.to_owned()).or_default();
        let at = self.global.allowed_at(now_ms, r.global_per_hour, r.global_burst).max(ch.allowed_at(
            now_ms,
            r.channel_per_hour,
            r.channel_burst,
        ));
        self.global.book(at, r.global_per_hour);
        ch.book(at, r.channel_per_hour);
        at
    }

    /// The quarantine, when tripped.
    pub fn quarantine(&self) -> Option<&QuarantineState> {
        self.quarantine.as_ref()
    }

    /// Put back a quarantine found in the journal at start-up.
    pub fn restore_quarantine(&mut self, q: Option<QuarantineState>) {
        self.quarantine = q;
    }

    /// Lift the quarantine (an operator's act, audited): None when none was on.
    pub fn lift_quarantine(&mut self, by: &str, why: &str, now_ms: i64) -> Option<QuarantineEvent> {
        self.quarantine.take()?;
        // A clean slate: the burst that tripped it must not trip it again at once.
        self.recent.clear();
        Some(QuarantineEvent::Lifted { at_ms: now_ms, by: by.to_owned(), why: why.to_owned() })
    }
}

fn reject(code: ErrorCode, message: String) -> Gate {
    Gate::Reject { code, message }
}
