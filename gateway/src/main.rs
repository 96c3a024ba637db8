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
    /// Threads that run the gateway's tasks; 0 (the default) is one per core. On a gateway
    /// that shares its cores with other busy processes, 1 saves the cross-thread wake-ups of
    /// every relayed chunk (see docs/benchmarks.md).
    #[arg(long, env = "EDGEPORT_THREADS", default_value_t = 0)]
    threads: usize,
    /// Single sign-on: the OpenID Connect provider's issuer URL (`tsh login --auth oidc`).
    /// Register the client with the redirect URI http://127.0.0.1/v1/webapi/oidc/callback
    /// (any port: tsh listens on a loopback port of its own).
    #[arg(long, requires_all = ["oidc_client_id", "oidc_client_secret_file"])]
    oidc_issuer: Option<String>,
    /// The client id registered at the provider.
    #[arg(long, requires = "oidc_issuer")]
    oidc_client_id: Option<String>,
    /// A file holding the client secret (kept out of the command line and the logs).
    #[arg(long, requires = "oidc_issuer")]
    oidc_client_secret_file: Option<PathBuf>,
    /// The ID token claim that names the Edgeport user: preferred_username, email or sub.
    #[arg(long, default_value = "preferred_username")]
    oidc_username_claim: String,
    /// The ID token claim that lists the user's groups (mapped with `tctl sso map`).
    #[arg(long, default_value = "groups")]
    oidc_groups_claim: String,
    /// Scopes to ask for besides openid, comma separated (some providers put groups in the
    /// token only when a scope asks for them; others refuse scopes they do not know).
    #[arg(long, value_delimiter = ',', default_value = "email,profile,groups")]
    oidc_scopes: Vec<String>,
    /// Root certificates (PEM) for an https issuer (default: the system's).
    #[arg(long)]
    oidc_ca: Option<PathBuf>,
    /// Single sign-on with GitHub: the OAuth app's client id (`tsh login --auth github`).
    /// Register the callback URL http://127.0.0.1/v1/webapi/github/callback (GitHub accepts
    /// any port of a loopback callback). Teams become groups named ORG/TEAM.
    #[arg(long, requires = "github_client_secret_file")]
    github_client_id: Option<String>,
    /// A file holding the OAuth app's client secret.
    #[arg(long, requires = "github_client_id")]
    github_client_secret_file: Option<PathBuf>,
    /// GitHub's address (a GitHub Enterprise Server's for one).
    #[arg(long, default_value = "https://github.com")]
    github_url: String,
    /// GitHub's API address (`https://HOST/api/v3` for GitHub Enterprise Server).
    #[arg(long, default_value = "https://api.github.com")]
    github_api_url: String,
    /// Root certificates (PEM) for GitHub Enterprise Server (default: the system's).
    #[arg(long)]
    github_ca: Option<PathBuf>,
}

fn parse_peer_addr(s: &str) -> Result<String, String> {
    edgeport_proto::util::check_peer_addr(s).map(|()| s.to_string())
}

fn parse_duration(s: &str) -> Result<u64, String> {
    edgeport_proto::util::parse_duration_secs(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgeport_proto::daemon::init_logging();
    let Command::Start(args) = cli.command;
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
    if let (Some(issuer), Some(client_id), Some(secret)) = (
        args.oidc_issuer,
        args.oidc_client_id,
        args.oidc_client_secret_file,
    ) {
        cfg.oidc = Some(edgeport_gateway::sso::OidcConfig {
            issuer,
            client_id,
            client_secret_file: secret,
            username_claim: args.oidc_username_claim,
            groups_claim: args.oidc_groups_claim,
            scopes: args.oidc_scopes,
            ca_file: args.oidc_ca,
        });
    }
    if let (Some(client_id), Some(secret)) = (args.github_client_id, args.github_client_secret_file)
    {
        cfg.github = Some(edgeport_gateway::sso::GitHubConfig {
            client_id,
            client_secret_file: secret,
            url: args.github_url,
            api_url: args.github_api_url,
            ca_file: args.github_ca,
        });
    }
    cfg.presence_interval = std::time::Duration::from_secs(args.presence_interval.max(1));
    cfg.presence_lease = std::time::Duration::from_secs(args.presence_lease.max(1));
    cfg.tunnel_idle_timeout = std::time::Duration::from_secs(args.tunnel_idle_timeout.max(5));
    let threads = edgeport_proto::daemon::Threads::from_count(args.threads);
    // Enough for the relay's buffers (under 1,500 page faults per GiB relayed), little
    // enough not to show in the memory per idle tunnel.
    edgeport_proto::daemon::keep_freed_memory(16 << 20);
    edgeport_proto::daemon::run_on(threads, |shutdown| edgeport_gateway::run(cfg, shutdown))
}
