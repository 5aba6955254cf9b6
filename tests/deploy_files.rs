//! The shipped monitoring and service files check with the tools that will read them:
//! `promtool` (the scrape configuration, the alert rules and their unit tests in
//! `deploy/prometheus/headend.rules.test.yml`), `systemd-analyze verify` (the unit), `systemd-sysusers` (the user), and
//! the metric names in the rules and the Grafana dashboard are the daemon's. `.ci/run`
//! installs promtool and systemd-analyze; the broker's files are tested with mosquitto in
//! `tests/deploy_mosquitto.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The daemon's metrics (README.md, "Deployment"); a histogram's series add `_bucket`,
/// `_sum`, `_count`.
const METRICS: [&str; 13] = [
    "headend_commands_total",
    "headend_command_duration_seconds",
    "headend_channels",
    "headend_meter_exchanges_total",
    "headend_meter_errors_total",
    "headend_readings_collected_total",
    "headend_collection_failures_total",
    "headend_collection_lag_seconds",
    "headend_outbox_rows",
    "headend_journal_bytes",
    "headend_broker_connected",
    "headend_quarantine_active",
    "headend_payments_total",
];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Run a tool; panics with its output unless it succeeds. Returns stdout and stderr.
fn tool(program: &str, args: &[&str], dir: &Path) -> (String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} is not installed ({e}); .ci/run installs it"));
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{program} {args:?} failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

/// Every `headend_*` name in `text`, histogram suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("headend_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| METRICS.contains(b)))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

fn assert_known(file: &str, names: &BTreeSet<String>) {
    let unknown: Vec<&String> = names.iter().filter(|n| !METRICS.contains(&n.as_str())).collect();
    assert!(unknown.is_empty(), "{file} uses metrics the daemon does not export: {unknown:?}");
}

#[test]
fn prometheus_configuration_and_alert_rules_check_and_their_unit_tests_pass() {
    let dir = deploy("prometheus");
    tool("promtool", &["check", "config", "prometheus.yml"], &dir);
    let (out, _) = tool("promtool", &["check", "rules", "headend.rules.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    let (out, _) = tool("promtool", &["test", "rules", "headend.rules.test.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");

    let rules = read("prometheus/headend.rules.yml");
    assert_known("headend.rules.yml", &metric_names(&rules));
    // The alerts the issue asks for, each with a unit test.
    let tests = read("prometheus/headend.rules.test.yml");
    for alert in [
        "HeadendChannelsDown",
        "HeadendCommandsFailing",
        "HeadendOutboxGrowing",
        "HeadendBrokerDisconnected",
        "HeadendQuarantineActive",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "no alert {alert}");
        assert!(tests.contains(&format!("alertname: {alert}\n")), "no unit test of {alert}");
    }
}

#[test]
fn the_grafana_dashboard_shows_what_the_issue_asks_with_the_daemons_metrics() {
    let text = read("grafana/headend.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("deploy/grafana/headend.json is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_i64().expect("a panel id")), "panel ids are unique: {}", p["id"]);
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "every panel has a title");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expression");
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    let used = metric_names(&exprs);
    assert_known("headend.json", &used);
    for needed in [
        "headend_commands_total",
        "headend_command_duration_seconds",
        "headend_channels",
        "headend_collection_lag_seconds",
        "headend_outbox_rows",
        "headend_journal_bytes",
    ] {
        assert!(used.contains(needed), "the dashboard has no panel on {needed}");
    }
    assert!(exprs.contains("histogram_quantile(0.95"), "latency quantiles");
    assert!(exprs.contains("by (status)"), "commands by status");
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = read("systemd/headend.service");
    for line in [
        "User=headend",
        "SupplementaryGroups=dialout",
        "StateDirectory=headend",
        "ConfigurationDirectory=headend",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "headend.service has no `{line}`");
    }
    // systemd-analyze checks that the binary exists: point it at the one under test.
    let dir = std::env::temp_dir().join(format!("headend-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("headend.service");
    assert!(unit.contains("/usr/bin/headend run"));
    std::fs::write(&path, unit.replace("/usr/bin/headend", env!("CARGO_BIN_EXE_headend"))).expect("unit copy");
    let (out, err) = tool("systemd-analyze", &["verify", &path.to_string_lossy()], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    // Unknown or misspelt settings are warnings on stderr, not a failing status.
    assert!(out.trim().is_empty() && err.trim().is_empty(), "systemd-analyze verify:\n{out}\n{err}");
}

#[test]
fn the_sysusers_snippet_makes_the_service_user_without_a_login() {
    let root = std::env::temp_dir().join(format!("headend-sysusers-{}", std::process::id()));
    std::fs::create_dir_all(root.join("etc")).expect("temp root");
    let conf = deploy("systemd/headend.sysusers.conf");
    let root_arg = format!("--root={}", root.display());
    tool("systemd-sysusers", &[&root_arg, &conf.to_string_lossy()], &root);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd written");
    let group = std::fs::read_to_string(root.join("etc/group")).expect("group written");
    let _ = std::fs::remove_dir_all(&root);
    let user: Vec<&str> =
        passwd.lines().find(|l| l.starts_with("headend:")).expect("user headend").split(':').collect();
    assert_eq!(user.get(5..7), Some(&["/var/lib/headend", "/usr/sbin/nologin"][..]), "{passwd}");
    let uid: u32 = user[2].parse().expect("uid");
    assert!(uid > 0 && uid < 1000, "a system user: {passwd}");
    assert!(group.lines().any(|l| l.starts_with("headend:")), "its own group: {group}");
}
