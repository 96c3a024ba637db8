//! Audit end to end: device events and recordings reach the authority through the tunnel,
//! survive an offline authority and a killed agent, tampering is flagged, and a full disk
//! under the spool is reported, not fatal.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::{Cluster, Tmux, Tsh};
use edgeport_e2e::{bin, run, wait_until, Authority};
use serde_json::Value;

const PW: &str = "correct horse battery";

fn login(c: &Cluster) -> Tsh {
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh-home"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    tsh
}

fn search(c: &Cluster, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "search", "--format", "json"];
    args.extend_from_slice(extra);
    c.tctl
        .ok(&args)
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until a search returns an event for which `f` holds; returns all events.
fn wait_event(c: &Cluster, what: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        last = search(c, &[]);
        last.iter().any(&f)
    });
    assert!(
        ok,
        "no {what} event; events:\n{}\nagent log:\n{}",
        serde_json::to_string_pretty(&last).unwrap(),
        c.agents
            .first()
            .map(|a| a.proc.log_text())
            .unwrap_or_default()
    );
    last
}

fn spool_dir(agent_dir: &Path) -> PathBuf {
    agent_dir.join("audit").join("spool")
}

/// Every line of every spool segment (complete lines only).
fn spool_lines(agent_dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(spool_dir(agent_dir))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        out.extend(text.lines().map(str::to_string));
    }
    out
}

fn verify(c: &Cluster) -> (bool, String) {
    let r = c.tctl.run(&["audit", "verify"]);
    (r.ok(), format!("{}{}", r.stdout(), r.stderr()))
}

fn exec_session(tsh: &Tsh, cmd: &str) -> i32 {
    tsh.run(&["ssh", "root@dev1", cmd], None)
        .code()
        .unwrap_or(-1)
}

#[test]
fn exec_and_interactive_sessions_are_audited_and_recorded() {
    let c = Cluster::start("audit-a", &[("dev1", "")]);
    let tsh = login(&c);
    let r = tsh.run(&["ssh", "root@dev1", "echo hi; exit 3"], None);
    assert_eq!(r.code(), Some(3), "{}", r.stderr());
    assert_eq!(r.stdout(), "hi\n");

    let events = wait_event(&c, "session.end", |e| {
        e["type"] == "session.end" && e["exit_code"] == 3
    });
    let end = events
        .iter()
        .find(|e| e["type"] == "session.end" && e["exit_code"] == 3)
        .unwrap();
    let sid = end["session_id"].as_str().unwrap().to_string();
    assert_eq!(sid.len(), 32, "{end}");
    // The gateway reports its own events separately (batched): wait for its view too.
    let events = wait_event(&c, "gateway.dial", |e| {
        e["type"] == "gateway.dial" && e["session_id"] == sid.as_str()
    });
    let of = |t: &str| {
        events
            .iter()
            .find(|e| e["type"] == t && e["session_id"] == sid.as_str())
            .unwrap_or_else(|| panic!("no {t} for session {sid}: {events:#?}"))
            .clone()
    };
    for t in ["session.start", "exec", "session.end"] {
        let e = of(t);
        assert_eq!(e["user"], "alice", "{e}");
        assert_eq!(e["login"], "root", "{e}");
        assert_eq!(e["device"], "dev1", "{e}");
        assert!(e["time"].is_string(), "{e}");
    }
    assert_eq!(of("exec")["command"], "echo hi; exit 3");
    // The start names the certificate's expiry (RFC 3339), so the authority can flag a
    // session still open past it.
    let expires = of("session.start")["cert_expires"].clone();
    assert!(
        expires
            .as_str()
            .is_some_and(|t| t.starts_with("20") && t.ends_with('Z')),
        "{expires}"
    );
    let end = of("session.end");
    assert_eq!(end["bytes_out"], 3, "{end}");
    assert!(end["duration_secs"].is_number(), "{end}");
    // The gateway's view of the same session, and the authority's own events.
    let dial = of("gateway.dial");
    assert_eq!(dial["user"], "alice");
    assert!(dial["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    for t in [
        "user.created",
        "user.login",
        "cert.issued",
        "device.join",
        "token.created",
    ] {
        assert!(events.iter().any(|e| e["type"] == t), "no {t}: {events:#?}");
    }
    // Filters.
    let only = search(
        &c,
        &[
            "--type", "exec", "--device", "dev1", "--user", "alice", "--since", "1h",
        ],
    );
    assert!(
        !only.is_empty() && only.iter().all(|e| e["type"] == "exec"),
        "{only:#?}"
    );
    assert!(search(&c, &["--user", "nobody"]).is_empty());
    let text = c
        .tctl
        .ok(&["audit", "search", "--type", "session.end"])
        .stdout();
    assert!(text.contains("exit_code=3"), "{text}");

    // A refused login is an event too.
    let r = tsh.run(&["ssh", "nobody@dev1", "true"], None);
    assert_ne!(r.code(), Some(0));
    wait_event(&c, "auth.refused", |e| {
        e["type"] == "auth.refused" && e["login"] == "nobody"
    });

    // File transfers with the stock sftp client: each file, with its size, and the removal.
    let cfg = tsh.config();
    let local = c.dir.join("up.bin");
    std::fs::write(&local, vec![42u8; 300_000]).unwrap();
    let remote = format!("/tmp/edgeport-audit-{}.bin", std::process::id());
    let batch = c.dir.join("sftp.batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {remote}\nget {remote} {}\nrm {remote}\n",
            local.display(),
            c.dir.join("down.bin").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("sftp");
    cmd.arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-b"])
        .arg(&batch)
        .arg("root@dev1");
    run(cmd, None, Duration::from_secs(120)).expect_ok("sftp");
    let events = wait_event(&c, "sftp.remove", |e| {
        e["type"] == "sftp.remove" && e["path"] == remote.as_str()
    });
    let files: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "sftp.file" && e["path"] == remote.as_str())
        .collect();
    assert!(
        files
            .iter()
            .any(|e| e["mode"] == "write" && e["bytes_written"] == 300000),
        "{files:#?}"
    );
    assert!(
        files
            .iter()
            .any(|e| e["mode"] == "read" && e["bytes_read"] == 300000),
        "{files:#?}"
    );
    assert!(files
        .iter()
        .all(|e| e["user"] == "alice" && e["device"] == "dev1"));

    // An interactive session, recorded.
    let tmux = Tmux::start(
        "audit-pty",
        100,
        30,
        &format!(
            "env TSH_HOME='{}' '{}' ssh root@dev1; echo TSH-EXIT=$?; sleep 60",
            tsh.home.display(),
            bin("tsh").display()
        ),
    );
    tmux.send(&["echo marker-123", "Enter"]);
    let (ok, screen) = tmux.wait_for("marker-123\n", Duration::from_secs(30));
    assert!(ok, "{screen}");
    tmux.send(&["exit", "Enter"]);
    let (ok, screen) = tmux.wait_for("TSH-EXIT=0", Duration::from_secs(30));
    assert!(ok, "{screen}");
    drop(tmux);
    let events = wait_event(&c, "shell session.end", |e| {
        e["type"] == "session.end" && e["kind"] == "shell"
    });
    let sid = events
        .iter()
        .find(|e| e["type"] == "session.end" && e["kind"] == "shell")
        .unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let recs = tsh
        .run(&["recordings", "ls", "--format", "json"], None)
        .expect_ok("tsh recordings ls")
        .json();
    assert!(
        recs.as_array()
            .unwrap()
            .iter()
            .any(|r| r["session_id"] == sid.as_str()),
        "{recs:#}"
    );
    let text = tsh
        .run(&["play", &sid, "--format", "text"], None)
        .expect_ok("tsh play --format text")
        .stdout();
    assert!(text.contains("marker-123"), "{text}");
    // The recording is a valid asciicast v2 file.
    let cast = tsh
        .run(&["play", &sid, "--format", "cast"], None)
        .expect_ok("tsh play --format cast")
        .stdout();
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert_eq!(header["width"], 100);
    let mut last_t = 0.0;
    for l in lines {
        let ev: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        let t = ev[0].as_f64().unwrap();
        assert!(t >= last_t, "{l}");
        last_t = t;
        assert_eq!(ev[1], "o");
        assert!(ev[2].is_string());
    }
    // Stock asciinema reads it too (where installed).
    if Command::new("asciinema")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let f = c.dir.join("session.cast");
        std::fs::write(&f, &cast).unwrap();
        // `asciinema cat` opens /dev/tty, which a test run without a controlling terminal
        // (a CI job, a detached shell) does not have: util-linux's `script` gives it one.
        let mut a = Command::new("script");
        a.args(["-q", "-e", "-c"])
            .arg(format!("asciinema cat '{}'", f.display()))
            .arg("/dev/null");
        let r = run(a, None, Duration::from_secs(30));
        assert!(
            r.ok() && r.stdout().contains("marker-123"),
            "{}",
            r.stderr()
        );
    }
    // Another user sees neither the recording nor can play it.
    c.add_user("bob", "root", PW);
    let bob = Tsh::new(c.dir.join("tsh-bob"), c.proxy());
    bob.login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login bob");
    let theirs = bob
        .run(&["recordings", "ls", "--format", "json"], None)
        .expect_ok("bob: tsh recordings ls")
        .json();
    assert_eq!(theirs.as_array().unwrap().len(), 0, "{theirs:#}");
    let r = bob.run(&["play", &sid, "--format", "text"], None);
    assert_eq!(r.code(), Some(1));
    assert!(r.stderr().contains("no recording"), "{}", r.stderr());
    assert!(!r.stdout().contains("marker-123"));
    // Replay with timing (fast) ends and prints the same.
    let played = tsh
        .run(&["play", &sid, "--speed", "50"], None)
        .expect_ok("tsh play")
        .stdout();
    assert!(played.contains("marker-123"));
    let (ok, out) = verify(&c);
    assert!(ok, "{out}");
    assert!(out.contains("dev1") && out.contains("chain OK"), "{out}");
}

/// The seqs of dev1's events the authority holds (device events only), in search order.
fn stored_seqs(c: &Cluster, device: &str) -> Vec<u64> {
    let mut args = vec!["audit", "search", "--format", "json", "--device", device];
    let mut out = Vec::new();
    for e in c.tctl.ok(&args).json().as_array().unwrap() {
        if e["source"] == "device" {
            out.push(e["seq"].as_u64().unwrap());
        }
    }
    // recording chunks are part of the chain too
    args.extend(["--type", "recording.chunk"]);
    for e in c.tctl.ok(&args).json().as_array().unwrap() {
        out.push(e["seq"].as_u64().unwrap());
    }
    out.sort();
    out
}

fn restart_authority(c: &mut Cluster) {
    let (dir, cluster, addr) = (
        c.auth.data_dir.clone(),
        c.auth.cluster.clone(),
        c.auth.addr.clone(),
    );
    c.auth.proc.stop();
    c.auth = Authority::start_at(&dir, &cluster, &addr);
}

fn spool_events(agent_dir: &Path) -> Vec<Value> {
    spool_lines(agent_dir)
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_spool_empty(c: &Cluster, agent_dir: &Path) {
    let ok = wait_until(Duration::from_secs(60), || {
        spool_lines(agent_dir).is_empty()
    });
    assert!(
        ok,
        "spool not emptied: {:?}\nagent log:\n{}",
        spool_lines(agent_dir),
        c.agents[0].proc.log_text()
    );
}

#[test]
fn offline_authority_then_drain_and_agent_crash() {
    let mut c = Cluster::start("audit-b", &[("dev1", "")]);
    let tsh = login(&c);
    let agent_dir = c.agents[0].data_dir.clone();
    assert_eq!(exec_session(&tsh, "echo online-0"), 0);
    wait_event(&c, "exec online-0", |e| e["command"] == "echo online-0");

    // The authority goes away; sessions on the device keep working and are spooled.
    let (dir, cluster, addr) = (
        c.auth.data_dir.clone(),
        c.auth.cluster.clone(),
        c.auth.addr.clone(),
    );
    c.auth.proc.stop();
    for i in 1..=3 {
        assert_eq!(exec_session(&tsh, &format!("echo offline-{i}")), 0);
    }
    let ok = wait_until(Duration::from_secs(30), || {
        spool_events(&agent_dir)
            .iter()
            .any(|e| e["fields"]["command"] == "echo offline-3")
    });
    assert!(
        ok,
        "offline events not in the spool: {:?}",
        spool_lines(&agent_dir)
    );
    c.auth = Authority::start_at(&dir, &cluster, &addr);
    let events = wait_event(&c, "exec offline-3", |e| e["command"] == "echo offline-3");
    let seq_of = |cmd: &str| {
        events.iter().find(|e| e["command"] == cmd).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    assert!(seq_of("echo offline-1") < seq_of("echo offline-2"));
    assert!(seq_of("echo offline-2") < seq_of("echo offline-3"));
    wait_spool_empty(&c, &agent_dir);
    let (ok, out) = verify(&c);
    assert!(ok, "{out}");

    // Offline again, a busy terminal session, and the agent is killed in the middle of it.
    c.auth.proc.stop();
    let tmux = Tmux::start(
        "audit-busy",
        80,
        24,
        &format!(
            "env TSH_HOME='{}' '{}' ssh root@dev1; sleep 60",
            tsh.home.display(),
            bin("tsh").display()
        ),
    );
    tmux.send(&[
        "for i in $(seq 1 200000); do echo busy-line-$i; done",
        "Enter",
    ]);
    let ok = wait_until(Duration::from_secs(30), || {
        spool_lines(&agent_dir).len() > 5
    });
    assert!(ok, "nothing spooled: {}", c.agents[0].proc.log_text());
    c.agents[0].proc.kill9();
    drop(tmux);
    // Whatever was complete on disk must arrive; simulate a torn record at the very end as
    // well (the kill may or may not have produced one).
    let before: Vec<u64> = spool_events(&agent_dir)
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(!before.is_empty());
    let mut segs: Vec<PathBuf> = std::fs::read_dir(spool_dir(&agent_dir))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    segs.sort();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(segs.last().unwrap())
            .unwrap();
        f.write_all(b"{\"seq\":999999,\"prev_hash\":\"00").unwrap();
    }
    let gw = c.gw.addr.clone();
    c.agents[0] = Agent::start_joined(&agent_dir, &gw, "dev1", &[]);
    restart_authority(&mut c);
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    wait_spool_empty(&c, &agent_dir);
    let log = c.agents[0].proc.log_text();
    assert!(log.contains("incomplete record"), "{log}");
    let stored = stored_seqs(&c, "dev1");
    for s in &before {
        assert!(
            stored.contains(s),
            "spooled event {s} was lost; stored: {stored:?}"
        );
    }
    let mut dedup = stored.clone();
    dedup.dedup();
    assert_eq!(dedup, stored, "an event was stored twice");
    assert_eq!(
        stored,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "gap in {stored:?}"
    );
    let (ok, out) = verify(&c);
    assert!(ok, "{out}");
    assert!(out.contains("chain OK"), "{out}");
    // The session the kill cut is closed in the log by the restarted agent: its start has an
    // end, with the reason and the last time the agent knew of it.
    let starts = search(&c, &["--type", "session.start"]);
    let ends = search(&c, &["--type", "session.end"]);
    for start in &starts {
        let sid = &start["session_id"];
        assert!(
            ends.iter().any(|e| e["session_id"] == *sid),
            "session {sid} has no session.end: {ends:#?}"
        );
    }
    let restarted = ends
        .iter()
        .find(|e| e["reason"] == "agent restarted")
        .unwrap_or_else(|| panic!("no session.end for the session the kill cut: {ends:#?}"));
    assert!(
        restarted["last_known"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{restarted}"
    );
    // Sessions still work after all this.
    assert_eq!(exec_session(&tsh, "true"), 0);
}

#[test]
fn fifty_kills_during_spool_writes_and_uploads() {
    // Flash-friendly and power-cut-safe (issue 23): the agent is killed 50 times while it
    // spools a burst of events and ships them. Every start must succeed, and in the end
    // every event that reached the spool arrives once: the authority's chain for the device
    // runs 1..=N without a gap or a repeat and verifies.
    let mut c = Cluster::start("audit-k", &[("dev1", "")]);
    let agent_dir = c.agents[0].data_dir.clone();
    let gw = c.gw.addr.clone();
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    for i in 0..50u64 {
        // Kills land at different points: during the flood's spool writes (right after
        // start) and during uploads (once the tunnel is up).
        std::thread::sleep(Duration::from_millis(40 + (i * 97) % 700));
        assert!(
            c.agents[0].proc.alive(),
            "the agent died on its own (start {i}):\n{}",
            c.agents[0].proc.log_text()
        );
        c.agents[0].proc.kill9();
        c.agents[0] = Agent::start_joined(&agent_dir, &gw, "dev1", &["--test-audit-flood", "100"]);
    }
    std::thread::sleep(Duration::from_millis(300));
    c.agents[0].proc.kill9();
    c.agents[0] = Agent::start_joined(&agent_dir, &gw, "dev1", &[]);
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    wait_spool_empty(&c, &agent_dir);
    let log = c.agents[0].proc.log_text();
    assert!(!log.contains("corrupt"), "{log}");
    let stored = stored_seqs(&c, "dev1");
    assert!(
        stored.len() > 100,
        "only {} events arrived: the floods were never spooled",
        stored.len()
    );
    assert_eq!(
        stored,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "a gap or a repeat in the device's chain"
    );
    let (ok, out) = verify(&c);
    assert!(ok && out.contains("chain OK"), "{out}");
    eprintln!(
        "50 kills: {} events arrived in one unbroken chain",
        stored.len()
    );
}

#[test]
fn tampering_is_flagged() {
    let mut c = Cluster::start("audit-c", &[("dev1", "")]);
    let tsh = login(&c);
    let agent_dir = c.agents[0].data_dir.clone();
    assert_eq!(exec_session(&tsh, "echo before"), 0);
    wait_event(&c, "exec before", |e| e["command"] == "echo before");

    // 1. An event edited in the spool before it ships.
    let (dir, cluster, addr) = (
        c.auth.data_dir.clone(),
        c.auth.cluster.clone(),
        c.auth.addr.clone(),
    );
    c.auth.proc.stop();
    assert_eq!(exec_session(&tsh, "echo tamper-me"), 0);
    assert_eq!(exec_session(&tsh, "echo after"), 0);
    let ok = wait_until(Duration::from_secs(30), || {
        spool_lines(&agent_dir)
            .iter()
            .any(|l| l.contains("echo after"))
    });
    assert!(ok);
    c.agents[0].proc.stop();
    let mut edited = false;
    for f in std::fs::read_dir(spool_dir(&agent_dir)).unwrap().flatten() {
        let text = std::fs::read_to_string(f.path()).unwrap();
        if text.contains("echo tamper-me") {
            std::fs::write(f.path(), text.replace("echo tamper-me", "echo innocent")).unwrap();
            edited = true;
        }
    }
    assert!(edited);
    let gw = c.gw.addr.clone();
    c.agents[0] = Agent::start_joined(&agent_dir, &gw, "dev1", &[]);
    c.auth = Authority::start_at(&dir, &cluster, &addr);
    wait_event(&c, "exec after", |e| e["command"] == "echo after");

    // 2. A replayed batch, 3. a batch signed with another key.
    let key = c.dir.join("other-key");
    let r = run(
        {
            let mut k = Command::new("ssh-keygen");
            k.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key);
            k
        },
        None,
        Duration::from_secs(30),
    );
    assert!(r.ok(), "{}", r.stderr());
    let a2 = Agent::start(
        &c.dir.join("agent-dev2"),
        &c.gw,
        "dev2",
        "",
        &["--test-audit-replay"],
    );
    let a3 = Agent::start(
        &c.dir.join("agent-dev3"),
        &c.gw,
        "dev3",
        "",
        &["--test-audit-sign-key", key.to_str().unwrap()],
    );
    c.agents.push(a2);
    c.agents.push(a3);
    wait_online(&c.tctl, "dev2", None, Duration::from_secs(60));
    wait_online(&c.tctl, "dev3", None, Duration::from_secs(60));

    let mut out = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        let (_, o) = verify(&c);
        out = o;
        out.contains("alert chain")
            && out.contains("alert replay")
            && out.contains("alert bad_signature")
    });
    assert!(ok, "{out}");
    let r = c.tctl.run(&["audit", "verify"]);
    assert_eq!(r.code(), Some(1), "{}", r.stdout());
    assert!(r.stderr().contains("integrity problems"), "{}", r.stderr());
    let j = c
        .tctl
        .run(&["audit", "verify", "--device", "dev3", "--format", "json"])
        .json();
    assert_eq!(j[0]["device"], "dev3");
    assert_eq!(j[0]["ok"], false);
    assert_eq!(j[0]["events"], 0, "a forged batch was stored: {j:#}");
    // The tampered event itself is on record, flagged, not silently accepted.
    let edited_ev = search(&c, &["--device", "dev1", "--type", "exec"]);
    assert!(edited_ev.iter().any(|e| e["command"] == "echo innocent"));
    let j = c
        .tctl
        .run(&["audit", "verify", "--device", "dev1", "--format", "json"])
        .json();
    assert!(
        j[0]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["type"] == "chain"),
        "{j:#}"
    );
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_under_the_spool() {
    let mut c = Cluster::start("audit-d", &[]);
    let agent_dir = c.dir.join("agent-dev1");
    let audit_dir = agent_dir.join("audit");
    std::fs::create_dir_all(&audit_dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
        .arg(&audit_dir)
        .status()
        .unwrap();
    if !st.success() {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    }
    let _m = Mount(audit_dir.clone());
    let a = Agent::start(&agent_dir, &c.gw, "dev1", "", &[]);
    c.agents.push(a);
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    let tsh = login(&c);
    assert_eq!(exec_session(&tsh, "echo first"), 0);
    wait_event(&c, "exec first", |e| e["command"] == "echo first");

    // Keep events on the device (authority down) and fill the filesystem.
    let (dir, cluster, addr) = (
        c.auth.data_dir.clone(),
        c.auth.cluster.clone(),
        c.auth.addr.clone(),
    );
    c.auth.proc.stop();
    let filler = audit_dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .output();
    for i in 0..3 {
        assert_eq!(exec_session(&tsh, &format!("echo full-{i}")), 0);
    }
    let ok = wait_until(Duration::from_secs(30), || {
        c.agents[0]
            .proc
            .log_text()
            .contains("cannot write the audit spool")
    });
    let log = c.agents[0].proc.log_text();
    assert!(ok, "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    assert!(c.agents[0].proc.alive(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // Every spool line is still a whole event.
    for l in spool_lines(&agent_dir) {
        serde_json::from_str::<Value>(&l)
            .unwrap_or_else(|e| panic!("corrupt spool line {l:?}: {e}"));
    }
    // The authority comes back while the disk is still full: the spool gave back its
    // reserve, so the drop is still reported, with counts.
    let released = wait_until(Duration::from_secs(10), || {
        c.agents[0]
            .proc
            .log_text()
            .contains("released the audit spool")
    });
    assert!(released, "{}", c.agents[0].proc.log_text());
    c.auth = Authority::start_at(&dir, &cluster, &addr);
    let events = wait_event(&c, "audit.dropped", |e| e["type"] == "audit.dropped");
    assert!(filler.exists());
    std::fs::remove_file(&filler).unwrap();
    let d = events
        .iter()
        .find(|e| e["type"] == "audit.dropped")
        .unwrap();
    let n: u64 = d["events"].as_str().unwrap().parse().unwrap();
    assert!(n >= 1, "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("No space left"),
        "{d}"
    );
    assert_eq!(exec_session(&tsh, "echo after"), 0);
    wait_event(&c, "exec after", |e| e["command"] == "echo after");
    let (ok, out) = verify(&c);
    assert!(ok, "{out}");
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Numbers for docs/benchmarks.md: `cargo test -p edgeport-e2e --test audit bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_audit() {
    let mut c = Cluster::start("audit-bench", &[("dev1", "")]);
    let tsh = login(&c);
    let agent_dir = c.agents[0].data_dir.clone();
    assert_eq!(exec_session(&tsh, "true"), 0);
    wait_spool_empty(&c, &agent_dir);

    // Spool bytes per exec session (authority down so nothing drains).
    let (dir, cluster, addr) = (
        c.auth.data_dir.clone(),
        c.auth.cluster.clone(),
        c.auth.addr.clone(),
    );
    c.auth.proc.stop();
    let sessions = 20;
    for _ in 0..sessions {
        assert_eq!(exec_session(&tsh, "uptime"), 0);
    }
    std::thread::sleep(Duration::from_secs(2));
    let lines = spool_lines(&agent_dir).len();
    let bytes = dir_bytes(&spool_dir(&agent_dir));
    println!(
        "BENCH spool per exec session: {} bytes, {:.1} events ({} sessions)",
        bytes / sessions,
        lines as f64 / sessions as f64,
        sessions
    );
    c.auth = Authority::start_at(&dir, &cluster, &addr);
    wait_spool_empty(&c, &agent_dir);

    // Recording bytes per minute of a busy terminal.
    let secs = 20;
    let tmux = Tmux::start(
        "audit-bench-pty",
        120,
        40,
        &format!(
            "env TSH_HOME='{}' '{}' ssh root@dev1; sleep 600",
            tsh.home.display(),
            bin("tsh").display()
        ),
    );
    tmux.send(&[
        &format!(
            "timeout {secs} sh -c 'while :; do ls -l /usr/bin | head -40; sleep 0.2; done'; exit"
        ),
        "Enter",
    ]);
    let events = wait_event(&c, "busy session.end", |e| {
        e["type"] == "session.end" && e["kind"] == "shell"
    });
    drop(tmux);
    let end = events
        .iter()
        .find(|e| e["type"] == "session.end" && e["kind"] == "shell")
        .unwrap();
    let sid = end["session_id"].as_str().unwrap();
    let recs = tsh
        .run(&["recordings", "ls", "--format", "json"], None)
        .json();
    let rec = recs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["session_id"] == sid)
        .unwrap()
        .clone();
    let dur = end["duration_secs"].as_f64().unwrap();
    let out = end["bytes_out"].as_f64().unwrap();
    let rb = rec["bytes"].as_f64().unwrap();
    println!(
        "BENCH busy terminal: {:.0} s, {:.0} terminal bytes/min, {:.0} recording bytes/min ({:.2}x)",
        dur,
        out / dur * 60.0,
        rb / dur * 60.0,
        rb / out
    );

    // Sustained events/s, agent spool to authority store.
    let n = 50_000u64;
    let t = std::time::Instant::now();
    let a = Agent::start(
        &c.dir.join("agent-flood"),
        &c.gw,
        "flood",
        "",
        &["--test-audit-flood", &n.to_string()],
    );
    c.agents.push(a);
    let mut stored = 0;
    // Poll rarely: a verify re-reads the whole chain, which would compete for the CPU.
    let ok = wait_until(Duration::from_secs(600), || {
        std::thread::sleep(Duration::from_secs(2));
        let j = c
            .tctl
            .run(&["audit", "verify", "--device", "flood", "--format", "json"])
            .json();
        stored = j[0]["events"].as_u64().unwrap_or(0);
        stored >= n
    });
    let el = t.elapsed().as_secs_f64();
    assert!(ok, "only {stored} of {n} stored");
    let log = c.agents.last().unwrap().proc.log_text();
    let spooled = log
        .lines()
        .find(|l| l.contains("audit flood spooled"))
        .unwrap_or("")
        .to_string();
    println!(
        "BENCH end to end: {stored} events in {el:.1} s (incl. agent start and join) = {:.0} events/s; {spooled}",
        stored as f64 / el
    );
    let (ok, out) = verify(&c);
    assert!(ok, "{out}");
}
