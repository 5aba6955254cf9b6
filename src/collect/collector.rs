//! The collector task: owns the schedule, hands due jobs to the channel actors, checks
//! what comes back, stores it in the outbox and wakes the publisher.
//!
//! A meter has at most one job at a time, from dispatch until its rows are stored (or the
//! store failed), so the start of its next read is always the newest stored row.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dlms_cosem_rs::obis::Obis;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::clean::{self, BadData, Clean, Context};
use super::job::{ClockCheck, CollectJob, Collected, JobDone};
use super::metrics::{FailureKind, Metrics};
use super::schedule::{Finished, JobWhat, Scheduler, SourceKind, Timing};
use super::CollectionConfig;
use crate::channel::ChannelHandle;
use crate::contract::{ReadingRow, ReadingsBatch};
use crate::journal::{Journal, JournalError, NewBatch, Progress, Stored};
use crate::meter::MeterId;
use crate::time::{civil_from_days, Clock};

/// The source name of Modbus snapshots (a profile's is its OBIS code).
pub const SNAPSHOT_SOURCE: &str = "snapshot";

/// A meter as the collector knows it.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The meter.
    pub id: MeterId,
    /// Its link (channel).
    pub link: Arc<str>,
    /// Profile or snapshots.
    pub kind: SourceKind,
    /// The profile, for profile meters.
    pub profile: Obis,
    /// Offset of its published times, minutes east.
    pub offset_min: i16,
}

impl Planned {
    fn source(&self) -> String {
        match self.kind {
            SourceKind::Profile => crate::dlms::cosem::obis_text(self.profile),
            SourceKind::Snapshot => SNAPSHOT_SOURCE.to_owned(),
        }
    }
}

/// What the collector tells the daemon about a meter (for `state/{meter}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectNote {
    /// The meter.
    pub meter: MeterId,
    /// When it last answered, if during this job (Unix ms).
    pub seen_ms: Option<i64>,
    /// The newest stored reading, Unix s.
    pub last_reading_s: Option<i64>,
    /// Its clock's drift, when checked.
    pub drift_s: Option<i64>,
}

/// Asked of the collector.
#[derive(Debug, Clone)]
pub enum CollectCommand {
    /// Collect these meters (all when None) now, up to the latest boundary.
    Now(Option<Vec<MeterId>>),
}

/// Everything the collector runs on.
pub struct Setup {
    /// `[collection]`.
    pub config: CollectionConfig,
    /// The meters.
    pub meters: Arc<[Planned]>,
    /// The channels by link name.
    pub channels: HashMap<String, ChannelHandle>,
    /// The journal (outbox).
    pub journal: Journal,
    /// The head-end's clock.
    pub clock: Arc<dyn Clock>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Notified after every stored batch.
    pub outbox_wake: Arc<Notify>,
    /// Notes for `state/{meter}`.
    pub notes: mpsc::UnboundedSender<CollectNote>,
}

/// Finished jobs wait this long (or for this many more) before their rows go to the
/// journal together: one transaction, one fsync, for a burst of meters instead of one each.
const STORE_LINGER: Duration = Duration::from_millis(20);
const STORE_GROUP: usize = 512;

/// What a store is for.
struct StoreMeta {
    index: u32,
    complete: bool,
    clock: Option<ClockCheck>,
    seen_ms: Option<i64>,
    last_values: Vec<Option<f64>>,
}

struct StoreDone {
    meta: StoreMeta,
    result: Result<Stored, JournalError>,
}

struct Collector {
    cfg: CollectionConfig,
    meters: Arc<[Planned]>,
    channels: HashMap<String, ChannelHandle>,
    journal: Journal,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    notes: mpsc::UnboundedSender<CollectNote>,
    sched: Scheduler,
    last_values: Vec<Option<Vec<Option<f64>>>>,
    /// Meter indices sorted by id, to find a meter by id without a map of id copies.
    by_id: Vec<u32>,
    stores: JoinSet<Vec<StoreDone>>,
    /// Batches waiting for [`STORE_LINGER`], and since when.
    lingering: Vec<(StoreMeta, NewBatch)>,
    linger_since: Option<tokio::time::Instant>,
    running: usize,
    cycle_started_ms: Option<i64>,
    cycle_jobs: u64,
}

/// Run until `shutdown`. `done` receives the channel actors' finished jobs.
pub async fn run(
    setup: Setup,
    mut commands: mpsc::UnboundedReceiver<CollectCommand>,
    mut done: mpsc::UnboundedReceiver<JobDone>,
    shutdown: CancellationToken,
) {
    let Setup { config, meters, channels, journal, clock, metrics, outbox_wake, notes } = setup;
    let progress = match journal.readings_progress().await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "collection: cannot read where each meter stands; starting from the horizon");
            Vec::new()
        }
    };
    let mut stored: HashMap<(String, String), Progress> =
        progress.into_iter().map(|p| ((p.meter.clone(), p.source.clone()), p)).collect();
    let now = clock.now_ms();
    let mut sched = Scheduler::new(Timing::from_config(&config));
    let mut last_values = Vec::with_capacity(meters.len());

    for m in meters.iter() {
        let (last_s, values) =
            stored.remove(&(m.id.to_string(), m.source())).map_or((None, None), |p| (Some(p.last_s), p.last_values));
        let idx = sched.add(m.id.as_str(), m.kind, last_s, now);
        if let Some(l) = last_s {
            metrics.stored_up_to(idx, l);
        }
        last_values.push(values);
    }
    let mut by_id: Vec<u32> = (0..meters.len() as u32).collect();
    by_id.sort_by(|a, b| meters[*a as usize].id.cmp(&meters[*b as usize].id));
    tracing::info!(meters = meters.len(), interval_s = config.interval_s, "collection scheduled");
    let mut c = Collector {
        cfg: config,
        meters,
        channels,
        journal,
        clock,
        metrics,
        wake: outbox_wake,
        notes,
        sched,
        last_values,
        by_id,
        stores: JoinSet::new(),
        lingering: Vec::new(),
        linger_since: None,
        running: 0,
        cycle_started_ms: None,
        cycle_jobs: 0,
    };
    loop {
        c.dispatch();
        let wake_in = c.sched.next_wakeup().map(|at| (at - c.clock.now_ms()).max(0) as u64);
        let timer = async {
            match wake_in {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => std::future::pending().await,
            }
        };
        let linger = c.linger_since.map(|t| t + STORE_LINGER);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(cmd) = commands.recv() => c.command(cmd),
            Some(d) = done.recv() => c.on_done(d),
            Some(s) = c.stores.join_next(), if !c.stores.is_empty() => match s {
                Ok(all) => all.into_iter().for_each(|s| c.on_stored(s)),
                Err(e) => tracing::error!(error = %e, "collection: a store task failed"),
            },
            _ = async { if let Some(at) = linger { tokio::time::sleep_until(at).await } }, if linger.is_some() => {
                c.flush_stores();
            }
            _ = timer => {}
        }
        if c.lingering.len() >= STORE_GROUP {
            c.flush_stores();
        }
    }
    // What was read is stored before the task ends; queued stores complete on the
    // journal's thread, so their rows are durable.
    c.flush_stores();
    while c.stores.join_next().await.is_some() {}
}

impl Collector {
    fn command(&mut self, cmd: CollectCommand) {
        let now = self.clock.now_ms();
        let CollectCommand::Now(which) = cmd;
        match which {
            None => (0..self.meters.len() as u32).for_each(|i| self.sched.trigger(i, now)),
            Some(ids) => {
                for id in ids {
                    let found = self.by_id.binary_search_by(|i| self.meters[*i as usize].id.cmp(&id));
                    match found.ok().and_then(|k| self.by_id.get(k)) {
                        Some(i) => self.sched.trigger(*i, now),
                        None => tracing::warn!(meter = %id, "collect now: no such meter"),
                    }
                }
            }
        }
    }

    fn dispatch(&mut self) {
        let now = self.clock.now_ms();
        for job in self.sched.poll(now) {
            let Some(m) = self.meters.get(job.meter as usize) else { continue };
            if self.running == 0 && self.cycle_started_ms.is_none() {
                self.cycle_started_ms = Some(now);
                self.cycle_jobs = 0;
            }
            let cj = CollectJob {
                meter: m.id.clone(),
                index: job.meter,
                what: job.what,
                read_clock: job.read_clock,
                set_clock_over_s: self.cfg.clock_set_threshold_s,
                profile: m.profile,
                rows_per_request: self.cfg.rows_per_request,
                interval_s: self.cfg.interval_s,
            };
            let sent = self.channels.get(&*m.link).map(|c| c.collect(cj));
            if matches!(sent, Some(Ok(()))) {
                self.running += 1;
                self.cycle_jobs += 1;
            } else {
                tracing::error!(meter = %m.id, link = %m.link, "collection: no running channel for the meter");
                self.metrics.failed(FailureKind::Unreachable);
                self.sched.finish(job.meter, Finished::default(), now);
            }
        }
    }

    fn on_done(&mut self, d: JobDone) {
        let now = self.clock.now_ms();
        let idx = d.index;
        let Some(m) = self.meters.get(idx as usize).cloned() else { return };
        if let Some(c) = &d.clock {
            self.note_clock(&m, c);
        }
        let complete = d.error.is_none();
        if let Some(e) = &d.error {
            let kind = FailureKind::of(e);
            self.metrics.failed(kind);
            tracing::warn!(meter = %m.id, link = %m.link, kind = kind.as_str(), error = %e, "collection job failed");
        }
        let cx = Context {
            after_s: self.sched.last_s(idx),
            after_values: self.last_values.get(idx as usize).and_then(Option::as_deref),
            now_s: now.div_euclid(1000),
            future_tolerance_s: i64::from(self.cfg.future_tolerance_s),
            offset_min: m.offset_min,
        };
        let (clean, interval_s) = match (d.collected, d.what) {
            (Collected::Profile { profile, .. }, _) => {
                let period = profile.capture_period_s;
                (clean::clean_profile(&profile, &cx), if period > 0 { period } else { self.cfg.interval_s })
            }
            (Collected::Snapshot { registers, read_ms }, JobWhat::Snapshot { at_s }) => {
                let interval = i64::from(self.cfg.interval_s);
                let late = i64::from(self.cfg.snapshot_late_s);
                (
                    clean::clean_snapshot(&registers, at_s, read_ms.div_euclid(1000), late, interval, &cx),
                    self.cfg.interval_s,
                )
            }
            _ => (Clean::default(), self.cfg.interval_s),
        };
        if d.preempted_by > 0 {
            tracing::debug!(meter = %m.id, control = d.preempted_by, "collection yielded to control commands");
        }
        self.note_bad(&m, &clean.bad);
        let seen_ms = d.answered.then_some(now);
        if clean.rows.is_empty() {
            self.finish(idx, Finished { stored_last_s: None, complete }, now);
            let _ = self.notes.send(CollectNote {
                meter: m.id.clone(),
                seen_ms,
                last_reading_s: self.sched.last_s(idx),
                drift_s: d.clock.as_ref().and_then(|c| c.drift_s),
            });
            return;
        }
        let last_values = clean.rows.last().map(|r| r.1.clone()).unwrap_or_default();
        let batch = NewBatch {
            message: ReadingsBatch {
                meter: m.id.clone(),
                source: m.source(),
                interval_s,
                columns: clean.columns,
                rows: clean
                    .rows
                    .iter()
                    .map(|(at, v)| ReadingRow { at: row_time(*at, m.offset_min), values: v.clone() })
                    .collect(),
                batch: None,
                flags: clean.flags,
                gaps: clean.gaps,
            },
            times: clean.rows.iter().map(|r| r.0).collect(),
            last_values: last_values.clone(),
            created_ms: now,
        };
        let meta = StoreMeta { index: idx, complete, clock: d.clock, seen_ms, last_values };
        self.lingering.push((meta, batch));
        self.linger_since.get_or_insert_with(tokio::time::Instant::now);
    }

    /// Store what is lingering, in one journal job.
    fn flush_stores(&mut self) {
        self.linger_since = None;
        if self.lingering.is_empty() {
            return;
        }
        let (metas, batches): (Vec<StoreMeta>, Vec<NewBatch>) = std::mem::take(&mut self.lingering).into_iter().unzip();
        let pending = self.journal.store_readings_many(batches);
        self.stores.spawn(async move {
            match pending.await {
                Ok(results) => {
                    metas.into_iter().zip(results).map(|(meta, result)| StoreDone { meta, result }).collect()
                }
                Err(e) => metas.into_iter().map(|meta| StoreDone { meta, result: Err(e.clone()) }).collect(),
            }
        });
    }

    fn on_stored(&mut self, done: StoreDone) {
        let now = self.clock.now_ms();
        let StoreDone { meta: s, result } = done;
        let Some(m) = self.meters.get(s.index as usize).cloned() else { return };
        let stored_last_s = match result {
            Ok(st) => {
                if st.refused > 0 {
                    tracing::warn!(meter = %m.id, rows = st.refused, "collection: rows already stored were refused");
                    let dup = BadData { duplicate: st.refused as u64, ..BadData::default() };
                    self.metrics.bad_data(&dup);
                }
                if st.seq.is_some() {
                    self.metrics.rows_collected.fetch_add(st.rows as u64, Ordering::Relaxed);
                    self.metrics.batches_stored.fetch_add(1, Ordering::Relaxed);
                    self.metrics.outbox_depth.fetch_add(1, Ordering::Relaxed);
                    if let Some(slot) = self.last_values.get_mut(s.index as usize) {
                        *slot = Some(s.last_values);
                    }
                    self.wake.notify_one();
                }
                if let Some(l) = st.last_s {
                    self.metrics.stored_up_to(s.index, l);
                }
                st.last_s
            }
            Err(e) => {
                tracing::error!(meter = %m.id, error = %e, "collection: rows not stored; they are read again next time");
                self.metrics.failed(FailureKind::Storage);
                self.finish(s.index, Finished { stored_last_s: None, complete: false }, now);
                return;
            }
        };
        self.finish(s.index, Finished { stored_last_s, complete: s.complete }, now);
        let _ = self.notes.send(CollectNote {
            meter: m.id,
            seen_ms: s.seen_ms,
            last_reading_s: stored_last_s,
            drift_s: s.clock.and_then(|c| c.drift_s),
        });
    }

    fn finish(&mut self, idx: u32, f: Finished, now: i64) {
        if f.complete {
            self.metrics.jobs_ok.fetch_add(1, Ordering::Relaxed);
        }
        self.sched.finish(idx, f, now);
        self.running = self.running.saturating_sub(1);
        // A cycle is over when nothing runs and the next slot is a while away (between the
        // slots of one cycle of a fleet the pauses are short).
        let t = self.sched.timing();
        let quiet = ((t.interval_ms - t.spread_ms - t.settle_ms) / 2).min(60_000);
        let idle_until = self.sched.next_wakeup().map_or(i64::MAX, |w| w - now);
        if self.running == 0 && self.stores.is_empty() && self.lingering.is_empty() && idle_until >= quiet {
            self.cycle_done(now);
        }
    }

    /// Every job dispatched has ended: one line that says how the cycle went.
    fn cycle_done(&mut self, now: i64) {
        let Some(started) = self.cycle_started_ms.take() else { return };
        // A cycle's buffers (answers, batches) are freed now; keep the footprint honest.
        let heap = crate::daemon::release_freed_memory();
        let m = &self.metrics;
        let (max_lag, never) = m.lag_summary(now.div_euclid(1000));
        tracing::info!(
            jobs = self.cycle_jobs,
            took_ms = now - started,
            rows_total = m.rows_collected.load(Ordering::Relaxed),
            failures_total = m.failures_total(),
            outbox_depth = m.outbox_depth.load(Ordering::Relaxed),
            max_lag_s = max_lag,
            meters_without_readings = never,
            heap_in_use_kib = heap.map(|b| b / 1024),
            "collection cycle done"
        );
    }

    fn note_clock(&self, m: &Planned, c: &ClockCheck) {
        self.metrics.clocks_checked.fetch_add(1, Ordering::Relaxed);
        match (&c.set, c.drift_s) {
            (Some(Ok(())), drift) => {
                self.metrics.clocks_set.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(meter = %m.id, drift_s = drift, "meter clock set to the head-end's time");
            }
            (Some(Err(e)), drift) => {
                tracing::warn!(meter = %m.id, drift_s = drift, error = %e, "meter clock drifts; setting it failed");
            }
            (None, Some(d)) if self.cfg.clock_set_threshold_s.is_none() && d.unsigned_abs() > 60 => {
                tracing::info!(meter = %m.id, drift_s = d, "meter clock drifts (clock setting is off)");
            }
            _ => {}
        }
        if c.status.is_some_and(|s| s & 0x01 != 0) {
            tracing::warn!(meter = %m.id, "meter reports its clock invalid");
        }
    }

    fn note_bad(&self, m: &Planned, b: &BadData) {
        if b.is_clean() {
            return;
        }
        self.metrics.bad_data(b);
        if b.dropped() == 0 && b.gap_intervals == 0 && b.out_of_order == 0 {
            // Only flags (a power-down interval, a late snapshot): published with the rows.
            tracing::info!(meter = %m.id, flagged = b.flagged, bad_value = b.bad_value, "collection: rows flagged");
            return;
        }
        tracing::warn!(
            meter = %m.id,
            bad_time = b.bad_time,
            clock_invalid = b.clock_invalid,
            future_time = b.future_time,
            duplicate = b.duplicate,
            out_of_order = b.out_of_order,
            gap_intervals = b.gap_intervals,
            flagged = b.flagged,
            bad_value = b.bad_value,
            "collection: rows dropped or flagged"
        );
    }
}

/// RFC 3339 at an offset, as [`crate::time::format_rfc3339`] writes it, without the
/// formatting machinery: a day's profile is 96 of these per meter.
fn row_time(unix: i64, offset_min: i16) -> String {
    let local = unix + i64::from(offset_min) * 60;
    let (y, mo, d) = civil_from_days(local.div_euclid(86_400));
    let tod = local.rem_euclid(86_400);
    let mut out = String::with_capacity(25);
    let two = |out: &mut String, v: i64| {
        out.push(char::from(b'0' + (v / 10 % 10) as u8));
        out.push(char::from(b'0' + (v % 10) as u8));
    };
    if !(0..=9999).contains(&y) {
        return crate::time::format_rfc3339(unix, offset_min);
    }
    two(&mut out, y / 100);
    two(&mut out, y % 100);
    out.push('-');
    two(&mut out, mo);
    out.push('-');
    two(&mut out, d);
    out.push('T');
    two(&mut out, tod / 3600);
    out.push(':');
    two(&mut out, tod % 3600 / 60);
    out.push(':');
    two(&mut out, tod % 60);
    if offset_min == 0 {
        out.push('Z');
    } else {
        out.push(if offset_min < 0 { '-' } else { '+' });
        let a = i64::from(offset_min.unsigned_abs());
        two(&mut out, a / 60);
        out.push(':');
        two(&mut out, a % 60);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn row_times_are_the_contracts_rfc3339() {
        for t in [0i64, 1_795_827_600, 951_782_400, 1_795_827_599, 4_102_444_799] {
            for off in [0i16, 480, -300, 345, -720] {
                assert_eq!(super::row_time(t, off), crate::time::format_rfc3339(t, off), "{t} {off}");
            }
        }
    }
}
