//! `facepay-broker-config`: prints the configuration of one node of the fleet's NATS broker
//! cluster (MQTT on JetStream, clients known by their certificates, each limited to its own
//! topics). Run it once per node; give every node the same `--node` list.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    name = "facepay-broker-config",
    about = "configuration of one node of the fleet's NATS broker cluster"
)]
struct Cli {
    /// This node's index in --nodes (0 for the first).
    #[arg(long)]
    index: usize,
    /// Every node: name=mqtt_host:port/cluster_host:port, comma-separated, the same on every node
    /// (e.g. n1=10.0.0.1:8883/10.0.0.1:6222).
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// This node's JetStream directory.
    #[arg(long)]
    store_dir: PathBuf,
    /// Where the node takes NATS protocol clients (its own tools only; keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:4222")]
    client_listen: String,
    /// The fleet PKI directory holding ca.pem, broker.pem and broker.key.
    #[arg(long, default_value = "pki")]
    pki_dir: PathBuf,
    /// Every store id (one hub each).
    #[arg(long, value_delimiter = ',')]
    stores: Vec<String>,
    /// Every cloud instance id (fleet.instance); none: the single `cloud`.
    #[arg(long, value_delimiter = ',')]
    cloud_instances: Vec<String>,
    /// A file holding the password nodes take each other's routes with (the same on every
    /// node; at least 32 letters, digits, '-' or '_'; readable by the broker only).
    #[arg(long)]
    route_password_file: PathBuf,
}

fn node(
    spec: &str,
    store_dir: &std::path::Path,
    client_listen: &str,
) -> anyhow::Result<mqtt::nats::NatsNode> {
    let (name, addresses) = spec
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--nodes {spec:?}: expected name=mqtt/cluster"))?;
    let (mqtt_listen, cluster_listen) = addresses
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--nodes {spec:?}: expected name=mqtt/cluster"))?;
    Ok(mqtt::nats::NatsNode {
        name: name.into(),
        mqtt_listen: mqtt_listen.into(),
        cluster_listen: cluster_listen.into(),
        client_listen: client_listen.into(),
        store_dir: store_dir.into(),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let nodes = cli
        .nodes
        .iter()
        .map(|spec| node(spec, &cli.store_dir, &cli.client_listen))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let this = nodes
        .get(cli.index)
        .ok_or_else(|| anyhow::anyhow!("--index {} is not in --nodes", cli.index))?;
    let tls = mqtt::nats::BrokerTls {
        ca: cli.pki_dir.join("ca.pem"),
        cert: cli.pki_dir.join("broker.pem"),
        key: cli.pki_dir.join("broker.key"),
    };
    let clients = mqtt::nats::Clients {
        stores: cli.stores,
        cloud_instances: cli.cloud_instances,
    };
    let password = std::fs::read_to_string(&cli.route_password_file)?;
    print!(
        "{}",
        mqtt::nats::node_config(this, &nodes, &tls, &clients, password.trim())?
    );
    Ok(())
}
