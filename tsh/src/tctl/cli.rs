//! tctl's command line (clap derive). Durations take `90s`, `30m`, `12h`, `7d`; lists are
//! comma separated; labels are `k=v,k2=v2`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tctl",
    version = edgeport_proto::VERSION,
    about = "Edgeport administration: certificate authorities, users, join tokens, devices, locks"
)]
pub struct Cli {
    /// The authority's RPC address.
    #[arg(
        long,
        global = true,
        env = "EDGEPORT_AUTH",
        default_value = "127.0.0.1:3025"
    )]
    pub auth: String,
    /// Administrator identity file (the authority writes DATA_DIR/admin.identity).
    #[arg(long, global = true, env = "EDGEPORT_IDENTITY")]
    pub identity: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The cluster at a glance: CAs, the authority, gateways, devices online and offline.
    Status(FormatArgs),
    /// Certificate authorities: export the public CAs, sign certificates.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Local users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Join tokens for devices and gateways.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// The device inventory (`tctl nodes` is the same, Teleport's name).
    #[command(subcommand, visible_alias = "nodes")]
    Devices(DevicesCmd),
    /// Gateways: list them, revoke one.
    #[command(subcommand)]
    Gateways(GatewaysCmd),
    /// Locks a user, a device or a gateway out at once (new sessions refused, live ones ended).
    Lock(LockArgs),
    /// Removes a lock: `tctl unlock NAME` when one lock in force has that name, else
    /// `--user`, `--device` or `--gateway` (also `tctl locks rm`).
    Unlock(UnlockArgs),
    /// Lists locks.
    #[command(subcommand)]
    Locks(LocksCmd),
    /// Roles: which devices users reach and what their sessions may do.
    #[command(subcommand)]
    Roles(RolesCmd),
    /// The audit log: search events, verify the devices' hash chains.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Access requests from users (`tsh request create`): list, approve, deny.
    #[command(subcommand)]
    Requests(RequestsCmd),
    /// Single sign-on: connectors, and what identity provider groups grant (`tsh login
    /// --auth oidc|github`).
    #[command(subcommand)]
    Sso(SsoCmd),
    /// Prints resources as Teleport's `tctl get` does: `tctl get users|roles|nodes|tokens|
    /// gateways|locks` (YAML unless `--format` says otherwise; the same records as `ls`).
    Get(GetArgs),
    /// Prints tctl's version (no connection to the authority; `tctl status` shows its).
    Version(FormatArgs),
    /// Prints a shell completion script: `source <(tctl completion bash)`.
    Completion(crate::shared::CompletionArgs),
}

#[derive(Debug, Subcommand)]
pub enum SsoCmd {
    /// Maps a group of the identity provider's groups claim to logins, roles and
    /// Kubernetes groups (replaces an earlier mapping of the group).
    Map(SsoMapArgs),
    /// Lists the mappings.
    Ls(FormatArgs),
    /// Removes the mapping of a group (its members can no longer log in through it).
    Unmap { group: String },
    /// The identity providers the authority accepts (it holds their client secrets and
    /// verifies every login itself).
    #[command(subcommand)]
    Connectors(ConnectorsCmd),
}

#[derive(Debug, Subcommand)]
pub enum ConnectorsCmd {
    /// Adds (or replaces) a connector: `oidc` or `github`.
    #[command(subcommand)]
    Add(ConnectorAddCmd),
    /// Lists the connectors (never their secrets).
    Ls(FormatArgs),
    /// Removes a connector (`oidc` or `github`): its users can no longer log in.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ConnectorAddCmd {
    /// An OpenID Connect provider (`tsh login --auth oidc`). Register the client with the
    /// redirect URI http://127.0.0.1/v1/webapi/oidc/callback (any port: tsh listens on a
    /// loopback port of its own).
    Oidc(OidcConnectorArgs),
    /// A GitHub OAuth app (`tsh login --auth github`). Register the callback URL
    /// http://127.0.0.1/v1/webapi/github/callback (GitHub accepts any port of a loopback
    /// callback). Teams become groups named github:ORG/TEAM.
    Github(GitHubConnectorArgs),
}

#[derive(Debug, Args)]
pub struct OidcConnectorArgs {
    /// The provider's issuer URL.
    #[arg(long)]
    pub issuer: String,
    /// The client id registered at the provider.
    #[arg(long)]
    pub client_id: String,
    /// A file holding the client secret (kept out of the command line; sent to the
    /// authority, which stores it and never shows it again).
    #[arg(long)]
    pub client_secret_file: PathBuf,
    /// The ID token claim that names the Edgeport user: preferred_username, email or sub
    /// (email needs email_verified true in the token).
    #[arg(long, default_value = "preferred_username")]
    pub username_claim: String,
    /// The ID token claim that lists the user's groups (mapped with `tctl sso map`).
    #[arg(long, default_value = "groups")]
    pub groups_claim: String,
    /// Scopes to ask for besides openid, comma separated (some providers put groups in the
    /// token only when a scope asks for them; others refuse scopes they do not know).
    #[arg(long, value_delimiter = ',', default_value = "email,profile,groups")]
    pub scopes: Vec<String>,
    /// Root certificates (PEM) for an https issuer (default: the authority's system roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Enables web console single sign-on with this connector for the console at this
    /// origin (https://GATEWAY[:PORT], the gateway's --web-addr as browsers reach it;
    /// repeatable). Register https://GATEWAY[:PORT]/web/sso/oidc/callback at the provider too.
    /// Without it the connector serves tsh logins only.
    #[arg(long = "web-origin", value_name = "ORIGIN")]
    pub web_origins: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GitHubConnectorArgs {
    /// The OAuth app's client id.
    #[arg(long)]
    pub client_id: String,
    /// A file holding the OAuth app's client secret.
    #[arg(long)]
    pub client_secret_file: PathBuf,
    /// GitHub's address (a GitHub Enterprise Server's for one).
    #[arg(long, default_value = "https://github.com")]
    pub github_url: String,
    /// GitHub's API address (`https://HOST/api/v3` for GitHub Enterprise Server).
    #[arg(long, default_value = "https://api.github.com")]
    pub api_url: String,
    /// Root certificates (PEM) for GitHub Enterprise Server (default: the authority's
    /// system roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Enables web console single sign-on with this connector for the console at this
    /// origin (https://GATEWAY[:PORT], the gateway's --web-addr as browsers reach it;
    /// repeatable). Register https://GATEWAY[:PORT]/web/sso/github/callback at the provider too.
    /// Without it the connector serves tsh logins only.
    #[arg(long = "web-origin", value_name = "ORIGIN")]
    pub web_origins: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SsoMapArgs {
    /// The group as the identity provider names it.
    pub group: String,
    #[command(flatten)]
    pub grant: GrantArgs,
}

/// What a user or an identity provider group is given.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// Logins (OS users on devices), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub logins: Vec<String>,
    /// Roles, comma separated (default: the built-in role).
    #[arg(long, value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Kubernetes groups, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub kube_groups: Vec<String>,
    /// Kubernetes users, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub kube_users: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Lists events, oldest first.
    Search(AuditSearchArgs),
    /// Re-checks every device's hash chain and lists integrity alerts (exit status 1 if any).
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Args)]
pub struct AuditSearchArgs {
    /// Only events from the last DURATION (90s, 30m, 1h, 7d).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<u64>,
    /// Only events of this type (session.start, exec, session.end, user.login, ...).
    #[arg(long = "type")]
    pub kind: Option<String>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    /// Only events of this session.
    #[arg(long)]
    pub session: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Prints a CA's public material.
    Export(ExportArgs),
    /// Makes a key pair here and has the authority certify it (for bots and CI jobs); with
    /// --host, certifies a host's own public key (a host behind a device, relay mode).
    Sign(SignArgs),
    /// Rotates a CA without touching devices: init (new CA trusted beside the old one),
    /// update_clients (the new one signs; devices renew), update_servers (the old one stays
    /// trusted for --grace), then standby (the old one is dropped). See docs/operations.md.
    Rotate(RotateArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RotateType {
    /// The user SSH CA (users' certificates; devices trust it).
    User,
    /// The host SSH CA (devices' host certificates, dial tickets; tsh trusts it).
    Host,
    /// The x509 CA (tunnels, client and server certificates, the CA bundle's signature).
    X509,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RotatePhase {
    Init,
    #[value(name = "update_clients")]
    UpdateClients,
    #[value(name = "update_servers")]
    UpdateServers,
    Standby,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The CA to rotate (not needed with --status).
    #[arg(long = "type", value_enum, required_unless_present = "status")]
    pub ca_type: Option<RotateType>,
    /// How long the old CA stays trusted once the new one signs (48h, 7d).
    #[arg(long, default_value = "48h", value_parser = parse_duration)]
    pub grace: u64,
    /// Go back to the old CA (any phase but standby); the new one stays trusted for --grace.
    #[arg(long, conflicts_with_all = ["status", "phase", "complete"])]
    pub rollback: bool,
    /// Only show where each CA's rotation stands.
    #[arg(long)]
    pub status: bool,
    /// Move to this one phase only (manual rotation); without it, tctl runs init,
    /// update_clients and update_servers in turn, waiting for each to spread.
    #[arg(long, value_enum, conflicts_with_all = ["status", "complete"])]
    pub phase: Option<RotatePhase>,
    /// End the grace period now: drop the old CA (standby). Same as --phase standby.
    #[arg(long, conflicts_with = "status")]
    pub complete: bool,
    /// The longest wait for each phase to reach the gateways and online devices.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub wait: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaType {
    /// The user SSH CA as one OpenSSH public key line (sshd's TrustedUserCAKeys).
    User,
    /// The host SSH CA as a known_hosts `@cert-authority` line.
    Host,
    /// The x509 CA certificates (PEM; two during an x509 CA rotation's grace period).
    #[value(alias = "x509")]
    Tls,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long = "type", value_enum, default_value = "user")]
    pub ca_type: CaType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SignFormat {
    /// One identity file (JSON) usable with `tsh -i PATH`.
    File,
    /// PATH (OpenSSH private key) and PATH-cert.pub, for `ssh -i PATH`.
    Openssh,
    /// PATH.key, PATH.crt and PATH.cas (PEM), for TLS clients.
    Tls,
    /// A kubeconfig at PATH for kubectl (needs --kube-cluster and --proxy).
    Kubernetes,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The user the certificate is for (its key id and x509 common name).
    #[arg(long, required_unless_present = "host", conflicts_with = "host")]
    pub user: Option<String>,
    /// A host certificate instead, for the sshd of the host behind a device reached as
    /// DEVICE/TARGET (principals NAME and NAME.CLUSTER); needs --pubkey.
    #[arg(long, value_name = "NAME", requires = "pubkey")]
    pub host: Option<String>,
    /// The host's Ed25519 public key file (its /etc/ssh/ssh_host_ed25519_key.pub), for --host.
    #[arg(long, value_name = "FILE", requires = "host")]
    pub pubkey: Option<PathBuf>,
    /// Where to write (see --format for the file names); with --host, the certificate (standard
    /// output when not given).
    #[arg(long, required_unless_present = "host")]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "file")]
    pub format: SignFormat,
    /// Validity (capped by the user's roles); default 12h for a user, 8760h for --host.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<u64>,
    /// Restrict the certificate to these logins (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub logins: Option<Vec<String>>,
    /// The Kubernetes cluster of `--format kubernetes`.
    #[arg(long)]
    pub kube_cluster: Option<String>,
    /// The gateway HOST:PORT: kubectl talks to it (`--format kubernetes`), and an identity
    /// file (`--format file`) remembers it so `tsh -i FILE` needs no --proxy.
    #[arg(long)]
    pub proxy: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to print.
    #[arg(value_enum)]
    pub kind: GetKind,
    #[arg(long, value_enum, default_value = "yaml")]
    pub format: Format,
}

/// The resources `tctl get` prints (Teleport's names, and Edgeport's where they differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetKind {
    Users,
    Roles,
    #[value(alias = "devices")]
    Nodes,
    Tokens,
    Gateways,
    Locks,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// Adds a user (prints a one-time invite code unless --password-stdin is given).
    Add(UserAddArgs),
    /// Lists users.
    Ls(FormatArgs),
    /// Removes a user.
    Rm { name: String },
    /// Changes a user's logins, roles, Kubernetes groups or second factor in place (what is
    /// not given stays).
    Update(UserUpdateArgs),
}

#[derive(Debug, Args)]
pub struct UserUpdateArgs {
    pub name: String,
    /// Replace the logins (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub set_logins: Option<Vec<String>>,
    /// Replace the roles (comma separated; "" for the built-in role).
    #[arg(long, value_delimiter = ',')]
    pub set_roles: Option<Vec<String>>,
    /// Replace the Kubernetes groups (comma separated; "" for none).
    #[arg(long, value_delimiter = ',')]
    pub set_kube_groups: Option<Vec<String>>,
    /// Replace the Kubernetes users (comma separated; "" for none).
    #[arg(long, value_delimiter = ',')]
    pub set_kube_users: Option<Vec<String>>,
    /// Require a one-time password app from the next login on.
    #[arg(long, conflicts_with = "no_require_totp")]
    pub require_totp: bool,
    /// No longer require one (an enrolled app is still asked for until --reset-totp).
    #[arg(long)]
    pub no_require_totp: bool,
    /// Forget the enrolled app (a lost phone): the user enrolls again at the next login if
    /// one is required.
    #[arg(long)]
    pub reset_totp: bool,
}

#[derive(Debug, Args)]
pub struct UserAddArgs {
    pub name: String,
    #[command(flatten)]
    pub grant: GrantArgs,
    /// Read the user's password from standard input (one line).
    #[arg(long)]
    pub password_stdin: bool,
    /// Require a one-time password app (TOTP): enrolled at the first login, asked at every
    /// login after.
    #[arg(long)]
    pub require_totp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenType {
    Device,
    Gateway,
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Makes a join token and prints it with the CA pin and an example command line.
    Add(TokenAddArgs),
    /// Lists live tokens (never the secrets themselves).
    Ls(FormatArgs),
    /// Removes a token by id (or by the token itself).
    Rm { id: String },
}

#[derive(Debug, Args)]
pub struct TokenAddArgs {
    #[arg(long = "type", value_enum, default_value = "device")]
    pub kind: TokenType,
    /// Labels every device joining with this token gets (`k=v,k2=v2`).
    #[arg(long, default_value = "", value_parser = parse_labels)]
    pub labels: BTreeMap<String, String>,
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub ttl: u64,
    /// Allow any number of joins until it expires (default: one).
    #[arg(long)]
    pub reusable: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Print the device's /etc/edgeport/agent.env instead (gateway, token, CA pin, labels),
    /// ready for cross/bundle/install.sh or an image overlay. Device tokens only.
    #[arg(long, conflicts_with = "format")]
    pub agent_env: bool,
    /// The gateway address devices dial, for --agent-env.
    #[arg(long, requires = "agent_env")]
    pub gateway: Option<String>,
    /// The device id, for --agent-env (default: the authority picks one at the join).
    #[arg(long, requires = "agent_env")]
    pub device_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// Lists devices with their presence.
    Ls(FormatArgs),
    /// Removes (revokes) a device: its tunnel is closed and it must join again.
    Rm { id: String },
    /// Bytes each device moved, per service (ssh, sftp, forward, kube, control, audit), as
    /// its agent counted them.
    Usage(UsageArgs),
    /// Changes a device's settings: its monthly data budget.
    Set(DeviceSetArgs),
    /// Ships a new agent binary, signed by the authority, to the online devices with these
    /// labels (canary first with --canary); an agent that does not come back online on it
    /// within --rollback-after goes back to its previous binary.
    Update(UpdateArgs),
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Which devices: every device with all these labels (`fleet=vans,region=eu`). Online
    /// ones are updated now; offline ones get it when they come online, until the update's
    /// deadline (see --status).
    #[arg(long, value_parser = parse_labels, required_unless_present = "status")]
    pub labels: Option<BTreeMap<String, String>>,
    /// The new agent binary (for the devices' architecture).
    #[arg(long, required_unless_present = "status")]
    pub bundle: Option<std::path::PathBuf>,
    /// Update this share of the online devices first (`5%`: at least one), and the rest only
    /// once they are back online on the new binary.
    #[arg(long, value_parser = parse_percent)]
    pub canary: Option<u32>,
    /// How long a new agent has to bring its tunnel up before it is rolled back.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub rollback_after: u64,
    /// Show the updates the authority keeps (or only update ID) and each device's state
    /// instead of starting one.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "ID",
          conflicts_with_all = ["labels", "bundle", "canary"])]
    pub status: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

fn parse_percent(s: &str) -> Result<u32, String> {
    let n = s.strip_suffix('%').unwrap_or(s);
    match n.parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{s:?}: a percentage from 1% to 100%")),
    }
}

#[derive(Debug, Args)]
pub struct DeviceSetArgs {
    pub id: String,
    /// Monthly data budget (`200MB`, `1.5GB`; decimal units) or `none`. Past it, the agent
    /// refuses sftp, scp, rsync and port forwarding with a line naming the budget; shells
    /// and the audit log go on. Counted per calendar month (UTC).
    #[arg(long, value_parser = parse_budget)]
    pub data_budget: Budget,
}

/// A data budget: a size, or none.
#[derive(Debug, Clone, Copy)]
pub struct Budget(pub Option<u64>);

fn parse_budget(s: &str) -> Result<Budget, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Budget(None));
    }
    edgeport_proto::util::parse_bytes(s).map(|b| Budget(Some(b)))
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this device.
    pub device: Option<String>,
    /// The period, whole days up to today (e.g. 30d, 24h); at most 93 days are kept.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub since: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum GatewaysCmd {
    /// Lists gateways: address, version, tunnels, last renewal and report, standing.
    Ls(FormatArgs),
    /// Revokes a gateway at once: the authority refuses its requests, renewals and a re-join
    /// under its name; other gateways refuse its forwarded dials; it stops and its agents
    /// reconnect elsewhere.
    Rm { id: String },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub gateway: Option<String>,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    #[command(flatten)]
    pub target: Target,
    /// Shown to whoever is refused.
    #[arg(long, default_value = "")]
    pub message: String,
    /// Lift the lock by itself after this long (default: until `tctl unlock`).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<u64>,
}

#[derive(Debug, Args)]
#[group(id = "unlock_target", required = true, multiple = false)]
pub struct UnlockArgs {
    /// The locked user, device or gateway, when exactly one lock in force has this name.
    pub name: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub gateway: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum LocksCmd {
    /// Lists locks in force.
    Ls(FormatArgs),
    /// Removes a lock (the same as `tctl unlock`).
    Rm(UnlockArgs),
}

#[derive(Debug, Subcommand)]
pub enum RequestsCmd {
    /// Lists access requests, newest first.
    Ls(FormatArgs),
    /// Approves a pending request: the user's next certificate carries its roles until the
    /// approval ends.
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        /// How long the approval lasts (at most 12h).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: u64,
    },
    /// Denies a pending request.
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolesCmd {
    /// Adds a role (refused if one of that name exists: see `tctl roles update`).
    Add(RoleAddArgs),
    /// Changes the given fields of a role and keeps every other one.
    Update(RoleUpdateArgs),
    /// Lists roles and who holds them.
    Ls(FormatArgs),
    /// Removes a role no user holds.
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct RoleAddArgs {
    pub name: String,
    /// Devices the role reaches, by label: `fleet=vans,fleet=trucks,region=*` (a key repeated
    /// allows several values; `*` any value). Default: every device.
    #[arg(long, default_value = "", value_parser = parse_label_rules)]
    pub allow: BTreeMap<String, Vec<String>>,
    /// Devices the role never reaches, by label (deny wins over allow).
    #[arg(long, default_value = "", value_parser = parse_label_rules)]
    pub deny: BTreeMap<String, Vec<String>>,
    /// No interactive terminals (exec only).
    #[arg(long)]
    pub no_pty: bool,
    /// No port forwarding (`ssh -L`, `-R`, `-D`).
    #[arg(long)]
    pub no_port_forwarding: bool,
    /// Allow SSH agent forwarding (`tsh ssh -A`, `ssh -A`); off unless given.
    #[arg(long)]
    pub agent_forwarding: bool,
    /// Longest certificate the role grants.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    pub max_session_ttl: u64,
    /// Roles its holders may ask for with `tsh request create`, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub request_roles: Vec<String>,
    /// Roles whose access requests its holders may approve or deny (`tsh request review`;
    /// never their own), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub review_roles: Vec<String>,
    /// Every session to a device this role allows needs a fresh one-time code (as Teleport's
    /// `require_session_mfa`): tsh asks for it, and the certificate it gets opens that one
    /// device for a minute. Users need an authenticator app (`tctl users add --require-totp`).
    #[arg(long)]
    pub require_session_mfa: bool,
    /// Modes its users may join other users' live sessions with (`tsh join`), on the
    /// devices --allow matches: observer (watch), peer (type too), moderator.
    #[arg(long, value_delimiter = ',', value_parser = ["observer", "peer", "moderator"])]
    pub join_sessions: Vec<String>,
    /// Sessions of its users to devices with these labels (k=v,...) start only once a
    /// moderator has joined (`tsh join --mode moderator`), and end when the last one leaves.
    #[arg(long, default_value = "", value_parser = parse_label_rules)]
    pub require_moderator: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Args)]
pub struct RoleUpdateArgs {
    pub name: String,
    /// Replaces the devices the role reaches (`fleet=vans,region=*`; an empty value: every
    /// device).
    #[arg(long, value_parser = parse_label_rules)]
    pub allow: Option<BTreeMap<String, Vec<String>>>,
    /// Replaces the devices the role never reaches (an empty value: none).
    #[arg(long, value_parser = parse_label_rules)]
    pub deny: Option<BTreeMap<String, Vec<String>>>,
    /// No interactive terminals (exec only).
    #[arg(long, conflicts_with = "pty")]
    pub no_pty: bool,
    /// Interactive terminals allowed again.
    #[arg(long)]
    pub pty: bool,
    /// No port forwarding (`ssh -L`, `-R`, `-D`).
    #[arg(long, conflicts_with = "port_forwarding")]
    pub no_port_forwarding: bool,
    /// Port forwarding allowed again.
    #[arg(long)]
    pub port_forwarding: bool,
    /// Allow SSH agent forwarding (`-A`).
    #[arg(long, conflicts_with = "no_agent_forwarding")]
    pub agent_forwarding: bool,
    /// No SSH agent forwarding.
    #[arg(long)]
    pub no_agent_forwarding: bool,
    /// Longest certificate the role grants.
    #[arg(long, value_parser = parse_duration)]
    pub max_session_ttl: Option<u64>,
    /// Replaces the roles its holders may request (an empty value: none).
    #[arg(long, value_delimiter = ',')]
    pub request_roles: Option<Vec<String>>,
    /// Replaces the roles whose requests its holders may review (an empty value: none).
    #[arg(long, value_delimiter = ',')]
    pub review_roles: Option<Vec<String>>,
    /// Sessions to the role's devices need a fresh one-time code each.
    #[arg(long, conflicts_with = "no_require_session_mfa")]
    pub require_session_mfa: bool,
    /// Sessions to the role's devices need no per-session code again.
    #[arg(long)]
    pub no_require_session_mfa: bool,
    /// Replaces the modes its users may join others' sessions with (an empty value: none).
    #[arg(long, value_delimiter = ',', value_parser = ["", "observer", "peer", "moderator"])]
    pub join_sessions: Option<Vec<String>>,
    /// Replaces the labels of devices where its users' sessions need a moderator (an
    /// empty value: none).
    #[arg(long, value_parser = parse_label_rules)]
    pub require_moderator: Option<BTreeMap<String, Vec<String>>>,
}

fn parse_label_rules(s: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    super::roles::parse_label_rules(s)
}

fn parse_duration(s: &str) -> Result<u64, edgeport_proto::util::DurationError> {
    edgeport_proto::util::parse_duration_secs(s)
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, edgeport_proto::util::LabelError> {
    edgeport_proto::util::parse_labels(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_lists_durations_and_labels() {
        let cli = Cli::try_parse_from([
            "tctl",
            "tokens",
            "add",
            "--type",
            "gateway",
            "--labels",
            "fleet=vans,region=eu",
            "--ttl",
            "2h",
        ])
        .unwrap();
        let Command::Tokens(TokensCmd::Add(a)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(a.kind, TokenType::Gateway);
        assert_eq!(a.ttl, 7200);
        assert_eq!(a.labels.len(), 2);
        let cli =
            Cli::try_parse_from(["tctl", "users", "add", "bob", "--logins", "root,pi"]).unwrap();
        let update = Cli::try_parse_from([
            "tctl",
            "users",
            "update",
            "bob",
            "--set-logins",
            "ubuntu,pi",
            "--set-kube-groups",
            "",
        ])
        .unwrap();
        let Command::Users(UsersCmd::Update(u)) = update.command else {
            panic!("wrong command");
        };
        assert_eq!(u.set_logins.unwrap(), ["ubuntu", "pi"]);
        assert_eq!(u.set_kube_groups.unwrap(), [""]);
        assert!(u.set_roles.is_none() && !u.reset_totp);
        assert!(Cli::try_parse_from([
            "tctl",
            "users",
            "update",
            "bob",
            "--require-totp",
            "--no-require-totp"
        ])
        .is_err());
        let Command::Users(UsersCmd::Add(a)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(a.grant.logins, ["root", "pi"]);
        assert!(Cli::try_parse_from(["tctl", "lock", "--user", "a", "--device", "b"]).is_err());
        assert!(Cli::try_parse_from(["tctl", "lock"]).is_err());
        assert!(Cli::try_parse_from(["tctl", "tokens", "add", "--labels", "nokey"]).is_err());
    }

    #[test]
    fn teleport_names_are_aliases() {
        let cli = Cli::try_parse_from(["tctl", "nodes", "ls"]).unwrap();
        assert!(matches!(cli.command, Command::Devices(DevicesCmd::Ls(_))));
        let cli = Cli::try_parse_from(["tctl", "locks", "rm", "alice"]).unwrap();
        let Command::Locks(LocksCmd::Rm(a)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(a.name.as_deref(), Some("alice"));
        let cli = Cli::try_parse_from(["tctl", "unlock", "--device", "van-1"]).unwrap();
        let Command::Unlock(a) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!((a.name, a.device), (None, Some("van-1".into())));
        assert!(Cli::try_parse_from(["tctl", "unlock"]).is_err());
        assert!(Cli::try_parse_from(["tctl", "unlock", "alice", "--user", "bob"]).is_err());
        let cli = Cli::try_parse_from(["tctl", "version", "--format", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Version(FormatArgs {
                format: Format::Json
            })
        ));
        // `nodes` shows in the help beside `devices`.
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("nodes"), "{help}");
    }

    #[test]
    fn a_mistyped_command_gets_a_suggestion() {
        let e = Cli::try_parse_from(["tctl", "devcies", "ls"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("similar subcommand exists: 'devices'"), "{e}");
        let e = Cli::try_parse_from(["tctl", "roles", "updte", "x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'update'"), "{e}");
    }

    #[test]
    fn roles_update_takes_only_what_it_changes() {
        let cli = Cli::try_parse_from(["tctl", "roles", "update", "field", "--no-pty"]).unwrap();
        let Command::Roles(RolesCmd::Update(a)) = cli.command else {
            panic!("wrong command");
        };
        assert!(a.no_pty && !a.pty && a.allow.is_none() && a.deny.is_none());
        assert!(a.max_session_ttl.is_none());
        assert!(
            Cli::try_parse_from(["tctl", "roles", "update", "field", "--pty", "--no-pty"]).is_err()
        );
    }
}
