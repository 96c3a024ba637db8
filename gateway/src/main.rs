//! `gateway start ...`: see `edgeport_gateway` for what it does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgeport_gateway::GatewayConfig;

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version = edgeport_proto::VERSION,
    about = "Edgeport gateway: holds device tunnels, relays joins, logins and user streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Joins the cluster (first start) and serves tunnels until SIGINT/SIGTERM.
    Start(StartArgs),
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    /// Where the gateway keeps its key and certificates.
    #[arg(long, env = "EDGEPORT_DATA_DIR")]
    data_dir: PathBuf,
    /// The authority's RPC address.
    #[arg(long, env = "EDGEPORT_AUTH")]
    auth: String,
    /// Gateway join token (first start only; from `tctl tokens add --type gateway`).
    #[arg(long, env = "EDGEPORT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster's CA pin (first start only), `sha256:HEX`.
    #[arg(long, env = "EDGEPORT_CA_PIN")]
    ca_pin: Option<String>,
    /// Requested gateway id.
    #[arg(long)]
    id: Option<String>,
    /// TCP and UDP address to listen on (same port for both).
    #[arg(long, default_value = "127.0.0.1:3080")]
    listen: SocketAddr,
    /// HOST:PORT that devices and users dial (put into the server certificate).
    #[arg(long)]
    public_addr: Option<String>,
    /// HOST:PORT (UDP) where other gateways of the cluster reach this one to forward dials
    /// for the devices it holds. Default: --listen, unless that is a wildcard address (then
    /// no dials are forwarded here). Behind a load balancer, give each gateway its own.
    #[arg(long, env = "EDGEPORT_PEER_ADDR", value_parser = parse_peer_addr)]
    peer_addr: Option<String>,
    /// A public certificate chain (PEM, e.g. Let's Encrypt's fullchain.pem) for the name in
    /// --public-addr: users may then `tsh login` without --ca-pin, verified by system roots.
    /// Devices never use it.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Full presence snapshot interval.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    presence_interval: u64,
    /// How long the authority may believe a presence snapshot.
    #[arg(long, default_value = "45s", value_parser = parse_duration)]
    presence_lease: u64,
    /// Drop a tunnel that sends no keep-alive for this long (must exceed agents' --keepalive).
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    tunnel_idle_timeout: u64,
    /// Established connections at once, on TCP and on QUIC each (devices' tunnels and users'
    /// dials): more are refused. An idle QUIC tunnel costs about 50 KiB of memory
    /// (docs/benchmarks.md), so 100,000 need about 5 GB.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Threads that run the gateway's tasks; 0 (the default) is one per core. On a gateway
    /// that shares its cores with other busy processes, 1 saves the cross-thread wake-ups of
    /// every relayed chunk (see docs/benchmarks.md).
    #[arg(long, env = "EDGEPORT_THREADS", default_value_t = 0)]
    threads: usize,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; no
    /// authentication: bind it to an address only your monitoring reaches).
    #[arg(long, env = "EDGEPORT_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Serve the web console (a browser login, the fleet) over HTTPS at HOST:PORT, with
    /// --cert when given, else the gateway's own certificate. Off by default.
    #[arg(long, env = "EDGEPORT_WEB_ADDR")]
    web_addr: Option<SocketAddr>,
    /// The web console's address as browsers reach it, https://HOST[:PORT] (behind a load
    /// balancer or NAT). Default: the host of --public-addr, else of --web-addr, with
    /// --web-addr's port. Single sign-on returns here; the authority accepts it only if the
    /// connector lists it (tctl sso connectors add ... --web-origin).
    #[arg(long, env = "EDGEPORT_WEB_ORIGIN", requires = "web_addr")]
    web_origin: Option<String>,
    /// Single sign-on moved to the authority (`tctl sso connectors add`): the gateway holds
    /// no client secret. These old flags are still accepted so that a gateway started with
    /// them fails at once and says where they went, instead of starting without them.
    #[command(flatten)]
    moved: MovedSsoFlags,
}

/// The gateway's former single sign-on flags (hidden; see [`MovedSsoFlags::check`]).
#[derive(Debug, clap::Args)]
struct MovedSsoFlags {
    #[arg(long, hide = true)]
    oidc_issuer: Option<String>,
    #[arg(long, hide = true)]
    oidc_client_id: Option<String>,
    #[arg(long, hide = true)]
    oidc_client_secret_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    oidc_username_claim: Option<String>,
    #[arg(long, hide = true)]
    oidc_groups_claim: Option<String>,
    #[arg(long, hide = true)]
    oidc_scopes: Option<String>,
    #[arg(long, hide = true)]
    oidc_ca: Option<PathBuf>,
    #[arg(long, hide = true)]
    github_client_id: Option<String>,
    #[arg(long, hide = true)]
    github_client_secret_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    github_url: Option<String>,
    #[arg(long, hide = true)]
    github_api_url: Option<String>,
    #[arg(long, hide = true)]
    github_ca: Option<PathBuf>,
}

impl MovedSsoFlags {
    /// One line naming the first old flag given and the command that replaces it.
    fn check(&self) -> Result<(), String> {
        let oidc = [
            ("--oidc-issuer", self.oidc_issuer.is_some(), "--issuer URL"),
            (
                "--oidc-client-id",
                self.oidc_client_id.is_some(),
                "--client-id ID",
            ),
            (
                "--oidc-client-secret-file",
                self.oidc_client_secret_file.is_some(),
                "--client-secret-file FILE",
            ),
            (
                "--oidc-username-claim",
                self.oidc_username_claim.is_some(),
                "--username-claim CLAIM",
            ),
            (
                "--oidc-groups-claim",
                self.oidc_groups_claim.is_some(),
                "--groups-claim CLAIM",
            ),
            ("--oidc-scopes", self.oidc_scopes.is_some(), "--scopes LIST"),
            ("--oidc-ca", self.oidc_ca.is_some(), "--ca-file PEM"),
        ];
        let github = [
            (
                "--github-client-id",
                self.github_client_id.is_some(),
                "--client-id ID",
            ),
            (
                "--github-client-secret-file",
                self.github_client_secret_file.is_some(),
                "--client-secret-file FILE",
            ),
            (
                "--github-url",
                self.github_url.is_some(),
                "--github-url URL",
            ),
            (
                "--github-api-url",
                self.github_api_url.is_some(),
                "--api-url URL",
            ),
            ("--github-ca", self.github_ca.is_some(), "--ca-file PEM"),
        ];
        let found = oidc
            .iter()
            .map(|f| ("oidc", f))
            .chain(github.iter().map(|f| ("github", f)))
            .find(|(_, (_, given, _))| *given);
        match found {
            None => Ok(()),
            Some((kind, (flag, _, new))) => Err(format!(
                "{flag} moved to the authority: run tctl sso connectors add {kind} {new} ... \
                 (the gateway no longer holds single sign-on secrets; see docs/deploy.md)"
            )),
        }
    }
}

fn parse_peer_addr(s: &str) -> Result<String, edgeport_proto::util::PeerAddrError> {
    edgeport_proto::util::check_peer_addr(s).map(|()| s.to_string())
}

fn parse_duration(s: &str) -> Result<u64, edgeport_proto::util::DurationError> {
    edgeport_proto::util::parse_duration_secs(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgeport_net::daemon::init_logging();
    let Command::Start(args) = cli.command;
    if let Err(e) = args.moved.check() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let mut cfg = GatewayConfig::new(args.data_dir, args.auth, args.listen);
    cfg.token = args.token;
    cfg.ca_pin = args.ca_pin;
    cfg.gateway_id = args.id;
    cfg.public_addr = args.public_addr;
    cfg.peer_addr = args
        .peer_addr
        .or_else(|| (!args.listen.ip().is_unspecified()).then(|| args.listen.to_string()));
    cfg.public_cert = args.cert;
    cfg.public_key = args.key;
    cfg.splice_dump = edgeport_gateway::splice_dump::from_env();
    cfg.metrics_addr = args.metrics_addr;
    cfg.web_addr = args.web_addr;
    cfg.web_origin = args.web_origin;
    cfg.presence_interval = std::time::Duration::from_secs(args.presence_interval.max(1));
    cfg.presence_lease = std::time::Duration::from_secs(args.presence_lease.max(1));
    cfg.tunnel_idle_timeout = std::time::Duration::from_secs(args.tunnel_idle_timeout.max(5));
    cfg.max_connections = args.max_connections as usize;
    let threads = edgeport_net::daemon::Threads::from_count(args.threads);
    // Enough for the relay's buffers (under 1,500 page faults per GiB relayed), little
    // enough not to show in the memory per idle tunnel.
    edgeport_net::daemon::keep_freed_memory(16 << 20);
    edgeport_net::daemon::run_on(threads, |shutdown| edgeport_gateway::run(cfg, shutdown))
}
