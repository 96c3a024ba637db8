//! The web console's sessions as the gateway sees them: the cookie, the browser's request
//! signature, and the authority's answer about them (reused for [`CACHE_FOR`] at most).
//! The gateway never decides who a user is: a session is whatever the authority last said
//! about this token, and the signature must verify with the browser key the authority
//! recorded at login.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgeport_proto::rpc::{WebProof, WebSessionInfo};

/// How long an answer of the authority about a session is reused (a lock or a logout at
/// another gateway takes at most this long to reach this one).
pub const CACHE_FOR: Duration = Duration::from_secs(2);
/// The session cookie (`__Host-`: Secure, Path=/, no Domain, so no other site sets it).
pub const COOKIE: &str = "__Host-edgeport_session";
/// Request headers carrying the browser's signature.
pub const TIME_HEADER: &str = "x-edgeport-time";
pub const SIG_HEADER: &str = "x-edgeport-signature";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session token in a `Cookie` header, if any.
pub fn token_from_cookies(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// The proof of one request: cookie, and the signature over its time, method and path.
pub fn proof_of(headers: &http::HeaderMap, method: &str, path: &str) -> Option<WebProof> {
    let token = token_from_cookies(headers)?;
    let at: u64 = headers.get(TIME_HEADER)?.to_str().ok()?.parse().ok()?;
    let signature = hex::decode(headers.get(SIG_HEADER)?.to_str().ok()?).ok()?;
    Some(WebProof {
        token,
        signed: edgeport_proto::web::signed_text(at, method, path),
        signature,
    })
}

/// Equal without telling, by timing, how much of it matched.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// At most this many tokens are remembered as valid (for the rate budget only).
const MAX_VALID: usize = 100_000;

/// The authority's recent answers, by the SHA-256 of the token; and, for the console's
/// budget of refused session requests only (never to let a request in), the tokens the
/// authority accepted, until their sessions expire.
#[derive(Default)]
pub struct SessionCache {
    answers: Mutex<HashMap<String, (Instant, WebSessionInfo)>>,
    valid: Mutex<HashMap<String, u64>>,
}

impl SessionCache {
    /// A fresh answer about `token` whose browser key also verifies this request's proof.
    pub fn get(&self, proof: &WebProof, now: u64) -> Option<WebSessionInfo> {
        let key = edgeport_proto::keys::sha256_hex(proof.token.as_bytes());
        let info = {
            let mut map = self.answers.lock().ok()?;
            map.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            map.get(&key).map(|(_, i)| i.clone())?
        };
        if info.expires <= now {
            return None;
        }
        edgeport_proto::web::verify(&info.browser_key, &proof.signed, &proof.signature, now)
            .ok()?;
        Some(info)
    }

    pub fn put(&self, token: &str, info: WebSessionInfo) {
        let key = edgeport_proto::keys::sha256_hex(token.as_bytes());
        if let Ok(mut valid) = self.valid.lock() {
            if valid.len() >= MAX_VALID && !valid.contains_key(&key) {
                let now = edgeport_net::clock::now_secs();
                valid.retain(|_, expires| *expires > now);
            }
            if valid.len() < MAX_VALID {
                valid.insert(key.clone(), info.expires);
            }
        }
        if let Ok(mut map) = self.answers.lock() {
            map.insert(key, (Instant::now(), info));
        }
    }

    pub fn forget(&self, token: &str) {
        let key = edgeport_proto::keys::sha256_hex(token.as_bytes());
        if let Ok(mut map) = self.answers.lock() {
            map.remove(&key);
        }
    }

    /// Whether the authority accepted `token` for a session that has not expired at `now`.
    /// For the budget of refused requests only: a request with such a token is still checked
    /// as any other, and one the authority refuses since (a lock, a logout) then reads why,
    /// not that its address is over budget.
    pub fn was_valid(&self, token: &str, now: u64) -> bool {
        let key = edgeport_proto::keys::sha256_hex(token.as_bytes());
        self.valid
            .lock()
            .is_ok_and(|v| v.get(&key).is_some_and(|expires| *expires > now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=1; __Host-edgeport_session=abc; b=2"),
        );
        assert_eq!(token_from_cookies(&h).as_deref(), Some("abc"));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }

    #[test]
    fn a_token_counts_as_valid_until_its_session_expires() {
        let c = SessionCache::default();
        let info = |expires| WebSessionInfo {
            token: None,
            csrf: String::new(),
            user: "carol".into(),
            logins: Vec::new(),
            roles: Vec::new(),
            expires,
            browser_key: Vec::new(),
        };
        c.put("good", info(2_000));
        assert!(c.was_valid("good", 1_000));
        assert!(!c.was_valid("good", 2_000), "expired");
        assert!(!c.was_valid("other", 1_000));
        c.forget("good");
        assert!(
            c.was_valid("good", 1_000),
            "refused since: still not a made-up token"
        );
        assert!(c
            .get(
                &WebProof {
                    token: "good".into(),
                    signed: String::new(),
                    signature: Vec::new()
                },
                1_000
            )
            .is_none());
    }
}
