//! Wiring: identity, listeners, presence, certificate renewal, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authority::AuthorityClient;
use crate::config::GatewayConfig;
use crate::ctx::Ctx;
use crate::identity::{self, IdentityError};
use crate::{presence, public_cert, quic, tcp};

/// On shutdown, connection and stream tasks get this long to finish once their tunnels and
/// QUIC connections are closed; whatever is still running then is dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("this gateway was revoked or locked by an administrator (tctl gateways rm / tctl lock --gateway); its tunnels were closed")]
    Revoked,
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(cfg: GatewayConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let ident = identity::load_or_join(&cfg).await?;
    let auth = AuthorityClient::new(cfg.auth_addr.clone(), ident.rpc_client_config()?);
    let public = public_cert::load(&cfg)?;
    let tcp_tls = ident.server_config(tcp::ALPNS, public.as_ref())?;
    let quic_cfg = quic::server_config(&ident, cfg.tunnel_idle_timeout, public.as_ref())?;
    let listen_err = |err| ServerError::Listen {
        addr: cfg.listen.to_string(),
        err,
    };
    let listener = TcpListener::bind(cfg.listen).await.map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    // Same port number on UDP. The stateless-reset key survives restarts, so after a crash
    // agents learn at their next keep-alive that their old connection is gone (instead of
    // waiting for their idle timeout) and reconnect at once.
    let reset_key = identity::load_or_make_reset_key(&cfg.data_dir)?;
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset_key,
    )));
    endpoint_cfg
        .cid_generator(quic::cid_generator(&reset_key))
        .min_reset_interval(quic::RESET_INTERVAL);
    let socket = edgeport_net::udp::bind(local).map_err(listen_err)?;
    let endpoint = quinn::Endpoint::new(
        endpoint_cfg,
        Some(quic_cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(listen_err)?;
    tracing::info!(
        gateway = %ident.gateway_id, cluster = %ident.cluster(),
        "gateway listening on {local} (TCP and UDP)"
    );
    if let Some(addr) = cfg.metrics_addr {
        let registry = crate::metrics::registry();
        let bound = edgeport_net::metrics::serve(addr, registry, shutdown.clone())
            .await
            .map_err(|err| ServerError::Listen {
                addr: addr.to_string(),
                err,
            })?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let ctx = Arc::new(Ctx::new(cfg, ident, auth, tcp_tls, shutdown.clone()));
    ctx.set_public_cert(public);
    ctx.peers.set_endpoint(endpoint.clone());
    match &ctx.cfg.peer_addr {
        Some(a) => tracing::info!("other gateways forward dials for this one's devices to {a}"),
        None => tracing::info!("no --peer-addr: other gateways cannot forward dials here"),
    }
    let web = match ctx.cfg.web_addr {
        Some(addr) => Some(tokio::spawn(start_web(ctx.clone(), addr).await?)),
        None => None,
    };
    let tasks = [
        tokio::spawn(tcp::accept_loop(ctx.clone(), listener)),
        tokio::spawn(quic::accept_loop(ctx.clone(), endpoint.clone())),
        tokio::spawn(presence::run(ctx.clone())),
        tokio::spawn(crate::policy::run(ctx.clone())),
        tokio::spawn(crate::audit::run_sink(ctx.clone())),
        tokio::spawn(renew_loop(ctx.clone(), endpoint.clone())),
    ];
    shutdown.cancelled().await;
    let revoked = ctx.revoked.is_cancelled();
    let reason = if revoked {
        "gateway revoked by the cluster's administrator"
    } else {
        "gateway shutting down"
    };
    tracing::info!("shutting down: closing {} tunnels", ctx.tunnels.len());
    if !revoked {
        presence::final_report(&ctx, reason).await;
    }
    ctx.tunnels.close_all(reason);
    endpoint.close(quinn::VarInt::from_u32(0), reason.as_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    drain(&ctx).await;
    for t in tasks.into_iter().chain(web) {
        t.abort();
    }
    if revoked {
        return Err(ServerError::Revoked);
    }
    Ok(())
}

/// Binds the web console's listener and returns its task, with narrow handles: a way to
/// call the authority, the certificate to serve (public, else the gateway's own), shutdown.
async fn start_web(
    ctx: Arc<Ctx>,
    addr: std::net::SocketAddr,
) -> Result<impl std::future::Future<Output = ()>, ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| ServerError::Listen {
            addr: addr.to_string(),
            err,
        })?;
    tracing::info!(
        "web console on https://{}",
        listener.local_addr().unwrap_or(addr)
    );
    let c = ctx.clone();
    let auth: crate::web::AuthCall = Arc::new(move |req| {
        let c = c.clone();
        Box::pin(async move { c.auth.call(req).await })
    });
    let c = ctx.clone();
    let cert: crate::web::CertSource = Arc::new(move || {
        c.public_cert().or_else(|| {
            let me = c.identity().cert_key().ok()?;
            edgeport_proto::tls::certified_key(me.chain.clone(), me.key()).ok()
        })
    });
    Ok(crate::web::serve(
        listener,
        cert,
        auth,
        ctx.shutdown.clone(),
    ))
}

/// Waits (up to [`DRAIN_TIMEOUT`]) for the connection and stream tasks to finish their
/// replies, audit events and session bookkeeping.
async fn drain(ctx: &Ctx) {
    ctx.tasks.close();
    match tokio::time::timeout(DRAIN_TIMEOUT, ctx.tasks.wait()).await {
        Ok(()) => tracing::debug!("all connection tasks finished"),
        Err(_) => tracing::warn!(
            "{} connection task(s) still busy after {:?}; dropping them",
            ctx.tasks.len(),
            DRAIN_TIMEOUT
        ),
    }
}

/// Renews the gateway's certificate when less than a third of its validity is left.
async fn renew_loop(ctx: Arc<Ctx>, endpoint: quinn::Endpoint) {
    loop {
        let ident = ctx.identity();
        let now = edgeport_net::clock::now_secs();
        if ident.needs_renewal(now) {
            let renewed = renew(&ctx, &endpoint).await;
            crate::metrics::renewal("gateway", &renewed);
            match renewed {
                Ok(()) => continue,
                Err(e) => tracing::warn!("certificate renewal failed (will retry): {e}"),
            }
            if ident.valid_before <= now {
                tracing::error!(
                    "this gateway's certificate has expired; join it again with a new token"
                );
            }
        }
        // Check again after a tenth of the remaining time, between 1 minute and 1 hour.
        let wait = ident.valid_before.saturating_sub(now) / 10;
        let wait = Duration::from_secs(wait.clamp(60, 3600));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.shutdown.cancelled() => return,
        }
    }
}

async fn renew(ctx: &Ctx, endpoint: &quinn::Endpoint) -> Result<(), IdentityError> {
    let fresh = identity::renew(&ctx.cfg, &ctx.auth).await?;
    let public = match public_cert::load(&ctx.cfg) {
        Ok(p) => {
            ctx.set_public_cert(p.clone());
            p
        }
        Err(e) => {
            tracing::warn!("public certificate not reloaded, serving the previous one: {e}");
            ctx.public_cert()
        }
    };
    let tcp_tls = fresh.server_config(tcp::ALPNS, public.as_ref())?;
    let quic_cfg = quic::server_config(&fresh, ctx.cfg.tunnel_idle_timeout, public.as_ref())?;
    ctx.auth.set_config(fresh.rpc_client_config()?);
    ctx.set_tcp_tls(tcp_tls);
    endpoint.set_server_config(Some(quic_cfg));
    tracing::info!(
        valid_before = fresh.valid_before,
        "renewed the gateway certificate"
    );
    ctx.set_identity(fresh);
    Ok(())
}
