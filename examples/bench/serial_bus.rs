//! `serial-bus`: N DLMS meters on one emulated RS-485 bus (meter-sim's HDLC endpoint
//! with a baud rate: every frame, both ways, is delayed by its wire time and the bus
//! carries one at a time), busy with interval collection, while restores arrive one after
//! another. Reported: the collection cycle against the wire time of the bytes that crossed
//! the bus (counted by a proxy in front of it; the restores' bytes included), as a ratio
//! (issue 5: at most 1.2), and the restores' latency, from the command's publication to
//! its final status (HDR histogram): what a restore waits for behind collection.

use std::time::{Duration, Instant};

use anyhow::bail;
use rumqttc::QoS;
use serde::Serialize;

use crate::collection::{CollectRig, Cycle, RigSetup, Seen};
use crate::report::{latency_histogram, record, round, target_rows, Latency, Machine, Table, Target};

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// The rig (its fleet is a bus).
    pub setup: RigSetup,
    /// The bus's baud rate.
    pub baud: u32,
    /// Pause between one restore's final status and the next restore's command.
    pub restore_gap: Duration,
}

/// What the scenario reports (the JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct BusReport {
    /// `serial-bus`.
    pub scenario: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// Meters on the bus.
    pub meters: usize,
    /// Baud rate (10 bits per byte on the wire: 8N1).
    pub baud: u32,
    /// Intervals per meter per cycle.
    pub rows_per_meter: u64,
    /// HDLC parameters proposed (None: 128 bytes, window 1).
    pub hdlc: Option<String>,
    /// The first cycle (cold; no restores).
    pub cold: Cycle,
    /// The measured cycle (with restores).
    pub steady: Cycle,
    /// Bytes to the meters during the measured cycle.
    pub bytes_to_meters: u64,
    /// Bytes from the meters.
    pub bytes_from_meters: u64,
    /// Their wire time, s.
    pub wire_s: f64,
    /// Cycle time / wire time.
    pub ratio: f64,
    /// Restores sent during the measured cycle and answered.
    pub restores: Latency,
    /// Restores whose final status was not `succeeded` or `armed`.
    pub restore_failures: usize,
    /// Issue 5's target.
    pub targets: Vec<Target>,
}

impl BusReport {
    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut t = Table::default();
        t.row("machine", self.machine.line());
        t.row(
            "bus",
            format!(
                "{} meters at {} baud, {} row(s) per meter per cycle, HDLC {}",
                self.meters,
                self.baud,
                self.rows_per_meter,
                self.hdlc.as_deref().unwrap_or("defaults")
            ),
        );
        t.row("cycle 1 (cold)", format!("{} meters in {:.2} s", self.cold.meters_complete, self.cold.wall_s));
        t.row(
            "cycle 2 (with restores)",
            format!(
                "{} meters, {} rows in {:.2} s; {} + {} bytes = {:.2} s of wire time; ratio {:.2}",
                self.steady.meters_complete,
                self.steady.rows,
                self.steady.wall_s,
                self.bytes_to_meters,
                self.bytes_from_meters,
                self.wire_s,
                self.ratio
            ),
        );
        t.row(
            "restore latency p50/p90/p99/max",
            format!("{} ({} restores, {} failed)", self.restores.line(), self.restores.count, self.restore_failures),
        );
        target_rows(&mut t, &self.targets);
        format!("serial-bus\n{}", t.render())
    }
}

/// Restores one after another while the cycle runs.
struct Restores {
    meters: Vec<String>,
    gap: Duration,
    sent: usize,
    outstanding: Option<(String, Instant)>,
    next_at: Instant,
    latency: hdrhistogram::Histogram<u64>,
    failures: usize,
}

impl Restores {
    /// A final status for the outstanding restore.
    fn on_result(&mut self, seen: &Seen) {
        let Some((id, at)) = &self.outstanding else { return };
        if seen.payload["id"].as_str() != Some(id.as_str()) {
            return;
        }
        let status = seen.payload["status"].as_str().unwrap_or_default();
        let is_final = matches!(status, "succeeded" | "armed" | "failed" | "rejected" | "expired" | "superseded");
        if !is_final {
            return;
        }
        record(&mut self.latency, seen.at.duration_since(*at));
        if !matches!(status, "succeeded" | "armed") {
            self.failures += 1;
        }
        self.outstanding = None;
        self.next_at = seen.at + self.gap;
    }

    /// The next command to send, when it is time.
    fn due(&mut self, now: Instant) -> Option<(String, String)> {
        if self.outstanding.is_some() || now < self.next_at || self.meters.is_empty() {
            return None;
        }
        let meter = self.meters.get(self.sent % self.meters.len())?.clone();
        let id = format!("bus-restore-{}", self.sent);
        self.sent += 1;
        self.outstanding = Some((id.clone(), now));
        Some((meter, format!("{{\"id\":\"{id}\",\"action\":\"reconnect\",\"operator\":\"bench\"}}")))
    }
}

/// Run the scenario.
pub async fn run(o: &BusOptions, machine: Machine) -> anyhow::Result<BusReport> {
    let s = &o.setup;
    let mut rig = CollectRig::start(s).await?;
    let n = s.meters;
    let result = measure(&mut rig, o).await;
    rig.note(&format!("daemon log: {}", rig.log.display()));
    rig.stop().await;
    let (cold, steady, (w, r), restores) = result?;
    let wire_s = (w + r) as f64 * 10.0 / f64::from(o.baud.max(1));
    let ratio = round(steady.wall_s / wire_s.max(1e-9), 3);
    let latency = Latency::of(&restores.latency);
    let targets = vec![Target {
        figure: "collection cycle / wire time on a 9,600-baud bus".into(),
        target: "<= 1.2".into(),
        value: ratio,
        met: ratio <= 1.2,
        at_target_size: o.baud == 9600,
    }];
    Ok(BusReport {
        scenario: "serial-bus",
        machine,
        meters: n,
        baud: o.baud,
        rows_per_meter: s.rows,
        hdlc: s.hdlc.clone(),
        cold,
        steady,
        bytes_to_meters: w,
        bytes_from_meters: r,
        wire_s: round(wire_s, 3),
        ratio,
        restores: latency,
        restore_failures: restores.failures,
        targets,
    })
}

async fn measure(rig: &mut CollectRig, o: &BusOptions) -> anyhow::Result<(Cycle, Cycle, (u64, u64), Restores)> {
    let s = &o.setup;
    let n = s.meters;
    let cold = rig.cycle(n, s.rows, |_| {}).await?;
    if cold.meters_complete < n {
        bail!("cycle 1: only {} of {n} meters' readings arrived", cold.meters_complete);
    }
    rig.note(&format!("cycle 1 (cold): {:.1} s", cold.wall_s));
    rig.catch_up();
    let mut restores = Restores {
        meters: rig.meter_ids.clone(),
        gap: o.restore_gap,
        sent: 0,
        outstanding: None,
        next_at: Instant::now(),
        latency: latency_histogram(),
        failures: 0,
    };
    let (w0, r0) = rig.wire.now();
    let cpu0 = crate::report::cpu_seconds(rig.daemon_pid).unwrap_or(0.0);
    let before: u64 = rig.per_meter.values().sum();
    let want = 2 * s.rows;
    let t0 = Instant::now();
    rig.collect_now().await?;
    let mut complete = rig.complete(want);
    let prefix = rig.prefix.clone();
    let topic = |m: &str| format!("{prefix}/cmd/{m}");
    while complete < n {
        if let Some((meter, body)) = restores.due(Instant::now()) {
            rig.client.publish(topic(&meter), QoS::AtLeastOnce, false, body).await?;
        }
        let wait = restores.next_at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let idle =
            if restores.outstanding.is_none() { wait.min(Duration::from_secs(60)) } else { Duration::from_secs(60) };
        let seen = match tokio::time::timeout(idle, rig.events.recv()).await {
            Ok(Some(Ok(seen))) => seen,
            Ok(Some(Err(e))) => bail!("observer: {e}"),
            Ok(None) => bail!("observer stopped"),
            // Time for the next restore.
            Err(_) if restores.outstanding.is_none() => continue,
            Err(_) => bail!("nothing from the broker for a minute"),
        };
        if seen.topic.contains("/readings/") {
            if rig.tally(&seen, want) {
                complete += 1;
            }
        } else if seen.topic.contains("/result/") {
            restores.on_result(&seen);
        }
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let cpu = crate::report::cpu_seconds(rig.daemon_pid).unwrap_or(0.0) - cpu0;
    let (w1, r1) = rig.wire.now();
    // The restore in flight when the cycle ended is awaited (its latency counts), but
    // its bytes after the cycle's end are not in the cycle's wire time.
    if restores.outstanding.is_some() {
        while restores.outstanding.is_some() {
            let seen = crate::collection::next(&mut rig.events, Duration::from_secs(60)).await?;
            if seen.topic.contains("/result/") {
                restores.on_result(&seen);
            }
        }
    }
    let steady = Cycle {
        meters_complete: complete,
        rows: rig.per_meter.values().sum::<u64>() - before,
        wall_s: round(wall_s, 2),
        daemon_cpu_s: round(cpu, 2),
        cpu_s_per_1000_reads: round(cpu * 1000.0 / complete.max(1) as f64, 3),
    };
    Ok((cold, steady, (w1 - w0, r1 - r0), restores))
}
