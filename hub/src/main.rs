//! `facepay-hub`: one per store.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-hub",
    about = "facepay store hub: verifies payment codes, authorizes with the cloud"
)]
struct Cli {
    #[command(flatten)]
    config: settings::ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Offline approvals the cloud reported as conflicts, held in the journal for an operator (the
    /// hub must be stopped: it owns the journal while it runs). Lists them as JSON lines.
    Conflicts {
        /// Drop this one (by its sequence number) once it is settled with the customer and the
        /// store; the journal keeps it until then.
        #[arg(long, value_name = "SEQ")]
        resolve: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: hub::HubConfig =
        settings::load_or_exit("facepay-hub", hub::config::ENV_PREFIX, &cli.config);
    telemetry::init_logs(cli.config.log_format == settings::LogFormat::Json);
    if let Some(Command::Conflicts { resolve }) = cli.command {
        return conflicts(&config, resolve);
    }
    // Injected storage faults for the chaos suite; only in builds with the failpoints feature.
    storage::failpoints_from_env();
    actix::System::new().block_on(async move {
        let handle = hub::start(config).await?;
        println!(
            "facepay-hub ready metrics={} hub_key={} cert_expires={}",
            handle.metrics_addr, handle.hub_public_key, handle.cert_expires
        );
        telemetry::wait_for_shutdown().await;
        handle.stop().await;
        println!("facepay-hub stopped");
        Ok(())
    })
}

/// Lists the held conflicts, or resolves one (exit status 1 when it is not held).
fn conflicts(config: &hub::HubConfig, resolve: Option<u64>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let path = config.data_dir.join("journal");
    let journal = hub::journal::Journal::open(&path).with_context(|| {
        format!(
            "opening the journal at {} (is the hub still running? stop it first)",
            path.display()
        )
    })?;
    match resolve {
        None => {
            for held in journal.conflicts()? {
                println!("{}", serde_json::to_string(&held)?);
            }
            Ok(())
        }
        Some(seq) => {
            if journal.resolve_conflict(seq)? {
                tracing::warn!(
                    seq,
                    "conflict resolved by an operator; dropped from the journal"
                );
                println!("resolved {seq}");
                Ok(())
            } else {
                eprintln!("no conflict {seq} is held");
                std::process::exit(1)
            }
        }
    }
}
