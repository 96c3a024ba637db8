//! An optional public certificate (`gateway start --cert FILE --key FILE`, for example from
//! Let's Encrypt) for users' first contact: `tsh login --proxy gw.example.com:3080` without a
//! CA pin verifies the gateway against the system's roots when the gateway presents a
//! certificate for the name tsh dialled. Everyone else (agents, tsh after login, the gateway's
//! own peers) asks for the cluster name `gateway.edgeport` and gets the cluster certificate,
//! so device tunnels never depend on a public CA.
//!
//! The files are read again whenever the gateway renews its cluster certificate, which picks
//! up a renewed public certificate without a restart.

use std::path::Path;
use std::sync::Arc;

use edgeport_proto::tls::GATEWAY_SERVER_NAME;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivateSec1KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::GatewayConfig;
/// Why the public certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PublicCertError {
    #[error("--cert and --key go together (the public certificate chain and its key)")]
    Unpaired,
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

fn bad(path: &Path, err: impl std::fmt::Display) -> PublicCertError {
    PublicCertError::File {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

/// Reads the public certificate chain and key named in the configuration, if any.
pub fn load(cfg: &GatewayConfig) -> Result<Option<Arc<CertifiedKey>>, PublicCertError> {
    let (cert_path, key_path) = match (&cfg.public_cert, &cfg.public_key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => return Ok(None),
        _ => return Err(PublicCertError::Unpaired),
    };
    let cert_text = std::fs::read_to_string(cert_path).map_err(|e| bad(cert_path, e))?;
    let key_text = std::fs::read_to_string(key_path).map_err(|e| bad(key_path, e))?;
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(&cert_text)
        .map_err(|e| bad(cert_path, e))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if chain.is_empty() {
        return Err(bad(cert_path, "no CERTIFICATE block"));
    }
    let key = pem::parse_many(&key_text)
        .map_err(|e| bad(key_path, e))?
        .into_iter()
        .find_map(|p| match p.tag() {
            "PRIVATE KEY" => Some(PrivateKeyDer::Pkcs8(p.into_contents().into())),
            "EC PRIVATE KEY" => Some(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(
                p.into_contents(),
            ))),
            "RSA PRIVATE KEY" => Some(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(
                p.into_contents(),
            ))),
            _ => None,
        })
        .ok_or_else(|| bad(key_path, "no PRIVATE KEY block (PKCS#8, SEC1 or PKCS#1)"))?;
    let ck = edgeport_proto::tls::certified_key(chain, key).map_err(|e| bad(key_path, e))?;
    ck.keys_match().map_err(|e| {
        bad(
            key_path,
            format!(
                "the key does not belong to the certificate in {}: {e}",
                cert_path.display()
            ),
        )
    })?;
    Ok(Some(ck))
}

/// Picks the certificate by the name the client asked for (SNI).
#[derive(Debug)]
pub struct SniResolver {
    pub cluster: Arc<CertifiedKey>,
    pub public: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) if !name.eq_ignore_ascii_case(GATEWAY_SERVER_NAME) => {
                Some(self.public.clone())
            }
            _ => Some(self.cluster.clone()),
        }
    }
}
