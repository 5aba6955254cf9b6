//! The demo, headless: `headend demo --headless` starts the simulated fleet, the embedded
//! broker and the daemon, prints what to try from a second terminal and a live view. The
//! test does what the printed hints say, with the client verbs: a cut for arrears, then
//! the account's payment; each must succeed (exit status 0), and the live view and a
//! read on demand must show the relay open, then closed again.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::TempDir;

/// Longest wait for the demo's next line: a guard against a hung child, not a timing.
const HANG: Duration = Duration::from_secs(300);

struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(dir: &TempDir) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_headend"))
            .args(["demo", "--headless", "--meters", "30", "--dir"])
            .arg(&dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("demo starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    fn next_line(&mut self) -> String {
        let line =
            self.lines.recv_timeout(HANG).unwrap_or_else(|_| panic!("the demo stopped:\n{}", self.seen.join("\n")));
        self.seen.push(line.clone());
        line
    }

    /// Lines until one satisfies `done`; returns that one.
    fn until(&mut self, done: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.next_line();
            if done(&line) {
                return line;
            }
        }
    }

    /// Live-view blocks until one satisfies `done`; returns it.
    fn view_until(&mut self, done: impl Fn(&str) -> bool) -> String {
        loop {
            self.until(|l| l == "----- live view -----");
            let mut block = String::new();
            loop {
                let line = self.next_line();
                if line == "----- end of view -----" {
                    break;
                }
                block.push_str(&line);
                block.push('\n');
            }
            if done(&block) {
                return block;
            }
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments of the hint line that runs `verb` on `what` (after the program name).
fn hint(hints: &[String], verb: &str, what: &str) -> Vec<String> {
    let line = hints
        .iter()
        .find(|l| !l.trim_start().starts_with('#') && l.contains(&format!(" {verb} ")) && l.contains(what))
        .unwrap_or_else(|| panic!("no hint for {verb} {what}:\n{}", hints.join("\n")));
    // As a shell would: a `#` starts a comment.
    line.split_whitespace().skip(1).take_while(|a| !a.starts_with('#')).map(str::to_owned).collect()
}

fn headend(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_headend")).args(args).output().expect("headend runs")
}

#[test]
fn a_cut_and_a_payment_through_the_running_demo_as_its_hints_say() {
    let dir = TempDir::new("demo-headless");
    let mut demo = Demo::start(&dir);
    demo.until(|l| l.starts_with("Try from a second terminal"));
    let mut hints = Vec::new();
    loop {
        let line = demo.next_line();
        let last = line.contains("works in place of --config");
        hints.push(line);
        if last {
            break;
        }
    }
    // The first view: every relay closed.
    demo.view_until(|v| v.contains("every relay is closed"));

    let cut = hint(&hints, "cut", "--reason arrears");
    assert!(cut.iter().any(|a| a == "--config"), "{cut:?}");
    let meter = cut.iter().find(|a| a.starts_with("MTR-")).expect("a meter in the cut hint").clone();
    let out = headend(&cut);
    assert_eq!(
        out.status.code(),
        Some(0),
        "cut: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let view = demo.view_until(|v| v.contains(&format!("{meter} disconnected")));
    assert!(view.contains("succeeded") && view.contains("relay=disconnected"), "{view}");

    let pay = hint(&hints, "pay", "--account");
    let out = headend(&pay);
    assert_eq!(
        out.status.code(),
        Some(0),
        "pay: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let view = demo.view_until(|v| !v.contains(&format!("{meter} disconnected")) && v.contains("payment="));
    assert!(view.contains("every relay is closed"), "{view}");

    // The head-end reads the meter on demand: connected again.
    let mut read = hint(&hints, "read", "--json");
    if let Some(m) = read.iter_mut().find(|a| a.starts_with("MTR-")) {
        m.clone_from(&meter);
    }
    let out = headend(&read);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "read: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("\"relay\":\"connected\""), "{text}");

    // SIGTERM stops the demo cleanly.
    let pid = i32::try_from(demo.child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = demo.child.wait().expect("demo exits");
    assert!(status.success(), "{status:?}");
}
