//! The web console (issue 25), in a real headless Chromium against a real authority,
//! gateway (`--web-addr`) and agents: login with password and one-time code, the fleet view
//! (only the devices the user's roles allow, with a label filter), and the security
//! properties: no cookie, no browser signature, no CSRF token, a logged-out session and a
//! locked user are all refused, and the cookie is `Secure; HttpOnly; SameSite=Strict`. The
//! terminal: a shell typed into and read from the page, recorded, played back, cut by a lock
//! and by a logout, its signed request good for one terminal only, and refused to another
//! origin. The fleet view follows a device going offline and coming back. Single sign-on
//! through a real OpenID Connect provider (`tests/peers/oidc.sh`) into the same console, with
//! a stolen callback URL refused in another browser.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeport_e2e::fabric::Gateway;
use edgeport_e2e::peers::{peers_dir, Peer};
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
    c.auth
        .add_user_with(
            "carol",
            PW,
            &["--logins", "root", "--roles", "vans", "--require-totp"],
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

    // Made-up cookies (each costs the authority a check): an address gets a burst of
    // refusals, then 429 from the gateway itself. A session the authority accepted before
    // keeps working from that same address, and another address has its own budget.
    let made_up = |from: &str, i: usize| {
        status_with_session(
            web_addr.as_str(),
            from,
            "/api/session",
            &format!("made-up-{i}"),
        )
    };
    // (Until the first 429: a slow machine earns a refill every 2 s meanwhile.)
    let mut seen = Vec::new();
    for i in 0..1000 {
        let status = made_up("127.0.0.1", i);
        let done = status != "401";
        seen.push(status);
        if done {
            break;
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("429"), "{seen:?}");
    assert!(seen.len() > 10, "the budget was spent too soon: {seen:?}");
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 200);
    assert_eq!(b.status("edgeport.signedFetch('/api/devices')"), 200);
    assert_eq!(made_up("127.0.0.7", 0), "401");
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

    unauthenticated_work_has_a_per_source_budget(&web_addr);
}

/// The status of `GET https://WEB_ADDR/PATH` by curl from `from` (a loopback address), or
/// `000` when no answer came within `max_secs`.
fn status_from(web_addr: &str, from: &str, path: &str, max_secs: u64) -> String {
    status_with_headers(web_addr, from, path, max_secs, &[])
}

/// As [`status_from`] (10 s), with session cookie `token` and a signature that does not
/// verify.
fn status_with_session(web_addr: &str, from: &str, path: &str, token: &str) -> String {
    let headers = [
        format!("Cookie: __Host-edgeport_session={token}"),
        format!("x-edgeport-time: {}", now()),
        "x-edgeport-signature: 00".to_string(),
    ];
    status_with_headers(web_addr, from, path, 10, &headers)
}

fn status_with_headers(
    web_addr: &str,
    from: &str,
    path: &str,
    max_secs: u64,
    headers: &[String],
) -> String {
    let mut curl = Command::new("curl");
    curl.args([
        "-sk",
        "--http1.1",
        "--interface",
        from,
        "--max-time",
        &max_secs.to_string(),
    ]);
    for h in headers {
        curl.args(["-H", h]);
    }
    let out = curl
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("https://{web_addr}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Connections that never send a request hold their own source's slots only (until the
/// handshake deadline), and single sign-on requests have a token bucket per source.
fn unauthenticated_work_has_a_per_source_budget(web_addr: &str) {
    let silent: Vec<_> = (0..16)
        .map(|_| std::net::TcpStream::connect(web_addr).unwrap())
        .collect();
    assert_eq!(
        status_from(web_addr, "127.0.0.1", "/", 2),
        "000",
        "a source past its budget was served at once"
    );
    assert_eq!(
        status_from(web_addr, "127.0.0.2", "/", 5),
        "200",
        "another source had to wait for the first one's silent connections"
    );
    drop(silent);
    assert!(
        wait_until(Duration::from_secs(30), || status_from(
            web_addr,
            "127.0.0.1",
            "/",
            5
        ) == "200"),
        "the source's slots did not come back"
    );
    // The login page's single sign-on requests: a burst of 30 per source, then one per 2 s,
    // then 429. On a loaded machine the burst itself may take seconds and earn a few more:
    // the requests go on until the first 429, which must come within the burst plus what
    // the time taken allows.
    let started = std::time::Instant::now();
    let mut served = 0u64;
    let refused = loop {
        let s = status_from(web_addr, "127.0.0.3", "/api/sso/connectors", 5);
        match s.as_str() {
            "200" => served += 1,
            _ => break s,
        }
        assert!(served < 1000, "no 429 after {served} requests");
    };
    assert_eq!(refused, "429", "after {served} served");
    let allowed = 30 + started.elapsed().as_secs() / 2 + 1;
    assert!(
        (30..=allowed).contains(&served),
        "{served} served before the first 429 (the burst is 30, {allowed} at most in {:?})",
        started.elapsed()
    );
    assert_eq!(
        status_from(web_addr, "127.0.0.4", "/api/sso/connectors", 5),
        "200"
    );
}

/// As [`raw_terminal`], but `"ready"` as soon as the terminal opens (then closes it).
fn raw_terminal_opens(b: &mut Browser, hello: &str) -> String {
    let js = format!(
        "new Promise((done) => {{
            const ws = new WebSocket(`wss://${{location.host}}/api/terminal`);
            ws.onopen = () => ws.send(JSON.stringify({hello}));
            ws.onmessage = (e) => {{
                if (typeof e.data !== 'string') return;
                const m = JSON.parse(e.data);
                if (m.ready) {{ ws.close(); done('ready'); }}
                if (m.closed) done(m.closed);
            }};
            ws.onclose = () => done('closed without a word');
        }})"
    );
    b.eval(&js).as_str().unwrap_or("").to_string()
}

/// The HTTP status line of a WebSocket upgrade to the terminal with `origin`, by curl.
fn upgrade_status(web_addr: &str, origin: &str) -> String {
    let mut c = Command::new("curl");
    c.args([
        "-sk",
        "--http1.1",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Origin: {origin}"),
        "-H",
        "Upgrade: websocket",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        &format!("https://{web_addr}/api/terminal"),
    ]);
    // curl waits on the upgraded connection until --max-time: the status is written anyway.
    let out = c.output().expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
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
    // Colours: `ls --color` paints a directory bold blue, and a red printf is red.
    b.cmd(json!({"op": "type", "sel": "#term", "text": "mkdir -p /tmp/web-colour-dir && ls -d --color=always /tmp/web-colour-dir; printf '\\033[31mred-%s\\033[0m\\n' text", "enter": true}));
    let coloured = |b: &mut Browser, sel: &str, want: &str| {
        let js = format!(
            "Array.from(document.querySelectorAll('#term {sel}')).map((s) => s.textContent).join('|')"
        );
        wait_until(Duration::from_secs(30), || {
            b.eval(&js).as_str().unwrap_or("").contains(want)
        })
    };
    assert!(
        coloured(&mut b, "span.f4.bold", "web-colour-dir"),
        "no bold blue directory: {}",
        b.eval("document.getElementById('term').innerHTML")
    );
    assert!(
        coloured(&mut b, "span.f1", "red-text"),
        "no red text: {}",
        b.eval("document.getElementById('term').innerHTML")
    );
    // xterm's 256 colours and 24-bit colour are drawn too (inline colours).
    b.cmd(json!({"op": "type", "sel": "#term", "text": "printf '\\033[38;5;208morange-%s\\033[0m \\033[48;2;10;20;30mdeep-%s\\033[0m\\n' text text", "enter": true}));
    let painted = |b: &mut Browser, text: &str, prop: &str, want: &str| {
        let js = format!(
            "Array.from(document.querySelectorAll('#term span')).filter((s) => s.textContent === '{text}').map((s) => getComputedStyle(s).{prop}).join('|')"
        );
        let mut got = String::new();
        let ok = wait_until(Duration::from_secs(30), || {
            got = b.eval(&js).as_str().unwrap_or("").to_string();
            got.split('|').any(|c| c == want)
        });
        (ok, got)
    };
    let (orange, got) = painted(&mut b, "orange-text", "color", "rgb(255, 135, 0)");
    assert!(orange, "colour 208 is not orange: {got:?}");
    let (deep, got) = painted(&mut b, "deep-text", "backgroundColor", "rgb(10, 20, 30)");
    assert!(deep, "a 24-bit background was not drawn: {got:?}");
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

    // A signed request opens one terminal only: the same message again (a replay by
    // whoever saw it) is refused, its single-use nonce already taken.
    b.eval("edgeport.terminalHello('van-1', 'root', 80, 24).then((h) => { window.once = h; return true; })");
    assert_eq!(raw_terminal_opens(&mut b, "window.once"), "ready");
    let why = raw_terminal(&mut b, "window.once");
    assert!(
        why.contains("nonce"),
        "a replayed terminal request was not refused: {why}"
    );

    // Another origin cannot open the terminal's WebSocket (the browser would send the
    // cookie); this origin can.
    assert_eq!(upgrade_status(&web_addr, "https://evil.example"), "403");
    assert_eq!(
        upgrade_status(&web_addr, &format!("https://{web_addr}")),
        "101"
    );

    // A logout ends the session's open terminal, with the reason in the terminal.
    b.cmd(json!({"op": "click", "sel": "button.connect[data-device='van-1']"}));
    assert!(b.wait_text("#term-status", "recorded").0);
    // A scrollback of tens of thousands of coloured runs still renders (more nodes than a
    // spread call takes as arguments).
    b.cmd(json!({"op": "type", "sel": "#term", "text": "awk 'BEGIN{for(i=0;i<1000;i++){s=\"\";for(j=0;j<96;j++)s=s sprintf(\"\\033[3%dmx\", j%2+1);print s \"\\033[0m\"}}'; echo many-runs-$((40+2))", "enter": true}));
    let rendered = wait_until(Duration::from_secs(90), || {
        b.eval("document.getElementById('term').textContent.includes('many-runs-42')") == true
    });
    let spans = b.eval("document.querySelectorAll('#term span').length");
    assert!(
        rendered && spans.as_u64().unwrap_or(0) > 60_000,
        "a long coloured scrollback did not render: {spans}"
    );
    assert_eq!(
        b.status("edgeport.signedFetch('/api/logout', {method: 'POST'})"),
        200
    );
    let (ended, text) = b.wait_text("#term", "logged out");
    assert!(ended, "the logout did not end the terminal: {text:?}");
    assert!(b.wait_text("#term-status", "logged out").0);
    b.login(&url, "bob", "");
    assert!(b.wait_text("#who", "bob").0);
    assert!(b.wait_text("#devices", "van-1").0);

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

/// A logout through another gateway of the cluster (behind one name, a browser's next
/// request may reach any of them) ends the terminals this gateway holds open for the
/// session: the gateway asks the authority about them every few seconds. The browser talks
/// only to gateway A; the logout, signed by the page's own key, goes to gateway B.
#[test]
fn a_logout_through_another_gateway_ends_the_terminal() {
    let web_a = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start_with_gateway_args(
        "webtwo",
        &[("van-1", "fleet=vans")],
        &["--web-addr", &web_a],
    );
    let web_b = format!("127.0.0.1:{}", free_port());
    let _gw_b = Gateway::start_with(&c.dir.join("gateway-b"), &c.auth, &["--web-addr", &web_b]);
    c.add_user("bob", "root", PW);
    let mut b = Browser::start();
    b.login(&format!("https://{web_a}/"), "bob", "");
    assert!(b.wait_text("#devices", "van-1").0);
    b.cmd(json!({"op": "click", "sel": "button.connect[data-device='van-1']"}));
    let (ready, status) = b.wait_text("#term-status", "recorded");
    assert!(ready, "the terminal did not open: {status}");

    // What the page's own logout would send, but to gateway B.
    let signed = b.eval(
        "(async () => { const at = Math.floor(Date.now() / 1000); \
         const sig = await signText(`edgeport-web/1\\n${at}\\nPOST\\n/api/logout`); \
         return {at, sig, csrf}; })()",
    );
    let cookie = b.session_cookie();
    let token = cookie["value"].as_str().expect("the session cookie");
    let mut curl = Command::new("curl");
    curl.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("https://{web_b}/api/logout"))
        .args(["-H", &format!("Origin: https://{web_b}")])
        .args(["-H", &format!("Cookie: __Host-edgeport_session={token}")])
        .args(["-H", &format!("X-Edgeport-Time: {}", signed["at"])])
        .args([
            "-H",
            &format!("X-Edgeport-Signature: {}", signed["sig"].as_str().unwrap()),
        ])
        .args([
            "-H",
            &format!("X-CSRF-Token: {}", signed["csrf"].as_str().unwrap()),
        ]);
    let r = run(curl, None, Duration::from_secs(30));
    assert_eq!(
        r.stdout(),
        "200",
        "logout through gateway B: {}",
        r.stderr()
    );

    // Gateway A learns it from the authority, and ends the terminal with the reason.
    let (ended, text) = b.wait_text("#term", "session ended: logged out");
    assert!(
        ended,
        "the terminal at gateway A outlived the logout: {text:?}"
    );
    assert!(b.wait_text("#term-status", "logged out").0);
}

/// The fleet view follows a device going offline and coming back, without a reload.
/// The terminal renderer takes what a hostile device or a crafted recording sends (huge
/// counts in escape sequences, parameters without end, any size in a recording's header) in
/// bounded time and memory: before the clamps, ESC[999999999S scrolled a billion times and
/// froze the tab. Run in Node (`tests/peers/term-hostile.js`), under a deadline.
#[test]
fn the_terminal_renderer_bounds_hostile_sequences() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("node")
        .arg(peers_dir().join("term-hostile.js"))
        .arg(root.join("../gateway/web/term.js"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    let done = wait_until(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !done {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(done, "the renderer was still busy after 60 s: {text}");
    assert!(
        out.status.success() && text.starts_with("ok ") && text.trim_end().ends_with("500x300"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn web_fleet_view_updates_live() {
    let port = free_port();
    let web_addr = format!("127.0.0.1:{port}");
    let mut c = Cluster::start_with_gateway_args(
        "webfleet",
        &[("van-1", "fleet=vans")],
        &["--web-addr", &web_addr],
    );
    let url = format!("https://{web_addr}/");
    c.add_user("bob", "root", PW);
    let mut b = Browser::start();
    b.login(&url, "bob", "");
    assert!(b.wait_text("#who", "bob").0);
    let state = "document.querySelector(\"#devices tr[data-device='van-1'] td:nth-child(2)\")?.textContent || ''";
    let shows =
        |b: &mut Browser, want: &str| wait_until(Duration::from_secs(60), || b.eval(state) == want);
    assert!(shows(&mut b, "online"), "{}", b.eval(state));
    // The agent stops (its tunnel closes), then starts again.
    c.agents[0].proc.stop();
    assert!(
        shows(&mut b, "offline"),
        "the fleet view did not show van-1 offline: {}",
        b.eval(state)
    );
    c.agents[0].restart();
    assert!(
        shows(&mut b, "online"),
        "the fleet view did not show van-1 back: {}",
        b.eval(state)
    );
}

/// Single sign-on in the web console through a real OpenID Connect provider: the browser
/// logs in at the provider and lands back on the gateway's callback page, which finishes with
/// its own key; the session works (fleet, terminal) and logout ends it. The provider's answer
/// (code and state) opened in another browser is refused.
#[test]
fn web_console_single_sign_on_with_oidc() {
    let port = free_port();
    let web_addr = format!("127.0.0.1:{port}");
    let callback = format!("https://{web_addr}/web/sso/oidc/callback");
    let idp = Peer::start(
        "oidc.sh",
        &[],
        &[
            ("OIDC_USERS", "alice:devs;bob:ops"),
            ("REDIRECT_URI", &callback),
        ],
    );
    let c = Cluster::start_with_gateway_args(
        "websso",
        &[("van-1", "fleet=vans")],
        &["--web-addr", &web_addr],
    );
    let url = format!("https://{web_addr}/");
    let origin = format!("https://{web_addr}");
    let secret = c.dir.join("oidc-client-secret");
    std::fs::write(&secret, idp.get("CLIENT_SECRET")).unwrap();
    let add_oidc = |web_origin: Option<&str>| {
        let mut args = vec![
            "sso",
            "connectors",
            "add",
            "oidc",
            "--issuer",
            idp.get("ISSUER"),
            "--client-id",
            idp.get("CLIENT_ID"),
            "--client-secret-file",
            secret.to_str().unwrap(),
        ];
        if let Some(o) = web_origin {
            args.extend(["--web-origin", o]);
        }
        c.tctl.ok(&args);
    };
    c.tctl.ok(&["sso", "map", "devs", "--logins", "root"]);
    let start_status = |b: &mut Browser| {
        b.eval(
            "(async () => {
                const k = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
                const pub = Array.from(new Uint8Array(await crypto.subtle.exportKey('raw', k.publicKey)), (x) => x.toString(16).padStart(2, '0')).join('');
                const r = await fetch('/api/sso/start', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                    body: JSON.stringify({ connector: 'oidc', browser_key: pub }) });
                return r.status + ' ' + (await r.json()).error;
            })()",
        )
        .as_str()
        .unwrap()
        .to_string()
    };

    // Web sign-on is opt-in per connector: without --web-origin the page offers no button
    // and the authority refuses a start (a rogue gateway's included).
    add_oidc(None);
    let mut b = Browser::start();
    b.cmd(json!({"op": "open", "url": url}));
    let offered = b.eval(
        "fetch('/api/sso/connectors').then((r) => r.json()).then((j) => j.connectors.length)",
    );
    assert_eq!(offered, 0, "a connector without --web-origin is offered");
    let refused = start_status(&mut b);
    assert!(
        refused.starts_with("401") && refused.contains("not enabled for the web console"),
        "{refused}"
    );
    // Enabled for another console only: this one's callback is refused.
    add_oidc(Some("https://console.example:3443"));
    let refused = start_status(&mut b);
    assert!(
        refused.starts_with("401") && refused.contains("not among"),
        "{refused}"
    );
    let listed = c.tctl.ok(&["sso", "connectors", "ls"]).stdout();
    assert!(listed.contains("https://console.example:3443"), "{listed}");
    add_oidc(Some(&origin));

    b.cmd(json!({"op": "open", "url": url}));
    let (offered, text) = b.wait_text("#sso", "single sign-on");
    assert!(offered, "no single sign-on button: {text:?}");
    b.cmd(json!({"op": "click", "sel": "button.sso[data-connector='oidc']"}));
    let at_idp = |b: &mut Browser| {
        wait_until(Duration::from_secs(30), || {
            b.cmd(json!({"op": "url"}))["url"]
                .as_str()
                .unwrap_or("")
                .starts_with(idp.get("ISSUER"))
        })
    };
    assert!(at_idp(&mut b), "{}", b.eval("document.body.innerText"));
    let landed =
        b.cmd(json!({"op": "idpLogin", "username": "alice", "until": url, "timeoutMs": 60000}));
    assert!(
        landed["url"].as_str().unwrap().starts_with(&url),
        "{landed}"
    );
    let (who, text) = b.wait_text("#who", "alice");
    assert!(
        who,
        "not logged in after single sign-on: {text:?} {}",
        b.eval("document.body.innerText")
    );
    assert!(b.wait_text("#devices", "van-1").0);
    // The code left the address bar; the session is bound to this page's key like a
    // password login's.
    assert_eq!(b.eval("location.pathname"), "/");
    let cookie = b.session_cookie();
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 200);
    assert_eq!(
        b.status("edgeport.signedFetch('/api/session', {}, {sign: false})"),
        401
    );
    // A terminal as the mapped login.
    b.cmd(json!({"op": "click", "sel": "button.connect[data-device='van-1']"}));
    let (ready, status) = b.wait_text("#term-status", "recorded");
    assert!(ready, "the terminal did not open: {status}");
    // The login is audited as single sign-on.
    let events = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "user.login",
            "--format",
            "json",
        ])
        .json();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["user"] == "alice" && e["connector"] == "oidc" && e["success"] == true),
        "{events:#}"
    );
    // Logout ends the session (and its terminal) at the authority.
    b.cmd(json!({"op": "click", "sel": "#logout"}));
    assert!(b.wait_text("#login-error", "logged out").0);
    b.cmd(json!({"op": "setCookies", "cookies": [cookie]}));
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 401);

    // A stolen callback: someone else's login (started with a key this browser never had)
    // comes back from the provider with its code and state, and is opened here, where this
    // browser has a login of its own in progress. The authority refuses it: the signature
    // is not by the key that started it.
    let victim_start = b.eval(
        "(async () => {
            const k = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
            const pub = Array.from(new Uint8Array(await crypto.subtle.exportKey('raw', k.publicKey)), (x) => x.toString(16).padStart(2, '0')).join('');
            const r = await fetch('/api/sso/start', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                body: JSON.stringify({ connector: 'oidc', browser_key: pub }) });
            return (await r.json()).auth_url;
        })()",
    );
    let victim_start = victim_start.as_str().unwrap().to_string();
    let mut other = Command::new("bash");
    other
        .arg(peers_dir().join("oidc.sh"))
        .args(["login", &victim_start, "alice", &callback]);
    let seen = run(other, None, Duration::from_secs(120));
    let stolen = seen
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("FINAL_URL="))
        .unwrap_or("")
        .to_string();
    assert!(
        stolen.starts_with(&callback) && stolen.contains("code="),
        "{}",
        seen.stdout()
    );
    // This browser's own login in progress: a key of its own where the page keeps it while
    // at the provider.
    b.cmd(json!({"op": "open", "url": url}));
    let kept = b.eval(
        "new Promise(async (ok, fail) => {
            const k = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
            const open = indexedDB.open('edgeport', 1);
            open.onupgradeneeded = () => open.result.createObjectStore('keys');
            open.onerror = () => fail(open.error);
            open.onsuccess = () => {
                const tx = open.result.transaction('keys', 'readwrite');
                tx.objectStore('keys').put(k, 'sso');
                tx.oncomplete = () => { open.result.close(); ok(true); };
            };
        })",
    );
    assert_eq!(kept, true);
    b.cmd(json!({"op": "open", "url": stolen}));
    let (refused, text) = b.wait_text("#login-error", "another browser");
    assert!(refused, "a stolen callback was not refused: {text:?}");
    assert_eq!(b.eval("document.getElementById('who').textContent"), "");

    // A web login is never silent: although this browser is still signed in at the
    // provider, it is asked to log in again (prompt=login, max_age=0). And a locked user
    // gets no web session through single sign-on.
    c.tctl
        .ok(&["lock", "--user", "alice", "--message", "web-sso-lock"]);
    b.cmd(json!({"op": "open", "url": url}));
    assert!(b.wait_text("#sso", "single sign-on").0);
    b.cmd(json!({"op": "click", "sel": "button.sso[data-connector='oidc']"}));
    assert!(at_idp(&mut b), "{}", b.eval("document.body.innerText"));
    let asked = wait_until(Duration::from_secs(30), || {
        b.eval("!!document.querySelector('input[name=\"login\"]')") == true
    });
    assert!(
        asked,
        "the provider did not ask a signed-in user to log in again: {}",
        b.eval("location.href")
    );
    let landed =
        b.cmd(json!({"op": "idpLogin", "username": "alice", "until": url, "timeoutMs": 60000}));
    assert!(
        landed["url"].as_str().unwrap().starts_with(&url),
        "{landed}"
    );
    let (locked, text) = b.wait_text("#login-error", "locked");
    assert!(
        locked,
        "a locked user logged in with single sign-on: {text:?}"
    );
    assert_eq!(b.eval("document.getElementById('who').textContent"), "");
}

/// The same with GitHub (`tests/peers/github.sh`): a team mapping grants the login, and the
/// session's terminal opens.
#[test]
fn web_console_single_sign_on_with_github() {
    let gh = Peer::start("github.sh", &[], &[("GITHUB_TEAMS", "dave:octo-org/devs")]);
    let port = free_port();
    let web_addr = format!("127.0.0.1:{port}");
    let c = Cluster::start_with_gateway_args(
        "webgh",
        &[("van-1", "fleet=vans")],
        &["--web-addr", &web_addr],
    );
    let url = format!("https://{web_addr}/");
    let secret = c.dir.join("github-client-secret");
    std::fs::write(&secret, gh.get("GITHUB_CLIENT_SECRET")).unwrap();
    c.tctl.ok(&[
        "sso",
        "connectors",
        "add",
        "github",
        "--client-id",
        gh.get("GITHUB_CLIENT_ID"),
        "--client-secret-file",
        secret.to_str().unwrap(),
        "--github-url",
        gh.get("GITHUB_URL"),
        "--api-url",
        gh.get("GITHUB_API_URL"),
        "--web-origin",
        &format!("https://{web_addr}"),
    ]);
    c.tctl
        .ok(&["sso", "map", "github:octo-org/devs", "--logins", "root"]);

    let mut b = Browser::start();
    // The provider's error comes back as a code: the page shows its own words for it, never
    // the description in the address (which anyone can write into a link).
    b.cmd(json!({"op": "open", "url": format!("{url}web/sso/github/callback?error=access_denied&error_description=Call+0800-SCAM+now")}));
    let (shown, text) = b.wait_text("#login-error", "cancelled or denied");
    assert!(shown && !text.contains("SCAM"), "{text:?}");
    b.cmd(json!({"op": "open", "url": format!("{url}web/sso/github/callback?error=made_up&error_description=SCAM")}));
    let (shown, text) = b.wait_text("#login-error", "refused by the identity provider");
    assert!(shown && !text.contains("SCAM"), "{text:?}");
    b.cmd(json!({"op": "open", "url": url}));
    let (offered, text) = b.wait_text("#sso", "GitHub");
    assert!(offered, "no GitHub button: {text:?}");
    b.cmd(json!({"op": "click", "sel": "button.sso[data-connector='github']"}));
    assert!(wait_until(Duration::from_secs(30), || {
        b.cmd(json!({"op": "url"}))["url"]
            .as_str()
            .unwrap_or("")
            .starts_with(gh.get("GITHUB_URL"))
    }));
    let landed =
        b.cmd(json!({"op": "idpLogin", "username": "dave", "until": url, "timeoutMs": 60000}));
    assert!(
        landed["url"].as_str().unwrap().starts_with(&url),
        "{landed}"
    );
    let (who, text) = b.wait_text("#who", "dave");
    assert!(
        who,
        "not logged in with GitHub: {text:?} {}",
        b.eval("document.body.innerText")
    );
    assert!(b.wait_text("#devices", "van-1").0);
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 200);
    b.cmd(json!({"op": "click", "sel": "button.connect[data-device='van-1']"}));
    let (ready, status) = b.wait_text("#term-status", "recorded");
    assert!(ready, "the terminal did not open: {status}");
    assert_eq!(
        b.status("edgeport.signedFetch('/api/logout', {method: 'POST'})"),
        200
    );
    assert!(b.wait_text("#term", "logged out").0);
    assert_eq!(b.status("edgeport.signedFetch('/api/session')"), 401);
}
