//! The gateway's part in audit: it relays devices' signed batches from their control streams
//! to the authority (one at a time per device; the authority's answer goes back as the ack),
//! reports its own dial events, and serves recordings to tsh (the user's own sessions).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgeport_net::write_frame;
use edgeport_net::BoxedStream;
use edgeport_proto::audit::{AuditAck, AuditBatch, AuditEvent};
use edgeport_proto::rpc::{Request, Response};
use edgeport_proto::tunnel::ClientReply;
use tokio_util::sync::CancellationToken;

use crate::authority::AuthorityClient;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Relays one batch of `device_id` (from its tunnel certificate) and returns the ack.
pub async fn relay_batch(auth: &AuthorityClient, device_id: String, batch: AuditBatch) -> AuditAck {
    let n = batch.events.len();
    match auth
        .call(Request::AuditUpload {
            device_id: device_id.clone(),
            batch,
        })
        .await
    {
        Ok(Response::AuditAck(a)) => {
            tracing::debug!(device = %device_id, events = n, acked = a.acked_seq, "audit batch stored");
            a
        }
        Ok(other) => AuditAck {
            acked_seq: 0,
            last_hash: String::new(),
            error: Some(edgeport_net::rpc_client::unexpected(other).to_string()),
            signature: Vec::new(),
        },
        Err(e) => {
            tracing::info!(device = %device_id, "audit batch not stored: {e}");
            AuditAck {
                acked_seq: 0,
                last_hash: String::new(),
                error: Some(e.to_string()),
                signature: Vec::new(),
            }
        }
    }
}

/// Events waiting for the sink, at most (a flood of requests must not grow memory).
const SINK_QUEUE: usize = 10_000;
/// Events sent to the authority in one request, at most (well inside a 64 KiB frame).
const SINK_BATCH: usize = 100;
/// After the first event, wait this long for more, so that a burst (a script dialling in a
/// loop, the many requests of one kubectl command) goes in one request instead of one each.
const LINGER: Duration = Duration::from_millis(100);

static SINK: std::sync::OnceLock<tokio::sync::mpsc::Sender<AuditEvent>> =
    std::sync::OnceLock::new();

/// Queues one of the gateway's own events (dials, Kubernetes requests) for the authority.
/// Never blocks: with the queue full (the authority unreachable for long) the event is only
/// logged, which the caller already did.
pub fn emit(ev: AuditEvent) {
    if let Some(tx) = SINK.get() {
        // One warning per outage, not one per event: a flood of requests while the authority
        // is away must not turn into a flood of log lines.
        let sent = tx.try_send(ev).is_ok();
        crate::metrics::audit_events(if sent { "own_sent" } else { "own_lost" }, 1);
        if !sent && DROPPED.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!("audit queue full: gateway events are not reaching the authority");
        }
    }
}

/// Events dropped since the queue last had room (reported when it drains).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Sends queued events to the authority in batches until shutdown. Started once per process.
pub async fn run_sink(auth: Arc<AuthorityClient>, shutdown: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(SINK_QUEUE);
    if SINK.set(tx).is_err() {
        return;
    }
    let mut batch = Vec::with_capacity(SINK_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, SINK_BATCH) => if n == 0 { return },
            _ = shutdown.cancelled() => return,
        }
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < SINK_BATCH {
            let room = SINK_BATCH - batch.len();
            tokio::select! {
                _ = &mut linger => break,
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
            }
        }
        let events = std::mem::take(&mut batch);
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "gateway audit events were dropped while the queue was full"
            );
        }
        let mut delay = Duration::from_millis(500);
        loop {
            match auth.call(Request::AuditRecord(events.clone())).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(
                        "cannot report {} gateway events to the authority: {e}",
                        events.len()
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// One dial, allowed or refused, as the gateway reports it.
pub struct Dial<'a> {
    pub user: &'a str,
    pub target: &'a str,
    pub device: &'a str,
    pub session_id: &'a str,
    pub client: &'a str,
    pub service: &'a str,
    /// The other gateway of a forwarded dial: the holder at the gateway the user reached,
    /// the forwarder at the holder.
    pub via: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Reports a dial (allowed or refused) to the authority, in the background (see [`emit`]).
pub fn dial_event(d: Dial<'_>) {
    let mut ev = AuditEvent::new("gateway.dial", now_ms());
    ev.user = d.user.to_string();
    ev.session_id = d.session_id.to_string();
    ev.fields.insert("device".into(), d.device.to_string());
    ev.fields.insert("target".into(), d.target.to_string());
    ev.fields.insert("client_addr".into(), d.client.to_string());
    ev.fields.insert("service".into(), d.service.to_string());
    ev.fields
        .insert("success".into(), d.error.is_none().to_string());
    if let Some(v) = d.via {
        ev.fields.insert("via".into(), v.to_string());
    }
    if let Some(e) = d.error {
        ev.fields.insert("error".into(), e.to_string());
    }
    tracing::info!(user = %d.user, target = %d.target, device = %d.device, session = %d.session_id,
        client = %d.client, via = d.via.unwrap_or(""), allowed = d.error.is_none(), "dial");
    emit(ev);
}

async fn send(stream: &mut BoxedStream, msg: &ClientReply) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(30), write_frame(stream, msg)).await,
        Ok(Ok(()))
    )
}

/// `tsh recordings ls`.
pub async fn list(auth: &AuthorityClient, who: &crate::grants::UserCert) -> ClientReply {
    match auth
        .call(Request::RecordingList {
            user: None,
            user_cert_der: Some(who.der.as_ref().clone()),
        })
        .await
    {
        Ok(Response::Recordings(r)) => ClientReply::Recordings(r),
        Ok(other) => ClientReply::Refused(edgeport_proto::rpc::RpcError::new(
            edgeport_proto::rpc::ErrorKind::Internal,
            edgeport_net::rpc_client::unexpected(other).to_string(),
        )),
        Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
    }
}

/// `tsh recordings ls`: one page, newest first, and the cursor of the next.
pub async fn page(
    auth: &AuthorityClient,
    who: &crate::grants::UserCert,
    cursor: Option<String>,
    limit: u32,
) -> ClientReply {
    match auth
        .call(Request::RecordingPage {
            user: None,
            user_cert_der: Some(who.der.as_ref().clone()),
            cursor,
            limit,
        })
        .await
    {
        Ok(Response::RecordingPage { recordings, next }) => {
            ClientReply::RecordingPage { recordings, next }
        }
        Ok(other) => ClientReply::Refused(edgeport_proto::rpc::RpcError::new(
            edgeport_proto::rpc::ErrorKind::Internal,
            edgeport_net::rpc_client::unexpected(other).to_string(),
        )),
        Err(edgeport_net::rpc_client::RpcClientError::Remote(e)) => ClientReply::Refused(e),
        Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
    }
}

/// `tsh play`: the recording from `offset` in pieces, then `more: false`. Each piece is one
/// request to the authority, which reads only the bytes it returns.
pub async fn stream_recording(
    auth: &AuthorityClient,
    stream: &mut BoxedStream,
    who: &crate::grants::UserCert,
    session_id: String,
    offset: u64,
) {
    let mut offset = offset;
    loop {
        let req = Request::RecordingGet {
            session_id: session_id.clone(),
            user: None,
            offset,
            user_cert_der: Some(who.der.as_ref().clone()),
        };
        let reply = match auth.call(req).await {
            Ok(Response::RecordingData { data, total }) => {
                offset += data.len() as u64;
                let more = !data.is_empty() && offset < total;
                let done = !more;
                if !send(stream, &ClientReply::RecordingData { data, more }).await || done {
                    return;
                }
                continue;
            }
            Ok(other) => ClientReply::Refused(edgeport_proto::rpc::RpcError::new(
                edgeport_proto::rpc::ErrorKind::Internal,
                edgeport_net::rpc_client::unexpected(other).to_string(),
            )),
            Err(edgeport_net::rpc_client::RpcClientError::Remote(e)) => ClientReply::Refused(e),
            Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
        };
        let _ = send(stream, &reply).await;
        return;
    }
}
