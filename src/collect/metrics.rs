//! Collection counters: plain atomics, read through [`Metrics::snapshot`], and exported
//! to Prometheus at scrape time by `crate::observe` (names in docs/metrics.md). Each
//! event that moves a counter also writes a log line where it happens.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::clean::BadData;
use super::collector::Planned;
use crate::meter::{MeterError, MeterId};

/// Why a collection job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    /// The link could not be opened.
    Unreachable,
    /// No answer in time.
    Timeout,
    /// The link broke.
    LinkClosed,
    /// The meter said no (range access, authentication, an object it lacks).
    Refused,
    /// An answer that did not follow the protocol.
    Protocol,
    /// The outbox could not store the rows.
    Storage,
}

impl FailureKind {
    const ALL: [Self; 6] =
        [Self::Unreachable, Self::Timeout, Self::LinkClosed, Self::Refused, Self::Protocol, Self::Storage];

    /// The name in logs and the snapshot.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::LinkClosed => "link_closed",
            Self::Refused => "refused",
            Self::Protocol => "protocol",
            Self::Storage => "storage",
        }
    }

    /// The kind of a meter error.
    pub fn of(e: &MeterError) -> Self {
        match e {
            MeterError::Unreachable(_) => Self::Unreachable,
            MeterError::Timeout(_) => Self::Timeout,
            MeterError::LinkClosed(_) => Self::LinkClosed,
            MeterError::Protocol(_) => Self::Protocol,
            MeterError::Storage(_) => Self::Storage,
            MeterError::Refused(_)
            | MeterError::AssociationRefused(_)
            | MeterError::Unsupported(_)
            | MeterError::IdentityMismatch { .. }
            | MeterError::VerifyMismatch { .. } => Self::Refused,
        }
    }
}

/// The counters, shared by the collector, the outbox and whoever reads them.
#[derive(Debug)]
pub struct Metrics {
    /// Rows stored in the outbox.
    pub rows_collected: AtomicU64,
    /// Batches stored.
    pub batches_stored: AtomicU64,
    /// Batches the broker acknowledged (and removed from the outbox).
    pub batches_acked: AtomicU64,
    /// Batches published again after a broker or daemon restart.
    pub batches_republished: AtomicU64,
    /// Batches in the outbox.
    pub outbox_depth: AtomicI64,
    /// Jobs that read everything they were asked.
    pub jobs_ok: AtomicU64,
    /// Clock checks, and clocks set.
    pub clocks_checked: AtomicU64,
    /// Clocks set because the drift was over the threshold.
    pub clocks_set: AtomicU64,
    failures: [AtomicU64; 6],
    bad: Mutex<BadData>,
    meters: Arc<[Planned]>,
    last_s: Vec<AtomicI64>,
}

/// A moment's view of the counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Rows stored.
    pub rows_collected: u64,
    /// Batches stored.
    pub batches_stored: u64,
    /// Batches acknowledged.
    pub batches_acked: u64,
    /// Batches published again.
    pub batches_republished: u64,
    /// Batches waiting for the broker.
    pub outbox_depth: i64,
    /// Jobs complete.
    pub jobs_ok: u64,
    /// Clock checks.
    pub clocks_checked: u64,
    /// Clocks set.
    pub clocks_set: u64,
    /// Failed jobs by kind.
    pub failures: BTreeMap<&'static str, u64>,
    /// Rows dropped or flagged, by why.
    pub bad: BadData,
    /// Per meter: seconds from its newest stored row to now (None: nothing stored yet).
    pub lag_s: Vec<(MeterId, Option<i64>)>,
    /// Per channel (link): the largest lag of its meters, and how many have nothing yet.
    pub channel_lag_s: BTreeMap<String, (i64, usize)>,
}

const NONE: i64 = i64::MIN;

impl Metrics {
    /// Counters for these meters, in the collector's order.
    pub fn new(meters: Arc<[Planned]>) -> Self {
        let last_s = meters.iter().map(|_| AtomicI64::new(NONE)).collect();
        Self {
            rows_collected: AtomicU64::new(0),
            batches_stored: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            batches_republished: AtomicU64::new(0),
            outbox_depth: AtomicI64::new(0),
            jobs_ok: AtomicU64::new(0),
            clocks_checked: AtomicU64::new(0),
            clocks_set: AtomicU64::new(0),
            failures: Default::default(),
            bad: Mutex::new(BadData::default()),
            meters,
            last_s,
        }
    }

    /// Count a failed job.
    pub fn failed(&self, kind: FailureKind) {
        if let Some(c) = FailureKind::ALL.iter().position(|k| *k == kind).and_then(|i| self.failures.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count bad data.
    pub fn bad_data(&self, b: &BadData) {
        if let Ok(mut total) = self.bad.lock() {
            total.add(b);
        }
    }

    /// A meter's newest stored row moved.
    pub fn stored_up_to(&self, meter: u32, last_s: i64) {
        if let Some(a) = self.last_s.get(meter as usize) {
            a.fetch_max(last_s, Ordering::Relaxed);
        }
    }

    /// Failed jobs, all kinds.
    pub fn failures_total(&self) -> u64 {
        self.failures.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The largest lag (s) and how many meters have nothing stored yet, without a copy.
    pub fn lag_summary(&self, now_s: i64) -> (Option<i64>, usize) {
        let mut max = None;
        let mut never = 0;
        for last in &self.last_s {
            match last.load(Ordering::Relaxed) {
                NONE => never += 1,
                l => max = Some(max.map_or(now_s - l, |m: i64| m.max(now_s - l))),
            }
        }
        (max, never)
    }

    /// Failed jobs by kind.
    pub fn failures_by_kind(&self) -> impl Iterator<Item = (FailureKind, u64)> + '_ {
        FailureKind::ALL.iter().zip(&self.failures).map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
    }

    /// Rows dropped or flagged so far.
    pub fn bad_data_total(&self) -> BadData {
        self.bad.lock().map(|b| *b).unwrap_or_default()
    }

    /// Per channel (link), without a copy per meter: the largest lag (s) of its meters
    /// that have a stored row, and how many have none yet.
    pub fn channel_lags(&self, now_s: i64) -> Vec<(String, Option<i64>, usize)> {
        let mut by: BTreeMap<&str, (Option<i64>, usize)> = BTreeMap::new();
        for (m, last) in self.meters.iter().zip(&self.last_s) {
            let e = by.entry(&m.link).or_insert((None, 0));
            match last.load(Ordering::Relaxed) {
                NONE => e.1 += 1,
                l => e.0 = Some(e.0.map_or(now_s - l, |x| x.max(now_s - l))),
            }
        }
        by.into_iter().map(|(k, (lag, never))| (k.to_owned(), lag, never)).collect()
    }

    /// The counters now; lags are measured against `now_s`.
    pub fn snapshot(&self, now_s: i64) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut lag_s = Vec::with_capacity(self.meters.len());
        let mut channel_lag_s: BTreeMap<String, (i64, usize)> = BTreeMap::new();
        for (m, last) in self.meters.iter().zip(&self.last_s) {
            let last = last.load(Ordering::Relaxed);
            let lag = (last != NONE).then(|| now_s - last);
            let entry = channel_lag_s.entry(m.link.to_string()).or_insert((0, 0));
            match lag {
                Some(l) => entry.0 = entry.0.max(l),
                None => entry.1 += 1,
            }
            lag_s.push((m.id.clone(), lag));
        }
        Snapshot {
            rows_collected: get(&self.rows_collected),
            batches_stored: get(&self.batches_stored),
            batches_acked: get(&self.batches_acked),
            batches_republished: get(&self.batches_republished),
            outbox_depth: self.outbox_depth.load(Ordering::Relaxed),
            jobs_ok: get(&self.jobs_ok),
            clocks_checked: get(&self.clocks_checked),
            clocks_set: get(&self.clocks_set),
            failures: FailureKind::ALL.iter().zip(&self.failures).map(|(k, c)| (k.as_str(), get(c))).collect(),
            bad: self.bad.lock().map(|b| *b).unwrap_or_default(),
            lag_s,
            channel_lag_s,
        }
    }
}
