//! The UDP port: one quinn endpoint for device tunnels and tsh dials, told apart by ALPN
//! ([`crate::accept`]).
//! Every QUIC tunnel shares this one socket, so they cost no file descriptors.

use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::alpn;
use quinn::crypto::rustls::QuicServerConfig;

use crate::accept::Routes;
use crate::budget::{Admission, Class};
use crate::identity::{GatewayIdentity, IdentityError};
use crate::lifecycle::Lifecycle;

/// The ALPN ids served over QUIC (joins are TCP only).
pub const ALPNS: &[&[u8]] = &[alpn::TUNNEL, alpn::DIAL];

/// quinn server config: flow-control windows sized for bulk transfers on the device leg
/// (DESIGN section 7: at least 16M stream / 64M connection / 64M send).
pub fn server_config(
    identity: &GatewayIdentity,
    idle_timeout: Duration,
    public: Option<&Arc<rustls::sign::CertifiedKey>>,
) -> Result<quinn::ServerConfig, IdentityError> {
    let tls = identity.server_config(ALPNS, public)?;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| IdentityError::Io(format!("QUIC TLS config: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config(idle_timeout)));
    Ok(cfg)
}

/// Streams a user or a peer gateway may have open at once on one connection: tsh opens one
/// per dial (`tsh ssh` over a label selector runs 16 at a time by default); more wait for
/// credit rather than fail. `dial::serve_quic` raises a user's connection to this once the
/// ALPN says it is a dial connection.
pub const DIAL_STREAMS: u32 = 64;

/// What every connection starts with: one stream, an agent's control stream. quinn sets up
/// state for every permitted stream when a connection starts (two hash-map entries each):
/// starting device tunnels at 64 cost each idle tunnel about 4 KiB of the gateway's memory
/// for streams it never opens (issue 26).
const INITIAL_STREAMS: u32 = 1;

fn transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = edgeport_net::quic::bulk_transport();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(INITIAL_STREAMS))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t
}

/// Connection ids that this gateway recognises across restarts: 5 random bytes and a
/// 3-byte HMAC-SHA256 tag under a key derived from the stateless-reset key kept in the data
/// dir.
///
/// After a crash, an agent's next keep-alive carries an id the new process never issued. A
/// gateway that recognises it as one of its own answers with a stateless reset, and the agent
/// reconnects at once instead of waiting for its idle timeout (quinn's default generator keys
/// its ids per process, so a restarted gateway would drop those packets silently). Ids that
/// do not validate (scanners, garbage) get no reset at all, which is what makes answering
/// every valid one safe ([`RESET_INTERVAL`]). Five random bytes, not quinn's three: with
/// 10,000 tunnels of a few ids each, three bytes let ~30 new connections take an id that a
/// not-yet-reset agent still used, and that agent's packets then went to the wrong
/// connection and got no reset.
pub fn cid_generator(
    reset_key: &[u8],
) -> impl Fn() -> Box<dyn quinn::ConnectionIdGenerator> + Send + Sync + 'static {
    let derived = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key),
        b"edgeport connection id key",
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
    move || Box::new(KeyedCids { key: key.clone() })
}

struct KeyedCids {
    key: ring::hmac::Key,
}

thread_local! {
    /// The last id this thread's generator issued: quinn issues a new connection's own id
    /// inside `Incoming::accept`, synchronously on the calling thread, so `admit` reads it
    /// right after (quinn does not tell which id a connection got; `restart_wake` needs it).
    static LAST_ISSUED: std::cell::Cell<Option<[u8; CID_NONCE + CID_TAG]>> =
        const { std::cell::Cell::new(None) };
}

/// Takes the id last issued on this thread (see `LAST_ISSUED`).
fn take_last_issued() -> Option<[u8; CID_NONCE + CID_TAG]> {
    LAST_ISSUED.with(std::cell::Cell::take)
}

const CID_NONCE: usize = 5;
const CID_TAG: usize = 3;

impl KeyedCids {
    fn tag(&self, nonce: &[u8]) -> [u8; CID_TAG] {
        let mac = ring::hmac::sign(&self.key, nonce);
        let mut t = [0u8; CID_TAG];
        t.copy_from_slice(&mac.as_ref()[..CID_TAG]);
        t
    }
}

impl quinn::ConnectionIdGenerator for KeyedCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; CID_NONCE + CID_TAG];
        match edgeport_proto::keys::random_bytes(CID_NONCE) {
            Ok(r) => id[..CID_NONCE].copy_from_slice(&r),
            Err(_) => {
                // The OS RNG does not fail on Linux; a time-based nonce still works as an id.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                id[..CID_NONCE].copy_from_slice(&t.to_le_bytes()[..CID_NONCE]);
            }
        }
        let tag = self.tag(&id[..CID_NONCE]);
        id[CID_NONCE..].copy_from_slice(&tag);
        LAST_ISSUED.with(|l| l.set(Some(id)));
        quinn::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_NONCE + CID_TAG {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, tag) = cid.split_at(CID_NONCE);
        if self.tag(nonce)[..] == tag[..] {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE + CID_TAG
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Shortest time between two stateless resets: none. After a gateway restart every agent's
/// keep-alive needs one (10,000 agents send about 400 a second). quinn's default of 20 ms, and
/// the 100 µs tried next, ignored most of them: quinn reads a whole batch of datagrams under
/// one timestamp, so any interval allows one reset per batch, and a busy restarted gateway
/// reads big batches (one run: 10,199 resets sent, 25,317 packets ignored; the ignored agents
/// waited for their next keep-alive or their 90 s idle timeout). Unlimited resets stay safe:
/// a reset is always smaller than the packet that caused it, and only ids that carry this
/// gateway's tag (see [`cid_generator`]) get one, so garbage and scans are not answered.
pub const RESET_INTERVAL: Duration = Duration::ZERO;

/// Past this share of the handshake slots in use, a client must first prove its address
/// (a QUIC Retry, one extra round trip): spoofed Initials never come back, so they cannot
/// fill the slots, and the per-source budget counts real sources.
const RETRY_ABOVE_PERCENT: usize = 50;

// Every client must have proved its address before the anonymous share is full, so that
// known sources, which need a proven address to count as known, find the reserve free.
const _: () = assert!(RETRY_ABOVE_PERCENT < 100 - 100 / crate::budget::RESERVE_ONE_IN);

/// Whether to answer an Initial with a Retry.
fn should_retry(validated: bool, may_retry: bool, in_flight: usize, max: usize) -> bool {
    !validated && may_retry && in_flight * 100 >= max * RETRY_ABOVE_PERCENT
}

/// The UDP port's accept side: where connections go, their unauthenticated budget, and the
/// cap on connections.
pub struct QuicPort {
    pub routes: Arc<Routes>,
    pub admission: Admission,
    pub life: Lifecycle,
    pub max_connections: usize,
    /// This process's connections, for the next one to reset after a crash.
    pub book: Arc<crate::restart_wake::PeerBook>,
    /// Connections between `accept` and the end of their handshake, those still waiting for
    /// their source's budget included (`restart_wake` paces its resets by it).
    pub admitting: std::sync::atomic::AtomicUsize,
}

pub async fn accept_loop(port: Arc<QuicPort>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = port.life.shutdown.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        if endpoint.open_connections() >= port.max_connections {
            incoming.refuse();
            continue;
        }
        let in_flight = port.admission.in_flight();
        if should_retry(
            incoming.remote_address_validated(),
            incoming.may_retry(),
            in_flight,
            port.admission.max_handshakes,
        ) {
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let port = port.clone();
        // Tracked, so that shutdown drains served connections; a handshake still in
        // progress when shutdown starts is abandoned at once.
        port.life.tasks.clone().spawn(async move {
            let addr = incoming.remote_address();
            let shutdown = port.life.shutdown.clone();
            // Boxed, as `accept::serve` boxes each protocol's future: a spawned task keeps
            // room for its largest state for as long as it lives, and the handshake's state
            // (quinn's `Incoming` among it) made every idle tunnel's task about 11 KiB where
            // serving it needs about 1 KiB (issue 26, heap profile in docs/benchmarks.md).
            port.admitting
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let admitted = shutdown
                .run_until_cancelled(Box::pin(admit(&port.admission, incoming)))
                .await;
            port.admitting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let Some(Some((conn, cid))) = admitted else {
                return;
            };
            let id = conn.stable_id();
            if let Some(cid) = cid {
                port.book.add(&conn, &cid);
            }
            // A certificate the handshake verified makes the source known, now and again
            // when the connection ends (see `tcp`).
            let proved = conn
                .peer_identity()
                .and_then(|p| {
                    p.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .is_some_and(|c| !c.is_empty());
            if proved {
                port.admission.proved(addr.ip());
            }
            crate::accept::serve(&port.routes, crate::accept::Handshaken::Quic(conn), addr).await;
            port.book.remove(id);
            if proved {
                port.admission.proved(addr.ip());
            }
        });
    }
}

/// The unauthenticated part of a connection: the source's own slot first (the client
/// retransmits while it waits), then one of the port's that its class may take, then the
/// handshake within its deadline. A source counts as known only once the client proved its
/// address (a Retry, which every client gets before the anonymous share can fill up): a
/// spoofed Initial from a known agent's address must not take the reserve.
/// Also returns the id the peer sends to (see `LAST_ISSUED`).
async fn admit(
    admission: &Admission,
    incoming: quinn::Incoming,
) -> Option<(quinn::Connection, Option<[u8; CID_NONCE + CID_TAG]>)> {
    let addr = incoming.remote_address();
    let wait = admission.timeout;
    let Some(_source_slot) = admission.sources.take(addr.ip(), wait).await else {
        crate::metrics::handshake_failed("busy");
        incoming.refuse();
        return None;
    };
    let class = match admission.class_of(addr.ip()) {
        Class::Known if incoming.remote_address_validated() => Class::Known,
        _ => Class::Anonymous,
    };
    let Some(_hs_slot) = admission.try_slot(class) else {
        crate::metrics::handshake_failed("busy");
        incoming.refuse();
        return None;
    };
    take_last_issued();
    let accepted = incoming.accept();
    let cid = take_last_issued();
    let connecting = match accepted {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%addr, "QUIC accept failed: {e}");
            return None;
        }
    };
    match tokio::time::timeout(admission.timeout, connecting).await {
        Ok(Ok(c)) => Some((c, cid)),
        Ok(Err(e)) => {
            crate::metrics::handshake_failed("tls");
            tracing::debug!(%addr, "QUIC handshake failed: {e}");
            None
        }
        Err(_) => {
            crate::metrics::handshake_failed("timeout");
            tracing::debug!(%addr, "QUIC handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod cid_tests {
    use super::*;

    #[test]
    fn retry_only_unvalidated_clients_under_load() {
        assert!(
            !should_retry(false, true, 10, 256),
            "no load: no extra round trip"
        );
        assert!(should_retry(false, true, 128, 256));
        assert!(
            !should_retry(true, true, 255, 256),
            "already validated by a Retry"
        );
        assert!(!should_retry(false, false, 255, 256), "cannot retry twice");
    }

    #[test]
    fn ids_survive_a_restart_and_foreign_ids_do_not_validate() {
        let key = [7u8; 32];
        let mut before = cid_generator(&key)();
        let after = cid_generator(&key)();
        let other = cid_generator(&[8u8; 32])();
        for _ in 0..100 {
            let id = before.generate_cid();
            assert_eq!(id.len(), 8);
            assert!(
                after.validate(&id).is_ok(),
                "restarted gateway rejects its own id"
            );
            assert!(
                other.validate(&id).is_err(),
                "another gateway accepts the id"
            );
        }
        let garbage = quinn::ConnectionId::new(&[0u8; 8]);
        assert!(after.validate(&garbage).is_err());
        assert!(after
            .validate(&quinn::ConnectionId::new(&[1u8; 4]))
            .is_err());
        // 40 random bits: 2,000 ids do not repeat (a repeat has odds of about 2 in a
        // million; 3 bytes would repeat in one run of 9).
        let ids: std::collections::HashSet<Vec<u8>> =
            (0..2_000).map(|_| before.generate_cid().to_vec()).collect();
        assert_eq!(ids.len(), 2_000);
    }
}
