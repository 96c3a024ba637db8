//! The RPC listener: TCP + TLS 1.3 (client certificates optional, ALPN `edgeport-rpc/1`),
//! then request/response frames in order, as many as the client likes.
//!
//! Each connection runs in its own task, so a bad client (garbage, a truncated or oversized
//! frame, a stalled handshake) closes only its own connection. Handshakes time out, idle
//! connections are closed, and the number of connections is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgeport_net::read_frame;
use edgeport_proto::frame::{self, FrameError};
use edgeport_proto::rpc::{ErrorKind, Request, Response, RpcError};
use edgeport_proto::tls::peer_principal;
use edgeport_proto::variant::variant_name;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::service::{request_name, Caller, Service};

/// A client must finish the TLS handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed (gateways report presence far more
/// often than this).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Writing one response may take at most this long (a client that does not read is dropped).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many connections at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;
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
        let conn = Connection {
            id: NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            peer,
            acceptor: TlsAcceptor::from(tls()),
            service: service.clone(),
            shutdown: shutdown.clone(),
            hashing: hashing.clone(),
        };
        tokio::spawn(async move {
            conn.run(tcp).await;
            drop(permit);
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
}

impl Connection {
    async fn run(self, tcp: TcpStream) {
        let peer = self.peer;
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
        let caller = caller_of(&tls, self.service.cluster(), peer);
        tracing::debug!(%peer, %caller, "connected");
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = tokio::time::timeout(IDLE_TIMEOUT, read_frame::<Request, _>(&mut tls)) => r,
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
