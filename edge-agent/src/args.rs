//! The agent's command line, parsed by hand: clap cost the armv7 build about 70 KB of its
//! 4,000,000-byte budget (docs/benchmarks.md). `--flag VALUE` and `--flag=VALUE`; a flag with
//! an environment variable takes it when the flag is absent (an empty variable counts as
//! absent); the last occurrence wins, except for the repeatable `--target`. An unknown flag or
//! a bad value is one line on stderr and exit code 2.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use edge_agent::{AgentConfig, TransportChoice};

/// What the command line asks for.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // parsed once at start
pub enum Command {
    /// Joins (first start) and keeps the tunnel up until SIGINT/SIGTERM.
    Start(StartArgs),
    /// Serves SFTP on stdin/stdout (hidden: the agent runs it itself for the `sftp`
    /// subsystem when the device has no sftp-server).
    #[cfg(feature = "sftp")]
    SftpServer,
    /// Text for stdout, exit code 0 (`--help`, `--version`).
    Print(String),
}

/// `start`: the agent's settings, filled in directly, plus what the process itself needs.
#[derive(Debug)]
pub struct StartArgs {
    pub cfg: AgentConfig,
    pub threads: usize,
    /// `--sftp-server`, handed to the SSH server through the environment.
    pub sftp_server: String,
    /// `--kube-cluster`/`--kubeconfig` given to a build without the `kube` feature: refused
    /// at start with the agent's own error.
    #[cfg(not(feature = "kube"))]
    pub kube_requested: bool,
    #[cfg(feature = "metrics")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// A usage error: printed as `error: ...` with exit code 2.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (see edge-agent start --help)", self.0)
    }
}

const ABOUT: &str = "Edgeport edge agent: keeps a reverse tunnel to the gateway and serves SSH";

const TOP_HELP: &str = "Usage: edge-agent <COMMAND>

Commands:
  start  Joins (first start) and keeps the tunnel up until SIGINT/SIGTERM
  help   Print this message

Options:
  -h, --help     Print help
  -V, --version  Print version
";

/// Flags that take a value: (flag, environment variable, help line). The help lines are
/// printed in this order.
const VALUE_FLAGS: &[(&str, &str, &str)] = &[
    ("data-dir", "EDGEPORT_DATA_DIR", "DIR  Where the device keeps its key and certificates [default: /var/lib/edgeport]"),
    ("gateway", "EDGEPORT_GATEWAY", "HOST:PORT  The gateway (the same port on UDP and TCP); required"),
    ("token", "EDGEPORT_TOKEN", "TOKEN  Join token (first start only; from `tctl tokens add --type device`)"),
    ("ca-pin", "EDGEPORT_CA_PIN", "sha256:HEX  The cluster's CA pin (first start only)"),
    ("id", "EDGEPORT_DEVICE_ID", "ID  Requested device id (first start only)"),
    ("labels", "EDGEPORT_LABELS", "k=v,k2=v2  Requested labels (first start only)"),
    ("target", "EDGEPORT_TARGETS", "NAME=HOST:PORT  A host behind this device, checked and reported (repeatable; also DATA/targets)"),
    ("transport", "EDGEPORT_TRANSPORT", "auto|quic|tcp  Tunnel transport: QUIC with a TCP+TLS fallback, or only one [default: auto]"),
    ("quic-timeout", "", "DURATION  Use TCP+TLS when no QUIC handshake completes within this time [default: 3s]"),
    ("keepalive", "", "auto|DURATION  Keep-alive interval; auto: QUIC learns the NAT's timeout (10-55 s), TCP uses 25s [default: auto]"),
    ("idle-timeout", "", "DURATION  Declare the tunnel dead after this long without the gateway [default: 90s]"),
    ("quic-probe-interval", "", "DURATION  While on TCP, try QUIC again after this long [default: 30s]"),
    ("threads", "EDGEPORT_THREADS", "N  Threads for the agent's tasks; 0: one per core [default: 1]"),
    ("audit-spool-max", "EDGEPORT_AUDIT_SPOOL_MAX", "SIZE  Most bytes the audit spool may take on disk (K, M, G) [default: 64M]"),
    ("kube-cluster", "EDGEPORT_KUBE_CLUSTER", "NAME  Serve this Kubernetes cluster (kubectl reaches it through the gateway)"),
    ("kubeconfig", "EDGEPORT_KUBECONFIG", "PATH  The agent's kubeconfig for that cluster (default: the pod's service account)"),
    ("sftp-server", "EDGEPORT_SFTP_SERVER", "auto|builtin|none|PATH  The SFTP server for the sftp subsystem [default: auto]"),
    #[cfg(feature = "metrics")]
    ("metrics-addr", "EDGEPORT_METRICS_ADDR", "HOST:PORT  Serve Prometheus metrics at http://HOST:PORT/metrics (no authentication)"),
    #[cfg(feature = "test-hooks")]
    ("test-audit-sign-key", "", ""),
    #[cfg(feature = "test-hooks")]
    ("test-audit-flood", "", ""),
    #[cfg(feature = "test-hooks")]
    ("test-keepalive-range", "", ""),
    #[cfg(feature = "test-hooks")]
    ("test-usage-every", "", ""),
];

/// Switches (no value). Only the hidden test hooks.
#[cfg(feature = "test-hooks")]
const BOOL_FLAGS: &[&str] = &["test-echo", "test-renew", "test-audit-replay"];
#[cfg(not(feature = "test-hooks"))]
const BOOL_FLAGS: &[&str] = &[];

fn start_help() -> String {
    let mut s = String::from(
        "Joins (first start) and keeps the tunnel up until SIGINT/SIGTERM\n\n\
         Usage: edge-agent start --gateway HOST:PORT [OPTIONS]\n\nOptions:\n",
    );
    for (flag, env, help) in VALUE_FLAGS {
        if help.is_empty() || (!cfg!(feature = "kube") && flag.starts_with("kube")) {
            continue;
        }
        let (value, text) = help.split_once("  ").unwrap_or(("", help));
        s.push_str(&format!("  --{flag} {value}\n          {text}"));
        if !env.is_empty() {
            s.push_str(&format!(" [env: {env}]"));
        }
        s.push('\n');
    }
    s.push_str("  -h, --help\n          Print help\n");
    s
}

/// Parses the arguments after the program name; `env` reads the environment.
pub fn parse(
    args: impl IntoIterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        Some("start") => {}
        #[cfg(feature = "sftp")]
        Some("sftp-server") => return Ok(Command::SftpServer),
        None | Some("-h" | "--help" | "help") => {
            return Ok(Command::Print(format!("{ABOUT}\n\n{TOP_HELP}")))
        }
        Some("-V" | "--version") => {
            return Ok(Command::Print(format!(
                "edge-agent {}\n",
                edgeport_proto::VERSION
            )))
        }
        Some(other) => {
            return Err(UsageError(format!(
                "unknown command {other:?}: expected start"
            )))
        }
    }
    let mut given: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Print(start_help()));
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(UsageError(format!("unexpected argument {arg:?}")));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        if let Some(flag) = BOOL_FLAGS.iter().find(|f| **f == name) {
            if inline.is_some() {
                return Err(UsageError(format!("--{name} takes no value")));
            }
            given.entry(flag).or_default().push(String::new());
            continue;
        }
        let Some((flag, _, _)) = VALUE_FLAGS.iter().find(|(f, _, _)| *f == name) else {
            return Err(UsageError(format!("unknown flag --{name}")));
        };
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| UsageError(format!("--{name} needs a value")))?,
        };
        given.entry(flag).or_default().push(value);
    }
    // The command line first, then the environment; empty variables count as absent.
    let get = |flag: &str| -> Option<String> {
        if let Some(v) = given.get(flag).and_then(|v| v.last()) {
            return Some(v.clone());
        }
        let (_, var, _) = VALUE_FLAGS.iter().find(|(f, _, _)| *f == flag)?;
        if var.is_empty() {
            return None;
        }
        env(var).filter(|v| !v.is_empty())
    };
    let bad = |flag: &str, e: String| UsageError(format!("invalid value for --{flag}: {e}"));
    let dur = |flag: &str, default: &str| -> Result<Duration, UsageError> {
        let v = get(flag).unwrap_or_else(|| default.to_string());
        parse_duration(&v).map_err(|e| bad(flag, e))
    };
    let gateway = get("gateway").ok_or_else(|| {
        UsageError("--gateway HOST:PORT is required (or EDGEPORT_GATEWAY)".into())
    })?;
    let labels = match get("labels") {
        Some(l) => {
            edgeport_proto::util::parse_labels(&l).map_err(|e| bad("labels", e.to_string()))?
        }
        None => BTreeMap::new(),
    };
    let transport = get("transport")
        .unwrap_or_else(|| "auto".into())
        .parse::<TransportChoice>()
        .map_err(|e| bad("transport", e))?;
    let threads = match get("threads") {
        Some(t) => t
            .parse::<usize>()
            .map_err(|e| bad("threads", e.to_string()))?,
        None => 1,
    };
    let audit_spool_max = parse_size(&get("audit-spool-max").unwrap_or_else(|| "64M".into()))
        .map_err(|e| bad("audit-spool-max", e))?;
    let targets = match given.get("target") {
        Some(t) => t.clone(),
        None => env("EDGEPORT_TARGETS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
    };
    for t in &targets {
        edge_agent::targets::parse_line(t).map_err(|e| bad("target", e.to_string()))?;
    }
    let kube_cluster = get("kube-cluster").filter(|c| !c.is_empty());
    let kubeconfig = get("kubeconfig")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if kubeconfig.is_some() && kube_cluster.is_none() && cfg!(feature = "kube") {
        return Err(UsageError("--kubeconfig needs --kube-cluster".into()));
    }
    let mut cfg = AgentConfig::new(
        PathBuf::from(get("data-dir").unwrap_or_else(|| "/var/lib/edgeport".into())),
        gateway,
    );
    // An empty value (`--token ""`) counts as absent, like an empty variable.
    let get = |flag: &str| get(flag).filter(|v| !v.is_empty());
    cfg.token = get("token");
    cfg.ca_pin = get("ca-pin").filter(|p| p != "sha256:");
    cfg.requested_id = get("id");
    cfg.labels = labels;
    cfg.transport = transport;
    cfg.quic_timeout = dur("quic-timeout", "3s")?.max(Duration::from_millis(100));
    match get("keepalive").as_deref() {
        None | Some("auto") => {}
        Some(_) => {
            cfg.keepalive = dur("keepalive", "25s")?.max(Duration::from_secs(1));
            cfg.keepalive_auto = None;
        }
    }
    // Room for a lost keep-alive and its retransmission before the tunnel counts as dead.
    let longest = cfg.keepalive_auto.map_or(cfg.keepalive * 2, |(_, hi)| {
        (hi * 3 / 2).max(cfg.keepalive * 2)
    });
    cfg.idle_timeout = dur("idle-timeout", "90s")?.max(longest);
    cfg.quic_probe_interval = dur("quic-probe-interval", "30s")?.max(Duration::from_secs(1));
    cfg.audit_max_bytes = audit_spool_max.max(4096);
    cfg.targets = targets;
    #[cfg(not(feature = "kube"))]
    let kube_requested = kube_cluster.is_some() || kubeconfig.is_some();
    cfg.kube_cluster = kube_cluster;
    #[cfg(feature = "kube")]
    {
        cfg.kubeconfig = kubeconfig;
    }
    #[cfg(feature = "test-hooks")]
    {
        cfg.test_echo = given.contains_key("test-echo");
        cfg.test_renew = given.contains_key("test-renew");
        cfg.test_audit_sign_key = get("test-audit-sign-key").map(PathBuf::from);
        cfg.test_audit_replay = given.contains_key("test-audit-replay");
        if let Some(range) = get("test-keepalive-range") {
            let (lo, hi) = range
                .split_once('-')
                .ok_or_else(|| bad("test-keepalive-range", "expected MIN-MAX".into()))?;
            let lo = parse_duration(lo).map_err(|e| bad("test-keepalive-range", e))?;
            let hi = parse_duration(hi).map_err(|e| bad("test-keepalive-range", e))?;
            cfg.keepalive_auto = Some((lo, hi));
        }
        if let Some(every) = get("test-usage-every") {
            cfg.usage_every = parse_duration(&every).map_err(|e| bad("test-usage-every", e))?;
        }
        cfg.test_audit_flood = match get("test-audit-flood") {
            Some(n) => n
                .parse()
                .map_err(|e: std::num::ParseIntError| bad("test-audit-flood", e.to_string()))?,
            None => 0,
        };
    }
    Ok(Command::Start(StartArgs {
        cfg,
        threads,
        sftp_server: get("sftp-server").unwrap_or_else(|| "auto".into()),
        #[cfg(not(feature = "kube"))]
        kube_requested,
        #[cfg(feature = "metrics")]
        metrics_addr: match get("metrics-addr") {
            Some(a) => Some(
                a.parse()
                    .map_err(|e: std::net::AddrParseError| bad("metrics-addr", e.to_string()))?,
            ),
            None => None,
        },
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Command, UsageError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(args.iter().map(|s| s.to_string()), move |k| {
            env.get(k).cloned()
        })
    }

    fn start(args: &[&str], env: &[(&str, &str)]) -> StartArgs {
        match run(args, env).unwrap() {
            Command::Start(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_env_and_flags() {
        let StartArgs {
            cfg: a,
            threads,
            sftp_server,
            ..
        } = start(&["start", "--gateway", "gw:1"], &[]);
        assert_eq!(a.data_dir, PathBuf::from("/var/lib/edgeport"));
        assert_eq!(a.keepalive, Duration::from_secs(25));
        assert!(a.keepalive_auto.is_some());
        assert_eq!(a.idle_timeout, Duration::from_secs(90));
        assert_eq!(a.quic_timeout, Duration::from_secs(3));
        assert_eq!(a.audit_max_bytes, 64 * 1024 * 1024);
        assert_eq!(threads, 1);
        assert_eq!(a.transport, TransportChoice::Auto);
        assert_eq!(sftp_server, "auto");
        let a = start(
            &[
                "start",
                "--keepalive=5s",
                "--quic-timeout",
                "250ms",
                "--target",
                "a=1.2.3.4:22",
                "--target=b=h:2",
            ],
            &[
                ("EDGEPORT_GATEWAY", "gw:2"),
                ("EDGEPORT_LABELS", "a=b"),
                ("EDGEPORT_TOKEN", ""),
                ("EDGEPORT_TRANSPORT", "tcp"),
            ],
        )
        .cfg;
        assert_eq!(a.gateway, "gw:2");
        assert_eq!(a.labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(a.token, None);
        assert_eq!(a.transport, TransportChoice::Tcp);
        assert_eq!(a.keepalive, Duration::from_secs(5));
        assert_eq!(a.keepalive_auto, None);
        assert_eq!(a.quic_timeout, Duration::from_millis(250));
        assert_eq!(a.targets, vec!["a=1.2.3.4:22", "b=h:2"]);
        // The flag beats the environment.
        let a = start(
            &["start", "--gateway", "x:1"],
            &[("EDGEPORT_GATEWAY", "y:1")],
        )
        .cfg;
        assert_eq!(a.gateway, "x:1");
    }

    #[test]
    fn errors_are_one_line() {
        let e = run(&["start", "--gateway", "g:1", "--nope"], &[]).unwrap_err();
        assert_eq!(e.0, "unknown flag --nope");
        let e = run(&["start", "--gateway", "g:1", "--keepalive", "soon"], &[]).unwrap_err();
        assert!(e.0.starts_with("invalid value for --keepalive"), "{e}");
        let e = run(&["start"], &[]).unwrap_err();
        assert!(e.0.contains("--gateway"), "{e}");
        let e = run(&["start", "--gateway"], &[]).unwrap_err();
        assert_eq!(e.0, "--gateway needs a value");
        let e = run(&["start", "--gateway", "g:1", "--target", "nohost"], &[]).unwrap_err();
        assert!(e.0.starts_with("invalid value for --target"), "{e}");
        assert!(!e.to_string().contains('\n'));
        assert!(run(&["stop"], &[]).is_err());
    }

    #[test]
    fn help_and_version() {
        let Ok(Command::Print(h)) = run(&["start", "--help"], &[]) else {
            panic!()
        };
        assert!(
            h.contains("--gateway") && h.contains("EDGEPORT_DATA_DIR"),
            "{h}"
        );
        assert!(!h.contains("test-"), "{h}");
        assert!(
            matches!(run(&["--version"], &[]), Ok(Command::Print(v)) if v.starts_with("edge-agent "))
        );
    }
}
