//! The commands other than login: ssh, ls, status, logout and proxy ssh.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use edgeport_net::clock::now_secs;
use edgeport_proto::sshcert::{RolesExtension, EXT_ROLES};
use edgeport_proto::tunnel::{ClientReply, ClientRequest};
use edgeport_proto::util::{format_time, parse_labels};

use super::cli::{Cli, Command, Format, Global, LsArgs, ProxyCmd, SshArgs, Transport};
use super::forwarding::{self, Inbound, PortForward};
use super::profile::{self, load_creds, tsh_home, Creds, KeyFiles, Profile, Source};
use super::ssh::{self, SessionSpec};
use super::{agent, bridge, config, gateway, login, multi, session_mfa, term, CliError};

pub async fn run(cli: Cli) -> Result<i32, CliError> {
    let g = &cli.global;
    match &cli.command {
        Command::Login(args) => login::run(g, args).await,
        Command::Ssh(args) => ssh_cmd(g, args).await,
        Command::Scp(args) => super::scp::run(&creds(g)?, g.transport, args).await,
        Command::Ls(args) => ls(g, args).await,
        Command::Status { format } => status(g, *format),
        Command::Logout => logout(g).await,
        Command::Proxy {
            what:
                ProxyCmd::Ssh {
                    target,
                    direct,
                    mfa_code,
                },
        } => proxy_ssh(g, target, direct.as_deref(), mfa_code.as_deref()).await,
        Command::Config => config::run(g).await,
        Command::Recordings(super::cli::RecordingsCmd::Ls(a)) => super::play::list(g, a).await,
        Command::Play(a) => super::play::play(g, a).await,
        Command::Kube { what } => super::kube::run(g, what).await,
        Command::Request { what } => super::requests::run(g, what).await,
        Command::Sessions(super::cli::SessionsCmd::Ls { format }) => {
            super::sessions::list(g, *format).await
        }
        Command::Join(a) => super::sessions::join(g, a).await,
        Command::Version { format } => {
            crate::shared::print_version("tsh", *format == Format::Json);
            Ok(0)
        }
        Command::Completion(a) => {
            crate::shared::print_completion::<Cli>("tsh", a.shell);
            Ok(0)
        }
    }
}

fn creds(g: &Global) -> Result<Creds, CliError> {
    load_creds(g.proxy.as_deref(), g.identity.as_deref())
}

/// `[login@]device` -> (login, device).
fn split_target(t: &str) -> (Option<&str>, &str) {
    match t.rsplit_once('@') {
        Some((l, d)) => (Some(l), d),
        None => (None, t),
    }
}

async fn ssh_cmd(g: &Global, args: &SshArgs) -> Result<i32, CliError> {
    let creds = creds(g)?;
    let (target_login, device) = split_target(&args.target);
    let login = args
        .login
        .clone()
        .or(target_login.map(str::to_string))
        .or_else(|| creds.logins().first().cloned())
        .ok_or_else(|| CliError::msg("your certificate allows no logins: ask an administrator"))?;
    if multi::is_selector(device) && args.direct.is_none() {
        if !args.forward.is_empty()
            || !args.remote_forward.is_empty()
            || !args.dynamic_forward.is_empty()
            || args.forward_agent
            || args.force_tty > 0
        {
            return Err(CliError::msg(
                "-L, -R, -D, -A and -t work with one device, not with a label selector",
            ));
        }
        let command = args.command.join(" ");
        return multi::run(
            &creds,
            g.transport,
            &login,
            device,
            &command,
            multi::DEFAULT_PARALLEL,
        )
        .await;
    }
    let parse = |flag: &str, specs: &[String]| {
        specs
            .iter()
            .map(|s| PortForward::parse(flag, s))
            .collect::<Result<Vec<_>, _>>()
    };
    let local = parse("-L", &args.forward)?;
    let remote = parse("-R", &args.remote_forward)?;
    let dynamic = args
        .dynamic_forward
        .iter()
        .map(|s| forwarding::parse_dynamic(s))
        .collect::<Result<Vec<_>, _>>()?;
    let agent = if args.forward_agent {
        Some(forwarding::local_agent()?)
    } else {
        None
    };
    let command = (!args.command.is_empty()).then(|| args.command.join(" "));
    let stdin_tty = term::is_tty(0);
    let tty = if args.no_tty {
        false
    } else if args.force_tty >= 2 || (args.force_tty == 1 && stdin_tty) {
        true
    } else if args.force_tty == 1 {
        eprintln!("tsh: pseudo-terminal will not be allocated because stdin is not a terminal (use -tt to force one)");
        false
    } else {
        command.is_none() && stdin_tty
    };
    let mut mfa = None;
    let (stream, session_id): (edgeport_net::BoxedStream, Option<String>) = match &args.direct {
        Some(addr) => (
            Box::new(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| CliError::msg(format!("cannot connect to {addr}: {e}")))?,
            ),
            None,
        ),
        None => {
            let route = args.test_route_to.as_deref().unwrap_or(device);
            let (cert, (stream, id)) = dial_with_mfa(
                &creds,
                g.transport,
                device,
                route,
                args.mfa_code.as_deref(),
                stdin_tty,
            )
            .await?;
            mfa = cert;
            (stream, Some(id))
        }
    };
    let inbound = Arc::new(Inbound::new(agent));
    let ssh_creds = match &mfa {
        Some(m) => m.ssh_creds(&creds),
        None => creds.clone(),
    };
    let conn =
        Arc::new(ssh::connect(stream, &ssh_creds, device, &login, tty, inbound.clone()).await?);
    forwarding::start_local(&conn, &local).await?;
    forwarding::start_dynamic(&conn, &dynamic).await?;
    forwarding::start_remote(&conn, &inbound, &remote).await?;
    if args.no_command {
        // Forward until interrupted.
        let _ = tokio::signal::ctrl_c().await;
        return Ok(0);
    }
    let ended = ssh::run_session(
        &conn,
        SessionSpec {
            command,
            tty,
            no_stdin: args.no_stdin,
            forward_agent: args.forward_agent,
        },
    )
    .await;
    match (ended, session_id) {
        (Err(lost), Some(id)) if conn.was_lost() => {
            Err(match why_session_ended(&creds, g.transport, &id).await {
                Some(reason) => CliError::msg(reason),
                None => lost,
            })
        }
        (ended, _) => ended,
    }
}

/// Dials `route` for an SSH session to `device`, with a per-session second factor
/// certificate when a code is given, or when the dial is refused for want of one (the code is
/// then asked on the terminal).
pub(super) async fn dial_with_mfa(
    creds: &Creds,
    transport: Transport,
    device: &str,
    route: &str,
    code: Option<&str>,
    may_ask: bool,
) -> Result<
    (
        Option<session_mfa::SessionCert>,
        (edgeport_net::BoxedStream, String),
    ),
    CliError,
> {
    // The certificate comes first: the authority admits the dial once it has signed one.
    let code = code.map(str::to_string).filter(|c| !c.trim().is_empty());
    if let Some(code) = code {
        let cert = session_mfa::fetch(creds, transport, device, &code).await?;
        let dialed = gateway::dial_ssh(creds, transport, route).await?;
        return Ok((Some(cert), dialed));
    }
    match gateway::dial_ssh(creds, transport, route).await {
        Ok(d) => Ok((None, d)),
        Err(e) if session_mfa::is_required(&e) => {
            let code = session_mfa::ask_code(device, may_ask)?;
            let cert = session_mfa::fetch(creds, transport, device, &code).await?;
            let dialed = gateway::dial_ssh(creds, transport, route).await?;
            Ok((Some(cert), dialed))
        }
        Err(e) => Err(e),
    }
}

/// Asks the gateway why it ended session `id` (a lock cuts the encrypted stream without a
/// word): "device van-1 is locked: MESSAGE". `None` when it did not say, in time or at all.
async fn why_session_ended(creds: &Creds, transport: Transport, id: &str) -> Option<String> {
    let tls = gateway::creds_config(creds).ok()?;
    let req = ClientRequest::SessionEnd {
        session_id: id.to_string(),
    };
    match gateway::user_request(creds, tls, transport, &req).await {
        Ok((ClientReply::SessionEnd { reason }, _)) => reason,
        _ => None,
    }
}

async fn ls(g: &Global, args: &LsArgs) -> Result<i32, CliError> {
    let creds = creds(g)?;
    let mut want = BTreeMap::new();
    for l in &args.labels {
        want.extend(parse_labels(l).map_err(|e| CliError::msg(e.to_string()))?);
    }
    let mut devices = gateway::list_devices(&creds, g.transport).await?;
    // Hosts behind devices (a gateway older than targets lists none).
    let mut targets = gateway::list_targets(&creds, g.transport)
        .await
        .unwrap_or_default();
    let matches =
        |labels: &BTreeMap<String, String>| want.iter().all(|(k, v)| labels.get(k) == Some(v));
    targets.retain(|t| matches(&t.labels));
    targets.sort_by_key(|t| t.address());
    match args.format {
        Format::Json | Format::Yaml => {
            // A device whose own labels do not match still appears when one of its
            // targets does (a target adds its own keys to its device's labels), carrying
            // only the targets that match.
            devices.retain(|d| matches(&d.labels) || targets.iter().any(|t| t.device == d.id));
            devices.sort_by(|a, b| a.id.cmp(&b.id));
            args.format.print(&serde_json::Value::Array(
                devices
                    .iter()
                    .map(|d| crate::schema::device(d, &targets))
                    .collect(),
            ))
        }
        Format::Text => {
            devices.retain(|d| matches(&d.labels));
            devices.sort_by(|a, b| a.id.cmp(&b.id));
            let mut t = crate::text::Table::new(&["DEVICE", "STATUS", "LABELS", "LAST SEEN"]);
            for d in &devices {
                t.row(vec![
                    d.id.clone(),
                    if d.online { "online" } else { "offline" }.into(),
                    edgeport_proto::util::format_labels(&d.labels),
                    if d.online || d.last_seen == 0 {
                        String::new()
                    } else {
                        format!(
                            "{} ago",
                            crate::text::duration(now_secs().saturating_sub(d.last_seen))
                        )
                    },
                ]);
            }
            for tg in &targets {
                t.row(vec![
                    tg.address(),
                    tg.status().into(),
                    edgeport_proto::util::format_labels(&tg.labels),
                    if tg.checked_ms == 0 {
                        String::new()
                    } else {
                        format!(
                            "checked {} ago",
                            crate::text::duration(now_secs().saturating_sub(tg.checked_ms / 1000))
                        )
                    },
                ]);
            }
            t.print();
        }
    }
    Ok(0)
}

fn status(g: &Global, format: Format) -> Result<i32, CliError> {
    let creds = creds(g)?;
    let roles: RolesExtension = creds
        .ssh_cert
        .extensions()
        .get(EXT_ROLES)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let until = creds.valid_before();
    let mut exts: Vec<&str> = creds
        .ssh_cert
        .extensions()
        .keys()
        .map(String::as_str)
        .filter(|k| *k != EXT_ROLES)
        .collect();
    exts.sort();
    if format != Format::Text {
        let identity = match &creds.source {
            profile::Source::IdentityFile(p) => Some(p.display().to_string()),
            _ => None,
        };
        format.print(&serde_json::json!({
            "proxy": creds.proxy,
            "cluster": creds.cas.cluster,
            "user": creds.user,
            "logins": creds.logins(),
            "roles": roles.roles,
            "extensions": exts,
            "valid_until": crate::schema::time(until),
            "valid_for_secs": until.saturating_sub(now_secs()),
            "identity_file": identity,
        }));
        return Ok(0);
    }
    crate::outln!("> Proxy:       {}", creds.proxy);
    crate::outln!("  Cluster:     {}", creds.cas.cluster);
    crate::outln!("  User:        {}", creds.user);
    crate::outln!("  Logins:      {}", creds.logins().join(", "));
    crate::outln!("  Roles:       {}", roles.roles.join(", "));
    crate::outln!("  Extensions:  {}", exts.join(", "));
    crate::outln!(
        "  Valid until: {} [valid for {}]",
        format_time(until),
        crate::text::duration(until.saturating_sub(now_secs()))
    );
    if let profile::Source::IdentityFile(p) = &creds.source {
        crate::outln!("  Identity:    {}", p.display());
    }
    Ok(0)
}

async fn logout(g: &Global) -> Result<i32, CliError> {
    let home = tsh_home()?;
    let mut profile = Profile::load(&home)?;
    let targets: Vec<String> = match &g.proxy {
        Some(p) => vec![p.clone()],
        None => profile.proxies.iter().map(|p| p.proxy.clone()).collect(),
    };
    if targets.is_empty() {
        crate::outln!("Not logged in.");
        return Ok(0);
    }
    let sock = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty());
    for proxy in targets {
        let user = profile.get(&proxy).map(|p| p.user.clone());
        if let Some(user) = &user {
            let files = KeyFiles::new(&home, &proxy, user);
            if let (Some(sock), Ok(line)) = (&sock, std::fs::read_to_string(&files.cert)) {
                if let Ok(cert) = russh::keys::ssh_key::Certificate::from_openssh(line.trim()) {
                    if let Err(e) = agent::remove(Path::new(sock), &cert).await {
                        eprintln!("tsh: could not remove the key from the ssh-agent: {e}");
                    }
                }
            }
        }
        super::kube::forget(&home, &proxy)?;
        let dir = profile::key_dir(&home, &proxy);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| CliError::msg(format!("cannot delete {}: {e}", dir.display())))?;
        }
        profile.remove(&proxy);
        match user {
            Some(u) => crate::outln!("Logged out {u} from {proxy}."),
            None => crate::outln!("Logged out from {proxy}."),
        }
    }
    if profile.proxies.is_empty() {
        let _ = std::fs::remove_file(Profile::path(&home));
        let _ = std::fs::remove_dir(home.join("keys"));
    } else {
        profile.save(&home)?;
    }
    Ok(0)
}

/// `tsh proxy ssh USER@HOST:PORT`: the device is HOST without a `.CLUSTER` suffix.
async fn proxy_ssh(
    g: &Global,
    target: &str,
    direct: Option<&str>,
    mfa_code: Option<&str>,
) -> Result<i32, CliError> {
    if let Some(addr) = direct {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| CliError::msg(format!("cannot connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        bridge::stdio(Box::new(tcp)).await;
        return Ok(0);
    }
    let creds = creds(g)?;
    let host = split_target(target).1;
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let suffix = format!(".{}", creds.cas.cluster);
    let device = host.strip_suffix(&suffix).unwrap_or(host);
    let dialed = match dial_with_mfa(&creds, g.transport, device, device, mfa_code, true).await {
        Ok((Some(cert), dialed)) => match session_mfa::to_ssh_agent(&cert, device).await {
            Ok(()) => Ok(dialed),
            Err(e) => Err(e),
        },
        Ok((None, dialed)) => Ok(dialed),
        Err(e) => Err(e),
    };
    let dialed = match dialed {
        Ok(d) => pin_for_openssh(&creds, device).map(|()| d),
        Err(e) => Err(e),
    };
    let (stream, _) = match dialed {
        Ok(s) => s,
        Err(e) => {
            // Said on stderr now; OpenSSH then reads end of file, not a broken pipe.
            eprintln!("error: {e}");
            bridge::linger_on_error().await;
            return Ok(e.code.unwrap_or(255));
        }
    };
    bridge::stdio(stream).await;
    Ok(0)
}

/// A host behind a device with a pinned host key: its line in the login's
/// `known_hosts_pinned` (which `tsh config` names to OpenSSH) is that key, written before any
/// byte of the target reaches OpenSSH, so OpenSSH checks the key the device vouched for.
fn pin_for_openssh(creds: &Creds, target: &str) -> Result<(), CliError> {
    let Some(key) = gateway::pinned_key(target) else {
        return Ok(());
    };
    if let Source::IdentityFile(_) = creds.source {
        return Ok(());
    }
    let files = KeyFiles::new(&tsh_home()?, &creds.proxy, &creds.user);
    let old = std::fs::read_to_string(&files.pinned_hosts).unwrap_or_default();
    let line = key
        .to_openssh()
        .map_err(|e| CliError::msg(format!("the pinned host key of {target}: {e}")))?;
    let mut text: String = old
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(target))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!("{target} {line}\n"));
    let tmp = files.pinned_hosts.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &files.pinned_hosts))
        .map_err(|e| {
            CliError::msg(format!(
                "cannot write {}: {e}",
                files.pinned_hosts.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(split_target("root@dev1"), (Some("root"), "dev1"));
        assert_eq!(split_target("dev1"), (None, "dev1"));
    }
}
