//! `edge-agent start ...`: see `edge_agent` for what it does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edge_agent::{AgentConfig, TransportChoice};

#[derive(Debug, Parser)]
#[command(
    name = "edge-agent",
    version = edgeport_proto::VERSION,
    about = "Edgeport edge agent: keeps a reverse tunnel to the gateway and serves SSH"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Command {
    /// Joins (first start) and keeps the tunnel up until SIGINT/SIGTERM.
    Start(StartArgs),
    /// Serves SFTP on stdin/stdout (the agent runs this itself for the `sftp` subsystem when
    /// the device has no sftp-server).
    #[cfg(feature = "sftp")]
    #[command(hide = true)]
    SftpServer,
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    /// Where the device keeps its key and certificates.
    #[arg(long, env = "EDGEPORT_DATA_DIR", default_value = "/var/lib/edgeport")]
    data_dir: PathBuf,
    /// The gateway, HOST:PORT (the same port on UDP and TCP).
    #[arg(long, env = "EDGEPORT_GATEWAY")]
    gateway: String,
    /// Join token (first start only; from `tctl tokens add --type device`).
    #[arg(long, env = "EDGEPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster's CA pin (first start only), `sha256:HEX`.
    #[arg(long, env = "EDGEPORT_CA_PIN")]
    ca_pin: Option<String>,
    /// Requested device id (first start only).
    #[arg(long, env = "EDGEPORT_DEVICE_ID")]
    id: Option<String>,
    /// Requested labels, `k=v,k2=v2` (first start only).
    #[arg(long, env = "EDGEPORT_LABELS", default_value = "", value_parser = parse_labels)]
    labels: BTreeMap<String, String>,
    /// Tunnel transport: `auto` (QUIC, falling back to TCP+TLS when UDP is blocked, and back
    /// again), `quic` (never a TCP tunnel) or `tcp` (never QUIC). Joining always uses TCP.
    #[arg(long, env = "EDGEPORT_TRANSPORT", default_value = "auto")]
    transport: TransportChoice,
    /// Use TCP+TLS when no QUIC handshake completes within this time.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    quic_timeout: Duration,
    /// Keep-alive interval (keeps carrier NAT bindings open).
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    keepalive: Duration,
    /// Declare the tunnel dead after this long without hearing from the gateway.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// While on TCP, try QUIC again after this long (backing off up to ten times as long).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    quic_probe_interval: Duration,
    /// Threads that run the agent's tasks. One (the default) keeps every hop of a session
    /// (tunnel stream, SSH, the command's pipes) on one thread, which costs the least CPU per
    /// byte and memory; more only help a device serving many busy sessions at once. 0: one
    /// per core.
    #[arg(long, env = "EDGEPORT_THREADS", default_value_t = 1)]
    threads: usize,
    /// Most bytes the audit spool may take on disk (DATA/audit); beyond, new events are
    /// dropped and counted in an audit.dropped event.
    #[arg(long, env = "EDGEPORT_AUDIT_SPOOL_MAX", default_value = "64M", value_parser = parse_size)]
    audit_spool_max: u64,
    /// Serve this Kubernetes cluster (kubectl reaches it through the gateway).
    #[cfg(feature = "kube")]
    #[arg(long, env = "EDGEPORT_KUBE_CLUSTER")]
    kube_cluster: Option<String>,
    /// The agent's kubeconfig for that cluster (default: the pod's service account).
    #[cfg(feature = "kube")]
    #[arg(long, env = "EDGEPORT_KUBECONFIG", requires = "kube_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Built without the `kube` feature: still read (hidden) so that a Kubernetes setting,
    /// on the command line or in the environment, stops the agent with a clear error
    /// instead of being ignored.
    #[cfg(not(feature = "kube"))]
    #[arg(long, hide = true, env = "EDGEPORT_KUBE_CLUSTER")]
    kube_cluster: Option<String>,
    #[cfg(not(feature = "kube"))]
    #[arg(long, hide = true, env = "EDGEPORT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The SFTP server for the `sftp` subsystem (sftp, scp, tsh scp): `auto` (the system's
    /// sftp-server when there is one, else the built-in one), `builtin`, `none` (refuse
    /// SFTP), or the path of an sftp-server binary.
    #[arg(long, env = "EDGEPORT_SFTP_SERVER", default_value = "auto")]
    sftp_server: String,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; no
    /// authentication: bind it to loopback or a management network).
    #[cfg(feature = "metrics")]
    #[arg(long, env = "EDGEPORT_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[cfg(feature = "test-hooks")]
    #[command(flatten)]
    test: TestHooks,
}

/// Hidden flags for the end-to-end tests and benchmarks (cargo feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[derive(Debug, clap::Args)]
struct TestHooks {
    /// Serve the test-only echo service.
    #[arg(long, hide = true)]
    test_echo: bool,
    /// Renew the certificates once right after the first tunnel is up (tests).
    #[arg(long, hide = true)]
    test_renew: bool,
    /// Tests: sign audit batches with this OpenSSH private key instead of the device key.
    #[arg(long, hide = true)]
    test_audit_sign_key: Option<PathBuf>,
    /// Tests: send the first acknowledged audit batch again.
    #[arg(long, hide = true)]
    test_audit_replay: bool,
    /// Benchmarks: emit this many synthetic audit events at start.
    #[arg(long, hide = true, default_value_t = 0)]
    test_audit_flood: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1024),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1024 * 1024),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n.saturating_mul(mul))
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    // Sub-second values help tests; the public syntax is the shared one (90s, 30m, ...).
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("invalid duration {s:?}: {e}"));
    }
    edgeport_proto::util::parse_duration_secs(s)
        .map(Duration::from_secs)
        .map_err(|e| e.to_string())
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    edgeport_proto::util::parse_labels(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[allow(clippy::infallible_destructuring_match)] // without the `sftp` feature
    let a = match cli.command {
        Command::Start(a) => a,
        #[cfg(feature = "sftp")]
        Command::SftpServer => return ExitCode::from(edge_agent::sftp_server::run() as u8),
    };
    edgeport_net::daemon::init_logging();
    // Read where the SSH server is built (ssh::process::choose_sftp_server), possibly again
    // after each renewal; set here, before any other thread exists.
    std::env::set_var("EDGEPORT_SFTP_SERVER", &a.sftp_server);
    let mut cfg = AgentConfig::new(a.data_dir, a.gateway);
    cfg.token = a.token.filter(|t| !t.is_empty());
    cfg.ca_pin = a.ca_pin.filter(|p| !p.is_empty() && p != "sha256:");
    cfg.requested_id = a.id.filter(|i| !i.is_empty());
    cfg.labels = a.labels;
    cfg.transport = a.transport;
    cfg.quic_timeout = a.quic_timeout.max(Duration::from_millis(100));
    cfg.keepalive = a.keepalive.max(Duration::from_secs(1));
    cfg.idle_timeout = a.idle_timeout.max(cfg.keepalive * 2);
    cfg.quic_probe_interval = a.quic_probe_interval.max(Duration::from_secs(1));
    cfg.audit_max_bytes = a.audit_spool_max.max(4096);
    #[cfg(feature = "test-hooks")]
    {
        cfg.test_echo = a.test.test_echo;
        cfg.test_renew = a.test.test_renew;
        cfg.test_audit_sign_key = a.test.test_audit_sign_key;
        cfg.test_audit_replay = a.test.test_audit_replay;
        cfg.test_audit_flood = a.test.test_audit_flood;
    }
    cfg.kube_cluster = a.kube_cluster.filter(|c| !c.is_empty());
    #[cfg(feature = "kube")]
    {
        cfg.kubeconfig = a.kubeconfig;
    }
    #[cfg(not(feature = "kube"))]
    if cfg.kube_cluster.is_some() || a.kubeconfig.is_some_and(|p| !p.as_os_str().is_empty()) {
        eprintln!(
            "error: --kube-cluster/--kubeconfig: {}",
            edge_agent::agent::AgentError::NoKube
        );
        return ExitCode::FAILURE;
    }
    let threads = edgeport_net::daemon::Threads::from_count(a.threads);
    #[cfg(feature = "metrics")]
    let metrics_addr = a.metrics_addr;
    edgeport_net::daemon::run_on(threads, |shutdown| async move {
        #[cfg(feature = "metrics")]
        if let Some(addr) = metrics_addr {
            let registry = edge_agent::metrics::registry();
            let bound = edgeport_net::metrics::serve(addr, registry, shutdown.clone())
                .await
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
            tracing::info!("metrics on http://{bound}/metrics");
        }
        edge_agent::run(cfg, shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}
