//! `facepay-cloud`: the account system of record.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    name = "facepay-cloud",
    about = "facepay cloud: ledger of record, key distribution, admin API"
)]
struct Cli {
    #[command(flatten)]
    config: settings::ConfigArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: cloud::CloudConfig =
        settings::load_or_exit("facepay-cloud", cloud::config::ENV_PREFIX, &cli.config);
    telemetry::init_logs(cli.config.log_format == settings::LogFormat::Json);
    // Injected storage faults for the chaos suite; only in builds with the failpoints feature.
    storage::failpoints_from_env();
    actix::System::new().block_on(async move {
        let handle = cloud::start(config).await?;
        println!(
            "facepay-cloud ready admin={} api={} metrics={} ca={} token={} cert_expires={}",
            handle.admin_addr,
            handle.api_addr,
            handle.metrics_addr,
            handle.ca_cert.display(),
            handle.api_token.display(),
            handle.cert_expires
        );
        telemetry::wait_for_shutdown().await;
        handle.stop().await;
        println!("facepay-cloud stopped");
        Ok(())
    })
}
