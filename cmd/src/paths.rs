//! Default locations under `~/.xe`.

use std::path::PathBuf;

/// `~/.xe`, or `./.xe` when no home directory is known.
pub fn xe_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".xe")
}

/// `~/.xe/known_hosts`: the VM host keys `xe ssh` and `xe tunnel` pin,
/// each under its lease's alias.
pub fn default_known_hosts() -> PathBuf {
    xe_home().join("known_hosts")
}

/// `~/.xe/wallet.seed`.
pub fn default_wallet() -> PathBuf {
    xe_home().join("wallet.seed")
}

/// clap argument for every subcommand that uses a wallet.
#[derive(clap::Args, Debug, Clone)]
pub struct WalletArg {
    /// Wallet seed file [default: ~/.xe/wallet.seed]
    #[arg(long, env = "XE_WALLET", value_name = "PATH")]
    pub wallet: Option<PathBuf>,
}

impl WalletArg {
    /// The chosen wallet path.
    pub fn path(&self) -> PathBuf {
        self.wallet.clone().unwrap_or_else(default_wallet)
    }
}

/// `addr` must end in `/p2p/<peer id>` (bootstrap peers, relays): the
/// error names it as `what` and says where to find one (`hint`).
pub fn require_peer_id(
    addr: &xe_net::Multiaddr,
    what: std::fmt::Arguments<'_>,
    hint: &str,
) -> anyhow::Result<()> {
    if xe_net::peer_of(addr).is_none() {
        anyhow::bail!("{what}: must end in /p2p/<peer id> ({hint})");
    }
    Ok(())
}

/// Defaults a user can set once in `~/.xe/config.json` (or the file named by
/// `XE_CONFIG`), e.g. `{"node": "http://127.0.0.1:8080", "gateway": "gw.example.net:2222"}`.
/// Flags and environment variables win over it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Default `--node` URL.
    pub node: Option<String>,
    /// Default `--gateway HOST:PORT`.
    pub gateway: Option<String>,
    /// Overlay peers `--p2p` starts from (`/ip4/…/tcp/…/p2p/<peer id>`).
    #[serde(default)]
    pub bootstrap: Vec<xe_net::Multiaddr>,
}

impl Config {
    /// The config file's path.
    pub fn path() -> PathBuf {
        std::env::var_os("XE_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| xe_home().join("config.json"))
    }

    /// Read the config; a missing file is an empty config, a malformed one
    /// is an error that names the file.
    pub fn load() -> anyhow::Result<Config> {
        use anyhow::Context;
        let path = Config::path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected JSON like {{\"node\": \"http://127.0.0.1:8080\", \"gateway\": \"host:2222\"}}",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}
