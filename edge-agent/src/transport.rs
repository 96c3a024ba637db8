//! The two ways a tunnel can run, behind one interface ([`Tunnel`]): QUIC (preferred: NAT friendly,
//! migrates across networks, no head-of-line blocking) and TCP+TLS with yamux on top (when
//! UDP is blocked). Both use mutual TLS with the device certificate and trust only the
//! cluster's CA.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edgeport_net::mux::{Mode, MuxConfig};
use edgeport_net::{tunnel, CloseReason, Tunnel};
use edgeport_proto::tls::{client_config, GATEWAY_SERVER_NAME};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::AgentConfig;
use crate::identity::DeviceIdentity;

const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("device identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("device certificate: {0}")]
    Tls(#[from] edgeport_proto::tls::TlsError),
    #[error("QUIC configuration: {0}")]
    QuicConfig(String),
    #[error("UDP socket: {0}")]
    Udp(std::io::Error),
    #[error("QUIC: {0}")]
    QuicStart(#[from] quinn::ConnectError),
    #[error("no QUIC handshake within {0:.1}s (UDP blocked?)")]
    QuicTimeout(f32),
    #[error("{}", explain(.0.to_string()))]
    QuicHandshake(#[from] quinn::ConnectionError),
    #[error("TCP connect timed out")]
    TcpTimeout,
    #[error("TCP connect: {0}")]
    Tcp(std::io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("gateway server name: {0}")]
    ServerName(#[from] rustls::pki_types::InvalidDnsNameError),
    #[error("{}", explain(format!("TLS handshake: {}", .0)))]
    TlsHandshake(std::io::Error),
}

impl ConnectError {
    /// The gateway answered over UDP but took no new connection (its handshake slots are
    /// full): QUIC works, the gateway is busy.
    pub fn busy(&self) -> bool {
        matches!(
            self,
            ConnectError::QuicHandshake(quinn::ConnectionError::ConnectionClosed(c))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )
    }
}

/// Why the tunnel ended, in words for the agent's log and status.
pub fn describe(reason: CloseReason) -> String {
    match reason {
        CloseReason::ClosedByPeer(r) if r.is_empty() => "the gateway closed the tunnel".into(),
        CloseReason::ClosedByPeer(r) => format!("the gateway closed the tunnel: {r}"),
        CloseReason::TimedOut => "idle timeout: nothing heard from the gateway".into(),
        CloseReason::LocallyClosed => "closed by the agent".into(),
        CloseReason::Reset => "the gateway no longer knows this connection (restarted?)".into(),
        CloseReason::Other(r) => r,
    }
}

fn tls_config(ident: &DeviceIdentity) -> Result<rustls::ClientConfig, ConnectError> {
    let ca = ident.ca_der()?;
    let me = ident.cert_key()?;
    Ok(client_config(
        &ca,
        Some(&me),
        &[edgeport_proto::alpn::TUNNEL],
    )?)
}

/// quinn transport settings: large windows for bulk transfers, keep-alive and idle timeout
/// from the configuration, room for many gateway-opened streams, none the other way.
fn transport_config(cfg: &AgentConfig) -> quinn::TransportConfig {
    let mut t = edgeport_net::quic::bulk_transport();
    // Sessions (SSH channels' streams, Kubernetes requests) the gateway may have open on
    // this device at once; more wait for credit. quinn keeps state for each permitted
    // stream from the start: 1024 cost the device about 50 KB more than 256.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        // With `--keepalive auto` QUIC's own PING comes at the ceiling; the session adds
        // control-stream Pings when the NAT needs shorter (`nat_keepalive`).
        .keep_alive_interval(Some(cfg.keepalive_auto.map_or(cfg.keepalive, |(_, hi)| hi)))
        .max_idle_timeout(quinn::IdleTimeout::try_from(cfg.idle_timeout).ok());
    t
}

/// One UDP socket for all QUIC attempts of this process (rebuilt if the address family of
/// the gateway changes).
#[derive(Default)]
pub struct QuicClient {
    endpoint: Option<quinn::Endpoint>,
}

impl QuicClient {
    /// A client on an existing endpoint (shared by many agents in one process).
    pub fn with_endpoint(endpoint: quinn::Endpoint) -> Self {
        Self {
            endpoint: Some(endpoint),
        }
    }

    fn endpoint(&mut self, peer: SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
        if let Some(e) = &self.endpoint {
            let same_family = e
                .local_addr()
                .map(|a| a.is_ipv4() == peer.is_ipv4())
                .unwrap_or(false);
            if same_family {
                return Ok(e.clone());
            }
        }
        let bind: SocketAddr = if peer.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let e = edgeport_net::quic::client_endpoint(bind).map_err(ConnectError::Udp)?;
        self.endpoint = Some(e.clone());
        Ok(e)
    }

    /// Closes the endpoint politely (sends pending CONNECTION_CLOSE frames).
    pub async fn shutdown(&mut self) {
        if let Some(e) = self.endpoint.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
    }

    /// A QUIC connection to the gateway; the handshake must finish within `quic_timeout`.
    pub async fn connect(
        &mut self,
        cfg: &AgentConfig,
        ident: &DeviceIdentity,
        peer: SocketAddr,
    ) -> Result<Arc<dyn Tunnel>, ConnectError> {
        let endpoint = self.endpoint(peer)?;
        let crypto = QuicClientConfig::try_from(tls_config(ident)?)
            .map_err(|e| ConnectError::QuicConfig(e.to_string()))?;
        let mut qcfg = quinn::ClientConfig::new(Arc::new(crypto));
        qcfg.transport_config(Arc::new(transport_config(cfg)));
        let connecting = endpoint.connect_with(qcfg, peer, GATEWAY_SERVER_NAME)?;
        let conn = tokio::time::timeout(cfg.quic_timeout, connecting)
            .await
            .map_err(|_| ConnectError::QuicTimeout(cfg.quic_timeout.as_secs_f32()))??;
        Ok(tunnel::quic(conn))
    }
}

/// A TCP+TLS connection to the gateway with yamux on top, and the local address it runs
/// from.
pub async fn connect_tcp(
    ident: &DeviceIdentity,
    peer: SocketAddr,
) -> Result<(Arc<dyn Tunnel>, Option<IpAddr>), ConnectError> {
    let tcp = tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| ConnectError::TcpTimeout)?
        .map_err(ConnectError::Tcp)?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok().map(|a| a.ip());
    let name = rustls::pki_types::ServerName::try_from(GATEWAY_SERVER_NAME)?;
    let tls = tokio::time::timeout(
        TCP_TIMEOUT,
        TlsConnector::from(Arc::new(tls_config(ident)?)).connect(name, tcp),
    )
    .await
    .map_err(|_| ConnectError::TlsTimeout)?
    .map_err(ConnectError::TlsHandshake)?;
    Ok((
        tunnel::yamux(tls, Mode::Client, &MuxConfig::default()),
        local,
    ))
}

/// The local address the kernel's routes pick for packets to `peer` now (a connected UDP
/// socket sends nothing): on a client socket bound to the unspecified address this is where
/// the tunnel's next packet leaves from.
pub fn route_source(peer: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Whether `ip` is still an address of this device. When the device changes networks (a
/// modem moves to another cell, Wi-Fi gives way to LTE) its old address goes away, and a
/// TCP connection from it is dead, although the kernel would retransmit into the void for
/// many minutes. A QUIC connection instead follows the device to its new address.
pub fn address_present(ip: IpAddr) -> bool {
    match std::net::UdpSocket::bind((ip, 0)) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrNotAvailable,
    }
}

/// Adds a hint to certificate errors, the ones an operator can act on.
pub fn explain(err: String) -> String {
    let lower = err.to_ascii_lowercase();
    if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        format!(
            "{err} (the gateway's certificate is not from this device's cluster: is --gateway \
             right, was this data dir joined to another cluster, or was the cluster's x509 CA \
             rotated while this device was offline? Then join again: docs/deploy.md, \
             \"Rotating a CA\")"
        )
    } else if lower.contains("expired") {
        format!("{err} (a certificate has expired: check the clock, or join again)")
    } else if lower.contains("certificate") || lower.contains("alert") {
        format!("{err} (the gateway refused this device's certificate: is it from this cluster?)")
    } else {
        err
    }
}
