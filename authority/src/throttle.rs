//! Slows down password guessing, before any argon2 work is done (which also keeps a flood of
//! guesses from eating the authority's CPU). Three counts, each of failures within
//! [`WINDOW_SECS`]:
//!
//! - per (user name, source): past [`PAIR_LIMIT`] failures that source waits for that user,
//!   30 s doubling to 15 min. This is what stops a guesser, and it cannot lock out the
//!   real user, who logs in from another source;
//! - per source, across user names (spraying one password over many users): past
//!   [`SOURCE_LIMIT`], the same doubling wait for everything from that source;
//! - per user name, from anywhere (a botnet, one guess per address): past [`USER_LIMIT`],
//!   a slowdown, not a lock: one attempt per [`USER_SLOWDOWN_SECS`] for that user, which
//!   caps a distributed guesser at 720 guesses an hour while the real user waits seconds.
//!
//! A source is an IPv4 address or an IPv6 /64 (one subscriber's whole prefix: rotating
//! through it gains nothing). The counts live in the store (`Table::LoginThrottle`), so
//! several authorities behind one gateway pool share them, and a restart does not forgive.
//! A successful login clears its (user, source) count only.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::store::{self, Store, StoreError, Table};

/// Failures one source may have for one user name before waits begin.
pub const PAIR_LIMIT: u32 = 5;
/// Failures one source may have across user names.
pub const SOURCE_LIMIT: u32 = 20;
/// Failures one user name may have from anywhere before its attempts are spaced out.
pub const USER_LIMIT: u32 = 20;
/// Failures older than this are forgotten.
pub const WINDOW_SECS: u64 = 600;
/// The first wait of a (user, source) or a source, and the longest.
pub const FIRST_WAIT_SECS: u64 = 30;
pub const MAX_WAIT_SECS: u64 = 900;
/// The spacing of a user's attempts past [`USER_LIMIT`].
pub const USER_SLOWDOWN_SECS: u64 = 5;
/// Every this many failures, records past their window are swept from the store, so a
/// guesser making up user names cannot grow it without bound.
const SWEEP_EVERY: u64 = 1000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Failures {
    count: u32,
    last: u64,
    blocked_until: u64,
}

impl Failures {
    fn stale(&self, now: u64) -> bool {
        now.saturating_sub(self.last) >= WINDOW_SECS && self.blocked_until <= now
    }
}

/// What a count does past its limit.
#[derive(Clone, Copy)]
enum Past {
    /// Wait [`FIRST_WAIT_SECS`], doubling with each failure, up to [`MAX_WAIT_SECS`].
    Doubling,
    /// Wait [`USER_SLOWDOWN_SECS`] after each failure.
    Spaced,
}

/// The source of `client_addr` (`1.2.3.4:5678` -> `1.2.3.4`, `[2001:db8::7]:80` ->
/// `2001:db8::/64`); `None` when there is none (an administrator's own login).
pub fn source(client_addr: &str) -> Option<String> {
    if client_addr.is_empty() {
        return None;
    }
    let ip = match client_addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip(),
        Err(_) => match client_addr.parse::<IpAddr>() {
            Ok(ip) => ip,
            // Not an address: count it as given (bounded by the frame size).
            Err(_) => return Some(client_addr.to_string()),
        },
    };
    Some(match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    })
}

fn user_key(user: &str) -> String {
    format!("u/{}", user.to_ascii_lowercase())
}

fn pair_key(user: &str, source: &str) -> String {
    format!("p/{}/{source}", user.to_ascii_lowercase())
}

fn source_key(source: &str) -> String {
    format!("s/{source}")
}

/// The source an attempt is counted under: the client's address as the relaying gateway
/// reports it, with that gateway's name. The address is the gateway's word, so a gateway's
/// reports only ever slow down logins through that same gateway: a compromised one cannot
/// make a user's or an office's logins wait elsewhere by reporting failures from them.
fn counted_source(gateway: &str, client_addr: &str) -> Option<String> {
    source(client_addr).map(|s| format!("{s}@{gateway}"))
}

/// The keys an attempt by `user` from `client_addr` through `gateway` counts against, with
/// their limits.
fn keys(user: &str, gateway: &str, client_addr: &str) -> Vec<(String, u32, Past)> {
    let mut keys = vec![(user_key(user), USER_LIMIT, Past::Spaced)];
    if let Some(src) = counted_source(gateway, client_addr) {
        keys.push((pair_key(user, &src), PAIR_LIMIT, Past::Doubling));
        keys.push((source_key(&src), SOURCE_LIMIT, Past::Doubling));
    } else {
        // No source known: the per-user count is the only one, so it must stop guessing.
        keys[0] = (pair_key(user, "-"), PAIR_LIMIT, Past::Doubling);
    }
    keys
}

#[derive(Default)]
pub struct LoginThrottle {
    failures_seen: AtomicU64,
}

impl LoginThrottle {
    /// `Ok(Err(seconds))` while `user` from `client_addr` must wait.
    pub fn check(
        &self,
        store: &dyn Store,
        gateway: &str,
        user: &str,
        client_addr: &str,
        now: u64,
    ) -> Result<Result<(), u64>, StoreError> {
        let mut wait = 0;
        for (key, _, _) in keys(user, gateway, client_addr) {
            if let Some(f) = store::get::<Failures>(store, Table::LoginThrottle, &key)? {
                wait = wait.max(f.blocked_until.saturating_sub(now));
            }
        }
        Ok(if wait > 0 { Err(wait) } else { Ok(()) })
    }

    /// Records a failed attempt.
    pub fn failed(
        &self,
        store: &dyn Store,
        gateway: &str,
        user: &str,
        client_addr: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        for (key, limit, past) in keys(user, gateway, client_addr) {
            store::update::<Failures, StoreError, _>(store, Table::LoginThrottle, &key, |cur| {
                let mut f = cur.filter(|f| !f.stale(now)).unwrap_or_default();
                f.count = f.count.saturating_add(1);
                f.last = now;
                if f.count >= limit {
                    let wait = match past {
                        Past::Doubling => {
                            let doublings = (f.count - limit).min(10);
                            (FIRST_WAIT_SECS << doublings).min(MAX_WAIT_SECS)
                        }
                        Past::Spaced => USER_SLOWDOWN_SECS,
                    };
                    f.blocked_until = f.blocked_until.max(now + wait);
                }
                Ok(Some(f))
            })?;
        }
        if self.failures_seen.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep(store, now)?;
        }
        Ok(())
    }

    /// A successful login clears the count of its (user, source), nothing else: a guesser
    /// elsewhere keeps their waits.
    pub fn succeeded(
        &self,
        store: &dyn Store,
        gateway: &str,
        user: &str,
        client_addr: &str,
    ) -> Result<(), StoreError> {
        let src = counted_source(gateway, client_addr).unwrap_or_else(|| "-".into());
        store.delete(Table::LoginThrottle, &pair_key(user, &src))?;
        Ok(())
    }

    /// Removes records past their window.
    pub fn sweep(&self, store: &dyn Store, now: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (key, bytes) in store.scan_prefix(Table::LoginThrottle, "")? {
            let stale = serde_json::from_slice::<Failures>(&bytes).map_or(true, |f| f.stale(now));
            if stale && store.compare_and_swap(Table::LoginThrottle, &key, Some(&bytes), None)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, crate::store::SledStore) {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(d.path()).unwrap();
        (d, s)
    }

    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        assert_eq!(source("10.0.0.1:1000").as_deref(), Some("10.0.0.1"));
        assert_eq!(
            source("[2001:db8:1:2:aaaa::1]:4000").as_deref(),
            Some("2001:db8:1:2::/64")
        );
        assert_eq!(
            source("[2001:db8:1:2:ffff:1:2:3]:9").as_deref(),
            Some("2001:db8:1:2::/64")
        );
        assert_eq!(source("[::ffff:10.1.2.3]:9").as_deref(), Some("10.1.2.3"));
        assert_eq!(source(""), None);
    }

    /// Failures a gateway reports (with addresses it chose) count only for logins through
    /// that gateway: a compromised gateway cannot make alice, or her office's address, wait
    /// at the others.
    #[test]
    fn a_gateways_reports_slow_down_only_logins_through_it() {
        let (_d, s) = store();
        let t = LoginThrottle::default();
        let office = "192.0.2.7:1";
        for _ in 0..PAIR_LIMIT {
            t.failed(&s, "gw-rogue", "alice", office, 100).unwrap();
        }
        for i in 0..SOURCE_LIMIT {
            t.failed(&s, "gw-rogue", &format!("user{i}"), office, 100)
                .unwrap();
        }
        let waits = |gw: &str, user: &str| t.check(&s, gw, user, office, 100).unwrap().is_err();
        assert!(waits("gw-rogue", "alice"));
        assert!(
            waits("gw-rogue", "bob"),
            "the whole source, through that gateway"
        );
        assert!(!waits("gw", "alice"));
        assert!(!waits("gw", "bob"));
    }

    #[test]
    fn a_guessing_source_waits_and_the_real_user_does_not() {
        let (_d, s) = store();
        let t = LoginThrottle::default();
        let check = |user: &str, addr: &str, now| t.check(&s, "gw", user, addr, now).unwrap();
        for _ in 0..PAIR_LIMIT - 1 {
            t.failed(&s, "gw", "alice", "10.0.0.66:1000", 100).unwrap();
            assert!(check("alice", "10.0.0.66:1001", 100).is_ok());
        }
        t.failed(&s, "gw", "alice", "10.0.0.66:1000", 100).unwrap();
        assert_eq!(check("Alice", "10.0.0.66:2", 100), Err(FIRST_WAIT_SECS));
        // Alice herself, from home: not locked out.
        assert!(check("alice", "192.0.2.7:5000", 100).is_ok());
        // The guesser's next failure doubles its wait.
        t.failed(&s, "gw", "alice", "10.0.0.66:1000", 100 + FIRST_WAIT_SECS)
            .unwrap();
        assert_eq!(
            check("alice", "10.0.0.66:1", 100 + FIRST_WAIT_SECS),
            Err(2 * FIRST_WAIT_SECS)
        );
        // Alice's success clears her own source only.
        t.succeeded(&s, "gw", "alice", "192.0.2.7:5000").unwrap();
        assert!(check("alice", "10.0.0.66:1", 100 + FIRST_WAIT_SECS).is_err());
    }

    #[test]
    fn an_ipv6_guesser_cannot_rotate_through_its_prefix() {
        let (_d, s) = store();
        let t = LoginThrottle::default();
        for i in 0..PAIR_LIMIT {
            t.failed(&s, "gw", "bob", &format!("[2001:db8:0:7::{i:x}]:4000"), 50)
                .unwrap();
        }
        assert!(t
            .check(&s, "gw", "bob", "[2001:db8:0:7::ffff]:1", 50)
            .unwrap()
            .is_err());
        assert!(t
            .check(&s, "gw", "bob", "[2001:db8:0:8::1]:1", 50)
            .unwrap()
            .is_ok());
    }

    #[test]
    fn one_source_spraying_many_users_is_slowed() {
        let (_d, s) = store();
        let t = LoginThrottle::default();
        for i in 0..SOURCE_LIMIT {
            t.failed(&s, "gw", &format!("user{i}"), "198.51.100.9:4000", 50)
                .unwrap();
        }
        assert!(t
            .check(&s, "gw", "someone-else", "198.51.100.9:1", 50)
            .unwrap()
            .is_err());
        assert!(t
            .check(&s, "gw", "someone-else", "198.51.100.10:1", 50)
            .unwrap()
            .is_ok());
    }

    #[test]
    fn a_distributed_guesser_slows_the_user_down_without_locking_them_out() {
        let (_d, s) = store();
        let t = LoginThrottle::default();
        // One failure from each of many addresses: no source reaches its own limit.
        for i in 0..USER_LIMIT {
            t.failed(&s, "gw", "carol", &format!("203.0.113.{i}:4000"), 1000)
                .unwrap();
        }
        // Carol, from a new address, waits seconds, not minutes.
        assert_eq!(
            t.check(&s, "gw", "carol", "192.0.2.1:1", 1000).unwrap(),
            Err(USER_SLOWDOWN_SECS)
        );
        assert!(t
            .check(&s, "gw", "carol", "192.0.2.1:1", 1000 + USER_SLOWDOWN_SECS)
            .unwrap()
            .is_ok());
        // Each further failure spaces attempts out again, by the same few seconds.
        t.failed(&s, "gw", "carol", "203.0.113.200:4000", 1010)
            .unwrap();
        assert_eq!(
            t.check(&s, "gw", "carol", "192.0.2.1:1", 1010).unwrap(),
            Err(USER_SLOWDOWN_SECS)
        );
    }

    #[test]
    fn old_failures_are_forgotten_and_swept() {
        let (_d, s) = store();
        let t = LoginThrottle::default();
        for _ in 0..PAIR_LIMIT - 1 {
            t.failed(&s, "gw", "dave", "10.1.1.1:1", 0).unwrap();
        }
        t.failed(&s, "gw", "dave", "10.1.1.1:1", WINDOW_SECS + 1)
            .unwrap();
        assert!(t
            .check(&s, "gw", "dave", "10.1.1.1:1", WINDOW_SECS + 1)
            .unwrap()
            .is_ok());
        assert_eq!(
            t.sweep(&s, WINDOW_SECS + 2).unwrap(),
            0,
            "fresh records stay"
        );
        assert_eq!(t.sweep(&s, 3 * WINDOW_SECS).unwrap(), 3);
        assert!(s.scan_prefix(Table::LoginThrottle, "").unwrap().is_empty());
    }

    #[test]
    fn two_authorities_on_one_store_share_the_counts() {
        let (_d, s) = store();
        let (a, b) = (LoginThrottle::default(), LoginThrottle::default());
        for i in 0..PAIR_LIMIT {
            let t = if i % 2 == 0 { &a } else { &b };
            t.failed(&s, "gw", "erin", "10.9.9.9:1", 10).unwrap();
        }
        assert!(a
            .check(&s, "gw", "erin", "10.9.9.9:1", 10)
            .unwrap()
            .is_err());
        assert!(b
            .check(&s, "gw", "erin", "10.9.9.9:1", 10)
            .unwrap()
            .is_err());
    }
}
