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

fn tls_config(ident: &DeviceIdentity) -> Result<rustls::ClientConfig, String> {
    let ca = ident.ca_der().map_err(|e| e.to_string())?;
    let me = ident.cert_key().map_err(|e| e.to_string())?;
    client_config(&ca, Some(&me), &[edgeport_proto::alpn::TUNNEL]).map_err(|e| e.to_string())
}

/// quinn transport settings: large windows for bulk transfers, keep-alive and idle timeout
/// from the configuration, room for many gateway-opened streams, none the other way.
fn transport_config(cfg: &AgentConfig) -> quinn::TransportConfig {
    let mut t = edgeport_net::quic::bulk_transport();
    // Sessions (SSH channels' streams, Kubernetes requests) the gateway may have open on
    // this device at once; more wait for credit. quinn keeps state for each permitted
    // stream from the start: 1024 cost the device about 50 KB more than 256.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        .keep_alive_interval(Some(cfg.keepalive))
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

    fn endpoint(&mut self, peer: SocketAddr) -> Result<quinn::Endpoint, String> {
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
        let e =
            edgeport_net::quic::client_endpoint(bind).map_err(|e| format!("UDP socket: {e}"))?;
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
    ) -> Result<Arc<dyn Tunnel>, String> {
        let endpoint = self.endpoint(peer)?;
        let crypto = QuicClientConfig::try_from(tls_config(ident)?).map_err(|e| e.to_string())?;
        let mut qcfg = quinn::ClientConfig::new(Arc::new(crypto));
        qcfg.transport_config(Arc::new(transport_config(cfg)));
        let connecting = endpoint
            .connect_with(qcfg, peer, GATEWAY_SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(cfg.quic_timeout, connecting)
            .await
            .map_err(|_| {
                format!(
                    "no QUIC handshake within {}s (UDP blocked?)",
                    cfg.quic_timeout.as_secs_f32()
                )
            })?
            .map_err(|e| explain(e.to_string()))?;
        Ok(tunnel::quic(conn))
    }
}

/// A TCP+TLS connection to the gateway with yamux on top, and the local address it runs
/// from.
pub async fn connect_tcp(
    ident: &DeviceIdentity,
    peer: SocketAddr,
) -> Result<(Arc<dyn Tunnel>, Option<IpAddr>), String> {
    let tcp = tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| "TCP connect timed out".to_string())?
        .map_err(|e| format!("TCP connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok().map(|a| a.ip());
    let name =
        rustls::pki_types::ServerName::try_from(GATEWAY_SERVER_NAME).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        TCP_TIMEOUT,
        TlsConnector::from(Arc::new(tls_config(ident)?)).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| explain(format!("TLS handshake: {e}")))?;
    Ok((
        tunnel::yamux(tls, Mode::Client, &MuxConfig::default()),
        local,
    ))
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
             right, or was this data dir joined to another cluster?)"
        )
    } else if lower.contains("expired") {
        format!("{err} (a certificate has expired: check the clock, or join again)")
    } else if lower.contains("certificate") || lower.contains("alert") {
        format!("{err} (the gateway refused this device's certificate: is it from this cluster?)")
    } else {
        err
    }
}
