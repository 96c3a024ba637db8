//! Byte accounting end to end (issue 23): the agent counts bytes per service, reports them
//! over its tunnel, and `tctl devices usage` shows the authority's totals.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::{random_file, Cluster, Tsh};
use edgeport_e2e::wait_until;
use serde_json::Value;

const PW: &str = "correct horse battery";

/// (up, down) of `service` in one device's entry of `tctl devices usage --format json`.
fn bytes(entry: &Value, service: &str) -> (u64, u64) {
    entry["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == service)
        .map_or((0, 0), |s| {
            (s["up"].as_u64().unwrap(), s["down"].as_u64().unwrap())
        })
}

fn usage(c: &Cluster, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["devices", "usage", "--format", "json"];
    all.extend_from_slice(args);
    c.tctl.ok(&all).json().as_array().cloned().unwrap()
}

#[test]
fn bytes_per_service_reach_tctl_devices_usage() {
    let mut c = Cluster::start("usage", &[("dev1", "")]);
    // Report every second instead of every minute.
    let agent_dir = c.agents[0].data_dir.clone();
    let gw = c.gw.addr.clone();
    c.agents[0].proc.kill9();
    c.agents[0] = Agent::start_joined(&agent_dir, &gw, "dev1", &["--test-usage-every", "1s"]);
    // The inventory still shows the killed agent's tunnel online: wait for the new one, or
    // the dial may land on the dead tunnel just as the new one replaces it.
    assert!(
        wait_until(Duration::from_secs(60), || c.agents[0].tunnels_up() >= 1),
        "the restarted agent's tunnel did not come up"
    );
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh-home"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");

    // 3 MB leave the device through a shell command; 1 MB reach it through tsh scp (SFTP).
    let r = tsh.run(&["ssh", "root@dev1", "head -c 3000000 /dev/zero"], None);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.out.stdout.len(), 3_000_000);
    let file = c.dir.join("one-mb.bin");
    random_file(&file, 1_000_000);
    let remote = format!("dev1:{}", c.dir.join("uploaded.bin").display());
    let r = tsh.run(&["scp", file.to_str().unwrap(), &remote], None);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());

    let mut last = Vec::new();
    let counted = wait_until(Duration::from_secs(60), || {
        last = usage(&c, &["dev1"]);
        last.first().is_some_and(|d| {
            bytes(d, "ssh").0 >= 3_000_000
                && bytes(d, "ssh").1 >= 1_000_000
                && bytes(d, "sftp").1 >= 1_000_000
        })
    });
    assert!(counted, "usage never showed the transfers: {last:?}");
    let d = &last[0];
    assert_eq!(d["device"], "dev1");
    // SFTP is part of SSH; the control stream carried at least the Hello and keep-alives,
    // and the audit log its batches.
    assert!(bytes(d, "sftp").1 <= bytes(d, "ssh").1, "{d}");
    assert!(bytes(d, "control").0 > 0, "{d}");
    assert!(bytes(d, "audit").0 > 0, "{d}");
    assert_eq!(bytes(d, "kube"), (0, 0), "{d}");

    // An agent that restarts counts from zero; the authority keeps what it had.
    let ssh_before = bytes(d, "ssh");
    c.agents[0].proc.kill9();
    c.agents[0] = Agent::start_joined(&agent_dir, &gw, "dev1", &["--test-usage-every", "1s"]);
    assert!(
        wait_until(Duration::from_secs(60), || c.agents[0].tunnels_up() >= 1),
        "the restarted agent's tunnel did not come up"
    );
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    let r = tsh.run(&["ssh", "root@dev1", "head -c 500000 /dev/zero"], None);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let grew = wait_until(Duration::from_secs(60), || {
        last = usage(&c, &["dev1"]);
        last.first()
            .is_some_and(|d| bytes(d, "ssh").0 >= ssh_before.0 + 500_000)
    });
    assert!(grew, "the restarted agent's bytes were not added: {last:?}");

    // An `ssh -R` listener the device opened before its budget runs out.
    let echo = edgeport_e2e::echo_server();
    let rport = edgeport_e2e::free_port();
    let mut rfwd = tsh.cmd(&[
        "ssh",
        "-N",
        "-R",
        &format!("{rport}:127.0.0.1:{echo}"),
        "dev1",
    ]);
    rfwd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut rfwd = rfwd.spawn().unwrap();
    let ping = || edgeport_e2e::ping_port(rport);
    assert!(
        wait_until(Duration::from_secs(30), || ping() == b"ping"),
        "the remote forward never carried data"
    );

    // A data budget below what the device moved this month: bulk transfers are refused with
    // a line naming the budget, shells go on; without the budget they work again.
    c.tctl
        .ok(&["devices", "set", "dev1", "--data-budget", "1MB"]);
    let cfg = tsh.config();
    let scp = |dest: &str| {
        let mut cmd = std::process::Command::new("scp");
        cmd.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes"])
            .arg(&file)
            .arg(format!("root@dev1:{}", c.dir.join(dest).display()));
        edgeport_e2e::run(cmd, None, Duration::from_secs(60))
    };
    let mut last_err = String::new();
    let refused = wait_until(Duration::from_secs(60), || {
        let r = scp("refused.bin");
        last_err = r.stderr();
        r.code() != Some(0)
    });
    assert!(refused, "scp still works past the budget: {last_err}");
    assert!(
        last_err.contains("past its monthly data budget of 1.0 MB"),
        "{last_err}"
    );
    let r = tsh.run(&["ssh", "root@dev1", "echo", "shell-ok"], None);
    assert_eq!(r.stdout(), "shell-ok\n", "{}", r.stderr());
    // The listener opened before the budget ran out now closes each connection unanswered.
    assert_eq!(
        ping(),
        b"",
        "a remote forward opened before the budget ran out still carried data"
    );
    let r = tsh.run(&["scp", file.to_str().unwrap(), &remote], None);
    assert_ne!(r.code(), Some(0), "tsh scp went through past the budget");
    assert!(
        r.stderr()
            .contains("past its monthly data budget of 1.0 MB"),
        "tsh scp does not say why: {}",
        r.stderr()
    );
    c.tctl
        .ok(&["devices", "set", "dev1", "--data-budget", "none"]);
    let allowed = wait_until(Duration::from_secs(60), || {
        scp("allowed.bin").code() == Some(0)
    });
    assert!(allowed, "scp stays refused after the budget was removed");
    assert!(
        wait_until(Duration::from_secs(30), || ping() == b"ping"),
        "the remote forward stayed closed after the budget was removed"
    );
    let _ = rfwd.kill();
    let _ = rfwd.wait();
    let bad = c
        .tctl
        .run(&["devices", "set", "dev1", "--data-budget", "lots"]);
    assert_ne!(bad.code(), Some(0));
    assert!(bad.stderr().contains("not a size"), "{}", bad.stderr());

    // The table, and a device that moved nothing.
    let text = c.tctl.ok(&["devices", "usage", "--since", "7d"]).stdout();
    assert!(text.contains("DEVICE") && text.contains("sftp"), "{text}");
    assert!(usage(&c, &["no-such-device"]).is_empty());
}
