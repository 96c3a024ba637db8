//! Access requests (issue 29), end to end with real processes: a user asks for a role its
//! roles let it ask for, an administrator approves or denies with tctl, the user's next
//! certificate carries the role for the approved time only and reaches a device only that
//! role reaches; an approval expires on time; a user without the permission, a self-review
//! and a request a gateway forged or replayed are refused; everything is audited.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use edgeport_e2e::rogue::StolenGateway;
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{wait_until, Run};
use edgeport_net::rpc_client::RpcClientError;
use edgeport_proto::keys::{first_cert_der, KeyPair};
use edgeport_proto::rpc::{
    sign_user_action, AccessAction, Request, Response, SignedUserAction, UserAction,
};
use serde_json::Value;

const PW: &str = "correct horse battery";

/// A cluster with a van (reached by role `field`) and a production device reached only by
/// role `prod-access`, which holders of `field` may request.
fn cluster(name: &str) -> Cluster {
    let c = Cluster::start(name, &[("van1", "fleet=vans"), ("prod1", "env=prod")]);
    c.tctl
        .ok(&["roles", "add", "prod-access", "--allow", "env=prod"]);
    c.tctl.ok(&[
        "roles",
        "add",
        "field",
        "--allow",
        "fleet=vans",
        "--request-roles",
        "prod-access",
    ]);
    c.tctl
        .ok(&["roles", "add", "vans", "--allow", "fleet=vans"]);
    c.tctl.ok(&[
        "roles",
        "add",
        "lead",
        "--allow",
        "fleet=vans",
        "--request-roles",
        "prod-access",
        "--review-roles",
        "prod-access",
    ]);
    c
}

fn add_user(c: &Cluster, name: &str, roles: &str) {
    c.auth
        .add_user_with(name, PW, &["--logins", "root", "--roles", roles])
        .expect_ok("tctl users add");
}

fn login(c: &Cluster, name: &str) -> Tsh {
    let tsh = Tsh::new(c.dir.join(&format!("tsh-{name}")), c.proxy());
    tsh.login(name, PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    tsh
}

/// `tsh request create`: the id it prints.
fn request(tsh: &Tsh, roles: &str, reason: &str) -> String {
    let r = tsh
        .run(
            &["request", "create", "--roles", roles, "--reason", reason],
            None,
        )
        .expect_ok("tsh request create");
    let id = r.stdout().trim().to_string();
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "not a request id: {id:?}"
    );
    id
}

/// The request `id` as `tctl requests ls --format json` shows it.
fn listed(c: &Cluster, id: &str) -> Value {
    let all = c.tctl.ok(&["requests", "ls", "--format", "json"]).json();
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("request {id} not listed: {all}"))
        .clone()
}

fn status(tsh: &Tsh) -> Value {
    tsh.run(&["status", "--format", "json"], None)
        .expect_ok("tsh status")
        .json()
}

fn roles_of(tsh: &Tsh) -> Vec<String> {
    status(tsh)["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

fn refused(r: &Run, expect: &str) {
    assert!(
        !r.ok() && r.stderr().contains(expect),
        "expected a refusal with {expect:?}:\nstdout: {}\nstderr: {}",
        r.stdout(),
        r.stderr()
    );
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());
}

/// The audit events of `kind`, as `tctl audit search` shows them.
fn audited(c: &Cluster, kind: &str) -> Vec<Value> {
    c.tctl
        .ok(&["audit", "search", "--type", kind, "--format", "json"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn an_approval_puts_the_role_in_the_next_certificate_and_a_denial_does_not() {
    let c = cluster("req");
    add_user(&c, "bob", "field");
    let bob = login(&c, "bob");
    bob.run(&["ssh", "van1", "true"], None)
        .expect_ok("bob reaches the van");
    refused(&bob.run(&["ssh", "prod1", "true"], None), "do not allow");

    let id = request(&bob, "prod-access", "incident 42");
    let r = listed(&c, &id);
    assert_eq!(r["state"], "pending", "{r}");
    assert_eq!(r["user"], "bob", "{r}");
    assert_eq!(r["reason"], "incident 42", "{r}");
    assert_eq!(r["roles"][0], "prod-access", "{r}");
    let mine = bob
        .run(&["request", "ls", "--format", "json"], None)
        .expect_ok("tsh request ls")
        .json();
    assert!(
        mine.as_array().unwrap().iter().any(|x| x["id"] == id),
        "{mine}"
    );
    // Pending is nothing yet.
    bob.login("bob", PW, &c.gw.ca_pin, &[]).expect_ok("login");
    assert_eq!(roles_of(&bob), ["field"]);

    let out = c
        .tctl
        .ok(&["requests", "approve", &id, "--reason", "go", "--ttl", "1h"])
        .stdout();
    assert!(out.contains("approved"), "{out}");
    let r = listed(&c, &id);
    assert_eq!(r["state"], "approved", "{r}");
    assert_eq!(r["reviewer"], "admin admin", "{r}");
    // The certificate from before the approval does not carry the role.
    refused(&bob.run(&["ssh", "prod1", "true"], None), "do not allow");
    // The next one does, and ends no later than the approval.
    bob.login("bob", PW, &c.gw.ca_pin, &[]).expect_ok("login");
    assert_eq!(roles_of(&bob), ["field", "prod-access"]);
    let until = status(&bob)["valid_until"].as_str().unwrap().to_string();
    let expires = r["expires"].as_str().unwrap();
    assert!(
        until.as_str() <= expires,
        "cert until {until}, approval {expires}"
    );
    bob.run(&["ssh", "prod1", "true"], None)
        .expect_ok("the approved role reaches the production device");
    let ls = bob
        .run(&["ls", "--format", "json"], None)
        .expect_ok("tsh ls")
        .json();
    let ids: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"prod1") && ids.contains(&"van1"), "{ls}");
    bob.run(&["ssh", "van1", "true"], None)
        .expect_ok("and the own role still the van");
    // A decided request cannot be decided again.
    let again = c.tctl.run(&["requests", "deny", &id]);
    refused(&again, "already approved");

    // A denial: the request is closed and grants nothing.
    add_user(&c, "carol", "field");
    let carol = login(&c, "carol");
    let id2 = request(&carol, "prod-access", "curious");
    c.tctl
        .ok(&["requests", "deny", &id2, "--reason", "no incident"]);
    let r = listed(&c, &id2);
    assert_eq!(r["state"], "denied", "{r}");
    assert_eq!(r["review_reason"], "no incident", "{r}");
    refused(
        &c.tctl.run(&["requests", "approve", &id2]),
        "already denied",
    );
    carol
        .login("carol", PW, &c.gw.ca_pin, &[])
        .expect_ok("login");
    assert_eq!(roles_of(&carol), ["field"]);
    refused(&carol.run(&["ssh", "prod1", "true"], None), "do not allow");

    // Requests and decisions are in the authority's audit log.
    let created = audited(&c, "access_request.created");
    assert!(
        created
            .iter()
            .any(|e| e["user"] == "bob" && e["request_id"] == id && e["reason"] == "incident 42"),
        "{created:?}"
    );
    assert!(
        audited(&c, "access_request.approved")
            .iter()
            .any(|e| e["request_id"] == id && e["by"] == "admin admin"),
        "approval not audited"
    );
    assert!(
        audited(&c, "access_request.denied")
            .iter()
            .any(|e| e["request_id"] == id2 && e["reason"] == "no incident"),
        "denial not audited"
    );
}

#[test]
fn an_approval_expires_on_time() {
    let c = cluster("reqexp");
    add_user(&c, "dan", "field");
    let dan = login(&c, "dan");
    let id = request(&dan, "prod-access", "short fix");
    c.tctl.ok(&["requests", "approve", &id, "--ttl", "20s"]);
    dan.login("dan", PW, &c.gw.ca_pin, &[]).expect_ok("login");
    assert_eq!(roles_of(&dan), ["field", "prod-access"]);
    // The certificate lives no longer than the approval.
    let left = status(&dan)["valid_for_secs"].as_u64().unwrap();
    assert!(
        left <= 20,
        "certificate valid for {left}s past a 20s approval"
    );
    dan.run(&["ssh", "prod1", "true"], None)
        .expect_ok("the approved role reaches the production device");

    // Once the approval is over, it says so, and the next certificate lacks the role.
    assert!(
        wait_until(Duration::from_secs(90), || {
            listed(&c, &id)["state"] == "expired"
        }),
        "the approval never expired: {}",
        listed(&c, &id)
    );
    dan.login("dan", PW, &c.gw.ca_pin, &[]).expect_ok("login");
    assert_eq!(roles_of(&dan), ["field"]);
    refused(&dan.run(&["ssh", "prod1", "true"], None), "do not allow");
    let ls = dan
        .run(&["ls", "--format", "json"], None)
        .expect_ok("tsh ls")
        .json();
    assert!(
        !ls.as_array().unwrap().iter().any(|d| d["id"] == "prod1"),
        "an expired approval still lists the device: {ls}"
    );
    dan.run(&["ssh", "van1", "true"], None)
        .expect_ok("the own role still reaches the van");
}

#[test]
fn only_permitted_requests_and_other_reviewers_count() {
    let c = cluster("reqdeny");
    // No role of eve's names prod-access in request_roles.
    add_user(&c, "eve", "vans");
    let eve = login(&c, "eve");
    refused(
        &eve.run(&["request", "create", "--roles", "prod-access"], None),
        "may not request role prod-access",
    );
    add_user(&c, "bob", "field");
    let bob = login(&c, "bob");
    refused(
        &bob.run(&["request", "create", "--roles", "lead"], None),
        "may not request role lead",
    );
    refused(
        &bob.run(&["request", "create", "--roles", "nope"], None),
        "no role",
    );
    let refusals = audited(&c, "access_request.refused");
    assert!(
        refusals.iter().any(|e| e["error"]
            .as_str()
            .unwrap_or("")
            .contains("may not request")),
        "{refusals:?}"
    );

    // Reviewers: holders of `lead` review prod-access requests, but never their own.
    add_user(&c, "lea", "lead");
    add_user(&c, "leo", "lead");
    let lea = login(&c, "lea");
    let leo = login(&c, "leo");
    let id = request(&lea, "prod-access", "on call");
    refused(
        &lea.run(&["request", "review", &id, "--approve"], None),
        "cannot review their own",
    );
    refused(
        &bob.run(&["request", "review", &id, "--approve"], None),
        "may not review",
    );
    assert_eq!(listed(&c, &id)["state"], "pending");
    let seen = leo
        .run(&["request", "ls", "--format", "json"], None)
        .expect_ok("tsh request ls")
        .json();
    assert!(
        seen.as_array().unwrap().iter().any(|x| x["id"] == id),
        "a reviewer does not see the pending request: {seen}"
    );
    leo.run(
        &["request", "review", &id, "--approve", "--ttl", "10m"],
        None,
    )
    .expect_ok("another lead approves");
    let r = listed(&c, &id);
    assert_eq!(r["state"], "approved", "{r}");
    assert_eq!(r["reviewer"], "user leo", "{r}");
    lea.login("lea", PW, &c.gw.ca_pin, &[]).expect_ok("login");
    lea.run(&["ssh", "prod1", "true"], None)
        .expect_ok("the approved role reaches the production device");
}

/// What a compromised gateway can do with a user's certificate (which it sees at every
/// connection): it cannot make an action without the user's key, and cannot replay one.
#[test]
fn a_gateway_can_neither_forge_nor_replay_a_request() {
    let c = cluster("reqrogue");
    add_user(&c, "bob", "field");
    let bob = login(&c, "bob");
    let stolen = StolenGateway::from_data_dir(&c.gw.data_dir);
    let cert_der =
        first_cert_der(&std::fs::read_to_string(bob.key_dir().join("bob-x509.pem")).unwrap())
            .unwrap();
    let action = |nonce: &str, issued_at: u64| UserAction {
        cluster: "reqrogue".into(),
        issued_at,
        nonce: nonce.into(),
        action: AccessAction::Create {
            roles: vec!["prod-access".into()],
            reason: "forged".into(),
        },
    };
    let now = edgeport_net::clock::now_secs();
    let ask = |signed: SignedUserAction| -> Result<Vec<String>, String> {
        match stolen.ask(&c.tctl.addr, Request::AccessRequestUser(signed)) {
            Ok(Response::AccessRequests(v)) => Ok(v.into_iter().map(|r| r.id).collect()),
            Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => Err(e.message),
            other => panic!("unexpected answer: {other:?}"),
        }
    };

    // The certificate without a signature, or signed by a key the gateway made.
    let body = postcard_body(&action(&"a1".repeat(16), now));
    let e = ask(SignedUserAction {
        user_cert_der: cert_der.clone(),
        body: body.clone(),
        signature: Vec::new(),
    })
    .unwrap_err();
    assert!(
        e.contains("not signed by the key of bob's certificate"),
        "{e}"
    );
    let other = KeyPair::generate().unwrap();
    let (body, sig) = sign_user_action(&action(&"a2".repeat(16), now), &other).unwrap();
    let e = ask(SignedUserAction {
        user_cert_der: cert_der.clone(),
        body,
        signature: sig,
    })
    .unwrap_err();
    assert!(e.contains("not signed by the key"), "{e}");

    // Signed by bob's key (as tsh would), then replayed by the gateway: taken once.
    let key = KeyPair::from_openssh(&std::fs::read_to_string(bob.key_dir().join("bob")).unwrap())
        .unwrap();
    let (body, sig) = sign_user_action(&action(&"b3".repeat(16), now), &key).unwrap();
    let genuine = SignedUserAction {
        user_cert_der: cert_der.clone(),
        body,
        signature: sig,
    };
    let made = ask(genuine.clone()).expect("bob's own signed request");
    assert_eq!(made.len(), 1);
    let e = ask(genuine).unwrap_err();
    assert!(e.contains("already used"), "{e}");
    // A stale one (kept by the gateway for later), and one for another cluster.
    let (body, sig) = sign_user_action(&action(&"c4".repeat(16), now - 3600), &key).unwrap();
    let e = ask(SignedUserAction {
        user_cert_der: cert_der.clone(),
        body,
        signature: sig,
    })
    .unwrap_err();
    assert!(e.contains("stale"), "{e}");
    let mut elsewhere = action(&"d5".repeat(16), now);
    elsewhere.cluster = "other".into();
    let (body, sig) = sign_user_action(&elsewhere, &key).unwrap();
    let e = ask(SignedUserAction {
        user_cert_der: cert_der,
        body,
        signature: sig,
    })
    .unwrap_err();
    assert!(e.contains("signed for cluster"), "{e}");

    // Only the genuine one exists.
    let all = c.tctl.ok(&["requests", "ls", "--format", "json"]).json();
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [made[0].as_str()], "{all}");
    assert!(
        audited(&c, "access_request.refused").len() >= 4,
        "forged and replayed requests are audited"
    );
}

fn postcard_body(a: &UserAction) -> Vec<u8> {
    // Any key signs the same body; the signature is dropped.
    let (body, _) = sign_user_action(a, &KeyPair::generate().unwrap()).unwrap();
    body
}
