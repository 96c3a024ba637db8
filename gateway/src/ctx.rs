//! State shared by every task of one gateway process.

use std::sync::{Arc, RwLock};

use edgeport_proto::rpc::{ErrorKind, LockSpec, LockTarget, RpcError};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authority::AuthorityClient;
use crate::config::GatewayConfig;
use crate::identity::GatewayIdentity;
use crate::tunnels::Tunnels;

pub struct Ctx {
    pub cfg: GatewayConfig,
    identity: RwLock<Arc<GatewayIdentity>>,
    pub auth: AuthorityClient,
    pub tunnels: Tunnels,
    /// Cancelled on SIGINT/SIGTERM.
    pub shutdown: CancellationToken,
    /// Cancelled (before `shutdown`) when the authority refuses this gateway as revoked.
    pub revoked: CancellationToken,
    /// Tasks serving one connection or stream: spawned here, not detached, so shutdown
    /// waits (a bounded time) for them to finish instead of dropping them mid-way.
    pub tasks: TaskTracker,
    /// Handshakes in progress, per port (a flood on one does not starve the other).
    pub tcp_handshakes: Arc<Semaphore>,
    pub quic_handshakes: Arc<Semaphore>,
    /// Handshakes in progress per source address (IPv4, or IPv6 /64), per port.
    pub tcp_sources: crate::budget::SourceBudget,
    pub quic_sources: crate::budget::SourceBudget,
    /// Established TCP connections.
    pub tcp_conns: Arc<Semaphore>,
    /// The TLS config of the TCP port (swapped when the certificate is renewed).
    pub tcp_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// Locks from the latest presence acknowledgement.
    pub locks: RwLock<Vec<LockSpec>>,
    /// User sessions being spliced (locks cut them).
    pub sessions: crate::sessions::Sessions,
    /// Locked user names, as last sent to agents (they end those users' sessions).
    pub locked_users: RwLock<Vec<String>>,
    /// The public certificate last loaded (`--cert/--key`), kept if a reload fails.
    public_cert: RwLock<Option<Arc<rustls::sign::CertifiedKey>>>,
    /// The Kubernetes front door's TLS and inventory cache.
    pub kube: crate::kube::KubeState,
    /// Recent answers of the authority to `AuthorizeDial`.
    pub grants: crate::grants::Grants,
    /// Links to other gateways, for dials to the devices they hold.
    pub peers: crate::peers::Peers,
    /// Dial tickets of forwarded dials taken here (each is taken once).
    pub tickets: edgeport_proto::ticket::ReplayGuard,
    /// Held while a presence report is in flight (the presence loop and the policy watch
    /// both send them).
    pub reporting: tokio::sync::Mutex<()>,
    /// Gateways the authority revoked or locked, from the latest presence acknowledgement:
    /// their forwarded dials are refused and their links closed.
    pub barred_gateways: tokio::sync::watch::Sender<Vec<String>>,
}

impl Ctx {
    pub fn new(
        cfg: GatewayConfig,
        identity: GatewayIdentity,
        auth: AuthorityClient,
        tcp_tls: rustls::ServerConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let tcp_handshakes = Arc::new(Semaphore::new(cfg.max_handshakes));
        let quic_handshakes = Arc::new(Semaphore::new(cfg.max_handshakes));
        let tcp_conns = Arc::new(Semaphore::new(cfg.max_connections));
        Self {
            cfg,
            identity: RwLock::new(Arc::new(identity)),
            auth,
            tunnels: Tunnels::new(),
            shutdown,
            revoked: CancellationToken::new(),
            tasks: TaskTracker::new(),
            tcp_handshakes,
            quic_handshakes,
            tcp_sources: Default::default(),
            quic_sources: Default::default(),
            tcp_conns,
            tcp_tls: RwLock::new(Arc::new(tcp_tls)),
            locks: RwLock::new(Vec::new()),
            locked_users: RwLock::new(Vec::new()),
            sessions: Default::default(),
            public_cert: RwLock::new(None),
            kube: Default::default(),
            grants: Default::default(),
            peers: Default::default(),
            tickets: Default::default(),
            barred_gateways: tokio::sync::watch::Sender::new(Vec::new()),
            reporting: tokio::sync::Mutex::new(()),
        }
    }

    pub fn identity(&self) -> Arc<GatewayIdentity> {
        match self.identity.read() {
            Ok(i) => i.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_identity(&self, id: GatewayIdentity) {
        match self.identity.write() {
            Ok(mut i) => *i = Arc::new(id),
            Err(p) => *p.into_inner() = Arc::new(id),
        }
    }

    /// Refuses `target` while a lock this gateway knows of is active on it ("user U is
    /// locked: MESSAGE", "device D is locked: MESSAGE").
    pub fn check_unlocked(&self, target: &LockTarget) -> Result<(), RpcError> {
        let now = edgeport_net::clock::now_secs();
        let message = self.locks.read().ok().and_then(|locks| {
            locks
                .iter()
                .find(|l| &l.target == target && (l.expires == 0 || l.expires > now))
                .map(|l| l.message.clone())
        });
        let Some(m) = message else { return Ok(()) };
        Err(RpcError::new(ErrorKind::Locked, lock_reason(target, &m)))
    }

    /// Whether gateway `id` was revoked or locked, as of the latest acknowledgement.
    pub fn gateway_barred(&self, id: &str) -> bool {
        self.barred_gateways.borrow().iter().any(|g| g == id)
    }

    pub fn locked_users(&self) -> Vec<String> {
        self.locked_users
            .read()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn tcp_tls(&self) -> Arc<rustls::ServerConfig> {
        match self.tcp_tls.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_tcp_tls(&self, cfg: rustls::ServerConfig) {
        match self.tcp_tls.write() {
            Ok(mut c) => *c = Arc::new(cfg),
            Err(p) => *p.into_inner() = Arc::new(cfg),
        }
    }

    pub fn public_cert(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self.public_cert.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set_public_cert(&self, cert: Option<Arc<rustls::sign::CertifiedKey>>) {
        match self.public_cert.write() {
            Ok(mut c) => *c = cert,
            Err(p) => *p.into_inner() = cert,
        }
    }
}

/// What a lock on `target` tells the user: "device D is locked: MESSAGE", or without the
/// colon when the administrator gave no message.
pub fn lock_reason(target: &LockTarget, message: &str) -> String {
    let what = match target {
        LockTarget::User(u) => format!("user {u}"),
        LockTarget::Device(d) => format!("device {d}"),
        LockTarget::Gateway(g) => format!("gateway {g}"),
    };
    if message.is_empty() {
        format!("{what} is locked")
    } else {
        format!("{what} is locked: {message}")
    }
}
