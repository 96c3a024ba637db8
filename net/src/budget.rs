//! Budgets of concurrent work per key: a client's source (an IPv4 address, or an IPv6 /64,
//! the usual allocation to one customer) or an identity. Each key has a fixed number of
//! slots; a slot is given back when dropped, and a key nobody holds or waits for is
//! forgotten, so the map stays as small as the work in progress. The gateway's handshake
//! and refusal budgets and the authority's connection budgets are built on it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

type Keys<K> = Arc<Mutex<HashMap<K, Arc<Semaphore>>>>;

/// `per_key` slots for each key.
pub struct KeyedBudget<K> {
    keys: Keys<K>,
    per_key: usize,
}

/// One unit of a key's budget, given back when dropped.
pub struct Slot<K: Eq + Hash> {
    permit: Option<OwnedSemaphorePermit>,
    keys: Keys<K>,
    key: K,
    per_key: usize,
}

/// Forgets `key` when nobody holds or waits for its slots.
fn forget_unused<K: Eq + Hash>(keys: &Keys<K>, key: &K, per_key: usize) {
    let mut m = keys.lock().unwrap_or_else(|p| p.into_inner());
    if m.get(key)
        .is_some_and(|s| Arc::strong_count(s) == 1 && s.available_permits() == per_key)
    {
        m.remove(key);
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
        forget_unused(&self.keys, &self.key, self.per_key);
    }
}

impl<K: Eq + Hash + Clone> KeyedBudget<K> {
    pub fn with_capacity(per_key: usize) -> Self {
        Self {
            keys: Arc::new(Mutex::new(HashMap::new())),
            per_key,
        }
    }

    /// Slots each key has.
    pub fn per_key(&self) -> usize {
        self.per_key
    }

    /// A slot for `key`, waiting at most `wait` while the key has all of its slots in use
    /// (with no wait: now or never).
    pub async fn take(&self, key: K, wait: Duration) -> Option<Slot<K>> {
        let sem = {
            let mut m = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_key)))
                .clone()
        };
        let permit = if wait.is_zero() {
            sem.clone().try_acquire_owned().ok()
        } else {
            tokio::time::timeout(wait, sem.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
        };
        match permit {
            Some(p) => Some(Slot {
                permit: Some(p),
                keys: self.keys.clone(),
                key,
                per_key: self.per_key,
            }),
            None => {
                // Forget a key nobody uses (this handle too: dropped first).
                drop(sem);
                forget_unused(&self.keys, &key, self.per_key);
                None
            }
        }
    }

    /// Keys with work in progress or waiting.
    pub fn keys(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Sources (IPv4 addresses, IPv6 /64s) from which a client proved a certificate of the
/// cluster, with when; bounded in number and age. Only a client with a certificate adds to
/// it, so anonymous load cannot grow or churn it. Kept in memory: a restarted server starts
/// with none.
pub struct KnownSources {
    seen: Mutex<HashMap<IpAddr, Instant>>,
    ttl: Duration,
    cap: usize,
}

impl KnownSources {
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            ttl,
            cap: cap.max(1),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client at `ip` proved a certificate at `now`.
    pub fn remember(&self, ip: IpAddr, now: Instant) {
        let source = source_of(ip);
        let mut m = self.map();
        if m.len() >= self.cap && !m.contains_key(&source) {
            let ttl = self.ttl;
            m.retain(|_, seen| now.saturating_duration_since(*seen) < ttl);
            if m.len() >= self.cap {
                // Still full: forget the oldest sixteenth at once, so that a full set costs
                // one pass per many insertions, not one each.
                let mut ages: Vec<Instant> = m.values().copied().collect();
                let cut = (ages.len() / 16).max(1) - 1;
                let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
                let oldest_kept = *oldest_kept;
                m.retain(|_, seen| *seen > oldest_kept);
            }
        }
        m.insert(source, now);
    }

    /// Whether a client at `ip`'s source proved a certificate within the last `ttl`.
    pub fn is_known(&self, ip: IpAddr, now: Instant) -> bool {
        self.map()
            .get(&source_of(ip))
            .is_some_and(|seen| now.saturating_duration_since(*seen) < self.ttl)
    }

    /// Sources remembered (some may have expired).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_key_has_its_own_slots_and_unused_keys_are_forgotten() {
        let b = KeyedBudget::with_capacity(2);
        let a1 = b.take("a", Duration::ZERO).await.unwrap();
        let _a2 = b.take("a", Duration::ZERO).await.unwrap();
        assert!(b.take("a", Duration::ZERO).await.is_none());
        assert!(b.take("a", Duration::from_millis(20)).await.is_none());
        let other = b.take("b", Duration::ZERO).await.unwrap();
        assert_eq!(b.keys(), 2);
        drop(other);
        assert_eq!(b.keys(), 1);
        drop(a1);
        assert!(b.take("a", Duration::ZERO).await.is_some());
    }

    #[test]
    fn sources_are_addresses_or_ipv6_prefixes() {
        let v6 = |s: &str| source_of(s.parse().unwrap());
        assert_eq!(v6("2001:db8::1"), v6("2001:db8::ffff:1"));
        assert_ne!(v6("2001:db8::1"), v6("2001:db8:0:1::1"));
        assert_eq!(v6("::ffff:192.0.2.1"), v6("192.0.2.1"));
    }
}
