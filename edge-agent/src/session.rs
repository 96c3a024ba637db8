//! One tunnel session: Hello/Welcome on the control stream, then serve the gateway's
//! streams, keep the tunnel alive (pings on TCP; QUIC keeps itself alive), renew the
//! certificates when due, and, while on TCP, probe QUIC in the background and move over as
//! soon as UDP works again. The control protocol itself is the sans-IO machine
//! [`edgeport_proto::control::AgentControl`]: [`establish`] and [`serve`] only read and write
//! its frames, run its timer and act on its events.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_net::clock::now_secs;
use edgeport_net::write_gate::WriteGate;
use edgeport_net::{read_frame, write_frame};
use edgeport_net::{BoxedStream, Tunnel};
use edgeport_proto::audit::{AuditAck, AuditBatch};
use edgeport_proto::control::{
    AgentCloseReason, AgentConfig, AgentControl as Machine, AgentEvent, AgentIgnored, Keepalive,
};
use edgeport_proto::rpc::{RpcError, Transport};
use edgeport_proto::tunnel::{AgentControl, GatewayControl, Hello};
use edgeport_proto::FrameError;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::backoff::unit_random;
use crate::config::TransportChoice;
use crate::identity::DeviceIdentity;
use crate::nat_keepalive::{self, NatKeepalive};
use crate::transport::{describe, explain, QuicClient};

/// Deadline for the Hello/Welcome exchange and for control writes.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a QUIC probe in flight may take to finish after the TCP tunnel ended.
const UPGRADE_GRACE: Duration = Duration::from_secs(2);

/// How often a TCP tunnel checks that its local address still exists (see
/// [`crate::transport::address_present`]).
const PATH_CHECK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the gateway refused the tunnel: {0}")]
    Refused(RpcError),
    #[error("{0}")]
    Failed(String),
    /// The attempt failed and the device has no route to the gateway at all (a modem
    /// without coverage): a dead zone, where attempts cannot reach, let alone load, the
    /// gateway.
    #[error("{0} (no route to the gateway)")]
    NoRoute(String),
    /// The gateway answered and took no new connection (its handshake slots or its
    /// connection cap are full): the path works, so only the backoff helps.
    #[error("{0}")]
    Busy(String),
}

/// An established tunnel (Welcome received).
pub struct Session {
    pub conn: Arc<dyn Tunnel>,
    reader: ReadHalf<BoxedStream>,
    writer: WriteHalf<BoxedStream>,
    /// The control machine, established (boxed: it is large, and sessions move around).
    ctl: Box<Machine>,
    pub gateway_id: String,
    /// A TCP tunnel's local address: watched, the connection is dead once it is gone.
    pub local_ip: Option<IpAddr>,
}

/// How a session ended.
pub enum Ended {
    /// The tunnel is gone; reconnect after a backoff.
    Lost(String),
    /// A QUIC tunnel replaced the TCP one; serve it next, no backoff.
    Upgrade(Session),
    Shutdown,
}

/// The control machine's settings for a tunnel on `conn`: pings only where the transport
/// does not keep itself alive (TCP).
fn control_config(conn: &dyn Tunnel, cfg: &crate::config::AgentConfig) -> AgentConfig {
    AgentConfig {
        handshake_timeout: CONTROL_TIMEOUT,
        keepalive: (!conn.keeps_alive()).then_some(Keepalive {
            interval: cfg.keepalive,
            idle_timeout: cfg.idle_timeout,
        }),
        renew_check: edgeport_proto::control::RENEW_CHECK,
    }
}

/// Opens the control stream, says Hello and waits for Welcome (all within
/// [`CONTROL_TIMEOUT`], the machine's handshake deadline).
pub async fn establish(
    conn: Arc<dyn Tunnel>,
    ident: &DeviceIdentity,
    cfg: &crate::config::AgentConfig,
) -> Result<Session, SessionError> {
    let hello = Hello {
        device_id: ident.device_id.clone(),
        labels: ident.labels.clone(),
        version: crate::update::version().to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kube_cluster: cfg.kube_cluster.clone(),
    };
    let started = Instant::now();
    let mut ctl = Machine::new(started, control_config(conn.as_ref(), cfg), hello);
    let deadline = ctl.poll_timeout().unwrap_or(started + CONTROL_TIMEOUT);
    let fut = async {
        let stream = conn.open().await.map_err(|e| {
            SessionError::Failed(explain(format!("opening the control stream: {e}")))
        })?;
        let stream: BoxedStream = Box::new(crate::usage::CountedStream::tunnel(
            stream,
            crate::usage::Counted::Control,
        ));
        let (mut reader, mut writer) = tokio::io::split(stream);
        while !ctl.is_established() && !ctl.is_closed() {
            while let Some(msg) = ctl.poll_transmit() {
                write_frame(&mut writer, &msg)
                    .await
                    .map_err(|e| SessionError::Failed(explain(format!("sending Hello: {e}"))))?;
            }
            let frame = read_frame::<GatewayControl, _>(&mut reader).await;
            let now = Instant::now();
            // Errors are the caller's (a closed machine); it cannot be closed here.
            let _ = match frame {
                Ok(msg) => ctl.handle_message(now, msg),
                Err(e) => ctl.handle_read_error(now, e),
            };
        }
        Ok((reader, writer))
    };
    let halves = match tokio::time::timeout_at(deadline.into(), fut).await {
        Ok(Ok(halves)) => Some(halves),
        Ok(Err(e)) => {
            conn.close("hello failed");
            return Err(e);
        }
        Err(_) => {
            // tokio's timer rounds to the millisecond: the deadline has passed.
            ctl.handle_timeout(Instant::now().max(deadline));
            None
        }
    };
    let mut gateway_id = None;
    while let Some(ev) = ctl.poll_event() {
        if let AgentEvent::Established { gateway_id: id, .. } = ev {
            gateway_id = Some(id);
        }
    }
    if let Some(gw) = &gateway_id {
        // The device's word that it chose this gateway: the authority takes the gateway as
        // this device's holder only with it (sent with the first frames of the session).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let stamp = crate::identity::next_attest_stamp(&cfg.data_dir, now_ms);
        let proof =
            edgeport_proto::attest::TunnelProof::sign(&ident.key, &ident.device_id, gw, stamp);
        if let Err(e) = ctl.attest(proof) {
            tracing::debug!("tunnel attestation not sent: {e}");
        }
    }
    match (halves, gateway_id) {
        (Some((reader, writer)), Some(gateway_id)) if ctl.is_established() => Ok(Session {
            conn,
            reader,
            writer,
            ctl: Box::new(ctl),
            gateway_id,
            local_ip: None,
        }),
        _ => {
            let err = match ctl.close_reason() {
                Some(AgentCloseReason::HelloRefused(e)) => SessionError::Refused(e.clone()),
                Some(r @ AgentCloseReason::HelloStream(_)) => {
                    SessionError::Failed(explain(r.to_string()))
                }
                Some(r) => SessionError::Failed(r.to_string()),
                None => SessionError::Failed("no Welcome from the gateway".into()),
            };
            match ctl.close_reason() {
                Some(AgentCloseReason::HandshakeTimeout) => conn.close("hello timed out"),
                _ => conn.close("hello failed"),
            }
            Err(err)
        }
    }
}

/// Connects: QUIC first, TCP+TLS+yamux if QUIC does not come up in time (or only one of
/// them, as `--transport` says).
pub async fn connect(agent: &Agent, quic: &mut QuicClient) -> Result<Session, SessionError> {
    let peer = crate::join::resolve(&agent.cfg.gateway)
        .await
        .map_err(|e| SessionError::Failed(e.to_string()))?;
    match connect_to(agent, quic, peer).await {
        Err(SessionError::Failed(e)) if crate::transport::route_source(peer).is_none() => {
            Err(SessionError::NoRoute(e))
        }
        r => r,
    }
}

async fn connect_to(
    agent: &Agent,
    quic: &mut QuicClient,
    peer: std::net::SocketAddr,
) -> Result<Session, SessionError> {
    let cfg = &agent.cfg;
    let ident = agent.identity();
    if cfg.transport != TransportChoice::Tcp {
        let quic_only = cfg.transport == TransportChoice::Quic;
        match quic.connect(cfg, &ident, peer).await {
            Ok(conn) => match establish(conn, &ident, cfg).await {
                Ok(s) => return Ok(s),
                Err(SessionError::Refused(e)) => return Err(SessionError::Refused(e)),
                Err(e) if quic_only => {
                    return Err(SessionError::Failed(format!(
                        "QUIC tunnel failed ({e}); not trying TCP (--transport quic)"
                    )))
                }
                Err(e) => tracing::info!("QUIC tunnel failed ({e}); trying TCP+TLS"),
            },
            // A refusal is an answer over UDP: QUIC works, the gateway is busy (a mass
            // reconnect after its restart fills its handshake slots). Falling back to TCP
            // would put this device on the fallback until its next probe; retrying QUIC
            // after the backoff is what a reconnect storm needs.
            Err(e) if e.busy() => {
                return Err(SessionError::Busy(format!(
                    "QUIC: {e}; the gateway is busy, retrying QUIC"
                )))
            }
            Err(e) if quic_only => {
                return Err(SessionError::Failed(format!(
                    "QUIC: {e}; not trying TCP (--transport quic)"
                )))
            }
            Err(e) => tracing::info!("QUIC: {e}; trying TCP+TLS"),
        }
    }
    let (conn, local_ip) = crate::transport::connect_tcp(&ident, peer)
        .await
        .map_err(|e| SessionError::Failed(e.to_string()))?;
    let mut s = establish(conn, &ident, cfg).await?;
    s.local_ip = local_ip;
    Ok(s)
}

/// Tries QUIC now and then while the tunnel runs on TCP; returns the new session once a
/// QUIC tunnel is up (the gateway then replaces the TCP tunnel with it).
async fn probe_quic(agent: &Agent, quic: &mut QuicClient) -> Session {
    let base = agent.cfg.quic_probe_interval;
    let mut delay = base;
    loop {
        // Jitter between half and the full delay.
        tokio::time::sleep(delay.mul_f64(0.5 + unit_random() / 2.0)).await;
        let ident = agent.identity();
        let attempt = async {
            let peer = crate::join::resolve(&agent.cfg.gateway)
                .await
                .map_err(|e| e.to_string())?;
            let conn = quic
                .connect(&agent.cfg, &ident, peer)
                .await
                .map_err(|e| e.to_string())?;
            establish(conn, &ident, &agent.cfg)
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(s) => return s,
            Err(e) => tracing::debug!("QUIC probe failed: {e}"),
        }
        delay = (delay * 2).min(base * 10);
    }
}

fn reading(
    c: edgeport_net::tunnel::PathCounters,
    local_ip: Option<IpAddr>,
) -> nat_keepalive::Reading {
    nat_keepalive::Reading {
        path_challenges: c.path_challenges,
        datagrams_sent: c.datagrams_sent,
        local_ip,
    }
}

/// Why a control frame could not be written (the tunnel is then closed with it).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("control stream: {0}")]
    Frame(#[from] edgeport_proto::FrameError),
    #[error("control stream: write timed out")]
    TimedOut,
}

/// Writes one control frame, ahead of the sessions' bulk writes on the same tunnel (`gate`).
async fn send(
    w: &mut WriteHalf<BoxedStream>,
    msg: &AgentControl,
    gate: &Arc<WriteGate>,
) -> Result<(), SendError> {
    use tokio::io::AsyncWriteExt;
    let frame = edgeport_proto::frame::encode(msg)?;
    if matches!(msg, AgentControl::Audit(_)) {
        // Counted as control by the stream; an audit batch is audit's.
        let n = frame.len() as u64;
        crate::usage::move_up(
            crate::usage::Counted::Control,
            crate::usage::Counted::Audit,
            n,
        );
    }
    let _urgent = gate.urgent();
    let write = async {
        w.write_all(&frame).await?;
        w.flush().await
    };
    match tokio::time::timeout(CONTROL_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SendError::Frame(e.into())),
        Err(_) => Err(SendError::TimedOut),
    }
}

/// Sleeps until `at`; forever when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Asks for a renewal of the same key, signed with it: the authority records a renewal only
/// on the device's own proof (`edgeport_proto::renew`).
fn ask_renewal(agent: &Agent, ctl: &mut Machine, ident: &DeviceIdentity) {
    let proof = edgeport_proto::renew::RenewProof::sign(
        &ident.key,
        &ident.device_id,
        &ident.cas,
        now_secs(),
    );
    let bundle = proof.bundle.clone();
    match ctl.request_renew(ident.key.public_openssh(), proof) {
        Ok(()) => {
            if let Ok(mut b) = agent.renew_signed_bundle.lock() {
                *b = bundle;
            }
        }
        Err(e) => tracing::debug!("renewal not asked for: {e}"),
    }
}

/// Does what the machine asks after an input: writes its frames and acts on its events
/// (renewal checks, renewed certificates, locks, audit acks). Returns the close reason once
/// the machine has closed.
async fn drive(
    agent: &Agent,
    ctl: &mut Machine,
    writer: &mut WriteHalf<BoxedStream>,
    gate: &Arc<WriteGate>,
    audit_ack: &mpsc::Sender<AuditAck>,
) -> Option<String> {
    loop {
        if let Some(msg) = ctl.poll_transmit() {
            // Nothing more is written once the machine closed (the tunnel goes).
            if !ctl.is_closed() {
                if let Err(e) = send(writer, &msg, gate).await {
                    ctl.close(Instant::now(), e.to_string());
                }
            }
            continue;
        }
        let Some(ev) = ctl.poll_event() else {
            break;
        };
        match ev {
            AgentEvent::RenewDue => {
                let ident = agent.identity();
                if ident.needs_renewal(now_secs()) || agent.take_forced_renew() {
                    tracing::info!("certificates are due for renewal; asking the gateway");
                    ask_renewal(agent, ctl, &ident);
                }
            }
            AgentEvent::Renewed(certs) => {
                crate::metrics::renewal(true);
                agent.renewed(&certs);
                // Signed with a bundle the authority no longer served (a CA rotation step
                // raced the renewal, or its push came while the renewal was in flight): the
                // certificates are good but the renewal was not counted. Once more, with the
                // bundle just taken.
                let ident = agent.identity();
                let signed = agent
                    .renew_signed_bundle
                    .lock()
                    .map(|b| b.clone())
                    .unwrap_or_default();
                if signed != edgeport_proto::renew::bundle_digest(&ident.cas) {
                    tracing::info!("the CA bundle changed during the renewal; renewing again");
                    ask_renewal(agent, ctl, &ident);
                }
            }
            AgentEvent::RenewRefused(e) => {
                crate::metrics::renewal(false);
                tracing::warn!("certificate renewal refused: {e}")
            }
            AgentEvent::Locked(users) => agent.services.set_locked_users(users),
            AgentEvent::Budget(exceeded) => crate::usage::set_over_budget(exceeded),
            AgentEvent::Cas(cas) => {
                match agent.take_cas(&cas) {
                    Ok(true) => {
                        tracing::info!("the host CA was rotated; renewing the host certificate under the new CA");
                        ask_renewal(agent, ctl, &agent.identity());
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!("rotated CA bundle refused: {e}"),
                }
            }
            AgentEvent::TargetCert { id, result } => {
                crate::relay::certs().answer(id, result.map_err(|e| e.message));
            }
            AgentEvent::AuditAcked { ack, .. } => {
                let _ = audit_ack.try_send(ack);
            }
            AgentEvent::Ignored(why @ AgentIgnored::UnsolicitedRenewed) => {
                tracing::warn!("{why}")
            }
            AgentEvent::Ignored(why) => tracing::debug!("{why}"),
            // The shipper resends from its spool on the next tunnel.
            AgentEvent::AuditFailed { .. } | AgentEvent::Established { .. } => {}
            AgentEvent::Closed => {}
        }
    }
    ctl.close_reason().map(|r| r.to_string())
}

/// Serves the session until the tunnel ends, moves to QUIC, or the agent shuts down.
pub async fn serve(agent: &Agent, session: Session, quic: &mut QuicClient) -> Ended {
    let Session {
        conn,
        mut reader,
        mut writer,
        mut ctl,
        local_ip,
        ..
    } = session;
    let mut path_check = tokio::time::interval(PATH_CHECK);
    path_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // QUIC with `--keepalive auto`: learn the NAT's timeout from the path's counters.
    let mut route_src = conn.remote_addr().and_then(crate::transport::route_source);
    let mut nat = match (agent.cfg.keepalive_auto, conn.path_counters()) {
        (Some((lo, hi)), Some(c)) => Some(NatKeepalive::new(
            Instant::now(),
            lo,
            hi,
            reading(c, route_src),
        )),
        _ => None,
    };
    let mut nat_check = tokio::time::interval(
        nat.as_ref()
            .map_or(Duration::from_secs(3600), NatKeepalive::check_every),
    );
    nat_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut usage = crate::usage::Schedule::new(Instant::now());
    let mut usage_check = tokio::time::interval(agent.cfg.usage_every);
    usage_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Control frames go ahead of the sessions' bulk writes on this tunnel.
    let gate = WriteGate::new();
    let accept_task = tokio::spawn(accept_loop(
        conn.clone(),
        gate.clone(),
        agent.services.clone(),
    ));
    // Audit: the shipper sends batches through `audit_out`; acks come back on `audit_ack`.
    let (audit_tx, mut audit_out) = mpsc::channel::<AuditBatch>(2);
    let (audit_ack, audit_acks) = mpsc::channel(2);
    let ship_task = agent.audit.clone().map(|shared| {
        let ident = agent.identity();
        tokio::spawn(crate::audit::ship::run(
            shared,
            ident.device_id.clone(),
            ident.key.clone(),
            {
                let services = agent.services.clone();
                Box::new(move || services.host_cas())
            },
            agent.audit_tamper(),
            audit_tx,
            audit_acks,
        ))
    });
    // Frames are read on their own task: `read_frame` is not cancel-safe, and the loop
    // below selects over timers too.
    let (frames_tx, mut frames) = mpsc::channel(8);
    let read_task = tokio::spawn(async move {
        loop {
            let f = read_frame::<GatewayControl, _>(&mut reader).await;
            let end = f.is_err();
            if frames_tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    // Only `--transport auto` moves a TCP tunnel back to QUIC.
    let may_upgrade =
        conn.transport() == Transport::Tcp && agent.cfg.transport == TransportChoice::Auto;
    let mut probe = std::pin::pin!(async {
        if may_upgrade {
            probe_quic(agent, quic).await
        } else {
            std::future::pending().await
        }
    });
    // How the session ends when this side closes the machine (else: lost, for its reason).
    let mut ending: Option<Ended> = None;
    let ended = loop {
        tokio::select! {
            frame = frames.recv() => {
                let now = Instant::now();
                let _ = match frame.unwrap_or(Err(FrameError::Closed)) {
                    Ok(msg) => ctl.handle_message(now, msg),
                    Err(e) => ctl.handle_read_error(now, e),
                };
            }
            _ = sleep_until(ctl.poll_timeout()) => ctl.handle_timeout(Instant::now()),
            Some(batch) = audit_out.recv() => {
                if let Err(e) = ctl.send_audit(batch) {
                    tracing::warn!("audit batch not sent: {e}");
                }
            }
            reason = conn.closed() => ctl.close(Instant::now(), describe(reason)),
            _ = path_check.tick(), if local_ip.is_some() => {
                if let Some(ip) = local_ip.filter(|ip| !crate::transport::address_present(*ip)) {
                    ctl.close(
                        Instant::now(),
                        format!("the network changed: the address {ip} the tunnel ran from is gone"),
                    );
                }
            }
            _ = nat_check.tick(), if nat.is_some() => {
                if let (Some(n), Some(c)) = (nat.as_mut(), conn.path_counters()) {
                    let now = Instant::now();
                    let src = conn.remote_addr().and_then(crate::transport::route_source);
                    // An idle device whose route to the gateway changed moves the tunnel at
                    // once instead of at its next keep-alive (up to a minute later).
                    if let (Some(was), Some(is)) = (route_src, src) {
                        if was != is && ctl.ping_now().is_ok() {
                            tracing::info!(
                                "the route to the gateway now leaves from {is} (was {was}); \
                                 telling the gateway from the new address"
                            );
                        }
                    }
                    route_src = src.or(route_src);
                    if let Some(change) = n.observe(now, reading(c, src)) {
                        tracing::info!("{change}");
                        let ceiling = agent.cfg.keepalive_auto.map(|(_, hi)| hi);
                        let k = (Some(n.interval()) < ceiling).then_some(Keepalive {
                            interval: n.interval(),
                            idle_timeout: agent.cfg.idle_timeout,
                        });
                        ctl.set_keepalive(now, k);
                    }
                }
            }
            _ = crate::relay::certs().woken() => {
                for req in crate::relay::certs().take_outbox() {
                    let id = req.id;
                    if let Err(e) = ctl.request_target_cert(req) {
                        crate::relay::certs().answer(id, Err(format!("the tunnel is not up: {e}")));
                    }
                }
            }
            _ = usage_check.tick() => {
                if let Some(r) = usage.due(Instant::now(), agent.cfg.usage_every) {
                    if let Err(e) = ctl.send_usage(r) {
                        tracing::debug!("usage not sent: {e}");
                    }
                }
            }
            s = &mut probe => {
                ending = Some(Ended::Upgrade(s));
                ctl.close(Instant::now(), "moving to QUIC");
            }
            _ = agent.shutdown.cancelled() => {
                ending = Some(Ended::Shutdown);
                ctl.close(Instant::now(), "agent shutting down");
            }
        }
        if let Some(reason) = drive(agent, &mut ctl, &mut writer, &gate, &audit_ack).await {
            break ending.take().unwrap_or(Ended::Lost(reason));
        }
    };
    // Moving to QUIC closes the TCP tunnel from the gateway's side, which can win the race
    // against the probe's Welcome: give an attempt in flight a moment to finish.
    // A closed connection also fails the control stream; its own reason says more.
    let ended = match ended {
        Ended::Lost(_) if conn.close_reason().is_some() => {
            Ended::Lost(describe(conn.closed().await))
        }
        other => other,
    };
    let ended = match ended {
        Ended::Lost(reason) if may_upgrade => {
            match tokio::time::timeout(UPGRADE_GRACE, &mut probe).await {
                Ok(s) => Ended::Upgrade(s),
                Err(_) => Ended::Lost(reason),
            }
        }
        other => other,
    };
    accept_task.abort();
    read_task.abort();
    if let Some(t) = ship_task {
        t.abort();
    }
    match &ended {
        Ended::Upgrade(_) => conn.close("moving to QUIC"),
        Ended::Shutdown => conn.close("agent shutting down"),
        Ended::Lost(reason) => conn.close(reason),
    }
    ended
}

async fn accept_loop(
    conn: Arc<dyn Tunnel>,
    gate: Arc<WriteGate>,
    services: Arc<crate::services::Services>,
) {
    while let Some(stream) = conn.accept().await {
        let stream: BoxedStream = Box::new(gate.gate(stream));
        tokio::spawn(crate::services::handle(services.clone(), stream));
    }
}
