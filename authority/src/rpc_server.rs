//! The RPC listener: TCP + TLS 1.3 (client certificates optional, ALPN `edgeport-rpc/1`),
//! then request/response frames in order, as many as the client likes.
//!
//! Each connection runs in its own task, so a bad client (garbage, a truncated or oversized
//! frame, a stalled handshake) closes only its own connection. Handshakes time out, idle
//! connections are closed, and the number of connections is bounded: in all, per source
//! for handshakes and for connections without a gateway's or administrator's certificate,
//! and per gateway and administrator identity, with half of all kept for those two (a
//! compromised gateway cannot take the others' share, nor can anonymous load).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_net::budget::{source_of, KeyedBudget, KnownSources, Slot};
use edgeport_net::read_frame;
use edgeport_proto::frame::{self, FrameError};
use edgeport_proto::rpc::{ErrorKind, Request, Response, RpcError};
use edgeport_proto::tls::peer_principal;
use edgeport_proto::variant::variant_name;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::service::{request_name, Caller, Service};

/// How many connections each party may hold (`Limits::connections`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections one source (an IPv4 address, an IPv6 /64) may hold in any phase, waiting
    /// for a handshake included; past it, new ones are closed at accept.
    pub per_source: usize,
    /// The same for a source where a gateway or administrator proved itself in the last
    /// day (gateways behind one address share it).
    pub per_known_source: usize,
    /// TLS handshakes one source may have in progress; more wait, up to the handshake
    /// deadline, for one of its own.
    pub handshakes_per_source: usize,
    /// Connections one source may hold without a gateway's or administrator's certificate.
    pub unproven_per_source: usize,
    /// Connections one gateway identity may hold (its pool keeps 8 per lane).
    pub per_gateway: usize,
    /// Connections one administrator identity may hold.
    pub per_admin: usize,
    /// Connections that have not proved a gateway's or an administrator's certificate
    /// (handshakes in progress, anonymous callers, users and devices) share this many: the
    /// rest are kept for gateways and administrators, whom the cluster cannot do without.
    pub unproven_total: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            per_source: 80,
            per_known_source: 1024,
            handshakes_per_source: 16,
            unproven_per_source: 64,
            per_gateway: 512,
            per_admin: 256,
            unproven_total: MAX_CONNECTIONS / 2,
        }
    }
}

/// How long a source stays known after a gateway or administrator proved itself there.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);
/// At most this many known sources are kept.
const MAX_KNOWN: usize = 10_000;

/// Whose share a connection counts against once its handshake is done.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Holder {
    Source(std::net::IpAddr),
    Gateway(String),
    Admin(String),
}

/// The connection budgets of one listener.
struct Budgets {
    sources: KeyedBudget<std::net::IpAddr>,
    known_sources: KeyedBudget<std::net::IpAddr>,
    handshakes: KeyedBudget<std::net::IpAddr>,
    unproven: KeyedBudget<Holder>,
    gateways: KeyedBudget<Holder>,
    admins: KeyedBudget<Holder>,
    /// Held by every connection until it proves a gateway or administrator.
    unproven_all: Arc<Semaphore>,
    unproven_total: usize,
    /// Sources where a gateway or administrator proved its certificate in the last day.
    known: KnownSources,
}

impl Budgets {
    fn new(l: ConnectionLimits) -> Self {
        Self {
            sources: KeyedBudget::with_capacity(l.per_source),
            known_sources: KeyedBudget::with_capacity(l.per_known_source),
            handshakes: KeyedBudget::with_capacity(l.handshakes_per_source),
            unproven: KeyedBudget::with_capacity(l.unproven_per_source),
            gateways: KeyedBudget::with_capacity(l.per_gateway),
            admins: KeyedBudget::with_capacity(l.per_admin),
            unproven_all: Arc::new(Semaphore::new(l.unproven_total)),
            unproven_total: l.unproven_total,
            known: KnownSources::new(KNOWN_FOR, MAX_KNOWN),
        }
    }

    /// What a connection holds for its life once its handshake named `caller`: the caller's
    /// share, and (unless it is a gateway or an administrator, whose source then becomes
    /// known) one of the unproven slots, taken now if the handshake went without. Or why
    /// there is none.
    async fn admit(
        &self,
        caller: &Caller,
        peer: SocketAddr,
        unproven: Option<OwnedSemaphorePermit>,
    ) -> Result<(Slot<Holder>, Option<OwnedSemaphorePermit>), String> {
        let (budget, holder, whose) = match caller {
            Caller::Gateway(id) => (&self.gateways, Holder::Gateway(id.clone()), "gateway"),
            Caller::Admin(id) => (&self.admins, Holder::Admin(id.clone()), "administrator"),
            _ => (
                &self.unproven,
                Holder::Source(source_of(peer.ip())),
                "source",
            ),
        };
        let share = budget.take(holder, Duration::ZERO).await.ok_or_else(|| {
            format!(
                "too many connections to the authority from this {whose} ({caller} at {peer}): at most {} at once",
                budget.per_key()
            )
        })?;
        let unproven = match caller {
            Caller::Gateway(_) | Caller::Admin(_) => {
                self.known.remember(peer.ip(), Instant::now());
                None
            }
            _ => match unproven {
                Some(p) => Some(p),
                None => Some(self.unproven_all.clone().try_acquire_owned().map_err(|_| {
                    format!(
                        "the authority has {} connections without a gateway's or administrator's certificate; try again later",
                        self.unproven_total
                    )
                })?),
            },
        };
        Ok((share, unproven))
    }
}

/// A client must finish the TLS handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed (gateways report presence far more
/// often than this).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Writing one response may take at most this long (a client that does not read is dropped).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many connections at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// A connection without a gateway's or administrator's certificate (anonymous callers make
/// one request: a ping, the CAs, a gateway's join) is closed after this long without one.
pub const UNPROVEN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, requests in flight get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests that run argon2 (about 19 MiB and tens of milliseconds each) run a few at a
/// time, so a burst of logins cannot exhaust memory; the others wait their turn.
fn password_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

fn uses_password_hash(req: &Request) -> bool {
    matches!(req, Request::Login(_) | Request::UserAdd(_))
}

/// Serves until `shutdown` is cancelled, then stops accepting, lets connections finish the
/// request they are in (up to [`DRAIN_TIMEOUT`]) and returns.
/// The listener's TLS configuration for the next connection (it follows CA rotations).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

pub async fn serve(
    listener: TcpListener,
    tls: TlsSource,
    service: Arc<Service>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let hashing = Arc::new(Semaphore::new(password_slots()));
    let budgets = Arc::new(Budgets::new(service.limits.connections));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        // Every connection counts against its source from accept to close, waiting for a
        // handshake included, so no one address holds more than its share of the slots.
        let known = budgets.known.is_known(peer.ip(), Instant::now());
        let per_source = if known {
            &budgets.known_sources
        } else {
            &budgets.sources
        };
        let Some(source_slot) = per_source.take(source_of(peer.ip()), Duration::ZERO).await else {
            crate::metrics::handshake_failed("busy");
            log_refused(peer, "this source holds too many connections");
            continue;
        };
        // Until it proves a gateway or an administrator, a connection holds one of the
        // unproven slots: anonymous load never takes the ones kept for them. A source where
        // one of them proved itself recently handshakes outside that pool.
        let unproven = if known {
            None
        } else {
            match budgets.unproven_all.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    crate::metrics::handshake_failed("busy");
                    log_refused(
                        peer,
                        "too many connections without a gateway's or administrator's certificate",
                    );
                    continue;
                }
            }
        };
        // A handshake slot free now is taken here, in accept order; only a connection that
        // has to wait for one waits in its own task. (Taken in the task, a later connection
        // could overtake earlier ones that hold the source's slots.)
        let handshake_slot = budgets
            .handshakes
            .take(source_of(peer.ip()), Duration::ZERO)
            .await;
        let conn = Connection {
            id: NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            peer,
            acceptor: TlsAcceptor::from(tls()),
            service: service.clone(),
            shutdown: shutdown.clone(),
            hashing: hashing.clone(),
            budgets: budgets.clone(),
        };
        tokio::spawn(async move {
            conn.run(tcp, unproven, handshake_slot).await;
            drop((permit, source_slot));
        });
    }
    drop(listener);
    let all = MAX_CONNECTIONS as u32;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all)).await;
    match drained {
        Ok(_) => tracing::debug!("all connections closed"),
        Err(_) => tracing::warn!(
            "{} connection(s) still busy after {:?}; closing them",
            MAX_CONNECTIONS - slots.available_permits(),
            DRAIN_TIMEOUT
        ),
    };
}

/// The caller named by the verified client certificate, if any.
fn caller_of(tls: &TlsStream<TcpStream>, cluster: &str, peer: SocketAddr) -> Caller {
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Caller::Anonymous;
    };
    match peer_principal(cert.as_ref(), cluster) {
        Ok(p) => Caller::from_principal(p),
        Err(e) => {
            // Signed by our CA (rustls checked) but naming no identity of this cluster.
            tracing::warn!(%peer, "client certificate names no identity here ({e}); treating it as anonymous");
            Caller::Anonymous
        }
    }
}

/// Logs a connection refused for want of budget at info, at most once every 10 s (a flood
/// would fill the log), with how many were refused since the last such line.
fn log_refused(peer: SocketAddr, why: &str) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let now = edgeport_net::clock::now_secs();
    let last = LAST.load(Relaxed);
    if now >= last.saturating_add(10) && LAST.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    {
        let more = SINCE.swap(0, Relaxed);
        tracing::info!(%peer, "connection refused: {why} ({more} more refused since the last such line)");
    } else {
        SINCE.fetch_add(1, Relaxed);
    }
}

static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One client connection and what it shares with the others.
struct Connection {
    /// Names this connection to the policy watch (see [`crate::policy`]).
    id: u64,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    service: Arc<Service>,
    shutdown: CancellationToken,
    hashing: Arc<Semaphore>,
    budgets: Arc<Budgets>,
}

impl Connection {
    async fn run(
        self,
        tcp: TcpStream,
        unproven: Option<OwnedSemaphorePermit>,
        handshake_slot: Option<Slot<std::net::IpAddr>>,
    ) {
        let peer = self.peer;
        let source = source_of(peer.ip());
        let handshake_slot = match handshake_slot {
            Some(slot) => Some(slot),
            None => {
                self.budgets
                    .handshakes
                    .take(source, HANDSHAKE_TIMEOUT)
                    .await
            }
        };
        let Some(handshake_slot) = handshake_slot else {
            crate::metrics::handshake_failed("busy");
            log_refused(peer, "this source kept too many TLS handshakes in progress");
            return;
        };
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp));
        let mut tls = match handshake.await {
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                crate::metrics::handshake_failed("timeout");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, "TLS handshake failed: {e}");
                crate::metrics::handshake_failed("tls");
                return;
            }
            Ok(Ok(s)) => s,
        };
        drop(handshake_slot);
        let caller = caller_of(&tls, self.service.cluster(), peer);
        // A revoked or locked gateway gets no share, and its address does not become known.
        if self.barred(&caller).await {
            tracing::info!(%peer, %caller, "connection of a revoked or locked gateway refused");
            let msg = RpcError::new(
                ErrorKind::GatewayRevoked,
                format!("{caller} was revoked or is locked by an administrator"),
            );
            refuse(tls, msg).await;
            return;
        }
        let (_share, _unproven) = match self.budgets.admit(&caller, peer, unproven).await {
            Ok(held) => held,
            Err(why) => {
                tracing::info!(%peer, %caller, "connection refused: {why}");
                crate::metrics::handshake_failed("busy");
                refuse(tls, RpcError::new(ErrorKind::Denied, why)).await;
                return;
            }
        };
        let idle = match caller {
            Caller::Gateway(_) | Caller::Admin(_) => IDLE_TIMEOUT,
            _ => UNPROVEN_IDLE_TIMEOUT,
        };
        tracing::debug!(%peer, %caller, "connected");
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = tokio::time::timeout(idle, read_frame::<Request, _>(&mut tls)) => r,
            };
            let req = match next {
                Err(_) => {
                    tracing::debug!(%peer, %caller, "idle connection closed");
                    break;
                }
                Ok(Err(FrameError::Closed)) => break,
                Ok(Err(e)) => {
                    tracing::info!(%peer, %caller, "closing connection: {e}");
                    // Best effort: tell the client why before closing.
                    let msg = RpcError::new(ErrorKind::Invalid, format!("protocol error: {e}"));
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        send(&mut tls, &Response::Error(msg)),
                    )
                    .await;
                    break;
                }
                Ok(Ok(req)) => req,
            };
            let name = request_name(&req);
            let resp = match req {
                Request::WatchPolicy { .. } if self.barred(&caller).await => {
                    Response::Error(RpcError::new(
                        ErrorKind::GatewayRevoked,
                        format!("{caller} was revoked or is locked by an administrator"),
                    ))
                }
                Request::WatchPolicy { seen } if matches!(caller, Caller::Gateway(_)) => {
                    let policy = &self.service.policy;
                    policy.seen(self.id, seen);
                    let epoch = tokio::select! {
                        e = policy.wait_change(seen, crate::policy::WATCH_MAX) => e,
                        _ = self.shutdown.cancelled() => policy.epoch(),
                        r = read_frame::<Request, _>(&mut tls) => {
                            // A watching gateway sends nothing until it has the answer: this
                            // is its connection closing (or a client breaking the protocol).
                            // Stop counting on its acknowledgements now, not at the next write.
                            tracing::debug!(%peer, %caller, "policy watcher left ({:?})", r.err());
                            break;
                        }
                    };
                    Response::Policy {
                        epoch,
                        exclusive: policy.exclusive,
                    }
                }
                req => self.answer(&caller, req).await,
            };
            match tokio::time::timeout(WRITE_TIMEOUT, send(&mut tls, &resp)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::info!(%peer, %caller, "cannot answer {name}: {e}");
                    break;
                }
                Err(_) => {
                    tracing::info!(%peer, %caller, "client does not read its answers; closing");
                    break;
                }
            }
            // A revoked or locked gateway keeps no connection: its next request would be
            // refused anyway, and an idle one (a policy watch) must not linger.
            if self.barred(&caller).await {
                tracing::warn!(%peer, %caller, "closing the connection of a revoked or locked gateway");
                break;
            }
        }
        self.service.policy.gone(self.id);
        let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
    }

    /// Whether the caller is a revoked or locked gateway (a store read at most every few
    /// seconds, on the blocking pool).
    async fn barred(&self, caller: &Caller) -> bool {
        let Caller::Gateway(id) = caller else {
            return false;
        };
        // Usually the cached list answers: no trip to the blocking pool per request.
        if let Some(b) = self.service.standing.cached(id) {
            return b;
        }
        let (svc, who) = (self.service.clone(), caller.clone());
        tokio::task::spawn_blocking(move || svc.is_barred(&who))
            .await
            .unwrap_or(false)
    }

    /// Runs the handler on the blocking pool (argon2 and store calls block).
    async fn answer(&self, caller: &Caller, req: Request) -> Response {
        let _hashing = if uses_password_hash(&req) {
            self.hashing.clone().acquire_owned().await.ok()
        } else {
            None
        };
        let name = request_name(&req);
        let (method, start) = (variant_name(&req), std::time::Instant::now());
        let (svc, who) = (self.service.clone(), caller.clone());
        let resp = match tokio::task::spawn_blocking(move || svc.handle(&who, req)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(peer = %self.peer, %caller, request = name, "handler failed: {e}");
                Response::Error(RpcError::new(ErrorKind::Internal, "internal error"))
            }
        };
        crate::metrics::rpc(method, start.elapsed(), &resp);
        resp
    }
}

/// Tells a client why it is refused (best effort, a second for each step) and closes.
async fn refuse(mut tls: TlsStream<TcpStream>, why: RpcError) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        send(&mut tls, &Response::Error(why)),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
}

/// Writes one response frame; an answer too large for a frame becomes an error answer.
async fn send(tls: &mut TlsStream<TcpStream>, resp: &Response) -> Result<(), FrameError> {
    let buf = match frame::encode(resp) {
        Ok(b) => b,
        Err(FrameError::TooLarge(n)) => {
            tracing::warn!("answer of {n} bytes exceeds the frame limit");
            frame::encode(&Response::Error(RpcError::new(
                ErrorKind::Internal,
                format!(
                    "the answer ({n} bytes) is larger than the {} byte frame limit",
                    frame::MAX_FRAME_LEN
                ),
            )))?
        }
        Err(e) => return Err(e),
    };
    tls.write_all(&buf).await?;
    tls.flush().await?;
    Ok(())
}
