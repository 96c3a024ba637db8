//! A compromised gateway (issue 20): the test holds a valid gateway identity of the cluster
//! (gateway A's key and certificate, read from its data dir) and tries what an attacker who
//! took that machine would try against the holding gateway B and the authority:
//!
//! - a forwarded dial with no ticket and a forged user;
//! - a user certificate the attacker made, to get a ticket;
//! - a real ticket replayed, or used for another device or service;
//! - a forged user and Kubernetes groups in the header of a valid forward (the holder takes
//!   them from the ticket instead);
//! - anything at all after `tctl gateways rm A`: the authority refuses A, B refuses and closes
//!   A's link, and A (honest here) stops.
//!
//! Every attempt is refused, and the refusal is logged with its reason. Forwarded dials are
//! audited at both gateways, each event naming the other (`via`).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use edgeport_e2e::dial::user_tls;
use edgeport_e2e::fabric::Gateway;
use edgeport_e2e::rogue::StolenGateway;
use edgeport_e2e::ssh::{Cluster, Tsh};
use edgeport_e2e::wait_until;
use edgeport_net::rpc_client::RpcClientError;
use edgeport_proto::keys::first_cert_der;
use edgeport_proto::rpc::{ErrorKind, Request, Response};
use edgeport_proto::ticket::DialTicket;
use edgeport_proto::tunnel::{ClientReply, Service, StreamHeader};

const PW: &str = "correct horse battery";

fn header(service: Service, user: &str, ticket: Option<DialTicket>) -> StreamHeader {
    StreamHeader {
        service,
        user: Some(user.into()),
        session_id: "feedfacefeedfacefeedfacefeedface".into(),
        client_addr: "198.51.100.7:4242".into(),
        kube_groups: vec!["system:masters".into()],
        kube_users: vec!["cluster-admin".into()],
        ticket,
        via: None,
    }
}

/// A key that is no device's.
fn forger_key() -> edgeport_proto::keys::KeyPair {
    edgeport_proto::keys::KeyPair::generate().unwrap()
}

fn refused(reply: ClientReply) -> String {
    match reply {
        ClientReply::Refused(e) => e.message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_stolen_gateway_identity_can_neither_mint_nor_borrow_a_user() {
    // B (the cluster's first gateway) holds dev1 and dev2; A holds nothing.
    let c = Cluster::start_with_gateway_args(
        "rogue",
        &[("dev1", "fleet=vans"), ("dev2", "fleet=vans")],
        &["--presence-interval", "2s"],
    );
    let mut gw_a = Gateway::start_with(
        &c.dir.join("gateway-a"),
        &c.auth,
        &["--presence-interval", "2s"],
    );
    let stolen = StolenGateway::from_data_dir(&gw_a.data_dir);
    let b = c.gw.addr.clone();

    // No ticket: the header's user counts for nothing.
    let why = refused(
        stolen
            .forward(&b, "dev1", header(Service::Ssh, "root-impersonated", None))
            .0,
    );
    assert!(why.contains("no dial ticket from the authority"), "{why}");

    // A user certificate the attacker made for itself buys no ticket.
    let foreign_ca = {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let k = rcgen::KeyPair::generate().unwrap();
        let _ = p.self_signed(&k).unwrap();
        rcgen::Issuer::new(p, k)
    };
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://rogue/user/alice".try_into().unwrap(),
    )];
    let forged = p
        .signed_by(&rcgen::KeyPair::generate().unwrap(), &foreign_ca)
        .unwrap();
    let ask_dial = |der: Vec<u8>, device: &str, service: Service| {
        stolen.ask(
            &c.tctl.addr,
            Request::AuthorizeDial {
                user_cert_der: der,
                device: device.into(),
                service,
            },
        )
    };
    match ask_dial(forged.der().to_vec(), "dev1", Service::Kube) {
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Denied, "{e}");
            assert!(e.message.contains("not signed by this cluster's CA"), "{e}");
        }
        other => panic!("a forged user certificate was taken: {other:?}"),
    }

    // Recordings: a gateway's word about whose they are counts for nothing either.
    match stolen.ask(
        &c.tctl.addr,
        Request::RecordingList {
            user: Some("alice".into()),
            user_cert_der: None,
        },
    ) {
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
            assert!(e.message.contains("must hand over the certificate"), "{e}")
        }
        other => panic!("a gateway listed recordings on its own word: {other:?}"),
    }

    // Listings: which devices and targets a user's roles reach is the authority's answer to
    // the user's own certificate only (G9b): a made-up one, or none, gets nothing.
    for req in [
        Request::UserDevicePage {
            user_cert_der: forged.der().to_vec(),
            after: String::new(),
        },
        Request::TargetList {
            user_cert_der: Some(forged.der().to_vec()),
        },
    ] {
        match stolen.ask(&c.tctl.addr, req) {
            Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
                assert!(e.message.contains("not signed by this cluster's CA"), "{e}")
            }
            other => panic!("a gateway listed a user's devices on its own word: {other:?}"),
        }
    }
    match stolen.ask(
        &c.tctl.addr,
        Request::TargetList {
            user_cert_der: None,
        },
    ) {
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => assert!(
            e.message
                .contains("only for the certificate of the user who asks"),
            "{e}"
        ),
        other => panic!("a gateway listed every target: {other:?}"),
    }

    // Presence (G9): the stolen identity claims dev1 and dev2, held by B, once on its word
    // and once with a made-up attestation. The devices attested their tunnels to B, so the
    // authority keeps B as their holder (a claim would draw their users' dials to A).
    let holder = |id: &str| {
        c.tctl
            .device(id)
            .filter(|d| d["online"] == true)
            .and_then(|d| d["gateway"].as_str().map(str::to_string))
    };
    let b_id = holder("dev1").expect("dev1 online at B");
    let claim = |id: &str, proof: Option<edgeport_proto::attest::TunnelProof>| {
        edgeport_proto::rpc::DevicePresence {
            id: id.into(),
            labels: Default::default(),
            version: "0.0.1".into(),
            arch: "x86_64".into(),
            transport: edgeport_proto::rpc::Transport::Quic,
            address: "192.0.2.66:4000".into(),
            rtt_ms: 1,
            connected_at: edgeport_net::clock::now_secs(),
            kube_cluster: None,
            loss_permille: None,
            usage: None,
            proof,
        }
    };
    let made_up =
        edgeport_proto::attest::TunnelProof::sign(&forger_key(), "dev2", "gateway-a", 1 << 50);
    let report = edgeport_proto::rpc::PresenceReport {
        lease_secs: 60,
        online: vec![claim("dev1", None), claim("dev2", Some(made_up))],
        ..Default::default()
    };
    match stolen.ask(&c.tctl.addr, Request::Presence(report)) {
        Ok(Response::PresenceAck(_)) => {}
        other => panic!("presence: {other:?}"),
    }
    assert_eq!(
        holder("dev1"),
        Some(b_id.clone()),
        "dev1 left B on A's word"
    );
    assert_eq!(
        holder("dev2"),
        Some(b_id),
        "dev2 left B on a made-up attestation"
    );

    // A recording piece planted in a device's audit stream: the gateway holds no device key,
    // so the batch is refused and nothing is stored.
    let mut chunk =
        edgeport_proto::audit::AuditEvent::new(edgeport_proto::audit::RECORDING_CHUNK, 1);
    chunk.seq = 1;
    chunk.prev_hash = edgeport_proto::audit::GENESIS_HASH.into();
    chunk.session_id = "feedfacefeedfacefeedfacefeedface".into();
    chunk.user = "alice".into();
    chunk.fields.insert("data".into(), "planted".into());
    let forger = edgeport_proto::keys::KeyPair::generate().unwrap();
    let events = vec![chunk];
    let batch = edgeport_proto::audit::AuditBatch {
        signature: forger.sign(&edgeport_proto::audit::batch_payload("dev1", &events)),
        events,
    };
    match stolen.ask(
        &c.tctl.addr,
        Request::AuditUpload {
            device_id: "dev1".into(),
            batch,
        },
    ) {
        Ok(Response::AuditAck(a)) => assert!(a.error.is_some() && a.acked_seq == 0, "{a:?}"),
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
            assert!(e.message.contains("signature"), "{e}")
        }
        other => panic!("a planted recording piece was taken: {other:?}"),
    }
    // (verify exits non-zero: it found the alert.)
    let verify = c.tctl.run(&["audit", "verify", "--format", "json"]);
    assert!(!verify.ok(), "{}", verify.stdout());
    assert!(
        verify.stdout().contains("bad_signature"),
        "no integrity alert: {}",
        verify.stdout()
    );

    // alice's real certificate (the kind a rogue gateway sees when she connects through it)
    // gets a ticket for one device, one service, one use.
    let _alice_tls = user_tls(&c.auth, c.dir.path(), "alice");
    let alice_pem = std::fs::read_to_string(c.dir.path().join("alice.crt")).unwrap();
    let alice = first_cert_der(&alice_pem).unwrap();
    let ticket = match ask_dial(alice.clone(), "dev1", Service::Kube) {
        Ok(Response::DialAllowed(g)) => g.ticket.expect("a ticket"),
        other => panic!("{other:?}"),
    };
    let why = refused(
        stolen
            .forward(
                &b,
                "dev2",
                header(Service::Kube, "alice", Some(ticket.clone())),
            )
            .0,
    );
    assert!(
        why.contains("the dial ticket is for device \"dev1\""),
        "{why}"
    );
    let why = refused(
        stolen
            .forward(
                &b,
                "dev1",
                header(Service::Ssh, "alice", Some(ticket.clone())),
            )
            .0,
    );
    assert!(why.contains("the dial ticket is for service"), "{why}");
    // The real use: the holder names the user and the Kubernetes identity from the ticket, not
    // from the header the forwarder wrote.
    match stolen
        .forward(
            &b,
            "dev1",
            header(Service::Kube, "root-impersonated", Some(ticket.clone())),
        )
        .0
    {
        ClientReply::DialOk { device_id, .. } => assert_eq!(device_id, "dev1"),
        other => panic!("a valid ticket was refused: {other:?}"),
    }
    // ...once.
    let why = refused(
        stolen
            .forward(&b, "dev1", header(Service::Kube, "alice", Some(ticket)))
            .0,
    );
    assert!(why.contains("already used"), "{why}");
    let b_log = c.gw.proc.log_text();
    assert!(
        b_log.contains("forwarded dial refused") && b_log.contains("no dial ticket"),
        "B did not log its refusals with their reasons:\n{b_log}"
    );
    // The forger's name appears only as a refused claim, never as the user of a dial.
    assert!(
        b_log
            .lines()
            .filter(|l| l.contains("root-impersonated"))
            .all(|l| l.contains("claimed_user=root-impersonated") && l.contains("refused")),
        "B took the forwarder's user:\n{b_log}"
    );
    assert!(
        b_log.contains("forwarded dial") && b_log.contains("user=alice"),
        "B did not name alice from the ticket:\n{b_log}"
    );

    // An honest forwarded SSH dial is audited at both gateways, each naming the other.
    c.add_user("bob", "root", PW);
    let tsh = Tsh::new(c.dir.join("tsh"), &gw_a.addr);
    tsh.login("bob", PW, &gw_a.ca_pin, &[])
        .expect_ok("tsh login at gateway A");
    let hi = tsh
        .run(&["ssh", "root@dev1", "echo", "hi"], None)
        .expect_ok("tsh ssh through A to dev1 at B");
    assert_eq!(hi.stdout(), "hi\n");
    let gateways = c.tctl.ok(&["gateways", "ls", "--format", "json"]).json();
    let ids: Vec<String> = gateways
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{gateways}");
    let holder = gateways
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["tunnels"] == 2)
        .unwrap_or_else(|| panic!("no gateway holds both devices: {gateways}"));
    let b_id = holder["id"].as_str().unwrap().to_string();
    let a_id = ids.iter().find(|i| **i != b_id).unwrap().clone();
    let mut dials = Vec::new();
    let audited = wait_until(Duration::from_secs(60), || {
        let events = c
            .tctl
            .ok(&["audit", "search", "--since", "1h", "--format", "json"])
            .json();
        dials = events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "gateway.dial" && e["user"] == "bob")
            .cloned()
            .collect();
        dials.iter().any(|e| e["via"] == b_id.as_str())
            && dials.iter().any(|e| e["via"] == a_id.as_str())
    });
    assert!(
        audited,
        "forwarded dial not audited at both gateways: {dials:#?}"
    );

    // Revoked: the authority refuses A from now on, B refuses A and closes its link, and A
    // (honest here) closes its tunnels and stops.
    c.tctl.ok(&["gateways", "rm", &a_id]);
    match stolen.ask(&c.tctl.addr, Request::DeviceList) {
        Err(RpcClientError::Remote(e)) | Ok(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::GatewayRevoked, "{e}")
        }
        other => panic!("a revoked gateway was answered: {other:?}"),
    }
    let b_knows = wait_until(Duration::from_secs(20), || {
        let why = refused(
            stolen
                .forward(&b, "dev1", header(Service::Ssh, "alice", None))
                .0,
        );
        why.contains("revoked")
    });
    assert!(b_knows, "B still takes forwards from the revoked gateway");
    let stopped = wait_until(Duration::from_secs(20), || !gw_a.proc.alive());
    assert!(stopped, "the revoked gateway kept running");
    assert!(
        gw_a.proc.log_text().contains("refuses this gateway"),
        "{}",
        gw_a.proc.log_text()
    );
    let listed = c.tctl.ok(&["gateways", "ls"]).stdout();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(a_id.as_str()) && l.contains("revoked")),
        "{listed}"
    );
}
