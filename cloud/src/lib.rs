//! The facepay cloud: the account system of record.
//!
//! It keeps the double-entry ledger ([`ledger`]), serves store hubs over MQTT (authorize, void,
//! key sync) and distributes account public keys to them, and offers an admin HTTP API with
//! Prometheus metrics. See `README.md` in this folder for the actors and their messages.

mod api;
pub mod bounded;
pub mod config;
pub mod customers;
#[cfg(test)]
mod engines;
pub mod enroll;
mod error;
pub mod hub_link;
pub mod identity;
pub mod leases;
pub mod ledger;
pub mod ledger_actor;
pub mod payer;
pub mod revocation;
pub mod sd;

use std::net::SocketAddr;

use actix::prelude::*;
use anyhow::Context as _;
use prometheus::Registry;

pub use config::CloudConfig;
pub use error::LedgerError;

use crate::{
    hub_link::{HubLinkActor, LinkEventMsg},
    ledger_actor::LedgerActor,
};

/// A running cloud.
pub struct CloudHandle {
    /// Where the HTTPS admin API listens (operator certificates only).
    pub admin_addr: SocketAddr,
    /// Where the HTTPS enrollment API listens.
    pub api_addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    /// The CA clients of the HTTPS APIs must trust.
    pub ca_cert: std::path::PathBuf,
    /// The file holding the enrollment API's operator token.
    pub api_token: std::path::PathBuf,
    /// When the cloud's certificate expires (RFC 3339).
    pub cert_expires: String,
    /// The ledger actor, for in-process callers (the fleet demo).
    pub ledger: crate::bounded::Bounded<LedgerActor>,
    servers: Vec<actix_web::dev::ServerHandle>,
    link: Addr<HubLinkActor>,
    client: mqtt::Client,
    readiness: telemetry::Readiness,
    /// The task driving the hub link; it ends after the goodbye.
    driver: tokio::task::JoinHandle<()>,
}

impl CloudHandle {
    /// Stops gracefully: not ready any more; no hub request taken, those taken served; the
    /// stores' leases released (another instance takes them at once, not when they lapse);
    /// goodbye to the broker (MQTT DISCONNECT); the HTTP APIs and metrics drained (requests in
    /// flight answered).
    pub async fn stop(self) {
        self.readiness.stopping();
        let held = self
            .link
            .send(hub_link::StopServing)
            .await
            .unwrap_or_default();
        if !held.is_empty() {
            let store_ids: Vec<protocol::StoreId> =
                held.iter().map(|h| h.store_id.as_str().into()).collect();
            match self.ledger.send(ledger_actor::ReleaseLeases(held)).await {
                Ok(()) => {
                    tracing::info!(stores = store_ids.len(), "stores' leases released");
                    // The other instances take those stores at once, not when their view of
                    // the leases runs out.
                    let released = protocol::encode(&protocol::LeasesReleased { store_ids });
                    let told = self.client.publish(
                        protocol::topics::lease_releases(),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        released,
                    );
                    match tokio::time::timeout(std::time::Duration::from_secs(2), told).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "telling the releases failed"),
                        Err(_) => tracing::warn!("the releases could not be queued"),
                    }
                }
                Err(error) => tracing::warn!(%error, "releasing the leases: ledger busy"),
            }
        }
        // Not waited for without end: with the broker gone, the client's queue never empties.
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.client.goodbye()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "disconnecting from the broker failed"),
            Err(_) => tracing::warn!("the goodbye could not be queued"),
        }
        if tokio::time::timeout(std::time::Duration::from_secs(2), self.driver)
            .await
            .is_err()
        {
            tracing::warn!("the broker did not take the goodbye in time");
        }
        for server in &self.servers {
            server.stop(true).await;
        }
        tracing::info!("cloud stopped");
    }

    /// The HTTP servers' handles, to stop them from elsewhere.
    pub fn server_handles(&self) -> Vec<actix_web::dev::ServerHandle> {
        self.servers.clone()
    }
}

/// How long a stopping cloud lets its APIs' requests in flight finish (an enrollment analyses
/// photos).
pub const API_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the cloud inside the current actix system.
pub async fn start(config: CloudConfig) -> anyhow::Result<CloudHandle> {
    pki::install_crypto_provider();
    // TLS first: a key file others can read, a revoked or expired certificate, stop the cloud
    // before it opens anything.
    let cloud_identity = config.identity();
    let tls_files = config.tls.files(&cloud_identity.name);
    let tls = std::sync::Arc::new(
        pki::TlsIdentity::load(&tls_files).context("loading the cloud's TLS identity")?,
    );
    if tls.identity.role != Some(pki::Role::Cloud) {
        anyhow::bail!(
            "{} is the certificate of {:?} ({:?}), not of the cloud",
            tls_files.cert.display(),
            tls.identity.common_name,
            tls.identity.role
        );
    }
    tracing::info!(expires = tls.expires(), "cloud certificate loaded");
    let registry = Registry::new();
    telemetry::register_process_metrics(&registry, "cloud");
    pki::register_expiry_gauge(&registry, "cloud", &tls);
    let metrics =
        telemetry::PaymentMetrics::register(&registry, "cloud", &[telemetry::DecisionPath::Online]);
    let connected = telemetry::register_gauge(
        &registry,
        "facepay_cloud_broker_connected",
        "1 while connected to the MQTT broker",
    );
    // Ready once connected to the broker: the database, the keys and the identity index are
    // open before anything is served.
    let readiness = telemetry::Readiness::new();
    readiness.require_gauge("broker", &connected);

    for (from, to) in storage::place_keys(&config.data_dir, &config.key_files())
        .map_err(|e| anyhow::anyhow!(e))?
    {
        tracing::info!(from = %from.display(), to = %to.display(), "key moved out of data_dir");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    // PostgreSQL over TLS: this instance's certificate, only the fleet's `database` trusted.
    let pg_tls = match config.database.tls {
        true => Some(storage::kv::PgTls(std::sync::Arc::new(
            tls.client_config_for(pki::Role::Database)?,
        ))),
        false => None,
    };
    let (ledger_location, customers_location) = (
        config.ledger_location().with_tls(pg_tls.clone()),
        config.customers_location().with_tls(pg_tls),
    );
    let key_path = config.template_key_path();
    // Opened off the async thread: PostgreSQL's client blocks on a runtime of its own, which
    // cannot start inside actix's.
    let (ledger, store) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let ledger = ledger::Ledger::open_at(&ledger_location)
            .with_context(|| format!("opening the ledger at {ledger_location}"))?;
        let store = customers::CustomerStore::open_at(&customers_location, &key_path)
            .with_context(|| format!("opening the customer store at {customers_location}"))?;
        Ok((ledger, store))
    })
    .await
    .expect("opening does not panic")?;
    let ledger = ledger
        .with_offline_policy(config.offline)
        .with_pending_ttl(config.pending_transfer_ttl_seconds * 1000);
    // Terminals' attestations are opened against the CA and the revocation list in force.
    let payer = payer::PayerCheck::new(
        store.clone(),
        std::sync::Arc::new(tls.sealed_verifier()),
        (
            config.identity.one_to_one_threshold,
            config.identity.face_accept_threshold,
        ),
        paycode::Validity {
            window_ms: config.code_validity_seconds * 1000,
            clock_skew_ms: config.clock_skew_seconds * 1000,
        },
        ledger.clock(),
    );
    let offline_metrics = ledger_actor::OfflineMetrics::register(&registry);
    // In PostgreSQL several instances may share the ledger: each serves the stores whose lease
    // it holds (crate::leases).
    let lease_ttl_ms = config.fleet.lease_seconds * 1000;
    let leases = match config.database.backend {
        config::DatabaseBackend::Postgres => Some(
            ledger
                .leases(&cloud_identity.common_name, lease_ttl_ms)
                .context("opening the stores' leases")?,
        ),
        config::DatabaseBackend::Sled => None,
    };
    let ledger_clock = ledger.clock();
    let books_ledger = ledger.clone();
    let apart_ledger = ledger.clone();
    let actor_leases = leases.clone();
    let ledger = bounded::Bounded::new(
        SyncArbiter::start(1, move || {
            // One thread: one writer per instance.
            let actor = LedgerActor::new(ledger.clone(), payer.clone())
                .with_metrics(offline_metrics.clone());
            match &actor_leases {
                Some(leases) => actor.with_leases(leases.clone()),
                None => actor,
            }
        }),
        bounded::LEDGER_QUEUE,
    );

    // The books are added up at start and then every books_check_seconds: on sled on the ledger
    // thread (its one writer, between its writes); on PostgreSQL on a thread and a connection of
    // their own (one read is one snapshot), so that payments and lease renewals never wait
    // behind a read of every account.
    let books = ledger_actor::BooksMetrics::register(&registry);
    {
        let ledger = ledger.clone();
        let on_postgres = config.database.backend == config::DatabaseBackend::Postgres;
        let every = std::time::Duration::from_secs(config.books_check_seconds);
        actix::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let checked = if on_postgres {
                    let (books, ledger) = (books.clone(), books_ledger.clone());
                    tokio::task::spawn_blocking(move || books.check(&ledger))
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    ledger
                        .send(ledger_actor::CheckBooks(books.clone()))
                        .await
                        .map_err(|e| e.to_string())
                };
                match checked {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(%error, "checking the books failed"),
                    Err(error) => tracing::warn!(%error, "checking the books: not run"),
                }
            }
        });
    }

    let templates_gauge = telemetry::register_gauge(
        &registry,
        "facepay_cloud_identity_templates",
        "face templates in the identity index",
    );
    let index_path = config.data_dir.join("identity.faiss");
    if config.database.backend == config::DatabaseBackend::Postgres {
        // Other instances enrolled and erased while this one was away: its saved index may
        // hold as many templates as the database and still be another set. Built afresh.
        let _ = std::fs::remove_file(&index_path);
    }
    let identity_config = config.identity.clone();
    let actor = tokio::task::spawn_blocking(move || {
        enroll::IdentityActor::open(store, index_path, identity_config, templates_gauge)
    })
    .await
    .expect("opening does not panic")
    .context("opening the identity index")?;
    // Hubs' 1:N searches: a pool of threads reading the index at once, apart from the identity
    // thread (enrollment, erasure, syncs) and the ledger.
    let search_seconds = telemetry::register_histogram(
        &registry,
        "facepay_cloud_identity_search_seconds",
        "one 1:N search of the identity index for a hub's face",
        telemetry::LATENCY_BUCKETS_SECONDS,
    );
    let searcher = actor.searcher().with_search_seconds(search_seconds);
    let searchers = bounded::Bounded::new(
        SyncArbiter::start(config.identity.search_threads, move || searcher.clone()),
        bounded::IDENTITY_QUEUE,
    );
    let slot = std::sync::Mutex::new(Some(actor));
    // One thread: the store and the index have a single writer.
    let identity = bounded::Bounded::new(
        SyncArbiter::start(1, move || {
            slot.lock()
                .expect("not poisoned")
                .take()
                .expect("one identity thread")
        }),
        bounded::IDENTITY_QUEUE,
    );
    if config.database.backend == config::DatabaseBackend::Postgres {
        // Other instances enroll and erase too: this instance's index follows the change log.
        let identity = identity.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(enroll::INDEX_SYNC_INTERVAL);
            loop {
                tick.tick().await;
                match identity.send(enroll::SyncIndex).await {
                    Ok(Ok(0)) | Err(_) => {}
                    Ok(Ok(applied)) => tracing::info!(applied, "identity index synced"),
                    Ok(Err(error)) => tracing::warn!(%error, "syncing the identity index failed"),
                }
            }
        });
    }
    let engine =
        face::FaceEngine::load_default(config.face.clone()).context("loading the face models")?;
    let faces = face::worker::start_workers(std::sync::Arc::new(engine), config.face_threads);

    // A store's requests are its hub's, sealed with that hub's certificate key; the cloud hears
    // nothing else on the link.
    let (client, mqtt_link) = config.mqtt.connect(
        &tls,
        |topic| {
            // Another instance's word on the leases it released: a cloud certificate's.
            if topic == protocol::topics::lease_releases() {
                return Some(mqtt::Signer::cloud());
            }
            protocol::topics::store_of_request_topic(topic)
                .or_else(|| protocol::topics::store_of_presence_topic(topic))
                .map(mqtt::Signer::hub)
        },
        None,
    )?;
    let refused = telemetry::register_counter(
        &registry,
        "facepay_cloud_link_messages_refused_total",
        "messages heard on the hub link that the store's hub did not seal (forged, moved to \
         another store's topic, or from a revoked certificate), dropped unread",
    );
    let link_client = client.clone();
    let client_for_stop = client.clone();
    // A presence series for every store with a hub key, before any is heard.
    let known_stores = {
        let ledger = ledger.clone();
        match ledger.send(ledger_actor::HubKeyStores).await {
            Ok(Ok(stores)) => stores,
            Ok(Err(error)) => {
                tracing::warn!(%error, "reading the stores' hub keys failed");
                Vec::new()
            }
            Err(error) => {
                tracing::warn!(%error, "reading the stores' hub keys: ledger busy");
                Vec::new()
            }
        }
    };
    let presence = hub_link::StorePresence::register(&registry, &known_stores);
    let link = HubLinkActor::new(
        client,
        ledger.clone(),
        identity.clone(),
        searchers,
        metrics,
        connected,
    )
    .with_presence(presence);
    let link = match leases {
        Some(_) => link.with_leases(lease_ttl_ms, ledger_clock),
        None => link,
    }
    .start();
    let revocations = revocation::RevocationActor::new(
        tls.clone(),
        link_client,
        std::time::Duration::from_millis(config.crl_poll_interval_ms),
    )?
    .start();
    let link_events = link.clone();
    let goodbye_client = client_for_stop;
    let driver = actix::spawn(mqtt::drive(mqtt_link, move |event| {
        if let mqtt::LinkEvent::Refused { topic, reason } = &event {
            tracing::warn!(%topic, %reason, "unsealed message on the hub link dropped");
            refused.inc();
        }
        let link = link_events.clone();
        if event == mqtt::LinkEvent::Connected {
            revocations.do_send(revocation::Republish);
        }
        async move {
            let _ = link.send(LinkEventMsg(event)).await;
        }
    }));

    let link_for_stop = link.clone();
    let state = api::ApiState {
        ledger: ledger.clone(),
        link: link.clone(),
        apart: apart_ledger,
        statements: std::sync::Arc::new(tokio::sync::Semaphore::new(api::STATEMENTS_AT_ONCE)),
    };
    let (admin_addr, admin_server) = telemetry::serve_api(
        &config.admin_listen,
        Some(tls.server_config(pki::ClientAuth::Required)?),
        Some(api::operator_gate(tls.clone())),
        API_DRAIN,
        move |cfg| api::configure(cfg, state.clone()),
    )
    .with_context(|| format!("binding admin_listen {}", config.admin_listen))?;
    let token_digest = pki::token_digest(&config.api_token_path())?;
    let enroll_state = api::EnrollState {
        ledger: ledger.clone(),
        link,
        identity,
        faces,
    };
    let (api_addr, api_server) = telemetry::serve_api(
        &config.api_listen,
        Some(tls.server_config(pki::ClientAuth::Required)?),
        Some(api::enroll_gate(tls.clone(), token_digest)),
        API_DRAIN,
        move |cfg| api::configure_enroll(cfg, enroll_state.clone()),
    )
    .with_context(|| format!("binding api_listen {}", config.api_listen))?;
    let metrics_tls = match config.metrics.tls {
        true => Some(tls.server_config(pki::ClientAuth::None)?),
        false => None,
    };
    let (metrics_addr, metrics_server) =
        telemetry::serve_metrics(&config.metrics, registry, metrics_tls, readiness.clone())?;
    tracing::info!(%admin_addr, %api_addr, %metrics_addr, "cloud started");
    Ok(CloudHandle {
        admin_addr,
        api_addr,
        metrics_addr,
        ca_cert: tls_files.ca.clone(),
        api_token: config.api_token_path(),
        cert_expires: tls.expires(),
        ledger,
        servers: vec![admin_server, api_server, metrics_server],
        link: link_for_stop,
        client: goodbye_client,
        readiness,
        driver,
    })
}
