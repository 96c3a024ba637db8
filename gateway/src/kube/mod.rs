//! The Kubernetes front door: `https://GATEWAY:PORT/k8s/CLUSTER/...` on the TCP port (ALPN
//! `h2` or `http/1.1`).
//!
//! The gateway terminates TLS here (the one place it must, to apply roles): it checks the
//! user's x509 certificate against the cluster CA, finds the device whose agent serves
//! CLUSTER, and asks the authority for each request (`AuthorizeDial` with the user's
//! certificate: unknown, expired and locked users are refused there). The answer's ticket goes
//! in the [`StreamHeader`] of a `kube` stream to the device, which impersonates only whom the
//! ticket names; the gateway speaks HTTP/1.1 to the agent on that stream, one stream per
//! request.
//! Bodies stream both ways without buffering; a 101 answer is spliced byte for byte.

pub mod audit;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgeport_proto::identity::Principal;
use edgeport_proto::keys::random_bytes;
use edgeport_proto::proxy_headers::{is_upgrade, strip_hop_by_hop};
use edgeport_proto::rpc::{DeviceInfo, ErrorKind, LockTarget, RpcError};
use edgeport_proto::tunnel::{Service, StreamHeader};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request as HttpRequest, Response as HttpResponse, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::grants::UserCert;
use crate::peers::Reach;
use crate::sessions::Sessions;
use audit::{audit_kube_event, KubeAuditEvent, KubeEventKind};

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head: bigger gets 431. HTTP/1.1 enforces it while reading the head;
/// on HTTP/2 the handler does (HTTP/2 accounting: name + value + 32 per field), because h2
/// answers a header list over its own limit with a connection error rather than a status.
pub const MAX_HEAD: usize = 64 * 1024;
/// HTTP/2 header lists above this end the connection (memory bound, well above MAX_HEAD).
const H2_MAX_HEADER_LIST: u32 = 1024 * 1024;
/// How long the inventory is reused to tell an offline cluster from an unknown one.
const INVENTORY_TTL: Duration = Duration::from_secs(5);
/// Idle HTTP/1.1 keep-alive connections are closed after this long without a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection (HTTP/1.1 or HTTP/2) with no request in flight for this long is closed.
/// kubectl opens a new one when it needs it; watches and exec streams are requests in flight.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// No connection lives longer than this (nor past its certificate): then it is asked to
/// close (HTTP/2 GOAWAY), and requests still in flight get [`DRAIN`] to finish.
const MAX_AGE: Duration = Duration::from_secs(3600);
/// How long a closing connection's requests in flight may still run.
const DRAIN: Duration = Duration::from_secs(30);
/// A connection whose certificate was refused gets its one answer, then this long to read
/// it before it is closed.
const REFUSED_LINGER: Duration = Duration::from_secs(5);

/// The front door: the way to devices, the spliced sessions (locks cut them), its TLS and
/// an inventory cache.
pub struct Front {
    pub reach: Reach,
    pub sessions: Arc<Sessions>,
    pub tasks: tokio_util::task::TaskTracker,
    pub tls: Arc<tls::TlsCache>,
    /// The inventory, to tell an offline cluster from an unknown one (refreshed at most
    /// every [`INVENTORY_TTL`], so requests for unknown clusters cannot flood the authority).
    devices: Mutex<Option<(Instant, Vec<DeviceInfo>)>>,
    /// Refused clients still reading their one answer, per source: past
    /// [`REFUSED_PER_SOURCE`] a refused connection closes at once, without it, so that one
    /// address cannot keep the port's connections lingering.
    refused: crate::budget::SourceBudget,
}

/// Refused clients per source that get their one answer (the rest are closed at once).
const REFUSED_PER_SOURCE: usize = 16;

impl Front {
    pub fn new(
        reach: Reach,
        sessions: Arc<Sessions>,
        tasks: tokio_util::task::TaskTracker,
        tls: Arc<tls::TlsCache>,
    ) -> Self {
        Self {
            reach,
            sessions,
            tasks,
            tls,
            devices: Mutex::new(None),
            refused: crate::budget::SourceBudget::with_capacity(REFUSED_PER_SOURCE),
        }
    }
}

/// Who is on the other end of one TLS connection.
struct Conn {
    addr: SocketAddr,
    /// The user, or why the certificate was refused (answered to the first request, then
    /// the connection closes).
    user: Result<UserCert, CertRefused>,
    /// The certificate's notAfter (Unix seconds): checked at every request.
    not_after: u64,
    /// Requests in flight, and when the last one ended (for the idle limit).
    busy: std::sync::atomic::AtomicUsize,
    last_done: Mutex<Instant>,
    /// Set when the connection must close (refused or expired certificate).
    close: tokio::sync::Notify,
}

/// Counts a request in flight on its connection until dropped.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.last_done.lock() {
            *t = Instant::now();
        }
        self.0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn status_body(status: StatusCode, reason: &str, msg: &str) -> HttpResponse<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": msg, "reason": reason, "code": status.as_u16(),
    })
    .to_string();
    let mut r = HttpResponse::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Why the front door refuses a client's certificate: the text is the one answer the client
/// gets (kubectl prints it).
#[derive(Clone, Debug, thiserror::Error)]
pub enum CertRefused {
    #[error("no client certificate: run `tsh login` and `tsh kube login CLUSTER`")]
    Missing,
    #[error("client certificate expired: run `tsh login` again")]
    Expired,
    #[error("client certificate expired: run `tsh login` and `tsh kube login CLUSTER` again")]
    ExpiredSinceConnect,
    #[error("client certificate was not issued by this Edgeport cluster's CA")]
    UnknownIssuer,
    #[error("client certificate does not name a user")]
    NotAUser,
    #[error("client certificate refused: {0}")]
    Other(String),
    #[error("gateway TLS unavailable: {0}")]
    GatewayTls(String),
}

/// Checks the client certificate: this cluster's CA, valid now, names a user.
fn check_cert(
    front: &Front,
    verifier: &dyn rustls::server::danger::ClientCertVerifier,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<UserCert, CertRefused> {
    let Some((leaf, rest)) = certs.and_then(|c| c.split_first()) else {
        return Err(CertRefused::Missing);
    };
    verifier
        .verify_client_cert(leaf, rest, UnixTime::now())
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
            | rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
                ..
            }) => CertRefused::Expired,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                CertRefused::UnknownIssuer
            }
            other => CertRefused::Other(other.to_string()),
        })?;
    match edgeport_proto::tls::peer_principal(leaf.as_ref(), front.reach.identity.get().cluster()) {
        Ok(Principal::User(u)) => Ok(UserCert::new(u, leaf.as_ref().to_vec())),
        Ok(_) => Err(CertRefused::NotAUser),
        Err(e) => Err(CertRefused::Other(e.to_string())),
    }
}

/// The front door's verdict on a client's certificate, made once per connection: it decides
/// both what the client is served and whether its source counts as known to the admission
/// budget (any certificate passes the handshake here, so that a refused client reads why).
pub fn client_of(
    front: &Front,
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<UserCert, CertRefused> {
    match front.tls.get() {
        Ok(t) => check_cert(front, t.verifier.as_ref(), certs),
        Err(e) => Err(CertRefused::GatewayTls(e.to_string())),
    }
}

/// Serves one TLS connection of the front door (HTTP/1.1 or HTTP/2), whose client
/// certificate `client_of` has judged.
pub async fn serve(
    front: Arc<Front>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    addr: SocketAddr,
    user: Result<UserCert, CertRefused>,
) {
    // A refused client holds one of its source's few answer slots until it closes.
    let _answer_slot = match &user {
        Err(why) => {
            tracing::info!(%addr, "kubernetes client refused: {why}");
            match front.refused.take(addr.ip(), Duration::ZERO).await {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%addr, "kubernetes client refused: too many refused connections from this source; closed without an answer");
                    return;
                }
            }
        }
        Ok(_) => None,
    };
    let not_after = user
        .as_ref()
        .ok()
        .and_then(|u| edgeport_proto::tls::not_after(&u.der).ok())
        .unwrap_or(0);
    let conn = Arc::new(Conn {
        addr,
        user,
        not_after,
        busy: Default::default(),
        last_done: Mutex::new(Instant::now()),
        close: tokio::sync::Notify::new(),
    });
    let state = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let front = front.clone();
        let conn = conn.clone();
        async move {
            // In flight until the response body is done (watches, logs -f).
            let guard = InFlight::new(&conn);
            let resp = handle(front, conn, req).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                body.map_frame(move |f| {
                    let _held = &guard;
                    f
                })
                .boxed()
            }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    tokio::pin!(served);
    // A refused certificate gets no second request; an expiring one none past its end; and no
    // connection stays idle or open forever (HTTP/2 has no idle limit of its own).
    // A refused client gets a few seconds for its one request (to learn why).
    let life = match &state.user {
        Ok(_) => MAX_AGE.min(Duration::from_secs(
            state
                .not_after
                .saturating_sub(edgeport_net::clock::now_secs()),
        )),
        Err(_) => REFUSED_LINGER * 2,
    };
    let max_age = tokio::time::Instant::now() + life;
    let mut closing: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let why = tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%addr, "kubernetes connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(closing.unwrap_or(max_age)), if closing.is_some() => {
                tracing::debug!(%addr, "kubernetes connection closed: draining took too long");
                return;
            }
            _ = state.close.notified(), if closing.is_none() => ("certificate refused", REFUSED_LINGER),
            // A refused client has nothing in flight worth waiting for.
            _ = tokio::time::sleep_until(max_age), if closing.is_none() => {
                if state.user.is_ok() { ("maximum age", DRAIN) } else { ("certificate refused", REFUSED_LINGER) }
            }
            _ = tick.tick(), if closing.is_none() => {
                let idle = state.busy.load(std::sync::atomic::Ordering::SeqCst) == 0
                    && state.last_done.lock().map(|t| t.elapsed() >= IDLE_TIMEOUT).unwrap_or(true);
                if !idle {
                    continue;
                }
                ("idle", DRAIN)
            }
        };
        tracing::debug!(%addr, reason = why.0, "closing the kubernetes connection");
        served.as_mut().graceful_shutdown();
        closing = Some(tokio::time::Instant::now() + why.1);
    }
}

/// The size of a request head as [`MAX_HEAD`] counts it (the target, and each header with
/// 32 bytes of overhead, as HTTP/2 counts header lists).
pub(crate) fn head_size(uri: &http::Uri, headers: &http::HeaderMap) -> usize {
    uri.to_string().len()
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum::<usize>()
}

/// What of a client's headers goes on to the device: no hop-by-hop headers (but the upgrade
/// pair when `upgrade`), no impersonation and no credentials (the agent impersonates whom
/// the ticket names), and the apiserver's own host name.
pub(crate) fn scrub_headers(h: &mut http::HeaderMap, upgrade: bool) {
    strip_hop_by_hop(h, upgrade);
    // The agent strips these too; removing them here keeps them off the tunnel.
    let imp: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for k in imp {
        h.remove(k);
    }
    h.remove(header::AUTHORIZATION);
    h.insert(header::HOST, HeaderValue::from_static("kubernetes"));
}

/// `/k8s/CLUSTER/rest` -> (CLUSTER, /rest).
pub(crate) fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/k8s/")?;
    let (cluster, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!cluster.is_empty()).then_some((cluster, tail))
}

fn rpc_status(e: &RpcError) -> (StatusCode, &'static str) {
    match e.kind {
        ErrorKind::Denied | ErrorKind::Locked => (StatusCode::FORBIDDEN, "Forbidden"),
        ErrorKind::BadCredentials
        | ErrorKind::Expired
        | ErrorKind::SecondFactorRequired
        | ErrorKind::SecondFactorEnroll => (StatusCode::UNAUTHORIZED, "Unauthorized"),
        // "device X is offline" is a passing state; "user X not found" is not.
        ErrorKind::NotFound if e.message.contains("offline") => {
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
        }
        ErrorKind::NotFound => (StatusCode::FORBIDDEN, "Forbidden"),
        ErrorKind::Invalid => (StatusCode::BAD_REQUEST, "BadRequest"),
        ErrorKind::AlreadyExists | ErrorKind::Internal | ErrorKind::GatewayRevoked => {
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
        }
    }
}

/// The device serving `cluster`: the newest tunnel here, else an online device of the
/// inventory (held by another gateway, which the request is then forwarded to).
async fn device_for(front: &Front, cluster: &str) -> Option<String> {
    let here = front
        .reach
        .tunnels
        .all()
        .into_iter()
        .filter(|t| t.hello.kube_cluster.as_deref() == Some(cluster))
        .max_by_key(|t| t.connected_at)
        .map(|t| t.device_id.clone());
    if here.is_some() {
        return here;
    }
    inventory(front)
        .await?
        .into_iter()
        .filter(|d| d.online && d.kube_cluster.as_deref() == Some(cluster))
        .max_by_key(|d| d.last_seen)
        .map(|d| d.id)
}

/// The authority's inventory, reused for [`INVENTORY_TTL`] (requests for clusters not
/// served here cannot flood the authority).
async fn inventory(front: &Front) -> Option<Vec<DeviceInfo>> {
    let cached = front.devices.lock().ok().and_then(|d| {
        d.as_ref()
            .filter(|(at, _)| at.elapsed() < INVENTORY_TTL)
            .map(|(_, v)| v.clone())
    });
    if cached.is_some() {
        return cached;
    }
    let devs = front.reach.auth.all_devices().await.ok()?;
    if let Ok(mut c) = front.devices.lock() {
        *c = Some((Instant::now(), devs.clone()));
    }
    Some(devs)
}

/// Why no device serves `cluster`: a known device that is offline, or no such cluster.
async fn missing_cluster(front: &Front, cluster: &str) -> HttpResponse<Body> {
    let devs = inventory(front).await;
    if let Some(devs) = devs {
        if let Some(d) = devs
            .iter()
            .find(|d| d.kube_cluster.as_deref() == Some(cluster))
        {
            return status_body(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!("Kubernetes cluster {cluster:?}: device {} is offline", d.id),
            );
        }
    }
    status_body(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("unknown Kubernetes cluster {cluster:?} (see `tsh kube ls`)"),
    )
}

async fn handle(
    front: Arc<Front>,
    conn: Arc<Conn>,
    req: HttpRequest<Incoming>,
) -> HttpResponse<Body> {
    let refusal = match &conn.user {
        Ok(u) if edgeport_net::clock::now_secs() < conn.not_after => Ok(u.clone()),
        Ok(_) => Err(CertRefused::ExpiredSinceConnect),
        Err(why) => Err(why.clone()),
    };
    let who = match refusal {
        Ok(who) => who,
        Err(why) => {
            // The one answer, then the connection closes: HTTP/1.1 by `Connection: close`
            // (hyper closes after writing it), HTTP/2 by GOAWAY once the answer is out.
            let mut resp = status_body(StatusCode::UNAUTHORIZED, "Unauthorized", &why.to_string());
            if req.version() == http::Version::HTTP_2 {
                let conn = conn.clone();
                front.tasks.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    conn.close.notify_one();
                });
            } else {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return resp;
        }
    };
    let user = who.name.clone();
    let head = head_size(req.uri(), req.headers());
    if head > MAX_HEAD {
        return status_body(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
            &format!("request header block too large ({head} bytes; at most {MAX_HEAD})"),
        );
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let Some((cluster, inner)) = split_path(&path) else {
        return status_body(
            StatusCode::NOT_FOUND,
            "NotFound",
            "Kubernetes requests go to /k8s/CLUSTER/... (use `tsh kube login CLUSTER`)",
        );
    };
    let (cluster, inner) = (cluster.to_string(), inner.to_string());
    let api_path = audit::api_path(&inner);
    let verb = audit::verb(req.method(), &api_path, query.as_deref());
    // A refusal after the certificate checked out is the user's attempt: audited, with the
    // device when the cluster named one.
    let refused = |device: &str, resp: HttpResponse<Body>, why: &str| {
        audit_kube_event(&KubeAuditEvent {
            kind: KubeEventKind::Refused,
            user: user.clone(),
            kube_user: String::new(),
            groups: Vec::new(),
            cluster: cluster.clone(),
            device: device.to_string(),
            verb: verb.clone(),
            path: api_path.clone(),
            status: resp.status().as_u16(),
            client_addr: conn.addr.to_string(),
            session_id: String::new(),
            bytes_up: 0,
            bytes_down: 0,
            error: why.to_string(),
        });
        resp
    };
    if let Err(e) = front
        .reach
        .locks
        .check_unlocked(&LockTarget::User(user.clone()))
    {
        let resp = status_body(StatusCode::FORBIDDEN, "Forbidden", &e.message);
        return refused("", resp, &e.message);
    }
    let Some(device) = device_for(&front, &cluster).await else {
        let resp = missing_cluster(&front, &cluster).await;
        let why = if resp.status() == StatusCode::NOT_FOUND {
            "no device serves this Kubernetes cluster"
        } else {
            "the device serving this Kubernetes cluster is offline"
        };
        return refused("", resp, why);
    };
    if let Err(e) = front
        .reach
        .locks
        .check_unlocked(&LockTarget::Device(device.clone()))
    {
        let resp = status_body(StatusCode::FORBIDDEN, "Forbidden", &e.message);
        return refused(&device, resp, &e.message);
    }
    // A fresh ticket per request: the agent impersonates only whom the authority's ticket
    // names, and takes each ticket once.
    let grant = match front
        .reach
        .grants
        .ticketed(&front.reach.auth, &who, &device, Service::Kube)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            let (status, reason) = rpc_status(&e);
            let resp = status_body(
                status,
                reason,
                &format!("Kubernetes cluster {cluster:?}: {e}"),
            );
            return refused(&device, resp, &e.to_string());
        }
    };
    let session_id = random_bytes(8).map(hex::encode).unwrap_or_default();
    let mut pending = PendingEvent(KubeAuditEvent {
        kind: KubeEventKind::Request,
        user: user.clone(),
        kube_user: grant
            .kube_users
            .first()
            .cloned()
            .unwrap_or_else(|| user.clone()),
        groups: grant.kube_groups.clone(),
        cluster: cluster.clone(),
        device: device.clone(),
        verb,
        path: api_path,
        status: 0,
        client_addr: conn.addr.to_string(),
        session_id: session_id.clone(),
        bytes_up: 0,
        bytes_down: 0,
        error: String::new(),
    });
    let ev = &mut pending.0;
    let header = StreamHeader {
        service: Service::Kube,
        user: Some(user.clone()),
        session_id: session_id.clone(),
        client_addr: conn.addr.to_string(),
        kube_groups: grant.kube_groups.clone(),
        kube_users: grant.kube_users.clone(),
        ticket: grant.ticket.clone(),
        via: None,
    };
    let resp = forward(
        &front,
        Presented {
            cert: &who,
            not_after: conn.not_after,
        },
        &grant,
        &header,
        &match &query {
            Some(q) => format!("{inner}?{q}"),
            None => inner.clone(),
        },
        req,
        ev,
    )
    .await;
    ev.status = resp.status().as_u16();
    drop(pending);
    resp
}

/// A request's audit event, written when its handling ends: with the answer's status, or
/// with status 0 when the client went away first (hyper then drops the handler, and the
/// request may already have reached the API server: a DELETE sent and then reset is still
/// recorded).
struct PendingEvent(KubeAuditEvent);

impl Drop for PendingEvent {
    fn drop(&mut self) {
        audit_kube_event(&self.0);
    }
}

/// The user's certificate as presented on the connection, and when it expires.
struct Presented<'a> {
    cert: &'a UserCert,
    not_after: u64,
}

async fn forward(
    front: &Front,
    who: Presented<'_>,
    grant: &edgeport_proto::rpc::DialGrant,
    header: &StreamHeader,
    path_and_query: &str,
    mut req: HttpRequest<Incoming>,
    ev: &mut KubeAuditEvent,
) -> HttpResponse<Body> {
    let upgrade = is_upgrade(req.headers()) && req.version() == http::Version::HTTP_11;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let Ok(uri) = path_and_query.parse::<http::Uri>() else {
        return status_body(StatusCode::BAD_REQUEST, "BadRequest", "bad request path");
    };
    let (parts, body) = req.into_parts();
    let mut out = HttpRequest::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = parts.headers;
    scrub_headers(out.headers_mut(), upgrade);

    let device = &grant.device.id;
    let stream = match front
        .reach
        .open_device_stream(who.cert, grant, header.clone())
        .await
    {
        Ok((s, _)) => s,
        Err(e) => {
            let (status, reason) = match &e {
                crate::tunnels::TunnelError::Refused(r) => rpc_status(r),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            };
            return status_body(
                status,
                reason,
                &format!("Kubernetes cluster {:?}: {e}", ev.cluster),
            );
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => {
            return status_body(
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                &format!("device {device}: {e}"),
            )
        }
    };
    // Registered like SSH splices, so a device lock cuts watches, logs -f and exec sessions
    // to the device: dropping the connection ends the response body.
    let reg = front.sessions.register(
        device,
        &header.user.clone().unwrap_or_default(),
        &header.session_id,
    );
    let cut = reg.cancel.clone();
    front.tasks.spawn(async move {
        let _reg = reg;
        tokio::select! {
            r = conn.with_upgrades() => if let Err(e) = r {
                tracing::debug!("kube stream to device ended: {e}");
            },
            _ = cut.cancelled() => tracing::info!("kube stream cut: locked"),
        }
    });
    let mut resp = match sender.send_request(out).await {
        Ok(r) => r,
        Err(e) => {
            return status_body(
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                &format!("device {device} did not answer: {e}"),
            )
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        match client_upgrade {
            Some(client_upgrade) => {
                let device_upgrade = hyper::upgrade::on(&mut resp);
                let mut ev = ev.clone();
                ev.kind = KubeEventKind::SessionStart;
                ev.status = 101;
                audit_kube_event(&ev);
                let reg = front.sessions.register(device, &ev.user, &ev.session_id);
                // An exec, attach or port-forward session ends with the certificate that
                // opened it: once upgraded it is no longer the HTTP connection's, whose
                // limits ended with it. (Not at MAX_AGE: a long port-forward or shell is
                // fine while the user's certificate holds, as an SSH session is.)
                let life = Duration::from_secs(
                    who.not_after
                        .saturating_sub(edgeport_net::clock::now_secs()),
                );
                front.tasks.spawn(async move {
                    let (c, d) = match tokio::try_join!(client_upgrade, device_upgrade) {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(session = %ev.session_id, "upgrade failed: {e}");
                            (ev.kind, ev.status) = (KubeEventKind::SessionEnd, 0);
                            audit_kube_event(&ev);
                            return;
                        }
                    };
                    let (mut c, mut d) = (TokioIo::new(c), TokioIo::new(d));
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut c, &mut d) => {
                            if let Ok((up, down)) = r {
                                (ev.bytes_up, ev.bytes_down) = (up, down);
                            }
                        }
                        _ = reg.cancel.cancelled() => {
                            tracing::info!(session = %ev.session_id, "kube session cut: locked");
                        }
                        _ = tokio::time::sleep(life) => {
                            tracing::info!(
                                session = %ev.session_id,
                                "kube session ended: the user's certificate expired"
                            );
                        }
                    }
                    ev.kind = KubeEventKind::SessionEnd;
                    audit_kube_event(&ev);
                });
            }
            None => {
                return status_body(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    "the device switched protocols on a request that did not ask to",
                )
            }
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(|b| b.boxed())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            split_path("/k8s/edge1/api/v1/pods"),
            Some(("edge1", "/api/v1/pods"))
        );
        assert_eq!(split_path("/k8s/edge1"), Some(("edge1", "/")));
        assert_eq!(split_path("/k8s//api"), None);
        assert_eq!(split_path("/api/v1"), None);
    }
}
