//! User streams (`edgeport-dial/1`), from tsh over QUIC (many streams per connection) or
//! TCP+TLS (one stream per connection). Each stream starts with a [`ClientRequest`]:
//! `Login` is anonymous and relayed to the authority; `ListDevices` and `Dial` need a user
//! certificate. An allowed dial opens a stream to the device and splices the two; after the
//! `DialOk` reply the bytes are the client's and the device's business (SSH end to end).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgeport_net::write_gate::WriteGate;
use edgeport_net::BoxedStream;
use edgeport_net::{read_frame, write_frame};
use edgeport_proto::identity::Principal;
use edgeport_proto::keys::random_bytes;
use edgeport_proto::rpc::{ErrorKind, LockTarget, Request, Response, RpcError};
use edgeport_proto::tunnel::{ClientReply, ClientRequest, Service, StreamHeader};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::grants::UserCert;
use crate::lifecycle::Lifecycle;
use crate::peers::Reach;
use crate::sessions::Sessions;
use crate::splice_dump::Tapped;
use crate::tunnels::TunnelError;

/// How long a QUIC connection without a client certificate may stay, and how many streams
/// (logins) it may open in all; each is answered.
const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(60);
const ANONYMOUS_STREAMS: usize = 4;
/// The connection receive window of a QUIC connection without a client certificate.
const ANONYMOUS_WINDOW: u32 = 256 * 1024;

/// Splice buffer per direction: large, so bulk transfers move in few syscalls.
const SPLICE_BUF: usize = 256 * 1024;

/// What serving user streams needs: the way to devices, the spliced sessions (locks cut
/// them), the forwarded-dial tickets already taken, and the gateway's lifetime.
#[derive(Clone)]
pub struct Dialer {
    pub reach: Reach,
    pub sessions: Arc<Sessions>,
    /// Dial tickets of forwarded dials taken here (each is taken once).
    pub tickets: Arc<edgeport_proto::ticket::ReplayGuard>,
    pub life: Lifecycle,
    /// How long a stream may take to send its request.
    pub request_timeout: Duration,
    /// `--splice-dump`: a test hook that copies spliced bytes to files.
    pub splice_dump: Option<PathBuf>,
}

/// Who is on the other end of a connection, from its verified client certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    pub principal: Principal,
    /// For users: the certificate itself, which the authority checks at every grant.
    pub user: Option<UserCert>,
}

/// The party named by a verified client certificate of this cluster, if any.
pub fn peer_of(cluster: &str, certs: Option<&[CertificateDer<'_>]>) -> Option<Peer> {
    let leaf = certs?.first()?;
    let principal = edgeport_proto::tls::peer_principal(leaf.as_ref(), cluster).ok()?;
    let user = match &principal {
        Principal::User(name) => Some(UserCert::new(name.clone(), leaf.as_ref().to_vec())),
        _ => None,
    };
    Some(Peer { principal, user })
}

/// Serves every stream tsh opens on one QUIC connection.
pub async fn serve_quic(
    dialer: Arc<Dialer>,
    conn: quinn::Connection,
    peer: Option<Peer>,
    addr: SocketAddr,
) {
    // Without a certificate a client can only log in: a few streams and a short life, so
    // idle anonymous connections cannot pile up against the connection limit that device
    // tunnels share.
    let anonymous = peer.is_none();
    if anonymous {
        // A login needs a few KiB: no 64 MiB of buffer for whoever connects.
        conn.set_receive_window(quinn::VarInt::from_u32(ANONYMOUS_WINDOW));
    }
    // Connections start with room for one stream (a device's control stream): a user gets
    // DIAL_STREAMS, an anonymous client just what it may use.
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(if anonymous {
        ANONYMOUS_STREAMS as u32
    } else {
        crate::quic::DIAL_STREAMS
    }));
    if matches!(
        peer.as_ref().map(|p| &p.principal),
        Some(Principal::Gateway(_))
    ) {
        // A peer gateway's link carries every dial it forwards here.
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(crate::peers::LINK_STREAMS));
    }
    let deadline = tokio::time::Instant::now() + ANONYMOUS_LIFETIME;
    let mut streams = 0usize;
    // Replies go ahead of this connection's bulk writes.
    let gate = WriteGate::new();
    // A peer gateway's link closes (with every dial it carries) once the authority says it
    // was revoked or locked.
    let peer_gateway = match peer.as_ref().map(|p| &p.principal) {
        Some(Principal::Gateway(g)) => Some(g.clone()),
        _ => None,
    };
    let mut barred = dialer.reach.locks.watch_barred();
    loop {
        if let Some(g) = &peer_gateway {
            if barred.borrow_and_update().contains(g) {
                tracing::warn!(gateway = %g, "closing the link of a revoked gateway");
                conn.close(quinn::VarInt::from_u32(3), b"gateway revoked");
                return;
            }
        }
        if anonymous && streams >= ANONYMOUS_STREAMS {
            // It has no credit for another stream: the ones it opened get their answers
            // (closing now would cut the last one off), then the connection ends with its
            // lifetime unless the client leaves first.
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    conn.close(quinn::VarInt::from_u32(0), b"log in first");
                }
                _ = conn.closed() => {}
                _ = dialer.life.shutdown.cancelled() => {
                    conn.close(quinn::VarInt::from_u32(0), b"gateway shutting down");
                }
            }
            return;
        }
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            _ = tokio::time::sleep_until(deadline), if anonymous => {
                conn.close(quinn::VarInt::from_u32(0), b"log in first");
                return;
            }
            _ = dialer.life.shutdown.cancelled() => {
                conn.close(quinn::VarInt::from_u32(0), b"gateway shutting down");
                return;
            }
            r = barred.changed(), if peer_gateway.is_some() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok((send, recv)) = accepted else { return };
        streams += 1;
        if anonymous {
            // QUIC renews stream credit as streams end, up to this many open at once: with
            // it lowered at each stream, an anonymous client never gets credit beyond its
            // first ANONYMOUS_STREAMS.
            let left = ANONYMOUS_STREAMS.saturating_sub(streams) as u32;
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(left));
        }
        let task_dialer = dialer.clone();
        let peer = peer.clone();
        let gate = gate.clone();
        dialer.life.tasks.spawn(async move {
            serve_stream(
                task_dialer,
                Box::new(tokio::io::join(recv, send)),
                Some(gate),
                peer,
                addr,
            )
            .await;
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

/// [`reply`] on a stream of a connection that carries other streams (a QUIC user leg or a
/// peer gateway's link): ahead of their bulk writes ([`edgeport_net::write_gate`]), so the
/// dialler does not time out waiting for its `DialOk` while transfers fill the connection.
async fn reply_ahead(
    stream: &mut BoxedStream,
    gate: Option<&Arc<WriteGate>>,
    msg: &ClientReply,
) -> bool {
    let _urgent = gate.map(|g| g.urgent());
    reply(stream, msg).await
}

/// A spliced stream of such a connection yields to the next urgent write on it.
fn gated(stream: BoxedStream, gate: Option<Arc<WriteGate>>) -> BoxedStream {
    match gate {
        Some(g) => Box::new(g.gate(stream)),
        None => stream,
    }
}

/// The devices `user`'s roles reach, from the authority, page by page.
async fn user_devices(
    dialer: &Dialer,
    who: &UserCert,
) -> Result<Vec<edgeport_proto::rpc::DeviceInfo>, edgeport_net::rpc_client::RpcClientError> {
    use edgeport_net::rpc_client::add_device_page;
    let (mut devices, mut next) = (Vec::new(), Some(String::new()));
    while let Some(after) = next {
        let req = Request::UserDevicePage {
            user_cert_der: who.der.to_vec(),
            after,
        };
        next = add_device_page(&mut devices, dialer.reach.auth.call(req).await?)?;
    }
    Ok(devices)
}

/// Serves one dial stream: reads the request and hands it to the function for its kind.
/// Logins, single sign-on and forwarded dials need no user certificate; the rest do.
pub async fn serve_stream(
    dialer: Arc<Dialer>,
    mut stream: BoxedStream,
    gate: Option<Arc<WriteGate>>,
    peer: Option<Peer>,
    addr: SocketAddr,
) {
    let Some(req) = read_request(&dialer, &mut stream, addr).await else {
        return;
    };
    let who = peer.as_ref().and_then(|p| p.user.clone());
    match (req, who) {
        (ClientRequest::Login(login), _) => {
            let answer = relay_login(&dialer, login, addr).await;
            answer_and_close(stream, &answer).await;
        }
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
            let answer = relay_sso_start(&dialer, start).await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::SsoFinish(f), _) => {
            let answer = relay_sso_finish(&dialer, f, addr).await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::Forward { device_id, header }, _) => {
            serve_forward_request(&dialer, stream, gate, peer, device_id, header, addr).await;
        }
        (ClientRequest::ListDevices, Some(who)) => list_devices(&dialer, stream, &who).await,
        (ClientRequest::Recordings, Some(who)) => {
            let answer = crate::audit::list(&dialer.reach.auth, &who).await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::Recording { session_id }, Some(who)) => {
            send_recording(&dialer, stream, &who, session_id, 0).await;
        }
        (ClientRequest::RecordingFrom { session_id, offset }, Some(who)) => {
            send_recording(&dialer, stream, &who, session_id, offset).await;
        }
        (ClientRequest::RecordingPage { cursor, limit }, Some(who)) => {
            let answer = crate::audit::page(&dialer.reach.auth, &who, cursor, limit).await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::Dial { target, service }, Some(who)) => {
            serve_dial(&dialer, stream, gate, &who, &target, service, addr).await;
        }
        (ClientRequest::UserAction { body, signature }, Some(who)) => {
            // The gateway only carries the signed action with the certificate the user
            // presented; the authority checks the signature by that certificate's key.
            let signed = edgeport_proto::rpc::SignedUserAction {
                user_cert_der: who.der.as_ref().clone(),
                body,
                signature,
            };
            let answer = relay(
                &dialer,
                Request::AccessRequestUser(signed),
                |resp| match resp {
                    Response::AccessRequests(v) => ClientReply::AccessRequests(v),
                    Response::LiveSessions(v) => ClientReply::LiveSessions(v),
                    other => unexpected(other),
                },
            )
            .await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::SessionMfaCert { body, signature }, Some(who)) => {
            // As for `UserAction`: carried with the certificate, checked by the authority.
            let signed = edgeport_proto::rpc::SignedUserAction {
                user_cert_der: who.der.as_ref().clone(),
                body,
                signature,
            };
            let answer = relay(
                &dialer,
                Request::SessionMfaCert(signed),
                |resp| match resp {
                    Response::SessionMfaCert(c) => ClientReply::SessionMfaCert(c),
                    other => unexpected(other),
                },
            )
            .await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::ListTargets, Some(who)) => {
            let req = Request::TargetList {
                user_cert_der: Some(who.der.to_vec()),
            };
            let answer = relay(&dialer, req, |resp| match resp {
                Response::Targets(t) => ClientReply::Targets(t),
                other => unexpected(other),
            })
            .await;
            answer_and_close(stream, &answer).await;
        }
        (ClientRequest::SessionEnd { session_id }, Some(who)) => {
            let reason = dialer.sessions.why_ended(&who.name, &session_id);
            answer_and_close(stream, &ClientReply::SessionEnd { reason }).await;
        }
        (_, None) => {
            let answer = refused(
                ErrorKind::Denied,
                "this request needs a user certificate (run `tsh login`)",
            );
            answer_and_close(stream, &answer).await;
        }
    }
}

/// The stream's one request, if it comes in time.
async fn read_request(
    dialer: &Dialer,
    stream: &mut BoxedStream,
    addr: SocketAddr,
) -> Option<ClientRequest> {
    match tokio::time::timeout(
        dialer.request_timeout,
        read_frame::<ClientRequest, _>(stream),
    )
    .await
    {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::debug!(%addr, "dial stream dropped: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, "dial stream dropped: no request in time");
            None
        }
    }
}

/// Sends the last reply of a stream and closes the stream's sending side.
async fn answer_and_close(mut stream: BoxedStream, answer: &ClientReply) {
    if reply(&mut stream, answer).await {
        close(&mut stream).await;
    }
}

async fn close(stream: &mut BoxedStream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await;
}

/// Asks the authority and turns its answer into the client's reply with `answer`.
async fn relay(
    dialer: &Dialer,
    req: Request,
    answer: impl FnOnce(Response) -> ClientReply,
) -> ClientReply {
    match dialer.reach.auth.call(req).await {
        Ok(resp) => answer(resp),
        Err(e) => ClientReply::Refused(crate::identity::unavailable(&e)),
    }
}

/// The reply to a response the authority should not have given.
fn unexpected(other: Response) -> ClientReply {
    refused(
        ErrorKind::Internal,
        edgeport_net::rpc_client::unexpected(other).to_string(),
    )
}

fn logged_in(resp: Response) -> ClientReply {
    match resp {
        Response::UserCerts(c) => ClientReply::LoggedIn(c),
        other => unexpected(other),
    }
}

/// A password login, relayed to the authority with the client's address.
async fn relay_login(
    dialer: &Dialer,
    mut login: edgeport_proto::rpc::LoginRequest,
    addr: SocketAddr,
) -> ClientReply {
    login.client_addr = addr.to_string();
    relay(dialer, Request::Login(login), logged_in).await
}

// Single sign-on is the authority's: it holds the connectors' secrets, redeems the code and
// verifies who it is. The gateway only relays, with the client's address.

/// The first step of single sign-on: the authority's redirect to the identity provider.
async fn relay_sso_start(
    dialer: &Dialer,
    start: edgeport_proto::rpc::SsoStartRequest,
) -> ClientReply {
    relay(dialer, Request::SsoStart(start), |resp| match resp {
        Response::SsoRedirect { auth_url } => ClientReply::SsoRedirect { auth_url },
        other => unexpected(other),
    })
    .await
}

/// The last step of single sign-on: the code for the user's certificates.
async fn relay_sso_finish(
    dialer: &Dialer,
    f: edgeport_proto::tunnel::SsoFinish,
    addr: SocketAddr,
) -> ClientReply {
    let finish = edgeport_proto::rpc::SsoFinishRequest {
        state: f.state,
        code: f.code,
        proof: f.proof,
        ssh_public_key: f.ssh_public_key,
        ttl_secs: f.ttl_secs,
        client_addr: addr.to_string(),
    };
    relay(dialer, Request::SsoFinish(finish), logged_in).await
}

/// The devices the user may reach; large fleets go in parts, each one frame, the last part
/// is `Devices`.
async fn list_devices(dialer: &Dialer, mut stream: BoxedStream, who: &UserCert) {
    let answer = match user_devices(dialer, who).await {
        Ok(devices) => {
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
    };
    answer_and_close(stream, &answer).await;
}

/// One session recording, streamed from the authority.
async fn send_recording(
    dialer: &Dialer,
    mut stream: BoxedStream,
    who: &UserCert,
    session_id: String,
    offset: u64,
) {
    crate::audit::stream_recording(&dialer.reach.auth, &mut stream, who, session_id, offset).await;
    close(&mut stream).await;
}

/// A user's dial: authorise, audit, answer, and splice the device's stream on success.
async fn serve_dial(
    dialer: &Dialer,
    mut stream: BoxedStream,
    gate: Option<Arc<WriteGate>>,
    who: &UserCert,
    target: &str,
    service: Service,
    addr: SocketAddr,
) {
    let result = dial(dialer, who, target, service.clone(), addr).await;
    crate::metrics::dial(&result);
    audit_dial(who, target, &service, addr, &result);
    let Dialled {
        stream: device_stream,
        session_id,
        device_id,
        ..
    } = match result {
        Ok(d) => d,
        Err(e) => return answer_and_close(stream, &ClientReply::Refused(e)).await,
    };
    let ok = ClientReply::DialOk {
        session_id: session_id.clone(),
        device_id: device_id.clone(),
    };
    if !reply_ahead(&mut stream, gate.as_ref(), &ok).await {
        return;
    }
    let stream = gated(stream, gate);
    let user = &who.name;
    match &dialer.splice_dump {
        Some(dir) => {
            let client = Tapped::new(stream, dir, &format!("{session_id}.c2s"));
            let device = Tapped::new(device_stream, dir, &format!("{session_id}.s2c"));
            splice(dialer, client, device, user, &device_id, &session_id).await;
        }
        None => splice(dialer, stream, device_stream, user, &device_id, &session_id).await,
    }
}

/// A web console terminal's way to a device (`gateway/src/web/terminal.rs`): the same dial
/// as tsh's (the authority's grant for the certificate, locks, audit), registered among the
/// live sessions so a lock cuts it, but spoken to by the gateway's own SSH client.
pub struct WebDial {
    pub stream: BoxedStream,
    pub session_id: String,
    pub device_id: String,
    /// Cancelled when a lock cuts the session.
    pub registered: crate::sessions::Registered,
}

pub async fn dial_for_web(
    dialer: &Dialer,
    who: &UserCert,
    target: &str,
    addr: SocketAddr,
) -> Result<WebDial, RpcError> {
    let result = dial(dialer, who, target, Service::Ssh, addr).await;
    crate::metrics::dial(&result);
    audit_dial(who, target, &Service::Ssh, addr, &result);
    let d = result?;
    let registered = dialer
        .sessions
        .register(&d.device_id, &who.name, &d.session_id);
    Ok(WebDial {
        stream: d.stream,
        session_id: d.session_id,
        device_id: d.device_id,
        registered,
    })
}

/// The audit event of a user's dial, allowed or not.
fn audit_dial(
    who: &UserCert,
    target: &str,
    service: &Service,
    addr: SocketAddr,
    result: &Result<Dialled, RpcError>,
) {
    let svc = service.label();
    let client = addr.to_string();
    let event = match result {
        Ok(d) => crate::audit::Dial {
            user: &who.name,
            target,
            device: &d.device_id,
            session_id: &d.session_id,
            client: &client,
            service: &svc,
            via: d.holder.as_deref(),
            error: None,
        },
        Err(e) => crate::audit::Dial {
            user: &who.name,
            target,
            device: "",
            session_id: "",
            client: &client,
            service: &svc,
            via: None,
            error: Some(&e.message),
        },
    };
    crate::audit::dial_event(event);
}

/// A dial forwarded by a peer gateway: only another gateway of this cluster may forward.
async fn serve_forward_request(
    dialer: &Dialer,
    stream: BoxedStream,
    gate: Option<Arc<WriteGate>>,
    peer: Option<Peer>,
    device_id: String,
    header: StreamHeader,
    addr: SocketAddr,
) {
    match peer.map(|p| p.principal) {
        Some(Principal::Gateway(from)) if from != dialer.reach.identity.get().gateway_id => {
            serve_forward(dialer, stream, gate, &from, device_id, header, addr).await;
        }
        _ => {
            let answer = refused(
                ErrorKind::Denied,
                "forwarding needs the certificate of another gateway of this cluster",
            );
            answer_and_close(stream, &answer).await;
        }
    }
}

/// An authorised dial: the device's stream and who holds the tunnel when it is not here.
struct Dialled {
    stream: BoxedStream,
    session_id: String,
    device_id: String,
    /// The gateway the dial was forwarded to, if any.
    holder: Option<String>,
}

async fn dial(
    dialer: &Dialer,
    who: &UserCert,
    target: &str,
    service: Service,
    addr: SocketAddr,
) -> Result<Dialled, RpcError> {
    if service == Service::Update {
        return Err(RpcError::new(
            ErrorKind::Denied,
            "agent updates come from the authority, not from a user's dial",
        ));
    }
    dialer
        .reach
        .locks
        .check_unlocked(&LockTarget::User(who.name.clone()))?;
    // A target behind the device (relay mode) takes only a fresh ticket: the agent connects
    // to one of its targets for nobody without the authority's word for that target.
    let grants = &dialer.reach.grants;
    let auth = &dialer.reach.auth;
    let grant = match &service {
        Service::Target(_) => grants.ticketed(auth, who, target, service.clone()).await?,
        _ => {
            grants
                .authorize(auth, who, target, service.clone(), Duration::ZERO)
                .await?
        }
    };
    let device_id = grant.device.id.clone();
    dialer
        .reach
        .locks
        .check_unlocked(&LockTarget::Device(device_id.clone()))?;
    let session_id = random_bytes(16)
        .map(hex::encode)
        .map_err(|e| RpcError::new(ErrorKind::Internal, e.to_string()))?;
    let header = StreamHeader {
        service,
        user: Some(grant.user.clone()),
        session_id: session_id.clone(),
        client_addr: addr.to_string(),
        kube_groups: grant.kube_groups.clone(),
        kube_users: grant.kube_users.clone(),
        ticket: grant.ticket.clone(),
        via: None,
    };
    let (stream, holder) = dialer
        .reach
        .open_device_stream(who, &grant, header)
        .await
        .map_err(tunnel_error)?;
    Ok(Dialled {
        stream,
        session_id,
        device_id,
        holder,
    })
}

fn tunnel_error(e: TunnelError) -> RpcError {
    match e {
        TunnelError::NotConnected(_) => RpcError::new(ErrorKind::NotFound, e.to_string()),
        TunnelError::Refused(e) => e,
        other => RpcError::new(ErrorKind::Internal, other.to_string()),
    }
}

/// A dial that peer gateway `from` forwarded for a device whose tunnel is here. The forwarder
/// names nobody: the user, the service and what the user may be on the device come from the
/// authority's ticket, which must be for this device, asked for by `from`, naming this gateway
/// as the holder, fresh and not used before. Then: open the device stream (this gateway's own
/// tunnels only, never forwarding again), answer `DialOk` and splice.
async fn serve_forward(
    dialer: &Dialer,
    mut stream: BoxedStream,
    gate: Option<Arc<WriteGate>>,
    from: &str,
    device_id: String,
    mut header: StreamHeader,
    addr: SocketAddr,
) {
    let session_id = header.session_id.clone();
    let checked = if dialer.reach.locks.gateway_barred(from) {
        Err(RpcError::new(
            ErrorKind::Denied,
            format!("gateway {from} was revoked or is locked by the cluster's administrator"),
        ))
    } else {
        forward_ticket(dialer, from, &device_id, &header)
    };
    let opened = match checked {
        Ok(claims) => {
            header.user = Some(claims.user.clone());
            header.kube_groups = claims.kube_groups;
            header.kube_users = claims.kube_users;
            header.via = Some(from.to_string());
            dialer
                .reach
                .tunnels
                .open_stream(&device_id, &header)
                .await
                .map(|s| (s, claims.user))
                .map_err(tunnel_error)
        }
        Err(e) => Err(e),
    };
    let svc = header.service.label();
    let (device_stream, user) = match opened {
        Ok(s) => s,
        Err(e) => {
            // The user the forwarder named is not known to be anyone: logged as a claim.
            let claimed = header.user.as_deref().unwrap_or("");
            tracing::warn!(peer = %from, device = %device_id, claimed_user = %claimed,
                "forwarded dial refused: {}", e.message);
            crate::audit::dial_event(crate::audit::Dial {
                user: "",
                target: &device_id,
                device: "",
                session_id: "",
                client: &header.client_addr,
                service: &svc,
                via: Some(from),
                error: Some(&e.message),
            });
            reply(&mut stream, &ClientReply::Refused(e)).await;
            return;
        }
    };
    crate::audit::dial_event(crate::audit::Dial {
        user: &user,
        target: &device_id,
        device: &device_id,
        session_id: &session_id,
        client: &header.client_addr,
        service: &svc,
        via: Some(from),
        error: None,
    });
    let ok = ClientReply::DialOk {
        session_id: session_id.clone(),
        device_id: device_id.clone(),
    };
    if reply_ahead(&mut stream, gate.as_ref(), &ok).await {
        let stream = gated(stream, gate);
        tracing::info!(peer = %from, %addr, %user, device = %device_id, session = %session_id, "forwarded dial");
        splice(
            dialer,
            stream,
            device_stream,
            &user,
            &device_id,
            &session_id,
        )
        .await;
    }
}

/// The holder's check of a forwarded dial: the authority's ticket (see [`serve_forward`]),
/// and neither its user nor the device locked here.
fn forward_ticket(
    dialer: &Dialer,
    from: &str,
    device_id: &str,
    header: &StreamHeader,
) -> Result<edgeport_proto::ticket::TicketClaims, RpcError> {
    let ident = dialer.reach.identity.get();
    let host_cas = ident.cas.host_ca_raws();
    let want = edgeport_proto::ticket::Expected {
        cluster: ident.cluster(),
        device: device_id,
        service: header.service.clone(),
        requester: Some(from),
        holder: Some(&ident.gateway_id),
    };
    let claims = dialer
        .tickets
        .admit_any(
            header.ticket.as_ref(),
            &host_cas,
            &want,
            edgeport_net::clock::now_secs(),
        )
        .map_err(|e| RpcError::new(ErrorKind::Denied, e.to_string()))?;
    dialer
        .reach
        .locks
        .check_unlocked(&LockTarget::User(claims.user.clone()))?;
    dialer
        .reach
        .locks
        .check_unlocked(&LockTarget::Device(device_id.to_string()))?;
    Ok(claims)
}

async fn splice<C, D>(
    dialer: &Dialer,
    client: C,
    mut device: D,
    user: &str,
    device_id: &str,
    session_id: &str,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    tracing::debug!(%user, device = %device_id, session = %session_id, "stream spliced");
    let reg = dialer.sessions.register(device_id, user, session_id);
    let mut client = crate::metrics::Relayed::new(client);
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
