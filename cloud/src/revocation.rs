//! The revocation actor: watches the fleet's revocation list (`crl.pem`, rewritten by
//! `facepay-pki revoke`), applies a newer one to the admin API's client verifier at once, and
//! publishes it retained on MQTT for every hub (which reopens its Zenoh without the revoked
//! terminals).

use std::{sync::Arc, time::Duration};

use actix::prelude::*;
use mqtt::QoS;

/// Watches and distributes the revocation list.
pub struct RevocationActor {
    identity: Arc<pki::TlsIdentity>,
    client: mqtt::Client,
    poll_interval: Duration,
    /// The list in force: the one the cloud started with, or a newer one read since.
    current: pki::RevocationList,
}

impl RevocationActor {
    /// An actor distributing the list of `identity`'s files, checked every `poll_interval`.
    pub fn new(
        identity: Arc<pki::TlsIdentity>,
        client: mqtt::Client,
        poll_interval: Duration,
    ) -> Result<Self, pki::PkiError> {
        let files = &identity.files;
        let pem = std::fs::read(&files.crl).map_err(|source| pki::PkiError::Io {
            path: files.crl.clone(),
            source,
        })?;
        let current = pki::RevocationList::parse(&pem, &files.crl, &files.ca)?;
        Ok(RevocationActor {
            identity,
            client,
            poll_interval,
            current,
        })
    }

    /// Reads the file; a list the CA signed that is newer than the one in force replaces it.
    fn reload(&mut self) -> bool {
        let files = &self.identity.files;
        let list = std::fs::read(&files.crl)
            .map_err(|source| pki::PkiError::Io {
                path: files.crl.clone(),
                source,
            })
            .and_then(|pem| pki::RevocationList::parse(&pem, &files.crl, &files.ca));
        let list = match list {
            Ok(list) => list,
            Err(error) => {
                tracing::warn!(%error, "revocation list not reloaded");
                return false;
            }
        };
        if !list.newer_than(&self.current.number) {
            return false;
        }
        if let Err(error) = self.identity.update_revocations(&list) {
            tracing::error!(%error, "applying the revocation list failed");
            return false;
        }
        tracing::info!(
            revoked = list.serials.len(),
            "newer revocation list in force"
        );
        self.current = list;
        true
    }

    fn publish(&self, ctx: &mut Context<Self>) {
        let client = self.client.clone();
        let push = protocol::RevocationListPush {
            crl_pem: String::from_utf8_lossy(&self.current.pem).into_owned(),
        };
        ctx.spawn(
            async move {
                // Retained: a hub that connects later gets it at once.
                if let Err(error) = client
                    .publish(
                        protocol::topics::revocation_list(),
                        QoS::AtLeastOnce,
                        true,
                        protocol::encode(&push),
                    )
                    .await
                {
                    tracing::warn!(%error, "publishing the revocation list failed");
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for RevocationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.poll_interval, |actor, ctx| {
            if actor.reload() {
                actor.publish(ctx);
            }
        });
    }
}

/// The cloud (re)connected to the broker: publish the list in force again (a broker without
/// persistence forgets retained messages).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Republish;

impl Handler<Republish> for RevocationActor {
    type Result = ();
    fn handle(&mut self, _: Republish, ctx: &mut Self::Context) {
        self.reload();
        self.publish(ctx);
    }
}
