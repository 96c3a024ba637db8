//! kubectl to edge clusters through the device tunnel, end to end: a real kube-apiserver
//! (with etcd and RBAC, from `tests/peers/k8s.sh`), real kubectl, the authority, gateway and
//! an agent serving the cluster, tsh and tctl. kubectl is only ever given the gateway's
//! address: the API server is reachable through the device (the agent) alone.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_e2e::fabric::{wait_offline, wait_online, Agent};
use edgeport_e2e::peers::Peer;
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{run, Run};

const PW: &str = "correct horse battery";

fn add_kube_user(c: &Cluster, name: &str, groups: &str) {
    let mut flags = vec!["--logins", "root"];
    if !groups.is_empty() {
        flags.extend(["--kube-groups", groups]);
    }
    c.auth
        .add_user_with(name, PW, &flags)
        .expect_ok("tctl users add");
}

/// kubectl from PyPI (installed by k8s.sh) with its own kubeconfig.
fn kubectl(k8s: &Peer, kubeconfig: &Path, args: &[&str]) -> Run {
    let mut c = Command::new(k8s.get("KUBECTL"));
    c.env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .args(["--request-timeout=30s"])
        .args(args);
    run(c, None, Duration::from_secs(60))
}

/// kubectl as the cluster's admin, straight to the API server (test setup only).
fn admin(k8s: &Peer, args: &[&str]) -> Run {
    kubectl(k8s, Path::new(k8s.get("KUBECONFIG")), args)
}

fn tsh_for(c: &Cluster, home: PathBuf) -> Tsh {
    Tsh::new(home, c.proxy())
}

fn tsh_kube(tsh: &Tsh, kubeconfig: &Path, args: &[&str]) -> Run {
    let mut c = tsh.cmd(args);
    c.env("KUBECONFIG", kubeconfig);
    run(c, None, Duration::from_secs(60))
}

fn pod_manifest(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  containers:\n  - name: c\n    image: busybox\n"
    )
}

/// HTTP status code and body of a curl request (HTTP/1.1) to the gateway.
fn curl(gw_port: u16, path: &str, tls: &Path, extra: &[&str]) -> (String, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--http1.1", "-o", "-", "-w", "\n%{http_code}"])
        .args([
            "--resolve",
            &format!("gateway.edgeport:{gw_port}:127.0.0.1"),
        ])
        .arg("--cacert")
        .arg(tls.with_extension("cas"))
        .args(extra)
        .arg(format!("https://gateway.edgeport:{gw_port}{path}"));
    let r = run(c, None, Duration::from_secs(30));
    let out = r.stdout();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
    // No HTTP answer: curl's own message, for the assertion text.
    let body = if body.is_empty() {
        r.stderr()
    } else {
        body.to_string()
    };
    (code.trim().to_string(), body)
}

fn tls_args(tls: &Path) -> Vec<String> {
    vec![
        "--cert".into(),
        tls.with_extension("crt").display().to_string(),
        "--key".into(),
        tls.with_extension("key").display().to_string(),
    ]
}

#[test]
fn kubectl_through_gateway_and_tunnel() {
    let k8s = Peer::start("k8s.sh", &[], &[]);
    let mut c = Cluster::start("kube-e2e", &[]);
    let agent_kc = k8s.get("AGENT_KUBECONFIG").to_string();
    let apiserver = k8s.get("APISERVER").to_string();
    c.agents.push(Agent::start(
        &c.dir.join("agent-edge1"),
        &c.gw,
        "van-42",
        "fleet=vans",
        &["--kube-cluster", "edge1", "--kubeconfig", &agent_kc],
    ));
    // A second device serving edge2; it goes offline later.
    c.agents.push(Agent::start(
        &c.dir.join("agent-edge2"),
        &c.gw,
        "van-43",
        "",
        &["--kube-cluster", "edge2", "--kubeconfig", &agent_kc],
    ));
    let d = wait_online(&c.tctl, "van-42", None, Duration::from_secs(60));
    assert_eq!(d["kube_cluster"], "edge1");
    wait_online(&c.tctl, "van-43", None, Duration::from_secs(60));
    let ls = c.tctl.ok(&["devices", "ls"]).stdout();
    assert!(ls.contains("KUBE CLUSTER") && ls.contains("edge1"), "{ls}");

    // RBAC in the cluster: `devs` read pods in default (k8s.sh); `deployers` may create
    // config maps.
    let rbac = c.dir.join("deployers.yaml");
    std::fs::write(
        &rbac,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: deployers, namespace: default}\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [get, list, watch, create, patch, update]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: deployers, namespace: default}\nsubjects:\n- {kind: Group, name: deployers, apiGroup: rbac.authorization.k8s.io}\nroleRef: {kind: Role, name: deployers, apiGroup: rbac.authorization.k8s.io}\n",
    )
    .unwrap();
    admin(&k8s, &["apply", "-f", rbac.to_str().unwrap()]).expect_ok("rbac");
    let early = c.dir.join("early.yaml");
    std::fs::write(&early, pod_manifest("early-pod")).unwrap();
    admin(&k8s, &["apply", "-f", early.to_str().unwrap()]).expect_ok("early pod");

    add_kube_user(&c, "alice", "devs");
    add_kube_user(&c, "bob", "deployers");

    // alice: tsh login, tsh kube ls, tsh kube login into a kubeconfig that already holds
    // another context (which must survive logout).
    let alice_dir = c.dir.join("alice");
    std::fs::create_dir_all(&alice_dir).unwrap();
    let alice_kc = alice_dir.join("config");
    std::fs::write(
        &alice_kc,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster: {server: \"https://192.0.2.1:6443\"}\nusers:\n- name: other\n  user: {token: keep-me}\ncontexts:\n- name: other\n  context: {cluster: other, user: other}\ncurrent-context: other\n",
    )
    .unwrap();
    let alice = tsh_for(&c, alice_dir.join("tsh"));
    alice
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let kls = tsh_kube(&alice, &alice_kc, &["kube", "ls"]).expect_ok("tsh kube ls");
    assert!(
        kls.stdout().contains("edge1") && kls.stdout().contains("van-42"),
        "{}",
        kls.stdout()
    );
    let unknown = tsh_kube(&alice, &alice_kc, &["kube", "login", "nope"]);
    assert!(!unknown.ok() && unknown.stderr().contains("unknown Kubernetes cluster"));
    tsh_kube(&alice, &alice_kc, &["kube", "login", "edge1"]).expect_ok("tsh kube login");
    let kc_text = std::fs::read_to_string(&alice_kc).unwrap();
    assert!(kc_text.contains("edgeport-edge1"), "{kc_text}");
    assert!(kc_text.contains("keep-me"), "{kc_text}");
    // kubectl is never told the API server's address.
    let api_port = apiserver.rsplit(':').next().unwrap();
    assert!(!kc_text.contains(&format!(":{api_port}")), "{kc_text}");

    // get pods works through gateway and tunnel.
    let pods = kubectl(
        &k8s,
        &alice_kc,
        &["get", "pods", "-n", "default", "-o", "name"],
    )
    .expect_ok("alice get pods");
    assert!(pods.stdout().contains("pod/early-pod"), "{}", pods.stdout());
    // A new `tsh login` renews the certificate inside the kubectl context too.
    let cert_of = |text: &str| {
        text.lines()
            .find(|l| l.contains("client-certificate-data"))
            .unwrap_or_default()
            .to_string()
    };
    let before = cert_of(&kc_text);
    let relogin = alice
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login again");
    assert!(
        relogin
            .stdout()
            .contains("Updated kubectl context edgeport-edge1"),
        "{}",
        relogin.stdout()
    );
    let renewed = std::fs::read_to_string(&alice_kc).unwrap();
    assert_ne!(
        cert_of(&renewed),
        before,
        "the kubectl context kept the old certificate"
    );
    assert!(renewed.contains("keep-me"), "{renewed}");
    kubectl(
        &k8s,
        &alice_kc,
        &["get", "pods", "-n", "default", "-o", "name"],
    )
    .expect_ok("alice get pods after a new login");
    // Each request is an event in the audit log, with who, which groups, where and the status.
    let ok = edgeport_e2e::wait_until(Duration::from_secs(20), || {
        let r = c.tctl.run(&[
            "audit",
            "search",
            "--type",
            "kube.request",
            "--user",
            "alice",
            "--format",
            "json",
        ]);
        r.code() == Some(0)
            && r.json().as_array().is_some_and(|evs| {
                evs.iter().any(|e| {
                    let f = |k: &str| {
                        e[k].as_str()
                            .or_else(|| e["fields"][k].as_str())
                            .unwrap_or("")
                            .to_string()
                    };
                    f("cluster") == "edge1"
                        && f("verb") == "list"
                        && e["status"] == 200
                        && f("groups").contains("devs")
                        && f("path").ends_with("/pods")
                })
            })
    });
    assert!(
        ok,
        "no kube.request event for alice's get pods: {}",
        c.tctl
            .run(&[
                "audit",
                "search",
                "--type",
                "kube.request",
                "--format",
                "json"
            ])
            .stdout()
    );
    // Through a second gateway that holds no tunnel: it forwards the request to the gateway
    // that holds van-42 (DESIGN section 5), and the API server still sees alice and her groups.
    let gw_b = edgeport_e2e::fabric::Gateway::start(&c.dir.join("gateway-b"), &c.auth);
    let alice_b_dir = c.dir.join("alice-b");
    std::fs::create_dir_all(&alice_b_dir).unwrap();
    let alice_b_kc = alice_b_dir.join("config");
    let alice_b = Tsh::new(alice_b_dir.join("tsh"), &gw_b.addr);
    alice_b
        .login("alice", PW, &gw_b.ca_pin, &[])
        .expect_ok("tsh login at the second gateway");
    tsh_kube(&alice_b, &alice_b_kc, &["kube", "login", "edge1"])
        .expect_ok("tsh kube login at the second gateway");
    assert!(
        std::fs::read_to_string(&alice_b_kc)
            .unwrap()
            .contains(&format!(":{}", gw_b.port)),
        "the kubectl context does not point at the second gateway"
    );
    let pods_b = kubectl(
        &k8s,
        &alice_b_kc,
        &["get", "pods", "-n", "default", "-o", "name"],
    )
    .expect_ok("alice get pods through the second gateway");
    assert!(
        pods_b.stdout().contains("pod/early-pod"),
        "{}",
        pods_b.stdout()
    );
    let refused_b = kubectl(&k8s, &alice_b_kc, &["get", "secrets", "-n", "default"]);
    assert!(
        !refused_b.ok() && refused_b.stderr().contains("User \"alice\""),
        "forwarded request not made as alice: {}",
        refused_b.stderr()
    );
    assert!(
        gw_b.proc.log_text().contains("link to peer gateway up"),
        "{}",
        gw_b.proc.log_text()
    );
    assert!(
        c.gw.proc.log_text().contains("forwarded dial"),
        "{}",
        c.gw.proc.log_text()
    );
    drop(gw_b);

    // RBAC applies to alice's groups.
    for args in [
        &["get", "secrets", "-n", "default"][..],
        &["get", "pods", "-n", "kube-system"][..],
    ] {
        let r = kubectl(&k8s, &alice_kc, args);
        assert!(!r.ok(), "{args:?} should be refused");
        assert!(r.stderr().contains("Forbidden"), "{}", r.stderr());
        assert!(r.stderr().contains("\"alice\""), "{}", r.stderr());
    }
    // --as / --as-group do not escalate: the request is still alice's.
    for args in [
        &["--as=admin", "get", "ns"][..],
        &["--as=alice", "--as-group=system:masters", "get", "ns"][..],
        &[
            "--as=admin",
            "--as-group=system:masters",
            "get",
            "secrets",
            "-n",
            "default",
        ][..],
    ] {
        let r = kubectl(&k8s, &alice_kc, args);
        assert!(!r.ok(), "{args:?} escalated: {}", r.stdout());
        assert!(r.stderr().contains("Forbidden"), "{}", r.stderr());
        assert!(r.stderr().contains("User \"alice\""), "{}", r.stderr());
    }

    // A watch streams a pod the admin creates afterwards.
    let mut watch = Command::new(k8s.get("KUBECTL"))
        .env("KUBECONFIG", &alice_kc)
        .env("HOME", &alice_dir)
        .args(["get", "pods", "-n", "default", "-w", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watch's initial list arrives first, then the new pod.
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watch list");
    assert!(first.contains("early-pod"), "{first}");
    let late = c.dir.join("late.yaml");
    std::fs::write(&late, pod_manifest("late-pod")).unwrap();
    admin(&k8s, &["apply", "-f", late.to_str().unwrap()]).expect_ok("late pod");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("late-pod") => {
                seen = true;
                break;
            }
            _ => {}
        }
    }
    assert!(seen, "the watch did not stream late-pod");

    // bob may create config maps: kubectl apply works through Edgeport.
    let bob_dir = c.dir.join("bob");
    std::fs::create_dir_all(&bob_dir).unwrap();
    let bob_kc = bob_dir.join("config");
    let bob = tsh_for(&c, bob_dir.join("tsh"));
    bob.login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("bob login");
    tsh_kube(&bob, &bob_kc, &["kube", "login", "edge1"]).expect_ok("bob kube login");
    let cm = bob_dir.join("cm.yaml");
    std::fs::write(
        &cm,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: from-bob, namespace: default}\ndata: {hello: world}\n",
    )
    .unwrap();
    kubectl(
        &k8s,
        &bob_kc,
        &["apply", "--validate=false", "-f", cm.to_str().unwrap()],
    )
    .expect_ok("bob apply");
    let got = admin(
        &k8s,
        &[
            "get",
            "configmap",
            "from-bob",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.hello}",
        ],
    )
    .expect_ok("admin sees the config map");
    assert_eq!(got.stdout().trim(), "world");
    // ... and alice may not (a new object: applying bob's unchanged one writes nothing).
    let cm2 = alice_dir.join("cm.yaml");
    std::fs::write(
        &cm2,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: from-alice, namespace: default}\ndata: {a: b}\n",
    )
    .unwrap();
    let r = kubectl(
        &k8s,
        &alice_kc,
        &["apply", "--validate=false", "-f", cm2.to_str().unwrap()],
    );
    assert!(
        !r.ok() && r.stderr().contains("Forbidden"),
        "{}",
        r.stderr()
    );

    // tctl auth sign --format kubernetes: a kubeconfig for CI jobs.
    let ci_kc = c.dir.join("ci.kubeconfig");
    c.tctl.ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--format",
        "kubernetes",
        "--kube-cluster",
        "edge1",
        "--proxy",
        c.proxy(),
        "--out",
        ci_kc.to_str().unwrap(),
    ]);
    kubectl(&k8s, &ci_kc, &["get", "pods", "-n", "default"]).expect_ok("CI kubeconfig");

    // Bad input: each gets a clear HTTP error, and alice's watch and requests go on.
    let gw_port = c.gw.port;
    let tls = sign_tls(&c, "alice", "alice-tls");
    let mine = tls_args(&tls);
    let mine: Vec<&str> = mine.iter().map(String::as_str).collect();
    // Unknown cluster.
    let (code, body) = curl(
        gw_port,
        "/k8s/nope/api/v1/namespaces/default/pods",
        &tls,
        &mine,
    );
    assert_eq!(code, "404", "{body}");
    assert!(
        body.contains("unknown Kubernetes cluster \\\"nope\\\""),
        "{body}"
    );
    let r = kubectl(
        &k8s,
        &alice_kc,
        &[
            "--server",
            &format!("https://{}/k8s/nope", c.proxy()),
            "get",
            "pods",
        ],
    );
    // kubectl shows its own text for a 404 during discovery; the body above carries ours.
    assert!(!r.ok() && r.stderr().contains("NotFound"), "{}", r.stderr());
    // Offline device.
    let idx = c.agents.iter().position(|a| a.id == "van-43").unwrap();
    c.agents[idx].proc.stop();
    wait_offline(&c.tctl, "van-43", Duration::from_secs(60));
    let (code, body) = curl(
        gw_port,
        "/k8s/edge2/api/v1/namespaces/default/pods",
        &tls,
        &mine,
    );
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("van-43 is offline"), "{body}");
    // Oversized header block (64 KiB limit): 431 on HTTP/1.1.
    let big = format!("X-Big: {}", "a".repeat(80 * 1024));
    let mut args = mine.clone();
    args.extend(["-H", &big]);
    let (code, _) = curl(
        gw_port,
        "/k8s/edge1/api/v1/namespaces/default/pods",
        &tls,
        &args,
    );
    assert_eq!(code, "431");
    // (Not over HTTP/2: curl's own HTTP/2 client refuses to send a header block this big.
    // The gateway applies the same limit to HTTP/2 requests in its handler.)
    // A client certificate from another CA (the Kubernetes cluster's own admin cert).
    let pki = k8s.dir.join("pki");
    let foreign = [
        "--cert".to_string(),
        pki.join("admin.crt").display().to_string(),
        "--key".to_string(),
        pki.join("admin.key").display().to_string(),
    ];
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    let (code, body) = curl(
        gw_port,
        "/k8s/edge1/api/v1/namespaces/default/pods",
        &tls,
        &foreign,
    );
    assert_eq!(code, "401", "{body}");
    assert!(
        body.contains("not issued by this Edgeport cluster"),
        "{body}"
    );
    // No certificate at all.
    let (code, body) = curl(gw_port, "/k8s/edge1/api", &tls, &[]);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("no client certificate"), "{body}");
    // An expired certificate.
    let short = c.dir.join("alice-short");
    c.tctl.ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--format",
        "tls",
        "--ttl",
        "2s",
        "--out",
        short.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let sa = tls_args(&short);
    let sa: Vec<&str> = sa.iter().map(String::as_str).collect();
    let (code, body) = curl(gw_port, "/k8s/edge1/api", &short, &sa);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("expired"), "{body}");
    // A user who no longer exists (certificate still valid).
    add_kube_user(&c, "dave", "devs");
    let dave = sign_tls(&c, "dave", "dave-tls");
    c.tctl.ok(&["users", "rm", "dave"]);
    let da = tls_args(&dave);
    let da: Vec<&str> = da.iter().map(String::as_str).collect();
    let (code, body) = curl(gw_port, "/k8s/edge1/api", &dave, &da);
    assert_eq!(code, "403", "{body}");
    assert!(
        body.contains("not found") || body.contains("was removed"),
        "{body}"
    );
    // A locked user is refused at once, and a watch bob has open is ended by the device.
    let mut bob_watch = Command::new(k8s.get("KUBECTL"))
        .env("KUBECONFIG", &bob_kc)
        .env("HOME", &bob_dir)
        .args(["get", "configmaps", "-n", "default", "-w", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(bob_watch.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("from-bob"), "{first}");
    // bob's grant is fresh (his watch just started); the lock still applies to his very next
    // request: `tctl lock` returns only after the gateway has dropped its reusable grants.
    kubectl(&k8s, &bob_kc, &["get", "configmaps", "-n", "default"]).expect_ok("bob before");
    c.tctl
        .ok(&["lock", "--user", "bob", "--message", "investigation"]);
    let r = kubectl(&k8s, &bob_kc, &["get", "configmaps", "-n", "default"]);
    assert!(
        !r.ok() && (r.stderr().contains("locked") || r.stderr().contains("Forbidden")),
        "bob's first request after the lock was not refused: {}",
        r.stderr()
    );
    let ended = edgeport_e2e::wait_until(Duration::from_secs(40), || {
        bob_watch.try_wait().unwrap().is_some()
    });
    let _ = bob_watch.kill();
    let _ = bob_watch.wait();
    assert!(ended, "bob's watch survived the lock");
    assert!(
        c.agents[0]
            .proc
            .log_text()
            .contains("ending a Kubernetes stream: user is locked"),
        "the device did not end bob's stream"
    );
    // Other users are untouched: alice's watch is still running and her requests work.
    assert!(watch.try_wait().unwrap().is_none(), "the watch ended");
    kubectl(&k8s, &alice_kc, &["get", "pods", "-n", "default"]).expect_ok("alice after bad input");
    // A device lock: the gateway cuts streams to that device at once (the device itself is
    // not trusted to), alice's watch included.
    c.tctl
        .ok(&["lock", "--device", "van-42", "--message", "stolen van"]);
    let cut = edgeport_e2e::wait_until(Duration::from_secs(40), || {
        watch.try_wait().unwrap().is_some()
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(cut, "alice's watch to the locked device survived");
    assert!(
        c.gw.proc.log_text().contains("kube stream cut: locked"),
        "the gateway did not cut it"
    );
    c.tctl.ok(&["unlock", "--device", "van-42"]);

    // Requests refused after the certificate checked out are the user's attempts, audited
    // with why: bob's after his lock, alice's to a cluster no device serves.
    let refusal = |user: &str, cluster: &str, why: &str| {
        edgeport_e2e::wait_until(Duration::from_secs(20), || {
            let r = c.tctl.run(&[
                "audit",
                "search",
                "--type",
                "kube.refused",
                "--user",
                user,
                "--format",
                "json",
            ]);
            r.code() == Some(0)
                && r.json().as_array().is_some_and(|evs| {
                    evs.iter().any(|e| {
                        let f = |k: &str| {
                            e[k].as_str()
                                .or_else(|| e["fields"][k].as_str())
                                .unwrap_or("")
                                .to_string()
                        };
                        f("cluster") == cluster && f("error").contains(why)
                    })
                })
        })
    };
    assert!(
        refusal("bob", "edge1", "locked"),
        "no kube.refused event for bob's locked request: {}",
        c.tctl
            .run(&[
                "audit",
                "search",
                "--type",
                "kube.refused",
                "--format",
                "json"
            ])
            .stdout()
    );
    assert!(
        refusal("alice", "nope", "no device serves"),
        "no kube.refused event for alice's unknown cluster"
    );

    // The gateway logged each request (the audit hook) without secrets.
    let log = c.gw.proc.log_text();
    assert!(
        log.contains("kube.request") && log.contains("verb=list"),
        "no audit lines"
    );
    assert!(!log.contains("PRIVATE KEY") && !log.contains(k8s.get("AGENT_TOKEN")));

    // tsh logout removes the edgeport context (only it); kubectl then fails.
    alice.run(&["logout"], None).expect_ok("tsh logout");
    let kc_text = std::fs::read_to_string(&alice_kc).unwrap();
    assert!(!kc_text.contains("edgeport-edge1"), "{kc_text}");
    assert!(kc_text.contains("keep-me"), "{kc_text}");
    let r = kubectl(
        &k8s,
        &alice_kc,
        &["--context", "edgeport-edge1", "get", "pods"],
    );
    assert!(!r.ok());
}

// ---------------------------------------------------------------------------------------
// Upgrade splice. No kubelet can run here, so `kubectl exec`/`port-forward` cannot reach a
// pod; instead a small local HTTPS server that answers a WebSocket upgrade and then echoes
// bytes is configured as the API server of cluster `ws1`. The test upgrades through gateway
// and tunnel and checks that bytes come back unchanged, and what headers the "API server"
// received (impersonation set by the agent, the client's own stripped).
// ---------------------------------------------------------------------------------------

struct EchoServer {
    port: u16,
    ca_pem: String,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

fn ws_accept(key: &str) -> String {
    use base64_engine::encode;
    let mut d = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    d.update(key.as_bytes());
    d.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85");
    encode(d.finish().as_ref())
}

/// Minimal base64 (the tests crate has no base64 dependency).
mod base64_engine {
    pub fn encode(data: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn start_echo_server() -> EchoServer {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    let cfg = Arc::new(cfg);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let heads2 = heads.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let cfg = cfg.clone();
            let heads = heads2.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                heads.lock().unwrap().push(head.clone());
                let key = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("sec-websocket-key:")
                            .then(|| l.split_once(':').unwrap().1.trim().to_string())
                    })
                    .unwrap_or_default();
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    ws_accept(&key)
                );
                s.write_all(resp.as_bytes()).unwrap();
                s.flush().unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() || s.flush().is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    EchoServer {
        port,
        ca_pem: ca_cert.pem(),
        heads,
    }
}

/// A TLS client to the gateway's front door with a `tctl auth sign --format tls` identity.
/// A one-hour TLS identity for `user` (`tctl auth sign --format tls`), as
/// `DIR/NAME.{crt,key,cas}`; returns `DIR/NAME`.
fn sign_tls(c: &Cluster, user: &str, name: &str) -> PathBuf {
    let out = c.dir.join(name);
    c.tctl.ok(&[
        "auth",
        "sign",
        "--user",
        user,
        "--format",
        "tls",
        "--out",
        out.to_str().unwrap(),
    ]);
    out
}

fn front_door(
    gw_port: u16,
    tls: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    front_door_as(gw_port, tls, true)
}

/// A TLS connection to the front door (HTTP/1.1), with the client certificate of `tls` or,
/// without `client_cert`, none (the CA still comes from `tls`).
fn front_door_as(
    gw_port: u16,
    tls: &Path,
    client_cert: bool,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let ca = pem::parse(std::fs::read(tls.with_extension("cas")).unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.contents().to_vec().into()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = if client_cert {
        let cert = pem::parse(std::fs::read(tls.with_extension("crt")).unwrap()).unwrap();
        let key = pem::parse(std::fs::read(tls.with_extension("key")).unwrap()).unwrap();
        builder
            .with_client_auth_cert(
                vec![cert.contents().to_vec().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.contents().to_vec().into()),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "gateway.edgeport".try_into().unwrap())
        .unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", gw_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.set_nodelay(true).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "eof in head: {head:?}");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).to_string()
}

/// A cluster whose agent `ws-dev` serves Kubernetes cluster `ws1` from the echo server (which
/// records every request head it gets).
fn echo_cluster(name: &str) -> (EchoServer, Cluster) {
    let echo = start_echo_server();
    let mut c = Cluster::start(name, &[]);
    let kc = c.dir.join("ws.kubeconfig");
    let ca = c.dir.join("ws-ca.pem");
    std::fs::write(&ca, &echo.ca_pem).unwrap();
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: ws\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: agent-secret-token\ncontexts:\n- name: ws\n  context:\n    cluster: ws\n    user: agent\ncurrent-context: ws\n",
            echo.port,
            ca.display()
        ),
    )
    .unwrap();
    c.agents.push(Agent::start(
        &c.dir.join("agent-ws"),
        &c.gw,
        "ws-dev",
        "",
        &[
            "--kube-cluster",
            "ws1",
            "--kubeconfig",
            kc.to_str().unwrap(),
        ],
    ));
    wait_online(&c.tctl, "ws-dev", None, Duration::from_secs(60));
    (echo, c)
}

#[test]
fn upgrade_is_spliced_byte_for_byte() {
    let (echo, c) = echo_cluster("kube-ws");
    add_kube_user(&c, "carol", "ops,viewers");
    let tls = sign_tls(&c, "carol", "carol-tls");

    let mut s = front_door(c.gw.port, &tls);
    let req = "GET /k8s/ws1/api/v1/namespaces/default/pods/p/exec?command=sh HTTP/1.1\r\n\
        Host: gateway.edgeport\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Authorization: Bearer stolen\r\nImpersonate-User: admin\r\n\
        Impersonate-Group: system:masters\r\n\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.flush().unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains(&ws_accept("dGhlIHNhbXBsZSBub25jZQ==")),
        "accept key not relayed: {head}"
    );
    // Byte for byte: every value 0..=255, then a larger pseudo-random block.
    let mut payload: Vec<u8> = (0..=255u8).collect();
    let mut x = 0x1234_5678u32;
    for _ in 0..300_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        payload.push(x as u8);
    }
    let writer_payload = payload.clone();
    let mut back = vec![0u8; payload.len()];
    // Write in chunks while reading (the echo's buffers are finite).
    let mut written = 0;
    let mut read = 0;
    while read < payload.len() {
        if written < payload.len() {
            let n = (payload.len() - written).min(16 * 1024);
            s.write_all(&writer_payload[written..written + n]).unwrap();
            s.flush().unwrap();
            written += n;
        }
        let n = s.read(&mut back[read..]).unwrap();
        assert!(n > 0, "eof after {read} bytes");
        read += n;
    }
    assert!(back == payload, "bytes changed in the splice");

    // What the "API server" saw: the agent's token and carol's identity, nothing of the
    // client's.
    let heads = echo.heads.lock().unwrap().clone();
    let h = heads.last().unwrap().to_ascii_lowercase();
    assert!(
        h.starts_with("get /api/v1/namespaces/default/pods/p/exec?command=sh "),
        "{h}"
    );
    assert!(
        h.contains("authorization: bearer agent-secret-token"),
        "{h}"
    );
    assert!(
        !h.contains("stolen") && !h.contains("admin") && !h.contains("system:masters"),
        "{h}"
    );
    assert!(h.contains("impersonate-user: carol"), "{h}");
    assert!(
        h.contains("impersonate-group: ops") && h.contains("impersonate-group: viewers"),
        "{h}"
    );
    // The session start was audited; no secret in the logs.
    let log = c.gw.proc.log_text();
    assert!(log.contains("kube.session.start"), "{log}");
    assert!(!c.agents[0].proc.log_text().contains("agent-secret-token"));
}

// ---------------------------------------------------------------------------------------
// Measurements for docs/benchmarks.md (`cargo test -p edgeport-e2e --test kube -- --ignored
// --nocapture kube_bench`). Prints numbers; asserts only that things work.
// ---------------------------------------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// One keep-alive GET; returns the status line.
fn get_once(s: &mut Tls, path: &str, auth: Option<&str>) -> String {
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    // One write: one TLS record, one segment (no Nagle/delayed-ACK stalls in the client).
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.flush().unwrap();
    let head = read_head(s);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head.lines().next().unwrap().to_string()
}

fn direct_conn(api: &str, ca: &Path) -> Tls {
    let ca = pem::parse(std::fs::read(ca).unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.contents().to_vec().into()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr = api.trim_start_matches("https://");
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "127.0.0.1".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Requests per second over `conns` keep-alive connections for `secs` seconds.
fn rps(conns: usize, secs: u64, mk: impl Fn() -> (Tls, String, Option<String>) + Sync) -> f64 {
    let total = std::sync::atomic::AtomicUsize::new(0);
    let end = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|sc| {
        for _ in 0..conns {
            sc.spawn(|| {
                let (mut s, path, auth) = mk();
                while Instant::now() < end {
                    let st = get_once(&mut s, &path, auth.as_deref());
                    assert!(st.contains(" 200 "), "{st}");
                    total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    total.into_inner() as f64 / secs as f64
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[test]
#[ignore = "benchmark: run explicitly"]
fn kube_bench() {
    let k8s = Peer::start("k8s.sh", &[], &[]);
    let mut c = Cluster::start("kube-bench", &[]);
    let agent_kc = k8s.get("AGENT_KUBECONFIG").to_string();
    c.agents.push(Agent::start(
        &c.dir.join("agent-edge1"),
        &c.gw,
        "van-42",
        "",
        &["--kube-cluster", "edge1", "--kubeconfig", &agent_kc],
    ));
    wait_online(&c.tctl, "van-42", None, Duration::from_secs(60));
    add_kube_user(&c, "alice", "devs");
    let dir = c.dir.join("alice");
    std::fs::create_dir_all(&dir).unwrap();
    let kc = dir.join("config");
    let alice = tsh_for(&c, dir.join("tsh"));
    alice
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("login");
    tsh_kube(&alice, &kc, &["kube", "login", "edge1"]).expect_ok("kube login");

    // kubectl get pods: through Edgeport vs straight to the API server as the agent
    // impersonating the same identity (same RBAC work). Same HOME: same discovery cache.
    let direct = |args: &[&str]| {
        let mut a = vec!["--as=alice", "--as-group=devs"];
        a.extend_from_slice(args);
        kubectl(&k8s, Path::new(&agent_kc), &a)
    };
    const N: usize = 15;
    let (mut via, mut straight) = (Vec::new(), Vec::new());
    kubectl(&k8s, &kc, &["get", "pods", "-n", "default"]).expect_ok("warm up");
    direct(&["get", "pods", "-n", "default"]).expect_ok("warm up");
    for _ in 0..N {
        let t = Instant::now();
        kubectl(&k8s, &kc, &["get", "pods", "-n", "default"]).expect_ok("via");
        via.push(t.elapsed());
        let t = Instant::now();
        direct(&["get", "pods", "-n", "default"]).expect_ok("direct");
        straight.push(t.elapsed());
    }
    println!(
        "BENCH kubectl get pods (median of {N}): via Edgeport {:.1} ms, direct {:.1} ms",
        median_ms(via),
        median_ms(straight)
    );

    // Small GET (/version) requests per second through one device tunnel.
    let tls = sign_tls(&c, "alice", "alice-tls");
    let port = c.gw.port;
    for conns in [1, 8] {
        let r = rps(conns, 5, || {
            (front_door(port, &tls), "/k8s/edge1/version".into(), None)
        });
        println!("BENCH GET /version via Edgeport, {conns} connection(s): {r:.0} req/s");
    }
    let api = k8s.get("APISERVER").to_string();
    let ca = PathBuf::from(k8s.get("CA_FILE"));
    let token = k8s.get("ADMIN_TOKEN").to_string();
    for conns in [1, 8] {
        let r = rps(conns, 5, || {
            (
                direct_conn(&api, &ca),
                "/version".into(),
                Some(token.clone()),
            )
        });
        println!("BENCH GET /version direct, {conns} connection(s): {r:.0} req/s");
    }
}

/// A compromised gateway forwards a Kubernetes request with a valid ticket for carol but
/// writes `system:masters` and another user into the header: the holding gateway and the
/// device take the identity from the ticket, so the API server sees carol and her groups.
#[test]
fn a_rogue_gateway_cannot_choose_whom_the_device_impersonates() {
    use edgeport_proto::rpc::{Request, Response};
    use edgeport_proto::tunnel::{ClientReply, Service, StreamHeader};
    let (echo, c) = echo_cluster("kube-rogue");
    add_kube_user(&c, "carol", "ops,viewers");
    let tls = sign_tls(&c, "carol", "carol-tls");
    let carol_pem = std::fs::read_to_string(format!("{}.crt", tls.display())).unwrap();
    let carol = edgeport_proto::keys::first_cert_der(&carol_pem).unwrap();
    // Gateway A joins; the attacker holds its identity.
    let gw_a = edgeport_e2e::fabric::Gateway::start(&c.dir.join("gateway-a"), &c.auth);
    let stolen = edgeport_e2e::rogue::StolenGateway::from_data_dir(&gw_a.data_dir);
    let grant = stolen
        .ask(
            &c.tctl.addr,
            Request::AuthorizeDial {
                user_cert_der: carol,
                device: "ws-dev".into(),
                service: Service::Kube,
            },
        )
        .unwrap();
    let Response::DialAllowed(grant) = grant else {
        panic!("{grant:?}")
    };
    let (reply, mut s) = stolen.forward(
        &c.gw.addr,
        "ws-dev",
        StreamHeader {
            service: Service::Kube,
            user: Some("admin".into()),
            session_id: "0123456789abcdef".into(),
            client_addr: "198.51.100.7:4242".into(),
            kube_groups: vec!["system:masters".into()],
            kube_users: vec!["admin".into()],
            ticket: grant.ticket,
            via: None,
        },
    );
    assert!(matches!(reply, ClientReply::DialOk { .. }), "{reply:?}");
    s.write_all(
        b"GET /api/v1/namespaces/kube-system/secrets HTTP/1.1\r\nHost: kubernetes\r\n\
          Impersonate-User: admin\r\nImpersonate-Group: system:masters\r\n\r\n",
    )
    .unwrap();
    s.flush().unwrap();
    // The device answers (or closes) only after the API server has seen the request.
    let mut answer = [0u8; 512];
    let _ = s.read(&mut answer);
    let heads = echo.heads.lock().unwrap().clone();
    let head = heads
        .iter()
        .find(|h| h.contains("/kube-system/secrets"))
        .unwrap_or_else(|| panic!("the request never reached the API server: {heads:?}"))
        .to_ascii_lowercase();
    assert!(head.contains("impersonate-user: carol"), "{head}");
    assert!(head.contains("impersonate-group: ops"), "{head}");
    assert!(
        !head.contains("system:masters") && !head.contains("impersonate-user: admin"),
        "{head}"
    );
}

type FrontDoor = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A request for a cluster nobody serves (the gateway answers it itself).
fn get_missing(s: &mut FrontDoor) {
    s.write_all(b"GET /k8s/no-such-cluster/api HTTP/1.1\r\nHost: gateway.edgeport\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
}

/// Everything until the connection ends (end of stream or a reset), and how long that took.
fn read_to_close(s: &mut FrontDoor) -> (Duration, String) {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let mut all = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (t.elapsed(), String::from_utf8_lossy(&all).to_string()),
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// The front door answers a refused client once and closes the connection, and checks a
/// certificate's expiry at every request of a kept-alive connection.
#[test]
fn refused_and_expired_clients_are_disconnected() {
    let (_echo, c) = echo_cluster("kube-refuse");
    add_kube_user(&c, "erin", "ops");
    let short = c.dir.join("erin-short");
    c.tctl.ok(&[
        "auth",
        "sign",
        "--user",
        "erin",
        "--format",
        "tls",
        "--ttl",
        "8s",
        "--out",
        short.to_str().unwrap(),
    ]);
    // An exec session (an upgrade) opened with the short certificate: it is no longer the
    // HTTP connection's once upgraded, and still ends with the certificate.
    let mut exec = front_door(c.gw.port, &short);
    exec.write_all(
        b"GET /k8s/ws1/api/v1/namespaces/default/pods/p/exec?command=sh HTTP/1.1\r\n\
          Host: gateway.edgeport\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    exec.flush().unwrap();
    let head = read_head(&mut exec);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    exec.write_all(b"ping").unwrap();
    exec.flush().unwrap();
    let mut pong = [0u8; 4];
    exec.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");
    // No client certificate: 401, then the connection closes (it used to stay open).
    let mut anon = front_door_as(c.gw.port, &short, false);
    get_missing(&mut anon);
    let (took, answer) = read_to_close(&mut anon);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("no client certificate"), "{answer}");
    assert!(
        took < Duration::from_secs(20),
        "the refused connection stayed open {took:?}"
    );
    // A certificate that expires while its connection is kept alive: the first request is
    // served (404: no such cluster), the one after expiry is refused and the connection closes.
    let mut s = front_door(c.gw.port, &short);
    get_missing(&mut s);
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // The rest of the answer: a sized body by its length, a chunked one to the empty chunk.
    let lower = head.to_ascii_lowercase();
    match lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
    {
        Some(n) => {
            let mut body = vec![0u8; n.trim().parse().unwrap()];
            s.read_exact(&mut body).unwrap();
        }
        None => {
            let mut rest = Vec::new();
            let mut b = [0u8; 1];
            while !rest.ends_with(b"0\r\n\r\n") {
                assert_eq!(s.read(&mut b).unwrap(), 1, "eof in the body after {head}");
                rest.push(b[0]);
            }
        }
    }
    // (8 s of validity, checked against the gateway's clock.) The connection ends with its
    // certificate: closed by then, or a request that races the close is refused as expired.
    std::thread::sleep(Duration::from_secs(9));
    let _ = s.write_all(b"GET /k8s/no-such-cluster/api HTTP/1.1\r\nHost: gateway.edgeport\r\n\r\n");
    let _ = s.flush();
    let (took, answer) = read_to_close(&mut s);
    assert!(
        answer.is_empty() || (answer.starts_with("HTTP/1.1 401") && answer.contains("expired")),
        "a request after the certificate expired was answered: {answer}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the expired connection stayed open {took:?}"
    );
    // The exec session ended with the certificate too (reading it waits at most the 30 s
    // read timeout, which would count as open).
    let (took, _) = read_to_close(&mut exec);
    assert!(
        took < Duration::from_secs(20),
        "the exec session outlived its certificate by {took:?} more"
    );
    assert!(
        edgeport_e2e::wait_until(Duration::from_secs(10), || c
            .gw
            .proc
            .log_text()
            .contains("kube session ended: the user's certificate expired")),
        "the gateway did not say why the exec session ended"
    );
}
