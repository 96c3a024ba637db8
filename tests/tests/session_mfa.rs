//! Per-session second factor (issue 29), end to end with real processes: a role with
//! `--require-session-mfa` makes every session to its devices need a fresh one-time code
//! (computed by Debian's `oathtool`, an independent implementation). `tsh ssh` with the
//! code works, without one or with a wrong one it is refused; the login's plain certificate
//! is refused by the device; a session certificate for one device is refused by another;
//! stock OpenSSH through `tsh proxy ssh` works with the code; issuance is audited.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeport_e2e::rogue::StolenGateway;
use edgeport_e2e::ssh::{ssh, Cluster, SshAgent, Tsh};
use edgeport_e2e::{bin, run, wait_until, Run};
use edgeport_net::rpc_client::RpcClientError;
use edgeport_proto::keys::{first_cert_der, KeyPair};
use edgeport_proto::rpc::{
    sign_user_action, AccessAction, Request, Response, SessionMfaAsk, SignedUserAction, UserAction,
};

const PW: &str = "correct horse battery staple";
const STEP: u64 = 30;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn oathtool(secret: &str, at: u64) -> String {
    let mut c = Command::new("oathtool");
    c.args(["--totp", "-b", secret, "--now"])
        .arg(format!("@{at}"));
    run(c, None, Duration::from_secs(10))
        .expect_ok("oathtool")
        .stdout()
        .trim()
        .to_string()
}

/// The authenticator app: each code works once, so every code is for a later time step than
/// the last one used (the authority takes the steps next to its own: waits for one if needed).
struct App {
    secret: String,
    last_step: u64,
}

impl App {
    fn code(&mut self) -> String {
        loop {
            let t = now() / STEP;
            let step = (self.last_step + 1).max(t);
            if step <= t + 1 {
                self.last_step = step;
                return oathtool(&self.secret, step * STEP);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// First login of `user`, who must enroll: returns the app.
fn enroll(tsh: &Tsh, user: &str, pin: &str) -> App {
    let mut cmd = tsh.cmd(&[
        "login",
        "--proxy",
        &tsh.proxy,
        "--user",
        user,
        "--password-stdin",
        "--ca-pin",
        pin,
    ]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{PW}").unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let (mut key, mut next_is_key, mut seen) = (String::new(), false, String::new());
    for line in lines.by_ref() {
        seen.push_str(&line);
        seen.push('\n');
        if next_is_key && !line.trim().is_empty() {
            key = line.trim().to_string();
            break;
        }
        if line.contains("Add this key to it") {
            next_is_key = true;
        }
    }
    assert!(!key.is_empty(), "tsh showed no key: {seen}");
    let at = now();
    writeln!(stdin, "{}", oathtool(&key, at)).unwrap();
    drop(stdin);
    let _rest: Vec<String> = lines.collect();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "enrolling login failed: {seen}");
    App {
        secret: key,
        last_step: at / STEP,
    }
}

/// An ssh_config sending OpenSSH through `tsh proxy ssh` with no identity file: keys come
/// from the ssh-agent only (or from `-i` on the command line).
fn proxy_config(tsh: &Tsh, path: &Path) {
    let text = format!(
        "Host med1 med2 van1\n    UserKnownHostsFile \"{}\"\n    StrictHostKeyChecking yes\n    \
         ProxyCommand env TSH_HOME=\"{}\" \"{}\" --proxy {} proxy ssh %r@%h:%p\n",
        tsh.key_dir().join("known_hosts").display(),
        tsh.home.display(),
        bin("tsh").display(),
        tsh.proxy
    );
    std::fs::write(path, text).unwrap();
}

fn assert_refused(r: &Run, expect: &str) {
    let err = r.stderr();
    assert!(!r.ok(), "should be refused: {}\n{err}", r.stdout());
    assert!(err.contains(expect), "expected {expect:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn session_mfa_certificates_open_one_device_for_one_session() {
    let c = Cluster::start(
        "mfa",
        &[
            ("med1", "fleet=medical"),
            ("med2", "fleet=medical"),
            ("van1", "fleet=vans"),
        ],
    );
    c.tctl.ok(&[
        "roles",
        "add",
        "medical",
        "--allow",
        "fleet=medical",
        "--require-session-mfa",
    ]);
    c.tctl
        .ok(&["roles", "add", "vans", "--allow", "fleet=vans"]);
    let roles = c.tctl.ok(&["roles", "ls", "--format", "json"]).json();
    let medical = roles
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "medical")
        .unwrap();
    assert_eq!(medical["require_session_mfa"], true, "{roles:#}");
    c.auth
        .add_user_with(
            "dana",
            PW,
            &[
                "--logins",
                "root",
                "--roles",
                "medical,vans",
                "--require-totp",
            ],
        )
        .expect_ok("users add");
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    let mut app = enroll(&tsh, "dana", &c.gw.ca_pin);

    // A device no MFA role reaches takes the login's certificate as before.
    tsh.run(&["ssh", "root@van1", "echo", "van-ok"], None)
        .expect_ok("plain session to the van");

    // kubectl cannot give a code: the authority refuses a Kubernetes dial to med1, with
    // the login's certificate (here as a gateway relays it), whatever the gateway.
    let dana_der =
        first_cert_der(&std::fs::read_to_string(tsh.key_dir().join("dana-x509.pem")).unwrap())
            .unwrap();
    let kube_dial = |device: &str| {
        StolenGateway::from_data_dir(&c.gw.data_dir).ask(
            &c.tctl.addr,
            Request::AuthorizeDial {
                user_cert_der: dana_der.clone(),
                device: device.into(),
                service: edgeport_proto::tunnel::Service::Kube,
            },
        )
    };
    match kube_dial("med1") {
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
            assert_eq!(e.kind, edgeport_proto::rpc::ErrorKind::SecondFactorRequired);
            assert!(
                e.message.contains("kubectl cannot give one"),
                "{}",
                e.message
            );
        }
        other => panic!("a Kubernetes dial to an MFA device was answered: {other:?}"),
    }
    assert!(
        matches!(kube_dial("van1"), Ok(Response::DialAllowed(_))),
        "a Kubernetes dial to a device without MFA was refused"
    );

    // Without a code (and no terminal to ask on), or with a wrong one: refused.
    let r = tsh.run(&["ssh", "root@med1", "echo", "no"], None);
    assert_refused(&r, "requires a per-session second factor");
    let wrong = oathtool(&app.secret, now() + 3600);
    let r = tsh.run(
        &["ssh", "--mfa-code", &wrong, "root@med1", "echo", "no"],
        None,
    );
    assert_refused(&r, "wrong or already used one-time code");

    // With a fresh code: the session runs; the same code again is refused.
    let code = app.code();
    let r = tsh
        .run(
            &["ssh", "--mfa-code", &code, "root@med1", "echo", "mfa-ok"],
            None,
        )
        .expect_ok("tsh ssh with the code");
    assert_eq!(r.stdout(), "mfa-ok\n");
    let mut again = tsh.cmd(&["ssh", "root@med1", "echo", "no"]);
    again.env("TSH_MFA_CODE", &code);
    assert_refused(
        &run(again, None, Duration::from_secs(120)),
        "wrong or already used one-time code",
    );

    // The login's plain certificate, offered by stock ssh right after (the authority has
    // just seen a second factor for med1): the device itself refuses it.
    let empty_home = c.dir.join("empty-home");
    std::fs::create_dir_all(&empty_home).unwrap();
    let cfg = c.dir.join("proxy_config");
    proxy_config(&tsh, &cfg);
    let key = tsh.key_dir().join("dana");
    let plain_cert = tsh.key_dir().join("dana-cert.pub");
    let with_files = |cert: &Path, key: &Path, host: &str| {
        let mut cmd = ssh(
            &cfg,
            &[
                "-i",
                &key.display().to_string(),
                "-o",
                &format!("CertificateFile={}", cert.display()),
                "-o",
                "IdentitiesOnly=yes",
                &format!("root@{host}"),
                "echo",
                "no",
            ],
        );
        cmd.env("HOME", &empty_home).env_remove("SSH_AUTH_SOCK");
        run(cmd, None, Duration::from_secs(60))
    };
    let r = with_files(&plain_cert, &key, "med1");
    assert!(!r.ok(), "the plain certificate opened med1: {}", r.stdout());
    let agent_log = |id: &str| c.agent(id).proc.log_text();
    assert!(
        wait_until(Duration::from_secs(10), || agent_log("med1")
            .contains("this device requires a per-session second factor")),
        "med1 did not say why: {}",
        agent_log("med1")
    );

    // A session certificate for med1, as tsh would get it (made here to present it to med2).
    let stolen = StolenGateway::from_data_dir(&c.gw.data_dir);
    let cert_der =
        first_cert_der(&std::fs::read_to_string(tsh.key_dir().join("dana-x509.pem")).unwrap())
            .unwrap();
    let user_key = KeyPair::from_openssh(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let session_key = KeyPair::generate().unwrap();
    let action = UserAction {
        cluster: "mfa".into(),
        issued_at: edgeport_net::clock::now_secs(),
        nonce: "5e".repeat(16),
        action: AccessAction::SessionMfa(SessionMfaAsk {
            device: "med1".into(),
            otp: app.code(),
            ssh_public_key: session_key.public_openssh(),
        }),
    };
    let (body, signature) = sign_user_action(&action, &user_key).unwrap();
    let got = match stolen.ask(
        &c.tctl.addr,
        Request::SessionMfaCert(SignedUserAction {
            user_cert_der: cert_der.clone(),
            body: body.clone(),
            signature: signature.clone(),
        }),
    ) {
        Ok(Response::SessionMfaCert(got)) => got,
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => panic!("{}", e.message),
        other => panic!("unexpected answer: {other:?}"),
    };
    // A gateway that kept the signed request cannot replay it for a second certificate.
    match stolen.ask(
        &c.tctl.addr,
        Request::SessionMfaCert(SignedUserAction {
            user_cert_der: cert_der,
            body,
            signature,
        }),
    ) {
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
            assert!(!e.message.is_empty());
            assert!(!e.message.contains('\n'), "{}", e.message);
        }
        other => panic!("a replayed session MFA request was answered: {other:?}"),
    }
    assert_eq!(got.device, "med1");
    assert!(got.valid_before <= now() + 61, "{}", got.valid_before);
    let mfa_key = c.dir.join("med1-session");
    let mfa_cert = c.dir.join("med1-session-cert.pub");
    std::fs::write(&mfa_key, session_key.to_openssh().unwrap()).unwrap();
    std::fs::set_permissions(
        &mfa_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(&mfa_cert, format!("{}\n", got.ssh_cert)).unwrap();

    // Stock OpenSSH through `tsh proxy ssh` with the code: the session certificate goes to
    // the ssh-agent for its minute, and ssh takes it from there.
    let agent = SshAgent::start(c.dir.path());
    let mut cmd = ssh(&cfg, &["root@med2", "echo", "stock-mfa-ok"]);
    cmd.env("HOME", &empty_home)
        .env("SSH_AUTH_SOCK", &agent.sock)
        .env("TSH_MFA_CODE", app.code());
    let r = run(cmd, None, Duration::from_secs(60));
    assert_eq!(r.stdout(), "stock-mfa-ok\n", "{}", r.stderr());
    assert!(agent.list().stdout().contains("ED25519-CERT"));

    // med2 may be dialled now (the authority just saw a second factor for it), but the
    // certificate for med1 does not open it.
    let r = with_files(&mfa_cert, &mfa_key, "med2");
    assert!(
        !r.ok(),
        "med1's session certificate opened med2: {}",
        r.stdout()
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent_log("med2").contains(
            "this per-session second factor certificate is for device \"med1\""
        )),
        "med2 did not say why: {}",
        agent_log("med2")
    );
    // ... while it opens med1.
    let mut cmd = ssh(
        &cfg,
        &[
            "-i",
            &mfa_key.display().to_string(),
            "-o",
            &format!("CertificateFile={}", mfa_cert.display()),
            "-o",
            "IdentitiesOnly=yes",
            "root@med1",
            "echo",
            "med1-ok",
        ],
    );
    cmd.env("HOME", &empty_home).env_remove("SSH_AUTH_SOCK");
    let r = run(cmd, None, Duration::from_secs(60));
    assert_eq!(r.stdout(), "med1-ok\n", "{}", r.stderr());

    // Audited: each issuance, and the refusals.
    let issued = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "session_mfa.issued",
            "--format",
            "json",
        ])
        .json();
    let issued = issued.as_array().cloned().unwrap_or_default();
    assert_eq!(issued.len(), 3, "{issued:#?}");
    assert!(issued.iter().all(|e| e["user"] == "dana"), "{issued:#?}");
    let refused = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "session_mfa.refused",
            "--format",
            "json",
        ])
        .json();
    assert!(
        refused.as_array().is_some_and(|a| a.len() >= 2),
        "{refused:#?}"
    );
}

/// A relay-mode target's own sshd knows nothing of the second factor: the authority holds the
/// line. A role that needs one for the target's labels gets the dial refused without a code,
/// and `tsh ssh DEVICE/TARGET` with a fresh code runs (the certificate names the device, and
/// the target's sshd takes it like any certificate from the user CA).
#[test]
fn a_target_behind_a_device_needs_the_second_factor_too() {
    let c = Cluster::start("mfa-target", &[]);
    let (_sshd, addr, _) = edgeport_e2e::ssh::target_sshd(&c, "van/ecu1");
    let line = format!("ecu1={addr} zone=engine");
    let _agent = edgeport_e2e::fabric::Agent::start(
        &c.dir.join("agent-van"),
        &c.gw,
        "van",
        "fleet=vans",
        &["--target", &line],
    );
    let reported = wait_until(Duration::from_secs(90), || {
        let ls = c.tctl.ok(&["devices", "ls", "--format", "json"]).json();
        ls.as_array().is_some_and(|a| {
            a.iter().any(|d| {
                d["id"] == "van"
                    && d["online"] == true
                    && d["targets"]
                        .as_array()
                        .is_some_and(|t| t.iter().any(|t| t["status"] == "reachable"))
            })
        })
    });
    assert!(reported, "van/ecu1 was never reported reachable");
    c.tctl.ok(&[
        "roles",
        "add",
        "engine",
        "--allow",
        "zone=engine",
        "--require-session-mfa",
    ]);
    c.auth
        .add_user_with(
            "erin",
            PW,
            &["--logins", "root", "--roles", "engine", "--require-totp"],
        )
        .expect_ok("users add erin");
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    let mut app = enroll(&tsh, "erin", &c.gw.ca_pin);

    let r = tsh.run(&["ssh", "root@van/ecu1", "echo", "no"], None);
    assert_refused(&r, "requires a per-session second factor");
    assert!(!r.stdout().contains("no"), "{}", r.stdout());

    let code = app.code();
    let r = tsh
        .run(
            &[
                "ssh",
                "--mfa-code",
                &code,
                "root@van/ecu1",
                "echo",
                "target-mfa-ok",
            ],
            None,
        )
        .expect_ok("tsh ssh to the target with the code");
    assert_eq!(r.stdout(), "target-mfa-ok\n");
    let issued = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "session_mfa.issued",
            "--format",
            "json",
        ])
        .json();
    assert!(
        issued.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["user"] == "erin" && e["device"] == "van" && e["target"] == "ecu1")),
        "{issued:#?}"
    );
}
