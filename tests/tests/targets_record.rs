//! Record mode for hosts behind the device (issue 22, `mode=record` on a target line): the
//! agent terminates the user's SSH itself (certificate, roles, locks as for its own logins),
//! asks the authority through its tunnel for a per-session certificate, logs in to a real
//! Debian sshd with it (checking the sshd's pinned host key), relays exec, PTY and sftp, and
//! records the PTY output so that `tsh play` replays it. Past the device's data budget, sftp,
//! scp and forwards to the target are refused as the device's own are. A target presenting another key than
//! the pinned one, and a target that refuses the login, are refused in one line; a lock cuts
//! a live record-mode session and its connection to the target.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::peers::Peer;
use edgeport_e2e::ssh::{ssh, Cluster, Tsh};
use edgeport_e2e::{run, wait_until};
use serde_json::Value;

const PW: &str = "correct horse battery";

fn key_line(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Audit events of `kind` from device van, once one matches `f`.
fn wait_events(c: &Cluster, kind: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        let r = c.tctl.ok(&[
            "audit", "search", "--format", "json", "--device", "van", "--type", kind,
        ]);
        last = r.json().as_array().cloned().unwrap_or_default();
        last.iter().any(&f)
    });
    assert!(ok, "no matching {kind} event: {last:#?}");
    last
}

#[test]
fn record_mode_to_a_real_sshd_behind_the_device() {
    let c = Cluster::start("record", &[]);
    let dir = c.dir.join("ecu1");
    std::fs::create_dir_all(&dir).unwrap();
    // The legacy host as docs/devices.md says: trusts the user CA, `root` among the
    // principals for root; no host certificate, its key pinned on the targets line.
    let user_ca = dir.join("user_ca.pub");
    let ca = c.tctl.ok(&["auth", "export", "--type", "user"]).stdout();
    std::fs::write(&user_ca, ca).unwrap();
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
    let agent_dir = c.dir.join("agent-van");
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::write(
        agent_dir.join("targets"),
        format!(
            "ecu1={addr} zone=engine mode=record hostkey={real}\n\
             swapped={addr} mode=record hostkey={other}\n"
        ),
    )
    .unwrap();
    // Usage reported every second (the data budget part below).
    let agent = Agent::start(
        &agent_dir,
        &c.gw,
        "van",
        "fleet=vans",
        &["--test-usage-every", "1s"],
    );
    wait_online(&c.tctl, "van", None, Duration::from_secs(60));
    wait_events(&c, "targets", |e| e["mode.ecu1"] == "record");

    c.add_user("alice", "root", PW);
    let alice = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    alice
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login alice");
    let log = || std::fs::read_to_string(sshd.get("SSHD_LOG")).unwrap_or_default();

    // exec: output and exit status come back; the target saw a login with a certificate the
    // authority made for alice (key id alice), not her own.
    let r = alice.run(&["ssh", "root@van/ecu1", "echo", "record-ok"], None);
    assert_eq!(
        r.code(),
        Some(0),
        "{}\nagent:\n{}",
        r.stderr(),
        agent.proc.log_text()
    );
    assert_eq!(r.stdout(), "record-ok\n");
    let r = alice.run(&["ssh", "root@van/ecu1", "exit 7"], None);
    assert_eq!(r.code(), Some(7), "{}", r.stderr());

    // A role that requires a moderator on the target's labels: record mode cannot hold a
    // session back until one joins, so the target is closed to it (not open without one).
    c.tctl.ok(&[
        "roles",
        "add",
        "field",
        "--allow",
        "fleet=vans",
        "--require-moderator",
        "zone=engine",
    ]);
    c.auth
        .add_user_with("frank", PW, &["--logins", "root", "--roles", "field"])
        .expect_ok("tctl users add frank");
    let frank = Tsh::new(c.dir.join("tsh-frank"), c.proxy());
    frank
        .login("frank", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login frank");
    let r = frank.run(&["ssh", "root@van/ecu1", "echo", "unmoderated"], None);
    assert!(
        !r.ok() && !r.stdout().contains("unmoderated"),
        "{}",
        r.stdout()
    );
    assert!(
        r.stderr().contains("cannot wait for a moderator"),
        "{}",
        r.stderr()
    );
    let accepted = log();
    assert!(
        accepted.contains("Accepted publickey for root") && accepted.contains("ID alice"),
        "{accepted}"
    );
    wait_events(&c, "target_cert.issued", |e| {
        e["target"] == "ecu1" && e["user"] == "alice" && e["login"] == "root"
    });

    // PTY (OpenSSH through `tsh config`, -tt with a command): recorded, and `tsh play`
    // replays it.
    let cfg = alice.config();
    let r = run(
        ssh(
            &cfg,
            &["-tt", "root@van/ecu1", "echo marker-$((6*7))-rec; tty"],
        ),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert!(r.stdout().contains("marker-42-rec"), "{}", r.stdout());
    assert!(r.stdout().contains("/dev/pts/"), "{}", r.stdout());
    let starts = wait_events(&c, "session.start", |e| {
        e["target"] == "ecu1" && e["pty"] == true
    });
    let sid = starts
        .iter()
        .find(|e| e["target"] == "ecu1" && e["pty"] == true)
        .unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut text = String::new();
    let played = wait_until(Duration::from_secs(60), || {
        let r = alice.run(&["play", &sid, "--format", "text"], None);
        text = r.stdout();
        r.code() == Some(0) && text.contains("marker-42-rec")
    });
    assert!(played, "the recording of {sid} does not replay: {text}");

    // sftp through the record-mode session (the target's own sftp-server).
    let src = c.dir.join("cfg.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let remote = dir.join("uploaded.bin");
    let back = c.dir.join("cfg-back.bin");
    let mut sftp = Command::new("sftp");
    sftp.arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-b", "-", "root@van/ecu1"]);
    let batch = format!(
        "put {} {}\nget {} {}\n",
        src.display(),
        remote.display(),
        remote.display(),
        back.display()
    );
    let r = run(sftp, Some(batch.as_bytes()), Duration::from_secs(120));
    assert_eq!(r.code(), Some(0), "sftp: {}", r.stderr());
    assert_eq!(std::fs::read(&remote).unwrap(), data, "sftp put");
    assert_eq!(std::fs::read(&back).unwrap(), data, "sftp get");

    // An `ssh -R` on the target asked for before the budget runs out: it carries data now.
    let echo = edgeport_e2e::echo_server();
    let rport = edgeport_e2e::free_port();
    let mut rfwd = ssh(
        &cfg,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("{rport}:127.0.0.1:{echo}"),
            "root@van/ecu1",
        ],
    );
    rfwd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut rfwd = rfwd.spawn().unwrap();
    let ping = || edgeport_e2e::ping_port(rport);
    assert!(
        wait_until(Duration::from_secs(30), || ping() == b"ping"),
        "the target's remote forward never carried data"
    );

    // Past the device's data budget, bulk transfers to a record-mode target are refused as
    // the device's own are (sftp, scp's far side, port forwards), with the line naming the budget; a
    // command still runs. Without the budget they work again.
    c.tctl
        .ok(&["devices", "set", "van", "--data-budget", "100kB"]);
    let sftp_put = || {
        let mut sftp = Command::new("sftp");
        sftp.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", "-b", "-", "root@van/ecu1"]);
        let batch = format!("put {} {}\n", src.display(), remote.display());
        run(sftp, Some(batch.as_bytes()), Duration::from_secs(120))
    };
    let mut last = String::new();
    let refused = wait_until(Duration::from_secs(60), || {
        let r = sftp_put();
        last = r.stderr();
        r.code() != Some(0)
    });
    assert!(
        refused,
        "sftp to the target still works past the budget: {last}"
    );
    assert!(last.contains("past its monthly data budget"), "{last}");
    // What scp runs on the far side (scp itself will not take `van/ecu1` for a host).
    let sink = format!("scp -t {}", remote.display());
    let r = run(
        ssh(&cfg, &["root@van/ecu1", &sink]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(1), "scp -t went through past the budget");
    assert!(
        r.stderr().contains("past its monthly data budget"),
        "{}",
        r.stderr()
    );
    let r = run(
        ssh(
            &cfg,
            &[
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                "0:127.0.0.1:9",
                "root@van/ecu1",
                "true",
            ],
        ),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(
        r.code(),
        Some(255),
        "ssh -R past the budget: {}",
        r.stderr()
    );
    assert!(
        r.stderr().contains("remote port forwarding failed"),
        "{}",
        r.stderr()
    );
    wait_events(&c, "port_forward", |e| {
        e["success"] == false
            && e["reason"]
                .as_str()
                .is_some_and(|m| m.contains("data budget"))
    });
    let r = alice.run(&["ssh", "root@van/ecu1", "echo", "shell-ok"], None);
    assert_eq!(r.stdout(), "shell-ok\n", "{}", r.stderr());
    // The forward asked for before carries nothing past the budget.
    assert_eq!(
        ping(),
        b"",
        "a target's remote forward asked for before the budget ran out still carried data"
    );
    let _ = rfwd.kill();
    let _ = rfwd.wait();
    c.tctl
        .ok(&["devices", "set", "van", "--data-budget", "none"]);
    let mut last = String::new();
    let allowed = wait_until(Duration::from_secs(60), || {
        let r = sftp_put();
        last = r.stderr();
        r.code() == Some(0)
    });
    assert!(
        allowed,
        "sftp stays refused after the budget was removed: {last}"
    );

    // Another key than the pinned one: refused in one line, and no login reached the sshd.
    let before = log().matches("Accepted publickey").count();
    let r = alice.run(&["ssh", "root@van/swapped", "echo", "nope"], None);
    assert_ne!(r.code(), Some(0));
    assert!(!r.stdout().contains("nope"));
    let err = r.stderr();
    assert!(
        err.contains("host key mismatch") && err.contains("van/swapped"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(log().matches("Accepted publickey").count(), before);
    wait_events(&c, "target.refused", |e| {
        e["target"] == "swapped"
            && e["error"]
                .as_str()
                .is_some_and(|m| m.contains("host key mismatch"))
    });

    // The target refuses the login (root's principals no longer list root): one line.
    let principals = std::path::Path::new(&sshd.get("SSHD_DIR")).join("principals/root");
    std::fs::write(&principals, "someone-else\n").unwrap();
    let r = alice.run(&["ssh", "root@van/ecu1", "echo", "nope"], None);
    std::fs::write(&principals, "root\n").unwrap();
    assert_ne!(r.code(), Some(0));
    let err = r.stderr();
    assert!(err.contains("login refused by the target"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // A lock cuts a live record-mode session, and the agent's connection to the target.
    let mut long = alice.cmd(&["ssh", "root@van/ecu1", "echo started; sleep 300"]);
    long.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = long.spawn().unwrap();
    let logins = log().matches("Accepted publickey").count();
    assert!(wait_until(Duration::from_secs(30), || {
        log().matches("Accepted publickey").count() > logins
            || matches!(child.try_wait(), Ok(Some(_)))
    }));
    // The lock may reach the agent before sleep starts: wait for the exec to be audited.
    wait_events(&c, "exec", |e| {
        e["command"]
            .as_str()
            .is_some_and(|m| m.contains("sleep 300"))
    });
    let ended_before = log().matches("session ended").count();
    c.tctl
        .ok(&["lock", "--user", "alice", "--message", "incident 9"]);
    let ended = wait_until(Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        ended,
        "the locked user's record-mode session is still running"
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        wait_until(Duration::from_secs(30), || log()
            .matches("session ended")
            .count()
            > ended_before),
        "the agent did not close its connection to the target: {}",
        log()
    );
    drop(sshd);
}
