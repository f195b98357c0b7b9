//! Default locations under `~/.xe`.

use std::path::PathBuf;

/// `~/.xe`, or `./.xe` when no home directory is known.
pub fn xe_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".xe")
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
