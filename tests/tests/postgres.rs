//! The shared store: the authority on a real PostgreSQL server (Debian's, started by
//! `tests/peers/postgres.sh`). The store passes the same conformance checks as sled; two
//! authorities of one cluster share users, locks, tokens, devices and one unbroken audit
//! chain; an authority of another CA, a wrong password or a dead server is refused with a
//! clear message that never shows the password.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use edgeport_authority::store::{conformance, PostgresStore, Store};
use edgeport_e2e::fabric::{wait_online, Agent, Gateway};
use edgeport_e2e::peers::Peer;
use edgeport_e2e::ssh::Tsh;
use edgeport_e2e::{bin, free_port, run, Authority, Proc, TempDir};

fn postgres() -> Peer {
    Peer::start("postgres.sh", &[], &[])
}

/// A fresh database on `pg` (owned by the test role), as a URL.
fn database(pg: &Peer, name: &str) -> String {
    superuser_sql(
        pg,
        &format!("CREATE DATABASE {name} OWNER {}", pg.get("PGUSER")),
    );
    let url = pg.get("DATABASE_URL");
    let base = url.rsplit_once('/').unwrap().0;
    // The test server has no TLS: say so (the authority requires TLS over TCP otherwise).
    format!("{base}/{name}?sslmode=disable")
}

fn start(dir: &Path, url: &str) -> Authority {
    let addr = format!("127.0.0.1:{}", free_port());
    Authority::start_env(dir, "pgc", &addr, &[("EDGEPORT_STORE", url)])
}

/// `authority start` that is expected to fail: its exit status and log.
fn start_fails(dir: &Path, url: &str) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("authority"));
    cmd.args(["start", "--data-dir"]).arg(dir).args([
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--cluster",
        "pgc",
    ]);
    cmd.env("EDGEPORT_STORE", url);
    let mut p = Proc::spawn("authority-refused", cmd, dir.parent().unwrap());
    let ended = edgeport_e2e::wait_until(Duration::from_secs(60), || !p.alive());
    assert!(ended, "the authority kept running:\n{}", p.log_text());
    let status = p.stop();
    (status.and_then(|s| s.code()), p.log_text())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn names(r: &edgeport_e2e::Run) -> Vec<String> {
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn postgres_store_passes_the_conformance_checks() {
    let pg = postgres();
    let url = database(&pg, "conformance");
    let store: Arc<dyn Store> =
        Arc::new(PostgresStore::open(&url, None, "c1", "sha256:aa").unwrap());
    conformance::run_all(store.clone()).unwrap();
    // A second handle (another authority) sees the same records.
    let other = PostgresStore::open(&url, None, "c1", "sha256:aa").unwrap();
    let ks = other
        .scan_prefix(edgeport_authority::store::Table::Users, "")
        .unwrap();
    assert!(ks.iter().any(|(k, _)| k == "n"), "{ks:?}");
    // Another cluster, or the same name with other CA keys, is refused.
    for (cluster, pin) in [("c2", "sha256:aa"), ("c1", "sha256:bb")] {
        let Err(e) = PostgresStore::open(&url, None, cluster, pin) else {
            panic!("{cluster} {pin} opened a database of c1");
        };
        let msg = e.to_string();
        assert!(msg.contains("belongs to another cluster or CA"), "{msg}");
        assert!(!msg.contains(pg.get("PGPASSWORD")), "{msg}");
    }
}

#[test]
fn two_authorities_share_one_database() {
    let pg = postgres();
    let url = database(&pg, "shared");
    let tmp = TempDir::new();
    let a = start(&tmp.join("a"), &url);
    // The second authority of the cluster holds a copy of the first one's CA keys.
    copy_dir(&tmp.join("a/ca"), &tmp.join("b/ca"));
    let b = start(&tmp.join("b"), &url);
    assert!(
        !tmp.join("a/store").exists(),
        "an embedded store was made beside PostgreSQL"
    );

    // What one writes, the other reads.
    a.tctl_ok(&["users", "add", "alice", "--logins", "root"]);
    b.tctl_ok(&["users", "add", "bob", "--logins", "root"]);
    let seen = names(&b.tctl_ok(&["users", "ls", "--format", "json"]));
    assert!(
        seen.contains(&"alice".into()) && seen.contains(&"bob".into()),
        "{seen:?}"
    );
    b.tctl_ok(&["lock", "--user", "alice", "--message", "on leave"]);
    let locks = a.tctl_ok(&["locks", "ls", "--format", "json"]).stdout();
    assert!(
        locks.contains("alice") && locks.contains("on leave"),
        "{locks}"
    );

    // Authorities answer concurrently; their own audit chain stays one unbroken chain.
    let mut workers = Vec::new();
    for i in 0..12 {
        let auth = if i % 2 == 0 { &a } else { &b };
        let mut c = auth.tctl_cmd();
        c.args(["users", "add", &format!("u{i}"), "--logins", "root"]);
        workers.push(std::thread::spawn(move || {
            run(c, None, Duration::from_secs(60)).expect_ok("users add")
        }));
    }
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        names(&a.tctl_ok(&["users", "ls", "--format", "json"])).len(),
        14
    );
    let r = a.tctl(&[
        "audit",
        "verify",
        "--device",
        "@authority",
        "--format",
        "json",
    ]);
    let j = r.json();
    assert!(r.ok(), "{j:#}");
    assert_eq!(j[0]["ok"], true, "{j:#}");
    assert!(j[0]["events"].as_u64().unwrap() >= 15, "{j:#}");

    // A gateway on one authority, a device joined with a token made on the other.
    let gw = Gateway::start(&tmp.join("gw"), &a);
    let t = b
        .tctl_ok(&["tokens", "add", "--type", "device", "--format", "json"])
        .json();
    let (token, pin) = (t["token"].as_str().unwrap(), t["ca_pin"].as_str().unwrap());
    let join = ["--token", token, "--ca-pin", pin, "--id", "dev1"];
    let _agent = Agent::start_joined(&tmp.join("dev1"), &gw.addr, "dev1", &join);
    wait_online(&b, "dev1", None, Duration::from_secs(30));

    // A user added through one authority logs in through the gateway of the other and runs a
    // command; a lock made through the second authority stops the next dial at once (on a
    // shared store the gateway does not reuse dial decisions).
    let mut add = b.tctl_cmd();
    add.args([
        "users",
        "add",
        "dora",
        "--logins",
        "root",
        "--password-stdin",
    ]);
    run(
        add,
        Some(b"a long enough password\n"),
        Duration::from_secs(30),
    )
    .expect_ok("users add");
    let tsh = Tsh::new(tmp.join("tsh"), &gw.addr);
    tsh.login("dora", "a long enough password", &gw.ca_pin, &[])
        .expect_ok("tsh login");
    let hi = tsh.run(&["ssh", "root@dev1", "echo", "hi"], None);
    assert_eq!(hi.stdout().trim(), "hi", "{}", hi.stderr());

    // Access requests live in the database too: made through the gateway of one authority,
    // approved through the other, in the next certificate.
    b.tctl_ok(&["roles", "add", "prod"]);
    b.tctl_ok(&["roles", "add", "ops", "--request-roles", "prod"]);
    a.tctl_ok(&["users", "update", "dora", "--set-roles", "ops"]);
    let id = tsh
        .run(
            &["request", "create", "--roles", "prod", "--reason", "pg"],
            None,
        )
        .expect_ok("tsh request create")
        .stdout()
        .trim()
        .to_string();
    b.tctl_ok(&["requests", "approve", &id, "--ttl", "10m"]);
    let listed = a.tctl_ok(&["requests", "ls", "--format", "json"]).json();
    assert_eq!(listed[0]["state"], "approved", "{listed}");
    tsh.login("dora", "a long enough password", &gw.ca_pin, &[])
        .expect_ok("tsh login after the approval");
    let st = tsh.run(&["status", "--format", "json"], None).json();
    assert_eq!(st["roles"], serde_json::json!(["ops", "prod"]), "{st}");
    b.tctl_ok(&["lock", "--user", "dora", "--message", "shared store"]);
    let r = tsh.run(&["ssh", "root@dev1", "true"], None);
    assert!(!r.ok(), "a dial right after the lock went through");
    assert!(r.stderr().contains("lock"), "{}", r.stderr());

    // The database drops every connection (a failover, an administrator): the next request
    // gets a new one.
    let killed = superuser_sql(
        &pg,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{}'",
            pg.get("PGUSER")
        ),
    );
    assert_ne!(killed.trim(), "0", "no connection was open");
    assert_eq!(
        names(&b.tctl_ok(&["users", "ls", "--format", "json"])).len(),
        15
    );

    // State lives in the database: a restarted authority (no store of its own) has it all.
    drop(a);
    let a = Authority::start_env(
        &tmp.join("a"),
        "pgc",
        &format!("127.0.0.1:{}", free_port()),
        &[("EDGEPORT_STORE", &url)],
    );
    assert_eq!(
        names(&a.tctl_ok(&["users", "ls", "--format", "json"])).len(),
        15
    );
    assert!(a.tctl_ok(&["devices", "ls"]).stdout().contains("dev1"));
}

#[test]
fn wrong_database_settings_are_refused_clearly() {
    let pg = postgres();
    let url = database(&pg, "owned");
    let tmp = TempDir::new();
    let first = start(&tmp.join("first"), &url);
    drop(first);
    let password = pg.get("PGPASSWORD").to_string();

    // Another cluster's CA (a fresh data dir) on the same database.
    let (code, log) = start_fails(&tmp.join("stranger"), &url);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("belongs to another cluster or CA"), "{log}");
    assert!(log.contains("copy DATA/ca"), "{log}");

    // A wrong password, and a server that is not there.
    let wrong = url.replace(&password, "not-the-password");
    let port = pg.get("PGPORT").to_string();
    let dead = url.replace(&format!(":{port}/"), &format!(":{}/", free_port()));
    for (case, u) in [("wrong password", wrong), ("no server", dead)] {
        let (code, log) = start_fails(&tmp.join(&case.replace(" ", "-")), &u);
        assert_eq!(code, Some(1), "{case}: {log}");
        assert!(log.contains("postgresql"), "{case}: {log}");
        assert!(!log.contains("panicked"), "{case}: {log}");
        assert!(
            !log.contains(&password),
            "{case}: the password was logged: {log}"
        );
        assert!(
            !log.contains("not-the-password"),
            "{case}: the password was logged: {log}"
        );
    }
}

/// Runs SQL as the server's superuser; returns its output.
fn superuser_sql(pg: &Peer, sql: &str) -> String {
    let psql = Path::new(pg.get("PG_BIN")).join("psql");
    let mut c = Command::new(psql);
    c.args([
        pg.get("PG_SUPERUSER_URL"),
        "-qAt",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ]);
    run(c, None, Duration::from_secs(30))
        .expect_ok("psql")
        .stdout()
}

#[test]
fn tls_to_postgres_is_verified() {
    let pg = postgres();
    let url = database(&pg, "tls");
    let tmp = TempDir::new();
    // A CA of the database's own and a server certificate for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = tmp.join("db-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let data = Path::new(pg.get("PGDATA"));
    let (crt, keyf) = (data.join("server.crt"), data.join("server.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&keyf, key.serialize_pem()).unwrap();
    let owner = std::fs::metadata(data).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for f in [&crt, &keyf] {
        std::os::unix::fs::chown(f, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    superuser_sql(
        &pg,
        &format!("ALTER SYSTEM SET ssl_cert_file = '{}'", crt.display()),
    );
    superuser_sql(
        &pg,
        &format!("ALTER SYSTEM SET ssl_key_file = '{}'", keyf.display()),
    );
    superuser_sql(&pg, "ALTER SYSTEM SET ssl = on");
    superuser_sql(&pg, "SELECT pg_reload_conf()");
    assert!(edgeport_e2e::wait_until(Duration::from_secs(10), || {
        superuser_sql(&pg, "SHOW ssl").trim() == "on"
    }));

    // Verified against the database's CA, with plain text refused.
    let required = url.replace("sslmode=disable", "sslmode=require");
    // Without a word about TLS in the URL, TLS is what the authority asks for.
    let defaulted = url.replace("?sslmode=disable", "");
    let addr = format!("127.0.0.1:{}", free_port());
    let ca = ca_file.to_str().unwrap();
    let auth = Authority::start_env(
        &tmp.join("a"),
        "pgc",
        &addr,
        &[("EDGEPORT_STORE", &required), ("EDGEPORT_STORE_CA", ca)],
    );
    auth.tctl_ok(&["users", "add", "carol", "--logins", "root"]);
    let encrypted = superuser_sql(
        &pg,
        &format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = '{}' AND s.ssl",
            pg.get("PGUSER")
        ),
    );
    assert_ne!(
        encrypted.trim(),
        "0",
        "no encrypted connection from the authority"
    );
    let plain = superuser_sql(
        &pg,
        &format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = '{}' AND NOT s.ssl",
            pg.get("PGUSER")
        ),
    );
    assert_eq!(
        plain.trim(),
        "0",
        "the authority has a plain-text connection"
    );
    drop(auth);

    // A certificate that does not chain to the given roots (here: the system's) is refused.
    let mut cmd = Command::new(bin("authority"));
    cmd.args(["start", "--data-dir"]).arg(tmp.join("a")).args([
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--cluster",
        "pgc",
    ]);
    cmd.env("EDGEPORT_STORE", &required);
    let r = run(cmd, None, Duration::from_secs(60));
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    assert!(r.stderr().contains("certificate"), "{}", r.stderr());
    assert!(!r.stderr().contains(pg.get("PGPASSWORD")), "{}", r.stderr());
    let addr = format!("127.0.0.1:{}", free_port());
    let auth = Authority::start_env(
        &tmp.join("a"),
        "pgc",
        &addr,
        &[("EDGEPORT_STORE", &defaulted), ("EDGEPORT_STORE_CA", ca)],
    );
    auth.tctl_ok(&["users", "ls"]);
}

/// Single sign-on with two authorities sharing the database: the connector saved through
/// one is used by the other, and a login started at one (its state, nonce and PKCE
/// verifier kept in the store) is finished at the other, with a real provider and browser.
#[test]
fn single_sign_on_starts_at_one_authority_and_finishes_at_the_other() {
    use edgeport_e2e::peers::peers_dir;
    use edgeport_net::rpc_client::RpcClient;
    use edgeport_proto::keys::{sha256_hex, KeyPair};
    use edgeport_proto::rpc::{Request, Response, SsoFinishRequest, SsoStartRequest};

    let pg = postgres();
    let idp = Peer::start("oidc.sh", &[], &[("OIDC_USERS", "alice:devs")]);
    let url = database(&pg, "ssoshared");
    let tmp = TempDir::new();
    let a = start(&tmp.join("a"), &url);
    copy_dir(&tmp.join("a/ca"), &tmp.join("b/ca"));
    let b = start(&tmp.join("b"), &url);
    let secret = tmp.join("oidc-secret");
    std::fs::write(&secret, idp.get("CLIENT_SECRET")).unwrap();
    a.tctl_ok(&[
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
    ]);
    b.tctl_ok(&["sso", "map", "devs", "--logins", "root"]);
    let listed = b.tctl_ok(&["sso", "connectors", "ls", "--format", "json"]);
    assert!(listed.stdout().contains("\"oidc\""), "{}", listed.stdout());
    assert!(!listed.stdout().contains(idp.get("CLIENT_SECRET")));

    // Relaying as a gateway does (its identity), start at A and finish at B.
    let gw = Gateway::start(&tmp.join("gw"), &a);
    let ident = edgeport_gateway::identity::load(&gw.data_dir).expect("gateway identity");
    let tls = Arc::new(ident.rpc_client_config().unwrap());
    let redirect = format!("http://127.0.0.1:{}/v1/webapi/oidc/callback", free_port());
    let proof = "tsh's secret";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    edgeport_proto::tls::install_crypto_provider();
    let auth_url = rt.block_on(async {
        let mut rpc = RpcClient::connect(&a.addr, tls.clone()).await.unwrap();
        let start = Request::SsoStart(SsoStartRequest {
            connector: "oidc".into(),
            redirect_uri: redirect.clone(),
            proof_hash: sha256_hex(proof.as_bytes()),
            client_addr: "127.0.0.1:5000".into(),
        });
        match rpc.call(start).await {
            Ok(Response::SsoRedirect { auth_url }) => auth_url,
            other => panic!("SsoStart at A: {other:?}"),
        }
    });
    // The browser logs in at the provider; stop where it would reach tsh's listener.
    let mut browser = Command::new("bash");
    browser
        .arg(peers_dir().join("oidc.sh"))
        .args(["login", &auth_url, "alice", &redirect]);
    let seen = run(browser, None, Duration::from_secs(120));
    let back = seen
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("FINAL_URL=").map(str::to_string))
        .unwrap_or_else(|| panic!("no final URL: {}{}", seen.stdout(), seen.stderr()));
    let param = |name: &str| {
        back.split(['?', '&'])
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {back}"))
            .to_string()
    };
    let (code, state) = (param("code"), param("state"));
    let certs = rt.block_on(async {
        let mut rpc = RpcClient::connect(&b.addr, tls).await.unwrap();
        let finish = Request::SsoFinish(SsoFinishRequest {
            state,
            code,
            proof: proof.into(),
            ssh_public_key: KeyPair::generate().unwrap().public_openssh(),
            ttl_secs: 600,
            client_addr: "127.0.0.1:5000".into(),
        });
        rpc.call(finish).await
    });
    match certs {
        Ok(Response::UserCerts(c)) => assert_eq!(c.user, "alice"),
        other => panic!("SsoFinish at B: {other:?}"),
    }
    let users = names(&a.tctl_ok(&["users", "ls", "--format", "json"]));
    assert!(users.contains(&"alice".into()), "{users:?}");
}

/// `tctl status --format json`'s authorities, by address.
fn authorities(via: &Authority) -> Vec<serde_json::Value> {
    via.tctl_ok(&["status", "--format", "json"]).json()["authorities"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn authority<'a>(list: &'a [serde_json::Value], addr: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|a| a["address"] == addr)
}

fn sign(via: &Authority) -> edgeport_e2e::Run {
    via.tctl(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--logins",
        "root",
        "--format",
        "openssh",
        "--out",
        via.data_dir.join("alice-cert").to_str().unwrap(),
    ])
}

/// Issue 24: every authority registers in the store; `tctl status` lists both, and after a
/// rotation step on one the other is shown lacking the new key (with the remedy), refuses to
/// sign once the cluster signs with a key it does not hold, and follows again once
/// `DATA/ca` is copied to it.
#[test]
fn status_lists_every_authority_and_one_left_behind_by_a_rotation() {
    let pg = postgres();
    let url = database(&pg, "registry");
    let tmp = TempDir::new();
    let a = start(&tmp.join("a"), &url);
    copy_dir(&tmp.join("a/ca"), &tmp.join("b/ca"));
    let b = start(&tmp.join("b"), &url);
    a.tctl_ok(&["users", "add", "alice", "--logins", "root"]);

    // Both are listed through either, each with its address and every key.
    for via in [&a, &b] {
        let list = authorities(via);
        assert_eq!(list.len(), 2, "{list:?}");
        for addr in [&a.addr, &b.addr] {
            let it = authority(&list, addr).unwrap_or_else(|| panic!("{addr} in {list:?}"));
            assert_eq!(it["keys"], "ok", "{it}");
            assert_eq!(it["stale"], false, "{it}");
            assert!(
                it["version"].as_str().is_some_and(|v| !v.is_empty()),
                "{it}"
            );
            assert!(it["remedy"].is_null(), "{it}");
        }
        assert_eq!(authority(&list, &via.addr).unwrap()["answering"], true);
    }
    sign(&b).expect_ok("signing on b before the rotation");

    // A rotation step on a: b lacks the new user CA key.
    a.tctl_ok(&["auth", "rotate", "--type", "user", "--phase", "init"]);
    let list = authorities(&a);
    assert_eq!(authority(&list, &a.addr).unwrap()["keys"], "ok", "{list:?}");
    let lagging = authority(&list, &b.addr).unwrap();
    assert_eq!(lagging["keys"], "missing", "{lagging}");
    let missing = lagging["missing"].as_array().unwrap();
    assert!(
        missing.len() == 1 && missing[0].as_str().unwrap().starts_with("user CA SHA256:"),
        "{lagging}"
    );
    let remedy = lagging["remedy"].as_str().unwrap();
    assert!(
        remedy.contains(&format!("copy DATA/ca from {}", a.addr)),
        "{remedy}"
    );
    let text = a.tctl_ok(&["status"]).stdout();
    assert!(
        text.contains(&format!("{}: lacks user CA SHA256:", b.addr))
            && text.contains(&format!("copy DATA/ca from {}", a.addr)),
        "{text}"
    );
    // b may not start a rotation of its own from its older keys.
    let r = b.tctl(&[
        "auth",
        "rotate",
        "--type",
        "user",
        "--phase",
        "update_clients",
    ]);
    assert!(!r.ok());
    assert!(
        r.stderr()
            .contains("does not follow the cluster's CA rotation")
            && r.stderr().contains("copy DATA/ca from"),
        "{}",
        r.stderr()
    );

    // Once the new key signs, b (which does not hold it) refuses to sign, naming it.
    a.tctl_ok(&[
        "auth",
        "rotate",
        "--type",
        "user",
        "--phase",
        "update_clients",
    ]);
    let mut last = String::new();
    let refused = edgeport_e2e::wait_until(Duration::from_secs(60), || {
        let r = sign(&b);
        last = r.stderr();
        !r.ok() && last.contains("does not hold the user CA key SHA256:")
    });
    assert!(refused, "b still signs: {last}");
    assert!(
        last.contains(&format!("copy DATA/ca from {}", a.addr)),
        "{last}"
    );
    assert_eq!(last.trim().lines().count(), 1, "{last}");
    sign(&a).expect_ok("signing on a with the new key");

    // The operator copies DATA/ca: b takes it at its next check and is in step again.
    copy_dir(&tmp.join("a/ca"), &tmp.join("b/ca"));
    let mut list = Vec::new();
    let caught_up = edgeport_e2e::wait_until(Duration::from_secs(90), || {
        list = authorities(&a);
        authority(&list, &b.addr).is_some_and(|b| b["keys"] == "ok")
    });
    assert!(caught_up, "b still lacks keys: {list:?}");
    sign(&b).expect_ok("signing on b after copying DATA/ca");
    let rotations = b
        .tctl_ok(&["auth", "rotate", "--status", "--format", "json"])
        .json();
    let user = rotations
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "user")
        .unwrap()
        .clone();
    assert_eq!(user["phase"], "update_clients", "{user}");

    // b's whole data dir copied (a cloned VM image) and started elsewhere: the copy has b's
    // id, and both write the one record. Within a heartbeat or two `tctl status` says so
    // with the remedy, and the log of each names the other.
    let cloned = tmp.join("b-clone");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&b.data_dir)
        .arg(&cloned)
        .status()
        .unwrap();
    assert!(cp.success());
    let c = start(&cloned, &url);
    let mut list = Vec::new();
    let noticed = edgeport_e2e::wait_until(Duration::from_secs(90), || {
        list = authorities(&a);
        list.iter().any(|r| {
            r["remedy"]
                .as_str()
                .is_some_and(|m| m.contains("both run with the id"))
        })
    });
    assert!(noticed, "a shared id went unnoticed: {list:?}");
    assert_eq!(list.len(), 2, "{list:?}");
    let text = a.tctl_ok(&["status"]).stdout();
    assert!(
        text.contains("both run with the id") && text.contains("delete its DATA/authority.id"),
        "{text}"
    );
    let both = edgeport_e2e::wait_until(Duration::from_secs(60), || {
        b.proc
            .log_text()
            .contains(&format!("and the authority at {} both run", c.addr))
            && c.proc
                .log_text()
                .contains(&format!("and the authority at {} both run", b.addr))
    });
    assert!(both, "b:\n{}\nc:\n{}", b.proc.log_text(), c.proc.log_text());
}
