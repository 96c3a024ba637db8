//! Unauthenticated load against the gateway's TCP port (issue 28): one address holds 300
//! idle connections (a slow-loris; the flood comes from 127.0.0.2, everyone else from
//! 127.0.0.1), reopening them as the gateway closes them. The address holds its own few
//! handshake slots and waits for them, instead of taking the port's: a new agent still joins,
//! and `tsh ssh` works over TCP and over QUIC. The idle connections are closed at the
//! handshake deadline.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_e2e::fabric::{wait_online, Agent};
use edgeport_e2e::ssh::{Cluster, Tsh};

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
    let flood = {
        let (stop, reopened) = (stop.clone(), reopened.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let open = || async {
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                    s.connect(gw).await.ok()
                };
                let mut conns = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // Drop what the gateway closed, then fill up again.
                    conns.retain(|s: &tokio::net::TcpStream| {
                        let mut b = [0u8; 16];
                        match s.try_read(&mut b) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        }
                    });
                    while conns.len() < FLOOD {
                        match open().await {
                            Some(s) => {
                                conns.push(s);
                                reopened.fetch_add(1, Ordering::SeqCst);
                            }
                            None => break,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                conns
            })
        })
    };
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
            let mut s = tokio::net::TcpStream::from_std(s.into_std().unwrap()).unwrap();
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
