//! Tests of the control machines: every message kind in every state, one by one, and
//! property tests that wire an agent to a gateway through an in-memory, delaying, dropping
//! connection driven by a discrete-event clock.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::audit::{AuditAck, AuditBatch};
use crate::frame::FrameError;
use crate::identity::CaBundle;
use crate::rpc::{DeviceCerts, ErrorKind, RpcError, Transport};
use crate::tunnel::{AgentControl as AgentMsg, GatewayControl as GatewayMsg, Hello};

const KEEPALIVE: Duration = Duration::from_secs(25);
const AGENT_IDLE: Duration = Duration::from_secs(90);
const GATEWAY_IDLE: Duration = Duration::from_secs(180);

fn at(t0: Instant, secs: u64) -> Instant {
    t0 + Duration::from_secs(secs)
}

fn hello(id: &str) -> Hello {
    Hello {
        device_id: id.into(),
        labels: Default::default(),
        version: "1".into(),
        arch: "x86_64".into(),
        kube_cluster: None,
    }
}

/// A renewal proof (the control core only carries it; the authority checks it).
fn proof() -> crate::renew::RenewProof {
    crate::renew::RenewProof {
        signed_at: 7,
        bundle: "digest".into(),
        signature: vec![1, 2, 3],
    }
}

fn certs() -> DeviceCerts {
    DeviceCerts {
        device_id: "van-1".into(),
        labels: Default::default(),
        host_cert: String::new(),
        x509_cert_pem: String::new(),
        cas: CaBundle {
            cluster: "c".into(),
            user_ca: String::new(),
            host_ca: String::new(),
            x509_ca_pem: String::new(),
            ca_pin: String::new(),
            signature: String::new(),
        },
        valid_before: 0,
    }
}

fn batch(marker: u64) -> AuditBatch {
    AuditBatch {
        events: Vec::new(),
        signature: marker.to_be_bytes().to_vec(),
    }
}

fn ack(seq: u64) -> AuditAck {
    AuditAck {
        acked_seq: seq,
        last_hash: String::new(),
        error: None,
        signature: Vec::new(),
    }
}

fn welcome() -> GatewayMsg {
    GatewayMsg::Welcome {
        gateway_id: "gw-1".into(),
        transport: Transport::Tcp,
    }
}

fn tcp_agent(t0: Instant) -> AgentControl {
    AgentControl::new(
        t0,
        AgentConfig::new(Transport::Tcp, KEEPALIVE, AGENT_IDLE),
        hello("van-1"),
    )
}

/// An agent that has had its Welcome at `t0` and sent its first Ping (seq 1).
fn established_agent(t0: Instant) -> AgentControl {
    let mut a = tcp_agent(t0);
    assert!(matches!(a.poll_transmit(), Some(AgentMsg::Hello(_))));
    a.handle_message(t0, welcome()).unwrap();
    a.handle_timeout(t0);
    assert!(matches!(
        a.poll_transmit(),
        Some(AgentMsg::Ping {
            seq: 1,
            rtt_ms: None
        })
    ));
    assert!(matches!(
        a.poll_event(),
        Some(AgentEvent::Established { .. })
    ));
    assert!(matches!(a.poll_event(), Some(AgentEvent::RenewDue)));
    assert!(a.poll_event().is_none());
    a
}

fn events_a(a: &mut AgentControl) -> Vec<AgentEvent> {
    std::iter::from_fn(|| a.poll_event()).collect()
}

fn events_g(g: &mut GatewayControl) -> Vec<GatewayEvent> {
    std::iter::from_fn(|| g.poll_event()).collect()
}

fn gateway(t0: Instant) -> GatewayControl {
    GatewayControl::new(t0, GatewayConfig::new("van-1".into(), GATEWAY_IDLE))
}

fn accept(locked: &[&str]) -> Admission {
    Admission::Accept {
        gateway_id: "gw-1".into(),
        transport: Transport::Tcp,
        locked_users: locked.iter().map(|s| s.to_string()).collect(),
    }
}

fn established_gateway(t0: Instant) -> GatewayControl {
    let mut g = gateway(t0);
    g.handle_message(t0, AgentMsg::Hello(hello("van-1")))
        .unwrap();
    g.admit(t0, accept(&[])).unwrap();
    assert!(matches!(
        g.poll_transmit(),
        Some(GatewayMsg::Welcome { .. })
    ));
    assert!(g.poll_transmit().is_none());
    events_g(&mut g);
    g
}

// ---- agent ------------------------------------------------------------------------------

#[test]
fn agent_says_hello_and_times_out_without_welcome() {
    let t0 = Instant::now();
    let mut a = tcp_agent(t0);
    assert!(matches!(a.poll_transmit(), Some(AgentMsg::Hello(h)) if h.device_id == "van-1"));
    assert_eq!(a.poll_timeout(), Some(at(t0, 10)));
    a.handle_timeout(at(t0, 9));
    assert!(!a.is_closed());
    a.handle_timeout(at(t0, 10));
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::HandshakeTimeout)
    ));
    assert_eq!(
        a.close_reason().unwrap().to_string(),
        "no Welcome from the gateway in time"
    );
    assert!(a.close_reason().unwrap().during_handshake());
    assert!(matches!(events_a(&mut a)[..], [AgentEvent::Closed]));
    assert_eq!(a.poll_timeout(), None);
}

#[test]
fn agent_refused_at_hello() {
    let t0 = Instant::now();
    let mut a = tcp_agent(t0);
    a.handle_message(
        t0,
        GatewayMsg::Refused(RpcError::new(ErrorKind::Denied, "revoked")),
    )
    .unwrap();
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::HelloRefused(e)) if e.message == "revoked"
    ));
}

#[test]
fn agent_closes_on_anything_but_welcome_during_hello() {
    let t0 = Instant::now();
    let others = [
        (GatewayMsg::Renewed(certs()), "Renewed"),
        (GatewayMsg::Locked { users: vec![] }, "Locked"),
        (GatewayMsg::Pong { seq: 1 }, "Pong"),
        (GatewayMsg::AuditAck(ack(1)), "AuditAck"),
    ];
    for (msg, kind) in others {
        let mut a = tcp_agent(t0);
        a.handle_message(t0, msg).unwrap();
        match a.close_reason() {
            Some(AgentCloseReason::UnexpectedAnswer { got }) => assert_eq!(*got, kind),
            other => panic!("{kind}: {other:?}"),
        }
        assert!(a.close_reason().unwrap().during_handshake());
    }
}

#[test]
fn agent_read_errors_during_hello_and_after() {
    let t0 = Instant::now();
    for (err, closed) in [(FrameError::Closed, true), (FrameError::Truncated, true)] {
        let mut a = tcp_agent(t0);
        a.handle_read_error(t0, err).unwrap();
        assert_eq!(
            matches!(a.close_reason(), Some(AgentCloseReason::ClosedDuringHello)),
            closed
        );
    }
    let mut a = tcp_agent(t0);
    a.handle_frame(t0, &[0xff, 0xff, 0xff]).unwrap();
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::HelloStream(FrameError::Malformed(_)))
    ));

    let mut a = established_agent(t0);
    a.handle_read_error(t0, FrameError::Closed).unwrap();
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::StreamClosed)
    ));
    assert_eq!(
        a.close_reason().unwrap().to_string(),
        "the gateway closed the control stream"
    );
    let mut a = established_agent(t0);
    a.handle_frame(t0, &[0xff]).unwrap();
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::Stream(FrameError::Malformed(_)))
    ));
    assert!(!a.close_reason().unwrap().during_handshake());
    assert_eq!(
        a.handle_read_error(t0, FrameError::Closed),
        Err(ControlError::Closed)
    );
}

#[test]
fn agent_pings_measures_rtt_and_gives_up_when_idle() {
    let t0 = Instant::now();
    let mut a = established_agent(t0);
    assert_eq!(a.poll_timeout(), Some(at(t0, 25)));
    // A Pong for another seq changes nothing; the right one gives the RTT.
    a.handle_message(at(t0, 1), GatewayMsg::Pong { seq: 7 })
        .unwrap();
    assert_eq!(a.rtt_ms(), None);
    a.handle_message(
        t0 + Duration::from_millis(1500),
        GatewayMsg::Pong { seq: 1 },
    )
    .unwrap();
    assert_eq!(a.rtt_ms(), Some(1500));
    a.handle_timeout(at(t0, 25));
    assert!(matches!(
        a.poll_transmit(),
        Some(AgentMsg::Ping {
            seq: 2,
            rtt_ms: Some(1500)
        })
    ));
    // Silence: Pings at 50 and 75 (last heard at 1.5 s), then at 100 more than 90 s passed.
    a.handle_timeout(at(t0, 50));
    a.handle_timeout(at(t0, 75));
    assert!(!a.is_closed());
    assert_eq!(a.poll_timeout(), Some(at(t0, 100)));
    a.handle_timeout(at(t0, 100));
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::Idle { secs: 90 })
    ));
    assert_eq!(
        a.close_reason().unwrap().to_string(),
        "nothing heard from the gateway for 90s"
    );
}

#[test]
fn agent_on_quic_sends_no_pings() {
    let t0 = Instant::now();
    let mut a = AgentControl::new(
        t0,
        AgentConfig::new(Transport::Quic, KEEPALIVE, AGENT_IDLE),
        hello("van-1"),
    );
    a.poll_transmit();
    a.handle_message(t0, welcome()).unwrap();
    a.handle_timeout(t0);
    assert!(a.poll_transmit().is_none());
    assert_eq!(a.poll_timeout(), Some(t0 + RENEW_CHECK));
    a.handle_timeout(at(t0, 1000));
    assert!(!a.is_closed());
}

#[test]
fn agent_on_quic_pings_when_asked_to_after_hours_of_silence() {
    // The NAT in front of the device forgets bindings sooner than QUIC's own keep-alive:
    // the agent asks for control-stream Pings at a shorter interval, hours after the last
    // message on the control stream. The idle check counts from then, not from Welcome.
    let t0 = Instant::now();
    let mut a = AgentControl::new(
        t0,
        AgentConfig::new(Transport::Quic, KEEPALIVE, AGENT_IDLE),
        hello("van-1"),
    );
    a.poll_transmit();
    a.handle_message(t0, welcome()).unwrap();
    let later = at(t0, 3 * 3600);
    let k = Keepalive {
        interval: Duration::from_secs(20),
        idle_timeout: AGENT_IDLE,
    };
    a.set_keepalive(later, Some(k));
    a.handle_timeout(later);
    assert!(
        a.poll_transmit().is_none(),
        "the first Ping waits an interval"
    );
    a.handle_timeout(later + k.interval);
    assert!(matches!(a.poll_transmit(), Some(AgentMsg::Ping { .. })));
    assert!(!a.is_closed());
    // A Ping out of rhythm, when the agent's address went away.
    a.ping_now().unwrap();
    assert!(matches!(a.poll_transmit(), Some(AgentMsg::Ping { .. })));
    // Back to QUIC's own keep-alive: no more Pings.
    a.set_keepalive(later + k.interval, None);
    a.handle_timeout(later + k.interval * 10);
    assert!(a.poll_transmit().is_none());
    assert!(!a.is_closed());
}

#[test]
fn agent_renewal_flow() {
    let t0 = Instant::now();
    let mut a = tcp_agent(t0);
    assert_eq!(
        a.request_renew("k".into(), proof()),
        Err(ControlError::NotEstablished)
    );
    let mut a = established_agent(t0);
    a.request_renew("k".into(), proof()).unwrap();
    assert!(
        matches!(a.poll_transmit(), Some(AgentMsg::RenewProven { ssh_public_key, proof: p }) if ssh_public_key == "k" && p == proof())
    );
    assert_eq!(
        a.request_renew("k".into(), proof()),
        Err(ControlError::RenewInFlight)
    );
    // No RenewDue while one is pending (a Pong keeps the keep-alive happy meanwhile).
    a.handle_message(at(t0, 599), GatewayMsg::Pong { seq: 99 })
        .unwrap();
    a.handle_timeout(t0 + RENEW_CHECK);
    assert!(!a.is_closed());
    assert!(events_a(&mut a).is_empty());
    a.handle_message(at(t0, 601), GatewayMsg::Renewed(certs()))
        .unwrap();
    assert!(matches!(events_a(&mut a)[..], [AgentEvent::Renewed(_)]));
    assert!(!a.renew_pending());
    // Unasked certificates are ignored.
    a.handle_message(at(t0, 602), GatewayMsg::Renewed(certs()))
        .unwrap();
    assert!(matches!(
        events_a(&mut a)[..],
        [AgentEvent::Ignored(AgentIgnored::UnsolicitedRenewed)]
    ));
    // A refused renewal keeps the tunnel; a refusal outside one ends it.
    a.request_renew("k".into(), proof()).unwrap();
    let refusal = GatewayMsg::Refused(RpcError::new(ErrorKind::Internal, "down"));
    a.handle_message(at(t0, 603), refusal.clone()).unwrap();
    assert!(matches!(
        events_a(&mut a)[..],
        [AgentEvent::RenewRefused(_)]
    ));
    assert!(!a.is_closed());
    a.handle_message(at(t0, 604), refusal).unwrap();
    assert!(matches!(
        a.close_reason(),
        Some(AgentCloseReason::Refused(_))
    ));
    assert_eq!(
        a.request_renew("k".into(), proof()),
        Err(ControlError::Closed)
    );
}

#[test]
fn rotated_ca_bundle_reaches_the_agent_over_an_established_tunnel() {
    let t0 = Instant::now();
    let mut a = established_agent(t0);
    let mut cas = certs().cas;
    cas.user_ca = "new\nold".into();
    a.handle_message(t0, GatewayMsg::Cas(cas)).unwrap();
    let ev = events_a(&mut a);
    assert!(matches!(&ev[..], [AgentEvent::Cas(b)] if b.user_ca == "new\nold"));
    assert!(
        a.close_reason().is_none(),
        "a bundle never closes the tunnel"
    );
}

#[test]
fn agent_locks_welcome_again_and_audit() {
    let t0 = Instant::now();
    let mut a = tcp_agent(t0);
    assert_eq!(a.send_audit(batch(0)), Err(ControlError::NotEstablished));
    let mut a = established_agent(t0);
    a.handle_message(
        t0,
        GatewayMsg::Locked {
            users: vec!["eve".into()],
        },
    )
    .unwrap();
    a.handle_message(t0, welcome()).unwrap();
    let ev = events_a(&mut a);
    assert!(
        matches!(&ev[..], [AgentEvent::Locked(u), AgentEvent::Ignored(AgentIgnored::SecondWelcome)] if u == &["eve"])
    );

    a.handle_message(t0, GatewayMsg::AuditAck(ack(1))).unwrap();
    assert!(matches!(
        events_a(&mut a)[..],
        [AgentEvent::Ignored(AgentIgnored::UnsolicitedAuditAck)]
    ));
    let id = a.send_audit(batch(1)).unwrap();
    assert!(matches!(a.poll_transmit(), Some(AgentMsg::Audit(_))));
    assert_eq!(a.send_audit(batch(2)), Err(ControlError::AuditInFlight));
    a.handle_message(t0, GatewayMsg::AuditAck(ack(5))).unwrap();
    assert!(
        matches!(&events_a(&mut a)[..], [AgentEvent::AuditAcked { id: i, ack }] if *i == id && ack.acked_seq == 5)
    );
    // A batch in flight at the close is reported failed, before Closed.
    let id2 = a.send_audit(batch(2)).unwrap();
    assert_ne!(id, id2);
    a.close(t0, "agent shutting down");
    a.close(t0, "second reason");
    assert!(
        matches!(&events_a(&mut a)[..], [AgentEvent::AuditFailed { id }, AgentEvent::Closed] if *id == id2)
    );
    assert_eq!(a.close_reason().unwrap().to_string(), "agent shutting down");
    assert_eq!(
        a.handle_message(t0, welcome()).unwrap_err(),
        ControlError::Closed
    );
}

// ---- gateway ----------------------------------------------------------------------------

#[test]
fn gateway_waits_for_hello() {
    let t0 = Instant::now();
    let mut g = gateway(t0);
    assert!(g.wants_read());
    assert_eq!(g.poll_timeout(), Some(at(t0, 10)));
    g.handle_timeout(at(t0, 10));
    assert!(matches!(
        g.close_reason(),
        Some(GatewayCloseReason::NoHello)
    ));
    assert_eq!(g.close_reason().unwrap().conn_reason(), "no hello");

    let mut g = gateway(t0);
    g.handle_read_error(t0, FrameError::Closed).unwrap();
    assert!(matches!(
        g.close_reason(),
        Some(GatewayCloseReason::BadHello(_))
    ));
    assert_eq!(g.close_reason().unwrap().conn_reason(), "bad hello");
    let mut g = gateway(t0);
    g.handle_frame(t0, &[9, 9, 9]).unwrap();
    assert!(matches!(
        g.close_reason(),
        Some(GatewayCloseReason::BadHello(FrameError::Malformed(_)))
    ));
}

#[test]
fn gateway_refuses_anything_but_hello_first() {
    let t0 = Instant::now();
    let firsts = [
        AgentMsg::Ping {
            seq: 1,
            rtt_ms: None,
        },
        AgentMsg::Renew {
            ssh_public_key: "k".into(),
        },
        AgentMsg::Audit(batch(0)),
    ];
    for msg in firsts {
        let mut g = gateway(t0);
        g.handle_message(t0, msg).unwrap();
        assert!(matches!(
            g.poll_transmit(),
            Some(GatewayMsg::Refused(e)) if e.kind == ErrorKind::Invalid && e.message == "expected Hello first"
        ));
        assert!(matches!(
            g.close_reason(),
            Some(GatewayCloseReason::ExpectedHello { .. })
        ));
        assert_eq!(g.close_reason().unwrap().conn_reason(), "protocol error");
    }
}

#[test]
fn gateway_admits_welcomes_and_sends_locks() {
    let t0 = Instant::now();
    let mut g = gateway(t0);
    assert_eq!(g.admit(t0, accept(&[])), Err(ControlError::NothingToAdmit));
    g.handle_message(t0, AgentMsg::Hello(hello("van-1")))
        .unwrap();
    assert!(matches!(&events_g(&mut g)[..], [GatewayEvent::Hello(h)] if h.device_id == "van-1"));
    assert!(!g.wants_read());
    assert_eq!(g.poll_timeout(), None);
    assert_eq!(
        g.handle_message(t0, AgentMsg::Hello(hello("van-1"))),
        Err(ControlError::AdmissionPending)
    );
    g.admit(at(t0, 1), accept(&["eve"])).unwrap();
    assert!(matches!(
        g.poll_transmit(),
        Some(GatewayMsg::Welcome { gateway_id, transport: Transport::Tcp }) if gateway_id == "gw-1"
    ));
    assert!(matches!(g.poll_transmit(), Some(GatewayMsg::Locked { users }) if users == ["eve"]));
    assert!(matches!(events_g(&mut g)[..], [GatewayEvent::Established]));
    assert_eq!(g.poll_timeout(), Some(at(t0, 181)));
    assert_eq!(g.admit(t0, accept(&[])), Err(ControlError::NothingToAdmit));
}

#[test]
fn gateway_refuses_revoked_and_mismatched_devices() {
    let t0 = Instant::now();
    let mut g = gateway(t0);
    g.handle_message(t0, AgentMsg::Hello(hello("van-2")))
        .unwrap();
    g.admit(t0, accept(&[])).unwrap();
    assert!(matches!(
        g.poll_transmit(),
        Some(GatewayMsg::Refused(e)) if e.kind == ErrorKind::Denied
            && e.message == "Hello names device \"van-2\" but the certificate is for \"van-1\""
    ));
    assert_eq!(
        g.close_reason().unwrap().conn_reason(),
        "device id mismatch"
    );
    assert!(g.close_reason().unwrap().during_handshake());

    // Revocation is checked first, as before.
    let mut g = gateway(t0);
    g.handle_message(t0, AgentMsg::Hello(hello("van-2")))
        .unwrap();
    g.admit(
        t0,
        Admission::Revoked {
            message: "device van-1 was removed".into(),
        },
    )
    .unwrap();
    assert!(matches!(
        g.poll_transmit(),
        Some(GatewayMsg::Refused(e)) if e.kind == ErrorKind::Denied && e.message == "device van-1 was removed"
    ));
    assert_eq!(g.close_reason().unwrap().conn_reason(), "device revoked");
    assert!(matches!(
        events_g(&mut g)[..],
        [GatewayEvent::Hello(_), GatewayEvent::Closed]
    ));
}

#[test]
fn gateway_answers_pings_and_ignores_a_second_hello() {
    let t0 = Instant::now();
    let mut g = established_gateway(t0);
    g.handle_message(
        at(t0, 5),
        AgentMsg::Ping {
            seq: 3,
            rtt_ms: Some(42),
        },
    )
    .unwrap();
    g.handle_message(
        at(t0, 6),
        AgentMsg::Ping {
            seq: 4,
            rtt_ms: None,
        },
    )
    .unwrap();
    g.handle_message(at(t0, 7), AgentMsg::Hello(hello("van-1")))
        .unwrap();
    assert!(matches!(
        g.poll_transmit(),
        Some(GatewayMsg::Pong { seq: 3 })
    ));
    assert!(matches!(
        g.poll_transmit(),
        Some(GatewayMsg::Pong { seq: 4 })
    ));
    assert!(matches!(
        events_g(&mut g)[..],
        [
            GatewayEvent::Rtt(42),
            GatewayEvent::Ignored(GatewayIgnored::SecondHello)
        ]
    ));
    // Idle: every frame moves the deadline.
    assert_eq!(g.poll_timeout(), Some(at(t0, 187)));
    g.handle_timeout(at(t0, 186));
    assert!(!g.is_closed());
    g.handle_timeout(at(t0, 187));
    assert_eq!(
        g.close_reason().unwrap().to_string(),
        "idle timeout (no keep-alive from the device for 180s)"
    );
}

#[test]
fn gateway_relays_renewals_and_audit() {
    let t0 = Instant::now();
    let mut g = established_gateway(t0);
    g.handle_message(
        t0,
        AgentMsg::Renew {
            ssh_public_key: "k".into(),
        },
    )
    .unwrap();
    g.handle_message(t0, AgentMsg::Audit(batch(9))).unwrap();
    let ev = events_g(&mut g);
    let (GatewayEvent::Renew { id: r, .. }, GatewayEvent::Audit { id: au, .. }) = (&ev[0], &ev[1])
    else {
        panic!("{ev:?}")
    };
    let (r, au) = (*r, *au);
    assert!(matches!(
        g.audit_done(t0, r, ack(1)),
        Err(ControlError::UnknownRelay { .. })
    ));
    g.renew_done(t0, r, Ok(certs())).unwrap();
    assert!(matches!(g.poll_transmit(), Some(GatewayMsg::Renewed(_))));
    assert!(g.renew_done(t0, r, Ok(certs())).is_err());
    g.audit_done(t0, au, ack(9)).unwrap();
    assert!(matches!(g.poll_transmit(), Some(GatewayMsg::AuditAck(a)) if a.acked_seq == 9));
    // A signed renewal (current agents) carries the device's proof to the authority; an
    // older agent's Renew above carried none.
    assert!(matches!(&ev[0], GatewayEvent::Renew { proof: None, .. }));
    g.handle_message(
        t0,
        AgentMsg::RenewProven {
            ssh_public_key: "k".into(),
            proof: proof(),
        },
    )
    .unwrap();
    let GatewayEvent::Renew { id, proof: p, .. } = events_g(&mut g).remove(0) else {
        panic!()
    };
    assert_eq!(p, Some(proof()));
    // The device's tunnel attestation goes to the gateway's presence, not to a relay.
    let attest = crate::attest::TunnelProof {
        gateway: "gw".into(),
        signed_at_ms: 9,
        signature: vec![4],
    };
    g.handle_message(t0, AgentMsg::Attest(attest.clone()))
        .unwrap();
    assert!(matches!(&events_g(&mut g)[..], [GatewayEvent::Attested(a)] if *a == attest));
    g.renew_done(t0, id, Err(RpcError::new(ErrorKind::Internal, "down")))
        .unwrap();
    assert!(matches!(g.poll_transmit(), Some(GatewayMsg::Refused(_))));
}

#[test]
fn gateway_stops_reading_past_the_relay_limit() {
    let t0 = Instant::now();
    let mut g = established_gateway(t0);
    for i in 0..3 {
        g.handle_message(at(t0, i), AgentMsg::Audit(batch(i)))
            .unwrap();
    }
    let ids: Vec<RelayId> = events_g(&mut g)
        .into_iter()
        .filter_map(|e| match e {
            GatewayEvent::Audit { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(!g.wants_read());
    assert_eq!(g.poll_timeout(), None);
    assert_eq!(g.relays_in_flight(), 2);
    g.audit_done(at(t0, 500), ids[0], ack(0)).unwrap();
    assert!(
        matches!(&events_g(&mut g)[..], [GatewayEvent::Audit { batch, .. }] if batch.signature == 2u64.to_be_bytes())
    );
    assert!(g.wants_read());
    assert_eq!(g.poll_timeout(), Some(at(t0, 680)));
}

#[test]
fn gateway_read_errors_local_requests_and_close() {
    let t0 = Instant::now();
    let mut g = gateway(t0);
    assert_eq!(g.send_locked(vec![]), Err(ControlError::NotEstablished));
    let mut g = established_gateway(t0);
    g.send_locked(vec!["eve".into()]).unwrap();
    g.send_refused(RpcError::new(ErrorKind::Denied, "removed"))
        .unwrap();
    assert!(matches!(g.poll_transmit(), Some(GatewayMsg::Locked { .. })));
    assert!(matches!(g.poll_transmit(), Some(GatewayMsg::Refused(_))));
    g.handle_read_error(t0, FrameError::Closed).unwrap();
    assert_eq!(
        g.close_reason().unwrap().to_string(),
        "closed by the device"
    );
    assert_eq!(g.send_locked(vec![]), Err(ControlError::Closed));

    let mut g = established_gateway(t0);
    g.handle_read_error(t0, FrameError::Truncated).unwrap();
    assert!(matches!(
        g.close_reason(),
        Some(GatewayCloseReason::Stream(FrameError::Truncated))
    ));
    let mut g = established_gateway(t0);
    g.handle_message(t0, AgentMsg::Audit(batch(0))).unwrap();
    let GatewayEvent::Audit { id, .. } = events_g(&mut g).remove(0) else {
        panic!()
    };
    g.close(t0, "gateway shutting down");
    assert_eq!(g.audit_done(t0, id, ack(0)), Err(ControlError::Closed));
    assert_eq!(
        g.close_reason().unwrap().conn_reason(),
        "gateway shutting down"
    );
}

// ---- the two machines wired together ---------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Let this many milliseconds pass (timers fire, messages arrive, relays finish).
    Advance(u64),
    SendAudit,
    RequestRenew,
    Lock,
    /// The connection breaks: both sides see it, everything in flight is lost.
    Drop,
    AgentClose,
    GatewayClose,
}

enum Wire<T> {
    Msg(T),
    Eof,
}

struct Sim {
    now: Instant,
    agent: AgentControl,
    gw: GatewayControl,
    to_gw: VecDeque<(Instant, Wire<AgentMsg>)>,
    to_agent: VecDeque<(Instant, Wire<GatewayMsg>)>,
    /// Relays the gateway application runs: (done at, id, audit marker or renewal).
    relays: Vec<(Instant, RelayId, Option<u64>)>,
    delays: Vec<u64>,
    next_delay: usize,
    revoke: bool,
    renew_on_due: bool,
    next_marker: u64,
    markers: BTreeMap<AuditId, u64>,
    /// Per batch: (acks, failures).
    outcomes: BTreeMap<AuditId, (u32, u32)>,
    renew_requests: u32,
    renew_answers: u32,
    agent_established: bool,
    gw_established: bool,
}

impl Sim {
    fn new(t0: Instant, tcp: bool, delays: Vec<u64>, revoke: bool, renew_on_due: bool) -> Self {
        let transport = if tcp { Transport::Tcp } else { Transport::Quic };
        let idle = if tcp {
            GATEWAY_IDLE
        } else {
            Duration::from_secs(365 * 86400)
        };
        let mut sim = Sim {
            now: t0,
            agent: AgentControl::new(
                t0,
                AgentConfig::new(transport, KEEPALIVE, AGENT_IDLE),
                hello("van-1"),
            ),
            gw: GatewayControl::new(t0, GatewayConfig::new("van-1".into(), idle)),
            to_gw: VecDeque::new(),
            to_agent: VecDeque::new(),
            relays: Vec::new(),
            delays,
            next_delay: 0,
            revoke,
            renew_on_due,
            next_marker: 0,
            markers: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            renew_requests: 0,
            renew_answers: 0,
            agent_established: false,
            gw_established: false,
        };
        sim.flush();
        sim
    }

    fn delay(&mut self) -> Duration {
        let d = self.delays[self.next_delay % self.delays.len()];
        self.next_delay += 1;
        Duration::from_millis(d)
    }

    /// Moves what the machines produced onto the wires and runs the applications.
    fn flush(&mut self) {
        loop {
            let mut progress = false;
            while let Some(m) = self.agent.poll_transmit() {
                progress = true;
                let t = self.ready_at(true);
                self.to_gw.push_back((t, Wire::Msg(m)));
            }
            while let Some(m) = self.gw.poll_transmit() {
                progress = true;
                let t = self.ready_at(false);
                self.to_agent.push_back((t, Wire::Msg(m)));
            }
            while let Some(e) = self.agent.poll_event() {
                progress = true;
                self.agent_app(e);
            }
            while let Some(e) = self.gw.poll_event() {
                progress = true;
                self.gw_app(e);
            }
            if !progress {
                break;
            }
        }
        self.check();
    }

    /// In order on each wire: never before the message queued ahead of it.
    fn ready_at(&mut self, to_gw: bool) -> Instant {
        let d = self.now + self.delay();
        let last = if to_gw {
            self.to_gw.back().map(|(t, _)| *t)
        } else {
            self.to_agent.back().map(|(t, _)| *t)
        };
        last.map_or(d, |l| l.max(d))
    }

    fn agent_app(&mut self, e: AgentEvent) {
        match e {
            AgentEvent::Established { .. } => self.agent_established = true,
            AgentEvent::RenewDue if self.renew_on_due => self.request_renew(),
            AgentEvent::RenewDue
            | AgentEvent::Locked(_)
            | AgentEvent::Cas(_)
            | AgentEvent::Budget(_)
            | AgentEvent::TargetCert { .. }
            | AgentEvent::Ignored(_) => {}
            AgentEvent::Renewed(_) | AgentEvent::RenewRefused(_) => self.renew_answers += 1,
            AgentEvent::AuditAcked { id, ack } => {
                assert_eq!(
                    Some(&ack.acked_seq),
                    self.markers.get(&id),
                    "ack for the wrong batch"
                );
                self.outcomes.entry(id).or_default().0 += 1;
            }
            AgentEvent::AuditFailed { id } => self.outcomes.entry(id).or_default().1 += 1,
            AgentEvent::Closed => {
                // The IO layer closes the connection after what was queued.
                let t = self.ready_at(true);
                self.to_gw.push_back((t, Wire::Eof));
            }
        }
    }

    fn gw_app(&mut self, e: GatewayEvent) {
        match e {
            GatewayEvent::Hello(_) => {
                let admission = if self.revoke {
                    Admission::Revoked {
                        message: "removed".into(),
                    }
                } else {
                    accept(&[])
                };
                self.gw.admit(self.now, admission).unwrap();
            }
            GatewayEvent::Established => self.gw_established = true,
            GatewayEvent::Renew { id, .. } => {
                let t = self.now + self.delay();
                self.relays.push((t, id, None));
            }
            GatewayEvent::Audit { id, batch } => {
                let marker = u64::from_be_bytes(batch.signature[..8].try_into().unwrap());
                let t = self.now + self.delay();
                self.relays.push((t, id, Some(marker)));
            }
            GatewayEvent::Rtt(_)
            | GatewayEvent::Ignored(_)
            | GatewayEvent::Usage(_)
            | GatewayEvent::Attested(_)
            | GatewayEvent::TargetCert { .. } => {}
            GatewayEvent::Closed => {
                let t = self.ready_at(false);
                self.to_agent.push_back((t, Wire::Eof));
            }
        }
    }

    fn request_renew(&mut self) {
        if self.agent.request_renew("key".into(), proof()).is_ok() {
            self.renew_requests += 1;
        }
    }

    /// The invariants that hold after every step.
    fn check(&self) {
        // Nobody waits forever: a side is closed, has a timer, or waits on its own
        // application (a relay in flight, which always finishes).
        assert!(self.agent.is_closed() || self.agent.poll_timeout().is_some());
        assert!(
            self.gw.is_closed()
                || self.gw.poll_timeout().is_some()
                || self.gw.relays_in_flight() > 0
        );
        for (id, (acks, fails)) in &self.outcomes {
            assert!(
                acks + fails <= 1,
                "batch {id:?}: {acks} acks, {fails} failures"
            );
        }
        assert!(self.renew_answers <= self.renew_requests);
    }

    /// The earliest thing that happens next, if any.
    fn next_at(&self) -> Option<Instant> {
        let mut c: Vec<Instant> = Vec::new();
        c.extend(self.agent.poll_timeout());
        c.extend(self.gw.poll_timeout());
        if self.gw.wants_read() {
            c.extend(self.to_gw.front().map(|(t, _)| *t));
        }
        if !self.agent.is_closed() {
            c.extend(self.to_agent.front().map(|(t, _)| *t));
        }
        c.extend(self.relays.iter().map(|(t, _, _)| *t));
        c.into_iter().min()
    }

    fn advance(&mut self, by: Duration) {
        let target = self.now + by;
        let mut steps = 0;
        while let Some(t) = self.next_at().filter(|t| *t <= target) {
            steps += 1;
            assert!(steps < 100_000, "no progress");
            self.now = self.now.max(t);
            self.step();
        }
        self.now = target;
    }

    /// Processes everything due at `self.now`.
    fn step(&mut self) {
        let now = self.now;
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
            assert!(
                self.agent.poll_timeout().is_none_or(|t| t > now),
                "timer did not move"
            );
        }
        if self.gw.poll_timeout().is_some_and(|t| t <= now) {
            self.gw.handle_timeout(now);
            assert!(
                self.gw.poll_timeout().is_none_or(|t| t > now),
                "timer did not move"
            );
        }
        self.flush();
        if self.gw.is_closed() {
            self.to_gw.clear();
        } else if self.gw.wants_read() && self.to_gw.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, w)) = self.to_gw.pop_front() {
                match w {
                    Wire::Msg(m) => self.gw.handle_message(now, m).unwrap(),
                    Wire::Eof => self.gw.handle_read_error(now, FrameError::Closed).unwrap(),
                }
            }
        }
        self.flush();
        if self.agent.is_closed() {
            self.to_agent.clear();
        } else if self.to_agent.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, w)) = self.to_agent.pop_front() {
                match w {
                    Wire::Msg(m) => self.agent.handle_message(now, m).unwrap(),
                    Wire::Eof => self
                        .agent
                        .handle_read_error(now, FrameError::Closed)
                        .unwrap(),
                }
            }
        }
        self.flush();
        if let Some(i) = self.relays.iter().position(|(t, _, _)| *t <= now) {
            let (_, id, marker) = self.relays.remove(i);
            let r = match marker {
                Some(m) => self.gw.audit_done(now, id, ack(m)),
                None => self.gw.renew_done(now, id, Ok(certs())),
            };
            assert!(r.is_ok() || self.gw.is_closed(), "{r:?}");
            self.flush();
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Advance(ms) => self.advance(Duration::from_millis(*ms)),
            Op::SendAudit => {
                let marker = self.next_marker;
                match self.agent.send_audit(batch(marker)) {
                    Ok(id) => {
                        self.next_marker += 1;
                        self.markers.insert(id, marker);
                    }
                    Err(e) => assert!(
                        matches!(e, ControlError::AuditInFlight)
                            && self.agent.audit_in_flight().is_some()
                            || matches!(e, ControlError::NotEstablished | ControlError::Closed)
                                && !self.agent.is_established()
                    ),
                }
            }
            Op::RequestRenew => self.request_renew(),
            Op::Lock => {
                let _ = self.gw.send_locked(vec!["eve".into()]);
            }
            Op::Drop => {
                self.to_gw.clear();
                self.to_agent.clear();
                let reset = || FrameError::Io(std::io::ErrorKind::ConnectionReset.into());
                let _ = self.agent.handle_read_error(self.now, reset());
                self.gw.close(self.now, "connection reset");
                // Nothing reaches the other side any more.
                self.flush();
                self.to_gw.clear();
                self.to_agent.clear();
            }
            Op::AgentClose => self.agent.close(self.now, "agent shutting down"),
            Op::GatewayClose => self.gw.close(self.now, "gateway shutting down"),
        }
        self.flush();
    }
}

fn fair_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..5_000).prop_map(Op::Advance),
        2 => Just(Op::SendAudit),
        1 => Just(Op::RequestRenew),
        1 => Just(Op::Lock),
    ]
}

fn chaos_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..300_000).prop_map(Op::Advance),
        3 => Just(Op::SendAudit),
        1 => Just(Op::RequestRenew),
        1 => Just(Op::Lock),
        1 => Just(Op::Drop),
        1 => Just(Op::AgentClose),
        1 => Just(Op::GatewayClose),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Nothing lost, delays under two seconds: the Hello exchange completes, the tunnel
    /// stays up, and every batch is acknowledged exactly once.
    #[test]
    fn a_fair_connection_stays_up_and_acks_every_batch(
        tcp in any::<bool>(),
        renew_on_due in any::<bool>(),
        delays in proptest::collection::vec(0u64..2_000, 1..16),
        ops in proptest::collection::vec(fair_op(), 0..80),
    ) {
        let mut sim = Sim::new(Instant::now(), tcp, delays, false, renew_on_due);
        sim.advance(Duration::from_secs(5));
        prop_assert!(sim.agent.is_established() && sim.gw.is_established());
        prop_assert!(sim.agent_established && sim.gw_established);
        for op in &ops {
            sim.run(op);
        }
        // Longer than both idle timeouts: only the keep-alive keeps a TCP tunnel up.
        sim.advance(Duration::from_secs(200));
        prop_assert!(sim.agent.is_established(), "{:?}", sim.agent.close_reason());
        prop_assert!(sim.gw.is_established(), "{:?}", sim.gw.close_reason());
        for id in sim.markers.keys() {
            prop_assert_eq!(sim.outcomes.get(id), Some(&(1, 0)));
        }
        prop_assert_eq!(sim.renew_answers, sim.renew_requests);
    }

    /// Anything goes: long silences, drops, closes, refusals. Never a panic, never a side
    /// left waiting with no timer (checked after every step), and once the connection is
    /// gone every batch was acknowledged or reported failed, exactly once.
    #[test]
    fn a_chaotic_connection_ends_cleanly(
        tcp in any::<bool>(),
        revoke in proptest::bool::weighted(0.1),
        renew_on_due in any::<bool>(),
        delays in proptest::collection::vec(0u64..20_000, 1..16),
        ops in proptest::collection::vec(chaos_op(), 0..60),
    ) {
        let mut sim = Sim::new(Instant::now(), tcp, delays, revoke, renew_on_due);
        for op in &ops {
            sim.run(op);
        }
        sim.run(&Op::Drop);
        sim.advance(Duration::from_secs(600));
        prop_assert!(sim.agent.is_closed() && sim.gw.is_closed());
        prop_assert_eq!(sim.agent.poll_timeout(), None);
        prop_assert_eq!(sim.gw.poll_timeout(), None);
        for id in sim.markers.keys() {
            let (acks, fails) = sim.outcomes.get(id).copied().unwrap_or_default();
            prop_assert_eq!(acks + fails, 1, "batch {:?}", id);
        }
        if revoke {
            prop_assert!(!sim.gw_established);
        }
    }

    /// Random bytes as frames, in any state, close a machine or change nothing; never panic.
    #[test]
    fn random_frames_never_panic(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
        establish in any::<bool>(),
    ) {
        let t0 = Instant::now();
        let mut a = if establish { established_agent(t0) } else { tcp_agent(t0) };
        let mut g = if establish { established_gateway(t0) } else { gateway(t0) };
        for f in &frames {
            let _ = a.handle_frame(t0, f);
            let _ = g.handle_frame(t0, f);
            if matches!(g.poll_event(), Some(GatewayEvent::Hello(_))) {
                let _ = g.admit(t0, accept(&[]));
            }
        }
    }
}
