//! The Edgeport authority: the cluster's certificate authorities and its system of record.
//!
//! [`Server::start`] opens (or at the first start, creates) the data directory, the three
//! CAs and the store, writes the administrator identity, and serves the mutual-TLS RPC until
//! [`Server::shutdown`].

pub mod access_requests;
pub mod admin_identity;
pub mod audit;
pub mod authorities;
pub mod ca;
pub mod data_dir;
pub mod devices;
pub mod errors;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gateways;
pub mod handlers;
pub mod locks;
pub mod metrics;
pub mod open_sessions;
pub mod policy;
pub mod recordings;
pub mod roles;
pub mod rotation;
pub mod rpc_server;
pub mod service;
pub mod session_mfa;
pub mod sso;
pub mod store;
pub mod targets;
pub mod throttle;
pub mod tokens;
pub mod updates;
pub mod usage;
pub mod users;
pub mod x509;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::alpn;
use edgeport_proto::tls::{server_config, ClientAuth};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ca::CertAuthority;
use crate::data_dir::DataDir;
use crate::service::{Limits, Service};
use crate::store::{PostgresStore, SledStore, Store};

/// The default cluster name.
pub const DEFAULT_CLUSTER: &str = "edgeport";
/// The default RPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3025";
/// How often the administrator identity is checked for renewal while running.
const ADMIN_IDENTITY_CHECK: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub cluster: String,
    pub limits: Limits,
    pub store: StoreChoice,
    /// Roots (PEM) for the PostgreSQL server's certificate; the system's if `None`.
    pub store_ca: Option<PathBuf>,
}

/// Where the system of record lives.
#[derive(Clone, Debug, Default)]
pub enum StoreChoice {
    /// The embedded sled store in `DATA/store` (one authority).
    #[default]
    Embedded,
    /// A PostgreSQL database that several authorities of the cluster share (a
    /// `postgres://` URL or a `key=value` connection string).
    Postgres(String),
}

impl StoreChoice {
    /// `sled` (or empty) for the embedded store, otherwise a PostgreSQL connection string.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s == "sled" || s == "embedded" {
            Ok(StoreChoice::Embedded)
        } else if s.starts_with("postgres://")
            || s.starts_with("postgresql://")
            || s.contains("host=")
            || s.contains("dbname=")
        {
            Ok(StoreChoice::Postgres(s.to_string()))
        } else {
            Err(
                "expected `sled` or a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DB)"
                    .into(),
            )
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    DataDir(#[from] data_dir::DataDirError),
    // The cause is the error's source: `{:#}` (as the binary prints) shows the whole chain
    // once; naming it in the message too printed it twice.
    #[error("certificate authority")]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("administrator identity")]
    AdminIdentity(#[from] admin_identity::AdminIdentityError),
    #[error("TLS")]
    Tls(#[from] edgeport_proto::tls::TlsError),
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: String },
}

/// A running authority.
pub struct Server {
    addr: SocketAddr,
    admin_identity: PathBuf,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The address written into the administrator identity: the listen address, with a
/// wildcard IP replaced by loopback (a wildcard cannot be dialled).
fn dialable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

impl Server {
    /// Opens everything and starts serving. Logs "authority listening on ADDR" once ready.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        edgeport_proto::tls::install_crypto_provider();
        let dir = DataDir::new(&config.data_dir);
        let first_start = dir.prepare(&config.cluster)?;
        let ca_dir = dir.ca_dir();
        if !first_start && !ca::CaKeys::exist_in(&ca_dir) {
            return Err(ca::CaError::Incomplete(ca_dir.display().to_string()).into());
        }
        let (ca, created) = CertAuthority::load_or_create(&ca_dir, &config.cluster)?;
        if created {
            tracing::info!(cluster = %config.cluster, ca_pin = %ca.bundle().ca_pin, "created the cluster's certificate authorities");
        }
        let store = open_store(&config, &dir, &ca).await?;
        // Recordings from before paging are rewritten once, before the first request (#28).
        let migrating = store.clone();
        tokio::task::spawn_blocking(move || {
            let now_ms = edgeport_net::clock::now_secs().saturating_mul(1000);
            recordings::migrate(&*migrating, now_ms)
        })
        .await
        .map_err(|e| store::StoreError::Backend(e.to_string()))??;
        if first_start {
            dir.record_cluster(&config.cluster)?;
        }
        let ca = Arc::new(ca);

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::Listen {
                addr: config.listen.to_string(),
                err: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| StartError::Listen {
            addr: config.listen.to_string(),
            err: e.to_string(),
        })?;
        let tls = tls_source(ca.clone(), addr.ip())?;
        let admin_identity = dir.admin_identity();
        let auth_addr = dialable(addr).to_string();
        let outcome = admin_identity::ensure(&ca, &admin_identity, &auth_addr)?;
        tracing::info!(path = %admin_identity.display(), ?outcome, "administrator identity");

        let service = Arc::new(Service::new(
            store.clone(),
            ca.clone(),
            config.limits.clone(),
        ));
        let _ = service
            .admin_identity
            .set((admin_identity.clone(), auth_addr.clone()));
        let started = edgeport_net::clock::now_secs();
        service
            .registry
            .set_identity(dir.authority_id()?, auth_addr.clone(), started);
        let registering = service.clone();
        tokio::task::spawn_blocking(move || authorities::start(&registering, started))
            .await
            .map_err(|e| store::StoreError::Backend(e.to_string()))??;
        let shutdown = CancellationToken::new();
        tokio::spawn(refresh_admin_identity(
            ca.clone(),
            admin_identity.clone(),
            auth_addr,
            shutdown.clone(),
        ));
        tokio::spawn(open_sessions::run(service.clone(), shutdown.clone()));
        tokio::spawn(authorities::run(service.clone(), shutdown.clone()));
        let task = tokio::spawn(rpc_server::serve(listener, tls, service, shutdown.clone()));
        tracing::info!(cluster = %config.cluster, "authority listening on {addr}");
        Ok(Self {
            addr,
            admin_identity,
            store,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_identity(&self) -> &Path {
        &self.admin_identity
    }

    /// Serves the metrics (`GET /metrics`, Prometheus text) on `addr` until shutdown, and
    /// keeps the store gauges fresh. Returns the bound address.
    pub async fn serve_metrics(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let bound =
            edgeport_net::metrics::serve(addr, metrics::registry(), self.shutdown.clone()).await?;
        tokio::spawn(metrics::refresh(self.store.clone(), self.shutdown.clone()));
        Ok(bound)
    }

    /// Stops accepting, lets requests in flight finish (briefly) and flushes the store.
    pub async fn shutdown(self) -> Result<(), StartError> {
        self.shutdown.cancel();
        if let Err(e) = self.task.await {
            tracing::error!("RPC server task failed: {e}");
        }
        self.store.flush()?;
        Ok(())
    }
}

/// Opens the configured store (connecting to PostgreSQL blocks, so it runs off the runtime).
async fn open_store(
    config: &Config,
    dir: &DataDir,
    ca: &CertAuthority,
) -> Result<Arc<dyn Store>, StartError> {
    match &config.store {
        StoreChoice::Embedded => {
            let store_dir = dir.store_dir();
            edgeport_proto::util::create_private_dir(&store_dir).map_err(|e| {
                data_dir::DataDirError::Io {
                    path: store_dir.display().to_string(),
                    err: e.to_string(),
                }
            })?;
            Ok(Arc::new(SledStore::open(&store_dir)?))
        }
        StoreChoice::Postgres(url) => {
            let (url, cluster) = (url.clone(), config.cluster.clone());
            let (pin, tls_ca) = (ca.bundle().ca_pin.clone(), config.store_ca.clone());
            let opened = tokio::task::spawn_blocking(move || {
                PostgresStore::open(&url, tls_ca.as_deref(), &cluster, &pin)
            })
            .await
            .map_err(|e| store::StoreError::Backend(e.to_string()))??;
            Ok(Arc::new(opened))
        }
    }
}

/// The RPC listener's TLS configuration, made again when the CA bundle changes: an x509 CA
/// rotation changes the trusted x509 CAs (client certificates may chain to either) and, at
/// its end, the CA of the authority's own certificate.
fn tls_source(
    ca: Arc<CertAuthority>,
    ip: std::net::IpAddr,
) -> Result<rpc_server::TlsSource, StartError> {
    fn make(
        ca: &CertAuthority,
        ip: std::net::IpAddr,
    ) -> Result<Arc<rustls::ServerConfig>, StartError> {
        let cert = ca.server_cert(Some(ip))?;
        let der = ca.x509_ca_der();
        Ok(Arc::new(server_config(
            &cert,
            &der,
            ClientAuth::Optional,
            &[alpn::RPC],
        )?))
    }
    let cell = std::sync::Mutex::new((ca.generation(), make(&ca, ip)?));
    Ok(Arc::new(move || {
        let mut cur = cell.lock().unwrap_or_else(|p| p.into_inner());
        let generation = ca.generation();
        if cur.0 != generation {
            match make(&ca, ip) {
                Ok(cfg) => *cur = (generation, cfg),
                Err(e) => tracing::error!("cannot follow the CA rotation on the RPC listener: {e}"),
            }
        }
        cur.1.clone()
    }))
}

async fn refresh_admin_identity(
    ca: Arc<CertAuthority>,
    path: PathBuf,
    auth_addr: String,
    shutdown: CancellationToken,
) {
    // Checked every hour, and within seconds of a CA bundle change (a rotation's grace end).
    let mut seen = ca.generation();
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if ca.generation() == seen && last.elapsed() < ADMIN_IDENTITY_CHECK {
            continue;
        }
        seen = ca.generation();
        last = tokio::time::Instant::now();
        match admin_identity::ensure(&ca, &path, &auth_addr) {
            Ok(admin_identity::Outcome::Kept) => {}
            Ok(o) => {
                tracing::info!(path = %path.display(), outcome = ?o, "administrator identity refreshed")
            }
            Err(e) => tracing::warn!("cannot refresh the administrator identity: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
