//! When each meter is collected and what is read, sans-IO: every input carries `now`
//! (Unix ms), so the schedule is tested in virtual time.
//!
//! Each meter has a slot `settle + hash(id) % spread` after every interval boundary; the
//! hash is FNV-1a of the id, so the slot is the same in every run and on every machine,
//! and a fleet spreads its reads over the spread window instead of hitting its links in
//! the same second. At its slot a profile meter reads from the row after the newest one
//! stored (never further back than the horizon) up to the boundary, in jobs of at most
//! `rows_per_job` intervals: when a job ends short of the boundary the meter is due again
//! at once, behind the meters already queued on its link, so a long back-fill never
//! starves the current interval of the others. A Modbus meter has no profile: its job is
//! a snapshot stamped with the boundary; a boundary missed is a gap, not a back-fill.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::CollectionConfig;

/// What a meter is collected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A load profile read by time range (DLMS).
    Profile,
    /// Register snapshots taken at the boundaries by the head-end (Modbus).
    Snapshot,
}

/// The schedule's numbers, from [`CollectionConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Interval, ms.
    pub interval_ms: i64,
    /// Slots spread over this window after `settle_ms`, ms.
    pub spread_ms: i64,
    /// First slot after a boundary, ms.
    pub settle_ms: i64,
    /// Back-fill limit, s.
    pub horizon_s: i64,
    /// Intervals per job at most.
    pub rows_per_job: i64,
    /// Snapshots are taken within this after the boundary (half the `late` threshold),
    /// so that an on-time snapshot is not flagged.
    pub snapshot_spread_ms: i64,
    /// Read the clock every this many cycles (0: never).
    pub clock_every: u32,
}

impl Timing {
    /// From the configuration.
    pub fn from_config(c: &CollectionConfig) -> Self {
        let ms = |s: u32| i64::from(s) * 1000;
        Self {
            interval_ms: ms(c.interval_s.max(1)),
            spread_ms: ms(c.spread_s),
            settle_ms: ms(c.settle_s),
            horizon_s: i64::try_from(c.horizon_s).unwrap_or(i64::MAX / 2),
            rows_per_job: i64::from(c.rows_per_job.max(1)),
            snapshot_spread_ms: ms(c.snapshot_late_s) / 2,
            clock_every: c.clock_check_every,
        }
    }

    fn interval_s(&self) -> i64 {
        self.interval_ms / 1000
    }
}

/// One job for a channel actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// The meter's index in the scheduler.
    pub meter: u32,
    /// What to read.
    pub what: JobWhat,
    /// Read (and maybe set) the meter's clock first.
    pub read_clock: bool,
}

/// What a job reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobWhat {
    /// Profile rows captured in `[from_s, to_s]`.
    Profile {
        /// First second wanted (inclusive).
        from_s: i64,
        /// Last second wanted (inclusive): the boundary, or the end of a catch-up chunk.
        to_s: i64,
        /// The boundary this cycle collects up to.
        boundary_s: i64,
    },
    /// A register snapshot for the boundary `at_s`.
    Snapshot {
        /// The boundary, s.
        at_s: i64,
    },
}

/// How a job ended, for [`Scheduler::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Finished {
    /// Capture time of the newest row now stored for the meter, if the job stored any.
    pub stored_last_s: Option<i64>,
    /// The job read its whole range (a profile) or took its snapshot.
    pub complete: bool,
}

#[derive(Debug, Clone)]
struct Slot {
    kind: SourceKind,
    offset_ms: i64,
    /// Newest stored capture time: where the next read starts.
    last_s: Option<i64>,
    /// End of the newest catch-up chunk read in full, even if it held no rows (a meter
    /// whose memory does not reach back to the horizon), so it is not read again.
    cursor_s: Option<i64>,
    due_ms: i64,
    running: Option<JobWhat>,
    /// Regular cycles started (catch-up continuations do not count).
    cycles: u64,
    /// The next job continues a catch-up (no clock check, same boundary).
    continuing: Option<i64>,
    /// Triggered by hand: collect up to the latest boundary, whatever the slot.
    forced: bool,
}

/// The schedule of every meter.
#[derive(Debug)]
pub struct Scheduler {
    timing: Timing,
    slots: Vec<Slot>,
    heap: BinaryHeap<Reverse<(i64, u32)>>,
}

/// FNV-1a, 64 bits: stable across runs and builds (std's hasher is seeded per process).
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Scheduler {
    /// An empty schedule.
    pub fn new(timing: Timing) -> Self {
        Self { timing, slots: Vec::new(), heap: BinaryHeap::new() }
    }

    /// The timing in use.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Add a meter; `last_s` is the newest row stored before (after a restart). It is due
    /// at its next slot. Returns its index.
    pub fn add(&mut self, id: &str, kind: SourceKind, last_s: Option<i64>, now_ms: i64) -> u32 {
        let spread = match kind {
            SourceKind::Profile => self.timing.spread_ms,
            SourceKind::Snapshot => self.timing.spread_ms.min(self.timing.snapshot_spread_ms),
        };
        let settle = if kind == SourceKind::Snapshot { 0 } else { self.timing.settle_ms };
        let jitter = if spread > 0 { (stable_hash(id) % spread as u64) as i64 } else { 0 };
        let offset_ms = (settle + jitter).min(self.timing.interval_ms - 1).max(0);
        let idx = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let mut slot = Slot {
            kind,
            offset_ms,
            last_s,
            cursor_s: None,
            due_ms: 0,
            running: None,
            cycles: 0,
            continuing: None,
            forced: false,
        };
        slot.due_ms = next_slot(&self.timing, offset_ms, now_ms);
        self.heap.push(Reverse((slot.due_ms, idx)));
        self.slots.push(slot);
        idx
    }

    /// Meters known.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no meter is scheduled.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A meter's slot within the interval, ms after the boundary.
    pub fn offset_ms(&self, meter: u32) -> Option<i64> {
        self.slots.get(meter as usize).map(|s| s.offset_ms)
    }

    /// Newest stored capture time of a meter.
    pub fn last_s(&self, meter: u32) -> Option<i64> {
        self.slots.get(meter as usize).and_then(|s| s.last_s)
    }

    /// When the next meter is due (Unix ms), if any is waiting.
    pub fn next_wakeup(&mut self) -> Option<i64> {
        while let Some(Reverse((due, idx))) = self.heap.peek().copied() {
            match self.slots.get(idx as usize) {
                Some(s) if s.running.is_none() && s.due_ms == due => return Some(due),
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    /// Collect these meters now, up to the latest boundary (an operator's "collect now",
    /// or a test in virtual time). A meter with a job running is left alone.
    pub fn trigger(&mut self, meter: u32, now_ms: i64) {
        if let Some(s) = self.slots.get_mut(meter as usize) {
            if s.running.is_none() {
                s.due_ms = now_ms;
                s.forced = true;
                s.continuing = None;
                self.heap.push(Reverse((now_ms, meter)));
            }
        }
    }

    /// The jobs due at `now_ms`, oldest due first; each meter is then running until
    /// [`Scheduler::finish`].
    pub fn poll(&mut self, now_ms: i64) -> Vec<Job> {
        let mut jobs = Vec::new();
        while let Some(Reverse((due, idx))) = self.heap.peek().copied() {
            if due > now_ms {
                break;
            }
            self.heap.pop();
            let timing = self.timing;
            let Some(s) = self.slots.get_mut(idx as usize) else { continue };
            if s.running.is_some() || s.due_ms != due {
                continue;
            }
            match plan(&timing, s, now_ms) {
                Some((what, read_clock)) => {
                    s.running = Some(what);
                    jobs.push(Job { meter: idx, what, read_clock });
                }
                None => {
                    // Nothing new yet (triggered twice, or already up to date).
                    s.forced = false;
                    s.continuing = None;
                    s.due_ms = next_slot(&timing, s.offset_ms, now_ms);
                    self.heap.push(Reverse((s.due_ms, idx)));
                }
            }
        }
        jobs
    }

    /// A job ended: record what was stored and say when the meter is due again.
    pub fn finish(&mut self, meter: u32, done: Finished, now_ms: i64) {
        let timing = self.timing;
        let Some(s) = self.slots.get_mut(meter as usize) else { return };
        let Some(what) = s.running.take() else { return };
        if let Some(t) = done.stored_last_s {
            s.last_s = Some(s.last_s.map_or(t, |l| l.max(t)));
        }
        s.forced = false;
        s.continuing = None;
        let mut due = next_slot(&timing, s.offset_ms, now_ms);
        match what {
            JobWhat::Profile { to_s, boundary_s, .. } if done.complete && to_s < boundary_s => {
                // A catch-up chunk read in full: its end is history, go on at once.
                s.cursor_s = Some(s.cursor_s.map_or(to_s, |c| c.max(to_s)));
                s.continuing = Some(boundary_s);
                due = now_ms;
            }
            JobWhat::Snapshot { at_s } if done.complete => {
                s.last_s = Some(s.last_s.map_or(at_s, |l| l.max(at_s)));
            }
            _ => {}
        }
        s.due_ms = due;
        self.heap.push(Reverse((due, meter)));
    }
}

/// The first slot strictly after `now_ms`.
fn next_slot(t: &Timing, offset_ms: i64, now_ms: i64) -> i64 {
    let k = (now_ms - offset_ms).div_euclid(t.interval_ms) + 1;
    k * t.interval_ms + offset_ms
}

/// What a meter due at `now_ms` reads, and whether it reads its clock; None when there
/// is nothing new.
fn plan(t: &Timing, s: &mut Slot, now_ms: i64) -> Option<(JobWhat, bool)> {
    let interval_s = t.interval_s();
    // The boundary this cycle collects up to: the latest whose slot has come (a forced
    // run only waits for the settle time), or the one a catch-up started with.
    let lead = if s.forced { s.offset_ms.min(t.settle_ms) } else { s.offset_ms };
    let latest = (now_ms - lead).div_euclid(t.interval_ms) * t.interval_ms / 1000;
    let boundary_s = s.continuing.unwrap_or(latest);
    let read_clock = s.continuing.is_none() && s.cycles.checked_rem(u64::from(t.clock_every)) == Some(0);
    if s.continuing.is_none() {
        s.cycles += 1;
    }
    match s.kind {
        SourceKind::Snapshot => {
            if s.last_s.is_some_and(|l| l >= boundary_s) {
                return None;
            }
            Some((JobWhat::Snapshot { at_s: boundary_s }, read_clock))
        }
        SourceKind::Profile => {
            let floor = boundary_s.saturating_sub(t.horizon_s) + 1;
            let after = match (s.last_s, s.cursor_s) {
                (Some(l), Some(c)) => Some(l.max(c)),
                (l, c) => l.or(c),
            };
            let from_s = after.map_or(floor, |a| a + 1).max(floor);
            if from_s > boundary_s {
                return None;
            }
            let to_s = boundary_s.min(from_s - 1 + t.rows_per_job * interval_s);
            Some((JobWhat::Profile { from_s, to_s, boundary_s }, read_clock))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    /// 2026-11-28T00:00:00Z, a boundary of every interval that divides a day.
    const T0: i64 = 1_795_824_000_000;

    fn timing() -> Timing {
        Timing::from_config(&CollectionConfig::default())
    }

    fn profile_of(j: &Job) -> (i64, i64, i64) {
        match j.what {
            JobWhat::Profile { from_s, to_s, boundary_s } => (from_s, to_s, boundary_s),
            JobWhat::Snapshot { .. } => panic!("not a profile job: {j:?}"),
        }
    }

    #[test]
    fn offsets_are_stable_spread_and_after_the_settle_time() {
        let mut s = Scheduler::new(timing());
        let offsets: Vec<i64> = (0..1000)
            .map(|i| {
                let m = s.add(&format!("MTR-{i:04}"), SourceKind::Profile, None, T0);
                s.offset_ms(m).unwrap_or(-1)
            })
            .collect();
        assert!(offsets.iter().all(|o| (10_000..310_000).contains(o)), "within settle .. settle + spread");
        let mut again = Scheduler::new(timing());
        assert_eq!(again.add("MTR-0007", SourceKind::Profile, None, T0 + 5 * MIN), 0);
        assert_eq!(again.offset_ms(0), Some(offsets[7]), "the same id gets the same slot in every run");
        // Spread: every 30-second bucket of the window holds some meters, none most of them.
        let mut buckets = [0u32; 10];
        for o in &offsets {
            buckets[((o - 10_000) / 30_000) as usize] += 1;
        }
        assert!(buckets.iter().all(|b| (50..=160).contains(b)), "{buckets:?}");
    }

    #[test]
    fn first_run_back_fills_the_horizon_in_chunks_then_one_interval_per_cycle() {
        let mut s = Scheduler::new(timing());
        let m = s.add("MTR-0001", SourceKind::Profile, None, T0 + 6 * MIN);
        let slot = T0 + 15 * MIN + s.offset_ms(m).unwrap_or(0);
        assert_eq!(s.next_wakeup(), Some(slot));
        assert!(s.poll(slot - 1).is_empty(), "not before its slot");
        let b = (T0 + 15 * MIN) / 1000;
        let mut now = slot;
        let mut chunks = Vec::new();
        loop {
            let jobs = s.poll(now);
            assert_eq!(jobs.len(), 1);
            let (from, to, boundary) = profile_of(&jobs[0]);
            assert_eq!(boundary, b);
            assert_eq!(jobs[0].read_clock, chunks.is_empty(), "the clock once per cycle");
            chunks.push((from, to));
            // The meter had every row: the newest stored is the chunk's end.
            s.finish(m, Finished { stored_last_s: Some(to), complete: true }, now + 500);
            now += 500;
            if to == b {
                break;
            }
            assert_eq!(s.next_wakeup(), Some(now), "a catch-up goes on at once");
        }
        assert_eq!(chunks.len(), 7, "7 days in jobs of one day");
        assert_eq!(chunks[0].0, b - 7 * 86_400 + 1, "rows in (boundary - horizon, boundary]");
        assert!(chunks.windows(2).all(|w| w[1].0 == w[0].1 + 1), "contiguous, no overlap: {chunks:?}");
        assert!(chunks.iter().all(|(f, t)| t - f + 1 == 96 * 900), "96 intervals each");
        // Caught up: the next cycle reads exactly the new interval.
        let next = s.next_wakeup().unwrap_or(0);
        assert_eq!(next, slot + 15 * MIN);
        let jobs = s.poll(next);
        assert_eq!(profile_of(&jobs[0]), (b + 1, b + 900, b + 900));
    }

    #[test]
    fn a_meter_back_from_an_outage_is_back_filled_from_its_last_row() {
        let mut s = Scheduler::new(timing());
        let b0 = T0 / 1000;
        let m = s.add("MTR-0002", SourceKind::Profile, Some(b0), T0 + 6 * MIN);
        let mut now = s.next_wakeup().unwrap_or(0);
        // Offline for four cycles: each fails and waits for the next slot.
        for _ in 0..4 {
            let jobs = s.poll(now);
            assert_eq!(profile_of(&jobs[0]).0, b0 + 1, "always from the row after the last stored");
            s.finish(m, Finished::default(), now + 5000);
            let next = s.next_wakeup().unwrap_or(0);
            assert_eq!(next, now + 15 * MIN, "a failure waits for the next slot");
            now = next;
        }
        // Back: one job covers the missed intervals and the current one.
        let jobs = s.poll(now);
        let (from, to, boundary) = profile_of(&jobs[0]);
        assert_eq!((from, to), (b0 + 1, boundary));
        assert_eq!(boundary, b0 + 5 * 900);
        // A partial read (timeout after some rows) keeps what was stored.
        s.finish(m, Finished { stored_last_s: Some(b0 + 3 * 900), complete: false }, now + 100);
        assert_eq!(s.last_s(m), Some(b0 + 3 * 900));
        let now = s.next_wakeup().unwrap_or(0);
        assert_eq!(profile_of(&s.poll(now)[0]).0, b0 + 3 * 900 + 1);
    }

    #[test]
    fn the_horizon_bounds_a_long_outage_and_empty_history_is_not_read_twice() {
        let mut s = Scheduler::new(timing());
        let b0 = T0 / 1000;
        // Stored long ago: only the horizon is read.
        let m = s.add("MTR-0003", SourceKind::Profile, Some(b0 - 30 * 86_400), T0 + 6 * MIN);
        let now = s.next_wakeup().unwrap_or(0);
        let (from, to, b) = profile_of(&s.poll(now)[0]);
        assert_eq!(from, b - 7 * 86_400 + 1);
        // The meter's memory does not reach back that far: the chunk is empty but read in
        // full, and the next chunk follows it.
        s.finish(m, Finished { stored_last_s: None, complete: true }, now + 10);
        let (from2, _, _) = profile_of(&s.poll(now + 10)[0]);
        assert_eq!(from2, to + 1);
        // An empty answer for the latest chunk does not move the start: the row may come
        // later (a meter whose clock runs behind).
        let mut s = Scheduler::new(timing());
        let m = s.add("MTR-0004", SourceKind::Profile, Some(b0), T0 + 6 * MIN);
        let now = s.next_wakeup().unwrap_or(0);
        s.poll(now);
        s.finish(m, Finished { stored_last_s: None, complete: true }, now + 10);
        let next = s.next_wakeup().unwrap_or(0);
        assert_eq!(next, now + 15 * MIN);
        assert_eq!(profile_of(&s.poll(next)[0]).0, b0 + 1);
    }

    #[test]
    fn snapshots_are_stamped_with_the_boundary_and_missed_ones_are_not_back_filled() {
        let mut s = Scheduler::new(timing());
        let m = s.add("MB-1", SourceKind::Snapshot, None, T0 + MIN);
        let offset = s.offset_ms(m).unwrap_or(-1);
        assert!((0..30_000).contains(&offset), "snapshots close to the boundary: {offset}");
        let now = s.next_wakeup().unwrap_or(0);
        let jobs = s.poll(now);
        assert_eq!(jobs[0].what, JobWhat::Snapshot { at_s: (T0 + 15 * MIN) / 1000 });
        s.finish(m, Finished { stored_last_s: None, complete: false }, now + 100);
        // Offline for an hour: the next snapshot is the current boundary.
        let later = T0 + 75 * MIN + offset;
        let jobs = s.poll(later);
        assert_eq!(jobs[0].what, JobWhat::Snapshot { at_s: (T0 + 75 * MIN) / 1000 });
        s.finish(m, Finished { stored_last_s: Some((T0 + 75 * MIN) / 1000), complete: true }, later + 100);
        // Triggered again in the same interval: nothing new.
        s.trigger(m, later + 200);
        assert!(s.poll(later + 200).is_empty());
    }

    #[test]
    fn a_trigger_collects_now_and_a_running_meter_is_not_started_twice() {
        let mut s = Scheduler::new(timing());
        let b0 = T0 / 1000;
        let m = s.add("MTR-0005", SourceKind::Profile, Some(b0), T0 + 20 * MIN);
        // 20 minutes in: the 15-minute boundary is complete; collect it now.
        s.trigger(m, T0 + 20 * MIN);
        let jobs = s.poll(T0 + 20 * MIN);
        assert_eq!(profile_of(&jobs[0]), (b0 + 1, b0 + 900, b0 + 900));
        s.trigger(m, T0 + 20 * MIN + 1);
        assert!(s.poll(T0 + 21 * MIN).is_empty(), "already running");
        s.finish(m, Finished { stored_last_s: Some(b0 + 900), complete: true }, T0 + 21 * MIN);
        assert_eq!(s.next_wakeup(), Some(T0 + 30 * MIN + s.offset_ms(m).unwrap_or(0)));
    }

    #[test]
    fn the_clock_is_read_every_nth_cycle() {
        let mut t = timing();
        t.clock_every = 3;
        let mut s = Scheduler::new(t);
        let m = s.add("MTR-0006", SourceKind::Profile, Some(T0 / 1000 - 900), T0);
        let mut reads = Vec::new();
        for _ in 0..6 {
            let now = s.next_wakeup().unwrap_or(0);
            let jobs = s.poll(now);
            reads.push(jobs[0].read_clock);
            let (_, to, _) = profile_of(&jobs[0]);
            s.finish(m, Finished { stored_last_s: Some(to), complete: true }, now + 10);
        }
        assert_eq!(reads, vec![true, false, false, true, false, false]);
    }
}
