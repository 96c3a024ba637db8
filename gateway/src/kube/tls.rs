//! TLS for the Kubernetes front door (ALPN `h2`/`http/1.1` on the TCP port).
//!
//! The handshake asks for a client certificate but accepts any (it still checks the
//! handshake signature, so the client holds the key); the chain is checked afterwards against
//! the cluster CA by the same webpki verifier the other ALPNs use in the handshake. That way
//! a certificate from another CA, an expired one or none at all gets an HTTP 401 with a
//! reason kubectl prints, instead of a bare TLS alert.

use std::sync::{Arc, Mutex};

use edgeport_proto::tls;
use rustls::server::danger::ClientCertVerifier;

use crate::identity::{IdentityCell, IdentityError};

/// ALPN ids of the front door.
pub const ALPNS: &[&[u8]] = &[edgeport_proto::alpn::H2, edgeport_proto::alpn::HTTP11];

/// The front door's server config and the strict verifier, for one gateway certificate.
#[derive(Clone)]
pub struct FrontTls {
    pub server: Arc<rustls::ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
}

/// Built once per gateway certificate (renewals make a new one).
pub struct TlsCache {
    identity: IdentityCell,
    built: Mutex<Option<(u64, FrontTls)>>,
}

impl TlsCache {
    pub fn new(identity: IdentityCell) -> Self {
        Self {
            identity,
            built: Mutex::new(None),
        }
    }

    pub fn get(&self) -> Result<FrontTls, IdentityError> {
        let ident = self.identity.get();
        let key = ident.issued_at ^ ident.valid_before.rotate_left(32);
        if let Ok(c) = self.built.lock() {
            if let Some((k, t)) = c.as_ref() {
                if *k == key {
                    return Ok(t.clone());
                }
            }
        }
        let me = ident.cert_key()?;
        // The strict check, after the handshake (see the module's documentation).
        let verifier = tls::client_cert_verifier(&ident.ca_der()?, tls::ClientAuth::Required)?;
        let mut server = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(tls_err)?
            .with_client_cert_verifier(tls::deferred_client_cert_verifier())
            .with_single_cert(
                me.chain.clone(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(me.key_pkcs8.clone().into()),
            )
            .map_err(tls_err)?;
        server.alpn_protocols = ALPNS.iter().map(|a| a.to_vec()).collect();
        let t = FrontTls {
            server: Arc::new(server),
            verifier,
        };
        if let Ok(mut c) = self.built.lock() {
            *c = Some((key, t.clone()));
        }
        Ok(t)
    }
}

fn tls_err(e: rustls::Error) -> IdentityError {
    IdentityError::Io(format!("TLS: {e}"))
}
