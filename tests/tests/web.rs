//! The web console (issue 25), in a real headless Chromium against a real authority,
//! gateway (`--web-addr`) and agents: login with password and one-time code, the fleet view
//! (only the devices the user's roles allow, with a label filter), and the security
//! properties: no cookie, no browser signature, no CSRF token, a logged-out session and a
//! locked user are all refused, and the cookie is `Secure; HttpOnly; SameSite=Strict`. The
//! terminal: a shell typed into and read from the page, recorded, played back, cut by a lock.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeport_e2e::peers::peers_dir;
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{free_port, run, wait_until};
use serde_json::{json, Value};

const PW: &str = "correct horse battery staple";

/// A headless Chromium steered one JSON command at a time (`tests/peers/web-console.js`).
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    fn start() -> Self {
        let mut child = Command::new("bash")
            .arg(peers_dir().join("web-console.sh"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the browser");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn cmd(&mut self, c: Value) -> Value {
        writeln!(self.stdin, "{c}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v.get("error").is_none(), "browser: {c} -> {v}");
        v
    }

    /// Runs `js` (an expression, awaited) in the page.
    fn eval(&mut self, js: &str) -> Value {
        self.cmd(json!({"op": "eval", "js": js}))["value"].clone()
    }

    /// The status of a fetch made by the page's own code.
    fn status(&mut self, js_fetch: &str) -> u64 {
        self.eval(&format!("({js_fetch}).then(r => r.status)"))
            .as_u64()
            .unwrap()
    }

    fn login(&mut self, url: &str, user: &str, otp: &str) {
        self.cmd(json!({"op": "open", "url": url}));
        self.cmd(json!({"op": "fill", "sel": "#user", "value": user}));
        self.cmd(json!({"op": "fill", "sel": "#password", "value": PW}));
        self.cmd(json!({"op": "fill", "sel": "#otp", "value": otp}));
        self.cmd(json!({"op": "click", "sel": "#submit"}));
    }

    fn wait_text(&mut self, sel: &str, text: &str) -> (bool, String) {
        let v = self.cmd(json!({"op": "waitText", "sel": sel, "text": text, "timeoutMs": 30000}));
        (
            v["found"].as_bool().unwrap(),
            v["text"].as_str().unwrap_or("").to_string(),
        )
    }

    fn session_cookie(&mut self) -> Value {
        let v = self.cmd(json!({"op": "cookies"}));
        v["cookies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "__Host-edgeport_session")
            .cloned()
            .unwrap_or(Value::Null)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

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

/// Enrolls `user`'s authenticator app with a first `tsh login`; returns its secret and the
/// time of the code spent.
fn enroll(tsh: &Tsh, user: &str, pin: &str) -> (String, u64) {
    let mut cmd = tsh.cmd(&[
        "login",
        "--proxy",
        &tsh.proxy,
        "--user",
        user,
        "--password-stdin",
        "--ca-pin",
        pin,
    ]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{PW}").unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let (mut key, mut next_is_key, mut seen) = (String::new(), false, String::new());
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
    for _ in lines {}
    assert!(child.wait().unwrap().success(), "enrollment failed: {seen}");
    (key, at)
}

#[test]
fn web_console_login_fleet_and_session_security() {
    let port = free_port();
    let web_addr = format!("127.0.0.1:{port}");
    let c = Cluster::start_with_gateway_args(
        "web",
        &[("van-1", "fleet=vans"), ("lab-1", "env=lab")],
        &["--web-addr", &web_addr],
    );
    let url = format!("https://{web_addr}/");
    c.tctl
        .ok(&["roles", "add", "vans", "--allow", "fleet=vans"]);
    let mut add = c.auth.tctl_cmd();
    add.args([
        "users",
        "add",
        "carol",
        "--logins",
        "root",
        "--roles",
        "vans",
        "--require-totp",
        "--password-stdin",
    ]);
    run(
        add,
        Some(format!("{PW}\n").as_bytes()),
        Duration::from_secs(30),
    )
    .expect_ok("users add carol");
    c.add_user("bob", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh-carol"), c.proxy());
    let (secret, at) = enroll(&tsh, "carol", &c.gw.ca_pin);

    let mut b = Browser::start();
    // Headers of the page itself.
    let page = b.cmd(json!({"op": "open", "url": url}));
    assert_eq!(page["status"], 200);
    let h = &page["headers"];
    let csp = h["content-security-policy"].as_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");

    // A wrong code is refused, with the authority's words.
    b.login(&url, "carol", "000000");
    let (refused, text) = b.wait_text("#login-error", "code");
    assert!(refused, "no refusal shown: {text}");
    assert!(b.session_cookie().is_null());

    // Password and the next code of the app: the fleet shows the one van the role allows.
    b.login(&url, "carol", &oathtool(&secret, at + 30));
    let (shown, text) = b.wait_text("#devices", "van-1");
    assert!(shown, "fleet not shown: {text}");
    let (online, _) = b.wait_text("#devices", "online");
    assert!(online);
    assert!(
        !text.contains("lab-1"),
        "a device outside carol's roles is shown: {text}"
    );
    let (who, _) = b.wait_text("#who", "carol");
    assert!(who);
    assert_eq!(
        b.eval("getComputedStyle(document.getElementById('login')).display"),
        "none",
        "the login form is still shown"
    );
    // The screenshot in docs/deploy.md comes from here: EDGEPORT_UPDATE_DOCS=1 writes it into
    // docs/img; otherwise it goes to the test's own directory, so a test run leaves the
    // tracked tree clean.
    let shot = if std::env::var_os("EDGEPORT_UPDATE_DOCS").is_some() {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img/web-console.png")
    } else {
        std::env::temp_dir().join(format!("edgeport-web-console-{}.png", std::process::id()))
    };
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    b.cmd(json!({"op": "shot", "path": shot.to_str().unwrap()}));

    // The label filter.
    b.cmd(json!({"op": "fill", "sel": "#filter", "value": "fleet=cars"}));
    assert!(wait_until(Duration::from_secs(30), || {
        !b.cmd(json!({"op": "text", "sel": "#devices"}))["text"]
            .as_str()
            .unwrap()
            .contains("van-1")
    }));
    b.cmd(json!({"op": "fill", "sel": "#filter", "value": "fleet=vans"}));
    assert!(b.wait_text("#devices", "van-1").0);

    // The cookie: Secure, HttpOnly, SameSite=Strict, invisible to scripts.
    let cookie = b.session_cookie();
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(b.eval("document.cookie"), "");

    // Signed and with the cookie: allowed. Without the cookie, or without the browser's
    // signature (a stolen cookie alone): refused.
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 200);
    assert_eq!(
        b.status("edgeport.signedFetch('/api/devices', {credentials: 'omit'})"),
        401
    );
    assert_eq!(b.status("fetch('/api/devices')"), 401);
    assert_eq!(
        b.status("edgeport.signedFetch('/api/session', {}, {sign: false})"),
        401
    );
    // A state-changing request without the CSRF token: refused, the session still works.
    assert_eq!(
        b.status("edgeport.signedFetch('/api/logout', {method: 'POST'}, {withCsrf: false})"),
        403
    );
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 200);

    // Logout revokes the session at the authority: the old cookie, put back, with the
    // same browser key, is refused.
    assert_eq!(
        b.status("edgeport.signedFetch('/api/logout', {method: 'POST'})"),
        200
    );
    assert!(b.session_cookie().is_null(), "logout left the cookie");
    b.cmd(json!({"op": "setCookies", "cookies": [cookie]}));
    assert!(!b.session_cookie().is_null());
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 401);
    assert_eq!(b.status("edgeport.signedFetch('/api/devices')"), 401);

    // A locked user's session stops working (within the gateway's 2 s cache).
    b.login(&url, "bob", "");
    assert!(b.wait_text("#who", "bob").0);
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 200);
    c.tctl
        .ok(&["lock", "--user", "bob", "--message", "web test"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            b.status("edgeport.signedFetch('/api/devices')") == 401
        }),
        "a locked user's web session kept working"
    );
    let body = b.eval("edgeport.signedFetch('/api/session').then(r => r.json())");
    assert!(body["error"].as_str().unwrap().contains("locked"), "{body}");
    // And a locked user cannot log in again.
    b.login(&url, "bob", "");
    assert!(b.wait_text("#login-error", "locked").0);
}

/// A WebSocket to the terminal endpoint opened by the page's own script with a first
/// message of `hello` (a JS object expression): the gateway's closing words.
fn raw_terminal(b: &mut Browser, hello: &str) -> String {
    let js = format!(
        "new Promise((done) => {{
            const ws = new WebSocket(`wss://${{location.host}}/api/terminal`);
            ws.onopen = () => ws.send(JSON.stringify({hello}));
            ws.onmessage = (e) => {{
                if (typeof e.data === 'string' && JSON.parse(e.data).closed) done(JSON.parse(e.data).closed);
            }};
            ws.onclose = () => done('closed without a word');
        }})"
    );
    b.eval(&js).as_str().unwrap_or("").to_string()
}

#[test]
fn web_terminal_runs_a_shell_is_recorded_and_cut_by_a_lock() {
    let port = free_port();
    let web_addr = format!("127.0.0.1:{port}");
    let c = Cluster::start_with_gateway_args(
        "webterm",
        &[("van-1", "fleet=vans")],
        &["--web-addr", &web_addr],
    );
    let url = format!("https://{web_addr}/");
    c.add_user("bob", "root", PW);

    let mut b = Browser::start();
    b.login(&url, "bob", "");
    assert!(b.wait_text("#who", "bob").0);
    let (fleet, text) = b.wait_text("#devices", "van-1");
    assert!(fleet, "{text:?} {}", b.eval("document.body.innerText"));

    // Without the browser key's signature (a cookie alone): no terminal.
    let why = raw_terminal(
        &mut b,
        "{at: Math.floor(Date.now() / 1000), sig: '00'.repeat(64), device: 'van-1', login: 'root', cols: 80, rows: 24}",
    );
    assert!(why.contains("signature"), "{why}");
    let why = raw_terminal(&mut b, "{hello: 'no signature at all'}");
    assert!(why.contains("signed request"), "{why}");

    // A terminal: a shell on the device, typed into and read from the page.
    b.cmd(json!({"op": "click", "sel": "button.connect[data-device='van-1']"}));
    let (ready, status) = b.wait_text("#term-status", "recorded");
    assert!(ready, "the terminal did not open: {status}");
    // Typed once the shell's prompt shows, as a person would; a login shell whose startup
    // files hang (a developer's dotfiles) is interrupted with Ctrl-C, as a person would.
    let prompt = |b: &mut Browser, secs| {
        wait_until(Duration::from_secs(secs), || {
            b.eval("document.getElementById('term').textContent.trim().length")
                .as_u64()
                .unwrap_or(0)
                > 0
        })
    };
    if !prompt(&mut b, 10) {
        b.cmd(json!({"op": "press", "sel": "#term", "key": "Control+c"}));
        assert!(prompt(&mut b, 30), "no prompt in the terminal");
    }
    b.cmd(json!({"op": "type", "sel": "#term", "text": "echo hello-web", "enter": true}));
    let (out, text) = b.wait_text("#term", "\nhello-web");
    assert!(out, "no command output in the terminal: {text:?}");
    // Resize reaches the shell as a window change.
    b.eval("(edgeport.resizeTerminal(97, 21), true)");
    b.cmd(json!({"op": "type", "sel": "#term", "text": "stty size", "enter": true}));
    let (sized, text) = b.wait_text("#term", "21 97");
    assert!(sized, "the window change did not reach the shell: {text:?}");
    let shot = if std::env::var_os("EDGEPORT_UPDATE_DOCS").is_some() {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img/web-terminal.png")
    } else {
        std::env::temp_dir().join(format!("edgeport-web-terminal-{}.png", std::process::id()))
    };
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    b.cmd(json!({"op": "shot", "path": shot.to_str().unwrap(), "sel": "#terminal"}));
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    b.cmd(json!({"op": "type", "sel": "#term", "text": "exit", "enter": true}));
    let (ended, text) = b.wait_text("#term-status", "exited with status 0");
    assert!(ended, "{text}");

    // The session was recorded by the agent like any tsh session: it shows up in the
    // user's recordings and plays back in the browser terminal.
    assert!(
        wait_until(Duration::from_secs(60), || {
            b.cmd(json!({"op": "click", "sel": "#rec-refresh"}));
            b.eval("document.querySelectorAll('#recordings button.play').length")
                .as_u64()
                .unwrap_or(0)
                > 0
        }),
        "the web terminal's session was not recorded"
    );
    // And audited: the agent's session start with the web key's certificate's user.
    let (audited, events) = b.wait_text("#audit-events", "session.start");
    assert!(audited, "{events}");
    b.cmd(json!({"op": "click", "sel": "#recordings button.play"}));
    let (played, text) = b.wait_text("#term", "\nhello-web");
    assert!(played, "the recording did not play: {text:?}");
    assert!(b.wait_text("#term-status", "end of recording").0);

    // A lock cuts an open terminal, with the reason in the terminal.
    b.cmd(json!({"op": "click", "sel": "button.connect[data-device='van-1']"}));
    assert!(b.wait_text("#term-status", "recorded").0);
    // A signed request for a terminal, kept for after the lock (signatures last a minute).
    b.eval("edgeport.terminalHello('van-1', 'root', 80, 24).then((h) => { window.kept = h; return true; })");
    c.tctl
        .ok(&["lock", "--user", "bob", "--message", "web-lock-test"]);
    let (cut, text) = b.wait_text("#term", "web-lock-test");
    assert!(cut, "the lock did not cut the terminal: {text:?}");
    assert!(text.contains("[edgeport] session cut"), "{text:?}");
    // And a locked user gets no new one, even with a fresh browser signature.
    let why = raw_terminal(&mut b, "window.kept");
    assert!(why.contains("locked"), "{why}");
}
