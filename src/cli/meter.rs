//! `headend meter ...`: the commissioning tools. One meter, one link, no daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;

use headend::config::SiteConfig;
use headend::dlms::cosem;
use headend::dlms::counter::CounterStore;
use headend::driver::{Driver, Link};
use headend::meter::{MeterError, SwitchOutcome};
use headend::time::{format_rfc3339, parse_rfc3339, Clock, SystemClock};

/// Arguments of `headend meter`.
#[derive(Args, Debug)]
pub struct MeterArgs {
    /// The site configuration (TOML) that names the meter and its link.
    #[arg(long, short, default_value = "site.toml")]
    config: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Read who the meter says it is, and compare with the registry.
    Identify {
        /// Meter id from the configuration.
        meter: String,
    },
    /// Read relay state, energy registers and clock.
    Read {
        /// Meter id.
        meter: String,
    },
    /// Read the load profile over a time range.
    Profile {
        /// Meter id.
        meter: String,
        /// Start (RFC 3339); default: `--hours` before now.
        #[arg(long)]
        from: Option<String>,
        /// End (RFC 3339); default: now.
        #[arg(long)]
        to: Option<String>,
        /// Hours back from `--to` when `--from` is not given.
        #[arg(long, default_value_t = 24)]
        hours: i64,
        /// The profile object.
        #[arg(long, default_value = "1.0.99.1.0.255")]
        obis: String,
    },
    /// Open the relay (after checking the meter's identity), and read it back.
    Disconnect {
        /// Meter id.
        meter: String,
    },
    /// Close the relay, or arm it for the customer's button; read it back.
    Reconnect {
        /// Meter id.
        meter: String,
    },
}

impl Verb {
    fn meter(&self) -> &str {
        match self {
            Verb::Identify { meter }
            | Verb::Read { meter }
            | Verb::Disconnect { meter }
            | Verb::Reconnect { meter } => meter,
            Verb::Profile { meter, .. } => meter,
        }
    }
}

/// Run a verb. Exit 0 on success, 1 when the meter exchange failed, 2 on bad input.
pub async fn run(args: MeterArgs) -> anyhow::Result<ExitCode> {
    let site = SiteConfig::load(&args.config)?;
    let id = args.verb.meter().to_owned();
    let meter = site.meter(&id).with_context(|| format!("no meter {id:?} in {}", args.config.display()))?.clone();
    let link_cfg = site.link(&meter.link).with_context(|| format!("no link {:?}", meter.link))?.clone();
    let counters = CounterStore::new(site.state_dir().join("invocation-counters"));
    let mut driver = Driver::from_config(&site, &meter, counters)?;
    let offset = meter.timezone_offset_minutes.unwrap_or(0);

    let mut link = match Link::open(&link_cfg).await {
        Ok(l) => l,
        Err(e) => return Ok(report_error(&id, &e, args.json)),
    };
    let outcome = run_verb(&args.verb, &mut driver, &mut link, meter.identity.as_deref(), offset).await;
    driver.close(&mut link).await;
    match outcome {
        Ok(Output { text, json }) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&json)?);
            } else {
                println!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(VerbError::Meter(e)) => Ok(report_error(&id, &e, args.json)),
        Err(VerbError::Input(msg)) => {
            eprintln!("error: {msg}");
            Ok(ExitCode::from(2))
        }
    }
}

struct Output {
    text: String,
    json: serde_json::Value,
}

enum VerbError {
    Meter(MeterError),
    Input(String),
}

impl From<MeterError> for VerbError {
    fn from(e: MeterError) -> Self {
        Self::Meter(e)
    }
}

fn report_error(meter: &str, e: &MeterError, as_json: bool) -> ExitCode {
    if as_json {
        println!("{}", json!({"meter": meter, "ok": false, "error": {"code": e.code(), "message": e.to_string()}}));
    } else {
        eprintln!("{meter}: {e}");
    }
    ExitCode::from(1)
}

async fn run_verb(
    verb: &Verb,
    driver: &mut Driver,
    link: &mut Link,
    expected: Option<&str>,
    offset: i16,
) -> Result<Output, VerbError> {
    let meter = verb.meter();
    match verb {
        Verb::Identify { .. } => {
            let id = driver.read_identity(link).await?;
            let matches = expected.map(|e| e == id.name);
            let verdict = match matches {
                Some(true) => "matches the registry",
                Some(false) => "DOES NOT match the registry",
                None => "no identity registered",
            };
            Ok(Output {
                text: format!(
                    "{meter}: logical device name {:?}{} ({verdict})",
                    id.name,
                    id.serial.as_ref().map(|s| format!(", serial {s:?}")).unwrap_or_default()
                ),
                json: json!({"meter": meter, "ok": true, "identity": id, "registered": expected, "matches": matches}),
            })
        }
        Verb::Read { .. } => {
            let relay = driver.read_relay(link).await?;
            let registers = driver.read_registers(link).await?;
            let clock = match driver.read_clock(link).await {
                Ok(c) => Some(c),
                Err(MeterError::Unsupported(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let mut text = format!("{meter}: relay {}", relay.state);
            if let Some(mode) = relay.control_mode {
                text.push_str(&format!(" (control mode {})", mode.0));
            }
            for r in &registers {
                text.push_str(&format!("\n  {:<16} {} {}", r.obis, r.value, r.unit));
            }
            if let Some(c) = &clock {
                text.push_str(&format!("\n  clock            {}", c.text));
            }
            Ok(Output {
                text,
                json: json!({"meter": meter, "ok": true, "relay": relay, "registers": registers, "clock": clock}),
            })
        }
        Verb::Profile { from, to, hours, obis, .. } => {
            let obis = cosem::parse_obis(obis)
                .ok_or_else(|| VerbError::Input(format!("{obis:?} is not an OBIS code (a.b.c.d.e.f)")))?;
            let to = match to {
                Some(t) => parse_rfc3339(t).map_err(|e| VerbError::Input(e.to_string()))?,
                None => SystemClock.now(),
            };
            let from = match from {
                Some(f) => parse_rfc3339(f).map_err(|e| VerbError::Input(e.to_string()))?,
                None => to - hours * 3600,
            };
            if from > to {
                return Err(VerbError::Input("--from is after --to".into()));
            }
            let profile = driver.read_profile(link, obis, from, to).await?;
            let mut text = format!(
                "{meter}: {} rows of {} (every {} s)\n  {:<25} {:>6}",
                profile.rows.len(),
                profile.obis,
                profile.capture_period_s,
                "time",
                "status"
            );
            for c in &profile.columns {
                text.push_str(&format!(" {:>22}", format!("{} [{}]", c.name, c.unit.as_deref().unwrap_or("-"))));
            }
            for r in &profile.rows {
                let t = r.unix_seconds.map(|t| format_rfc3339(t, offset)).unwrap_or_else(|| "(bad clock)".into());
                let status = r.status.map(|s| s.to_string()).unwrap_or_default();
                text.push_str(&format!("\n  {t:<25} {status:>6}"));
                for v in &r.values {
                    text.push_str(&format!(" {:>22}", v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())));
                }
            }
            Ok(Output { text, json: json!({"meter": meter, "ok": true, "profile": profile}) })
        }
        Verb::Disconnect { .. } | Verb::Reconnect { .. } => {
            let Some(expected) = expected else {
                return Err(VerbError::Input(format!(
                    "{meter} has no `identity` in the configuration: set it (see `headend meter identify`) before switching"
                )));
            };
            // Never switch the wrong meter: the one answering must be the one registered.
            driver.verify_identity(link, expected).await?;
            let disconnect = matches!(verb, Verb::Disconnect { .. });
            let outcome = if disconnect { driver.disconnect(link).await? } else { driver.reconnect(link).await? };
            let relay = driver.read_relay(link).await?;
            let text = match outcome {
                SwitchOutcome::Done => format!("{meter}: relay {} (verified)", relay.state),
                SwitchOutcome::Armed => {
                    format!("{meter}: armed: relay {}; the customer must press the meter's button", relay.state)
                }
            };
            Ok(Output { text, json: json!({"meter": meter, "ok": true, "outcome": outcome, "relay": relay}) })
        }
    }
}
