//! Made for cellular (issue 23): a device that changes networks in the middle of a session.
//!
//! The edge agent runs in a network namespace of its own with two uplinks, two veth pairs to
//! the root namespace where the authority and the gateway run (the gateway on an address of
//! its own on `lo`, reachable over either uplink). Mid-session the device's default route
//! moves from uplink A to uplink B and A's address is removed, as when a modem changes
//! networks. Over QUIC the `tsh ssh` sessions (an interactive echo and a running transfer)
//! go on without a reconnect, the gateway logs the path change and the inventory shows the
//! new address at once. Over the TCP fallback the sessions end with a clear message and the
//! tunnel comes back on the new network.
//!
//! Needs root (CAP_NET_ADMIN) for `ip netns` and veth pairs: without it the tests fail with a
//! message that says so. Names and subnets are unique per run; everything made is removed by
//! a guard's Drop, also when a test fails.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeport_e2e::fabric::{wait_online, Gateway, Tctl};
use edgeport_e2e::ssh::Tsh;
use edgeport_e2e::{bin, run, wait_until, Authority, Proc, TempDir};

const PW: &str = "correct horse battery staple";

static N: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS` (in the root namespace); panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let r = run(
        {
            let mut c = Command::new("ip");
            c.args(args);
            c
        },
        None,
        Duration::from_secs(30),
    );
    assert!(
        r.ok(),
        "`ip {}` failed: {}\n(this test needs root or CAP_NET_ADMIN: network namespaces, veth \
         pairs and routes)",
        args.join(" "),
        r.stderr().trim()
    );
}

/// A device namespace with two uplinks to the root namespace, and the gateway's address on
/// the root's `lo`. Everything is removed on drop.
struct Uplinks {
    ns: String,
    /// Root-side ends of uplink A and B (their peers, `upa` and `upb`, are in `ns`).
    veth: [String; 2],
    /// Picks the subnets: 10.210.X.0/24 (A), 10.211.X.0/24 (B), 10.212.X.1/32 (gateway).
    x: u8,
    /// Whether the gateway address was added (and must be removed).
    service_added: bool,
}

impl Uplinks {
    fn up() -> Self {
        let tag = format!(
            "{:x}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut me = Self {
            ns: format!("epcell-{tag}"),
            veth: [format!("ec{tag}a"), format!("ec{tag}b")],
            x: 0,
            service_added: false,
        };
        // Pick a free X and claim it (its gateway address on lo) under a lock, so that
        // parallel runs never share subnets.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/edgeport-cellular.lock")
            .expect("lock file in /run (this test needs root)");
        lock_file(&lock);
        let used = run(
            {
                let mut c = Command::new("ip");
                c.args(["-o", "-4", "addr", "show"]);
                c
            },
            None,
            Duration::from_secs(30),
        )
        .expect_ok("ip addr show")
        .stdout();
        me.x = (0..=255u8)
            .find(|x| !used.contains(&format!(" 10.212.{x}.1/")))
            .expect("a free 10.212.X.1 (256 in use: leftovers of killed runs?)");
        ip(&["addr", "add", &format!("{}/32", me.service()), "dev", "lo"]);
        me.service_added = true;
        drop(lock);

        let x = me.x;
        ip(&["netns", "add", &me.ns]);
        me.ns_ip(&["link", "set", "lo", "up"]);
        for (i, (dev, net)) in [("upa", 210), ("upb", 211)].into_iter().enumerate() {
            let root = me.veth[i].clone();
            ip(&[
                "link", "add", &root, "type", "veth", "peer", "name", dev, "netns", &me.ns,
            ]);
            ip(&["addr", "add", &format!("10.{net}.{x}.1/24"), "dev", &root]);
            ip(&["link", "set", &root, "up"]);
            me.ns_ip(&["addr", "add", &format!("10.{net}.{x}.2/24"), "dev", dev]);
            me.ns_ip(&["link", "set", dev, "up"]);
        }
        me.ns_ip(&["route", "add", "default", "via", &format!("10.210.{x}.1")]);
        me
    }

    /// The gateway's address (on the root namespace's lo).
    fn service(&self) -> String {
        format!("10.212.{}.1", self.x)
    }

    /// The device's address on uplink A (0) or B (1).
    fn dev_addr(&self, i: usize) -> String {
        format!("10.{}.{}.2", 210 + i, self.x)
    }

    fn ns_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// The modem changes networks: the default route moves to uplink B, then A's address
    /// goes away.
    fn switch_to_b(&self) {
        let x = self.x;
        self.ns_ip(&[
            "route",
            "replace",
            "default",
            "via",
            &format!("10.211.{x}.1"),
            "dev",
            "upb",
        ]);
        self.ns_ip(&["addr", "del", &format!("10.210.{x}.2/24"), "dev", "upa"]);
    }

    /// A command run inside the device namespace.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Uplinks {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for v in &self.veth {
            quiet(&["link", "del", v]);
        }
        quiet(&["netns", "del", &self.ns]);
        if self.service_added {
            quiet(&[
                "addr",
                "del",
                &format!("{}/32", self.service()),
                "dev",
                "lo",
            ]);
        }
    }
}

#[allow(unsafe_code)]
fn lock_file(f: &std::fs::File) {
    // SAFETY: flock(2) on a descriptor we own; no memory is shared.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
}

/// The cluster of one test: authority and gateway in the root namespace, the agent `id` in
/// the device namespace, a user alice logged in with tsh.
struct Cell {
    agent: Proc,
    gw: Gateway,
    auth: Authority,
    tctl: Tctl,
    tsh: Tsh,
    id: String,
    dir: TempDir,
}

impl Cell {
    fn start(up: &Uplinks, id: &str, agent_args: &[&str]) -> Self {
        let dir = TempDir::new();
        let auth = Authority::start(&dir.join("authority"), "cell");
        let gw = Gateway::start_on(&dir.join("gateway"), &auth, &up.service(), &[]);
        let tctl = Tctl::of(&auth);
        let (token, pin) = gw.device_token("");
        let data = dir.join(&format!("agent-{id}"));
        let mut cmd = up.command(&bin("edge-agent"));
        cmd.args(["start", "--data-dir"])
            .arg(&data)
            .args(["--gateway", &gw.addr, "--token", &token, "--ca-pin", &pin])
            .args(["--id", id])
            .args(agent_args);
        let agent = Proc::spawn("edge-agent", cmd, dir.path());
        auth.add_user("alice", "root", PW);
        let tsh = Tsh::new(dir.join("tsh"), &gw.addr);
        tsh.login("alice", PW, &gw.ca_pin, &[])
            .expect_ok("tsh login");
        Self {
            agent,
            gw,
            auth,
            tctl,
            tsh,
            id: id.to_string(),
            dir,
        }
    }

    /// `tsh ssh ID COMMAND` with piped stdio.
    fn session(&self, command: &str) -> Child {
        let mut c = self.tsh.cmd(&["ssh", &self.id, command]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().expect("spawn tsh ssh")
    }

    /// Polls the inventory (up to 20 s) until the device's address is on `host`.
    fn wait_address(&self, host: &str) {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(20), || {
            last = self.tctl.device(&self.id);
            last.as_ref().is_some_and(|d| {
                d["online"] == true
                    && d["address"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&format!("{host}:")))
            })
        });
        assert!(
            ok,
            "the inventory does not show {host} within 20 s: {last:?}"
        );
    }
}

/// An interactive session: a remote `read`/`echo` loop fed a numbered line every 100 ms; the
/// arrival time of every answer is kept.
struct Echo {
    child: Child,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<(usize, Instant)>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(cell: &Cell) -> Self {
        let mut child = cell.session("while IFS= read -r l; do echo \"got $l\"; done");
        let mut stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    if writeln!(stdin, "{i}").and_then(|_| stdin.flush()).is_err() {
                        return;
                    }
                    i += 1;
                    sent.store(i, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                }
                // stdin drops here: the remote loop ends and tsh exits.
            })
        };
        let reader = {
            let got = got.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    let n = line
                        .strip_prefix("got ")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(usize::MAX);
                    got.lock().unwrap().push((n, Instant::now()));
                }
            })
        };
        Self {
            child,
            stop,
            sent,
            got,
            writer: Some(writer),
            reader: Some(reader),
        }
    }

    /// Answers that arrived after `t`.
    fn answers_after(&self, t: Instant) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| *at > t)
            .count()
    }

    /// The longest gap between two answers that arrived from 1 s before `t` on.
    fn stall_around(&self, t: Instant) -> Duration {
        let got = self.got.lock().unwrap();
        let from = t.checked_sub(Duration::from_secs(1)).unwrap_or(t);
        let times: Vec<Instant> = got
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at >= from)
            .collect();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Stops writing, waits for tsh to end; (its exit code, stderr, the answers in order).
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, Vec<usize>) {
        self.stop.store(true, Ordering::SeqCst);
        let ended = wait_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !ended {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait tsh");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        assert!(ended, "tsh did not end within {limit:?} (stderr: {err})");
        let got = self.got.lock().unwrap().iter().map(|(n, _)| *n).collect();
        (status.code(), err, got)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `tsh ssh ID cat` fed `data`: the first half at once (paced), the second once
/// `go` is set; the output is collected.
struct Transfer {
    child: Child,
    received: Arc<AtomicUsize>,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    feeder: Option<std::thread::JoinHandle<()>>,
}

impl Transfer {
    fn start(cell: &Cell, data: Arc<Vec<u8>>, go: Arc<AtomicBool>) -> Self {
        let mut child = cell.session("cat");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let received = Arc::new(AtomicUsize::new(0));
        let feeder = std::thread::spawn(move || {
            let half = data.len() / 2;
            for (i, chunk) in data.chunks(64 * 1024).enumerate() {
                if i * 64 * 1024 >= half {
                    while !go.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                if stdin.write_all(chunk).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let out = {
            let received = received.clone();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    received.store(all.len(), Ordering::SeqCst);
                }
                all
            })
        };
        Self {
            child,
            received,
            out: Some(out),
            feeder: Some(feeder),
        }
    }

    /// Waits for tsh to end: (exit code, stderr, output).
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, Vec<u8>) {
        let ended = wait_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !ended {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait tsh");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        let out = self
            .out
            .take()
            .map(|o| o.join().unwrap())
            .unwrap_or_default();
        assert!(
            ended,
            "the transfer did not end within {limit:?} (stderr: {err})"
        );
        (status.code(), err, out)
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pseudo-random bytes (xorshift), incompressible enough for a transfer test.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Waits until the echo session answers `n` more lines after `since`.
fn wait_answers(echo: &Echo, since: Instant, n: usize, limit: Duration, what: &str) {
    assert!(
        wait_until(limit, || echo.answers_after(since) >= n),
        "{what}: {} answers after {limit:?} ({} sent)",
        echo.answers_after(since),
        echo.sent.load(Ordering::SeqCst)
    );
}

#[test]
fn quic_sessions_survive_a_network_switch() {
    let t0 = Instant::now();
    let up = Uplinks::up();
    let mut cell = Cell::start(&up, "van-q", &["--transport", "quic"]);
    wait_online(&cell.tctl, "van-q", Some("quic"), Duration::from_secs(60));
    cell.wait_address(&up.dev_addr(0));

    let echo = Echo::start(&cell);
    wait_answers(
        &echo,
        t0,
        10,
        Duration::from_secs(60),
        "echo before the switch",
    );
    let data = Arc::new(random_bytes(6 << 20));
    let go = Arc::new(AtomicBool::new(false));
    let transfer = Transfer::start(&cell, data.clone(), go.clone());
    assert!(
        wait_until(Duration::from_secs(60), || transfer
            .received
            .load(Ordering::SeqCst)
            >= 1 << 20),
        "the transfer did not get going"
    );

    let switched = Instant::now();
    up.switch_to_b();
    go.store(true, Ordering::SeqCst);
    cell.wait_address(&up.dev_addr(1));
    let shown = switched.elapsed();
    // Presence quality: the uplink change is counted, the tunnel's loss is reported.
    let d = cell.tctl.device("van-q").expect("van-q in the inventory");
    assert_eq!(d["address_changes_24h"], 1, "{d}");
    assert!(d["loss_permille"].is_u64(), "{d}");
    wait_answers(
        &echo,
        switched,
        20,
        Duration::from_secs(60),
        "echo after the switch",
    );
    assert!(
        wait_until(Duration::from_secs(20), || cell
            .gw
            .proc
            .log_text()
            .contains("device path changed")),
        "the gateway did not log the path change:\n{}",
        cell.gw.proc.log_text()
    );
    let stall = echo.stall_around(switched);
    let sent_before_end = echo.sent.load(Ordering::SeqCst);

    let (code, err, got) = echo.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "interactive session: {err}");
    assert!(got.len() >= sent_before_end.min(30));
    assert_eq!(
        got,
        (0..got.len()).collect::<Vec<_>>(),
        "answers lost, repeated or out of order"
    );
    let (code, err, out) = transfer.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "transfer: {err}");
    assert_eq!(out.len(), data.len(), "transfer length");
    assert!(out == *data, "the transfer is not byte-exact");

    // No reconnect: one tunnel all along, one "device online" at the gateway.
    let agent_log = cell.agent.log_text();
    assert_eq!(
        agent_log.matches("tunnel up").count(),
        1,
        "the agent reconnected:\n{agent_log}"
    );
    assert_eq!(cell.gw.proc.log_text().matches("device online").count(), 1);
    assert!(cell.agent.alive());
    eprintln!(
        "network switch over QUIC: stall {:.2} s (longest gap between echo answers), new \
         address in the inventory after {:.1} s, test wall time {:.1} s",
        stall.as_secs_f64(),
        shown.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let _ = (&cell.auth, &cell.dir);
}

#[test]
fn tcp_sessions_end_clearly_and_the_tunnel_comes_back() {
    let t0 = Instant::now();
    let up = Uplinks::up();
    // Default keep-alive and idle timeout (25 s, 90 s): the agent notices that its
    // address is gone, not that the gateway went quiet.
    let mut cell = Cell::start(&up, "van-t", &["--transport", "tcp"]);
    wait_online(&cell.tctl, "van-t", Some("tcp"), Duration::from_secs(60));
    cell.wait_address(&up.dev_addr(0));

    let echo = Echo::start(&cell);
    wait_answers(
        &echo,
        t0,
        10,
        Duration::from_secs(60),
        "echo before the switch",
    );
    let switched = Instant::now();
    up.switch_to_b();

    let (code, err, _) = echo.finish(Duration::from_secs(90));
    let ended = switched.elapsed();
    assert_ne!(code, Some(0), "the session should have ended: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got: {err}");
    assert!(
        lines[0].contains("van-t")
            && lines[0].contains("reconnected")
            && lines[0].contains("connect again"),
        "not a clear message: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // The tunnel is back, over TCP, from the new address; a new session works.
    wait_online(&cell.tctl, "van-t", Some("tcp"), Duration::from_secs(60));
    cell.wait_address(&up.dev_addr(1));
    let back = switched.elapsed();
    assert!(cell.agent.alive());
    let agent_log = cell.agent.log_text();
    assert!(agent_log.matches("tunnel up").count() >= 2, "{agent_log}");
    assert!(
        agent_log.contains("the network changed"),
        "the agent did not say why it reconnected:\n{agent_log}"
    );
    let r = cell
        .tsh
        .run(&["ssh", "van-t", "echo", "again"], None)
        .expect_ok("tsh ssh after the switch");
    assert_eq!(r.stdout(), "again\n");
    eprintln!(
        "network switch over TCP: session ended after {:.1} s with: {}; tunnel back with the \
         new address after {:.1} s; test wall time {:.1} s",
        ended.as_secs_f64(),
        lines[0],
        back.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let _ = (&cell.auth, &cell.dir);
}

/// A carrier NAT that forgets idle UDP bindings after `secs`: the device namespace
/// masquerades its own packets on uplink A with random ports and gives their conntrack
/// entries a short timeout, so the first packet after a longer silence leaves from a new
/// public port (what a carrier-grade NAT does).
fn short_nat(up: &Uplinks, secs: u32) {
    let script = format!(
        "table ip epnat {{\n\
           ct timeout short {{ protocol udp; l3proto ip; policy = {{ unreplied: {secs}, replied: {secs} }}; }}\n\
           chain out {{ type filter hook output priority filter; oifname \"upa\" meta l4proto udp ct timeout set \"short\"; }}\n\
           chain post {{ type nat hook postrouting priority srcnat; oifname \"upa\" meta l4proto udp masquerade random; }}\n\
         }}\n"
    );
    let r = run(
        {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &up.ns, "nft", "-f", "-"]);
            c
        },
        Some(script.as_bytes()),
        Duration::from_secs(30),
    );
    assert!(
        r.ok(),
        "nft (conntrack timeout policy and masquerade in the device namespace): {}",
        r.stderr().trim()
    );
}

#[test]
fn an_idle_agent_learns_its_nats_timeout() {
    // NAT timeout 4 s; the agent's keep-alive range is 1-8 s (a hidden test flag; the
    // default is 10-55 s): QUIC's own PING at 8 s finds the binding gone, the gateway
    // validates the new port, and the agent shortens its keep-alive below 4 s.
    let up = Uplinks::up();
    short_nat(&up, 4);
    let cell = Cell::start(
        &up,
        "van-n",
        &["--transport", "quic", "--test-keepalive-range", "1s-8s"],
    );
    wait_online(&cell.tctl, "van-n", Some("quic"), Duration::from_secs(60));
    let learned = |log: &str| -> Option<f64> {
        log.lines()
            .rev()
            .filter(|l| l.contains("forgot its UDP binding"))
            .filter_map(|l| l.split("keep-alive now every ").nth(1))
            .filter_map(|v| v.split(" s").next())
            .find_map(|v| v.trim().parse::<f64>().ok())
    };
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(90), || {
            last = learned(&cell.agent.log_text());
            last.is_some_and(|s| s < 4.0)
        }),
        "the agent did not learn a keep-alive under the NAT's 4 s (last: {last:?}):\n{}",
        cell.agent.log_text()
    );
    assert!(
        cell.gw.proc.log_text().contains("device path changed"),
        "the gateway did not follow the NAT's new port:\n{}",
        cell.gw.proc.log_text()
    );
    // Idle for longer than the NAT's timeout, a dial from the gateway still reaches the
    // device: the learned keep-alive holds the binding open.
    std::thread::sleep(Duration::from_secs(10));
    let r = run(
        cell.tsh.cmd(&["ssh", "van-n", "echo", "through-the-nat"]),
        None,
        Duration::from_secs(60),
    );
    assert!(
        r.ok() && r.stdout().contains("through-the-nat"),
        "{}",
        r.stderr()
    );
    for l in cell
        .agent
        .log_text()
        .lines()
        .filter(|l| l.contains("keep-alive"))
    {
        eprintln!("agent: {l}");
    }
    // One tunnel all along: the NAT's rebindings were followed, not reconnected.
    assert_eq!(
        cell.agent.log_text().matches("tunnel up").count(),
        1,
        "{}",
        cell.agent.log_text()
    );
    let _ = (&cell.auth, &cell.dir);
}

#[test]
fn an_idle_quic_device_follows_a_network_switch_at_once() {
    // Nothing flows at the switch: QUIC's own keep-alive would move the tunnel only at its
    // next PING (up to 55 s later). The agent sees its route to the gateway leave from a new
    // address and pings from it at once.
    let up = Uplinks::up();
    let cell = Cell::start(&up, "van-i", &["--transport", "quic"]);
    wait_online(&cell.tctl, "van-i", Some("quic"), Duration::from_secs(60));
    cell.wait_address(&up.dev_addr(0));
    let switched = Instant::now();
    up.switch_to_b();
    cell.wait_address(&up.dev_addr(1));
    let shown = switched.elapsed();
    assert!(
        cell.agent
            .log_text()
            .contains("telling the gateway from the new address"),
        "{}",
        cell.agent.log_text()
    );
    let r = run(
        cell.tsh.cmd(&["ssh", "van-i", "echo", "moved"]),
        None,
        Duration::from_secs(60),
    );
    assert!(r.ok() && r.stdout().contains("moved"), "{}", r.stderr());
    assert_eq!(cell.agent.log_text().matches("tunnel up").count(), 1);
    eprintln!(
        "idle device on a network switch: new address in the inventory after {:.1} s",
        shown.as_secs_f64()
    );
    let _ = (&cell.auth, &cell.dir);
}

#[test]
fn the_tunnel_is_back_seconds_after_a_dead_zone() {
    // The modem loses its bearer: uplink A goes down and the device has no route to the
    // gateway. The tunnel dies at its idle timeout (3 s here); the agent keeps trying
    // within 5 s (nothing it sends can reach the gateway) and watches the route. Coverage
    // returns: the tunnel is back at once, not at the end of a 30 s backoff.
    let up = Uplinks::up();
    let cell = Cell::start(
        &up,
        "van-d",
        &[
            "--transport",
            "quic",
            "--keepalive",
            "1s",
            "--idle-timeout",
            "3s",
        ],
    );
    wait_online(&cell.tctl, "van-d", Some("quic"), Duration::from_secs(60));
    up.ns_ip(&["link", "set", "upa", "down"]);
    assert!(
        wait_until(Duration::from_secs(60), || cell
            .agent
            .log_text()
            .contains("tunnel lost")),
        "the tunnel did not notice the dead zone:\n{}",
        cell.agent.log_text()
    );
    // Long enough for the normal backoff to have grown past several seconds.
    std::thread::sleep(Duration::from_secs(12));
    let log = cell.agent.log_text();
    assert!(
        log.contains("(no route to the gateway)"),
        "the agent did not say it has no route:\n{log}"
    );
    let back = Instant::now();
    up.ns_ip(&["link", "set", "upa", "up"]);
    up.ns_ip(&[
        "route",
        "replace",
        "default",
        "via",
        &format!("10.210.{}.1", up.x),
    ]);
    assert!(
        wait_until(Duration::from_secs(60), || cell
            .agent
            .log_text()
            .matches("tunnel up")
            .count()
            >= 2),
        "the tunnel did not come back after the dead zone:\n{}",
        cell.agent.log_text()
    );
    let secs = back.elapsed().as_secs_f64();
    wait_online(&cell.tctl, "van-d", Some("quic"), Duration::from_secs(60));
    let r = run(
        cell.tsh.cmd(&["ssh", "van-d", "echo", "back"]),
        None,
        Duration::from_secs(60),
    );
    assert!(r.ok() && r.stdout().contains("back"), "{}", r.stderr());
    eprintln!(
        "dead zone: tunnel back {secs:.1} s after the route returned ({})",
        if cell
            .agent
            .log_text()
            .contains("the route to the gateway is back")
        {
            "the route watch ended the wait"
        } else {
            "at the end of a dead-zone backoff"
        }
    );
    let _ = (&cell.auth, &cell.dir);
}
