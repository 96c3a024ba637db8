//! Agent settings (from the command line or the environment of the install bundle).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The tunnel transports an agent may use (`--transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// QUIC, with TCP+TLS+yamux when no QUIC handshake completes, and back to QUIC once UDP
    /// works again. The default.
    Auto,
    /// QUIC only: no fallback (a network where UDP is known to work and a TCP tunnel is not
    /// wanted). The first start's join still goes over TCP+TLS.
    Quic,
    /// TCP+TLS+yamux only: no QUIC attempts and no probes (UDP known to be blocked, or a
    /// fixed line where TCP costs less CPU per byte: docs/benchmarks.md).
    Tcp,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "unknown transport {other:?}: expected auto, quic or tcp"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// `HOST:PORT` of the gateway (same port for UDP and TCP).
    pub gateway: String,
    /// Join token and CA pin: needed on the first start only.
    pub token: Option<String>,
    pub ca_pin: Option<String>,
    /// Requested device id (first start).
    pub requested_id: Option<String>,
    /// Requested labels (first start).
    pub labels: BTreeMap<String, String>,
    /// Which tunnel transports to use.
    pub transport: TransportChoice,
    /// Give up on QUIC and use TCP+TLS+yamux when no QUIC handshake completes this fast.
    pub quic_timeout: Duration,
    /// Keep-alive interval: short enough to keep carrier NAT bindings open. On QUIC with
    /// `keepalive_auto` it is only the TCP fallback's.
    pub keepalive: Duration,
    /// QUIC: learn the interval from the NAT between these bounds (floor, ceiling) instead of
    /// a fixed one (`--keepalive auto`, the default; see `nat_keepalive`).
    pub keepalive_auto: Option<(Duration, Duration)>,
    /// The tunnel is declared dead after this long without hearing from the gateway.
    pub idle_timeout: Duration,
    /// While on TCP, try QUIC again after this long (doubling up to ten times as long).
    pub quic_probe_interval: Duration,
    /// While waiting to reconnect after attempts nothing answered, probe the gateway with a
    /// QUIC version negotiation every few seconds (`gateway_probe`). On by default; the
    /// benchmark turns it off to show what it saves.
    pub probe_silent_gateway: bool,
    /// Reconnect backoff: base and cap (full jitter), reset after a healthy period.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub healthy_after: Duration,
    /// `--target NAME=HOST:PORT [labels]` lines (more in `DATA/targets`; see `targets`).
    pub targets: Vec<String>,
    /// Serve the test-only echo service.
    #[cfg(feature = "test-hooks")]
    pub test_echo: bool,
    /// Tests: renew the certificates once as soon as the first tunnel is up.
    #[cfg(feature = "test-hooks")]
    pub test_renew: bool,
    /// The Kubernetes cluster this agent fronts, if any (reported in Hello). Without the
    /// `kube` feature the agent refuses to start when it is set.
    pub kube_cluster: Option<String>,
    /// Upper bound of the audit spool on disk, bytes.
    pub audit_max_bytes: u64,
    /// How often byte counters are reported while the device is busy (`usage`).
    pub usage_every: Duration,
    /// Tests: sign audit batches with this key instead of the device key.
    #[cfg(feature = "test-hooks")]
    pub test_audit_sign_key: Option<PathBuf>,
    /// Tests: send the first acknowledged audit batch a second time.
    #[cfg(feature = "test-hooks")]
    pub test_audit_replay: bool,
    /// Benchmarks: synthetic audit events emitted at start.
    #[cfg(feature = "test-hooks")]
    pub test_audit_flood: u64,
    /// The agent's own credentials for that cluster's API server (None: in-cluster
    /// service account).
    #[cfg(feature = "kube")]
    pub kubeconfig: Option<PathBuf>,
}

impl AgentConfig {
    pub fn new(data_dir: PathBuf, gateway: String) -> Self {
        Self {
            data_dir,
            gateway,
            token: None,
            ca_pin: None,
            requested_id: None,
            labels: BTreeMap::new(),
            transport: TransportChoice::Auto,
            quic_timeout: Duration::from_secs(3),
            keepalive: Duration::from_secs(25),
            keepalive_auto: Some((
                crate::nat_keepalive::QUIC_FLOOR,
                crate::nat_keepalive::QUIC_CEILING,
            )),
            idle_timeout: Duration::from_secs(90),
            quic_probe_interval: Duration::from_secs(30),
            probe_silent_gateway: true,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            targets: Vec::new(),
            #[cfg(feature = "test-hooks")]
            test_echo: false,
            #[cfg(feature = "test-hooks")]
            test_renew: false,
            kube_cluster: None,
            audit_max_bytes: 64 * 1024 * 1024,
            usage_every: crate::usage::REPORT_EVERY,
            #[cfg(feature = "test-hooks")]
            test_audit_sign_key: None,
            #[cfg(feature = "test-hooks")]
            test_audit_replay: false,
            #[cfg(feature = "test-hooks")]
            test_audit_flood: 0,
            #[cfg(feature = "kube")]
            kubeconfig: None,
        }
    }
}
