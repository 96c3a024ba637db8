//! The foundation: the authority as a real process, tctl over mutual TLS, certificates that
//! stock OpenSSH accepts (user CA in sshd, host CA in known_hosts), join tokens, restarts that
//! keep state, and bad input that closes one connection without hurting the others.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use edgeport_e2e::peers::Peer;
use edgeport_e2e::{run, Authority, Run, TempDir};
use edgeport_net::rpc_client::{RpcClient, RpcClientError};
use edgeport_proto::identity::{IdentityFile, Principal};
use edgeport_proto::keys::{first_cert_der, random_bytes, KeyPair};
use edgeport_proto::rpc::{
    DevicePresence, ErrorKind, GatewayCerts, JoinDeviceRequest, JoinGatewayRequest, PresenceReport,
    Request, Response, Transport,
};
use edgeport_proto::tls::{client_config, pinned_client_config, CertKey};
use edgeport_proto::{alpn, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Starts an authority whose data dir lives in `tmp`.
fn authority(tmp: &TempDir, name: &str) -> Authority {
    Authority::start(&tmp.join(name), name)
}

/// Asserts that a failed command printed one clear `error:` line and nothing alarming.
fn assert_clear_error(r: &Run, expect: &str) {
    assert_eq!(
        r.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        r.stdout(),
        r.stderr()
    );
    let err = r.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `tctl auth sign --format openssh` into `dir/NAME`; returns the key path.
fn sign_openssh(auth: &Authority, dir: &Path, name: &str, user: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let out_s = out.to_str().unwrap();
    let mut args = vec![
        "auth", "sign", "--user", user, "--format", "openssh", "--out", out_s,
    ];
    args.extend_from_slice(extra);
    auth.tctl_ok(&args);
    out
}

fn cert_of(key: &Path) -> PathBuf {
    PathBuf::from(format!("{}-cert.pub", key.display()))
}

/// The OpenSSH client, isolated from any user configuration and agent.
fn ssh(key: &Path, port: &str, known_hosts: Option<&Path>, login: &str, cmd: &str) -> Run {
    let mut c = Command::new("ssh");
    c.env_remove("SSH_AUTH_SOCK")
        .args(["-F", "/dev/null", "-i"])
        .arg(key)
        .arg("-o")
        .arg(format!("CertificateFile={}", cert_of(key).display()))
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "ConnectTimeout=10",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]);
    match known_hosts {
        Some(kh) => {
            c.arg("-o")
                .arg(format!("UserKnownHostsFile={}", kh.display()))
                .args(["-o", "StrictHostKeyChecking=yes"]);
        }
        None => {
            c.args(["-o", "UserKnownHostsFile=/dev/null"])
                .args(["-o", "StrictHostKeyChecking=no"]);
        }
    }
    c.args(["-p", port, &format!("{login}@127.0.0.1"), cmd]);
    run(c, None, Duration::from_secs(30))
}

fn ssh_keygen(args: &[&str]) -> Run {
    let mut c = Command::new("ssh-keygen");
    c.args(args);
    run(c, None, Duration::from_secs(30)).expect_ok(&format!("ssh-keygen {}", args.join(" ")))
}

/// "algo base64" of an OpenSSH public key line, without comment or marker.
fn key_part(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.starts_with("ssh-"))
        .unwrap_or_else(|| panic!("no key in {line:?}"));
    format!("{} {}", words[i], words[i + 1])
}

/// The host CA's private key, found among the files the authority keeps under `DATA/ca/`
/// (whatever their names) as the OpenSSH key whose public half is the exported host CA.
/// Only this test reads it: it proves that the `@cert-authority` line tctl exports is the
/// key devices' host certificates are signed with.
fn host_ca_private_key(data_dir: &Path, host_ca_line: &str, out: &Path) {
    let want = key_part(host_ca_line);
    let mut stack = vec![data_dir.join("ca")];
    let mut seen = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            seen.push(p.display().to_string());
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            if let Ok(k) = KeyPair::from_openssh(&text) {
                if key_part(&k.public_openssh()) == want {
                    edgeport_proto::util::write_private(out, k.to_openssh().unwrap().as_bytes())
                        .unwrap();
                    return;
                }
            }
        }
    }
    panic!("no OpenSSH private key for the host CA {want} among {seen:?}");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The mutual-TLS client config of an identity file (what tctl builds).
fn identity_tls(ident: &IdentityFile) -> Arc<rustls::ClientConfig> {
    let key = KeyPair::from_openssh(&ident.ssh_private_key).unwrap();
    let me = CertKey::from_pem(&ident.x509_cert_pem, None, key.pkcs8_der()).unwrap();
    let ca = first_cert_der(&ident.cas.x509_ca_pem).unwrap();
    Arc::new(client_config(&ca, Some(&me), &[alpn::RPC]).unwrap())
}

/// A gateway's first contact: no client certificate, the CA checked by its pin only.
async fn redeem_gateway_token(
    addr: &str,
    pin: &str,
    token: &str,
    key: &KeyPair,
) -> Result<GatewayCerts, RpcClientError> {
    edgeport_proto::tls::install_crypto_provider();
    let cfg = Arc::new(pinned_client_config(pin, None, &[alpn::RPC]).unwrap());
    let mut c = RpcClient::connect(addr, cfg).await?;
    join_gateway(&mut c, token, key).await
}

async fn join_gateway(
    c: &mut RpcClient,
    token: &str,
    key: &KeyPair,
) -> Result<GatewayCerts, RpcClientError> {
    let req = JoinGatewayRequest {
        token: token.to_string(),
        gateway_id: None,
        public_key_spki_der: key.spki_der(),
        dns_names: vec!["localhost".into()],
        ip_addrs: vec!["127.0.0.1".into()],
    };
    match c.call(Request::JoinGateway(req)).await? {
        Response::GatewayCerts(g) => Ok(g),
        other => panic!("JoinGateway answered {other:?}"),
    }
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, RpcClientError>, what: &str) {
    match r {
        Err(RpcClientError::Remote(e)) => assert!(
            matches!(
                e.kind,
                ErrorKind::BadCredentials
                    | ErrorKind::Expired
                    | ErrorKind::NotFound
                    | ErrorKind::Denied
            ),
            "{what}: refused with an unexpected kind: {e:?}"
        ),
        other => panic!("{what}: expected a refusal from the authority, got {other:?}"),
    }
}

fn token_add(auth: &Authority, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["tokens", "add", "--format", "json"];
    a.extend_from_slice(args);
    let v = auth.tctl_ok(&a).json();
    for k in ["token", "ca_pin", "expires", "type", "labels", "id"] {
        assert!(v.get(k).is_some(), "tokens add json lacks {k}: {v}");
    }
    v
}

// ---------------------------------------------------------------------------------------
// tctl over mutual TLS, and identities that must be refused
// ---------------------------------------------------------------------------------------

#[test]
fn tctl_over_mtls_and_foreign_identities() {
    let tmp = TempDir::new();
    let alpha = authority(&tmp, "alpha");
    let beta = authority(&tmp, "beta");
    assert_eq!(
        mode(&alpha.identity()),
        0o600,
        "admin identity must be private"
    );

    // Users over mTLS: one with a password from stdin, one with an invite code.
    let mut c = alpha.tctl_cmd();
    c.args([
        "users",
        "add",
        "alice",
        "--logins",
        "root,pi",
        "--password-stdin",
    ]);
    run(
        c,
        Some(b"correct horse battery staple\n"),
        Duration::from_secs(30),
    )
    .expect_ok("users add alice");
    let bob = alpha.tctl_ok(&[
        "users",
        "add",
        "bob",
        "--logins",
        "pi",
        "--kube-groups",
        "devs",
    ]);
    assert!(bob.stdout().contains("--invite"), "{}", bob.stdout());
    let dup = alpha.tctl(&["users", "add", "bob", "--logins", "pi"]);
    assert_clear_error(&dup, "already exists");

    let users = alpha.tctl_ok(&["users", "ls", "--format", "json"]).json();
    let by_name: BTreeMap<String, serde_json::Value> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["name"].as_str().unwrap().to_string(), u.clone()))
        .collect();
    assert_eq!(
        by_name["alice"]["logins"],
        serde_json::json!(["root", "pi"])
    );
    assert_eq!(by_name["alice"]["has_password"], true);
    assert_eq!(by_name["bob"]["has_password"], false);
    assert_eq!(by_name["bob"]["kube_groups"], serde_json::json!(["devs"]));
    let text = alpha.tctl_ok(&["users", "ls"]).stdout();
    assert!(
        text.lines()
            .any(|l| l.starts_with("alice ") && l.contains("root,pi")),
        "{text}"
    );

    alpha.tctl_ok(&["users", "rm", "bob"]);
    let text = alpha.tctl_ok(&["users", "ls"]).stdout();
    assert!(!text.lines().any(|l| l.starts_with("bob ")), "{text}");
    assert_clear_error(&alpha.tctl(&["users", "rm", "bob"]), "not found");

    // Beta's identity against alpha: the client cannot verify alpha's certificate.
    let mut c = alpha.tctl_cmd();
    c.env("EDGEPORT_IDENTITY", beta.identity())
        .args(["users", "ls"]);
    let r = run(c, None, Duration::from_secs(30));
    assert_clear_error(
        &r,
        "cannot verify the authority's certificate with this identity's CA",
    );

    // Alpha's CA but beta's certificate and key: alpha itself refuses the client certificate.
    let a_ident = IdentityFile::load(&alpha.identity()).unwrap();
    let mut mixed = IdentityFile::load(&beta.identity()).unwrap();
    mixed.cas = a_ident.cas.clone();
    let mixed_path = tmp.join("mixed.identity");
    mixed.save(&mixed_path).unwrap();
    let r = alpha.tctl(&["--identity", mixed_path.to_str().unwrap(), "users", "ls"]);
    assert_clear_error(&r, "refused this identity");

    // No identity at all.
    let mut c = Command::new(edgeport_e2e::bin("tctl"));
    c.env_remove("EDGEPORT_IDENTITY")
        .env("EDGEPORT_AUTH", &alpha.addr)
        .args(["users", "ls"]);
    let r = run(c, None, Duration::from_secs(30));
    assert_clear_error(&r, "no identity: pass --identity or set EDGEPORT_IDENTITY");

    // A user's identity from the right cluster is not an administrator's.
    let user_ident = tmp.join("alice.identity");
    let out = alpha.tctl_ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--ttl",
        "10m",
        "--out",
        user_ident.to_str().unwrap(),
    ]);
    assert!(out.stdout().contains("valid until"), "{}", out.stdout());
    let ident = IdentityFile::load(&user_ident).unwrap();
    assert_eq!(ident.principal, Principal::User("alice".into()));
    assert_eq!(ident.cas, a_ident.cas);
    assert!(ident
        .ssh_cert
        .as_deref()
        .unwrap()
        .starts_with("ssh-ed25519-cert-v01@openssh.com "));
    assert_eq!(ident.auth_addr.as_deref(), Some(alpha.addr.as_str()));
    assert_eq!(mode(&user_ident), 0o600);
    let r = alpha.tctl(&["--identity", user_ident.to_str().unwrap(), "users", "ls"]);
    assert_eq!(
        r.code(),
        Some(1),
        "a user identity listed users:\n{}",
        r.stdout()
    );
    assert!(r.stderr().starts_with("error: "), "{}", r.stderr());

    // --format tls: private key 0600, certificate for this key, CA = the exported one.
    let tls_out = tmp.join("alice-tls");
    alpha.tctl_ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--format",
        "tls",
        "--out",
        tls_out.to_str().unwrap(),
    ]);
    let key_path = tmp.join("alice-tls.key");
    assert_eq!(mode(&key_path), 0o600);
    assert!(std::fs::read_to_string(&key_path)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    assert!(std::fs::read_to_string(tmp.join("alice-tls.crt"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let exported = alpha.tctl_ok(&["auth", "export", "--type", "tls"]).stdout();
    assert_eq!(
        first_cert_der(&std::fs::read_to_string(tmp.join("alice-tls.cas")).unwrap()).unwrap(),
        first_cert_der(&exported).unwrap()
    );

    assert!(alpha.tctl_ok(&["status"]).stdout().contains("alpha"));
}

// ---------------------------------------------------------------------------------------
// Stock OpenSSH sshd trusts the user CA; state survives a restart
// ---------------------------------------------------------------------------------------

#[test]
fn openssh_sshd_accepts_user_certs_and_restart_keeps_state() {
    let tmp = TempDir::new();
    let mut alpha = authority(&tmp, "alpha");
    let other = authority(&tmp, "other");

    let user_ca = alpha
        .tctl_ok(&["auth", "export", "--type", "user"])
        .stdout();
    assert_eq!(user_ca.lines().count(), 1, "{user_ca}");
    assert!(user_ca.starts_with("ssh-ed25519 "), "{user_ca}");
    let ca_file = tmp.join("user_ca.pub");
    write(&ca_file, &user_ca);
    let sshd = Peer::start(
        "sshd.sh",
        &[ca_file.to_str().unwrap()],
        &[("SSH_USERS", "root alice")],
    );
    let port = sshd.get("SSHD_PORT").to_string();

    let mut c = alpha.tctl_cmd();
    c.args([
        "users",
        "add",
        "ci",
        "--logins",
        "root,alice",
        "--password-stdin",
    ]);
    run(c, Some(b"pw-for-ci\n"), Duration::from_secs(30)).expect_ok("users add ci");

    // A root certificate logs in.
    let keys = tmp.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let root_key = sign_openssh(
        &alpha,
        &keys,
        "root",
        "ci",
        &["--logins", "root", "--ttl", "1h"],
    );
    assert_eq!(mode(&root_key), 0o600);
    let r = ssh(&root_key, &port, None, "root", "id -un");
    assert!(
        r.ok(),
        "ssh with a root certificate failed:\n{}",
        r.stderr()
    );
    assert_eq!(r.stdout().trim(), "root");

    // What OpenSSH reads in the certificate.
    let info = ssh_keygen(&["-L", "-f", cert_of(&root_key).to_str().unwrap()]).stdout();
    assert!(info.contains("user certificate"), "{info}");
    assert!(info.contains("Key ID: \"ci\""), "{info}");
    assert!(info.contains("Valid: from "), "{info}");
    let principals: Vec<&str> = info
        .split("Principals:")
        .nth(1)
        .and_then(|s| s.split("Critical Options:").next())
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(principals, ["root"], "{info}");
    let extensions = info.split("Extensions:").nth(1).unwrap_or("");
    assert!(extensions.contains("permit-pty"), "{info}");
    assert!(extensions.contains("roles@edgeport"), "{info}");
    let ca_fp = ssh_keygen(&["-l", "-f", ca_file.to_str().unwrap()]).stdout();
    let ca_fp = ca_fp.split_whitespace().nth(1).unwrap();
    assert!(
        info.contains(&format!("Signing CA: ED25519 {ca_fp}")),
        "{info}\nCA {ca_fp}"
    );

    // A certificate for another principal does not open root.
    let alice_key = sign_openssh(&alpha, &keys, "alice", "ci", &["--logins", "alice"]);
    let r = ssh(&alice_key, &port, None, "root", "true");
    assert!(!r.ok(), "an alice certificate logged in as root");
    assert!(r.stderr().contains("Permission denied"), "{}", r.stderr());

    // An expired certificate (valid from now-60 s to now+1 s) is refused.
    let short_key = sign_openssh(
        &alpha,
        &keys,
        "short",
        "ci",
        &["--logins", "root", "--ttl", "1s"],
    );
    std::thread::sleep(Duration::from_millis(2500));
    let r = ssh(&short_key, &port, None, "root", "true");
    assert!(!r.ok(), "an expired certificate logged in");
    assert!(r.stderr().contains("Permission denied"), "{}", r.stderr());

    // A certificate from another authority's user CA is refused.
    let foreign_key = sign_openssh(&other, &keys, "foreign", "ci", &["--logins", "root"]);
    let r = ssh(&foreign_key, &port, None, "root", "true");
    assert!(!r.ok(), "a certificate from another authority logged in");
    assert!(r.stderr().contains("Permission denied"), "{}", r.stderr());

    // Restart: SIGTERM exits cleanly; the same data dir brings back users and CAs.
    let exports_before: Vec<String> = ["user", "host", "tls"]
        .iter()
        .map(|t| alpha.tctl_ok(&["auth", "export", "--type", t]).stdout())
        .collect();
    let status = alpha
        .proc
        .stop()
        .expect("the authority did not exit on SIGTERM");
    assert!(
        status.success(),
        "authority exited with {status:?} on SIGTERM"
    );
    let (data_dir, addr) = (alpha.data_dir.clone(), alpha.addr.clone());
    drop(alpha);
    let alpha = Authority::start_at(&data_dir, "alpha", &addr);
    let users = alpha.tctl_ok(&["users", "ls", "--format", "json"]).json();
    let ci = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "ci")
        .unwrap_or_else(|| panic!("user ci lost in the restart: {users}"));
    assert_eq!(ci["logins"], serde_json::json!(["root", "alice"]));
    let exports_after: Vec<String> = ["user", "host", "tls"]
        .iter()
        .map(|t| alpha.tctl_ok(&["auth", "export", "--type", t]).stdout())
        .collect();
    assert_eq!(
        exports_before, exports_after,
        "the CAs changed across a restart"
    );
    let r = ssh(&root_key, &port, None, "root", "true");
    assert!(
        r.ok(),
        "a certificate from before the restart no longer works:\n{}",
        r.stderr()
    );
}

// ---------------------------------------------------------------------------------------
// The host CA through a known_hosts @cert-authority line, and nothing else
// ---------------------------------------------------------------------------------------

#[test]
fn openssh_client_trusts_host_ca_line_alone() {
    let tmp = TempDir::new();
    let alpha = authority(&tmp, "alpha");
    let other = authority(&tmp, "other");

    let host_line = alpha
        .tctl_ok(&["auth", "export", "--type", "host"])
        .stdout();
    assert_eq!(host_line.lines().count(), 1, "{host_line}");
    assert!(
        host_line.starts_with("@cert-authority * ssh-ed25519 "),
        "{host_line}"
    );

    // Sign an sshd host key with the host CA the authority keeps in DATA/ca/.
    let host_ca = tmp.join("host_ca");
    host_ca_private_key(&alpha.data_dir, &host_line, &host_ca);
    let host_key = tmp.join("host_key");
    ssh_keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        host_key.to_str().unwrap(),
    ]);
    let host_pub = format!("{}.pub", host_key.display());
    ssh_keygen(&[
        "-q",
        "-s",
        host_ca.to_str().unwrap(),
        "-I",
        "test-host",
        "-h",
        "-n",
        "127.0.0.1",
        &host_pub,
    ]);
    let host_cert = format!("{}-cert.pub", host_key.display());

    let ca_file = tmp.join("user_ca.pub");
    write(
        &ca_file,
        &alpha
            .tctl_ok(&["auth", "export", "--type", "user"])
            .stdout(),
    );
    let sshd = Peer::start(
        "sshd.sh",
        &[ca_file.to_str().unwrap()],
        &[("HOST_CERT", host_cert.as_str()), ("SSH_USERS", "root")],
    );
    let port = sshd.get("SSHD_PORT").to_string();
    let key = sign_openssh(&alpha, tmp.path(), "root", "ci", &["--logins", "root"]);

    // Only the exported line in known_hosts, strict checking: accepted.
    let kh = tmp.join("known_hosts");
    write(&kh, &host_line);
    let r = ssh(&key, &port, Some(&kh), "root", "echo through-host-ca");
    assert!(
        r.ok(),
        "the @cert-authority line was not enough:\n{}",
        r.stderr()
    );
    assert_eq!(r.stdout().trim(), "through-host-ca");

    // Empty known_hosts, strict checking: refused.
    let empty = tmp.join("known_hosts.empty");
    write(&empty, "");
    let r = ssh(&key, &port, Some(&empty), "root", "true");
    assert!(!r.ok(), "an unknown host key was accepted");
    assert!(
        r.stderr().contains("Host key verification failed"),
        "{}",
        r.stderr()
    );

    // Another authority's host CA line: refused.
    let foreign = tmp.join("known_hosts.foreign");
    write(
        &foreign,
        &other
            .tctl_ok(&["auth", "export", "--type", "host"])
            .stdout(),
    );
    let r = ssh(&key, &port, Some(&foreign), "root", "true");
    assert!(!r.ok(), "a host certificate from another CA was accepted");
    assert!(
        r.stderr().contains("Host key verification failed"),
        "{}",
        r.stderr()
    );
}

// ---------------------------------------------------------------------------------------
// Join tokens
// ---------------------------------------------------------------------------------------

#[test]
fn join_tokens_expire_are_single_use_and_pinned() {
    let tmp = TempDir::new();
    let alpha = authority(&tmp, "alpha");
    let other = authority(&tmp, "other");
    let rt = rt();
    let addr = alpha.addr.clone();

    let expired = token_add(&alpha, &["--type", "gateway", "--ttl", "1s"]);
    let once = token_add(&alpha, &["--type", "gateway", "--ttl", "10m"]);
    let race = token_add(&alpha, &["--type", "gateway"]);
    let removed = token_add(&alpha, &["--type", "gateway"]);
    let device = token_add(
        &alpha,
        &["--type", "device", "--labels", "fleet=vans,region=eu"],
    );
    let wrong_kind = token_add(&alpha, &["--type", "device"]);
    assert_eq!(device["type"], "device");
    assert_eq!(device["labels"]["fleet"], "vans");
    let pin = once["ca_pin"].as_str().unwrap().to_string();
    assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin}");
    let text = alpha
        .tctl_ok(&["tokens", "add", "--type", "gateway"])
        .stdout();
    assert!(
        text.contains("--token ") && text.contains(&format!("--ca-pin {pin}")),
        "{text}"
    );

    // Listing shows ids, never secrets; removal by id works.
    let listed = alpha.tctl_ok(&["tokens", "ls", "--format", "json"]).json();
    let listed = listed.as_array().unwrap();
    assert!(
        listed.iter().all(|t| t["token"].is_null()),
        "secrets listed: {listed:?}"
    );
    assert!(listed.iter().any(|t| t["id"] == once["id"]));
    alpha.tctl_ok(&["tokens", "rm", removed["id"].as_str().unwrap()]);

    std::thread::sleep(Duration::from_millis(2500));
    let secret = |v: &serde_json::Value| v["token"].as_str().unwrap().to_string();
    rt.block_on(async {
        let key = KeyPair::generate().unwrap();
        assert_refused(
            redeem_gateway_token(&addr, &pin, &secret(&expired), &key).await,
            "expired token",
        );
        assert_refused(
            redeem_gateway_token(&addr, &pin, &"ab".repeat(32), &key).await,
            "unknown token",
        );
        assert_refused(
            redeem_gateway_token(&addr, &pin, &secret(&removed), &key).await,
            "removed token",
        );
        assert_refused(
            redeem_gateway_token(&addr, &pin, &secret(&wrong_kind), &key).await,
            "device token for a gateway",
        );

        // A wrong pin fails before any token is sent.
        let other_pin = other.tctl_ok(&["tokens", "add", "--format", "json"]).json()["ca_pin"]
            .as_str()
            .unwrap()
            .to_string();
        for bad in [other_pin, format!("sha256:{}", "00".repeat(32))] {
            match redeem_gateway_token(&addr, &bad, &secret(&once), &key).await {
                Err(RpcClientError::Handshake { err, .. }) => assert!(err.contains("pin"), "{err}"),
                other => panic!("a wrong pin was not refused in the handshake: {other:?}"),
            }
        }

        // Single use: the first redemption works, the second is refused.
        let gw = redeem_gateway_token(&addr, &pin, &secret(&once), &key)
            .await
            .unwrap();
        assert!(gw.x509_cert_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(gw.cas.ca_pin, pin);
        let key2 = KeyPair::generate().unwrap();
        assert_refused(
            redeem_gateway_token(&addr, &pin, &secret(&once), &key2).await,
            "reused token",
        );

        // Two concurrent redemptions of one single-use token: exactly one wins.
        let cfg = Arc::new(pinned_client_config(&pin, None, &[alpn::RPC]).unwrap());
        let mut c1 = RpcClient::connect(&addr, cfg.clone()).await.unwrap();
        let mut c2 = RpcClient::connect(&addr, cfg).await.unwrap();
        let (k1, k2) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let t = secret(&race);
        let (r1, r2) = tokio::join!(
            join_gateway(&mut c1, &t, &k1),
            join_gateway(&mut c2, &t, &k2)
        );
        let wins = [r1.is_ok(), r2.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "concurrent redemptions: {r1:?} / {r2:?}");
        let loser = if r1.is_ok() { r2 } else { r1 };
        assert_refused(loser, "the losing concurrent redemption");

        // The joined gateway relays a device join with the device token, reports presence,
        // and is no administrator.
        let me = CertKey::from_pem(&gw.x509_cert_pem, None, key.pkcs8_der()).unwrap();
        let ca = first_cert_der(&gw.cas.x509_ca_pem).unwrap();
        let cfg = Arc::new(client_config(&ca, Some(&me), &[alpn::RPC]).unwrap());
        let mut g = RpcClient::connect(&addr, cfg).await.unwrap();
        let dev_key = KeyPair::generate().unwrap();
        let join = JoinDeviceRequest {
            token: secret(&device),
            requested_id: Some("van-1".into()),
            labels: BTreeMap::new(),
            ssh_public_key: dev_key.public_openssh(),
            version: "9.9.9".into(),
            arch: "aarch64".into(),
            remote_addr: "192.0.2.7:40000".into(),
        };
        match g.call(Request::JoinDevice(join.clone())).await.unwrap() {
            Response::DeviceCerts(d) => {
                assert_eq!(d.device_id, "van-1");
                assert_eq!(d.labels.get("fleet").map(String::as_str), Some("vans"));
                assert!(d.host_cert.starts_with("ssh-ed25519-cert-v01@openssh.com "));
            }
            other => panic!("JoinDevice answered {other:?}"),
        }
        assert_refused(
            g.call(Request::JoinDevice(join)).await,
            "reused device token",
        );
        let presence = PresenceReport {
            lease_secs: 60,
            online: vec![DevicePresence {
                id: "van-1".into(),
                labels: [("fleet".to_string(), "vans".to_string())].into(),
                version: "9.9.9".into(),
                arch: "aarch64".into(),
                transport: Transport::Tcp,
                address: "192.0.2.7:40000".into(),
                rtt_ms: 42,
                connected_at: edgeport_net::clock::now_secs(),
                kube_cluster: None,
                loss_permille: None,
                usage: None,
                proof: None,
            }],
            disconnected: vec![],
            ..Default::default()
        };
        match g.call(Request::Presence(presence)).await.unwrap() {
            Response::PresenceAck(_) => {}
            other => panic!("Presence answered {other:?}"),
        }
        match g.call(Request::UserList).await {
            Err(RpcClientError::Remote(e)) => assert_eq!(e.kind, ErrorKind::Denied, "{e:?}"),
            other => panic!("a gateway listed users: {other:?}"),
        }
    });

    let devices = alpha.tctl_ok(&["devices", "ls", "--format", "json"]).json();
    let van = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "van-1")
        .unwrap_or_else(|| panic!("van-1 not listed: {devices}"));
    for k in [
        "id",
        "labels",
        "online",
        "transport",
        "address",
        "version",
        "arch",
        "rtt_ms",
        "last_seen",
        "last_disconnect_reason",
        "kube_cluster",
    ] {
        assert!(van.get(k).is_some(), "devices ls json lacks {k}: {van}");
    }
    assert_eq!(van["labels"]["region"], "eu");
    assert_eq!(van["online"], true, "{van}");
    assert_eq!(van["transport"], "tcp", "{van}");
    assert_eq!(van["arch"], "aarch64", "{van}");
    assert!(
        van["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{van}"
    );
    let text = alpha.tctl_ok(&["devices", "ls"]).stdout();
    assert!(
        text.lines()
            .any(|l| l.starts_with("van-1 ") && l.contains("online")),
        "{text}"
    );
    alpha.tctl_ok(&["devices", "rm", "van-1"]);
    let devices = alpha.tctl_ok(&["devices", "ls", "--format", "json"]).json();
    assert!(
        !devices
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == "van-1"),
        "{devices}"
    );
}

// ---------------------------------------------------------------------------------------
// Bad input against the running process
// ---------------------------------------------------------------------------------------

/// Reads until the authority closes the connection; any frame it sends first must be an error.
async fn expect_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) {
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return buf,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            assert!(buf.len() <= 1 << 20, "{what}: the authority keeps sending");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the authority did not close the connection"));
    if let Ok(Some((body, _))) = frame::split_frame(&closed) {
        let resp: Response = frame::decode(body).unwrap();
        assert!(
            matches!(resp, Response::Error(_)),
            "{what}: answered {resp:?}"
        );
    }
}

#[test]
fn bad_input_closes_one_connection_and_the_authority_keeps_serving() {
    let tmp = TempDir::new();
    let mut alpha = authority(&tmp, "alpha");
    let ident = IdentityFile::load(&alpha.identity()).unwrap();
    let tls = identity_tls(&ident);
    let rt = rt();

    let mut oversized = ((frame::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 16]);
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0u8; 10]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        // (what, bytes, half-close after sending)
        ("truncated frame", truncated, true),
        ("oversized length prefix", oversized, false),
        ("unknown enum variant", vec![0, 0, 0, 2, 0xff, 0x7f], false),
        ("unknown variant index", vec![0, 0, 0, 1, 0x7f], false),
        ("random bytes", random_bytes(4096).unwrap(), true),
    ];
    // A well-behaved client connected throughout must not notice any of it.
    let mut bystander = rt
        .block_on(RpcClient::connect(&alpha.addr, tls.clone()))
        .unwrap();
    for (what, bytes, half_close) in cases {
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(&alpha.addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("authority.edgeport").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .unwrap();
            // The connection works before the bad bytes.
            edgeport_net::write_frame(&mut s, &Request::Ping)
                .await
                .unwrap();
            let pong: Response = edgeport_net::read_frame(&mut s).await.unwrap();
            assert!(matches!(pong, Response::Pong { .. }), "{pong:?}");
            s.write_all(&bytes).await.unwrap();
            s.flush().await.unwrap();
            if half_close {
                s.shutdown().await.unwrap();
            }
            expect_closed(&mut s, what).await;
        });
        assert!(alpha.proc.alive(), "the authority died after {what}");
        alpha.tctl_ok(&["status"]);
    }

    // Raw random bytes on plain TCP, where a TLS handshake is expected.
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(&alpha.addr).await.unwrap();
        s.write_all(&random_bytes(4096).unwrap()).await.unwrap();
        s.shutdown().await.unwrap();
        expect_closed_raw(&mut s).await;
    });
    assert!(
        alpha.proc.alive(),
        "the authority died after plain-TCP garbage"
    );
    let users = alpha.tctl_ok(&["users", "ls", "--format", "json"]).json();
    assert!(users.is_array());
    let pong = rt.block_on(bystander.call(Request::Ping)).unwrap();
    assert!(
        matches!(pong, Response::Pong { ref cluster, .. } if cluster == "alpha"),
        "{pong:?}"
    );
    rt.block_on(bystander.close());
}

/// Plain TCP: the authority may answer with a TLS alert, then must close.
async fn expect_closed_raw(s: &mut tokio::net::TcpStream) {
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("the authority did not close a plain-TCP connection carrying garbage");
}
