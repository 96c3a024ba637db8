//! Who is who: SPIFFE-style names carried in x509 certificates, and the identity file that
//! tctl and tsh use (`tctl auth sign --format file`, `DIR/admin.identity`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::util::valid_name;

/// Whether certificates issued at `issued_at` and valid before `valid_before` (Unix seconds)
/// are due for renewal at `now`: less than a third of their validity is left. The rule of
/// every daemon that renews its own certificates (gateways, device agents).
pub fn renewal_due(issued_at: u64, valid_before: u64, now: u64) -> bool {
    let total = valid_before.saturating_sub(issued_at);
    now + total / 3 >= valid_before
}

/// The kind of party an x509 certificate names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Principal {
    User(String),
    Device(String),
    Gateway(String),
    /// An administrator identity (tctl).
    Admin(String),
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate names no Edgeport identity (no spiffe:// URI SAN)")]
    NoSpiffe,
    #[error("invalid Edgeport identity {0:?}")]
    BadSpiffe(String),
    #[error("certificate belongs to cluster {got:?}, not {want:?}")]
    WrongCluster { got: String, want: String },
    #[error("cannot read identity file {path}: {err}")]
    Read { path: String, err: String },
    #[error("identity file {path} is not valid: {err}")]
    Parse { path: String, err: String },
}

impl Principal {
    pub fn name(&self) -> &str {
        match self {
            Principal::User(n)
            | Principal::Device(n)
            | Principal::Gateway(n)
            | Principal::Admin(n) => n,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Principal::User(_) => "user",
            Principal::Device(_) => "device",
            Principal::Gateway(_) => "gateway",
            Principal::Admin(_) => "admin",
        }
    }

    /// `spiffe://CLUSTER/KIND/NAME`
    pub fn spiffe(&self, cluster: &str) -> String {
        format!("spiffe://{cluster}/{}/{}", self.kind(), self.name())
    }

    /// Parses `spiffe://CLUSTER/KIND/NAME` into (cluster, principal).
    pub fn parse_spiffe(uri: &str) -> Result<(String, Principal), IdentityError> {
        let bad = || IdentityError::BadSpiffe(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (cluster, kind, name) = (
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
        );
        if parts.next().is_some() || !valid_name(cluster) || !valid_name(name) {
            return Err(bad());
        }
        let p = match kind {
            "user" => Principal::User(name.into()),
            "device" => Principal::Device(name.into()),
            "gateway" => Principal::Gateway(name.into()),
            "admin" => Principal::Admin(name.into()),
            _ => return Err(bad()),
        };
        Ok((cluster.to_string(), p))
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

/// The trust material of a cluster: what `tctl auth export` prints and what every client
/// and agent keeps beside its own certificates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaBundle {
    pub cluster: String,
    /// User SSH CA, one OpenSSH public key line (for sshd's `TrustedUserCAKeys`).
    pub user_ca: String,
    /// Host SSH CA, one OpenSSH public key line.
    pub host_ca: String,
    /// The x509 CA certificate, PEM.
    pub x509_ca_pem: String,
    /// `sha256:HEX` of the x509 CA's SubjectPublicKeyInfo.
    pub ca_pin: String,
    /// Hex ECDSA signature by the x509 CA key over [`CaBundle::signed_bytes`]: whoever trusts
    /// the x509 CA can trust the SSH CAs (see `ca_bundle`).
    #[serde(default)]
    pub signature: String,
}

/// Two bundles are equal when they name the same cluster and CAs. The signature is left out:
/// ECDSA signatures are randomised, so each authority start signs the same bundle differently.
impl PartialEq for CaBundle {
    fn eq(&self, other: &Self) -> bool {
        self.cluster == other.cluster
            && self.user_ca == other.user_ca
            && self.host_ca == other.host_ca
            && self.x509_ca_pem == other.x509_ca_pem
            && self.ca_pin == other.ca_pin
    }
}

impl Eq for CaBundle {}

impl CaBundle {
    /// The known_hosts lines that make OpenSSH trust every device host certificate: one per
    /// trusted host CA (two during a rotation), joined by newlines.
    pub fn known_hosts_line(&self, pattern: &str) -> String {
        crate::ca_bundle::key_lines(&self.host_ca)
            .map(|k| format!("@cert-authority {pattern} {k}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One file holding everything a client needs: the private key (Ed25519, used for both the
/// SSH and the x509 certificate), the certificates and the cluster's CAs. Written 0600.
#[derive(Clone, Serialize, Deserialize)]
pub struct IdentityFile {
    pub version: u32,
    pub principal: Principal,
    /// OpenSSH-format private key.
    pub ssh_private_key: String,
    /// OpenSSH certificate line (absent for admin identities).
    pub ssh_cert: Option<String>,
    /// x509 client certificate, PEM.
    pub x509_cert_pem: String,
    pub cas: CaBundle,
    /// The authority address this identity was made for, if known.
    pub auth_addr: Option<String>,
    /// The gateway (proxy) address, if known.
    pub proxy_addr: Option<String>,
}

impl IdentityFile {
    pub const VERSION: u32 = 1;

    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let data = std::fs::read_to_string(path).map_err(|e| IdentityError::Read {
            path: path.display().to_string(),
            err: e.to_string(),
        })?;
        serde_json::from_str(&data).map_err(|e| IdentityError::Parse {
            path: path.display().to_string(),
            err: e.to_string(),
        })
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::util::write_private(path, &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_in_the_last_third() {
        assert!(!renewal_due(0, 300, 199));
        assert!(renewal_due(0, 300, 200));
        assert!(renewal_due(0, 300, 400));
        assert!(!renewal_due(500, 300, 299));
        assert!(renewal_due(500, 300, 300));
    }

    #[test]
    fn spiffe_roundtrip() {
        let p = Principal::Device("van-42".into());
        let s = p.spiffe("edge");
        assert_eq!(s, "spiffe://edge/device/van-42");
        assert_eq!(Principal::parse_spiffe(&s).unwrap(), ("edge".into(), p));
        assert!(Principal::parse_spiffe("spiffe://edge/robot/x").is_err());
        assert!(Principal::parse_spiffe("spiffe://edge/user/a/b").is_err());
        assert!(Principal::parse_spiffe("https://edge/user/a").is_err());
    }
}

crate::debug_redacted!(IdentityFile { version, principal, ssh_cert, x509_cert_pem, cas, auth_addr, proxy_addr } secret { ssh_private_key });
