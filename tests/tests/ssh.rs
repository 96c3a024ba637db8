//! SSH to devices through their tunnels, end to end: real authority, gateway and agents on
//! loopback, tsh, and the stock OpenSSH client (ssh, scp, sftp) through `tsh config`.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgeport_e2e::ssh::{
    crafted_cert_attempts, random_file, same_file, ssh, Cluster, SshAgent, Tmux, Tsh,
};
use edgeport_e2e::{bin, echo_server, run, wait_until, Authority, Run};

const PW: &str = "correct horse battery";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// One `error: ...` line containing `expect`, the given exit code, no panic.
fn assert_error(r: &Run, code: i32, expect: &str) {
    let err = r.stderr();
    assert_eq!(
        r.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{err}",
        r.stdout()
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` (which forwards `lport`) in the background, then sends "ping" through
/// `lport` and returns what came back (empty if nothing) and the command's stderr.
fn through_forward(mut cmd: Command, lport: u16) -> (Vec<u8>, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut got = Vec::new();
    let up = wait_until(Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", lport)).is_ok()
    });
    if up {
        // The listener is up; the forward itself is opened per connection.
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", lport)) {
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let _ = s.write_all(b"ping");
            let mut buf = [0u8; 4];
            let mut n = 0;
            while n < 4 {
                match s.read(&mut buf[n..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            got = buf[..n].to_vec();
        }
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (got, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A minimal ssh_config for dev hosts: the gateway hop and the host CA, but no identity
/// (the caller brings one: `-i`, or an ssh-agent).
fn bare_config(tsh: &Tsh, path: &Path) {
    let text = format!(
        "Host dev1 dev2 dev3\n    UserKnownHostsFile \"{}\"\n    StrictHostKeyChecking yes\n    \
         ProxyCommand env TSH_HOME=\"{}\" \"{}\" --proxy {} proxy ssh %r@%h:%p\n",
        tsh.key_dir().join("known_hosts").display(),
        tsh.home.display(),
        bin("tsh").display(),
        tsh.proxy
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn login_ssh_terminal_files_and_openssh() {
    let c = Cluster::start("edge", &[("dev1", "fleet=vans"), ("dev2", "fleet=trucks")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());

    let r = tsh
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    assert!(r.stdout().contains("Logged in as alice"), "{}", r.stdout());
    let kd = tsh.key_dir();
    for f in [
        "alice",
        "alice.pub",
        "alice-cert.pub",
        "alice-x509.pem",
        "cas.json",
        "known_hosts",
    ] {
        assert!(kd.join(f).exists(), "{f} missing");
    }
    assert_eq!(mode(&kd.join("alice")), 0o600);
    assert!(tsh.home.join("profile").exists());
    assert!(std::fs::read_to_string(kd.join("known_hosts"))
        .unwrap()
        .starts_with("@cert-authority * ssh-ed25519 "));

    // Commands, exit status, stdin, stderr.
    let r = tsh.run(&["ssh", "root@dev1", "echo", "hi"], None);
    assert_eq!(r.stdout(), "hi\n", "{}", r.stderr());
    assert_eq!(r.code(), Some(0));
    assert_eq!(tsh.run(&["ssh", "dev1", "exit 7"], None).code(), Some(7));
    let r = tsh.run(&["ssh", "dev1", "cat; echo done"], Some(b"abc\n"));
    assert_eq!(r.stdout(), "abc\ndone\n");
    let r = tsh.run(&["ssh", "dev1", "echo out; echo err >&2"], None);
    assert_eq!(
        (r.stdout().as_str(), r.stderr().as_str()),
        ("out\n", "err\n")
    );

    // The same over QUIC (the default user leg is TCP+TLS).
    let r = tsh.run(
        &["--transport", "quic", "ssh", "dev1", "echo", "quic"],
        None,
    );
    assert_eq!(r.stdout(), "quic\n", "{}", r.stderr());

    // Inventory and status.
    let r = tsh
        .run(&["ls", "--format", "json"], None)
        .expect_ok("tsh ls");
    let list = r.json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dev1", "dev2"]);
    assert!(list.as_array().unwrap().iter().all(|d| d["online"] == true));
    assert_eq!(list[0]["labels"]["fleet"], "vans");
    let r = tsh
        .run(&["ls", "fleet=trucks"], None)
        .expect_ok("tsh ls filter");
    assert!(
        r.stdout().contains("dev2") && !r.stdout().contains("dev1"),
        "{}",
        r.stdout()
    );
    let r = tsh.run(&["status"], None).expect_ok("tsh status");
    assert!(
        r.stdout().contains("alice") && r.stdout().contains("root"),
        "{}",
        r.stdout()
    );

    // A terminal session driven by tmux: size, resize, exit status.
    let tmux = Tmux::start(
        "tsh-pty",
        100,
        30,
        &format!(
            "env TSH_HOME='{}' '{}' ssh dev1; echo TSH-EXIT=$?; sleep 60",
            tsh.home.display(),
            bin("tsh").display()
        ),
    );
    tmux.send(&["stty size", "Enter"]);
    let (ok, screen) = tmux.wait_for("30 100", Duration::from_secs(30));
    assert!(ok, "no terminal size in:\n{screen}");
    tmux.resize(120, 40);
    tmux.send(&["stty size", "Enter"]);
    let (ok, screen) = tmux.wait_for("40 120", Duration::from_secs(30));
    assert!(ok, "the resize did not reach the device:\n{screen}");
    tmux.send(&["exit 3", "Enter"]);
    let (ok, screen) = tmux.wait_for("TSH-EXIT=3", Duration::from_secs(30));
    assert!(ok, "exit status not propagated:\n{screen}");
    drop(tmux);

    // Stock OpenSSH through `tsh config`: ssh, scp and sftp with a 100 MiB file.
    let cfg = tsh.config();
    let out = run(
        ssh(&cfg, &["root@dev1", "echo", "openssh-ok"]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.stdout(), "openssh-ok\n", "{}", out.stderr());
    let src = c.dir.join("big.bin");
    random_file(&src, 100 << 20);
    let (up, back) = (c.dir.join("scp-up.bin"), c.dir.join("scp-back.bin"));
    let scp = |from: String, to: String| {
        let mut cmd = Command::new("scp");
        cmd.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", &from, &to]);
        run(cmd, None, Duration::from_secs(300)).expect_ok("scp");
    };
    scp(
        src.display().to_string(),
        format!("root@dev1:{}", up.display()),
    );
    scp(
        format!("root@dev1:{}", up.display()),
        back.display().to_string(),
    );
    assert!(same_file(&src, &back), "scp round trip changed the file");
    let (up, back) = (c.dir.join("sftp-up.bin"), c.dir.join("sftp-back.bin"));
    let batch = c.dir.join("sftp.batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            src.display(),
            up.display(),
            up.display(),
            back.display()
        ),
    )
    .unwrap();
    let cmd = edgeport_e2e::ssh::sftp_batch(&cfg, &batch, "root@dev1");
    run(cmd, None, Duration::from_secs(300)).expect_ok("sftp");
    assert!(same_file(&src, &back), "sftp round trip changed the file");

    // Local port forwarding, with tsh and with OpenSSH.
    let echo = echo_server();
    let lport = free_tcp_port();
    let cmd = tsh.cmd(&[
        "ssh",
        "-L",
        &format!("{lport}:127.0.0.1:{echo}"),
        "dev1",
        "sleep 30",
    ]);
    let (got, err) = through_forward(cmd, lport);
    assert_eq!(got, b"ping", "tsh -L: {err}");
    let lport = free_tcp_port();
    let cmd = ssh(
        &cfg,
        &[
            "-L",
            &format!("{lport}:127.0.0.1:{echo}"),
            "-o",
            "ExitOnForwardFailure=yes",
            "root@dev1",
            "sleep 30",
        ],
    );
    let (got, err) = through_forward(cmd, lport);
    assert_eq!(got, b"ping", "ssh -L: {err}");
}

#[test]
fn refusals_are_clear() {
    let c = Cluster::start("edge", &[("dev1", ""), ("dev2", ""), ("dev3", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");

    // A login the certificate does not carry: the agent refuses and says why.
    let r = tsh.run(&["ssh", "pi@dev1", "true"], None);
    assert_error(&r, 255, "does not allow login \"pi\" (principals: root)");
    // The same through stock OpenSSH and `tsh proxy ssh`: OpenSSH prints the agent's words,
    // never "Broken pipe" (tsh proxy ssh used to exit before OpenSSH had read them, and its
    // next write failed). A refused dial reads as a closed connection, after tsh's reason.
    let cfg = tsh.config();
    let proxy_to = |device: &str| {
        format!(
            "ProxyCommand env TSH_HOME='{}' '{}' --proxy {} proxy ssh %r@{device}:%p",
            tsh.home.display(),
            bin("tsh").display(),
            tsh.proxy
        )
    };
    for _ in 0..5 {
        let out = run(
            ssh(&cfg, &["pi@dev1", "true"]),
            None,
            Duration::from_secs(60),
        );
        assert_eq!(out.code(), Some(255), "{}", out.stderr());
        assert!(
            out.stderr().contains("does not allow login \"pi\"")
                && !out.stderr().contains("Broken pipe"),
            "{}",
            out.stderr()
        );
        let nodev = proxy_to("nodev");
        let out = run(
            ssh(&cfg, &["-o", &nodev, "root@dev1", "true"]),
            None,
            Duration::from_secs(60),
        );
        assert_eq!(out.code(), Some(255), "{}", out.stderr());
        assert!(
            out.stderr().contains("nodev") && !out.stderr().contains("Broken pipe"),
            "{}",
            out.stderr()
        );
    }

    // A device that answers for another (here: the gateway asked for dev2 while tsh expects
    // dev1) is refused by its host certificate, by tsh and by OpenSSH.
    let r = tsh.run(&["ssh", "--test-route-to", "dev2", "dev1", "true"], None);
    assert_error(&r, 255, "not dev1");
    assert!(r.stderr().contains("impersonation"), "{}", r.stderr());
    let out = run(
        ssh(
            &cfg,
            &[
                "-o",
                "HostKeyAlias=dev1",
                "-o",
                &proxy_to("dev2"),
                "root@dev1",
                "true",
            ],
        ),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(255));
    assert!(
        out.stderr().contains("Host key verification failed"),
        "{}",
        out.stderr()
    );

    // Expired credentials: one line, "run tsh login".
    let short = Tsh::new(c.dir.join("tsh-short"), c.proxy());
    short
        .login("alice", PW, &c.gw.ca_pin, &["--ttl", "2s"])
        .expect_ok("tsh login --ttl 2s");
    assert!(wait_until(Duration::from_secs(20), || {
        short.run(&["status"], None).code() == Some(1)
    }));
    let r = short.run(&["ssh", "dev1", "true"], None);
    assert_error(
        &r,
        1,
        &format!("no valid credentials for {}: run tsh login", c.proxy()),
    );

    // Another cluster's certificates: the gateway refuses the x509 one, the agent the SSH
    // one (offered through a valid gateway hop).
    let other = Authority::start(&c.dir.join("other"), "other");
    let foreign = c.dir.join("foreign.identity");
    other.tctl_ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--logins",
        "root",
        "--format",
        "file",
        "--out",
        foreign.to_str().unwrap(),
    ]);
    let r = tsh.run(
        &[
            "-i",
            foreign.to_str().unwrap(),
            "--proxy",
            c.proxy(),
            "ssh",
            "dev1",
            "true",
        ],
        None,
    );
    assert_error(&r, 255, "the credentials are for cluster \"other\"");
    let key = c.dir.join("foreign-key");
    other.tctl_ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--logins",
        "root",
        "--format",
        "openssh",
        "--out",
        key.to_str().unwrap(),
    ]);
    let bare = c.dir.join("bare_config");
    bare_config(&tsh, &bare);
    let out = run(
        ssh(
            &bare,
            &[
                "-i",
                key.to_str().unwrap(),
                "-o",
                "IdentitiesOnly=yes",
                "root@dev1",
                "true",
            ],
        ),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(255), "{}", out.stderr());
    assert!(
        out.stderr().contains("Permission denied"),
        "{}",
        out.stderr()
    );
    let agent_log = c.agent("dev1").proc.log_text();
    assert!(
        agent_log.contains("not signed by this cluster's user CA"),
        "the agent did not log why:\n{agent_log}"
    );

    // A revoked device is unreachable.
    c.tctl.ok(&["devices", "rm", "dev3"]);
    let mut last = None;
    let refused = wait_until(Duration::from_secs(30), || {
        let r = tsh.run(&["ssh", "dev3", "true"], None);
        let done = r.code() != Some(0);
        last = Some(r);
        done
    });
    let r = last.unwrap();
    assert!(refused, "revoked dev3 still reachable");
    assert_error(&r, 255, "dev3");
}

#[test]
fn ssh_agent_and_logout() {
    let c = Cluster::start("edge", &[("dev1", "")]);
    c.add_user("alice", "root", PW);
    let agent = SshAgent::start(c.dir.path());
    let mut tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.agent_sock = Some(agent.sock.clone());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let listed = agent.list().stdout();
    assert!(
        listed.contains("ED25519-CERT") && listed.contains("edgeport:"),
        "{listed}"
    );

    // Stock ssh with nothing but the agent: no identity file anywhere.
    let bare = c.dir.join("bare_config");
    bare_config(&tsh, &bare);
    let empty_home = c.dir.join("empty-home");
    std::fs::create_dir_all(&empty_home).unwrap();
    let mut cmd = ssh(&bare, &["root@dev1", "echo", "agent-ok"]);
    cmd.env("SSH_AUTH_SOCK", &agent.sock)
        .env("HOME", &empty_home);
    let out = run(cmd, None, Duration::from_secs(60));
    assert_eq!(out.stdout(), "agent-ok\n", "{}", out.stderr());

    // Logout: every file and the agent's entry go; tsh then asks for a login.
    tsh.run(&["logout"], None).expect_ok("tsh logout");
    assert!(!tsh.key_dir().exists());
    assert!(!tsh.home.join("profile").exists());
    let listed = agent.list();
    assert!(
        !listed.stdout().contains("edgeport:"),
        "agent still holds: {}",
        listed.stdout()
    );
    let r = tsh.run(&["ssh", "dev1", "true"], None);
    assert_error(&r, 1, "run tsh login");

    // An invited user sets a password with the invite code, then logs in with it.
    let out = c
        .tctl
        .ok(&["users", "add", "carol", "--logins", "root"])
        .stdout();
    let code = out
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no invite code in:\n{out}"))
        .to_string();
    let carol = Tsh::new(c.dir.join("tsh-carol"), c.proxy());
    carol
        .login(
            "carol",
            "carol's new password",
            &c.gw.ca_pin,
            &["--invite", &code],
        )
        .expect_ok("tsh login --invite");
    std::fs::remove_dir_all(&carol.home).unwrap();
    carol
        .login("carol", "carol's new password", &c.gw.ca_pin, &[])
        .expect_ok("tsh login with the new password");
    let r = carol.run(&["ssh", "dev1", "echo", "carol"], None);
    assert_eq!(r.stdout(), "carol\n", "{}", r.stderr());
}

#[test]
fn gateway_cannot_read_the_session() {
    let c = Cluster::start_with_splice_dump("edge", &[("dev1", "")]);
    let dump_dir = c.splice_dump.clone().unwrap();
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    // The gateway only splices: the bytes it relayed hold the SSH banner but never the
    // command or its output.
    let r = tsh.run(&["ssh", "dev1", "echo SECRET-$((6*7))-MARKER"], None);
    assert_eq!(r.stdout(), "SECRET-42-MARKER\n", "{}", r.stderr());
    let dumps: Vec<PathBuf> = std::fs::read_dir(&dump_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        !dumps.is_empty(),
        "the gateway wrote no splice dump (EDGEPORT_SPLICE_DUMP={} not implemented?)",
        dump_dir.display()
    );
    let mut banner = false;
    for p in &dumps {
        let bytes = std::fs::read(p).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        banner |= hay.contains("SSH-2.0-");
        assert!(
            !hay.contains("SECRET-42-MARKER"),
            "plaintext output in {}",
            p.display()
        );
        assert!(
            !hay.contains("SECRET-$((6*7))"),
            "plaintext command in {}",
            p.display()
        );
    }
    assert!(banner, "no SSH banner in the splice dumps: {dumps:?}");
}

/// `tsh ssh dev1 'echo started; sleep 300'` in the background, returned once the agent has
/// started one more session (or tsh already ended).
fn long_session(tsh: &Tsh, agent: &edgeport_e2e::Proc) -> std::process::Child {
    let before = agent.log_text().matches("session started").count();
    let mut long = tsh.cmd(&["ssh", "dev1", "echo started; sleep 300"]);
    long.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = long.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        agent.log_text().matches("session started").count() > before
            || matches!(child.try_wait(), Ok(Some(_)))
    }));
    child
}

/// Waits up to `limit` for `child` to end (killing it if it does not): whether it ended by
/// itself, and its output.
fn ended_within(mut child: std::process::Child, limit: Duration) -> (bool, std::process::Output) {
    let ended = wait_until(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = child.kill();
    }
    (ended, child.wait_with_output().unwrap())
}

#[test]
fn locks_end_sessions() {
    let c = Cluster::start("edge", &[("dev1", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    // A lock ends the live session and refuses new ones.
    let agent_proc = &c.agent("dev1").proc;
    let child = long_session(&tsh, agent_proc);
    c.tctl
        .ok(&["lock", "--user", "alice", "--message", "incident 42"]);
    let (ended, out) = ended_within(child, Duration::from_secs(30));
    assert!(
        ended,
        "the locked user's session is still running (did the gateway push the lock to the agent?)"
    );
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dev1 closed the session") && err.contains("locked"),
        "{err}"
    );
    let r = tsh.run(&["ssh", "dev1", "true"], None);
    assert_ne!(r.code(), Some(0));
    assert!(r.stderr().contains("lock"), "{}", r.stderr());
    // An unlock is in force when tctl returns: the very next dial works.
    c.tctl.ok(&["unlock", "--user", "alice"]);
    tsh.run(&["ssh", "dev1", "true"], None)
        .expect_ok("the first dial right after tctl unlock");

    // A device lock: the gateway itself cuts the live session (the device is not trusted to).
    let child = long_session(&tsh, agent_proc);
    c.tctl
        .ok(&["lock", "--device", "dev1", "--message", "stolen van"]);
    let (ended, out) = ended_within(child, Duration::from_secs(30));
    assert!(ended, "the session to the locked device is still running");
    assert!(
        c.gw.proc.log_text().contains("session cut: locked"),
        "the gateway did not cut it"
    );
    // The user reads it as a lock, with the administrator's message, not "connection lost".
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("device dev1 is locked: stolen van") && !err.contains("was lost"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(255));
    let r = tsh.run(&["ssh", "dev1", "true"], None);
    assert_ne!(r.code(), Some(0));
    assert!(r.stderr().contains("lock"), "{}", r.stderr());

    // Removing a user ends their live sessions as a lock does.
    c.tctl.ok(&["unlock", "--device", "dev1"]);
    c.add_user("bob", "root", PW);
    let bob = Tsh::new(c.dir.join("tsh-bob"), c.proxy());
    bob.login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login as bob");
    let child = long_session(&bob, agent_proc);
    c.tctl.ok(&["users", "rm", "bob"]);
    let (ended, out) = ended_within(child, Duration::from_secs(30));
    assert!(ended, "the removed user's session is still running");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bob\" is locked"), "{err}");
    // A new user of the name is not held by the removal.
    c.add_user("bob", "root", PW);
    bob.login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login as the new bob");
    bob.run(&["ssh", "dev1", "true"], None)
        .expect_ok("the new bob's first dial");
}

#[test]
fn roles_limit_devices_ptys_and_forwarding() {
    let c = Cluster::start(
        "edge",
        &[
            ("dev1", "fleet=vans"),
            ("dev2", "fleet=vans,env=prod"),
            ("dev3", "fleet=robots"),
        ],
    );
    c.auth
        .tctl(&[
            "roles",
            "add",
            "vans-exec",
            "--allow",
            "fleet=vans",
            "--deny",
            "env=prod",
            "--no-port-forwarding",
            "--no-pty",
            "--max-session-ttl",
            "1h",
        ])
        .expect_ok("tctl roles add");
    c.auth
        .add_user_with("bob", PW, &["--logins", "root", "--roles", "vans-exec"])
        .expect_ok("tctl users add --roles");
    let roles = c
        .auth
        .tctl(&["roles", "ls", "--format", "json"])
        .expect_ok("roles ls")
        .json();
    let ours = roles
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "vans-exec")
        .unwrap()
        .clone();
    assert_eq!(ours["users"][0], "bob", "{roles}");
    assert_eq!(ours["permit_port_forwarding"], false);
    // A role in use cannot be removed; an unknown role cannot be given to a user.
    let r = c.auth.tctl(&["roles", "rm", "vans-exec"]);
    assert!(
        r.code() != Some(0) && r.stderr().contains("held by bob"),
        "{}",
        r.stderr()
    );
    let r = c
        .auth
        .add_user_with("eve", PW, &["--logins", "root", "--roles", "nope"]);
    assert!(
        r.code() != Some(0) && r.stderr().contains("unknown role"),
        "{}",
        r.stderr()
    );

    let tsh = Tsh::new(c.dir.join("tsh-bob"), c.proxy());
    let login = tsh
        .login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login")
        .stdout();
    // tsh asked for its default 8h; the role's 1h cap is said, not silently applied.
    assert!(
        login.contains("capped by the roles (asked for 8h)"),
        "{login}"
    );
    // The certificate carries the role's cap and lacks the extensions the role withholds.
    let cert = std::fs::read_to_string(tsh.key_dir().join("bob-cert.pub")).unwrap();
    let cert_path = c.dir.join("bob-cert.pub");
    std::fs::write(&cert_path, cert).unwrap();
    let mut kg = Command::new("ssh-keygen");
    kg.arg("-L").arg("-f").arg(&cert_path);
    let shown = run(kg, None, Duration::from_secs(10))
        .expect_ok("ssh-keygen -L")
        .stdout();
    assert!(!shown.contains("permit-pty"), "{shown}");
    assert!(!shown.contains("permit-port-forwarding"), "{shown}");

    // tsh ls shows only what the roles reach.
    let listed = tsh
        .run(&["ls", "--format", "json"], None)
        .expect_ok("tsh ls")
        .json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dev1"], "{listed}");

    // Devices: allowed by label, denied by label (deny wins), not allowed at all.
    let r = tsh.run(&["ssh", "dev1", "echo", "allowed"], None);
    assert_eq!(r.stdout(), "allowed\n", "{}", r.stderr());
    for dev in ["dev2", "dev3"] {
        let r = tsh.run(&["ssh", dev, "echo", "nope"], None);
        assert!(r.code() != Some(0), "{dev} should be refused");
        assert!(
            r.stderr().contains("do not allow device"),
            "{dev}: {}",
            r.stderr()
        );
        assert!(!r.stdout().contains("nope"));
    }

    // Port forwarding is refused by the device, with tsh and with stock OpenSSH.
    let echo = echo_server();
    let lport = free_tcp_port();
    let cmd = tsh.cmd(&[
        "ssh",
        "-L",
        &format!("{lport}:127.0.0.1:{echo}"),
        "dev1",
        "sleep 20",
    ]);
    let (got, err) = through_forward(cmd, lport);
    assert!(got.is_empty(), "tsh -L forwarded without permission: {err}");
    let cfg = tsh.config();
    let lport = free_tcp_port();
    let cmd = ssh(
        &cfg,
        &[
            "-L",
            &format!("{lport}:127.0.0.1:{echo}"),
            "root@dev1",
            "sleep 20",
        ],
    );
    let (got, err) = through_forward(cmd, lport);
    assert!(got.is_empty(), "ssh -L forwarded without permission: {err}");
    assert!(err.contains("open failed"), "{err}");

    // No PTY: an exec still works, a terminal is refused.
    let r = run(
        ssh(&cfg, &["-tt", "root@dev1", "tty"]),
        None,
        Duration::from_secs(60),
    );
    assert!(
        r.stdout().contains("not a tty") || r.stderr().contains("PTY allocation request failed"),
        "a PTY was allocated without permit-pty: {} / {}",
        r.stdout(),
        r.stderr()
    );
}

#[test]
fn label_selector_runs_on_every_matching_device() {
    let c = Cluster::start(
        "edge",
        &[
            ("dev1", "fleet=vans"),
            ("dev2", "fleet=vans"),
            ("dev3", "fleet=robots"),
        ],
    );
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");

    let r = tsh.run(&["ssh", "fleet=vans", "echo", "hi"], None);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let stdout = r.stdout();
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["[dev1] hi", "[dev2] hi"], "{stdout}");
    assert!(
        r.stderr().contains("2 devices: all 2 succeeded"),
        "{}",
        r.stderr()
    );

    // One device cannot be reached (locked): the others still run, the summary names it
    // and the exit status says something failed.
    c.auth
        .tctl(&["lock", "--device", "dev2", "--message", "maintenance"])
        .expect_ok("tctl lock");
    let r = tsh.run(&["ssh", "fleet=vans", "echo", "again"], None);
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    assert_eq!(r.stdout(), "[dev1] again\n");
    assert!(r.stderr().contains("dev2 (not run)"), "{}", r.stderr());

    // A selector that matches nothing is a clear error, not silence.
    let r = tsh.run(&["ssh", "fleet=boats", "true"], None);
    assert!(r.code() != Some(0));
    assert!(
        r.stderr().contains("no online device matches fleet=boats"),
        "{}",
        r.stderr()
    );
}

#[test]
fn password_guessing_is_slowed_down() {
    let c = Cluster::start("edge", &[]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    for _ in 0..5 {
        let r = tsh.login("alice", "wrong password", &c.gw.ca_pin, &[]);
        assert_ne!(r.code(), Some(0));
        assert!(
            r.stderr().contains("invalid user or password"),
            "{}",
            r.stderr()
        );
    }
    // Now even the right password waits, and says so (no argon2 work is spent on it).
    let r = tsh.login("alice", PW, &c.gw.ca_pin, &[]);
    assert_ne!(r.code(), Some(0));
    assert!(
        r.stderr().contains("too many failed logins; try again in"),
        "{}",
        r.stderr()
    );
    // Other users are not held up: 5 failures are below the per-address limit.
    c.add_user("bob", "root", PW);
    let tsh_bob = Tsh::new(c.dir.join("tsh-bob"), c.proxy());
    tsh_bob
        .login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("bob's login");
}

/// An agent killed in the middle of a session (power cut, kill -9) closes nothing: tsh's
/// keep-alives notice, and it exits with one clear line instead of waiting for minutes.
#[test]
fn a_session_to_a_killed_agent_ends_with_a_clear_line() {
    let mut c = Cluster::start("edge", &[("dev1", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let child = long_session(&tsh, &c.agent("dev1").proc);
    c.agents[0].proc.kill9();
    let t = std::time::Instant::now();
    let (ended, out) = ended_within(child, Duration::from_secs(90));
    assert!(ended, "tsh was still waiting 90 s after the agent died");
    eprintln!("tsh noticed the dead agent after {:?}", t.elapsed());
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got: {err}");
    assert!(
        lines[0].contains("dev1") && lines[0].contains("lost"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Sends a SOCKS5 CONNECT for 127.0.0.1:`port` through the proxy at `proxy`, then "ping";
/// returns the reply code and what came back.
fn through_socks(proxy: u16, port: u16) -> (u8, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut hello = [0u8; 2];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(hello, [5, 0]);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    if reply[1] != 0 {
        return (reply[1], Vec::new());
    }
    s.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    let _ = s.read_exact(&mut got);
    (reply[1], got.to_vec())
}

#[test]
fn remote_dynamic_and_agent_forwarding() {
    let c = Cluster::start("fwd", &[("dev1", "")]);
    c.add_user("alice", "root", PW);
    let agent = SshAgent::start(c.dir.path());
    let mut tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.agent_sock = Some(agent.sock.clone());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let echo = echo_server();

    // -R: the device listens (on its loopback; here the same machine) and each connection
    // comes back to the echo server on tsh's side.
    let rport = free_tcp_port();
    let cmd = tsh.cmd(&[
        "ssh",
        "-R",
        &format!("{rport}:127.0.0.1:{echo}"),
        "dev1",
        "sleep 30",
    ]);
    let (got, err) = through_forward(cmd, rport);
    assert_eq!(got, b"ping", "tsh -R: {err}");

    // -D: a SOCKS5 proxy whose connections leave from the device.
    let dport = free_tcp_port();
    let mut cmd = tsh.cmd(&["ssh", "-N", "-D", &dport.to_string(), "dev1"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || TcpStream::connect((
            "127.0.0.1",
            dport
        ))
        .is_ok()),
        "tsh -D did not listen"
    );
    let (code, got) = through_socks(dport, echo);
    // A port nobody listens on: the device's connect fails, SOCKS says "refused".
    let (closed, _) = through_socks(dport, free_tcp_port());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((code, got.as_slice()), (0, &b"ping"[..]));
    assert_eq!(closed, 5, "a failed connect is reported as refused");

    // -A: the built-in role does not allow agent forwarding; the session still runs.
    let r = tsh.run(
        &["ssh", "-A", "dev1", "echo sock=${SSH_AUTH_SOCK:-none}"],
        None,
    );
    assert_eq!(r.stdout(), "sock=none\n", "{}", r.stderr());
    assert!(
        r.stderr().contains("refused agent forwarding"),
        "{}",
        r.stderr()
    );

    // A role that allows it: tsh -A and OpenSSH -A both reach the user's agent, whose key
    // (loaded by tsh login) is listed on the device.
    c.tctl.ok(&["roles", "add", "fwd", "--agent-forwarding"]);
    c.tctl
        .ok(&["users", "update", "alice", "--set-roles", "fwd"]);
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login again");
    let r = tsh.run(&["ssh", "-A", "dev1", "ssh-add -l"], None);
    assert!(
        r.stdout().contains("ED25519-CERT"),
        "stdout: {}\nstderr: {}",
        r.stdout(),
        r.stderr()
    );
    let cfg = tsh.config();
    let mut cmd = ssh(&cfg, &["-A", "root@dev1", "ssh-add -l"]);
    cmd.env("SSH_AUTH_SOCK", &agent.sock);
    let out = run(cmd, None, Duration::from_secs(60));
    assert!(
        out.stdout().contains("ED25519-CERT"),
        "ssh -A: {}",
        out.stderr()
    );
    // Without -A the session has no agent, even with the role.
    let r = tsh.run(&["ssh", "dev1", "echo sock=${SSH_AUTH_SOCK:-none}"], None);
    assert_eq!(r.stdout(), "sock=none\n", "{}", r.stderr());

    // The audit log has the forwards, the refused one included.
    let mut events = Vec::new();
    let seen = wait_until(Duration::from_secs(60), || {
        events = c
            .tctl
            .ok(&["audit", "search", "--format", "json"])
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has = |t: &str, ok: bool| events.iter().any(|e| e["type"] == t && e["success"] == ok);
        has("agent_forward", false)
            && has("agent_forward", true)
            && events.iter().any(|e| {
                e["type"] == "port_forward" && e["direction"] == "remote" && e["port"] == rport
            })
    });
    assert!(seen, "forward events missing: {events:?}");
}

/// A certificate whose type names no algorithm ("-cert-v01@openssh.com"), presented in
/// public-key authentication by a client with a dial grant. russh verifies any presented
/// certificate before the agent's handler runs, and the ssh-key it pins panicked on this one:
/// with the device profile's `panic = "abort"` one packet killed the agent (vendor/README.md).
/// The agent must refuse it like any unknown key, keep the connection for another attempt,
/// and go on serving. tests/tests/cross.rs repeats this against the device-profile builds.
#[test]
fn a_malformed_certificate_in_ssh_auth_is_refused_not_a_crash() {
    let c = Cluster::start("edge", &[("dev1", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let pid = c.agent("dev1").proc.pid();
    for line in crafted_cert_attempts(&tsh, "dev1") {
        assert_eq!(
            line,
            "refused",
            "agent log:\n{}",
            c.agent("dev1").proc.log_text()
        );
    }
    let r = tsh
        .run(&["ssh", "dev1", "echo", "still-here"], None)
        .expect_ok("tsh ssh after the crafted certificates");
    assert_eq!(r.stdout(), "still-here\n");
    assert_eq!(c.agent("dev1").proc.pid(), pid);
    let log = c.agent("dev1").proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
