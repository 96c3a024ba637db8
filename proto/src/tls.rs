//! rustls configuration shared by every component: the ring provider, TLS 1.3 only,
//! certificates checked against the cluster's x509 CA (and a deferred client verifier for
//! servers that check the chain after the handshake), a pinned-CA verifier for first
//! contact (joins), and reading the SPIFFE identity out of a peer certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::identity::{IdentityError, Principal};
use crate::keys::ca_pin;

/// The name every authority certificate carries and every client checks.
pub const AUTHORITY_SERVER_NAME: &str = "authority.edgeport";
/// The name every gateway certificate carries and every agent and tsh checks.
pub const GATEWAY_SERVER_NAME: &str = "gateway.edgeport";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid certificate: {0}")]
    BadCert(String),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The ring crypto provider, with AES-128-GCM preferred. Call [`install_crypto_provider`] once
/// at start as well, so that libraries building their own configs use it too.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_aes128_first())
}

/// Installs [`provider`] as the process-wide default provider (idempotent).
pub fn install_crypto_provider() {
    let _ = ring_aes128_first().install_default();
}

/// ring's provider lists AES-256-GCM first, and the peers settle on the client's first choice.
/// Every byte of an SSH session crosses this layer twice (TLS or QUIC on each leg, around
/// SSH's own AES-128-GCM) and AES-256 costs 14 rounds per block against 10. AES-128-GCM is
/// TLS 1.3's mandatory suite. The rest of the order is kept, so ChaCha20-Poly1305 stays
/// available to peers that ask for it.
fn ring_aes128_first() -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    p
}

/// A client configuration (no client certificate) for a service that is not Edgeport's (a
/// PostgreSQL server, an identity provider): it trusts the certificates of the PEM file
/// `ca_file`, or without one the roots `system` returns (the OS store: the caller loads it,
/// so the device agent, which never needs it, does not carry the code).
pub fn external_client_config(
    ca_file: Option<&std::path::Path>,
    system: impl FnOnce() -> Vec<CertificateDer<'static>>,
) -> Result<ClientConfig, TlsError> {
    match ca_file {
        Some(path) => {
            let text = std::fs::read(path)
                .map_err(|e| TlsError::BadCert(format!("{}: {e}", path.display())))?;
            external_client_config_pem(Some(&text), system).map_err(|e| match e {
                TlsError::BadCert(e) => TlsError::BadCert(format!("{}: {e}", path.display())),
                other => other,
            })
        }
        None => external_client_config_pem(None, system),
    }
}

/// As [`external_client_config`], with the roots given as PEM text instead of a file.
pub fn external_client_config_pem(
    ca_pem: Option<&[u8]>,
    system: impl FnOnce() -> Vec<CertificateDer<'static>>,
) -> Result<ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    match ca_pem {
        Some(text) => {
            let bad = |e: &dyn std::fmt::Display| TlsError::BadCert(e.to_string());
            for c in pem::parse_many(text).map_err(|e| bad(&e))? {
                if c.tag() == "CERTIFICATE" {
                    store
                        .add(CertificateDer::from(c.contents().to_vec()))
                        .map_err(|e| bad(&e))?;
                }
            }
            if store.is_empty() {
                return Err(bad(&"holds no certificate"));
            }
        }
        None => {
            store.add_parsable_certificates(system());
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth())
}

/// The root store of the cluster's x509 CAs: `ca_der` is one DER certificate, or during an
/// x509 CA rotation several concatenated (see [`split_ders`]); a chain to any of them counts.
fn roots(ca_der: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for der in split_ders(ca_der)? {
        store.add(CertificateDer::from(der.to_vec()))?;
    }
    Ok(store)
}

/// Splits concatenated DER certificates (each one a SEQUENCE) into the certificates.
pub fn split_ders(mut ders: &[u8]) -> Result<Vec<&[u8]>, TlsError> {
    let bad = || TlsError::BadCert("malformed concatenated DER certificates".into());
    let mut out = Vec::new();
    while !ders.is_empty() {
        let (&tag, rest) = ders.split_first().ok_or_else(bad)?;
        if tag != 0x30 {
            return Err(bad());
        }
        let (&first, rest) = rest.split_first().ok_or_else(bad)?;
        let (len, hdr) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return Err(bad());
            }
            let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
            (len, 2 + n)
        };
        let end = hdr
            .checked_add(len)
            .filter(|e| *e <= ders.len())
            .ok_or_else(bad)?;
        out.push(&ders[..end]);
        ders = &ders[end..];
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// A certificate chain and its Ed25519 or ECDSA key (PKCS#8 DER).
pub struct CertKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8: Vec<u8>,
}

impl CertKey {
    /// Leaf certificate PEM plus the CA certificate PEM appended to the chain.
    pub fn from_pem(
        cert_pem: &str,
        ca_pem: Option<&str>,
        key_pkcs8: Vec<u8>,
    ) -> Result<Self, TlsError> {
        let mut chain = vec![CertificateDer::from(
            crate::keys::first_cert_der(cert_pem).map_err(|e| TlsError::BadCert(e.to_string()))?,
        )];
        if let Some(ca) = ca_pem {
            chain.push(CertificateDer::from(
                crate::keys::first_cert_der(ca).map_err(|e| TlsError::BadCert(e.to_string()))?,
            ));
        }
        Ok(Self { chain, key_pkcs8 })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }
}

/// How a server treats client certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the CA.
    Required,
    /// A client may present one; without one it is anonymous (joins, logins).
    Optional,
}

/// A TLS 1.3 server config presenting `me`, verifying client certificates against `ca_der`.
pub fn server_config(
    me: &CertKey,
    ca_der: &[u8],
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut cfg =
        server_builder(ca_der, client_auth)?.with_single_cert(me.chain.clone(), me.key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// As [`server_config`], with the certificate chosen per connection by `resolver` (the
/// gateway serves a public certificate to browsers and first logins that ask for its public
/// name, and the cluster certificate to everyone else).
pub fn server_config_resolved(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    ca_der: &[u8],
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut cfg = server_builder(ca_der, client_auth)?.with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

fn server_builder(
    ca_der: &[u8],
    client_auth: ClientAuth,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_cert_verifier(ca_der, client_auth)?))
}

/// The verifier of client certificates issued by the cluster's x509 CA (`ca_der`): in the
/// handshake of every Edgeport ALPN, and after it for the gateway's Kubernetes front door.
pub fn client_cert_verifier(
    ca_der: &[u8],
    client_auth: ClientAuth,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_der)?), provider());
    match client_auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// A verifier that asks for a client certificate but accepts any (or none), checking only
/// the handshake signature, so the client holds the key. For servers that check the chain
/// after the handshake with [`client_cert_verifier`], to answer a bad certificate with a
/// reason instead of a bare TLS alert (the gateway's Kubernetes front door).
pub fn deferred_client_cert_verifier() -> Arc<dyn ClientCertVerifier> {
    Arc::new(DeferredClientCert {
        provider: provider(),
    })
}

#[derive(Debug)]
struct DeferredClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for DeferredClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: Go clients (kubectl) then send their certificate whatever its issuer,
        // so a wrong one is reported after the handshake.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A chain and key ready to be served by a certificate resolver.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    Ok(Arc::new(rustls::sign::CertifiedKey::from_der(
        chain,
        key,
        &provider(),
    )?))
}

/// A TLS 1.3 client config that trusts only `ca_der` and presents `me` if given.
pub fn client_config(
    ca_der: &[u8],
    me: Option<&CertKey>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?);
    finish_client(builder, me, alpn)
}

fn finish_client(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    me: Option<&CertKey>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let mut cfg = match me {
        Some(me) => builder.with_client_auth_cert(me.chain.clone(), me.key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// A TLS 1.3 client config for first contact: the server must send a CA certificate in its
/// chain whose public key hashes to `pin`, and its leaf must chain to that CA.
pub fn pinned_client_config(
    pin: &str,
    me: Option<&CertKey>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        pin: pin.to_string(),
        provider: provider(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    finish_client(builder, me, alpn)
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_pin(c.as_ref()).ok().as_deref() == Some(self.pin.as_str()))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA does not match the CA pin {} (wrong --ca-pin, or not an Edgeport cluster)",
                    self.pin
                ))
            })?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(ca.as_ref()).map_err(|e| rustls::Error::General(e.to_string()))?),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SPIFFE identity in a (verified) peer certificate, checked against `cluster`.
pub fn peer_principal(cert_der: &[u8], cluster: &str) -> Result<Principal, TlsError> {
    let (got, p) = spiffe_of(cert_der)?;
    if got != cluster {
        return Err(IdentityError::WrongCluster {
            got,
            want: cluster.to_string(),
        }
        .into());
    }
    Ok(p)
}

/// The (cluster, principal) named by a certificate's URI SAN.
pub fn spiffe_of(cert_der: &[u8]) -> Result<(String, Principal), TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCert(e.to_string()))?
        .ok_or(IdentityError::NoSpiffe)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if uri.starts_with("spiffe://") {
                return Ok(Principal::parse_spiffe(uri)?);
            }
        }
    }
    Err(IdentityError::NoSpiffe.into())
}

/// Checks a client certificate as the authority sees it when a gateway hands one over: signed
/// by the cluster's x509 CA (`ca_der`), valid for client authentication at `now` (Unix
/// seconds), naming a principal of `cluster`. Returns the principal and the certificate's
/// notBefore.
pub fn verify_client_cert(
    cert_der: &[u8],
    ca_der: &[u8],
    cluster: &str,
    now: u64,
) -> Result<(Principal, u64), TlsError> {
    use x509_parser::prelude::*;
    let cas: Vec<CertificateDer<'_>> = split_ders(ca_der)?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let anchors = cas
        .iter()
        .map(|ca| {
            webpki::anchor_from_trusted_cert(ca)
                .map_err(|e| TlsError::BadCert(format!("the cluster's CA: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = CertificateDer::from(cert_der);
    let ee =
        webpki::EndEntityCert::try_from(&leaf).map_err(|e| TlsError::BadCert(format!("{e:?}")))?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
    ee.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &anchors,
        &[],
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => TlsError::BadCert("the certificate expired".into()),
        webpki::Error::CertNotValidYet { .. } => {
            TlsError::BadCert("the certificate is not valid yet".into())
        }
        webpki::Error::UnknownIssuer
        | webpki::Error::InvalidSignatureForPublicKey
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            TlsError::BadCert("the certificate is not signed by this cluster's CA".into())
        }
        other => TlsError::BadCert(format!("{other:?}")),
    })?;
    let principal = peer_principal(cert_der, cluster)?;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    Ok((
        principal,
        cert.validity().not_before.timestamp().max(0) as u64,
    ))
}

/// The certificate's notBefore and notAfter, Unix seconds.
pub fn validity(cert_der: &[u8]) -> Result<(u64, u64), TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

/// The raw Ed25519 public key a certificate certifies (users' certificates carry one).
pub fn ed25519_key_of(cert_der: &[u8]) -> Result<[u8; 32], TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    let spki = cert.public_key();
    // id-Ed25519, RFC 8410.
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return Err(TlsError::BadCert(
            "the certificate's key is not Ed25519".into(),
        ));
    }
    <[u8; 32]>::try_from(spki.subject_public_key.data.as_ref())
        .map_err(|_| TlsError::BadCert("the certificate's Ed25519 key is malformed".into()))
}

/// The certificate's notAfter, Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Result<u64, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| TlsError::BadCert(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp().max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_roots_come_from_the_pem_file_or_the_system() {
        let dir = std::env::temp_dir().join(format!("edgeport-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, cert.pem()).unwrap();
        let mut asked = false;
        assert!(external_client_config(Some(&good), || {
            asked = true;
            Vec::new()
        })
        .is_ok());
        assert!(
            !asked,
            "the system's roots were loaded although a file was given"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = external_client_config(Some(&empty), Vec::new).unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        assert!(external_client_config(Some(&dir.join("missing.pem")), Vec::new).is_err());
        assert!(external_client_config(None, || vec![cert.der().clone()]).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn aes128_gcm_is_offered_first_and_nothing_is_dropped() {
        let ours = provider();
        let first13 = ours
            .cipher_suites
            .iter()
            .find(|s| s.version() == &rustls::version::TLS13)
            .map(|s| s.suite());
        assert_eq!(first13, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        let mut got: Vec<_> = ours.cipher_suites.iter().map(|s| s.suite()).collect();
        let mut want: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        got.sort_by_key(|s| u16::from(*s));
        want.sort_by_key(|s| u16::from(*s));
        assert_eq!(got, want);
    }
}
