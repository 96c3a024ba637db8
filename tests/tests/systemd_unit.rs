//! The systemd path of the device bundle (#24), run for real: the UNCHANGED
//! `cross/bundle/edgeport-agent.service` under a real systemd (PID 1 of a `systemd-nspawn`
//! container, package systemd-container), with a real authority and gateway on the host.
//!
//! The container is built so that nothing in it can act on the host:
//! - its root is a fresh, read-only directory of this test (`--read-only`) holding only
//!   `os-release` and mount points; the host's `/usr` is bound read-only, `/etc` is an
//!   overlay whose writable upper layer is a directory of this test (the unit, a test target
//!   and `/etc/edgeport/agent.env` are put there), `/var` and `/tmp` are the container's own
//!   tmpfs, and `/usr/local/bin` is bound read-write to a directory of this test holding the
//!   agent (the unit's `ExecStart=/usr/local/bin/edge-agent start`; updates rewrite it);
//! - systemd boots `systemd.unit=edgeport-test.target` (which only `Wants=` the agent's
//!   unit), so only that and the basic sysinit units start, never the host's default target;
//! - `--register=no --keep-unit`: no machined, no host systemd involved;
//! - the network is a namespace of this test (`10.219.X.0/24` on a veth pair; the gateway
//!   listens on the root end), removed on drop like the container (SIGTERM to nspawn, which
//!   shuts systemd down; SIGKILL of the container's PID 1 as a last resort).
//!
//! What it checks:
//! 1. systemd starts the agent, which joins and comes online; `tsh ssh` to it runs a command
//!    (whose PID 1 is systemd);
//! 2. after `kill -9` of the agent's main process, systemd restarts it (`Restart=always`,
//!    `NRestarts` goes up) and it comes back online;
//! 3. `tctl devices update` with a good binary switches: the device is online on the new
//!    hash, and systemd still supervises the same main PID (the agent executes the new
//!    binary in place), the unit active, no restart;
//! 4. an update to a bundle that never comes online is rolled back: the watchdog puts the
//!    previous binary back and kills the new one, systemd starts the previous binary again
//!    (`NRestarts` goes up), the device is online on the previous hash, the rollback audited.
//!
//! Needs root (network namespaces, veth pairs, nspawn).

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Gateway};
use edgeport_e2e::ssh::Tsh;
use edgeport_e2e::{bin, parse_env, run, wait_until, Authority, Proc, Run, TempDir};
use edgeport_proto::keys::sha256_hex;

const NSPAWN: &str = "/usr/bin/systemd-nspawn";
const UNIT: &str = "edgeport-agent.service";
const PW: &str = "correct horse battery";
const ID: &str = "sd-1";

static N: AtomicUsize = AtomicUsize::new(0);

fn bundle(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../cross/bundle")
        .join(name)
}

fn short(bytes: &[u8]) -> String {
    sha256_hex(bytes)[..16].to_string()
}

fn running_hash(auth: &Authority, id: &str) -> Option<String> {
    let v = auth.tctl_ok(&["devices", "ls", "--format", "json"]).json();
    v.as_array()?
        .iter()
        .find(|d| d["id"] == id && d["online"] == true)
        .and_then(|d| d["binary_sha256"].as_str().map(str::to_string))
}

fn tctl_update(auth: &Authority, id: &str, bundle: &Path, rollback: &str) -> Run {
    let mut c = auth.tctl_cmd();
    c.args([
        "devices",
        "update",
        "--labels",
        &format!("id={id}"),
        "--bundle",
    ])
    .arg(bundle)
    .args(["--rollback-after", rollback]);
    run(c, None, Duration::from_secs(300))
}

/// Runs `ip ARGS` (in the root namespace); panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let mut c = Command::new("ip");
    c.args(args);
    let r = run(c, None, Duration::from_secs(30));
    assert!(
        r.ok(),
        "`ip {}` failed: {}\n(this test needs root or CAP_NET_ADMIN: network namespaces and \
         veth pairs)",
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

#[allow(unsafe_code)]
fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a plain PID and signal number touches no memory of ours.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The device's network: a namespace whose `host0` is one end of a veth pair
/// (`10.219.X.2/24`); the other end (`10.219.X.1/24`) is in the root namespace, where the
/// gateway listens. X is claimed under a lock, so parallel runs never share a subnet.
/// Removed on drop.
struct Net {
    ns: String,
    link: String,
    x: u8,
}

impl Net {
    fn up() -> Self {
        let tag = format!(
            "{:x}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut me = Self {
            ns: format!("epsd-{tag}"),
            link: format!("esd{tag}"),
            x: 0,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/edgeport-systemd-unit.lock")
            .expect("lock file in /run (this test needs root)");
        lock_file(&lock);
        let mut show = Command::new("ip");
        show.args(["-o", "-4", "addr", "show"]);
        let used = run(show, None, Duration::from_secs(30))
            .expect_ok("ip addr show")
            .stdout();
        me.x = (0..=255u8)
            .find(|x| !used.contains(&format!(" 10.219.{x}.1/")))
            .expect("a free 10.219.X.0/24 (256 in use: leftovers of killed runs?)");
        let x = me.x;
        ip(&["netns", "add", &me.ns]);
        ip(&[
            "link", "add", &me.link, "type", "veth", "peer", "name", "host0", "netns", &me.ns,
        ]);
        ip(&["addr", "add", &format!("10.219.{x}.1/24"), "dev", &me.link]);
        drop(lock);
        ip(&["link", "set", &me.link, "up"]);
        ip(&["-n", &me.ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &me.ns,
            "addr",
            "add",
            &format!("10.219.{x}.2/24"),
            "dev",
            "host0",
        ]);
        ip(&["-n", &me.ns, "link", "set", "host0", "up"]);
        me
    }

    /// The gateway's address: the root end of the veth pair.
    fn gateway_host(&self) -> String {
        format!("10.219.{}.1", self.x)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["link", "del", &self.link]);
        quiet(&["netns", "del", &self.ns]);
    }
}

/// systemd booted in a `systemd-nspawn` container (see the module comment), the agent's
/// unit installed. Shut down on drop.
struct Container {
    nspawn: Proc,
    /// The container's PID 1 (systemd), as seen from the host.
    pid1: u32,
    /// Over the container's /usr/local/bin: the agent binary (and its `.prev`).
    bin_dir: PathBuf,
    machine: String,
}

impl Container {
    fn boot(dir: &Path, net: &Net, env: &str) -> Self {
        let root = dir.join("root");
        for d in [
            "usr/lib", "etc", "var", "dev", "proc", "sys", "run", "tmp", "root",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (link, to) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/sbin"),
        ] {
            std::os::unix::fs::symlink(to, root.join(link)).unwrap();
        }
        // nspawn refuses a root without os-release.
        std::fs::copy("/usr/lib/os-release", root.join("usr/lib/os-release")).unwrap();

        // The writable layer of /etc: the unit as shipped, a target that wants it, agent.env.
        let etc = dir.join("etc-upper");
        let units = etc.join("systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::copy(bundle(UNIT), units.join(UNIT)).unwrap();
        std::fs::write(
            units.join("edgeport-test.target"),
            format!("[Unit]\nDescription=Edgeport systemd unit test\nWants={UNIT}\n"),
        )
        .unwrap();
        let edgeport = etc.join("edgeport");
        std::fs::create_dir_all(&edgeport).unwrap();
        std::fs::set_permissions(&edgeport, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(edgeport.join("agent.env"), env).unwrap();
        std::fs::set_permissions(
            edgeport.join("agent.env"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();

        let bin_dir = dir.join("usr-local-bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::copy(bin("edge-agent"), bin_dir.join("edge-agent")).unwrap();
        std::fs::set_permissions(
            bin_dir.join("edge-agent"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();

        let mut c = Command::new(NSPAWN);
        c.arg("--quiet")
            .arg("-D")
            .arg(&root)
            .args([
                "--read-only",
                "--tmpfs=/var",
                "--register=no",
                "--keep-unit",
                &format!("--machine={}", net.ns),
                &format!("--network-namespace-path=/run/netns/{}", net.ns),
                "--bind-ro=/usr",
            ])
            .arg(format!("--bind={}:/usr/local/bin", bin_dir.display()))
            .arg(format!("--overlay=/etc:{}:/etc", etc.display()))
            .args(["--boot", "--", "systemd.unit=edgeport-test.target"]);
        let nspawn = Proc::spawn("systemd-nspawn", c, dir);
        let mut me = Self {
            nspawn,
            pid1: 0,
            bin_dir,
            machine: net.ns.clone(),
        };
        let found = wait_until(Duration::from_secs(60), || {
            me.pid1 = pid1_of(me.nspawn.pid()).unwrap_or(0);
            me.pid1 != 0 || !me.nspawn.alive()
        });
        assert!(
            found && me.pid1 != 0,
            "the container did not start:\n{}",
            me.nspawn.log_text()
        );
        // systemd answers (and has loaded the agent's unit).
        let up = wait_until(Duration::from_secs(120), || {
            me.unit().get("LoadState").is_some_and(|s| s == "loaded")
        });
        assert!(
            up,
            "systemd in the container does not answer:\n{}",
            me.nspawn.log_text()
        );
        me
    }

    /// `ARGS` run in the container's mount and PID namespaces (so `systemctl` talks to the
    /// container's systemd, `kill` sees its processes). Ended by `timeout` after 50 s, so
    /// that this never panics (it also runs in `drop`).
    fn exec(&self, args: &[&str]) -> Run {
        let mut c = Command::new("timeout");
        c.args(["50", "nsenter", "--target", &self.pid1.to_string()])
            .args(["--mount", "--pid", "--"])
            .args(args);
        run(c, None, Duration::from_secs(90))
    }

    /// The agent unit's state: `ActiveState`, `SubState`, `MainPID`, `NRestarts`,
    /// `LoadState` (empty when systemd does not answer yet).
    fn unit(&self) -> HashMap<String, String> {
        let r = self.exec(&[
            "/usr/bin/systemctl",
            "show",
            "-p",
            "ActiveState,SubState,MainPID,NRestarts,LoadState",
            UNIT,
        ]);
        if r.ok() {
            parse_env(&r.stdout())
        } else {
            HashMap::new()
        }
    }

    fn main_pid(&self) -> u32 {
        self.unit()
            .get("MainPID")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    fn restarts(&self) -> u32 {
        self.unit()
            .get("NRestarts")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    fn is_active(&self) -> String {
        self.exec(&["/usr/bin/systemctl", "is-active", UNIT])
            .stdout()
            .trim()
            .to_string()
    }

    /// The agent unit's journal (for failure messages).
    fn journal(&self) -> String {
        let r = self.exec(&["/usr/bin/journalctl", "--no-pager", "-n", "150", "-u", UNIT]);
        format!("{}{}", r.stdout(), r.stderr())
    }

    fn binary(&self) -> Vec<u8> {
        std::fs::read(self.bin_dir.join("edge-agent")).unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() && self.pid1 != 0 {
            eprintln!("----- journal of {UNIT} in the container -----");
            eprintln!("{}", self.journal());
        }
        // SIGTERM: nspawn asks systemd to shut down (stopping the agent) and exits with it.
        self.nspawn.signal(libc::SIGTERM);
        let down = wait_until(Duration::from_secs(90), || !self.nspawn.alive());
        if !down && self.pid1 != 0 {
            // Ends every process in the container's PID namespace.
            kill(self.pid1, libc::SIGKILL);
        }
        self.nspawn.kill9();
        // nspawn's mount propagation directory, which it may fail to remove when the host's
        // /run is not a tmpfs.
        let _ = std::fs::remove_dir(Path::new("/run/systemd/nspawn/propagate").join(&self.machine));
    }
}

/// Fails (never skips) without systemd-nspawn, naming the package.
fn need_nspawn() {
    assert!(
        Path::new(NSPAWN).exists(),
        "{NSPAWN} is missing: install Debian's systemd-container package (.ci/run does); \
         this test boots the agent's systemd unit in a container"
    );
}

/// The container's PID 1: the child of `nspawn` that is PID 1 of its own PID namespace.
fn pid1_of(nspawn: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let ppid = field("PPid:");
        let nspid = field("NSpid:");
        if ppid.first() == Some(&nspawn.to_string().as_str())
            && nspid.len() > 1
            && nspid.last() == Some(&"1")
        {
            return Some(pid);
        }
    }
    None
}

#[test]
fn the_shipped_unit_supervises_the_agent_through_kills_updates_and_rollbacks() {
    need_nspawn();
    let tmp = TempDir::new();
    let net = Net::up();
    let auth = Authority::start(&tmp.join("auth"), "edge");
    let gw = Gateway::start_on(&tmp.join("gw"), &auth, &net.gateway_host(), &[]);
    let (token, pin) = gw.device_token("");
    // What install.sh writes.
    let env = format!(
        "EDGEPORT_GATEWAY={}\nEDGEPORT_TOKEN={token}\nEDGEPORT_CA_PIN={pin}\n\
         EDGEPORT_DATA_DIR=/var/lib/edgeport\nEDGEPORT_DEVICE_ID={ID}\nEDGEPORT_LABELS=fleet=sd,id={ID}\n",
        gw.addr
    );
    let ct_dir = tmp.join("device");
    std::fs::create_dir_all(&ct_dir).unwrap();
    let ct = Container::boot(&ct_dir, &net, &env);
    let old = ct.binary();

    // 1. systemd starts the agent; it joins and serves SSH.
    let online = wait_until(Duration::from_secs(180), || {
        running_hash(&auth, ID).is_some()
    });
    assert!(
        online,
        "the agent did not come online under systemd; unit {:?}\n{}",
        ct.unit(),
        ct.journal()
    );
    assert_eq!(running_hash(&auth, ID), Some(short(&old)));
    assert_eq!(ct.is_active(), "active");
    auth.add_user("alice", "root", PW);
    let alice = Tsh::new(tmp.join("tsh-alice"), &gw.addr);
    alice
        .login("alice", PW, &gw.ca_pin, &[])
        .expect_ok("tsh login alice");
    // `tsh ssh` runs a command on the device: in the container, whose PID 1 is systemd.
    // Retried for a while: after a restart, the gateway may still hold the killed process's
    // tunnel until it notices it is gone.
    let ssh_ok = |what: &str| {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(120), || {
            let r = alice.run(
                &[
                    "ssh",
                    &format!("root@{ID}"),
                    "echo",
                    &format!("{what}-$((6*7))"),
                    "$(cat /proc/1/comm)",
                ],
                None,
            );
            let done = r.ok();
            last = Some(r);
            done
        });
        let r = last.unwrap();
        assert!(ok, "{what}: tsh ssh: {}\n{}", r.stderr(), ct.journal());
        assert_eq!(r.stdout().trim(), format!("{what}-42 systemd"), "{what}");
    };
    ssh_ok("first");

    // 2. kill -9 of the agent: systemd starts it again and it comes back online.
    let pid = ct.main_pid();
    assert!(pid > 1, "{:?}", ct.unit());
    let before = ct.restarts();
    ct.exec(&["/usr/bin/kill", "-9", &pid.to_string()])
        .expect_ok("kill -9 the agent");
    let restarted = wait_until(Duration::from_secs(120), || {
        let u = ct.unit();
        u.get("ActiveState").is_some_and(|s| s == "active")
            && u.get("NRestarts")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > before)
            && u.get("MainPID")
                .is_some_and(|p| p != "0" && *p != pid.to_string())
    });
    assert!(
        restarted,
        "systemd did not restart the killed agent: {:?}\n{}",
        ct.unit(),
        ct.journal()
    );
    wait_online(&auth, ID, None, Duration::from_secs(120));
    ssh_ok("restarted");
    assert_eq!(running_hash(&auth, ID), Some(short(&old)));

    // 3. A good update switches in place: same main PID, still active, no restart.
    let mut new = old.clone();
    new.extend_from_slice(b"\nedgeport systemd update test\n");
    let new_path = tmp.join("edge-agent-new");
    std::fs::write(&new_path, &new).unwrap();
    let pid = ct.main_pid();
    let before = ct.restarts();
    // A generous deadline: moving a 40 MB debug build through the authority and the gateway
    // on a loaded 2-core machine takes a while.
    let r = tctl_update(&auth, ID, &new_path, "180s");
    assert!(r.ok(), "{}\n{}\n{}", r.stdout(), r.stderr(), ct.journal());
    assert!(
        r.stdout().contains(&format!("{ID}: done")),
        "{}",
        r.stdout()
    );
    assert_eq!(running_hash(&auth, ID), Some(short(&new)));
    assert_eq!(ct.binary(), new);
    assert_eq!(
        std::fs::read(ct.bin_dir.join("edge-agent.prev")).unwrap(),
        old
    );
    assert_eq!(ct.is_active(), "active", "{}", ct.journal());
    assert_eq!(
        ct.main_pid(),
        pid,
        "the agent executes the new binary in place: systemd keeps its main PID"
    );
    assert_eq!(ct.restarts(), before, "{}", ct.journal());
    ssh_ok("updated");

    // 4. A bundle that never comes online is rolled back; systemd starts the previous one.
    let bad = b"#!/bin/sh\nexec sleep 600\n".to_vec();
    let bad_path = tmp.join("edge-agent-bad");
    std::fs::write(&bad_path, &bad).unwrap();
    let before = ct.restarts();
    let r = tctl_update(&auth, ID, &bad_path, "5s");
    assert!(!r.ok(), "a rolled-back update fails: {}", r.stdout());
    assert!(
        r.stdout().contains(&format!("{ID}: rolled back")),
        "{}",
        r.stdout()
    );
    let back = wait_until(Duration::from_secs(120), || {
        running_hash(&auth, ID) == Some(short(&new))
    });
    assert!(
        back,
        "systemd did not start the previous binary again: {:?}\n{}",
        ct.unit(),
        ct.journal()
    );
    assert_eq!(ct.binary(), new, "the previous binary is back in place");
    let supervised = wait_until(Duration::from_secs(60), || {
        ct.is_active() == "active" && ct.restarts() > before
    });
    assert!(
        supervised,
        "the rollback's restart is systemd's: {:?}\n{}",
        ct.unit(),
        ct.journal()
    );
    let audited = wait_until(Duration::from_secs(60), || {
        let ev = auth
            .tctl_ok(&[
                "audit",
                "search",
                "--type",
                "agent.update_rollback",
                "--format",
                "json",
            ])
            .json();
        ev.as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["device"] == ID && e["refused_sha256"] == sha256_hex(&bad))
        })
    });
    assert!(audited, "the rollback is in {ID}'s audit chain");
    ssh_ok("rolled-back");
}
