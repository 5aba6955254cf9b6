//! The dispatch desk's and billing's verbs (`headend cut | restore | read | pay | audit`),
//! run as the real binary against a real mosquitto, with a fake daemon in the test that
//! answers from the contract's own types. What the verbs publish is read back with the
//! contract's parsers.

mod common;

use std::process::Output;
use std::time::Duration;

use headend::command::{derived_command_id, Command, CommandsConfig, Record, StatusRecord};
use headend::contract::*;
use headend::journal::Journal;
use headend::meter::{MeterId, RelayState};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use common::mosquitto::{self, Message, Mosquitto, TestClient};
use common::TempDir;

/// A two-level prefix, to show that prefixes with `/` work end to end.
const P: &str = "ami/test";
const WAIT: Duration = Duration::from_secs(20);

async fn headend(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_headend")).args(&args).output().expect("headend runs")
    })
    .await
    .expect("joined")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn both(o: &Output) -> String {
    format!("{}\n{}", stdout(o), String::from_utf8_lossy(&o.stderr))
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", both(o)))
}

/// `headend VERB ... --broker URL --prefix P` with the given arguments.
async fn verb(broker: &Mosquitto, args: &[&str]) -> Output {
    let url = broker.url();
    let mut all = args.to_vec();
    all.extend(["--broker", url.as_str(), "--prefix", P]);
    headend(&all).await
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A daemon stand-in: answers commands by meter id and payments by account, as the real
/// daemon would, and hands every inbound message to the test.
struct FakeDaemon {
    seen: mpsc::UnboundedReceiver<Message>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    async fn start(broker: &Mosquitto) -> Self {
        let mut client = TestClient::connect(broker.port(), &[&format!("{P}/cmd/+"), &format!("{P}/payments")]).await;
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut before = std::collections::HashSet::new();
            while let Some(m) = client.recv(Duration::from_secs(3600)).await {
                let _ = tx.send(m.clone());
                let repeat = !before.insert((m.topic.clone(), m.payload.clone()));
                for (topic, payload) in answers(&m, repeat) {
                    client.publish(&topic, payload).await;
                }
            }
        });
        Self { seen, _task: task }
    }

    /// The next inbound message.
    async fn next(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.seen.recv()).await.expect("a message in time").expect("daemon alive")
    }

    /// Proof that nothing was published: a marker sent now is the very next thing seen.
    async fn assert_nothing_published(&mut self, broker: &Mosquitto) {
        let probe = TestClient::connect(broker.port(), &[]).await;
        probe.publish(&format!("{P}/cmd/MARKER"), r#"{"id":"marker","action":"read"}"#).await;
        let m = self.next().await;
        assert_eq!(
            m.topic,
            format!("{P}/cmd/MARKER"),
            "something was published: {}",
            String::from_utf8_lossy(&m.payload)
        );
    }
}

fn at() -> String {
    format_at(1_795_827_600_000, 480)
}

fn result(id: &str, meter: &str, action: Action, status: Status) -> ResultMessage {
    let mut r = ResultMessage::new(Some(id.to_owned()), meter, status, at());
    r.action = Some(action);
    r.attempts = u32::from(matches!(status, Status::Succeeded | Status::Armed | Status::Failed));
    r
}

/// What the fake daemon publishes for one inbound message (`repeat`: seen before).
fn answers(m: &Message, repeat: bool) -> Vec<(String, String)> {
    if m.topic == format!("{P}/payments") {
        return payment_answers(&Payment::parse(&m.payload).expect("the verb sends valid payments"));
    }
    let meter = m.topic.rsplit('/').next().unwrap_or_default().to_owned();
    let topic = format!("{P}/result/{meter}");
    let req = match CommandRequest::parse(&m.payload) {
        Ok(r) => r,
        Err(rej) => return vec![(topic, ResultMessage::for_rejection(&meter, &rej, at()).to_json())],
    };
    let (id, action) = (req.id.as_str(), req.action);
    let msg = |status| result(id, &meter, action, status);
    let mut out = Vec::new();
    match meter.as_str() {
        "MARKER" => {}
        "MTR-ARM" => {
            out.push(msg(Status::Accepted));
            out.push(ResultMessage { relay: Some(RelayState::ReadyForReconnection), ..msg(Status::Armed) });
        }
        "MTR-NONOTICE" => {
            let error = ErrorBody::new(ErrorCode::PolicyNoNotice, "no notice sent 72 h before the cut");
            out.push(ResultMessage { error: Some(error), ..msg(Status::Rejected) });
        }
        // Slow: only `accepted` at first; asked again, it has succeeded meanwhile, and
        // answers as the daemon answers a repeated id: its latest status, marked duplicate.
        "MTR-SLOW" if repeat => {
            out.push(ResultMessage { duplicate: true, relay: Some(RelayState::Connected), ..msg(Status::Succeeded) });
        }
        "MTR-SLOW" => out.push(msg(Status::Accepted)),
        "MTR-DEFER" => {
            out.push(msg(Status::Accepted));
            out.push(ResultMessage {
                not_before: Some("2026-11-30T08:00:00.000+08:00".into()),
                ..msg(Status::Deferred)
            });
        }
        _ => {
            // Another command's final status on the same topic first: the verb must not stop at it.
            out.push(result("someone-else", &meter, Action::Read, Status::Failed));
            out.push(msg(Status::Accepted));
            out.push(msg(Status::Executing));
            let relay = match action {
                Action::Disconnect => RelayState::Disconnected,
                _ => RelayState::Connected,
            };
            let mut done = ResultMessage { relay: Some(relay), ..msg(Status::Succeeded) };
            if action == Action::Read {
                let v = RegisterValue { value: json_number(1_234_567.0), unit: "Wh".into() };
                done.registers = Some([("1.0.1.8.0.255".to_owned(), v)].into_iter().collect());
                done.meter_clock = Some("2026-11-28T09:00:00+08:00".into());
            }
            out.push(done);
        }
    }
    out.into_iter().map(|r| (topic.clone(), r.to_json())).collect()
}

/// ACC-1: two meters cut for arrears (one switches, one is armed); ACC-FAIL: one meter
/// that cannot be reached; ACC-NONE: nothing to do; id `pay-dup`: refused; id `pay-again`:
/// seen before.
fn payment_answers(p: &Payment) -> Vec<(String, String)> {
    let outcome_topic = format!("{P}/payment/{}", p.id);
    if p.id.as_str() == "pay-again" {
        let o = json!({"id": p.id, "account": p.account, "cleared": p.cleared, "duplicate": true, "reconnects": []});
        return vec![(outcome_topic, o.to_string())];
    }
    if p.id.as_str() == "pay-dup" {
        let o = json!({"id": p.id, "account": p.account, "cleared": p.cleared, "duplicate": false, "reconnects": [],
                       "error": {"code": "duplicate_id", "message": "payment pay-dup was seen with other content"}});
        return vec![(outcome_topic, o.to_string())];
    }
    let meters: &[(&str, Status)] = match (p.cleared, p.account.as_str()) {
        (true, "ACC-1") => &[("MTR-A", Status::Succeeded), ("MTR-B", Status::Armed)],
        (true, "ACC-FAIL") => &[("MTR-C", Status::Failed)],
        _ => &[],
    };
    let ids: Vec<(String, &str, Status)> = meters
        .iter()
        .map(|(m, st)| (derived_command_id(&p.id, &MeterId::new(m).expect("meter")).to_string(), *m, *st))
        .collect();
    let reconnects: Vec<Value> = ids.iter().map(|(id, m, _)| json!({"id": id, "meter": m})).collect();
    let outcome =
        json!({"id": p.id, "account": p.account, "cleared": p.cleared, "duplicate": false, "reconnects": reconnects});
    let status = |id: &str, m: &str, st: Status| {
        let mut r = result(id, m, Action::Reconnect, st);
        r.trigger = Some(Trigger { payment: p.id.clone() });
        match st {
            Status::Succeeded => r.relay = Some(RelayState::Connected),
            Status::Armed => r.relay = Some(RelayState::ReadyForReconnection),
            Status::Failed => r.error = Some(ErrorBody::new(ErrorCode::MeterUnreachable, "no answer after 3 attempts")),
            _ => {}
        }
        (format!("{P}/result/{m}"), r.to_json())
    };
    let mut out = Vec::new();
    // The first reconnect's `accepted` comes before the payment's own message: the verb
    // must keep it and show it once it knows the list.
    if let Some((id, m, _)) = ids.first() {
        out.push(status(id, m, Status::Accepted));
    }
    out.push((outcome_topic, outcome.to_string()));
    for (id, m, st) in &ids {
        out.push(status(id, m, *st));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_restore_and_read_publish_contract_commands_and_follow_them_to_the_end() {
    let broker = Mosquitto::start();
    let mut daemon = FakeDaemon::start(&broker).await;

    let cut = verb(
        &broker,
        &[
            "cut",
            "MTR-OK",
            "--reason",
            "arrears",
            "--notice-sent-at",
            "2026-11-25T10:00:00+08:00",
            "--arrears-as-of",
            "2026-11-28T08:00:00+08:00",
            "--operator",
            "95598/wang.li",
            "--override-by",
            "chief.zhang",
            "--override-why",
            "storm repairs",
            "--expires-at",
            "2026-11-29T09:00:00+08:00",
            "--id",
            "c-20261128-000731",
        ],
    )
    .await;
    assert_eq!(code(&cut), 0, "{}", both(&cut));
    let text = stdout(&cut);
    for s in ["accepted", "executing", "succeeded", "relay disconnected", "c-20261128-000731"] {
        assert!(text.contains(s), "{s:?} missing in:\n{text}");
    }
    assert!(!text.contains("someone-else") && !text.contains("failed"), "another command's status shown:\n{text}");
    let sent = daemon.next().await;
    assert_eq!(sent.topic, format!("{P}/cmd/MTR-OK"));
    let req = CommandRequest::parse(&sent.payload).expect("a contract command");
    assert_eq!(req.id.as_str(), "c-20261128-000731");
    assert_eq!((req.action, req.reason), (Action::Disconnect, Some(Reason::Arrears)));
    assert_eq!(req.operator.as_deref(), Some("95598/wang.li"));
    assert_eq!(req.notice_sent_at, Timestamp::parse("2026-11-25T10:00:00+08:00").ok());
    assert_eq!(req.arrears_as_of, Timestamp::parse("2026-11-28T08:00:00+08:00").ok());
    assert_eq!(req.expires_at, Timestamp::parse("2026-11-29T09:00:00+08:00").ok());
    assert_eq!(req.override_, Some(Override { by: "chief.zhang".into(), why: "storm repairs".into() }));
    assert_eq!(req.requested_at, None, "no requested_at, so a re-run with the same id is a repeat");

    // Restore with a generated id, as JSON.
    let restore = verb(&broker, &["restore", "MTR-OK", "--operator", "95598/li.na", "--json"]).await;
    assert_eq!(code(&restore), 0, "{}", both(&restore));
    let v = json_of(&restore);
    assert_eq!(v["outcome"], "succeeded");
    assert_eq!(v["customer_must_press_button"], false);
    let statuses: Vec<&str> =
        v["statuses"].as_array().expect("list").iter().filter_map(|s| s["status"].as_str()).collect();
    assert_eq!(statuses, ["accepted", "executing", "succeeded"]);
    let req = CommandRequest::parse(&daemon.next().await.payload).expect("a contract command");
    assert_eq!((req.action, req.operator.as_deref()), (Action::Reconnect, Some("95598/li.na")));
    assert!(req.id.as_str().starts_with("cli-") && is_valid_id(req.id.as_str()), "{}", req.id);
    assert_eq!(v["id"], req.id.as_str());

    let read = verb(&broker, &["read", "MTR-OK", "--id", "r-1"]).await;
    assert_eq!(code(&read), 0, "{}", both(&read));
    assert!(stdout(&read).contains("1.0.1.8.0.255") && stdout(&read).contains("1234567 Wh"), "{}", stdout(&read));
    assert_eq!(CommandRequest::parse(&daemon.next().await.payload).map(|r| r.action).ok(), Some(Action::Read));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armed_is_exit_0_and_says_the_customer_must_press_the_button() {
    let broker = Mosquitto::start();
    let _daemon = FakeDaemon::start(&broker).await;
    let out = verb(&broker, &["restore", "MTR-ARM"]).await;
    assert_eq!(code(&out), 0, "{}", both(&out));
    assert!(
        stdout(&out).contains("armed") && stdout(&out).contains("customer must press the button"),
        "{}",
        both(&out)
    );
    let out = verb(&broker, &["restore", "MTR-ARM", "--json"]).await;
    let v = json_of(&out);
    assert_eq!((v["outcome"].as_str(), v["customer_must_press_button"].as_bool()), (Some("armed"), Some(true)));
    assert_eq!(v["last"]["relay"], "ready_for_reconnection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_rejection_is_exit_1_with_its_code() {
    let broker = Mosquitto::start();
    let _daemon = FakeDaemon::start(&broker).await;
    let out = verb(&broker, &["cut", "MTR-NONOTICE", "--reason", "arrears"]).await;
    assert_eq!(code(&out), 1, "{}", both(&out));
    assert!(stdout(&out).contains("rejected") && stdout(&out).contains("policy_no_notice"), "{}", both(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_is_not_final_the_verb_waits_out_its_timeout_and_exits_4() {
    let broker = Mosquitto::start();
    let _daemon = FakeDaemon::start(&broker).await;
    let out =
        verb(&broker, &["cut", "MTR-DEFER", "--reason", "maintenance", "--timeout", "1", "--id", "d-1", "--json"])
            .await;
    assert_eq!(code(&out), 4, "{}", both(&out));
    let v = json_of(&out);
    assert_eq!(v["outcome"], "deferred");
    assert_eq!(v["not_before"], "2026-11-30T08:00:00.000+08:00");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("deferred until 2026-11-30T08:00:00.000+08:00") && progress.contains("--id d-1"),
        "{progress}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_exit_2_and_nothing_is_published() {
    let broker = Mosquitto::start();
    let mut daemon = FakeDaemon::start(&broker).await;
    let cases: &[&[&str]] = &[
        &["cut", "MTR-OK", "--reason", "arrears", "--notice-sent-at", "2026-11-25 10:00"],
        &["cut", "MTR-OK", "--reason", "arrears", "--notice-sent-at", "2026-11-25T10:00:00"],
        &["cut", "MTR-OK", "--reason", "unpaid"],
        &["cut", "MTR OK", "--reason", "safety"],
        &["restore", "MTR-OK", "--id", "has space"],
        &["read", "MTR-OK", "--id", &"x".repeat(65)],
        &["cut", "MTR-OK", "--reason", "safety", "--override-by", "chief"],
        &["pay", "--account", "ACC-1", "--amount", "12,50"],
        &["pay", "--account", "ACC-1", "--amount", "1", "--confirmed-at", "yesterday"],
        &["restore", "MTR-OK", "--timeout", "0"],
    ];
    for args in cases {
        let out = verb(&broker, args).await;
        assert_eq!(code(&out), 2, "{args:?}: {}", both(&out));
    }
    let out = verb(&broker, &["cut", "MTR-OK", "--reason", "arrears", "--expires-at", "soon", "--json"]).await;
    assert_eq!(code(&out), 2);
    assert_eq!(json_of(&out)["outcome"], "bad_input");
    assert!(json_of(&out)["error"].as_str().is_some_and(|e| e.contains("--expires-at")), "{}", both(&out));
    daemon.assert_nothing_published(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_exit_3_and_a_restart_between_runs_is_fine() {
    let mut broker = Mosquitto::start();
    let daemon = FakeDaemon::start(&broker).await;
    let out = verb(&broker, &["cut", "MTR-OK", "--reason", "safety"]).await;
    assert_eq!(code(&out), 0, "{}", both(&out));

    broker.stop();
    drop(daemon);
    let out = verb(&broker, &["cut", "MTR-OK", "--reason", "safety", "--json"]).await;
    assert_eq!(code(&out), 3, "{}", both(&out));
    assert_eq!(json_of(&out)["outcome"], "broker_unreachable");
    let out = verb(&broker, &["pay", "--account", "ACC-1", "--amount", "1.00"]).await;
    assert_eq!(code(&out), 3, "{}", both(&out));

    broker.restart();
    let _daemon = FakeDaemon::start(&broker).await;
    let out = verb(&broker, &["restore", "MTR-OK"]).await;
    assert_eq!(code(&out), 0, "{}", both(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_waiting_is_made_again_and_the_command_published_again() {
    let broker = Mosquitto::start();
    let mut daemon = FakeDaemon::start(&broker).await;
    let url = broker.url();
    let run = tokio::spawn(async move {
        headend(&["restore", "MTR-SLOW", "--id", "slow-1", "--broker", &url, "--prefix", P, "--timeout", "30"]).await
    });
    let first = daemon.next().await;
    // The verb is connected and subscribed now. Cut its connection alone: a client that
    // takes over its client id makes the broker close it.
    let line = tokio::task::block_in_place(|| {
        broker.wait_log(WAIT, |l| l.contains("New client connected") && l.contains(" as headend-cli-"))
    });
    let id = line.split(" as ").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("client id in the log");
    let _thief = TestClient::connect_as(broker.port(), id, &[]).await;
    let again = daemon.next().await;
    assert_eq!((again.topic.as_str(), again.payload.as_slice()), (first.topic.as_str(), first.payload.as_slice()));
    let out = run.await.expect("joined");
    assert_eq!(code(&out), 0, "{}", both(&out));
    let text = stdout(&out);
    // `accepted` may have been lost with the connection; the repeat brings the latest status.
    assert!(text.contains("succeeded") && text.contains("(repeat"), "{text}");
    assert!(both(&out).contains("connection to the broker lost"), "{}", both(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_published_per_contract_and_its_reconnects_are_followed() {
    let broker = Mosquitto::start();
    let mut daemon = FakeDaemon::start(&broker).await;
    let out = verb(
        &broker,
        &[
            "pay",
            "--account",
            "ACC-1",
            "--amount",
            "120.50",
            "--confirmed-at",
            "2026-11-28T21:40:00+08:00",
            "--id",
            "pay-889120",
        ],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", both(&out));
    let text = stdout(&out);
    for s in ["pay:pay-889120:MTR-A", "MTR-A: reconnected", "MTR-B: ARMED", "customer must press the button"] {
        assert!(text.contains(s), "{s:?} missing in:\n{text}");
    }
    // The accepted that came before the payment's own message is shown too.
    assert!(text.lines().any(|l| l.starts_with("MTR-A") && l.contains("accepted")), "{text}");
    let sent = daemon.next().await;
    assert_eq!(sent.topic, format!("{P}/payments"));
    let p = Payment::parse(&sent.payload).expect("a contract payment");
    assert_eq!((p.id.as_str(), p.account.as_str(), p.cleared), ("pay-889120", "ACC-1", true));
    assert_eq!(p.amount.as_ref().map(Amount::as_str), Some("120.50"));
    assert_eq!(p.currency.as_deref(), Some("CNY"));
    assert_eq!(p.confirmed_at, Timestamp::parse("2026-11-28T21:40:00+08:00").ok());

    let out = verb(&broker, &["pay", "--account", "ACC-1", "--amount", "5", "--json"]).await;
    let v = json_of(&out);
    assert_eq!((code(&out), v["outcome"].as_str()), (0, Some("reconnected")), "{}", both(&out));
    assert_eq!(v["reconnects"].as_array().map(Vec::len), Some(2));
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cli-pay-") && is_valid_id(id)), "{v}");

    let out = verb(&broker, &["pay", "--account", "ACC-NONE", "--amount", "5"]).await;
    assert_eq!(code(&out), 0, "{}", both(&out));
    assert!(stdout(&out).contains("no meter of this account was cut for arrears"), "{}", both(&out));

    let out = verb(&broker, &["pay", "--account", "ACC-1", "--amount", "5", "--cleared", "false"]).await;
    assert_eq!(code(&out), 0, "{}", both(&out));
    assert!(stdout(&out).contains("not cleared"), "{}", both(&out));

    let out = verb(&broker, &["pay", "--account", "ACC-FAIL", "--amount", "5"]).await;
    assert_eq!(code(&out), 1, "{}", both(&out));
    assert!(
        stdout(&out).contains("meter_unreachable") && stdout(&out).contains("MTR-C: reconnect failed"),
        "{}",
        both(&out)
    );

    let out = verb(&broker, &["pay", "--account", "ACC-1", "--amount", "5", "--id", "pay-again"]).await;
    assert_eq!(code(&out), 0, "{}", both(&out));
    assert!(stdout(&out).contains("seen before, nothing new to do"), "{}", both(&out));

    let out = verb(&broker, &["pay", "--account", "ACC-1", "--amount", "5", "--id", "pay-dup", "--json"]).await;
    assert_eq!(code(&out), 1, "{}", both(&out));
    let v = json_of(&out);
    assert_eq!(
        (v["outcome"].as_str(), v["payment"]["error"]["code"].as_str()),
        (Some("refused"), Some("duplicate_id"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_without_a_daemon_times_out_with_exit_4() {
    let broker = Mosquitto::start();
    let out = verb(&broker, &["pay", "--account", "ACC-1", "--amount", "5", "--timeout", "0.5"]).await;
    assert_eq!(code(&out), 4, "{}", both(&out));
    assert!(stdout(&out).contains("is the daemon running?"), "{}", both(&out));
}

#[test]
fn audit_shows_a_meters_journal_entries_and_a_missing_journal_is_exit_2() {
    let dir = TempDir::new("audit");
    let config = dir.path("site.toml");
    std::fs::write(&config, "state_dir = \"state\"\n[policy]\nutc_offset_minutes = 480\n").expect("config");
    let cfg = config.to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_headend")).args(args).output().expect("headend runs")
    };

    let out = run(&["audit", "--config", &cfg, "--meter", "MTR-0001"]);
    assert_eq!(code(&out), 2, "{}", both(&out));
    assert!(both(&out).contains("no journal at"), "{}", both(&out));

    std::fs::create_dir_all(dir.path("state")).expect("state dir");
    let t0 = 1_795_827_600_000;
    let body = r#"{"id":"c-1","action":"disconnect","reason":"maintenance","operator":"field/zhao"}"#;
    let req = CommandRequest::parse(body.as_bytes()).expect("valid");
    let meter = MeterId::new("MTR-0001").expect("meter");
    let cmd = Command::new(meter.clone(), req, t0, &CommandsConfig::default());
    {
        let journal = Journal::open(&dir.path("state/journal.sqlite3")).expect("journal");
        journal.accept_command(&cmd).wait().expect("accepted");
        let mut done = ResultMessage::new(Some("c-1".into()), "MTR-0001", Status::Succeeded, format_at(t0 + 1200, 480));
        done.relay = Some(RelayState::Disconnected);
        let rec = StatusRecord {
            command: cmd.id().clone(),
            meter,
            status: Status::Succeeded,
            attempts: 1,
            wake_ms: None,
            at_ms: t0 + 1200,
            message: done,
        };
        journal.record(vec![Record::Status(rec)]).wait().expect("recorded");
    }

    let out = run(&["audit", "--config", &cfg, "--meter", "MTR-0001"]);
    assert_eq!(code(&out), 0, "{}", both(&out));
    let text = stdout(&out);
    assert!(text.contains("c-1") && text.contains("succeeded") && text.contains("relay=disconnected"), "{text}");
    assert!(text.contains("operator=field/zhao") && text.contains("reason=maintenance"), "{text}");
    assert!(text.contains("+08:00"), "times in the site's offset: {text}");

    let out = run(&["audit", "--config", &cfg, "--meter", "MTR-0001", "--limit", "1", "--json"]);
    let v = json_of(&out);
    let entries = v["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (entries[0]["status"].as_str(), entries[0]["detail"]["relay"].as_str()),
        (Some("succeeded"), Some("disconnected"))
    );

    let out = run(&["audit", "--config", &cfg, "--meter", "MTR-0002"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("no entries"), "{}", both(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_the_configured_ca_and_password_file_and_the_password_is_never_printed() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mqtt-tls");
    let f = |name: &str| fixtures.join(name).to_string_lossy().into_owned();
    let tls_port = mosquitto::free_port();
    // Global settings: the anonymous plain listener of the harness is closed too.
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
        f("ca.pem"),
        f("server.pem"),
        f("server.key"),
        f("passwd")
    ));
    let dir = TempDir::new("tls");
    let site = |ca: &str, password: &str| {
        std::fs::write(dir.path("desk.pw"), format!("{password}\n")).expect("password file");
        let text = format!(
            "[mqtt]\nbroker = \"mqtts://localhost:{tls_port}\"\nprefix = \"{P}\"\nusername = \"desk\"\npassword_file = \"desk.pw\"\nca_file = \"{}\"\n",
            f(ca)
        );
        std::fs::write(dir.path("site.toml"), text).expect("site file");
        dir.path("site.toml").to_string_lossy().into_owned()
    };
    let secret = "desk-s3cret-pw";

    // Connected, subscribed and acknowledged over TLS: only the (absent) daemon's answer is missing.
    let cfg = site("ca.pem", secret);
    let out = headend(&["read", "MTR-1", "--config", &cfg, "--timeout", "0.5"]).await;
    assert_eq!(code(&out), 4, "{}\n{}", both(&out), broker.log());
    assert!(stdout(&out).contains("is the daemon running?"), "{}", both(&out));

    let cfg = site("ca.pem", "wrong-password");
    let out = headend(&["read", "MTR-1", "--config", &cfg, "--timeout", "5"]).await;
    assert_eq!(code(&out), 3, "{}", both(&out));
    assert!(!both(&out).contains("wrong-password"), "a password was printed: {}", both(&out));

    let cfg = site("other-ca.pem", secret);
    let out = headend(&["read", "MTR-1", "--config", &cfg, "--timeout", "5", "--json"]).await;
    assert_eq!(code(&out), 3, "{}", both(&out));
    assert_eq!(json_of(&out)["outcome"], "broker_unreachable");
    assert!(!both(&out).contains(secret), "the password was printed: {}", both(&out));

    // Credentials in a URL are refused without echoing them.
    let url = format!("mqtts://desk:{secret}@localhost:{tls_port}");
    let out = headend(&["read", "MTR-1", "--broker", &url]).await;
    assert_eq!(code(&out), 2, "{}", both(&out));
    assert!(!both(&out).contains(secret), "the password was printed: {}", both(&out));
}
