//! tsh's command line: Teleport's verbs and flags where they make sense.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tsh",
    version = edgeport_proto::VERSION,
    about = "Edgeport client: log in, list devices and open SSH sessions through a gateway"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command understands.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Gateway address HOST:PORT (default: the current profile's).
    #[arg(long, global = true, env = "TSH_PROXY")]
    pub proxy: Option<String>,
    /// Use this identity file (`tctl auth sign --format file`) instead of a login.
    #[arg(short = 'i', long = "identity", global = true, env = "TSH_IDENTITY")]
    pub identity: Option<std::path::PathBuf>,
    /// How to reach the gateway: TCP+TLS (default) or QUIC.
    #[arg(long, global = true, value_enum, env = "TSH_TRANSPORT", default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// Print debug logs on stderr.
    #[arg(long, global = true)]
    pub debug: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Tcp,
    Quic,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in to a cluster through its gateway and store short-lived certificates.
    Login(LoginArgs),
    /// Run a command or a shell on a device.
    Ssh(SshArgs),
    /// Copy files to or from devices over SFTP (to every device with given labels too).
    Scp(ScpArgs),
    /// List devices (optionally only those matching k=v labels).
    Ls(LsArgs),
    /// Show the current login: proxy, user, logins and how long the certificates last.
    Status {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete the stored keys and certificates (and their ssh-agent entries).
    Logout,
    /// Bridge stdin/stdout to a device's SSH server (for OpenSSH's ProxyCommand).
    Proxy {
        #[command(subcommand)]
        what: ProxyCmd,
    },
    /// Print an ssh_config block that makes OpenSSH ssh/scp/sftp/rsync reach devices.
    Config,
    /// Recorded interactive sessions (yours).
    #[command(subcommand)]
    Recordings(RecordingsCmd),
    /// Replay a recorded session with its original timing.
    Play(PlayArgs),
    /// Kubernetes clusters served by devices: list them, write kubectl contexts.
    Kube {
        #[command(subcommand)]
        what: KubeCmd,
    },
    /// Access requests: ask for more roles for a while, list them, review others'.
    Request {
        #[command(subcommand)]
        what: RequestCmd,
    },
    /// Live sessions you may see: your own and those your roles let you join.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Join another user's live interactive session (as your roles allow): everyone in it
    /// sees you join and leave.
    Join(JoinArgs),
    /// Print tsh's version.
    Version {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print a shell completion script: `source <(tsh completion bash)`.
    Completion(crate::shared::CompletionArgs),
}

#[derive(Debug, Subcommand)]
pub enum RequestCmd {
    /// Ask for roles (those your roles' `request_roles` name); prints the request id. Once
    /// approved, your next `tsh login` carries them until the approval ends.
    Create {
        /// Roles to ask for, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Why (shown to reviewers and in the audit log).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Your requests, and the pending ones you may review.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Approve or deny another user's request (your roles' `review_roles`).
    Review {
        id: String,
        #[arg(long, conflicts_with = "deny", required_unless_present = "deny")]
        approve: bool,
        #[arg(long)]
        deny: bool,
        #[arg(long)]
        reason: Option<String>,
        /// How long an approval lasts (default 1h, at most 12h).
        #[arg(long, value_parser = parse_ttl, conflicts_with = "deny")]
        ttl: Option<u64>,
    },
}

fn parse_ttl(s: &str) -> Result<u64, edgeport_proto::util::DurationError> {
    edgeport_proto::util::parse_duration_secs(s)
}

#[derive(Debug, Subcommand)]
pub enum KubeCmd {
    /// List the Kubernetes clusters devices serve.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Add and select the kubectl context `edgeport-CLUSTER` ($KUBECONFIG or ~/.kube/config).
    Login { cluster: String },
}

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List live sessions (id, device, user, login, kind, start, participants).
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The session's id (`tsh sessions ls`).
    pub session_id: String,
    /// observer: watch only; peer: type too; moderator: lets a moderated session run.
    #[arg(long, default_value = "observer", value_parser = ["observer", "peer", "moderator"])]
    pub mode: String,
    /// The login to connect to the device as (default: your first).
    #[arg(short = 'l', long)]
    pub login: Option<String>,
    /// A per-session second factor code, for devices whose roles require one.
    #[arg(long, env = "TSH_MFA_CODE", hide_env_values = true)]
    pub mfa_code: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RecordingsCmd {
    /// List recordings.
    Ls(RecordingsArgs),
}

#[derive(Debug, Args)]
pub struct RecordingsArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// How many of the newest recordings to show.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Every recording, newest first, fetched a page at a time (ignores --limit).
    #[arg(long)]
    pub all: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlayFormat {
    /// Replay on this terminal with the original timing.
    Play,
    /// Dump the output text at once.
    Text,
    /// Print the asciicast v2 file (for `asciinema play`).
    Cast,
}

#[derive(Debug, Args)]
pub struct PlayArgs {
    pub session_id: String,
    /// Playback speed factor (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    #[arg(long, value_enum, default_value_t = PlayFormat::Play)]
    pub format: PlayFormat,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// User name (default: the profile's, else the local user name).
    #[arg(long)]
    pub user: Option<String>,
    /// Read the password from stdin (one line) instead of prompting.
    #[arg(long)]
    pub password_stdin: bool,
    /// A one-time invite code from `tctl users add`; the password given becomes the new one.
    #[arg(long)]
    pub invite: Option<String>,
    /// Certificate lifetime (capped by the roles' max_session_ttl).
    #[arg(long, default_value = "8h")]
    pub ttl: String,
    /// sha256:HEX of the cluster's CA public key; needed on the first login to a gateway.
    #[arg(long)]
    pub ca_pin: Option<String>,
    /// Do not verify the gateway at all. For local experiments only.
    #[arg(long)]
    pub insecure: bool,
    /// How to authenticate: `local` (password or invite code), or single sign-on in the
    /// browser through the gateway's `oidc` (OpenID Connect) or `github` connector (the
    /// provider names the user: --user is not needed).
    #[arg(long, default_value = "local", value_parser = ["local", "oidc", "github"])]
    pub auth: String,
    /// The current one-time code, for an account with an authenticator app (asked for when
    /// needed otherwise; with --password-stdin it is the next line of stdin).
    #[arg(long)]
    pub otp: Option<String>,
    /// Single sign-on: `none` prints the URL instead of opening a browser.
    #[arg(long, default_value = "default")]
    pub browser: String,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The one-time code for a device that requires a per-session second factor (without
    /// it tsh asks on the terminal when the device needs one).
    #[arg(long = "mfa-code", env = "TSH_MFA_CODE", hide_env_values = true)]
    pub mfa_code: Option<String>,
    /// Remote login (default: the login in `login@device`, else the certificate's first).
    #[arg(short = 'l', long = "login")]
    pub login: Option<String>,
    /// Force a terminal even when a command is given.
    #[arg(short = 't', action = clap::ArgAction::Count)]
    pub force_tty: u8,
    /// Never request a terminal.
    #[arg(short = 'T')]
    pub no_tty: bool,
    /// Local port forward: [BIND:]LPORT:HOST:RPORT (the device connects to HOST:RPORT).
    #[arg(short = 'L')]
    pub forward: Vec<String>,
    /// Remote port forward: [BIND:]RPORT:HOST:LPORT. The device listens on its loopback
    /// port RPORT (0: any free one) and tsh connects each connection to HOST:LPORT here.
    #[arg(short = 'R')]
    pub remote_forward: Vec<String>,
    /// Dynamic port forward: a SOCKS5 proxy on [BIND:]PORT here whose connections leave
    /// from the device.
    #[arg(short = 'D')]
    pub dynamic_forward: Vec<String>,
    /// Forward your ssh-agent (SSH_AUTH_SOCK) to the session, if a role allows it.
    #[arg(short = 'A')]
    pub forward_agent: bool,
    /// Do not run a command (with -L, -R or -D: only forward).
    #[arg(short = 'N')]
    pub no_command: bool,
    /// Do not read stdin (the remote command gets an immediate EOF), for use in loops.
    #[arg(short = 'n')]
    pub no_stdin: bool,
    /// Accepted for OpenSSH compatibility and ignored (devices are reached by id).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// Test only: skip the gateway and connect straight to an agent's SSH server on this
    /// TCP address (host verification is unchanged).
    #[arg(long, hide = true)]
    pub direct: Option<String>,
    /// Test only: ask the gateway for this device while verifying the host as DEVICE, as a
    /// gateway that misroutes (or a device that impersonates another) would make happen.
    #[arg(long, hide = true)]
    pub test_route_to: Option<String>,
    /// [login@]DEVICE, or [login@]k=v[,k2=v2] to run the command on every online device
    /// with those labels.
    pub target: String,
    /// The command to run (a shell if empty).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ScpArgs {
    /// Copy directories recursively.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Keep modification times and modes.
    #[arg(short = 'p')]
    pub preserve: bool,
    /// Continue partial copies: a destination file shorter than its source gets only the
    /// rest, one of the same size is skipped (sizes alone are compared).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Remote login when the device side has no `login@`.
    #[arg(short = 'l', long = "login")]
    pub login: Option<String>,
    /// Accepted for OpenSSH compatibility and ignored (devices are reached by id).
    #[arg(short = 'P', long = "port")]
    pub port: Option<u16>,
    /// SRC... DEST, where one side is [login@]DEVICE:PATH, or for an upload
    /// [login@]k=v[,k2=v2]:PATH (every online device with those labels).
    #[arg(required = true, num_args = 2.., value_name = "PATH")]
    pub paths: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Label filters, k=v (all must match).
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Yaml,
}

impl Format {
    /// Prints `v` as JSON or YAML (`Text` is each command's own table, never passed here).
    pub fn print(self, v: &serde_json::Value) {
        crate::out!("{}", crate::schema::render(v, self == Format::Yaml));
    }
}

#[derive(Debug, Subcommand)]
pub enum ProxyCmd {
    /// `tsh proxy ssh %r@%h:%p`: the device is the host part (a `.CLUSTER` suffix is dropped).
    Ssh {
        /// Test only: bridge to an agent's SSH server on this TCP address instead of the
        /// gateway (to measure and test the bridge alone).
        #[arg(long, hide = true)]
        direct: Option<String>,
        /// The one-time code for a device that requires a per-session second factor (without
        /// it tsh asks on the terminal when the device needs one). The session's key and
        /// certificate go to the ssh-agent at SSH_AUTH_SOCK for a minute.
        #[arg(long = "mfa-code", env = "TSH_MFA_CODE", hide_env_values = true)]
        mfa_code: Option<String>,
        /// USER@HOST[:PORT] as OpenSSH passes it.
        target: String,
    },
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
    fn version_completion_and_suggestions() {
        let cli = Cli::try_parse_from(["tsh", "version", "--format", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Version {
                format: Format::Json
            }
        ));
        let cli = Cli::try_parse_from(["tsh", "completion", "zsh"]).unwrap();
        let Command::Completion(a) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(a.shell, crate::shared::Shell::Zsh);
        assert!(Cli::try_parse_from(["tsh", "completion", "tcsh"]).is_err());
        let e = Cli::try_parse_from(["tsh", "lgin"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("similar subcommand exists: 'login'"), "{e}");
    }
}
