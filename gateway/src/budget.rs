//! Per-source budgets for unauthenticated work: handshakes in progress count against the
//! client's source (an IPv4 address, or an IPv6 /64, the usual allocation to one customer),
//! beneath the port's global cap. A source past its budget waits (up to the handshake
//! deadline) for one of its own slots instead of taking the port's: one address opening
//! hundreds of idle connections (slow-loris) then holds its own few slots, not everyone's,
//! while a burst of real clients behind one address is only queued.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handshakes one source may have in progress at once on one port.
pub const PER_SOURCE: usize = 16;

/// The budget key of an address: IPv4 as is, IPv6 by its /64 (IPv4-mapped IPv6 as IPv4).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The unauthenticated budget of one port: handshakes in progress (all sources, and per
/// source), each with a deadline.
pub struct Admission {
    pub handshakes: Arc<Semaphore>,
    pub max_handshakes: usize,
    pub sources: SourceBudget,
    pub timeout: Duration,
}

impl Admission {
    pub fn new(max_handshakes: usize, timeout: Duration) -> Self {
        Self {
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            max_handshakes,
            sources: SourceBudget::default(),
            timeout,
        }
    }

    /// Handshakes in progress on the port.
    pub fn in_flight(&self) -> usize {
        self.max_handshakes
            .saturating_sub(self.handshakes.available_permits())
    }
}

type Sources = Arc<Mutex<HashMap<IpAddr, Arc<Semaphore>>>>;

/// Slots per source.
#[derive(Default)]
pub struct SourceBudget {
    sources: Sources,
}

/// One unit of a source's budget, given back when dropped.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    sources: Sources,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        // Forget a source nobody holds or waits for.
        let mut m = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&self.source)
            .is_some_and(|s| Arc::strong_count(s) == 1 && s.available_permits() == PER_SOURCE)
        {
            m.remove(&self.source);
        }
    }
}

impl SourceBudget {
    /// A slot for `ip`'s source, waiting at most `wait` while the source has [`PER_SOURCE`]
    /// in progress.
    pub async fn take(&self, ip: IpAddr, wait: Duration) -> Option<Slot> {
        let source = source_of(ip);
        let sem = {
            let mut m = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(source)
                .or_insert_with(|| Arc::new(Semaphore::new(PER_SOURCE)))
                .clone()
        };
        let permit = tokio::time::timeout(wait, sem.acquire_owned()).await;
        let slot = |permit| Slot {
            permit: Some(permit),
            sources: self.sources.clone(),
            source,
        };
        match permit {
            Ok(Ok(p)) => Some(slot(p)),
            _ => {
                // (The timed-out wait dropped its handle.) Forget a source nobody uses.
                let mut m = self.sources.lock().unwrap_or_else(|p| p.into_inner());
                if m.get(&source).is_some_and(|s| {
                    Arc::strong_count(s) == 1 && s.available_permits() == PER_SOURCE
                }) {
                    m.remove(&source);
                }
                None
            }
        }
    }

    /// Sources with work in progress or waiting.
    pub fn sources(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
