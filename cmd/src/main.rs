//! `xe`: the command-line front end. Parses arguments, sets up logging and
//! calls into the library crates; no logic of its own lives here.

use clap::{Parser, Subcommand};

mod paths;
mod wallet_cmd;

/// SSH access to leased VMs across a libp2p overlay.
#[derive(Parser)]
#[command(name = "xe", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and inspect the account wallet and its SSH lease key.
    #[command(subcommand)]
    Wallet(wallet_cmd::WalletCmd),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Wallet(cmd) => wallet_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
