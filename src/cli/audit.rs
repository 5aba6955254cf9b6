//! `headend audit --meter ID`: a meter's history from the command journal, read-only, so
//! it works beside a running daemon (the journal is in WAL mode).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use headend::journal::{read_history, AuditEntry};
use headend::time::format_rfc3339_ms;

use super::client::read_site;

/// Arguments of `headend audit`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The site configuration; its `state_dir` locates the journal.
    #[arg(long, short, default_value = "site.toml")]
    config: PathBuf,
    /// The meter whose history to show.
    #[arg(long)]
    meter: String,
    /// The newest N entries (shown oldest first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    limit: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Show the history. Exit 0 (also when there is none), 1 when the journal cannot be read,
/// 2 for a bad configuration or a journal that does not exist.
pub fn run(a: AuditArgs) -> ExitCode {
    // Only `state_dir` and the policy's UTC offset are needed: no key files required.
    let site = match read_site(&a.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let path = site.journal_path();
    if !path.is_file() {
        // Checked first: opening read-only would fail with SQLite's vaguer wording.
        eprintln!(
            "error: no journal at {}: the daemon has not run with this configuration's state_dir (check --config)",
            path.display()
        );
        return ExitCode::from(2);
    }
    let entries = match read_history(&path, &a.meter, a.limit) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    // Times in the site's local offset, as the policy gates see them.
    let offset = site.policy.utc_offset_minutes;
    if a.json {
        let list: Vec<Value> = entries.iter().map(|e| entry_json(e, offset)).collect();
        println!("{}", json!({"meter": a.meter, "journal": path.display().to_string(), "entries": list}));
    } else if entries.is_empty() {
        println!("{}: no entries in {}", a.meter, path.display());
    } else {
        println!("{}: {} entries from {} (oldest first)", a.meter, entries.len(), path.display());
        for e in &entries {
            println!("{}", entry_line(e, offset));
        }
    }
    ExitCode::SUCCESS
}

fn entry_json(e: &AuditEntry, offset: i16) -> Value {
    // The detail is the message or request as JSON; kept as text if it is not.
    let detail = serde_json::from_str::<Value>(&e.detail).unwrap_or_else(|_| Value::String(e.detail.clone()));
    json!({
        "seq": e.seq, "at": format_rfc3339_ms(e.at_ms, offset, true), "at_ms": e.at_ms, "kind": e.kind,
        "meter": e.meter, "command": e.command, "status": e.status, "operator": e.operator,
        "reason": e.reason, "trigger_payment": e.trigger_payment, "detail": detail,
    })
}

/// One line: when, what, which command, and the facts a person asks about first.
fn entry_line(e: &AuditEntry, offset: i16) -> String {
    let mut s = format!(
        "{}  {:<8} {:<10} {}",
        format_rfc3339_ms(e.at_ms, offset, true),
        e.kind,
        e.status.as_deref().unwrap_or("-"),
        e.command.as_deref().unwrap_or("-")
    );
    let detail: Value = serde_json::from_str(&e.detail).unwrap_or(Value::Null);
    let field = |name: &str| detail.get(name).and_then(Value::as_str).map(str::to_owned);
    let parts = [
        ("action", field("action")),
        ("reason", e.reason.clone()),
        ("operator", e.operator.clone()),
        ("payment", e.trigger_payment.clone()),
        ("relay", field("relay")),
        ("not_before", field("not_before")),
        ("error", detail.get("error").and_then(|x| x.get("code")).and_then(Value::as_str).map(str::to_owned)),
        ("override_by", detail.get("override").and_then(|x| x.get("by")).and_then(Value::as_str).map(str::to_owned)),
    ];
    for (name, value) in parts {
        if let Some(v) = value {
            let v: String = v.chars().take(200).map(|c| if c.is_control() { '?' } else { c }).collect();
            s.push_str(&format!(" {name}={v}"));
        }
    }
    s
}
