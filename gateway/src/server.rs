//! Wiring: identity, listeners, presence, certificate renewal, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accept::Routes;
use crate::authority::AuthorityClient;
use crate::budget::{Admission, KnownSources};
use crate::config::GatewayConfig;
use crate::dial::Dialer;
use crate::grants::Grants;
use crate::identity::{self, IdentityCell, IdentityError};
use crate::kube::{tls::TlsCache, Front};
use crate::lifecycle::Lifecycle;
use crate::locks::Locks;
use crate::peers::{Peers, Reach};
use crate::policy::PolicyWatch;
use crate::presence::Reporter;
use crate::quic::QuicPort;
use crate::sessions::Sessions;
use crate::tcp::TcpPort;
use crate::tunnel::TunnelHost;
use crate::tunnels::Tunnels;
use crate::{presence, public_cert, quic, tcp};

pub use crate::lifecycle::DRAIN_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("public certificate: {0}")]
    PublicCert(#[from] public_cert::PublicCertError),
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error("this gateway was revoked or locked by an administrator (tctl gateways rm / tctl lock --gateway); its tunnels were closed")]
    Revoked,
    #[error("--web-origin: {0}")]
    WebOrigin(String),
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
    // The same socket, for the resets that wake a crashed predecessor's agents.
    let wake_socket = socket.try_clone().map_err(listen_err)?;
    let wake_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_key);
    let old_peers = crate::restart_wake::take(&cfg.data_dir);
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
    // The composition root: each handle is made once here and given only to the parts that
    // use it.
    let life = Lifecycle::new(shutdown.clone());
    let identity = IdentityCell::new(ident);
    let auth = Arc::new(auth);
    let tunnels = Arc::new(Tunnels::new());
    let sessions = Arc::new(Sessions::default());
    let locks = Arc::new(Locks::default());
    let grants = Arc::new(Grants::default());
    let peers = Arc::new(Peers::default());
    peers.set_endpoint(endpoint.clone());
    match &cfg.peer_addr {
        Some(a) => tracing::info!("other gateways forward dials for this one's devices to {a}"),
        None => tracing::info!("no --peer-addr: other gateways cannot forward dials here"),
    }
    let reach = Reach {
        auth: auth.clone(),
        identity: identity.clone(),
        tunnels: tunnels.clone(),
        grants: grants.clone(),
        locks: locks.clone(),
        peers,
    };
    let kube_tls = Arc::new(TlsCache::new(identity.clone()));
    let dialer = Arc::new(Dialer {
        reach: reach.clone(),
        sessions: sessions.clone(),
        tickets: Arc::default(),
        life: life.clone(),
        request_timeout: cfg.handshake_timeout,
        splice_dump: cfg.splice_dump.clone(),
    });
    let routes = Arc::new(Routes {
        tunnel: Arc::new(TunnelHost {
            auth: auth.clone(),
            identity: identity.clone(),
            tunnels: tunnels.clone(),
            sessions: sessions.clone(),
            locks: locks.clone(),
            life: life.clone(),
            handshake_timeout: cfg.handshake_timeout,
            idle_timeout: cfg.tunnel_idle_timeout,
        }),
        dial: dialer.clone(),
        kube: Arc::new(Front::new(
            reach,
            sessions.clone(),
            life.tasks.clone(),
            kube_tls.clone(),
        )),
        auth: auth.clone(),
    });
    // Sources that proved a certificate, shared by both ports: an agent known over QUIC gets
    // the reserve on TCP too.
    let known = Arc::new(crate::budget::known_sources());
    let tcp_port = Arc::new(TcpPort::new(
        routes.clone(),
        Admission::new(
            "tcp",
            cfg.max_handshakes,
            cfg.handshake_timeout,
            known.clone(),
        ),
        life.clone(),
        cfg.max_connections,
        tcp_tls,
        kube_tls,
    ));
    let quic_port = Arc::new(QuicPort {
        routes,
        admission: Admission::new(
            "quic",
            cfg.max_handshakes,
            cfg.handshake_timeout,
            known.clone(),
        ),
        life: life.clone(),
        max_connections: cfg.max_connections,
        book: Arc::default(),
        admitting: Default::default(),
    });
    let book_tasks = [
        tokio::spawn(crate::restart_wake::keep(
            quic_port.book.clone(),
            cfg.data_dir.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(crate::restart_wake::wake(
            wake_socket,
            old_peers,
            wake_key,
            quic_port.clone(),
            shutdown.clone(),
        )),
    ];
    let reporter = Arc::new(Reporter::new(
        auth.clone(),
        tunnels.clone(),
        sessions,
        locks,
        life.clone(),
        cfg.presence_interval,
        cfg.presence_lease,
        cfg.peer_addr.clone(),
    ));
    let policy = Arc::new(PolicyWatch {
        auth: auth.clone(),
        grants,
        reporter: reporter.clone(),
    });
    let public = Arc::new(std::sync::Mutex::new(public));
    let known_web = known;
    let web = match cfg.web_addr {
        Some(addr) => Some(tokio::spawn(
            start_web(
                addr,
                WebSettings {
                    origin: cfg.web_origin.clone(),
                    public_addr: cfg.public_addr.clone(),
                    known: known_web,
                },
                auth.clone(),
                identity.clone(),
                public.clone(),
                dialer,
                shutdown.clone(),
            )
            .await?,
        )),
        None => None,
    };
    let (ca_identity, ca_dir) = (identity.clone(), cfg.data_dir.clone());
    let renew_now = Arc::new(tokio::sync::Notify::new());
    let renewal = Renewal {
        renew_now: renew_now.clone(),
        cfg,
        auth: auth.clone(),
        identity,
        tcp: tcp_port.clone(),
        endpoint: endpoint.clone(),
        public,
    };
    let tasks = [
        tokio::spawn(tcp::accept_loop(tcp_port, listener)),
        tokio::spawn(quic::accept_loop(quic_port, endpoint.clone())),
        tokio::spawn(presence::run(reporter.clone())),
        tokio::spawn(crate::policy::run(policy)),
        tokio::spawn(
            crate::ca_watch::CaWatch {
                auth: auth.clone(),
                identity: ca_identity,
                tunnels: tunnels.clone(),
                data_dir: ca_dir,
                renew_now,
            }
            .run(shutdown.clone()),
        ),
        tokio::spawn(
            crate::updates::Deliveries::new(auth.clone(), tunnels.clone()).run(shutdown.clone()),
        ),
        tokio::spawn(crate::audit::run_sink(auth, shutdown.clone())),
        tokio::spawn(renewal.run(shutdown.clone())),
    ];
    shutdown.cancelled().await;
    let revoked = life.revoked.is_cancelled();
    let reason = if revoked {
        "gateway revoked by the cluster's administrator"
    } else {
        "gateway shutting down"
    };
    tracing::info!("shutting down: closing {} tunnels", tunnels.len());
    if !revoked {
        presence::final_report(&reporter, reason).await;
    }
    tunnels.close_all(reason);
    endpoint.close(quinn::VarInt::from_u32(0), reason.as_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    life.drain().await;
    for t in tasks.into_iter().chain(web) {
        t.abort();
    }
    // The book is deleted on a clean stop: every connection was closed above.
    for t in book_tasks {
        let _ = t.await;
    }
    if revoked {
        return Err(ServerError::Revoked);
    }
    Ok(())
}

/// What renewing the gateway's certificate touches: the authority, the identity every part
/// reads, and the TLS configs of both ports.
struct Renewal {
    /// Renew now: the x509 CAs changed (a rotation), so the certificate may be due from
    /// the new CA and every TLS configuration must trust the bundle's CAs.
    renew_now: Arc<tokio::sync::Notify>,
    cfg: GatewayConfig,
    auth: Arc<AuthorityClient>,
    identity: IdentityCell,
    tcp: Arc<TcpPort>,
    endpoint: quinn::Endpoint,
    /// The public certificate last loaded (`--cert/--key`), kept if a reload fails.
    public: PublicCert,
}

/// The public certificate last loaded (`--cert/--key`), shared with the web console.
type PublicCert = Arc<std::sync::Mutex<Option<Arc<rustls::sign::CertifiedKey>>>>;

/// What the web console takes from the gateway's configuration.
struct WebSettings {
    /// `--web-origin`, if given.
    origin: Option<String>,
    /// `--public-addr`, whose host the console's origin has by default.
    public_addr: Option<String>,
    /// Sources that proved a certificate (shared with the tunnel ports).
    known: Arc<KnownSources>,
}

/// Binds the web console's listener and returns its task, with narrow handles: a way to
/// call the authority, the certificate to serve (public, else the gateway's own), shutdown.
async fn start_web(
    addr: std::net::SocketAddr,
    settings: WebSettings,
    auth: Arc<AuthorityClient>,
    identity: IdentityCell,
    public: PublicCert,
    dialer: Arc<Dialer>,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| ServerError::Listen {
            addr: addr.to_string(),
            err,
        })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let origin = crate::web::public_origin(
        settings.origin.as_deref(),
        settings.public_addr.as_deref(),
        bound,
    )
    .map_err(ServerError::WebOrigin)?;
    match &origin {
        Some(o) => tracing::info!("web console on https://{bound}, reached as {o}"),
        None => tracing::warn!(
            "web console on https://{bound}; it has no public address for single sign-on (give --public-addr or --web-origin)"
        ),
    }
    let call: crate::web::AuthCall = Arc::new(move |req| {
        let auth = auth.clone();
        Box::pin(async move { auth.call(req).await })
    });
    let cert: crate::web::CertSource = Arc::new(move || {
        public.lock().ok().and_then(|p| p.clone()).or_else(|| {
            let me = identity.get().cert_key().ok()?;
            edgeport_proto::tls::certified_key(me.chain.clone(), me.key()).ok()
        })
    });
    let options = crate::web::Options {
        origin,
        known: settings.known,
    };
    Ok(crate::web::serve(
        listener, cert, call, dialer, shutdown, options,
    ))
}

/// Renews the gateway's certificate when less than a third of its validity is left.
impl Renewal {
    async fn run(self, shutdown: CancellationToken) {
        let mut forced = false;
        loop {
            let ident = self.identity.get();
            let now = edgeport_net::clock::now_secs();
            if forced || ident.needs_renewal(now) {
                let renewed = self.renew().await;
                crate::metrics::renewal("gateway", &renewed);
                match renewed {
                    Ok(()) => {
                        forced = false;
                        continue;
                    }
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
            let wait = Duration::from_secs(if forced { 5 } else { wait.clamp(60, 3600) });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.renew_now.notified() => forced = true,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn renew(&self) -> Result<(), IdentityError> {
        let fresh = identity::renew(&self.cfg, &self.auth).await?;
        let public = match public_cert::load(&self.cfg) {
            Ok(p) => {
                if let Ok(mut cur) = self.public.lock() {
                    *cur = p.clone();
                }
                p
            }
            Err(e) => {
                tracing::warn!("public certificate not reloaded, serving the previous one: {e}");
                self.public.lock().ok().and_then(|p| p.clone())
            }
        };
        let tcp_tls = fresh.server_config(tcp::ALPNS, public.as_ref())?;
        let quic_cfg = quic::server_config(&fresh, self.cfg.tunnel_idle_timeout, public.as_ref())?;
        self.auth.set_config(fresh.rpc_client_config()?);
        self.tcp.set_tls(tcp_tls);
        self.endpoint.set_server_config(Some(quic_cfg));
        tracing::info!(
            valid_before = fresh.valid_before,
            "renewed the gateway certificate"
        );
        self.identity.set(fresh);
        Ok(())
    }
}
