//! The log subscriber: text for people, JSON (one object per line) for collectors.
//!
//! Span fields come with every line: a command's status changes and its exchanges with
//! the meter are logged inside the command's span (`command{id=.. meter=..}`), so its
//! whole story can be filtered by its id.

use tracing_subscriber::EnvFilter;

/// How log lines are written (on stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span and its parents.
    Json,
}

/// Install the global subscriber. `RUST_LOG` filters (default: warnings, and nothing
/// from the embedded broker).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,rumqttd=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
    if let Err(e) = installed {
        eprintln!("warning: logging not set up: {e}");
    }
}
