//! Hosts behind the device with a pinned host key (issue 22): the target's sshd has no host
//! certificate, only the key recorded at enrolment on its `targets` line
//! (`hostkey=ssh-ed25519 AAAA...`). The agent's periodic check reads the key from the
//! target's key exchange and reports `ok` or `mismatch` (inventory, audit); on each relayed
//! stream the agent sends tsh the pin signed with the device's host key, and tsh (and stock
//! OpenSSH through `tsh config` / `tsh proxy ssh`) accept that key and no other. A target
//! pinned to another key is refused in one line.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::peers::Peer;
use edgeport_e2e::ssh::{ssh, Cluster, Tsh};
use edgeport_e2e::{run, wait_until};
use serde_json::Value;

const PW: &str = "correct horse battery";

/// `ssh-ed25519 AAAA...` of a public key file (no comment).
fn key_line(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The newest `targets` report of `device` for which `f` holds.
fn wait_report(c: &Cluster, agent: &Agent, f: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(90), || {
        let events = c.tctl.ok(&[
            "audit", "search", "--format", "json", "--device", "van", "--type", "targets",
        ]);
        let events = events.json().as_array().cloned().unwrap_or_default();
        match events.into_iter().rev().find(|e| f(e)) {
            Some(e) => {
                last = e;
                true
            }
            None => false,
        }
    });
    assert!(
        ok,
        "no matching targets report; agent log:\n{}",
        agent.proc.log_text()
    );
    last
}

#[test]
fn pinned_host_keys_are_trusted_only_as_pinned() {
    let c = Cluster::start("pinned", &[]);
    let dir = c.dir.join("ecu1");
    std::fs::create_dir_all(&dir).unwrap();
    let user_ca = dir.join("user_ca.pub");
    let ca = c.tctl.ok(&["auth", "export", "--type", "user"]).stdout();
    std::fs::write(&user_ca, ca).unwrap();
    // The legacy host: trusts the user CA, presents only its own host key (no certificate).
    let sshd = Peer::start(
        "sshd.sh",
        &[user_ca.to_str().unwrap()],
        &[("SSH_USERS", "root")],
    );
    let addr = format!("127.0.0.1:{}", sshd.get("SSHD_PORT"));
    let real = key_line(std::path::Path::new(&sshd.get("SSHD_HOST_KEY_PUB")));
    let other_key = dir.join("other");
    let mut kg = Command::new("ssh-keygen");
    kg.args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key);
    run(kg, None, Duration::from_secs(30)).expect_ok("ssh-keygen");
    let other = key_line(&dir.join("other.pub"));

    // ecu1 is pinned to the sshd's key; swapped is the same sshd pinned to another key (as
    // if the board had been replaced, or something else answered on its address).
    let agent_dir = c.dir.join("agent-van");
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::write(
        agent_dir.join("targets"),
        format!("ecu1={addr} zone=engine hostkey={real}\nswapped={addr} hostkey={other}\n"),
    )
    .unwrap();
    let agent = Agent::start(&agent_dir, &c.gw, "van", "fleet=vans", &[]);
    wait_online(&c.tctl, "van", None, Duration::from_secs(60));
    let report = wait_report(&c, &agent, |e| {
        e["hostkey.ecu1"] == "ok" && e["hostkey.swapped"] == "mismatch"
    });
    assert_eq!(report["pin.ecu1"], real.as_str(), "{report}");

    // The inventory says so, and the audit log has the mismatch with both fingerprints.
    let json = c.tctl.ok(&["devices", "ls", "--format", "json"]).json();
    let van = json
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == "van"))
        .unwrap_or_else(|| panic!("no van in {json}"));
    let target = |n: &str| {
        van["targets"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == n))
            .unwrap_or_else(|| panic!("no {n} in {van}"))
            .clone()
    };
    assert_eq!(target("ecu1")["status"], "reachable", "{van}");
    assert_eq!(target("ecu1")["hostkey"], real.as_str(), "{van}");
    assert_eq!(target("swapped")["status"], "host key mismatch", "{van}");
    let ls = c.tctl.ok(&["devices", "ls"]).stdout();
    assert!(
        ls.lines()
            .any(|l| l.starts_with("van/swapped ") && l.contains("host key mismatch")),
        "{ls}"
    );
    let ev = c.tctl.ok(&[
        "audit",
        "search",
        "--format",
        "json",
        "--device",
        "van",
        "--type",
        "target.hostkey_mismatch",
    ]);
    let ev = ev.json();
    let mismatch = ev
        .as_array()
        .and_then(|a| a.iter().find(|e| e["target"] == "swapped"))
        .unwrap_or_else(|| panic!("no target.hostkey_mismatch for swapped: {ev}"));
    assert!(
        mismatch["pinned"]
            .as_str()
            .is_some_and(|p| p.starts_with("SHA256:"))
            && mismatch["pinned"] != mismatch["presented"],
        "{mismatch}"
    );

    c.add_user("alice", "root", PW);
    let alice = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    alice
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login alice");

    // tsh ssh: the pinned key is accepted without any host certificate.
    let r = alice.run(&["ssh", "root@van/ecu1", "echo", "pinned-ok"], None);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.stdout(), "pinned-ok\n");
    // Another key than the pinned one: refused in one line, before any login.
    let before = std::fs::read_to_string(sshd.get("SSHD_LOG")).unwrap_or_default();
    let r = alice.run(&["ssh", "root@van/swapped", "echo", "nope"], None);
    assert_ne!(r.code(), Some(0));
    assert!(!r.stdout().contains("nope"));
    let err = r.stderr();
    assert!(
        err.contains("host key mismatch") && err.contains("van/swapped"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let after = std::fs::read_to_string(sshd.get("SSHD_LOG")).unwrap_or_default();
    assert_eq!(
        before.matches("Accepted publickey").count(),
        after.matches("Accepted publickey").count(),
        "a login went through to a target with the wrong key"
    );

    // Stock OpenSSH through `tsh config`: tsh proxy ssh writes the device's pin into the
    // login's known_hosts_pinned before the target's first byte; OpenSSH checks it.
    let cfg = alice.config();
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    assert!(cfg_text.contains("known_hosts_pinned"), "{cfg_text}");
    let r = run(
        ssh(&cfg, &["root@van/ecu1", "echo", "via-openssh"]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.stdout(), "via-openssh\n");
    let r = run(
        ssh(&cfg, &["root@van/swapped", "echo", "nope"]),
        None,
        Duration::from_secs(60),
    );
    assert_ne!(r.code(), Some(0));
    assert!(!r.stdout().contains("nope"));
    assert!(
        r.stderr().contains("Host key verification failed")
            || r.stderr().contains("IDENTIFICATION HAS CHANGED"),
        "{}",
        r.stderr()
    );
    drop(sshd);
}
