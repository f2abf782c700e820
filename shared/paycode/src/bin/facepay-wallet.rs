//! The phone side of facepay: holds an account's key and shows dynamic payment codes.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use paycode::{qr, Wallet};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-wallet",
    about = "create a wallet key and issue signed payment codes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a wallet for an account and print its public key (register it with the cloud).
    New {
        /// Account id the wallet pays from.
        #[arg(long)]
        account: String,
        /// Where to write the wallet file (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the wallet's public key.
    PublicKey {
        /// Wallet file.
        #[arg(long)]
        wallet: PathBuf,
    },
    /// Issue a fresh single-use code: print its text, show it as a QR code, optionally save a PNG.
    Code {
        /// Wallet file.
        #[arg(long)]
        wallet: PathBuf,
        /// Also write the QR code as a PNG image here.
        #[arg(long)]
        png: Option<PathBuf>,
        /// Do not draw the QR code in the terminal.
        #[arg(long)]
        quiet: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::New { account, out } => {
            let wallet = Wallet::generate(&account)?;
            wallet.save(&out)?;
            println!("{}", wallet.public_key_b64());
            eprintln!("wallet for {account} written to {}", out.display());
        }
        Command::PublicKey { wallet } => println!("{}", Wallet::load(&wallet)?.public_key_b64()),
        Command::Code { wallet, png, quiet } => {
            let wallet = Wallet::load(&wallet)?;
            let text = wallet.issue_code(paycode::now_ms());
            if !quiet {
                eprintln!("{}", qr::render_terminal(&text)?);
            }
            if let Some(path) = png {
                qr::render_png(&text, &path)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("QR code written to {}", path.display());
            }
            println!("{text}");
        }
    }
    Ok(())
}
