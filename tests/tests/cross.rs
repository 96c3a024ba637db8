//! The agent on device architectures (issue 7): `cross/check-size` builds the static aarch64
//! (musl) and armv7 (static glibc) agents and checks each is a static ELF of its architecture
//! under the size budget; each then runs under qemu user mode, joins a native authority and
//! gateway on loopback, shows up online in `tctl devices ls` with its own architecture, and
//! serves SSH (`uname -m` prints the host's machine under qemu user mode, so the architecture
//! is checked in the inventory; `id -un` and `$HOME` check the NSS-free account lookup).
//!
//! It installs what it needs (rustup targets, Debian cross compilers, qemu-user-static); when
//! they are missing and cannot be installed (no network), it says so loudly and skips.
//! Builds are cached in target/ (first run: several minutes; later runs: seconds).

// Test code: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Gateway};
use edgeport_e2e::ssh::{crafted_cert_attempts, Tsh};
use edgeport_e2e::{run, Authority, Proc, TempDir};

const PW: &str = "correct horse battery staple";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cross/check-size ARCH`: the binary's path, or None (skip) when the toolchain could not
/// be installed.
fn build(arch: &str) -> Option<PathBuf> {
    let mut c = Command::new(root().join("cross/check-size"));
    c.arg(arch);
    let r = run(c, None, Duration::from_secs(3600));
    if !r.ok() {
        let err = r.stderr();
        let no_net = err.contains("Temporary failure resolving")
            || err.contains("Could not resolve")
            || err.contains("Unable to locate package")
            || err.contains("error sending request")
            || err.contains("could not download");
        if no_net {
            eprintln!(
                "\n*** SKIPPED: the {arch} cross toolchain is not installed and cannot be \
                 downloaded (no network) ***\n{err}"
            );
            return None;
        }
        panic!("cross/check-size {arch} failed:\n{}\n{err}", r.stdout());
    }
    let out = r.stdout();
    assert!(out.contains("SIZE_OK"), "{out}");
    Some(PathBuf::from(out.lines().last().expect("path").trim()))
}

/// qemu-user-static, installed if missing; None (skip) without network.
fn qemu(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin").join(name);
    if p.exists() {
        return Some(p);
    }
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends qemu-user-static",
    ]);
    let r = run(c, None, Duration::from_secs(900));
    if !p.exists() {
        eprintln!(
            "\n*** SKIPPED: {name} is missing and qemu-user-static cannot be installed ***\n{}",
            r.stderr()
        );
        return None;
    }
    Some(p)
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process in seconds (100 ticks per second on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn start_agent(
    qemu: &Path,
    agent: &Path,
    dir: &Path,
    gateway: &str,
    gw: &Gateway,
    id: &str,
) -> Proc {
    let (token, pin) = gw.device_token("");
    let mut c = Command::new(qemu);
    c.arg(agent)
        .args(["start", "--data-dir"])
        .arg(dir.join(id))
        .args([
            "--gateway",
            gateway,
            "--token",
            &token,
            "--ca-pin",
            &pin,
            "--id",
            id,
        ]);
    Proc::spawn(id, c, dir)
}

#[test]
fn device_agents_under_qemu() {
    let targets = [
        ("aarch64", "qemu-aarch64-static", "dev-arm64", "aarch64"),
        ("armv7", "qemu-arm-static", "dev-arm", "arm"),
    ];
    let mut built = Vec::new();
    for (arch, q, id, reported) in targets {
        let Some(agent) = build(arch) else { return };
        let Some(qemu) = qemu(q) else { return };
        built.push((agent, qemu, id, reported));
    }

    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("authority"), "devices");
    let gw = Gateway::start(&tmp.join("gateway"), &auth);
    // aarch64 dials the gateway by address; armv7 by name through /etc/hosts (no NSS).
    let by_name = format!("localhost:{}", gw.port);
    let mut agents = Vec::new();
    for (i, (agent, qemu, id, _)) in built.iter().enumerate() {
        let addr = if i == 0 {
            gw.addr.clone()
        } else {
            by_name.clone()
        };
        agents.push(start_agent(qemu, agent, tmp.path(), &addr, &gw, id));
    }
    for (_, _, id, reported) in &built {
        let d = wait_online(&auth, id, None, Duration::from_secs(180));
        assert_eq!(d["arch"], *reported, "{id}: {d}");
    }
    let ls = auth.tctl_ok(&["devices", "ls"]).stdout();
    for (_, _, id, reported) in &built {
        let line = ls.lines().find(|l| l.contains(id)).expect("listed");
        assert!(line.contains(reported), "{ls}");
    }

    let mut c = auth.tctl_cmd();
    c.args([
        "users",
        "add",
        "ops",
        "--logins",
        "root",
        "--password-stdin",
    ]);
    run(
        c,
        Some(format!("{PW}\n").as_bytes()),
        Duration::from_secs(30),
    )
    .expect_ok("users add");
    let tsh = Tsh::new(tmp.join("tsh"), &gw.addr);
    tsh.login("ops", PW, &gw.ca_pin, &[]).expect_ok("tsh login");
    for (_, _, id, _) in &built {
        let r = tsh
            .run(
                &["ssh", &format!("root@{id}"), "uname -m; id -un; echo $HOME"],
                None,
            )
            .expect_ok(&format!("tsh ssh {id}"));
        let out = r.stdout();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(!lines[0].is_empty(), "{out}");
        assert_eq!(lines[1], "root", "{out}");
        assert_eq!(lines[2], "/root", "{out}");
    }

    // A crafted certificate in SSH authentication used to abort these builds (panic = "abort"
    // in the device profile; vendor/README.md). Refused, and the same process serves on.
    for (a, (_, _, id, _)) in agents.iter_mut().zip(&built) {
        for line in crafted_cert_attempts(&tsh, id) {
            assert_eq!(line, "refused", "{id}: agent log:\n{}", a.log_text());
        }
        assert!(a.alive(), "{id} died: {}", a.log_text());
        tsh.run(&["ssh", &format!("root@{id}"), "true"], None)
            .expect_ok(&format!("tsh ssh {id} after the crafted certificates"));
    }

    // Idle footprint under qemu (emulator included): reported, never asserted.
    std::thread::sleep(Duration::from_secs(2));
    let cpu0: Vec<f64> = agents.iter().map(|a| cpu_secs(a.pid())).collect();
    std::thread::sleep(Duration::from_secs(20));
    for ((a, c0), (_, _, id, _)) in agents.iter().zip(cpu0).zip(&built) {
        eprintln!(
            "{id}: idle under qemu: RSS {} KiB, CPU {:.2} s in 20 s",
            vm_rss_kib(a.pid()),
            cpu_secs(a.pid()) - c0
        );
    }
}
