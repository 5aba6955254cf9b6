//! Interval collection: schedules, catch-up, and readings that are never lost.
//!
//! - [`schedule`]: sans-IO; which meter is due when, and which range it reads (from the
//!   newest stored row, bounded by the horizon, in chunks).
//! - [`job`]: one job, as the channel actor runs it, one request per step, so that the
//!   actor serves control commands between any two requests.
//! - [`clean`]: bad rows dropped or flagged, counted and logged; gaps reported.
//! - [`collector`]: the task that dispatches jobs and stores what they read.
//! - the outbox (`journal` tables `readings_outbox`, `readings_progress`) and
//!   [`outbox`]: a batch is published after it is stored, deleted after the PUBACK,
//!   published again (the same batch) after a broker or daemon restart.
//! - [`metrics`]: counters and lags, read with [`metrics::Metrics::snapshot`].

pub mod clean;
pub mod collector;
mod config;
pub mod job;
pub mod metrics;
pub mod outbox;
pub mod schedule;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub use collector::{CollectCommand, CollectNote, Planned, SNAPSHOT_SOURCE};
pub use config::{CollectionConfig, DEFAULT_PROFILE, MAX_ROWS_PER_REQUEST};

use crate::channel::{ChannelHandle, CollectLane};
use crate::config::SiteConfig;
use crate::contract::Topics;
use crate::dlms::cosem::parse_obis;
use crate::journal::Journal;
use crate::time::Clock;
use job::JobDone;
use metrics::Metrics;
use schedule::SourceKind;

/// One allocator arena per thread (glibc's default, up to 8 per core) keeps each thread's
/// freed memory apart: buffers a channel actor freed on one worker thread are not reused
/// by another, and a daemon for a large fleet ends up holding several times what it uses
/// (0.7 KiB more per configured meter at 100,000 meters). Arenas made before the call stay,
/// so `headend`'s `main` calls this before the runtime starts its threads.
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; M_ARENA_MAX takes effect for
    // arenas created from now on and is safe to call at any time from any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The meters of a site as the collector sees them.
pub fn plan(site: &SiteConfig) -> Vec<Planned> {
    let default_profile = parse_obis(&site.collection.profile).or_else(|| parse_obis(DEFAULT_PROFILE));
    // One shared name per link rather than a copy per meter.
    let links: HashMap<&str, (Arc<str>, bool)> =
        site.links.iter().map(|l| (l.name.as_str(), (Arc::from(l.name.as_str()), l.protocol.is_dlms()))).collect();
    site.meters
        .iter()
        .filter_map(|m| {
            let (link, dlms) = links.get(m.link.as_str())?.clone();
            let profile = m.profile.as_deref().and_then(parse_obis).or(default_profile)?;
            Some(Planned {
                id: m.id.clone(),
                link,
                kind: if dlms { SourceKind::Profile } else { SourceKind::Snapshot },
                profile,
                offset_min: m.timezone_offset_minutes.unwrap_or(site.policy.utc_offset_minutes),
            })
        })
        .collect()
}

/// The half of a collection the channels need, made before they start.
pub struct Lanes {
    lane: CollectLane,
    done: mpsc::UnboundedReceiver<JobDone>,
}

impl Lanes {
    /// A lane for every channel, bounded by `[collection] max_associations`.
    pub fn new(cfg: &CollectionConfig, clock: Arc<dyn Clock>) -> Self {
        let (done_tx, done) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(cfg.max_associations.max(1) as usize));
        Self { lane: CollectLane { done: done_tx, permits, clock }, done }
    }

    /// What to give [`crate::channel::spawn`].
    pub fn lane(&self) -> CollectLane {
        self.lane.clone()
    }
}

/// A running collection, as the daemon holds it.
pub struct Collection {
    /// Ask it to collect now.
    pub commands: mpsc::UnboundedSender<CollectCommand>,
    /// What it learnt of each meter (drift, newest reading, contact).
    pub notes: mpsc::UnboundedReceiver<CollectNote>,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Collection {
    /// Wait for its tasks after the shutdown token was cancelled.
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Everything [`start`] needs besides the lanes.
pub struct StartArgs<'a> {
    /// The site.
    pub site: &'a SiteConfig,
    /// Its channels.
    pub channels: HashMap<String, ChannelHandle>,
    /// The journal (outbox).
    pub journal: Journal,
    /// The head-end's clock.
    pub clock: Arc<dyn Clock>,
    /// Options for the readings connection.
    pub mqtt: crate::mqtt::ConnectOptions,
    /// The topics.
    pub topics: Topics,
}

/// Start the collector and the outbox publisher.
pub fn start(args: StartArgs<'_>, lanes: Lanes, shutdown: CancellationToken) -> Collection {
    let StartArgs { site, channels, journal, clock, mqtt, topics } = args;
    let meters: Arc<[Planned]> = plan(site).into();
    let metrics = Arc::new(Metrics::new(Arc::clone(&meters)));
    let wake = Arc::new(Notify::new());
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (notes_tx, notes) = mpsc::unbounded_channel();
    let publisher =
        outbox::spawn(mqtt, journal.clone(), topics, Arc::clone(&metrics), Arc::clone(&wake), shutdown.clone());
    let setup = collector::Setup {
        config: site.collection.clone(),
        meters,
        channels,
        journal,
        clock,
        metrics: Arc::clone(&metrics),
        outbox_wake: wake,
        notes: notes_tx,
    };
    let collector = tokio::spawn(collector::run(setup, commands_rx, lanes.done, shutdown));
    Collection { commands, notes, metrics, tasks: vec![collector, publisher] }
}
