//! `facepay-hub`: one per store.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "facepay-hub",
    about = "facepay store hub: verifies payment codes, authorizes with the cloud"
)]
struct Cli {
    #[command(flatten)]
    config: settings::ConfigArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: hub::HubConfig =
        settings::load_or_exit("facepay-hub", hub::config::ENV_PREFIX, &cli.config);
    telemetry::init_tracing();
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
        Ok(())
    })
}
