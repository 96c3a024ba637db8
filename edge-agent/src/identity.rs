//! The device's identity in its data dir (all files 0600, the dir 0700): one Ed25519 key
//! (SSH host key and x509 tunnel key), the SSH host certificate, the x509 tunnel certificate
//! and the cluster's CA bundle. Made at the first start (join), renewed over the tunnel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgeport_net::clock::now_secs;
use edgeport_proto::identity::CaBundle;
use edgeport_proto::keys::{first_cert_der, KeyPair};
use edgeport_proto::rpc::DeviceCerts;
use edgeport_proto::tls::{self, CertKey};
use edgeport_proto::util::write_private;
use serde::{Deserialize, Serialize};

pub const KEY_FILE: &str = "device.key";
pub const HOST_CERT_FILE: &str = "device-cert.pub";
pub const X509_FILE: &str = "device.crt";
pub const CAS_FILE: &str = "cas.json";
pub const META_FILE: &str = "device.json";
/// The stamp of the last tunnel attestation (see [`next_attest_stamp`]).
pub const ATTEST_STAMP_FILE: &str = "attest-stamp";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {err}")]
    Io { path: String, err: String },
    #[error("invalid identity in {dir}: {err}")]
    Invalid { dir: String, err: String },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    device_id: String,
    labels: BTreeMap<String, String>,
    valid_before: u64,
    issued_at: u64,
}

/// Everything the agent knows about itself.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    pub key: KeyPair,
    /// SSH host certificate line.
    pub host_cert: String,
    /// x509 tunnel certificate, PEM.
    pub x509_cert_pem: String,
    pub cas: CaBundle,
    pub valid_before: u64,
    pub issued_at: u64,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device_id", &self.device_id)
            .field("cluster", &self.cas.cluster)
            .field("valid_before", &self.valid_before)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// The tunnel client certificate (leaf only: the gateway has the CA).
    pub fn cert_key(&self) -> Result<CertKey, tls::TlsError> {
        CertKey::from_pem(&self.x509_cert_pem, None, self.key.pkcs8_der())
    }

    pub fn ca_der(&self) -> Result<Vec<u8>, IdentityError> {
        self.cas.x509_ca_der().map_err(|e| IdentityError::Invalid {
            dir: CAS_FILE.into(),
            err: e.to_string(),
        })
    }

    /// Less than a third of the certificates' validity is left.
    pub fn needs_renewal(&self, now: u64) -> bool {
        edgeport_proto::identity::renewal_due(self.issued_at, self.valid_before, now)
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Io {
        path: path.display().to_string(),
        err: e.to_string(),
    }
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Whether the device has joined (its identity files exist).
/// Checks a host certificate offered by a renewal: from our host CA, for our device id, for
/// our own key, and valid now.
pub fn check_host_certificate(
    current: &DeviceIdentity,
    cas: &CaBundle,
    line: &str,
) -> Result<(), HostCertRefused> {
    use edgeport_proto::sshcert::{check_host_cert, signer_of};
    use russh::keys::ssh_key::Certificate;
    let cert = Certificate::from_openssh(line.trim()).map_err(HostCertRefused::Unreadable)?;
    let host_cas = cas.host_cas();
    let ca = signer_of(&cert, &host_cas).ok_or(HostCertRefused::BadCa)?;
    check_host_cert(&cert, ca, &current.device_id, now_secs())
        .map_err(|e| HostCertRefused::Invalid(e.to_string()))?;
    if cert.public_key() != current.key.ssh_public().key_data() {
        return Err(HostCertRefused::OtherKey);
    }
    Ok(())
}

/// Why a renewed host certificate was not taken.
#[derive(Debug, thiserror::Error)]
pub enum HostCertRefused {
    #[error("unreadable host certificate: {0}")]
    Unreadable(russh::keys::ssh_key::Error),
    #[error("the CA bundle holds no readable host CA")]
    BadCa,
    #[error("host certificate: {0}")]
    Invalid(String),
    #[error("the host certificate is for another key")]
    OtherKey,
}

pub fn exists(dir: &Path) -> bool {
    file(dir, META_FILE).exists()
}

/// Loads the device key, making (and storing) one if there is none yet.
pub fn load_or_make_key(dir: &Path) -> Result<KeyPair, IdentityError> {
    edgeport_proto::util::create_private_dir(dir).map_err(|e| io_err(dir, e))?;
    let p = file(dir, KEY_FILE);
    if p.exists() {
        let pem = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
        return KeyPair::from_openssh(&pem).map_err(|e| io_err(&p, e));
    }
    let key = KeyPair::generate().map_err(|e| io_err(&p, e))?;
    let pem = key.to_openssh().map_err(|e| io_err(&p, e))?;
    write_private(&p, pem.as_bytes()).map_err(|e| io_err(&p, e))?;
    Ok(key)
}

/// Stores a rotated CA bundle (the certificates stay as they are).
pub fn store_cas(dir: &Path, cas: &CaBundle) -> Result<(), IdentityError> {
    let p = file(dir, CAS_FILE);
    let data = serde_json::to_vec_pretty(cas).map_err(|e| io_err(&p, e))?;
    write_private(&p, &data).map_err(|e| io_err(&p, e))
}

/// The stamp for the next tunnel attestation (`edgeport_proto::attest`): Unix milliseconds,
/// or one more than the last stamp when the clock is behind it (a board without a clock
/// that booted with an old time, a clock stepped back), so that this device's stamps only
/// grow and its newest tunnel is the one the authority keeps. Kept in the data dir; a stamp
/// that cannot be stored is used anyway (the next start may then repeat the clock's value).
pub fn next_attest_stamp(dir: &Path, now_ms: u64) -> u64 {
    let p = file(dir, ATTEST_STAMP_FILE);
    let last: u64 = std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let stamp = now_ms.max(last.saturating_add(1));
    if let Err(e) = write_private(&p, format!("{stamp}\n").as_bytes()) {
        tracing::warn!("cannot store the attestation stamp in {}: {e}", p.display());
    }
    stamp
}

/// Stores fresh certificates (join or renewal).
pub fn store(dir: &Path, certs: &DeviceCerts) -> Result<(), IdentityError> {
    let write = |name: &str, data: &[u8]| {
        let p = file(dir, name);
        write_private(&p, data).map_err(|e| io_err(&p, e))
    };
    write(
        HOST_CERT_FILE,
        format!("{}\n", certs.host_cert.trim()).as_bytes(),
    )?;
    write(X509_FILE, certs.x509_cert_pem.as_bytes())?;
    let cas = serde_json::to_vec_pretty(&certs.cas).map_err(|e| io_err(dir, e))?;
    write(CAS_FILE, &cas)?;
    let meta = Meta {
        device_id: certs.device_id.clone(),
        labels: certs.labels.clone(),
        valid_before: certs.valid_before,
        issued_at: now_secs(),
    };
    let meta = serde_json::to_vec_pretty(&meta).map_err(|e| io_err(dir, e))?;
    // Written last: its presence means the identity is complete.
    write(META_FILE, &meta)
}

/// Reads the identity and checks that the certificate names this device of this cluster.
pub fn load(dir: &Path) -> Result<DeviceIdentity, IdentityError> {
    let read = |name: &str| {
        let p = file(dir, name);
        std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))
    };
    let invalid = |err: String| IdentityError::Invalid {
        dir: dir.display().to_string(),
        err,
    };
    let meta: Meta = serde_json::from_str(&read(META_FILE)?).map_err(|e| invalid(e.to_string()))?;
    let cas: CaBundle =
        serde_json::from_str(&read(CAS_FILE)?).map_err(|e| invalid(e.to_string()))?;
    let key = load_or_make_key(dir)?;
    let x509_cert_pem = read(X509_FILE)?;
    let der = first_cert_der(&x509_cert_pem).map_err(|e| invalid(e.to_string()))?;
    match tls::peer_principal(&der, &cas.cluster) {
        Ok(edgeport_proto::identity::Principal::Device(id)) if id == meta.device_id => {}
        Ok(p) => return Err(invalid(format!("the certificate names {p}"))),
        Err(e) => return Err(invalid(e.to_string())),
    }
    Ok(DeviceIdentity {
        device_id: meta.device_id,
        labels: meta.labels,
        key,
        host_cert: read(HOST_CERT_FILE)?.trim().to_string(),
        x509_cert_pem,
        cas,
        valid_before: meta.valid_before,
        issued_at: meta.issued_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attestation_stamps_only_grow() {
        let dir = std::env::temp_dir().join(format!("edgeport-stamp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(next_attest_stamp(&dir, 5_000), 5_000);
        assert_eq!(next_attest_stamp(&dir, 6_000), 6_000);
        // The clock went back: one more than the last stamp, then the clock again once it
        // is ahead.
        assert_eq!(next_attest_stamp(&dir, 1_000), 6_001);
        assert_eq!(next_attest_stamp(&dir, 1_001), 6_002);
        assert_eq!(next_attest_stamp(&dir, 9_000), 9_000);
        // An unreadable stamp file counts as none.
        std::fs::write(dir.join(ATTEST_STAMP_FILE), "garbage").unwrap();
        assert_eq!(next_attest_stamp(&dir, 7), 7);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
