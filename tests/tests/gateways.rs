//! Several gateways in one cluster (DESIGN section 5): a user logged in at gateway A reaches
//! a device whose tunnel is held by gateway B. A authorises the dial, asks the authority who
//! holds the device, and forwards the stream to B over a QUIC link that both gateways
//! authenticate with their cluster certificates. SSH stays end to end.
//!
//! - `tsh ls`, `tsh ssh` (output, exit status, a few MiB byte for byte both ways) through A;
//! - each gateway logs its side (A opens the link, B accepts the forwarded dial);
//! - a user certificate cannot ask a gateway to forward (only a peer gateway can);
//! - the device moves to A and back while A reuses its grant: A asks the authority again;
//! - a wildcard `--peer-addr` is refused at start;
//! - with B gone, a dial through A fails with one clear line, without hanging.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeport_e2e::dial::user_tls;
use edgeport_e2e::fabric::{Agent, Gateway};
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::{bin, run};
use edgeport_net::{read_frame, write_frame};
use edgeport_proto::tls::GATEWAY_SERVER_NAME;
use edgeport_proto::tunnel::{ClientReply, ClientRequest, Service, StreamHeader};

const PW: &str = "correct horse battery";

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `ClientRequest::Forward` sent by a user (not a gateway) over TCP+TLS; returns the reply.
fn forward_as_user(cfg: Arc<rustls::ClientConfig>, addr: &str) -> ClientReply {
    edgeport_proto::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(GATEWAY_SERVER_NAME).unwrap();
        let mut s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let req = ClientRequest::Forward {
            device_id: "dev1".into(),
            header: StreamHeader {
                service: Service::Ssh,
                user: Some("root-impersonated".into()),
                session_id: "forged".into(),
                client_addr: "127.0.0.1:1".into(),
                kube_groups: vec![],
                kube_users: vec![],
                ticket: None,
                via: None,
            },
        };
        write_frame(&mut s, &req).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            read_frame::<ClientReply, _>(&mut s),
        )
        .await
        .expect("the gateway answers")
        .unwrap()
    })
}

#[test]
fn a_dial_at_one_gateway_reaches_a_device_held_by_another() {
    // Gateway B (the cluster's first) holds dev1's tunnel; gateway A holds none.
    let mut c = Cluster::start("multi", &[("dev1", "fleet=vans")]);
    // A peer address no other gateway could dial is refused before the gateway starts.
    let mut bad = std::process::Command::new(bin("gateway"));
    bad.args(["start", "--data-dir"])
        .arg(c.dir.join("gateway-bad"))
        .args(["--auth", &c.tctl.addr, "--peer-addr", "0.0.0.0:4080"]);
    let bad = run(bad, None, Duration::from_secs(30));
    assert!(
        !bad.ok() && bad.stderr().contains("wildcard"),
        "a wildcard --peer-addr was taken: {}",
        bad.stderr()
    );
    let gw_a = Gateway::start_with(
        &c.dir.join("gateway-a"),
        &c.auth,
        &["--presence-interval", "2s"],
    );
    c.add_user("alice", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), &gw_a.addr);
    tsh.login("alice", PW, &gw_a.ca_pin, &[])
        .expect_ok("tsh login at gateway A");

    let ls = tsh
        .run(&["ls", "--format", "json"], None)
        .expect_ok("tsh ls");
    let devices = ls.json();
    let dev1 = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "dev1")
        .unwrap_or_else(|| panic!("dev1 missing from tsh ls: {devices}"));
    assert_eq!(dev1["online"], true, "{dev1}");

    let hi = tsh
        .run(&["ssh", "root@dev1", "echo", "hi"], None)
        .expect_ok("tsh ssh through gateway A");
    assert_eq!(hi.stdout(), "hi\n");
    let seven = tsh.run(&["ssh", "root@dev1", "exit 7"], None);
    assert_eq!(seven.code(), Some(7), "stderr:\n{}", seven.stderr());

    // Upload: the device hashes what it received.
    let data = edgeport_proto::keys::random_bytes(6 << 20).unwrap();
    let up = tsh
        .run(&["ssh", "root@dev1", "sha256sum"], Some(&data))
        .expect_ok("upload through two gateways");
    assert_eq!(
        up.stdout().split_whitespace().next(),
        Some(sha256_hex(&data).as_str()),
        "the device received other bytes than were sent"
    );
    // Download: the device sends a file back (the agent runs on this machine).
    let file = c.dir.join("download.bin");
    std::fs::write(&file, &data).unwrap();
    let down = tsh
        .run(
            &["ssh", "root@dev1", "cat", &file.display().to_string()],
            None,
        )
        .expect_ok("download through two gateways");
    assert!(
        down.out.stdout == data,
        "downloaded {} bytes, not the {} of the file (or other bytes)",
        down.out.stdout.len(),
        data.len()
    );

    assert!(
        gw_a.proc.log_text().contains("link to peer gateway up"),
        "gateway A never opened a link to B:\n{}",
        gw_a.proc.log_text()
    );
    let b_log = c.gw.proc.log_text();
    assert!(
        b_log.contains("forwarded dial") && b_log.contains("alice"),
        "gateway B did not log the forwarded dial for alice:\n{b_log}"
    );

    // Only another gateway of the cluster may ask for a forward: a user certificate that
    // sends one (with a made-up user in the header) is refused and reaches no device.
    let user = user_tls(&c.auth, c.dir.path(), "mallory");
    match forward_as_user(user, &c.gw.addr) {
        ClientReply::Refused(e) => assert!(
            e.message
                .contains("forwarding needs the certificate of another gateway"),
            "{e:?}"
        ),
        other => panic!("a user's Forward was not refused: {other:?}"),
    }
    assert!(!c.gw.proc.log_text().contains("root-impersonated"));

    // The device moves: killed (A and B do not notice at once) and back at A, then again
    // and back at B. Each time the authority keeps the newer tunnel as the holder, and the
    // gateway left with the old one is told to close it with its next presence report
    // (every 2 s at A). Dials through A reach the device wherever it is.
    let holder = |c: &Cluster| {
        c.tctl
            .device("dev1")
            .filter(|d| d["online"] == true)
            .and_then(|d| d["gateway"].as_str().map(str::to_string))
    };
    let gw_b_id = holder(&c).expect("dev1 online at B");
    let dev1_dir = c.agents[0].data_dir.clone();
    let move_to = |c: &mut Cluster, addr: &str, at_b: bool| {
        c.agents[0].proc.kill9();
        c.agents[0] = Agent::start_joined(&dev1_dir, addr, "dev1", &[]);
        let moved = edgeport_e2e::wait_until(Duration::from_secs(30), || {
            holder(c).is_some_and(|g| (g == gw_b_id) == at_b)
        });
        assert!(moved, "dev1 did not come online at the other gateway");
    };
    move_to(&mut c, &gw_a.addr, false);
    // A lock (of another user) moves the policy epoch: A's next dial asks the authority
    // afresh, so A's grant for alice and dev1 names A as the holder.
    c.tctl
        .ok(&["lock", "--user", "mallory", "--message", "epoch"]);
    let here = tsh
        .run(&["ssh", "root@dev1", "echo", "at-a"], None)
        .expect_ok("tsh ssh with dev1 on gateway A");
    assert_eq!(here.stdout(), "at-a\n");
    let b_addr = c.gw.addr.clone();
    move_to(&mut c, &b_addr, true);
    let closed = edgeport_e2e::wait_until(Duration::from_secs(20), || {
        gw_a.proc
            .log_text()
            .contains("newer tunnel at another gateway; closing this one")
    });
    assert!(
        closed,
        "A kept its old tunnel of dev1:\n{}",
        gw_a.proc.log_text()
    );
    // A's grant (reused) still says dev1 is at A; A finds it gone, asks again, forwards.
    let back = tsh
        .run(&["ssh", "root@dev1", "echo", "back-at-b"], None)
        .expect_ok("tsh ssh right after dev1 moved back to gateway B");
    assert_eq!(back.stdout(), "back-at-b\n");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        holder(&c).as_deref(),
        Some(gw_b_id.as_str()),
        "the holder flapped back to A"
    );

    // B goes away: A cannot reach the device and says so, in one line and in bounded time.
    c.gw.proc.stop();
    let t = Instant::now();
    let gone = tsh.run(&["ssh", "root@dev1", "true"], None);
    let err = gone.stderr();
    assert_ne!(gone.code(), Some(0), "ssh succeeded with B stopped");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(
        lines[0].starts_with("error: ")
            && (lines[0].contains("dev1") || lines[0].contains("gateway")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    eprintln!(
        "dial with the holder gone failed after {:?}: {}",
        t.elapsed(),
        lines[0]
    );
}
