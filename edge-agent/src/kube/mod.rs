//! The Kubernetes forwarder: every `kube` stream the gateway opens carries one HTTP/1.1
//! exchange (the identity in its [`StreamHeader`]). The agent sends the request to its local
//! API server with its own credentials and `Impersonate-User`/`Impersonate-Group` set from
//! that header, after removing every `Authorization` and `Impersonate-*` header the client
//! sent. Bodies stream both ways (watches, `logs -f`); a `101 Switching Protocols` answer
//! (exec, attach, port-forward over SPDY or WebSocket) is spliced byte for byte.
//!
//! hyper is used directly (no `kube` crate) to stay inside the device binary's size budget.

pub mod upstream;
pub mod yaml;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgeport_net::BoxedStream;
use edgeport_proto::proxy_headers::{is_upgrade, strip_hop_by_hop};
use edgeport_proto::ticket::{Expected, ReplayGuard, TicketClaims, TicketError};
use edgeport_proto::tunnel::StreamHeader;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::services::{ServiceFuture, StreamService};
pub use upstream::{Upstream, UpstreamError};

type Body = BoxBody<Bytes, hyper::Error>;

/// Connecting to the API server (TCP + TLS) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head the agent accepts from the gateway.
const MAX_HEAD: usize = 64 * 1024;

/// The Kubernetes identity the API server must see for one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeIdentity {
    pub user: String,
    pub groups: Vec<String>,
}

impl KubeIdentity {
    /// From the authority's ticket (never from the gateway's header): the Edgeport user name,
    /// or the first of the user's `kube_users` when the record names any; the groups are the
    /// user's `kube_groups`.
    pub fn from_ticket(t: &TicketClaims) -> Option<Self> {
        let user = t
            .kube_users
            .first()
            .cloned()
            .or_else(|| Some(t.user.clone()))
            .filter(|u| !u.is_empty())?;
        Some(Self {
            user,
            groups: t.kube_groups.clone(),
        })
    }
}

/// What a Kubernetes stream's ticket must say, and the tickets already taken.
pub struct TicketCheck {
    cluster: String,
    device: String,
    /// The trusted host CAs' raw keys (two during a CA rotation; updated by a rotation).
    host_cas: std::sync::RwLock<Vec<Vec<u8>>>,
    seen: ReplayGuard,
}

impl TicketCheck {
    pub fn new(ident: &crate::identity::DeviceIdentity) -> Self {
        Self {
            cluster: ident.cas.cluster.clone(),
            device: ident.device_id.clone(),
            host_cas: std::sync::RwLock::new(ident.cas.host_ca_raws()),
            seen: ReplayGuard::default(),
        }
    }

    /// The ticket's claims, if it is the authority's, for a Kubernetes dial to this device,
    /// fresh and not used before.
    pub fn admit(&self, header: &StreamHeader) -> Result<TicketClaims, TicketError> {
        let want = Expected {
            cluster: &self.cluster,
            device: &self.device,
            service: edgeport_proto::tunnel::Service::Kube,
            requester: None,
            holder: None,
        };
        let host_cas = self.host_cas.read().map(|h| h.clone()).unwrap_or_default();
        self.seen.admit_any(
            header.ticket.as_ref(),
            &host_cas,
            &want,
            edgeport_net::clock::now_secs(),
        )
    }
}

/// Idle keep-alive connections to the API server kept for reuse (a TLS handshake per
/// request would cost more than the request).
const POOL_MAX: usize = 8;

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

/// The API server and a small pool of keep-alive HTTP/1.1 connections to it.
pub struct ApiServer {
    up: Upstream,
    pool: std::sync::Mutex<Vec<Sender>>,
}

impl ApiServer {
    /// A pooled connection that is ready for a request, if any.
    fn take(&self) -> Option<Sender> {
        let mut pool = self.pool.lock().ok()?;
        pool.retain(|s| !s.is_closed());
        let i = pool.iter().position(|s| s.is_ready())?;
        Some(pool.swap_remove(i))
    }

    /// Back to the pool (it becomes ready again once its response body is done).
    fn put(&self, s: Sender) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.retain(|s| !s.is_closed());
            if pool.len() < POOL_MAX {
                pool.push(s);
            }
        }
    }

    async fn connect(&self) -> Result<Sender, Response<Body>> {
        let up = &self.up;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&up.addr).await?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(up.tls.clone())
                .connect(up.server_name.clone(), tcp)
                .await
        };
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(api = %up.addr, "cannot reach the Kubernetes API server: {e}");
                return Err(full(
                    StatusCode::BAD_GATEWAY,
                    &format!("the device cannot reach its Kubernetes API server: {e}"),
                ));
            }
            Err(_) => {
                return Err(full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the device's Kubernetes API server did not answer in time",
                ))
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| full(StatusCode::BAD_GATEWAY, &format!("API server: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("API server connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// Live streams (watches, logs, upgraded sessions) by Edgeport user, to end them on a lock.
#[derive(Default)]
struct Live {
    next: u64,
    by_id: std::collections::HashMap<u64, (String, CancellationToken)>,
    locked: Vec<String>,
}

/// The `kube` stream service.
pub struct KubeService {
    upstream: Arc<ApiServer>,
    live: Arc<std::sync::Mutex<Live>>,
    tickets: Arc<TicketCheck>,
}

impl KubeService {
    pub fn new(upstream: Upstream, tickets: TicketCheck) -> Self {
        Self {
            tickets: Arc::new(tickets),
            upstream: Arc::new(ApiServer {
                up: upstream,
                pool: std::sync::Mutex::new(Vec::new()),
            }),
            live: Arc::default(),
        }
    }
}

/// Unregisters a live stream when it ends.
struct LiveGuard {
    live: Arc<std::sync::Mutex<Live>>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut l) = self.live.lock() {
            l.by_id.remove(&self.id);
        }
    }
}

impl StreamService for KubeService {
    fn identity_changed(&self, ident: &crate::identity::DeviceIdentity) {
        if let Ok(mut h) = self.tickets.host_cas.write() {
            *h = ident.cas.host_ca_raws();
        }
    }

    fn serve(&self, stream: BoxedStream, header: StreamHeader) -> ServiceFuture {
        let upstream = self.upstream.clone();
        let live = self.live.clone();
        let tickets = self.tickets.clone();
        Box::pin(async move {
            let claims = match tickets.admit(&header) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(session = %header.session_id, client = %header.client_addr,
                        "kube stream refused: {e}");
                    refuse(stream, &format!("refused by the device: {e}")).await;
                    return;
                }
            };
            let user = claims.user.clone();
            let cancel = CancellationToken::new();
            let id = {
                let Ok(mut l) = live.lock() else { return };
                if l.locked.contains(&user) {
                    tracing::info!(%user, "kube stream refused: user is locked");
                    return;
                }
                l.next += 1;
                let id = l.next;
                l.by_id.insert(id, (user, cancel.clone()));
                id
            };
            // Held by upgraded sessions too, which outlive this stream's HTTP exchange.
            let guard = Arc::new(LiveGuard { live, id });
            serve(upstream, stream, header, claims, cancel, guard).await
        })
    }

    /// Ends the live streams of users who are locked now (watches, logs -f, exec).
    fn set_locked_users(&self, users: Vec<String>) {
        if let Ok(mut l) = self.live.lock() {
            for (user, cancel) in l.by_id.values() {
                if users.contains(user) {
                    tracing::info!(%user, "ending a Kubernetes stream: user is locked");
                    cancel.cancel();
                }
            }
            l.locked = users;
        }
    }
}

async fn serve(
    upstream: Arc<ApiServer>,
    stream: BoxedStream,
    header: StreamHeader,
    claims: TicketClaims,
    cancel: CancellationToken,
    guard: Arc<LiveGuard>,
) {
    let ident = KubeIdentity::from_ticket(&claims);
    let session = header.session_id.clone();
    let cancel2 = cancel.clone();
    let svc = hyper::service::service_fn(move |req| {
        let upstream = upstream.clone();
        let ident = ident.clone();
        let live = (cancel2.clone(), guard.clone());
        async move { Ok::<_, std::convert::Infallible>(forward(&upstream, ident, req, live).await) }
    });
    let conn = one_request()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(%session, "kube stream ended: {e}");
        },
        _ = cancel.cancelled() => tracing::debug!(%session, "kube stream ended: user locked"),
    }
}

/// How long a stream may take to send its request head (the gateway sends it at once).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP server of one ticketed stream: one request per stream. The ticket, checked once
/// per stream, stands for one request of the user it names (the gateway asks for a fresh
/// ticket and opens a fresh stream for each); a gateway that kept the stream to send more
/// would act as the user long after the ticket, and even the certificate, expired.
fn one_request() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    b
}

/// Answers the one request of a refused stream with 403 and `msg`, then closes it.
async fn refuse(stream: BoxedStream, msg: &str) {
    let msg = msg.to_string();
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let r = full(StatusCode::FORBIDDEN, &msg);
        async move { Ok::<_, std::convert::Infallible>(r) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}

fn full(status: StatusCode, msg: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": msg, "code": status.as_u16(),
    })
    .to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Removes every credential and impersonation header the client sent.
pub fn strip_client_identity(h: &mut http::HeaderMap) {
    let imp: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for k in imp {
        h.remove(k);
    }
    h.remove(header::AUTHORIZATION);
    h.remove(header::PROXY_AUTHORIZATION);
}

async fn forward(
    pool: &ApiServer,
    ident: Option<KubeIdentity>,
    mut req: Request<Incoming>,
    (cancel, guard): (CancellationToken, Arc<LiveGuard>),
) -> Response<Body> {
    let Some(ident) = ident else {
        return full(StatusCode::FORBIDDEN, "no user identity on this stream");
    };
    let up = &pool.up;
    let upgrade = is_upgrade(req.headers());
    {
        let h = req.headers_mut();
        strip_client_identity(h);
        strip_hop_by_hop(h, upgrade);
        let Ok(user) = HeaderValue::from_str(&ident.user) else {
            return full(
                StatusCode::BAD_REQUEST,
                "user name is not a valid header value",
            );
        };
        h.insert("impersonate-user", user);
        for g in &ident.groups {
            if let Ok(v) = HeaderValue::from_str(g) {
                h.append("impersonate-group", v);
            }
        }
        if let Some(t) = up.bearer() {
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                v.set_sensitive(true);
                h.insert(header::AUTHORIZATION, v);
            }
        }
        if let Ok(host) = HeaderValue::from_str(&up.host) {
            h.insert(header::HOST, host);
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    match pq.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return full(StatusCode::BAD_REQUEST, "bad request path"),
    }
    *req.version_mut() = http::Version::HTTP_11;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    // A pooled connection first; a request it could not even send (the server closed it
    // meanwhile) is retried once on a fresh one. Upgrades always get their own connection.
    let mut req = req;
    let mut pooled = if upgrade { None } else { pool.take() };
    let (mut resp, sender) = loop {
        let (mut sender, fresh) = match pooled.take() {
            Some(s) => (s, false),
            None => match pool.connect().await {
                Ok(s) => (s, true),
                Err(r) => return r,
            },
        };
        match sender.try_send_request(req).await {
            Ok(r) => break (r, sender),
            Err(mut e) => match e.take_message() {
                Some(back) if !fresh => req = back,
                _ => {
                    return full(
                        StatusCode::BAD_GATEWAY,
                        &format!("API server: {}", e.error()),
                    )
                }
            },
        }
    };
    if !upgrade {
        pool.put(sender);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let server_upgrade = hyper::upgrade::on(&mut resp);
            let user = ident.user.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let (c, s) = match tokio::try_join!(client_upgrade, server_upgrade) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(%user, "upgrade failed: {e}");
                        return;
                    }
                };
                let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut s) => match r {
                        Ok((up, down)) => {
                            tracing::debug!(%user, up, down, "upgraded kube stream ended")
                        }
                        Err(e) => tracing::debug!(%user, "upgraded kube stream ended: {e}"),
                    },
                    _ = cancel.cancelled() => {
                        tracing::info!(%user, "upgraded kube stream ended: user locked")
                    }
                }
            });
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
    fn client_identity_headers_are_removed() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer x"));
        h.insert("impersonate-user", HeaderValue::from_static("admin"));
        h.append(
            "Impersonate-Group",
            HeaderValue::from_static("system:masters"),
        );
        h.insert("impersonate-extra-scopes", HeaderValue::from_static("x"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        strip_client_identity(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn identity_from_ticket() {
        let mut t = TicketClaims {
            id: "t".into(),
            cluster: "c".into(),
            user: "alice".into(),
            device: "d".into(),
            service: edgeport_proto::tunnel::Service::Kube,
            logins: vec![],
            kube_groups: vec!["devs".into()],
            kube_users: vec![],
            requester: "gw".into(),
            holder: None,
            issued_at: 0,
            expires_at: 60,
        };
        assert_eq!(KubeIdentity::from_ticket(&t).unwrap().user, "alice");
        assert_eq!(KubeIdentity::from_ticket(&t).unwrap().groups, ["devs"]);
        t.kube_users = vec!["alice@corp".into()];
        assert_eq!(KubeIdentity::from_ticket(&t).unwrap().user, "alice@corp");
        t.user = String::new();
        t.kube_users.clear();
        assert!(KubeIdentity::from_ticket(&t).is_none());
    }

    /// A ticketed stream carries one request: a second one pipelined behind it (what a
    /// gateway keeping the stream would send) is never served, and the stream ends.
    #[tokio::test]
    async fn a_stream_serves_one_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(full(StatusCode::OK, "ok")) }
        });
        let conn = tokio::spawn(one_request().serve_connection(TokioIo::new(server), svc));
        client
            .write_all(
                b"GET /api/v1/pods HTTP/1.1\r\nHost: k\r\n\r\n\
                  DELETE /api/v1/namespaces/prod HTTP/1.1\r\nHost: k\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("the stream did not end after one request")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
        let _ = conn.await;
    }

    /// A stream that never sends its request head is closed (after HEAD_TIMEOUT: 10 s).
    #[tokio::test]
    async fn a_silent_stream_is_closed() {
        let (_client, server) = tokio::io::duplex(1024);
        let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(full(StatusCode::OK, "ok"))
        });
        let r = tokio::time::timeout(
            HEAD_TIMEOUT + Duration::from_secs(5),
            one_request().serve_connection(TokioIo::new(server), svc),
        )
        .await;
        assert!(r.is_ok(), "still waiting for a request head");
    }
}
