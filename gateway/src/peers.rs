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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgeport_net::write_gate::WriteGate;
use edgeport_net::BoxedStream;
use edgeport_net::{read_frame, write_frame};
use edgeport_proto::alpn;
use edgeport_proto::identity::Principal;
use edgeport_proto::rpc::{DialGrant, ErrorKind, RpcError};
use edgeport_proto::tls::{self, GATEWAY_SERVER_NAME};
use edgeport_proto::tunnel::{ClientReply, ClientRequest, StreamHeader};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;

use crate::authority::AuthorityClient;
use crate::grants::{Grants, UserCert};
use crate::identity::{GatewayIdentity, IdentityCell};
use crate::locks::Locks;
use crate::tunnels::{TunnelError, Tunnels, OPEN_TIMEOUT};

/// Connecting to a peer gateway (resolve, QUIC handshake), and getting a stream on a link.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect, forwards to that peer fail at once for this long instead of each
/// waiting [`CONNECT_TIMEOUT`] again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long the holder may take to check a forwarded dial (it checks the ticket itself; kept
/// as a margin for a loaded holder).
pub const HOLDER_GRANT_TIMEOUT: Duration = Duration::from_secs(5);
/// Hearing the peer's answer to `Forward`: longer than the holder's own waits (for its grant
/// and for the device, [`OPEN_TIMEOUT`]), so that a slow device or authority is reported as
/// such and a missing answer means the peer itself is gone (the link is then dropped).
const ANSWER_TIMEOUT: Duration = OPEN_TIMEOUT
    .saturating_add(HOLDER_GRANT_TIMEOUT)
    .saturating_add(Duration::from_secs(5));
/// Links stay up while idle, so that quiet SSH sessions on them are not cut.
const LINK_KEEP_ALIVE: Duration = Duration::from_secs(15);
const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Forwarded streams one link may carry at once (the receiver raises its limit for peers).
pub const LINK_STREAMS: u32 = 10_000;

/// The links this gateway has opened to its peers, one slot per peer gateway id (bounded by
/// the number of gateways the authority names).
#[derive(Default)]
pub struct Peers {
    endpoint: OnceLock<quinn::Endpoint>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One peer: its link, or why the last connect failed. Connecting holds only this peer's
/// lock, so a peer that does not answer never holds up forwards to the others.
#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The address it was reached at, and the link.
    link: Option<(String, quinn::Connection, Arc<WriteGate>)>,
    /// When a connect to which address last failed, and why.
    failed: Option<(Instant, String, LinkError)>,
}

/// Why no link to a peer gateway could be had (kept, and returned again, for
/// [`RETRY_AFTER`] after a failed connect).
#[derive(Clone, Debug, thiserror::Error)]
enum LinkError {
    #[error("the gateway's QUIC endpoint is not up yet")]
    NoEndpoint,
    #[error("gateway {peer} at {addr} did not answer in time")]
    Timeout { peer: String, addr: String },
    #[error("link to gateway {peer}: {reason}")]
    Setup { peer: String, reason: String },
    #[error("peer address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("peer address {addr} has no address this gateway can reach")]
    Unreachable { addr: String },
    #[error("{addr} is not gateway {peer} (its certificate names {named})")]
    WrongGateway {
        addr: String,
        peer: String,
        named: String,
    },
}

/// Why a forward failed.
enum ForwardError {
    /// The holder refused (the device went away, a lock it knows of...).
    Refused(RpcError),
    /// No usable link or no answer: the details are for the gateway's log.
    Link(String),
}

impl Peers {
    /// The gateway's quinn endpoint (its UDP port), used as the client of peer links.
    pub fn set_endpoint(&self, endpoint: quinn::Endpoint) {
        let _ = self.endpoint.set(endpoint);
    }

    fn slot(&self, peer: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(peer.to_string()).or_default().clone()
    }

    /// A stream to `device_id` through gateway `peer` at `addr`, accepted by that gateway.
    async fn forward(
        &self,
        ident: &GatewayIdentity,
        peer: &str,
        addr: &str,
        device_id: &str,
        header: &StreamHeader,
    ) -> Result<BoxedStream, ForwardError> {
        let link_err =
            |what: String| ForwardError::Link(format!("gateway {peer} at {addr}: {what}"));
        // A cached link may have died since it was last used: one fresh try.
        for attempt in 0..2 {
            let (link, gate) = self
                .link(ident, peer, addr, attempt > 0)
                .await
                .map_err(|e| ForwardError::Link(e.to_string()))?;
            let (send, recv) = match tokio::time::timeout(CONNECT_TIMEOUT, link.open_bi()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if attempt == 0 => {
                    tracing::debug!(%peer, "link to peer gateway lost ({e}); reconnecting");
                    continue;
                }
                Ok(Err(e)) => return Err(link_err(e.to_string())),
                Err(_) => return Err(link_err("no stream free on the link".into())),
            };
            let mut stream: BoxedStream = Box::new(tokio::io::join(recv, send));
            let req = ClientRequest::Forward {
                device_id: device_id.to_string(),
                header: header.clone(),
            };
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
                // Ahead of the link's bulk writes: a forward that waited behind them for
                // flow-control credit could miss ANSWER_TIMEOUT, which closes the link.
                let urgent = gate.urgent();
                write_frame(&mut stream, &req).await?;
                drop(urgent);
                read_frame::<ClientReply, _>(&mut stream).await
            })
            .await;
            return match answer {
                Ok(Ok(ClientReply::DialOk { .. })) => {
                    Ok(Box::new(gate.gate(stream)) as BoxedStream)
                }
                Ok(Ok(ClientReply::Refused(e))) => Err(ForwardError::Refused(e)),
                Ok(Ok(_)) => Err(link_err("answered out of turn".into())),
                Ok(Err(e)) if attempt == 0 && link.close_reason().is_some() => {
                    tracing::debug!(%peer, "link to peer gateway lost ({e}); reconnecting");
                    continue;
                }
                Ok(Err(e)) => Err(link_err(e.to_string())),
                Err(_) => {
                    // A live holder answers within OPEN_TIMEOUT: this one is gone, and so
                    // are the sessions on the link. The next forward connects afresh.
                    link.close(quinn::VarInt::from_u32(3), b"no answer");
                    Err(link_err(format!(
                        "no answer within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    )))
                }
            };
        }
        Err(link_err("the link went down twice".into()))
    }

    /// The link to `peer`, connecting if there is none (or `fresh` is asked for).
    async fn link(
        &self,
        ident: &GatewayIdentity,
        peer: &str,
        addr: &str,
        fresh: bool,
    ) -> Result<(quinn::Connection, Arc<WriteGate>), LinkError> {
        let slot = self.slot(peer);
        let mut st = slot.state.lock().await;
        if let Some((at, c, gate)) = &st.link {
            if !fresh && c.close_reason().is_none() && at == addr {
                return Ok((c.clone(), gate.clone()));
            }
        }
        if let Some((when, at, why)) = &st.failed {
            if at == addr && when.elapsed() < RETRY_AFTER {
                return Err(why.clone());
            }
        }
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(ident, peer, addr))
            .await
            .unwrap_or_else(|_| {
                Err(LinkError::Timeout {
                    peer: peer.to_string(),
                    addr: addr.to_string(),
                })
            });
        match connected {
            Ok(conn) => {
                let gate = WriteGate::new();
                st.link = Some((addr.to_string(), conn.clone(), gate.clone()));
                st.failed = None;
                tracing::info!(%peer, %addr, "link to peer gateway up");
                Ok((conn, gate))
            }
            Err(e) => {
                st.link = None;
                st.failed = Some((Instant::now(), addr.to_string(), e.clone()));
                Err(e)
            }
        }
    }

    async fn connect(
        &self,
        ident: &GatewayIdentity,
        peer: &str,
        addr: &str,
    ) -> Result<quinn::Connection, LinkError> {
        let endpoint = self.endpoint.get().ok_or(LinkError::NoEndpoint)?;
        let err = |e: &dyn std::fmt::Display| LinkError::Setup {
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        let tls = tls::client_config(
            &ident.ca_der().map_err(|e| err(&e))?,
            Some(&ident.cert_key().map_err(|e| err(&e))?),
            &[alpn::DIAL],
        )
        .map_err(|e| err(&e))?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| err(&e))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = edgeport_net::quic::bulk_transport();
        transport
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
            .keep_alive_interval(Some(LINK_KEEP_ALIVE))
            .max_idle_timeout(quinn::IdleTimeout::try_from(LINK_IDLE_TIMEOUT).ok());
        cfg.transport_config(Arc::new(transport));
        let local = endpoint.local_addr().map_err(|e| err(&e))?;
        let sockaddr = resolve(addr, local).await?;
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
            return Err(LinkError::WrongGateway {
                addr: addr.to_string(),
                peer: peer.to_string(),
                named: format!("{who:?}"),
            });
        }
        Ok(conn)
    }
}

/// The first address of `addr` the endpoint's socket can send to (an IPv4 socket only IPv4;
/// an IPv6 one, dual-stack, either).
async fn resolve(addr: &str, local: SocketAddr) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| LinkError::Resolve {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .find(|a| local.is_ipv6() || a.is_ipv4())
        .ok_or_else(|| LinkError::Unreachable {
            addr: addr.to_string(),
        })
}

/// The way to a device's stream wherever its tunnel is: here, or at the peer gateway the
/// authority names. User dials and the Kubernetes front door each hold one.
#[derive(Clone)]
pub struct Reach {
    pub auth: Arc<AuthorityClient>,
    pub identity: IdentityCell,
    pub tunnels: Arc<Tunnels>,
    pub grants: Arc<Grants>,
    pub locks: Arc<Locks>,
    pub peers: Arc<Peers>,
}

impl Reach {
    /// A stream to the device of `grant` with `header` sent: over its tunnel here, or forwarded
    /// to the gateway that holds it (with a fresh ticket from the authority, which the holder
    /// requires), and which gateway that was. The grant may be one the gateway reused, so when
    /// the device is not where it says (it moved to another gateway, or just came online), the
    /// authority is asked once more.
    pub async fn open_device_stream(
        &self,
        who: &UserCert,
        grant: &DialGrant,
        header: StreamHeader,
    ) -> Result<(BoxedStream, Option<String>), TunnelError> {
        let first = self.open_at(who, grant, header.clone()).await;
        let misplaced = match &first {
            Err(TunnelError::NotConnected(_) | TunnelError::Peer(_)) => true,
            Err(TunnelError::Refused(e)) => e.kind == ErrorKind::NotFound,
            _ => false,
        };
        if !misplaced {
            return first;
        }
        let service = header.service.clone();
        match self
            .grants
            .ticketed(&self.auth, who, &grant.device.id, service)
            .await
        {
            Ok(fresh) if placement(&fresh) != placement(grant) => {
                tracing::debug!(device = %grant.device.id, "device moved; dialling where the authority says now");
                let header = StreamHeader {
                    ticket: fresh.ticket.clone(),
                    ..header
                };
                self.open_at(who, &fresh, header).await
            }
            _ => first,
        }
    }

    async fn open_at(
        &self,
        who: &UserCert,
        grant: &DialGrant,
        mut header: StreamHeader,
    ) -> Result<(BoxedStream, Option<String>), TunnelError> {
        let device_id = &grant.device.id;
        match self.tunnels.open_stream(device_id, &header).await {
            Err(TunnelError::NotConnected(_)) => {}
            other => return other.map(|s| (s, None)),
        }
        let ident = self.identity.get();
        let me = ident.gateway_id.clone();
        let mut fresh = None;
        if header.ticket.is_none() {
            // A reused grant: the holder takes a forwarded dial only with a ticket of its own.
            let g = self
                .grants
                .ticketed(&self.auth, who, device_id, header.service.clone())
                .await
                .map_err(TunnelError::Refused)?;
            header.ticket = g.ticket.clone();
            fresh = Some(g);
        }
        let grant = fresh.as_ref().unwrap_or(grant);
        let holder = match &grant.device.gateway {
            Some(g) if *g != me && grant.device.online => g,
            _ => return Err(TunnelError::NotConnected(device_id.clone())),
        };
        if self.locks.gateway_barred(holder) {
            return Err(TunnelError::Peer(format!(
                "device {device_id} is connected to gateway {holder}, which was revoked; it \
                 reconnects to another gateway soon"
            )));
        }
        let Some(addr) = &grant.gateway_addr else {
            return Err(TunnelError::Peer(format!(
                "device {device_id} is connected to gateway {holder}, which takes no forwarded \
                 dials (start it with --peer-addr)"
            )));
        };
        match self
            .peers
            .forward(&ident, holder, addr, device_id, &header)
            .await
        {
            Ok(s) => Ok((s, Some(holder.clone()))),
            Err(ForwardError::Refused(e)) => Err(TunnelError::Refused(RpcError::new(
                e.kind,
                format!("gateway {holder}: {}", e.message),
            ))),
            Err(ForwardError::Link(why)) => {
                tracing::warn!(device = %device_id, "cannot forward a dial: {why}");
                Err(TunnelError::Peer(format!(
                    "device {device_id} is behind gateway {holder}, which cannot be reached now"
                )))
            }
        }
    }
}

/// Whether the device is online, which gateway holds it and where peers reach that gateway.
fn placement(g: &DialGrant) -> (bool, Option<&str>, Option<&str>) {
    (
        g.device.online,
        g.device.gateway.as_deref(),
        g.gateway_addr.as_deref(),
    )
}
