//! `facepay-edge`: the checkout terminal.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    name = "facepay-edge",
    about = "facepay checkout terminal: scans payment codes, serves the cash register"
)]
struct Cli {
    #[command(flatten)]
    config: settings::ConfigArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: edge::EdgeConfig =
        settings::load_or_exit("facepay-edge", edge::config::ENV_PREFIX, &cli.config);
    telemetry::init_logs(cli.config.log_format == settings::LogFormat::Json);
    actix::System::new().block_on(async move {
        let handle = edge::start(config).await?;
        println!(
            "facepay-edge ready register={}://{} metrics={} cert_expires={}",
            if handle.register_https {
                "https"
            } else {
                "http"
            },
            handle.register_addr,
            handle.metrics_addr,
            handle.cert_expires
        );
        telemetry::wait_for_shutdown().await;
        handle.stop().await;
        println!("facepay-edge stopped");
        Ok(())
    })
}
