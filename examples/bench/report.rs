//! What the benchmark reports: the machine, CPU time of each process from /proc, latency
//! histograms, the table a person reads and the one JSON line a script reads.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The machine the figures were taken on (from /proc).
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs (`processor` lines of /proc/cpuinfo).
    pub cores: usize,
    /// The CPU's model name.
    pub cpu: String,
    /// MemTotal of /proc/meminfo, GiB.
    pub memory_gib: f64,
    /// /proc/sys/kernel/osrelease.
    pub kernel: String,
    /// The 1-minute load average when the run started (others may be compiling).
    pub load_at_start: f64,
}

impl Machine {
    /// Read it now.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let load_at_start = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0);
        Self { cores: cores.max(1), cpu, memory_gib: round(kib / 1024.0 / 1024.0, 1), kernel, load_at_start }
    }

    /// One line for the table's header.
    pub fn line(&self) -> String {
        format!(
            "{} cores ({}), {:.1} GiB, Linux {}, load {:.2} at start",
            self.cores, self.cpu, self.memory_gib, self.kernel, self.load_at_start
        )
    }
}

/// Clock ticks per second of /proc/<pid>/stat times: USER_HZ, 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, every thread, living or ended) of a process, in seconds,
/// from /proc/<pid>/stat; `None` when the process is gone. Resolution 10 ms.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// CPU seconds of each thread of a process, summed by thread name (`journal`,
/// `tokio-rt-worker`, ...); the main thread is `main`. Threads that ended are missing,
/// so compare snapshots of long-lived threads only.
pub fn thread_cpu_seconds(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = if tid == pid { "main".to_owned() } else { stat[open + 1..close].to_owned() };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += (ticks(11) + ticks(12)) / USER_HZ;
    }
    out
}

/// Peak resident memory (VmHWM) of a process, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kib / 1024.0, 1))
}

/// Round to `digits` decimals (for the JSON line).
pub fn round(v: f64, digits: i32) -> f64 {
    let k = 10f64.powi(digits);
    (v * k).round() / k
}

/// A latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// Record one latency (saturating at the histogram's top).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, h.high());
    h.saturating_record(us);
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// How many values.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| round(us as f64 / 1000.0, 2);
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: round(h.mean() / 1000.0, 2),
        }
    }

    /// `p50 / p90 / p99 / max` for the table.
    pub fn line(&self) -> String {
        format!("{:.1} / {:.1} / {:.1} / {:.1} ms", self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms)
    }
}

/// One performance target of issue 4, and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured.
    pub figure: String,
    /// The target, as text (`< 50 ms`).
    pub target: String,
    /// The value measured.
    pub value: f64,
    /// Whether the value meets the target.
    pub met: bool,
    /// Whether the run had the size the target is stated for (10,000 meters, and for
    /// latency 100 payments/s); a smaller run's verdict is only indicative.
    pub at_target_size: bool,
}

/// Rows of `(figure, value)` printed as an aligned table.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    /// Add a row.
    pub fn row(&mut self, figure: impl Into<String>, value: impl Into<String>) {
        self.rows.push((figure.into(), value.into()));
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|(f, _)| f.chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        for (f, v) in &self.rows {
            out.push_str(&format!("  {f:<width$}  {v}\n"));
        }
        out
    }
}

/// The targets as table rows: `figure: value (target, met/MISSED)`.
pub fn target_rows(table: &mut Table, targets: &[Target]) {
    for t in targets {
        let verdict = match (t.met, t.at_target_size) {
            (true, true) => "met",
            (false, true) => "MISSED",
            (true, false) => "met (smaller run than the target's)",
            (false, false) => "missed (smaller run than the target's)",
        };
        table.row(format!("target: {}", t.figure), format!("{} {} -> {}", t.value, t.target, verdict));
    }
}
