//! Hosts behind the device (issue 22). An agent started with `--target` lines and a
//! `DATA/targets` file checks each target with a TCP connect and reports name, address,
//! labels, reachability and last check in its signed audit log, which reaches the authority
//! through the tunnel; the file is read again on SIGHUP.
//!
//! Relay mode: a real Debian OpenSSH sshd as the target, trusting the user CA and presenting
//! a host certificate from `tctl auth sign --host van/ecu1`, reached through the agent as
//! `van/ecu1` by `tsh ssh` and by stock `ssh` through `tsh config` / `tsh proxy ssh`; roles
//! refuse a target by its own label; a target whose host certificate names another host, an
//! unreachable one and an unknown one are refused with one line. The sshd listens on a
//! loopback port that only the agent's target configuration names (no network namespace:
//! the agent and the target share the test's network).

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use std::process::Command;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::{random_file, same_file, ssh, target_sshd, Cluster, Tsh};
use edgeport_e2e::{run, wait_until};
use serde_json::Value;

const PW: &str = "correct horse battery";

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

/// An Ed25519 key pair at `path` (and `path.pub`).
#[test]
fn relay_to_a_real_sshd_behind_the_device() {
    let c = Cluster::start("relay", &[]);

    // Prepare the legacy host as docs/devices.md says: trust the user CA, present a host
    // certificate for van/ecu1 from `tctl auth sign --host`.
    let (sshd, target, cert) = target_sshd(&c, "van/ecu1");
    let mut kg = Command::new("ssh-keygen");
    kg.arg("-L").arg("-f").arg(&cert);
    let shown = run(kg, None, Duration::from_secs(10))
        .expect_ok("ssh-keygen -L")
        .stdout();
    assert!(shown.contains("host certificate"), "{shown}");
    assert!(shown.contains("van/ecu1.relay"), "{shown}");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };

    // ecu1 and cam are the sshd (cam with a label a role denies); alias is the same sshd
    // under another name (its certificate names van/ecu1, not van/alias); gone is closed.
    let lines = [
        format!("ecu1={target} zone=engine"),
        // A target cannot give another value for a key of the device's (fleet=vans stands).
        format!("cam={target} zone=camera fleet=cameras"),
        format!("alias={target}"),
        format!("gone={closed}"),
    ];
    // Byte counters reported every second (the relayed bytes are checked below).
    let mut args = vec!["--test-usage-every", "1s"];
    for l in &lines {
        args.extend(["--target", l.as_str()]);
    }
    let agent = Agent::start(&c.dir.join("agent-van"), &c.gw, "van", "fleet=vans", &args);
    wait_online(&c.tctl, "van", None, Duration::from_secs(60));
    wait_report(&c, &agent, "van", |e| {
        e["up.ecu1"] == "yes" && e["up.gone"] == "no"
    });

    // tctl devices ls: a row per target, reachable or not.
    let ls = c.tctl.ok(&["devices", "ls"]).stdout();
    let row = |name: &str| {
        ls.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{ls}"))
            .to_string()
    };
    assert!(row("van/ecu1 ").contains(" reachable"), "{ls}");
    assert!(row("van/ecu1 ").contains("zone=engine"), "{ls}");
    assert!(row("van/gone ").contains(" unreachable"), "{ls}");
    // The target's labels sit under the LABELS header, like a device's.
    let header = ls.lines().next().unwrap_or_default();
    let col = header.find("LABELS").expect("a LABELS column");
    assert!(
        row("van/ecu1 ")
            .get(col..)
            .is_some_and(|rest| rest.contains("zone=engine")
                && !row("van/ecu1 ")[..col].contains("zone=engine")),
        "{ls}"
    );
    // The same in JSON: each device carries the targets behind it.
    let json = c.tctl.ok(&["devices", "ls", "--format", "json"]).json();
    let van = json
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == "van"))
        .unwrap_or_else(|| panic!("no van in {json}"));
    let targets = van["targets"].as_array().expect("targets array");
    let by_name = |n: &str| {
        targets
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("no {n} in {van}"))
    };
    assert_eq!(by_name("ecu1")["status"], "reachable", "{van}");
    assert_eq!(by_name("ecu1")["address"], "van/ecu1", "{van}");
    assert_eq!(by_name("ecu1")["labels"]["zone"], "engine", "{van}");
    assert_eq!(by_name("ecu1")["labels"]["fleet"], "vans", "{van}");
    assert_eq!(by_name("cam")["labels"]["fleet"], "vans", "{van}");
    assert_eq!(by_name("cam")["labels"]["zone"], "camera", "{van}");
    assert!(by_name("ecu1")["checked"].is_string(), "{van}");
    assert_eq!(by_name("gone")["status"], "unreachable", "{van}");

    c.add_user("alice", "root,alice", PW);
    let alice = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    alice
        .login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login alice");

    // tsh ls: the target with the device's labels and its own.
    let ls = alice.run(&["ls"], None).expect_ok("tsh ls").stdout();
    let ecu = ls
        .lines()
        .find(|l| l.starts_with("van/ecu1 "))
        .unwrap_or_else(|| panic!("no van/ecu1 row:\n{ls}"));
    assert!(
        ecu.contains("fleet=vans") && ecu.contains("zone=engine"),
        "{ls}"
    );
    // Filtering by a target's own label: its device is listed with that target only.
    let json = alice
        .run(&["ls", "zone=engine", "--format", "json"], None)
        .expect_ok("tsh ls zone=engine")
        .json();
    let list = json.as_array().expect("a JSON array");
    assert_eq!(list.len(), 1, "{json}");
    assert_eq!(list[0]["id"], "van", "{json}");
    let names: Vec<&str> = list[0]["targets"]
        .as_array()
        .expect("targets array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["ecu1"], "{json}");

    // tsh ssh: exec end to end on the target's own sshd.
    let r = alice.run(
        &[
            "ssh",
            "root@van/ecu1",
            "echo",
            "from-ecu1",
            "$SSH_CONNECTION",
        ],
        None,
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert!(
        r.stdout().starts_with("from-ecu1 127.0.0.1 "),
        "{}",
        r.stdout()
    );
    let log = std::fs::read_to_string(sshd.get("SSHD_LOG")).unwrap_or_default();
    assert!(log.contains("Accepted publickey for root"), "{log}");

    // Stock OpenSSH through `tsh config` (ProxyCommand tsh proxy ssh), host CA only.
    let cfg = alice.config();
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    assert!(cfg_text.contains("van/ecu1"), "{cfg_text}");
    let r = run(
        ssh(&cfg, &["root@van/ecu1", "echo", "via-openssh"]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(r.stdout(), "via-openssh\n");

    // The relayed SSH is counted as the device's `target` bytes.
    let counted = edgeport_e2e::wait_until(Duration::from_secs(30), || {
        let u = c
            .tctl
            .ok(&["devices", "usage", "van", "--format", "json"])
            .json();
        u[0]["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|x| x["service"] == "target" && x["up"].as_u64() > Some(1000))
        })
    });
    assert!(counted, "relayed bytes were not counted under target");

    // Files through the relay with stock OpenSSH tools: scp and rsync by the `van+ecu1`
    // alias (they read `van/ecu1:path` as a local path), sftp by either name. The target's
    // sshd runs on this machine, so its files are ours to compare.
    let src = c.dir.join("fw.bin");
    random_file(&src, 700_001);
    let up = c.dir.join("fw-on-ecu1.bin");
    let mut scp = Command::new("scp");
    scp.arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes"])
        .arg(&src);
    scp.arg(format!("root@van+ecu1:{}", up.display()));
    let r = run(scp, None, Duration::from_secs(120));
    assert_eq!(r.code(), Some(0), "scp: {}", r.stderr());
    assert!(same_file(&src, &up), "scp copied other bytes");
    let back = c.dir.join("fw-back.bin");
    let mut sftp = Command::new("sftp");
    sftp.arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-b", "-", "root@van/ecu1"]);
    let batch = format!("get {} {}\n", up.display(), back.display());
    let r = run(sftp, Some(batch.as_bytes()), Duration::from_secs(120));
    assert_eq!(r.code(), Some(0), "sftp: {}", r.stderr());
    assert!(same_file(&src, &back), "sftp copied other bytes");
    let tree = c.dir.join("logs");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    random_file(&tree.join("sub/a.log"), 50_000);
    let mirror = c.dir.join("logs-on-ecu1");
    let mut rsync = Command::new("rsync");
    rsync
        .arg("-a")
        .arg("-e")
        .arg(format!("ssh -F {} -o BatchMode=yes", cfg.display()));
    rsync
        .arg(format!("{}/", tree.display()))
        .arg(format!("root@van+ecu1:{}/", mirror.display()));
    let r = run(rsync, None, Duration::from_secs(120));
    assert_eq!(r.code(), Some(0), "rsync: {}", r.stderr());
    assert!(same_file(
        &tree.join("sub/a.log"),
        &mirror.join("sub/a.log")
    ));

    // Local port forwarding through the target's sshd (-L to its own SSH port).
    let lport = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let fwd = format!("{lport}:{target}");
    let mut tunnel = ssh(&cfg, &["-N", "-L", &fwd, "root@van/ecu1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let forwarded = wait_until(Duration::from_secs(30), || {
        use std::io::Read;
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", lport)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        banner = String::from_utf8_lossy(&buf[..n]).into_owned();
        banner.starts_with("SSH-2.0-")
    });
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert!(forwarded, "no SSH banner through -L: {banner:?}");

    // A lock on the user cuts a live relayed session (the agent cannot see inside it; the
    // gateway ends the spliced stream).
    let sessions = || {
        std::fs::read_to_string(sshd.get("SSHD_LOG"))
            .unwrap_or_default()
            .matches("Accepted publickey for root")
            .count()
    };
    let before = sessions();
    let mut long = alice.cmd(&["ssh", "root@van/ecu1", "echo started; sleep 300"]);
    long.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = long.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(30), || sessions() > before
        || matches!(child.try_wait(), Ok(Some(_)))));
    c.tctl
        .ok(&["lock", "--user", "alice", "--message", "incident 7"]);
    let ended = wait_until(Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(ended, "the locked user's relayed session is still running");
    assert_ne!(out.status.code(), Some(0));
    c.tctl.ok(&["unlock", "--user", "alice"]);

    // A target whose host certificate names another host: refused in one line, by tsh and
    // by OpenSSH alike.
    let r = alice.run(&["ssh", "root@van/alias", "echo", "nope"], None);
    assert_ne!(r.code(), Some(0));
    assert!(!r.stdout().contains("nope"));
    let err = r.stderr();
    assert!(
        err.contains("holds a host certificate for") && err.contains("not van/alias"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let r = run(
        ssh(
            &cfg,
            &[
                "-o",
                "HostKeyAlias=van/alias",
                "root@van/ecu1",
                "echo",
                "nope",
            ],
        ),
        None,
        Duration::from_secs(60),
    );
    assert_ne!(r.code(), Some(0));
    assert!(!r.stdout().contains("nope"));

    // Unreachable, unknown: one line each, and the agent's audit event.
    let r = alice.run(&["ssh", "root@van/gone", "true"], None);
    assert_ne!(r.code(), Some(0));
    let err = r.stderr();
    assert!(
        err.contains("target van/gone") && err.contains("unreachable"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let r = alice.run(&["ssh", "root@van/nope", "true"], None);
    assert_ne!(r.code(), Some(0));
    assert!(
        r.stderr().contains("has no target \"nope\""),
        "{}",
        r.stderr()
    );
    let found = wait_until(Duration::from_secs(90), || {
        let ev = c.tctl.ok(&[
            "audit",
            "search",
            "--format",
            "json",
            "--device",
            "van",
            "--type",
            "target.refused",
        ]);
        ev.json().as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["target"] == "gone" && e["user"] == "alice")
        })
    });
    assert!(found, "no target.refused event for gone");

    // Login refused by the target's sshd (its principals file lists root only).
    let r = alice.run(&["ssh", "alice@van/ecu1", "true"], None);
    assert_ne!(r.code(), Some(0));
    assert!(
        r.stderr()
            .contains("access to van/ecu1 as \"alice\" denied"),
        "{}",
        r.stderr()
    );

    // Roles match a target by its labels: bob may reach vans but not cameras.
    c.tctl.ok(&[
        "roles",
        "add",
        "no-cameras",
        "--allow",
        "fleet=vans",
        "--deny",
        "zone=camera",
    ]);
    c.auth
        .add_user_with("bob", PW, &["--logins", "root", "--roles", "no-cameras"])
        .expect_ok("users add bob");
    let bob = Tsh::new(c.dir.join("tsh-bob"), c.proxy());
    bob.login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login bob");
    let r = bob.run(&["ssh", "root@van/cam", "echo", "nope"], None);
    assert_ne!(r.code(), Some(0));
    assert!(!r.stdout().contains("nope"));
    assert!(
        r.stderr().contains("do not allow target van/cam"),
        "{}",
        r.stderr()
    );
    let r = bob.run(&["ssh", "root@van/ecu1", "echo", "engine-ok"], None);
    assert_eq!(r.stdout(), "engine-ok\n", "{}", r.stderr());
    let ls = bob.run(&["ls"], None).expect_ok("tsh ls bob").stdout();
    assert!(ls.contains("van/ecu1") && !ls.contains("van/cam"), "{ls}");
    drop(sshd);
}
