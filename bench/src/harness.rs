//! Processes for the benchmarks: the authority, gateways and agents from target/release,
//! tctl and tsh, optionally inside a network namespace. Every process is killed when its
//! handle drops, so an aborted run leaves nothing behind.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A workspace binary next to the bench binary (target/release/NAME).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("bench binary has no directory")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --release --workspace --bins` first",
            p.display()
        );
    }
    Ok(p)
}

/// A command, run inside network namespace `ns` when given.
pub fn command(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A port free on 127.0.0.1 for both TCP and UDP.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running child, killed (SIGKILL) on drop; output in a log file.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log)?;
        let f2 = f.try_clone()?;
        cmd.stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .stdin(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command to completion (SIGKILL after `timeout`), stdin from `input`.
pub fn run(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(timeout).is_err() {
            kill(pid, libc::SIGKILL);
            return true;
        }
        false
    });
    let out = child.wait_with_output()?;
    let _ = tx.send(());
    if watchdog.join().unwrap_or(false) {
        bail!("{what} did not finish within {timeout:?}");
    }
    Ok(out)
}

/// Runs and requires success; returns stdout.
pub fn run_ok(cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = run(cmd, input, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[allow(unsafe_code)]
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// `KEY=value` lines.
pub fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Anonymous resident memory (heap, stacks) of a process in KiB: RSS without the pages of
/// its binary and libraries, which the kernel maps in from the page cache in 64 KiB runs
/// around every page touched and can drop at any time.
pub fn rss_anon_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no {field} for {pid}"))
}

/// utime + stime of a process, in seconds.
/// Bytes a process caused to be written to storage (`write_bytes` in /proc/PID/io: pages
/// dirtied in the page cache, counted as the flash will see them, not the bytes of each
/// write call).
pub fn write_bytes(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no write_bytes in /proc/{pid}/io"))
}

pub fn cpu_secs(pid: u32) -> Result<f64> {
    Ok(stat_cpu(pid)?.0)
}

/// (utime + stime, cutime + cstime) of a process in seconds: its own CPU time and that of its
/// children it has reaped (which include their reaped descendants).
fn stat_cpu(pid: u32) -> Result<(f64, f64)> {
    let f = stat_fields(pid)?;
    let tick = |i: usize| -> f64 { f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    // f[0] is state (field 3); utime is field 14, stime 15, cutime 16, cstime 17.
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(((tick(11) + tick(12)) / hz, (tick(13) + tick(14)) / hz))
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces), from the
/// state (field 3) on.
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds of a whole process tree: for `root` and every process below it that is still
/// in /proc (running or a zombie), its own time plus the time of the children it has reaped.
/// Every process that ever ran under `root` and was reaped inside the tree counts exactly
/// once, so the difference of two snapshots is the tree's CPU time in between (an sshd
/// listener with its per-connection children, live and gone).
pub fn tree_cpu_secs(root: u32) -> Result<f64> {
    let mut kids: HashMap<u32, Vec<u32>> = HashMap::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid)
            .ok()
            .and_then(|f| f.get(1).and_then(|v| v.parse::<u32>().ok()))
        {
            kids.entry(ppid).or_default().push(pid);
        }
    }
    let (own, reaped) = stat_cpu(root)?;
    let mut total = own + reaped;
    let mut todo = kids.get(&root).cloned().unwrap_or_default();
    while let Some(pid) = todo.pop() {
        // A process that went away between the scan and now was reaped into its parent's
        // counters, read above or below.
        if let Ok((own, reaped)) = stat_cpu(pid) {
            total += own + reaped;
        }
        todo.extend(kids.get(&pid).cloned().unwrap_or_default());
    }
    Ok(total)
}

/// The host's UDP counters from /proc/net/snmp: (InDatagrams, OutDatagrams, RcvbufErrors).
/// With segmentation offload (GSO) a send of several QUIC packets counts once, and with
/// GRO a coalesced receive counts once, so datagrams per GiB show whether they are in use.
pub fn udp_counters() -> Result<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/net/snmp")?;
    let mut rows = s.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        bail!("no Udp rows in /proc/net/snmp");
    };
    let get = |name: &str| -> Result<u64> {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| anyhow!("no Udp {name} in /proc/net/snmp"))
    };
    Ok((
        get("InDatagrams")?,
        get("OutDatagrams")?,
        get("RcvbufErrors")?,
    ))
}

/// CPU seconds (user + system) of this process's children it has waited for, so far.
pub fn children_cpu_secs() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: getrusage writes into the zeroed struct we own; no other precondition.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// An authority and one gateway (more can be added), on loopback or inside a namespace.
pub struct Fabric {
    pub dir: PathBuf,
    pub ns: Option<String>,
    /// Kept for its lifetime: dropping it kills the authority.
    auth: Proc,
    pub auth_addr: String,
    pub gw: Proc,
    pub gw_addr: String,
    pub gw_data: PathBuf,
    pub ca_pin: String,
    extra_gw: Vec<String>,
}

impl Fabric {
    /// Starts an authority on `host` and a gateway on `host:gw_port` (0: a free port).
    pub fn start(dir: &Path, ns: Option<&str>, host: &str, gw_port: u16) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let auth_port = if ns.is_some() { 3025 } else { free_port()? };
        let auth_addr = format!("127.0.0.1:{auth_port}");
        let data = dir.join("authority");
        let mut cmd = command(ns, &bin("authority")?);
        cmd.args(["start", "--data-dir"]).arg(&data).args([
            "--listen",
            &auth_addr,
            "--cluster",
            "bench",
        ]);
        let mut auth = Proc::spawn("authority", cmd, dir)?;
        let ident = data.join("admin.identity");
        let probe = auth_addr.clone();
        let in_ns = ns.is_some();
        let up = wait_until(Duration::from_secs(30), || {
            ident.exists() && (in_ns || TcpStream::connect(&probe).is_ok())
        });
        if !up || !auth.alive() {
            bail!("authority did not come up:\n{}", auth.log_text());
        }
        if in_ns {
            std::thread::sleep(Duration::from_millis(500));
        }
        let port = if gw_port == 0 { free_port()? } else { gw_port };
        let mut me = Self {
            dir: dir.to_path_buf(),
            ns: ns.map(str::to_string),
            auth,
            auth_addr,
            gw: Proc::spawn("placeholder", Command::new("true"), dir)?,
            gw_addr: format!("{host}:{port}"),
            gw_data: dir.join("gateway"),
            ca_pin: String::new(),
            extra_gw: Vec::new(),
        };
        let (gw, pin) = me.start_gateway("gateway", &me.gw_data.clone(), &me.gw_addr.clone())?;
        me.gw = gw;
        me.ca_pin = pin;
        Ok(me)
    }

    /// The authority's process id (for its CPU time and memory).
    pub fn auth_pid(&self) -> u32 {
        self.auth.pid()
    }

    pub fn tctl_cmd(&self) -> Result<Command> {
        let mut c = command(self.ns.as_deref(), &bin("tctl")?);
        c.env("EDGEPORT_AUTH", &self.auth_addr).env(
            "EDGEPORT_IDENTITY",
            self.dir.join("authority").join("admin.identity"),
        );
        Ok(c)
    }

    pub fn tctl(&self, args: &[&str]) -> Result<String> {
        let mut c = self.tctl_cmd()?;
        c.args(args);
        run_ok(c, None, Duration::from_secs(60))
    }

    /// A join token: (token, ca_pin).
    pub fn token(&self, kind: &str, reusable: bool) -> Result<(String, String)> {
        let mut args = vec![
            "tokens", "add", "--type", kind, "--ttl", "1h", "--format", "json",
        ];
        if reusable {
            args.push("--reusable");
        }
        let j: serde_json::Value = serde_json::from_str(&self.tctl(&args)?)?;
        let get = |k: &str| {
            j[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no {k} in {j}"))
        };
        Ok((get("token")?, get("ca_pin")?))
    }

    /// Starts another gateway of this cluster (or the first one); waits until it listens.
    pub fn start_gateway(&self, name: &str, data: &Path, addr: &str) -> Result<(Proc, String)> {
        let (token, pin) = self.token("gateway", false)?;
        let gw = self.spawn_gateway(name, data, addr, Some((&token, &pin)))?;
        Ok((gw, pin))
    }

    pub fn spawn_gateway(
        &self,
        name: &str,
        data: &Path,
        addr: &str,
        join: Option<(&str, &str)>,
    ) -> Result<Proc> {
        self.spawn_gateway_with(name, data, addr, join, &[])
    }

    /// [`Fabric::spawn_gateway`] with more `gateway start` flags.
    pub fn spawn_gateway_with(
        &self,
        name: &str,
        data: &Path,
        addr: &str,
        join: Option<(&str, &str)>,
        extra: &[&str],
    ) -> Result<Proc> {
        let mut cmd = command(self.ns.as_deref(), &bin("gateway")?);
        cmd.args(["start", "--data-dir"]).arg(data).args([
            "--auth",
            &self.auth_addr,
            "--listen",
            addr,
        ]);
        if let Some((t, p)) = join {
            cmd.args(["--token", t, "--ca-pin", p]);
        }
        cmd.args(&self.extra_gw).args(extra);
        let mut gw = Proc::spawn(name, cmd, &self.dir)?;
        let up = wait_until(Duration::from_secs(30), || {
            gw.log_text().contains("gateway listening on")
        });
        if !up || !gw.alive() {
            bail!("gateway {name} did not come up:\n{}", gw.log_text());
        }
        Ok(gw)
    }

    /// Starts an agent (`edge-agent start`) for device `id` against `gateway`.
    pub fn agent(&self, id: &str, gateway: &str, ns: Option<&str>, extra: &[&str]) -> Result<Proc> {
        let (token, pin) = self.token("device", false)?;
        let mut cmd = command(ns, &bin("edge-agent")?);
        cmd.args(["start", "--data-dir"])
            .arg(self.dir.join(format!("agent-{id}")))
            .args(["--gateway", gateway, "--token", &token, "--ca-pin", &pin])
            .args(["--id", id])
            .args(extra);
        // BENCH_AGENT_ARGS adds agent flags to every agent, for experiments such as
        // `--quic-timeout 1ms` (the device leg on the TCP fallback).
        if let Ok(more) = std::env::var("BENCH_AGENT_ARGS") {
            cmd.args(more.split_whitespace());
        }
        Proc::spawn(&format!("agent-{id}"), cmd, &self.dir)
    }

    /// The inventory (`tctl devices ls --format json`).
    pub fn devices(&self) -> Result<Vec<serde_json::Value>> {
        let j: serde_json::Value =
            serde_json::from_str(&self.tctl(&["devices", "ls", "--format", "json"])?)?;
        Ok(j.as_array().cloned().unwrap_or_default())
    }

    pub fn wait_online(&self, id: &str, timeout: Duration) -> Result<()> {
        let ok = wait_until(timeout, || {
            self.devices()
                .map(|d| d.iter().any(|d| d["id"] == id && d["online"] == true))
                .unwrap_or(false)
        });
        if !ok {
            bail!("device {id} did not come online within {timeout:?}");
        }
        Ok(())
    }

    /// A user with login `root` and a tsh profile logged in to `gateway`: TSH_HOME.
    pub fn tsh_login(&self, user: &str, gateway: &str) -> Result<PathBuf> {
        let pw = "bench-password-1234";
        let mut c = self.tctl_cmd()?;
        c.args(["users", "add", user, "--logins", "root", "--password-stdin"]);
        run_ok(
            c,
            Some(format!("{pw}\n").as_bytes()),
            Duration::from_secs(60),
        )?;
        let home = self.dir.join(format!("tsh-{user}"));
        let mut c = self.tsh(&home)?;
        c.args([
            "login",
            "--proxy",
            gateway,
            "--user",
            user,
            "--password-stdin",
            "--ca-pin",
            &self.ca_pin,
        ]);
        run_ok(
            c,
            Some(format!("{pw}\n").as_bytes()),
            Duration::from_secs(60),
        )?;
        Ok(home)
    }

    /// A tsh command with TSH_HOME = `home`.
    pub fn tsh(&self, home: &Path) -> Result<Command> {
        let mut c = command(self.ns.as_deref(), &bin("tsh")?);
        c.env("TSH_HOME", home)
            .env_remove("TSH_PROXY")
            .env_remove("TSH_IDENTITY")
            .env_remove("SSH_AUTH_SOCK");
        Ok(c)
    }
}

/// A stock OpenSSH sshd (tests/peers/sshd.sh) trusting a user CA made here, and a user key
/// signed by it for `root`.
pub struct Sshd {
    pub dir: PathBuf,
    pub port: u16,
    /// The listening sshd (its per-connection children are below it).
    pub pid: u32,
    pub known_hosts: PathBuf,
    pub key: PathBuf,
    pub config: PathBuf,
    script: PathBuf,
}

impl Sshd {
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let keygen = |args: &[&str]| -> Result<()> {
            let mut c = Command::new("ssh-keygen");
            c.args(args);
            run_ok(c, None, Duration::from_secs(30)).map(|_| ())
        };
        let ca = dir.join("user_ca");
        let key = dir.join("user");
        let ca_s = ca.display().to_string();
        let key_s = key.display().to_string();
        if !ca.exists() {
            keygen(&["-q", "-t", "ed25519", "-N", "", "-f", &ca_s])?;
        }
        if !key.exists() {
            keygen(&["-q", "-t", "ed25519", "-N", "", "-f", &key_s])?;
            keygen(&[
                "-q",
                "-s",
                &ca_s,
                "-I",
                "bench",
                "-n",
                "root",
                &format!("{key_s}.pub"),
            ])?;
        }
        let script = repo_root()?.join("tests/peers/sshd.sh");
        let mut c = Command::new(&script);
        c.arg("start")
            .arg(dir.join("sshd"))
            .arg(format!("{ca_s}.pub"));
        let env = parse_env(&run_ok(c, None, Duration::from_secs(300))?);
        let port = env
            .get("SSHD_PORT")
            .and_then(|p| p.parse().ok())
            .context("sshd.sh printed no SSHD_PORT")?;
        let pid = env
            .get("SSHD_PID")
            .and_then(|p| p.parse().ok())
            .context("sshd.sh printed no SSHD_PID")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            port,
            pid,
            known_hosts: PathBuf::from(env.get("SSHD_KNOWN_HOSTS").context("known hosts")?),
            config: PathBuf::from(env.get("SSHD_CONFIG").context("sshd config")?),
            key,
            script,
        })
    }

    /// `ssh` straight to this sshd with `cipher`, running `remote`.
    pub fn ssh_args(&self, host: &str, cipher: &str) -> Vec<String> {
        let mut a = self.ssh_opts(cipher);
        a.extend(["-p".into(), self.port.to_string(), format!("root@{host}")]);
        a
    }

    /// The options of [`Sshd::ssh_args`] without port and destination: this sshd's user
    /// key, no prompts, `cipher`.
    pub fn ssh_opts(&self, cipher: &str) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-c".into(),
            cipher.into(),
        ]
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let mut c = Command::new(&self.script);
        c.arg("stop").arg(self.dir.join("sshd"));
        let _ = run(c, None, Duration::from_secs(30));
    }
}

/// The workspace root (where Cargo.toml with [workspace] lives), from the bench binary's
/// place in target/release or the current directory.
pub fn repo_root() -> Result<PathBuf> {
    let mut cands = vec![std::env::current_dir()?];
    if let Ok(exe) = std::env::current_exe() {
        cands.extend(exe.ancestors().map(Path::to_path_buf));
    }
    for c in cands {
        if c.join("tests/peers/sshd.sh").exists() && c.join("Cargo.toml").exists() {
            return Ok(c);
        }
    }
    bail!("cannot find the workspace root (run from the repository)")
}

/// Counts the devices a gateway's log reports online, reading only what was appended since
/// the last call (the log of 100,000 tunnels is tens of megabytes).
pub struct OnlineCounter {
    log: PathBuf,
    offset: u64,
    partial: String,
    /// Device id -> last seen on QUIC.
    seen: HashMap<String, bool>,
}

impl OnlineCounter {
    pub fn new(log: &Path) -> Self {
        Self {
            log: log.to_path_buf(),
            offset: 0,
            partial: String::new(),
            seen: HashMap::new(),
        }
    }

    /// (devices online, of them last on QUIC).
    pub fn poll(&mut self) -> (usize, usize) {
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(self.offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                self.offset += buf.len() as u64;
                self.partial.push_str(&String::from_utf8_lossy(&buf));
                let complete = self.partial.rfind('\n').map_or(0, |i| i + 1);
                let text: String = self.partial.drain(..complete).collect();
                for line in text.lines().filter(|l| l.contains("device online")) {
                    let field = |k: &str| {
                        line.split(k)
                            .nth(1)
                            .and_then(|v| v.split_whitespace().next())
                    };
                    if let Some(id) = field(" device=") {
                        let quic = field(" transport=") == Some("\"quic\"");
                        self.seen.insert(id.to_string(), quic);
                    }
                }
            }
        }
        let quic = self.seen.values().filter(|q| **q).count();
        (self.seen.len(), quic)
    }
}

/// `bench loadgen` (run in network namespace `ns` when given) with `n` agents against
/// `gateway`, their data under `dir`; more flags may follow.
pub fn loadgen_command(
    ns: Option<&str>,
    gateway: &str,
    token: &str,
    pin: &str,
    n: usize,
    dir: &Path,
) -> Result<Command> {
    let mut c = command(ns, &bin("bench")?);
    c.args([
        "loadgen",
        "--gateway",
        gateway,
        "--token",
        token,
        "--ca-pin",
        pin,
    ])
    .args(["--n", &n.to_string()])
    .arg("--dir")
    .arg(dir)
    .env("RUST_LOG", "info");
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_reads_only_appended_whole_lines() {
        let dir = std::env::temp_dir().join(format!("fleet-counter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("gw.log");
        let line = |id: &str, t: &str| {
            format!(
                "2026-12-07T11:00:00Z INFO device online device={id} transport=\"{t}\" version=1\n"
            )
        };
        std::fs::write(&log, line("a", "quic") + "noise\n" + "2026 INFO device onl").unwrap();
        let mut c = OnlineCounter::new(&log);
        assert_eq!(c.poll(), (1, 1));
        // The half-written line completes; b comes up on TCP, a again on TCP.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        use std::io::Write;
        write!(
            f,
            "ine device=b transport=\"tcp\" version=1\n{}",
            line("a", "tcp")
        )
        .unwrap();
        assert_eq!(c.poll(), (2, 0));
        assert_eq!(c.poll(), (2, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
