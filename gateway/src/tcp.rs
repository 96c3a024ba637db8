//! The TCP port: TLS 1.3, protocols told apart by ALPN ([`crate::accept`]). Tunnels (yamux on top), joins and
//! user dials (one stream per connection). Handshakes are bounded in number and time so
//! garbage and slow-loris connections cost little and never disturb established tunnels.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use edgeport_proto::alpn;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use crate::accept::Routes;
use crate::budget::Admission;
use crate::kube::tls::TlsCache;
use crate::lifecycle::Lifecycle;

/// The ALPN ids served on TCP.
pub const ALPNS: &[&[u8]] = &[alpn::TUNNEL, alpn::JOIN, alpn::DIAL];

/// Does this ClientHello ask for HTTP (the Kubernetes front door) and nothing of Edgeport's
/// own?
fn wants_http(alpns: &[&[u8]]) -> bool {
    alpns.iter().any(|a| crate::kube::tls::ALPNS.contains(a))
        && !alpns.iter().any(|a| ALPNS.contains(a))
}

/// At most one overload warning a second: a flood must not flood the log too.
fn warn_now() -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = edgeport_net::clock::now_secs();
    LAST.swap(now, Ordering::Relaxed) != now
}

/// The TCP port's accept side: where connections go, their unauthenticated budget, the cap
/// on established connections, and the two TLS configs (Edgeport's ALPNs, and the
/// Kubernetes front door's).
pub struct TcpPort {
    pub routes: Arc<Routes>,
    pub admission: Admission,
    pub life: Lifecycle,
    pub conns: Arc<tokio::sync::Semaphore>,
    /// Swapped when the certificate is renewed.
    tls: RwLock<Arc<rustls::ServerConfig>>,
    pub kube_tls: Arc<TlsCache>,
}

impl TcpPort {
    pub fn new(
        routes: Arc<Routes>,
        admission: Admission,
        life: Lifecycle,
        max_connections: usize,
        tls: rustls::ServerConfig,
        kube_tls: Arc<TlsCache>,
    ) -> Self {
        Self {
            routes,
            admission,
            life,
            conns: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            tls: RwLock::new(Arc::new(tls)),
            kube_tls,
        }
    }

    pub fn tls(&self) -> Arc<rustls::ServerConfig> {
        match self.tls.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_tls(&self, cfg: rustls::ServerConfig) {
        match self.tls.write() {
            Ok(mut c) => *c = Arc::new(cfg),
            Err(p) => *p.into_inner() = Arc::new(cfg),
        }
    }
}

pub async fn accept_loop(port: Arc<TcpPort>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = port.life.shutdown.cancelled() => return,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(conn_slot) = port.conns.clone().try_acquire_owned() else {
            if warn_now() {
                tracing::warn!(%addr, "too many TCP connections; dropping new ones");
            }
            continue;
        };
        let port = port.clone();
        // Tracked, so that shutdown drains served connections; a handshake still in
        // progress when shutdown starts is abandoned at once.
        port.life.tasks.clone().spawn(async move {
            let _conn_slot = conn_slot;
            let shutdown = port.life.shutdown.clone();
            // Boxed, so that the TLS handshake's state is not kept for the connection's life
            // (see `quic::accept_loop`).
            let Some(Some(tls)) = shutdown
                .run_until_cancelled(Box::pin(admit(&port, tcp, addr)))
                .await
            else {
                return;
            };
            // A certificate the handshake verified (the cluster's CA, in its validity) makes
            // the source known, now and again when the connection ends: a tunnel held for
            // weeks leaves its source known for the agent's reconnect.
            // The front door's handshake takes any certificate (its check comes after, so
            // that a refused client reads why): there only one the check accepts counts, and
            // that one check is what the front door then serves by.
            let session = tls.get_ref().1;
            let kube_client = session
                .alpn_protocol()
                .is_some_and(|a| crate::kube::tls::ALPNS.contains(&a))
                .then(|| crate::kube::client_of(&port.routes.kube, session.peer_certificates()));
            let proved = match &kube_client {
                Some(client) => client.is_ok(),
                None => session.peer_certificates().is_some_and(|c| !c.is_empty()),
            };
            if proved {
                port.admission.proved(addr.ip());
            }
            match kube_client {
                Some(client) => {
                    Box::pin(crate::kube::serve(
                        port.routes.kube.clone(),
                        tls,
                        addr,
                        client,
                    ))
                    .await
                }
                None => {
                    crate::accept::serve(
                        &port.routes,
                        crate::accept::Handshaken::Tls(Box::new(tls)),
                        addr,
                    )
                    .await
                }
            }
            if proved {
                port.admission.proved(addr.ip());
            }
        });
    }
}

/// The unauthenticated part of a connection: the source's own slot first (waiting is
/// cheap), then one of the port's that its class may take (anonymous clients never the
/// reserve), then the TLS handshake within its deadline.
async fn admit(
    port: &TcpPort,
    tcp: TcpStream,
    addr: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let wait = port.admission.timeout;
    let Some(_source_slot) = port.admission.sources.take(addr.ip(), wait).await else {
        crate::metrics::handshake_failed("busy");
        tracing::debug!(%addr, "this source kept too many TLS handshakes in progress; dropped");
        return None;
    };
    let class = port.admission.class_of(addr.ip());
    let Some(_hs_slot) = port.admission.try_slot(class) else {
        crate::metrics::handshake_failed("busy");
        if warn_now() {
            tracing::warn!(
                %addr, class = class.as_str(),
                "too many TLS handshakes in progress; dropping new ones"
            );
        }
        return None;
    };
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(port.admission.timeout, handshake(port, tcp)).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            crate::metrics::handshake_failed("tls");
            tracing::debug!(%addr, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            crate::metrics::handshake_failed("timeout");
            tracing::debug!(%addr, "TLS handshake timed out");
            None
        }
    }
}

/// TLS handshake; a ClientHello asking only for HTTP (`h2`/`http/1.1`) gets the
/// Kubernetes front door's config ([`crate::kube::tls`]), everything else the tunnel/dial one.
async fn handshake(
    port: &TcpPort,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let http = start
        .client_hello()
        .alpn()
        .map(|a| wants_http(&a.collect::<Vec<_>>()))
        .unwrap_or(false);
    let cfg = if http {
        port.kube_tls
            .get()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .server
    } else {
        port.tls()
    };
    start.into_stream(cfg).await
}
