//! The demo's live view: a plain-text table, redrawn in place on a terminal and printed
//! as a block when something changed otherwise. Relays as the simulated meters report
//! them (with the head-end's view of the ones it switched), the latest commands with
//! their statuses, the latest readings.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

use meter_sim::{ControlState, MeterView};
use serde_json::Value;

/// Commands and readings kept for the view.
const RECENT: usize = 10;
/// Meters listed by name when their relay is not closed.
const LISTED: usize = 16;

/// One link of the fleet, as the view groups meters.
pub struct LinkRow {
    /// The link's name in the site file.
    pub name: String,
    /// What it is, in words.
    pub what: String,
    /// Indices of its meters in the simulated fleet.
    pub meters: Vec<usize>,
}

struct CommandRow {
    meter: String,
    id: String,
    action: String,
    status: String,
    detail: String,
}

/// What the view knows, fed by every message the daemon publishes.
#[derive(Default)]
pub struct View {
    header: Vec<String>,
    links: Vec<LinkRow>,
    commands: VecDeque<CommandRow>,
    readings: VecDeque<(String, String)>,
    /// The head-end's relay and cut reason per meter (`state/{meter}`).
    states: HashMap<String, (String, String)>,
    daemon: String,
    /// Bumped on every change, so a headless view prints only when there is news.
    pub generation: u64,
}

impl View {
    /// A view of these links, under these header lines.
    pub fn new(header: Vec<String>, links: Vec<LinkRow>) -> Self {
        Self { header, links, daemon: "starting".into(), ..Self::default() }
    }

    /// Take in one message the daemon published.
    pub fn on_message(&mut self, topic: &str, v: &Value) {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
        if topic.ends_with("/status") {
            self.daemon = if v["online"] == true { "online".into() } else { "offline".into() };
        } else if topic.contains("/result/") {
            let mut detail = String::new();
            if let Some(r) = v["relay"].as_str() {
                let _ = write!(detail, "relay={r} ");
            }
            if let Some(e) = v["error"]["code"].as_str() {
                let _ = write!(detail, "error={e} ");
            }
            if let Some(p) = v["trigger"]["payment"].as_str() {
                let _ = write!(detail, "payment={p} ");
            }
            if let Some(nb) = v["not_before"].as_str() {
                let _ = write!(detail, "not_before={nb} ");
            }
            let row = CommandRow {
                meter: s("meter"),
                id: s("id"),
                action: s("action"),
                status: s("status"),
                detail: detail.trim_end().to_owned(),
            };
            self.commands.retain(|c| c.id != row.id);
            self.commands.push_front(row);
            self.commands.truncate(RECENT);
        } else if topic.contains("/state/") {
            self.states.insert(s("meter"), (s("relay"), s("reason")));
        } else if topic.contains("/readings/") {
            let Some(row) = v["rows"].as_array().and_then(|r| r.last()) else { return };
            let at = row[0].as_str().unwrap_or("?");
            let values: Vec<String> = v["columns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .enumerate()
                        .map(|(i, c)| {
                            format!(
                                "{}={} {}",
                                c["name"].as_str().unwrap_or("?"),
                                row[i + 1],
                                c["unit"].as_str().unwrap_or("")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let rows = v["rows"].as_array().map_or(0, Vec::len);
            self.readings.push_front((s("meter"), format!("{at}  {}  ({rows} rows)", values.join("  "))));
            self.readings.truncate(RECENT);
        } else {
            return;
        }
        self.generation += 1;
    }

    /// The table, with the meters' relays as the simulator has them now.
    pub fn render(&self, meters: &[MeterView], now: &str) -> String {
        let mut out = String::new();
        for h in &self.header {
            let _ = writeln!(out, "{h}");
        }
        let _ = writeln!(out, "daemon: {}    at {now}\n", self.daemon);
        let _ = writeln!(out, "RELAYS, as the meters report them");
        let _ = writeln!(
            out,
            "  {:<16} {:<38} {:>6} {:>10} {:>13} {:>6}",
            "link", "what", "meters", "connected", "disconnected", "ready"
        );
        for link in &self.links {
            let mut n = [0usize; 3];
            for m in link.meters.iter().filter_map(|&i| meters.get(i)) {
                n[usize::from(m.control_state.as_u8()).min(2)] += 1;
            }
            let _ = writeln!(
                out,
                "  {:<16} {:<38} {:>6} {:>10} {:>13} {:>6}",
                link.name,
                link.what,
                link.meters.len(),
                n[1],
                n[0],
                n[2]
            );
        }
        let open: Vec<String> = meters
            .iter()
            .filter(|m| m.control_state != ControlState::Connected)
            .map(|m| {
                let id = meter_sim::headend_id(m.index);
                let state = match m.control_state {
                    ControlState::Disconnected => "disconnected",
                    ControlState::ReadyForReconnection => "ready_for_reconnection",
                    ControlState::Connected => "connected",
                };
                let known = match self.states.get(&id) {
                    Some((relay, reason)) if !reason.is_empty() => format!(" (head-end: {relay}, {reason})"),
                    Some((relay, _)) => format!(" (head-end: {relay})"),
                    None => String::new(),
                };
                format!("{id} {state} mode {}{known}", m.control_mode)
            })
            .collect();
        if open.is_empty() {
            let _ = writeln!(out, "  every relay is closed");
        } else {
            let _ = writeln!(out, "  not connected:");
            for line in open.iter().take(LISTED) {
                let _ = writeln!(out, "    {line}");
            }
            if open.len() > LISTED {
                let _ = writeln!(out, "    ... and {} more", open.len() - LISTED);
            }
        }
        let _ = writeln!(out, "\nCOMMANDS, latest first");
        if self.commands.is_empty() {
            let _ = writeln!(out, "  none yet");
        }
        for c in &self.commands {
            let _ = writeln!(out, "  {:<9} {:<34} {:<11} {:<11} {}", c.meter, c.id, c.action, c.status, c.detail);
        }
        let _ = writeln!(out, "\nREADINGS, latest batches");
        if self.readings.is_empty() {
            let _ = writeln!(out, "  none yet (collection runs at every quarter hour, and catches up at start)");
        }
        for (meter, line) in &self.readings {
            let _ = writeln!(out, "  {meter:<9} {line}");
        }
        out
    }
}
