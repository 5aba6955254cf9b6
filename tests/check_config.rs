//! `headend check-config`: every problem, each at `file:line:column`, with what to write
//! instead; `headend run` refuses the same file with the same messages; every shipped
//! example in `config/` passes.
//!
//! Expected places are computed from the text (the line and column of a marker), so a
//! diagnostic that points anywhere else fails.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::TempDir;

fn headend(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headend")).current_dir(dir).args(args).output().expect("headend runs")
}

/// A small valid site: a wrapper link, an HDLC gateway, a Modbus gateway.
const GOOD: &str = r#"
state_dir = "state"

[policy.window]
days = ["mon", "tue", "wed", "thu"]
start = "09:00"
end = "16:00"
holidays = ["2026-10-01"]

[[link]]
name = "wrapper"
protocol = "dlms-wrapper"
address = "127.0.0.1:4059"

[[link]]
name = "gw"
protocol = "dlms-hdlc"
address = "127.0.0.1:4060"

[[link]]
name = "mb"
protocol = "modbus-tcp"
address = "127.0.0.1:5020"

[[meter]]
id = "MTR-1"
link = "wrapper"
identity = "SIM0000000001"
auth = "hls-gmac"
client_sap = 1
keys = "keys/MTR-1.toml"

[[meter]]
id = "MTR-2"
link = "gw"
identity = "SIM0000000002"
physical_address = 17

[[meter]]
id = "MTR-3"
link = "mb"
identity = "SIMMB0000003"
unit_id = 3
modbus_profile = "p"

[modbus_profile.p]
relay_coil = 0
"#;

const KEYS: &str = "guek = \"000102030405060708090A0B0C0D0E0F\"\ngak = \"D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\"\nclient_system_title = \"4844454E44000001\"\n";

/// A site directory with `site.toml` = `text` and the key file of MTR-1.
fn site(text: &str) -> TempDir {
    let dir = TempDir::new("check");
    std::fs::create_dir_all(dir.path("keys")).expect("keys dir");
    std::fs::write(dir.path("keys/MTR-1.toml"), KEYS).expect("key file");
    std::fs::write(dir.path("site.toml"), text).expect("site file");
    dir
}

/// `site.toml:LINE:COL:` of the `nth` occurrence of `needle` (0-based).
fn place(text: &str, needle: &str, nth: usize) -> String {
    let offset = text.match_indices(needle).nth(nth).map(|(i, _)| i).unwrap_or_else(|| panic!("{needle} in text"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("site.toml:{line}:{col}:")
}

/// Run check-config on `text`; it must fail with exit status 2. Returns stderr.
fn refused(text: &str) -> String {
    let dir = site(text);
    let out = headend(&dir.0, &["check-config", "site.toml"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

/// The line of `err` that starts at `at` must contain every one of `hints`.
fn assert_line(err: &str, at: &str, hints: &[&str]) {
    let line = err.lines().find(|l| l.starts_with(at)).unwrap_or_else(|| panic!("no diagnostic at {at}:\n{err}"));
    for h in hints {
        assert!(line.contains(h), "{at} lacks {h:?}: {line}\n{err}");
    }
}

#[test]
fn a_valid_site_passes() {
    let dir = site(GOOD);
    let out = headend(&dir.0, &["check-config", "site.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (3 links, 3 meters)"));
}

#[test]
fn a_syntax_error_names_its_line() {
    let text = GOOD.replace("name = \"gw\"", "name = \"gw");
    let err = refused(&text);
    let line = text.lines().position(|l| l == "name = \"gw").expect("marker") + 1;
    assert!(err.starts_with(&format!("site.toml:{line}:")), "{err}");
    assert!(err.contains("TOML syntax"), "{err}");
}

#[test]
fn every_error_of_a_file_is_reported_at_its_place() {
    let text = "colour = \"blue\"\n".to_owned()
        + &GOOD
        .replace("address = \"127.0.0.1:4060\"", "adress = \"127.0.0.1:4060\"")
        .replace("link = \"gw\"", "link = \"gw-9\"")
        .replace("unit_id = 3", "unit_id = \"3\"")
        .replace("id = \"MTR-2\"", "id = \"MTR-1\"")
        .replace("start = \"09:00\"", "start = \"9am\"")
        .replace("holidays = [\"2026-10-01\"]", "holidays = [\"2026-10-01\", \"2026-02-30\"]")
        .replace("keys = \"keys/MTR-1.toml\"", "keys = \"keys/MTR-1.toml\"\nprofile = \"1.0.99.1\"")
        + "\n[[meter]]\nid = \"MTR-4\"\nlink = \"wrapper\"\nlogical_device = 4\nauth = \"lls\"\nkeys = \"keys/MTR-4.toml\"\n";
    let err = refused(&text);
    // Unknown key, with the closest known one.
    assert_line(
        &err,
        &place(&text, "adress", 0),
        &["link \"gw\"", "unknown field `adress`", "did you mean `address`?"],
    );
    // A meter on a link that is not defined: the value, and the links there are.
    assert_line(
        &err,
        &place(&text, "\"gw-9\"", 0),
        &["meter \"MTR-1\"", "link \"gw-9\" is not defined", "defined links: wrapper, mb"],
    );
    // Wrong type.
    assert_line(&err, &place(&text, "\"3\"", 0), &["`unit_id`", "expected u8", "without quotes"]);
    // Duplicate id, with the first definition's line.
    let first = place(&text, "\"MTR-1\"", 0);
    let first_line = first.split(':').nth(1).expect("line");
    assert_line(
        &err,
        &place(&text, "\"MTR-1\"", 1),
        &["meter \"MTR-1\" is defined twice", &format!("first defined at line {first_line}")],
    );
    // Service window and holidays.
    assert_line(&err, &place(&text, "\"9am\"", 0), &["[policy.window]", "`start`", "write \"HH:MM\""]);
    assert_line(&err, &place(&text, "\"2026-02-30\"", 0), &["invalid date", "YYYY-MM-DD"]);
    // Bad OBIS code.
    assert_line(
        &err,
        &place(&text, "\"1.0.99.1\"", 0),
        &["profile \"1.0.99.1\" is not an OBIS code like 1.0.99.1.0.255"],
    );
    // A key file that is not there.
    assert_line(
        &err,
        &place(&text, "\"keys/MTR-4.toml\"", 0),
        &["meter \"MTR-4\"", "cannot read", "write the key file there"],
    );
    // An unknown top-level key.
    assert_line(&err, &place(&text, "colour", 0), &["unknown field `colour`"]);
    assert!(err.contains("site.toml: 9 problems"), "{err}");
}

#[test]
fn link_settings_say_what_to_write() {
    let text = GOOD.replace(
        "name = \"mb\"\nprotocol = \"modbus-tcp\"\naddress = \"127.0.0.1:5020\"",
        "name = \"mb\"\nprotocol = \"modbus-rtu\"\nserial = \"/dev/ttyUSB0\"\nbaud = 9601",
    ) + "\n[[link]]\nname = \"far\"\nprotocol = \"dlms-wrapper\"\naddress = \"10.0.0.5\"\n";
    let err = refused(&text);
    assert_line(
        &err,
        &place(&text, "9601", 0),
        &["link \"mb\": baud = 9601: expected one of 300, 600, 1200", "115200"],
    );
    assert_line(&err, &place(&text, "\"10.0.0.5\"", 0), &["not host:port", "address = \"10.0.0.5:4059\""]);
}

#[test]
fn meters_on_a_concentrator_need_an_address_and_modbus_meters_a_profile() {
    let text = GOOD.replace("unit_id = 3\nmodbus_profile = \"p\"", "unit_id = 3\nmodbus_profile = \"q\"")
        + "\n[[meter]]\nid = \"MTR-5\"\nlink = \"gw\"\nphysical_address = 17\n"
        + "\n[[meter]]\nid = \"MTR-6\"\nlink = \"gw\"\n";
    let err = refused(&text);
    assert_line(&err, &place(&text, "\"q\"", 0), &["modbus_profile \"q\" is not defined; defined profiles: p"]);
    // A missing key is reported at the meter's header.
    assert_line(&err, &place(&text, "[[meter]]", 4), &["meter \"MTR-6\"", "set physical_address"]);
}

#[test]
fn key_files_are_checked_against_the_authentication_and_never_shown() {
    let dir = site(&GOOD.replace("auth = \"hls-gmac\"", "auth = \"lls\""));
    std::fs::write(dir.path("keys/MTR-1.toml"), "password = 31415926\n").expect("key file");
    let out = headend(&dir.0, &["check-config", "site.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("keys/MTR-1.toml") && err.contains("line 1: expected a string"), "{err}");
    assert!(!err.contains("31415926"), "a secret was printed: {err}");
    // Well-formed, but the keys of another mechanism.
    std::fs::write(dir.path("keys/MTR-1.toml"), KEYS).expect("key file");
    let out = headend(&dir.0, &["check-config", "site.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(dir.path("site.toml")).expect("site");
    assert_line(&err, &place(&text, "\"keys/MTR-1.toml\"", 0), &["auth lls needs password"]);
    assert!(!err.contains("000102030405") && !err.contains("D0D1D2"), "a secret was printed: {err}");
}

#[test]
fn the_daemon_refuses_an_invalid_site_with_the_same_messages() {
    let text = GOOD.replace("link = \"gw\"", "link = \"gw-9\"").replace("start = \"09:00\"", "start = \"25:00\"");
    let dir = site(&text);
    let check = headend(&dir.0, &["check-config", "site.toml"]);
    let run = headend(&dir.0, &["run", "--config", "site.toml"]);
    assert!(!run.status.success());
    assert_eq!(run.status.code(), check.status.code());
    let (check_err, run_err) = (String::from_utf8_lossy(&check.stderr), String::from_utf8_lossy(&run.stderr));
    assert!(check_err.contains("link \"gw-9\" is not defined"), "{check_err}");
    assert_eq!(run_err, check_err);
}

#[test]
fn every_shipped_example_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("config/") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
        // Key files are not site files; keys.example.toml is one.
        if path.extension().is_none_or(|e| e != "toml") || name.starts_with("keys") {
            continue;
        }
        let out = headend(&dir, &["check-config", &name]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        checked.push(name);
    }
    checked.sort();
    for expected in ["site.toml", "concentrator.toml", "modbus-gateway.toml", "hls-keys.toml", "policies.toml"] {
        assert!(checked.iter().any(|c| c == expected), "config/{expected} missing: {checked:?}");
    }
}
