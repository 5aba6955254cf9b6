//! The `headend` command: the demo, and the field engineer's verbs that talk to one
//! meter directly (the daemon comes with the MQTT work).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Head-end for smart meters: read, cut and restore over DLMS/COSEM and Modbus.
#[derive(Parser, Debug)]
#[command(name = "headend", version, about)]
struct Cli {
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
    /// Check a configuration file and report every problem.
    CheckConfig {
        /// The site configuration (TOML).
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
