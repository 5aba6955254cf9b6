//! The payment scenarios of issue 7.
//!
//! Setup (both): every meter of the accounts that will pay is cut for arrears over MQTT
//! (notice given long ago, the window open, rate limits raised), and the benchmark waits
//! for each cut's `succeeded`. That also opens every link and association, as on a
//! daemon that has been running for a while.
//!
//! - `payment-latency`: cleared payments at a steady rate, one per account; for each
//!   reconnect the time from the payment's publication to its `succeeded` arriving.
//! - `payment-burst`: all payments published at once; the time until every meter is
//!   reconnected (`succeeded` received), and the rate.
//!
//! Every figure is taken from messages the daemon publishes, stamped when they arrive at
//! the listening client; at the end the simulator confirms that every relay is closed.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::report::{latency_histogram, record, round, Latency, Machine, Table, Target};
use crate::rig::{CpuSnapshot, Msg, Rig};

/// Issue 4's targets.
pub const TARGET_METERS: usize = 10_000;
/// p99 payment-to-succeeded latency, ms, at [`TARGET_RATE`] payments/s.
pub const TARGET_P99_MS: f64 = 50.0;
/// The steady rate the latency target is stated for.
pub const TARGET_RATE: f64 = 100.0;
/// Reconnects per second in a burst.
pub const TARGET_BURST_RATE: f64 = 2000.0;
/// Daemon CPU per payment-triggered reconnect, ms.
pub const TARGET_CPU_MS: f64 = 0.3;

/// How the payments are sent.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// At this many payments per second (an interval timer).
    Steady(f64),
    /// All at once.
    Burst,
}

/// The arrears cuts of the setup.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Meters cut.
    pub cuts: usize,
    /// Wall time from the first cut published to the last `succeeded`.
    pub secs: f64,
    /// Cuts per second.
    pub rate_per_s: f64,
    /// Daemon CPU per cut, ms.
    pub daemon_cpu_ms_per_cut: f64,
}

/// What a payment run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PaymentFigures {
    /// Payments published.
    pub payments: usize,
    /// Reconnects that ended `succeeded`.
    pub reconnects: usize,
    /// Reconnects that did not (and payments that made none): should be 0.
    pub failures: usize,
    /// Payments per second as sent (first to last publication).
    pub offered_per_s: f64,
    /// From the first payment published to the last (a burst: how long the benchmark's
    /// client took to queue them all).
    pub published_s: f64,
    /// From the first payment published to the last `succeeded` received.
    pub wall_s: f64,
    /// Reconnects per second over `wall_s`.
    pub reconnects_per_s: f64,
    /// From the first payment published to the last reconnect `accepted` received.
    pub all_accepted_s: f64,
    /// Payment published → reconnect `succeeded` received.
    pub latency: Latency,
    /// Payment published → reconnect `accepted` received (journaled, not yet executed).
    pub accepted_latency: Latency,
    /// Daemon CPU over the run, seconds (/proc/<pid>/stat of the daemon process).
    pub daemon_cpu_s: f64,
    /// Daemon CPU per reconnect, ms.
    pub daemon_cpu_ms_per_reconnect: f64,
    /// Daemon CPU per reconnect by thread, ms: `main` runs the engine task (MQTT input,
    /// engine, publishing), `journal` the SQLite writer, `tokio-rt-worker` the channel
    /// actors (DLMS) and the MQTT event loop.
    pub daemon_cpu_ms_by_thread: BTreeMap<String, f64>,
    /// The benchmark process's CPU over the run (simulator, MQTT clients, and the
    /// embedded broker when used), seconds.
    pub bench_cpu_s: f64,
    /// A mosquitto started by the benchmark: its CPU over the run, seconds.
    pub broker_cpu_s: Option<f64>,
    /// Relays the simulator reports closed at the end, of those that should be.
    pub relays_closed: usize,
}

/// The whole report of one scenario: printed as a table, and as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `payment-latency` or `payment-burst`.
    pub scenario: String,
    /// The machine.
    pub machine: Machine,
    /// Simulated meters.
    pub meters: usize,
    /// Links (wrapper endpoints = daemon channel actors).
    pub links: usize,
    /// Meters per account.
    pub meters_per_account: usize,
    /// Which broker.
    pub broker: String,
    /// Whether the daemon's interval collection ran beside the payments.
    pub collection: bool,
    /// The daemon's start-up time (configuration, key files, journal, broker), s.
    pub daemon_startup_s: f64,
    /// The setup's cuts.
    pub setup: Setup,
    /// The payments.
    pub figures: PaymentFigures,
    /// The daemon process's peak resident memory, MiB.
    pub daemon_peak_rss_mib: Option<f64>,
    /// Issue 4's targets.
    pub targets: Vec<Target>,
}

impl Report {
    /// The table a person reads.
    pub fn table(&self) -> String {
        let f = &self.figures;
        let s = &self.setup;
        let mut t = Table::default();
        t.row("machine", self.machine.line());
        t.row(
            "fleet",
            format!(
                "{} DLMS meters (wrapper; auth none/LLS/HLS-GMAC in turn), {} links of {} meters, {} meter(s) per account",
                self.meters,
                self.links,
                self.meters.div_ceil(self.links.max(1)),
                self.meters_per_account
            ),
        );
        t.row("broker", &self.broker);
        let collection = if self.collection {
            "ON: {p}/admin/collect asked for every meter as the payments start (default [collection])"
        } else {
            "off ([collection] enabled = false)"
        };
        t.row("interval collection", collection);
        t.row("daemon", format!("own process, online {:.1} s after start", self.daemon_startup_s));
        t.row(
            "setup: arrears cuts",
            format!(
                "{} in {:.1} s ({:.0}/s), daemon CPU {:.3} ms per cut",
                s.cuts, s.secs, s.rate_per_s, s.daemon_cpu_ms_per_cut
            ),
        );
        let offered = match self.scenario.as_str() {
            "payment-burst" => format!("all published within {:.3} s", f.published_s),
            _ => format!("{:.1}/s offered", f.offered_per_s),
        };
        t.row("payments", format!("{} ({offered})", f.payments));
        t.row(
            "reconnects succeeded",
            format!("{} ({} failures; simulator: {} relays closed)", f.reconnects, f.failures, f.relays_closed),
        );
        t.row("all reconnected after", format!("{:.2} s ({:.0} reconnects/s)", f.wall_s, f.reconnects_per_s));
        t.row("all accepted after", format!("{:.2} s", f.all_accepted_s));
        t.row("latency p50/p90/p99/max", f.latency.line());
        t.row("  (to accepted)", f.accepted_latency.line());
        t.row("daemon CPU", format!("{:.2} s, {:.3} ms per reconnect", f.daemon_cpu_s, f.daemon_cpu_ms_per_reconnect));
        let threads: Vec<String> = f.daemon_cpu_ms_by_thread.iter().map(|(n, ms)| format!("{n} {ms:.3}")).collect();
        t.row("  by thread (ms/reconnect)", threads.join(", "));
        let broker = f.broker_cpu_s.map(|b| format!(", mosquitto {b:.2} s")).unwrap_or_default();
        t.row(
            "other CPU",
            format!("benchmark process (simulator, clients, embedded broker) {:.2} s{broker}", f.bench_cpu_s),
        );
        if let Some(rss) = self.daemon_peak_rss_mib {
            t.row("daemon peak RSS", format!("{rss} MiB"));
        }
        crate::report::target_rows(&mut t, &self.targets);
        format!("headend benchmark: {}\n{}", self.scenario, t.render())
    }
}

/// Cut every meter of `accounts` for arrears and wait until each cut succeeded.
/// At most `window` cuts are outstanding at a time.
pub async fn cut_for_arrears(rig: &mut Rig, accounts: &[usize], window: usize) -> anyhow::Result<Setup> {
    let targets: Vec<usize> = {
        let wanted: std::collections::HashSet<usize> = accounts.iter().copied().collect();
        (0..rig.meters.len()).filter(|i| rig.meters.get(*i).is_some_and(|m| wanted.contains(&m.account))).collect()
    };
    rig.note(&format!("setup: cutting {} meters for arrears", targets.len()));
    let total = targets.len();
    let mut finished = vec![false; rig.meters.len()];
    let (mut sent, mut done) = (0usize, 0usize);
    let mut failures = Vec::new();
    let cpu0 = rig.cpu();
    let t0 = Instant::now();
    let mut last_note = Instant::now();
    while done < total {
        while sent < total && sent - done < window.max(1) {
            let i = targets[sent];
            let payload = format!(
                r#"{{"id":"cut-{i}","action":"disconnect","reason":"arrears","operator":"bench","notice_sent_at":"2020-01-01T00:00:00Z","arrears_as_of":"2020-01-02T00:00:00Z"}}"#
            );
            let topic = format!("cmd/{}", rig.meters[i].id);
            rig.publisher.publish(&topic, payload).await?;
            sent += 1;
        }
        let seen = match rig.events.next().await {
            Ok(s) => s,
            Err(e) => return Err(rig.explain(e.context(format!("setup: {done} of {total} cuts done")))),
        };
        let Msg::Result(r) = seen.msg else { continue };
        if r.duplicate || !r.is_final() {
            continue;
        }
        let Some(i) = r.id.as_deref().and_then(|id| id.strip_prefix("cut-")).and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if finished.get(i).copied().unwrap_or(true) {
            continue;
        }
        finished[i] = true;
        done += 1;
        if r.status != "succeeded" {
            failures.push(format!("{} {} {}", r.meter, r.status, r.code()));
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            rig.note(&format!("setup: {done} of {total} cut"));
            last_note = Instant::now();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let (daemon_cpu, _, _) = cpu0.used_until(&rig.cpu());
    if !failures.is_empty() {
        bail!(
            "{} of {total} arrears cuts did not succeed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
    rig.note(&format!("setup: {total} cut in {secs:.1} s"));
    Ok(Setup {
        cuts: total,
        secs: round(secs, 2),
        rate_per_s: round(total as f64 / secs.max(1e-9), 1),
        daemon_cpu_ms_per_cut: round(daemon_cpu * 1000.0 / total.max(1) as f64, 4),
    })
}

/// Publish one cleared payment for each of `accounts` (payment `k` is `pay-{k}`) at
/// `pace`, and follow every reconnect to its final status.
pub async fn pay(rig: &mut Rig, accounts: &[usize], pace: Pace) -> anyhow::Result<PaymentFigures> {
    let per_account = |a: usize| rig.meters.iter().filter(|m| m.account == a).count();
    let expected_of: Vec<usize> = accounts.iter().map(|a| per_account(*a)).collect();
    let expected: usize = expected_of.iter().sum();
    let n = accounts.len();
    let mut sent_at: Vec<Option<Instant>> = vec![None; n];
    let mut reconnects_left = expected_of.clone();
    let mut accepted: HashMap<String, ()> = HashMap::with_capacity(expected);
    let mut finished: HashMap<String, ()> = HashMap::with_capacity(expected);
    let (mut latency, mut accepted_latency) = (latency_histogram(), latency_histogram());
    let (mut done, mut succeeded, mut failures) = (0usize, 0usize, Vec::<String>::new());
    let mut last_accepted: Option<Instant> = None;
    let mut last_succeeded: Option<Instant> = None;
    let mut sent = 0usize;
    rig.note(&format!("paying {n} accounts ({expected} meters), {pace:?}"));

    let payment = |k: usize| {
        let account = Rig::account_id(accounts[k]);
        format!(r#"{{"id":"pay-{k}","account":"{account}","amount":"42.00","currency":"CNY","cleared":true}}"#)
    };
    let cpu0: CpuSnapshot = rig.cpu();
    let t0 = Instant::now();
    if let Pace::Burst = pace {
        for (k, at) in sent_at.iter_mut().enumerate() {
            *at = Some(Instant::now());
            rig.publisher.publish("payments", payment(k)).await?;
        }
        sent = n;
    }
    let mut ticker = match pace {
        Pace::Steady(rate) => Some(tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)))),
        Pace::Burst => None,
    };
    let mut last_note = Instant::now();
    while done < expected {
        let tick = async {
            match ticker.as_mut() {
                Some(t) if sent < n => t.tick().await,
                _ => std::future::pending().await,
            }
        };
        let seen = tokio::select! {
            _ = tick => {
                sent_at[sent] = Some(Instant::now());
                rig.publisher.publish("payments", payment(sent)).await?;
                sent += 1;
                continue;
            }
            seen = rig.events.next() => seen,
        };
        let seen = match seen {
            Ok(s) => s,
            Err(e) => return Err(rig.explain(e.context(format!("{done} of {expected} reconnects done")))),
        };
        match seen.msg {
            Msg::Result(r) if !r.duplicate => {
                let Some(k) = r.trigger.as_ref().and_then(|t| t.payment.strip_prefix("pay-")?.parse::<usize>().ok())
                else {
                    continue;
                };
                let (Some(Some(sent)), Some(id)) = (sent_at.get(k), r.id.clone()) else { continue };
                if r.status == "accepted" && accepted.insert(id.clone(), ()).is_none() {
                    record(&mut accepted_latency, seen.at.saturating_duration_since(*sent));
                    last_accepted = Some(seen.at);
                }
                if !r.is_final() || finished.insert(id, ()).is_some() {
                    continue;
                }
                done += 1;
                reconnects_left[k] = reconnects_left[k].saturating_sub(1);
                if r.status == "succeeded" {
                    succeeded += 1;
                    record(&mut latency, seen.at.saturating_duration_since(*sent));
                    last_succeeded = Some(seen.at);
                } else {
                    failures.push(format!("{} {} {}", r.meter, r.status, r.code()));
                }
            }
            Msg::Payment(p) if !p.duplicate => {
                // A payment that reconnects fewer meters than its account has cut would
                // otherwise be waited for forever.
                let Some(k) = p.id.as_deref().and_then(|id| id.strip_prefix("pay-")?.parse::<usize>().ok()) else {
                    continue;
                };
                let (Some(want), Some(left)) = (expected_of.get(k), reconnects_left.get_mut(k)) else { continue };
                let missing = want.saturating_sub(p.reconnects.len()).min(*left);
                if missing > 0 || p.error.is_some() {
                    failures.push(format!("pay-{k}: {} reconnects of {want}, error {:?}", p.reconnects.len(), p.error));
                    *left -= missing;
                    done += missing;
                }
            }
            _ => {}
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            rig.note(&format!("{sent} paid, {done} of {expected} reconnects done"));
            last_note = Instant::now();
        }
    }
    let cpu1 = rig.cpu();
    let (daemon_cpu, bench_cpu, broker_cpu) = cpu0.used_until(&cpu1);
    let per = |s: f64| round(s * 1000.0 / succeeded.max(1) as f64, 4);
    let daemon_cpu_ms_by_thread =
        cpu0.threads_until(&cpu1).into_iter().filter(|(_, s)| *s > 0.0).map(|(n, s)| (n, per(s))).collect();
    let relays_closed = accounts
        .iter()
        .flat_map(|a| rig.meters.iter().filter(move |m| m.account == *a))
        .filter(|m| rig.sim.meter(&m.identity).is_some_and(|v| v.output_state))
        .count();
    let first_sent = sent_at.iter().flatten().min().copied().unwrap_or(t0);
    let last_sent = sent_at.iter().flatten().max().copied().unwrap_or(t0);
    let wall = last_succeeded.map_or(0.0, |t| t.saturating_duration_since(first_sent).as_secs_f64());
    let offered =
        if n > 1 { (n - 1) as f64 / last_sent.duration_since(first_sent).as_secs_f64().max(1e-9) } else { 0.0 };
    if !failures.is_empty() {
        eprintln!("bench: {} reconnects failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    }
    Ok(PaymentFigures {
        payments: n,
        reconnects: succeeded,
        failures: failures.len(),
        offered_per_s: round(offered, 1),
        published_s: round(last_sent.duration_since(first_sent).as_secs_f64(), 3),
        wall_s: round(wall, 3),
        reconnects_per_s: round(succeeded as f64 / wall.max(1e-9), 1),
        all_accepted_s: round(last_accepted.map_or(0.0, |t| t.saturating_duration_since(first_sent).as_secs_f64()), 3),
        latency: Latency::of(&latency),
        accepted_latency: Latency::of(&accepted_latency),
        daemon_cpu_s: round(daemon_cpu, 2),
        daemon_cpu_ms_per_reconnect: per(daemon_cpu),
        daemon_cpu_ms_by_thread,
        bench_cpu_s: round(bench_cpu, 2),
        broker_cpu_s: broker_cpu.map(|b| round(b, 2)),
        relays_closed,
    })
}

/// Options of the payment scenarios.
#[derive(Debug, Clone, Copy)]
pub struct PaymentOptions {
    /// Steady rate, or all at once.
    pub pace: Pace,
    /// How many accounts pay (None: every account).
    pub payments: Option<usize>,
    /// Cuts outstanding at once during the setup.
    pub setup_window: usize,
}

/// Run a payment scenario on a started rig: the setup, then the payments.
pub async fn run(
    rig: &mut Rig,
    o: PaymentOptions,
    meters_per_account: usize,
    machine: Machine,
) -> anyhow::Result<Report> {
    let n = o.payments.unwrap_or(rig.accounts).min(rig.accounts);
    if n == 0 {
        bail!("no payments to make");
    }
    let accounts: Vec<usize> = (0..n).collect();
    let setup = cut_for_arrears(rig, &accounts, o.setup_window).await?;
    if rig.collection {
        // Collection runs beside the payments: every meter now (`{p}/admin/collect`), on a
        // fresh journal a back-fill over the whole horizon.
        rig.note("asking the daemon to collect every meter now");
        rig.publisher.publish("admin/collect", "{}".into()).await?;
    }
    let figures = pay(rig, &accounts, o.pace).await?;
    let full_size = rig.meters.len() >= TARGET_METERS;
    let cpu_target = Target {
        figure: "daemon CPU per reconnect (ms)".into(),
        target: format!("< {TARGET_CPU_MS}"),
        value: figures.daemon_cpu_ms_per_reconnect,
        met: figures.daemon_cpu_ms_per_reconnect < TARGET_CPU_MS,
        at_target_size: full_size,
    };
    let (scenario, targets) = match o.pace {
        Pace::Steady(rate) => (
            "payment-latency",
            vec![
                Target {
                    figure: "p99 latency (ms)".into(),
                    target: format!("< {TARGET_P99_MS}"),
                    value: figures.latency.p99_ms,
                    met: figures.latency.p99_ms < TARGET_P99_MS,
                    at_target_size: full_size && rate >= TARGET_RATE,
                },
                cpu_target,
            ],
        ),
        Pace::Burst => (
            "payment-burst",
            vec![
                Target {
                    figure: "burst reconnects per second".into(),
                    target: format!(">= {TARGET_BURST_RATE}"),
                    value: figures.reconnects_per_s,
                    met: figures.reconnects_per_s >= TARGET_BURST_RATE,
                    at_target_size: full_size && n >= TARGET_METERS / meters_per_account.max(1),
                },
                cpu_target,
            ],
        ),
    };
    Ok(Report {
        scenario: scenario.into(),
        machine,
        meters: rig.meters.len(),
        links: rig.links,
        meters_per_account,
        broker: rig.broker_desc.clone(),
        collection: rig.collection,
        daemon_startup_s: round(rig.daemon_startup.as_secs_f64(), 2),
        setup,
        figures,
        daemon_peak_rss_mib: rig.daemon_peak_rss_mib(),
        targets,
    })
}
