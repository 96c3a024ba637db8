//! One path from a finished handshake to the service its ALPN names, for both ports: the
//! QUIC endpoint (the `quic` module) and the TCP listener (`tcp`). A device tunnel
//! becomes an [`edgeport_net::Tunnel`] here, and [`crate::tunnel::serve`] takes it from
//! there without knowing which port it came in on.

use std::net::SocketAddr;
use std::sync::Arc;

use edgeport_net::mux::{Mode, MuxConfig};
use edgeport_net::Tunnel;
use edgeport_proto::alpn;
use quinn::crypto::rustls::HandshakeData;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::authority::AuthorityClient;
use crate::dial::Dialer;
use crate::kube::Front;
use crate::tunnel::TunnelHost;

/// The services behind the two ports, by ALPN.
pub struct Routes {
    pub tunnel: Arc<TunnelHost>,
    pub dial: Arc<Dialer>,
    pub kube: Arc<Front>,
    /// Joins are relayed to the authority as they are.
    pub auth: Arc<AuthorityClient>,
}

/// A client whose handshake has finished, on either port.
pub enum Handshaken {
    Quic(quinn::Connection),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Handshaken {
    /// The protocol the client and the gateway agreed on.
    fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            Handshaken::Quic(c) => c
                .handshake_data()
                .and_then(|h| h.downcast::<HandshakeData>().ok())
                .and_then(|h| h.protocol),
            Handshaken::Tls(t) => t.get_ref().1.alpn_protocol().map(|a| a.to_vec()),
        }
    }

    /// The client's verified certificate chain, if it sent one.
    fn peer_certs(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Handshaken::Quic(c) => c
                .peer_identity()
                .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|c| *c),
            Handshaken::Tls(t) => t.get_ref().1.peer_certificates().map(|c| c.to_vec()),
        }
    }

    /// The connection as a device tunnel: QUIC as it is, TLS with yamux on top.
    fn into_tunnel(self) -> Arc<dyn Tunnel> {
        match self {
            Handshaken::Quic(c) => edgeport_net::tunnel::quic(c),
            Handshaken::Tls(t) => {
                edgeport_net::tunnel::yamux(*t, Mode::Server, &MuxConfig::default())
            }
        }
    }
}

/// Serves the connection as its ALPN says (the Kubernetes front door's TCP connections are
/// served from `tcp.rs`, where the client certificate's verdict also decides admission).
/// Each protocol's future is boxed, so that a
/// connection's task holds only the state of the protocol it speaks: inline, every idle
/// device tunnel would keep room for the largest of them (the Kubernetes front door's).
pub async fn serve(routes: &Routes, conn: Handshaken, addr: SocketAddr) {
    let alpn = conn.alpn();
    let cluster = routes.tunnel.identity.get().cluster().to_string();
    let certs = conn.peer_certs();
    let certs = certs.as_deref();
    match (alpn.as_deref(), conn) {
        (Some(a), conn) if a == alpn::TUNNEL => {
            let (device_id, fingerprint) = match crate::tunnel::device_from_certs(&cluster, certs) {
                Ok(d) => d,
                Err(e) => {
                    crate::metrics::handshake_failed("certificate");
                    tracing::info!(%addr, "tunnel refused: {e}");
                    if let Handshaken::Quic(c) = conn {
                        c.close(quinn::VarInt::from_u32(2), e.to_string().as_bytes());
                    }
                    return;
                }
            };
            Box::pin(crate::tunnel::serve(
                routes.tunnel.clone(),
                conn.into_tunnel(),
                device_id,
                fingerprint,
                addr,
            ))
            .await;
        }
        (Some(a), Handshaken::Quic(c)) if a == alpn::DIAL => {
            let peer = crate::dial::peer_of(&cluster, certs);
            Box::pin(crate::dial::serve_quic(routes.dial.clone(), c, peer, addr)).await;
        }
        (Some(a), Handshaken::Tls(t)) if a == alpn::DIAL => {
            let peer = crate::dial::peer_of(&cluster, certs);
            Box::pin(crate::dial::serve_stream(
                routes.dial.clone(),
                t,
                None,
                peer,
                addr,
            ))
            .await;
        }
        (Some(a), Handshaken::Tls(t)) if a == alpn::JOIN => {
            let timeout = routes.dial.request_timeout;
            Box::pin(crate::join::serve(&routes.auth, timeout, t, addr)).await
        }
        (_, conn) => {
            crate::metrics::handshake_failed("alpn");
            match conn {
                Handshaken::Quic(c) => c.close(quinn::VarInt::from_u32(3), b"unknown protocol"),
                Handshaken::Tls(_) => tracing::debug!(%addr, "no known ALPN; dropped"),
            }
        }
    }
}
