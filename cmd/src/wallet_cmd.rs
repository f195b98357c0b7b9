//! `xe wallet …`

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use xe_store::{LeaseKey, Wallet};

use crate::paths::WalletArg;

#[derive(Subcommand)]
pub enum WalletCmd {
    /// Create a new wallet (refuses to overwrite an existing one) and its lease key.
    Create {
        #[command(flatten)]
        wallet: WalletArg,
    },
    /// Show the address, public key, lease key and file paths.
    Show {
        #[command(flatten)]
        wallet: WalletArg,
    },
    /// Print only the 64-hex account address (for scripts).
    Address {
        #[command(flatten)]
        wallet: WalletArg,
    },
}

pub fn run(cmd: WalletCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WalletCmd::Create { wallet } => {
            let path = wallet.path();
            let w = Wallet::create(&path)?;
            let key = LeaseKey::load_or_create(&w.lease_key_path())
                .with_context(|| format!("creating the lease key for {}", path.display()))?;
            eprintln!("created wallet {}", path.display());
            print_wallet(&w, &key);
        }
        WalletCmd::Show { wallet } => {
            let w = Wallet::load(&wallet.path())?;
            // The lease key is part of the wallet; make it if it is missing.
            let key = LeaseKey::load_or_create(&w.lease_key_path())?;
            print_wallet(&w, &key);
        }
        WalletCmd::Address { wallet } => {
            let w = Wallet::load(&wallet.path())?;
            println!("{}", w.address());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_wallet(w: &Wallet, key: &LeaseKey) {
    println!("address:         {}", w.address());
    println!("public key:      {}", w.public_key());
    println!("wallet file:     {}", w.path().display());
    println!("lease key file:  {}", key.path().display());
    println!("lease key (pub): {}", key.pub_path().display());
    println!("access pub key:  {}", key.access_pub_key());
    println!("lease key:       {}", key.openssh_public());
}
