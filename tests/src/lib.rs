//! The end-to-end test harness: real Edgeport processes on loopback, real peers (OpenSSH
//! sshd, ...) started by the scripts in `tests/peers/`. Every process is killed when its
//! handle drops, so a failing test leaves nothing running.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the README's test
//! command does that.

// A test harness: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub mod dial;
pub mod fabric;
pub mod peers;
pub mod rogue;
pub mod ssh;

/// Path of a workspace binary next to the running test (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/test-hash -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        p.display()
    );
    p
}

/// A fresh temporary directory, removed on drop (kept when EDGEPORT_KEEP_TMP is set).
pub struct TempDir {
    dir: Option<tempfile::TempDir>,
}

impl TempDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("edgeport-test-")
            .tempdir()
            .expect("tempdir");
        Self { dir: Some(dir) }
    }
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("live tempdir").path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path().join(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("EDGEPORT_KEEP_TMP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

/// A port free on 127.0.0.1 for both TCP and UDP (the gateway needs both).
///
/// Taken below the kernel's ephemeral range when there is room: a port the kernel handed out
/// for `bind(0)` could be handed out again as the source port of some outgoing connection
/// before the daemon under test binds it ("Address already in use", seen once in the
/// tunnel tests, whose tests run side by side and connect a lot). Each process starts at its
/// own offset and never returns the same port twice.
/// A TCP echo server on loopback (for port forwarding), for the test's life; its port.
pub fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an echo server");
    let port = l.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    port
}

/// Sends "ping" to 127.0.0.1:`port` and returns what came back within 10 s (empty when the
/// connection was refused or closed unanswered): through a forward to [`echo_server`].
pub fn ping_port(port: u16) -> Vec<u8> {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"ping");
    let mut got = Vec::new();
    let mut buf = [0u8; 4];
    while got.len() < 4 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (lo, hi) = below_ephemeral();
    if hi > lo + 1000 {
        let span = usize::from(hi - lo);
        let start = (std::process::id() as usize).wrapping_mul(7919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = lo + ((start + n * 13) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// Ports from 10000 up to the start of the kernel's ephemeral range (`ip_local_port_range`).
fn below_ephemeral() -> (u16, u16) {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    (10000, low)
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: &str, timeout: Duration) -> bool {
    wait_until(timeout, || TcpStream::connect(addr).is_ok())
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running child process; killed (SIGKILL) on drop. Its stdout and stderr go to a log
/// file that is printed when a test asks (or fails while holding it).
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout+stderr to `log_dir/NAME-N.log`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}-{}.log", SEQ.fetch_add(1, Ordering::SeqCst)));
        let f = std::fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        cmd.stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .stdin(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status if it exited by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe_kill(c.id(), sig);
        }
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of {} ({}) -----", self.name, self.log.display());
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        self.kill9();
    }
}

/// Output of a finished command, with text accessors.
pub struct Run {
    pub out: Output,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.out.status.success()
    }
    pub fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// Panics with both streams unless the command succeeded.
    pub fn expect_ok(self, what: &str) -> Self {
        assert!(
            self.ok(),
            "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.out.status,
            self.stdout(),
            self.stderr()
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
}

/// Runs a command to completion with a timeout (SIGKILL after it), stdin from `input`.
pub fn run(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Run {
    use std::io::Write;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if done2.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe_kill(pid, libc::SIGKILL);
        true
    });
    let out = child.wait_with_output().expect("wait");
    done.store(true, Ordering::SeqCst);
    let killed = watchdog.join().unwrap_or(false);
    assert!(!killed, "{cmd:?} did not finish within {timeout:?}");
    Run { out }
}

/// A running authority process with its data dir and admin identity.
pub struct Authority {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub addr: String,
    pub cluster: String,
}

impl Authority {
    /// Starts `authority start` on a free port and waits until it serves.
    pub fn start(data_dir: &Path, cluster: &str) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        Self::start_at(data_dir, cluster, &addr)
    }

    pub fn start_at(data_dir: &Path, cluster: &str, addr: &str) -> Self {
        Self::start_env(data_dir, cluster, addr, &[])
    }

    /// As [`Authority::start_at`], with extra environment (e.g. `EDGEPORT_STORE`).
    pub fn start_env(data_dir: &Path, cluster: &str, addr: &str, envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin("authority"));
        cmd.envs(envs.iter().copied());
        cmd.args(["start", "--data-dir"]).arg(data_dir).args([
            "--listen",
            addr,
            "--cluster",
            cluster,
        ]);
        let log_dir = data_dir.parent().unwrap_or(data_dir);
        let mut proc = Proc::spawn("authority", cmd, log_dir);
        let ident = data_dir.join("admin.identity");
        let up = wait_until(Duration::from_secs(30), || {
            ident.exists() && TcpStream::connect(addr).is_ok()
        });
        assert!(
            up && proc.alive(),
            "authority did not come up:\n{}",
            proc.log_text()
        );
        Self {
            proc,
            data_dir: data_dir.to_path_buf(),
            addr: addr.to_string(),
            cluster: cluster.to_string(),
        }
    }

    pub fn identity(&self) -> PathBuf {
        self.data_dir.join("admin.identity")
    }

    /// A `tctl` command bound to this authority and its admin identity.
    pub fn tctl_cmd(&self) -> Command {
        let mut c = Command::new(bin("tctl"));
        c.env("EDGEPORT_AUTH", &self.addr)
            .env("EDGEPORT_IDENTITY", self.identity());
        c
    }

    /// Adds a local user with a password (`tctl users add --password-stdin`).
    pub fn add_user(&self, name: &str, logins: &str, password: &str) {
        self.add_user_with(name, password, &["--logins", logins])
            .expect_ok("tctl users add");
    }

    /// `tctl users add NAME FLAGS... --password-stdin` with `password`, for the caller to
    /// judge (roles, `--require-totp`, kube groups, or flags that must be refused).
    pub fn add_user_with(&self, name: &str, password: &str, flags: &[&str]) -> Run {
        let mut c = self.tctl_cmd();
        c.args(["users", "add", name])
            .args(flags)
            .arg("--password-stdin");
        run(
            c,
            Some(format!("{password}\n").as_bytes()),
            Duration::from_secs(30),
        )
    }

    /// Runs tctl with `args` (30 s timeout).
    pub fn tctl(&self, args: &[&str]) -> Run {
        let mut c = self.tctl_cmd();
        c.args(args);
        run(c, None, Duration::from_secs(30))
    }

    /// Runs tctl and asserts success.
    pub fn tctl_ok(&self, args: &[&str]) -> Run {
        self.tctl(args)
            .expect_ok(&format!("tctl {}", args.join(" ")))
    }
}

/// Environment parsed from `KEY=value` lines.
pub fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}
