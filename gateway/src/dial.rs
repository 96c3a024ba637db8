//! User streams (`edgeport-dial/1`), from tsh over QUIC (many streams per connection) or
//! TCP+TLS (one stream per connection). Each stream starts with a [`ClientRequest`]:
//! `Login` is anonymous and relayed to the authority; `ListDevices` and `Dial` need a user
//! certificate. An allowed dial opens a stream to the device and splices the two; after the
//! `DialOk` reply the bytes are the client's and the device's business (SSH end to end).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::identity::Principal;
use edgeport_proto::keys::random_bytes;
use edgeport_proto::rpc::{ErrorKind, LockTarget, Request, Response, RpcError};
use edgeport_proto::tunnel::{ClientReply, ClientRequest, Service, StreamHeader};
use edgeport_proto::util::BoxedStream;
use edgeport_proto::{read_frame, write_frame};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::ctx::Ctx;
use crate::splice_dump::Tapped;
use crate::tunnels::TunnelError;

/// How long a QUIC connection without a client certificate may stay, and how many streams
/// (logins) it may open.
const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(60);
const ANONYMOUS_STREAMS: usize = 4;

/// Splice buffer per direction: large, so bulk transfers move in few syscalls.
const SPLICE_BUF: usize = 256 * 1024;

/// The user named by a verified client certificate of this cluster, if any.
pub fn principal_of(ctx: &Ctx, certs: Option<&[CertificateDer<'_>]>) -> Option<Principal> {
    let leaf = certs?.first()?;
    edgeport_proto::tls::peer_principal(leaf.as_ref(), ctx.identity().cluster()).ok()
}

/// Serves every stream tsh opens on one QUIC connection.
pub async fn serve_quic(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    principal: Option<Principal>,
    addr: SocketAddr,
) {
    // Without a certificate a client can only log in: a few streams and a short life, so
    // idle anonymous connections cannot pile up against the connection limit that device
    // tunnels share.
    let anonymous = principal.is_none();
    if matches!(principal, Some(Principal::Gateway(_))) {
        // A peer gateway's link carries every dial it forwards here.
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(crate::peers::LINK_STREAMS));
    }
    let deadline = tokio::time::Instant::now() + ANONYMOUS_LIFETIME;
    let mut streams = 0usize;
    loop {
        if anonymous && streams >= ANONYMOUS_STREAMS {
            conn.close(quinn::VarInt::from_u32(0), b"log in first");
            return;
        }
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            _ = tokio::time::sleep_until(deadline), if anonymous => {
                conn.close(quinn::VarInt::from_u32(0), b"log in first");
                return;
            }
            _ = ctx.shutdown.cancelled() => {
                conn.close(quinn::VarInt::from_u32(0), b"gateway shutting down");
                return;
            }
        };
        let Ok((send, recv)) = accepted else { return };
        streams += 1;
        let ctx = ctx.clone();
        let principal = principal.clone();
        tokio::spawn(async move {
            serve_stream(ctx, Box::new(tokio::io::join(recv, send)), principal, addr).await;
        });
    }
}

fn refused(kind: ErrorKind, msg: impl Into<String>) -> ClientReply {
    ClientReply::Refused(RpcError::new(kind, msg))
}

async fn reply(stream: &mut BoxedStream, msg: &ClientReply) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), write_frame(stream, msg)).await,
        Ok(Ok(()))
    )
}

/// The devices `user`'s roles reach, from the authority, page by page.
async fn user_devices(
    ctx: &Ctx,
    user: &str,
) -> Result<Vec<edgeport_proto::rpc::DeviceInfo>, edgeport_proto::rpc_client::RpcClientError> {
    use edgeport_proto::rpc_client::add_device_page;
    let (mut devices, mut next) = (Vec::new(), Some(String::new()));
    while let Some(after) = next {
        let req = Request::UserDevicePage {
            user: user.to_string(),
            after,
        };
        next = add_device_page(&mut devices, ctx.auth.call(req).await?)?;
    }
    Ok(devices)
}

/// Serves one dial stream: request, answer, and for `Dial` the splice.
pub async fn serve_stream(
    ctx: Arc<Ctx>,
    mut stream: BoxedStream,
    principal: Option<Principal>,
    addr: SocketAddr,
) {
    let req = match tokio::time::timeout(
        ctx.cfg.handshake_timeout,
        read_frame::<ClientRequest, _>(&mut stream),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(%addr, "dial stream dropped: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "dial stream dropped: no request in time");
            return;
        }
    };
    let user = match &principal {
        Some(Principal::User(u)) => Some(u.clone()),
        _ => None,
    };
    let answer = match (req, user) {
        (ClientRequest::Login(mut login), _) => {
            login.client_addr = addr.to_string();
            match ctx.auth.call(Request::Login(login)).await {
                Ok(Response::UserCerts(c)) => ClientReply::LoggedIn(c),
                Ok(other) => refused(
                    ErrorKind::Internal,
                    edgeport_proto::rpc_client::unexpected(other).to_string(),
                ),
                Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
            }
        }
        // Single sign-on is the authority's: it holds the connectors' secrets, redeems the
        // code and verifies who it is. The gateway only relays, with the client's address.
        (
            ClientRequest::SsoStart {
                connector,
                redirect_uri,
                proof_hash,
            },
            _,
        ) => {
            let start = edgeport_proto::rpc::SsoStartRequest {
                connector,
                redirect_uri,
                proof_hash,
                client_addr: addr.to_string(),
            };
            match ctx.auth.call(Request::SsoStart(start)).await {
                Ok(Response::SsoRedirect { auth_url }) => ClientReply::SsoRedirect { auth_url },
                Ok(other) => refused(
                    ErrorKind::Internal,
                    edgeport_proto::rpc_client::unexpected(other).to_string(),
                ),
                Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
            }
        }
        (ClientRequest::SsoFinish(f), _) => {
            let finish = edgeport_proto::rpc::SsoFinishRequest {
                state: f.state,
                code: f.code,
                proof: f.proof,
                ssh_public_key: f.ssh_public_key,
                ttl_secs: f.ttl_secs,
                client_addr: addr.to_string(),
            };
            match ctx.auth.call(Request::SsoFinish(finish)).await {
                Ok(Response::UserCerts(c)) => ClientReply::LoggedIn(c),
                Ok(other) => refused(
                    ErrorKind::Internal,
                    edgeport_proto::rpc_client::unexpected(other).to_string(),
                ),
                Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
            }
        }
        (ClientRequest::ListDevices, Some(user)) => match user_devices(&ctx, &user).await {
            Ok(devices) => {
                // Large fleets go in parts, each one frame; the last part is `Devices`.
                let mut parts = edgeport_proto::frame::chunk_by_size(devices);
                let last = parts.pop().unwrap_or_default();
                for part in parts {
                    if !reply(&mut stream, &ClientReply::DevicesPart(part)).await {
                        return;
                    }
                }
                ClientReply::Devices(last)
            }
            Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
        },
        (ClientRequest::Recordings, Some(user)) => crate::audit::list(&ctx, &user).await,
        (ClientRequest::Recording { session_id }, Some(user)) => {
            crate::audit::stream_recording(&ctx, &mut stream, &user, session_id).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await;
            return;
        }
        (ClientRequest::Dial { target, service }, Some(user)) => {
            let result = dial(&ctx, &user, &target, service, addr).await;
            let svc = format!("{service:?}").to_lowercase();
            match &result {
                Ok((_, sid, dev)) => crate::audit::dial_event(
                    &user,
                    &target,
                    dev,
                    sid,
                    &addr.to_string(),
                    &svc,
                    None,
                ),
                Err(e) => crate::audit::dial_event(
                    &user,
                    &target,
                    "",
                    "",
                    &addr.to_string(),
                    &svc,
                    Some(&e.message),
                ),
            }
            match result {
                Ok((device_stream, session_id, device_id)) => {
                    let ok = ClientReply::DialOk {
                        session_id: session_id.clone(),
                        device_id: device_id.clone(),
                    };
                    if reply(&mut stream, &ok).await {
                        match &ctx.cfg.splice_dump {
                            Some(dir) => {
                                let client = Tapped::new(stream, dir, &format!("{session_id}.c2s"));
                                let device =
                                    Tapped::new(device_stream, dir, &format!("{session_id}.s2c"));
                                splice(&ctx, client, device, &user, &device_id, &session_id).await;
                            }
                            None => {
                                splice(&ctx, stream, device_stream, &user, &device_id, &session_id)
                                    .await
                            }
                        }
                    }
                    return;
                }
                Err(e) => ClientReply::Refused(e),
            }
        }
        (ClientRequest::Forward { device_id, header }, _) => match &principal {
            Some(Principal::Gateway(from)) if *from != ctx.identity().gateway_id => {
                serve_forward(&ctx, stream, from, device_id, header).await;
                return;
            }
            _ => refused(
                ErrorKind::Denied,
                "forwarding needs the certificate of another gateway of this cluster",
            ),
        },
        (_, None) => refused(
            ErrorKind::Denied,
            "this request needs a user certificate (run `tsh login`)",
        ),
    };
    if reply(&mut stream, &answer).await {
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await;
    }
}

async fn dial(
    ctx: &Ctx,
    user: &str,
    target: &str,
    service: Service,
    addr: SocketAddr,
) -> Result<(BoxedStream, String, String), RpcError> {
    ctx.check_unlocked(&LockTarget::User(user.to_string()))?;
    let grant = ctx
        .grants
        .authorize(&ctx.auth, user, target, Duration::ZERO)
        .await?;
    let device_id = grant.device.id.clone();
    ctx.check_unlocked(&LockTarget::Device(device_id.clone()))?;
    let session_id = random_bytes(16)
        .map(hex::encode)
        .map_err(|e| RpcError::new(ErrorKind::Internal, e.to_string()))?;
    let header = StreamHeader {
        service,
        user: Some(user.to_string()),
        session_id: session_id.clone(),
        client_addr: addr.to_string(),
        kube_groups: grant.kube_groups.clone(),
        kube_users: grant.kube_users.clone(),
    };
    let stream = crate::peers::open_device_stream(ctx, &grant, &header)
        .await
        .map_err(tunnel_error)?;
    Ok((stream, session_id, device_id))
}

fn tunnel_error(e: TunnelError) -> RpcError {
    match e {
        TunnelError::NotConnected(_) => RpcError::new(ErrorKind::NotFound, e.to_string()),
        TunnelError::Refused(e) => e,
        other => RpcError::new(ErrorKind::Internal, other.to_string()),
    }
}

/// A dial that peer gateway `from` authorised and forwarded for a device whose tunnel is
/// here: open the device stream (this gateway's own tunnels only, never forwarding again),
/// answer `DialOk` and splice.
async fn serve_forward(
    ctx: &Ctx,
    mut stream: BoxedStream,
    from: &str,
    device_id: String,
    mut header: StreamHeader,
) {
    let user = header.user.clone().unwrap_or_default();
    let session_id = header.session_id.clone();
    let checked = tokio::time::timeout(
        crate::peers::HOLDER_GRANT_TIMEOUT,
        forward_grant(ctx, &user, &device_id, header.service),
    )
    .await
    .unwrap_or_else(|_| {
        Err(RpcError::new(
            ErrorKind::Internal,
            "the gateway holding the device cannot reach the authority in time",
        ))
    });
    let opened = match checked {
        Ok(grant) => {
            // Who the device sees in Kubernetes comes from this gateway's own grant, not
            // from the forwarder's header.
            header.kube_groups = grant.kube_groups;
            header.kube_users = grant.kube_users;
            ctx.tunnels
                .open_stream(&device_id, &header)
                .await
                .map_err(tunnel_error)
        }
        Err(e) => Err(e),
    };
    let device_stream = match opened {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(peer = %from, %user, device = %device_id, "forwarded dial refused: {}", e.message);
            reply(&mut stream, &ClientReply::Refused(e)).await;
            return;
        }
    };
    let ok = ClientReply::DialOk {
        session_id: session_id.clone(),
        device_id: device_id.clone(),
    };
    if reply(&mut stream, &ok).await {
        tracing::info!(peer = %from, %user, device = %device_id, session = %session_id, "forwarded dial");
        splice(ctx, stream, device_stream, &user, &device_id, &session_id).await;
    }
}

/// The holder's own check of a forwarded dial: a named user, neither user nor device locked
/// here, and the authority's grant (reused as for the service's own dials) for this device.
async fn forward_grant(
    ctx: &Ctx,
    user: &str,
    device_id: &str,
    service: Service,
) -> Result<edgeport_proto::rpc::DialGrant, RpcError> {
    if user.is_empty() {
        return Err(RpcError::new(
            ErrorKind::Invalid,
            "a forwarded dial must name its user",
        ));
    }
    ctx.check_unlocked(&LockTarget::User(user.to_string()))?;
    ctx.check_unlocked(&LockTarget::Device(device_id.to_string()))?;
    let reuse = match service {
        Service::Kube => crate::grants::KUBE_REUSE,
        Service::Ssh | Service::Echo => Duration::ZERO,
    };
    let grant = ctx
        .grants
        .authorize(&ctx.auth, user, device_id, reuse)
        .await?;
    if grant.device.id != device_id {
        return Err(RpcError::new(
            ErrorKind::Denied,
            format!("{device_id} is not a device id"),
        ));
    }
    Ok(grant)
}

async fn splice<C, D>(
    ctx: &Ctx,
    mut client: C,
    mut device: D,
    user: &str,
    device_id: &str,
    session_id: &str,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    tracing::debug!(%user, device = %device_id, session = %session_id, "stream spliced");
    let reg = ctx.sessions.register(device_id, user);
    let copy =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut device, SPLICE_BUF, SPLICE_BUF);
    let result = tokio::select! {
        r = copy => r,
        _ = reg.cancel.cancelled() => {
            tracing::info!(%user, device = %device_id, session = %session_id, "session cut: locked");
            return;
        }
    };
    match result {
        Ok((up, down)) => tracing::debug!(
            %user, device = %device_id, session = %session_id, up, down, "stream ended"
        ),
        Err(e) => tracing::debug!(
            %user, device = %device_id, session = %session_id, "stream ended: {e}"
        ),
    }
}
