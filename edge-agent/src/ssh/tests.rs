//! Tests of the SSH server against the real OpenSSH client, over loopback TCP (the gateway
//! only splices bytes, so a socket is a faithful stand-in for a tunnel stream). The CAs are
//! made here, which lets the tests forge what a real cluster never issues: expired
//! certificates, foreign CAs, host certificates for the wrong device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use edgeport_net::clock::now_secs;
use edgeport_proto::keys::KeyPair;
use edgeport_proto::sshcert::{
    RolesExtension, EXT_PERMIT_PORT_FORWARDING, EXT_PERMIT_PTY, EXT_ROLES,
};
use edgeport_proto::tunnel::{Service, StreamHeader};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::Certificate;
use tokio::net::TcpListener;

use super::*;

struct Fixture {
    dir: PathBuf,
    user_ca: KeyPair,
    host_ca: KeyPair,
    server: SshServer,
    port: u16,
}

struct UserCert<'a> {
    principals: &'a [&'a str],
    pty: bool,
    forwarding: bool,
    after: u64,
    before: u64,
    roles: RolesExtension,
}

impl Default for UserCert<'_> {
    fn default() -> Self {
        let now = now_secs();
        Self {
            principals: &["root", "tester"],
            pty: true,
            forwarding: true,
            after: now - 60,
            before: now + 3600,
            roles: RolesExtension::every_device(vec![]),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sign(
    ca: &KeyPair,
    subject: &KeyPair,
    t: CertType,
    key_id: &str,
    principals: &[&str],
    after: u64,
    before: u64,
    exts: &[(&str, String)],
) -> Certificate {
    let mut b = Builder::new(
        edgeport_proto::keys::random_bytes(32).unwrap(),
        subject.ssh_public().key_data().clone(),
        after,
        before,
    )
    .unwrap();
    b.cert_type(t).unwrap().key_id(key_id).unwrap();
    for p in principals {
        b.valid_principal(*p).unwrap();
    }
    for (k, v) in exts {
        b.extension(*k, v.clone()).unwrap();
    }
    b.sign(ca.ssh_private()).unwrap()
}

impl Fixture {
    async fn start(name: &str, device: &str, cert_names: &[&str]) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_test_writer()
            .try_init();
        let dir = std::env::temp_dir().join(format!("edgeport-ssh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // EDGEPORT_DEV_CA_DIR (dev_serve only): use an authority's CA keys instead.
        let ca_dir = std::env::var_os("EDGEPORT_DEV_CA_DIR").filter(|_| name == "dev");
        let load = |f: &str| {
            let dir = PathBuf::from(ca_dir.clone().unwrap());
            KeyPair::from_openssh(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
        };
        let (user_ca, host_ca) = match &ca_dir {
            Some(_) => (load("user_ca"), load("host_ca")),
            None => (KeyPair::generate().unwrap(), KeyPair::generate().unwrap()),
        };
        let host_key = KeyPair::generate().unwrap();
        let now = now_secs();
        let host_cert = sign(
            &host_ca,
            &host_key,
            CertType::Host,
            device,
            cert_names,
            now - 60,
            now + 3600,
            &[],
        );
        // A private account database: root, and an unprivileged "tester" to prove the
        // switch of uid, gid and groups.
        std::fs::write(
            dir.join("passwd"),
            format!(
                "root:x:0:0:root:/root:/bin/sh\ntester:x:65534:65534::{}:/bin/sh\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("group"),
            "root:x:0:\nnogroup:x:65534:\nextra:x:4242:tester\n",
        )
        .unwrap();
        let labels: BTreeMap<String, String> = [("fleet".into(), "vans".into())].into();
        let server = SshServer::with_accounts(
            SshConfig {
                host_key,
                host_cert,
                user_cas: vec![user_ca.ssh_public().clone()],
                device_id: device.to_string(),
                labels,
                host_cas: Vec::new(),
            },
            AccountFiles {
                passwd: dir.join("passwd"),
                group: dir.join("group"),
            },
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let srv = server.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((tcp, addr)) = listener.accept().await {
                n += 1;
                let srv = srv.clone();
                let header = StreamHeader {
                    service: Service::Ssh,
                    user: None,
                    session_id: format!("s{n}"),
                    client_addr: addr.to_string(),
                    kube_groups: vec![],
                    kube_users: vec![],
                    ticket: None,
                    via: None,
                };
                tokio::spawn(async move { srv.serve(Box::new(tcp), header).await });
            }
        });
        std::fs::write(
            dir.join("known_hosts"),
            format!("@cert-authority * {}\n", host_ca.public_openssh()),
        )
        .unwrap();
        Self {
            dir,
            user_ca,
            host_ca,
            server,
            port,
        }
    }

    /// Writes a key and a certificate made to `spec` by `ca` (the fixture's user CA if
    /// None); returns the key path.
    fn user(&self, name: &str, spec: UserCert<'_>, ca: Option<&KeyPair>) -> PathBuf {
        let key = KeyPair::generate().unwrap();
        let mut exts = vec![(EXT_ROLES, serde_json::to_string(&spec.roles).unwrap())];
        if spec.pty {
            exts.push((EXT_PERMIT_PTY, String::new()));
        }
        if spec.forwarding {
            exts.push((EXT_PERMIT_PORT_FORWARDING, String::new()));
        }
        let cert = sign(
            ca.unwrap_or(&self.user_ca),
            &key,
            CertType::User,
            "alice",
            spec.principals,
            spec.after,
            spec.before,
            &exts,
        );
        let path = self.dir.join(name);
        edgeport_proto::util::write_private(&path, key.to_openssh().unwrap().as_bytes()).unwrap();
        std::fs::write(
            self.dir.join(format!("{name}-cert.pub")),
            cert.to_openssh().unwrap(),
        )
        .unwrap();
        path
    }

    fn ssh_args(&self, key: &Path, alias: &str) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-i",
            &key.display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            &format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("HostKeyAlias={alias}"),
            "-p",
            &self.port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `ssh [opts] LOGIN@dev1 command`; options are the leading items starting with '-'
    /// (and the value after `-o`).
    async fn ssh(&self, key: &Path, login: &str, extra: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut args = self.ssh_args(key, "dev1");
        let mut i = 0;
        while i < extra.len() && extra[i].starts_with('-') {
            args.push(extra[i].to_string());
            if extra[i] == "-o" {
                i += 1;
                args.push(extra[i].to_string());
            }
            i += 1;
        }
        args.push(format!("{login}@127.0.0.1"));
        args.extend(extra[i..].iter().map(|s| s.to_string()));
        run("ssh", &args, stdin).await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn run(prog: &str, args: &[String], stdin: Option<&[u8]>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("command timed out")
        .unwrap()
}

/// What a russh client sees when it logs in with `key`'s certificate: whether it got in,
/// and the reason the agent sent in its disconnect message, if any.
async fn russh_login(port: u16, key_path: &Path, login: &str) -> (bool, Option<String>) {
    use std::sync::{Arc, Mutex};
    struct H(Arc<Mutex<Option<String>>>);
    impl russh::client::Handler for H {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            _: &russh::keys::PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }
        async fn disconnected(
            &mut self,
            reason: russh::client::DisconnectReason<Self::Error>,
        ) -> Result<(), Self::Error> {
            if let russh::client::DisconnectReason::ReceivedDisconnect(i) = reason {
                *self.0.lock().unwrap() = Some(i.message);
            }
            Ok(())
        }
    }
    let key = KeyPair::from_openssh(&std::fs::read_to_string(key_path).unwrap()).unwrap();
    let cert_path = PathBuf::from(format!("{}-cert.pub", key_path.display()));
    let cert =
        Certificate::from_openssh(std::fs::read_to_string(cert_path).unwrap().trim()).unwrap();
    let note = Arc::new(Mutex::new(None));
    let mut h = russh::client::connect(
        Arc::new(russh::client::Config::default()),
        ("127.0.0.1", port),
        H(note.clone()),
    )
    .await
    .unwrap();
    let ok = h
        .authenticate_openssh_cert(login, Arc::new(key.ssh_private().clone()), cert)
        .await
        .map(|r| r.success())
        .unwrap_or(false);
    if !ok {
        for _ in 0..100 {
            if note.lock().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let msg = note.lock().unwrap().clone();
    (ok, msg)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn have_openssh() -> bool {
    std::process::Command::new("ssh").arg("-V").output().is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_status_stdin_env_and_user_switch() {
    if !have_openssh() {
        eprintln!("skipped: no OpenSSH client");
        return;
    }
    let f = Fixture::start("exec", "dev1", &["dev1", "dev1.edge"]).await;
    let key = f.user("u", UserCert::default(), None);

    let out = f.ssh(&key, "root", &["echo", "hi"], None).await;
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    let out = f.ssh(&key, "root", &["exit 7"], None).await;
    assert_eq!(out.status.code(), Some(7));

    let out = f.ssh(&key, "root", &["echo err >&2; echo out"], None).await;
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // stdin is forwarded and its EOF reaches the program.
    let out = f
        .ssh(
            &key,
            "root",
            &["cat; echo done"],
            Some(b"line one\nline two\n"),
        )
        .await;
    assert_eq!(text(&out.stdout), "line one\nline two\ndone\n");

    // LC_* is accepted, PATH-like variables are not; the agent's own variables are set.
    let out = f
        .ssh(
            &key,
            "root",
            &[
                "-o",
                "SetEnv=LC_EDGE=yes LD_PRELOAD=/x",
                "echo $LC_EDGE/${LD_PRELOAD:-none}/$EDGEPORT_USER/$USER",
            ],
            None,
        )
        .await;
    assert_eq!(
        text(&out.stdout),
        "yes/none/alice/root\n",
        "{}",
        text(&out.stderr)
    );

    // The unprivileged login runs with its own uid, gid and groups, in its home.
    let out = f
        .ssh(&key, "tester", &["id -u; id -g; id -G; pwd"], None)
        .await;
    let expected = format!("65534\n65534\n65534 4242\n{}\n", f.dir.display());
    assert_eq!(text(&out.stdout), expected, "{}", text(&out.stderr));

    // A program killed by a signal is reported as such (OpenSSH exits 255 then).
    let out = f.ssh(&key, "root", &["kill -TERM $$"], None).await;
    assert_ne!(out.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_explained() {
    if !have_openssh() {
        return;
    }
    let f = Fixture::start("refuse", "dev1", &["dev1"]).await;
    let now = now_secs();
    // Every refusal: OpenSSH is denied; a russh client (tsh) also learns why when the
    // certificate is this cluster's.
    let denied = |out: &Output| {
        assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out.stderr)
        );
    };

    let key = f.user("principal", UserCert::default(), None);
    denied(&f.ssh(&key, "pi", &["true"], None).await);
    let (ok, why) = russh_login(f.port, &key, "pi").await;
    assert!(!ok);
    assert!(why
        .unwrap()
        .contains("does not allow login \"pi\" (principals: root,tester)"));

    let mut roles = RolesExtension::default();
    roles
        .allow
        .push([("fleet".to_string(), vec!["trucks".to_string()])].into());
    let key = f.user(
        "labels",
        UserCert {
            roles,
            ..Default::default()
        },
        None,
    );
    denied(&f.ssh(&key, "root", &["true"], None).await);
    let (ok, why) = russh_login(f.port, &key, "root").await;
    assert!(!ok);
    assert!(why.unwrap().contains("roles do not allow this device"));

    // No local account of that name.
    let key = f.user(
        "ghost",
        UserCert {
            principals: &["ghost"],
            ..Default::default()
        },
        None,
    );
    let (ok, why) = russh_login(f.port, &key, "ghost").await;
    assert!(!ok);
    assert!(why.unwrap().contains("no local user \"ghost\""));

    let key = f.user(
        "expired",
        UserCert {
            after: now - 7200,
            before: now - 3600,
            ..Default::default()
        },
        None,
    );
    denied(&f.ssh(&key, "root", &["true"], None).await);
    assert!(!russh_login(f.port, &key, "root").await.0);

    let other = KeyPair::generate().unwrap();
    let key = f.user("foreign", UserCert::default(), Some(&other));
    denied(&f.ssh(&key, "root", &["true"], None).await);
    // Another cluster's certificate may be one of several the client holds: refused
    // without ending the connection.
    assert_eq!(russh_login(f.port, &key, "root").await, (false, None));

    // A plain key (the certificate file removed) gets the usual denial.
    let key = f.user("plain", UserCert::default(), None);
    std::fs::remove_file(f.dir.join("plain-cert.pub")).unwrap();
    denied(&f.ssh(&key, "root", &["true"], None).await);

    // No pty without permit-pty.
    let key = f.user(
        "nopty",
        UserCert {
            pty: false,
            ..Default::default()
        },
        None,
    );
    let out = f.ssh(&key, "root", &["-tt", "tty"], None).await;
    assert!(
        text(&out.stderr).contains("PTY allocation request failed"),
        "{}",
        text(&out.stderr)
    );
    // (OpenSSH hangs up as soon as its forced-tty stdin is at EOF, so the output is not
    // checked here; the pty path is covered end to end with tmux.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_certificate_must_name_the_device() {
    if !have_openssh() {
        return;
    }
    // This agent's certificate names dev2: a client asking for dev1 must not accept it.
    let f = Fixture::start("impersonate", "dev2", &["dev2"]).await;
    let key = f.user("u", UserCert::default(), None);
    let out = f.ssh(&key, "root", &["true"], None).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out.stderr)
    );
    // ... and a client that trusts another host CA refuses even the right name.
    let mut args = f.ssh_args(&key, "dev2");
    std::fs::write(
        f.dir.join("known_hosts"),
        format!(
            "@cert-authority * {}\n",
            KeyPair::generate().unwrap().public_openssh()
        ),
    )
    .unwrap();
    args.push("root@127.0.0.1".into());
    args.push("true".into());
    let out = run("ssh", &args, None).await;
    assert_eq!(out.status.code(), Some(255));
    let _ = &f.host_ca;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_forwarding_and_locks() {
    if !have_openssh() {
        return;
    }
    let f = Fixture::start("sftp", "dev1", &["dev1"]).await;
    let key = f.user("u", UserCert::default(), None);

    // sftp: upload then download a file through the system's sftp-server.
    if process::find_sftp_server().is_some() {
        let src = f.dir.join("src.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let up = f.dir.join("up.bin");
        let back = f.dir.join("back.bin");
        let batch = f.dir.join("batch");
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
        let mut args = f.ssh_args(&key, "dev1");
        args.retain(|a| a != "-p");
        let port_pos = args.iter().position(|a| a == &f.port.to_string()).unwrap();
        args.remove(port_pos);
        args.extend([
            "-P".into(),
            f.port.to_string(),
            "-b".into(),
            batch.display().to_string(),
            "root@127.0.0.1".into(),
        ]);
        let out = run("sftp", &args, None).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(std::fs::read(&back).unwrap(), data);
    }

    // -L: a forwarded connection reaches a listener on the device side.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lport = local.local_addr().unwrap().port();
    drop(local);
    let fwd = format!("{lport}:127.0.0.1:{echo_port}");
    let try_forward = |key: PathBuf| {
        let mut args = f.ssh_args(&key, "dev1");
        args.extend([
            "-L".into(),
            fwd.clone(),
            "-o".into(),
            "ExitOnForwardFailure=yes".into(),
            "root@127.0.0.1".into(),
            "sleep 5".into(),
        ]);
        async move {
            let mut child = tokio::process::Command::new("ssh")
                .args(&args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut got = Vec::new();
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", lport)).await {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let _ = s.write_all(b"ping").await;
                    let mut buf = [0u8; 4];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await
                    {
                        got = buf[..n].to_vec();
                    }
                    break;
                }
            }
            let _ = child.kill().await;
            let out = child.wait_with_output().await.unwrap();
            (got, text(&out.stderr))
        }
    };
    let (got, _) = try_forward(key.clone()).await;
    assert_eq!(got, b"ping");
    let nofwd = f.user(
        "nofwd",
        UserCert {
            forwarding: false,
            ..Default::default()
        },
        None,
    );
    let (got, stderr) = try_forward(nofwd).await;
    assert!(got.is_empty());
    assert!(stderr.contains("administratively prohibited"), "{stderr}");

    // A lock ends the live session (and its processes) and refuses the next login.
    let mut args = f.ssh_args(&key, "dev1");
    args.extend(["root@127.0.0.1".into(), "sleep 300".into()]);
    let child = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until the session is live.
    for _ in 0..100 {
        if f.server.inner.live.lock().unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.server.set_locked_users(vec!["alice".into()]);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("locked session did not end")
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("is locked"),
        "{}",
        text(&out.stderr)
    );
    let (ok, why) = russh_login(f.port, &key, "root").await;
    assert!(!ok);
    assert!(why.unwrap().contains("is locked"));
    f.server.set_locked_users(vec![]);
    let out = f.ssh(&key, "root", &["true"], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Not a test: serves a fixture for manual experiments and benchmarks
/// (`EDGEPORT_DEV_SERVE=SECS cargo test -p edge-agent --lib dev_serve -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn dev_serve() {
    let secs: u64 = std::env::var("EDGEPORT_DEV_SERVE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let f = Fixture::start("dev", "dev1", &["dev1"]).await;
    let key = f.user("u", UserCert::default(), None);
    println!("ssh {} root@127.0.0.1", f.ssh_args(&key, "dev1").join(" "));
    tokio::time::sleep(Duration::from_secs(secs)).await;
}
