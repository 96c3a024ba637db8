//! Hosts behind the device (issue 22), the part built so far: an agent started with
//! `--target` lines and a `DATA/targets` file checks each target with a TCP connect and
//! reports name, address, labels, reachability and last check in its signed audit log, which
//! reaches the authority through the tunnel; the file is read again on SIGHUP. The targets are
//! plain loopback listeners here (the check is a TCP connect; relaying SSH to them is not
//! built yet).

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::Cluster;
use edgeport_e2e::wait_until;
use serde_json::Value;

/// The newest `targets` report of `device` for which `f` holds.
fn wait_report(c: &Cluster, agent: &Agent, device: &str, f: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(90), || {
        let events = c.tctl.ok(&[
            "audit", "search", "--format", "json", "--device", device, "--type", "targets",
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
fn targets_are_checked_reported_and_reloaded() {
    let c = Cluster::start("targets", &[]);
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    let gone_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let ecu = format!("ecu1={up_addr} zone=engine");
    let gone = format!("gone={gone_addr}");
    let dir = c.dir.join("agent-van");
    let agent = Agent::start(
        &dir,
        &c.gw,
        "van-42",
        "",
        &["--target", &ecu, "--target", &gone],
    );
    wait_online(&c.tctl, "van-42", None, Duration::from_secs(60));

    let r = wait_report(&c, &agent, "van-42", |e| e["up.ecu1"] == "yes");
    assert_eq!(r["t.ecu1"], format!("{up_addr} zone=engine"), "{r}");
    assert_eq!(r["up.gone"], "no", "{r}");
    assert!(
        r["checked.ecu1"].as_str().unwrap().parse::<u64>().unwrap() > 0,
        "{r}"
    );

    // A file in the data dir, read again on SIGHUP.
    std::fs::write(dir.join("targets"), format!("cam={up_addr} kind=camera\n")).unwrap();
    agent.proc.signal(libc::SIGHUP);
    let r = wait_report(&c, &agent, "van-42", |e| e["up.cam"] == "yes");
    assert_eq!(r["t.cam"], format!("{up_addr} kind=camera"), "{r}");
    assert_eq!(r["count"], "3", "{r}");

    // A file that does not parse is refused and the old targets stay.
    std::fs::write(dir.join("targets"), "broken line\n").unwrap();
    agent.proc.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(30), || agent
        .proc
        .log_text()
        .contains("targets not reloaded")));
    drop(up);
}

#[test]
fn a_bad_target_stops_the_agent_with_one_line() {
    let out = std::process::Command::new(edgeport_e2e::bin("edge-agent"))
        .args([
            "start",
            "--gateway",
            "127.0.0.1:1",
            "--target",
            "ecu1=10.0.0.1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: invalid value for --target"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
