//! The command life cycle, driven in virtual time with no I/O: the engine's outputs are
//! checked as the daemon would carry them out. 2026-11-24 is a Tuesday.

use headend::command::*;
use headend::contract::*;
use headend::meter::{MeterError, MeterId, Reading, RelayState, SwitchOutcome};
use headend::policy::{PolicyConfig, Protection, RateConfig, Registry};
use serde_json::json;

const S: i64 = 1000;
const H: i64 = 3_600_000;

fn at(t: &str) -> i64 {
    Timestamp::parse(t).map(Timestamp::unix_ms).unwrap_or(i64::MIN)
}
fn m(s: &str) -> MeterId {
    MeterId::new(s).expect("meter id")
}
fn cid(s: &str) -> CommandId {
    CommandId::new(s).expect("command id")
}
fn acc(s: &str) -> AccountId {
    AccountId::new(s).expect("account id")
}

/// M1, M2: account ACC-1 on channel gw1. M3: protected ACC-2. M4: no account, gw2.
fn registry() -> Registry {
    let mut r = Registry::default();
    r.add_meter(m("M1"), Some(acc("ACC-1")), "gw1", 480);
    r.add_meter(m("M2"), Some(acc("ACC-1")), "gw1", 480);
    r.add_meter(m("M3"), Some(acc("ACC-2")), "gw1", 480);
    r.add_meter(m("M4"), None, "gw2", 480);
    r.protect(acc("ACC-2"), Protection::LifeSupport);
    r
}

struct Rig {
    e: Engine,
    now: i64,
    cfg: CommandsConfig,
}

impl Rig {
    fn new() -> Self {
        Self::with_policy(PolicyConfig { utc_offset_minutes: 480, ..PolicyConfig::default() })
    }
    fn with_policy(p: PolicyConfig) -> Self {
        let cfg = CommandsConfig::default();
        Self { e: Engine::new(cfg.clone(), registry(), p), now: at("2026-11-24T10:00:00+08:00"), cfg }
    }
    fn command(&mut self, meter: &str, body: serde_json::Value) -> Vec<Output> {
        let req = CommandRequest::parse(body.to_string().as_bytes()).expect("valid command");
        let c = Command::new(m(meter), req, self.now, &self.cfg);
        self.e.handle(Input::Command(c), self.now)
    }
    fn arrears_cut(&mut self, id: &str, meter: &str) -> Vec<Output> {
        let notice = format_at(self.now - 100 * H, 480);
        let asof = format_at(self.now - H, 480);
        self.command(
            meter,
            json!({"id": id, "action": "disconnect", "reason": "arrears", "notice_sent_at": notice, "arrears_as_of": asof}),
        )
    }
    fn done(&mut self, id: &str, attempt: u32, outcome: Outcome) -> Vec<Output> {
        self.e.handle(Input::Executed { command: cid(id), attempt, outcome }, self.now)
    }
    fn tick_to(&mut self, t: i64) -> Vec<Output> {
        self.now = t;
        self.e.handle(Input::Tick, t)
    }
    fn pay(&mut self, id: &str, account: &str, cleared: bool) -> Vec<Output> {
        let body = json!({"id": id, "account": account, "amount": "10.00", "cleared": cleared});
        let payment = Payment::parse(body.to_string().as_bytes()).expect("valid payment");
        self.e.handle(Input::Payment { payment, received_ms: self.now }, self.now)
    }
}

/// (id, status) of every published message, checking each was persisted before.
fn published(out: &[Output]) -> Vec<(String, Status)> {
    let mut seen = Vec::new();
    for (i, o) in out.iter().enumerate() {
        if let Output::Publish { message, .. } = o {
            let persisted = out[..i].iter().any(|p| match p {
                Output::Persist(Record::Status(s)) => &s.message == message,
                Output::Persist(Record::Note { message: n, .. }) => n == message,
                _ => false,
            });
            assert!(persisted, "published before persisted: {message:?}");
            seen.push((message.id.clone().unwrap_or_default(), message.status));
        }
    }
    seen
}

fn msgs(out: &[Output]) -> Vec<&ResultMessage> {
    out.iter()
        .filter_map(|o| match o {
            Output::Publish { message, .. } => Some(message),
            _ => None,
        })
        .collect()
}

fn last_msg(out: &[Output]) -> ResultMessage {
    msgs(out).last().map(|m| (*m).clone()).expect("a message")
}

fn execs(out: &[Output]) -> Vec<(String, u32, Op)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Execute(x) => Some((x.command.to_string(), x.attempt, x.op)),
            _ => None,
        })
        .collect()
}

fn st(id: &str, s: Status) -> (String, Status) {
    (id.to_owned(), s)
}

use Status::*;

#[test]
fn a_reconnect_runs_at_once_and_succeeds_on_read_back() {
    let mut r = Rig::new();
    let out = r.command("M1", json!({"id": "c1", "action": "reconnect"}));
    assert_eq!(published(&out), vec![st("c1", Accepted), st("c1", Executing)]);
    assert_eq!(execs(&out), vec![("c1".into(), 1, Op::Reconnect)]);
    let out = r.done("c1", 1, Outcome::Switched(SwitchOutcome::Done));
    assert_eq!(published(&out), vec![st("c1", Succeeded)]);
    let msg = last_msg(&out);
    assert_eq!((msg.relay, msg.attempts, msg.action), (Some(RelayState::Connected), 1, Some(Action::Reconnect)));
    assert!(msg.at.ends_with("+08:00") && msg.at.contains('.'), "{}", msg.at);
    assert!(out.iter().any(|o| matches!(o, Output::Persist(Record::Meter(mr)) if mr.relay == RelayState::Connected)));
    assert_eq!(r.e.live_count(), 0);
}

#[test]
fn an_arrears_cut_in_the_window_runs_and_remembers_why() {
    let mut r = Rig::new();
    let out = r.arrears_cut("d1", "M1");
    assert_eq!(execs(&out), vec![("d1".into(), 1, Op::Disconnect)]);
    r.done("d1", 1, Outcome::Switched(SwitchOutcome::Done));
    let v = r.e.meter(&m("M1")).expect("known");
    assert_eq!((v.relay, v.cut_reason), (RelayState::Disconnected, Some(Reason::Arrears)));
}

#[test]
fn an_arrears_cut_at_night_is_deferred_to_the_next_window() {
    let mut r = Rig::new();
    r.now = at("2026-11-24T21:00:00+08:00");
    let out = r.arrears_cut("d1", "M1");
    assert_eq!(published(&out), vec![st("d1", Accepted), st("d1", Deferred)]);
    assert_eq!(last_msg(&out).not_before.as_deref(), Some("2026-11-25T09:00:00.000+08:00"));
    assert!(execs(&out).is_empty());
    assert_eq!(r.e.next_wakeup(), Some(at("2026-11-25T09:00:00+08:00")));
    assert!(r.tick_to(at("2026-11-25T08:59:59+08:00")).is_empty());
    let out = r.tick_to(at("2026-11-25T09:00:00+08:00"));
    assert_eq!(execs(&out), vec![("d1".into(), 1, Op::Disconnect)]);
}

#[test]
fn an_override_cuts_at_night() {
    let mut r = Rig::new();
    r.now = at("2026-11-28T23:00:00+08:00");
    let notice = format_at(r.now - 100 * H, 480);
    let out = r.command(
        "M1",
        json!({"id": "d1", "action": "disconnect", "reason": "arrears", "notice_sent_at": notice,
               "override": {"by": "duty.manager", "why": "court order"}}),
    );
    assert_eq!(execs(&out), vec![("d1".into(), 1, Op::Disconnect)]);
}

#[test]
fn policy_refusals_end_rejected_with_their_code() {
    let mut r = Rig::new();
    let out = r.arrears_cut("d1", "M3");
    assert_eq!(published(&out), vec![st("d1", Accepted), st("d1", Rejected)]);
    assert_eq!(last_msg(&out).error.map(|e| e.code), Some(ErrorCode::PolicyProtected));
    let out = r.command("M1", json!({"id": "d2", "action": "disconnect", "reason": "arrears"}));
    assert_eq!(last_msg(&out).error.map(|e| e.code), Some(ErrorCode::PolicyNoNotice));
    // Protection is about arrears: a safety cut of the same meter runs.
    let out = r.command("M3", json!({"id": "d3", "action": "disconnect", "reason": "safety"}));
    assert_eq!(execs(&out), vec![("d3".into(), 1, Op::Disconnect)]);
    let out = r.command("NOPE", json!({"id": "d4", "action": "read"}));
    assert_eq!(last_msg(&out).error.map(|e| e.code), Some(ErrorCode::UnknownMeter));
}

#[test]
fn reconnects_run_at_any_hour_and_are_never_rate_limited() {
    let rate = RateConfig {
        global_per_hour: 1,
        global_burst: 1,
        channel_per_hour: 1,
        channel_burst: 1,
        ..RateConfig::default()
    };
    let mut r = Rig::with_policy(PolicyConfig { utc_offset_minutes: 480, rate, ..PolicyConfig::default() });
    r.now = at("2026-11-29T03:00:00+08:00"); // Sunday night
    for (i, meter) in ["M1", "M2", "M3", "M4"].iter().enumerate() {
        let id = format!("r{i}");
        let out = r.command(meter, json!({"id": id, "action": "reconnect"}));
        assert_eq!(execs(&out).len(), 1, "{meter}");
        // One attempt at a time per link: answer it before the next.
        r.done(&id, 1, Outcome::Switched(SwitchOutcome::Done));
    }
}

#[test]
fn the_newest_intent_replaces_a_waiting_one() {
    let mut r = Rig::new();
    r.now = at("2026-11-24T21:00:00+08:00");
    r.arrears_cut("d1", "M1");
    let out = r.command("M1", json!({"id": "r2", "action": "reconnect"}));
    assert_eq!(published(&out), vec![st("r2", Accepted), st("d1", Superseded), st("r2", Executing)]);
    let sup = msgs(&out)[1].clone();
    assert_eq!(sup.by, Some(Supersessor::Command(cid("r2"))));
    assert_eq!(r.e.status_of(&cid("d1")), None);
}

#[test]
fn a_running_command_is_never_interrupted_and_the_newest_waiter_runs_after_it() {
    let mut r = Rig::new();
    r.command("M4", json!({"id": "r1", "action": "reconnect"}));
    let out = r.command("M4", json!({"id": "d2", "action": "disconnect", "reason": "maintenance"}));
    assert_eq!(published(&out), vec![st("d2", Accepted)]);
    assert!(execs(&out).is_empty());
    let out = r.command("M4", json!({"id": "d3", "action": "disconnect", "reason": "tamper"}));
    assert_eq!(published(&out), vec![st("d3", Accepted), st("d2", Superseded)]);
    let out = r.done("r1", 1, Outcome::Switched(SwitchOutcome::Done));
    assert_eq!(published(&out), vec![st("r1", Succeeded), st("d3", Executing)]);
    assert_eq!(execs(&out), vec![("d3".into(), 1, Op::Disconnect)]);
}

#[test]
fn a_failing_command_gives_way_to_a_newer_intent() {
    let mut r = Rig::new();
    r.command("M4", json!({"id": "d1", "action": "disconnect", "reason": "maintenance"}));
    r.command("M4", json!({"id": "r2", "action": "reconnect"}));
    let out = r.done("d1", 1, Outcome::Error(MeterError::Timeout(5000)));
    assert_eq!(published(&out), vec![st("d1", Superseded), st("r2", Executing)]);
}

#[test]
fn retries_back_off_exponentially_then_fail_at_expiry() {
    let mut r = Rig::new();
    let expires = format_at(r.now + 20 * 60 * S, 480);
    r.command("M4", json!({"id": "r1", "action": "reconnect", "expires_at": expires}));
    let mut attempt = 1;
    let mut waits = Vec::new();
    loop {
        let out = r.done("r1", attempt, Outcome::Error(MeterError::Unreachable("connection refused".into())));
        let msg = last_msg(&out);
        assert_eq!(msg.error.as_ref().map(|e| e.code), Some(ErrorCode::MeterUnreachable));
        if msg.status == Failed {
            break;
        }
        assert_eq!(msg.status, Retrying);
        let wake = r.e.next_wakeup().expect("a retry is scheduled");
        waits.push((wake - r.now) / S);
        let out = r.tick_to(wake);
        attempt += 1;
        assert_eq!(execs(&out), vec![("r1".into(), attempt, Op::Reconnect)]);
    }
    // 5, 10, 20, 40, 80, 160, 300 (cap), 300 ... until the next one would pass 20 min.
    assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(r.e.live_count(), 0);
}

#[test]
fn a_command_that_never_ran_expires() {
    let mut r = Rig::new();
    r.now = at("2026-11-27T10:00:00+08:00"); // Friday: deferred to Monday
    let notice = format_at(r.now - 100 * H, 480);
    let expires = format_at(r.now + 24 * H, 480);
    r.command(
        "M1",
        json!({"id": "d1", "action": "disconnect", "reason": "arrears", "notice_sent_at": notice, "expires_at": expires}),
    );
    let out = r.tick_to(r.now + 24 * H);
    assert_eq!(published(&out), vec![st("d1", Expired)]);
    assert!(execs(&out).is_empty());
    // An already-expired command ends at once.
    let past = format_at(r.now - S, 480);
    let out = r.command("M4", json!({"id": "r9", "action": "reconnect", "expires_at": past}));
    assert_eq!(published(&out), vec![st("r9", Accepted), st("r9", Expired)]);
}

#[test]
fn meter_outcomes_map_to_the_contracts_statuses() {
    use RelayState::*;
    let cases: Vec<(Outcome, Status, Option<ErrorCode>, Option<RelayState>)> = vec![
        (Outcome::Switched(SwitchOutcome::Armed), Armed, None, Some(ReadyForReconnection)),
        (
            Outcome::Error(MeterError::VerifyMismatch { asked: Connected, actual: Disconnected }),
            Failed,
            Some(ErrorCode::VerifyMismatch),
            Some(Disconnected),
        ),
        (
            Outcome::Error(MeterError::IdentityMismatch { expected: "A".into(), actual: "B".into() }),
            Failed,
            Some(ErrorCode::IdentityMismatch),
            None,
        ),
        (Outcome::Error(MeterError::Refused("no".into())), Failed, Some(ErrorCode::MeterRefused), None),
        (Outcome::Error(MeterError::Storage("disk".into())), Failed, Some(ErrorCode::Internal), None),
        (Outcome::Error(MeterError::Timeout(5)), Retrying, Some(ErrorCode::MeterUnreachable), None),
    ];
    for (i, (outcome, status, code, relay)) in cases.into_iter().enumerate() {
        let mut r = Rig::new();
        r.command("M4", json!({"id": format!("r{i}"), "action": "reconnect"}));
        let msg = last_msg(&r.done(&format!("r{i}"), 1, outcome));
        assert_eq!((msg.status, msg.error.map(|e| e.code), msg.relay), (status, code, relay), "case {i}");
    }
}

#[test]
fn a_read_reports_registers_and_clock() {
    let mut r = Rig::new();
    let out = r.command("M4", json!({"id": "q1", "action": "read"}));
    assert_eq!(execs(&out), vec![("q1".into(), 1, Op::Read)]);
    let read = ReadResult {
        relay: RelayState::Connected,
        registers: vec![Reading { obis: "1.0.1.8.0.255".into(), value: 1_234_567.0, unit: "Wh".into() }],
        meter_clock: Some("2026-11-24T10:00:00+08:00".into()),
    };
    let msg = last_msg(&r.done("q1", 1, Outcome::Read(read)));
    assert_eq!(msg.status, Succeeded);
    let v = serde_json::to_value(&msg).expect("json");
    assert_eq!(v["registers"], json!({"1.0.1.8.0.255": {"value": 1234567, "unit": "Wh"}}));
    assert_eq!(v["meter_clock"], "2026-11-24T10:00:00+08:00");
    assert_eq!(v["relay"], "connected");
}

#[test]
fn reads_do_not_touch_relay_intents() {
    let mut r = Rig::new();
    r.command("M4", json!({"id": "r1", "action": "reconnect"}));
    let out = r.command("M4", json!({"id": "q1", "action": "read"}));
    // The read waits for the link (one attempt at a time), not for the relay intent.
    assert!(execs(&out).is_empty());
    assert_eq!(r.e.status_of(&cid("r1")), Some(Executing));
    let out = r.done("r1", 1, Outcome::Error(MeterError::Unreachable("refused".into())));
    assert_eq!(execs(&out), vec![("q1".into(), 1, Op::Read)]);
    assert_eq!(r.e.status_of(&cid("r1")), Some(Retrying));
}

#[test]
fn late_or_foreign_answers_are_ignored() {
    let mut r = Rig::new();
    r.command("M4", json!({"id": "r1", "action": "reconnect"}));
    assert!(r.done("r1", 7, Outcome::Switched(SwitchOutcome::Done)).is_empty());
    assert!(r.done("zz", 1, Outcome::Switched(SwitchOutcome::Done)).is_empty());
    assert_eq!(r.e.status_of(&cid("r1")), Some(Executing));
}

#[test]
fn repeats_get_the_latest_status_or_duplicate_id() {
    let mut r = Rig::new();
    let body = json!({"id": "r1", "action": "reconnect"});
    r.command("M4", body.clone());
    let out = r.command("M4", body);
    let msg = last_msg(&out);
    assert_eq!((msg.status, msg.duplicate), (Executing, true));
    assert!(out.iter().any(|o| matches!(o, Output::Persist(Record::Note { .. }))));
    let out = r.command("M4", json!({"id": "r1", "action": "read"}));
    let msg = last_msg(&out);
    assert_eq!((msg.status, msg.error.map(|e| e.code)), (Rejected, Some(ErrorCode::DuplicateId)));
    // The engine still runs the original.
    assert_eq!(r.e.status_of(&cid("r1")), Some(Executing));
    // The helper the daemon uses with the journal's answer.
    let req = CommandRequest::parse(br#"{"id":"r1","action":"reconnect"}"#).expect("valid");
    let latest = ResultMessage::new(Some("r1".into()), "M4", Succeeded, "t".into());
    assert!(answer_repeat(&m("M4"), &req, true, Some(&latest), 0, 0).duplicate);
    assert_eq!(answer_repeat(&m("M4"), &req, false, Some(&latest), 0, 0).status, Rejected);
}

fn cut_for(r: &mut Rig, id: &str, meter: &str, reason: &str) {
    let notice = format_at(r.now - 100 * H, 480);
    r.command(meter, json!({"id": id, "action": "disconnect", "reason": reason, "notice_sent_at": notice}));
    r.done(id, 1, Outcome::Switched(SwitchOutcome::Done));
}

#[test]
fn a_cleared_payment_reconnects_only_meters_cut_for_arrears() {
    let mut r = Rig::new();
    cut_for(&mut r, "d1", "M1", "arrears");
    cut_for(&mut r, "d2", "M2", "maintenance");
    r.now = at("2026-11-28T23:30:00+08:00"); // Saturday night: reconnects do not wait
    let out = r.pay("pay-1", "ACC-1", true);
    let derived = derived_command_id(&PaymentId::new("pay-1").expect("id"), &m("M1"));
    assert_eq!(derived.as_str(), "pay:pay-1:M1");
    assert_eq!(published(&out), vec![st("pay:pay-1:M1", Accepted), st("pay:pay-1:M1", Executing)]);
    assert_eq!(execs(&out), vec![("pay:pay-1:M1".into(), 1, Op::Reconnect)]);
    assert!(out.iter().any(|o| matches!(o, Output::Persist(Record::Command(c)) if c.trigger.is_some())));
    for msg in msgs(&out) {
        assert_eq!(msg.trigger.as_ref().map(|t| t.payment.as_str()), Some("pay-1"));
    }
    // A replay of the same payment makes nothing new.
    assert!(execs(&r.pay("pay-1", "ACC-1", true)).is_empty());
}

#[test]
fn a_payment_that_is_not_cleared_changes_nothing() {
    let mut r = Rig::new();
    cut_for(&mut r, "d1", "M1", "arrears");
    assert!(r.pay("pay-1", "ACC-1", false).is_empty());
}

#[test]
fn a_cleared_payment_voids_waiting_arrears_cuts_and_later_stale_ones() {
    let mut r = Rig::new();
    r.now = at("2026-11-24T20:00:00+08:00");
    r.arrears_cut("d1", "M2"); // deferred to tomorrow
    let out = r.pay("pay-7", "ACC-1", true);
    assert_eq!(published(&out), vec![st("d1", Superseded)]);
    let msg = last_msg(&out);
    assert_eq!(msg.by, Some(Supersessor::Payment(PaymentId::new("pay-7").expect("id"))));
    assert_eq!(msg.trigger.map(|t| t.payment.to_string()).as_deref(), Some("pay-7"));
    // A cut computed from arrears older than the payment is stale.
    r.now = at("2026-11-25T10:00:00+08:00");
    let out = r.arrears_cut("d2", "M1"); // arrears_as_of = now - 1 h, after the payment
    assert_eq!(execs(&out).len(), 1, "arrears computed after the payment are not stale");
    let notice = format_at(r.now - 100 * H, 480);
    let asof = format_at(at("2026-11-24T19:00:00+08:00"), 480);
    let out = r.command(
        "M2",
        json!({"id": "d3", "action": "disconnect", "reason": "arrears", "notice_sent_at": notice, "arrears_as_of": asof}),
    );
    assert_eq!(last_msg(&out).error.map(|e| e.code), Some(ErrorCode::PolicyStaleArrears));
}

#[test]
fn a_payment_during_a_running_arrears_cut_reconnects_after_it() {
    let mut r = Rig::new();
    r.arrears_cut("d1", "M1");
    let out = r.pay("pay-2", "ACC-1", true);
    assert_eq!(published(&out), vec![st("pay:pay-2:M1", Accepted)]);
    assert!(execs(&out).is_empty(), "the running cut is not interrupted");
    let out = r.done("d1", 1, Outcome::Switched(SwitchOutcome::Done));
    assert_eq!(published(&out), vec![st("d1", Succeeded), st("pay:pay-2:M1", Executing)]);
}

#[test]
fn a_later_non_arrears_intent_stands_against_a_payment() {
    let mut r = Rig::new();
    cut_for(&mut r, "d1", "M1", "arrears");
    r.command("M1", json!({"id": "r1", "action": "reconnect"})); // running
    r.command("M1", json!({"id": "d2", "action": "disconnect", "reason": "safety"})); // waits
    let out = r.pay("pay-3", "ACC-1", true);
    assert!(published(&out).is_empty(), "{:?}", published(&out));
}

fn rate_rig(channel_burst: u32, quarantine_threshold: u32) -> Rig {
    let rate = RateConfig {
        global_per_hour: 10_000,
        global_burst: 10_000,
        channel_per_hour: 60,
        channel_burst,
        quarantine_threshold,
        quarantine_window_s: 600,
    };
    Rig::with_policy(PolicyConfig { utc_offset_minutes: 480, rate, ..PolicyConfig::default() })
}

fn bulk_registry(n: usize) -> Registry {
    let mut reg = registry();
    for i in 0..n {
        reg.add_meter(m(&format!("B{i}")), None, "bus", 480);
    }
    reg
}

#[test]
fn disconnects_beyond_the_rate_wait_their_turn() {
    let mut r = rate_rig(3, 1000);
    r.e.set_registry(bulk_registry(5));
    let mut deferred = Vec::new();
    for i in 0..5 {
        let id = format!("d{i}");
        let out = r.command(&format!("B{i}"), json!({"id": id, "action": "disconnect", "reason": "tamper"}));
        if execs(&out).is_empty() {
            deferred.push(last_msg(&out).not_before.expect("not_before"));
        } else {
            // The bus runs one attempt at a time.
            r.done(&id, 1, Outcome::Switched(SwitchOutcome::Done));
        }
    }
    assert_eq!(deferred, vec!["2026-11-24T10:01:00.000+08:00", "2026-11-24T10:02:00.000+08:00"]);
    let out = r.tick_to(r.now + 60 * S);
    assert_eq!(execs(&out), vec![("d3".into(), 1, Op::Disconnect)]);
    r.done("d3", 1, Outcome::Switched(SwitchOutcome::Done));
    let out = r.tick_to(r.now + 60 * S);
    assert_eq!(execs(&out), vec![("d4".into(), 1, Op::Disconnect)]);
}

#[test]
fn a_burst_trips_the_quarantine_and_an_operator_lifts_it() {
    let mut r = rate_rig(2, 4);
    r.e.set_registry(bulk_registry(8));
    for i in 0..4 {
        r.command(&format!("B{i}"), json!({"id": format!("d{i}"), "action": "disconnect", "reason": "tamper"}));
    }
    // d0 runs; d1 waits for the bus (one attempt at a time), d2, d3 for the rate. d4 is
    // one too many: everything that has not started is refused.
    let out = r.command("B4", json!({"id": "d4", "action": "disconnect", "reason": "tamper"}));
    assert!(out.iter().any(|o| matches!(o, Output::Persist(Record::Quarantine(_)))));
    assert_eq!(
        published(&out),
        vec![st("d4", Accepted), st("d4", Rejected), st("d1", Rejected), st("d2", Rejected), st("d3", Rejected)]
    );
    for msg in msgs(&out).iter().skip(1) {
        assert_eq!(msg.error.as_ref().map(|e| e.code), Some(ErrorCode::PolicyRateLimit));
    }
    // Running ones finish; new disconnects are refused; reconnects still run.
    assert_eq!(published(&r.done("d0", 1, Outcome::Switched(SwitchOutcome::Done))), vec![st("d0", Succeeded)]);
    let out = r.command("B5", json!({"id": "d5", "action": "disconnect", "reason": "safety"}));
    assert_eq!(last_msg(&out).error.map(|e| e.code), Some(ErrorCode::PolicyRateLimit));
    let out = r.command("B0", json!({"id": "r0", "action": "reconnect"}));
    assert_eq!(execs(&out).len(), 1);
    r.done("r0", 1, Outcome::Switched(SwitchOutcome::Done));
    // Hours later it still holds; the lift is recorded, then disconnects run again.
    r.now += 10 * H;
    let out = r.command("B6", json!({"id": "d6", "action": "disconnect", "reason": "safety"}));
    assert_eq!(last_msg(&out).status, Rejected);
    let out = r.e.handle(Input::LiftQuarantine { by: "ops/li".into(), why: "feed fixed".into() }, r.now);
    assert!(matches!(out.as_slice(), [Output::Persist(Record::Quarantine(_))]));
    let out = r.command("B7", json!({"id": "d7", "action": "disconnect", "reason": "safety"}));
    assert_eq!(execs(&out).len(), 1);
}

fn stored(r: &Rig, meter: &str, body: serde_json::Value, status: Status, attempts: u32) -> StoredCommand {
    let req = CommandRequest::parse(body.to_string().as_bytes()).expect("valid");
    let id = req.id.to_string();
    let mut latest = ResultMessage::new(Some(id), meter, status, format_at(r.now, 480));
    latest.attempts = attempts;
    StoredCommand {
        command: Command::new(m(meter), req, r.now - 10 * S, &r.cfg),
        status,
        attempts,
        wake_ms: None,
        latest: Some(latest),
    }
}

fn restore(r: &Rig, commands: Vec<StoredCommand>) -> (Engine, Vec<Output>) {
    let rec = Recovered { commands, ..Recovered::default() };
    let policy = PolicyConfig { utc_offset_minutes: 480, ..PolicyConfig::default() };
    Engine::restore(r.cfg.clone(), registry(), policy, rec, r.now)
}

#[test]
fn after_a_restart_an_executing_switch_is_verified_before_anything_else() {
    let r = Rig::new();
    let body = json!({"id": "d1", "action": "disconnect", "reason": "maintenance"});
    // The relay already moved before the crash: success without switching again.
    let (mut e, out) = restore(&r, vec![stored(&r, "M4", body.clone(), Executing, 1)]);
    assert_eq!(execs(&out), vec![("d1".into(), 1, Op::VerifyRelay)]);
    assert!(published(&out).is_empty());
    let out = e.handle(
        Input::Executed { command: cid("d1"), attempt: 1, outcome: Outcome::Relay(RelayState::Disconnected) },
        r.now,
    );
    assert_eq!(published(&out), vec![st("d1", Succeeded)]);
    assert!(execs(&out).is_empty());
    // It had not moved: now, and only now, it switches (attempt 2).
    let (mut e, _) = restore(&r, vec![stored(&r, "M4", body, Executing, 1)]);
    let out = e.handle(
        Input::Executed { command: cid("d1"), attempt: 1, outcome: Outcome::Relay(RelayState::Connected) },
        r.now,
    );
    assert_eq!(execs(&out), vec![("d1".into(), 2, Op::Disconnect)]);
}

#[test]
fn a_verify_that_cannot_reach_the_meter_is_retried_never_skipped() {
    let mut r = Rig::new();
    let body = json!({"id": "r1", "action": "reconnect"});
    let (mut e, _) = restore(&r, vec![stored(&r, "M4", body, Executing, 2)]);
    let out = e.handle(
        Input::Executed { command: cid("r1"), attempt: 2, outcome: Outcome::Error(MeterError::Timeout(1)) },
        r.now,
    );
    assert_eq!(published(&out), vec![st("r1", Retrying)]);
    r.now = e.next_wakeup().expect("retry");
    let out = e.handle(Input::Tick, r.now);
    assert_eq!(execs(&out), vec![("r1".into(), 2, Op::VerifyRelay)]);
    let out = e.handle(
        Input::Executed { command: cid("r1"), attempt: 2, outcome: Outcome::Relay(RelayState::ReadyForReconnection) },
        r.now,
    );
    assert_eq!(published(&out), vec![st("r1", Armed)]);
}

#[test]
fn restore_resumes_waiting_commands_and_announces_unannounced_ones() {
    let r = Rig::new();
    let mut deferred =
        stored(&r, "M1", json!({"id": "d1", "action": "disconnect", "reason": "maintenance"}), Deferred, 0);
    deferred.wake_ms = Some(r.now + H);
    let mut fresh = stored(&r, "M4", json!({"id": "r4", "action": "reconnect"}), Accepted, 0);
    fresh.latest = None;
    let (mut e, out) = restore(&r, vec![deferred, fresh]);
    assert_eq!(published(&out), vec![st("r4", Accepted), st("r4", Executing)]);
    assert_eq!(execs(&out), vec![("r4".into(), 1, Op::Reconnect)]);
    assert_eq!(e.status_of(&cid("d1")), Some(Deferred));
    let done = Input::Executed { command: cid("r4"), attempt: 1, outcome: Outcome::Switched(SwitchOutcome::Done) };
    e.handle(done, r.now);
    assert_eq!(e.next_wakeup(), Some(r.now + H));
}

#[test]
fn restore_keeps_one_intent_per_meter() {
    let r = Rig::new();
    let a = stored(&r, "M4", json!({"id": "d1", "action": "disconnect", "reason": "maintenance"}), Executing, 1);
    let b = stored(&r, "M4", json!({"id": "r2", "action": "reconnect"}), Accepted, 0);
    let c = stored(&r, "M4", json!({"id": "d3", "action": "disconnect", "reason": "tamper"}), Accepted, 0);
    let (_, out) = restore(&r, vec![a, b, c]);
    assert_eq!(published(&out), vec![st("r2", Superseded)]);
    assert_eq!(execs(&out), vec![("d1".into(), 1, Op::VerifyRelay)]);
}

#[test]
fn derived_ids_fit_the_id_rule_even_for_long_inputs() {
    let p = PaymentId::new(&"p".repeat(64)).expect("id");
    let meter = m(&"M".repeat(64));
    let a = derived_command_id(&p, &meter);
    assert!(is_valid_id(a.as_str()), "{a}");
    assert_eq!(a, derived_command_id(&p, &meter), "deterministic");
    assert_ne!(a, derived_command_id(&p, &m(&"N".repeat(64))));
}

#[test]
fn a_payment_reconnects_a_meter_whose_arrears_cut_may_have_switched_before_failing() {
    let mut r = Rig::new();
    r.arrears_cut("d1", "M1");
    // The ACTION went out, the read-back never came: the relay may be open.
    let out = r.done("d1", 1, Outcome::Error(MeterError::Timeout(5000)));
    assert_eq!(published(&out), vec![st("d1", Retrying)]);
    let out = r.pay("pay-9", "ACC-1", true);
    let statuses = published(&out);
    assert!(statuses.contains(&st("d1", Superseded)), "{statuses:?}");
    assert!(statuses.contains(&st("pay:pay-9:M1", Accepted)), "owed a reconnect: {statuses:?}");
    assert_eq!(execs(&out), vec![("pay:pay-9:M1".into(), 1, Op::Reconnect)]);
}
