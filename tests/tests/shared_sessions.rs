//! Shared and moderated sessions (issue 29, Teleport's `tsh join`), end to end with real
//! processes and real terminals (tmux): alice's live shell is listed by `tsh sessions ls` for
//! users whose roles let them join; bob joins it through tsh as an observer and sees her
//! output while his keystrokes are dropped, then as a peer and his keystrokes run; everyone
//! sees who joined and left; a user without join rights is refused in one line (by the
//! authority's list and by the agent, which reads the rights from bob's certificate); a
//! session to a device whose roles require a moderator does not start until one joins and
//! ends when the last one leaves; the joins are audited and the recording names the
//! participants.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use edgeport_e2e::bin;
use edgeport_e2e::ssh::{Cluster, Tmux, Tsh};
use edgeport_e2e::wait_until;
use serde_json::Value;

const PW: &str = "correct horse battery staple";
const WAIT: Duration = Duration::from_secs(60);

fn login(c: &Cluster, user: &str) -> Tsh {
    let tsh = Tsh::new(c.dir.join(&format!("tsh-{user}")), c.proxy());
    tsh.login(user, PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    tsh
}

/// A tmux session running tsh with `args`, then printing its exit status.
fn term(name: &str, tsh: &Tsh, args: &str) -> Tmux {
    Tmux::start(
        name,
        120,
        40,
        &format!(
            "env TSH_HOME='{}' '{}' {args}; echo TSH-EXIT=$?; sleep 120",
            tsh.home.display(),
            bin("tsh").display()
        ),
    )
}

fn must_show(t: &Tmux, text: &str, what: &str) -> String {
    let (ok, screen) = t.wait_for(text, WAIT);
    assert!(ok, "{what}: {text:?} not shown:\n{screen}");
    screen
}

/// The live sessions `tsh` lists (JSON).
fn sessions(tsh: &Tsh) -> Vec<Value> {
    tsh.run(&["sessions", "ls", "--format", "json"], None)
        .expect_ok("tsh sessions ls")
        .json()
        .as_array()
        .cloned()
        .unwrap()
}

/// Waits until `tsh` lists a session of `user` on `device`; returns its id.
fn wait_session(tsh: &Tsh, user: &str, device: &str) -> String {
    let mut last = Vec::new();
    let ok = wait_until(WAIT, || {
        last = sessions(tsh);
        last.iter()
            .any(|s| s["user"] == user && s["device"] == device)
    });
    assert!(ok, "no session of {user} on {device}: {last:#?}");
    let s = last
        .iter()
        .find(|s| s["user"] == user && s["device"] == device)
        .unwrap();
    for key in ["login", "kind", "started", "participants"] {
        assert!(s.get(key).is_some(), "{key} missing: {s:#}");
    }
    s["session_id"].as_str().unwrap().to_string()
}

fn events(c: &Cluster) -> Vec<Value> {
    c.tctl
        .ok(&["audit", "search", "--format", "json"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_event(c: &Cluster, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut last = Vec::new();
    let ok = wait_until(WAIT, || {
        last = events(c);
        last.iter().any(&f)
    });
    assert!(ok, "no {what} event: {last:#?}");
    last.into_iter().find(|e| f(e)).unwrap()
}

#[test]
fn shared_and_moderated_sessions() {
    let c = Cluster::start(
        "share",
        &[("van1", "fleet=vans"), ("med1", "fleet=medical")],
    );
    c.tctl.ok(&[
        "roles",
        "add",
        "field",
        "--allow",
        "fleet=vans,fleet=medical",
        "--require-moderator",
        "fleet=medical",
    ]);
    c.tctl.ok(&[
        "roles",
        "add",
        "support",
        "--allow",
        "fleet=vans",
        "--join-sessions",
        "observer,peer",
    ]);
    c.tctl.ok(&[
        "roles",
        "add",
        "medmod",
        "--allow",
        "fleet=medical",
        "--join-sessions",
        "moderator",
    ]);
    let roles = c.tctl.ok(&["roles", "ls", "--format", "json"]).json();
    let role = |n: &str| {
        roles
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(role("field")["require_moderator"]["fleet"][0], "medical");
    assert_eq!(role("support")["join_sessions"][1], "peer");
    let text = c.tctl.ok(&["roles", "ls"]).stdout();
    assert!(
        text.contains("JOIN") && text.contains("observer,peer"),
        "{text}"
    );
    for (user, roles) in [
        ("alice", "field"),
        ("bob", "support,medmod"),
        ("carol", "field"),
    ] {
        c.add_user(user, "root", PW);
        c.tctl.ok(&["users", "update", user, "--set-roles", roles]);
    }
    let (alice, bob, carol) = (login(&c, "alice"), login(&c, "bob"), login(&c, "carol"));

    // Alice's live shell on van1.
    let a = term("share-alice", &alice, "ssh root@van1");
    a.send(&["echo alice-$((20+1))", "Enter"]);
    must_show(&a, "alice-21", "alice's shell");
    let sid = wait_session(&bob, "alice", "van1");

    // Carol may not join anything: she does not see the session and cannot join it.
    assert!(
        !sessions(&carol)
            .iter()
            .any(|s| s["session_id"] == sid.as_str()),
        "carol sees alice's session"
    );
    let r = carol.run(&["join", &sid], None);
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    assert_eq!(r.stderr().trim().lines().count(), 1, "{}", r.stderr());
    assert!(r.stderr().contains("no live session"), "{}", r.stderr());
    // Bob's roles allow observer and peer on vans, not moderator: the agent refuses, from
    // bob's certificate, in one line.
    let r = bob.run(&["join", "--mode", "moderator", &sid], None);
    assert_ne!(r.code(), Some(0), "{}", r.stdout());
    let err = r.stderr();
    assert!(
        err.contains("do not allow joining sessions on this device as moderator"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Bob observes: he sees alice's output, everyone sees him join, his keys are dropped.
    let b = term(
        "share-bob-obs",
        &bob,
        &format!("join --mode observer {sid}"),
    );
    must_show(&a, "*** bob joined as observer ***", "alice sees bob join");
    must_show(&b, "*** bob joined as observer ***", "bob sees his join");
    a.send(&["echo from-alice-$((30+3))", "Enter"]);
    must_show(&b, "from-alice-33", "bob sees alice's output");
    b.send(&["echo bob-typed-$((40+4))", "Enter"]);
    must_show(
        &b,
        "your keystrokes are not sent",
        "bob told his keys are dropped",
    );
    a.send(&["echo after-bob-$((50+5))", "Enter"]);
    let screen = must_show(&a, "after-bob-55", "alice's shell after bob typed");
    assert!(
        !screen.contains("bob-typed-44"),
        "observer keys ran:\n{screen}"
    );
    // The list shows who is in the session (from the device's signed session.join).
    let mut listed = Vec::new();
    let shown = wait_until(WAIT, || {
        listed = sessions(&alice);
        listed.iter().any(|s| {
            s["session_id"] == sid.as_str()
                && s["participants"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p == "bob (observer)"))
        })
    });
    assert!(shown, "{listed:#?}");
    b.send(&["C-]"]);
    must_show(&b, "TSH-EXIT=0", "bob left");
    must_show(&a, "*** bob left ***", "alice sees bob leave");

    // Bob as a peer: his keys reach the shell.
    let p = term("share-bob-peer", &bob, &format!("join --mode peer {sid}"));
    must_show(&a, "*** bob joined as peer ***", "alice sees the peer");
    p.send(&["echo peer-typed-$((6*7))", "Enter"]);
    must_show(
        &a,
        "peer-typed-42",
        "the peer's command ran in alice's shell",
    );
    must_show(&p, "peer-typed-42", "the peer sees it too");
    p.send(&["C-]"]);
    must_show(&p, "TSH-EXIT=0", "the peer left");

    // Audit: the join, with participant and mode, under alice's session id.
    let ev = wait_event(&c, "session.join", |e| {
        e["type"] == "session.join" && e["mode"] == "observer"
    });
    assert_eq!(ev["session_id"], sid.as_str());
    assert_eq!(ev["participant"], "bob");
    assert_eq!(ev["device"], "van1");
    wait_event(&c, "session.leave", |e| {
        e["type"] == "session.leave" && e["session_id"] == sid.as_str()
    });
    // Alice ends her shell; its recording names every participant.
    a.send(&["exit", "Enter"]);
    must_show(&a, "TSH-EXIT=0", "alice's shell ended");
    wait_event(&c, "session.end", |e| {
        e["type"] == "session.end" && e["session_id"] == sid.as_str()
    });
    let mut cast = String::new();
    let ok = wait_until(WAIT, || {
        let r = alice.run(&["play", &sid, "--format", "cast"], None);
        cast = r.stdout();
        r.ok() && cast.contains("bob joined as peer") && cast.contains("bob left")
    });
    assert!(ok, "{cast}");
    assert!(
        cast.lines()
            .any(|l| l.contains("\"m\"") && l.contains("bob joined as observer")),
        "no marker for the observer:\n{cast}"
    );

    // A moderated session: alice's command to med1 waits for a moderator.
    let m = term(
        "share-moderated",
        &alice,
        "ssh -tt root@med1 'echo started-$((40+2)); exec sh'",
    );
    let screen = must_show(&m, "waiting for a moderator to join session", "alice waits");
    assert!(!screen.contains("started-42"), "{screen}");
    let msid = wait_session(&bob, "alice", "med1");
    assert!(screen.contains(&msid), "{screen}");
    // Bob may moderate on medical devices only as a moderator, not observe.
    let r = bob.run(&["join", "--mode", "observer", &msid], None);
    assert!(r.stderr().contains("as observer"), "{}", r.stderr());
    let screen = m.screen();
    assert!(
        !screen.contains("started-42"),
        "started without a moderator:\n{screen}"
    );
    let md = term("share-mod", &bob, &format!("join --mode moderator {msid}"));
    must_show(
        &m,
        "started-42",
        "the session started once the moderator joined",
    );
    must_show(&md, "started-42", "the moderator sees it");
    must_show(
        &m,
        "*** bob joined as moderator ***",
        "alice sees the moderator",
    );
    md.send(&["C-]"]);
    must_show(&m, "the last moderator left", "alice told why it ends");
    must_show(&m, "TSH-EXIT=", "alice's moderated session ended");
    wait_event(&c, "moderator join", |e| {
        e["type"] == "session.join" && e["mode"] == "moderator" && e["session_id"] == msid.as_str()
    });

    // Forwards have no terminal to moderate: refused where a moderator is required (stock
    // OpenSSH through tsh's config; a remote forward fails before any session starts).
    let r = edgeport_e2e::run(
        edgeport_e2e::ssh::ssh(
            &alice.config(),
            &[
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                "0:127.0.0.1:9",
                "root@med1",
                "true",
            ],
        ),
        None,
        WAIT,
    );
    assert!(
        !r.ok(),
        "a remote forward was opened on med1: {}",
        r.stdout()
    );
    assert!(r.stderr().contains("forwarding failed"), "{}", r.stderr());
    wait_event(&c, "refused forward", |e| {
        e["type"] == "port_forward"
            && e["device"] == "med1"
            && e["reason"]
                .as_str()
                .is_some_and(|x| x.contains("cannot be moderated"))
    });

    // Nobody moderates their own session: dave's roles require a moderator on medical
    // devices and also let him moderate there; his own waiting session stays shut to him.
    c.add_user("dave", "root", PW);
    c.tctl
        .ok(&["users", "update", "dave", "--set-roles", "field,medmod"]);
    let dave = login(&c, "dave");
    let d = term(
        "share-self",
        &dave,
        "ssh -tt root@med1 'echo self-$((5*5)); exec sh'",
    );
    must_show(&d, "waiting for a moderator to join session", "dave waits");
    let dsid = wait_session(&bob, "dave", "med1");
    let r = dave.run(&["join", "--mode", "moderator", &dsid], None);
    assert_ne!(r.code(), Some(0), "{}", r.stdout());
    assert!(
        r.stderr().contains("own user cannot moderate it"),
        "{}",
        r.stderr()
    );
    assert!(!d.screen().contains("self-25"), "{}", d.screen());
}
