//! The TCP port: TLS 1.3, protocols told apart by ALPN ([`crate::accept`]). Tunnels (yamux on top), joins and
//! user dials (one stream per connection). Handshakes are bounded in number and time so
//! garbage and slow-loris connections cost little and never disturb established tunnels.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edgeport_proto::alpn;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use crate::ctx::Ctx;

/// The ALPN ids served on TCP.
pub const ALPNS: &[&[u8]] = &[alpn::TUNNEL, alpn::JOIN, alpn::DIAL];

/// At most one overload warning a second: a flood must not flood the log too.
fn warn_now() -> bool {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = edgeport_net::clock::now_secs();
    LAST.swap(now, Ordering::Relaxed) != now
}

pub async fn accept_loop(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.cancelled() => return,
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
        let Ok(conn_slot) = ctx.tcp_conns.clone().try_acquire_owned() else {
            if warn_now() {
                tracing::warn!(%addr, "too many TCP connections; dropping new ones");
            }
            continue;
        };
        let ctx = ctx.clone();
        // Tracked, so that shutdown drains served connections; a handshake still in
        // progress when shutdown starts is abandoned at once.
        ctx.tasks.clone().spawn(async move {
            let _conn_slot = conn_slot;
            let shutdown = ctx.shutdown.clone();
            let Some(Some(tls)) = shutdown.run_until_cancelled(admit(&ctx, tcp, addr)).await else {
                return;
            };
            crate::accept::serve(ctx, crate::accept::Handshaken::Tls(Box::new(tls)), addr).await;
        });
    }
}

/// The unauthenticated part of a connection: the source's own slot first (waiting is
/// cheap), then one of the port's, then the TLS handshake within its deadline.
async fn admit(
    ctx: &Ctx,
    tcp: TcpStream,
    addr: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let wait = ctx.cfg.handshake_timeout;
    let Some(_source_slot) = ctx.tcp_sources.take(addr.ip(), wait).await else {
        crate::metrics::handshake_failed("busy");
        tracing::debug!(%addr, "this source kept too many TLS handshakes in progress; dropped");
        return None;
    };
    let Ok(_hs_slot) = ctx.tcp_handshakes.clone().try_acquire_owned() else {
        crate::metrics::handshake_failed("busy");
        if warn_now() {
            tracing::warn!(%addr, "too many TLS handshakes in progress; dropping new ones");
        }
        return None;
    };
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(ctx.cfg.handshake_timeout, handshake(ctx, tcp)).await {
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
    ctx: &Ctx,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let http = start
        .client_hello()
        .alpn()
        .map(|a| crate::kube::tls::wants_http(&a.collect::<Vec<_>>()))
        .unwrap_or(false);
    let cfg = if http {
        ctx.kube
            .tls
            .get(ctx)
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .server
    } else {
        ctx.tcp_tls()
    };
    start.into_stream(cfg).await
}
