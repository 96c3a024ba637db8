//! Per-source budgets for unauthenticated work: handshakes in progress count against the
//! client's source (an IPv4 address, or an IPv6 /64, the usual allocation to one customer),
//! beneath the port's global cap. A source past its budget waits (up to the handshake
//! deadline) for one of its own slots instead of taking the port's: one address opening
//! hundreds of idle connections (slow-loris) then holds its own few slots, not everyone's,
//! while a burst of real clients behind one address is only queued.
//!
//! Admission by class: a quarter of the port's slots is kept for [`Class::Known`] sources,
//! those from which a client proved a certificate of the cluster (an agent, a user, a peer
//! gateway) in the last [`KNOWN_FOR`] ([`KnownSources`]). Anonymous load from many sources
//! fills at most the other three quarters, so returning agents and users still get in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeport_net::budget::KeyedBudget;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handshakes one source may have in progress at once on one port.
pub const PER_SOURCE: usize = 16;

pub use edgeport_net::budget::{source_of, KnownSources};

/// Which of a port's handshake slots a client may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A source that proved a certificate of the cluster recently: any free slot.
    Known,
    /// Everyone else: any slot but the reserve.
    Anonymous,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Known => "known",
            Class::Anonymous => "anonymous",
        }
    }
}

/// The share of a port's handshake slots that only known sources may take: one in
/// `RESERVE_ONE_IN`.
pub const RESERVE_ONE_IN: usize = 4;

/// The slots of `max` kept for known sources (at least one while there are two slots).
pub fn reserve_of(max: usize) -> usize {
    (max / RESERVE_ONE_IN).max(usize::from(max >= 2))
}

/// The unauthenticated budget of one port: handshakes in progress (all sources, and per
/// source), each with a deadline, and the slots kept for known sources.
pub struct Admission {
    /// Every handshake in progress holds one of these.
    handshakes: Arc<Semaphore>,
    /// An anonymous handshake holds one of these too: there are `max - reserve`.
    anonymous: Arc<Semaphore>,
    pub max_handshakes: usize,
    pub sources: SourceBudget,
    /// Sources that proved a certificate recently; shared by the gateway's two ports.
    pub known: Arc<KnownSources>,
    pub timeout: Duration,
    /// `tcp` or `quic`, for the metrics.
    port: &'static str,
}

impl Admission {
    pub fn new(
        port: &'static str,
        max_handshakes: usize,
        timeout: Duration,
        known: Arc<KnownSources>,
    ) -> Self {
        Self {
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            anonymous: Arc::new(Semaphore::new(max_handshakes - reserve_of(max_handshakes))),
            max_handshakes,
            sources: SourceBudget::default(),
            known,
            timeout,
            port,
        }
    }

    /// Handshakes in progress on the port.
    pub fn in_flight(&self) -> usize {
        self.max_handshakes
            .saturating_sub(self.handshakes.available_permits())
    }

    /// The class of a client at `ip` now.
    pub fn class_of(&self, ip: IpAddr) -> Class {
        if self.known.is_known(ip, Instant::now()) {
            Class::Known
        } else {
            Class::Anonymous
        }
    }

    /// One of the port's handshake slots for a client of `class`, if one is free to it.
    pub fn try_slot(&self, class: Class) -> Option<HandshakeSlot> {
        let anonymous = match class {
            Class::Known => None,
            Class::Anonymous => Some(self.anonymous.clone().try_acquire_owned().ok()?),
        };
        let all = self.handshakes.clone().try_acquire_owned().ok()?;
        crate::metrics::handshakes_in_flight(self.port, class, 1);
        Some(HandshakeSlot {
            _all: all,
            _anonymous: anonymous,
            class,
            port: self.port,
        })
    }

    /// A client at `ip` proved a certificate of the cluster (now, or on a connection that
    /// just ended).
    pub fn proved(&self, ip: IpAddr) {
        self.known.remember(ip, Instant::now());
        crate::metrics::known_sources(self.known.len());
    }
}

/// One of a port's handshake slots, given back when dropped.
pub struct HandshakeSlot {
    _all: OwnedSemaphorePermit,
    _anonymous: Option<OwnedSemaphorePermit>,
    class: Class,
    port: &'static str,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        crate::metrics::handshakes_in_flight(self.port, self.class, -1);
    }
}

/// How long a source stays known after a client there last proved a certificate (a
/// connection with one that ends counts as proof at its end, so a tunnel held for weeks
/// leaves its source known when it drops).
pub const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// At most this many known sources are kept (about 60 bytes each); past it, the oldest go.
pub const MAX_KNOWN: usize = 100_000;

/// The gateway's known sources: [`KNOWN_FOR`], at most [`MAX_KNOWN`].
pub fn known_sources() -> KnownSources {
    KnownSources::new(KNOWN_FOR, MAX_KNOWN)
}

/// Slots per source: [`PER_SOURCE`] each by default.
pub struct SourceBudget(KeyedBudget<IpAddr>);

impl Default for SourceBudget {
    fn default() -> Self {
        Self::with_capacity(PER_SOURCE)
    }
}

/// One unit of a source's budget, given back when dropped.
pub type Slot = edgeport_net::budget::Slot<IpAddr>;

impl SourceBudget {
    /// `per_source` slots for each source.
    pub fn with_capacity(per_source: usize) -> Self {
        Self(KeyedBudget::with_capacity(per_source))
    }

    /// A slot for `ip`'s source, waiting at most `wait` while the source has all of its
    /// slots in use (with no wait: now or never).
    pub async fn take(&self, ip: IpAddr, wait: Duration) -> Option<Slot> {
        self.0.take(source_of(ip), wait).await
    }

    /// Sources with work in progress or waiting.
    pub fn sources(&self) -> usize {
        self.0.keys()
    }
}

/// A token bucket per source (IPv4 address, IPv6 /64) for requests that cost the cluster
/// work without credentials (the web console's single sign-on starts): `burst` at once,
/// then one every `every`. At most `max_sources` are tracked; past that, sources with a
/// full bucket are forgotten first, and if none is, a new source is refused.
pub struct RateBudget {
    burst: u32,
    every: Duration,
    max_sources: usize,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateBudget {
    pub fn new(burst: u32, every: Duration, max_sources: usize) -> Self {
        Self {
            burst: burst.max(1),
            every: every.max(Duration::from_millis(1)),
            max_sources: max_sources.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip`'s source has a token at `now` (none is taken).
    pub fn has_token(&self, ip: IpAddr, now: Instant) -> bool {
        let m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&source_of(ip)).is_none_or(|&(tokens, at)| {
            let gained = now.saturating_duration_since(at).as_secs_f64() / self.every.as_secs_f64();
            tokens + gained >= 1.0
        })
    }

    /// Takes one token of `ip`'s source at `now`, if it has one.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let source = source_of(ip);
        let burst = f64::from(self.burst);
        let refill = |(tokens, at): (f64, Instant)| {
            let gained = now.saturating_duration_since(at).as_secs_f64() / self.every.as_secs_f64();
            (tokens + gained).min(burst)
        };
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(&source) && m.len() >= self.max_sources {
            m.retain(|_, b| refill(*b) < burst);
            if m.len() >= self.max_sources {
                return false;
            }
        }
        let tokens = m.get(&source).map_or(burst, |b| refill(*b));
        if tokens < 1.0 {
            m.insert(source, (tokens, now));
            return false;
        }
        m.insert(source, (tokens - 1.0, now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_spends_its_own_tokens_and_gets_them_back_in_time() {
        let r = RateBudget::new(3, Duration::from_secs(2), 2);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let a6: IpAddr = "2001:db8::1".parse().unwrap();
        let a6_same: IpAddr = "2001:db8::ffff".parse().unwrap();
        for _ in 0..3 {
            assert!(r.allow(a, t0));
        }
        assert!(!r.allow(a, t0), "the burst is spent");
        assert!(!r.allow(a, t0 + Duration::from_secs(1)));
        assert!(r.allow(a, t0 + Duration::from_secs(3)), "one token back");
        // Another source has its own bucket; an IPv6 /64 is one source.
        assert!(r.allow(a6, t0));
        assert!(r.allow(a6_same, t0));
        assert!(r.allow(a6_same, t0));
        assert!(!r.allow(a6, t0));
        // The table is full of sources with spent buckets: a new one waits.
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!r.allow(b, t0 + Duration::from_secs(3)));
        // Once the others' buckets are full again they are forgotten first.
        assert!(r.allow(b, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_peek_takes_no_token() {
        let r = RateBudget::new(2, Duration::from_secs(2), 10);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(r.has_token(a, t0), "a new source has its burst");
        assert!(r.allow(a, t0));
        assert!(r.has_token(a, t0));
        assert!(r.has_token(a, t0), "looking twice spends nothing");
        assert!(r.allow(a, t0));
        assert!(!r.has_token(a, t0));
        assert!(!r.has_token(a, t0 + Duration::from_secs(1)));
        assert!(
            r.has_token(a, t0 + Duration::from_secs(2)),
            "one back in time"
        );
    }

    /// A budget of open connections: taken without waiting, refused at the source's cap,
    /// given back when the connection ends.
    #[tokio::test]
    async fn a_source_holds_at_most_its_capacity_now_or_never() {
        let b = SourceBudget::with_capacity(3);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(b.take(ip, Duration::ZERO).await.unwrap());
        }
        assert!(b.take(ip, Duration::ZERO).await.is_none());
        assert!(b
            .take("192.0.2.10".parse().unwrap(), Duration::ZERO)
            .await
            .is_some());
        held.pop();
        assert!(b.take(ip, Duration::ZERO).await.is_some());
        drop(held);
        assert_eq!(b.sources(), 0);
    }

    #[tokio::test]
    async fn one_source_waits_for_its_own_slots_and_others_do_not() {
        let b = SourceBudget::default();
        let none = Duration::from_millis(20);
        let flood: IpAddr = "192.0.2.7".parse().unwrap();
        let mut slots = Vec::new();
        for _ in 0..PER_SOURCE {
            slots.push(b.take(flood, none).await.unwrap());
        }
        assert!(
            b.take(flood, none).await.is_none(),
            "over the source's budget"
        );
        assert!(b.take("192.0.2.8".parse().unwrap(), none).await.is_some());
        // A waiter gets the slot that comes free.
        let freed = slots.pop();
        let waiter = b.take(flood, Duration::from_secs(5));
        drop(freed);
        assert!(waiter.await.is_some());
        drop(slots);
        assert_eq!(b.sources(), 0, "sources nobody holds are forgotten");
        // An IPv6 /64 is one source; another /64 is another.
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut held = Vec::new();
        for i in 0..PER_SOURCE {
            held.push(
                b.take(v6(&format!("2001:db8:1:2::{:x}", i + 1)), none)
                    .await
                    .unwrap(),
            );
        }
        assert!(b.take(v6("2001:db8:1:2:ffff::9"), none).await.is_none());
        assert!(b.take(v6("2001:db8:1:3::1"), none).await.is_some());
        drop(held);
        assert_eq!(source_of(v6("::ffff:192.0.2.7")), flood);
    }

    fn known() -> Arc<KnownSources> {
        Arc::new(known_sources())
    }

    #[test]
    fn anonymous_load_leaves_the_reserve_to_known_sources() {
        let a = Admission::new("tcp", 8, Duration::from_secs(1), known());
        assert_eq!(reserve_of(8), 2);
        let anon: Vec<_> = (0..6)
            .map(|_| a.try_slot(Class::Anonymous).unwrap())
            .collect();
        assert!(
            a.try_slot(Class::Anonymous).is_none(),
            "the reserve is kept"
        );
        let k1 = a.try_slot(Class::Known).unwrap();
        let k2 = a.try_slot(Class::Known).unwrap();
        assert!(a.try_slot(Class::Known).is_none(), "the port is full");
        assert_eq!(a.in_flight(), 8);
        // Known sources may use the anonymous share too, and never leave anonymous clients
        // more than theirs.
        drop(anon);
        let known: Vec<_> = (0..6).map(|_| a.try_slot(Class::Known).unwrap()).collect();
        assert!(a.try_slot(Class::Anonymous).is_none());
        drop((k1, k2));
        assert!(a.try_slot(Class::Anonymous).is_some());
        drop(known);
        assert_eq!(a.in_flight(), 0);
        assert_eq!(reserve_of(256), 64);
        assert_eq!(reserve_of(1), 0, "a single slot is nobody's reserve");
    }

    #[test]
    fn sources_are_known_for_a_while_after_proving_a_certificate() {
        let ttl = Duration::from_secs(3600);
        let k = KnownSources::new(ttl, 100);
        let t0 = Instant::now();
        let agent: IpAddr = "198.51.100.4".parse().unwrap();
        assert!(!k.is_known(agent, t0));
        k.remember(agent, t0);
        assert!(k.is_known(agent, t0 + ttl / 2));
        assert!(!k.is_known(agent, t0 + ttl), "expired");
        assert!(!k.is_known("198.51.100.5".parse().unwrap(), t0));
        // One /64 is one source.
        k.remember("2001:db8:5:6::1".parse().unwrap(), t0);
        assert!(k.is_known("2001:db8:5:6:aaaa::2".parse().unwrap(), t0));
        assert!(!k.is_known("2001:db8:5:7::1".parse().unwrap(), t0));
        // Proving again renews.
        k.remember(agent, t0 + ttl / 2);
        assert!(k.is_known(agent, t0 + ttl));
    }

    #[test]
    fn known_sources_stay_bounded_and_keep_the_newest() {
        let k = KnownSources::new(Duration::from_secs(3600), 64);
        let t0 = Instant::now();
        let ip = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..1_000u32 {
            k.remember(ip(i), t0 + Duration::from_millis(u64::from(i)));
            assert!(k.len() <= 64);
        }
        let end = t0 + Duration::from_secs(1);
        assert!(k.is_known(ip(999), end), "the newest is kept");
        assert!(!k.is_known(ip(0), end), "the oldest went");
        // Expired entries go first, before any live one.
        let k = KnownSources::new(Duration::from_secs(10), 4);
        for i in 0..3 {
            k.remember(ip(i), t0);
        }
        k.remember(ip(3), t0 + Duration::from_secs(9));
        k.remember(ip(4), t0 + Duration::from_secs(11));
        let now = t0 + Duration::from_secs(11);
        assert!(k.is_known(ip(3), now) && k.is_known(ip(4), now));
        assert_eq!(k.len(), 2);
    }
}
