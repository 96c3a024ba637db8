//! Safe agent updates (#24): `tctl devices update` ships a binary signed by the authority
//! over the tunnels. Each agent runs from its own copy of the binary; the "new" binary is the
//! same build with bytes appended (a valid ELF with another SHA-256). A canary of 1 of 3
//! devices goes first, then the rest, each back online on the new binary in the same
//! process (re-executed, same PID). A bundle that never comes online (a signed shell script
//! that sleeps) is rolled back by the watchdog within the deadline, audited, and the device
//! is back on its previous binary. (A tampered update is refused by the agent: the unit
//! tests of `edge-agent/src/update.rs` and `proto/src/update.rs`.) A device offline when
//! the update starts stays `pending` in the authority's store, survives an authority
//! restart, and gets the update when it comes online; `--status` shows each device's state.

// Test code: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_offline, wait_online, Gateway};
use edgeport_e2e::{bin, run, wait_until, Authority, Proc, Run, TempDir};
use edgeport_proto::keys::sha256_hex;
use serde_json::Value;

/// Kills, by SIGKILL, processes of ours whose command line names `dir` (an agent the
/// watchdog restarted is no child of the test).
struct Strays(PathBuf);

impl Drop for Strays {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        let me = std::process::id();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != me && String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

fn short(bytes: &[u8]) -> String {
    sha256_hex(bytes)[..16].to_string()
}

fn tctl_update(auth: &Authority, args: &[&str]) -> Run {
    let mut c = auth.tctl_cmd();
    c.args(["devices", "update"]).args(args);
    run(c, None, Duration::from_secs(300))
}

fn running_hash(auth: &Authority, id: &str) -> Option<String> {
    let v = auth.tctl_ok(&["devices", "ls", "--format", "json"]).json();
    v.as_array()?
        .iter()
        .find(|d| d["id"] == id && d["online"] == true)
        .and_then(|d| d["binary_sha256"].as_str().map(str::to_string))
}

/// Starts an agent from its own copy of the binary in `dir/bin`.
fn start_agent(dir: &Path, gw: &Gateway, id: &str, labels: &str) -> (Proc, PathBuf) {
    let exe = dir.join("bin/edge-agent");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(bin("edge-agent"), &exe).unwrap();
    let (token, pin) = gw.device_token("");
    let mut cmd = Command::new(&exe);
    cmd.args(["start", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--gateway", &gw.addr, "--token", &token, "--ca-pin", &pin])
        .args(["--id", id, "--labels", labels]);
    (Proc::spawn("edge-agent", cmd, dir), exe)
}

#[test]
fn canary_then_the_rest_and_a_bundle_that_never_comes_online_rolls_back() {
    let tmp = TempDir::new();
    let _strays = Strays(tmp.path().to_path_buf());
    let auth = Authority::start(&tmp.join("auth"), "edge");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let old = std::fs::read(bin("edge-agent")).unwrap();
    let mut agents = Vec::new();
    for (id, ring) in [("van-1", "a"), ("van-2", "b"), ("van-3", "b")] {
        let (proc, exe) = start_agent(&tmp.join(id), &gw, id, &format!("fleet=vans,ring={ring}"));
        agents.push((id, proc, exe));
    }
    for (id, _, _) in &agents {
        wait_online(&auth, id, None, Duration::from_secs(60));
        assert_eq!(running_hash(&auth, id), Some(short(&old)), "{id}");
    }
    let text = auth.tctl_ok(&["devices", "ls"]).stdout();
    assert!(
        text.contains("BINARY") && text.contains(&short(&old)),
        "{text}"
    );

    // The new binary: the same build with bytes appended.
    let mut new = old.clone();
    new.extend_from_slice(b"\nedgeport agent update test\n");
    let new_path = tmp.join("edge-agent-new");
    std::fs::write(&new_path, &new).unwrap();
    let pids: Vec<u32> = agents.iter().map(|(_, p, _)| p.pid()).collect();
    let r = tctl_update(
        &auth,
        &[
            "--labels",
            "fleet=vans",
            "--bundle",
            new_path.to_str().unwrap(),
            "--canary",
            "5%",
            "--rollback-after",
            "60s",
            "--format",
            "json",
        ],
    )
    .expect_ok("tctl devices update (canary)");
    let results = r.json();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 3, "{results:?}");
    for d in results {
        // docs/schemas/agent_update.schema.json: exactly these keys.
        let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 5, "{d}");
        for k in ["device", "canary", "state", "detail", "sha256"] {
            assert!(keys.contains(&k), "{k} in {d}");
        }
        assert_eq!(d["state"], "done", "{d}");
        assert_eq!(d["sha256"], sha256_hex(&new));
    }
    let canaries: Vec<&Value> = results.iter().filter(|d| d["canary"] == true).collect();
    assert_eq!(canaries.len(), 1, "ceil(5% of 3) = 1 canary: {results:?}");
    assert_eq!(canaries[0]["device"], "van-1");
    for ((id, proc, exe), pid) in agents.iter_mut().zip(&pids) {
        assert_eq!(running_hash(&auth, id), Some(short(&new)), "{id}");
        assert!(
            proc.alive(),
            "{id}: the agent re-executed itself in the same process"
        );
        assert_eq!(proc.pid(), *pid);
        assert_eq!(
            std::fs::read(&*exe).unwrap(),
            new,
            "{id}: new binary in place"
        );
        let prev = exe.with_file_name("edge-agent.prev");
        assert_eq!(
            std::fs::read(prev).unwrap(),
            old,
            "{id}: previous binary kept"
        );
    }
    // The canary went alone first: two signed orders, van-1's before the others'.
    let ev = auth
        .tctl_ok(&[
            "audit",
            "search",
            "--type",
            "agent.update",
            "--format",
            "json",
        ])
        .json();
    let mut waves: Vec<String> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["devices"].as_str().unwrap_or_default().to_string())
        .collect();
    waves.sort();
    assert_eq!(waves, ["van-1", "van-2,van-3"], "{ev}");

    // A signed bundle that never brings a tunnel up: rolled back within the deadline.
    let bad = b"#!/bin/sh\nexec sleep 600\n".to_vec();
    let bad_path = tmp.join("edge-agent-bad");
    std::fs::write(&bad_path, &bad).unwrap();
    let r = tctl_update(
        &auth,
        &[
            "--labels",
            "ring=a",
            "--bundle",
            bad_path.to_str().unwrap(),
            "--rollback-after",
            "5s",
        ],
    );
    assert!(!r.ok(), "a rolled-back update fails: {}", r.stdout());
    let err = r.stderr();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("update failed on van-1 rolled back"), "{err}");
    assert!(r.stdout().contains("van-1: rolled back"), "{}", r.stdout());
    let back = wait_until(Duration::from_secs(60), || {
        running_hash(&auth, "van-1") == Some(short(&new))
    });
    assert!(back, "van-1 is back online on its previous binary");
    assert_eq!(std::fs::read(&agents[0].2).unwrap(), new);
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
                .any(|e| e["device"] == "van-1" && e["refused_sha256"] == sha256_hex(&bad))
        })
    });
    assert!(audited, "the rollback is in van-1's audit chain");
}

#[test]
fn a_device_offline_at_rollout_gets_it_when_it_comes_back_even_after_an_authority_restart() {
    let tmp = TempDir::new();
    let _strays = Strays(tmp.path().to_path_buf());
    let mut auth = Authority::start(&tmp.join("auth"), "edge");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let (_on, _) = start_agent(&tmp.join("bus-1"), &gw, "bus-1", "fleet=buses");
    let (mut off, off_exe) = start_agent(&tmp.join("bus-2"), &gw, "bus-2", "fleet=buses");
    for id in ["bus-1", "bus-2"] {
        wait_online(&auth, id, None, Duration::from_secs(60));
    }
    off.stop();
    wait_offline(&auth, "bus-2", Duration::from_secs(60));

    let mut new = std::fs::read(bin("edge-agent")).unwrap();
    new.extend_from_slice(b"\nedgeport agent update test: offline device\n");
    let new_path = tmp.join("edge-agent-new");
    std::fs::write(&new_path, &new).unwrap();
    let r = tctl_update(
        &auth,
        &[
            "--labels",
            "fleet=buses",
            "--bundle",
            new_path.to_str().unwrap(),
            "--format",
            "json",
        ],
    )
    .expect_ok("tctl devices update with a device offline");
    let results = r.json();
    let state = |v: &Value, id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == id)
            .map(|d| {
                (
                    d["state"].as_str().unwrap().to_string(),
                    d["detail"].clone(),
                )
            })
            .unwrap()
    };
    assert_eq!(state(&results, "bus-1").0, "done", "{results}");
    let (st, detail) = state(&results, "bus-2");
    assert_eq!(st, "pending", "{results}");
    assert!(detail.as_str().unwrap().contains("offline"), "{detail}");

    // The authority keeps the rollout: --status shows it, in JSON too.
    let list = auth
        .tctl_ok(&["devices", "update", "--status", "--format", "json"])
        .json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let rollout = &list[0];
    let id = rollout["id"].as_str().unwrap().to_string();
    // docs/schemas/agent_rollout.schema.json: exactly these keys.
    let mut keys: Vec<&str> = rollout
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "deadline",
            "devices",
            "id",
            "issued",
            "labels",
            "rollback_after_secs",
            "sha256",
            "size"
        ]
    );
    assert_eq!(rollout["sha256"], sha256_hex(&new));
    assert_eq!(rollout["labels"]["fleet"], "buses");
    assert_eq!(state(&rollout["devices"], "bus-1").0, "done", "{rollout}");
    assert_eq!(
        state(&rollout["devices"], "bus-2").0,
        "pending",
        "{rollout}"
    );

    // An authority restart forgets nothing.
    let (dir, cluster, addr) = (
        auth.data_dir.clone(),
        auth.cluster.clone(),
        auth.addr.clone(),
    );
    auth.proc.stop();
    auth = Authority::start_at(&dir, &cluster, &addr);
    let text = auth
        .tctl_ok(&["devices", "update", "--status", &id])
        .stdout();
    assert!(
        text.contains(&id) && text.contains("bus-2: pending"),
        "{text}"
    );

    // bus-2 comes back (on its old binary) and gets the update.
    let (_back, exe) = start_agent(&tmp.join("bus-2"), &gw, "bus-2", "fleet=buses");
    assert_eq!(exe, off_exe);
    let updated = wait_until(Duration::from_secs(90), || {
        running_hash(&auth, "bus-2") == Some(short(&new))
    });
    assert!(updated, "bus-2 got the update when it came online");
    assert_eq!(std::fs::read(&exe).unwrap(), new);
    let done = wait_until(Duration::from_secs(30), || {
        let v = auth
            .tctl_ok(&["devices", "update", "--status", &id, "--format", "json"])
            .json();
        state(&v[0]["devices"], "bus-2").0 == "done"
    });
    assert!(done, "the kept rollout records bus-2 as done");
    let ev = auth
        .tctl_ok(&[
            "audit",
            "search",
            "--type",
            "agent.update_result",
            "--format",
            "json",
        ])
        .json();
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["device"] == "bus-2" && e["update"] == id.as_str() && e["state"] == "done"),
        "{ev}"
    );
    let r = auth.tctl(&["devices", "update", "--status", "0000"]);
    assert!(
        !r.ok() && r.stderr().contains("no update 0000"),
        "{}",
        r.stderr()
    );
}
