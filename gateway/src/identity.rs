//! The gateway's own identity: an ECDSA P-256 key made here (never sent anywhere), the x509
//! certificate the authority issued for it and the cluster's CA bundle, all in the data dir.
//!
//! First start: join with a gateway token over a CA-pinned connection. Later starts load the
//! files; the certificate is renewed over the normal mTLS RPC when less than a third of its
//! validity is left.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgeport_net::clock::now_secs;
use edgeport_net::rpc_client::{unexpected, RpcClient, RpcClientError};
use edgeport_proto::identity::{CaBundle, Principal};
use edgeport_proto::keys::{first_cert_der, normalize_pin};
use edgeport_proto::rpc::{
    GatewayCerts, JoinGatewayRequest, RenewGatewayRequest, Request, Response,
};
use edgeport_proto::tls::{self, CertKey, ClientAuth, GATEWAY_SERVER_NAME};
use edgeport_proto::util::write_private;
use edgeport_proto::{alpn, rpc::RpcError};
use rcgen::PublicKeyData;
use serde::{Deserialize, Serialize};

use crate::config::GatewayConfig;

const KEY_FILE: &str = "gateway.key";
const CERT_FILE: &str = "gateway.crt";
const CAS_FILE: &str = "cas.json";
const META_FILE: &str = "gateway.json";
const RESET_KEY_FILE: &str = "quic-reset.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Io(String),
    #[error(
        "this gateway has not joined a cluster yet: start it once with --token and --ca-pin \
         (from `tctl tokens add --type gateway`)"
    )]
    NotJoined,
    #[error("--ca-pin {0:?} is not a valid CA pin (expected sha256:HEX)")]
    BadPin(String),
    #[error("joining the authority failed: {0}")]
    Join(RpcClientError),
    #[error("the authority refused to renew this gateway's certificate: {0}")]
    Renew(RpcClientError),
    #[error("invalid key or certificate in {dir}: {err}")]
    Invalid { dir: String, err: String },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// The identity in use, shared by every part of the gateway that needs it; a renewal swaps it
/// for all of them at once.
#[derive(Clone)]
pub struct IdentityCell(Arc<std::sync::RwLock<Arc<GatewayIdentity>>>);

impl IdentityCell {
    pub fn new(id: GatewayIdentity) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(id))))
    }

    pub fn get(&self) -> Arc<GatewayIdentity> {
        match self.0.read() {
            Ok(i) => i.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, id: GatewayIdentity) {
        match self.0.write() {
            Ok(mut i) => *i = Arc::new(id),
            Err(p) => *p.into_inner() = Arc::new(id),
        }
    }
}

/// What is stored beside the certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    gateway_id: String,
    valid_before: u64,
    issued_at: u64,
}

/// The loaded identity.
#[derive(Clone)]
pub struct GatewayIdentity {
    pub gateway_id: String,
    pub cert_pem: String,
    pub cas: CaBundle,
    pub valid_before: u64,
    pub issued_at: u64,
    key_pkcs8: Vec<u8>,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for GatewayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayIdentity")
            .field("gateway_id", &self.gateway_id)
            .field("cluster", &self.cas.cluster)
            .field("valid_before", &self.valid_before)
            .finish_non_exhaustive()
    }
}

impl GatewayIdentity {
    pub fn cluster(&self) -> &str {
        &self.cas.cluster
    }

    /// DER of the cluster's x509 CA certificate.
    pub fn ca_der(&self) -> Result<Vec<u8>, IdentityError> {
        self.cas.x509_ca_der().map_err(|e| IdentityError::Invalid {
            dir: "cas.json".into(),
            err: e.to_string(),
        })
    }

    /// Leaf + CA chain (agents on first contact find the CA in the chain and pin it). During
    /// an x509 CA rotation the chain carries both CAs, so a client pinning either finds it.
    pub fn cert_key(&self) -> Result<CertKey, IdentityError> {
        let mut ck = CertKey::from_pem(&self.cert_pem, None, self.key_pkcs8.clone())?;
        let cas = self
            .cas
            .x509_ca_ders()
            .map_err(|e| IdentityError::Invalid {
                dir: "cas.json".into(),
                err: e.to_string(),
            })?;
        ck.chain
            .extend(cas.into_iter().map(rustls::pki_types::CertificateDer::from));
        Ok(ck)
    }

    /// TLS server config for one of the gateway's ports; with a public certificate, clients
    /// that ask for another name than the cluster's get that one.
    pub fn server_config(
        &self,
        alpns: &[&[u8]],
        public: Option<&Arc<rustls::sign::CertifiedKey>>,
    ) -> Result<rustls::ServerConfig, IdentityError> {
        let me = self.cert_key()?;
        let Some(public) = public else {
            return Ok(tls::server_config(
                &me,
                &self.ca_der()?,
                ClientAuth::Optional,
                alpns,
            )?);
        };
        let resolver = crate::public_cert::SniResolver {
            cluster: tls::certified_key(me.chain.clone(), me.key())?,
            public: public.clone(),
        };
        Ok(tls::server_config_resolved(
            Arc::new(resolver),
            &self.ca_der()?,
            ClientAuth::Optional,
            alpns,
        )?)
    }

    /// mTLS client config for the authority's RPC.
    pub fn rpc_client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        Ok(tls::client_config(
            &self.ca_der()?,
            Some(&self.cert_key()?),
            &[alpn::RPC],
        )?)
    }

    /// Less than a third of the certificate's validity is left.
    pub fn needs_renewal(&self, now: u64) -> bool {
        edgeport_proto::identity::renewal_due(self.issued_at, self.valid_before, now)
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Io(format!("{}: {e}", path.display()))
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The names the gateway's server certificate must carry: the fixed gateway name, the listen
/// address (unless a wildcard) and the public address.
pub fn cert_names(cfg: &GatewayConfig) -> (Vec<String>, Vec<String>) {
    let mut dns = vec![GATEWAY_SERVER_NAME.to_string()];
    let mut ips = Vec::new();
    let ip = cfg.listen.ip();
    if !ip.is_unspecified() {
        ips.push(ip.to_string());
    }
    if let Some(public) = &cfg.public_addr {
        let host = split_host(public);
        match host.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip.to_string()),
            Err(_) if !host.is_empty() => dns.push(host.to_string()),
            Err(_) => {}
        }
    }
    dns.dedup();
    ips.sort();
    ips.dedup();
    (dns, ips)
}

/// `host:port`, `[v6]:port` or a bare host -> host.
fn split_host(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => addr,
    }
}

/// Loads the identity from `cfg.data_dir`, joining the authority first if there is none.
pub async fn load_or_join(cfg: &GatewayConfig) -> Result<GatewayIdentity, IdentityError> {
    let dir = &cfg.data_dir;
    edgeport_proto::util::create_private_dir(dir).map_err(|e| io_err(dir, e))?;
    if path(dir, META_FILE).exists() {
        return load(dir);
    }
    let (Some(token), Some(pin)) = (&cfg.token, &cfg.ca_pin) else {
        return Err(IdentityError::NotJoined);
    };
    let pin = normalize_pin(pin).ok_or_else(|| IdentityError::BadPin(pin.clone()))?;
    let key = load_or_make_key(dir)?;
    let (dns_names, ip_addrs) = cert_names(cfg);
    let client_cfg = tls::pinned_client_config(&pin, None, &[alpn::RPC])?;
    let mut rpc = RpcClient::connect(&cfg.auth_addr, Arc::new(client_cfg))
        .await
        .map_err(IdentityError::Join)?;
    let resp = rpc
        .call(Request::JoinGateway(JoinGatewayRequest {
            token: token.clone(),
            gateway_id: cfg.gateway_id.clone(),
            public_key_spki_der: key.subject_public_key_info(),
            dns_names,
            ip_addrs,
        }))
        .await
        .map_err(IdentityError::Join)?;
    let certs = match resp {
        Response::GatewayCerts(c) => c,
        other => return Err(IdentityError::Join(unexpected(other))),
    };
    store(dir, &certs)?;
    load(dir)
}

/// Renews the certificate for the same key and stores it.
pub async fn renew(
    cfg: &GatewayConfig,
    auth: &crate::authority::AuthorityClient,
) -> Result<GatewayIdentity, IdentityError> {
    let dir = &cfg.data_dir;
    let current = load(dir)?;
    let (dns_names, ip_addrs) = cert_names(cfg);
    let resp = auth
        .call(Request::RenewGateway(RenewGatewayRequest {
            public_key_spki_der: current.spki_der.clone(),
            dns_names,
            ip_addrs,
        }))
        .await
        .map_err(IdentityError::Renew)?;
    let certs = match resp {
        Response::GatewayCerts(c) => c,
        other => return Err(IdentityError::Renew(unexpected(other))),
    };
    store(dir, &certs)?;
    load(dir)
}

/// 32 random bytes for QUIC stateless resets, kept across restarts (0600).
pub fn load_or_make_reset_key(dir: &Path) -> Result<Vec<u8>, IdentityError> {
    let p = path(dir, RESET_KEY_FILE);
    if let Ok(k) = std::fs::read(&p) {
        if k.len() == 32 {
            return Ok(k);
        }
    }
    let k = edgeport_proto::keys::random_bytes(32).map_err(|e| io_err(&p, e))?;
    write_private(&p, &k).map_err(|e| io_err(&p, e))?;
    Ok(k)
}

fn load_or_make_key(dir: &Path) -> Result<rcgen::KeyPair, IdentityError> {
    let p = path(dir, KEY_FILE);
    if p.exists() {
        let pem = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
        return rcgen::KeyPair::from_pem(&pem).map_err(|e| io_err(&p, e));
    }
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| io_err(&p, e))?;
    write_private(&p, key.serialize_pem().as_bytes()).map_err(|e| io_err(&p, e))?;
    Ok(key)
}

/// Stores a rotated CA bundle (`cas.json`); the certificate stays as it is.
pub fn store_cas(dir: &Path, cas: &CaBundle) -> Result<(), IdentityError> {
    let p = path(dir, CAS_FILE);
    let data = serde_json::to_vec_pretty(cas).map_err(|e| io_err(&p, e))?;
    write_private(&p, &data).map_err(|e| io_err(&p, e))
}

fn store(dir: &Path, certs: &GatewayCerts) -> Result<(), IdentityError> {
    let cert = path(dir, CERT_FILE);
    write_private(&cert, certs.x509_cert_pem.as_bytes()).map_err(|e| io_err(&cert, e))?;
    let cas = path(dir, CAS_FILE);
    let data = serde_json::to_vec_pretty(&certs.cas).map_err(|e| io_err(&cas, e))?;
    write_private(&cas, &data).map_err(|e| io_err(&cas, e))?;
    let meta = Meta {
        gateway_id: certs.gateway_id.clone(),
        valid_before: certs.valid_before,
        issued_at: now_secs(),
    };
    let mp = path(dir, META_FILE);
    let data = serde_json::to_vec_pretty(&meta).map_err(|e| io_err(&mp, e))?;
    write_private(&mp, &data).map_err(|e| io_err(&mp, e))
}

/// Reads the stored identity and checks that its pieces belong together.
pub fn load(dir: &Path) -> Result<GatewayIdentity, IdentityError> {
    let read = |name: &str| {
        let p = path(dir, name);
        std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))
    };
    let invalid = |err: String| IdentityError::Invalid {
        dir: dir.display().to_string(),
        err,
    };
    let meta: Meta = serde_json::from_str(&read(META_FILE)?).map_err(|e| invalid(e.to_string()))?;
    let cas: CaBundle =
        serde_json::from_str(&read(CAS_FILE)?).map_err(|e| invalid(e.to_string()))?;
    let cert_pem = read(CERT_FILE)?;
    let key = rcgen::KeyPair::from_pem(&read(KEY_FILE)?).map_err(|e| invalid(e.to_string()))?;
    let cert_der = first_cert_der(&cert_pem).map_err(|e| invalid(e.to_string()))?;
    match tls::spiffe_of(&cert_der) {
        Ok((cluster, Principal::Gateway(_))) if cluster == cas.cluster => {}
        Ok((cluster, p)) => {
            return Err(invalid(format!(
                "the certificate names {p} of cluster {cluster}, not a gateway of {}",
                cas.cluster
            )))
        }
        Err(e) => return Err(invalid(e.to_string())),
    }
    Ok(GatewayIdentity {
        gateway_id: meta.gateway_id,
        cert_pem,
        cas,
        valid_before: meta.valid_before,
        issued_at: meta.issued_at,
        spki_der: key.subject_public_key_info(),
        key_pkcs8: key.serialize_der(),
    })
}

/// An authority error for a relayed request that never reached it.
pub fn unavailable(e: &RpcClientError) -> RpcError {
    match e {
        RpcClientError::Remote(r) => r.clone(),
        other => RpcError::new(
            edgeport_proto::rpc::ErrorKind::Internal,
            format!("the gateway cannot reach the authority: {other}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_splitting() {
        assert_eq!(split_host("gw.example.com:3080"), "gw.example.com");
        assert_eq!(split_host("[::1]:3080"), "::1");
        assert_eq!(split_host("10.0.0.1:3080"), "10.0.0.1");
        assert_eq!(split_host("gw.example.com"), "gw.example.com");
    }
}
