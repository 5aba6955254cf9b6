//! The `headend` command: the demo, and the field engineer's verbs that talk to one
//! meter directly (the daemon comes with the MQTT work).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Head-end for smart meters: read, cut and restore over DLMS/COSEM and Modbus.
#[derive(Parser, Debug)]
#[command(name = "headend", version, about)]
struct Cli {
    /// Log lines on stderr as text or as JSON (one object per line, with spans).
    #[arg(long, global = true, value_enum, default_value_t = headend::observe::logs::LogFormat::Text)]
    log_format: headend::observe::logs::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a simulated fleet in-process and show the head-end working on it.
    Demo(cli::demo::DemoArgs),
    /// Talk to one meter directly, without the daemon or a broker (commissioning).
    Meter(cli::meter::MeterArgs),
    /// Run the daemon: execute commands from MQTT, reconnect on payment.
    Run(cli::run::RunArgs),
    /// Ask the daemon (over MQTT) to cut a meter, and wait for the outcome.
    Cut(cli::client::CutArgs),
    /// Ask the daemon to restore (reconnect) a meter, and wait for the outcome.
    Restore(cli::client::RestoreArgs),
    /// Ask the daemon to read a meter's relay and energy register now.
    Read(cli::client::ReadArgs),
    /// Send billing's payment confirmation, and follow the reconnects it causes.
    Pay(cli::client::PayArgs),
    /// Show a meter's history from the command journal (works while the daemon runs).
    Audit(cli::audit::AuditArgs),
    /// Check a configuration file and report every problem.
    CheckConfig {
        /// The site configuration (TOML).
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // Before any thread allocates: one malloc arena (docs/collection.md, Memory).
    headend::collect::limit_allocator_arenas();
    let cli = Cli::parse();
    headend::observe::logs::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => cli::demo::run(args).await,
            Command::Meter(args) => cli::meter::run(args).await,
            Command::Run(args) => cli::run::run(args).await,
            Command::Cut(args) => Ok(cli::client::cut(args).await),
            Command::Restore(args) => Ok(cli::client::restore(args).await),
            Command::Read(args) => Ok(cli::client::read(args).await),
            Command::Pay(args) => Ok(cli::client::pay(args).await),
            Command::Audit(args) => Ok(cli::audit::run(args)),
            Command::CheckConfig { config } => cli::check_config(&config),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
