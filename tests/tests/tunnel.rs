//! Reverse tunnels end to end (issue 4): real authority, gateway and agents on loopback.
//!
//! - joins show up online with their labels; bad pins, tokens and foreign certificates are
//!   refused with a clear message and never reach the inventory; removed devices are cut off;
//! - 100 concurrent echo streams of 10 MiB each through one tunnel, over QUIC and over TCP;
//! - with the gateway's UDP port blocked (nftables) the agent runs on TCP and moves back to
//!   QUIC by itself once UDP works again;
//! - a gateway killed with -9 lets its devices go offline (lease) and gets them back when it
//!   restarts; a killed agent rejoins without a token;
//! - garbage, oversized frames and slow-loris connections are dropped without disturbing an
//!   online agent.
//!
//! User streams are opened the way tsh does: `edgeport-dial/1` with a user certificate from
//! `tctl auth sign --format tls`, `ClientRequest::Dial{service: Echo}`.
//!
//! Stream open latency and echo throughput are printed (run with `--nocapture`), never
//! asserted.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpStream as StdTcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_e2e::dial::{cluster_ca_der, user_tls};
use edgeport_e2e::fabric::{agent_once, wait_offline, wait_online, Agent, Gateway, Tctl};
use edgeport_e2e::{run, wait_until, Authority, TempDir};
use edgeport_net::mux::{self, Mode, MuxConfig};
use edgeport_net::write_gate::WriteGate;
use edgeport_net::BoxedStream;
use edgeport_net::{read_frame, write_frame};
use edgeport_proto::alpn;
use edgeport_proto::keys::KeyPair;
use edgeport_proto::tls::{client_config, CertKey, GATEWAY_SERVER_NAME};
use edgeport_proto::tunnel::{
    AgentControl, ClientReply, ClientRequest, GatewayControl, Hello, JoinMessage, Service,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAMS: usize = 100;
const STREAM_BYTES: usize = 10 << 20;

fn rt() -> tokio::runtime::Runtime {
    edgeport_proto::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(GATEWAY_SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// How a test reaches the gateway's dial service.
enum Dialer {
    Tcp {
        cfg: Arc<rustls::ClientConfig>,
        addr: String,
    },
    /// Like tsh's and the gateways' multiplexed legs, requests go ahead of the bulk writes
    /// of the connection's other streams.
    Quic(quinn::Connection, Arc<WriteGate>),
}

impl Dialer {
    async fn quic(cfg: Arc<rustls::ClientConfig>, addr: &str) -> Self {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from((*cfg).clone()).unwrap();
        let mut qc = quinn::ClientConfig::new(Arc::new(crypto));
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(quinn::VarInt::from_u32(16 << 20))
            .receive_window(quinn::VarInt::from_u32(64 << 20))
            .send_window(64 << 20);
        qc.transport_config(Arc::new(t));
        ep.set_default_client_config(qc);
        let conn = ep
            .connect(addr.parse().unwrap(), GATEWAY_SERVER_NAME)
            .unwrap()
            .await
            .expect("QUIC connection to the gateway");
        Dialer::Quic(conn, WriteGate::new())
    }

    async fn stream(&self) -> BoxedStream {
        match self {
            Dialer::Tcp { cfg, addr } => Box::new(tls_connect(cfg.clone(), addr).await.unwrap()),
            Dialer::Quic(c, _) => {
                let (send, recv) = c.open_bi().await.unwrap();
                Box::new(tokio::io::join(recv, send))
            }
        }
    }

    /// Dial{target, service}; returns the stream after DialOk, or the refusal.
    async fn dial(&self, target: &str, service: Service) -> Result<BoxedStream, String> {
        let mut s = self.stream().await;
        let req = ClientRequest::Dial {
            target: target.to_string(),
            service,
        };
        let urgent = match self {
            Dialer::Quic(_, gate) => Some(gate.urgent()),
            Dialer::Tcp { .. } => None,
        };
        write_frame(&mut s, &req).await.map_err(|e| e.to_string())?;
        drop(urgent);
        match read_frame::<ClientReply, _>(&mut s).await {
            Ok(ClientReply::DialOk { device_id, .. }) => {
                assert_eq!(device_id, target);
                Ok(match self {
                    Dialer::Quic(_, gate) => Box::new(gate.gate(s)),
                    Dialer::Tcp { .. } => s,
                })
            }
            Ok(ClientReply::Refused(e)) => Err(e.to_string()),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Sends `size` bytes from `data[offset..]` through an echo stream and checks every byte
/// that comes back.
async fn echo_one(
    dialer: Arc<Dialer>,
    target: String,
    data: Arc<Vec<u8>>,
    offset: usize,
    size: usize,
) {
    let s = dialer.dial(&target, Service::Echo).await.expect("dial");
    let (mut r, mut w) = tokio::io::split(s);
    let src = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&src[offset..offset + size]).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.expect("echo read");
        if n == 0 {
            break;
        }
        assert!(got + n <= size, "echo sent back more than was sent");
        assert!(
            buf[..n] == data[offset + got..offset + got + n],
            "echo bytes differ at {got}"
        );
        got += n;
    }
    assert_eq!(got, size, "echo stream ended early");
    writer.await.unwrap();
}

/// `STREAMS` concurrent echo streams of `STREAM_BYTES` each; prints the numbers.
async fn echo_many(dialer: Arc<Dialer>, target: &str, label: &str) {
    let data: Arc<Vec<u8>> =
        Arc::new(edgeport_proto::keys::random_bytes(STREAM_BYTES + STREAMS * 4099).unwrap());
    // Open latency: sequential tiny echoes.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut s = dialer.dial(target, Service::Echo).await.expect("dial");
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let start = Instant::now();
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            tokio::spawn(echo_one(
                dialer.clone(),
                target.to_string(),
                data.clone(),
                i * 4099,
                STREAM_BYTES,
            ))
        })
        .collect();
    // Dials while the bulk streams fill the tunnel: each must get through (issue 28: they
    // timed out waiting for flow-control credit behind the bulk writes).
    let during = {
        let (dialer, target) = (dialer.clone(), target.to_string());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for _ in 0..10 {
                let t = Instant::now();
                let mut s = dialer
                    .dial(&target, Service::Echo)
                    .await
                    .expect("dial during bulk transfers");
                s.write_all(b"y").await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"y");
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            worst
        })
    };
    for t in tasks {
        t.await.expect("echo stream");
    }
    let worst_during = during.await.expect("dials during bulk transfers");
    let secs = start.elapsed().as_secs_f64();
    let mib = (STREAMS * STREAM_BYTES) as f64 / (1 << 20) as f64;
    eprintln!(
        "MEASURE {label}: open+first byte median {:?} (min {:?}, max {:?}); \
         {STREAMS} x {} MiB echo in {secs:.1}s = {:.0} MiB/s each way; \
         slowest of 10 dials during it {worst_during:?}",
        lat[lat.len() / 2],
        lat[0],
        lat[lat.len() - 1],
        STREAM_BYTES >> 20,
        mib / secs
    );
}

/// One small echo, to show streams work.
async fn echo_small(dialer: &Arc<Dialer>, target: &str) {
    let data = Arc::new(edgeport_proto::keys::random_bytes(1 << 20).unwrap());
    tokio::time::timeout(
        Duration::from_secs(30),
        echo_one(dialer.clone(), target.to_string(), data, 0, 1 << 20),
    )
    .await
    .expect("echo in time");
}

/// Blocks UDP to the gateway's port on this host (a dedicated nftables table, removed on
/// drop).
struct UdpBlock {
    table: String,
}

impl UdpBlock {
    fn new(port: u16) -> Self {
        let table = format!("edgeport_test_{port}");
        let _ = run(
            {
                let mut c = Command::new("nft");
                c.args(["delete", "table", "inet", &table]);
                c
            },
            None,
            Duration::from_secs(10),
        );
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    udp dport {port} drop\n  }}\n}}\n"
        );
        let mut c = Command::new("nft");
        c.args(["-f", "-"]);
        run(c, Some(script.as_bytes()), Duration::from_secs(10))
            .expect_ok("nft (needs root and nftables)");
        Self { table }
    }
}

impl Drop for UdpBlock {
    fn drop(&mut self) {
        let mut c = Command::new("nft");
        c.args(["delete", "table", "inet", &self.table]);
        let _ = c.output();
    }
}

fn assert_absent(tctl: &Tctl, id: &str) {
    assert!(
        tctl.device(id).is_none(),
        "refused device {id} is in the inventory: {:?}",
        tctl.device(id)
    );
}

/// Sends Hello over a TCP tunnel connection made with `me`, trusting `ca`; returns the
/// gateway's answer or the error that ended the exchange.
async fn tunnel_hello(
    ca: &[u8],
    me: &CertKey,
    addr: &str,
    id: &str,
) -> Result<GatewayControl, String> {
    let cfg = Arc::new(client_config(ca, Some(me), &[alpn::TUNNEL]).unwrap());
    let tls = tls_connect(cfg, addr).await.map_err(|e| e.to_string())?;
    let (handle, _incoming) = mux::spawn(tls, Mode::Client, &MuxConfig::default());
    let fut = async {
        let mut s = handle.open().await.map_err(|e| e.to_string())?;
        let hello = AgentControl::Hello(Hello {
            device_id: id.to_string(),
            labels: Default::default(),
            version: "test".into(),
            arch: "test".into(),
            kube_cluster: None,
        });
        write_frame(&mut s, &hello)
            .await
            .map_err(|e| e.to_string())?;
        read_frame::<GatewayControl, _>(&mut s)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "no answer".to_string())?
}

fn device_cert(dir: &Path) -> CertKey {
    let key =
        KeyPair::from_openssh(&std::fs::read_to_string(dir.join("device.key")).unwrap()).unwrap();
    let crt = std::fs::read_to_string(dir.join("device.crt")).unwrap();
    CertKey::from_pem(&crt, None, key.pkcs8_der()).unwrap()
}

#[test]
fn join_refusals_and_revocation() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let tctl = gw.tctl.clone();

    // A good join: online within seconds, with the labels it asked for and the token's.
    let (token, pin) = gw.tctl.token("device", "fleet=vans", "10m");
    let mut good = Agent::start_joined(
        &tmp.join("van-1"),
        &gw.addr,
        "van-1",
        &[
            "--token",
            &token,
            "--ca-pin",
            &pin,
            "--id",
            "van-1",
            "--labels",
            "region=eu",
        ],
    );
    let d = wait_online(&tctl, "van-1", Some("quic"), Duration::from_secs(20));
    assert_eq!(d["labels"]["fleet"], "vans");
    assert_eq!(d["labels"]["region"], "eu");
    assert_eq!(d["version"], edgeport_proto::VERSION);
    assert!(d["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    for f in [
        "device.key",
        "device.crt",
        "device-cert.pub",
        "cas.json",
        "device.json",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.join("van-1").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by others");
    }

    // Wrong CA pin: refused before anything is sent, with a hint at --ca-pin.
    let (fresh, _) = gw.device_token("");
    let bad_pin = format!("sha256:{}", "ab".repeat(32));
    let r = agent_once(
        &tmp.join("bad-pin"),
        &gw.addr,
        &["--token", &fresh, "--ca-pin", &bad_pin, "--id", "bad-pin"],
    );
    assert!(!r.ok(), "a wrong pin must fail");
    assert!(r.stderr().contains("--ca-pin"), "{}", r.stderr());
    assert_absent(&tctl, "bad-pin");

    // Unknown token.
    let r = agent_once(
        &tmp.join("bad-token"),
        &gw.addr,
        &[
            "--token",
            &"cd".repeat(32),
            "--ca-pin",
            &pin,
            "--id",
            "bad-token",
        ],
    );
    assert!(!r.ok());
    assert!(r.stderr().contains("join was refused"), "{}", r.stderr());
    assert_absent(&tctl, "bad-token");

    // Expired token.
    let (short, _) = gw.tctl.token("device", "", "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let r = agent_once(
        &tmp.join("late"),
        &gw.addr,
        &["--token", &short, "--ca-pin", &pin, "--id", "late"],
    );
    assert!(!r.ok());
    assert!(
        r.stderr().to_lowercase().contains("expired"),
        "{}",
        r.stderr()
    );
    assert_absent(&tctl, "late");

    // Reused single-use token (van-1 joined with it).
    let r = agent_once(
        &tmp.join("second"),
        &gw.addr,
        &["--token", &token, "--ca-pin", &pin, "--id", "second"],
    );
    assert!(!r.ok());
    assert!(r.stderr().contains("join was refused"), "{}", r.stderr());
    assert_absent(&tctl, "second");

    // A device of another cluster pointed at this gateway: refused both ways.
    let auth2 = Authority::start(&tmp.join("auth2"), "c2");
    let gw2 = Gateway::start(&tmp.join("gw2"), &auth2);
    let mut foreign = Agent::start(&tmp.join("foreign"), &gw2, "foreign-1", "", &[]);
    wait_online(&gw2.tctl, "foreign-1", None, Duration::from_secs(20));
    foreign.proc.stop();
    let mut lost = Agent::start_joined(&tmp.join("foreign"), &gw.addr, "foreign-1", &[]);
    assert!(
        wait_until(Duration::from_secs(30), || lost
            .proc
            .log_text()
            .contains("not from this device's cluster")),
        "agent log:\n{}",
        lost.proc.log_text()
    );
    lost.proc.kill9();
    assert_absent(&tctl, "foreign-1");
    // ... and the gateway refuses its certificate even from a client that trusts this CA.
    let ca1 = cluster_ca_der(&tctl);
    let rt = rt();
    let foreign_cert = device_cert(&tmp.join("foreign"));
    let r = rt.block_on(tunnel_hello(&ca1, &foreign_cert, &gw.addr, "foreign-1"));
    assert!(
        !matches!(r, Ok(GatewayControl::Welcome { .. })),
        "foreign cert got {r:?}"
    );
    // A device's certificate cannot claim another device in Hello.
    let van_cert = device_cert(&tmp.join("van-1"));
    let r = rt.block_on(tunnel_hello(&ca1, &van_cert, &gw.addr, "someone-else"));
    assert!(
        matches!(&r, Ok(GatewayControl::Refused(e)) if e.message.contains("certificate is for")),
        "{r:?}"
    );
    assert_absent(&tctl, "foreign-1");
    assert_absent(&tctl, "someone-else");
    // A user certificate is not a device certificate.
    user_tls(&auth, tmp.path(), "alice");
    let out = tmp.join("alice").display().to_string();
    let key = pem::parse(std::fs::read_to_string(format!("{out}.key")).unwrap())
        .unwrap()
        .into_contents();
    let alice = CertKey::from_pem(
        &std::fs::read_to_string(format!("{out}.crt")).unwrap(),
        None,
        key,
    )
    .unwrap();
    let r = rt.block_on(tunnel_hello(&ca1, &alice, &gw.addr, "alice"));
    assert!(!matches!(r, Ok(GatewayControl::Welcome { .. })), "{r:?}");
    assert_absent(&tctl, "alice");

    // The good device is still there; removing it cuts its tunnel.
    wait_online(&tctl, "van-1", Some("quic"), Duration::from_secs(5));
    tctl.ok(&["devices", "rm", "van-1"]);
    wait_offline(&tctl, "van-1", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || good
            .proc
            .log_text()
            .contains("removed from the cluster")),
        "agent log:\n{}",
        good.proc.log_text()
    );
    good.proc.kill9();
}

#[test]
fn echo_streams_over_quic() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let mut agent = Agent::start(&tmp.join("van-q"), &gw, "van-q", "", &["--test-echo"]);
    wait_online(&gw.tctl, "van-q", Some("quic"), Duration::from_secs(20));
    let user = user_tls(&auth, tmp.path(), "alice");
    let rt = rt();
    rt.block_on(async {
        let dialer = Arc::new(Dialer::quic(user.clone(), &gw.addr).await);
        tokio::time::timeout(
            Duration::from_secs(240),
            echo_many(dialer.clone(), "van-q", "QUIC tunnel, QUIC user leg"),
        )
        .await
        .expect("echo streams finished in time");
        // A user leg over TCP+TLS reaches the same tunnel.
        let tcp = Arc::new(Dialer::Tcp {
            cfg: user.clone(),
            addr: gw.addr.clone(),
        });
        echo_small(&tcp, "van-q").await;
        // Unknown devices and services the agent does not offer are refused or closed.
        let r = tcp.dial("nobody", Service::Echo).await;
        assert!(r.is_err(), "dial to an unknown device succeeded");
    });
    assert_eq!(
        agent.tunnels_up(),
        1,
        "the tunnel was re-established during the test"
    );
    agent.proc.stop();
}

/// `gateway start --max-connections N` caps established connections per port: with 1, a
/// second device's QUIC connection is refused while the first holds the port. The refused
/// agent says the gateway is busy and keeps to its backoff (no probe cuts it short: the
/// gateway plainly answers), and it comes in over QUIC once the first device leaves.
#[test]
fn max_connections_caps_each_port() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let gw = Gateway::start_with(&tmp.join("gw"), &auth, &["--max-connections", "1"]);
    let mut first = Agent::start(&tmp.join("van-1"), &gw, "van-1", "", &["--test-echo"]);
    wait_online(&gw.tctl, "van-1", Some("quic"), Duration::from_secs(30));
    // QUIC only, so that a slow handshake on a loaded machine cannot put it on TCP (whose
    // port has its own cap of 1, free here).
    let mut second = Agent::start(
        &tmp.join("van-2"),
        &gw,
        "van-2",
        "",
        &["--test-echo", "--transport", "quic"],
    );
    let busy = |a: &Agent| a.proc.log_text().matches("the gateway is busy").count();
    assert!(
        wait_until(Duration::from_secs(60), || busy(&second) >= 3),
        "van-2 was not refused as busy three times: {}",
        second.proc.log_text()
    );
    let log = second.proc.log_text();
    assert!(
        !log.contains("answers again"),
        "a probe cut the backoff short: {log}"
    );
    assert!(
        gw.tctl
            .device("van-2")
            .is_some_and(|d| d["online"] == false),
        "van-2 online past the cap: {:?}",
        gw.tctl.device("van-2")
    );
    first.proc.stop();
    wait_online(&gw.tctl, "van-2", Some("quic"), Duration::from_secs(90));
    second.proc.stop();
    // A zero cap is refused at start with clap's one-line error.
    let mut cmd = Command::new(edgeport_e2e::bin("gateway"));
    cmd.args(["start", "--data-dir"])
        .arg(tmp.join("gw-zero"))
        .args(["--auth", &auth.addr, "--max-connections", "0"]);
    let r = run(cmd, None, Duration::from_secs(30));
    assert!(
        !r.ok() && r.stderr().contains("--max-connections"),
        "{}",
        r.stderr()
    );
}

#[test]
fn tcp_fallback_and_back_to_quic() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let block = UdpBlock::new(gw.port);
    let mut agent = Agent::start(
        &tmp.join("van-t"),
        &gw,
        "van-t",
        "",
        &["--test-echo", "--quic-probe-interval", "2s"],
    );
    wait_online(&gw.tctl, "van-t", Some("tcp"), Duration::from_secs(30));
    let user = user_tls(&auth, tmp.path(), "alice");
    let rt = rt();
    rt.block_on(async {
        let dialer = Arc::new(Dialer::Tcp {
            cfg: user.clone(),
            addr: gw.addr.clone(),
        });
        tokio::time::timeout(
            Duration::from_secs(240),
            echo_many(dialer, "van-t", "TCP+TLS+yamux tunnel, TCP user leg"),
        )
        .await
        .expect("echo streams finished in time");
    });
    // The keep-alive on TCP carries the RTT the gateway reports.
    assert!(gw.tctl.device("van-t").unwrap()["rtt_ms"].is_number());
    drop(block);
    wait_online(&gw.tctl, "van-t", Some("quic"), Duration::from_secs(60));
    assert!(agent
        .proc
        .log_text()
        .contains("moved the tunnel back to QUIC"));
    rt.block_on(async {
        let dialer = Arc::new(Dialer::quic(user.clone(), &gw.addr).await);
        echo_small(&dialer, "van-t").await;
    });
    agent.proc.stop();
}

/// `--transport tcp` never tries QUIC, even with UDP open; `--transport quic` never falls
/// back to TCP, even with UDP blocked, and comes up once UDP works.
#[test]
fn transport_choice_tcp_only_and_quic_only() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let mut tcp_agent = Agent::start(
        &tmp.join("van-tcp"),
        &gw,
        "van-tcp",
        "",
        &[
            "--test-echo",
            "--transport",
            "tcp",
            "--quic-probe-interval",
            "1s",
        ],
    );
    wait_online(&gw.tctl, "van-tcp", Some("tcp"), Duration::from_secs(30));
    let user = user_tls(&auth, tmp.path(), "alice");
    let rt = rt();
    rt.block_on(async {
        let dialer = Arc::new(Dialer::quic(user.clone(), &gw.addr).await);
        echo_small(&dialer, "van-tcp").await;
    });
    // Several probe intervals later it is still on TCP, in its first tunnel.
    std::thread::sleep(Duration::from_secs(4));
    let d = wait_online(&gw.tctl, "van-tcp", Some("tcp"), Duration::from_secs(5));
    assert_eq!(d["transport"], "tcp");
    assert_eq!(
        tcp_agent.tunnels_up(),
        1,
        "the TCP-only agent changed tunnels"
    );
    assert!(
        !tcp_agent.proc.log_text().contains("QUIC"),
        "the TCP-only agent tried QUIC"
    );

    let block = UdpBlock::new(gw.port);
    let mut quic_agent = Agent::start(
        &tmp.join("van-quic"),
        &gw,
        "van-quic",
        "",
        &[
            "--test-echo",
            "--transport",
            "quic",
            "--quic-timeout",
            "300ms",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || quic_agent
            .proc
            .log_text()
            .contains("not trying TCP (--transport quic)")),
        "the QUIC-only agent did not say why it stays offline: {}",
        quic_agent.proc.log_text()
    );
    assert!(
        !gw.tctl
            .device("van-quic")
            .is_some_and(|d| d["online"] == true),
        "the QUIC-only agent came online with UDP blocked: {:?}",
        gw.tctl.device("van-quic")
    );
    drop(block);
    wait_online(&gw.tctl, "van-quic", Some("quic"), Duration::from_secs(60));
    rt.block_on(async {
        let dialer = Arc::new(Dialer::Tcp {
            cfg: user.clone(),
            addr: gw.addr.clone(),
        });
        echo_small(&dialer, "van-quic").await;
    });
    tcp_agent.proc.stop();
    quic_agent.proc.stop();
}

/// A restarted gateway does not wait for its agents' keep-alives: it sends the stateless
/// resets of the connections its crashed predecessor booked (`restart_wake`). The agent
/// here keeps alive every 120 s, so without the wake it would come back only after two
/// minutes; the wait below is one.
#[test]
fn restarted_gateway_wakes_its_agents() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let mut gw = Gateway::start(&tmp.join("gw"), &auth);
    let tctl = gw.tctl.clone();
    let agent = Agent::start(
        &tmp.join("van-w"),
        &gw,
        "van-w",
        "",
        &["--keepalive", "120s"],
    );
    wait_online(&tctl, "van-w", Some("quic"), Duration::from_secs(20));
    let book = gw.data_dir.join("quic-peers");
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&book)
            .is_ok_and(|b| b.lines().count() == 1)),
        "the gateway did not book the agent's connection"
    );
    gw.restart();
    assert!(
        wait_until(Duration::from_secs(60), || agent.tunnels_up() == 2),
        "agent not woken by the restarted gateway:\n{}",
        agent.proc.log_text()
    );
    assert!(agent
        .proc
        .log_text()
        .contains("the gateway no longer knows this connection"));
    wait_online(&tctl, "van-w", Some("quic"), Duration::from_secs(20));
}

#[test]
fn gateway_and_agent_restarts() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let mut gw = Gateway::start(&tmp.join("gw"), &auth);
    let tctl = gw.tctl.clone();
    let mut agent = Agent::start(
        &tmp.join("van-r"),
        &gw,
        "van-r",
        "",
        &["--test-echo", "--keepalive", "5s", "--test-renew"],
    );
    wait_online(&tctl, "van-r", Some("quic"), Duration::from_secs(20));
    let user = user_tls(&auth, tmp.path(), "alice");
    // Certificates renew over the tunnel (forced here; normally at 2/3 of their life); the
    // agent restarts below come up with the renewed ones.
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .proc
            .log_text()
            .contains("certificates renewed")),
        "no renewal:\n{}",
        agent.proc.log_text()
    );
    let rt = rt();

    // kill -9 and start again at once: the agent learns at its next keep-alive (QUIC
    // stateless reset with the gateway's persistent key) and is back within the backoff cap.
    gw.proc.kill9();
    gw.restart();
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || agent.tunnels_up() == 2),
        "agent did not reconnect:\n{}",
        agent.proc.log_text()
    );
    eprintln!(
        "MEASURE agent back {:?} after the gateway restart (keepalive 5s)",
        back.elapsed()
    );
    wait_online(&tctl, "van-r", Some("quic"), Duration::from_secs(20));
    rt.block_on(async {
        let dialer = Arc::new(Dialer::quic(user.clone(), &gw.addr).await);
        echo_small(&dialer, "van-r").await;
    });

    // kill -9 the agent and start it again: no token needed.
    agent.restart();
    assert!(
        wait_until(Duration::from_secs(30), || agent.tunnels_up() == 1),
        "restarted agent did not come up:\n{}",
        agent.proc.log_text()
    );
    assert!(!agent.proc.log_text().contains("joined the cluster"));
    wait_online(&tctl, "van-r", Some("quic"), Duration::from_secs(20));
    rt.block_on(async {
        let dialer = Arc::new(Dialer::quic(user.clone(), &gw.addr).await);
        echo_small(&dialer, "van-r").await;
    });

    // A clean stop is reported at once, with the reason.
    agent.proc.stop();
    let d = wait_offline(&tctl, "van-r", Duration::from_secs(20)).expect("still listed");
    let reason = d["last_disconnect_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("shutting down"), "reason: {reason:?}");

    // A gateway stopped with SIGTERM exits cleanly.
    let status = gw.proc.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "gateway exit: {status:?}"
    );

    // A gateway that dies (kill -9) tells nobody: its devices read offline once its presence
    // lease (45 s) runs out.
    gw.restart();
    agent = Agent::start_joined(
        &tmp.join("van-r"),
        &gw.addr,
        "van-r",
        &["--keepalive", "5s"],
    );
    wait_online(&tctl, "van-r", Some("quic"), Duration::from_secs(40));
    gw.proc.kill9();
    let died = Instant::now();
    wait_offline(&tctl, "van-r", Duration::from_secs(75));
    eprintln!(
        "MEASURE device offline {:?} after the gateway died",
        died.elapsed()
    );
    agent.proc.kill9();
}

/// Expects the gateway to close `s` (EOF or error) rather than keep it open.
fn expect_closed(mut s: StdTcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: the gateway kept the connection open")
            }
            Err(_) => return,
        }
    }
}

#[test]
fn bad_input_is_dropped_without_disturbing_agents() {
    let tmp = TempDir::new();
    let auth = Authority::start(&tmp.join("auth"), "c1");
    let gw = Gateway::start(&tmp.join("gw"), &auth);
    let mut agent = Agent::start(&tmp.join("van-b"), &gw, "van-b", "", &["--test-echo"]);
    wait_online(&gw.tctl, "van-b", Some("quic"), Duration::from_secs(20));
    let user = user_tls(&auth, tmp.path(), "alice");
    let ca = cluster_ca_der(&gw.tctl);
    let addr = gw.addr.clone();

    // Garbage on TCP and UDP.
    let garbage = edgeport_proto::keys::random_bytes(64 * 1024).unwrap();
    let mut s = StdTcpStream::connect(&addr).unwrap();
    let _ = s.write_all(&garbage[..4096]);
    expect_closed(s, "garbage");
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..500 {
        let len = 1 + (i * 37) % 1400;
        let _ = udp.send_to(&garbage[i..i + len], &addr);
    }

    let rt = rt();
    rt.block_on(async {
        // Oversized and truncated frames after a valid TLS handshake, on each ALPN.
        for proto in [alpn::JOIN, alpn::DIAL] {
            let cfg = Arc::new(client_config(&ca, None, &[proto]).unwrap());
            let mut t = tls_connect(cfg.clone(), &addr).await.unwrap();
            t.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
                .await
                .unwrap();
            let mut b = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(30), t.read(&mut b))
                .await
                .expect("oversized frame: connection closed in time");
            assert!(
                matches!(r, Ok(0) | Err(_)),
                "oversized frame answered: {r:?}"
            );
            // Truncated: a length and then nothing.
            let mut t = tls_connect(cfg, &addr).await.unwrap();
            t.write_all(&[0, 0, 0, 100, 1]).await.unwrap();
            let r = tokio::time::timeout(Duration::from_secs(40), t.read(&mut b))
                .await
                .expect("truncated frame: connection closed in time");
            assert!(
                matches!(r, Ok(0) | Err(_)),
                "truncated frame answered: {r:?}"
            );
        }
        // A join with a malformed body is dropped; a dial without a certificate is refused.
        let cfg = Arc::new(client_config(&ca, None, &[alpn::JOIN]).unwrap());
        let mut t = tls_connect(cfg, &addr).await.unwrap();
        t.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            read_frame::<JoinMessage, _>(&mut t),
        )
        .await
        .expect("closed in time");
        assert!(r.is_err());
        let cfg = Arc::new(client_config(&ca, None, &[alpn::DIAL]).unwrap());
        let anon = Dialer::Tcp {
            cfg,
            addr: addr.clone(),
        };
        let r = anon.dial("van-b", Service::Echo).await;
        assert!(
            matches!(&r, Err(e) if e.contains("user certificate")),
            "anonymous dial: {:?}",
            r.as_ref().map(|_| ())
        );
        // Without a certificate a QUIC connection gets four streams, each answered, and no
        // credit for a fifth (security.md: anonymous QUIC).
        let cfg = Arc::new(client_config(&ca, None, &[alpn::DIAL]).unwrap());
        let anon = Dialer::quic(cfg, &addr).await;
        for i in 1..=4 {
            let r =
                tokio::time::timeout(Duration::from_secs(30), anon.dial("van-b", Service::Echo))
                    .await
                    .unwrap_or_else(|_| panic!("anonymous QUIC dial {i}: no answer in 30 s"));
            assert!(
                matches!(&r, Err(e) if e.contains("user certificate")),
                "anonymous QUIC dial {i}: {:?}",
                r.as_ref().map(|_| ())
            );
        }
        let Dialer::Quic(conn, _) = &anon else {
            unreachable!()
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(3), conn.open_bi())
                .await
                .is_err(),
            "the gateway gave an anonymous client credit for a fifth stream"
        );
    });

    // Slow-loris (after the checks above, which need handshakes of their own): a trickle
    // of a TLS ClientHello, one byte a second, and a crowd of silent
    // connections beyond the handshake limit.
    let slow = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = StdTcpStream::connect(&addr).unwrap();
            let hello = [
                0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            for b in hello.iter().cycle().take(60) {
                if s.write_all(&[*b]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            false
        })
    };
    let crowd: Vec<StdTcpStream> = (0..300)
        .filter_map(|_| StdTcpStream::connect(&addr).ok())
        .collect();

    for c in crowd {
        expect_closed(c, "silent connection");
    }
    assert!(
        slow.join().unwrap(),
        "the slow-loris connection was never dropped"
    );

    // The agent never noticed, and streams still work.
    let d = wait_online(&gw.tctl, "van-b", Some("quic"), Duration::from_secs(5));
    assert!(d["last_disconnect_reason"].is_null(), "{d}");
    assert_eq!(agent.tunnels_up(), 1, "{}", agent.proc.log_text());
    rt.block_on(async {
        let dialer = Arc::new(Dialer::quic(user, &gw.addr).await);
        echo_small(&dialer, "van-b").await;
    });
    agent.proc.stop();
}
