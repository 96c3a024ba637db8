//! One tunnel session: Hello/Welcome on the control stream, then serve the gateway's
//! streams, keep the tunnel alive (pings on TCP; QUIC keeps itself alive), renew the
//! certificates when due, and, while on TCP, probe QUIC in the background and move over as
//! soon as UDP works again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_net::clock::now_secs;
use edgeport_net::{read_frame, write_frame};
use edgeport_net::{BoxedStream, Tunnel};
use edgeport_proto::rpc::{RpcError, Transport};
use edgeport_proto::tunnel::{AgentControl, GatewayControl, Hello};
use edgeport_proto::FrameError;
use tokio::io::{ReadHalf, WriteHalf};

use crate::agent::Agent;
use crate::backoff::unit_random;
use crate::config::TransportChoice;
use crate::identity::DeviceIdentity;
use crate::transport::{describe, explain, QuicClient};

/// Deadline for the Hello/Welcome exchange and for control writes.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a QUIC probe in flight may take to finish after the TCP tunnel ended.
const UPGRADE_GRACE: Duration = Duration::from_secs(2);
/// How often the certificates' age is checked.
const RENEW_CHECK: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the gateway refused the tunnel: {0}")]
    Refused(RpcError),
    #[error("{0}")]
    Failed(String),
}

/// An established tunnel (Welcome received).
pub struct Session {
    pub conn: Arc<dyn Tunnel>,
    reader: ReadHalf<BoxedStream>,
    writer: WriteHalf<BoxedStream>,
    pub gateway_id: String,
}

/// How a session ended.
pub enum Ended {
    /// The tunnel is gone; reconnect after a backoff.
    Lost(String),
    /// A QUIC tunnel replaced the TCP one; serve it next, no backoff.
    Upgrade(Session),
    Shutdown,
}

/// Opens the control stream, says Hello and waits for Welcome.
pub async fn establish(
    conn: Arc<dyn Tunnel>,
    ident: &DeviceIdentity,
    kube_cluster: Option<String>,
) -> Result<Session, SessionError> {
    let fut = async {
        let stream = conn.open().await.map_err(|e| {
            SessionError::Failed(explain(format!("opening the control stream: {e}")))
        })?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let hello = AgentControl::Hello(Hello {
            device_id: ident.device_id.clone(),
            labels: ident.labels.clone(),
            version: edgeport_proto::VERSION.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            kube_cluster,
        });
        write_frame(&mut writer, &hello)
            .await
            .map_err(|e| SessionError::Failed(explain(format!("sending Hello: {e}"))))?;
        match read_frame::<GatewayControl, _>(&mut reader).await {
            Ok(GatewayControl::Welcome { gateway_id, .. }) => Ok(Session {
                conn: conn.clone(),
                reader,
                writer,
                gateway_id,
            }),
            Ok(GatewayControl::Refused(e)) => Err(SessionError::Refused(e)),
            Ok(_) => Err(SessionError::Failed("unexpected answer to Hello".into())),
            Err(FrameError::Closed | FrameError::Truncated) => Err(SessionError::Failed(
                "the gateway closed the tunnel during Hello (is this device's certificate from \
                 this cluster and still valid?)"
                    .into(),
            )),
            Err(e) => Err(SessionError::Failed(explain(format!(
                "waiting for Welcome: {e}"
            )))),
        }
    };
    match tokio::time::timeout(CONTROL_TIMEOUT, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            conn.close("hello failed");
            Err(e)
        }
        Err(_) => {
            conn.close("hello timed out");
            Err(SessionError::Failed(
                "no Welcome from the gateway in time".into(),
            ))
        }
    }
}

/// How quinn reports a server that refused a new connection (`ConnectionError::ConnectionRefused`).
const QUIC_REFUSED: &str = "refused to accept a new connection";

/// Connects: QUIC first, TCP+TLS+yamux if QUIC does not come up in time (or only one of
/// them, as `--transport` says).
pub async fn connect(agent: &Agent, quic: &mut QuicClient) -> Result<Session, SessionError> {
    let cfg = &agent.cfg;
    let ident = agent.identity();
    let peer = crate::join::resolve(&cfg.gateway)
        .await
        .map_err(SessionError::Failed)?;
    if cfg.transport != TransportChoice::Tcp {
        let quic_only = cfg.transport == TransportChoice::Quic;
        match quic.connect(cfg, &ident, peer).await {
            Ok(conn) => match establish(conn, &ident, cfg.kube_cluster.clone()).await {
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
            Err(e) if e.contains(QUIC_REFUSED) => {
                return Err(SessionError::Failed(format!(
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
    let conn = crate::transport::connect_tcp(&ident, peer)
        .await
        .map_err(SessionError::Failed)?;
    establish(conn, &ident, cfg.kube_cluster.clone()).await
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
            let peer = crate::join::resolve(&agent.cfg.gateway).await?;
            let conn = quic.connect(&agent.cfg, &ident, peer).await?;
            establish(conn, &ident, agent.cfg.kube_cluster.clone())
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

async fn send(w: &mut WriteHalf<BoxedStream>, msg: &AgentControl) -> Result<(), String> {
    match tokio::time::timeout(CONTROL_TIMEOUT, write_frame(w, msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("control stream: {e}")),
        Err(_) => Err("control stream: write timed out".into()),
    }
}

/// Serves the session until the tunnel ends, moves to QUIC, or the agent shuts down.
pub async fn serve(agent: &Agent, session: Session, quic: &mut QuicClient) -> Ended {
    let Session {
        conn,
        mut reader,
        mut writer,
        ..
    } = session;
    let accept_task = tokio::spawn(accept_loop(conn.clone(), agent.services.clone()));
    // Audit: the shipper sends batches through `audit_out`; acks come back on `audit_ack`.
    let (audit_tx, mut audit_out) = tokio::sync::mpsc::channel::<AgentControl>(2);
    let (audit_ack, audit_acks) = tokio::sync::mpsc::channel(2);
    let ship_task = agent.audit.clone().map(|shared| {
        let ident = agent.identity();
        tokio::spawn(crate::audit::ship::run(
            shared,
            ident.device_id.clone(),
            ident.key.clone(),
            edgeport_proto::audit::raw_ed25519(&ident.cas.host_ca),
            agent.audit_tamper(),
            audit_tx,
            audit_acks,
        ))
    });
    // Frames are read on their own task: `read_frame` is not cancel-safe, and the loop
    // below selects over timers too.
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel(8);
    let read_task = tokio::spawn(async move {
        loop {
            let f = read_frame::<GatewayControl, _>(&mut reader).await;
            let end = f.is_err();
            if frames_tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    // A transport that does not keep itself alive (TCP) needs pings on the control stream.
    let needs_pings = !conn.keeps_alive();
    // Only `--transport auto` moves a TCP tunnel back to QUIC.
    let may_upgrade =
        conn.transport() == Transport::Tcp && agent.cfg.transport == TransportChoice::Auto;
    let mut ping = tokio::time::interval(agent.cfg.keepalive);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renew_check = tokio::time::interval(RENEW_CHECK);
    renew_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut ping_sent: Option<(u64, Instant)> = None;
    let mut rtt_ms: Option<u32> = None;
    let mut last_heard = Instant::now();
    let mut renew_pending = false;
    let mut probe = std::pin::pin!(async {
        if may_upgrade {
            probe_quic(agent, quic).await
        } else {
            std::future::pending().await
        }
    });
    let ended = loop {
        tokio::select! {
            frame = frames.recv() => {
                last_heard = Instant::now();
                let frame = frame.unwrap_or(Err(FrameError::Closed));
                match frame {
                    Ok(GatewayControl::Pong { seq: s }) => {
                        if let Some((sent_seq, at)) = ping_sent {
                            if s == sent_seq {
                                rtt_ms = Some(at.elapsed().as_millis().min(u32::MAX as u128) as u32);
                                ping_sent = None;
                            }
                        }
                    }
                    Ok(GatewayControl::Renewed(certs)) if renew_pending => {
                        renew_pending = false;
                        agent.renewed(&certs);
                    }
                    Ok(GatewayControl::Renewed(_)) => {
                        tracing::warn!("the gateway sent certificates nobody asked for; ignored");
                    }
                    Ok(GatewayControl::Refused(e)) if renew_pending => {
                        renew_pending = false;
                        tracing::warn!("certificate renewal refused: {e}");
                    }
                    Ok(GatewayControl::Refused(e)) => {
                        break Ended::Lost(format!("the gateway refused the tunnel: {e}"));
                    }
                    Ok(GatewayControl::Locked { users }) => agent.services.set_locked_users(users),
                    Ok(GatewayControl::Welcome { .. }) => {}
                    Ok(GatewayControl::AuditAck(a)) => {
                        let _ = audit_ack.try_send(a);
                    }
                    Err(FrameError::Closed) => break Ended::Lost("the gateway closed the control stream".into()),
                    Err(e) => break Ended::Lost(format!("control stream: {e}")),
                }
            }
            _ = ping.tick(), if needs_pings => {
                if last_heard.elapsed() > agent.cfg.idle_timeout {
                    break Ended::Lost(format!(
                        "nothing heard from the gateway for {}s", agent.cfg.idle_timeout.as_secs()
                    ));
                }
                seq += 1;
                if ping_sent.is_none() {
                    ping_sent = Some((seq, Instant::now()));
                }
                if let Err(e) = send(&mut writer, &AgentControl::Ping { seq, rtt_ms }).await {
                    break Ended::Lost(e);
                }
            }
            _ = renew_check.tick() => {
                let ident = agent.identity();
                if !renew_pending && (ident.needs_renewal(now_secs()) || agent.take_forced_renew()) {
                    tracing::info!("certificates are due for renewal; asking the gateway");
                    let msg = AgentControl::Renew { ssh_public_key: ident.key.public_openssh() };
                    if let Err(e) = send(&mut writer, &msg).await {
                        break Ended::Lost(e);
                    }
                    renew_pending = true;
                }
            }
            Some(msg) = audit_out.recv() => {
                if let Err(e) = send(&mut writer, &msg).await {
                    break Ended::Lost(e);
                }
            }
            reason = conn.closed() => break Ended::Lost(describe(reason)),
            s = &mut probe => break Ended::Upgrade(s),
            _ = agent.shutdown.cancelled() => break Ended::Shutdown,
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

async fn accept_loop(conn: Arc<dyn Tunnel>, services: Arc<crate::services::Services>) {
    while let Some(stream) = conn.accept().await {
        tokio::spawn(crate::services::handle(services.clone(), stream));
    }
}
