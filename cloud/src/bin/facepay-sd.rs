//! `facepay-sd`: Prometheus service discovery for a fleet, from its inventory ([`cloud::sd`]).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    name = "facepay-sd",
    about = "Writes a fleet's Prometheus targets (file_sd) and each store's agent configuration \
             from its inventory"
)]
struct Cli {
    /// The fleet's inventory (TOML: [central], [[cloud]], [[stores]]; see ops/fleet.example.toml).
    #[arg(long)]
    inventory: PathBuf,
    /// Where to write central/ and stores/<store_id>/.
    #[arg(long)]
    out: PathBuf,
    /// Where a store's target files will be on its machine.
    #[arg(long, default_value = "/etc/prometheus/facepay")]
    store_dir: String,
    /// Where the central target file will be on the central machine.
    #[arg(long, default_value = "/etc/prometheus/facepay")]
    central_dir: String,
    /// Where the alerting and recording rules will be on the central machine.
    #[arg(long, default_value = "/etc/prometheus/facepay-rules.yml")]
    rules: String,
}

fn main() {
    let cli = Cli::parse();
    let places = cloud::sd::Places {
        store_dir: cli.store_dir,
        central_dir: cli.central_dir,
        rules: cli.rules,
    };
    // EX_DATAERR: the inventory is wrong, and nothing was written.
    let files = cloud::sd::read(&cli.inventory)
        .and_then(|inventory| inventory.files(&places))
        .unwrap_or_else(|error| {
            eprintln!("facepay-sd: {error}");
            std::process::exit(65)
        });
    // EX_IOERR: a file could not be written (those before it were).
    if let Err(error) = cloud::sd::write(&cli.out, &files) {
        eprintln!("facepay-sd: {error}");
        std::process::exit(74)
    }
    println!(
        "facepay-sd wrote {} files in {}",
        files.len(),
        cli.out.display()
    );
}
