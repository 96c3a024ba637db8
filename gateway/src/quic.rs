//! The UDP port: one quinn endpoint for device tunnels and tsh dials, told apart by ALPN.
//! Every QUIC tunnel shares this one socket, so they cost no file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::alpn;
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use rustls::pki_types::CertificateDer;

use crate::ctx::Ctx;
use crate::identity::{GatewayIdentity, IdentityError};
use crate::tunnel::{self, Acceptor};
use crate::tunnels::TunnelConn;

/// The ALPN ids served over QUIC (joins are TCP only).
pub const ALPNS: &[&[u8]] = &[alpn::TUNNEL, alpn::DIAL];

/// quinn server config: flow-control windows sized for bulk transfers on the device leg
/// (DESIGN section 7: at least 16M stream / 64M connection / 64M send).
pub fn server_config(
    identity: &GatewayIdentity,
    idle_timeout: Duration,
    public: Option<&Arc<rustls::sign::CertifiedKey>>,
) -> Result<quinn::ServerConfig, IdentityError> {
    let tls = identity.server_config(ALPNS, public)?;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| IdentityError::Io(format!("QUIC TLS config: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(idle_timeout)));
    Ok(cfg)
}

fn transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.ack_frequency_config(Some(ack_frequency()));
    t
}

/// Random 8-byte connection ids that any gateway process accepts as plausible. quinn's
/// default generator signs its ids with a per-process key and silently drops packets for
/// ids it did not sign, so after a restart it would never answer an agent's old connection
/// with a stateless reset; the agent would wait for its idle timeout instead.
pub struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let bytes = edgeport_proto::keys::random_bytes(8).unwrap_or_else(|_| {
            // The OS RNG does not fail on Linux; a time-based id still works as an id.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t.to_le_bytes().to_vec()
        });
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

pub async fn accept_loop(ctx: Arc<Ctx>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = ctx.shutdown.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        if endpoint.open_connections() >= ctx.cfg.max_connections {
            incoming.refuse();
            continue;
        }
        let Ok(hs_slot) = ctx.quic_handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%addr, "QUIC accept failed: {e}");
                    return;
                }
            };
            let conn = match tokio::time::timeout(ctx.cfg.handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, "QUIC handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "QUIC handshake timed out");
                    return;
                }
            };
            drop(hs_slot);
            serve(ctx, conn, addr).await;
        });
    }
}

async fn serve(ctx: Arc<Ctx>, conn: quinn::Connection, addr: SocketAddr) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let certs = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok());
    let certs = certs.as_deref().map(|c| c.as_slice());
    match alpn.as_deref() {
        Some(a) if a == alpn::TUNNEL => {
            let (device_id, fingerprint) = match tunnel::device_from_certs(&ctx, certs) {
                Ok(d) => d,
                Err(e) => {
                    tracing::info!(%addr, "tunnel refused: {e}");
                    conn.close(quinn::VarInt::from_u32(2), e.as_bytes());
                    return;
                }
            };
            tunnel::serve(
                ctx,
                TunnelConn::Quic(conn.clone()),
                Acceptor::Quic(conn),
                device_id,
                fingerprint,
                addr,
            )
            .await;
        }
        Some(a) if a == alpn::DIAL => {
            let principal = crate::dial::principal_of(&ctx, certs);
            crate::dial::serve_quic(ctx, conn, principal, addr).await;
        }
        _ => conn.close(quinn::VarInt::from_u32(3), b"unknown protocol"),
    }
}

/// Ask the peer for an ACK every 10 ack-eliciting packets (the ACK-frequency extension; the
/// QUIC default is every second packet). A bulk transfer then sends a fifth of the ACK
/// packets: less uplink on metered links and much less per-packet work at both ends
/// (docs/benchmarks.md). Loss is still detected by ack delay and reordering as before.
fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut a = quinn::AckFrequencyConfig::default();
    a.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    a
}

const ACK_ELICITING_THRESHOLD: u32 = 10;
