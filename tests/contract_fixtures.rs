//! Pins the MQTT contract (spec/mqtt-api.md, version 1): the spec's own examples parse,
//! outbound messages carry exactly the spec's field names, and bad input gets the
//! rejection the contract names. The JSON fixtures are copied verbatim from the spec.

use headend::contract::*;
use headend::meter::{MeterId, RelayState};
use serde_json::{json, Value};

const SPEC_COMMAND: &str = r#"{
  "id": "c-20261128-000731",
  "action": "disconnect",
  "reason": "arrears",
  "operator": "95598/wang.li",
  "requested_at": "2026-11-28T09:00:00+08:00",
  "arrears_as_of": "2026-11-28T08:00:00+08:00",
  "notice_sent_at": "2026-11-25T10:00:00+08:00",
  "expires_at": "2026-11-29T09:00:00+08:00"
}"#;

const SPEC_PAYMENT: &str = r#"{ "id": "pay-889120", "account": "ACC-1001", "amount": "120.50", "currency": "CNY",
  "cleared": true, "confirmed_at": "2026-11-28T21:40:00+08:00" }"#;

const SPEC_RESULT: &str = r#"{ "id": "c-20261128-000731", "meter": "MTR-0001", "action": "disconnect",
  "status": "succeeded", "relay": "disconnected", "attempts": 1,
  "at": "2026-11-28T09:00:01.214+08:00" }"#;

const SPEC_STATE: &str = r#"{ "meter": "MTR-0001", "account": "ACC-1001", "relay": "disconnected",
  "reason": "arrears", "since": "2026-11-28T09:00:01+08:00",
  "online": true, "last_seen": "2026-11-28T09:14:58+08:00",
  "last_reading": "2026-11-28T09:00:00+08:00" }"#;

const SPEC_READINGS: &str = r#"{ "meter": "MTR-0001", "source": "1.0.99.1.0.255", "interval_s": 900,
  "columns": [ {"name": "1.0.1.8.0.255", "unit": "Wh"}, {"name": "1.0.2.8.0.255", "unit": "Wh"} ],
  "rows": [ ["2026-11-28T09:00:00+08:00", 1234567, 0],
            ["2026-11-28T09:15:00+08:00", 1234890, 0] ] }"#;

fn ms(t: &str) -> i64 {
    Timestamp::parse(t).map(Timestamp::unix_ms).unwrap_or(i64::MIN)
}

#[test]
fn the_spec_command_parses() {
    let c = CommandRequest::parse(SPEC_COMMAND.as_bytes()).expect("spec example is valid");
    assert_eq!(c.id.as_str(), "c-20261128-000731");
    assert_eq!(c.action, Action::Disconnect);
    assert_eq!(c.reason, Some(Reason::Arrears));
    assert_eq!(c.operator.as_deref(), Some("95598/wang.li"));
    assert_eq!(c.arrears_as_of.map(Timestamp::unix_ms), Some(ms("2026-11-28T00:00:00Z")));
    assert_eq!(c.notice_sent_at.map(Timestamp::unix_ms), Some(ms("2026-11-25T02:00:00Z")));
    assert!(c.override_.is_none());
    assert!(c.is_arrears_cut());
}

#[test]
fn the_canonical_form_reads_back_to_the_same_command() {
    let mut with_override: Value = serde_json::from_str(SPEC_COMMAND).expect("json");
    with_override["override"] = json!({"by": "zhang.wei", "why": "hospital request"});
    let c = CommandRequest::parse(with_override.to_string().as_bytes()).expect("valid");
    let back = CommandRequest::parse(c.to_json().as_bytes()).expect("canonical form parses");
    assert_eq!(back, c);
    // Timestamps keep the caller's offset in the stored form.
    assert!(c.to_json().contains("2026-11-28T09:00:00+08:00"), "{}", c.to_json());
    assert!(c.to_json().contains(r#""override":{"by":"zhang.wei","why":"hospital request"}"#));
}

#[test]
fn unknown_fields_are_ignored_and_null_is_absent() {
    let c = CommandRequest::parse(br#"{"id":"x1","action":"read","future_field":{"a":[1,2]},"operator":null}"#)
        .expect("valid");
    assert_eq!(c.action, Action::Read);
    assert_eq!(c.operator, None);
}

#[test]
fn every_action_and_reason_of_the_contract_is_known() {
    for a in ["disconnect", "reconnect", "read"] {
        for r in ["arrears", "customer_request", "safety", "maintenance", "tamper"] {
            let p = json!({"id": "c1", "action": a, "reason": r}).to_string();
            let c = CommandRequest::parse(p.as_bytes()).expect("valid");
            assert_eq!(c.action.as_str(), a);
            assert_eq!(c.reason.map(Reason::as_str), Some(r));
        }
    }
    assert!(CommandRequest::parse(br#"{"id":"c1","action":"reconnect"}"#).is_ok());
}

fn rejection(payload: &[u8]) -> Rejection {
    match CommandRequest::parse(payload) {
        Err(r) => r,
        Ok(c) => panic!("accepted {c:?}"),
    }
}

#[test]
fn bad_commands_get_the_contracts_codes_and_the_id_if_readable() {
    let cases: &[(&[u8], Option<&str>, ErrorCode)] = &[
        (b"not json", None, ErrorCode::InvalidPayload),
        (b"", None, ErrorCode::InvalidPayload),
        (b"[1,2]", None, ErrorCode::InvalidPayload),
        (b"\xff\xfe{}", None, ErrorCode::InvalidPayload),
        (br#"{"action":"read"}"#, None, ErrorCode::InvalidPayload),
        (br#"{"id":7,"action":"read"}"#, None, ErrorCode::InvalidPayload),
        (br#"{"id":"has space","action":"read"}"#, Some("has space"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1"}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":5}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"explode"}"#, Some("c1"), ErrorCode::UnsupportedAction),
        (br#"{"id":"c1","action":"disconnect"}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"disconnect","reason":"because"}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"read","expires_at":"tomorrow"}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"read","expires_at":"2026-11-29T09:00:00"}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"read","operator":["x"]}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"read","override":"yes"}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"read","override":{"why":"x"}}"#, Some("c1"), ErrorCode::InvalidPayload),
        (br#"{"id":"c1","action":"read","override":{"by":" "}}"#, Some("c1"), ErrorCode::InvalidPayload),
    ];
    for (payload, id, code) in cases {
        let r = rejection(payload);
        assert_eq!(r.code, *code, "{:?}: {}", String::from_utf8_lossy(payload), r.message);
        assert_eq!(r.id.as_deref(), *id, "{:?}", String::from_utf8_lossy(payload));
    }
}

#[test]
fn oversize_payloads_are_refused_unread() {
    let mut big = br#"{"id":"c1","action":"read","pad":""#.to_vec();
    big.resize(MAX_PAYLOAD + 1, b'a');
    let r = rejection(&big);
    assert_eq!((r.code, r.id), (ErrorCode::InvalidPayload, None));
    assert!(r.message.contains("1 MiB"), "{}", r.message);
    // Exactly 1 MiB is still read.
    let mut ok = br#"{"id":"c1","action":"read","pad":""#.to_vec();
    ok.resize(MAX_PAYLOAD - 2, b'a');
    ok.extend_from_slice(b"\"}");
    assert!(CommandRequest::parse(&ok).is_ok());
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("{{\"id\":\"c1\",\"action\":\"read\",\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(rejection(deep.as_bytes()).code, ErrorCode::InvalidPayload);
}

#[test]
fn the_spec_payment_parses_and_bad_ones_are_refused() {
    let p = Payment::parse(SPEC_PAYMENT.as_bytes()).expect("spec example is valid");
    assert_eq!((p.id.as_str(), p.account.as_str(), p.cleared), ("pay-889120", "ACC-1001", true));
    assert_eq!(p.amount.as_ref().map(Amount::as_str), Some("120.50"));
    assert_eq!(p.confirmed_at.map(Timestamp::unix_ms), Some(ms("2026-11-28T13:40:00Z")));
    assert_eq!(Payment::parse(p.to_json().as_bytes()).ok(), Some(p));
    for bad in [
        r#"{"id":"p1","account":"A","cleared":"yes"}"#,
        r#"{"id":"p1","account":"A"}"#,
        r#"{"id":"p1","cleared":true}"#,
        r#"{"id":"p1","account":"A","cleared":true,"amount":120.5}"#,
        r#"{"id":"p1","account":"A B","cleared":true}"#,
    ] {
        let r = Payment::parse(bad.as_bytes()).expect_err(bad);
        assert_eq!(r.code, ErrorCode::InvalidPayload, "{bad}");
        assert_eq!(r.id.as_deref(), Some("p1"), "{bad}");
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

#[test]
fn the_spec_result_round_trips_with_the_same_fields() {
    let m: ResultMessage = serde_json::from_str(SPEC_RESULT).expect("spec example");
    assert_eq!(m.status, Status::Succeeded);
    assert_eq!(m.relay, Some(RelayState::Disconnected));
    let spec: Value = serde_json::from_str(SPEC_RESULT).expect("json");
    let ours: Value = serde_json::from_str(&m.to_json()).expect("json");
    assert_eq!(ours, spec);
}

#[test]
fn result_messages_use_the_contracts_field_names() {
    let mut m = ResultMessage::new(Some("c1".into()), "MTR-0001", Status::Deferred, format_at(1_795_827_601_214, 480));
    m.action = Some(Action::Disconnect);
    m.relay = Some(RelayState::ReadyForReconnection);
    m.attempts = 2;
    m.error = Some(ErrorBody::new(ErrorCode::PolicyNoNotice, "no notice"));
    m.not_before = Some(format_at(1_795_900_000_000, 480));
    m.by = Some(Supersessor::Payment(PaymentId::new("pay-1").expect("id")));
    m.duplicate = true;
    m.trigger = Some(Trigger { payment: PaymentId::new("pay-1").expect("id") });
    m.registers = Some(
        [("1.0.1.8.0.255".to_owned(), RegisterValue { value: json_number(1_234_567.0), unit: "Wh".into() })].into(),
    );
    m.meter_clock = Some("2026-11-28T09:00:00+08:00".into());
    let v: Value = serde_json::from_str(&m.to_json()).expect("json");
    let expected = [
        "action",
        "at",
        "attempts",
        "by",
        "duplicate",
        "error",
        "id",
        "meter",
        "meter_clock",
        "not_before",
        "registers",
        "relay",
        "status",
        "trigger",
    ];
    assert_eq!(keys(&v), expected);
    assert_eq!(v["at"], "2026-11-28T09:00:01.214+08:00");
    assert_eq!(v["relay"], "ready_for_reconnection");
    assert_eq!(v["error"], json!({"code": "policy_no_notice", "message": "no notice"}));
    assert_eq!(v["by"], "pay-1");
    assert_eq!(v["trigger"], json!({"payment": "pay-1"}));
    assert_eq!(v["registers"], json!({"1.0.1.8.0.255": {"value": 1234567, "unit": "Wh"}}));
    // The wire does not say whether `by` names a command or a payment.
    m.by = Some(Supersessor::Command(CommandId::new("pay-1").expect("id")));
    assert_eq!(serde_json::from_value::<ResultMessage>(v).ok(), Some(m));
}

#[test]
fn a_rejection_for_unreadable_input_has_a_null_id() {
    let r = rejection(b"{oops");
    let m = ResultMessage::for_rejection("MTR-0001", &r, format_at(0, 0));
    let v: Value = serde_json::from_str(&m.to_json()).expect("json");
    assert_eq!(v["id"], Value::Null);
    assert_eq!(v["status"], "rejected");
    assert_eq!(v["error"]["code"], "invalid_payload");
    assert!(v.get("duplicate").is_none(), "duplicate is only written when true");
}

#[test]
fn every_status_and_code_is_spelled_as_in_the_spec() {
    let statuses = [
        "accepted",
        "deferred",
        "executing",
        "retrying",
        "succeeded",
        "armed",
        "superseded",
        "rejected",
        "failed",
        "expired",
    ];
    for s in statuses {
        let st = Status::from_wire(s).expect(s);
        assert_eq!(serde_json::to_value(st).ok(), Some(json!(s)));
        assert_eq!(st.is_final(), !matches!(s, "accepted" | "deferred" | "executing" | "retrying"));
    }
    let codes = [
        "invalid_payload",
        "unknown_meter",
        "unsupported_action",
        "duplicate_id",
        "policy_protected",
        "policy_no_notice",
        "policy_stale_arrears",
        "policy_rate_limit",
        "meter_unreachable",
        "meter_refused",
        "identity_mismatch",
        "verify_mismatch",
        "internal",
    ];
    for c in codes {
        let code: ErrorCode = serde_json::from_value(json!(c)).expect(c);
        assert_eq!(code.as_str(), c);
    }
}

#[test]
fn the_spec_state_readings_and_status_round_trip() {
    for (text, kind) in [(SPEC_STATE, "state"), (SPEC_READINGS, "readings")] {
        let spec: Value = serde_json::from_str(text).expect("json");
        let ours = match kind {
            "state" => serde_json::to_value(serde_json::from_str::<StateMessage>(text).expect("state")),
            _ => serde_json::to_value(serde_json::from_str::<ReadingsBatch>(text).expect("readings")),
        }
        .expect("serializes");
        assert_eq!(ours, spec, "{kind}");
    }
    let status = StatusMessage {
        online: true,
        version: Some("0.1.0".into()),
        meters: Some(12000),
        channels_up: Some(310),
        channels_down: Some(2),
        config_generation: None,
    };
    assert_eq!(
        serde_json::to_value(&status).ok(),
        Some(json!({"online": true, "version": "0.1.0", "meters": 12000, "channels_up": 310, "channels_down": 2}))
    );
    assert_eq!(serde_json::to_string(&StatusMessage::last_will()).ok().as_deref(), Some(r#"{"online":false}"#));
}

#[test]
fn topics_live_under_the_prefix() {
    let t = Topics::new("ami/north").expect("prefix");
    let m = MeterId::new("MTR-0001").expect("id");
    assert_eq!(t.cmd_filter(), "ami/north/cmd/+");
    assert_eq!(t.payments(), "ami/north/payments");
    assert_eq!(t.result(&m), "ami/north/result/MTR-0001");
    assert_eq!(t.state(&m), "ami/north/state/MTR-0001");
    assert_eq!(t.readings(&m), "ami/north/readings/MTR-0001");
    assert_eq!(t.status(), "ami/north/status");
    assert_eq!(t.parse_inbound("ami/north/cmd/MTR-0001"), Some(Inbound::Command(m)));
    assert_eq!(t.parse_inbound("ami/north/cmd/bad id"), Some(Inbound::CommandBadMeter("bad id")));
    assert_eq!(t.parse_inbound("ami/north/payments"), Some(Inbound::Payments));
    assert_eq!(t.parse_inbound("ami/south/cmd/MTR-0001"), None);
    assert_eq!(t.parse_inbound("ami/northx/cmd/MTR-0001"), None);
    assert_eq!(t.result_raw("bad id").as_deref(), Some("ami/north/result/bad id"));
    assert_eq!(t.result_raw("a/b"), None);
    assert_eq!(t.result_raw("#"), None);
    for bad in ["", "ami/", "/ami", "ami/#", "a//b", "+"] {
        assert!(Topics::new(bad).is_err(), "{bad:?}");
    }
}
