//! The policy gates in virtual time: service window (days, hours, holidays, the day
//! before a holiday, offsets), notice, protection, stale arrears, rate limits, quarantine.
//! 2026-11-23 is a Monday; 2026-11-28 a Saturday.

use headend::config::SiteConfig;
use headend::contract::{AccountId, ErrorCode, Timestamp};
use headend::meter::MeterId;
use headend::policy::*;

const H: i64 = 3_600_000;

fn at(t: &str) -> i64 {
    Timestamp::parse(t).map(Timestamp::unix_ms).unwrap_or(i64::MIN)
}

fn china() -> PolicyConfig {
    PolicyConfig { utc_offset_minutes: 480, ..PolicyConfig::default() }
}

/// An arrears cut that passes every gate but the window, at +08:00.
fn case(now: i64) -> ArrearsCase {
    ArrearsCase {
        protection: None,
        arrears_as_of_ms: now - H,
        latest_cleared_ms: None,
        notice_sent_ms: Some(now - 100 * H),
        overridden: false,
        utc_offset_min: 480,
    }
}

fn code(g: Gate) -> Option<ErrorCode> {
    match g {
        Gate::Reject { code, .. } => Some(code),
        _ => None,
    }
}

#[test]
fn defaults_are_the_safe_ones() {
    let p = PolicyConfig::default();
    assert_eq!(p.notice_hours, 72);
    assert_eq!(p.window.days, vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu]);
    assert_eq!((p.window.start.ms(), p.window.end.ms()), (9 * H, 16 * H));
    assert!(p.window.no_cut_before_holiday);
    assert!(p.problems().is_empty());
}

#[test]
fn weekdays_are_right() {
    let day = |t: &str| at(t).div_euclid(86_400_000);
    assert_eq!(Weekday::of_day(day("2026-11-23T12:00:00Z")), Weekday::Mon);
    assert_eq!(Weekday::of_day(day("2026-11-27T12:00:00Z")), Weekday::Fri);
    assert_eq!(Weekday::of_day(day("2026-11-29T12:00:00Z")), Weekday::Sun);
    assert_eq!(Weekday::of_day(0), Weekday::Thu);
    assert_eq!(Weekday::of_day(-1), Weekday::Wed);
}

#[test]
fn inside_the_window_an_arrears_cut_passes() {
    let p = Policy::new(china());
    let now = at("2026-11-24T10:00:00+08:00");
    assert_eq!(p.check_arrears(&case(now), now), Gate::Allow);
    // The window's edges: start is in, end is out.
    let start = at("2026-11-24T09:00:00+08:00");
    assert_eq!(p.check_arrears(&case(start), start), Gate::Allow);
    let end = at("2026-11-24T16:00:00+08:00");
    assert_eq!(p.check_arrears(&case(end), end), Gate::Defer { not_before_ms: at("2026-11-25T09:00:00+08:00") });
}

#[test]
fn outside_the_window_it_waits_for_the_next_opening() {
    let p = Policy::new(china());
    let cases = [
        // Before opening on a weekday: same day.
        ("2026-11-24T07:30:00+08:00", "2026-11-24T09:00:00+08:00"),
        // Night: next morning.
        ("2026-11-24T22:00:00+08:00", "2026-11-25T09:00:00+08:00"),
        // Thursday after hours, Friday, Saturday, Sunday: Monday.
        ("2026-11-26T17:00:00+08:00", "2026-11-30T09:00:00+08:00"),
        ("2026-11-27T10:00:00+08:00", "2026-11-30T09:00:00+08:00"),
        ("2026-11-28T10:00:00+08:00", "2026-11-30T09:00:00+08:00"),
        ("2026-11-29T23:59:59+08:00", "2026-11-30T09:00:00+08:00"),
    ];
    for (now, opening) in cases {
        let now = at(now);
        assert_eq!(p.check_arrears(&case(now), now), Gate::Defer { not_before_ms: at(opening) }, "{now}");
    }
}

#[test]
fn the_window_is_in_the_meters_offset() {
    let p = Policy::new(PolicyConfig::default());
    // 02:00Z on a Tuesday is 10:00 in Beijing (inside) and 02:00 in London (outside).
    let now = at("2026-11-24T02:00:00Z");
    assert_eq!(p.check_arrears(&case(now), now), Gate::Allow);
    let london = ArrearsCase { utc_offset_min: 0, ..case(now) };
    assert_eq!(p.check_arrears(&london, now), Gate::Defer { not_before_ms: at("2026-11-24T09:00:00Z") });
    // Monday 23:00 in Los Angeles is Tuesday 07:00Z: the window is Monday's, closed.
    let la = ArrearsCase { utc_offset_min: -480, ..case(now) };
    let now = at("2026-11-23T23:00:00-08:00");
    assert_eq!(p.check_arrears(&la, now), Gate::Defer { not_before_ms: at("2026-11-24T09:00:00-08:00") });
}

#[test]
fn holidays_and_the_day_before_are_closed() {
    let mut cfg = china();
    cfg.window.holidays = vec![CivilDate::parse("2026-11-26").expect("date")];
    let p = Policy::new(cfg.clone());
    // Wednesday is the day before the Thursday holiday; then Friday to Sunday: Monday.
    let now = at("2026-11-25T10:00:00+08:00");
    assert_eq!(p.check_arrears(&case(now), now), Gate::Defer { not_before_ms: at("2026-11-30T09:00:00+08:00") });
    // Tuesday evening looks ahead the same way.
    let now = at("2026-11-24T18:00:00+08:00");
    assert_eq!(p.check_arrears(&case(now), now), Gate::Defer { not_before_ms: at("2026-11-30T09:00:00+08:00") });
    // Without the day-before rule, Wednesday is open.
    cfg.window.no_cut_before_holiday = false;
    let p = Policy::new(cfg);
    let now = at("2026-11-25T10:00:00+08:00");
    assert_eq!(p.check_arrears(&case(now), now), Gate::Allow);
}

#[test]
fn a_long_holiday_season_pushes_to_the_first_open_day() {
    let mut cfg = china();
    cfg.window.days = vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri];
    cfg.window.holidays = (1..=7).filter_map(|d| CivilDate::parse(&format!("2026-10-0{d}"))).collect();
    let p = Policy::new(cfg);
    let now = at("2026-09-30T10:00:00+08:00");
    // 30 Sep is the day before the holiday; 1-7 Oct closed; 8 Oct is a Thursday.
    assert_eq!(p.check_arrears(&case(now), now), Gate::Defer { not_before_ms: at("2026-10-08T09:00:00+08:00") });
}

#[test]
fn an_override_lifts_the_window_and_nothing_else() {
    let p = Policy::new(china());
    let now = at("2026-11-28T22:00:00+08:00");
    let c = ArrearsCase { overridden: true, ..case(now) };
    assert_eq!(p.check_arrears(&c, now), Gate::Allow);
    let no_notice = ArrearsCase { notice_sent_ms: None, ..c.clone() };
    assert_eq!(code(p.check_arrears(&no_notice, now)), Some(ErrorCode::PolicyNoNotice));
    let protected = ArrearsCase { protection: Some(Protection::Medical), ..c };
    assert_eq!(code(p.check_arrears(&protected, now)), Some(ErrorCode::PolicyProtected));
}

#[test]
fn notice_must_be_recorded_and_early_enough() {
    let p = Policy::new(china());
    let now = at("2026-11-24T10:00:00+08:00");
    let with = |sent: Option<i64>| ArrearsCase { notice_sent_ms: sent, ..case(now) };
    assert_eq!(code(p.check_arrears(&with(None), now)), Some(ErrorCode::PolicyNoNotice));
    assert_eq!(code(p.check_arrears(&with(Some(now - 71 * H)), now)), Some(ErrorCode::PolicyNoNotice));
    assert_eq!(p.check_arrears(&with(Some(now - 72 * H)), now), Gate::Allow);
    // A notice "sent" in the future is no notice.
    assert_eq!(code(p.check_arrears(&with(Some(now + H)), now)), Some(ErrorCode::PolicyNoNotice));
    let p = Policy::new(PolicyConfig { notice_hours: 168, ..china() });
    assert_eq!(code(p.check_arrears(&with(Some(now - 100 * H)), now)), Some(ErrorCode::PolicyNoNotice));
}

#[test]
fn protected_accounts_are_never_cut_for_arrears() {
    let p = Policy::new(china());
    let now = at("2026-11-24T10:00:00+08:00");
    for prot in [Protection::Medical, Protection::LifeSupport, Protection::Hospital, Protection::GuaranteedPower] {
        let c = ArrearsCase { protection: Some(prot), ..case(now) };
        assert_eq!(code(p.check_arrears(&c, now)), Some(ErrorCode::PolicyProtected), "{prot}");
    }
}

#[test]
fn arrears_computed_before_the_latest_cleared_payment_are_stale() {
    let p = Policy::new(china());
    let now = at("2026-11-24T10:00:00+08:00");
    let c = |paid: i64| ArrearsCase { latest_cleared_ms: Some(paid), ..case(now) };
    assert_eq!(code(p.check_arrears(&c(now - H / 2), now)), Some(ErrorCode::PolicyStaleArrears));
    assert_eq!(p.check_arrears(&c(now - 2 * H), now), Gate::Allow);
    // Equal instants: the arrears list already saw the payment.
    assert_eq!(p.check_arrears(&c(now - H), now), Gate::Allow);
}

#[test]
fn an_empty_window_is_refused_not_looped_on() {
    let mut cfg = china();
    cfg.window.days.clear();
    assert!(!cfg.problems().is_empty());
    let p = Policy::new(cfg);
    let now = at("2026-11-24T10:00:00+08:00");
    assert_eq!(code(p.check_arrears(&case(now), now)), Some(ErrorCode::Internal));
}

fn rate(global_per_hour: u32, global_burst: u32, channel_per_hour: u32, channel_burst: u32) -> Policy {
    let rate = RateConfig {
        global_per_hour,
        global_burst,
        channel_per_hour,
        channel_burst,
        quarantine_threshold: 1000,
        quarantine_window_s: 600,
    };
    Policy::new(PolicyConfig { rate, ..PolicyConfig::default() })
}

#[test]
fn the_global_bucket_lets_a_burst_through_then_spaces_the_rest() {
    // 60 per hour = one a minute; a burst of 3.
    let mut p = rate(60, 3, 10_000, 10_000);
    let t0 = at("2026-11-24T10:00:00Z");
    let slots: Vec<i64> = (0..6).map(|i| p.book_disconnect(&format!("ch{i}"), t0) - t0).collect();
    assert_eq!(slots, vec![0, 0, 0, 60_000, 120_000, 180_000]);
    // After a quiet hour the bucket is full again.
    let t1 = t0 + 2 * H;
    let slots: Vec<i64> = (0..4).map(|_| p.book_disconnect("x", t1) - t1).collect();
    assert_eq!(slots, vec![0, 0, 0, 60_000]);
}

#[test]
fn each_channel_has_its_own_bucket() {
    // 6 per hour per channel (one per 10 min), burst 2; global generous.
    let mut p = rate(10_000, 10_000, 6, 2);
    let t0 = at("2026-11-24T10:00:00Z");
    let a: Vec<i64> = (0..3).map(|_| p.book_disconnect("a", t0) - t0).collect();
    let b: Vec<i64> = (0..3).map(|_| p.book_disconnect("b", t0) - t0).collect();
    assert_eq!(a, vec![0, 0, 600_000]);
    assert_eq!(b, a);
}

#[test]
fn refill_is_exact_in_virtual_time() {
    let mut p = rate(3600, 1, 100_000, 100_000); // one a second, no burst
    let t0 = 1_000_000_000_000;
    assert_eq!(p.book_disconnect("a", t0), t0);
    assert_eq!(p.book_disconnect("a", t0 + 999), t0 + 1000);
    assert_eq!(p.book_disconnect("a", t0 + 5000), t0 + 5000);
}

#[test]
fn a_burst_beyond_the_threshold_trips_the_quarantine_until_lifted() {
    let rate = RateConfig { quarantine_threshold: 5, quarantine_window_s: 60, ..RateConfig::default() };
    let mut p = Policy::new(PolicyConfig { rate, ..PolicyConfig::default() });
    let t0 = at("2026-11-24T10:00:00Z");
    for i in 0..5 {
        assert_eq!(p.note_disconnect_request(t0 + i * 1000), Arrival::Counted);
    }
    assert_eq!(
        p.note_disconnect_request(t0 + 5000),
        Arrival::Tripped(QuarantineEvent::Tripped { at_ms: t0 + 5000, requests: 6 })
    );
    assert!(p.quarantine().is_some());
    // No time heals it.
    assert_eq!(p.note_disconnect_request(t0 + 100 * H), Arrival::Quarantined);
    let lift = p.lift_quarantine("ops/li", "billing feed fixed", t0 + 101 * H);
    assert_eq!(
        lift,
        Some(QuarantineEvent::Lifted { at_ms: t0 + 101 * H, by: "ops/li".into(), why: "billing feed fixed".into() })
    );
    assert!(p.quarantine().is_none());
    assert_eq!(p.lift_quarantine("ops/li", "again", t0 + 102 * H), None);
    // A clean slate after the lift.
    assert_eq!(p.note_disconnect_request(t0 + 101 * H + 1), Arrival::Counted);
}

#[test]
fn requests_spread_over_time_never_trip_it() {
    let rate = RateConfig { quarantine_threshold: 5, quarantine_window_s: 60, ..RateConfig::default() };
    let mut p = Policy::new(PolicyConfig { rate, ..PolicyConfig::default() });
    let t0 = at("2026-11-24T10:00:00Z");
    // One every 13 s: never more than 5 within 60 s.
    for i in 0..1000 {
        assert_eq!(p.note_disconnect_request(t0 + i * 13_000), Arrival::Counted, "request {i}");
    }
}

#[test]
fn a_restored_quarantine_holds() {
    let mut p = Policy::new(PolicyConfig::default());
    p.restore_quarantine(Some(QuarantineState { since_ms: 5, requests: 400 }));
    assert_eq!(p.note_disconnect_request(10), Arrival::Quarantined);
}

#[test]
fn the_registry_comes_from_configuration() {
    let cfg = SiteConfig::parse(
        r#"
        [[link]]
        name = "gw"
        protocol = "modbus-tcp"
        address = "127.0.0.1:5020"
        [[meter]]
        id = "M1"
        link = "gw"
        account = "ACC-1"
        unit_id = 1
        modbus_profile = "p"
        timezone_offset_minutes = 480
        [[meter]]
        id = "M2"
        link = "gw"
        account = "ACC-1"
        unit_id = 2
        modbus_profile = "p"
        [[meter]]
        id = "M3"
        link = "gw"
        unit_id = 3
        modbus_profile = "p"
        [[account]]
        id = "ACC-1"
        protection = "guaranteed_power"
        [policy]
        utc_offset_minutes = -300
        [modbus_profile.p]
        "#,
    )
    .expect("parses");
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let r = Registry::from_config(&cfg);
    let acc = AccountId::new("ACC-1").expect("id");
    let m = |s: &str| MeterId::new(s).expect("id");
    assert_eq!(r.meters_of(&acc), &[m("M1"), m("M2")]);
    assert_eq!(r.protection(&acc), Some(Protection::GuaranteedPower));
    assert_eq!(r.meter(&m("M1")).map(|e| e.utc_offset_min), Some(480));
    assert_eq!(r.meter(&m("M2")).map(|e| e.utc_offset_min), Some(-300));
    assert_eq!(r.meter(&m("M3")).and_then(|e| e.account.clone()), None);
    assert_eq!(r.meter(&m("M3")).map(|e| e.channel.as_str()), Some("gw"));
    assert_eq!(r.len(), 3);
}

#[test]
fn bad_account_ids_in_configuration_are_problems() {
    let cfg = SiteConfig::parse(
        "[[link]]\nname = \"gw\"\nprotocol = \"modbus-tcp\"\naddress = \"a:1\"\n[[meter]]\nid = \"M1\"\nlink = \"gw\"\naccount = \"no spaces\"\nunit_id = 1\nmodbus_profile = \"p\"\n[modbus_profile.p]\n[[account]]\nid = \"A\"\n[[account]]\nid = \"A\"\n",
    )
    .expect("parses");
    let p = cfg.problems().join("\n");
    assert!(p.contains("account: invalid id"), "{p}");
    assert!(p.contains("account A is defined twice"), "{p}");
}
