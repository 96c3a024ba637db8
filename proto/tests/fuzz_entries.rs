//! The proto fuzz targets (`edgeport_proto::fuzz_entry`) on stable Rust: each runs on its
//! committed corpus and a few thousand proptest inputs (`support/fuzz_harness.rs`).
//! `write_corpus` (ignored) makes that corpus: `cargo test -p edgeport-proto --test
//! fuzz_entries -- --ignored write_corpus`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/fuzz_harness.rs"]
mod harness;
#[path = "support/strategies.rs"]
mod strategies;

use edgeport_proto::audit::{
    ack_payload, batch_payload, AuditAck, AuditBatch, AuditEvent, GENESIS_HASH,
};
use edgeport_proto::frame::encode;
use edgeport_proto::fuzz_entry::{self, fuzz_sign, FUZZ_KEY_SEED, TARGETS};
use edgeport_proto::ticket::{DialTicket, TicketClaims};
use edgeport_proto::tunnel::{AgentControl, GatewayControl, Hello, Service, StreamHeader};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde::Serialize;

const DIR: &str = env!("CARGO_MANIFEST_DIR");

fn target(name: &str) -> fn(&[u8]) {
    TARGETS.iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn frame_tunnel() {
    harness::run(DIR, "frame_tunnel", target("frame_tunnel"));
}

#[test]
fn frame_dial() {
    harness::run(DIR, "frame_dial", target("frame_dial"));
}

#[test]
fn rpc() {
    harness::run(DIR, "rpc", target("rpc"));
}

#[test]
fn audit_batch() {
    harness::run(DIR, "audit_batch", target("audit_batch"));
}

#[test]
fn ssh_cert() {
    harness::run(DIR, "ssh_cert", target("ssh_cert"));
}

/// `n` frames of values from `strategy` (fixed seed: the corpus is reproducible).
fn sample<S: Strategy>(strategy: S, n: usize) -> Vec<Vec<u8>>
where
    S::Value: Serialize,
{
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| encode(&strategy.new_tree(&mut runner).unwrap().current()).unwrap())
        .collect()
}

fn chain(n: u64) -> Vec<AuditEvent> {
    let mut prev = GENESIS_HASH.to_string();
    (1..=n)
        .map(|seq| {
            let mut e = AuditEvent::new(
                if seq == 1 { "session.start" } else { "exec" },
                1_700_000_000_000 + seq,
            );
            e.seq = seq;
            e.prev_hash = prev.clone();
            e.session_id = "s-1".into();
            e.user = "alice".into();
            e.login = "root".into();
            e.fields.insert("command".into(), format!("ls -{seq}"));
            prev = e.hash();
            e
        })
        .collect()
}

fn ticket() -> DialTicket {
    let claims = TicketClaims {
        id: "00ff".into(),
        cluster: "c".into(),
        user: "alice".into(),
        device: "van-1".into(),
        service: Service::Ssh,
        logins: vec!["root".into()],
        kube_groups: vec![],
        kube_users: vec![],
        requester: "gw-1".into(),
        holder: Some("gw-2".into()),
        issued_at: 1_700_000_000,
        expires_at: 1_700_000_060,
    };
    DialTicket::issue(&claims, fuzz_sign)
}

fn ssh_certs() -> Vec<Vec<u8>> {
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::private::Ed25519Keypair;
    use russh::keys::ssh_key::PrivateKey;
    let ca = PrivateKey::from(Ed25519Keypair::from_seed(&FUZZ_KEY_SEED));
    let subject = PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]));
    let mut out = Vec::new();
    for (t, principals, roles) in [
        (CertType::User, vec!["root", "pi"], true),
        (CertType::Host, vec!["van-1"], false),
        (CertType::User, vec![], false),
    ] {
        let mut b = Builder::new(
            vec![7u8; 32],
            subject.public_key().key_data().clone(),
            100,
            2_000_000_000,
        )
        .unwrap();
        b.cert_type(t)
            .unwrap()
            .key_id("alice")
            .unwrap()
            .serial(42)
            .unwrap();
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        for p in principals {
            b.valid_principal(p).unwrap();
        }
        if roles {
            b.extension(edgeport_proto::sshcert::EXT_PERMIT_PTY, "")
                .unwrap();
            b.extension(
                edgeport_proto::sshcert::EXT_ROLES,
                r#"{"roles":["dev"],"allow":[{"env":["*"]}],"deny_labels":{"fleet":["x"]}}"#,
            )
            .unwrap();
        }
        let cert = b.sign(&ca).unwrap();
        out.push(cert.to_bytes().unwrap());
        out.push(cert.to_openssh().unwrap().into_bytes());
    }
    out
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after a protocol change"]
fn write_corpus() {
    // Tunnel: a whole control conversation in one input, then single messages.
    let hello = Hello {
        device_id: "van-1".into(),
        labels: [("env".to_string(), "dev".to_string())].into(),
        version: "0.1.0".into(),
        arch: "x86_64".into(),
        kube_cluster: Some("k1".into()),
    };
    let events = chain(3);
    let batch = AuditBatch {
        signature: fuzz_sign(&batch_payload("van-1", &events)),
        events,
    };
    let mut convo = encode(&AgentControl::Hello(hello)).unwrap();
    convo.extend(
        encode(&AgentControl::Ping {
            seq: 1,
            rtt_ms: Some(12),
        })
        .unwrap(),
    );
    convo.extend(encode(&AgentControl::Audit(batch.clone())).unwrap());
    convo.extend(encode(&GatewayControl::Pong { seq: 1 }).unwrap());
    let header = StreamHeader {
        service: Service::Kube,
        user: Some("alice".into()),
        session_id: "s-1".into(),
        client_addr: "192.0.2.1:5000".into(),
        kube_groups: vec!["dev".into()],
        kube_users: vec![],
        ticket: Some(ticket()),
        via: Some("gw-2".into()),
    };
    let mut tunnel = vec![convo, encode(&header).unwrap()];
    tunnel.extend(sample(strategies::agent_control(), 6));
    tunnel.extend(sample(strategies::gateway_control(), 6));
    tunnel.extend(sample(strategies::join_message(), 2));
    tunnel.extend(sample(strategies::join_reply(), 2));
    harness::write_corpus(DIR, "frame_tunnel", &tunnel);

    let mut dial = sample(strategies::client_request(), 8);
    dial.extend(sample(strategies::client_reply(), 8));
    harness::write_corpus(DIR, "frame_dial", &dial);

    let mut rpc = sample(strategies::request(), 12);
    rpc.extend(sample(strategies::response(), 12));
    harness::write_corpus(DIR, "rpc", &rpc);

    // Audit: frame bodies (no length prefix), as the entry reads them.
    let body = |v: Vec<u8>| v[4..].to_vec();
    let ack = AuditAck {
        acked_seq: 3,
        last_hash: batch.events[2].hash(),
        error: None,
        signature: fuzz_sign(&ack_payload("van-1", 3, &batch.events[2].hash())),
    };
    let empty = AuditBatch {
        events: vec![],
        signature: fuzz_sign(&batch_payload("van-1", &[])),
    };
    harness::write_corpus(
        DIR,
        "audit_batch",
        &[
            body(encode(&batch).unwrap()),
            body(encode(&empty).unwrap()),
            body(encode(&ack).unwrap()),
            body(encode(&batch.events[0]).unwrap()),
        ],
    );
    harness::write_corpus(DIR, "ssh_cert", &ssh_certs());
}

/// The corpus seeds are what they claim: the signed ones verify with the fuzz key.
#[test]
fn seeds_are_valid() {
    let events = chain(3);
    assert!(fuzz_entry::chain_ok(&events));
    let batch = AuditBatch {
        signature: fuzz_sign(&batch_payload("van-1", &events)),
        events,
    };
    assert!(edgeport_proto::audit::verify_batch(
        "van-1",
        &batch,
        &fuzz_entry::fuzz_public_raw()
    ));
    assert!(ticket().verify(&fuzz_entry::fuzz_public_raw()).is_ok());
}
