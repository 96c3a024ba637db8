//! Metrics and health (issue 24): an authority and a gateway started with `--metrics-addr`,
//! one agent, and a `tsh ssh` through them. Both `/metrics` endpoints are scraped over HTTP
//! and read with a Prometheus text parser (the `prometheus-parse` crate, not string
//! matching), and the counters must have moved: one tunnel under its transport, an `ok`
//! dial, a stream open and relayed bytes at the gateway, an `AuthorizeDial` latency sample on
//! both sides, stored audit events and the device gauges at the authority, build info on
//! both. Anything but `GET /metrics` is refused.
//!
//! `tctl status` (text and JSON) shows the CAs with the fingerprints `ssh-keygen -lf` prints
//! for `tctl auth export`, the gateway with its version, tunnel and last report, and the
//! devices online; once the agent is killed, one device offline and it as the oldest
//! offline audit spool.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use edgeport_e2e::fabric::{wait_offline, wait_online, Agent, Gateway, Tctl};
use edgeport_e2e::ssh::Tsh;
use edgeport_e2e::{free_port, run, wait_until, Authority, TempDir};
use prometheus_parse::{Scrape, Value};

const PW: &str = "correct horse battery";

/// One HTTP/1.1 GET; the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn scrape(addr: &str) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of `metric` whose labels include all of `labels` (summed over the rest); for
/// a histogram, its number of observations.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            Value::Summary(_) => 0.0,
        })
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

fn build_info(s: &Scrape, component: &str) {
    let info = s
        .samples
        .iter()
        .find(|x| x.metric == "edgeport_build_info" && x.labels.get("component") == Some(component))
        .unwrap_or_else(|| panic!("no build info for {component}: {:?}", s.samples));
    assert_eq!(info.value, Value::Gauge(1.0));
    assert_eq!(info.labels.get("version"), Some(edgeport_proto::VERSION));
    assert!(info.labels.get("commit").is_some_and(|c| !c.is_empty()));
}

/// `ssh-keygen -lf` of one public key line: `SHA256:...`.
fn keygen_fingerprint(dir: &std::path::Path, line: &str) -> String {
    let path = dir.join("ca.pub");
    std::fs::write(&path, line).unwrap();
    let mut c = Command::new("ssh-keygen");
    c.arg("-lf").arg(&path);
    let r = run(c, None, Duration::from_secs(30)).expect_ok("ssh-keygen -lf");
    r.stdout()
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_string()
}

#[test]
fn metrics_are_scraped_and_status_shows_the_cluster() {
    let dir = TempDir::new();
    let auth_metrics = format!("127.0.0.1:{}", free_port());
    let gw_metrics = format!("127.0.0.1:{}", free_port());
    let auth_addr = format!("127.0.0.1:{}", free_port());
    let auth = Authority::start_env(
        &dir.join("authority"),
        "metered",
        &auth_addr,
        &[("EDGEPORT_METRICS_ADDR", auth_metrics.as_str())],
    );
    let tctl = Tctl::of(&auth);
    let gw = Gateway::start_with(
        &dir.join("gateway"),
        &auth,
        &["--metrics-addr", &gw_metrics],
    );
    let mut agent = Agent::start(&dir.join("agent-dev1"), &gw, "dev1", "fleet=vans", &[]);
    let dev = wait_online(&tctl, "dev1", None, Duration::from_secs(60));
    let transport = dev["transport"].as_str().expect("transport").to_string();

    // Before any dial: build info, both transports listed, one tunnel under the device's.
    let g = scrape(&gw_metrics);
    build_info(&g, "gateway");
    build_info(&scrape(&auth_metrics), "authority");
    assert_eq!(
        value(&g, "edgeport_gateway_tunnels", &[("transport", &transport)]),
        Some(1.0)
    );
    assert_eq!(value(&g, "edgeport_gateway_tunnels", &[]), Some(1.0));

    // A user's `tsh ssh` through the gateway.
    auth.add_user("alice", "root", PW);
    let tsh = Tsh::new(dir.join("tsh"), &gw.addr);
    tsh.login("alice", PW, &gw.ca_pin, &[])
        .expect_ok("tsh login");
    let r = tsh.run(&["ssh", "root@dev1", "echo", "metered"], None);
    assert_eq!(r.stdout(), "metered\n", "{}", r.stderr());

    // The gateway: a dial counted, a stream opened, its bytes relayed once the splice ended.
    let mut g = scrape(&gw_metrics);
    let relayed = wait_until(Duration::from_secs(30), || {
        g = scrape(&gw_metrics);
        value(
            &g,
            "edgeport_gateway_relayed_bytes_total",
            &[("direction", "down")],
        )
        .is_some_and(|v| v > 0.0)
    });
    assert!(relayed, "no relayed bytes: {:?}", g.samples);
    assert!(
        value(&g, "edgeport_gateway_dials_total", &[("result", "ok")]).is_some_and(|n| n >= 1.0)
    );
    assert!(value(&g, "edgeport_gateway_stream_open_seconds", &[]).is_some_and(|n| n >= 1.0));
    assert!(
        value(
            &g,
            "edgeport_gateway_authority_rpc_seconds",
            &[("method", "AuthorizeDial")]
        )
        .is_some_and(|n| n >= 1.0),
        "{:?}",
        g.samples
    );
    assert_eq!(
        value(&g, "edgeport_gateway_tunnels", &[("transport", &transport)]),
        Some(1.0)
    );
    assert!(value(&g, "edgeport_gateway_sessions_active", &[]).is_some());
    assert!(value(&g, "edgeport_gateway_locks", &[]).is_some());

    // The authority: the dial's authorisation timed, the session's audit events stored, the
    // device gauges read from the store (every 15 s).
    let mut a = scrape(&auth_metrics);
    let moved = wait_until(Duration::from_secs(60), || {
        a = scrape(&auth_metrics);
        value(&a, "edgeport_authority_devices", &[("state", "online")]) == Some(1.0)
            && value(
                &a,
                "edgeport_authority_audit_events_total",
                &[("outcome", "accepted")],
            )
            .is_some_and(|v| v > 0.0)
    });
    assert!(moved, "authority gauges did not move: {:?}", a.samples);
    assert!(
        value(
            &a,
            "edgeport_authority_rpc_seconds",
            &[("method", "AuthorizeDial")]
        )
        .is_some_and(|n| n >= 1.0),
        "{:?}",
        a.samples
    );
    assert_eq!(
        value(
            &a,
            "edgeport_authority_audit_events_total",
            &[("outcome", "lost")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&a, "edgeport_authority_gateways", &[]), Some(1.0));
    assert!(value(&a, "edgeport_authority_locks", &[]).is_some());

    // Only GET /metrics is served.
    let (status, _) = http_get(&gw_metrics, "/");
    assert!(status.contains(" 404 "), "{status}");

    // tctl status: the CAs as ssh-keygen fingerprints them, the gateway, the devices.
    let user_ca = tctl.ok(&["auth", "export", "--type", "user"]).stdout();
    let host_line = tctl.ok(&["auth", "export", "--type", "host"]).stdout();
    let host_ca = host_line
        .split_whitespace()
        .skip_while(|w| !w.starts_with("ssh-"))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let mut st = tctl.ok(&["status", "--format", "json"]).json();
    let reported = wait_until(Duration::from_secs(60), || {
        st = tctl.ok(&["status", "--format", "json"]).json();
        st["gateways"][0]["tunnels"] == 1 && !st["gateways"][0]["last_report"].is_null()
    });
    assert!(reported, "{st:#}");
    assert_eq!(st["cluster"], "metered");
    let cas = st["cas"].as_array().expect("cas");
    let fp = |kind: &str| {
        cas.iter()
            .find(|c| c["type"] == kind)
            .and_then(|c| c["fingerprint"].as_str())
            .unwrap_or_else(|| panic!("no {kind} CA in {st:#}"))
            .to_string()
    };
    assert_eq!(fp("user"), keygen_fingerprint(dir.path(), &user_ca));
    assert_eq!(fp("host"), keygen_fingerprint(dir.path(), &host_ca));
    assert_eq!(fp("x509"), gw.ca_pin);
    assert_eq!(st["authorities"][0]["address"], auth.addr);
    assert_eq!(st["gateways"][0]["version"], edgeport_proto::VERSION);
    assert_eq!(st["devices"]["online"], 1);
    assert_eq!(st["devices"]["offline"], 0);
    assert!(st["oldest_offline_spool"].is_null(), "{st:#}");
    let text = tctl.ok(&["status"]).stdout();
    assert!(text.contains("1 online, 0 offline"), "{text}");
    assert!(text.contains(&fp("user")), "{text}");

    // The agent stops: one device offline, and it holds the oldest offline spool.
    agent.proc.stop();
    wait_offline(&tctl, "dev1", Duration::from_secs(120));
    let st = tctl.ok(&["status", "--format", "json"]).json();
    assert_eq!(st["devices"]["online"], 0, "{st:#}");
    assert_eq!(st["devices"]["offline"], 1, "{st:#}");
    assert_eq!(st["oldest_offline_spool"]["device"], "dev1", "{st:#}");
    let text = tctl.ok(&["status"]).stdout();
    assert!(text.contains("oldest offline audit spool: dev1"), "{text}");
    // And the gateway's gauge follows the tunnel down.
    let gone = wait_until(Duration::from_secs(60), || {
        value(&scrape(&gw_metrics), "edgeport_gateway_tunnels", &[]) == Some(0.0)
    });
    assert!(gone, "the tunnel gauge did not go back to 0");
}
