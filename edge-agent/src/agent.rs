//! The agent's life: join once, then keep a tunnel up for as long as the process runs,
//! reconnecting with exponential backoff and full jitter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use edgeport_proto::identity::CaBundle;
use edgeport_proto::rpc::DeviceCerts;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::ca_rotation::{self, TakeError};
use crate::config::{AgentConfig, TransportChoice};
use crate::identity::{self, DeviceIdentity, IdentityError};
use crate::join::{self, JoinError};
use crate::services::Services;
use crate::session::{self, Ended, SessionError};
use crate::transport::QuicClient;

/// The longest wait between attempts while the device has no route to the gateway.
const DEAD_ZONE_CAP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `--target` or `DATA/targets` does not parse.
    #[error("targets: {0}")]
    Targets(#[from] crate::targets::TargetsError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[cfg(feature = "kube")]
    #[error("Kubernetes cluster {cluster}: {err}")]
    Kube {
        cluster: String,
        err: crate::kube::UpstreamError,
    },
    /// A Kubernetes cluster configured on an agent built without the `kube` feature.
    #[error("{}", crate::services::NO_KUBE)]
    NoKube,
}

/// The Kubernetes API server when `--kube-cluster` is set: a bad kubeconfig stops the agent
/// at start rather than failing every request later.
#[cfg(feature = "kube")]
fn kube_upstream(cfg: &AgentConfig) -> Result<Option<crate::kube::Upstream>, AgentError> {
    let Some(cluster) = &cfg.kube_cluster else {
        return Ok(None);
    };
    let upstream = match &cfg.kubeconfig {
        Some(p) => crate::kube::Upstream::from_kubeconfig(p),
        None => crate::kube::Upstream::in_cluster(),
    }
    .map_err(|err| AgentError::Kube {
        cluster: cluster.clone(),
        err,
    })?;
    tracing::info!(%cluster, api = %upstream.addr, "serving Kubernetes cluster");
    Ok(Some(upstream))
}

/// State shared by the agent's tasks.
pub struct Agent {
    pub cfg: AgentConfig,
    identity: RwLock<Arc<DeviceIdentity>>,
    pub services: Arc<Services>,
    pub shutdown: CancellationToken,
    /// A renewal asked for regardless of the certificates' age (tests).
    forced_renew: AtomicBool,
    /// The digest of the CA bundle the last renewal's proof named (`edgeport_proto::renew`):
    /// if the answer brought another bundle, the authority did not count that renewal.
    pub renew_signed_bundle: std::sync::Mutex<String>,
    /// The audit spool (`None` if it could not be opened: the agent runs without audit).
    pub audit: Option<Arc<crate::audit::Shared>>,
}

impl Agent {
    pub fn identity(&self) -> Arc<DeviceIdentity> {
        match self.identity.read() {
            Ok(i) => i.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Test hooks for audit shipping (hidden flags; none without the `test-hooks` feature).
    #[cfg(not(feature = "test-hooks"))]
    pub fn audit_tamper(&self) -> crate::audit::ship::Tamper {
        crate::audit::ship::Tamper::default()
    }

    /// Test hooks for audit shipping (hidden flags).
    #[cfg(feature = "test-hooks")]
    pub fn audit_tamper(&self) -> crate::audit::ship::Tamper {
        let sign_key = self.cfg.test_audit_sign_key.as_ref().and_then(|p| {
            let k = std::fs::read_to_string(p)
                .ok()
                .and_then(|pem| edgeport_proto::keys::KeyPair::from_openssh(&pem).ok());
            if k.is_none() {
                tracing::error!(path = %p.display(), "test audit key unreadable");
            }
            k
        });
        crate::audit::ship::Tamper {
            sign_key,
            replay: self.cfg.test_audit_replay,
        }
    }

    /// Whether a renewal was forced (once).
    pub fn take_forced_renew(&self) -> bool {
        self.forced_renew.swap(false, Ordering::Relaxed)
    }

    /// Takes a rotated CA bundle (pushed by the gateway, or with a renewal) once it checks
    /// out (see [`crate::ca_rotation`]): stores it and rebuilds the services that trust it.
    /// `Ok(true)`: our host certificate is from a CA that no longer signs, or another x509
    /// CA issues now; renew.
    pub fn take_cas(&self, fresh: &CaBundle) -> Result<bool, TakeError> {
        let dir = &self.cfg.data_dir;
        let current = self.identity();
        if !ca_rotation::check(dir, &current.cas, fresh)? {
            return Ok(ca_rotation::host_cert_outdated(
                &current.host_cert,
                &current.cas,
            ));
        }
        ca_rotation::retire_dropped(dir, &current.cas, fresh)?;
        let fresh_ident = identity::store_cas(dir, fresh)
            .and_then(|()| identity::load(dir))
            .map_err(|e| TakeError::Store(e.to_string()))?;
        tracing::info!(
            user_cas = fresh.user_cas().len(),
            host_cas = fresh.host_cas().len(),
            "took the rotated CA bundle (signed by the x509 CA this device joined with)"
        );
        self.services.identity_changed(&fresh_ident);
        // Another x509 CA issues now (an x509 CA rotation): renew the tunnel certificate.
        let outdated = ca_rotation::host_cert_outdated(&fresh_ident.host_cert, fresh)
            || fresh.ca_pin != current.cas.ca_pin;
        match self.identity.write() {
            Ok(mut i) => *i = Arc::new(fresh_ident),
            Err(p) => *p.into_inner() = Arc::new(fresh_ident),
        }
        Ok(outdated)
    }

    /// Stores renewed certificates and switches to them.
    pub fn renewed(&self, certs: &DeviceCerts) {
        let current = self.identity();
        if certs.device_id != current.device_id {
            tracing::error!(
                got = %certs.device_id, "renewed certificates name another device; ignored"
            );
            return;
        }
        // Certificates come through the gateway: the CAs must be ours or a rotation of them
        // signed by the x509 CA we joined with (a gateway must not be able to slip in its own
        // user CA), and the host certificate must be for our key, from a host CA we trust.
        if let Err(e) = self.take_cas(&certs.cas) {
            tracing::error!("renewed certificates refused: {e}");
            return;
        }
        let current = self.identity();
        if let Err(e) = identity::check_host_certificate(&current, &current.cas, &certs.host_cert) {
            tracing::error!("renewed certificates refused: {e}");
            return;
        }
        let fresh = identity::store(&self.cfg.data_dir, certs)
            .and_then(|()| identity::load(&self.cfg.data_dir));
        match fresh {
            Ok(fresh) => {
                tracing::info!(valid_before = fresh.valid_before, "certificates renewed");
                self.services.identity_changed(&fresh);
                match self.identity.write() {
                    Ok(mut i) => *i = Arc::new(fresh),
                    Err(p) => *p.into_inner() = Arc::new(fresh),
                }
            }
            Err(e) => tracing::error!("cannot store renewed certificates: {e}"),
        }
    }
}

/// Joins if this data dir has no identity yet. Unreachable gateways are retried (a device
/// may boot before its network is up); refusals end the agent with the reason.
pub async fn ensure_joined(
    cfg: &AgentConfig,
    shutdown: &CancellationToken,
) -> Result<Option<DeviceIdentity>, AgentError> {
    if identity::exists(&cfg.data_dir) {
        let ident = identity::load(&cfg.data_dir)?;
        if let Some(req) = &cfg.requested_id {
            if req != &ident.device_id {
                tracing::warn!(
                    requested = %req, device = %ident.device_id,
                    "--id is ignored: this data dir already belongs to another device id"
                );
            }
        }
        return Ok(Some(ident));
    }
    let key = identity::load_or_make_key(&cfg.data_dir)?;
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap);
    loop {
        match join::join(cfg, &key).await {
            Ok(certs) => {
                identity::store(&cfg.data_dir, &certs)?;
                tracing::info!(
                    device = %certs.device_id, cluster = %certs.cas.cluster, "joined the cluster"
                );
                return Ok(Some(identity::load(&cfg.data_dir)?));
            }
            Err(e) if e.retryable() => {
                let wait = backoff.next_delay();
                tracing::warn!("join: {e}; retrying in {:.1}s", wait.as_secs_f32());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with(cfg, shutdown, QuicClient::default()).await
}

/// [`run`] over a given QUIC client: the benchmark's load generator runs thousands of agents
/// in one process and lets them share a few UDP sockets (a process may hold only so many
/// files).
pub async fn run_with(
    cfg: AgentConfig,
    shutdown: CancellationToken,
    mut quic: QuicClient,
) -> Result<(), AgentError> {
    crate::usage::start(edgeport_net::clock::now_secs());
    #[cfg(feature = "kube")]
    let kube = kube_upstream(&cfg)?;
    #[cfg(not(feature = "kube"))]
    if cfg.kube_cluster.is_some() {
        return Err(AgentError::NoKube);
    }
    let Some(ident) = ensure_joined(&cfg, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(
        device = %ident.device_id, cluster = %ident.cas.cluster, gateway = %cfg.gateway,
        "edge agent starting"
    );
    // Opening the spool reads it and writes (and syncs) a few files: on a slow SD card that
    // takes long enough to stall the runtime, so it runs on the blocking pool.
    let (dir, max) = (cfg.data_dir.clone(), cfg.audit_max_bytes);
    let opened = tokio::task::spawn_blocking(move || crate::audit::start(&dir, max))
        .await
        .unwrap_or_else(|e| {
            Err(crate::audit::SpoolError::Io(format!(
                "opening the audit spool failed: {e}"
            )))
        });
    let audit = match opened {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!("{e}; sessions are served WITHOUT an audit trail");
            None
        }
    };
    // Hosts behind the device: checked and reported; DATA/targets is read again on SIGHUP.
    let targets =
        crate::targets::TargetSet::new(&cfg.data_dir, &cfg.targets).map_err(AgentError::Targets)?;
    tokio::spawn(targets.clone().run_checks(shutdown.clone()));
    tokio::spawn(crate::targets::reload_on_hangup(
        targets.clone(),
        shutdown.clone(),
    ));
    crate::update::started(&cfg.data_dir);
    crate::audit::event("agent.start")
        .field("version", crate::update::version())
        .field("device", &ident.device_id)
        .emit();
    #[cfg(feature = "test-hooks")]
    if cfg.test_audit_flood > 0 {
        let n = cfg.test_audit_flood;
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            crate::audit::flood(n);
            tracing::info!(
                events = n,
                secs = t.elapsed().as_secs_f64(),
                "audit flood spooled"
            );
        });
    }
    #[cfg(feature = "kube")]
    let kube = kube.map(|up| {
        let tickets = crate::kube::TicketCheck::new(&ident);
        Arc::new(crate::kube::KubeService::new(up, tickets))
            as Arc<dyn crate::services::StreamService>
    });
    let services = Arc::new(Services::new(
        #[cfg(feature = "test-hooks")]
        cfg.test_echo,
        &ident,
        #[cfg(feature = "kube")]
        kube,
        targets,
    ));
    #[cfg(feature = "test-hooks")]
    let test_renew = cfg.test_renew;
    #[cfg(not(feature = "test-hooks"))]
    let test_renew = false;
    let agent = Agent {
        audit,
        forced_renew: AtomicBool::new(test_renew),
        renew_signed_bundle: Default::default(),
        cfg,
        identity: RwLock::new(Arc::new(ident)),
        services,
        shutdown,
    };
    let mut backoff = Backoff::new(agent.cfg.backoff_base, agent.cfg.backoff_cap);
    // Without a route to the gateway (a dead zone), attempts cannot load the gateway: retry
    // within DEAD_ZONE_CAP, and watch the route, so the tunnel is back seconds after the link.
    let mut dead_zone = Backoff::new(agent.cfg.backoff_base, DEAD_ZONE_CAP);
    let mut next: Option<session::Session> = None;
    let mut unanswered = false;
    // Whether the last attempt failed with a route to the gateway (nothing answered, or the
    // gateway said no): the wait then probes the gateway (`gateway_probe`).
    let mut silent = false;
    let mut silent_since: Option<Instant> = None;
    // Whether the path coming back (an answered probe, a route that reappears) may cut the
    // attempt in flight short, once per failure: its handshake packets went into the void,
    // and their retransmission timers (QUIC's PTO, TCP's SYN backoff) would make it wait
    // seconds more after the path came back.
    let mut may_restart = false;
    while !agent.shutdown.is_cancelled() {
        let s = match next.take() {
            Some(s) => Ok(s),
            None => tokio::select! {
                r = session::connect(&agent, &mut quic) => r,
                why = path_back(
                    std::mem::take(&mut may_restart),
                    &agent.cfg,
                    silent_since.unwrap_or_else(Instant::now),
                ) => {
                    tracing::info!("{why}; starting a fresh attempt");
                    continue;
                }
                _ = agent.shutdown.cancelled() => break,
            },
        };
        match s {
            Ok(s) => {
                tracing::info!(
                    transport = s.conn.transport().as_str(), gateway = %s.gateway_id,
                    "tunnel up"
                );
                silent_since = None;
                let started = Instant::now();
                crate::audit::event("tunnel.up")
                    .field("transport", s.conn.transport().as_str())
                    .field("gateway", &s.gateway_id)
                    .emit();
                crate::update::online();
                let transport = s.conn.transport().as_str();
                crate::metrics::tunnel(transport, true);
                let ended = session::serve(&agent, s, &mut quic).await;
                crate::metrics::tunnel(transport, false);
                let why = match &ended {
                    Ended::Upgrade(_) => "moving to QUIC".to_string(),
                    Ended::Shutdown => "agent stopping".to_string(),
                    Ended::Lost(r) => r.clone(),
                };
                crate::audit::event("tunnel.down")
                    .field("reason", why)
                    .emit();
                match ended {
                    Ended::Upgrade(s) => {
                        tracing::info!("UDP works again: moved the tunnel back to QUIC");
                        next = Some(s);
                        continue;
                    }
                    Ended::Shutdown => break,
                    Ended::Lost(reason) => {
                        tracing::warn!("tunnel lost: {reason}");
                        if started.elapsed() >= agent.cfg.healthy_after {
                            backoff.reset();
                            dead_zone.reset();
                        }
                    }
                }
            }
            Err(SessionError::Refused(e)) => tracing::error!("the gateway refused the tunnel: {e}"),
            // A busy gateway answered: probing it would only hear it answer again and cut
            // the backoff short, so that every device it turned away would knock again
            // every few seconds (at a full gateway, for as long as it stays full).
            Err(e @ SessionError::Busy(_)) => tracing::warn!("cannot connect to the gateway: {e}"),
            Err(e @ SessionError::NoRoute(_)) => {
                tracing::warn!("cannot connect to the gateway: {e}");
                unanswered = true;
                may_restart = true;
            }
            Err(e) => {
                tracing::warn!("cannot connect to the gateway: {e}");
                silent = true;
                may_restart = true;
                silent_since.get_or_insert_with(Instant::now);
            }
        }
        let wait = if std::mem::take(&mut unanswered) {
            dead_zone.next_delay()
        } else {
            backoff.next_delay()
        };
        tracing::info!("reconnecting in {:.1}s", wait.as_secs_f32());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            why = crate::link_watch::route_changes(&agent.cfg.gateway) => {
                tracing::info!("{why}; reconnecting now");
                may_restart = false;
            }
            why = probe_if(
                std::mem::take(&mut silent) && probing(&agent.cfg),
                &agent.cfg.gateway,
                silent_since.unwrap_or_else(Instant::now),
            ) => {
                tracing::info!("{why}; reconnecting now");
                // The gateway answers: let the next attempt finish however long it takes.
                may_restart = false;
            }
            _ = agent.shutdown.cancelled() => break,
        }
    }
    // Let the gateway hear about the close instead of waiting for an idle timeout.
    quic.shutdown().await;
    crate::audit::event("agent.stop").emit();
    let _ = tokio::task::spawn_blocking(|| crate::audit::flush(Duration::from_secs(2))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    tracing::info!("edge agent stopped");
    Ok(())
}

/// Whether this agent probes a silent gateway (QUIC allowed, and not turned off).
fn probing(cfg: &AgentConfig) -> bool {
    cfg.probe_silent_gateway && cfg.transport != TransportChoice::Tcp
}

/// While `on`: resolves when the path to the gateway is back, by its route reappearing or
/// moving (`link_watch`) or by a probe answered (`gateway_probe`); pending otherwise.
async fn path_back(on: bool, cfg: &AgentConfig, since: Instant) -> String {
    if !on {
        return std::future::pending().await;
    }
    tokio::select! {
        why = crate::link_watch::route_changes(&cfg.gateway) => why,
        why = probe_if(probing(cfg), &cfg.gateway, since) => why,
    }
}

/// Probes the gateway over UDP while `on` (see `gateway_probe`); pending otherwise.
async fn probe_if(on: bool, gateway: &str, since: Instant) -> String {
    if on {
        crate::gateway_probe::answers_again(gateway, since).await
    } else {
        std::future::pending().await
    }
}
