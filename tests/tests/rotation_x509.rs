//! x509 CA rotation (#24) end to end: `tctl auth rotate --type x509` while agents are online
//! and a tsh session is live. The old CA endorses the new one in the signed bundle, so no
//! device needs a new join; after the grace period only the new CA is trusted, and a device
//! that was offline the whole time gets a one-line rejoin hint instead of being trusted.

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
/// Agents online through the rotation (plus one offline the whole time).
const AGENTS: usize = 20;

/// The x509 CA's rotation as `tctl auth rotate --status` reports it.
fn x509(c: &Cluster) -> Value {
    let v: Value = c
        .tctl
        .ok(&["auth", "rotate", "--status", "--format", "json"])
        .json();
    v.as_array()
        .and_then(|a| a.iter().find(|r| r["type"] == "x509"))
        .cloned()
        .unwrap_or(Value::Null)
}

fn phase(c: &Cluster) -> String {
    x509(c)["phase"].as_str().unwrap_or_default().to_string()
}

fn certs_exported(c: &Cluster) -> usize {
    c.tctl
        .ok(&["auth", "export", "--type", "x509"])
        .stdout()
        .matches("BEGIN CERTIFICATE")
        .count()
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
fn rotating_the_x509_ca_keeps_agents_and_a_live_session_working() {
    let ids: Vec<String> = (1..=AGENTS).map(|i| format!("dev{i}")).collect();
    let devices: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), "")).collect();
    let mut c = Cluster::start("edge", &devices);
    c.add_user("alice", "root", PW);
    let old_pin = c.gw.ca_pin.clone();
    // One more device that joins, then stays offline during the whole rotation.
    let mut off = Agent::start(&c.dir.join("agent-off"), &c.gw, "off1", "", &[]);
    wait_online(&c.tctl, "off1", None, Duration::from_secs(60));
    off.proc.stop();
    assert!(wait_offline(&c.tctl, "off1", Duration::from_secs(60)).is_some());

    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &old_pin, &[]).expect_ok("tsh login");
    // The tsh home as it was before the rotation: trusts the old x509 CA only.
    let before = c.dir.join("tsh-before");
    copy_dir(&tsh.home, &before);

    // A live session through the whole rotation: it answers a line sent at the end.
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

    // init: the new CA is trusted beside the old one, which still issues.
    let r = c
        .tctl
        .ok(&[
            "auth", "rotate", "--type", "x509", "--grace", "1h", "--phase", "init", "--wait", "5m",
        ])
        .stdout();
    assert!(r.contains("phase init"), "{r}");
    assert!(r.contains("gateways with the new bundle 1/1"), "{r}");
    assert_eq!(certs_exported(&c), 2);
    for a in &c.agents {
        assert!(
            wait_until(Duration::from_secs(30), || a
                .proc
                .log_text()
                .contains("took the rotated CA bundle")),
            "{} did not take the bundle that lists the new x509 CA",
            a.id
        );
    }

    // update_clients: the new CA issues; every online device renews under it.
    let r = c
        .tctl
        .ok(&[
            "auth",
            "rotate",
            "--type",
            "x509",
            "--phase",
            "update_clients",
            "--wait",
            "5m",
        ])
        .stdout();
    assert!(
        r.contains(&format!("online devices renewed {AGENTS}/{AGENTS}")),
        "{r}"
    );
    let new_pin = x509(&c)["signing"].as_str().unwrap().to_string();
    assert_ne!(new_pin, old_pin);
    // Servers still present the old CA: a tsh that knows only the old CA still gets in,
    // and its next login (by the old pin) brings the bundle that endorses the new CA.
    let old = Tsh::new(before.clone(), c.proxy());
    old.run(&["ssh", "dev2", "true"], None)
        .expect_ok("the pre-rotation tsh during update_clients");
    tsh.login("alice", PW, &old_pin, &[])
        .expect_ok("tsh login by the old pin during update_clients");

    // update_servers: gateways and the authority present certificates of the new CA.
    let r = c
        .tctl
        .ok(&[
            "auth",
            "rotate",
            "--type",
            "x509",
            "--phase",
            "update_servers",
            "--wait",
            "5m",
        ])
        .stdout();
    assert!(r.contains("phase update_servers"), "{r}");
    assert_eq!(phase(&c), "update_servers");
    assert_eq!(certs_exported(&c), 2);
    // tctl status shows the phase and both trusted x509 CAs.
    let st = c.tctl.ok(&["status", "--format", "json"]).json();
    let row = st["cas"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["type"] == "x509"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(row["phase"], "update_servers", "{st}");
    assert_eq!(row["trusted"], 2, "{st}");
    // tsh, which took the endorsed bundle at its last login, renews and reaches every device.
    assert!(
        wait_until(Duration::from_secs(60), || tsh
            .run(&["ssh", "dev3", "true"], None)
            .code()
            == Some(0)),
        "tsh cannot reach a device once the gateway renewed under the new x509 CA"
    );
    tsh.run(
        &[
            "login",
            "--proxy",
            c.proxy(),
            "--user",
            "alice",
            "--password-stdin",
        ],
        Some(format!("{PW}\n").as_bytes()),
    )
    .expect_ok("tsh login from its stored profile during update_servers");
    for id in &ids {
        tsh.run(&["ssh", id, "true"], None)
            .expect_ok(&format!("ssh {id} under the new x509 CA"));
    }

    // standby: the old CA is dropped.
    let json = c
        .tctl
        .ok(&[
            "auth",
            "rotate",
            "--type",
            "x509",
            "--complete",
            "--format",
            "json",
        ])
        .json();
    assert_eq!(json["phases"][0]["phase"], "standby", "{json}");
    assert_eq!(certs_exported(&c), 1);
    assert_eq!(x509(&c)["trusted"].as_array().map(Vec::len), Some(1));
    // New connections verify under the new CA only: the pre-rotation tsh is refused, a first
    // login by the old pin too, and one by the new pin works.
    assert!(
        wait_until(Duration::from_secs(60), || old
            .run(&["ssh", "dev2", "true"], None)
            .code()
            != Some(0)),
        "a client that trusts only the dropped x509 CA still got in"
    );
    let fresh = Tsh::new(c.dir.join("tsh-fresh"), c.proxy());
    let r = fresh.login("alice", PW, &old_pin, &[]);
    assert_ne!(r.code(), Some(0), "a login pinned to the dropped CA worked");
    fresh
        .login("alice", PW, &new_pin, &[])
        .expect_ok("tsh login by the new pin");
    for id in &ids {
        fresh
            .run(&["ssh", id, "true"], None)
            .expect_ok(&format!("ssh {id} after the x509 rotation"));
    }

    // A device restarted now reconnects with its tunnel certificate of the new CA, checking
    // the gateway's under the new CA only.
    c.agents[1].restart();
    let dev2 = &c.agents[1].proc;
    assert!(
        wait_until(Duration::from_secs(60), || dev2
            .log_text()
            .contains("tunnel up")),
        "{}",
        dev2.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(30), || fresh
            .run(&["ssh", "dev2", "true"], None)
            .code()
            == Some(0)),
        "ssh to a device reconnected after the x509 rotation"
    );

    // The live session went through the whole rotation.
    live.stdin.take().unwrap().write_all(b"still\n").unwrap();
    let out = live.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("got-still"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));

    // The device offline during the whole grace period is not trusted: it says why, once a
    // line, and how to rejoin.
    off.restart();
    assert!(
        wait_until(Duration::from_secs(60), || off
            .proc
            .log_text()
            .contains("x509 CA rotated while this device was offline")),
        "{}",
        off.proc.log_text()
    );
    assert_eq!(
        c.tctl.device("off1").and_then(|d| d["online"].as_bool()),
        Some(false)
    );
}

#[test]
fn an_x509_rotation_rolled_back_in_init_leaves_the_old_ca_in_force() {
    let c = Cluster::start("edge", &[("dev1", ""), ("dev2", "")]);
    c.add_user("alice", "root", PW);
    let old_pin = c.gw.ca_pin.clone();
    let x509_before = c.tctl.ok(&["auth", "export", "--type", "x509"]).stdout();
    c.tctl.ok(&[
        "auth", "rotate", "--type", "x509", "--phase", "init", "--wait", "5m",
    ]);
    assert_eq!(phase(&c), "init");
    assert_eq!(certs_exported(&c), 2);
    let r = c
        .tctl
        .ok(&[
            "auth",
            "rotate",
            "--type",
            "x509",
            "--rollback",
            "--wait",
            "5m",
        ])
        .stdout();
    assert!(r.contains("phase rollback"), "{r}");
    c.tctl
        .ok(&["auth", "rotate", "--type", "x509", "--complete"]);
    assert_eq!(phase(&c), "standby");
    assert_eq!(
        c.tctl.ok(&["auth", "export", "--type", "x509"]).stdout(),
        x509_before
    );
    // A first login by the original pin works and reaches both devices, over their tunnels.
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &old_pin, &[])
        .expect_ok("tsh login after the rollback");
    for id in ["dev1", "dev2"] {
        tsh.run(&["ssh", id, "true"], None)
            .expect_ok(&format!("ssh {id} after the rollback"));
    }
}
