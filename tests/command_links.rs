//! One attempt at a time per link, pulled from the engine when the link is free, and a
//! deadline on every attempt: review findings on the command engine, in virtual time.
//! Everything about a command (expiry, gates, supersede, a payment) is decided when its
//! link is free to run it, not when it was queued behind slow or dead meters.

use headend::command::*;
use headend::contract::*;
use headend::meter::{MeterError, MeterId, SwitchOutcome};
use headend::policy::{PolicyConfig, Registry};
use serde_json::json;

const S: i64 = 1000;
const H: i64 = 3_600_000;

fn m(s: &str) -> MeterId {
    MeterId::new(s).expect("meter id")
}
fn cid(s: &str) -> CommandId {
    CommandId::new(s).expect("command id")
}

/// M1, M2 (account ACC-1), Q (no account): all on one bus; X alone on another link.
fn registry() -> Registry {
    let mut r = Registry::default();
    let acc = AccountId::new("ACC-1").ok();
    r.add_meter(m("M1"), acc.clone(), "bus", 480);
    r.add_meter(m("M2"), acc, "bus", 480);
    r.add_meter(m("Q"), None, "bus", 480);
    r.add_meter(m("X"), None, "other", 480);
    r
}

struct Rig {
    e: Engine,
    now: i64,
    cfg: CommandsConfig,
}

impl Rig {
    fn new() -> Self {
        let cfg = CommandsConfig::default();
        let p = PolicyConfig { utc_offset_minutes: 480, ..PolicyConfig::default() };
        let now = Timestamp::parse("2026-11-24T10:00:00+08:00").map(Timestamp::unix_ms).unwrap_or(0);
        Self { e: Engine::new(cfg.clone(), registry(), p), now, cfg }
    }
    fn command(&mut self, meter: &str, body: serde_json::Value) -> Vec<Output> {
        let req = CommandRequest::parse(body.to_string().as_bytes()).expect("valid command");
        let c = Command::new(m(meter), req, self.now, &self.cfg);
        self.e.handle(Input::Command(c), self.now)
    }
    fn arrears_cut(&mut self, id: &str, meter: &str, extra: serde_json::Value) -> Vec<Output> {
        let mut body = json!({"id": id, "action": "disconnect", "reason": "arrears",
            "notice_sent_at": format_at(self.now - 100 * H, 480), "arrears_as_of": format_at(self.now - H, 480)});
        if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(x.clone());
        }
        self.command(meter, body)
    }
    fn done(&mut self, id: &str, attempt: u32, outcome: Outcome) -> Vec<Output> {
        self.e.handle(Input::Executed { command: cid(id), attempt, outcome }, self.now)
    }
    fn tick_to(&mut self, t: i64) -> Vec<Output> {
        self.now = t;
        self.e.handle(Input::Tick, t)
    }
    fn pay(&mut self, id: &str) -> Vec<Output> {
        let body = json!({"id": id, "account": "ACC-1", "amount": "10.00", "cleared": true});
        let payment = Payment::parse(body.to_string().as_bytes()).expect("valid payment");
        self.e.handle(Input::Payment { payment, received_ms: self.now }, self.now)
    }
}

fn execs(out: &[Output]) -> Vec<(String, Op)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Execute(x) => Some((x.command.to_string(), x.op)),
            _ => None,
        })
        .collect()
}

fn statuses(out: &[Output]) -> Vec<(String, Status)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Publish { message, .. } => Some((message.id.clone().unwrap_or_default(), message.status)),
            _ => None,
        })
        .collect()
}

fn st(id: &str, s: Status) -> (String, Status) {
    (id.to_owned(), s)
}

const DONE: fn() -> Outcome = || Outcome::Switched(SwitchOutcome::Done);

#[test]
fn a_payment_cancels_a_cut_queued_behind_a_slow_meter() {
    let mut r = Rig::new();
    // A read of a slow meter holds the bus.
    assert_eq!(execs(&r.command("Q", json!({"id": "q1", "action": "read"}))), vec![("q1".into(), Op::Read)]);
    let out = r.arrears_cut("d1", "M1", json!({}));
    assert!(execs(&out).is_empty(), "the cut waits for the bus: {out:?}");
    assert_eq!(statuses(&out), vec![st("d1", Status::Accepted)]);
    assert_eq!(r.e.queued_on_links(), 1);
    // The account pays while the cut waits: it never runs, and nothing needs reconnecting.
    let out = r.pay("pay-1");
    assert_eq!(statuses(&out), vec![st("d1", Status::Superseded)]);
    assert!(execs(&out).is_empty());
    let out = r.done("q1", 1, Outcome::Error(MeterError::Refused("busy".into())));
    assert!(execs(&out).is_empty(), "the voided cut is not run when the bus frees: {out:?}");
    assert_eq!(r.e.live_count(), 0);
    assert_eq!(r.e.queued_on_links(), 0);
}

#[test]
fn a_cut_whose_expiry_passes_in_the_queue_expires_and_never_runs() {
    let mut r = Rig::new();
    r.command("Q", json!({"id": "q1", "action": "read"}));
    r.arrears_cut("d1", "M1", json!({"expires_at": format_at(r.now + 60 * S, 480)}));
    let out = r.tick_to(r.now + 61 * S);
    assert_eq!(statuses(&out), vec![st("d1", Status::Expired)]);
    let out = r.done("q1", 1, Outcome::Error(MeterError::Refused("busy".into())));
    assert!(execs(&out).is_empty(), "{out:?}");
}

#[test]
fn the_service_window_is_checked_when_the_link_frees() {
    let mut r = Rig::new();
    r.now = Timestamp::parse("2026-11-24T15:59:00+08:00").map(Timestamp::unix_ms).unwrap_or(0);
    r.command("Q", json!({"id": "q1", "action": "read"}));
    r.arrears_cut("d1", "M1", json!({}));
    // The slow read ends after the window closed (16:00 by default): the cut is deferred,
    // not run at night.
    r.now += 5 * 60 * S;
    let out = r.done("q1", 1, Outcome::Error(MeterError::Refused("busy".into())));
    assert!(execs(&out).is_empty(), "{out:?}");
    assert_eq!(statuses(&out), vec![st("q1", Status::Failed), st("d1", Status::Deferred)]);
}

#[test]
fn reconnects_go_first_when_the_link_frees_and_other_links_are_not_held() {
    let mut r = Rig::new();
    r.command("Q", json!({"id": "q1", "action": "read"}));
    r.command("M2", json!({"id": "d2", "action": "disconnect", "reason": "maintenance"}));
    r.command("M1", json!({"id": "r1", "action": "reconnect"}));
    assert_eq!(execs(&r.command("X", json!({"id": "x1", "action": "read"}))), vec![("x1".into(), Op::Read)]);
    let out = r.done("q1", 1, Outcome::Error(MeterError::Refused("busy".into())));
    assert_eq!(execs(&out), vec![("r1".into(), Op::Reconnect)]);
    let out = r.done("r1", 1, DONE());
    assert_eq!(execs(&out), vec![("d2".into(), Op::Disconnect)]);
    assert_eq!(statuses(&out), vec![st("r1", Status::Succeeded), st("d2", Status::Executing)]);
}

#[test]
fn an_attempt_without_an_answer_fails_at_its_deadline_and_frees_the_link() {
    let mut r = Rig::new();
    let deadline = r.now + r.cfg.attempt_timeout_s as i64 * S;
    r.command("M1", json!({"id": "r1", "action": "reconnect"}));
    r.command("Q", json!({"id": "q1", "action": "read"}));
    assert_eq!(r.e.next_wakeup(), Some(deadline));
    assert!(statuses(&r.tick_to(deadline - 1)).is_empty());
    // The channel never answered (it died, or hangs): the attempt failed on the link.
    let out = r.tick_to(deadline);
    let msg = out.iter().find_map(|o| match o {
        Output::Publish { message, .. } if message.status == Status::Retrying => Some(message.clone()),
        _ => None,
    });
    assert_eq!(msg.and_then(|m| m.error).map(|e| e.code), Some(ErrorCode::MeterUnreachable));
    assert_eq!(execs(&out), vec![("q1".into(), Op::Read)], "the link is free for the next");
    // The dead attempt's late answer changes nothing; the retry runs as attempt 2.
    assert!(r.done("r1", 1, DONE()).is_empty());
    r.done("q1", 1, Outcome::Error(MeterError::Refused("busy".into())));
    let wake = r.e.next_wakeup().expect("the retry");
    let out = r.tick_to(wake);
    assert_eq!(execs(&out), vec![("r1".into(), Op::Reconnect)]);
    let out = r.done("r1", 2, DONE());
    assert_eq!(statuses(&out), vec![st("r1", Status::Succeeded)]);
}
