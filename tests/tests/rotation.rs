//! CA rotation without touching devices (#24): `tctl auth rotate` of the user and the host
//! SSH CAs while agents are online and a tsh session is live; the old CA's certificates are
//! refused afterwards; an agent offline during the whole rotation catches up through the
//! bundle signed by the x509 CA it joined with.

// Test code: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_offline, wait_online, Agent};
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::wait_until;
use serde_json::Value;

const PW: &str = "correct horse battery";
/// Agents online through the rotations (plus one offline the whole time).
const AGENTS: usize = 20;

fn phase(c: &Cluster, kind: &str) -> String {
    let v: Value = c
        .tctl
        .ok(&["auth", "rotate", "--status", "--format", "json"])
        .json();
    v.as_array()
        .and_then(|a| a.iter().find(|r| r["type"] == kind))
        .and_then(|r| r["phase"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

#[test]
fn rotating_the_ssh_cas_keeps_agents_and_a_live_session_working() {
    let ids: Vec<String> = (1..=AGENTS).map(|i| format!("dev{i}")).collect();
    let devices: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), "")).collect();
    let c = Cluster::start("edge", &devices);
    c.add_user("alice", "root", PW);
    // One more device that joins, then stays offline during both rotations.
    let mut off = Agent::start(&c.dir.join("agent-off"), &c.gw, "off1", "", &[]);
    wait_online(&c.tctl, "off1", None, Duration::from_secs(60));
    off.proc.stop();
    assert!(wait_offline(&c.tctl, "off1", Duration::from_secs(60)).is_some());

    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    // The tsh home as it was before any rotation: certificates from the old CAs.
    let before = c.dir.join("tsh-before");
    copy_dir(&tsh.home, &before);

    // A live session through both rotations: it answers a line sent at the end.
    let agent1 = &c.agent("dev1").proc;
    let started = agent1.log_text().matches("session started").count();
    let mut live = tsh
        .cmd(&["ssh", "dev1", "echo started; read line; echo got-$line"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        agent1.log_text().matches("session started").count() > started
    }));

    // The user CA: every phase is printed, export shows both CAs during the grace.
    let user_before = c.tctl.ok(&["auth", "export", "--type", "user"]).stdout();
    let r = c
        .tctl
        .ok(&[
            "auth", "rotate", "--type", "user", "--grace", "1h", "--wait", "5m",
        ])
        .stdout();
    for p in ["phase init", "phase update_clients", "phase update_servers"] {
        assert!(r.contains(p), "{r}");
    }
    assert!(r.contains("gateways with the new bundle 1/1"), "{r}");
    assert_eq!(phase(&c, "user"), "update_servers");
    let both = c.tctl.ok(&["auth", "export", "--type", "user"]).stdout();
    assert_eq!(both.lines().count(), 2, "{both}");
    assert!(both.contains(user_before.trim()), "{both}");
    // Every agent took the bundle over its tunnel.
    for a in &c.agents {
        assert!(
            wait_until(Duration::from_secs(30), || a
                .proc
                .log_text()
                .contains("took the rotated CA bundle")),
            "{} did not take the rotated bundle",
            a.id
        );
    }
    // New logins get certificates from the new CA and work everywhere.
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login under the new user CA");
    for id in &ids {
        tsh.run(&["ssh", id, "true"], None)
            .expect_ok(&format!("ssh {id} under the new user CA"));
    }
    // The old certificate still works during the grace period...
    let old = Tsh::new(before.clone(), c.proxy());
    old.run(&["ssh", "dev2", "true"], None)
        .expect_ok("the old user certificate during the grace period");
    // ...and is refused once the old CA is dropped.
    let json = c
        .tctl
        .ok(&[
            "auth",
            "rotate",
            "--type",
            "user",
            "--complete",
            "--format",
            "json",
        ])
        .json();
    assert_eq!(json["phases"][0]["phase"], "standby", "{json}");
    assert_eq!(
        c.tctl
            .ok(&["auth", "export", "--type", "user"])
            .stdout()
            .lines()
            .count(),
        1
    );
    assert!(wait_until(Duration::from_secs(30), || {
        c.agent("dev2")
            .proc
            .log_text()
            .matches("took the rotated CA bundle")
            .count()
            >= 3
    }));
    let r = old.run(&["ssh", "dev2", "true"], None);
    assert_ne!(
        r.code(),
        Some(0),
        "a certificate of the dropped CA was accepted"
    );
    assert!(r.stderr().contains("not accepted"), "{}", r.stderr());
    assert!(
        c.agent("dev2")
            .proc
            .log_text()
            .contains("certificate is not signed by"),
        "the agent did not refuse the old CA's certificate as such"
    );
    tsh.run(&["ssh", "dev2", "true"], None)
        .expect_ok("ssh after the user rotation");

    // The host CA, with a short grace that ends by itself.
    let r = c
        .tctl
        .ok(&[
            "auth", "rotate", "--type", "host", "--grace", "3s", "--wait", "5m",
        ])
        .stdout();
    assert!(
        r.contains(&format!("online devices renewed {AGENTS}/{AGENTS}")),
        "{r}"
    );
    assert!(
        wait_until(Duration::from_secs(60), || phase(&c, "host") == "standby"),
        "the old host CA was not dropped after the grace period"
    );
    assert_eq!(
        c.tctl
            .ok(&["auth", "export", "--type", "host"])
            .stdout()
            .lines()
            .count(),
        1
    );
    // tsh learns the new host CA at its next login.
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login after the host rotation");
    for id in &ids {
        tsh.run(&["ssh", id, "true"], None)
            .expect_ok(&format!("ssh {id} under the new host CA"));
    }

    // The live session went through both rotations.
    live.stdin.take().unwrap().write_all(b"still\n").unwrap();
    let out = live.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("got-still"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));

    // The agent offline during both rotations comes back: the bundle it gets is checked
    // against the x509 CA it joined with, then it renews under the new host CA.
    off.restart();
    wait_online(&c.tctl, "off1", None, Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || {
            let log = off.proc.log_text();
            log.contains("took the rotated CA bundle") && log.contains("certificates renewed")
        }),
        "{}",
        off.proc.log_text()
    );
    tsh.run(&["ssh", "off1", "true"], None)
        .expect_ok("ssh to the device that was offline during the rotation");
}

#[test]
fn a_host_rotation_rolled_back_leaves_the_old_ca_in_force() {
    let c = Cluster::start("edge", &[("dev1", ""), ("dev2", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let host_before = c.tctl.ok(&["auth", "export", "--type", "host"]).stdout();

    // Refusals are one clear line.
    let r = c
        .tctl
        .run(&["auth", "rotate", "--type", "host", "--rollback"]);
    assert_ne!(r.code(), Some(0));
    assert!(r.stderr().contains("not being rotated"), "{}", r.stderr());

    // One phase at a time, then back.
    c.tctl
        .ok(&["auth", "rotate", "--type", "host", "--phase", "init"]);
    assert_eq!(phase(&c, "host"), "init");
    let r = c
        .tctl
        .run(&["auth", "rotate", "--type", "host", "--phase", "init"]);
    assert!(
        r.stderr().contains("already being rotated"),
        "{}",
        r.stderr()
    );
    c.tctl.ok(&[
        "auth",
        "rotate",
        "--type",
        "host",
        "--phase",
        "update_clients",
    ]);
    let r = c
        .tctl
        .ok(&[
            "auth",
            "rotate",
            "--type",
            "host",
            "--rollback",
            "--wait",
            "5m",
        ])
        .stdout();
    assert!(r.contains("phase rollback"), "{r}");
    assert!(r.contains("online devices renewed 2/2"), "{r}");
    assert_eq!(phase(&c, "host"), "rollback");
    // Both agents are back on host certificates of the old CA: tsh, which never learned the
    // new one, reaches them.
    for id in ["dev1", "dev2"] {
        tsh.run(&["ssh", id, "true"], None)
            .expect_ok(&format!("ssh {id} after the rollback"));
    }
    c.tctl
        .ok(&["auth", "rotate", "--type", "host", "--complete"]);
    assert_eq!(phase(&c, "host"), "standby");
    assert_eq!(
        c.tctl.ok(&["auth", "export", "--type", "host"]).stdout(),
        host_before
    );
}
