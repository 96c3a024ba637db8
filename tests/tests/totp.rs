//! A second factor for local users: one-time passwords (RFC 6238) from an authenticator app,
//! played here by Debian's `oathtool` (an independent implementation). `tctl users add
//! --require-totp`, enrollment at the first `tsh login`, a code at every login after, each
//! code accepted once, wrong codes refused and counted as failed logins.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{run, Run};

const PW: &str = "correct horse battery staple";

/// The app's code for `secret` (base32) at Unix time `at`.
fn oathtool(secret: &str, at: u64) -> String {
    let mut c = Command::new("oathtool");
    c.args(["--totp", "-b", secret, "--now"])
        .arg(format!("@{at}"));
    run(c, None, Duration::from_secs(10))
        .expect_ok("oathtool")
        .stdout()
        .trim()
        .to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn login_args<'a>(tsh: &'a Tsh, user: &'a str, pin: &'a str) -> Vec<&'a str> {
    vec![
        "login",
        "--proxy",
        &tsh.proxy,
        "--user",
        user,
        "--password-stdin",
        "--ca-pin",
        pin,
    ]
}

/// First login of a user who must enroll: tsh shows the new key, the "app" (oathtool)
/// computes the code, tsh sends it. Returns tsh's result, the key and the time of the code.
fn enroll(tsh: &Tsh, user: &str, pin: &str) -> (Run, String, u64) {
    enroll_with(tsh, user, pin, &[])
}

fn enroll_with(tsh: &Tsh, user: &str, pin: &str, extra: &[&str]) -> (Run, String, u64) {
    let mut args = login_args(tsh, user, pin);
    args.extend_from_slice(extra);
    let mut cmd = tsh.cmd(&args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{PW}").unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let mut seen = String::new();
    let mut key = String::new();
    let mut next_is_key = false;
    for line in lines.by_ref() {
        seen.push_str(&line);
        seen.push('\n');
        if next_is_key && !line.trim().is_empty() {
            key = line.trim().to_string();
            break;
        }
        if line.contains("Add this key to it") {
            next_is_key = true;
        }
    }
    assert!(!key.is_empty(), "tsh showed no key: {seen}");
    let at = now();
    writeln!(stdin, "{}", oathtool(&key, at)).unwrap();
    drop(stdin);
    let rest: String = lines.map(|l| l + "\n").collect();
    let mut out = child.wait_with_output().unwrap();
    out.stderr = format!("{seen}{rest}").into_bytes();
    (Run { out }, key, at)
}

fn login_with_code(tsh: &Tsh, user: &str, pin: &str, code: &str) -> Run {
    tsh.run(
        &login_args(tsh, user, pin),
        Some(format!("{PW}\n{code}\n").as_bytes()),
    )
}

#[test]
fn one_time_passwords_enroll_once_and_work_once() {
    let c = Cluster::start("totp", &[("dev1", "")]);
    let pin = c.gw.ca_pin.clone();
    c.auth
        .add_user_with("dana", PW, &["--logins", "root", "--require-totp"])
        .expect_ok("users add");
    let ls = c.tctl.ok(&["users", "ls", "--format", "json"]).json();
    assert_eq!(ls[0]["second_factor"], "required", "{ls:#}");

    // First login: enrollment.
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    let (r, key, at) = enroll(&tsh, "dana", &pin);
    assert!(r.ok(), "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("Logged in as dana"), "{}", r.stdout());
    let ls = c.tctl.ok(&["users", "ls", "--format", "json"]).json();
    assert_eq!(ls[0]["second_factor"], "enrolled", "{ls:#}");
    let hi = tsh.run(&["ssh", "root@dev1", "echo", "hi"], None);
    assert_eq!(hi.stdout().trim(), "hi", "{}", hi.stderr());

    // Without a code: asked for one (here: stdin has none).
    let r = tsh.run(
        &login_args(&tsh, "dana", &pin),
        Some(format!("{PW}\n").as_bytes()),
    );
    assert!(!r.ok());
    assert!(r.stderr().contains("one-time code"), "{}", r.stderr());

    // The code just used does not work again; a wrong one neither.
    let used = oathtool(&key, at);
    let r = login_with_code(&tsh, "dana", &pin, &used);
    assert!(!r.ok(), "a spent code was accepted");
    assert!(
        r.stderr().contains("wrong or already used one-time code"),
        "{}",
        r.stderr()
    );
    let valid: Vec<String> = [at - 30, at, at + 30, at + 60]
        .iter()
        .map(|t| oathtool(&key, *t))
        .collect();
    let wrong = (0..10u32)
        .map(|i| format!("{:06}", i * 111_111))
        .find(|c| !valid.contains(c))
        .unwrap();
    let r = login_with_code(&tsh, "dana", &pin, &wrong);
    assert!(
        !r.ok() && r.stderr().contains("wrong or already used"),
        "{}",
        r.stderr()
    );
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());

    // The next step's code (accepted one step early, for clock drift) logs in.
    let next = oathtool(&key, at + 30);
    let r = login_with_code(&tsh, "dana", &pin, &next);
    assert!(r.ok(), "{}", r.stderr());

    // An invited user who must enroll: the refused first attempt changes nothing (the invite
    // stays unspent until the code checks out), then invite, new password and enrollment go
    // together, and the new password works with the next code.
    let mut add = c.auth.tctl_cmd();
    add.args([
        "users",
        "add",
        "frank",
        "--logins",
        "root",
        "--require-totp",
    ]);
    let out = run(add, None, Duration::from_secs(30))
        .expect_ok("users add frank")
        .stdout();
    let code = out
        .lines()
        .find_map(|l| l.strip_prefix("One-time invite code: "))
        .unwrap()
        .trim()
        .to_string();
    let frank = Tsh::new(c.dir.join("tsh-frank"), c.proxy());
    let (r, fkey, fat) = enroll_with(&frank, "frank", &pin, &["--invite", &code]);
    assert!(r.ok(), "{}\n{}", r.stdout(), r.stderr());
    let r = login_with_code(&frank, "frank", &pin, &oathtool(&fkey, fat + 30));
    assert!(
        r.ok(),
        "the password chosen with the invite does not work: {}",
        r.stderr()
    );

    // Another user without the requirement is not asked anything.
    c.add_user("eve", "root", PW);
    let other = Tsh::new(c.dir.join("tsh-eve"), c.proxy());
    other.login("eve", PW, &pin, &[]).expect_ok("eve login");
}
