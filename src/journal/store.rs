//! The journal's SQL: each function runs on the writer thread's connection, inside the
//! batch transaction for writes. Stored data is read back through the same validating
//! parsers as MQTT input, so a damaged row is an error, never a panic.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{Accepted, AuditEntry, JournalError, PaymentAccepted};
use crate::command::{Command, MeterRecord, Record, StoredCommand};
use crate::contract::{AccountId, CommandRequest, Payment, PaymentId, Reason, ResultMessage, Status};
use crate::meter::{MeterId, RelayState};
use crate::policy::{QuarantineEvent, QuarantineState};

fn corrupt(what: impl Into<String>) -> JournalError {
    JournalError::Corrupt(what.into())
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn relay_text(r: RelayState) -> String {
    r.to_string()
}

fn relay_from(s: &str) -> Option<RelayState> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

fn insert_command(c: &Connection, cmd: &Command, kind: &str) -> Result<bool, JournalError> {
    let r = &cmd.request;
    let request = r.to_json();
    let trigger = cmd.trigger.as_ref().map(PaymentId::as_str);
    let reason = r.reason.map(Reason::as_str);
    let n = c
        .prepare_cached(
            "INSERT OR IGNORE INTO commands (id, meter, action, reason, operator, trigger_payment, request,
             received_ms, expires_ms, status, attempts, final, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'accepted', 0, 0, ?8)",
        )?
        .execute(params![
            r.id.as_str(),
            cmd.meter.as_str(),
            r.action.as_str(),
            reason,
            r.operator,
            trigger,
            request,
            cmd.received_ms,
            cmd.expires_ms
        ])?;
    if n == 1 {
        c.prepare_cached(
            "INSERT INTO events (at_ms, kind, meter, command, status, operator, reason, trigger_payment, detail)
             VALUES (?1, ?2, ?3, ?4, 'accepted', ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            cmd.received_ms,
            kind,
            cmd.meter.as_str(),
            r.id.as_str(),
            r.operator,
            reason,
            trigger,
            request
        ])?;
    }
    Ok(n == 1)
}

/// Insert a new command, or say what is already stored under its id.
pub(super) fn accept_command(c: &Connection, cmd: &Command) -> Result<Accepted, JournalError> {
    let stored: Option<(String, String, Option<String>)> = c
        .prepare_cached("SELECT meter, request, latest FROM commands WHERE id = ?1")?
        .query_row([cmd.id().as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((meter, request, latest)) = stored else {
        insert_command(c, cmd, "command")?;
        return Ok(Accepted::New);
    };
    let req = CommandRequest::parse(request.as_bytes()).map_err(|e| corrupt(format!("command {}: {e}", cmd.id())))?;
    let same_content = meter == cmd.meter.as_str() && req == cmd.request;
    let latest = latest.and_then(|l| serde_json::from_str::<ResultMessage>(&l).ok()).map(Box::new);
    Ok(Accepted::Seen { same_content, latest })
}

/// Insert a new payment, or classify a repeat.
pub(super) fn accept_payment(c: &Connection, p: &Payment, received_ms: i64) -> Result<PaymentAccepted, JournalError> {
    let body = p.to_json();
    let confirmed = p.confirmed_at.map(|t| t.unix_ms());
    let stored: Option<String> = c
        .prepare_cached("SELECT body FROM payments WHERE id = ?1")?
        .query_row([p.id.as_str()], |r| r.get(0))
        .optional()?;
    let outcome = match stored {
        None => {
            // A cleared payment is unprocessed until the engine's records for it commit.
            c.prepare_cached(
                "INSERT INTO payments (id, account, cleared, confirmed_ms, received_ms, body, processed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NOT ?3)",
            )?
            .execute(params![
                p.id.as_str(),
                p.account.as_str(),
                p.cleared,
                confirmed,
                received_ms,
                body
            ])?;
            PaymentAccepted::New
        }
        Some(old) => {
            let old = Payment::parse(old.as_bytes()).map_err(|e| corrupt(format!("payment {}: {e}", p.id)))?;
            // Billing may announce a payment before it clears and again once it has:
            // the second message completes the first rather than conflicting with it.
            let upgraded = Payment { cleared: true, confirmed_at: p.confirmed_at, ..old.clone() };
            if &old == p {
                return Ok(PaymentAccepted::Duplicate);
            } else if !old.cleared && p.cleared && &upgraded == p {
                c.prepare_cached(
                    "UPDATE payments SET cleared = 1, confirmed_ms = ?2, body = ?3, processed = 0 WHERE id = ?1",
                )?
                .execute(params![p.id.as_str(), confirmed, body])?;
                PaymentAccepted::NowCleared
            } else {
                PaymentAccepted::Conflict
            }
        }
    };
    if outcome != PaymentAccepted::Conflict {
        c.prepare_cached("INSERT INTO events (at_ms, kind, trigger_payment, detail) VALUES (?1, 'payment', ?2, ?3)")?
            .execute(params![received_ms, p.id.as_str(), body])?;
    }
    Ok(outcome)
}

/// Write one engine record.
pub(super) fn apply(c: &Connection, rec: &Record) -> Result<(), JournalError> {
    match rec {
        Record::Command(cmd) => {
            // A replayed batch finds its own row; a different command under the same id
            // (a client id that happens to look derived) must not have its row taken over.
            if !insert_command(c, cmd, "command")? {
                if let Accepted::Seen { same_content: false, .. } = accept_command(c, cmd)? {
                    return Err(JournalError::IdTaken(cmd.id().to_string()));
                }
            }
        }
        Record::Status(s) => {
            let message = json(&s.message);
            let n = c
                .prepare_cached(
                    "UPDATE commands SET status = ?2, attempts = ?3, wake_ms = ?4, final = ?5, latest = ?6,
                     updated_ms = ?7 WHERE id = ?1",
                )?
                .execute(params![
                    s.command.as_str(),
                    s.status.as_str(),
                    s.attempts,
                    s.wake_ms,
                    s.status.is_final(),
                    message,
                    s.at_ms
                ])?;
            if n == 0 {
                return Err(JournalError::UnknownCommand(s.command.to_string()));
            }
            c.prepare_cached(
                "INSERT INTO events (at_ms, kind, meter, command, status, operator, reason, trigger_payment, detail)
                 SELECT ?1, 'status', meter, id, ?2, operator, reason, trigger_payment, ?3
                 FROM commands WHERE id = ?4",
            )?
            .execute(params![s.at_ms, s.status.as_str(), message, s.command.as_str()])?;
        }
        Record::Meter(m) => {
            let at = m.since_ms.unwrap_or(0);
            c.prepare_cached(
                "INSERT INTO meters (meter, relay, cut_reason, since_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(meter) DO UPDATE SET relay = ?2, cut_reason = ?3, since_ms = ?4, updated_ms = ?5",
            )?
            .execute(params![
                m.meter.as_str(),
                relay_text(m.relay),
                m.cut_reason.map(Reason::as_str),
                m.since_ms,
                at
            ])?;
            let detail = serde_json::json!({"relay": relay_text(m.relay), "cut_reason": m.cut_reason});
            c.prepare_cached(
                "INSERT INTO events (at_ms, kind, meter, reason, detail) VALUES (?1, 'meter', ?2, ?3, ?4)",
            )?
            .execute(params![
                at,
                m.meter.as_str(),
                m.cut_reason.map(Reason::as_str),
                detail.to_string()
            ])?;
        }
        Record::PaymentProcessed(id) => {
            c.prepare_cached("UPDATE payments SET processed = 1 WHERE id = ?1")?.execute([id.as_str()])?;
        }
        Record::Quarantine(ev) => {
            let (at, name, operator) = match ev {
                QuarantineEvent::Tripped { at_ms, .. } => (*at_ms, "tripped", None),
                QuarantineEvent::Lifted { at_ms, by, .. } => (*at_ms, "lifted", Some(by.as_str())),
            };
            let detail = json(ev);
            c.prepare_cached("INSERT INTO quarantine (at_ms, event, detail) VALUES (?1, ?2, ?3)")?
                .execute(params![at, name, detail])?;
            c.prepare_cached("INSERT INTO events (at_ms, kind, operator, detail) VALUES (?1, 'quarantine', ?2, ?3)")?
                .execute(params![at, operator, detail])?;
        }
        Record::Note { meter, message } => {
            let at = crate::time::parse_rfc3339_ms(&message.at).unwrap_or(0);
            c.prepare_cached(
                "INSERT INTO events (at_ms, kind, meter, command, status, detail) VALUES (?1, 'note', ?2, ?3, ?4, ?5)",
            )?
            .execute(params![at, meter, message.id, message.status.as_str(), json(message)])?;
        }
    }
    Ok(())
}

/// A `commands` row as stored, before it is checked.
struct RawCommand {
    id: String,
    meter: String,
    request: String,
    received_ms: i64,
    expires_ms: i64,
    trigger: Option<String>,
    status: String,
    attempts: u32,
    wake_ms: Option<i64>,
    latest: Option<String>,
}

fn raw_command(r: &Row<'_>) -> rusqlite::Result<RawCommand> {
    Ok(RawCommand {
        id: r.get(0)?,
        meter: r.get(1)?,
        request: r.get(2)?,
        received_ms: r.get(3)?,
        expires_ms: r.get(4)?,
        trigger: r.get(5)?,
        status: r.get(6)?,
        attempts: r.get(7)?,
        wake_ms: r.get(8)?,
        latest: r.get(9)?,
    })
}

/// Every command that has not ended, in acceptance order.
pub(super) fn pending_commands(c: &Connection) -> Result<Vec<StoredCommand>, JournalError> {
    let mut st = c.prepare(
        "SELECT id, meter, request, received_ms, expires_ms, trigger_payment, status, attempts, wake_ms, latest
         FROM commands WHERE final = 0 ORDER BY seq",
    )?;
    let rows = st.query_map([], raw_command)?;
    let mut out = Vec::new();
    for row in rows {
        let RawCommand { id, meter, request, received_ms, expires_ms, trigger, status, attempts, wake_ms, latest } =
            row?;
        let bad = |what: &str| corrupt(format!("command {id}: {what}"));
        let meter = MeterId::new(&meter).map_err(|e| bad(&e.to_string()))?;
        let request = CommandRequest::parse(request.as_bytes()).map_err(|e| bad(&e.to_string()))?;
        let trigger = trigger.map(|t| PaymentId::new(&t)).transpose().map_err(|e| bad(&e.to_string()))?;
        let status = Status::from_wire(&status).ok_or_else(|| bad("unknown status"))?;
        let latest = latest.map(|l| serde_json::from_str(&l)).transpose().map_err(|e| bad(&e.to_string()))?;
        let command = Command { meter, request, received_ms, expires_ms, trigger };
        out.push(StoredCommand { command, status, attempts, wake_ms, latest });
    }
    Ok(out)
}

/// The meters' relay knowledge.
pub(super) fn meter_states(c: &Connection) -> Result<Vec<MeterRecord>, JournalError> {
    let mut st = c.prepare("SELECT meter, relay, cut_reason, since_ms FROM meters ORDER BY meter")?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?, r.get(3)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (meter, relay, cut, since_ms) = row?;
        let bad = |what: &str| corrupt(format!("meter {meter}: {what}"));
        out.push(MeterRecord {
            meter: MeterId::new(&meter).map_err(|e| bad(&e.to_string()))?,
            relay: relay_from(&relay).ok_or_else(|| bad("unknown relay state"))?,
            cut_reason: cut.map(|c| Reason::from_wire(&c).ok_or_else(|| bad("unknown reason"))).transpose()?,
            since_ms,
        });
    }
    Ok(out)
}

/// Latest cleared payment's `confirmed_at` (else arrival) per account, or for one.
pub(super) fn latest_cleared(
    c: &Connection,
    account: Option<&AccountId>,
) -> Result<Vec<(AccountId, i64)>, JournalError> {
    let mut st = c.prepare(
        "SELECT account, max(coalesce(confirmed_ms, received_ms)) FROM payments
         WHERE cleared = 1 AND (?1 IS NULL OR account = ?1) GROUP BY account ORDER BY account",
    )?;
    let rows = st.query_map([account.map(AccountId::as_str)], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (a, t) = row?;
        out.push((AccountId::new(&a).map_err(|e| corrupt(format!("payment account: {e}")))?, t));
    }
    Ok(out)
}

/// Cleared payments whose reconnects were never committed, in arrival order, with when
/// they arrived.
pub(super) fn unprocessed_payments(c: &Connection) -> Result<Vec<(Payment, i64)>, JournalError> {
    let mut st =
        c.prepare("SELECT id, body, received_ms FROM payments WHERE cleared = 1 AND processed = 0 ORDER BY rowid")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, body, received_ms) = row?;
        let p = Payment::parse(body.as_bytes()).map_err(|e| corrupt(format!("payment {id}: {e}")))?;
        out.push((p, received_ms));
    }
    Ok(out)
}

/// The quarantine, if its latest event is a trip.
pub(super) fn quarantine(c: &Connection) -> Result<Option<QuarantineState>, JournalError> {
    let last: Option<String> =
        c.query_row("SELECT detail FROM quarantine ORDER BY seq DESC LIMIT 1", [], |r| r.get(0)).optional()?;
    let Some(detail) = last else { return Ok(None) };
    match serde_json::from_str(&detail).map_err(|e| corrupt(format!("quarantine event: {e}")))? {
        QuarantineEvent::Tripped { at_ms, requests } => Ok(Some(QuarantineState { since_ms: at_ms, requests })),
        QuarantineEvent::Lifted { .. } => Ok(None),
    }
}

/// The newest `limit` audit entries of a meter, oldest first.
pub(super) fn history(c: &Connection, meter: &str, limit: u32) -> Result<Vec<AuditEntry>, JournalError> {
    let mut st = c.prepare(
        "SELECT seq, at_ms, kind, meter, command, status, operator, reason, trigger_payment, detail FROM
           (SELECT * FROM events WHERE meter = ?1 ORDER BY seq DESC LIMIT ?2) ORDER BY seq",
    )?;
    let rows = st.query_map(params![meter, limit], |r| {
        Ok(AuditEntry {
            seq: r.get(0)?,
            at_ms: r.get(1)?,
            kind: r.get(2)?,
            meter: r.get(3)?,
            command: r.get(4)?,
            status: r.get(5)?,
            operator: r.get(6)?,
            reason: r.get(7)?,
            trigger_payment: r.get(8)?,
            detail: r.get(9)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
