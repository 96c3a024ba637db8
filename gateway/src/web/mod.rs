//! The web console (issue 25): HTTPS on `--web-addr`, a single-page app compiled into the
//! binary (`gateway/web/`), and a small JSON API. Logins go to the authority, which checks
//! password and one-time code and makes a session bound to a non-extractable WebCrypto key
//! of the browser; every API request carries the session cookie and a signature by that
//! key, and is checked against the authority's session ([`session`]). The gateway never
//! names a user itself.
//!
//! Entry point: [`serve`], which takes what it needs as explicit handles (a way to call the
//! authority, the certificate to serve, the shutdown token) rather than the gateway's context.

pub mod session;
pub mod terminal;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgeport_net::rpc_client::RpcClientError;
use edgeport_proto::rpc::{
    DeviceInfo, ErrorKind, Request, Response, SsoConnectorKind, WebLoginRequest,
    WebSsoFinishRequest, WebSsoStartRequest, WEB_SSO_FINISH_PATH,
};
use futures::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use session::{SessionCache, COOKIE, CSRF_HEADER};

/// Calls the authority (the gateway's pooled mTLS RPC client).
pub type AuthCall =
    Arc<dyn Fn(Request) -> BoxFuture<'static, Result<Response, RpcClientError>> + Send + Sync>;
/// The certificate to serve now: the public one when configured, else the gateway's own.
pub type CertSource = Arc<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");
const TERM_JS: &str = include_str!("../../web/term.js");

/// Largest request body (logins are a few hundred bytes).
const MAX_BODY: usize = 16 * 1024;
/// Largest recording played in the browser.
const MAX_RECORDING: usize = 16 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 1024;
/// Connections open at once from one source (an IPv4 address or an IPv6 /64): a browser
/// keeps about six per site, so this is an office of twenty behind one address.
const CONNECTIONS_PER_SOURCE: usize = 128;
/// Connections not yet past their first request (or WebSockets not yet past their signed
/// hello) at once, all sources; each source has [`crate::budget::PER_SOURCE`] of them.
const MAX_UNPROVEN: usize = 256;
/// How long one request may take, body included (a terminal's WebSocket, once upgraded,
/// is not a request any more).
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);
/// Single sign-on starts and connector listings per source: a burst, then one per interval.
const SSO_BURST: u32 = 30;
const SSO_EVERY: Duration = Duration::from_secs(2);
/// Sources whose single sign-on budget is tracked at once.
const SSO_SOURCES: usize = 100_000;
/// Session requests refused for want of a valid session (401, or 400 for a malformed
/// proof) per source: a burst, then one per interval. Each unknown cookie costs the
/// authority a lookup and a signature check; past the budget the source is answered 429
/// here, except for a request signed by the browser key of a session the authority accepted
/// before (users behind the same address as a flood keep working; their requests are
/// checked as always).
const BAD_SESSION_BURST: u32 = 30;
const BAD_SESSION_EVERY: Duration = Duration::from_secs(2);

/// What the console needs of the gateway's configuration.
pub struct Options {
    /// `https://HOST[:PORT]` as browsers reach the console ([`public_origin`]); single
    /// sign-on returns there. `None`: no single sign-on from this console.
    pub origin: Option<String>,
    /// Sources that proved a certificate lately (shared with the tunnel ports): they have
    /// slots kept for them.
    pub known: Arc<crate::budget::KnownSources>,
}

/// The console's origin: `--web-origin` as given (checked: `https://HOST[:PORT]`), else
/// the host of `--public-addr`, else the listener's address when it is not a wildcard,
/// with the listener's port. Never the request's `Host` header, which the client chooses.
pub fn public_origin(
    given: Option<&str>,
    public_addr: Option<&str>,
    bound: SocketAddr,
) -> Result<Option<String>, String> {
    if let Some(g) = given {
        let u = url::Url::parse(g.trim()).map_err(|e| format!("{g:?}: {e}"))?;
        let clean = u.scheme() == "https"
            && u.host_str().is_some_and(|h| !h.is_empty())
            && u.username().is_empty()
            && u.password().is_none()
            && u.query().is_none()
            && u.fragment().is_none()
            && u.path() == "/";
        if !clean {
            return Err(format!("{g:?}: expected https://HOST[:PORT]"));
        }
        return Ok(Some(u.origin().ascii_serialization()));
    }
    let host = match public_addr.map(host_of).filter(|h| !h.is_empty()) {
        Some(h) => h.to_string(),
        None if bound.ip().is_unspecified() => return Ok(None),
        None => bound.ip().to_string(),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let port = bound.port();
    Ok(Some(if port == 443 {
        format!("https://{host}")
    } else {
        format!("https://{host}:{port}")
    }))
}

/// `host:port`, `[v6]:port` or a bare host -> host.
fn host_of(addr: &str) -> &str {
    let addr = addr.trim();
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => addr,
    }
}

/// A connection's (or WebSocket's) share of the console's unauthenticated budget: its
/// source's slot and one of the console's, held until it has shown something (a request;
/// a terminal's verified hello).
pub struct Admitted {
    _source: crate::budget::Slot,
    _slot: crate::budget::HandshakeSlot,
}

/// Admission of one connection or WebSocket from `ip`: `early`, the source's slot the
/// accept loop took at once, or else one it waits up to `wait` for; then one of the
/// console's (anonymous sources leave some for known ones).
async fn admit(
    admission: &crate::budget::Admission,
    ip: std::net::IpAddr,
    early: Option<crate::budget::Slot>,
    wait: Duration,
) -> Option<Admitted> {
    let source = match early {
        Some(slot) => slot,
        None => admission.sources.take(ip, wait).await?,
    };
    let slot = admission.try_slot(admission.class_of(ip))?;
    Some(Admitted {
        _source: source,
        _slot: slot,
    })
}

/// No inline script or style, nothing from elsewhere, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Web {
    auth: AuthCall,
    sessions: SessionCache,
    term: Arc<terminal::Term>,
    origin: Option<String>,
    admission: crate::budget::Admission,
    sso_budget: crate::budget::RateBudget,
    bad_sessions: crate::budget::RateBudget,
    /// Open connections per source, for their whole life: a request proves nothing (the
    /// page's own files need no session), so one source cannot keep all of the console's
    /// connections open by asking for them now and then.
    connections: crate::budget::SourceBudget,
}

struct Resolver(CertSource);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("web certificate resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }
}

/// Serves the web console on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    cert: CertSource,
    auth: AuthCall,
    dialer: Arc<crate::dial::Dialer>,
    shutdown: CancellationToken,
    options: Options,
) {
    let mut tls = match rustls::ServerConfig::builder_with_provider(edgeport_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(cert))),
        Err(e) => {
            tracing::error!("web console TLS: {e}");
            return;
        }
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let web = Arc::new(Web {
        term: Arc::new(terminal::Term {
            auth: auth.clone(),
            dialer,
            shutdown: shutdown.clone(),
            open: Default::default(),
        }),
        auth,
        sessions: SessionCache::default(),
        origin: options.origin,
        admission: crate::budget::Admission::new(
            "web",
            MAX_UNPROVEN,
            HANDSHAKE_TIMEOUT,
            options.known,
        ),
        sso_budget: crate::budget::RateBudget::new(SSO_BURST, SSO_EVERY, SSO_SOURCES),
        bad_sessions: crate::budget::RateBudget::new(
            BAD_SESSION_BURST,
            BAD_SESSION_EVERY,
            SSO_SOURCES,
        ),
        connections: crate::budget::SourceBudget::with_capacity(CONNECTIONS_PER_SOURCE),
    });
    tokio::spawn(web.term.clone().watch_sessions());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("web console accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(source_slot) = web.connections.take(addr.ip(), Duration::ZERO).await else {
            tracing::debug!(%addr, "web console: this source has too many connections open; dropped");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        // A free slot of its source goes to the connection here, in accept order: taken in
        // each connection's own task, a later connection could overtake earlier ones not
        // yet scheduled on a busy machine. Only one that must wait waits in its task.
        let early = web.admission.sources.take(addr.ip(), Duration::ZERO).await;
        let (acceptor, web, shutdown) = (acceptor.clone(), web.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = (slot, source_slot);
            // Until its first request, a connection is anonymous work: it holds its
            // source's slot (waiting a little for one) and one of the console's.
            let Some(admitted) = admit(&web.admission, addr.ip(), early, HANDSHAKE_TIMEOUT).await
            else {
                tracing::debug!(%addr, "web console: this source has too many connections starting; dropped");
                return;
            };
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let first = Arc::new(tokio::sync::Notify::new());
            let svc = {
                let (web, first) = (web.clone(), first.clone());
                hyper::service::service_fn(move |req| {
                    first.notify_one();
                    let web = web.clone();
                    async move {
                        let handled =
                            tokio::time::timeout(REQUEST_DEADLINE, web.handle(req, addr)).await;
                        Ok::<_, std::convert::Infallible>(handled.unwrap_or_else(|_| {
                            secured(error(
                                StatusCode::REQUEST_TIMEOUT,
                                "the request took too long",
                            ))
                        }))
                    }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r { tracing::debug!(%addr, "web console connection: {e}") }
                    return;
                }
                _ = first.notified() => drop(admitted),
                _ = tokio::time::sleep(HEADER_READ_TIMEOUT) => return,
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%addr, "web console connection: {e}") },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

type Resp = HttpResponse<Full<Bytes>>;

/// Headers every answer carries.
fn secured(mut r: Resp) -> Resp {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "strict-transport-security",
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn answer(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = HttpResponse::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Resp {
    answer(status, "application/json", v.to_string())
}

fn error(status: StatusCode, msg: &str) -> Resp {
    json(status, serde_json::json!({ "error": msg }))
}

fn cookie(token: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// How the authority's refusal reads in the browser.
fn refused(e: RpcClientError) -> Resp {
    match e {
        RpcClientError::Remote(e) => {
            let status = match e.kind {
                ErrorKind::BadCredentials
                | ErrorKind::SecondFactorRequired
                | ErrorKind::Denied
                | ErrorKind::Locked
                | ErrorKind::Expired
                | ErrorKind::NotFound => StatusCode::UNAUTHORIZED,
                ErrorKind::SecondFactorEnroll => StatusCode::FORBIDDEN,
                ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            let msg = if e.kind == ErrorKind::SecondFactorEnroll {
                "this account must first enroll an authenticator app: run tsh login once".into()
            } else {
                e.message
            };
            error(status, &msg)
        }
        other => {
            tracing::warn!("web console: authority unavailable: {other}");
            error(
                StatusCode::BAD_GATEWAY,
                "the cluster's authority is unavailable",
            )
        }
    }
}

fn device_json(d: &DeviceInfo) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "labels": d.labels,
        "online": d.online,
        "transport": d.transport.map(|t| t.as_str()),
        "rtt_ms": d.rtt_ms,
        "last_seen": d.last_seen,
        "version": d.version,
        "arch": d.arch,
    })
}

/// `key=value` (that value) or `key` (any value).
fn label_matches(d: &DeviceInfo, filter: &str) -> bool {
    filter
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .all(|f| match f.split_once('=') {
            Some((k, v)) => d.labels.get(k).map(String::as_str) == Some(v),
            None => d.labels.contains_key(f),
        })
}

/// `/web/sso/CONNECTOR/callback`: the connector's name.
fn sso_callback(path: &str) -> Option<&str> {
    path.strip_prefix("/web/sso/")?
        .strip_suffix("/callback")
        .filter(|c| connector_name_ok(c))
}

/// A connector name as `tctl sso connectors add` makes them: short, letters, digits, `-_`.
/// Whether a route answers only with a proven session (and so asks the authority about the
/// request's cookie and signature).
fn needs_session(path: &str) -> bool {
    matches!(
        path,
        "/api/terminal-nonce" | "/api/session" | "/api/devices" | "/api/logout" | "/api/audit"
    ) || path == terminal::PATH
        || path == "/api/recordings"
        || path.starts_with("/api/recordings/")
}

fn connector_name_ok(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    edgeport_proto::percent::query_param(query?, name)
}

impl Web {
    async fn handle(&self, req: HttpRequest<Incoming>, addr: SocketAddr) -> Resp {
        let path = req.uri().path().to_string();
        let with_session = needs_session(&path);
        let now = std::time::Instant::now();
        if with_session
            && !self.bad_sessions.has_token(addr.ip(), now)
            && !session::proof_of(req.headers(), req.method().as_str(), &path)
                .is_some_and(|p| self.sessions.was_valid(&p, edgeport_net::clock::now_secs()))
        {
            return secured(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests without a valid session from your address; wait a minute",
            ));
        }
        let resp = match (req.method().clone(), path.as_str()) {
            (Method::GET, "/") | (Method::GET, "/index.html") => {
                answer(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
            }
            (Method::GET, "/app.js") => {
                answer(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS)
            }
            (Method::GET, "/term.js") => {
                answer(StatusCode::OK, "text/javascript; charset=utf-8", TERM_JS)
            }
            (Method::GET, "/app.css") => answer(StatusCode::OK, "text/css; charset=utf-8", APP_CSS),
            (Method::POST, "/api/login") => self.login(req, addr).await,
            (Method::GET, "/api/sso/connectors") | (Method::POST, "/api/sso/start")
                if !self.sso_budget.allow(addr.ip(), std::time::Instant::now()) =>
            {
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many single sign-on requests from your address; wait a minute",
                )
            }
            (Method::GET, "/api/sso/connectors") => self.sso_connectors().await,
            (Method::POST, "/api/sso/start") => self.sso_start(req, addr).await,
            (Method::POST, "/api/sso/finish") => self.sso_finish(req, addr).await,
            // The provider sends the browser back here; the page's script finishes the login.
            (Method::GET, p) if sso_callback(p).is_some() => {
                answer(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
            }
            (Method::GET, "/api/terminal-nonce") => self.terminal_nonce(req).await,
            (Method::GET, "/api/session") => self.session(req).await,
            (Method::GET, "/api/devices") => self.devices(req).await,
            (Method::POST, "/api/logout") => self.logout(req).await,
            (Method::GET, terminal::PATH) => self.terminal(req, addr).await,
            (Method::GET, "/api/recordings") => self.recordings(req).await,
            (Method::GET, p) if p.starts_with("/api/recordings/") => self.recording(req).await,
            (Method::GET, "/api/audit") => self.audit(req).await,
            _ => error(StatusCode::NOT_FOUND, "not found"),
        };
        if with_session
            && matches!(
                resp.status(),
                StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST
            )
        {
            self.bad_sessions.allow(addr.ip(), now);
        }
        secured(resp)
    }

    /// State-changing requests come from this origin only (a browser always sends Origin
    /// on a cross-site POST) and as JSON (a form cannot send it without a preflight).
    fn same_origin(req: &HttpRequest<Incoming>) -> bool {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|h| h.to_str().ok());
        match (origin, host) {
            (None, _) => true,
            (Some(o), Some(h)) => o == format!("https://{h}"),
            (Some(_), None) => false,
        }
    }

    /// The JSON body of a same-origin POST (logins: no session yet, so no CSRF token; a
    /// cross-site form cannot send JSON, and a browser sends Origin on cross-site fetches).
    async fn json_body(req: HttpRequest<Incoming>) -> Result<serde_json::Value, Resp> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json || !Self::same_origin(&req) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "cross-site or non-JSON login refused",
            ));
        }
        let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "request too large"));
        };
        serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
            .map_err(|_| error(StatusCode::BAD_REQUEST, "malformed JSON"))
    }

    async fn login(&self, req: HttpRequest<Incoming>, addr: SocketAddr) -> Resp {
        let v = match Self::json_body(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let Ok(browser_key) = hex::decode(field("browser_key")) else {
            return error(StatusCode::BAD_REQUEST, "browser_key must be hex");
        };
        let otp = field("otp");
        let login = WebLoginRequest {
            user: field("user"),
            password: field("password"),
            otp: (!otp.is_empty()).then_some(otp),
            browser_key,
            client_addr: addr.ip().to_string(),
        };
        self.new_session((self.auth)(Request::WebLogin(login)).await)
    }

    /// The authority's answer to a login: the session's cookie and what the page shows.
    fn new_session(&self, answer: Result<Response, RpcClientError>) -> Resp {
        match answer {
            Ok(Response::WebSession(s)) => {
                let Some(token) = s.token.clone() else {
                    return error(StatusCode::BAD_GATEWAY, "the authority gave no session");
                };
                let max_age = s.expires.saturating_sub(edgeport_net::clock::now_secs());
                let mut r = json(
                    StatusCode::OK,
                    serde_json::json!({
                        "user": s.user, "csrf": s.csrf, "expires": s.expires,
                        "logins": s.logins, "roles": s.roles,
                    }),
                );
                r.headers_mut()
                    .insert(header::SET_COOKIE, cookie(&token, max_age));
                self.sessions.put(&token, s);
                r
            }
            Ok(_) => error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            ),
            Err(e) => refused(e),
        }
    }

    /// The single sign-on connectors the login page offers (names and kinds).
    async fn sso_connectors(&self) -> Resp {
        match (self.auth)(Request::WebSsoConnectors).await {
            Ok(Response::SsoConnectors(list)) => {
                let shown: Vec<_> = list
                    .iter()
                    .map(|c| {
                        let kind = match c.kind {
                            SsoConnectorKind::Oidc { .. } => "oidc",
                            SsoConnectorKind::GitHub { .. } => "github",
                        };
                        serde_json::json!({ "name": c.name, "kind": kind })
                    })
                    .collect();
                json(StatusCode::OK, serde_json::json!({ "connectors": shown }))
            }
            Ok(_) => error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            ),
            Err(e) => refused(e),
        }
    }

    /// Starts a single sign-on login that returns to this gateway's callback page. The
    /// authority keeps the browser's key with it: only that browser can finish it.
    ///
    /// The callback is on this console's configured origin, never the request's `Host`;
    /// the authority checks that the connector lists that origin (`--web-origin`).
    async fn sso_start(&self, req: HttpRequest<Incoming>, addr: SocketAddr) -> Resp {
        let Some(origin) = self.origin.clone() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this web console has no public address for single sign-on (gateway start --web-origin https://HOST:PORT)",
            );
        };
        let v = match Self::json_body(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let connector = field("connector");
        if !connector_name_ok(&connector) {
            return error(StatusCode::BAD_REQUEST, "malformed connector");
        }
        let Ok(browser_key) = hex::decode(field("browser_key")) else {
            return error(StatusCode::BAD_REQUEST, "browser_key must be hex");
        };
        let start = WebSsoStartRequest {
            redirect_uri: format!("{origin}/web/sso/{connector}/callback"),
            connector,
            browser_key,
            client_addr: addr.ip().to_string(),
        };
        match (self.auth)(Request::WebSsoStart(start)).await {
            Ok(Response::SsoRedirect { auth_url }) => {
                json(StatusCode::OK, serde_json::json!({ "auth_url": auth_url }))
            }
            Ok(_) => error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            ),
            Err(e) => refused(e),
        }
    }

    /// Finishes a single sign-on login with the provider's code and state, signed by the
    /// browser key of the start (the authority checks that, redeems the code and verifies
    /// who it is).
    async fn sso_finish(&self, req: HttpRequest<Incoming>, addr: SocketAddr) -> Resp {
        let v = match Self::json_body(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let state = field("state");
        let at = v.get("at").and_then(|x| x.as_u64()).unwrap_or(0);
        let Ok(signature) = hex::decode(field("sig")) else {
            return error(StatusCode::BAD_REQUEST, "sig must be hex");
        };
        if state.is_empty() || state.len() > 256 || state.contains(['\n', '\r']) {
            return error(StatusCode::BAD_REQUEST, "malformed state");
        }
        let finish = WebSsoFinishRequest {
            signed: edgeport_proto::web::signed_text(
                at,
                "POST",
                &format!("{WEB_SSO_FINISH_PATH}{state}"),
            ),
            state,
            code: field("code"),
            signature,
            client_addr: addr.ip().to_string(),
        };
        self.new_session((self.auth)(Request::WebSsoFinish(finish)).await)
    }

    /// A single-use nonce for the browser to sign into its next terminal request.
    async fn terminal_nonce(&self, req: HttpRequest<Incoming>) -> Resp {
        match self.ask(&req, Request::WebTerminalNonce).await {
            Ok(Response::WebNonce { nonce, expires }) => json(
                StatusCode::OK,
                serde_json::json!({ "nonce": nonce, "expires": expires }),
            ),
            Ok(_) => error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            ),
            Err(r) => r,
        }
    }

    /// The session of a request, proven by cookie and browser signature, as the authority
    /// (or its answer of the last [`session::CACHE_FOR`]) says.
    async fn proven(
        &self,
        req: &HttpRequest<Incoming>,
    ) -> Result<
        (
            edgeport_proto::rpc::WebProof,
            edgeport_proto::rpc::WebSessionInfo,
        ),
        Resp,
    > {
        let method = req.method().as_str();
        let Some(proof) = session::proof_of(req.headers(), method, req.uri().path()) else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "no session: log in (a session cookie and the browser's signature are required)",
            ));
        };
        let now = edgeport_net::clock::now_secs();
        if let Some(info) = self.sessions.get(&proof, now) {
            return Ok((proof, info));
        }
        match (self.auth)(Request::WebSessionCheck(proof.clone())).await {
            Ok(Response::WebSession(info)) => {
                self.sessions.put(&proof.token, info.clone());
                Ok((proof, info))
            }
            Ok(_) => Err(error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            )),
            Err(e) => {
                self.sessions.forget(&proof.token);
                Err(refused(e))
            }
        }
    }

    async fn session(&self, req: HttpRequest<Incoming>) -> Resp {
        match self.proven(&req).await {
            Ok((_, s)) => json(
                StatusCode::OK,
                serde_json::json!({
                    "user": s.user, "csrf": s.csrf, "expires": s.expires,
                    "logins": s.logins, "roles": s.roles,
                }),
            ),
            Err(r) => r,
        }
    }

    async fn devices(&self, req: HttpRequest<Incoming>) -> Resp {
        let filter = query_param(req.uri().query(), "label").unwrap_or_default();
        let Some(proof) = session::proof_of(req.headers(), "GET", req.uri().path()) else {
            return error(StatusCode::UNAUTHORIZED, "no session: log in");
        };
        // The authority checks the proof itself and picks the devices by the session's
        // user's roles.
        let mut devices = Vec::new();
        let mut after = String::new();
        loop {
            let page = Request::WebDevicePage {
                proof: proof.clone(),
                after: after.clone(),
            };
            match (self.auth)(page).await {
                Ok(Response::DevicePage { devices: d, more }) => {
                    let last = d.last().map(|x| x.id.clone());
                    devices.extend(d);
                    match (more, last) {
                        (true, Some(l)) => after = l,
                        _ => break,
                    }
                }
                Ok(_) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        "unexpected answer from the authority",
                    )
                }
                Err(e) => {
                    self.sessions.forget(&proof.token);
                    return refused(e);
                }
            }
        }
        let shown: Vec<_> = devices
            .iter()
            .filter(|d| label_matches(d, &filter))
            .map(device_json)
            .collect();
        json(StatusCode::OK, serde_json::json!({ "devices": shown }))
    }

    /// Upgrades to the terminal's WebSocket. Only from this origin (a WebSocket is not
    /// bound by the same-origin policy, and the browser sends the cookie to any page that
    /// opens one); who it is for is proven by its first message ([`terminal`]).
    ///
    /// Until its hello is verified, a WebSocket counts against its source's budget (and the
    /// console's) like a connection before its first request.
    async fn terminal(&self, req: HttpRequest<Incoming>, addr: SocketAddr) -> Resp {
        let has_origin = req.headers().contains_key(header::ORIGIN);
        if !has_origin || !Self::same_origin(&req) {
            return error(StatusCode::FORBIDDEN, "cross-site WebSocket refused");
        }
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return error(StatusCode::BAD_REQUEST, "a WebSocket upgrade is required");
        };
        if !upgrade {
            return error(StatusCode::BAD_REQUEST, "a WebSocket upgrade is required");
        }
        let Some(admitted) = admit(&self.admission, addr.ip(), None, Duration::from_secs(2)).await
        else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many terminals opening from your address; try again",
            );
        };
        let token = session::token_from_cookies(req.headers());
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let term = self.term.clone();
        let on = hyper::upgrade::on(req);
        tokio::spawn(async move {
            match on.await {
                Ok(up) => terminal::serve(term, TokioIo::new(up), token, addr, admitted).await,
                Err(e) => tracing::debug!(%addr, "web terminal upgrade: {e}"),
            }
        });
        let mut r = answer(StatusCode::SWITCHING_PROTOCOLS, "text/plain", "");
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert("sec-websocket-accept", v);
        }
        r
    }

    /// Asks the authority with the request's proof (the authority checks it and takes the
    /// user from the session); a refusal forgets the cached session.
    async fn ask(
        &self,
        req: &HttpRequest<Incoming>,
        make: impl FnOnce(edgeport_proto::rpc::WebProof) -> Request,
    ) -> Result<Response, Resp> {
        let Some(proof) = session::proof_of(req.headers(), "GET", req.uri().path()) else {
            return Err(error(StatusCode::UNAUTHORIZED, "no session: log in"));
        };
        let token = proof.token.clone();
        (self.auth)(make(proof)).await.map_err(|e| {
            self.sessions.forget(&token);
            refused(e)
        })
    }

    /// The user's own recordings, newest first, a page at a time (`?cursor=`).
    async fn recordings(&self, req: HttpRequest<Incoming>) -> Resp {
        let cursor = query_param(req.uri().query(), "cursor").filter(|c| !c.is_empty());
        let asked = self
            .ask(&req, |proof| Request::WebRecordingPage {
                proof,
                cursor,
                limit: 50,
            })
            .await;
        match asked {
            Ok(Response::RecordingPage { recordings, next }) => json(
                StatusCode::OK,
                serde_json::json!({ "recordings": recordings, "next": next }),
            ),
            Ok(_) => error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            ),
            Err(r) => r,
        }
    }

    /// One recording (asciicast v2), whole, up to [`MAX_RECORDING`].
    async fn recording(&self, req: HttpRequest<Incoming>) -> Resp {
        let id = req
            .uri()
            .path()
            .trim_start_matches("/api/recordings/")
            .to_string();
        let mut data = Vec::new();
        loop {
            let offset = data.len() as u64;
            let asked = self
                .ask(&req, |proof| Request::WebRecordingGet {
                    proof,
                    session_id: id.clone(),
                    offset,
                })
                .await;
            match asked {
                Ok(Response::RecordingData { data: piece, total }) => {
                    let done = piece.is_empty();
                    data.extend(piece);
                    if done || data.len() as u64 >= total {
                        break;
                    }
                    if data.len() > MAX_RECORDING {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "this recording is too large to play here: use tsh play",
                        );
                    }
                }
                Ok(_) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        "unexpected answer from the authority",
                    )
                }
                Err(r) => return r,
            }
        }
        answer(StatusCode::OK, "text/plain; charset=utf-8", data)
    }

    /// The user's own audit events (`?kind=&device=&session_id=&since_ms=&offset=`).
    async fn audit(&self, req: HttpRequest<Incoming>) -> Resp {
        let q = req.uri().query();
        let opt = |k: &str| query_param(q, k).filter(|v| !v.is_empty());
        let num = |k: &str| opt(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let query = edgeport_proto::audit::AuditQuery {
            since_ms: num("since_ms"),
            kind: opt("kind"),
            device: opt("device"),
            user: None,
            session_id: opt("session_id"),
            offset: num("offset"),
        };
        match self
            .ask(&req, |proof| Request::WebAuditSearch { proof, query })
            .await
        {
            Ok(Response::AuditPage(p)) => json(
                StatusCode::OK,
                serde_json::json!({ "events": p.events, "next": p.next }),
            ),
            Ok(_) => error(
                StatusCode::BAD_GATEWAY,
                "unexpected answer from the authority",
            ),
            Err(r) => r,
        }
    }

    async fn logout(&self, req: HttpRequest<Incoming>) -> Resp {
        if !Self::same_origin(&req) {
            return error(StatusCode::FORBIDDEN, "cross-site request refused");
        }
        let (proof, info) = match self.proven(&req).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let csrf = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !session::same_secret(csrf, &info.csrf) {
            return error(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
        }
        self.sessions.forget(&proof.token);
        // Its terminals here end with it (the authority refuses the session from now on).
        self.term.end_session(&proof.token);
        match (self.auth)(Request::WebLogout(proof)).await {
            Ok(_) => {
                let mut r = json(StatusCode::OK, serde_json::json!({ "ok": true }));
                r.headers_mut().insert(header::SET_COOKIE, cookie("", 0));
                r
            }
            Err(e) => refused(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_label_filters() {
        assert_eq!(
            query_param(Some("x=1&label=fleet%3Dvans"), "label").as_deref(),
            Some("fleet=vans")
        );
        let d = DeviceInfo {
            id: "d".into(),
            labels: [("fleet".to_string(), "vans".to_string())].into(),
            online: true,
            transport: None,
            address: String::new(),
            version: String::new(),
            arch: String::new(),
            rtt_ms: None,
            last_seen: 0,
            last_disconnect_reason: None,
            gateway: None,
            joined_at: 0,
            kube_cluster: None,
            loss_permille: None,
            address_changes_24h: 0,
        };
        assert!(label_matches(&d, "fleet=vans"));
        assert!(label_matches(&d, "fleet"));
        assert!(label_matches(&d, ""));
        assert!(!label_matches(&d, "fleet=cars"));
        assert!(!label_matches(&d, "env"));
    }

    #[test]
    fn the_sign_on_origin_comes_from_configuration_not_the_request() {
        let bound: SocketAddr = "0.0.0.0:3443".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let o = |g: Option<&str>, p: Option<&str>, b| public_origin(g, p, b).unwrap();
        assert_eq!(
            o(Some("https://GW.example.com/"), None, bound).as_deref(),
            Some("https://gw.example.com")
        );
        assert_eq!(
            o(None, Some("gw.example.com:3080"), bound).as_deref(),
            Some("https://gw.example.com:3443")
        );
        assert_eq!(
            o(None, Some("[2001:db8::1]:3080"), bound).as_deref(),
            Some("https://[2001:db8::1]:3443")
        );
        assert_eq!(
            o(None, None, local).as_deref(),
            Some("https://127.0.0.1:8443")
        );
        assert_eq!(
            o(None, None, bound),
            None,
            "a wildcard address is no origin"
        );
        for bad in [
            "http://gw.example",
            "https://gw.example/path",
            "https://u@gw",
        ] {
            assert!(public_origin(Some(bad), None, bound).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_clean_connector_callbacks_serve_the_page() {
        assert_eq!(sso_callback("/web/sso/oidc/callback"), Some("oidc"));
        assert_eq!(
            sso_callback("/web/sso/git-hub_2/callback"),
            Some("git-hub_2")
        );
        for bad in [
            "/web/sso//callback",
            "/web/sso/a/b/callback",
            "/web/sso/a%2f/callback",
            "/web/sso/oidc/callback/x",
        ] {
            assert_eq!(sso_callback(bad), None, "{bad}");
        }
    }
}
