//! One device's tunnel, from the moment its TLS (or QUIC) handshake completed: identify the
//! device from its certificate, take the control stream, check Hello, register the tunnel,
//! then serve control frames (keep-alive, renewal, audit) until the connection ends. The
//! protocol is the sans-IO machine [`GatewayControl`]; [`serve`] is its IO.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeport_net::clock::now_secs;
use edgeport_net::{read_frame, write_frame};
use edgeport_net::{BoxedStream, CloseReason};
use edgeport_proto::audit::AuditAck;
use edgeport_proto::control::{
    Admission, GatewayCloseReason, GatewayConfig, GatewayControl, GatewayEvent, RelayId,
    RELAYS_PER_TUNNEL,
};
use edgeport_proto::identity::Principal;
use edgeport_proto::keys::sha256_hex;
use edgeport_proto::rpc::{
    DeviceCerts, ErrorKind, RenewDeviceRequest, Request, Response, RpcError,
};
use edgeport_proto::tunnel::{AgentControl, GatewayControl as GwMsg, Hello};
use edgeport_proto::FrameError;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;

use crate::authority::AuthorityClient;
use crate::identity::IdentityCell;
use crate::lifecycle::Lifecycle;
use crate::locks::Locks;
use crate::sessions::Sessions;
use crate::tunnels::{Outside, Tunnel, Tunnels};

/// What holding device tunnels needs: the authority (renewals and audit batches are relayed
/// to it), the registry of tunnels, the spliced sessions (cut when their tunnel goes), the
/// locked users (sent to agents) and the gateway's lifetime.
#[derive(Clone)]
pub struct TunnelHost {
    pub auth: Arc<AuthorityClient>,
    pub identity: IdentityCell,
    pub tunnels: Arc<Tunnels>,
    pub sessions: Arc<Sessions>,
    pub locks: Arc<Locks>,
    pub life: Lifecycle,
    /// How long a new tunnel may take to open its control stream and say Hello.
    pub handshake_timeout: Duration,
    /// Idle timeout of tunnels whose transport does not keep itself alive (TCP).
    pub idle_timeout: Duration,
}

/// The device named by a verified client certificate chain: (device id, cert fingerprint).
/// The chain was already verified against the cluster CA by rustls; this checks the SPIFFE
/// name (cluster and kind). The device id comes from here and nowhere else.
pub fn device_from_certs(
    cluster: &str,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<(String, String), TunnelRefused> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(TunnelRefused::NoCertificate)?;
    match edgeport_proto::tls::peer_principal(leaf.as_ref(), cluster) {
        Ok(Principal::Device(id)) => Ok((id, sha256_hex(leaf.as_ref()))),
        Ok(p) => Err(TunnelRefused::NotADevice(p.to_string())),
        Err(e) => Err(TunnelRefused::BadCertificate(e)),
    }
}

/// Why a connection on the tunnel ALPN may not hold a device's tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelRefused {
    #[error("no client certificate (a device certificate is required for tunnels)")]
    NoCertificate,
    #[error("{0} may not open a device tunnel")]
    NotADevice(String),
    #[error("bad device certificate: {0}")]
    BadCertificate(edgeport_proto::tls::TlsError),
}

/// A relay to the authority that finished, for the control machine.
enum Done {
    Renew(RelayId, Result<DeviceCerts, RpcError>),
    Audit(RelayId, AuditAck),
    TargetCert(RelayId, u64, Result<String, RpcError>),
}

/// Reads the next control frame. The future is kept across `select!` rounds (never dropped
/// half-way: `read_frame` is not cancel-safe) and only polled while the machine wants to read.
async fn read_next(
    mut reader: ReadHalf<BoxedStream>,
) -> (ReadHalf<BoxedStream>, Result<AgentControl, FrameError>) {
    let frame = read_frame::<AgentControl, _>(&mut reader).await;
    (reader, frame)
}

/// Sleeps until `at`; forever when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Serves a tunnel until it ends. The control protocol is the sans-IO machine
/// [`GatewayControl`]: this task owns it, feeds it frames, timers, relay results and
/// [`Outside`] commands, and does what its events and transmits say.
pub async fn serve(
    host: Arc<TunnelHost>,
    conn: Arc<dyn edgeport_net::Tunnel>,
    device_id: String,
    fingerprint: String,
    remote_addr: SocketAddr,
) {
    let timeout = host.handshake_timeout;
    let Ok(Some(stream)) = tokio::time::timeout(timeout, conn.accept()).await else {
        tracing::info!(device = %device_id, %remote_addr, "tunnel dropped: no control stream in time");
        conn.close("no control stream");
        return;
    };
    // Agents open exactly one stream (control); refuse more.
    conn.stop_accepting();
    let transport = conn.transport();
    let idle = if conn.keeps_alive() {
        // The transport (QUIC) negotiates its own idle timeout with the agent.
        Duration::from_secs(365 * 86400)
    } else {
        host.idle_timeout
    };
    let mut ctl = GatewayControl::new(
        Instant::now(),
        GatewayConfig {
            handshake_timeout: timeout,
            ..GatewayConfig::new(device_id.clone(), idle)
        },
    );
    let (reader, mut writer) = tokio::io::split(stream);
    // Control frames and new streams' headers go ahead of the relays' bulk writes.
    let gate = edgeport_net::write_gate::WriteGate::new();
    let urgent = gate.clone();
    // One writer: the machine's frames go through this channel, so a slow device does not
    // stop the reading.
    // Boxed, as are the other channels' items: tokio allocates each channel's first block of
    // 32 items when it is made, and with the items inline the three channels of an idle
    // tunnel held about 21 KiB of the gateway's memory (issue 26).
    let (wtx, mut wrx) = mpsc::channel::<Box<GwMsg>>(16);
    let writer_task = host.life.tasks.spawn(async move {
        while let Some(msg) = wrx.recv().await {
            let _urgent = urgent.urgent();
            let w = tokio::time::timeout(Duration::from_secs(30), write_frame(&mut writer, &*msg));
            if !matches!(w.await, Ok(Ok(()))) {
                return;
            }
        }
        // The machine closed before the Welcome: a refusal was queued; end the stream.
        let _ = writer.shutdown().await;
    });
    let (outside_tx, mut outside) = mpsc::channel::<Outside>(16);
    // Relay results: the machine has at most `RELAYS_PER_TUNNEL` in flight (a device that
    // sends more is not read meanwhile), so none of them waits here.
    let (done_tx, mut done) = mpsc::channel::<Box<Done>>(RELAYS_PER_TUNNEL);
    let mut read = std::pin::pin!(read_next(reader));
    let mut io = Io {
        host: host.clone(),
        device_id: device_id.clone(),
        conn: conn.clone(),
        gate,
        fingerprint,
        remote_addr,
        writer: wtx,
        outside: outside_tx,
        done: done_tx,
        hello: None,
        tunnel: None,
    };
    loop {
        let established = io.tunnel.is_some();
        tokio::select! {
            (reader, frame) = &mut read, if ctl.wants_read() => {
                let now = Instant::now();
                let _ = match frame {
                    Ok(msg) => ctl.handle_message(now, msg),
                    Err(e) => ctl.handle_read_error(now, e),
                };
                read.set(read_next(reader));
            }
            _ = sleep_until(ctl.poll_timeout()) => ctl.handle_timeout(Instant::now()),
            Some(cmd) = outside.recv() => {
                let _ = match cmd {
                    Outside::Locked(users) => ctl.send_locked(users),
                    Outside::Refused(e) => ctl.send_refused(e),
                    Outside::Budget(m) => ctl.send_budget(m),
                    Outside::Cas(b) => ctl.send_cas(*b),
                };
            }
            Some(d) = done.recv() => {
                let now = Instant::now();
                let r = match *d {
                    Done::Renew(id, result) => ctl.renew_done(now, id, result),
                    Done::Audit(id, ack) => ctl.audit_done(now, id, ack),
                    Done::TargetCert(id, agent_id, result) => {
                        ctl.target_cert_done(now, id, agent_id, result)
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(device = %device_id, "relay result dropped: {e}");
                }
            }
            r = conn.closed(), if established => ctl.close(Instant::now(), describe(r)),
            _ = host.life.shutdown.cancelled(), if established => {
                ctl.close(Instant::now(), "gateway shutting down");
            }
        }
        // Events first: the tunnel is registered before its Welcome is written.
        while let Some(ev) = ctl.poll_event() {
            io.on_event(&mut ctl, ev);
        }
        while let Some(msg) = ctl.poll_transmit() {
            let _ = io.writer.try_send(Box::new(msg));
        }
        if ctl.is_closed() {
            break;
        }
    }
    let tunnel = io.tunnel.take();
    // Ends the writer task once it has written what is queued (before the Welcome: the
    // refusal).
    drop(io);
    let Some(tunnel) = tunnel else {
        // Closed before the Welcome: never registered.
        if let Some(reason) = ctl.close_reason() {
            match reason {
                GatewayCloseReason::Revoked { .. } => tracing::info!(
                    device = %device_id, %remote_addr, "refused a revoked device certificate"
                ),
                GatewayCloseReason::DeviceIdMismatch { claimed, .. } => tracing::warn!(
                    device = %device_id, %claimed, %remote_addr,
                    "refused a Hello that names another device"
                ),
                GatewayCloseReason::ExpectedHello { got } => {
                    tracing::debug!(device = %device_id, %remote_addr, "refused: expected Hello first, got {got}")
                }
                other => {
                    tracing::info!(device = %device_id, %remote_addr, "tunnel dropped: {other}")
                }
            }
        }
        // A queued refusal gets a moment to reach the agent.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        conn.close(
            &ctl.close_reason()
                .map(|r| r.conn_reason())
                .unwrap_or_else(|| "closing".into()),
        );
        return;
    };
    // A closed connection also fails the control stream; its own reason says more.
    let observed = match conn.close_reason() {
        Some(r) => describe(r),
        None => ctl
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "closing".into()),
    };
    tunnel.close(&observed);
    writer_task.abort();
    let reason = tunnel
        .close_reason
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .unwrap_or(observed);
    tracing::info!(device = %device_id, transport = transport.as_str(), %reason, "device offline");
    if host
        .tunnels
        .get(&device_id)
        .is_some_and(|t| t.generation == tunnel.generation)
    {
        // Still the device's tunnel (no newer one took over): the sessions of the device ran
        // on it, and their users are told why they ended.
        let why = format!(
            "the connection to device {device_id} was lost: its tunnel to the gateway ended ({reason})"
        );
        let target = crate::sessions::CutTarget {
            name: &device_id,
            reason: &why,
        };
        host.sessions.cut(&[target], &[]);
    }
    host.tunnels
        .unregister(&device_id, tunnel.generation, reason);
}

/// What one tunnel's task holds besides the machine: the handles its events act on.
struct Io {
    host: Arc<TunnelHost>,
    /// From the verified certificate: the only device id trusted.
    device_id: String,
    conn: Arc<dyn edgeport_net::Tunnel>,
    /// Shared by the control writer and the relays of this tunnel.
    gate: Arc<edgeport_net::write_gate::WriteGate>,
    fingerprint: String,
    remote_addr: SocketAddr,
    /// To the writer task.
    writer: mpsc::Sender<Box<GwMsg>>,
    /// Handed to the registered [`Tunnel`].
    outside: mpsc::Sender<Outside>,
    /// Relay results, back to the machine.
    done: mpsc::Sender<Box<Done>>,
    /// The Hello, between [`GatewayEvent::Hello`] and [`GatewayEvent::Established`].
    hello: Option<Hello>,
    /// Once established.
    tunnel: Option<Arc<Tunnel>>,
}

impl Io {
    fn on_event(&mut self, ctl: &mut GatewayControl, ev: GatewayEvent) {
        let host = &self.host;
        match ev {
            GatewayEvent::Hello(h) => {
                let admission = if host.tunnels.is_revoked(&self.fingerprint) {
                    Admission::Revoked {
                        message: format!(
                            "device {} was removed from the cluster; join again with a new token",
                            self.device_id
                        ),
                    }
                } else {
                    Admission::Accept {
                        gateway_id: host.identity.get().gateway_id.clone(),
                        transport: self.conn.transport(),
                        locked_users: host.locks.locked_users(),
                    }
                };
                self.hello = Some(h);
                let _ = ctl.admit(Instant::now(), admission);
            }
            GatewayEvent::Established => {
                if let Some(m) = host.tunnels.budget_refusal(&self.device_id) {
                    let _ = ctl.send_budget(Some(m));
                }
                if let Some(cas) = host.tunnels.rotated_cas() {
                    let _ = ctl.send_cas(cas);
                }
                if let Some(hello) = self.hello.take() {
                    self.tunnel = Some(register(
                        host,
                        &self.conn,
                        &self.gate,
                        hello,
                        &self.fingerprint,
                        self.remote_addr,
                        self.outside.clone(),
                    ));
                }
            }
            GatewayEvent::Rtt(rtt) => {
                if let Some(t) = &self.tunnel {
                    t.tcp_rtt_ms.store(rtt, Ordering::Relaxed);
                }
            }
            // Relays run on the gateway's tasks (drained on shutdown); the machine bounds how
            // many run at once.
            GatewayEvent::Renew {
                id,
                ssh_public_key,
                proof,
            } => {
                let (host, done) = (host.clone(), self.done.clone());
                let device_id = self.device_id.clone();
                self.host.life.tasks.spawn(async move {
                    let r = renew_device(&host, device_id, ssh_public_key, proof).await;
                    let _ = done.send(Box::new(Done::Renew(id, r))).await;
                });
            }
            GatewayEvent::TargetCert { id, req } => {
                let (host, done) = (host.clone(), self.done.clone());
                let device_id = self.device_id.clone();
                self.host.life.tasks.spawn(async move {
                    let agent_id = req.id;
                    let r = target_cert(&host, device_id, req).await;
                    let _ = done.send(Box::new(Done::TargetCert(id, agent_id, r))).await;
                });
            }
            GatewayEvent::Audit { id, batch } => {
                let (host, done) = (host.clone(), self.done.clone());
                let device_id = self.device_id.clone();
                self.host.life.tasks.spawn(async move {
                    let n = batch.events.len() as u64;
                    let ack = crate::audit::relay_batch(&host.auth, device_id, batch).await;
                    let outcome = if ack.error.is_none() {
                        "accepted"
                    } else {
                        "refused"
                    };
                    crate::metrics::audit_events(outcome, n);
                    let _ = done.send(Box::new(Done::Audit(id, ack))).await;
                });
            }
            GatewayEvent::Ignored(why) => {
                tracing::debug!(device = %self.device_id, "{why}");
            }
            GatewayEvent::Closed => {}
            GatewayEvent::Usage(report) => {
                if let Some(t) = &self.tunnel {
                    if let Ok(mut u) = t.usage.lock() {
                        *u = Some(report);
                    }
                }
            }
            GatewayEvent::Attested(proof) => {
                if let Some(t) = &self.tunnel {
                    if let Ok(mut p) = t.proof.lock() {
                        *p = Some(proof);
                    }
                    // Reported at once: until then the authority does not take this
                    // gateway as the holder of a device that proved itself before.
                    self.host.tunnels.changed.notify_one();
                }
            }
        }
    }
}

/// Registers the tunnel of a welcomed device.
fn register(
    host: &TunnelHost,
    conn: &Arc<dyn edgeport_net::Tunnel>,
    gate: &Arc<edgeport_net::write_gate::WriteGate>,
    hello: Hello,
    fingerprint: &str,
    remote_addr: SocketAddr,
    control: mpsc::Sender<Outside>,
) -> Arc<Tunnel> {
    let transport = conn.transport();
    let tunnel = Arc::new(Tunnel {
        device_id: hello.device_id.clone(),
        generation: host.tunnels.next_generation(),
        conn: conn.clone(),
        gate: gate.clone(),
        hello,
        remote_addr,
        last_addr: Mutex::new(remote_addr),
        connected_at: now_secs(),
        cert_fingerprint: fingerprint.to_string(),
        control,
        tcp_rtt_ms: Default::default(),
        usage: Default::default(),
        proof: Default::default(),
        close_reason: Mutex::new(None),
    });
    if host.tunnels.get(&tunnel.device_id).is_some() {
        // The older tunnel goes now, and the sessions on it with it (a TCP connection cannot
        // follow a device to a new network; QUIC ones migrate and are not replaced). Their
        // users are told why; sessions over this new tunnel are not registered yet.
        let reason = format!(
            "device {} reconnected to the gateway (its network changed, or its connection \
             failed), which ended the sessions over its previous connection; it is online \
             again: connect again",
            tunnel.device_id
        );
        let target = crate::sessions::CutTarget {
            name: &tunnel.device_id,
            reason: &reason,
        };
        let cut = host.sessions.cut(&[target], &[]);
        if cut > 0 {
            tracing::info!(device = %tunnel.device_id, sessions = cut, "ended the sessions of the replaced tunnel");
        }
    }
    host.tunnels.register(tunnel.clone());
    tracing::info!(
        device = %tunnel.device_id, transport = transport.as_str(), %remote_addr,
        version = %tunnel.hello.version, "device online"
    );
    tunnel
}

/// Why the connection ended, in words for `tctl devices ls`.
fn describe(reason: CloseReason) -> String {
    match reason {
        CloseReason::ClosedByPeer(r) if r.is_empty() => "closed by the device".into(),
        CloseReason::ClosedByPeer(r) => format!("closed by the device: {r}"),
        CloseReason::TimedOut => "idle timeout (no keep-alive from the device)".into(),
        CloseReason::LocallyClosed => "closed by the gateway".into(),
        CloseReason::Reset => "connection reset".into(),
        CloseReason::Other(r) => r,
    }
}

/// Relays a device's signed request for a per-session target certificate (record mode): the
/// authority checks the device's signature and the user's certificate, not this gateway's word.
async fn target_cert(
    host: &TunnelHost,
    device_id: String,
    req: edgeport_proto::targets::TargetCertRequest,
) -> Result<String, RpcError> {
    match host.auth.call(Request::TargetCert { device_id, req }).await {
        Ok(Response::TargetCert { cert, .. }) => Ok(cert),
        Ok(other) => Err(RpcError::new(
            ErrorKind::Internal,
            format!("unexpected answer from the authority: {other:?}"),
        )),
        Err(e) => Err(crate::identity::unavailable(&e)),
    }
}

/// Relays a device's renewal with its signature (none from older agents): the authority
/// records a renewal only on the device's proof, not on this gateway's word.
async fn renew_device(
    host: &TunnelHost,
    device_id: String,
    ssh_public_key: String,
    proof: Option<edgeport_proto::renew::RenewProof>,
) -> Result<DeviceCerts, RpcError> {
    let req = Request::RenewDevice(RenewDeviceRequest {
        device_id: device_id.clone(),
        ssh_public_key,
        proof,
    });
    let answer = host.auth.call(req).await;
    crate::metrics::renewal("device", &answer);
    match answer {
        Ok(Response::DeviceCerts(c)) => {
            tracing::info!(device = %device_id, "renewed device certificates");
            Ok(c)
        }
        Ok(other) => Err(RpcError::new(
            ErrorKind::Internal,
            format!("unexpected answer from the authority: {other:?}"),
        )),
        Err(e) => {
            tracing::warn!(device = %device_id, "renewal failed: {e}");
            Err(crate::identity::unavailable(&e))
        }
    }
}
