//! `facepay-pki`: the fleet's certificate authority on the command line.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pki::{Identity, IssueOptions, Pki, Role};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-pki",
    about = "facepay fleet PKI: root CA, certificates for every tier, revocation list"
)]
struct Cli {
    /// The PKI directory (ca.pem, crl.pem, <name>.pem, <name>.key).
    #[arg(long, default_value = "pki", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the root CA and an empty revocation list.
    Init,
    /// Issues a certificate; an earlier one of the same name is revoked and its files replaced.
    Issue {
        #[command(subcommand)]
        who: Who,
        /// Days of validity.
        #[arg(long, default_value_t = 397, global = true)]
        days: i64,
        /// More DNS names the holder serves under (besides localhost).
        #[arg(long = "dns", global = true)]
        dns: Vec<String>,
        /// More addresses the holder serves under (besides 127.0.0.1 and ::1).
        #[arg(long = "ip", global = true)]
        ip: Vec<IpAddr>,
    },
    /// Everything a demo or a test fleet needs: the CA (if missing), the cloud, the broker, the
    /// database, the default operator, a read-only operator `viewer`, and a hub and terminals
    /// per store.
    Fleet {
        /// Store ids.
        #[arg(long, value_delimiter = ',', default_value = "store-1")]
        stores: Vec<String>,
        /// Terminal ids, in every store.
        #[arg(long, value_delimiter = ',', default_value = "till-1")]
        terminals: Vec<String>,
    },
    /// Revokes the current certificate of NAME (e.g. edge-store-1-till-2) and rewrites crl.pem;
    /// distribute crl.pem to every tier.
    Revoke {
        /// The certificate's file stem.
        name: String,
    },
    /// Signs crl.pem again (new number, 30 more days); do it monthly, or Mosquitto refuses
    /// every client once the list expires.
    Crl,
    /// Lists every certificate issued, with its expiry and revocation.
    List,
}

#[derive(Subcommand, Clone)]
enum Who {
    /// The cloud (cloud.pem), or with --instance one of several cloud instances sharing a
    /// database (cloud-<instance>.pem, common name cloud:<instance>).
    Cloud {
        /// The instance id (its `fleet.instance`).
        #[arg(long)]
        instance: Option<String>,
    },
    /// The MQTT broker (broker.pem).
    Broker,
    /// The cloud's PostgreSQL server (database.pem).
    Database,
    /// A store's hub (hub-<store>.pem); its identity is the store id.
    Hub {
        /// The store id.
        store_id: String,
    },
    /// A checkout terminal (edge-<store>-<terminal>.pem).
    Edge {
        /// The store id.
        store_id: String,
        /// The terminal id.
        terminal_id: String,
    },
    /// An operator of the admin API: operator.pem, or operator-<name>.pem with --name.
    Operator {
        /// Another operator than the default one.
        #[arg(long)]
        name: Option<String>,
        /// `operator` may move money; `viewer` may only read.
        #[arg(long, default_value = "operator")]
        role: String,
    },
}

fn identity(who: &Who) -> anyhow::Result<Identity> {
    Ok(match who {
        Who::Cloud { instance: None } => Identity::cloud(),
        Who::Cloud {
            instance: Some(instance),
        } => Identity::cloud_instance(instance)?,
        Who::Broker => Identity::broker(),
        Who::Database => Identity::database(),
        Who::Hub { store_id } => Identity::hub(store_id)?,
        Who::Edge {
            store_id,
            terminal_id,
        } => Identity::edge(store_id, terminal_id)?,
        Who::Operator { name, role } => {
            let role = match role.as_str() {
                "operator" => Role::Operator,
                "viewer" => Role::Viewer,
                other => anyhow::bail!("--role {other:?}: use operator or viewer"),
            };
            Identity::operator(name.as_deref(), role)?
        }
    })
}

fn print_issued(dir: &std::path::Path, entry: &pki::IndexEntry) {
    let expires = pki::rfc3339(entry.not_after_unix);
    println!(
        "issued {name} (cn={cn}, role={role}, serial={serial}) expires {expires}: {pem}, {key} (0600)",
        name = entry.name,
        cn = entry.common_name,
        role = entry.role.as_str(),
        serial = entry.serial,
        pem = dir.join(format!("{}.pem", entry.name)).display(),
        key = dir.join(format!("{}.key", entry.name)).display(),
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = &cli.dir;
    match &cli.command {
        Command::Init => {
            Pki::init(dir)?;
            println!(
                "created the root CA {} (key {}, keep it offline) and an empty {}",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display(),
                dir.join("crl.pem").display()
            );
        }
        Command::Issue { who, days, dns, ip } => {
            let pki =
                Pki::open(dir).with_context(|| format!("opening the CA in {}", dir.display()))?;
            let options = IssueOptions {
                validity_days: *days,
                dns_names: dns.clone(),
                ip_addresses: ip.clone(),
                ..IssueOptions::default()
            };
            let entry = pki.issue(&identity(who)?, &options)?;
            print_issued(dir, &entry);
        }
        Command::Fleet { stores, terminals } => {
            let pki = Pki::open_or_init(dir)?;
            let mut identities = vec![
                Identity::cloud(),
                Identity::broker(),
                Identity::database(),
                Identity::operator(None, Role::Operator)?,
                Identity::operator(Some("viewer"), Role::Viewer)?,
            ];
            for store in stores {
                identities.push(Identity::hub(store)?);
                for terminal in terminals {
                    identities.push(Identity::edge(store, terminal)?);
                }
            }
            // Certificates that exist are kept: reissuing would revoke the ones deployed.
            for identity in &identities {
                if dir.join(format!("{}.pem", identity.name)).exists() {
                    println!("kept {} (it exists; `issue` replaces it)", identity.name);
                    continue;
                }
                let entry = pki.issue(identity, &IssueOptions::default())?;
                print_issued(dir, &entry);
            }
        }
        Command::Revoke { name } => {
            let pki = Pki::open(dir)?;
            let serial = pki.revoke(name)?;
            println!(
                "revoked {name} (serial {serial}); distribute {} to every tier",
                dir.join("crl.pem").display()
            );
        }
        Command::Crl => {
            Pki::open(dir)?.refresh_crl()?;
            println!("signed {} again", dir.join("crl.pem").display());
        }
        Command::List => {
            let pki = Pki::open(dir)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for entry in pki.list()? {
                let state = match entry.revoked_at_unix {
                    Some(_) => "revoked",
                    None if entry.not_after_unix < now => "expired",
                    None => "valid",
                };
                let expires = pki::rfc3339(entry.not_after_unix);
                println!(
                    "{state:8} {name:32} cn={cn} role={role} serial={serial} expires={expires}",
                    name = entry.name,
                    cn = entry.common_name,
                    role = entry.role.as_str(),
                    serial = entry.serial,
                );
            }
        }
    }
    Ok(())
}
