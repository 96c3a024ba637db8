//! Hosts behind the device (issue 22) on a network of their own: the agent runs in a device
//! network namespace (its uplink a veth pair to the root namespace, where the authority, the
//! gateway and tsh run), and two real Debian OpenSSH sshds run in a third namespace joined to
//! the device's only, by a second veth pair. The device does not forward, so the targets'
//! addresses are reachable from the agent and from nowhere else: a direct TCP connect from
//! tsh's namespace fails (even with a route pointing at the device), while through the agent
//! both a relay-mode target (host certificate for `van/ecu1`) and a record-mode target (pinned
//! host key) serve exec, a PTY, scp both ways, rsync, an `sftp -b` batch (put, get, ls), a
//! `-L` forward to a port served inside the targets' namespace and a `-R` forward from the
//! target's loopback to a port served in tsh's namespace.
//!
//! Needs root (CAP_NET_ADMIN) for `ip netns` and veth pairs.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Gateway, Tctl};
use edgeport_e2e::peers::peers_dir;
use edgeport_e2e::ssh::{random_file, same_file, sftp_batch, ssh, Tsh};
use edgeport_e2e::{bin, parse_env, run, wait_until, Authority, Proc, TempDir};
use serde_json::Value;

const PW: &str = "correct horse battery";

static N: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS` (in the root namespace); panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let mut c = Command::new("ip");
    c.args(args);
    let r = run(c, None, Duration::from_secs(30));
    assert!(
        r.ok(),
        "`ip {}` failed: {}\n(this test needs root or CAP_NET_ADMIN: network namespaces, veth \
         pairs and routes)",
        args.join(" "),
        r.stderr().trim()
    );
}

#[allow(unsafe_code)]
fn lock_file(f: &std::fs::File) {
    // SAFETY: flock(2) on a descriptor we own; no memory is shared.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
}

/// Root namespace <-> device namespace (`10.217.X.0/24`, uplink) and device namespace <->
/// targets namespace (`10.218.X.0/24`, the device's local bus). The device namespace does not
/// forward (a new namespace's default), so only processes in it reach the targets. Removed on
/// drop.
struct Nets {
    dev: String,
    tgt: String,
    /// Root-side end of the uplink (its peer `up0` is in `dev`).
    uplink: String,
    x: u8,
}

impl Nets {
    fn up() -> Self {
        let tag = format!(
            "{:x}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut me = Self {
            dev: format!("epnsdev-{tag}"),
            tgt: format!("epnstgt-{tag}"),
            uplink: format!("ent{tag}"),
            x: 0,
        };
        // Claim a free X (its root-side uplink address) under a lock, so that parallel runs
        // never share subnets.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/edgeport-targets-netns.lock")
            .expect("lock file in /run (this test needs root)");
        lock_file(&lock);
        let mut show = Command::new("ip");
        show.args(["-o", "-4", "addr", "show"]);
        let used = run(show, None, Duration::from_secs(30))
            .expect_ok("ip addr show")
            .stdout();
        me.x = (0..=255u8)
            .find(|x| !used.contains(&format!(" 10.217.{x}.1/")))
            .expect("a free 10.217.X.0/24 (256 in use: leftovers of killed runs?)");
        let x = me.x;
        ip(&["netns", "add", &me.dev]);
        ip(&["netns", "add", &me.tgt]);
        ip(&[
            "link", "add", &me.uplink, "type", "veth", "peer", "name", "up0", "netns", &me.dev,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("10.217.{x}.1/24"),
            "dev",
            &me.uplink,
        ]);
        drop(lock);
        ip(&["link", "set", &me.uplink, "up"]);
        me.ns(&me.dev, &["link", "set", "lo", "up"]);
        me.ns(
            &me.dev,
            &["addr", "add", &format!("10.217.{x}.2/24"), "dev", "up0"],
        );
        me.ns(&me.dev, &["link", "set", "up0", "up"]);
        me.ns(
            &me.dev,
            &[
                "link", "add", "bus0", "type", "veth", "peer", "name", "eth0", "netns", &me.tgt,
            ],
        );
        me.ns(
            &me.dev,
            &["addr", "add", &format!("10.218.{x}.1/24"), "dev", "bus0"],
        );
        me.ns(&me.dev, &["link", "set", "bus0", "up"]);
        me.ns(&me.tgt, &["link", "set", "lo", "up"]);
        for host in [2, 3] {
            me.ns(
                &me.tgt,
                &[
                    "addr",
                    "add",
                    &format!("10.218.{x}.{host}/24"),
                    "dev",
                    "eth0",
                ],
            );
        }
        me.ns(&me.tgt, &["link", "set", "eth0", "up"]);
        // The root namespace even routes the targets' subnet at the device: still no way
        // through, because the device does not forward.
        ip(&[
            "route",
            "add",
            &format!("10.218.{x}.0/24"),
            "via",
            &format!("10.217.{x}.2"),
        ]);
        me
    }

    fn ns(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", ns, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// The gateway's address: the root end of the uplink.
    fn gateway_host(&self) -> String {
        format!("10.217.{}.1", self.x)
    }

    /// Address `host` (2 or 3) in the targets' namespace.
    fn target(&self, host: u8) -> String {
        format!("10.218.{}.{host}", self.x)
    }

    /// The device's address on the targets' link.
    fn device_on_bus(&self) -> String {
        format!("10.218.{}.1", self.x)
    }

    /// `program` run inside namespace `ns`.
    fn command(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Nets {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        // Deleting the link also removes the route through it.
        quiet(&["link", "del", &self.uplink]);
        quiet(&["netns", "del", &self.tgt]);
        quiet(&["netns", "del", &self.dev]);
    }
}

/// `tests/peers/sshd.sh` run inside a namespace, listening on `listen`; stopped on drop.
struct NsSshd {
    dir: PathBuf,
    env: HashMap<String, String>,
}

impl NsSshd {
    fn start(ns: &str, dir: PathBuf, user_ca: &Path, listen: &str, env: &[(&str, &str)]) -> Self {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "bash"])
            .arg(peers_dir().join("sshd.sh"))
            .arg("start")
            .arg(&dir)
            .arg(user_ca)
            .env("SSHD_LISTEN", listen)
            .env("SSH_USERS", "root");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run sshd.sh");
        assert!(
            out.status.success(),
            "sshd.sh in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = parse_env(&String::from_utf8_lossy(&out.stdout));
        Self { dir, env }
    }

    fn get(&self, k: &str) -> &str {
        self.env.get(k).map(String::as_str).unwrap_or("")
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.get("SSHD_HOST"), self.get("SSHD_PORT"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.get("SSHD_LOG")).unwrap_or_default()
    }
}

impl Drop for NsSshd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(peers_dir().join("sshd.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

fn keygen(path: &Path) {
    let mut c = Command::new("ssh-keygen");
    c.args(["-q", "-t", "ed25519", "-N", "", "-C", "target", "-f"])
        .arg(path);
    run(c, None, Duration::from_secs(30)).expect_ok("ssh-keygen");
}

fn key_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A direct TCP connect from this (the root) namespace; `Ok` if it connected.
fn direct_connect(addr: &str) -> std::io::Result<TcpStream> {
    let sa: SocketAddr = addr.parse().unwrap();
    TcpStream::connect_timeout(&sa, Duration::from_secs(3))
}

/// A one-connection server in tsh's namespace for `-R`: reads a line, answers
/// `pong-NAME:LINE`; the thread returns the line it read.
fn reply_server(name: &str) -> (std::thread::JoinHandle<String>, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let name = name.to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
        let line = line.trim().to_string();
        s.write_all(format!("pong-{name}:{line}\n").as_bytes())
            .unwrap();
        line
    });
    (t, port)
}

/// An HTTP GET of `path` on 127.0.0.1:`port`; the whole response.
fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn targets_in_their_own_network_namespace_are_reached_only_through_the_device() {
    let nets = Nets::up();
    let dir = TempDir::new();
    let auth = Authority::start(&dir.join("authority"), "netns");
    let gw = Gateway::start_on(&dir.join("gateway"), &auth, &nets.gateway_host(), &[]);
    let tctl = Tctl::of(&auth);

    // The two legacy hosts, as docs/devices.md says. ecu1 (relay): trusts the user CA and
    // presents a host certificate for van/ecu1. rec1 (record): trusts the user CA, its
    // plain host key pinned on the targets line.
    let user_ca = dir.join("user_ca.pub");
    std::fs::write(
        &user_ca,
        tctl.ok(&["auth", "export", "--type", "user"]).stdout(),
    )
    .unwrap();
    let host_key = dir.join("ecu1_host_key");
    keygen(&host_key);
    let cert = dir.join("ecu1_host_key-cert.pub");
    tctl.ok(&[
        "auth",
        "sign",
        "--host",
        "van/ecu1",
        "--pubkey",
        dir.join("ecu1_host_key.pub").to_str().unwrap(),
        "--out",
        cert.to_str().unwrap(),
    ]);
    let relay_sshd = NsSshd::start(
        &nets.tgt,
        dir.join("sshd-ecu1"),
        &user_ca,
        &nets.target(2),
        &[("HOST_CERT", cert.to_str().unwrap())],
    );
    let record_sshd = NsSshd::start(
        &nets.tgt,
        dir.join("sshd-rec1"),
        &user_ca,
        &nets.target(3),
        &[],
    );
    let pinned = key_line(Path::new(record_sshd.get("SSHD_HOST_KEY_PUB")));

    // A web server inside the targets' namespace, for -L.
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let page = format!("served-inside-{}\n", nets.tgt);
    std::fs::write(www.join("marker.txt"), &page).unwrap();
    let python = if Path::new("/usr/bin/python3").exists() {
        PathBuf::from("/usr/bin/python3")
    } else {
        PathBuf::from("python3")
    };
    let http_addr = format!("{}:8080", nets.target(2));
    let mut http_cmd = Nets::command(&nets.tgt, &python);
    http_cmd
        .args(["-m", "http.server", "8080", "--bind", &nets.target(2)])
        .arg("--directory")
        .arg(&www);
    let _http = Proc::spawn("http-server", http_cmd, dir.path());

    // The agent in the device namespace, with both targets in DATA/targets.
    let data = dir.join("agent-van");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("targets"),
        format!(
            "ecu1={} zone=engine\nrec1={} zone=body mode=record hostkey={pinned}\n",
            relay_sshd.addr(),
            record_sshd.addr()
        ),
    )
    .unwrap();
    let (token, pin) = gw.device_token("");
    let mut cmd = Nets::command(&nets.dev, &bin("edge-agent"));
    cmd.args(["start", "--data-dir"])
        .arg(&data)
        .args(["--gateway", &gw.addr, "--token", &token, "--ca-pin", &pin])
        .args(["--id", "van", "--labels", "fleet=vans"]);
    let agent = Proc::spawn("edge-agent", cmd, dir.path());
    wait_online(&tctl, "van", None, Duration::from_secs(60));

    // The agent reaches both targets (its own TCP check, reported in its signed audit log)...
    let mut last = Vec::new();
    let reported = wait_until(Duration::from_secs(60), || {
        let r = tctl.ok(&[
            "audit", "search", "--format", "json", "--device", "van", "--type", "targets",
        ]);
        last = r.json().as_array().cloned().unwrap_or_default();
        last.iter()
            .any(|e: &Value| e["up.ecu1"] == "yes" && e["up.rec1"] == "yes")
    });
    assert!(
        reported,
        "the agent does not report both targets up: {last:#?}\nagent:\n{}",
        agent.log_text()
    );
    // `tctl devices ls` shows each target's mode beside its last check, table and JSON.
    let ls = tctl.ok(&["devices", "ls"]).stdout();
    let row = |t: &str| {
        ls.lines()
            .find(|l| l.starts_with(&format!("van/{t} ")))
            .unwrap_or_else(|| panic!("no row for van/{t}:\n{ls}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("ecu1")[..3], ["van/ecu1", "reachable", "relay"], "{ls}");
    assert_eq!(
        row("rec1")[..3],
        ["van/rec1", "reachable", "record"],
        "{ls}"
    );
    let json = tctl.ok(&["devices", "ls", "--format", "json"]).json();
    let van = json
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == "van"))
        .cloned()
        .unwrap_or_default();
    let modes: HashMap<String, String> = van["targets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t["name"].as_str().unwrap_or("").into(),
                        t["mode"].as_str().unwrap_or("").into(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        modes.get("ecu1").map(String::as_str),
        Some("relay"),
        "{van:#}"
    );
    assert_eq!(
        modes.get("rec1").map(String::as_str),
        Some("record"),
        "{van:#}"
    );

    // ...and nothing in tsh's namespace does: not the sshds, not the web server.
    // (All at once: each attempt waits out its connect timeout.)
    let attempts: Vec<_> = [relay_sshd.addr(), record_sshd.addr(), http_addr.clone()]
        .into_iter()
        .map(|a| std::thread::spawn(move || (direct_connect(&a).is_ok(), a)))
        .collect();
    for t in attempts {
        let (connected, a) = t.join().unwrap();
        assert!(
            !connected,
            "{a} is reachable from the root namespace, not only through the device"
        );
    }

    auth.add_user("alice", "root", PW);
    let alice = Tsh::new(dir.join("tsh-alice"), &gw.addr);
    alice
        .login("alice", PW, &gw.ca_pin, &[])
        .expect_ok("tsh login alice");
    let cfg = alice.config();
    let have_rsync = Command::new("which")
        .arg("rsync")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    for (name, sshd) in [("ecu1", &relay_sshd), ("rec1", &record_sshd)] {
        let host = format!("root@van/{name}");
        let alias = format!("root@van+{name}");

        // exec: the target saw the connection come from the device's address on its bus.
        let r = alice.run(
            &[
                "ssh",
                &host,
                "echo",
                &format!("exec-{name}"),
                "$SSH_CONNECTION",
            ],
            None,
        );
        assert_eq!(
            r.code(),
            Some(0),
            "{name}: {}\nagent:\n{}",
            r.stderr(),
            agent.log_text()
        );
        let want = format!("exec-{name} {} ", nets.device_on_bus());
        assert!(r.stdout().starts_with(&want), "{name}: {}", r.stdout());
        assert!(
            sshd.log().contains("Accepted publickey for root"),
            "{name}: {}",
            sshd.log()
        );

        // PTY through stock ssh -tt and `tsh config`.
        let r = run(
            ssh(
                &cfg,
                &["-tt", &host, &format!("echo marker-$((6*7))-{name}; tty")],
            ),
            None,
            Duration::from_secs(60),
        );
        assert_eq!(r.code(), Some(0), "{name} pty: {}", r.stderr());
        assert!(
            r.stdout().contains(&format!("marker-42-{name}")),
            "{name}: {}",
            r.stdout()
        );
        assert!(r.stdout().contains("/dev/pts/"), "{name}: {}", r.stdout());

        // scp up and down (the targets share this machine's files: compare them all).
        let src = dir.join(&format!("fw-{name}.bin"));
        random_file(&src, 300_001);
        let remote = dir.join(&format!("fw-on-{name}.bin"));
        let back = dir.join(&format!("fw-back-{name}.bin"));
        let mut up = Command::new("scp");
        up.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes"])
            .arg(&src);
        up.arg(format!("{alias}:{}", remote.display()));
        let r = run(up, None, Duration::from_secs(120));
        assert_eq!(r.code(), Some(0), "{name} scp up: {}", r.stderr());
        assert!(
            same_file(&src, &remote),
            "{name}: scp up copied other bytes"
        );
        let mut down = Command::new("scp");
        down.arg("-F").arg(&cfg).args(["-o", "BatchMode=yes"]);
        down.arg(format!("{alias}:{}", remote.display())).arg(&back);
        let r = run(down, None, Duration::from_secs(120));
        assert_eq!(r.code(), Some(0), "{name} scp down: {}", r.stderr());
        assert!(
            same_file(&src, &back),
            "{name}: scp down copied other bytes"
        );

        // rsync over tsh's ssh configuration.
        if have_rsync {
            let tree = dir.join(&format!("logs-{name}"));
            std::fs::create_dir_all(tree.join("sub")).unwrap();
            random_file(&tree.join("sub/a.log"), 50_000);
            let mirror = dir.join(&format!("logs-on-{name}"));
            let mut rsync = Command::new("rsync");
            rsync
                .arg("-a")
                .arg("-e")
                .arg(format!("ssh -F {} -o BatchMode=yes", cfg.display()))
                .arg(format!("{}/", tree.display()))
                .arg(format!("{alias}:{}/", mirror.display()));
            let r = run(rsync, None, Duration::from_secs(120));
            assert_eq!(r.code(), Some(0), "{name} rsync: {}", r.stderr());
            assert!(
                same_file(&tree.join("sub/a.log"), &mirror.join("sub/a.log")),
                "{name}: rsync copied other bytes"
            );
        } else {
            eprintln!("rsync not installed: the rsync step is skipped");
        }

        // -L to the web server inside the targets' namespace.
        let lport = edgeport_e2e::free_port();
        let fwd = format!("{lport}:{http_addr}");
        let mut tunnel = ssh(&cfg, &["-N", "-L", &fwd, &host])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut got = String::new();
        let forwarded = wait_until(Duration::from_secs(30), || {
            got = http_get(lport, "/marker.txt");
            got.ends_with(&page)
        });
        let _ = tunnel.kill();
        let _ = tunnel.wait();
        assert!(
            forwarded,
            "{name}: no page through -L {fwd}: {got:?}\nagent:\n{}",
            agent.log_text()
        );

        // -R: a port on the target's loopback leads back to a server in tsh's namespace,
        // bytes both ways.
        let (served, served_port) = reply_server(name);
        let rport = edgeport_e2e::free_port();
        let rfwd = format!("{rport}:127.0.0.1:{served_port}");
        let mut tunnel = ssh(
            &cfg,
            &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &rfwd, &host],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let probe = format!(
            "{} -c \"import socket; s = socket.create_connection(('127.0.0.1', {rport}), 5); \
             s.sendall(b'ping-from-{name}\\n'); s.settimeout(10); print(s.makefile().readline().strip())\"",
            python.display()
        );
        let want = format!("pong-{name}:ping-from-{name}");
        let mut got = String::new();
        let reached = wait_until(Duration::from_secs(30), || {
            got = alice.run(&["ssh", &host, &probe], None).stdout();
            got.trim() == want || tunnel.try_wait().ok().flatten().is_some()
        });
        let exited = tunnel.try_wait().ok().flatten();
        let _ = tunnel.kill();
        let mut err = String::new();
        if let Some(mut e) = tunnel.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = tunnel.wait();
        assert!(
            reached && got.trim() == want && exited.is_none(),
            "{name}: -R {rfwd} did not reach tsh's side: {got:?} (ssh -R exited: {exited:?}, {err})\nagent:\n{}",
            agent.log_text()
        );
        assert_eq!(served.join().unwrap(), format!("ping-from-{name}"));

        // sftp in batch mode: put, get, ls.
        let up = dir.join(&format!("cal-{name}.bin"));
        random_file(&up, 120_003);
        let remote = dir.join(&format!("cal-on-{name}.bin"));
        let back = dir.join(&format!("cal-back-{name}.bin"));
        let batch = dir.join(&format!("batch-{name}"));
        std::fs::write(
            &batch,
            format!(
                "put {} {}\nget {} {}\nls -l {}\n",
                up.display(),
                remote.display(),
                remote.display(),
                back.display(),
                remote.display()
            ),
        )
        .unwrap();
        let r = run(
            sftp_batch(&cfg, &batch, &alias),
            None,
            Duration::from_secs(120),
        );
        assert_eq!(r.code(), Some(0), "{name} sftp -b: {}", r.stderr());
        assert!(
            same_file(&up, &remote),
            "{name}: sftp put copied other bytes"
        );
        assert!(same_file(&up, &back), "{name}: sftp get copied other bytes");
        assert!(
            r.stdout().contains("120003") && r.stdout().contains(&format!("cal-on-{name}.bin")),
            "{name}: sftp ls: {}",
            r.stdout()
        );
    }

    // The record-mode target's logins used the authority's per-session certificate.
    assert!(
        record_sshd.log().contains("ID alice"),
        "{}",
        record_sshd.log()
    );
}
