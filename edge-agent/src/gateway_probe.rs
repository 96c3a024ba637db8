//! Asking a silent gateway whether the path is back. When attempts to reconnect time out
//! with the route still there (a cell that stops forwarding, a congested backhaul: the link
//! is up and carries nothing), the agent cannot tell the path from a gateway that is down,
//! and the backoff would keep it waiting up to 30 s after the path returns. So while it
//! waits it sends, every few seconds, one UDP datagram in the form of a QUIC packet of a
//! version no one speaks. Every QUIC server answers that with a Version Negotiation packet,
//! statelessly (RFC 9000 §6), without a connection or a handshake: the first answer says
//! the gateway is reachable again, and the agent reconnects at once.
//!
//! A probe is 1,200 bytes (servers drop shorter packets of unknown versions, RFC 9000
//! §5.2.2): one every 2 s for the first 15 minutes of silence (about 540 KB), then one
//! every 30 s. A modem without coverage sends nothing (no route), and the route watch
//! (`link_watch`) covers that case.

use std::net::SocketAddr;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// How often a probe goes out while the gateway is silent, for the first [`FAST_FOR`] of
/// the silence: a dead zone of minutes costs a few hundred KB.
const EVERY: Duration = Duration::from_secs(2);
const FAST_FOR: Duration = Duration::from_secs(15 * 60);
/// And after that (a gateway gone for hours): about 144 KB an hour, below what the
/// reconnect attempts themselves send.
const SLOW_EVERY: Duration = Duration::from_secs(30);
/// How long one probe waits for its answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// The smallest datagram a QUIC server answers for an unknown version.
const SIZE: usize = 1200;
/// A reserved version (RFC 9000 §15: the 0x?a?a?a?a pattern), which forces negotiation.
const VERSION: [u8; 4] = [0x1a, 0x2a, 0x3a, 0x4a];
const CID_LEN: usize = 8;

/// The probe: a long-header packet with random connection ids, padded to [`SIZE`].
pub fn packet(dcid: &[u8; CID_LEN], scid: &[u8; CID_LEN]) -> Vec<u8> {
    let mut p = Vec::with_capacity(SIZE);
    p.push(0xc0); // long header, fixed bit
    p.extend_from_slice(&VERSION);
    p.push(CID_LEN as u8);
    p.extend_from_slice(dcid);
    p.push(CID_LEN as u8);
    p.extend_from_slice(scid);
    p.resize(SIZE, 0);
    p
}

/// Whether `reply` is the Version Negotiation packet answering the probe with these ids:
/// version 0, and the connection ids swapped (a stray datagram does not count).
pub fn is_answer(reply: &[u8], dcid: &[u8; CID_LEN], scid: &[u8; CID_LEN]) -> bool {
    let ids = 1 + 4 + 1 + CID_LEN + 1 + CID_LEN;
    reply.len() >= ids + 4
        && reply[0] & 0x80 != 0
        && reply[1..5] == [0, 0, 0, 0]
        && usize::from(reply[5]) == CID_LEN
        && reply[6..6 + CID_LEN] == scid[..]
        && usize::from(reply[6 + CID_LEN]) == CID_LEN
        && reply[7 + CID_LEN..ids] == dcid[..]
}

/// The wait before the next probe after `silent_for` of silence.
pub fn interval(silent_for: Duration) -> Duration {
    if silent_for < FAST_FOR {
        EVERY
    } else {
        SLOW_EVERY
    }
}

/// Resolves, with a line for the log, once the gateway at `gateway` answers a probe; never
/// when its address is unknown. `since`: when the gateway went silent.
pub async fn answers_again(gateway: &str, since: std::time::Instant) -> String {
    let Some(peer) = crate::link_watch::peer(gateway).await else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval(since.elapsed())).await;
        if probe(peer).await {
            // Devices behind one cell that comes back must not knock at the same instant.
            tokio::time::sleep(Duration::from_secs(1).mul_f64(crate::backoff::unit_random())).await;
            return format!("the gateway answers again at {peer}");
        }
    }
}

/// One probe: true when the gateway answered it.
async fn probe(peer: SocketAddr) -> bool {
    let mut ids = [0u8; 2 * CID_LEN];
    if SystemRandom::new().fill(&mut ids).is_err() {
        return false;
    }
    let (mut dcid, mut scid) = ([0u8; CID_LEN], [0u8; CID_LEN]);
    dcid.copy_from_slice(&ids[..CID_LEN]);
    scid.copy_from_slice(&ids[CID_LEN..]);
    let bind: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
        return false;
    };
    if sock.connect(peer).await.is_err() || sock.send(&packet(&dcid, &scid)).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 256];
    let answered = async {
        loop {
            match sock.recv(&mut buf).await {
                Ok(n) if is_answer(&buf[..n], &dcid, &scid) => return true,
                Ok(_) => {}
                // ICMP unreachable: nothing listens there now (a gateway that is down).
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(ANSWER_WITHIN, answered)
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_a_long_header_of_a_reserved_version() {
        let p = packet(&[1; 8], &[2; 8]);
        assert_eq!(p.len(), SIZE);
        assert_eq!(p[0] & 0xc0, 0xc0);
        assert_eq!(p[1..5], VERSION);
        assert_eq!(p[5], 8);
        assert_eq!(p[6..14], [1; 8]);
        assert_eq!(p[14], 8);
        assert_eq!(p[15..23], [2; 8]);
    }

    #[test]
    fn probes_slow_down_after_a_long_silence() {
        assert_eq!(interval(Duration::ZERO), EVERY);
        assert_eq!(interval(FAST_FOR - Duration::from_secs(1)), EVERY);
        assert_eq!(interval(FAST_FOR), SLOW_EVERY);
    }

    #[test]
    fn only_the_matching_version_negotiation_counts() {
        let (d, s) = ([1u8; 8], [2u8; 8]);
        let mut vn = vec![0x80, 0, 0, 0, 0, 8];
        vn.extend_from_slice(&s);
        vn.push(8);
        vn.extend_from_slice(&d);
        vn.extend_from_slice(&[0, 0, 0, 1]);
        assert!(is_answer(&vn, &d, &s));
        assert!(!is_answer(&vn, &s, &d), "ids not swapped back");
        let mut other = vn.clone();
        other[4] = 1;
        assert!(!is_answer(&other, &d, &s), "not a version negotiation");
        assert!(!is_answer(&vn[..10], &d, &s), "truncated");
        assert!(!is_answer(&[], &d, &s));
    }

    /// A real QUIC server (quinn, as the gateway runs it) answers the probe.
    #[tokio::test]
    async fn a_quic_server_answers_and_a_closed_port_does_not() {
        edgeport_proto::tls::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cfg = quinn::ServerConfig::with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        assert!(probe(addr).await, "quinn did not answer the probe");
        drop(ep);
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        assert!(!probe(closed_addr).await);
    }
}
