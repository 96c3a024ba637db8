//! Gateway-to-gateway forwarding (DESIGN section 5). With several gateways, a user's dial may
//! reach one that does not hold the device's tunnel. The authority knows which gateway does
//! (presence) and where its peers reach it (`--peer-addr`, sent with presence); the dialled
//! gateway authorises the dial as usual, then opens a stream to the holder over one QUIC
//! link per peer, mutually authenticated with both gateways' cluster certificates, and sends
//! `ClientRequest::Forward`. The holder opens the device stream and both splice. The bytes
//! stay the client's and the device's (SSH end to end); neither gateway can read them.
//!
//! A forwarded dial is never forwarded again: the holder only uses its own tunnels, so two
//! gateways with stale views cannot bounce a dial between them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgeport_proto::identity::Principal;
use edgeport_proto::rpc::DialGrant;
use edgeport_proto::tls::{self, GATEWAY_SERVER_NAME};
use edgeport_proto::tunnel::{ClientReply, ClientRequest, StreamHeader};
use edgeport_proto::util::BoxedStream;
use edgeport_proto::{alpn, read_frame, write_frame};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;

use crate::ctx::Ctx;
use crate::tunnels::TunnelError;

/// Connecting to a peer gateway (resolve, QUIC handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Opening a stream on the link and hearing the peer's answer to `Forward`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Links stay up while idle, so that quiet SSH sessions on them are not cut.
const LINK_KEEP_ALIVE: Duration = Duration::from_secs(15);
const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Forwarded streams one link may carry at once (the receiver raises its limit for peers).
pub const LINK_STREAMS: u32 = 10_000;

/// The links this gateway has opened to its peers, by peer gateway id.
#[derive(Default)]
pub struct Peers {
    endpoint: OnceLock<quinn::Endpoint>,
    links: tokio::sync::Mutex<HashMap<String, (String, quinn::Connection)>>,
}

impl Peers {
    /// The gateway's quinn endpoint (its UDP port), used as the client of peer links.
    pub fn set_endpoint(&self, endpoint: quinn::Endpoint) {
        let _ = self.endpoint.set(endpoint);
    }

    /// A stream to `device_id` through gateway `peer` at `addr`, accepted by that gateway.
    async fn forward(
        &self,
        ctx: &Ctx,
        peer: &str,
        addr: &str,
        device_id: &str,
        header: &StreamHeader,
    ) -> Result<BoxedStream, String> {
        // A cached link may have died since it was last used: one fresh try.
        for attempt in 0..2 {
            let link = self.link(ctx, peer, addr, attempt > 0).await?;
            let opened = tokio::time::timeout(ANSWER_TIMEOUT, link.open_bi()).await;
            let (send, recv) = match opened {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if attempt == 0 => {
                    tracing::debug!(%peer, "link to peer gateway lost ({e}); reconnecting");
                    continue;
                }
                Ok(Err(e)) => return Err(format!("link to gateway {peer} at {addr}: {e}")),
                Err(_) => return Err(format!("gateway {peer} at {addr} gave no stream in time")),
            };
            let mut stream: BoxedStream = Box::new(tokio::io::join(recv, send));
            let req = ClientRequest::Forward {
                device_id: device_id.to_string(),
                header: header.clone(),
            };
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
                write_frame(&mut stream, &req).await?;
                read_frame::<ClientReply, _>(&mut stream).await
            })
            .await;
            return match answer {
                Ok(Ok(ClientReply::DialOk { .. })) => Ok(stream),
                Ok(Ok(ClientReply::Refused(e))) => Err(format!("gateway {peer}: {}", e.message)),
                Ok(Ok(other)) => Err(format!("gateway {peer} answered {other:?}")),
                Ok(Err(e)) => Err(format!("gateway {peer} at {addr}: {e}")),
                Err(_) => Err(format!("gateway {peer} at {addr} did not answer in time")),
            };
        }
        Err(format!("no link to gateway {peer} at {addr}"))
    }

    /// The link to `peer`, connecting if there is none (or `fresh` is asked for).
    async fn link(
        &self,
        ctx: &Ctx,
        peer: &str,
        addr: &str,
        fresh: bool,
    ) -> Result<quinn::Connection, String> {
        let mut links = self.links.lock().await;
        if let Some((at, c)) = links.get(peer) {
            if !fresh && c.close_reason().is_none() && at == addr {
                return Ok(c.clone());
            }
        }
        // Connecting under the lock keeps one link per peer; a peer that does not answer
        // holds up other forwards for at most CONNECT_TIMEOUT.
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(ctx, peer, addr))
            .await
            .map_err(|_| format!("gateway {peer} at {addr} did not answer in time"))??;
        links.retain(|_, (_, c)| c.close_reason().is_none());
        links.insert(peer.to_string(), (addr.to_string(), conn.clone()));
        tracing::info!(%peer, %addr, "link to peer gateway up");
        Ok(conn)
    }

    async fn connect(
        &self,
        ctx: &Ctx,
        peer: &str,
        addr: &str,
    ) -> Result<quinn::Connection, String> {
        let endpoint = self
            .endpoint
            .get()
            .ok_or_else(|| "the gateway's QUIC endpoint is not up yet".to_string())?;
        let ident = ctx.identity();
        let err = |e: &dyn std::fmt::Display| format!("link to gateway {peer}: {e}");
        let tls = tls::client_config(
            &ident.ca_der().map_err(|e| err(&e))?,
            Some(&ident.cert_key().map_err(|e| err(&e))?),
            &[alpn::DIAL],
        )
        .map_err(|e| err(&e))?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| err(&e))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = edgeport_proto::quic::bulk_transport();
        transport
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
            .keep_alive_interval(Some(LINK_KEEP_ALIVE))
            .max_idle_timeout(quinn::IdleTimeout::try_from(LINK_IDLE_TIMEOUT).ok());
        cfg.transport_config(Arc::new(transport));
        let sockaddr = resolve(addr).await?;
        let conn = endpoint
            .connect_with(cfg, sockaddr, GATEWAY_SERVER_NAME)
            .map_err(|e| err(&e))?
            .await
            .map_err(|e| err(&e))?;
        // The certificate chains to the cluster's CA (checked in the handshake); it must
        // also name the gateway the authority said holds the device.
        let certs = conn
            .peer_identity()
            .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok());
        let who = certs
            .as_deref()
            .and_then(|c| c.first())
            .and_then(|leaf| tls::peer_principal(leaf.as_ref(), ident.cluster()).ok());
        if who != Some(Principal::Gateway(peer.to_string())) {
            conn.close(quinn::VarInt::from_u32(2), b"not the expected gateway");
            return Err(format!(
                "{addr} is not gateway {peer} (its certificate names {who:?})"
            ));
        }
        Ok(conn)
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("peer address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("peer address {addr} resolves to nothing"))
}

/// A stream to the device of `grant` with `header` sent: over its tunnel here, or forwarded
/// to the gateway that holds it.
pub async fn open_device_stream(
    ctx: &Ctx,
    grant: &DialGrant,
    header: &StreamHeader,
) -> Result<BoxedStream, TunnelError> {
    let device_id = &grant.device.id;
    match ctx.tunnels.open_stream(device_id, header).await {
        Err(TunnelError::NotConnected(_)) => {}
        other => return other,
    }
    let me = ctx.identity().gateway_id.clone();
    let holder = match &grant.device.gateway {
        Some(g) if *g != me && grant.device.online => g,
        _ => return Err(TunnelError::NotConnected(device_id.clone())),
    };
    let Some(addr) = &grant.gateway_addr else {
        return Err(TunnelError::Peer(format!(
            "device {device_id} is connected to gateway {holder}, which takes no forwarded \
             dials (start it with --peer-addr)"
        )));
    };
    ctx.peers
        .forward(ctx, holder, addr, device_id, header)
        .await
        .map_err(|e| {
            TunnelError::Peer(format!("device {device_id} is behind another gateway: {e}"))
        })
}
