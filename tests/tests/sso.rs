//! Single sign-on through a real OpenID Connect provider (npm `oidc-provider`, started by
//! `tests/peers/oidc.sh`), driven by headless Chromium exactly as a user's browser would be:
//! `tsh login --auth oidc` prints the provider's URL, the browser logs in and lands on tsh's
//! loopback listener, tsh hands the code to the gateway, which relays it to the authority;
//! the authority (configured with `tctl sso connectors add`) redeems it, verifies the ID
//! token and maps its groups to logins. The same with GitHub (a real OAuth2 stand-in,
//! `github.sh`): teams become `ORG/TEAM` groups. Refusals: an unmapped group, a name that
//! belongs to a local user or to another identity, a locked user, an unverified email
//! address, and a gateway that tries to log someone in without the provider.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgeport_e2e::peers::{peers_dir, Peer};
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{bin, run, Run};

fn idp() -> Peer {
    Peer::start(
        "oidc.sh",
        &[],
        &[
            (
                "OIDC_USERS",
                "alice:devs,staff;bob:ops;carol:devs;mallory:devs",
            ),
            ("OIDC_UNVERIFIED", "mallory"),
        ],
    )
}

/// `tctl sso connectors add oidc` for the test provider, with `extra` flags.
fn add_oidc(c: &Cluster, idp: &Peer, extra: &[&str]) {
    let secret = c.dir.join("oidc-client-secret");
    std::fs::write(&secret, idp.get("CLIENT_SECRET")).unwrap();
    let mut args = vec![
        "sso",
        "connectors",
        "add",
        "oidc",
        "--issuer",
        idp.get("ISSUER"),
        "--client-id",
        idp.get("CLIENT_ID"),
        "--client-secret-file",
        secret.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    c.tctl.ok(&args);
}

/// `tsh login --auth oidc`, with a headless browser logging in as `who` at the provider.
/// Returns tsh's result and what the browser saw last.
fn sso_login(tsh: &Tsh, pin: &str, who: &str) -> (Run, String) {
    sso_login_with(tsh, pin, who, "oidc")
}

/// `tsh login --auth CONNECTOR` with the browser logging in as `who`.
fn sso_login_with(tsh: &Tsh, pin: &str, who: &str, connector: &str) -> (Run, String) {
    let mut cmd = tsh.cmd(&[
        "login",
        "--proxy",
        &tsh.proxy,
        "--ca-pin",
        pin,
        "--auth",
        connector,
        "--browser",
        "none",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tsh login");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.trim_start().starts_with("http") {
                let _ = tx.send(line.trim().to_string());
                sent = true;
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let Ok(url) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        panic!(
            "tsh printed no login URL: {}",
            reader.join().unwrap_or_default()
        )
    };
    assert!(url.contains("state="), "no state in {url}");
    if connector == "oidc" {
        assert!(url.contains("code_challenge="), "no PKCE in {url}");
        assert!(url.contains("nonce="), "no nonce in {url}");
    }
    // Someone else's login delivered to this tsh's port (a forged or stolen callback) is
    // turned away, and the real one still completes.
    let redirect = url
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("redirect_uri="))
        .unwrap();
    let port: u16 = redirect
        .split("127.0.0.1%3A")
        .nth(1)
        .and_then(|r| r.split('%').next())
        .unwrap()
        .parse()
        .unwrap();
    let mut forged = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        forged,
        "GET /v1/webapi/{connector}/callback?code=stolen&state=not-yours HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    forged.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut browser = Command::new("bash");
    browser
        .arg(peers_dir().join("oidc.sh"))
        .args(["login", &url, who]);
    let seen = run(browser, None, Duration::from_secs(120));
    let out = child.wait_with_output().expect("tsh login");
    let stderr = reader.join().unwrap_or_default();
    let mut out = out;
    out.stderr = stderr.into_bytes();
    (Run { out }, format!("{}{}", seen.stdout(), seen.stderr()))
}

#[test]
fn oidc_login_maps_groups_and_refuses_what_it_must() {
    let idp = idp();
    let c = Cluster::start("sso", &[("dev1", "env=lab")]);
    add_oidc(&c, &idp, &[]);
    let pin = c.gw.ca_pin.clone();
    // The connector is listed, its secret never.
    let ls = c.tctl.ok(&["sso", "connectors", "ls", "--format", "json"]);
    assert!(
        !ls.stdout().contains(idp.get("CLIENT_SECRET")),
        "{}",
        ls.stdout()
    );
    let list = ls.json();
    assert_eq!(list[0]["name"], "oidc", "{list:#}");
    assert_eq!(list[0]["issuer"], idp.get("ISSUER"), "{list:#}");
    assert_eq!(list[0]["username_claim"], "preferred_username", "{list:#}");
    let text = c.tctl.ok(&["sso", "connectors", "ls"]).stdout();
    assert!(!text.contains(idp.get("CLIENT_SECRET")), "{text}");
    c.tctl.ok(&["sso", "map", "devs", "--logins", "root"]);
    c.tctl.ok(&["sso", "map", "staff", "--logins", "pi"]);
    let maps = c.tctl.ok(&["sso", "ls", "--format", "json"]).json();
    assert_eq!(maps.as_array().unwrap().len(), 2, "{maps:#}");

    // alice (devs, staff): logged in with the union of both mappings, then ssh works.
    let alice = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    let (r, browser) = sso_login(&alice, &pin, "alice");
    assert!(
        r.ok(),
        "tsh: {}\n{}\nbrowser: {browser}",
        r.stdout(),
        r.stderr()
    );
    assert!(r.stdout().contains("Logged in as alice"), "{}", r.stdout());
    assert!(browser.contains("FINAL_STATUS=200"), "{browser}");
    let status = alice
        .run(&["status"], None)
        .expect_ok("tsh status")
        .stdout();
    assert!(status.contains("root") && status.contains("pi"), "{status}");
    assert!(
        !r.stderr().contains(idp.get("CLIENT_SECRET")),
        "{}",
        r.stderr()
    );
    let hi = alice.run(&["ssh", "root@dev1", "echo", "hi"], None);
    assert_eq!(hi.stdout().trim(), "hi", "{}", hi.stderr());
    let users = c.tctl.ok(&["users", "ls", "--format", "json"]).json();
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "alice"),
        "{users:#}"
    );
    let events = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "user.login",
            "--format",
            "json",
        ])
        .json();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["user"] == "alice" && e["connector"] == "oidc" && e["success"] == true),
        "{events:#}"
    );

    // bob (ops): signed in at the provider, but ops grants nothing here.
    let bob = Tsh::new(c.dir.join("tsh-bob"), c.proxy());
    let (r, _) = sso_login(&bob, &pin, "bob");
    assert!(!r.ok(), "{}", r.stdout());
    assert!(
        r.stderr().contains("none of their groups (ops) is mapped"),
        "{}",
        r.stderr()
    );
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());

    // carol (devs) is also a local user's name: single sign-on cannot take that account.
    c.add_user("carol", "root", "correct horse battery staple");
    let carol = Tsh::new(c.dir.join("tsh-carol"), c.proxy());
    let (r, _) = sso_login(&carol, &pin, "carol");
    assert!(!r.ok(), "{}", r.stdout());
    assert!(
        r.stderr().contains("a local user named carol exists"),
        "{}",
        r.stderr()
    );

    // A locked user gets no new certificates.
    c.tctl
        .ok(&["lock", "--user", "alice", "--message", "on leave"]);
    let again = Tsh::new(c.dir.join("tsh-alice-2"), c.proxy());
    let (r, _) = sso_login(&again, &pin, "alice");
    assert!(!r.ok(), "{}", r.stdout());
    assert!(
        r.stderr().contains("on leave") || r.stderr().contains("locked"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_gateway_without_sso_says_so() {
    let c = Cluster::start("nosso", &[]);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    let r = tsh.run(
        &[
            "login",
            "--proxy",
            c.proxy(),
            "--ca-pin",
            &c.gw.ca_pin,
            "--auth",
            "oidc",
            "--browser",
            "none",
        ],
        None,
    );
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    assert!(
        r.stderr().contains("no single sign-on connector"),
        "{}",
        r.stderr()
    );
}

#[test]
fn github_login_maps_teams_and_keeps_identities_apart() {
    let idp = idp();
    let gh = Peer::start(
        "github.sh",
        &[],
        &[(
            "GITHUB_TEAMS",
            "alice:octo-org/devs;dave:octo-org/devs;erin:octo-org/ops",
        )],
    );
    let c = Cluster::start("gh", &[("dev1", "")]);
    add_oidc(&c, &idp, &[]);
    let gh_secret = c.dir.join("github-client-secret");
    std::fs::write(&gh_secret, gh.get("GITHUB_CLIENT_SECRET")).unwrap();
    c.tctl.ok(&[
        "sso",
        "connectors",
        "add",
        "github",
        "--client-id",
        gh.get("GITHUB_CLIENT_ID"),
        "--client-secret-file",
        gh_secret.to_str().unwrap(),
        "--github-url",
        gh.get("GITHUB_URL"),
        "--api-url",
        gh.get("GITHUB_API_URL"),
    ]);
    let pin = c.gw.ca_pin.clone();
    c.tctl.ok(&["sso", "map", "devs", "--logins", "root"]);
    c.tctl
        .ok(&["sso", "map", "github:octo-org/devs", "--logins", "root"]);

    // dave is in octo-org/devs on GitHub: in, and his session works.
    let dave = Tsh::new(c.dir.join("tsh-dave"), c.proxy());
    let (r, browser) = sso_login_with(&dave, &pin, "dave", "github");
    assert!(
        r.ok(),
        "tsh: {}\n{}\nbrowser: {browser}",
        r.stdout(),
        r.stderr()
    );
    assert!(r.stdout().contains("Logged in as dave"), "{}", r.stdout());
    let hi = dave.run(&["ssh", "root@dev1", "echo", "hi"], None);
    assert_eq!(hi.stdout().trim(), "hi", "{}", hi.stderr());

    // erin's team (octo-org/ops) is not mapped.
    let erin = Tsh::new(c.dir.join("tsh-erin"), c.proxy());
    let (r, _) = sso_login_with(&erin, &pin, "erin", "github");
    assert!(!r.ok(), "{}", r.stdout());
    assert!(
        r.stderr().contains("(github:octo-org/ops) is mapped"),
        "{}",
        r.stderr()
    );

    // "alice" first logs in through the OpenID Connect provider; GitHub's alice is another
    // identity and cannot take her account.
    let alice = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    let (r, _) = sso_login_with(&alice, &pin, "alice", "oidc");
    assert!(r.ok(), "{}", r.stderr());
    let other = Tsh::new(c.dir.join("tsh-gh-alice"), c.proxy());
    let (r, _) = sso_login_with(&other, &pin, "alice", "github");
    assert!(!r.ok(), "{}", r.stdout());
    assert!(
        r.stderr().contains("belongs to another identity"),
        "{}",
        r.stderr()
    );
}

#[test]
fn oidc_email_logins_need_a_verified_address() {
    let idp = idp();
    let c = Cluster::start("ssomail", &[]);
    add_oidc(&c, &idp, &["--username-claim", "email"]);
    c.tctl.ok(&["sso", "map", "devs", "--logins", "root"]);
    let pin = c.gw.ca_pin.clone();

    // mallory (devs) signs in, but the provider has not verified her address: anyone could
    // have typed it, so it names no one.
    let mallory = Tsh::new(c.dir.join("tsh-mallory"), c.proxy());
    let (r, browser) = sso_login(&mallory, &pin, "mallory");
    assert!(!r.ok(), "{}\nbrowser: {browser}", r.stdout());
    assert!(
        r.stderr()
            .contains("has not verified this account's email address (email_verified is not true)"),
        "{}",
        r.stderr()
    );
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());

    // alice's address is verified: she is the address's local part.
    let alice = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    let (r, browser) = sso_login(&alice, &pin, "alice");
    assert!(
        r.ok(),
        "tsh: {}\n{}\nbrowser: {browser}",
        r.stdout(),
        r.stderr()
    );
    assert!(r.stdout().contains("Logged in as alice"), "{}", r.stdout());
}

/// What a compromised gateway could try with its own certificate, straight at the
/// authority's RPC: it holds no client secret, and no request lets it name a user.
#[test]
fn a_gateway_identity_cannot_mint_a_single_sign_on_user() {
    use edgeport_net::rpc_client::{RpcClient, RpcClientError};
    use edgeport_proto::keys::{sha256_hex, KeyPair};
    use edgeport_proto::rpc::{ErrorKind, Request, Response, SsoFinishRequest, SsoStartRequest};

    let idp = idp();
    let c = Cluster::start("ssogw", &[]);
    add_oidc(&c, &idp, &[]);
    c.tctl.ok(&["sso", "map", "devs", "--logins", "root"]);

    // The gateway's key and certificate from its data dir, as an attacker on that machine
    // would have them.
    let ident = edgeport_gateway::identity::load(&c.gw.data_dir).expect("gateway identity");
    let tls = std::sync::Arc::new(ident.rpc_client_config().unwrap());
    let key = KeyPair::generate().unwrap().public_openssh();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refusal = |r: Result<Response, RpcClientError>, what: &str| -> String {
        match r {
            Err(RpcClientError::Remote(e)) => {
                assert_eq!(e.kind, ErrorKind::Denied, "{what}: {e:?}");
                e.message
            }
            other => panic!("{what}: not refused: {other:?}"),
        }
    };
    let finish = |state: &str, code: &str, proof: &str| {
        Request::SsoFinish(SsoFinishRequest {
            state: state.into(),
            code: code.into(),
            proof: proof.into(),
            ssh_public_key: key.clone(),
            ttl_secs: 3600,
            client_addr: "127.0.0.1:4242".into(),
        })
    };
    rt.block_on(async {
        edgeport_proto::tls::install_crypto_provider();
        let mut rpc = RpcClient::connect(&c.auth.addr, tls).await.unwrap();

        // A made-up state and code: no login of the authority's.
        let msg = refusal(
            rpc.call(finish("forged-state", "forged-code", "x")).await,
            "forged state",
        );
        assert!(msg.contains("unknown or expired"), "{msg}");

        // A login the gateway started itself (so it knows the proof), finished with a code
        // the provider never issued: the authority asks the provider, which refuses.
        let proof = "the gateway's own proof";
        let start = Request::SsoStart(SsoStartRequest {
            connector: "oidc".into(),
            redirect_uri: "http://127.0.0.1:9/v1/webapi/oidc/callback".into(),
            proof_hash: sha256_hex(proof.as_bytes()),
            client_addr: "127.0.0.1:4242".into(),
        });
        let auth_url = match rpc.call(start).await {
            Ok(Response::SsoRedirect { auth_url }) => auth_url,
            other => panic!("SsoStart: {other:?}"),
        };
        assert!(auth_url.starts_with(idp.get("ISSUER")), "{auth_url}");
        let state = auth_url
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("state="))
            .unwrap()
            .to_string();
        let msg = refusal(
            rpc.call(finish(&state, "forged-code", proof)).await,
            "forged code",
        );
        assert!(msg.contains("refused the login code"), "{msg}");
        // The state was spent by that attempt.
        let msg = refusal(
            rpc.call(finish(&state, "forged-code", proof)).await,
            "spent state",
        );
        assert!(msg.contains("unknown or expired"), "{msg}");

        // Nor can it configure connectors (an administrator's job).
        match rpc
            .call(edgeport_proto::rpc::Request::SsoConnectorList)
            .await
        {
            Err(RpcClientError::Remote(e)) => assert_eq!(e.kind, ErrorKind::Denied, "{e:?}"),
            other => panic!("a gateway listed connectors: {other:?}"),
        }
        rpc.close().await;
    });

    // The authority logged why, and nobody got a user record.
    let log = c.auth.proc.log_text();
    assert!(
        log.contains("single sign-on refused") && log.contains("unknown or expired"),
        "{log}"
    );
    assert!(log.contains("refused the login code"), "{log}");
    let users = c.tctl.ok(&["users", "ls", "--format", "json"]).json();
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["name"] != "alice"),
        "{users:#}"
    );
    let events = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "user.login",
            "--format",
            "json",
        ])
        .json();
    let failed = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["success"] == false)
        .count();
    assert!(failed >= 3, "{events:#}");
}

#[test]
fn old_gateway_sso_flags_say_where_they_went() {
    let dir = edgeport_e2e::TempDir::new();
    for (flag, value, kind) in [
        ("--oidc-issuer", "https://idp.example", "oidc"),
        ("--oidc-client-secret-file", "/nonexistent", "oidc"),
        ("--github-client-id", "abc", "github"),
        ("--github-api-url", "https://api.example", "github"),
    ] {
        let mut cmd = Command::new(bin("gateway"));
        cmd.args(["start", "--data-dir"]).arg(dir.join("gw")).args([
            "--auth",
            "127.0.0.1:1",
            flag,
            value,
        ]);
        let r = run(cmd, None, Duration::from_secs(20));
        assert!(!r.ok(), "{flag}: {}", r.stderr());
        let err = r.stderr();
        assert_eq!(err.trim().lines().count(), 1, "{flag}: {err}");
        assert!(
            err.contains(&format!("{flag} moved to the authority"))
                && err.contains(&format!("tctl sso connectors add {kind}")),
            "{err}"
        );
    }
}
