//! `xe`: the command-line front end. Parses arguments, sets up logging and
//! calls into the library crates; no logic of its own lives here.

use clap::{Parser, Subcommand};

mod devnet_cmd;
mod known_hosts;
mod lease_check;
mod lease_cmd;
mod node_cmd;
mod p2p_tunnel;
mod paths;
mod qemu_args;
mod ssh_cmd;
mod ssh_target;
mod stdio;
mod tunnel_cmd;
mod wallet_cmd;
mod when;

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
    /// Run a node: replica, provider (--provide) and/or SSH gateway (--ssh-port).
    Node(Box<node_cmd::NodeArgs>),
    /// Run plain OpenSSH to a lease's VM through a gateway (ProxyCommand -W).
    Ssh(ssh_cmd::SshArgs),
    /// Print a ~/.ssh/config block for a lease (for scp, sftp, rsync, IDEs).
    SshConfig(ssh_cmd::SshConfigArgs),
    /// Start a gateway, a provider and a consumer on loopback and show the whole system working.
    Devnet(Box<devnet_cmd::DevnetArgs>),
    /// Create, show, list, settle and cancel leases through a node's HTTP API.
    #[command(subcommand)]
    Lease(lease_cmd::LeaseCmd),
    /// List providers in the node's directory.
    Providers(lease_cmd::ProvidersArgs),
    /// Forward a local port to a lease's VM sshd through the node's HTTP tunnel.
    Tunnel(tunnel_cmd::TunnelArgs),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal, and never under NO_COLOR
    // (no-color.org): a log file or a journal gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `xe lease show L | head -1`: once the reader is gone, `println!`
/// panics on the broken pipe. A printing command then stops quietly, with
/// the status a writer killed by SIGPIPE has (128 + 13), as other command
/// line tools do. (Restoring SIGPIPE itself needs `unsafe`, and would also
/// apply to a node's or a tunnel's pipes.)
fn quiet_on_broken_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // devnet prints its own progress; a ProxyCommand's stderr is the ssh
    // user's terminal.
    init_tracing(match &cli.command {
        Command::Tunnel(t) if t.stdio && t.p2p.verbose => "warn,xe::p2p=info",
        Command::Ssh(s) if s.target.p2p.verbose => "warn,xe::p2p=info",
        Command::SshConfig(s) if s.target.p2p.verbose => "warn,xe::p2p=info",
        // The overlay lookup of --p2p must not fill the user's terminal.
        Command::Ssh(_) | Command::SshConfig(_) => "warn",
        Command::Devnet(_) | Command::Tunnel(tunnel_cmd::TunnelArgs { stdio: true, .. }) => "warn",
        _ => "info",
    });
    if matches!(
        cli.command,
        Command::Wallet(_) | Command::Lease(_) | Command::Providers(_) | Command::SshConfig(_)
    ) {
        quiet_on_broken_stdout();
    }
    let result = match cli.command {
        Command::Wallet(cmd) => wallet_cmd::run(cmd),
        Command::Node(args) => runtime().and_then(|rt| rt.block_on(node_cmd::run(*args))),
        Command::Ssh(args) => ssh_cmd::run_ssh(args),
        Command::SshConfig(args) => ssh_cmd::run_config(args),
        Command::Devnet(args) => runtime().and_then(|rt| rt.block_on(devnet_cmd::run(*args))),
        Command::Lease(cmd) => runtime().and_then(|rt| rt.block_on(lease_cmd::run(cmd))),
        Command::Providers(args) => {
            runtime().and_then(|rt| rt.block_on(lease_cmd::run_providers(args)))
        }
        // One stream: a second worker thread only adds wake-ups between
        // threads (it doubled this process's CPU per GiB, BENCHMARKS.md).
        Command::Tunnel(args) if args.stdio => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(tunnel_cmd::run(args))),
        Command::Tunnel(args) => runtime().and_then(|rt| rt.block_on(tunnel_cmd::run(args))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, like `{:#}`, but a cause whose
/// text is already part of the message is not said again: many errors
/// (io, libp2p, ours) put their source in their own text *and* return it
/// as `source()`, and "refused (os error 111): refused (os error 111)"
/// reads as two failures.
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(io).context("cannot connect: refused (is it running?)");
        assert_eq!(
            super::error_text(&e),
            "cannot connect: refused (is it running?)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&e), "outer: inner");
    }
}
