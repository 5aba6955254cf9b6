//! The Prometheus recorder, and the values read at scrape time: channel health,
//! collection counters and lags, outbox depth, journal size.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::names;
use crate::channel::{ChannelHandle, LinkHealth};
use crate::collect::metrics::Metrics as CollectMetrics;
use crate::time::Clock;

/// Buckets of the command latency histogram, seconds: a switch takes seconds, a command
/// deferred to the service window or retried until `expires_at` takes hours.
const DURATION_BUCKETS: &[f64] =
    &[0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 24.0 * 3600.0];

/// The process's recorder, installed on first use. None when another recorder was
/// installed first (then our metrics go there, and `/metrics` shows none).
pub(super) fn handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(names::COMMAND_DURATION.into()), DURATION_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::error!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use names::*;
    describe_counter!(COMMANDS, "Commands that reached a final status, by action and status");
    describe_histogram!(COMMAND_DURATION, Unit::Seconds, "Time from accepted to the final status, by action");
    describe_gauge!(CHANNELS, "Channels (links) by state");
    describe_counter!(METER_EXCHANGES, "Exchanges with meters (control executions, collection requests)");
    describe_counter!(METER_ERRORS, "Failed exchanges with meters, by the error's contract code");
    describe_counter!(READINGS_COLLECTED, "Interval rows stored in the readings outbox");
    describe_counter!(READINGS_PUBLISHED, "Reading batches acknowledged by the broker");
    describe_counter!(READINGS_DROPPED, "Interval rows dropped by the bad-data checks, by why");
    describe_counter!(COLLECTION_FAILURES, "Collection jobs that failed, by kind");
    describe_gauge!(COLLECTION_LAG, Unit::Seconds, "Age of the oldest newest-reading among a channel's meters");
    describe_gauge!(COLLECTION_NEVER_READ, "Meters of a channel with no reading stored yet");
    describe_gauge!(OUTBOX_ROWS, "Batches in the readings outbox waiting for the broker");
    describe_gauge!(JOURNAL_BYTES, Unit::Bytes, "Size of the journal file and its write-ahead log");
    describe_gauge!(BROKER_CONNECTED, "1 while the command connection to the broker is up");
    describe_gauge!(QUARANTINE_ACTIVE, "1 while the disconnect quarantine is on");
    describe_counter!(PAYMENTS, "Payments received, by outcome");
    describe_gauge!(CONFIG_GENERATION, "Configuration reloads since start");
    describe_counter!(CONFIG_RELOAD_FAILURES, "Configuration reloads refused");
    describe_gauge!(DRAINING, "1 from SIGTERM until exit");
}

/// What `/metrics` and `/readyz` read from the running daemon.
#[derive(Clone)]
pub struct Sources {
    pub(super) journal: crate::journal::Journal,
    journal_path: PathBuf,
    channels: Vec<ChannelHandle>,
    collection: Option<Arc<CollectMetrics>>,
    clock: Arc<dyn Clock>,
}

impl Sources {
    /// The daemon's journal (and its file), channels, collection counters and clock.
    pub fn new<'a>(
        journal: &crate::journal::Journal,
        journal_path: PathBuf,
        channels: impl IntoIterator<Item = &'a ChannelHandle>,
        collection: Option<&Arc<CollectMetrics>>,
        clock: &Arc<dyn Clock>,
    ) -> Self {
        Self {
            journal: journal.clone(),
            journal_path,
            channels: channels.into_iter().cloned().collect(),
            collection: collection.cloned(),
            clock: Arc::clone(clock),
        }
    }

    /// Set the gauges and counters that are read rather than counted.
    pub(super) fn refresh(&self) {
        let count = |h: LinkHealth| self.channels.iter().filter(|c| c.health() == h).count() as f64;
        for (state, h) in [("up", LinkHealth::Up), ("down", LinkHealth::Down), ("unknown", LinkHealth::Unknown)] {
            metrics::gauge!(names::CHANNELS, "state" => state).set(count(h));
        }
        let wal = {
            let mut p = self.journal_path.clone().into_os_string();
            p.push("-wal");
            PathBuf::from(p)
        };
        let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        metrics::gauge!(names::JOURNAL_BYTES).set((size(&self.journal_path) + size(&wal)) as f64);
        if let Some(c) = &self.collection {
            self.refresh_collection(c);
        }
    }

    fn refresh_collection(&self, c: &CollectMetrics) {
        use std::sync::atomic::Ordering::Relaxed;
        metrics::counter!(names::READINGS_COLLECTED).absolute(c.rows_collected.load(Relaxed));
        metrics::counter!(names::READINGS_PUBLISHED).absolute(c.batches_acked.load(Relaxed));
        metrics::gauge!(names::OUTBOX_ROWS).set(c.outbox_depth.load(Relaxed).max(0) as f64);
        for (kind, n) in c.failures_by_kind() {
            metrics::counter!(names::COLLECTION_FAILURES, "kind" => kind.as_str()).absolute(n);
        }
        let bad = c.bad_data_total();
        for (why, n) in [
            ("bad_time", bad.bad_time),
            ("clock_invalid", bad.clock_invalid),
            ("future_time", bad.future_time),
            ("duplicate", bad.duplicate),
        ] {
            metrics::counter!(names::READINGS_DROPPED, "why" => why).absolute(n);
        }
        let now_s = self.clock.now_ms().div_euclid(1000);
        for (channel, lag, never) in c.channel_lags(now_s) {
            if let Some(lag) = lag {
                metrics::gauge!(names::COLLECTION_LAG, "channel" => channel.clone()).set(lag.max(0) as f64);
            }
            metrics::gauge!(names::COLLECTION_NEVER_READ, "channel" => channel).set(never as f64);
        }
    }
}
