//! Channel actors: one tokio task owns one physical link and the drivers of the meters
//! on it, and serialises their work, because an RS-485 bus or a gateway serves one
//! request at a time.
//!
//! Two lanes. The control lane (cut, restore, read) is always served first. The collection
//! lane runs interval-collection jobs step by step ([`crate::collect::job`]), and between
//! any two steps the actor serves everything waiting on the control lane, so a restore
//! waits at most for the one request in flight, even during a week's back-fill. A
//! collection job holds a permit of the collector's semaphore (the bound on associations
//! collecting at once); control work never waits for one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::collect::job::{CollectJob, JobDone, JobRun};
use crate::command::{Execution, Input, Op, Outcome, ReadResult};
use crate::config::LinkConfig;
use crate::driver::{Driver, Link};
use crate::meter::{MeterError, MeterId};
use crate::time::Clock;

/// Whether a channel's link is usable, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHealth {
    /// Not tried yet.
    Unknown,
    /// The last exchange (or opening) worked.
    Up,
    /// The link could not be opened, or the last exchange failed on it.
    Down,
}

/// One meter served by a channel.
#[derive(Debug)]
pub struct ChannelMeter {
    /// Registry id.
    pub id: MeterId,
    /// The identity the meter must answer before it is switched (`None`: switching is
    /// refused, because an unverified switch is how the wrong meter gets cut).
    pub identity: Option<String>,
    /// Its driver.
    pub driver: Driver,
}

/// What a channel needs to run collection jobs.
#[derive(Clone)]
pub struct CollectLane {
    /// Finished jobs go here.
    pub done: mpsc::UnboundedSender<JobDone>,
    /// The bound on collection jobs running at once, over all channels.
    pub permits: Arc<Semaphore>,
    /// The head-end's clock (clock checks and snapshot times).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CollectLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectLane").field("permits", &self.permits.available_permits()).finish_non_exhaustive()
    }
}

/// The handle the daemon keeps for a running channel.
#[derive(Debug, Clone)]
pub struct ChannelHandle {
    /// The link's name.
    pub name: String,
    control: mpsc::UnboundedSender<Execution>,
    collect: mpsc::UnboundedSender<CollectJob>,
    health: watch::Receiver<LinkHealth>,
}

impl ChannelHandle {
    /// Queue work on the control lane. Fails only when the channel has stopped.
    pub fn execute(&self, work: Execution) -> Result<(), Execution> {
        self.control.send(work).map_err(|e| e.0)
    }

    /// Queue a job on the collection lane. Fails when the channel has stopped or was
    /// started without a collection lane.
    pub fn collect(&self, job: CollectJob) -> Result<(), CollectJob> {
        self.collect.send(job).map_err(|e| e.0)
    }

    /// The link's health now.
    pub fn health(&self) -> LinkHealth {
        *self.health.borrow()
    }

    /// A receiver that sees health changes.
    pub fn watch_health(&self) -> watch::Receiver<LinkHealth> {
        self.health.clone()
    }
}

/// How many channels are up and down, kept by the actors as their health changes, so
/// that the daemon's status costs the same for ten links as for ten thousand.
#[derive(Debug, Default)]
pub struct HealthCounts {
    up: AtomicU64,
    down: AtomicU64,
}

impl HealthCounts {
    /// Channels whose link is up.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Channels whose link is down.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    fn moved(&self, from: LinkHealth, to: LinkHealth) {
        let counter = |h| match h {
            LinkHealth::Up => Some(&self.up),
            LinkHealth::Down => Some(&self.down),
            LinkHealth::Unknown => None,
        };
        if let Some(c) = counter(from) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = counter(to) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Start the actor of one link. Answers go to `answers` as [`Input::Executed`]; with a
/// collection lane, finished collection jobs go to its `done`.
pub fn spawn(
    link: LinkConfig,
    meters: Vec<ChannelMeter>,
    answers: mpsc::UnboundedSender<Input>,
    lane: Option<CollectLane>,
    shutdown: CancellationToken,
) -> (ChannelHandle, tokio::task::JoinHandle<()>) {
    spawn_counted(link, meters, answers, lane, shutdown, Arc::default())
}

/// [`spawn`], counting the channel's health in `counts` (shared by all channels).
pub fn spawn_counted(
    link: LinkConfig,
    meters: Vec<ChannelMeter>,
    answers: mpsc::UnboundedSender<Input>,
    lane: Option<CollectLane>,
    shutdown: CancellationToken,
    counts: Arc<HealthCounts>,
) -> (ChannelHandle, tokio::task::JoinHandle<()>) {
    let (control, control_rx) = mpsc::unbounded_channel();
    let (collect, collect_rx) = mpsc::unbounded_channel();
    let (health_tx, health) = watch::channel(LinkHealth::Unknown);
    let name = link.name.clone();
    let mut meters = meters;
    meters.sort_by(|a, b| a.id.cmp(&b.id));
    let actor = Actor {
        link,
        open: None,
        meters: Meters(meters),
        health: health_tx,
        counts,
        answers,
        control: control_rx,
        shutdown,
    };
    // Without a lane the receiver is dropped, so `collect` fails at once.
    let collect_rx = lane.map(|l| (l, collect_rx));
    let task = tokio::spawn(actor.run(collect_rx));
    (ChannelHandle { name, control, collect, health }, task)
}

/// The meters of a link, sorted by id: a fleet's worth of drivers without a second copy
/// of every id as a map key.
struct Meters(Vec<ChannelMeter>);

impl Meters {
    fn index_of(&self, id: &MeterId) -> Option<usize> {
        self.0.binary_search_by(|m| m.id.cmp(id)).ok()
    }

    fn get_mut(&mut self, id: &MeterId) -> Option<&mut ChannelMeter> {
        let i = self.index_of(id)?;
        self.0.get_mut(i)
    }

    fn contains_key(&self, id: &MeterId) -> bool {
        self.0.binary_search_by(|m| m.id.cmp(id)).is_ok()
    }

    fn values_mut(&mut self) -> std::slice::IterMut<'_, ChannelMeter> {
        self.0.iter_mut()
    }
}

struct Actor {
    link: LinkConfig,
    open: Option<Link>,
    meters: Meters,
    health: watch::Sender<LinkHealth>,
    counts: Arc<HealthCounts>,
    answers: mpsc::UnboundedSender<Input>,
    control: mpsc::UnboundedReceiver<Execution>,
    shutdown: CancellationToken,
}

impl Actor {
    fn set_health(&self, h: LinkHealth) {
        let old = self.health.send_replace(h);
        if old != h {
            self.counts.moved(old, h);
        }
    }

    async fn run(mut self, mut lane: Option<(CollectLane, mpsc::UnboundedReceiver<CollectJob>)>) {
        loop {
            let collect_next = async {
                match lane.as_mut() {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                w = self.control.recv() => match w {
                    Some(w) => self.serve(w).await,
                    None => break,
                },
                Some(job) = collect_next => {
                    if let Some((l, _)) = &lane {
                        let l = l.clone();
                        self.collect(job, &l).await;
                    }
                }
            }
        }
        self.close().await;
    }

    /// Run one control request and answer it. An exchange in progress is allowed to
    /// finish even on shutdown (bounded by the link's timeouts), so a switch is never cut
    /// off between ACTION and read-back. A panic in the exchange (a driver bug on odd
    /// input) is answered as a failure on the link and the link is reopened: the actor,
    /// and every other meter on the link, keeps being served.
    async fn serve(&mut self, work: Execution) {
        let outcome = match CatchUnwind(Box::pin(self.execute(&work))).await {
            Ok(o) => o,
            Err(()) => {
                let e = MeterError::LinkClosed("the channel's exchange panicked; the link is reopened".into());
                self.link_failed(&work.meter, &e);
                Outcome::Error(e)
            }
        };
        crate::observe::control_exchange(self.link.protocol, &work, &outcome);
        let _ = self.answers.send(Input::Executed { command: work.command, attempt: work.attempt, outcome });
    }

    /// Serve everything waiting on the control lane; returns how many.
    async fn serve_waiting_control(&mut self) -> u32 {
        let mut n = 0;
        while let Ok(w) = self.control.try_recv() {
            self.serve(w).await;
            n += 1;
        }
        n
    }

    /// Run a collection job step by step, control work first between steps.
    async fn collect(&mut self, job: CollectJob, lane: &CollectLane) {
        let mut run = JobRun::new(job);
        // Wait for a permit, serving the control lane meanwhile.
        let permit = loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    run.fail(MeterError::Unreachable("shutting down".into()));
                    break None;
                }
                w = self.control.recv() => match w {
                    Some(w) => { self.serve(w).await; run.preempted(1); }
                    None => { run.fail(MeterError::Unreachable("shutting down".into())); break None; }
                },
                p = Arc::clone(&lane.permits).acquire_owned() => break p.ok(),
            }
        };
        let meter_id = run.meter().clone();
        let slot = self.meters.index_of(&meter_id);
        let mut link_failed = false;
        while run.has_step() {
            let served = self.serve_waiting_control().await;
            run.preempted(served);
            if self.shutdown.is_cancelled() {
                run.fail(MeterError::Unreachable("shutting down".into()));
                break;
            }
            if let Err(e) = self.ensure_open().await {
                link_failed = true;
                run.fail(e);
                break;
            }
            let (Some(link), Some(meter)) = (self.open.as_mut(), slot.and_then(|i| self.meters.0.get_mut(i))) else {
                run.fail(MeterError::Unsupported(format!("meter {meter_id} is not on link {}", self.link.name)));
                break;
            };
            let span = tracing::debug_span!("collect", meter = %meter_id);
            let step = run.step(&mut meter.driver, link, &*lane.clock).instrument(span).await;
            crate::observe::exchange(self.link.protocol, step.as_ref().err());
            match step {
                Ok(()) => {
                    self.set_health(LinkHealth::Up);
                }
                Err(e) => {
                    if e.is_link_failure() {
                        link_failed = true;
                        self.link_failed(&meter_id, &e);
                    }
                    run.fail(e);
                }
            }
        }
        // Release the association: a fleet's worth of open sessions would cost memory in
        // the head-end and hold the meters; the next job associates again.
        if !link_failed {
            if let (Some(link), Some(meter)) = (self.open.as_mut(), self.meters.get_mut(&meter_id)) {
                let _ = tokio::time::timeout(Duration::from_secs(2), meter.driver.close(link)).await;
            }
        }
        drop(permit);
        let _ = lane.done.send(run.finish());
    }

    async fn ensure_open(&mut self) -> Result<(), MeterError> {
        if self.open.is_none() {
            match Link::open(&self.link).await {
                Ok(l) => self.open = Some(l),
                Err(e) => {
                    self.set_health(LinkHealth::Down);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn link_failed(&mut self, meter: &MeterId, e: &MeterError) {
        tracing::warn!(link = %self.link.name, %meter, error = %e, "link failure; the link is reopened for the next request");
        // The link is reopened: no meter on it keeps its association or HDLC connection,
        // including one whose collection job was interrupted by this control request.
        for m in self.meters.values_mut() {
            m.driver.reset();
        }
        self.open = None;
        self.set_health(LinkHealth::Down);
    }

    async fn execute(&mut self, work: &Execution) -> Outcome {
        if !self.meters.contains_key(&work.meter) {
            return Outcome::Error(MeterError::Unsupported(format!(
                "meter {} is not on link {}",
                work.meter, self.link.name
            )));
        }
        if let Err(e) = self.ensure_open().await {
            return Outcome::Error(e);
        }
        let (Some(link), Some(meter)) = (self.open.as_mut(), self.meters.get_mut(&work.meter)) else {
            return Outcome::Error(MeterError::Unreachable(self.link.name.clone()));
        };
        let span = crate::observe::exchange_span(work);
        let result = run_op(meter, link, work.op).instrument(span).await;
        match &result {
            Outcome::Error(e) if e.is_link_failure() => self.link_failed(&work.meter, e),
            _ => {
                self.set_health(LinkHealth::Up);
            }
        }
        result
    }

    async fn close(&mut self) {
        if let Some(mut link) = self.open.take() {
            for m in self.meters.values_mut() {
                // Release associations politely, but never hang a shutdown on a dead meter.
                let _ = tokio::time::timeout(Duration::from_secs(2), m.driver.close(&mut link)).await;
            }
        }
    }
}

impl Drop for Actor {
    /// However the actor ends (shutdown, or a panic outside an exchange), work still
    /// queued on its control lane is answered, so no command waits on a dead channel;
    /// the engine's attempt deadline covers an answer lost any other way.
    fn drop(&mut self) {
        self.set_health(LinkHealth::Down);
        self.control.close();
        while let Ok(w) = self.control.try_recv() {
            let outcome = Outcome::Error(MeterError::Unreachable(format!("channel {} stopped", self.link.name)));
            let _ = self.answers.send(Input::Executed { command: w.command, attempt: w.attempt, outcome });
        }
    }
}

/// Polls a future inside `catch_unwind`: a panic becomes `Err(())` instead of taking the
/// actor's task down. The actor's state is made consistent again by the caller
/// (`link_failed` resets every driver and drops the link).
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

async fn run_op(meter: &mut ChannelMeter, link: &mut Link, op: Op) -> Outcome {
    let d = &mut meter.driver;
    match op {
        Op::Disconnect | Op::Reconnect => {
            let Some(expected) = meter.identity.as_deref() else {
                return Outcome::Error(MeterError::IdentityMismatch {
                    expected: "(no identity registered: set `identity` in the configuration)".into(),
                    actual: "(not read)".into(),
                });
            };
            if let Err(e) = d.verify_identity(link, expected).await {
                return Outcome::Error(e);
            }
            let r = if op == Op::Disconnect { d.disconnect(link).await } else { d.reconnect(link).await };
            match r {
                Ok(o) => Outcome::Switched(o),
                Err(e) => Outcome::Error(e),
            }
        }
        Op::VerifyRelay => match d.read_relay(link).await {
            Ok(r) => Outcome::Relay(r.state),
            Err(e) => Outcome::Error(e),
        },
        Op::Read => {
            let relay = match d.read_relay(link).await {
                Ok(r) => r.state,
                Err(e) => return Outcome::Error(e),
            };
            let registers = match d.read_registers(link).await {
                Ok(r) => r,
                Err(e) => return Outcome::Error(e),
            };
            let meter_clock = match d.read_clock(link).await {
                Ok(c) => Some(c.text),
                Err(MeterError::Unsupported(_)) => None,
                Err(e) => return Outcome::Error(e),
            };
            Outcome::Read(ReadResult { relay, registers, meter_clock })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(id: &str) -> Execution {
        Execution {
            command: crate::contract::CommandId::new(id).expect("id"),
            meter: MeterId::new("M1").expect("meter"),
            attempt: 1,
            op: crate::command::Op::Reconnect,
        }
    }

    /// Review finding: a channel that stopped left its queued work unanswered.
    #[tokio::test]
    async fn work_queued_on_a_channel_that_stops_is_answered_with_a_failure() {
        let link: LinkConfig =
            toml::from_str("name = \"l1\"\nprotocol = \"dlms-wrapper\"\naddress = \"127.0.0.1:9\"").expect("link");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let counts = Arc::new(HealthCounts::default());
        let (handle, task) = spawn_counted(link, Vec::new(), tx, None, stop.clone(), Arc::clone(&counts));
        // Stopped before it served anything: both requests are still queued.
        stop.cancel();
        handle.execute(work("c1")).expect("queued");
        handle.execute(work("c2")).expect("queued");
        task.await.expect("the actor ends");
        let mut answered = Vec::new();
        while let Some(Input::Executed { command, outcome, .. }) = rx.recv().await {
            assert!(matches!(outcome, Outcome::Error(MeterError::Unreachable(_))), "{outcome:?}");
            answered.push(command.to_string());
        }
        assert_eq!(answered, vec!["c1", "c2"]);
        assert_eq!(handle.health(), LinkHealth::Down);
        assert_eq!((counts.up(), counts.down()), (0, 1));
        assert!(handle.execute(work("c3")).is_err(), "a stopped channel takes no more work");
    }
}
