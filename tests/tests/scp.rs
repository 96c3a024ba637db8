//! `tsh scp` end to end (issue 29): files and trees both ways, byte for byte, through real
//! agents and a gateway on loopback; a label target with one result per device; clear
//! errors; `--resume`; and the agent's built-in SFTP server (`--sftp-server builtin`, as on
//! a device whose image has no sftp-server) serving tsh scp and stock OpenSSH sftp and scp
//! through `tsh config`, audited like the system's server.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::{random_file, same_file, Cluster, Tsh};
use edgeport_e2e::{run, wait_until, Run};
use serde_json::Value;

const PW: &str = "correct horse battery";

/// One `error: ...` line containing `expect`, exit status 1, no panic.
fn assert_error(r: &Run, expect: &str) {
    let err = r.stderr();
    assert_eq!(r.code(), Some(1), "stdout:\n{}\nstderr:\n{err}", r.stdout());
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in:\n{err}");
}

/// A tree with nested directories, an empty one and files of awkward sizes.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    std::fs::write(root.join("a.txt"), "hello\n").unwrap();
    std::fs::write(root.join("zero"), "").unwrap();
    random_file(&root.join("sub/b.bin"), 200_001);
    random_file(&root.join("sub/deeper/c.bin"), 3 * 32 * 1024);
}

/// Every file and directory under `root`, relative, sorted, with the files' bytes.
fn listing(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.push((rel, None));
                walk(root, &p, out);
            } else {
                out.push((rel, Some(std::fs::read(&p).unwrap())));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn same_tree(a: &Path, b: &Path) -> bool {
    let (la, lb) = (listing(a), listing(b));
    !la.is_empty() && la == lb
}

fn scp(tsh: &Tsh, args: &[&str]) -> Run {
    let mut all = vec!["scp"];
    all.extend_from_slice(args);
    tsh.run(&all, None)
}

fn ok(r: Run, what: &str) -> Run {
    assert_eq!(
        r.code(),
        Some(0),
        "{what}\nstdout:\n{}\nstderr:\n{}",
        r.stdout(),
        r.stderr()
    );
    r
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn tsh_scp_files_trees_labels_resume_and_errors() {
    let c = Cluster::start("edge", &[("dev1", "fleet=vans"), ("dev2", "fleet=vans")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    // The agents run on this machine: their paths are ours.
    let remote = c.dir.join("remote");
    std::fs::create_dir_all(&remote).unwrap();

    // One file up and back, byte for byte.
    let src = c.dir.join("src.bin");
    random_file(&src, 3 * 1024 * 1024 + 123);
    let up = remote.join("up.bin");
    ok(
        scp(&tsh, &[&s(&src), &format!("root@dev1:{}", s(&up))]),
        "upload",
    );
    assert!(same_file(&src, &up), "upload changed the file");
    let back = c.dir.join("back.bin");
    ok(
        scp(&tsh, &[&format!("dev1:{}", s(&up)), &s(&back)]),
        "download",
    );
    assert!(same_file(&src, &back), "download changed the file");
    // Into an existing directory, under the source's name.
    ok(
        scp(&tsh, &[&s(&src), &format!("dev1:{}", s(&remote))]),
        "into dir",
    );
    assert!(same_file(&src, &remote.join("src.bin")));

    // A tree with -r: to a new remote directory, then back into an existing local one.
    let tree = c.dir.join("tree");
    make_tree(&tree);
    let rtree = remote.join("tree-up");
    ok(
        scp(&tsh, &["-r", &s(&tree), &format!("dev1:{}", s(&rtree))]),
        "upload -r",
    );
    assert!(same_tree(&tree, &rtree), "upload -r changed the tree");
    let down = c.dir.join("down");
    std::fs::create_dir_all(&down).unwrap();
    ok(
        scp(&tsh, &["-r", &format!("dev1:{}", s(&rtree)), &s(&down)]),
        "download -r",
    );
    assert!(
        same_tree(&tree, &down.join("tree-up")),
        "download -r changed the tree"
    );

    // --resume continues from the destination's size: a prefix that differs from the source
    // stays as it was, which shows only the rest was sent.
    let partial = remote.join("partial.bin");
    let data = std::fs::read(&src).unwrap();
    let half = 1024 * 1024 + 7;
    std::fs::write(&partial, vec![0u8; half]).unwrap();
    ok(
        scp(
            &tsh,
            &["--resume", &s(&src), &format!("dev1:{}", s(&partial))],
        ),
        "upload --resume",
    );
    let got = std::fs::read(&partial).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got[..half].iter().all(|b| *b == 0) && got[half..] == data[half..]);
    let local_partial = c.dir.join("partial-down.bin");
    std::fs::write(&local_partial, &data[..half]).unwrap();
    ok(
        scp(
            &tsh,
            &["--resume", &format!("dev1:{}", s(&up)), &s(&local_partial)],
        ),
        "download --resume",
    );
    assert!(same_file(&src, &local_partial), "download --resume");
    // Without --resume the whole file is copied again.
    ok(
        scp(&tsh, &[&s(&src), &format!("dev1:{}", s(&partial))]),
        "overwrite",
    );
    assert!(same_file(&src, &partial));

    // Clear one-line errors and a failing exit status.
    let missing = remote.join("no-such-file");
    let out = c.dir.join("never.bin");
    assert_error(
        &scp(&tsh, &[&format!("dev1:{}", s(&missing)), &s(&out)]),
        &format!("dev1:{}: no such file or directory", s(&missing)),
    );
    assert!(!out.exists(), "a failed download left a file behind");
    assert_error(
        &scp(&tsh, &[&s(&c.dir.join("nope")), "dev1:/tmp"]),
        "nope: no such file or directory",
    );
    assert_error(
        &scp(&tsh, &[&s(&tree), &format!("dev1:{}", s(&remote))]),
        "is a directory (use -r",
    );
    assert_error(
        &scp(&tsh, &[&s(&src), &s(&back), &format!("dev1:{}", s(&up))]),
        "not a directory",
    );
    assert_error(&scp(&tsh, &[&s(&src), "dev9:/tmp/x"]), "dev9");

    // A label target: every matching device gets the file, one result line each. A third
    // device that serves no SFTP (`--sftp-server none`) fails alone, and says why.
    let agent = Agent::start(
        &c.dir.join("agent-dev3"),
        &c.gw,
        "dev3",
        "fleet=vans",
        &["--sftp-server", "none"],
    );
    wait_online(&c.tctl, "dev3", None, Duration::from_secs(60));
    let fan = remote.join("fanout.bin");
    let r = scp(&tsh, &[&s(&src), &format!("fleet=vans:{}", s(&fan))]);
    assert_eq!(r.code(), Some(1), "{}\n{}", r.stdout(), r.stderr());
    let stdout = r.stdout();
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["[dev1] 1 file, 3.00 MiB", "[dev2] 1 file, 3.00 MiB"],
        "{stdout}"
    );
    let err = r.stderr();
    assert!(err.contains("[dev3] tsh: dev3 refused SFTP"), "{err}");
    assert!(
        err.contains("3 devices: 2 succeeded, 1 failed: dev3"),
        "{err}"
    );
    assert!(same_file(&src, &fan));
    drop(agent);
    let r = scp(&tsh, &[&s(&src), "fleet=boats:/tmp"]);
    assert_error(&r, "no online device matches fleet=boats");
}

#[test]
fn builtin_sftp_server_serves_tsh_and_openssh() {
    let mut c = Cluster::start("edge", &[]);
    // As on a BusyBox image: the agent serves SFTP itself, whatever this machine has.
    c.agents.push(Agent::start(
        &c.dir.join("agent-dev1"),
        &c.gw,
        "dev1",
        "",
        &["--sftp-server", "builtin"],
    ));
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(60));
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let remote = c.dir.join("remote");
    std::fs::create_dir_all(&remote).unwrap();

    // tsh scp, a file and a tree.
    let src = c.dir.join("src.bin");
    random_file(&src, 5 * 1024 * 1024 + 1);
    let up = remote.join("tsh-up.bin");
    ok(
        scp(&tsh, &[&s(&src), &format!("dev1:{}", s(&up))]),
        "upload",
    );
    assert!(same_file(&src, &up));
    let back = c.dir.join("tsh-back.bin");
    ok(
        scp(&tsh, &[&format!("dev1:{}", s(&up)), &s(&back)]),
        "download",
    );
    assert!(same_file(&src, &back));
    let tree = c.dir.join("tree");
    make_tree(&tree);
    ok(
        scp(&tsh, &["-r", &s(&tree), &format!("dev1:{}", s(&remote))]),
        "upload -r",
    );
    assert!(same_tree(&tree, &remote.join("tree")));
    let r = scp(
        &tsh,
        &[&format!("dev1:{}", s(&remote.join("nope"))), &s(&back)],
    );
    assert_error(&r, "no such file or directory");

    // Stock OpenSSH through `tsh config`: scp both ways, and an sftp session that lists,
    // makes a directory, renames and removes.
    let cfg = tsh.config();
    let openssh_scp = |from: String, to: String| {
        let mut cmd = Command::new("scp");
        cmd.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", &from, &to]);
        run(cmd, None, Duration::from_secs(120)).expect_ok("scp");
    };
    let (sup, sback) = (remote.join("scp-up.bin"), c.dir.join("scp-back.bin"));
    openssh_scp(s(&src), format!("root@dev1:{}", s(&sup)));
    openssh_scp(format!("root@dev1:{}", s(&sup)), s(&sback));
    assert!(same_file(&src, &sback), "scp round trip changed the file");
    let batch = c.dir.join("sftp.batch");
    let sdir = remote.join("sftp-dir");
    std::fs::write(
        &batch,
        format!(
            "mkdir {d}\nput {src} {d}/f.bin\nrename {d}/f.bin {d}/g.bin\nls -l {d}\n\
             get {d}/g.bin {back}\nrm {d}/g.bin\nrmdir {d}\n",
            d = s(&sdir),
            src = s(&src),
            back = s(&c.dir.join("sftp-back.bin"))
        ),
    )
    .unwrap();
    let mut cmd = Command::new("sftp");
    cmd.arg("-F")
        .arg(&cfg)
        .args(["-o", "BatchMode=yes", "-b"])
        .arg(&batch)
        .arg("root@dev1");
    let r = run(cmd, None, Duration::from_secs(120)).expect_ok("sftp");
    assert!(r.stdout().contains("g.bin"), "{}", r.stdout());
    assert!(same_file(&src, &c.dir.join("sftp-back.bin")));
    assert!(!sdir.exists(), "sftp rmdir did not remove the directory");

    // Audited as with the system's server: the server named, each file with its bytes.
    let mut events = Vec::new();
    let seen = wait_until(Duration::from_secs(60), || {
        events = c
            .tctl
            .ok(&["audit", "search", "--format", "json"])
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default();
        events.iter().any(|e| {
            e["type"] == "sftp.file"
                && e["path"] == s(&up).as_str()
                && e["bytes_written"] == 5 * 1024 * 1024 + 1
        })
    });
    assert!(seen, "no sftp.file event for the upload: {events:#?}");
    assert!(
        events
            .iter()
            .any(|e: &Value| e["type"] == "sftp.start" && e["server"] == "builtin"),
        "{events:#?}"
    );
}
