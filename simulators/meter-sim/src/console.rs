//! The interactive console of the binary: a refreshed plain-text table of meters, and
//! one-line commands on stdin. No TUI library: ANSI "clear screen" and println.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::config::Faults;
use crate::{MeterView, Simulator};

/// Help text for the commands.
pub const HELP: &str = "commands: b <meter>  press the button | f <meter> offline|stuck|refuse|drop [n]|corrupt [n]|delay <ms>|drift <s>|badrows|clear | q quit
  <meter> is a meter id (SIM0000000001), the head-end name (MTR-0001) or the number in the table (1)";

/// A console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Press a meter's button.
    Button(String),
    /// Change a meter's faults.
    Fault(String, FaultChange),
    /// Show the help line.
    Help,
    /// Leave.
    Quit,
}

/// How a fault command changes a meter's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultChange {
    /// Toggle offline.
    Offline,
    /// Toggle the stuck relay.
    Stuck,
    /// Toggle refusing associations.
    Refuse,
    /// Toggle dropping every n-th answer.
    Drop(u32),
    /// Toggle corrupting every n-th answer.
    Corrupt(u32),
    /// Set the answer delay.
    Delay(u32),
    /// Set the clock drift.
    Drift(i64),
    /// Toggle bad load-profile rows.
    BadRows,
    /// Remove every fault.
    Clear,
}

/// Parse one line.
///
/// # Errors
/// A message for the person at the keyboard.
pub fn parse_command(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |w: Option<&&str>, default: u32| -> Result<u32, String> {
        w.map_or(Ok(default), |w| w.parse().map_err(|_| format!("not a number: {w}")))
    };
    match words.as_slice() {
        ["q" | "quit" | "exit"] => Ok(Command::Quit),
        ["h" | "help" | "?"] | [] => Ok(Command::Help),
        ["b", meter] => Ok(Command::Button((*meter).to_owned())),
        ["f", meter, what, rest @ ..] => {
            let change = match *what {
                "offline" => FaultChange::Offline,
                "stuck" => FaultChange::Stuck,
                "refuse" => FaultChange::Refuse,
                "drop" => FaultChange::Drop(number(rest.first(), 3)?.max(1)),
                "corrupt" => FaultChange::Corrupt(number(rest.first(), 3)?.max(1)),
                "delay" => FaultChange::Delay(number(rest.first(), 0)?),
                "drift" => FaultChange::Drift(
                    rest.first().ok_or("drift needs seconds")?.parse().map_err(|_| "not a number".to_owned())?,
                ),
                "badrows" => FaultChange::BadRows,
                "clear" => FaultChange::Clear,
                other => return Err(format!("unknown fault {other}")),
            };
            Ok(Command::Fault((*meter).to_owned(), change))
        }
        _ => Err(format!("unknown command: {line}")),
    }
}

/// Apply a change to a set of faults.
#[must_use]
pub fn change_faults(mut f: Faults, change: FaultChange) -> Faults {
    let toggle = |v: u32, n: u32| if v == 0 { n } else { 0 };
    match change {
        FaultChange::Offline => f.offline = !f.offline,
        FaultChange::Stuck => f.stuck_relay = !f.stuck_relay,
        FaultChange::Refuse => f.refuse_association = !f.refuse_association,
        FaultChange::Drop(n) => f.drop_every_nth = toggle(f.drop_every_nth, n),
        FaultChange::Corrupt(n) => f.corrupt_every_nth = toggle(f.corrupt_every_nth, n),
        FaultChange::Delay(ms) => f.response_delay_ms = ms,
        FaultChange::Drift(s) => f.clock_drift_s = s,
        FaultChange::BadRows => f.bad_profile_rows = !f.bad_profile_rows,
        FaultChange::Clear => f = Faults::default(),
    }
    f
}

/// The meter id a console reference means.
fn resolve(sim: &Simulator, reference: &str) -> Option<String> {
    let meters = &sim.config().meters;
    if meters.iter().any(|m| m.id == reference) {
        return Some(reference.to_owned());
    }
    let number = reference.strip_prefix("MTR-").unwrap_or(reference).parse::<usize>().ok()?;
    meters.get(number.checked_sub(1)?).map(|m| m.id.clone())
}

/// Carry out a command; the message to show.
pub fn apply(sim: &Simulator, command: &Command) -> String {
    let unknown = |m: &str| format!("no meter {m}");
    match command {
        Command::Help => HELP.to_owned(),
        Command::Quit => "bye".to_owned(),
        Command::Button(m) => match resolve(sim, m) {
            Some(id) => match sim.press_button(&id) {
                Ok(()) => sim.meter(&id).map_or_else(String::new, |v| format!("{id}: button -> {}", state(&v))),
                Err(e) => e.to_string(),
            },
            None => unknown(m),
        },
        Command::Fault(m, change) => match resolve(sim, m).and_then(|id| sim.meter(&id).map(|v| (id, v))) {
            Some((id, view)) => {
                let faults = change_faults(view.faults, *change);
                match sim.set_faults(&id, faults) {
                    Ok(()) => format!("{id}: faults {}", describe_faults(&faults)),
                    Err(e) => e.to_string(),
                }
            }
            None => unknown(m),
        },
    }
}

fn state(v: &MeterView) -> String {
    format!("{} ({:?})", if v.output_state { "closed" } else { "OPEN" }, v.control_state)
}

/// A short description of a meter's faults.
#[must_use]
pub fn describe_faults(f: &Faults) -> String {
    let mut parts = Vec::new();
    if f.offline {
        parts.push("offline".to_owned());
    }
    if f.stuck_relay {
        parts.push("stuck".to_owned());
    }
    if f.refuse_association {
        parts.push("refuse".to_owned());
    }
    if f.drop_every_nth > 0 {
        parts.push(format!("drop/{}", f.drop_every_nth));
    }
    if f.corrupt_every_nth > 0 {
        parts.push(format!("corrupt/{}", f.corrupt_every_nth));
    }
    if f.response_delay_ms > 0 {
        parts.push(format!("delay {}ms", f.response_delay_ms));
    }
    if f.clock_drift_s != 0 {
        parts.push(format!("drift {}s", f.clock_drift_s));
    }
    if f.bad_profile_rows {
        parts.push("badrows".to_owned());
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(",")
    }
}

/// The screen: endpoints, then the `rows` most recently active meters.
#[must_use]
pub fn render(sim: &Simulator, rows: usize, message: &str) -> String {
    let mut out = String::new();
    let total = sim.config().meters.len();
    let _ = writeln!(out, "meter-sim: {total} meters. {HELP}\n");
    for e in sim.endpoints() {
        let place = e.addr.map_or_else(|| e.serial_path.clone().unwrap_or_default(), |a| a.to_string());
        let _ = writeln!(out, "  {:<18} {:<24} {} meters", format!("{:?}", e.kind), place, e.meters.len());
    }
    let _ = writeln!(
        out,
        "\n  {:>6} {:<15} {:<6} {:<6} {:<22} {:>4} {:>12} {:<16} last request",
        "#", "id", "proto", "relay", "control state", "mode", "import kWh", "faults"
    );
    let now = sim.now_ms();
    for v in sim.most_recent(rows) {
        let ago = v.last_request_at_ms.map_or_else(String::new, |t| format!(" ({}s ago)", (now - t) / 1000));
        let last = v.last_request.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:>6} {:<15} {:<6} {:<6} {:<22} {:>4} {:>12.3} {:<16} {last}{ago}",
            v.index + 1,
            v.id,
            format!("{:?}", v.protocol).to_lowercase(),
            if v.output_state { "closed" } else { "OPEN" },
            format!("{:?}", v.control_state),
            v.control_mode,
            v.import_wh as f64 / 1000.0,
            describe_faults(&v.faults),
        );
    }
    if total > rows {
        let _ = writeln!(out, "  ... {} more (most recently active shown)", total - rows);
    }
    let _ = write!(out, "\n{message}\n> ");
    out
}

/// Run the console until `q` (or end of input and then Ctrl-C, handled by the caller).
pub async fn run(sim: &Simulator, refresh: Duration) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut ticker = tokio::time::interval(refresh);
    let mut message = String::from("ready");
    let mut input_open = true;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                // Clear the screen and home the cursor, then redraw.
                print!("\x1b[2J\x1b[H{}", render(sim, 20, &message));
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            line = lines.next_line(), if input_open => match line {
                Ok(Some(line)) => {
                    message = match parse_command(&line) {
                        Ok(Command::Quit) => return,
                        Ok(command) => apply(sim, &command),
                        Err(e) => e,
                    };
                    ticker.reset_immediately();
                }
                // No more input (stdin closed): keep showing the table.
                Ok(None) | Err(_) => input_open = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command("b MTR-0003"), Ok(Command::Button("MTR-0003".into())));
        assert_eq!(parse_command(" f 2 drop "), Ok(Command::Fault("2".into(), FaultChange::Drop(3))));
        assert_eq!(parse_command("f 2 delay 250"), Ok(Command::Fault("2".into(), FaultChange::Delay(250))));
        assert_eq!(parse_command("f 2 drift -30"), Ok(Command::Fault("2".into(), FaultChange::Drift(-30))));
        assert_eq!(parse_command("q"), Ok(Command::Quit));
        assert!(parse_command("f 2 melt").is_err());
        assert!(parse_command("f 2 delay soon").is_err());
        assert!(parse_command("x").is_err());
    }

    #[test]
    fn fault_changes_toggle() {
        let f = change_faults(Faults::default(), FaultChange::Offline);
        assert!(f.offline);
        assert!(!change_faults(f, FaultChange::Offline).offline);
        let f = change_faults(Faults::default(), FaultChange::Corrupt(4));
        assert_eq!(f.corrupt_every_nth, 4);
        assert_eq!(change_faults(f, FaultChange::Corrupt(4)).corrupt_every_nth, 0);
        assert_eq!(change_faults(f, FaultChange::Clear), Faults::default());
    }
}
