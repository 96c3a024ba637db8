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
/// authority accepted, with their sessions' expiry and browser key.
#[derive(Default)]
pub struct SessionCache {
    answers: Mutex<HashMap<String, (Instant, WebSessionInfo)>>,
    valid: Mutex<HashMap<String, (u64, Vec<u8>)>>,
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
                valid.retain(|_, (expires, _)| *expires > now);
            }
            if valid.len() < MAX_VALID {
                valid.insert(key.clone(), (info.expires, info.browser_key.clone()));
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

    /// Whether the authority accepted `proof`'s token for a session that has not expired at
    /// `now`, and the proof is signed by that session's browser key (checked here): a stolen
    /// or made-up cookie gets no pass. For the budget of refused requests only: such a request
    /// is still checked as any other, and one the authority refuses since (a lock, a logout)
    /// then reads why, not that its address is over budget.
    pub fn was_valid(&self, proof: &WebProof, now: u64) -> bool {
        let key = edgeport_proto::keys::sha256_hex(proof.token.as_bytes());
        let Some(browser_key) = self.valid.lock().ok().and_then(|v| {
            v.get(&key)
                .filter(|(expires, _)| *expires > now)
                .map(|(_, k)| k.clone())
        }) else {
            return false;
        };
        edgeport_proto::web::verify(&browser_key, &proof.signed, &proof.signature, now).is_ok()
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
    fn a_session_counts_as_valid_for_its_own_browser_key_until_it_expires() {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let c = SessionCache::default();
        c.put(
            "good",
            WebSessionInfo {
                token: None,
                csrf: String::new(),
                user: "carol".into(),
                logins: Vec::new(),
                roles: Vec::new(),
                expires: 2_000,
                browser_key: kp.public_key().as_ref().to_vec(),
            },
        );
        let proof = |token: &str, at: u64| {
            let signed = edgeport_proto::web::signed_text(at, "GET", "/api/session");
            let signature = kp.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec();
            WebProof {
                token: token.into(),
                signed,
                signature,
            }
        };
        assert!(c.was_valid(&proof("good", 1_000), 1_000));
        assert!(!c.was_valid(&proof("good", 2_000), 2_000), "expired");
        assert!(!c.was_valid(&proof("other", 1_000), 1_000), "another token");
        let mut unsigned = proof("good", 1_000);
        unsigned.signature = vec![0; 64];
        assert!(!c.was_valid(&unsigned, 1_000), "the cookie alone");
        c.forget("good");
        assert!(
            c.was_valid(&proof("good", 1_000), 1_000),
            "refused since, but signed by its browser: it reads why, not 429"
        );
        assert!(
            c.get(&proof("good", 1_000), 1_000).is_none(),
            "no cached answer"
        );
    }
}
