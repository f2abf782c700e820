//! The trust actor: owns the hub's Zenoh session and the revocation list it was opened with. When
//! the cloud pushes a newer revocation list (checked against the CA), it is kept on disk, and if
//! it revokes a terminal the hub still lets in, the Zenoh session is reopened without it: Zenoh's
//! TLS reads no revocation lists, so the access-control allow-list is how a revoked terminal is
//! refused.

use std::{future::Future, path::PathBuf, pin::Pin};

use actix::prelude::*;

use crate::uplink::UplinkEvent;

/// Opens the hub's Zenoh session allowing these terminals (certificate common names) and
/// declares its queryables on it.
pub type OpenZenoh =
    Box<dyn Fn(Vec<String>) -> Pin<Box<dyn Future<Output = anyhow::Result<zlink::ZenohLink>>>>>;

/// The revocation list in force at the hub, as PEM: what it relays to its terminals.
pub type ListInForce = std::sync::Arc<std::sync::RwLock<Vec<u8>>>;

/// Owns the Zenoh session and what it trusts.
pub struct TrustActor {
    store_id: String,
    /// The serial of the hub's own certificate.
    own_serial: String,
    in_force: ListInForce,
    files: pki::TlsFiles,
    pki_dir: PathBuf,
    /// The CRL number in force.
    number: Vec<u8>,
    allowed: Vec<String>,
    zenoh: Option<zlink::ZenohLink>,
    open: OpenZenoh,
    allowed_gauge: prometheus::IntGauge,
    /// The checks of the hub's own certificate identity (what it opens on the cloud link).
    identity_checks: Option<std::sync::Arc<pki::LiveClientVerifier>>,
    /// Closed for good: the hub is stopping ([`CloseTerminals`]).
    closed: bool,
}

impl TrustActor {
    /// An actor over an open session that allows `allowed`, under the list numbered `number`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store_id: String,
        own_serial: String,
        in_force: ListInForce,
        files: pki::TlsFiles,
        pki_dir: PathBuf,
        number: Vec<u8>,
        allowed: Vec<String>,
        zenoh: zlink::ZenohLink,
        open: OpenZenoh,
        allowed_gauge: prometheus::IntGauge,
    ) -> Self {
        allowed_gauge.set(allowed.len() as i64);
        TrustActor {
            store_id,
            own_serial,
            in_force,
            files,
            pki_dir,
            number,
            allowed,
            zenoh: Some(zenoh),
            open,
            allowed_gauge,
            identity_checks: None,
            closed: false,
        }
    }

    /// A newer list also applies at once to `checks`: the messages the hub opens on the cloud
    /// link (a revoked cloud certificate seals nothing the hub takes from then on).
    pub fn applying_to(mut self, checks: std::sync::Arc<pki::LiveClientVerifier>) -> Self {
        self.identity_checks = Some(checks);
        self
    }

    /// Checks a pushed list: the CA's and newer than the one in force, it is kept on disk and
    /// returned with the terminals to allow under it. Fails closed: when the terminals'
    /// certificates cannot be read, none is allowed.
    fn take(&mut self, pem: &str) -> Option<(pki::RevocationList, Vec<String>)> {
        let origin = std::path::Path::new("revocation list pushed by the cloud");
        let list = match pki::RevocationList::parse(pem.as_bytes(), origin, &self.files.ca) {
            Ok(list) => list,
            Err(error) => {
                tracing::warn!(%error, "revocation list refused");
                return None;
            }
        };
        if !list.newer_than(&self.number) {
            return None;
        }
        tracing::info!(
            revoked = list.serials.len(),
            "newer revocation list from the cloud"
        );
        // In force on the cloud link first: a list it cannot take is not taken at all (a later
        // push of the same list tries again).
        if let Some(checks) = &self.identity_checks {
            if let Err(error) = checks.update(&list) {
                tracing::error!(%error, "applying the revocation list to the cloud link failed");
                return None;
            }
        }
        // Relayed to the terminals at once, whatever happens to the file or the session.
        *self.in_force.write().expect("not poisoned") = list.pem.clone();
        // A list that revokes the hub's own certificate: terminals refuse its answers, so it
        // must take no request at all (it would act on it unheard). It serves no terminal.
        if list.serials.contains(&self.own_serial) {
            tracing::error!(
                "the revocation list revokes this hub's certificate: it serves no terminal"
            );
            return Some((list, Vec::new()));
        }
        let allowed = pki::terminal_common_names(&self.pki_dir, &self.store_id, &list.serials)
            .unwrap_or_else(|error| {
                tracing::error!(%error, "reading the terminals' certificates failed: none is allowed");
                Vec::new()
            });
        // Kept on disk so that a restart starts from it; written beside and renamed.
        let tmp = self.files.crl.with_extension("pushed");
        if let Err(error) =
            std::fs::write(&tmp, &list.pem).and_then(|_| std::fs::rename(&tmp, &self.files.crl))
        {
            tracing::error!(%error, file = %self.files.crl.display(), "keeping the revocation list failed; applied in memory only");
        }
        Some((list, allowed))
    }
}

impl Actor for TrustActor {
    type Context = Context<Self>;
}

/// Closes the terminals' Zenoh session for good (the hub is stopping, and has answered the
/// queries it took): no terminal reaches the hub from then on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseTerminals;

impl Handler<CloseTerminals> for TrustActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: CloseTerminals, _: &mut Self::Context) -> Self::Result {
        self.closed = true;
        self.allowed_gauge.set(0);
        let session = self.zenoh.take();
        // Closing blocks: not on this thread.
        Box::pin(
            async move {
                let _ = tokio::task::spawn_blocking(move || drop(session)).await;
            }
            .into_actor(self),
        )
    }
}

impl Handler<UplinkEvent> for TrustActor {
    type Result = ();

    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        let UplinkEvent::RevocationListPushed(pem) = msg else {
            return;
        };
        if self.closed {
            return;
        }
        let Some((list, allowed)) = self.take(&pem) else {
            return;
        };
        if allowed == self.allowed {
            self.number = list.number;
            return;
        }
        // The new session listens where the old one did: close the old one first (closing
        // blocks, so not on this thread). The store's terminals reconnect by themselves; their
        // queries in between fail fast, unsent.
        let old = self.zenoh.take();
        let reopen = (self.open)(allowed.clone());
        let store_id = self.store_id.clone();
        let work = async move {
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
            reopen.await
        };
        ctx.wait(work.into_actor(self).map(move |opened, actor, _| match opened {
            Ok(zenoh) => {
                tracing::warn!(store_id, terminals = allowed.len(), "zenoh reopened without revoked terminals");
                actor.allowed_gauge.set(allowed.len() as i64);
                actor.allowed = allowed;
                actor.zenoh = Some(zenoh);
                // In force only now: a list whose reopening failed is taken again when it comes
                // again (the cloud republishes on every reconnect).
                actor.number = list.number;
            }
            Err(error) => {
                // No session: no terminal can reach the hub. Safer than one a revoked terminal
                // could use; the hub must be restarted.
                tracing::error!(%error, "reopening zenoh failed: the hub serves no terminal");
                actor.allowed_gauge.set(0);
                actor.allowed = Vec::new();
            }
        }));
    }
}
