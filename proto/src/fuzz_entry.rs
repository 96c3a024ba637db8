//! Entry points for fuzzing the decoders that read bytes from the network: each takes
//! arbitrary bytes, runs the real decoder (never a copy) and checks what must hold of any
//! input, by `assert!`: no panic, and a message that decodes encodes back to the same bytes.
//! The cargo-fuzz targets in `fuzz/` call these, and so does the proptest harness in
//! `proto/tests/fuzz_entries.rs`, which runs with the ordinary test suite on stable Rust.
//!
//! [`seeds`] gives a few valid inputs per target: the harness mutates them, and they are
//! written to `fuzz/corpus/TARGET/` as the fuzzers' starting corpus.

use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};

use crate::audit::{AuditAck, AuditBatch, AuditEvent};
use crate::frame::{self, MAX_FRAME_LEN};
use crate::tunnel::{
    AgentControl, ClientReply, ClientRequest, GatewayControl, JoinMessage, JoinReply, StreamHeader,
};

/// The seed of the fixed Ed25519 key that signs the seed inputs (audit batches, acks,
/// tickets, SSH certificates), so that mutations of them get past signature checks.
pub const FUZZ_KEY_SEED: [u8; 32] = [7; 32];

/// The raw public key of [`FUZZ_KEY_SEED`].
pub fn fuzz_public_raw() -> Vec<u8> {
    use ring::signature::KeyPair as _;
    match ring::signature::Ed25519KeyPair::from_seed_unchecked(&FUZZ_KEY_SEED) {
        Ok(k) => k.public_key().as_ref().to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Signs `msg` with the key of [`FUZZ_KEY_SEED`].
pub fn fuzz_sign(msg: &[u8]) -> Vec<u8> {
    match ring::signature::Ed25519KeyPair::from_seed_unchecked(&FUZZ_KEY_SEED) {
        Ok(k) => k.sign(msg).as_ref().to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Decodes `body` as `T`; what decodes must encode again, to exactly `body` (postcard is
/// canonical here: [`frame::decode`] promises that two byte strings never give one message).
/// Returns the message.
pub fn roundtrip<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let msg = frame::decode::<T>(body).ok()?;
    let again = frame::encode(&msg);
    assert!(again.is_ok(), "a decoded message does not encode again");
    if let Ok(again) = again {
        assert_eq!(
            again.get(4..),
            Some(body),
            "a message decoded from other bytes than it encodes to"
        );
    }
    Some(msg)
}

/// Every frame body in `data` (length-prefixed frames, as on the wire), through the codec
/// too. A frame that is cut short or too long ends the walk.
fn frames(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Ok(Some((body, used))) = frame::split_frame(rest) {
        assert!(body.len() <= MAX_FRAME_LEN && used == body.len() + 4);
        out.push(body);
        rest = &rest[used..];
    }
    out
}

/// The same bytes through the `tokio_util` codec: it must yield the same frames.
fn codec_agrees<T: Serialize + DeserializeOwned>(data: &[u8], bodies: &[&[u8]]) {
    use tokio_util::codec::Decoder;
    let mut codec = crate::codec::FrameCodec::<T, ()>::new();
    let mut buf = bytes::BytesMut::from(data);
    let mut n = 0;
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => n += 1,
            Ok(None) => break,
            Err(_) => {
                n += 1;
                break;
            }
        }
    }
    // The codec stops at the first frame that does not decode, split_frame does not.
    assert!(n <= bodies.len() + 1);
}

/// The device tunnel (`edgeport-tunnel/1`) and join (`edgeport-join/1`) ports: every frame
/// as each message the gateway or the agent reads there, including dial tickets in stream
/// headers, then all of them through both control-stream machines.
pub fn tunnel_frames(data: &[u8]) {
    let bodies = frames(data);
    codec_agrees::<AgentControl>(data, &bodies);
    let host_ca = fuzz_public_raw();
    for body in &bodies {
        roundtrip::<AgentControl>(body);
        roundtrip::<GatewayControl>(body);
        roundtrip::<JoinMessage>(body);
        roundtrip::<JoinReply>(body);
        if let Some(h) = roundtrip::<StreamHeader>(body) {
            if let Some(t) = h.ticket {
                let _ = t.verify(&host_ca);
            }
        }
    }
    let t0 = Instant::now();
    let mut gw = crate::control::GatewayControl::new(
        t0,
        crate::control::GatewayConfig::new("van-1".into(), Duration::from_secs(180)),
    );
    let mut agent = crate::control::AgentControl::new(
        t0,
        crate::control::AgentConfig::new(
            crate::rpc::Transport::Tcp,
            Duration::from_secs(25),
            Duration::from_secs(90),
        ),
        crate::tunnel::Hello {
            device_id: "van-1".into(),
            labels: Default::default(),
            version: crate::VERSION.into(),
            arch: "x86_64".into(),
            kube_cluster: None,
        },
    );
    for (i, body) in bodies.iter().enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 10);
        let _ = gw.handle_frame(now, body);
        if gw.poll_event().is_some() {
            let _ = gw.admit(
                now,
                crate::control::Admission::Accept {
                    gateway_id: "gw-1".into(),
                    transport: crate::rpc::Transport::Tcp,
                    locked_users: vec!["mallory".into()],
                },
            );
        }
        while gw.poll_event().is_some() {}
        while gw.poll_transmit().is_some() {}
        let _ = agent.handle_frame(now, body);
        while agent.poll_event().is_some() {}
        while agent.poll_transmit().is_some() {}
    }
}

/// The user port (`edgeport-dial/1`): what tsh sends the gateway and what it reads back.
pub fn dial_frames(data: &[u8]) {
    let bodies = frames(data);
    codec_agrees::<ClientRequest>(data, &bodies);
    for body in &bodies {
        roundtrip::<ClientRequest>(body);
        roundtrip::<ClientReply>(body);
    }
}

/// The authority's RPC (`edgeport-rpc/1`): requests it reads, responses its clients read.
pub fn rpc_messages(data: &[u8]) {
    let bodies = frames(data);
    codec_agrees::<crate::rpc::Request>(data, &bodies);
    for body in &bodies {
        roundtrip::<crate::rpc::Request>(body);
        roundtrip::<crate::rpc::Response>(body);
    }
}

/// An audit batch as the agent sends it through the gateway to the authority (one frame
/// body), and an ack as it comes back: decoded, signatures checked against the fixed key, the
/// hash chain walked as the authority does.
pub fn audit_batch(data: &[u8]) {
    let key = fuzz_public_raw();
    if let Some(batch) = roundtrip::<AuditBatch>(data) {
        let ok = crate::audit::verify_batch("van-1", &batch, &key);
        // The signature binds the device: the same batch never verifies for another one.
        if ok {
            assert!(!crate::audit::verify_batch("van-2", &batch, &key));
        }
        chain_ok(&batch.events);
    }
    if let Some(ack) = roundtrip::<AuditAck>(data) {
        let _ = crate::audit::verify_ack("van-1", &ack, &key);
    }
    if let Some(ev) = roundtrip::<AuditEvent>(data) {
        assert_eq!(ev.hash().len(), 64);
    }
}

/// Whether `events` link up (each `prev_hash` is the hash of the one before, seqs in a row).
pub fn chain_ok(events: &[AuditEvent]) -> bool {
    events
        .windows(2)
        .all(|w| w[1].seq == w[0].seq.wrapping_add(1) && w[1].prev_hash == w[0].hash())
}

/// An SSH certificate as the agent receives it in a public-key authentication (SSH wire
/// encoding), or as a text line: parsed, then checked as a user and as a host certificate
/// against the CA that signed it (so mutations of valid seeds reach every rule).
pub fn ssh_cert(data: &[u8]) {
    use russh::keys::ssh_key::{Certificate, PublicKey};
    let mut certs = Vec::new();
    if let Ok(c) = Certificate::from_bytes(data) {
        certs.push(c);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Certificate::from_openssh(text) {
            certs.push(c);
        }
        let _ = crate::keys::parse_ed25519_public(text);
    }
    for cert in certs {
        let ca = PublicKey::from(cert.signature_key().clone());
        for now in [0, cert.valid_after(), cert.valid_before().saturating_sub(1)] {
            let login = cert.valid_principals().first().cloned().unwrap_or_default();
            if let Ok(grant) = crate::sshcert::check_user_cert(&cert, &ca, &login, now) {
                assert!(grant.principals.contains(&login));
                assert!(now < grant.valid_before);
                let _ = grant.roles.allows_device(&Default::default());
            }
            let _ = crate::sshcert::check_host_cert(&cert, &ca, &login, now);
        }
    }
}

/// A fuzz target: its name (as in `fuzz/fuzz_targets/`) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// The fuzz targets of this crate.
pub const TARGETS: &[Target] = &[
    ("frame_tunnel", tunnel_frames),
    ("frame_dial", dial_frames),
    ("rpc", rpc_messages),
    ("audit_batch", audit_batch),
    ("ssh_cert", ssh_cert),
];
