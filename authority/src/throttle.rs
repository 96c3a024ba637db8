//! Slows down password guessing: after a few failed logins for one user name, or from one
//! client address, further attempts are refused for a while, before any argon2 work is done
//! (which also keeps a flood of guesses from eating the authority's CPU). The wait doubles
//! with each failure past the limit, up to a cap; a successful login clears the user's count.
//! State is in memory: an authority restart forgives, which is fine for a rate limit.

use std::collections::HashMap;
use std::sync::Mutex;

/// Failures allowed per user name within [`WINDOW_SECS`] before waits begin.
const USER_LIMIT: u32 = 5;
/// Failures allowed per client address (many users from one address: spraying).
const ADDR_LIMIT: u32 = 20;
/// Failures older than this are forgotten.
const WINDOW_SECS: u64 = 600;
/// The first wait, and the longest.
const FIRST_WAIT_SECS: u64 = 30;
const MAX_WAIT_SECS: u64 = 900;
/// Entries kept at most; beyond, stale ones are pruned (and if none are stale, the oldest).
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy, Debug, Default)]
struct Failures {
    count: u32,
    last: u64,
    blocked_until: u64,
}

#[derive(Default)]
pub struct LoginThrottle {
    entries: Mutex<HashMap<String, Failures>>,
}

fn user_key(user: &str) -> String {
    format!("u/{}", user.to_ascii_lowercase())
}

/// The address without its port (`1.2.3.4:5678` -> `1.2.3.4`, `[::1]:80` -> `::1`).
fn addr_key(client_addr: &str) -> Option<String> {
    if client_addr.is_empty() {
        return None;
    }
    let host = match client_addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => client_addr.to_string(),
    };
    Some(format!("a/{host}"))
}

impl LoginThrottle {
    /// `Err(seconds)` while `user` or `client_addr` must wait.
    pub fn check(&self, user: &str, client_addr: &str, now: u64) -> Result<(), u64> {
        let Ok(map) = self.entries.lock() else {
            return Ok(());
        };
        let keys = std::iter::once(user_key(user)).chain(addr_key(client_addr));
        let wait = keys
            .filter_map(|k| map.get(&k).map(|f| f.blocked_until.saturating_sub(now)))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            Err(wait)
        } else {
            Ok(())
        }
    }

    /// Records a failed attempt.
    pub fn failed(&self, user: &str, client_addr: &str, now: u64) {
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, f| now.saturating_sub(f.last) < WINDOW_SECS || f.blocked_until > now);
            if map.len() >= MAX_ENTRIES {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        let keys = std::iter::once((user_key(user), USER_LIMIT))
            .chain(addr_key(client_addr).map(|k| (k, ADDR_LIMIT)));
        for (key, limit) in keys {
            let f = map.entry(key).or_default();
            if now.saturating_sub(f.last) >= WINDOW_SECS && f.blocked_until <= now {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
            if f.count >= limit {
                let doublings = (f.count - limit).min(10);
                let wait = (FIRST_WAIT_SECS << doublings).min(MAX_WAIT_SECS);
                f.blocked_until = now + wait;
            }
        }
    }

    /// A successful login clears the user's failures (not the address's).
    pub fn succeeded(&self, user: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(&user_key(user));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_begin_after_the_limit_double_and_clear() {
        let t = LoginThrottle::default();
        for _ in 0..USER_LIMIT - 1 {
            t.failed("alice", "10.0.0.1:1000", 100);
            assert!(t.check("alice", "10.0.0.1:1001", 100).is_ok());
        }
        t.failed("alice", "10.0.0.1:1000", 100);
        assert_eq!(t.check("Alice", "10.0.0.2:1", 100), Err(FIRST_WAIT_SECS));
        assert!(
            t.check("bob", "10.0.0.1:5", 100).is_ok(),
            "the address is not blocked yet"
        );
        assert!(t.check("alice", "", 100 + FIRST_WAIT_SECS).is_ok());
        t.failed("alice", "", 100 + FIRST_WAIT_SECS);
        assert_eq!(
            t.check("alice", "", 100 + FIRST_WAIT_SECS),
            Err(2 * FIRST_WAIT_SECS)
        );
        t.succeeded("alice");
        assert!(t.check("alice", "", 100 + FIRST_WAIT_SECS).is_ok());
    }

    #[test]
    fn one_address_spraying_many_users_is_slowed() {
        let t = LoginThrottle::default();
        for i in 0..ADDR_LIMIT {
            t.failed(&format!("user{i}"), "[2001:db8::1]:4000", 50);
        }
        assert!(t.check("someone-else", "[2001:db8::1]:4001", 50).is_err());
        assert!(t.check("someone-else", "[2001:db8::2]:4001", 50).is_ok());
    }

    #[test]
    fn old_failures_are_forgotten() {
        let t = LoginThrottle::default();
        for _ in 0..USER_LIMIT - 1 {
            t.failed("carol", "", 0);
        }
        t.failed("carol", "", WINDOW_SECS + 1);
        assert!(t.check("carol", "", WINDOW_SECS + 1).is_ok());
    }
}
