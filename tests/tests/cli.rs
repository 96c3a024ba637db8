//! tsh and tctl as command-line tools (issue 27): output into a closed pipe, the invite line
//! `tctl users add` prints, `tctl roles add` and `update`, Teleport's command names, shell
//! completions.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use edgeport_e2e::ssh::{Cluster, Tmux, Tsh};
use edgeport_e2e::{bin, run, Authority, Run, TempDir};

const PW: &str = "correct horse battery";

/// Runs `cmd` with stdout a pipe whose reading end is already closed: its first write fails
/// with EPIPE. Returns the exit status and stderr.
fn into_closed_pipe(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped());
    let out = cmd.output().unwrap();
    drop(cmd);
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bash -c SCRIPT` with `set -o pipefail`, PATH starting with the built binaries.
fn bash(script: &str, env: &[(&str, &Path)]) -> Run {
    let dir = bin("tctl").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!("set -o pipefail; {script}"))
        .env("PATH", path);
    for (k, v) in env {
        c.env(k, v);
    }
    run(c, None, Duration::from_secs(60))
}

/// One `error: ...` line containing `expect`, exit status 1, no panic.
fn assert_one_error(r: &Run, expect: &str) {
    let err = r.stderr();
    assert_eq!(r.code(), Some(1), "stdout:\n{}\nstderr:\n{err}", r.stdout());
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in:\n{err}");
}

#[test]
fn every_list_command_ends_quietly_on_a_closed_pipe() {
    let c = Cluster::start(
        "cli-pipe",
        &[("dev1", "fleet=vans"), ("dev2", "fleet=trucks")],
    );
    c.add_user("alice", "root", PW);
    let home = c.dir.join("tsh-alice");
    let tsh = Tsh::new(home.clone(), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    // Something in every list.
    c.tctl.ok(&["tokens", "add", "--type", "device"]);
    c.tctl
        .ok(&["lock", "--user", "mallory", "--message", "test"]);
    c.tctl
        .ok(&["roles", "add", "field", "--allow", "fleet=vans"]);
    c.tctl.ok(&["sso", "map", "devs", "--logins", "root"]);

    let tctl_lists: &[&[&str]] = &[
        &["devices", "ls"],
        &["nodes", "ls"],
        &["users", "ls"],
        &["tokens", "ls"],
        &["locks", "ls"],
        &["roles", "ls"],
        &["audit", "search"],
        &["audit", "verify"],
        &["gateways", "ls"],
        &["sso", "ls"],
        &["sso", "connectors", "ls"],
        &["status"],
        &["auth", "export", "--type", "host"],
        &["version"],
    ];
    let mut cmds: Vec<(String, Command)> = Vec::new();
    for args in tctl_lists {
        for json in [false, true] {
            if json && matches!(args[0], "status" | "auth" | "version") {
                continue;
            }
            let mut all: Vec<&str> = args.to_vec();
            if json {
                all.extend(["--format", "json"]);
            }
            let mut cmd = c.auth.tctl_cmd();
            cmd.args(&all);
            cmds.push((format!("tctl {}", all.join(" ")), cmd));
        }
    }
    for args in [
        &["ls"][..],
        &["ls", "--format", "json"],
        &["status"],
        &["config"],
        &["kube", "ls"],
        &["recordings", "ls"],
        &["version"],
        &["completion", "bash"],
    ] {
        cmds.push((format!("tsh {}", args.join(" ")), tsh.cmd(args)));
    }
    for (what, cmd) in cmds {
        let (status, err) = into_closed_pipe(cmd);
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(status.code(), Some(0), "{what}: {status:?}\n{err}");
        assert!(err.is_empty(), "{what} printed on stderr: {err}");
    }

    // And as people use it: a pipe into head, under pipefail.
    let ident = c.auth.identity();
    let env = [
        ("EDGEPORT_IDENTITY", ident.as_path()),
        ("TSH_HOME", home.as_path()),
    ];
    let r = bash(
        &format!(
            "export EDGEPORT_AUTH={}; tctl devices ls | head -1 && tctl audit search | head -n 1 \
             && tsh ls | head -1",
            c.auth.addr
        ),
        &env,
    );
    assert!(r.ok(), "{}\n{}", r.stdout(), r.stderr());
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());
    let lines: Vec<String> = r.stdout().lines().map(String::from).collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout());
    assert!(lines[0].starts_with("ID "), "{lines:?}");
    assert!(lines[1].starts_with("TIME "), "{lines:?}");
    assert!(lines[2].starts_with("DEVICE "), "{lines:?}");
    // Other write errors are one line and status 1.
    if Path::new("/dev/full").exists() {
        let r = bash("tsh version > /dev/full", &[]);
        assert_eq!(r.code(), Some(1), "{}", r.stderr());
        assert!(
            r.stderr()
                .starts_with("error: cannot write to standard output:"),
            "{}",
            r.stderr()
        );
    }
}

#[test]
fn the_invite_line_works_as_printed() {
    let c = Cluster::start("cli-invite", &[("dev1", "fleet=vans")]);
    let r = c.tctl.ok(&["users", "add", "bob", "--logins", "root"]);
    let out = r.stdout();
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tsh login"))
        .unwrap_or_else(|| panic!("no tsh login line in:\n{out}"));
    assert!(
        out.contains("GATEWAY:3080: the gateway's address"),
        "the placeholder is not explained:\n{out}"
    );
    assert!(
        line.contains(&format!("--ca-pin {}", c.gw.ca_pin)),
        "{line}"
    );
    // Follow it to the letter on a fresh home, the placeholder replaced, on a terminal.
    let line = line.replace("GATEWAY:3080", c.proxy());
    let home = c.dir.join("tsh-bob");
    let dir = bin("tsh").parent().unwrap().to_path_buf();
    let tmux = Tmux::start(
        "cli-invite",
        200,
        30,
        &format!(
            "env -u SSH_AUTH_SOCK TSH_HOME='{}' PATH='{}':\"$PATH\" {line}; echo TSH-EXIT=$?; sleep 60",
            home.display(),
            dir.display()
        ),
    );
    let (ok, screen) = tmux.wait_for("Choose a password", Duration::from_secs(30));
    assert!(ok, "{screen}");
    tmux.send(&[PW, "Enter"]);
    let (ok, screen) = tmux.wait_for("Repeat the new password", Duration::from_secs(10));
    assert!(ok, "{screen}");
    tmux.send(&[PW, "Enter"]);
    let (ok, screen) = tmux.wait_for("TSH-EXIT=", Duration::from_secs(30));
    assert!(ok && screen.contains("TSH-EXIT=0"), "{screen}");
    assert!(screen.contains("Logged in as bob"), "{screen}");
    let tsh = Tsh::new(home, c.proxy());
    let r = tsh.run(&["ssh", "root@dev1", "echo", "hi"], None);
    assert!(r.ok() && r.stdout().contains("hi"), "{}", r.stderr());

    // The same invite again: refused, and the error says what likely happened.
    let line = line.replace("tsh login ", "");
    let mut args: Vec<&str> = vec!["login"];
    args.extend(line.split_whitespace());
    args.push("--password-stdin");
    let again = Tsh::new(c.dir.join("tsh-bob-again"), c.proxy());
    let r = again.run(&args, Some(format!("{PW}\n").as_bytes()));
    assert_one_error(&r, "this invite code was already used");
    assert!(
        r.stderr().contains("log in with the password chosen then"),
        "{}",
        r.stderr()
    );
    // The password chosen at the invite works.
    again
        .login("bob", PW, &c.gw.ca_pin, &[])
        .expect_ok("login with the chosen password");
}

#[test]
fn users_update_changes_grants_in_place() {
    let c = Cluster::start("cli-users-update", &[("dev1", "fleet=vans")]);
    c.add_user("alice", "root", PW);
    c.tctl
        .ok(&["roles", "add", "trucks", "--allow", "fleet=trucks"]);
    let tsh = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let r = tsh.run(&["ssh", "root@dev1", "echo", "before"], None);
    assert_eq!(r.stdout(), "before\n", "{}", r.stderr());

    // A role change applies to the next dial, with the certificate alice already holds.
    let r = c
        .tctl
        .ok(&["users", "update", "alice", "--set-roles", "trucks"]);
    assert!(r.stdout().contains("user alice updated"), "{}", r.stdout());
    let r = tsh.run(&["ssh", "root@dev1", "echo", "after"], None);
    assert!(r.code() != Some(0) && !r.stdout().contains("after"));
    assert!(r.stderr().contains("do not allow device"), "{}", r.stderr());
    let users = c.tctl.ok(&["users", "ls", "--format", "json"]).json();
    let alice = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .cloned()
        .expect("alice listed");
    assert_eq!(alice["roles"][0], "trucks", "{alice}");
    assert_eq!(alice["logins"][0], "root", "the logins stay: {alice}");

    // Back to the built-in role: the password and the certificate still work.
    c.tctl.ok(&["users", "update", "alice", "--set-roles", ""]);
    let r = tsh.run(&["ssh", "root@dev1", "echo", "again"], None);
    assert_eq!(r.stdout(), "again\n", "{}", r.stderr());

    assert_one_error(
        &c.tctl
            .run(&["users", "update", "nobody", "--set-logins", "root"]),
        "user nobody not found",
    );
    assert_one_error(
        &c.tctl.run(&["users", "update", "alice"]),
        "nothing to change",
    );
    assert_one_error(
        &c.tctl
            .run(&["users", "update", "alice", "--set-roles", "nope"]),
        "nope",
    );

    // An identity file signed with --proxy remembers its gateway: no --proxy, no profile.
    let file = c.dir.join("alice.identity");
    c.tctl.ok(&[
        "auth",
        "sign",
        "--user",
        "alice",
        "--logins",
        "root",
        "--format",
        "file",
        "--proxy",
        c.proxy(),
        "--out",
        file.to_str().unwrap(),
    ]);
    let bare = Tsh::new(c.dir.join("tsh-fresh"), c.proxy());
    let r = bare.run(
        &[
            "-i",
            file.to_str().unwrap(),
            "ssh",
            "root@dev1",
            "echo",
            "file",
        ],
        None,
    );
    assert_eq!(r.stdout(), "file\n", "{}", r.stderr());
}

#[test]
fn roles_add_refuses_an_existing_role_and_update_keeps_the_rest() {
    let dir = TempDir::new();
    let auth = Authority::start(&dir.join("authority"), "cli-roles");
    auth.tctl_ok(&[
        "roles",
        "add",
        "field",
        "--allow",
        "fleet=vans",
        "--deny",
        "env=prod",
        "--no-port-forwarding",
        "--max-session-ttl",
        "8h",
    ]);
    let r = auth.tctl(&["roles", "add", "field", "--allow", "fleet=trucks"]);
    assert_one_error(&r, "role field exists");
    assert!(
        r.stderr().contains("tctl roles update field"),
        "{}",
        r.stderr()
    );

    let role = |auth: &Authority| {
        let all = auth.tctl_ok(&["roles", "ls", "--format", "json"]).json();
        all.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "field")
            .cloned()
            .expect("role field")
    };
    // Unchanged by the refused add.
    assert_eq!(role(&auth)["allow_labels"]["fleet"][0], "vans");

    let r = auth.tctl_ok(&["roles", "update", "field", "--max-session-ttl", "2h"]);
    assert!(r.stdout().contains("role field updated"), "{}", r.stdout());
    let got = role(&auth);
    assert_eq!(got["max_session_ttl_secs"], 7200);
    assert_eq!(got["deny_labels"]["env"][0], "prod", "{got}");
    assert_eq!(got["allow_labels"]["fleet"][0], "vans", "{got}");
    assert_eq!(got["permit_port_forwarding"], false, "{got}");
    assert_eq!(got["permit_pty"], true, "{got}");

    auth.tctl_ok(&["roles", "update", "field", "--no-pty", "--port-forwarding"]);
    let got = role(&auth);
    assert_eq!(got["permit_pty"], false, "{got}");
    assert_eq!(got["permit_port_forwarding"], true, "{got}");
    assert_eq!(got["deny_labels"]["env"][0], "prod", "{got}");
    assert_eq!(got["max_session_ttl_secs"], 7200);

    // The text table shows the TTL in the one duration style.
    let text = auth.tctl_ok(&["roles", "ls"]).stdout();
    let row = text.lines().find(|l| l.starts_with("field")).unwrap();
    assert!(row.contains(" 2h "), "{text}");

    assert_one_error(
        &auth.tctl(&["roles", "update", "nope", "--no-pty"]),
        "no role nope",
    );
    assert_one_error(
        &auth.tctl(&["roles", "update", "field"]),
        "nothing to change",
    );
}

#[test]
fn teleport_names_versions_and_completions() {
    let dir = TempDir::new();
    let auth = Authority::start(&dir.join("authority"), "cli-names");
    assert_eq!(
        auth.tctl_ok(&["nodes", "ls", "--format", "json"]).json(),
        auth.tctl_ok(&["devices", "ls", "--format", "json"]).json()
    );
    // `tctl get` prints YAML by default: the records of `roles ls --format yaml`.
    assert_eq!(
        auth.tctl_ok(&["get", "roles"]).stdout(),
        auth.tctl_ok(&["roles", "ls", "--format", "yaml"]).stdout()
    );

    // version needs no authority.
    let mut c = Command::new(bin("tctl"));
    c.args(["version", "--format", "json"])
        .env("EDGEPORT_AUTH", "127.0.0.1:1")
        .env_remove("EDGEPORT_IDENTITY");
    let r = run(c, None, Duration::from_secs(10)).expect_ok("tctl version");
    assert!(r.json()["version"].is_string(), "{}", r.stdout());
    let r = run(
        {
            let mut c = Command::new(bin("tsh"));
            c.arg("version");
            c
        },
        None,
        Duration::from_secs(10),
    )
    .expect_ok("tsh version");
    assert!(r.stdout().starts_with("tsh version "), "{}", r.stdout());

    // unlock by name when one lock has it; locks rm is unlock.
    auth.tctl_ok(&["lock", "--user", "alice"]);
    auth.tctl_ok(&["lock", "--device", "alice"]);
    auth.tctl_ok(&["lock", "--user", "bob"]);
    let r = auth.tctl(&["unlock", "alice"]);
    assert_one_error(&r, "names 2 locks");
    assert!(
        r.stderr().contains("user alice") && r.stderr().contains("device alice"),
        "{}",
        r.stderr()
    );
    let r = auth.tctl_ok(&["locks", "rm", "--device", "alice"]);
    assert!(
        r.stdout().contains("device alice unlocked"),
        "{}",
        r.stdout()
    );
    let r = auth.tctl_ok(&["unlock", "alice"]);
    assert!(r.stdout().contains("user alice unlocked"), "{}", r.stdout());
    let r = auth.tctl_ok(&["locks", "rm", "bob"]);
    assert!(r.stdout().contains("user bob unlocked"), "{}", r.stdout());
    assert_one_error(&auth.tctl(&["unlock", "carol"]), "no lock in force");
    assert_eq!(
        auth.tctl_ok(&["locks", "ls", "--format", "json"]).json(),
        serde_json::json!([])
    );

    // A mistyped command gets the right one.
    let r = auth.tctl(&["devcies", "ls"]);
    assert!(
        !r.ok() && r.stderr().contains("'devices'"),
        "{}",
        r.stderr()
    );
    let r = run(
        {
            let mut c = Command::new(bin("tsh"));
            c.arg("logn");
            c
        },
        None,
        Duration::from_secs(10),
    );
    assert!(!r.ok() && r.stderr().contains("'login'"), "{}", r.stderr());

    // Completion scripts load in bash and complete subcommands.
    for prog in ["tsh", "tctl"] {
        let r = bash(
            &format!(
                "source <({prog} completion bash) && complete -p {prog} && \
                 COMP_WORDS=({prog} ''); COMP_CWORD=1; COMP_LINE='{prog} '; COMP_POINT=${{#COMP_LINE}}; \
                 $(complete -p {prog} | sed -E 's/.*-F ([^ ]+).*/\\1/') {prog} '' {prog}; \
                 printf '%s\\n' \"${{COMPREPLY[@]}}\""
            ),
            &[],
        );
        assert!(r.ok(), "{prog}: {}\n{}", r.stdout(), r.stderr());
        assert!(
            r.stdout().contains(&format!("-F _{prog} {prog}")),
            "{}",
            r.stdout()
        );
        let expect = if prog == "tsh" { "login" } else { "devices" };
        assert!(
            r.stdout().lines().any(|l| l == expect),
            "{prog}: no {expect} among the completions:\n{}",
            r.stdout()
        );
        for shell in ["zsh", "fish"] {
            let r = bash(&format!("{prog} completion {shell}"), &[]);
            assert!(r.ok() && r.stdout().contains(prog), "{prog} {shell}");
        }
    }
}
