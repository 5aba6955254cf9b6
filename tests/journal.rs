//! The journal on real files: durability across reopen, idempotency, group commit,
//! migrations, the audit trail, and a restart of the engine from what it stored.

use std::path::{Path, PathBuf};

use headend::command::*;
use headend::contract::*;
use headend::journal::*;
use headend::meter::{MeterId, RelayState};
use headend::policy::{PolicyConfig, QuarantineEvent, Registry};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("headend-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
    fn file(&self) -> PathBuf {
        self.0.join("journal.sqlite")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const T0: i64 = 1_795_827_600_000;

fn m(s: &str) -> MeterId {
    MeterId::new(s).expect("meter")
}

fn command(id: &str, meter: &str, body: &str) -> Command {
    let json = format!(r#"{{"id":"{id}",{body}}}"#);
    let req = CommandRequest::parse(json.as_bytes()).expect("valid");
    Command::new(m(meter), req, T0, &CommandsConfig::default())
}

fn reconnect(id: &str, meter: &str) -> Command {
    command(id, meter, r#""action":"reconnect","operator":"95598/wang.li""#)
}

fn payment(id: &str, account: &str, cleared: bool) -> Payment {
    let json = format!(r#"{{"id":"{id}","account":"{account}","amount":"1.00","cleared":{cleared}}}"#);
    Payment::parse(json.as_bytes()).expect("valid")
}

fn persisted(out: &[Output]) -> Vec<Record> {
    out.iter()
        .filter_map(|o| match o {
            Output::Persist(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn registry() -> Registry {
    let mut r = Registry::default();
    r.add_meter(m("M1"), AccountId::new("ACC-1").ok(), "gw", 480);
    r.add_meter(m("M2"), None, "gw", 480);
    r
}

#[tokio::test]
async fn what_was_accepted_is_there_after_reopening() {
    let dir = TempDir::new("reopen");
    {
        let j = Journal::open(&dir.file()).expect("open");
        assert_eq!(j.accept_command(&reconnect("c1", "M1")).await.ok(), Some(Accepted::New));
        assert_eq!(j.accept_command(&reconnect("c2", "M2")).await.ok(), Some(Accepted::New));
        assert_eq!(j.accept_payment(&payment("pay-1", "ACC-1", true), T0 + 5).await.ok(), Some(PaymentAccepted::New));
        let rec = MeterRecord {
            meter: m("M1"),
            relay: RelayState::Disconnected,
            cut_reason: Some(Reason::Arrears),
            since_ms: Some(T0),
        };
        let mut done = ResultMessage::new(Some("c2".into()), "M2", Status::Succeeded, format_at(T0, 480));
        done.attempts = 1;
        let status = StatusRecord {
            command: CommandId::new("c2").expect("id"),
            meter: m("M2"),
            status: Status::Succeeded,
            attempts: 1,
            wake_ms: None,
            at_ms: T0 + 1,
            message: done,
        };
        let trip = QuarantineEvent::Tripped { at_ms: T0, requests: 301 };
        j.record(vec![Record::Meter(rec), Record::Status(status), Record::Quarantine(trip)]).await.expect("record");
    }
    let j = Journal::open(&dir.file()).expect("reopen");
    let pending = j.pending_commands().await.expect("pending");
    assert_eq!(pending.len(), 1, "c2 ended, c1 did not");
    assert_eq!(pending[0].command, reconnect("c1", "M1"));
    assert_eq!((pending[0].status, pending[0].latest.clone()), (Status::Accepted, None));
    let meters = j.meter_states().await.expect("meters");
    assert_eq!(
        meters.first().map(|r| (r.relay, r.cut_reason)),
        Some((RelayState::Disconnected, Some(Reason::Arrears)))
    );
    assert_eq!(j.latest_cleared_payment(&AccountId::new("ACC-1").expect("id")).await.ok(), Some(Some(T0 + 5)));
    assert_eq!(j.latest_cleared_payment(&AccountId::new("ACC-9").expect("id")).await.ok(), Some(None));
    assert_eq!(j.quarantine().await.ok().flatten().map(|q| q.requests), Some(301));
    // The repeat of c2 finds its final status.
    match j.accept_command(&reconnect("c2", "M2")).await {
        Ok(Accepted::Seen { same_content: true, latest: Some(l) }) => assert_eq!(l.status, Status::Succeeded),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn ids_are_idempotency_keys() {
    let dir = TempDir::new("idem");
    let j = Journal::open(&dir.file()).expect("open");
    j.accept_command(&reconnect("c1", "M1")).await.expect("accept");
    let same = j.accept_command(&reconnect("c1", "M1")).await.expect("repeat");
    assert_eq!(same, Accepted::Seen { same_content: true, latest: None });
    let other_meter = j.accept_command(&reconnect("c1", "M2")).await.expect("repeat");
    assert!(matches!(other_meter, Accepted::Seen { same_content: false, .. }));
    let other_action = j.accept_command(&command("c1", "M1", r#""action":"read""#)).await.expect("repeat");
    assert!(matches!(other_action, Accepted::Seen { same_content: false, .. }));
    // Same instant written at another offset is the same content.
    let a = command("c9", "M1", r#""action":"read","expires_at":"2026-11-29T09:00:00+08:00""#);
    let b = command("c9", "M1", r#""action":"read","expires_at":"2026-11-29T01:00:00Z""#);
    j.accept_command(&a).await.expect("accept");
    assert!(matches!(j.accept_command(&b).await, Ok(Accepted::Seen { same_content: true, .. })));
}

#[tokio::test]
async fn payments_are_idempotent_and_may_clear_later() {
    let dir = TempDir::new("pay");
    let j = Journal::open(&dir.file()).expect("open");
    let p = payment("pay-1", "ACC-1", false);
    assert_eq!(j.accept_payment(&p, T0).await.ok(), Some(PaymentAccepted::New));
    assert_eq!(j.accept_payment(&p, T0).await.ok(), Some(PaymentAccepted::Duplicate));
    let acc = AccountId::new("ACC-1").expect("id");
    assert_eq!(j.latest_cleared_payment(&acc).await.ok(), Some(None));
    let cleared = payment("pay-1", "ACC-1", true);
    assert_eq!(j.accept_payment(&cleared, T0 + 9).await.ok(), Some(PaymentAccepted::NowCleared));
    assert_eq!(j.accept_payment(&cleared, T0 + 9).await.ok(), Some(PaymentAccepted::Duplicate));
    assert_eq!(j.accept_payment(&payment("pay-1", "ACC-2", true), T0).await.ok(), Some(PaymentAccepted::Conflict));
    assert_eq!(j.latest_cleared_payment(&acc).await.ok(), Some(Some(T0)), "arrival time of the first message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_commits_in_a_few_transactions() {
    let dir = TempDir::new("burst");
    let j = Journal::open(&dir.file()).expect("open");
    let before = j.stats();
    // Queue everything first (each call enqueues at once), then wait for all.
    let pending: Vec<_> = (0..1000).map(|i| j.accept_command(&reconnect(&format!("c{i}"), "M1"))).collect();
    for p in pending {
        assert_eq!(p.await.ok(), Some(Accepted::New));
    }
    let after = j.stats();
    let transactions = after.transactions - before.transactions;
    assert_eq!(after.writes - before.writes, 1000);
    eprintln!("1000 accepts committed in {transactions} transactions");
    assert!(transactions <= 10, "1000 accepts took {transactions} transactions");
    assert_eq!(j.pending_commands().await.map(|p| p.len()).ok(), Some(1000));
}

#[tokio::test]
async fn a_failing_write_does_not_take_its_batch_down() {
    let dir = TempDir::new("savepoint");
    let j = Journal::open(&dir.file()).expect("open");
    let ghost = StatusRecord {
        command: CommandId::new("ghost").expect("id"),
        meter: m("M1"),
        status: Status::Failed,
        attempts: 0,
        wake_ms: None,
        at_ms: T0,
        message: ResultMessage::new(Some("ghost".into()), "M1", Status::Failed, format_at(T0, 0)),
    };
    let a = j.accept_command(&reconnect("c1", "M1"));
    let bad = j.record(vec![Record::Status(ghost)]);
    let b = j.accept_command(&reconnect("c2", "M1"));
    assert_eq!(a.await.ok(), Some(Accepted::New));
    assert!(matches!(bad.await, Err(JournalError::UnknownCommand(_))));
    assert_eq!(b.await.ok(), Some(Accepted::New));
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("sqlite")
}

#[tokio::test]
async fn an_empty_or_older_file_is_migrated_and_a_newer_one_refused() {
    let dir = TempDir::new("migrate");
    // An empty SQLite database (version 0), with something unrelated in it.
    raw(&dir.file())
        .execute_batch("CREATE TABLE unrelated (x INTEGER); INSERT INTO unrelated VALUES (1);")
        .expect("seed");
    {
        let j = Journal::open(&dir.file()).expect("migrates");
        j.accept_command(&reconnect("c1", "M1")).await.expect("usable");
    }
    let conn = raw(&dir.file());
    let versions: Vec<i64> = conn
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("versions");
    assert_eq!(versions, vec![1, 2, 3]);
    assert_eq!(SCHEMA_VERSION, 3);
    let kept: i64 = conn.query_row("SELECT x FROM unrelated", [], |r| r.get(0)).expect("untouched");
    assert_eq!(kept, 1);
    // Reopening an up-to-date file migrates nothing and loses nothing.
    assert_eq!(Journal::open(&dir.file()).expect("reopen").pending_commands().await.map(|p| p.len()).ok(), Some(1));
    // A file from a newer build is refused, not guessed at.
    conn.execute("INSERT INTO schema_version (version) VALUES (99)", []).expect("bump");
    drop(conn);
    assert!(matches!(Journal::open(&dir.file()), Err(JournalError::NewerSchema { found: 99, supported: 3 })));
}

#[tokio::test]
async fn the_file_is_in_wal_mode_with_full_sync() {
    let dir = TempDir::new("wal");
    let _j = Journal::open(&dir.file()).expect("open");
    let mode: String = raw(&dir.file()).query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("pragma");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn the_engine_restarts_from_the_journal_and_the_audit_trail_tells_the_story() {
    let dir = TempDir::new("restart");
    let cfg = CommandsConfig::default();
    let policy = PolicyConfig { utc_offset_minutes: 480, ..PolicyConfig::default() };
    let cut = command("d1", "M2", r#""action":"disconnect","reason":"maintenance","operator":"field/zhao""#);
    {
        let j = Journal::open(&dir.file()).expect("open");
        let mut e = Engine::new(cfg.clone(), registry(), policy.clone());
        assert_eq!(j.accept_command(&cut).await.ok(), Some(Accepted::New));
        let out = e.handle(Input::Command(cut.clone()), T0);
        assert!(out.iter().any(|o| matches!(o, Output::Execute(x) if x.op == Op::Disconnect)));
        j.record(persisted(&out)).await.expect("record");
        // The daemon dies here, with d1 executing.
    }
    let j = Journal::open(&dir.file()).expect("reopen");
    let rec = j.recover().await.expect("recover");
    assert_eq!(rec.commands.len(), 1);
    let (mut e, out) = Engine::restore(cfg, registry(), policy, rec, T0 + 60_000);
    let verify: Vec<_> =
        out.iter().filter_map(|o| if let Output::Execute(x) = o { Some(x.op) } else { None }).collect();
    assert_eq!(verify, vec![Op::VerifyRelay]);
    let out = e.handle(
        Input::Executed {
            command: CommandId::new("d1").expect("id"),
            attempt: 1,
            outcome: Outcome::Relay(RelayState::Disconnected),
        },
        T0 + 61_000,
    );
    j.record(persisted(&out)).await.expect("record");
    assert!(j.pending_commands().await.expect("pending").is_empty());
    let audit = j.history("M2", 100).await.expect("history");
    let steps: Vec<(&str, Option<&str>)> = audit.iter().map(|a| (a.kind.as_str(), a.status.as_deref())).collect();
    assert_eq!(
        steps,
        vec![
            ("command", Some("accepted")),
            ("status", Some("accepted")),
            ("status", Some("executing")),
            ("meter", None),
            ("status", Some("succeeded")),
        ]
    );
    assert!(audit.iter().filter(|a| a.kind == "status").all(|a| a.operator.as_deref() == Some("field/zhao")));
    assert!(audit.iter().filter(|a| a.kind == "status").all(|a| a.reason.as_deref() == Some("maintenance")));
    // The CLI reads the same trail beside the running writer.
    let cli = read_history(&dir.file(), "M2", 2).expect("read-only history");
    assert_eq!(cli.iter().map(|a| a.seq).collect::<Vec<_>>(), audit[3..].iter().map(|a| a.seq).collect::<Vec<_>>());
}

#[tokio::test]
async fn payment_reconnects_carry_their_trigger_into_the_audit() {
    let dir = TempDir::new("trigger");
    let j = Journal::open(&dir.file()).expect("open");
    let mut e = Engine::new(CommandsConfig::default(), registry(), PolicyConfig::default());
    let cut = command(
        "d1",
        "M1",
        r#""action":"disconnect","reason":"arrears","notice_sent_at":"2026-11-20T10:00:00+08:00","override":{"by":"x","why":"test"}"#,
    );
    j.accept_command(&cut).await.expect("accept");
    let mut records = persisted(&e.handle(Input::Command(cut), T0));
    let done = Input::Executed {
        command: CommandId::new("d1").expect("id"),
        attempt: 1,
        outcome: Outcome::Switched(headend::meter::SwitchOutcome::Done),
    };
    records.extend(persisted(&e.handle(done, T0 + 1)));
    let p = payment("pay-5", "ACC-1", true);
    assert_eq!(j.accept_payment(&p, T0 + 2).await.ok(), Some(PaymentAccepted::New));
    records.extend(persisted(&e.handle(Input::Payment { payment: p, received_ms: T0 + 2 }, T0 + 2)));
    j.record(records).await.expect("record");
    let pending = j.pending_commands().await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].command.trigger.as_ref().map(PaymentId::as_str), Some("pay-5"));
    assert_eq!(pending[0].command.id().as_str(), "pay:pay-5:M1");
    let audit = j.history("M1", 100).await.expect("history");
    assert!(audit
        .iter()
        .any(|a| a.command.as_deref() == Some("pay:pay-5:M1") && a.trigger_payment.as_deref() == Some("pay-5")));
    assert!(audit.iter().any(|a| a.command.as_deref() == Some("d1") && a.detail.contains(r#""override":{"by":"x""#)));
}

#[tokio::test]
async fn a_derived_command_never_takes_over_another_commands_id() {
    let dir = TempDir::new("taken");
    let j = Journal::open(&dir.file()).expect("open");
    let client = reconnect("pay:pay-1:M1", "M1");
    j.accept_command(&client).await.expect("accept");
    let mut derived = command("pay:pay-1:M1", "M1", r#""action":"reconnect""#);
    derived.trigger = PaymentId::new("pay-1").ok();
    assert!(matches!(j.record(vec![Record::Command(derived)]).await, Err(JournalError::IdTaken(_))));
    // The same record replayed is harmless.
    assert!(j.record(vec![Record::Command(client)]).await.is_ok());
}

#[test]
fn pending_answers_can_be_awaited_from_plain_threads() {
    let dir = TempDir::new("blocking");
    let j = Journal::open(&dir.file()).expect("open");
    assert_eq!(j.accept_command(&reconnect("c1", "M1")).wait().ok(), Some(Accepted::New));
    assert_eq!(j.history("M1", 10).wait().map(|h| h.len()).ok(), Some(1));
}

/// Review finding: the payment and its reconnects were two commits; a crash between them
/// lost the reconnects (the redelivered payment is a duplicate). The payment stays
/// unprocessed until its records commit, and recovery feeds it to the engine again.
#[tokio::test]
async fn a_crash_between_a_payment_and_its_reconnects_loses_no_reconnect() {
    let dir = TempDir::new("paycrash");
    {
        let j = Journal::open(&dir.file()).expect("open");
        let cut = MeterRecord {
            meter: m("M1"),
            relay: RelayState::Disconnected,
            cut_reason: Some(Reason::Arrears),
            since_ms: Some(T0),
        };
        j.record(vec![Record::Meter(cut)]).await.expect("cut recorded");
        let p = payment("pay-9", "ACC-1", true);
        assert_eq!(j.accept_payment(&p, T0 + 5).await.ok(), Some(PaymentAccepted::New));
        // The daemon dies here, before the engine's records for the payment commit.
    }
    let j = Journal::open(&dir.file()).expect("reopen");
    assert_eq!(j.accept_payment(&payment("pay-9", "ACC-1", true), T0 + 9).await.ok(), Some(PaymentAccepted::Duplicate));
    let rec = j.recover().await.expect("recover");
    assert_eq!(rec.payments.len(), 1, "the payment is fed again");
    let (_, out) = Engine::restore(CommandsConfig::default(), registry(), PolicyConfig::default(), rec, T0 + 10);
    let records = persisted(&out);
    assert!(
        records.iter().any(|r| matches!(r, Record::Command(c) if c.id().as_str() == "pay:pay-9:M1")),
        "the reconnect is derived at recovery: {records:?}"
    );
    assert!(out.iter().any(|o| matches!(o, Output::Execute(x) if x.op == Op::Reconnect)));
    j.record(records).await.expect("record");
    // Committed with its reconnect: not fed a second time.
    let rec = j.recover().await.expect("recover again");
    assert!(rec.payments.is_empty());
    assert_eq!(rec.commands.len(), 1);
    // A payment that was not cleared needs no processing.
    j.accept_payment(&payment("pay-10", "ACC-1", false), T0 + 20).await.expect("accept");
    assert!(j.recover().await.expect("recover").payments.is_empty());
}

/// The publish outbox: messages committed with their records, kept until acknowledged.
#[tokio::test]
async fn messages_committed_with_their_records_stay_until_acknowledged() {
    let dir = TempDir::new("outbox");
    let msg = |n: u32| OutMessage { topic: format!("t/{n}"), payload: format!("{{\"n\":{n}}}"), retain: n == 2 };
    let seqs = {
        let j = Journal::open(&dir.file()).expect("open");
        let mut e = Engine::new(CommandsConfig::default(), registry(), PolicyConfig::default());
        let c = reconnect("c1", "M1");
        let taken = j.accept_all(vec![Arrival::Command(c.clone())]).await.expect("accept");
        assert_eq!(taken, vec![Taken::Command(Accepted::New)]);
        let records = persisted(&e.handle(Input::Command(c), T0));
        j.commit(records, vec![msg(1), msg(2), msg(3)]).await.expect("commit")
    };
    assert_eq!(seqs.len(), 3);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    // After a crash: the records and every message are there, in order.
    let j = Journal::open(&dir.file()).expect("reopen");
    assert_eq!(j.pending_commands().await.expect("pending")[0].status, Status::Executing);
    let left = j.unpublished().await.expect("outbox");
    assert_eq!(left.iter().map(|u| u.message.clone()).collect::<Vec<_>>(), vec![msg(1), msg(2), msg(3)]);
    j.published(vec![seqs[0], seqs[2]]).await.expect("acknowledged");
    let left = j.unpublished().await.expect("outbox");
    assert_eq!(left.iter().map(|u| (u.seq, u.message.retain)).collect::<Vec<_>>(), vec![(seqs[1], true)]);
    // A failing record takes its messages down with it: never a message for nothing.
    let bad = Record::Status(StatusRecord {
        command: CommandId::new("nope").expect("id"),
        meter: m("M1"),
        status: Status::Failed,
        attempts: 1,
        wake_ms: None,
        at_ms: T0,
        message: ResultMessage::new(Some("nope".into()), "M1", Status::Failed, "2026-11-28T09:00:00+08:00".into()),
    });
    assert!(j.commit(vec![bad], vec![msg(4)]).await.is_err());
    assert_eq!(j.unpublished().await.expect("outbox").len(), 1);
}
