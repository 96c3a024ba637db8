//! The first start: join the cluster through the gateway with a token, over TCP+TLS with the
//! cluster's CA pinned (the agent has no certificate yet). Only the public key travels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgeport_net::{read_frame, write_frame};
use edgeport_proto::keys::{normalize_pin, KeyPair};
use edgeport_proto::rpc::{DeviceCerts, JoinDeviceRequest, RpcError};
use edgeport_proto::tls::{pinned_client_config, GATEWAY_SERVER_NAME};
use edgeport_proto::tunnel::{JoinMessage, JoinReply};
use edgeport_proto::{alpn, FrameError};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::AgentConfig;

const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "this device has not joined a cluster yet: start it once with --token and --ca-pin \
         (from `tctl tokens add --type device`)"
    )]
    NotJoined,
    #[error("--ca-pin {0:?} is not a valid CA pin (expected sha256:HEX, from `tctl tokens add`)")]
    BadPin(String),
    /// Worth retrying: the network or the gateway is not there (yet).
    #[error("cannot reach the gateway at {addr}: {err}")]
    Unreachable { addr: String, err: String },
    #[error(
        "the gateway at {addr} failed the CA pin check: {err}\n\
         (check --ca-pin: it must be the pin printed by `tctl tokens add` for this cluster)"
    )]
    Pin { addr: String, err: String },
    #[error("the join was refused: {0}")]
    Refused(RpcError),
    #[error("join failed: {0}")]
    Protocol(String),
}

impl JoinError {
    pub fn retryable(&self) -> bool {
        match self {
            JoinError::Unreachable { .. } => true,
            // The gateway could not reach the authority.
            JoinError::Refused(e) => e.kind == edgeport_proto::rpc::ErrorKind::Internal,
            _ => false,
        }
    }
}

/// Resolves `HOST:PORT`: an address literal as is, then `/etc/hosts` (read here, so a static
/// glibc build needs no NSS module for it; IPv4 first), then the system resolver (musl's own,
/// or glibc's built-in DNS).
pub async fn resolve(addr: &str) -> Result<SocketAddr, ResolveError> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(a) = std::fs::read_to_string("/etc/hosts")
        .ok()
        .and_then(|hosts| from_hosts(&hosts, addr))
    {
        return Ok(a);
    }
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ResolveError::Lookup(addr.to_string(), e))?;
    addrs
        .next()
        .ok_or_else(|| ResolveError::NoAddress(addr.to_string()))
}

/// Why the gateway's address could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {0}: {1}")]
    Lookup(String, std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
}

/// `HOST:PORT` looked up in the text of an `/etc/hosts` file: the first IPv4 address naming
/// HOST, else the first IPv6 one.
pub fn from_hosts(hosts: &str, addr: &str) -> Option<SocketAddr> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let mut v6 = None;
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(ip) = fields
            .next()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        else {
            continue;
        };
        if fields.any(|name| name.eq_ignore_ascii_case(host)) {
            if ip.is_ipv4() {
                return Some(SocketAddr::new(ip, port));
            }
            v6.get_or_insert(SocketAddr::new(ip, port));
        }
    }
    v6
}

/// Sends the join and returns the certificates.
pub async fn join(cfg: &AgentConfig, key: &KeyPair) -> Result<DeviceCerts, JoinError> {
    let (Some(token), Some(pin)) = (&cfg.token, &cfg.ca_pin) else {
        return Err(JoinError::NotJoined);
    };
    let pin = normalize_pin(pin).ok_or_else(|| JoinError::BadPin(pin.clone()))?;
    let unreachable = |err: String| JoinError::Unreachable {
        addr: cfg.gateway.clone(),
        err,
    };
    let addr = resolve(&cfg.gateway)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let tls_cfg = pinned_client_config(&pin, None, &[alpn::JOIN])
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from(GATEWAY_SERVER_NAME)
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    let mut tls = tokio::time::timeout(
        TIMEOUT,
        TlsConnector::from(Arc::new(tls_cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| unreachable("TLS handshake timed out".into()))?
    .map_err(|e| {
        let err = e.to_string();
        if err.contains("pin") || err.contains("certificate") {
            JoinError::Pin {
                addr: cfg.gateway.clone(),
                err,
            }
        } else {
            unreachable(format!("TLS handshake failed: {err}"))
        }
    })?;
    let req = JoinDeviceRequest {
        token: token.clone(),
        requested_id: cfg.requested_id.clone(),
        labels: cfg.labels.clone(),
        ssh_public_key: key.public_openssh(),
        version: edgeport_proto::VERSION.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        remote_addr: String::new(),
    };
    let exchange = async {
        write_frame(&mut tls, &JoinMessage::Join(req)).await?;
        read_frame::<JoinReply, _>(&mut tls).await
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Err(_) => Err(unreachable("no answer to the join".into())),
        Ok(Ok(JoinReply::Joined(certs))) => {
            // The gateway relays the authority's answer: trust the SSH CAs only through the
            // x509 CA we pinned, which signed them.
            certs.cas.verify_pinned(&pin).map_err(|e| {
                JoinError::Protocol(format!("the join answer is not from this cluster: {e}"))
            })?;
            Ok(certs)
        }
        Ok(Ok(JoinReply::Refused(e))) => Err(JoinError::Refused(e)),
        Ok(Err(FrameError::Closed | FrameError::Truncated)) => Err(JoinError::Protocol(
            "the gateway closed the connection without an answer".into(),
        )),
        Ok(Err(e)) => Err(JoinError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_from_hosts_file() {
        let hosts = "# comment\n::1 localhost ip6-localhost\n127.0.0.1 localhost\n\
                     10.1.2.3 gw.example gw # the gateway\nbad line\n";
        let got = |a: &str| super::from_hosts(hosts, a).map(|s| s.to_string());
        assert_eq!(got("localhost:3080").as_deref(), Some("127.0.0.1:3080"));
        assert_eq!(got("GW:1").as_deref(), Some("10.1.2.3:1"));
        assert_eq!(got("ip6-localhost:22").as_deref(), Some("[::1]:22"));
        assert_eq!(got("nowhere:22"), None);
        assert_eq!(got("gw"), None);
    }
}
