//! The commands other than login: ssh, ls, status, logout and proxy ssh.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use edgeport_net::clock::now_secs;
use edgeport_proto::sshcert::{RolesExtension, EXT_ROLES};
use edgeport_proto::util::{format_time, parse_labels};

use super::cli::{Cli, Command, Format, Global, LsArgs, ProxyCmd, SshArgs};
use super::profile::{self, load_creds, tsh_home, Creds, KeyFiles, Profile};
use super::ssh::{self, SessionSpec};
use super::{agent, bridge, config, gateway, login, multi, term, CliError};

pub async fn run(cli: Cli) -> Result<i32, CliError> {
    let g = &cli.global;
    match &cli.command {
        Command::Login(args) => login::run(g, args).await,
        Command::Ssh(args) => ssh_cmd(g, args).await,
        Command::Ls(args) => ls(g, args).await,
        Command::Status { format } => status(g, *format),
        Command::Logout => logout(g).await,
        Command::Proxy {
            what: ProxyCmd::Ssh { target, direct },
        } => proxy_ssh(g, target, direct.as_deref()).await,
        Command::Config => config::run(g).await,
        Command::Recordings(super::cli::RecordingsCmd::Ls(a)) => super::play::list(g, a).await,
        Command::Play(a) => super::play::play(g, a).await,
        Command::Kube { what } => super::kube::run(g, what).await,
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

/// One `-L [bind:]lport:host:rport`.
struct Forward {
    bind: String,
    host: String,
    port: u32,
}

fn parse_forward(spec: &str) -> Result<Forward, CliError> {
    let bad = || {
        CliError::msg(format!(
            "bad -L {spec:?}: expected [BIND:]PORT:HOST:HOSTPORT"
        ))
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (bind_addr, lport, host, rport) = match parts.as_slice() {
        [l, h, r] => ("127.0.0.1", *l, *h, *r),
        [b, l, h, r] => (*b, *l, *h, *r),
        _ => return Err(bad()),
    };
    let lport: u16 = lport.parse().map_err(|_| bad())?;
    let port: u16 = rport.parse().map_err(|_| bad())?;
    let bind_addr = if bind_addr.is_empty() || bind_addr == "localhost" {
        "127.0.0.1"
    } else {
        bind_addr
    };
    Ok(Forward {
        bind: format!("{bind_addr}:{lport}"),
        host: host.to_string(),
        port: port as u32,
    })
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
        if !args.forward.is_empty() || args.force_tty > 0 {
            return Err(CliError::msg(
                "-L and -t work with one device, not with a label selector",
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
    let forwards = args
        .forward
        .iter()
        .map(|s| parse_forward(s))
        .collect::<Result<Vec<_>, _>>()?;
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
    let stream: edgeport_net::BoxedStream = match &args.direct {
        Some(addr) => Box::new(
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| CliError::msg(format!("cannot connect to {addr}: {e}")))?,
        ),
        None => {
            let route = args.test_route_to.as_deref().unwrap_or(device);
            gateway::dial_ssh(&creds, g.transport, route).await?.0
        }
    };
    let conn = Arc::new(ssh::connect(stream, &creds, device, &login, tty).await?);
    for f in forwards {
        let listener = tokio::net::TcpListener::bind(&f.bind)
            .await
            .map_err(|e| CliError::msg(format!("cannot listen on {} for -L: {e}", f.bind)))?;
        tokio::spawn(forward_loop(listener, conn.clone(), f));
    }
    if args.no_command {
        // Forward until interrupted.
        let _ = tokio::signal::ctrl_c().await;
        return Ok(0);
    }
    ssh::run_session(
        &conn,
        SessionSpec {
            command,
            tty,
            no_stdin: args.no_stdin,
        },
    )
    .await
}

async fn forward_loop(listener: tokio::net::TcpListener, conn: Arc<ssh::Connection>, f: Forward) {
    while let Ok((mut tcp, peer)) = listener.accept().await {
        let conn = conn.clone();
        let (host, port) = (f.host.clone(), f.port);
        tokio::spawn(async move {
            let channel = match conn
                .handle
                .channel_open_direct_tcpip(
                    host.clone(),
                    port,
                    peer.ip().to_string(),
                    peer.port() as u32,
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    let why = match e {
                        russh::Error::ChannelOpenFailure(r) => r.description().to_lowercase(),
                        other => other.to_string(),
                    };
                    eprintln!("tsh: port forward to {host}:{port} failed: {why}\r");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let mut stream = channel.into_stream();
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
        });
    }
}

async fn ls(g: &Global, args: &LsArgs) -> Result<i32, CliError> {
    let creds = creds(g)?;
    let mut want = BTreeMap::new();
    for l in &args.labels {
        want.extend(parse_labels(l).map_err(|e| CliError::msg(e.to_string()))?);
    }
    let mut devices = gateway::list_devices(&creds, g.transport).await?;
    devices.retain(|d| want.iter().all(|(k, v)| d.labels.get(k) == Some(v)));
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    match args.format {
        Format::Json | Format::Yaml => args.format.print(&serde_json::Value::Array(
            devices.iter().map(crate::schema::device).collect(),
        )),
        Format::Text => {
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
async fn proxy_ssh(g: &Global, target: &str, direct: Option<&str>) -> Result<i32, CliError> {
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
    let (stream, _) = gateway::dial_ssh(&creds, g.transport, device).await?;
    bridge::stdio(stream).await;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_forwards() {
        assert_eq!(split_target("root@dev1"), (Some("root"), "dev1"));
        assert_eq!(split_target("dev1"), (None, "dev1"));
        let f = parse_forward("8080:127.0.0.1:80").unwrap();
        assert_eq!(
            (f.bind.as_str(), f.host.as_str(), f.port),
            ("127.0.0.1:8080", "127.0.0.1", 80)
        );
        let f = parse_forward("0.0.0.0:8080:db:5432").unwrap();
        assert_eq!(
            (f.bind.as_str(), f.host.as_str(), f.port),
            ("0.0.0.0:8080", "db", 5432)
        );
        assert!(parse_forward("8080").is_err());
        assert!(parse_forward("x:h:1").is_err());
    }
}
