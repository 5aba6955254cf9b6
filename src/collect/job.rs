//! One collection job as the channel actor runs it: a sequence of steps, each one request
//! (or the few of a first read: association, the profile's capture objects and scalers),
//! so that the actor can serve its control lane between any two of them. A restore that
//! arrives during a week's back-fill waits for the request in flight, not for the week.
//!
//! A long range is read in sub-ranges of `rows_per_request` intervals; the default (24)
//! keeps an answer within one 1024-byte APDU, so no datablock transfer is ever left
//! half-done when control work runs, and no meter sees more than 576 rows asked at once.

use dlms_cosem_rs::obis::Obis;

use super::schedule::JobWhat;
use crate::driver::{Driver, Link};
use crate::meter::{LoadProfile, MeterClock, MeterError, MeterId, Reading};
use crate::time::Clock;

/// A job for a channel actor's collection lane.
#[derive(Debug, Clone)]
pub struct CollectJob {
    /// The meter.
    pub meter: MeterId,
    /// Its index in the collector (echoed back).
    pub index: u32,
    /// What to read.
    pub what: JobWhat,
    /// Read the clock first.
    pub read_clock: bool,
    /// Set the clock when it is off by more than this many seconds.
    pub set_clock_over_s: Option<u32>,
    /// The profile to read.
    pub profile: Obis,
    /// Intervals per request.
    pub rows_per_request: u32,
    /// The collection interval, s: the sub-range size until the profile's own period is known.
    pub interval_s: u32,
}

/// The clock as checked during a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockCheck {
    /// The meter's clock minus the head-end's, s (None when the meter's time is unusable).
    pub drift_s: Option<i64>,
    /// The meter's clock status byte.
    pub status: Option<u8>,
    /// A set was tried: Ok, or why it failed.
    pub set: Option<Result<(), String>>,
}

/// What a job read.
#[derive(Debug)]
pub enum Collected {
    /// Profile rows, merged over the sub-ranges read, and the end of the part read in full.
    Profile {
        /// The rows (meter order within each sub-range).
        profile: LoadProfile,
        /// Every sub-range up to here was read (None: not even the first).
        read_to_s: Option<i64>,
    },
    /// A snapshot.
    Snapshot {
        /// The registers.
        registers: Vec<Reading>,
        /// When the answer came, head-end clock, ms.
        read_ms: i64,
    },
    /// Nothing (the first step failed).
    Nothing,
}

/// A finished job, back to the collector.
#[derive(Debug)]
pub struct JobDone {
    /// The meter.
    pub meter: MeterId,
    /// Its index in the collector.
    pub index: u32,
    /// What it was asked.
    pub what: JobWhat,
    /// What it read.
    pub collected: Collected,
    /// The clock check, if one was asked and answered.
    pub clock: Option<ClockCheck>,
    /// Why it stopped early.
    pub error: Option<MeterError>,
    /// The meter answered at least once (it was seen).
    pub answered: bool,
    /// Control commands served while this job held the link.
    pub preempted_by: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Clock,
    SetClock,
    Profile { from_s: i64 },
    Snapshot,
}

/// A job in progress.
#[derive(Debug)]
pub struct JobRun {
    job: CollectJob,
    next: Option<Step>,
    profile: Option<LoadProfile>,
    read_to_s: Option<i64>,
    snapshot: Option<(Vec<Reading>, i64)>,
    clock: Option<ClockCheck>,
    error: Option<MeterError>,
    answered: bool,
    preempted_by: u32,
}

impl JobRun {
    /// Start a job.
    pub fn new(job: CollectJob) -> Self {
        let next = if job.read_clock { Some(Step::Clock) } else { Some(data_step(&job)) };
        Self {
            job,
            next,
            profile: None,
            read_to_s: None,
            snapshot: None,
            clock: None,
            error: None,
            answered: false,
            preempted_by: 0,
        }
    }

    /// The meter.
    pub fn meter(&self) -> &MeterId {
        &self.job.meter
    }

    /// True while there is a step left.
    pub fn has_step(&self) -> bool {
        self.next.is_some()
    }

    /// Note control work served between two steps.
    pub fn preempted(&mut self, n: u32) {
        self.preempted_by += n;
    }

    /// Stop here: the rest is not read.
    pub fn fail(&mut self, e: MeterError) {
        self.error = Some(e);
        self.next = None;
    }

    /// Run the next step (one request, or the few of a first read). An error that is a
    /// link failure ends the job; the caller resets the link.
    pub async fn step(&mut self, d: &mut Driver, link: &mut Link, clock: &dyn Clock) -> Result<(), MeterError> {
        let Some(step) = self.next else { return Ok(()) };
        match step {
            Step::Clock => {
                let before = clock.now_ms();
                if self.clock_with_profile(d, link, before).await? {
                    return Ok(());
                }
                match d.read_clock(link).await {
                    Ok(c) => {
                        self.answered = true;
                        let mid = (before + clock.now_ms()) / 2;
                        let check = check_of(&c, mid);
                        let over = |limit: u32| check.drift_s.is_some_and(|dr| dr.unsigned_abs() > u64::from(limit));
                        self.next = match self.job.set_clock_over_s {
                            Some(limit) if over(limit) => Some(Step::SetClock),
                            _ => Some(data_step(&self.job)),
                        };
                        self.clock = Some(check);
                    }
                    Err(e) if e.is_link_failure() => return Err(e),
                    // No clock, or a refused read: the readings matter more.
                    Err(e) => {
                        tracing::debug!(meter = %self.job.meter, error = %e, "clock not read");
                        self.next = Some(data_step(&self.job));
                    }
                }
            }
            Step::SetClock => {
                let r = d.set_clock(link, clock.now()).await;
                self.next = Some(data_step(&self.job));
                match r {
                    Ok(()) => {
                        self.answered = true;
                        if let Some(c) = &mut self.clock {
                            c.set = Some(Ok(()));
                        }
                    }
                    Err(e) if e.is_link_failure() => return Err(e),
                    Err(e) => {
                        if let Some(c) = &mut self.clock {
                            c.set = Some(Err(e.to_string()));
                        }
                    }
                }
            }
            Step::Snapshot => {
                let registers = d.read_registers(link).await?;
                self.answered = true;
                self.snapshot = Some((registers, clock.now_ms()));
                self.next = None;
            }
            Step::Profile { from_s } => {
                let JobWhat::Profile { to_s, .. } = self.job.what else {
                    self.next = None;
                    return Ok(());
                };
                let sub_to = self.sub_range(from_s, to_s);
                let part = d.read_profile(link, self.job.profile, from_s, sub_to).await?;
                self.answered = true;
                self.add_part(part, sub_to, to_s);
            }
        }
        Ok(())
    }

    /// The sub-range of a profile read that starts at `from_s`.
    fn sub_range(&self, from_s: i64, to_s: i64) -> i64 {
        let period = self.profile.as_ref().map_or(self.job.interval_s, |p| p.capture_period_s);
        let span = i64::from(self.job.rows_per_request.max(1)) * i64::from(period.max(1));
        to_s.min(from_s.saturating_add(span - 1))
    }

    fn add_part(&mut self, part: LoadProfile, sub_to: i64, to_s: i64) {
        match &mut self.profile {
            Some(p) => p.rows.extend(part.rows),
            None => self.profile = Some(part),
        }
        self.read_to_s = Some(sub_to);
        self.next = (sub_to < to_s).then_some(Step::Profile { from_s: sub_to + 1 });
    }

    /// A DLMS profile job whose clock is only checked, not set: the clock and the first
    /// sub-range in one step (one GET-with-list where the meter agrees). True when done.
    async fn clock_with_profile(
        &mut self,
        d: &mut Driver,
        link: &mut Link,
        before_ms: i64,
    ) -> Result<bool, MeterError> {
        let (JobWhat::Profile { from_s, to_s, .. }, None) = (self.job.what, self.job.set_clock_over_s) else {
            return Ok(false);
        };
        let (Driver::Dlms(meter), Link::Dlms(port)) = (d, link) else { return Ok(false) };
        let sub_to = self.sub_range(from_s, to_s);
        let (meter_clock, part) = match meter.read_clock_and_profile(port, self.job.profile, from_s, sub_to).await {
            Ok(both) => both,
            Err(e) if e.is_link_failure() => return Err(e),
            // The profile refused: the clock on its own, then the profile again as a step
            // of its own (which records why it fails), as without lists.
            Err(e) => {
                tracing::debug!(meter = %self.job.meter, error = %e, "clock and profile together failed");
                return Ok(false);
            }
        };
        self.answered = true;
        match meter_clock {
            // The meter reads its clock as the request arrives; the answer that follows
            // carries rows too, so its arrival says little about when.
            Ok(c) => self.clock = Some(check_of(&c, before_ms)),
            Err(e) => tracing::debug!(meter = %self.job.meter, error = %e, "clock not read"),
        }
        self.add_part(part, sub_to, to_s);
        Ok(true)
    }

    /// The answer for the collector.
    pub fn finish(self) -> JobDone {
        let collected = match (self.job.what, self.profile, self.snapshot) {
            (JobWhat::Profile { .. }, Some(profile), _) => Collected::Profile { profile, read_to_s: self.read_to_s },
            (JobWhat::Snapshot { .. }, _, Some((registers, read_ms))) => Collected::Snapshot { registers, read_ms },
            _ => Collected::Nothing,
        };
        JobDone {
            meter: self.job.meter,
            index: self.job.index,
            what: self.job.what,
            collected,
            clock: self.clock,
            error: self.error,
            answered: self.answered,
            preempted_by: self.preempted_by,
        }
    }
}

fn data_step(job: &CollectJob) -> Step {
    match job.what {
        JobWhat::Profile { from_s, .. } => Step::Profile { from_s },
        JobWhat::Snapshot { .. } => Step::Snapshot,
    }
}

fn check_of(c: &MeterClock, headend_ms: i64) -> ClockCheck {
    // The meter's time is truncated to whole seconds: its true time is half a second on
    // average later than it says; the difference is then rounded to whole seconds.
    let drift_s = c.unix_seconds.map(|m| (m * 1000 + 500 - headend_ms + 500).div_euclid(1000));
    ClockCheck { drift_s, status: c.status, set: None }
}
