//! Unauthenticated load against the gateway's TCP port (issue 28).
//!
//! One address holds 300 idle connections (a slow-loris; the flood comes from 127.0.0.2,
//! everyone else from 127.0.0.1), reopening them as the gateway closes them. The address
//! holds its own few handshake slots and waits for them, instead of taking the port's: a new
//! agent still joins, and `tsh ssh` works over TCP and over QUIC. The idle connections are
//! closed at the handshake deadline.
//!
//! Fifty addresses (127.0.0.2 to 127.0.0.51) hold 6 idle connections each, more than the
//! port's 256 handshake slots, and fill the three quarters that anonymous clients may take,
//! never more. The quarter kept for sources that proved a certificate recently (here
//! 127.0.0.1, where the agents and tsh run) stays free: an established agent stays up, a
//! returning agent reconnects over TCP, a new agent joins, and `tsh ssh` works over TCP and
//! QUIC.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::thread::JoinHandle;

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{free_port, wait_until};
use prometheus_parse::{Scrape, Value};

const PW: &str = "correct horse battery";
const FLOOD: usize = 300;

#[test]
fn one_address_with_hundreds_of_idle_connections_starves_nobody() {
    let c = Cluster::start("preauth", &[("dev1", "")]);
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");

    // A slow-loris: FLOOD connections from one address that never send a byte, reopened as
    // soon as the gateway closes them, until the checks below are done.
    let gw: std::net::SocketAddr = c.gw.addr.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicUsize::new(0));
    let flood = flood(
        gw,
        vec![Ipv4Addr::new(127, 0, 0, 2)],
        FLOOD,
        stop.clone(),
        reopened.clone(),
    );
    let flood_began = Instant::now();
    std::thread::sleep(Duration::from_secs(1));

    // Everyone else is served while the flood holds its connections.
    let t = Instant::now();
    let _agent = Agent::start(&c.dir.join("agent-new"), &c.gw, "newcomer", "", &[]);
    wait_online(&c.tctl, "newcomer", None, Duration::from_secs(30));
    let joined_in = t.elapsed();
    let tcp = tsh
        .run(&["ssh", "dev1", "echo", "over-tcp"], None)
        .expect_ok("tsh ssh over TCP during the flood");
    assert_eq!(tcp.stdout(), "over-tcp\n");
    let quic = tsh
        .run(
            &["--transport", "quic", "ssh", "dev1", "echo", "over-quic"],
            None,
        )
        .expect_ok("tsh ssh over QUIC during the flood");
    assert_eq!(quic.stdout(), "over-quic\n");
    eprintln!("a new agent joined in {joined_in:?} with {FLOOD} idle connections from one address");

    // Past the handshake deadline (10 s) the gateway has closed flood connections, which the
    // flood reopened.
    if let Some(rest) = Duration::from_secs(13).checked_sub(flood_began.elapsed()) {
        std::thread::sleep(rest);
    }
    stop.store(true, Ordering::SeqCst);
    let left = flood.join().unwrap();
    // The flood's connections end: past its budget at once, the rest at the handshake
    // deadline (10 s); the flood had to reopen them again and again.
    assert!(
        reopened.load(Ordering::SeqCst) > FLOOD,
        "the gateway kept the flood's connections open"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let closed = rt.block_on(async {
        let mut closed = 0;
        for s in left {
            let s = tokio::net::TcpStream::from_std(s).unwrap();
            let mut s = s;
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::io::AsyncReadExt::read(&mut s, &mut buf),
            )
            .await;
            if matches!(r, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        closed
    });
    assert_eq!(
        closed, FLOOD,
        "idle connections left open past the deadline"
    );
}

/// `per_source` connections from each of `sources` to `gw` that never send a byte,
/// reopened as soon as the gateway closes them, until `stop`; `reopened` counts every
/// connection made. Returns the connections still open at the end.
fn flood(
    gw: SocketAddr,
    sources: Vec<Ipv4Addr>,
    per_source: usize,
    stop: Arc<AtomicBool>,
    reopened: Arc<AtomicUsize>,
) -> JoinHandle<Vec<std::net::TcpStream>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let open = |from: Ipv4Addr| async move {
                let s = tokio::net::TcpSocket::new_v4().unwrap();
                s.bind(SocketAddr::new(from.into(), 0)).unwrap();
                s.connect(gw).await.ok()
            };
            let mut conns: Vec<Vec<tokio::net::TcpStream>> =
                sources.iter().map(|_| Vec::new()).collect();
            while !stop.load(Ordering::SeqCst) {
                for (from, held) in sources.iter().zip(conns.iter_mut()) {
                    // Drop what the gateway closed, then fill up again.
                    held.retain(|s| {
                        let mut b = [0u8; 16];
                        match s.try_read(&mut b) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        }
                    });
                    while held.len() < per_source {
                        match open(*from).await {
                            Some(s) => {
                                held.push(s);
                                reopened.fetch_add(1, Ordering::SeqCst);
                            }
                            None => break,
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            conns
                .into_iter()
                .flatten()
                .map(|s| s.into_std().unwrap())
                .collect()
        })
    })
}

/// The gateway's default handshake slots per port, and the share anonymous clients may
/// take (all but a quarter: docs/security.md "Before authentication").
const SLOTS: usize = 256;
const ANONYMOUS_SHARE: usize = SLOTS - SLOTS / 4;
const SOURCES: u8 = 50;
const PER_SOURCE: usize = 6;

#[test]
fn fifty_addresses_of_idle_connections_leave_the_reserve_to_known_sources() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start_with_gateway_args(
        "preauth-many",
        &[("dev1", "")],
        &["--metrics-addr", &metrics],
    );
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    // An agent on TCP, so that its return below meets the flood. It and dev1 proved their
    // certificates from 127.0.0.1, which makes that address known to the gateway.
    let mut returning = Agent::start(
        &c.dir.join("agent-tcpdev"),
        &c.gw,
        "tcpdev",
        "",
        &["--transport", "tcp"],
    );
    wait_online(&c.tctl, "tcpdev", Some("tcp"), Duration::from_secs(60));
    let established = &c.agents[0];
    assert_eq!(established.tunnels_up(), 1);

    // 300 idle connections from 50 addresses: more than the port's slots.
    let gw: SocketAddr = c.gw.addr.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicUsize::new(0));
    let sources = (0..SOURCES)
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i))
        .collect();
    let flood = flood(gw, sources, PER_SOURCE, stop.clone(), reopened.clone());

    // The anonymous handshakes in progress on the TCP port, as the gateway counts them.
    let anonymous = || {
        value(
            &scrape(&metrics),
            "edgeport_gateway_handshakes_in_flight",
            &[("port", "tcp"), ("class", "anonymous")],
        )
        .unwrap_or(0.0) as usize
    };
    let mut most = 0;
    let full = wait_until(Duration::from_secs(60), || {
        let n = anonymous();
        most = most.max(n);
        n == ANONYMOUS_SHARE
    });
    assert!(
        full,
        "the flood never filled the anonymous share ({most} of {ANONYMOUS_SHARE} at most)"
    );

    // Everyone with a certificate is served while the flood holds its share.
    returning.restart();
    assert!(
        wait_until(Duration::from_secs(60), || returning.tunnels_up() >= 1),
        "the returning agent did not reconnect over TCP during the flood:\n{}",
        returning.proc.log_text()
    );
    most = most.max(anonymous());
    let _newcomer = Agent::start(
        &c.dir.join("agent-new"),
        &c.gw,
        "newcomer",
        "",
        &["--transport", "tcp"],
    );
    wait_online(&c.tctl, "newcomer", Some("tcp"), Duration::from_secs(60));
    for i in 0..3 {
        let word = format!("over-tcp-{i}");
        let tcp = tsh
            .run(&["ssh", "tcpdev", "echo", &word], None)
            .expect_ok("tsh ssh over TCP during the flood");
        assert_eq!(tcp.stdout(), format!("{word}\n"));
        most = most.max(anonymous());
    }
    let quic = tsh
        .run(
            &["--transport", "quic", "ssh", "dev1", "echo", "over-quic"],
            None,
        )
        .expect_ok("tsh ssh over QUIC during the flood");
    assert_eq!(quic.stdout(), "over-quic\n");
    most = most.max(anonymous());
    assert_eq!(
        established.tunnels_up(),
        1,
        "the established agent lost its tunnel during the flood"
    );
    wait_online(&c.tctl, "dev1", None, Duration::from_secs(10));

    // Idle connections are dropped at the handshake deadline (10 s) and reopened: the
    // flood goes on holding its share, never more.
    let dropped = wait_until(Duration::from_secs(60), || {
        most = most.max(anonymous());
        reopened.load(Ordering::SeqCst) > SOURCES as usize * PER_SOURCE
    });
    stop.store(true, Ordering::SeqCst);
    drop(flood.join().unwrap());
    assert!(
        dropped,
        "the gateway kept every flood connection past the handshake deadline"
    );
    assert!(
        most <= ANONYMOUS_SHARE,
        "anonymous handshakes took the reserve: {most} in progress"
    );
}

/// One HTTP/1.1 GET of `/metrics`, parsed.
fn scrape(addr: &str) -> Scrape {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the metrics");
    let (_, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of a gauge or counter whose labels include all of `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .find_map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            _ => None,
        })
}
