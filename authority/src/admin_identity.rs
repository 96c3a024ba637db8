//! `DATA/admin.identity`: the administrator identity tctl uses. Its key is made here, on the
//! authority's machine, and the file is written 0600. It is made at the first start and
//! refreshed only when missing, unreadable, from other CAs, or close to expiry, so a copy an
//! administrator took keeps working across restarts.

use std::path::Path;

use edgeport_net::clock::now_secs;
use edgeport_proto::identity::{IdentityFile, Principal};
use edgeport_proto::keys::{first_cert_der, KeyPair};
use edgeport_proto::tls::not_after;

use crate::ca::{CaError, CertAuthority, BACKDATE_SECS};

/// The administrator's name in its SPIFFE id (`spiffe://CLUSTER/admin/admin`).
pub const ADMIN_NAME: &str = "admin";
/// How long the administrator certificate is valid.
pub const ADMIN_CERT_TTL_SECS: u64 = 90 * 86400;
/// Refresh when the certificate has less than this left.
pub const REFRESH_BEFORE_SECS: u64 = 86400;

#[derive(Debug, thiserror::Error)]
pub enum AdminIdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot write {path}: {err}")]
    Write { path: String, err: String },
}

/// What [`ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Kept,
    /// Same key and certificate; only the recorded authority address changed.
    Readdressed,
    Issued,
}

fn still_good(ident: &IdentityFile, ca: &CertAuthority, now: u64) -> bool {
    ident.principal == Principal::Admin(ADMIN_NAME.to_string())
        && ident.cas == ca.bundle()
        && KeyPair::from_openssh(&ident.ssh_private_key).is_ok()
        && first_cert_der(&ident.x509_cert_pem)
            .ok()
            .and_then(|der| not_after(&der).ok())
            .is_some_and(|t| t > now + REFRESH_BEFORE_SECS)
}

/// Makes sure `path` holds a valid administrator identity for this CA and address.
pub fn ensure(
    ca: &CertAuthority,
    path: &Path,
    auth_addr: &str,
) -> Result<Outcome, AdminIdentityError> {
    let now = now_secs();
    let write = |ident: &IdentityFile| {
        ident.save(path).map_err(|e| AdminIdentityError::Write {
            path: path.display().to_string(),
            err: e.to_string(),
        })
    };
    if let Ok(mut ident) = IdentityFile::load(path) {
        if still_good(&ident, ca, now) {
            if ident.auth_addr.as_deref() == Some(auth_addr) {
                return Ok(Outcome::Kept);
            }
            ident.auth_addr = Some(auth_addr.to_string());
            write(&ident)?;
            return Ok(Outcome::Readdressed);
        }
    }
    let key = KeyPair::generate().map_err(CaError::from)?;
    let cert = ca.sign_x509_admin(
        ADMIN_NAME,
        &key.spki_der(),
        now.saturating_sub(BACKDATE_SECS),
        now + ADMIN_CERT_TTL_SECS,
    )?;
    let ident = IdentityFile {
        version: IdentityFile::VERSION,
        principal: Principal::Admin(ADMIN_NAME.to_string()),
        ssh_private_key: key.to_openssh().map_err(CaError::from)?,
        ssh_cert: None,
        x509_cert_pem: cert,
        cas: ca.bundle().clone(),
        auth_addr: Some(auth_addr.to_string()),
        proxy_addr: None,
    };
    write(&ident)?;
    Ok(Outcome::Issued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaKeys;

    #[test]
    fn issued_once_then_kept() {
        let d = tempfile::tempdir().unwrap();
        let ca = CertAuthority::new("edge", CaKeys::generate("edge").unwrap()).unwrap();
        let path = d.path().join("admin.identity");
        assert_eq!(ensure(&ca, &path, "127.0.0.1:1").unwrap(), Outcome::Issued);
        assert_eq!(ensure(&ca, &path, "127.0.0.1:1").unwrap(), Outcome::Kept);
        assert_eq!(
            ensure(&ca, &path, "127.0.0.1:2").unwrap(),
            Outcome::Readdressed
        );
        let ident = IdentityFile::load(&path).unwrap();
        assert_eq!(ident.auth_addr.as_deref(), Some("127.0.0.1:2"));
        let der = first_cert_der(&ident.x509_cert_pem).unwrap();
        assert_eq!(
            edgeport_proto::tls::peer_principal(&der, "edge").unwrap(),
            Principal::Admin("admin".into())
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another CA: reissued.
        let other = CertAuthority::new("edge", CaKeys::generate("edge").unwrap()).unwrap();
        assert_eq!(
            ensure(&other, &path, "127.0.0.1:2").unwrap(),
            Outcome::Issued
        );
    }
}
