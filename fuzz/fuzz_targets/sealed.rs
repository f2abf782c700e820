//! A message heard on the MQTT link, as a hub opens it: whatever the bytes, opening never panics
//! and never takes a message the cloud did not seal; one the cloud sealed opens to its payload,
//! on its topic only.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

struct Fleet {
    _dir: std::path::PathBuf,
    cloud: pki::ReplySigner,
    hub: pki::SealedVerifier,
}

fn fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        pki::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("facepay-fuzz-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let authority = pki::Pki::init(&dir).expect("a PKI");
        for identity in [pki::Identity::cloud(), pki::Identity::hub("store-1").expect("a store")] {
            authority
                .issue(&identity, &pki::IssueOptions::default())
                .expect("issued");
        }
        let load = |name: &str| {
            let files = pki::TlsConfig {
                pki_dir: dir.clone(),
                ..pki::TlsConfig::default()
            }
            .files(name);
            pki::TlsIdentity::load(&files).expect("loads")
        };
        Fleet {
            cloud: load("cloud").reply_signer().expect("a signer"),
            hub: load("hub-store-1").sealed_verifier(),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fleet = fleet();
    let topic = "facepay/v1/stores/store-1/replies";
    // Forged bytes never open.
    assert!(fleet.hub.open(topic, data, &pki::Signer::cloud()).is_err());
    // The cloud's own seal opens to the payload, on its topic only.
    if std::str::from_utf8(data).is_ok() {
        let sealed = fleet.cloud.seal(topic, data.to_vec()).expect("sealed");
        let opened = fleet.hub.open(topic, &sealed, &pki::Signer::cloud());
        assert_eq!(opened.expect("opens"), data);
        let elsewhere = "facepay/v1/stores/store-2/replies";
        assert!(fleet.hub.open(elsewhere, &sealed, &pki::Signer::cloud()).is_err());
    }
});
