//! Harness for tsh sessions: a whole cluster on loopback (authority, gateway, agents and a
//! local user), tsh with its own `TSH_HOME`, a private ssh-agent, OpenSSH's client through
//! `tsh config`, and tmux for terminal sessions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::fabric::{wait_online, Agent, Gateway, Tctl};
use crate::{bin, run, wait_until, Authority, Proc, Run, TempDir};

/// Serialises gateway starts in this test binary, so that an environment variable meant
/// for one gateway (the splice dump) is seen by that one only.
static GATEWAY_SPAWN: Mutex<()> = Mutex::new(());

/// A cluster: authority, gateway and agents, each a real process on loopback.
pub struct Cluster {
    // Field order is drop order: processes first (their logs are printed on a failure),
    // the directory holding the logs last.
    pub agents: Vec<Agent>,
    pub gw: Gateway,
    pub auth: Authority,
    pub tctl: Tctl,
    /// Where the gateway writes the bytes it splices, if asked to (see
    /// [`Cluster::start_with_splice_dump`]).
    pub splice_dump: Option<PathBuf>,
    pub dir: TempDir,
}

impl Cluster {
    /// Starts authority `cluster`, one gateway and one agent per `(id, labels)`, and waits
    /// until every device is online.
    pub fn start(cluster: &str, devices: &[(&str, &str)]) -> Self {
        Self::start_inner(cluster, devices, false, &[])
    }

    /// As [`Cluster::start`], with extra `gateway start` arguments.
    pub fn start_with_gateway_args(
        cluster: &str,
        devices: &[(&str, &str)],
        gateway_args: &[&str],
    ) -> Self {
        Self::start_inner(cluster, devices, false, gateway_args)
    }

    /// As [`Cluster::start`], with the gateway's test hook `EDGEPORT_SPLICE_DUMP=DIR` set:
    /// the gateway appends every byte it splices for a session to `DIR/SESSION.c2s` and
    /// `DIR/SESSION.s2c`.
    pub fn start_with_splice_dump(cluster: &str, devices: &[(&str, &str)]) -> Self {
        Self::start_inner(cluster, devices, true, &[])
    }

    fn start_inner(
        cluster: &str,
        devices: &[(&str, &str)],
        dump: bool,
        gateway_args: &[&str],
    ) -> Self {
        let dir = TempDir::new();
        let auth = Authority::start(&dir.join("authority"), cluster);
        let splice_dump = dump.then(|| dir.join("splice-dump"));
        let gw = {
            let _one_at_a_time = GATEWAY_SPAWN.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(d) = &splice_dump {
                std::fs::create_dir_all(d).expect("splice dump dir");
                std::env::set_var("EDGEPORT_SPLICE_DUMP", d);
            }
            let gw = Gateway::start_with(&dir.join("gateway"), &auth, gateway_args);
            std::env::remove_var("EDGEPORT_SPLICE_DUMP");
            gw
        };
        let tctl = Tctl::of(&auth);
        let agents: Vec<Agent> = devices
            .iter()
            .map(|(id, labels)| {
                Agent::start(&dir.join(&format!("agent-{id}")), &gw, id, labels, &[])
            })
            .collect();
        for (id, _) in devices {
            wait_online(&tctl, id, None, Duration::from_secs(60));
        }
        Self {
            agents,
            gw,
            auth,
            tctl,
            splice_dump,
            dir,
        }
    }

    /// Adds a local user with a password.
    pub fn add_user(&self, name: &str, logins: &str, password: &str) {
        self.auth.add_user(name, logins, password);
    }

    pub fn agent(&self, id: &str) -> &Agent {
        self.agents.iter().find(|a| a.id == id).expect("agent")
    }

    pub fn proxy(&self) -> &str {
        &self.gw.addr
    }
}

/// A real OpenSSH sshd set up as a relay target `host` (`DEVICE/NAME`), as docs/devices.md
/// says: it trusts the cluster's user CA, lets `root` in, and presents a host certificate from
/// `tctl auth sign --host`. Returns the sshd (stopped on drop), its loopback address for the
/// agent's `--target` line, and the host certificate's path.
pub fn target_sshd(c: &Cluster, host: &str) -> (crate::peers::Peer, String, PathBuf) {
    let dir = c.dir.join(&format!("target-{}", host.replace('/', "-")));
    std::fs::create_dir_all(&dir).expect("target dir");
    let user_ca = dir.join("user_ca.pub");
    let ca = c.tctl.ok(&["auth", "export", "--type", "user"]).stdout();
    std::fs::write(&user_ca, ca).expect("user CA file");
    let host_key = dir.join("host_key");
    let mut kg = Command::new("ssh-keygen");
    kg.args(["-q", "-t", "ed25519", "-N", "", "-C", "target", "-f"])
        .arg(&host_key);
    run(kg, None, Duration::from_secs(30)).expect_ok("ssh-keygen");
    let cert = dir.join("host_key-cert.pub");
    let signed = c.tctl.ok(&[
        "auth",
        "sign",
        "--host",
        host,
        "--pubkey",
        dir.join("host_key.pub").to_str().expect("utf-8 path"),
        "--out",
        cert.to_str().expect("utf-8 path"),
    ]);
    assert!(
        signed.stdout().contains(&format!("host {host}")),
        "{}",
        signed.stdout()
    );
    let sshd = crate::peers::Peer::start(
        "sshd.sh",
        &[user_ca.to_str().expect("utf-8 path")],
        &[
            ("HOST_CERT", cert.to_str().expect("utf-8 path")),
            ("SSH_USERS", "root"),
        ],
    );
    let addr = format!("127.0.0.1:{}", sshd.get("SSHD_PORT"));
    (sshd, addr, cert)
}

/// tsh with its own home directory.
pub struct Tsh {
    pub home: PathBuf,
    pub proxy: String,
    /// The ssh-agent socket tsh sees (none: SSH_AUTH_SOCK is removed).
    pub agent_sock: Option<PathBuf>,
}

impl Tsh {
    pub fn new(home: PathBuf, proxy: &str) -> Self {
        Self {
            home,
            proxy: proxy.to_string(),
            agent_sock: None,
        }
    }

    /// A tsh command with this home and agent.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("tsh"));
        c.env("TSH_HOME", &self.home)
            .env_remove("TSH_PROXY")
            .env_remove("TSH_IDENTITY");
        match &self.agent_sock {
            Some(s) => c.env("SSH_AUTH_SOCK", s),
            None => c.env_remove("SSH_AUTH_SOCK"),
        };
        c.args(args);
        c
    }

    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        run(self.cmd(args), stdin, Duration::from_secs(120))
    }

    /// `tsh login --password-stdin` with the cluster's CA pin.
    pub fn login(&self, user: &str, password: &str, pin: &str, extra: &[&str]) -> Run {
        let mut args = vec![
            "login",
            "--proxy",
            &self.proxy,
            "--user",
            user,
            "--password-stdin",
            "--ca-pin",
            pin,
        ];
        args.extend_from_slice(extra);
        self.run(&args, Some(format!("{password}\n").as_bytes()))
    }

    /// Writes `tsh config` to `HOME/ssh_config` and returns its path.
    pub fn config(&self) -> PathBuf {
        let r = self.run(&["config"], None).expect_ok("tsh config");
        let path = self.home.join("ssh_config");
        std::fs::write(&path, r.stdout()).expect("write ssh_config");
        path
    }

    /// The key directory of this proxy.
    pub fn key_dir(&self) -> PathBuf {
        self.home.join("keys").join(&self.proxy)
    }
}

/// Stock OpenSSH `ssh -F CONFIG` in batch mode (never prompts).
pub fn ssh(config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes"])
        .args(args);
    c
}

/// `sftp -F CONFIG -o BatchMode=yes -b BATCH HOST`: stock sftp running a batch file.
pub fn sftp_batch(config: &Path, batch: &Path, host: &str) -> Command {
    let mut c = Command::new("sftp");
    c.arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes", "-b"])
        .arg(batch)
        .arg(host);
    c
}

/// A private `ssh-agent -D -a SOCK`, killed on drop.
pub struct SshAgent {
    pub proc: Proc,
    pub sock: PathBuf,
}

impl SshAgent {
    pub fn start(dir: &Path) -> Self {
        let sock = dir.join("agent.sock");
        let mut c = Command::new("ssh-agent");
        c.arg("-D").arg("-a").arg(&sock);
        let proc = Proc::spawn("ssh-agent", c, dir);
        assert!(
            wait_until(Duration::from_secs(10), || sock.exists()),
            "ssh-agent did not start"
        );
        Self { proc, sock }
    }

    /// `ssh-add -l` against this agent.
    pub fn list(&self) -> Run {
        let mut c = Command::new("ssh-add");
        c.arg("-l").env("SSH_AUTH_SOCK", &self.sock);
        run(c, None, Duration::from_secs(10))
    }
}

/// A tmux server of its own (`tmux -L NAME`) holding one session; killed on drop.
pub struct Tmux {
    name: String,
}

impl Tmux {
    /// Starts `command` (a shell command line) in a detached COLSxROWS session.
    pub fn start(name: &str, cols: u16, rows: u16, command: &str) -> Self {
        let me = Self {
            name: format!("{name}-{}", std::process::id()),
        };
        me.tmux(&[
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            command,
        ])
        .expect_ok("tmux new-session");
        me
    }

    pub fn tmux(&self, args: &[&str]) -> Run {
        let mut c = Command::new("tmux");
        c.arg("-L")
            .arg(&self.name)
            .arg("-f")
            .arg("/dev/null")
            .args(args);
        run(c, None, Duration::from_secs(10))
    }

    pub fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "main"];
        args.extend_from_slice(keys);
        self.tmux(&args).expect_ok("tmux send-keys");
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "main"]).stdout()
    }

    pub fn resize(&self, cols: u16, rows: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            "main",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ])
        .expect_ok("tmux resize-window");
    }

    /// Waits until the screen shows `text`; returns the screen either way.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> (bool, String) {
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            last = self.screen();
            last.contains(text)
        });
        (ok, last)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// A file of `len` pseudo-random bytes (fast xorshift; incompressible enough for transfer
/// tests).
pub fn random_file(path: &Path, len: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ len as u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    f.flush().expect("flush");
}

/// Whether two files hold the same bytes.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Presents the fuzzer's crash input (fuzz/corpus/ssh_cert/regress-unknown-key-algorithm)
/// and a variant with a name to `device` through `tsh proxy ssh`; one result line each
/// (tests/peers/ssh-crafted-cert.py).
pub fn crafted_cert_attempts(tsh: &Tsh, device: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("../fuzz/corpus/ssh_cert/regress-unknown-key-algorithm");
    // Valid from 0 to forever, so that russh's validity check lets it through to the
    // signature check (the fuzzer's input has a window far in the future).
    let mut bytes = std::fs::read(&corpus).expect("the fuzz corpus");
    let at = cert_validity_offset(&bytes);
    bytes[at..at + 8].fill(0);
    bytes[at + 8..at + 16].fill(0xff);
    let crash = tsh.home.join("crafted-cert");
    std::fs::write(&crash, &bytes).expect("write the crafted certificate");
    // The same with a name: "x-cert-v01@..." decodes as an algorithm nobody knows.
    bytes[3] += 1;
    bytes.insert(4, b'x');
    let named = tsh.home.join("crafted-named-cert");
    std::fs::write(&named, bytes).expect("write the crafted certificate");
    let proxy = format!(
        "env TSH_HOME='{}' '{}' --proxy {} proxy ssh root@{device}:22",
        tsh.home.display(),
        bin("tsh").display(),
        tsh.proxy
    );
    [crash, named]
        .iter()
        .map(|cert| {
            let mut cmd = Command::new("/usr/bin/python3");
            cmd.arg(root.join("peers/ssh-crafted-cert.py"))
                .arg(&proxy)
                .arg("root")
                .arg(cert);
            let r = run(cmd, None, Duration::from_secs(90)).expect_ok("ssh-crafted-cert.py");
            r.stdout().trim().to_string()
        })
        .collect()
}

/// Where valid_after is in an OpenSSH certificate whose key is one opaque string (an
/// algorithm ssh-key does not know): after the type, nonce and key strings, the serial and
/// type integers, and the key id and principals strings.
fn cert_validity_offset(cert: &[u8]) -> usize {
    let skip_string = |at: usize| {
        let len = cert[at..at + 4]
            .try_into()
            .map(u32::from_be_bytes)
            .expect("a length");
        at + 4 + len as usize
    };
    let mut at = 0;
    for _ in 0..3 {
        at = skip_string(at);
    }
    at += 8 + 4;
    for _ in 0..2 {
        at = skip_string(at);
    }
    at
}
