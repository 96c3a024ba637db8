//! The device install bundle (cross/bundle): the install script is idempotent, keeps the
//! configuration private, and the systemd unit passes `systemd-analyze verify`.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::{bin, run, TempDir};

fn bundle_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cross/bundle")
}

/// path -> (mode, contents or link target) for everything under `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, (0, t.display().to_string().into_bytes()));
            } else if meta.is_dir() {
                out.insert(rel, (mode, vec![]));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn install(root: &Path, args: &[&str]) {
    let mut c = Command::new("sh");
    c.arg(bundle_dir().join("install.sh"))
        .arg(bin("edge-agent"))
        .args(args)
        .env("ROOT", root);
    run(c, None, Duration::from_secs(60)).expect_ok("install.sh");
}

#[test]
fn install_is_idempotent_and_private() {
    let tmp = TempDir::new();
    let root = tmp.join("rootfs");
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(root.join("etc/init.d")).unwrap();
    let cfg = [
        "--gateway",
        "gw.example.com:3080",
        "--token",
        "tok123",
        "--ca-pin",
        "sha256:00",
        "--id",
        "van-42",
        "--labels",
        "fleet=vans",
    ];
    install(&root, &cfg);
    let first = snapshot(&root);
    install(&root, &cfg);
    assert_eq!(first, snapshot(&root), "a second install changed the tree");

    // Without new values, the existing configuration is kept.
    install(&root, &[]);
    let env = std::fs::read_to_string(root.join("etc/edgeport/agent.env")).unwrap();
    assert!(env.contains("EDGEPORT_TOKEN=tok123"), "{env}");
    assert!(env.contains("EDGEPORT_DEVICE_ID=van-42"), "{env}");

    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/edgeport/agent.env"), 0o600);
    assert_eq!(mode("etc/edgeport"), 0o700);
    assert_eq!(mode("var/lib/edgeport"), 0o700);
    assert_eq!(mode("usr/local/bin/edge-agent"), 0o755);
    assert!(root.join("etc/init.d/edgeport-agent").exists());
    assert!(root
        .join("etc/systemd/system/multi-user.target.wants/edgeport-agent.service")
        .exists());

    // The SysV script and the runner are valid shell.
    for f in ["etc/init.d/edgeport-agent", "usr/local/bin/edge-agent-run"] {
        let mut c = Command::new("sh");
        c.arg("-n").arg(root.join(f));
        run(c, None, Duration::from_secs(10)).expect_ok(f);
    }
}

#[test]
fn systemd_unit_verifies() {
    let Ok(found) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: skipping the unit check");
        return;
    };
    assert!(found.status.success());
    let tmp = TempDir::new();
    let root = tmp.join("rootfs");
    // The unit's dependencies (multi-user.target, network-online.target) come from the host.
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let mut cp = Command::new("cp");
    cp.args(["-r", "/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/"));
    run(cp, None, Duration::from_secs(30)).expect_ok("copy host units");
    install(&root, &[]);
    let unit = root.join("etc/systemd/system/edgeport-agent.service");
    let mut c = Command::new("systemd-analyze");
    c.arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(&unit);
    let r = run(c, None, Duration::from_secs(60)).expect_ok("systemd-analyze verify");
    assert!(
        r.stderr().trim().is_empty() && r.stdout().trim().is_empty(),
        "systemd-analyze verify complained:\n{}{}",
        r.stdout(),
        r.stderr()
    );
}

/// `tctl tokens add --agent-env` prints a device's agent.env; an agent started with exactly
/// those variables (the systemd unit's EnvironmentFile) joins and shows up with its labels.
#[test]
fn agent_env_from_tctl_joins_a_device() {
    use edgeport_e2e::fabric::{wait_online, Gateway, Tctl};
    use edgeport_e2e::{Authority, Proc};
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "edge");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let r = auth.tctl(&[
        "tokens",
        "add",
        "--type",
        "device",
        "--labels",
        "fleet=vans",
        "--agent-env",
        "--gateway",
        &gw.addr,
        "--device-id",
        "van-env",
    ]);
    let text = r.expect_ok("tctl tokens add --agent-env").stdout();
    let vars: BTreeMap<String, String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(vars["EDGEPORT_GATEWAY"], gw.addr, "{text}");
    assert_eq!(vars["EDGEPORT_LABELS"], "fleet=vans", "{text}");
    assert_eq!(vars["EDGEPORT_CA_PIN"], gw.ca_pin, "{text}");
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.arg("start").env_clear().env("PATH", "/usr/bin:/bin");
    for (k, v) in &vars {
        cmd.env(k, v);
    }
    // The data dir of the file is the device's; this test keeps its own.
    cmd.env("EDGEPORT_DATA_DIR", tmp.join("agent"));
    let agent = Proc::spawn("agent-env", cmd, tmp.path());
    let d = wait_online(Tctl::of(&auth), "van-env", None, Duration::from_secs(60));
    assert_eq!(d["labels"]["fleet"], "vans");
    drop(agent);
}

/// The clients' installer puts tsh and tctl in PREFIX/bin with bash completions that load
/// (bash is on every machine that runs these tests), and running it again changes nothing.
#[test]
fn client_install_brings_completions() {
    let tmp = TempDir::new();
    let root = tmp.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    let install = || {
        let mut c = Command::new("sh");
        c.arg(bundle_dir().join("install-clients.sh"))
            .arg(bin("tsh"))
            .arg(bin("tctl"))
            .env("ROOT", &root)
            .env("PREFIX", "/usr/local");
        run(c, None, Duration::from_secs(60)).expect_ok("install-clients.sh");
    };
    install();
    let first = snapshot(&root);
    for prog in ["tsh", "tctl"] {
        let (mode, _) = &first[&format!("usr/local/bin/{prog}")];
        assert_eq!(mode & 0o777, 0o755, "{prog}");
        let completion = root.join(format!(
            "usr/local/share/bash-completion/completions/{prog}"
        ));
        let mut c = Command::new("bash");
        c.arg("-c").arg(format!(
            "source {} && complete -p {prog}",
            completion.display()
        ));
        let r = run(c, None, Duration::from_secs(10)).expect_ok("load the completion");
        assert!(
            r.stdout().contains(&format!("-F _{prog} {prog}")),
            "{}",
            r.stdout()
        );
    }
    install();
    assert_eq!(snapshot(&root), first, "a second install changed something");
}
