//! A fault campaign (issue 28): 50 concurrent sessions (tsh exec, tsh PTY, stock OpenSSH exec
//! through `tsh proxy ssh`, stock sftp) held open across a kill -9 of each daemon in turn
//! (gateway, authority, one agent), each restarted at once. Every session completes
//! byte-exact or ends with a clear message (no client may hang past its deadline), the agents
//! come back within their backoff cap, and the audit log holds exactly one `session.start`,
//! one `session.end` and one command event for every session an agent started.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgeport_e2e::fabric::wait_online;
use edgeport_e2e::ssh::{random_file, ssh, Cluster, Tsh};
use edgeport_e2e::{wait_until, Authority};
use serde_json::Value;

const PW: &str = "correct horse battery";
/// Concurrent sessions per fault.
const SESSIONS: usize = 50;
/// The agent's reconnect backoff cap (`backoff_cap` in edge-agent/src/config.rs, used by
/// edge-agent/src/backoff.rs): an agent must be back within it, plus a margin for the
/// restart itself and a loaded machine.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
const BACK_MARGIN: Duration = Duration::from_secs(30);
/// A client that has not ended by then hangs, and fails the test.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);
/// Bytes each sftp session puts and gets back.
const SFTP_BYTES: usize = 48 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    TshExec,
    TshPty,
    SshExec,
    Sftp,
}

/// What one client process did.
struct Outcome {
    tag: String,
    kind: Kind,
    code: Option<i32>,
    signal: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    hung: bool,
    /// sftp: the file it got back, byte-exact.
    sftp_ok: bool,
}

impl Outcome {
    fn completed(&self) -> bool {
        let want = match self.kind {
            Kind::TshPty => format!("{}\r\n", self.tag),
            Kind::Sftp => return self.code == Some(0) && self.sftp_ok,
            _ => format!("{}\n", self.tag),
        };
        self.code == Some(0) && self.stdout == want.as_bytes()
    }

    /// Ended with a non-zero exit and a line that says something, not a panic. Stock sftp
    /// may die of SIGPIPE writing its next request to an ssh that already said why it ended.
    fn failed_clearly(&self) -> bool {
        let exit = self.code.is_some_and(|c| c != 0)
            || (self.kind == Kind::Sftp && self.signal == Some(libc::SIGPIPE));
        !self.hung && exit && !self.stderr.trim().is_empty() && !self.stderr.contains("panicked")
    }

    fn describe(&self) -> String {
        format!(
            "{} ({:?}): code {:?}, signal {:?}, hung {}, stdout {:?}, stderr {:?}",
            self.tag,
            self.kind,
            self.code,
            self.signal,
            self.hung,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

#[allow(unsafe_code)]
fn kill9(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Runs `cmd` (stdin from /dev/null) in a thread, killing it at the deadline.
fn spawn_client(
    tag: String,
    kind: Kind,
    mut cmd: Command,
    sftp_files: Option<(PathBuf, PathBuf)>,
) -> JoinHandle<Outcome> {
    std::thread::spawn(move || {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id();
        let done = Arc::new(AtomicBool::new(false));
        let hung = Arc::new(AtomicBool::new(false));
        let (d2, h2) = (done.clone(), hung.clone());
        let watchdog = std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < CLIENT_DEADLINE {
                if d2.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            h2.store(true, Ordering::SeqCst);
            kill9(pid);
        });
        let mut err = child.stderr.take().unwrap();
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            s
        });
        let mut stdout = Vec::new();
        let _ = child.stdout.take().unwrap().read_to_end(&mut stdout);
        let status = child.wait().unwrap();
        done.store(true, Ordering::SeqCst);
        let _ = watchdog.join();
        let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
        let sftp_ok = sftp_files.is_some_and(|(up, down)| {
            matches!((std::fs::read(up), std::fs::read(down)), (Ok(a), Ok(b)) if a == b)
        });
        Outcome {
            tag,
            kind,
            code: status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&status),
            stdout,
            stderr,
            hung: hung.load(Ordering::SeqCst),
            sftp_ok,
        }
    })
}

/// One fault's worth of sessions: a FIFO on the device side holds the shell sessions open
/// until the test releases them.
struct Wave {
    name: String,
    fifo: PathBuf,
    clients: Vec<JoinHandle<Outcome>>,
    /// The device of each client, by tag.
    device: BTreeMap<String, String>,
}

impl Wave {
    fn start(c: &Cluster, tsh: &Tsh, cfg: &Path, name: &str) -> Self {
        let fifo = c.dir.join(&format!("hold-{name}"));
        let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(st.success(), "mkfifo");
        // `timeout`: the shells of a killed agent live on, orphaned, and must end by
        // themselves even if nothing opens the FIFO again.
        let hold = format!("timeout 150 cat '{}' >/dev/null; ", fifo.display());
        let mut clients = Vec::new();
        let mut device = BTreeMap::new();
        for i in 0..SESSIONS {
            let tag = format!("{name}-{i}");
            let dev = if i % 2 == 0 { "dev1" } else { "dev2" };
            let target = format!("root@{dev}");
            let script = format!("{hold}echo {tag}");
            let (kind, cmd, files) = match i % 5 {
                0 | 1 => (Kind::TshExec, tsh.cmd(&["ssh", &target, &script]), None),
                2 => (
                    Kind::TshPty,
                    tsh.cmd(&["ssh", "-tt", &target, &script]),
                    None,
                ),
                3 => (Kind::SshExec, ssh(cfg, &[&target, &script]), None),
                _ => {
                    let up = c.dir.join(&format!("{tag}.up"));
                    let down = c.dir.join(&format!("{tag}.down"));
                    random_file(&up, SFTP_BYTES + i);
                    let remote = format!("/tmp/edgeport-fault-{}-{tag}.bin", std::process::id());
                    let batch = c.dir.join(&format!("{tag}.batch"));
                    // `!cat FIFO` runs on this side and holds the sftp session open between
                    // the put and the get.
                    std::fs::write(
                        &batch,
                        format!(
                            "put {} {remote}\n!cat '{}' >/dev/null\nget {remote} {}\nrm {remote}\n",
                            up.display(),
                            fifo.display(),
                            down.display()
                        ),
                    )
                    .unwrap();
                    let mut cmd = Command::new("sftp");
                    cmd.arg("-F")
                        .arg(cfg)
                        .args(["-o", "BatchMode=yes", "-b"])
                        .arg(&batch)
                        .arg(&target);
                    (Kind::Sftp, cmd, Some((up, down)))
                }
            };
            device.insert(tag.clone(), dev.to_string());
            clients.push(spawn_client(tag, kind, cmd, files));
        }
        Self {
            name: name.to_string(),
            fifo,
            clients,
            device,
        }
    }

    /// Lets every held session go on (also the ones that reach the FIFO late), until every
    /// client has ended; returns their outcomes.
    fn release_and_join(self) -> Vec<Outcome> {
        let stop = Arc::new(AtomicBool::new(false));
        let (fifo, s2) = (self.fifo.clone(), stop.clone());
        let releaser = std::thread::spawn(move || {
            use std::os::unix::fs::OpenOptionsExt;
            while !s2.load(Ordering::SeqCst) {
                // Opening for writing without blocking fails while no reader waits; each
                // open and close ends the `cat` of every reader waiting at that moment.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let out: Vec<Outcome> = self
            .clients
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        stop.store(true, Ordering::SeqCst);
        releaser.join().unwrap();
        eprintln!(
            "wave {}: {} completed, {} ended with a message",
            self.name,
            out.iter().filter(|o| o.completed()).count(),
            out.iter().filter(|o| !o.completed()).count()
        );
        let messages: BTreeSet<(Kind, String)> = out
            .iter()
            .filter(|o| !o.completed())
            .map(|o| (o.kind, o.stderr.trim().replace(&o.tag, "TAG")))
            .collect();
        for (kind, m) in messages {
            eprintln!("  {kind:?}: {m:?}");
        }
        out
    }
}

/// Cleans up after the test, passed or failed: opens each FIFO a few more times (so the
/// orphaned shells of the killed agent end now) and removes the files that sftp sessions cut
/// before their `rm` left on the device.
struct Cleanup {
    fifos: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        for _ in 0..10 {
            for f in &self.fifos {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(f);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let prefix = format!("edgeport-fault-{}-", std::process::id());
        for e in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The session ids of the log lines that contain `what`.
fn log_sids(text: &str, what: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("session="))
                .map(|s| s.trim_matches('"').to_string())
        })
        .collect()
}

/// The session id of every "session started" line in the agent logs under `dir` (the logs of
/// killed agents included).
fn agent_sessions(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("edge-agent-") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.extend(log_sids(&text, "session started"));
    }
    out
}

/// Waits until the agents have started `n` more sessions than `before` (every client of a
/// wave is on the device).
fn wait_started(c: &Cluster, before: usize, n: usize, what: &str) {
    let ok = wait_until(Duration::from_secs(90), || {
        agent_sessions(c.dir.path()).len() >= before + n
    });
    assert!(
        ok,
        "{what}: only {} of {n} sessions started on the devices",
        agent_sessions(c.dir.path()).len() - before
    );
}

/// The sessions open on `agent` according to its open-sessions file (written after the
/// events are in the spool).
fn spooled_open(agent_dir: &Path) -> BTreeSet<String> {
    let v: Value = std::fs::read(agent_dir.join("audit").join("open-sessions.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    v["open"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
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

/// How many tunnels each agent process has brought up so far.
fn tunnels(c: &Cluster) -> BTreeMap<String, usize> {
    c.agents
        .iter()
        .map(|a| (a.id.clone(), a.tunnels_up()))
        .collect()
}

/// The agents that lost their tunnel (`before`: their tunnel counts before the fault, zero
/// for a restarted agent) bring a new one up within the backoff cap and a margin; then both
/// devices are online in the inventory and a new session to each works.
fn assert_back(c: &Cluster, tsh: &Tsh, after: &str, before: &BTreeMap<String, usize>) {
    for (id, n) in before {
        let a = c.agent(id);
        let up = wait_until(BACKOFF_CAP + BACK_MARGIN, || a.tunnels_up() > *n);
        assert!(
            up,
            "{id} is not back {:?} after {after}:\n{}",
            BACKOFF_CAP + BACK_MARGIN,
            a.proc.log_text()
        );
    }
    for dev in ["dev1", "dev2"] {
        wait_online(&c.tctl, dev, None, BACKOFF_CAP + BACK_MARGIN);
        let r = tsh.run(&["ssh", &format!("root@{dev}"), "echo back"], None);
        assert!(
            r.ok() && r.stdout() == "back\n",
            "a new session to {dev} after {after} failed ({:?}): {}",
            r.code(),
            r.stderr()
        );
    }
}

/// The agents serve sftp with the system's `sftp-server` (Debian's openssh-server), which
/// the peer scripts install the same way when it is missing.
fn ensure_sftp_server() {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/_lib.sh");
    let r = edgeport_e2e::run(
        {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(r#". "$0" && peers_apt openssh-server openssh-client"#)
                .arg(&lib);
            c
        },
        None,
        Duration::from_secs(600),
    );
    assert!(r.ok(), "cannot install openssh-server: {}", r.stderr());
}

#[test]
fn sessions_survive_or_end_clearly_through_kill9_of_every_daemon() {
    ensure_sftp_server();
    let t0 = Instant::now();
    let mut c = Cluster::start("faults", &[("dev1", ""), ("dev2", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh-home"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let cfg = tsh.config();
    let _cleanup = Cleanup {
        fifos: ["gw", "auth", "agent"]
            .iter()
            .map(|w| c.dir.join(&format!("hold-{w}")))
            .collect(),
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut waves: Vec<(String, BTreeMap<String, String>)> = Vec::new();

    // 1. The gateway: every session runs through it, so every one ends, each with a message.
    let before = agent_sessions(c.dir.path()).len();
    let wave = Wave::start(&c, &tsh, &cfg, "gw");
    wait_started(&c, before, SESSIONS, "gateway wave");
    let ups = tunnels(&c);
    c.gw.proc.kill9();
    c.gw.restart();
    waves.push((wave.name.clone(), wave.device.clone()));
    outcomes.extend(wave.release_and_join());
    assert_back(&c, &tsh, "the gateway's kill -9", &ups);

    // 2. The authority is not on the data path: the sessions carry on.
    let before = agent_sessions(c.dir.path()).len();
    let wave = Wave::start(&c, &tsh, &cfg, "auth");
    wait_started(&c, before, SESSIONS, "authority wave");
    let (dir, cluster, addr) = (
        c.auth.data_dir.clone(),
        c.auth.cluster.clone(),
        c.auth.addr.clone(),
    );
    c.auth.proc.kill9();
    c.auth = Authority::start_at(&dir, &cluster, &addr);
    waves.push((wave.name.clone(), wave.device.clone()));
    let out = wave.release_and_join();
    for o in &out {
        assert!(
            o.completed(),
            "a session broke when only the authority died: {}",
            o.describe()
        );
    }
    outcomes.extend(out);
    assert_back(&c, &tsh, "the authority's kill -9", &BTreeMap::new());

    // 3. One agent (dev1): its sessions end, dev2's complete. The kill comes once every
    //    held session of dev1 is in its spool (its open-sessions file lists it).
    let before_set = agent_sessions(c.dir.path());
    let wave = Wave::start(&c, &tsh, &cfg, "agent");
    wait_started(&c, before_set.len(), SESSIONS, "agent wave");
    let dev1_dir = c.agent("dev1").data_dir.clone();
    let mut cut = BTreeSet::new();
    let ok = wait_until(Duration::from_secs(30), || {
        let log = c.agent("dev1").proc.log_text();
        cut = log_sids(&log, "session started")
            .difference(&log_sids(&log, "session ended"))
            .cloned()
            .collect::<BTreeSet<_>>();
        cut.is_subset(&spooled_open(&dev1_dir))
    });
    assert!(ok, "dev1's sessions never reached its open-sessions file");
    assert!(
        !cut.is_empty(),
        "no session of dev1 was running at the kill"
    );
    let i = c.agents.iter().position(|a| a.id == "dev1").unwrap();
    c.agents[i].restart();
    waves.push((wave.name.clone(), wave.device.clone()));
    let out = wave.release_and_join();
    for o in out.iter().filter(|o| wave_device(&waves, &o.tag) == "dev2") {
        assert!(
            o.completed(),
            "a session to dev2 broke when dev1's agent died: {}",
            o.describe()
        );
    }
    outcomes.extend(out);
    assert_back(
        &c,
        &tsh,
        "dev1's kill -9",
        &BTreeMap::from([("dev1".to_string(), 0)]),
    );

    // Every client either completed byte-exact or ended with a clear message; none hung.
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| o.hung || !(o.completed() || o.failed_clearly()))
        .map(Outcome::describe)
        .collect();
    assert!(bad.is_empty(), "unclear endings:\n{}", bad.join("\n"));

    // The audit log: every session an agent started has exactly one start, one end and one
    // command event; none is duplicated, none lost, no end without a start.
    let started = agent_sessions(c.dir.path());
    let mut last = String::new();
    let complete = wait_until(Duration::from_secs(60), || {
        let evs = search(&c, &[]);
        let ends: BTreeSet<&str> = evs
            .iter()
            .filter(|e| e["type"] == "session.end")
            .filter_map(|e| e["session_id"].as_str())
            .collect();
        let missing: Vec<&String> = started
            .iter()
            .filter(|s| !ends.contains(s.as_str()))
            .collect();
        last = format!("{} sessions without an end: {missing:?}", missing.len());
        missing.is_empty()
    });
    assert!(complete, "{last}");
    let events = search(&c, &[]);
    let mut per: BTreeMap<String, BTreeMap<String, Vec<&Value>>> = BTreeMap::new();
    for e in &events {
        let (Some(sid), Some(t)) = (e["session_id"].as_str(), e["type"].as_str()) else {
            continue;
        };
        if e["source"] != "device" || sid.is_empty() {
            continue;
        }
        per.entry(sid.to_string())
            .or_default()
            .entry(t.to_string())
            .or_default()
            .push(e);
    }
    let mut problems = Vec::new();
    for sid in &started {
        if !per.contains_key(sid) {
            problems.push(format!(
                "session {sid} started on a device but has no events"
            ));
        }
    }
    for (sid, types) in &per {
        let n = |t: &str| types.get(t).map_or(0, Vec::len);
        if !started.contains(sid) {
            problems.push(format!(
                "session {sid} is in the log but no agent started it"
            ));
        }
        if n("session.start") != 1 || n("session.end") != 1 {
            problems.push(format!(
                "session {sid}: {} starts, {} ends",
                n("session.start"),
                n("session.end")
            ));
            continue;
        }
        let kind = types["session.start"][0]["kind"].as_str().unwrap_or("");
        let command = match kind {
            "exec" => "exec",
            "sftp" => "sftp.start",
            _ => continue,
        };
        if n(command) != 1 {
            problems.push(format!(
                "session {sid} ({kind}): {} {command} events",
                n(command)
            ));
        }
    }
    // The sessions the agent's kill cut are closed by the restarted agent, with the reason.
    for sid in &cut {
        let end = per
            .get(sid)
            .and_then(|t| t.get("session.end"))
            .and_then(|v| v.first());
        if end.is_none_or(|e| e["reason"] != "agent restarted") {
            problems.push(format!(
                "session {sid} was cut by dev1's kill but ended {end:?}"
            ));
        }
    }
    // The sessions that completed are in the log as such: their command, exit code 0.
    for o in outcomes
        .iter()
        .filter(|o| o.completed() && o.kind != Kind::Sftp)
    {
        let hits: Vec<(&String, &BTreeMap<String, Vec<&Value>>)> = per
            .iter()
            .filter(|(_, t)| {
                t.get("exec").is_some_and(|v| {
                    v.iter().any(|e| {
                        e["command"]
                            .as_str()
                            .is_some_and(|c| c.ends_with(&format!("echo {}", o.tag)))
                    })
                })
            })
            .collect();
        match hits.as_slice() {
            [(sid, t)] => {
                if t["session.end"][0]["exit_code"] != 0 {
                    problems.push(format!(
                        "{}: session {sid} ended {}",
                        o.tag, t["session.end"][0]
                    ));
                }
            }
            _ => problems.push(format!(
                "{}: {} exec sessions in the log",
                o.tag,
                hits.len()
            )),
        }
    }
    // Completed sftp sessions: one write and one read of their file.
    for o in outcomes
        .iter()
        .filter(|o| o.completed() && o.kind == Kind::Sftp)
    {
        let path = format!("/tmp/edgeport-fault-{}-{}.bin", std::process::id(), o.tag);
        let files: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "sftp.file" && e["path"] == path.as_str())
            .collect();
        let w = files.iter().filter(|e| e["mode"] == "write").count();
        let r = files.iter().filter(|e| e["mode"] == "read").count();
        if w != 1 || r != 1 {
            problems.push(format!("{}: {w} writes and {r} reads of {path}", o.tag));
        }
    }
    assert!(
        problems.is_empty(),
        "the audit log is wrong:\n{}",
        problems.join("\n")
    );
    // No device event stored twice or lost on the way: each chain is gapless.
    for dev in ["dev1", "dev2"] {
        let r = c.tctl.run(&["audit", "verify", "--device", dev]);
        assert!(r.ok(), "{}{}", r.stdout(), r.stderr());
    }
    eprintln!(
        "fault campaign: {} sessions, {} completed, {} in the audit log ({} closed by dev1's restart), {:?}",
        outcomes.len(),
        outcomes.iter().filter(|o| o.completed()).count(),
        per.len(),
        cut.len(),
        t0.elapsed()
    );
}

fn wave_device<'a>(waves: &'a [(String, BTreeMap<String, String>)], tag: &str) -> &'a str {
    waves
        .iter()
        .find_map(|(_, d)| d.get(tag))
        .map_or("", String::as_str)
}
