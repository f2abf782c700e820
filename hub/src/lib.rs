//! The facepay store hub.
//!
//! Edges reach it over Zenoh with [`protocol::AuthorizeRequest`]s; it verifies payment codes with
//! the account keys the cloud distributes (no cloud needed for that), refuses replays, asks the
//! cloud over MQTT to move the money, journals every decision durably in `sled`, and answers. See
//! `README.md` in this folder for the actors and their messages.

pub mod attempt;
pub mod book;
pub mod breaker;
pub mod config;
pub mod credentials;
pub mod edges;
mod error;
pub mod hotset;
pub mod journal;
pub mod offline;
pub mod payment;
pub mod trust;
pub mod uplink;
pub mod verify;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use actix::prelude::*;
use anyhow::Context as _;
use paycode::Validity;
use prometheus::Registry;

pub use config::HubConfig;
pub use error::HubError;

use crate::{
    credentials::CredentialsActor,
    hotset::HotSet,
    journal::Journal,
    offline::{OfflineActor, OfflineMetrics, OfflineSetup},
    payment::{PaymentActor, PaymentPeers, PaymentSettings},
    uplink::{LinkEventMsg, UplinkActor},
    verify::{VerifyActor, VerifyMetrics, VerifyPeers, VerifySettings},
};

/// A running hub.
pub struct HubHandle {
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    /// When the hub's certificate expires (RFC 3339).
    pub cert_expires: String,
    /// The payment actor.
    pub payment: Addr<PaymentActor>,
    /// The verification actor.
    pub verify: Addr<VerifyActor>,
    /// The public key this hub signs offline approvals with (register it at the cloud).
    pub hub_public_key: String,
    server: actix_web::dev::ServerHandle,
    trust: Addr<trust::TrustActor>,
    uplink: Addr<UplinkActor>,
    journal: journal::JournalWorker,
    readiness: telemetry::Readiness,
    /// The task driving the cloud link; it ends after the goodbye.
    link: tokio::task::JoinHandle<()>,
    /// Set when stopping: the terminals' queries are no longer taken.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// How long the payments being decided may take to finish.
    grace: Duration,
}

impl HubHandle {
    /// Stops gracefully: not ready any more; the terminals' queries no longer taken (one that
    /// comes now hears nothing, and nothing is decided for it); the payments being decided
    /// finished and answered (they wait at most `cloud_timeout_ms` for the cloud, then decide
    /// alone: the hub waits twice that and 5 s more); the terminals' session closed; the journal
    /// flushed; goodbye to the cloud (the store's presence "offline", then MQTT DISCONNECT: no
    /// last will); the metrics listener drained. What the hub approved offline waits in the
    /// journal for the next start.
    pub async fn stop(self) {
        self.readiness.stopping();
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.grace;
        loop {
            let deciding = self.payment.send(payment::InFlight).await.unwrap_or(0);
            if deciding == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(deciding, "stopping with payments still being decided");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The last answers are on their way before the session closes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.trust.send(trust::CloseTerminals).await;
        self.journal.run(|journal| journal.flush()).await;
        // Not waited for without end: with the broker gone, the client's queue never empties.
        if tokio::time::timeout(Duration::from_secs(2), self.uplink.send(uplink::Goodbye))
            .await
            .is_err()
        {
            tracing::warn!("the goodbye could not be queued");
        }
        if tokio::time::timeout(Duration::from_secs(2), self.link)
            .await
            .is_err()
        {
            tracing::warn!("the broker did not take the goodbye in time");
        }
        self.server.stop(true).await;
        tracing::info!("hub stopped");
    }

    /// The HTTP server's handle, to stop it from elsewhere.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.clone()
    }
}

/// Starts a hub inside the current actix system.
pub async fn start(config: HubConfig) -> anyhow::Result<HubHandle> {
    pki::install_crypto_provider();
    // TLS first: a key file others can read, a revoked or expired certificate, stop the hub
    // before it opens anything.
    let identity = config.identity()?;
    let tls_files = config.tls.files(&identity.name);
    let tls = pki::TlsIdentity::load(&tls_files)
        .with_context(|| format!("loading the hub's TLS identity {}", identity.name))?;
    if tls.identity.common_name != config.store_id || tls.identity.role != Some(pki::Role::Hub) {
        anyhow::bail!(
            "{} is the certificate of {:?} ({:?}), not of the hub of {}",
            tls_files.cert.display(),
            tls.identity.common_name,
            tls.identity.role,
            config.store_id
        );
    }
    let crl_pem = std::fs::read(&tls_files.crl)
        .with_context(|| format!("reading {}", tls_files.crl.display()))?;
    let revocations = pki::RevocationList::parse(&crl_pem, &tls_files.crl, &tls_files.ca)?;
    let terminals =
        pki::terminal_common_names(&config.tls.pki_dir, &config.store_id, &revocations.serials)?;
    if terminals.is_empty() {
        tracing::warn!(pki_dir = %config.tls.pki_dir.display(), store_id = config.store_id,
            "no valid terminal certificate (edge-<store>-*.pem) for this store: no terminal can reach the hub");
    }
    tracing::info!(
        expires = tls.expires(),
        terminals = terminals.len(),
        "hub certificate loaded"
    );
    let registry = Registry::new();
    telemetry::register_process_metrics(&registry, "hub");
    pki::register_expiry_gauge(&registry, "hub", &tls);
    let metrics =
        telemetry::PaymentMetrics::register(&registry, "hub", &telemetry::DecisionPath::BOTH);
    let connected = telemetry::register_gauge(
        &registry,
        "facepay_hub_broker_connected",
        "1 while connected to the MQTT broker",
    );

    let keys_gauge = telemetry::register_gauge(
        &registry,
        "facepay_hub_account_keys",
        "account keys held for offline code verification",
    );
    let keys_synced = telemetry::register_gauge(
        &registry,
        "facepay_hub_keys_synced",
        "1 once the account keys have been synced with the cloud since the hub started",
    );
    // Ready once connected to the broker with the keys synced; the journal and the hot
    // templates are open before anything is served.
    let readiness = telemetry::Readiness::new();
    readiness.require_gauge("broker", &connected);
    readiness.require_gauge("keys", &keys_synced);

    for (from, to) in storage::place_keys(&config.data_dir, &config.key_files())
        .map_err(|e| anyhow::anyhow!(e))?
    {
        tracing::info!(from = %from.display(), to = %to.display(), "key moved out of data_dir");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let path = config.data_dir.join("journal");
    let journal =
        Journal::open(&path).with_context(|| format!("opening journal at {}", path.display()))?;
    let clock = clock::system();
    let validity = Validity {
        window_ms: config.code_validity_seconds * 1000,
        clock_skew_ms: config.clock_skew_seconds * 1000,
    };
    // A journal created empty knows no nonce used before it: it refuses every code that could
    // have been presented before (a first start, or a hub that lost its disk).
    if journal.refuse_codes_issued_before(clock.now_ms())? {
        tracing::info!("a new journal: codes issued before this start are refused");
    }
    // Attempts the cloud may have received whose answer was never journaled (the hub stopped
    // while it waited, or could not journal the answer): each is voided before anything else.
    let recovered = journal.recover_attempts()?;
    if recovered > 0 {
        tracing::warn!(
            attempts = recovered,
            "attempts left undecided by the last run are voided"
        );
    }
    let held_conflicts = journal.conflicts()?;
    if !held_conflicts.is_empty() {
        tracing::warn!(
            conflicts = held_conflicts.len(),
            "offline approvals the cloud could not apply wait for an operator"
        );
    }
    let signing_path = config.signing_key_path();
    let seed = storage::key_file(&signing_path, true)
        .with_context(|| format!("reading the hub signing key {}", signing_path.display()))?;
    let signer = std::sync::Arc::new(paycode::hubsig::HubSigner::from_seed(&seed));
    let hub_public_key = signer.public_key_b64();
    let pending = journal.offline_entries()?;
    let offline_setup = OfflineSetup {
        store_id: config.store_id.as_str().into(),
        book: book::OfflineBook::new(&config.offline, journal.allowances()?, &pending),
        signer,
        journal: journal.clone(),
        drain_batch: config.offline.drain_batch,
        drain_interval: Duration::from_millis(config.offline.drain_interval_ms),
        metrics: OfflineMetrics::register(&registry, config.offline.store_ceiling_minor, &pending),
    };
    if !pending.is_empty() {
        tracing::info!(
            entries = pending.len(),
            "offline approvals wait for reconciliation"
        );
    }
    let journal_worker = journal::start_worker(journal.clone());

    let hot_path = config.data_dir.join("hotset");
    let hot = HotSet::open(
        &hot_path,
        &config.template_key_path(),
        config.hot_set_cap,
        &config.store_id,
    )
    .with_context(|| format!("opening the hot set at {}", hot_path.display()))?;
    tracing::info!(templates = hot.template_count(), "hot set loaded");
    let verify_metrics = VerifyMetrics::register(&registry);
    verify_metrics
        .hot_templates
        .set(hot.template_count() as i64);

    // The actors are wired once, each given the addresses it asks; the uplink's address exists
    // before it starts, so nothing is attached afterwards and nobody messages itself.
    let uplink_context = Context::<UplinkActor>::new();
    let uplink_addr = uplink_context.address();
    let credentials = CredentialsActor::new(
        clock.clone(),
        validity,
        &journal.keys()?,
        journal.key_version()?,
        journal_worker.clone(),
        Some(uplink_addr.clone()),
        keys_gauge,
    )
    .with_synced_gauge(keys_synced)
    .start();
    let offline = OfflineActor::new(
        clock.clone(),
        offline_setup,
        journal_worker.clone(),
        Some(uplink_addr.clone()),
    )
    .start();
    let payment = PaymentActor::new(
        PaymentSettings {
            clock: clock.clone(),
            store_id: config.store_id.clone(),
            validity,
            cloud_timeout: Duration::from_millis(config.cloud_timeout_ms),
        },
        PaymentPeers {
            journal: journal_worker.clone(),
            credentials: credentials.clone(),
            offline: offline.clone(),
            uplink: Some(uplink_addr.clone()),
        },
        metrics,
    )
    .start();
    let verify = VerifyActor::new(
        VerifySettings {
            store_id: config.store_id.clone(),
            identify: config.identify.clone(),
            identify_timeout: Duration::from_millis(config.identify_timeout_ms),
        },
        VerifyPeers {
            hot: hotset::start_worker(hot),
            credentials: credentials.clone(),
            journal: journal_worker.clone(),
            uplink: Some(uplink_addr.clone()),
        },
        verify_metrics,
        clock.clone(),
    )
    .start();

    let in_force: trust::ListInForce =
        std::sync::Arc::new(std::sync::RwLock::new(revocations.pem.clone()));
    // The store's terminals reach the hub over Zenoh; the trust actor owns the session and
    // reopens it when a revocation list from the cloud revokes one of them.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let open_zenoh: trust::OpenZenoh = {
        let zenoh_config = config.zenoh.clone();
        let services = edges::EdgeServices {
            store_id: config.store_id.clone(),
            payment: payment.clone(),
            verify: verify.clone(),
            signer: tls.reply_signer()?,
            in_force: in_force.clone(),
            rates: Arc::new(edges::TerminalRates::new(config.terminals.clone())),
            stopping: stopping.clone(),
        };
        let files = tls_files.clone();
        Box::new(move |allowed: Vec<String>| {
            // Each terminal asks on key expressions of its own id, and only its certificates
            // may: the id the hub reads from the key is the certificate's.
            let terminals = edges::terminals_of(&services.store_id, &allowed);
            let security = zlink::ZenohSecurity {
                files: files.clone(),
                grants: edges::grants(&services.store_id, &terminals),
            };
            let (zenoh_config, services) = (zenoh_config.clone(), services.clone());
            Box::pin(async move {
                let zenoh = tokio::task::spawn_blocking(move || {
                    zlink::ZenohLink::open(&zenoh_config, &security)
                })
                .await
                .expect("zenoh open does not panic")?;
                edges::serve(&zenoh, &services, &terminals).await?;
                Ok(zenoh)
            })
        })
    };
    let zenoh = open_zenoh(terminals.clone()).await?;
    let trust = trust::TrustActor::new(
        config.store_id.clone(),
        tls.identity.serial.clone(),
        in_force,
        tls_files.clone(),
        config.tls.pki_dir.clone(),
        revocations.number.clone(),
        terminals,
        zenoh,
        open_zenoh,
        telemetry::register_gauge(
            &registry,
            "facepay_hub_allowed_terminals",
            "terminals whose certificates may query this hub over Zenoh (valid, not revoked)",
        ),
    )
    .applying_to(tls.live_verifier())
    .start();

    // Everything the hub hears on the link is the cloud's, sealed with its certificate key.
    // Its last will tells the cloud the store is offline when the hub goes without a goodbye.
    let will = (
        protocol::topics::store_presence(&config.store_id),
        protocol::encode(&protocol::Presence { online: false }),
    );
    let (client, link) = config
        .mqtt
        .connect(&tls, |_| Some(mqtt::Signer::cloud()), Some(will))?;
    let refused = telemetry::register_counter(
        &registry,
        "facepay_hub_link_messages_refused_total",
        "messages heard on the cloud link that the cloud did not seal (forged, moved to another \
         topic, or from a revoked certificate), dropped unread",
    );
    let uplink = UplinkActor::new(
        config.store_id.as_str().into(),
        client,
        vec![
            credentials.recipient(),
            offline.recipient(),
            verify.clone().recipient(),
            trust.clone().recipient(),
        ],
        connected,
    )
    .with_metrics(uplink::UplinkMetrics::register(&registry));
    let uplink = uplink_context.run(uplink);
    let uplink_for_stop = uplink.clone();
    let link = actix::spawn(mqtt::drive(link, move |event| {
        if let mqtt::LinkEvent::Refused { topic, reason } = &event {
            tracing::warn!(%topic, %reason, "unsealed message on the cloud link dropped");
            refused.inc();
        }
        let uplink = uplink.clone();
        async move {
            let _ = uplink.send(LinkEventMsg(event)).await;
        }
    }));

    let metrics_tls = match config.metrics.tls {
        true => Some(tls.server_config(pki::ClientAuth::None)?),
        false => None,
    };
    let (metrics_addr, handle) =
        telemetry::serve_metrics(&config.metrics, registry, metrics_tls, readiness.clone())?;
    tracing::info!(store_id = config.store_id, %metrics_addr, "hub started");
    Ok(HubHandle {
        metrics_addr,
        cert_expires: tls.expires(),
        payment,
        verify,
        hub_public_key,
        server: handle,
        trust,
        uplink: uplink_for_stop,
        journal: journal_worker,
        readiness,
        link,
        stopping,
        grace: Duration::from_millis(config.cloud_timeout_ms * 2 + 5_000),
    })
}
