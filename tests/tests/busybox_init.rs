//! The BusyBox init path of the device bundle (#24), run for real: the UNCHANGED
//! `cross/bundle/edge-agent-run` and `cross/bundle/edgeport-agent.init` under Debian's
//! `busybox sh` (its `start-stop-daemon` applet too), in a private mount and PID namespace
//! (`unshare`, as root) where temp dirs are bind-mounted over `/usr/local/bin`,
//! `/etc/edgeport` and `/run`, so the scripts' fixed paths resolve to this test's files.
//! Killing the namespace's first process ends everything in it.
//!
//! - An update to a bundle that never comes online is rolled back: the watchdog puts the
//!   previous binary back and kills the new one, the run script's loop starts the previous
//!   binary again (the device is online on the old hash, the rollback audited); a good update
//!   then switches.
//! - The init script starts the agent (online), reports `status`, and `stop` ends it.

// Test code: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_offline, wait_online, Gateway};
use edgeport_e2e::{bin, run, wait_until, Authority, Proc, Run, TempDir};
use edgeport_proto::keys::sha256_hex;

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

/// A device's root: `bin` (over /usr/local/bin: the agent and the run script), `etc` (over
/// /etc/edgeport: agent.env), `run` (over /run), `sbin` (BusyBox applets first in PATH).
struct Device {
    root: PathBuf,
}

impl Device {
    fn new(root: &Path, gw: &Gateway, id: &str) -> Self {
        assert!(
            Path::new("/usr/bin/busybox").exists(),
            "Debian's busybox package is needed (.ci/run installs it)"
        );
        for d in ["bin", "etc", "run", "sbin", "data"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(bin("edge-agent"), root.join("bin/edge-agent")).unwrap();
        std::fs::copy(bundle("edge-agent-run"), root.join("bin/edge-agent-run")).unwrap();
        for applet in ["start-stop-daemon", "sh", "sleep", "cat", "kill", "rm"] {
            std::os::unix::fs::symlink("/usr/bin/busybox", root.join("sbin").join(applet)).unwrap();
        }
        let (token, pin) = gw.device_token("");
        let env = format!(
            "EDGEPORT_GATEWAY={}\nEDGEPORT_TOKEN={token}\nEDGEPORT_CA_PIN={pin}\n\
             EDGEPORT_DATA_DIR={}\nEDGEPORT_DEVICE_ID={id}\nEDGEPORT_LABELS=fleet=bb,id={id}\n",
            gw.addr,
            root.join("data").display()
        );
        std::fs::write(root.join("etc/agent.env"), env).unwrap();
        // The mount point for /etc/edgeport (what install.sh creates).
        std::fs::create_dir_all("/etc/edgeport").unwrap();
        Self {
            root: root.to_path_buf(),
        }
    }

    /// `unshare` running `then` under busybox sh once the bind mounts are in place; the
    /// namespace dies with it (`--kill-child`).
    fn namespace(&self, then: &str) -> Command {
        let r = self.root.display();
        let script = format!(
            "set -e; mount --bind {r}/bin /usr/local/bin; mount --bind {r}/etc /etc/edgeport; \
             mount --bind {r}/run /run; export PATH={r}/sbin:/usr/sbin:/usr/bin:/sbin:/bin; \
             exec /usr/bin/busybox sh -c '{then}'"
        );
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child=SIGKILL",
            "sh",
            "-c",
            &script,
        ]);
        c
    }

    fn binary(&self) -> Vec<u8> {
        std::fs::read(self.root.join("bin/edge-agent")).unwrap()
    }
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

#[test]
fn the_run_script_brings_back_the_previous_binary_and_a_good_update_switches() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "edge");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let dev = Device::new(&tmp.join("bb-1"), &gw, "bb-1");
    let old = dev.binary();
    let _init = Proc::spawn(
        "busybox-run",
        dev.namespace("exec sh /usr/local/bin/edge-agent-run"),
        &tmp.path().join("bb-1"),
    );
    wait_online(&auth, "bb-1", None, Duration::from_secs(60));
    assert_eq!(running_hash(&auth, "bb-1"), Some(short(&old)));

    // A signed bundle that never brings a tunnel up.
    let bad = b"#!/bin/sh\nexec sleep 600\n".to_vec();
    let bad_path = tmp.join("edge-agent-bad");
    std::fs::write(&bad_path, &bad).unwrap();
    let r = tctl_update(&auth, "bb-1", &bad_path, "5s");
    assert!(!r.ok(), "a rolled-back update fails: {}", r.stdout());
    assert!(r.stdout().contains("bb-1: rolled back"), "{}", r.stdout());
    let back = wait_until(Duration::from_secs(60), || {
        running_hash(&auth, "bb-1") == Some(short(&old))
    });
    assert!(
        back,
        "the run script's loop started the previous binary again"
    );
    assert_eq!(dev.binary(), old, "the previous binary is back in place");
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
                .any(|e| e["device"] == "bb-1" && e["refused_sha256"] == sha256_hex(&bad))
        })
    });
    assert!(audited, "the rollback is in bb-1's audit chain");

    // A good update switches.
    let mut new = old.clone();
    new.extend_from_slice(b"\nedgeport busybox update test\n");
    let new_path = tmp.join("edge-agent-new");
    std::fs::write(&new_path, &new).unwrap();
    // A generous deadline: tctl waits for it (plus 90 s), and moving a 40 MB debug build
    // through the authority and the gateway on a loaded 2-core machine takes a while.
    let r = tctl_update(&auth, "bb-1", &new_path, "180s");
    assert!(r.ok(), "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("bb-1: done"), "{}", r.stdout());
    assert_eq!(running_hash(&auth, "bb-1"), Some(short(&new)));
    assert_eq!(dev.binary(), new);
    assert_eq!(
        std::fs::read(tmp.join("bb-1/bin/edge-agent.prev")).unwrap(),
        old
    );
}

#[test]
fn the_init_script_starts_reports_and_stops_the_agent() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "edge");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let dev = Device::new(&tmp.join("bb-2"), &gw, "bb-2");
    let init = bundle("edgeport-agent.init");
    let init = init.display();
    let st = tmp.join("bb-2/status");
    let st = st.display();
    // The namespace's first process drives the script: start, status, then stop once the
    // test has seen the device online (it creates `go-stop`), status again.
    let go = tmp.join("bb-2/go-stop");
    let steps = format!(
        "sh {init} start; sh {init} status > {st}.1; echo $? >> {st}.1; \
         while [ ! -e {go} ]; do sleep 0.2; done; \
         sh {init} stop; sh {init} status > {st}.2; echo $? >> {st}.2; \
         exec sleep 600",
        go = go.display()
    );
    let _ns = Proc::spawn("busybox-init", dev.namespace(&steps), &tmp.join("bb-2"));
    wait_online(&auth, "bb-2", None, Duration::from_secs(60));
    let first = tmp.join("bb-2/status.1");
    let reported = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&first).is_ok_and(|s| s.lines().count() == 2)
    });
    assert!(reported);
    let s = std::fs::read_to_string(&first).unwrap();
    assert_eq!(s, "edgeport-agent is running\n0\n", "{s}");
    let pid: String = std::fs::read_to_string(tmp.join("bb-2/run/edgeport-agent.pid")).unwrap();
    assert!(pid.trim().parse::<u32>().is_ok(), "{pid:?}");

    std::fs::write(&go, b"").unwrap();
    wait_offline(&auth, "bb-2", Duration::from_secs(60));
    let second = tmp.join("bb-2/status.2");
    let reported = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&second).is_ok_and(|s| s.lines().count() == 2)
    });
    assert!(reported);
    let s = std::fs::read_to_string(&second).unwrap();
    assert_eq!(s, "edgeport-agent is not running\n3\n", "{s}");
    assert!(!tmp.join("bb-2/run/edgeport-agent.pid").exists());
}
