//! The CA side: creating the root, issuing certificates, revoking them.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::{Identity, PkiError};

/// The root CA's common name.
pub const CA_COMMON_NAME: &str = "facepay fleet root CA";
/// The organization in every subject.
pub const ORGANIZATION: &str = "facepay";
/// How long the root CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a revocation list is valid before relying parties should fetch a newer one.
pub const CRL_VALIDITY_DAYS: i64 = 30;

/// How a certificate is issued.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// Days from `not_before` to expiry.
    pub validity_days: i64,
    /// DNS names the holder serves under (besides `localhost`).
    pub dns_names: Vec<String>,
    /// Addresses the holder serves under (besides 127.0.0.1 and ::1).
    pub ip_addresses: Vec<IpAddr>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            not_before: OffsetDateTime::now_utc() - Duration::minutes(5),
            validity_days: 397,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
        }
    }
}

/// One issued certificate, as `index.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// File stem.
    pub name: String,
    /// Subject common name.
    pub common_name: String,
    /// Role (organizational unit).
    pub role: crate::Role,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: i64,
    /// When it was revoked, Unix seconds.
    pub revoked_at_unix: Option<i64>,
}

/// A PKI directory with its CA loaded, able to issue and revoke.
pub struct Pki {
    dir: PathBuf,
    ca_key: KeyPair,
    ca_cert: rcgen::Certificate,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Writes a file readable by its owner only.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(PkiError::io(path))?;
    // An existing file keeps its mode through `open`: set it explicitly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(PkiError::io(path))?;
    }
    file.write_all(contents).map_err(PkiError::io(path))?;
    file.sync_all().map_err(PkiError::io(path))
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    // Written beside and renamed, so that a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(PkiError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(PkiError::io(path))
}

fn random_serial() -> SerialNumber {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    // Positive and without a leading zero byte, so that it encodes as these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Pki {
    /// Creates a new root CA in `dir` (made if missing) with an empty revocation list. Refuses
    /// to replace an existing CA: every certificate of the fleet hangs on it.
    pub fn init(dir: &Path) -> Result<Self, PkiError> {
        let ca_pem = dir.join("ca.pem");
        if ca_pem.exists() {
            return Err(PkiError::Invalid(format!(
                "{} exists: this directory already has a CA",
                ca_pem.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(PkiError::io(dir))?;
        let ca_key = KeyPair::generate()?;
        let mut params = ca_params();
        params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
        params.not_after = params.not_before + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let ca_cert = params.self_signed(&ca_key)?;
        write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
        write_public(&ca_pem, ca_cert.pem().as_bytes())?;
        let pki = Pki {
            dir: dir.to_owned(),
            ca_key,
            ca_cert,
        };
        pki.write_index(&[])?;
        pki.write_crl(&[])?;
        Ok(pki)
    }

    /// Opens the CA of an existing PKI directory.
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        let key_path = dir.join("ca.key");
        crate::check_key_permissions(&key_path)?;
        let pem = std::fs::read_to_string(&key_path).map_err(PkiError::io(&key_path))?;
        let ca_key =
            KeyPair::from_pem(&pem).map_err(|e| PkiError::bad(&key_path, e.to_string()))?;
        // The issuer of new certificates is rebuilt from the same subject and key: children chain
        // to the stored ca.pem by subject name and key identifier.
        let ca_cert = ca_params().self_signed(&ca_key)?;
        Ok(Pki {
            dir: dir.to_owned(),
            ca_key,
            ca_cert,
        })
    }

    /// Opens the PKI in `dir`, creating it first if it has no CA yet.
    pub fn open_or_init(dir: &Path) -> Result<Self, PkiError> {
        if dir.join("ca.pem").exists() {
            Self::open(dir)
        } else {
            Self::init(dir)
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a certificate for `identity` and writes `<name>.pem` and `<name>.key` (0600). An
    /// earlier certificate of that name is revoked (crl.pem rewritten).
    pub fn issue(
        &self,
        identity: &Identity,
        options: &IssueOptions,
    ) -> Result<IndexEntry, PkiError> {
        let mut index = self.list()?;
        // One name, one identity: `edge-a-b-c` could be store a's terminal b-c or store a-b's
        // terminal c; the second to ask is refused rather than overwriting the first's files.
        if let Some(other) = index
            .iter()
            .find(|e| e.name == identity.name && !identity.owns_common_name(&e.common_name))
        {
            return Err(PkiError::Invalid(format!(
                "{} already names the certificate of {:?}; choose other ids",
                identity.name, other.common_name
            )));
        }
        let key = KeyPair::generate()?;
        let serial = random_serial();
        let common_name = match identity.role {
            crate::Role::Edge => {
                format!("{}:{}", identity.common_name, &hex(serial.as_ref())[..12])
            }
            _ => identity.common_name.clone(),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name.as_str());
        dn.push(DnType::OrganizationalUnitName, identity.role.as_str());
        dn.push(DnType::OrganizationName, ORGANIZATION);
        params.distinguished_name = dn;
        params.not_before = options.not_before;
        params.not_after = options.not_before + Duration::days(options.validity_days);
        params.serial_number = Some(serial.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Operators are only ever clients: their certificates cannot serve TLS.
        params.extended_key_usages = match identity.role {
            crate::Role::Operator | crate::Role::Viewer => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        let mut sans = vec![SanType::DnsName("localhost".try_into()?)];
        for name in &options.dns_names {
            sans.push(SanType::DnsName(name.as_str().try_into()?));
        }
        let mut ips: Vec<IpAddr> =
            vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        ips.extend(options.ip_addresses.iter().copied());
        sans.extend(ips.into_iter().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        write_private(
            &self.dir.join(format!("{}.key", identity.name)),
            key.serialize_pem().as_bytes(),
        )?;
        write_public(
            &self.dir.join(format!("{}.pem", identity.name)),
            cert.pem().as_bytes(),
        )?;
        let entry = IndexEntry {
            name: identity.name.clone(),
            common_name,
            role: identity.role,
            serial: hex(serial.as_ref()),
            not_after_unix: (options.not_before + Duration::days(options.validity_days))
                .unix_timestamp(),
            revoked_at_unix: None,
        };
        // The certificate this one replaces is revoked: its holder (a stolen terminal, say) keeps
        // no access after the replacement.
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut superseded = false;
        for earlier in index
            .iter_mut()
            .filter(|e| e.name == identity.name && e.revoked_at_unix.is_none())
        {
            earlier.revoked_at_unix = Some(now);
            superseded = true;
        }
        index.push(entry.clone());
        self.write_index(&index)?;
        if superseded {
            self.write_crl(&index)?;
        }
        Ok(entry)
    }

    /// Issues a certificate for `identity` unless its files exist already.
    pub fn ensure(&self, identity: &Identity, options: &IssueOptions) -> Result<(), PkiError> {
        let pem = self.dir.join(format!("{}.pem", identity.name));
        let key = self.dir.join(format!("{}.key", identity.name));
        if pem.exists() && key.exists() {
            return Ok(());
        }
        self.issue(identity, options).map(|_| ())
    }

    /// Revokes the current certificate of `name` (the one in `<name>.pem`) and rewrites
    /// `crl.pem`. Returns the revoked serial. Revoking twice is harmless.
    pub fn revoke(&self, name: &str) -> Result<String, PkiError> {
        let pem_path = self.dir.join(format!("{name}.pem"));
        let der = crate::load::read_certs(&pem_path)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::bad(&pem_path, "holds no certificate"))?;
        let serial = crate::load::serial_of(&der, &pem_path)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut index = self.list()?;
        match index.iter_mut().find(|e| e.serial == serial) {
            Some(entry) => {
                entry.revoked_at_unix.get_or_insert(now);
            }
            None => {
                return Err(PkiError::Invalid(format!(
                    "{} was not issued by this PKI (serial {serial} is not in index.json)",
                    pem_path.display()
                )))
            }
        }
        self.write_index(&index)?;
        self.write_crl(&index)?;
        Ok(serial)
    }

    /// Signs the revocation list again with a new number and validity: relying parties that
    /// check `next_update` (Mosquitto) refuse an expired list, so re-sign it well within
    /// [`CRL_VALIDITY_DAYS`] (monthly from cron, say) even when nothing was revoked.
    pub fn refresh_crl(&self) -> Result<(), PkiError> {
        self.write_crl(&self.list()?)
    }

    /// Every certificate issued, oldest first.
    pub fn list(&self) -> Result<Vec<IndexEntry>, PkiError> {
        let path = self.dir.join("index.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| PkiError::bad(&path, e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(PkiError::io(&path)(e)),
        }
    }

    fn write_index(&self, index: &[IndexEntry]) -> Result<(), PkiError> {
        let text = serde_json::to_vec_pretty(index).expect("index serializes");
        write_public(&self.dir.join("index.json"), &text)
    }

    fn write_crl(&self, index: &[IndexEntry]) -> Result<(), PkiError> {
        self.write_crl_valid_for(index, Duration::days(CRL_VALIDITY_DAYS))
    }

    /// Writes the list with `validity` from now to its next update (tests make stale lists).
    pub(crate) fn write_crl_valid_for(
        &self,
        index: &[IndexEntry],
        validity: Duration,
    ) -> Result<(), PkiError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = index
            .iter()
            .filter_map(|e| {
                let at = e.revoked_at_unix?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&e.serial)?),
                    revocation_time: OffsetDateTime::from_unix_timestamp(at).ok()?,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect();
        // Relying parties keep only a list numbered above theirs: always count up, also for two
        // revocations within one millisecond.
        let previous = std::fs::read(self.dir.join("crl.pem"))
            .ok()
            .and_then(|pem| {
                crate::RevocationList::parse(
                    &pem,
                    &self.dir.join("crl.pem"),
                    &self.dir.join("ca.pem"),
                )
                .ok()
            })
            .map(|list| {
                list.number.iter().fold(0u64, |n, b| {
                    n.saturating_mul(256).saturating_add(u64::from(*b))
                })
            })
            .unwrap_or(0);
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as u64;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + validity,
            crl_number: SerialNumber::from(now_ms.max(previous + 1)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.ca_cert, &self.ca_key)?;
        write_public(&self.dir.join("crl.pem"), crl.pem()?.as_bytes())
    }
}
