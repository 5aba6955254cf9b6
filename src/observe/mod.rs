//! Observability: Prometheus metrics, `/metrics` `/healthz` `/readyz`, structured logs
//! with one span per command, and the daemon's observable events.
//!
//! Each event is defined once, here, and emits both its log line and its metric (the
//! rest of the code makes one call at the point where the event happens). Counters kept
//! elsewhere (interval collection's, in [`crate::collect::metrics`]) are read at scrape
//! time rather than counted twice. The metric names are part of the deployment's
//! contract (alert rules, dashboard): `docs/metrics.md` lists them all.
//!
//! Without `[observability] listen` no recorder is installed and every metric call is a
//! no-op; the log lines are written either way.

mod config;
mod exporter;
mod http;
pub mod logs;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tracing::Span;

pub use config::ObservabilityConfig;
pub use exporter::Sources;
pub use http::{bind, stop, Endpoints, ObserveError, Running};

use crate::command::{Execution, Outcome};
use crate::config::LinkProtocol;
use crate::contract::{PaymentOutcome, ResultMessage, Status};
use crate::meter::MeterError;

/// The metric names (see `docs/metrics.md`).
pub mod names {
    /// Commands that reached a final status, by `action` and `status`.
    pub const COMMANDS: &str = "headend_commands_total";
    /// Seconds from `accepted` to the final status, by `action`.
    pub const COMMAND_DURATION: &str = "headend_command_duration_seconds";
    /// Channels (links) by `state`: up, down, unknown (not tried yet).
    pub const CHANNELS: &str = "headend_channels";
    /// Exchanges with meters (a control execution or a collection request), by `protocol`.
    pub const METER_EXCHANGES: &str = "headend_meter_exchanges_total";
    /// Failed exchanges by `kind` (the meter error's contract code).
    pub const METER_ERRORS: &str = "headend_meter_errors_total";
    /// Interval rows stored in the readings outbox.
    pub const READINGS_COLLECTED: &str = "headend_readings_collected_total";
    /// Reading batches the broker acknowledged.
    pub const READINGS_PUBLISHED: &str = "headend_readings_batches_published_total";
    /// Rows dropped by the bad-data checks, by `why`.
    pub const READINGS_DROPPED: &str = "headend_readings_dropped_total";
    /// Collection jobs that failed, by `kind`.
    pub const COLLECTION_FAILURES: &str = "headend_collection_failures_total";
    /// Per `channel`: age of the oldest newest-reading among its meters, seconds.
    pub const COLLECTION_LAG: &str = "headend_collection_lag_seconds";
    /// Per `channel`: meters with no reading stored yet.
    pub const COLLECTION_NEVER_READ: &str = "headend_collection_meters_without_readings";
    /// Rows (batches) in the readings outbox, waiting for the broker.
    pub const OUTBOX_ROWS: &str = "headend_outbox_rows";
    /// Bytes of the journal file and its write-ahead log.
    pub const JOURNAL_BYTES: &str = "headend_journal_bytes";
    /// 1 while the command connection to the broker is up.
    pub const BROKER_CONNECTED: &str = "headend_broker_connected";
    /// 1 while the disconnect quarantine is on.
    pub const QUARANTINE_ACTIVE: &str = "headend_quarantine_active";
    /// Payments received, by `outcome`.
    pub const PAYMENTS: &str = "headend_payments_total";
    /// How many times the configuration was reloaded (`status.config_generation`).
    pub const CONFIG_GENERATION: &str = "headend_config_generation";
    /// Reloads refused (the file did not check); the running configuration stayed.
    pub const CONFIG_RELOAD_FAILURES: &str = "headend_config_reload_failures_total";
    /// 1 from SIGTERM until the daemon exits.
    pub const DRAINING: &str = "headend_draining";
}

static BROKER_UP: AtomicBool = AtomicBool::new(false);
static DRAINING: AtomicBool = AtomicBool::new(false);

/// A command being followed: its span (every status change and exchange is logged in
/// it) and when it was accepted in this process.
struct Tracked {
    span: Span,
    accepted: Option<Instant>,
}

fn commands() -> &'static Mutex<HashMap<String, Tracked>> {
    static COMMANDS: OnceLock<Mutex<HashMap<String, Tracked>>> = OnceLock::new();
    COMMANDS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn command_span(id: &str, meter: &str, action: &str) -> Span {
    tracing::info_span!(parent: None, "command", id = %id, meter = %meter, action = %action)
}

/// The daemon starts: nothing is connected or draining yet (one daemon per process).
fn reset() {
    BROKER_UP.store(false, Ordering::Relaxed);
    DRAINING.store(false, Ordering::Relaxed);
    ::metrics::gauge!(names::BROKER_CONNECTED).set(0.0);
    ::metrics::gauge!(names::DRAINING).set(0.0);
    ::metrics::gauge!(names::QUARANTINE_ACTIVE).set(0.0);
    ::metrics::gauge!(names::CONFIG_GENERATION).set(0.0);
}

/// A command's status was published: logged in the command's span; a final status is
/// counted, with its time since `accepted`.
pub fn command_status(msg: &ResultMessage) {
    if msg.duplicate {
        return;
    }
    let action = msg.action.map_or("unknown", |a| a.as_str());
    let status = msg.status.as_str();
    let code = msg.error.as_ref().map(|e| e.code.as_str());
    let detail = msg.error.as_ref().map(|e| e.message.as_str());
    let tracked = msg.id.as_deref().and_then(|id| {
        let mut map = commands().lock().ok()?;
        if msg.status.is_final() {
            let t = map
                .remove(id)
                .unwrap_or_else(|| Tracked { span: command_span(id, &msg.meter, action), accepted: None });
            Some((t.span, t.accepted))
        } else {
            let t = map
                .entry(id.to_owned())
                .or_insert_with(|| Tracked { span: command_span(id, &msg.meter, action), accepted: None });
            if msg.status == Status::Accepted && t.accepted.is_none() {
                t.accepted = Some(Instant::now());
            }
            Some((t.span.clone(), t.accepted))
        }
    });
    let (span, accepted) = tracked.unwrap_or_else(|| (command_span("-", &msg.meter, action), None));
    span.in_scope(|| match msg.status {
        Status::Failed | Status::Expired => {
            tracing::warn!(status, attempts = msg.attempts, code, detail, "command status")
        }
        _ => tracing::info!(status, attempts = msg.attempts, code, detail, "command status"),
    });
    if msg.status.is_final() {
        ::metrics::counter!(names::COMMANDS, "action" => action, "status" => status).increment(1);
        if let Some(t) = accepted {
            ::metrics::histogram!(names::COMMAND_DURATION, "action" => action).record(t.elapsed().as_secs_f64());
        }
    }
}

/// The span a channel runs a command's execution in: a child of the command's span.
pub fn exchange_span(work: &Execution) -> Span {
    let parent = commands().lock().ok().and_then(|m| m.get(work.command.as_str()).map(|t| t.span.clone()));
    match parent {
        Some(p) => tracing::info_span!(parent: &p, "exchange", op = ?work.op, attempt = work.attempt),
        None => tracing::info_span!(
            "exchange", command = %work.command, meter = %work.meter, op = ?work.op, attempt = work.attempt
        ),
    }
}

fn protocol_label(p: LinkProtocol) -> &'static str {
    if p.is_dlms() {
        "dlms"
    } else {
        "modbus"
    }
}

/// An exchange with a meter ended (one control execution, or one collection request).
pub fn exchange(protocol: LinkProtocol, error: Option<&MeterError>) {
    ::metrics::counter!(names::METER_EXCHANGES, "protocol" => protocol_label(protocol)).increment(1);
    if let Some(e) = error {
        ::metrics::counter!(names::METER_ERRORS, "kind" => e.code()).increment(1);
        tracing::debug!(protocol = protocol_label(protocol), kind = e.code(), error = %e, "exchange failed");
    }
}

/// A control execution ended on a channel: counted, and logged in the command's span.
pub fn control_exchange(protocol: LinkProtocol, work: &Execution, outcome: &Outcome) {
    let error = if let Outcome::Error(e) = outcome { Some(e) } else { None };
    exchange(protocol, error);
    let span = commands().lock().ok().and_then(|m| m.get(work.command.as_str()).map(|t| t.span.clone()));
    let span = span.unwrap_or_else(|| command_span(work.command.as_str(), work.meter.as_str(), "-"));
    span.in_scope(|| match error {
        None => tracing::info!(op = ?work.op, attempt = work.attempt, "exchange done"),
        Some(e) => {
            tracing::info!(op = ?work.op, attempt = work.attempt, kind = e.code(), error = %e, "exchange failed")
        }
    });
}

/// The command connection to the broker is up.
pub fn broker_connected() {
    if !BROKER_UP.swap(true, Ordering::Relaxed) {
        tracing::info!("connected to the broker");
    }
    ::metrics::gauge!(names::BROKER_CONNECTED).set(1.0);
}

/// The command connection to the broker failed; the daemon reconnects.
pub fn broker_lost(error: &dyn Display) {
    BROKER_UP.store(false, Ordering::Relaxed);
    ::metrics::gauge!(names::BROKER_CONNECTED).set(0.0);
    tracing::warn!(error = %error, "broker connection lost; reconnecting");
}

/// Whether the command connection is up (readiness).
pub fn broker_is_up() -> bool {
    BROKER_UP.load(Ordering::Relaxed)
}

/// The disconnect quarantine, as the engine has it now.
pub fn quarantine(active: bool) {
    ::metrics::gauge!(names::QUARANTINE_ACTIVE).set(if active { 1.0 } else { 0.0 });
}

/// What became of a payment.
pub fn payment(outcome: &PaymentOutcome) {
    let label = payment_label(outcome);
    ::metrics::counter!(names::PAYMENTS, "outcome" => label).increment(1);
    let id = outcome.id.as_deref().unwrap_or("-");
    match &outcome.error {
        Some(e) => {
            tracing::warn!(payment = %id, outcome = label, code = e.code.as_str(), message = %e.message, "payment refused")
        }
        None => tracing::info!(payment = %id, outcome = label, reconnects = outcome.reconnects.len(), "payment"),
    }
}

fn payment_label(outcome: &PaymentOutcome) -> &'static str {
    match (&outcome.error, outcome.duplicate, outcome.cleared) {
        (Some(_), true, _) => "conflict",
        (Some(_), false, _) => "invalid",
        (None, true, _) => "duplicate",
        (None, false, true) => "cleared",
        (None, false, false) => "not_cleared",
    }
}

/// The configuration was reloaded (SIGHUP).
pub fn config_reloaded(generation: u64) {
    ::metrics::gauge!(names::CONFIG_GENERATION).set(generation as f64);
    tracing::info!(generation, "configuration reloaded");
}

/// A reload was refused; the running configuration stays.
pub fn config_refused(error: &dyn Display) {
    ::metrics::counter!(names::CONFIG_RELOAD_FAILURES).increment(1);
    tracing::error!(error = %error, "SIGHUP: configuration refused; keeping the running one");
}

/// Shutdown began: no new work; `/readyz` answers 503.
pub fn draining() {
    DRAINING.store(true, Ordering::Relaxed);
    ::metrics::gauge!(names::DRAINING).set(1.0);
}

/// Whether shutdown has begun.
pub fn is_draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{ErrorBody, ErrorCode};

    #[test]
    fn payment_outcomes() {
        let base = PaymentOutcome {
            id: Some("p1".into()),
            account: Some("A".into()),
            cleared: true,
            duplicate: false,
            reconnects: Vec::new(),
            error: None,
        };
        let err = Some(ErrorBody::new(ErrorCode::DuplicateId, "different content"));
        let cases = [
            (base.clone(), "cleared"),
            (PaymentOutcome { cleared: false, ..base.clone() }, "not_cleared"),
            (PaymentOutcome { duplicate: true, ..base.clone() }, "duplicate"),
            (PaymentOutcome { duplicate: true, error: err.clone(), ..base.clone() }, "conflict"),
            (PaymentOutcome { error: err, id: None, ..base }, "invalid"),
        ];
        for (o, want) in cases {
            assert_eq!(payment_label(&o), want, "{o:?}");
        }
    }
}
