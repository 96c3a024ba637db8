//! One device's tunnel, from the moment its TLS (or QUIC) handshake completed: identify the
//! device from its certificate, take the control stream, check Hello, register the tunnel,
//! then serve control frames (keep-alive, renewal) until the connection ends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeport_net::clock::now_secs;
use edgeport_net::{read_frame, write_frame};
use edgeport_net::{BoxedStream, CloseReason};
use edgeport_proto::identity::Principal;
use edgeport_proto::keys::sha256_hex;
use edgeport_proto::rpc::{ErrorKind, RenewDeviceRequest, Request, Response, RpcError};
use edgeport_proto::tunnel::{AgentControl, GatewayControl};
use edgeport_proto::FrameError;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;

use crate::ctx::Ctx;
use crate::tunnels::Tunnel;

/// The device named by a verified client certificate chain: (device id, cert fingerprint).
/// The chain was already verified against the cluster CA by rustls; this checks the SPIFFE
/// name (cluster and kind). The device id comes from here and nowhere else.
pub fn device_from_certs(
    ctx: &Ctx,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<(String, String), String> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or("no client certificate (a device certificate is required for tunnels)")?;
    let cluster = ctx.identity().cluster().to_string();
    match edgeport_proto::tls::peer_principal(leaf.as_ref(), &cluster) {
        Ok(Principal::Device(id)) => Ok((id, sha256_hex(leaf.as_ref()))),
        Ok(p) => Err(format!("{p} may not open a device tunnel")),
        Err(e) => Err(format!("bad device certificate: {e}")),
    }
}

async fn refuse(stream: &mut BoxedStream, kind: ErrorKind, message: String) {
    let reply = GatewayControl::Refused(RpcError::new(kind, message));
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = write_frame(stream, &reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves a tunnel until it ends.
pub async fn serve(
    ctx: Arc<Ctx>,
    conn: Arc<dyn edgeport_net::Tunnel>,
    device_id: String,
    fingerprint: String,
    remote_addr: SocketAddr,
) {
    let timeout = ctx.cfg.handshake_timeout;
    let Ok(Some(mut stream)) = tokio::time::timeout(timeout, conn.accept()).await else {
        tracing::info!(device = %device_id, %remote_addr, "tunnel dropped: no control stream in time");
        conn.close("no control stream");
        return;
    };
    // Agents open exactly one stream (control); refuse more.
    conn.stop_accepting();
    let hello = match tokio::time::timeout(timeout, read_frame::<AgentControl, _>(&mut stream))
        .await
    {
        Ok(Ok(AgentControl::Hello(h))) => h,
        Ok(Ok(_)) => {
            refuse(
                &mut stream,
                ErrorKind::Invalid,
                "expected Hello first".into(),
            )
            .await;
            conn.close("protocol error");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(device = %device_id, %remote_addr, "tunnel dropped: bad Hello: {e}");
            conn.close("bad hello");
            return;
        }
        Err(_) => {
            tracing::info!(device = %device_id, %remote_addr, "tunnel dropped: no Hello in time");
            conn.close("no hello");
            return;
        }
    };
    if ctx.tunnels.is_revoked(&fingerprint) {
        tracing::info!(device = %device_id, %remote_addr, "refused a revoked device certificate");
        refuse(
            &mut stream,
            ErrorKind::Denied,
            format!("device {device_id} was removed from the cluster; join again with a new token"),
        )
        .await;
        conn.close("device revoked");
        return;
    }
    if hello.device_id != device_id {
        tracing::warn!(
            device = %device_id, claimed = %hello.device_id, %remote_addr,
            "refused a Hello that names another device"
        );
        refuse(
            &mut stream,
            ErrorKind::Denied,
            format!(
                "Hello names device {:?} but the certificate is for {device_id:?}",
                hello.device_id
            ),
        )
        .await;
        conn.close("device id mismatch");
        return;
    }

    let (reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<GatewayControl>(16);
    let transport = conn.transport();
    let generation = ctx.tunnels.next_generation();
    let tunnel = Arc::new(Tunnel {
        device_id: device_id.clone(),
        generation,
        conn: conn.clone(),
        hello,
        remote_addr,
        connected_at: now_secs(),
        cert_fingerprint: fingerprint,
        control: tx.clone(),
        tcp_rtt_ms: Default::default(),
        close_reason: Mutex::new(None),
    });
    ctx.tunnels.register(tunnel.clone());
    tracing::info!(
        device = %device_id, transport = transport.as_str(), %remote_addr,
        version = %tunnel.hello.version, "device online"
    );
    let _ = tx.try_send(GatewayControl::Welcome {
        gateway_id: ctx.identity().gateway_id.clone(),
        transport,
    });
    let locked = ctx.locked_users();
    if !locked.is_empty() {
        let _ = tx.try_send(GatewayControl::Locked { users: locked });
    }
    // One writer: control frames from anywhere in the gateway go through the channel.
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let w = tokio::time::timeout(Duration::from_secs(30), write_frame(&mut writer, &msg));
            if !matches!(w.await, Ok(Ok(()))) {
                break;
            }
        }
    });

    let observed = tokio::select! {
        r = control_loop(&ctx, &tunnel, reader, tx) => r,
        r = conn.closed() => describe(r),
        _ = ctx.shutdown.cancelled() => "gateway shutting down".to_string(),
    };
    // A closed connection also fails the control stream; its own reason says more.
    let observed = match conn.close_reason() {
        Some(r) => describe(r),
        None => observed,
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
    ctx.tunnels.unregister(&device_id, generation, reason);
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

/// Renewals and audit batches one tunnel may have relayed to the authority at once.
const RELAYS_PER_TUNNEL: usize = 2;

async fn control_loop(
    ctx: &Arc<Ctx>,
    tunnel: &Arc<Tunnel>,
    mut reader: ReadHalf<BoxedStream>,
    tx: mpsc::Sender<GatewayControl>,
) -> String {
    let idle = if tunnel.conn.keeps_alive() {
        // The transport (QUIC) negotiates its own idle timeout with the agent.
        Duration::from_secs(365 * 86400)
    } else {
        ctx.cfg.tunnel_idle_timeout
    };
    // Renewals and audit batches relayed at once for this tunnel: a device that sends more
    // waits (its frames are not read meanwhile) instead of piling up tasks here.
    let relays = Arc::new(tokio::sync::Semaphore::new(RELAYS_PER_TUNNEL));
    loop {
        let frame =
            match tokio::time::timeout(idle, read_frame::<AgentControl, _>(&mut reader)).await {
                Err(_) => {
                    return format!(
                        "idle timeout (no keep-alive from the device for {}s)",
                        idle.as_secs()
                    )
                }
                Ok(Err(FrameError::Closed)) => return "closed by the device".into(),
                Ok(Err(e)) => return format!("control stream: {e}"),
                Ok(Ok(f)) => f,
            };
        match frame {
            AgentControl::Ping { seq, rtt_ms } => {
                if let Some(rtt) = rtt_ms {
                    tunnel.tcp_rtt_ms.store(rtt, Ordering::Relaxed);
                }
                let _ = tx.try_send(GatewayControl::Pong { seq });
            }
            AgentControl::Renew { ssh_public_key } => {
                let Ok(permit) = relays.clone().acquire_owned().await else {
                    return "closing".into();
                };
                let ctx = ctx.clone();
                let tx = tx.clone();
                let device_id = tunnel.device_id.clone();
                tokio::spawn(async move {
                    let reply = renew_device(&ctx, device_id, ssh_public_key).await;
                    drop(permit);
                    let _ = tx.send(reply).await;
                });
            }
            AgentControl::Hello(_) => {
                tracing::debug!(device = %tunnel.device_id, "ignored a second Hello");
            }
            AgentControl::Audit(batch) => {
                // The agent waits for the ack before it sends the next batch.
                let Ok(permit) = relays.clone().acquire_owned().await else {
                    return "closing".into();
                };
                let ctx = ctx.clone();
                let tx = tx.clone();
                let device_id = tunnel.device_id.clone();
                tokio::spawn(async move {
                    let reply = crate::audit::relay_batch(&ctx, device_id, batch).await;
                    drop(permit);
                    let _ = tx.send(reply).await;
                });
            }
        }
    }
}

async fn renew_device(ctx: &Ctx, device_id: String, ssh_public_key: String) -> GatewayControl {
    let req = Request::RenewDevice(RenewDeviceRequest {
        device_id: device_id.clone(),
        ssh_public_key,
    });
    match ctx.auth.call(req).await {
        Ok(Response::DeviceCerts(c)) => {
            tracing::info!(device = %device_id, "renewed device certificates");
            GatewayControl::Renewed(c)
        }
        Ok(other) => GatewayControl::Refused(RpcError::new(
            ErrorKind::Internal,
            format!("unexpected answer from the authority: {other:?}"),
        )),
        Err(e) => {
            tracing::warn!(device = %device_id, "renewal failed: {e}");
            GatewayControl::Refused(crate::identity::unavailable(&e))
        }
    }
}
