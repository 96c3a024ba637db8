//! Join tokens (DESIGN §3, Join): random secrets stored only as their SHA-256, expiring,
//! single-use unless made reusable. Redemption is one compare-and-swap on the token record,
//! so two concurrent redemptions of a single-use token have exactly one winner.

use std::collections::BTreeMap;

use edgeport_proto::keys::{random_secret, sha256_hex};
use edgeport_proto::rpc::{RpcError, TokenInfo, TokenKind, TokenSpec};
use edgeport_proto::util::valid_name;
use serde::{Deserialize, Serialize};

use crate::errors::{bad_credentials, expired, internal, invalid, not_found};
use crate::store::{self, Store, Table};

/// A token's lifetime when the request names none.
pub const DEFAULT_TTL_SECS: u64 = 30 * 60;
/// The longest lifetime a token may have.
pub const MAX_TTL_SECS: u64 = 365 * 86400;
/// Expired and used-up tokens are kept this long, so a late attempt gets a precise refusal
/// ("expired", "already used") instead of "unknown"; then they are purged.
const KEEP_AFTER_EXPIRY_SECS: u64 = 7 * 86400;
/// Length of the public id (a prefix of the hash).
const ID_LEN: usize = 12;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub kind: TokenKind,
    pub labels: BTreeMap<String, String>,
    pub created: u64,
    pub expires: u64,
    pub reusable: bool,
    pub uses: u32,
}

impl TokenRecord {
    fn info(&self, ca_pin: &str) -> TokenInfo {
        TokenInfo {
            token: None,
            id: self.id.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            expires: self.expires,
            reusable: self.reusable,
            uses: self.uses,
            ca_pin: ca_pin.to_string(),
        }
    }

    /// Why this token cannot be used for `kind` at `now`, if it cannot.
    fn refusal(&self, kind: TokenKind, now: u64) -> Option<RpcError> {
        if self.kind != kind {
            let (is, not) = match self.kind {
                TokenKind::Gateway => ("gateways", "devices"),
                TokenKind::Device => ("devices", "gateways"),
            };
            return Some(bad_credentials(format!("token is for {is}, not {not}")));
        }
        if self.expires <= now {
            return Some(expired("join token expired"));
        }
        if !self.reusable && self.uses > 0 {
            return Some(bad_credentials("join token already used"));
        }
        None
    }
}

fn key_of(token: &str) -> String {
    sha256_hex(token.trim().as_bytes())
}

/// Checks labels given on the command line or by a device.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), RpcError> {
    for (k, v) in labels {
        if !valid_name(k) || !(v.is_empty() || valid_name(v)) {
            return Err(invalid(format!(
                "invalid label {k}={v}: names of letters, digits, '.', '_' or '-'"
            )));
        }
    }
    Ok(())
}

/// Makes a token; the answer is the only place its secret ever appears.
pub fn add(
    store: &dyn Store,
    spec: &TokenSpec,
    ca_pin: &str,
    now: u64,
) -> Result<TokenInfo, RpcError> {
    check_labels(&spec.labels)?;
    let ttl = match spec.ttl_secs {
        0 => DEFAULT_TTL_SECS,
        t if t > MAX_TTL_SECS => {
            return Err(invalid(format!(
                "token lifetime of {t} s is longer than the {MAX_TTL_SECS} s maximum"
            )))
        }
        t => t,
    };
    let secret = random_secret().map_err(|e| internal("token secret", e))?;
    let key = key_of(&secret);
    let record = TokenRecord {
        id: key[..ID_LEN].to_string(),
        kind: spec.kind,
        labels: spec.labels.clone(),
        created: now,
        expires: now + ttl,
        reusable: spec.reusable,
        uses: 0,
    };
    if !store.compare_and_swap(Table::Tokens, &key, None, Some(encode(&record)?))? {
        return Err(internal("token", "a fresh random token collided"));
    }
    let mut info = record.info(ca_pin);
    info.token = Some(secret);
    Ok(info)
}

fn encode(r: &TokenRecord) -> Result<Vec<u8>, RpcError> {
    serde_json::to_vec(r).map_err(|e| internal("token record", e))
}

/// Lists tokens (never their secrets), purging those long past their expiry.
pub fn list(store: &dyn Store, ca_pin: &str, now: u64) -> Result<Vec<TokenInfo>, RpcError> {
    let mut out = Vec::new();
    for (key, t) in store::list::<TokenRecord>(store, Table::Tokens, "")? {
        if t.expires.saturating_add(KEEP_AFTER_EXPIRY_SECS) <= now {
            store.delete(Table::Tokens, &key)?;
            continue;
        }
        out.push(t);
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Ok(out.iter().map(|t| t.info(ca_pin)).collect())
}

/// Removes a token given its id (or a longer prefix of its hash) or the token itself.
pub fn remove(store: &dyn Store, id_or_token: &str) -> Result<(), RpcError> {
    let s = id_or_token.trim();
    if store.delete(Table::Tokens, &key_of(s))?.is_some() {
        return Ok(());
    }
    let is_id = s.len() >= ID_LEN && s.bytes().all(|c| c.is_ascii_hexdigit());
    if is_id {
        let prefix = s.to_ascii_lowercase();
        let matches = store.scan_prefix(Table::Tokens, &prefix)?;
        if matches.len() > 1 {
            return Err(invalid(format!("token id {s} is ambiguous")));
        }
        if let Some((key, _)) = matches.first() {
            store.delete(Table::Tokens, key)?;
            return Ok(());
        }
    }
    Err(not_found(format!("no join token with id {s}")))
}

/// Checks that `token` could be redeemed for `kind` now, without using it up (so a request
/// that is wrong in other ways does not burn a single-use token).
pub fn check(
    store: &dyn Store,
    token: &str,
    kind: TokenKind,
    now: u64,
) -> Result<TokenRecord, RpcError> {
    let t: TokenRecord = store::get(store, Table::Tokens, &key_of(token))?
        .ok_or_else(|| bad_credentials("unknown join token"))?;
    match t.refusal(kind, now) {
        Some(e) => Err(e),
        None => Ok(t),
    }
}

/// Redeems `token` for `kind`: atomically checks it and counts the use.
pub fn redeem(
    store: &dyn Store,
    token: &str,
    kind: TokenKind,
    now: u64,
) -> Result<TokenRecord, RpcError> {
    let updated =
        store::update::<TokenRecord, RpcError, _>(store, Table::Tokens, &key_of(token), |cur| {
            let mut t = cur.ok_or_else(|| bad_credentials("unknown join token"))?;
            if let Some(e) = t.refusal(kind, now) {
                return Err(e);
            }
            t.uses = t.uses.saturating_add(1);
            Ok(Some(t))
        })?;
    updated.ok_or_else(|| bad_credentials("unknown join token"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::rpc::ErrorKind;
    use std::sync::Arc;

    fn store() -> (tempfile::TempDir, Arc<crate::store::SledStore>) {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(&d.path().join("s")).unwrap();
        (d, Arc::new(s))
    }

    fn spec(kind: TokenKind, ttl: u64, reusable: bool) -> TokenSpec {
        TokenSpec {
            kind,
            labels: [("fleet".to_string(), "vans".to_string())].into(),
            ttl_secs: ttl,
            reusable,
        }
    }

    #[test]
    fn single_use_expiry_unknown_and_kind() {
        let (_d, s) = store();
        let now = 10_000;
        let info = add(&*s, &spec(TokenKind::Device, 60, false), "pin", now).unwrap();
        let token = info.token.clone().unwrap();
        assert_eq!(info.id, sha256_hex(token.as_bytes())[..12]);
        assert_eq!(info.ca_pin, "pin");
        // Nothing stores the secret.
        for (k, v) in s.scan_prefix(Table::Tokens, "").unwrap() {
            assert!(!k.contains(&token) && !String::from_utf8_lossy(&v).contains(&token));
        }
        let err = |r: Result<TokenRecord, RpcError>| {
            let e = r.unwrap_err();
            (e.kind, e.message)
        };
        assert_eq!(
            err(redeem(&*s, &token, TokenKind::Gateway, now)),
            (
                ErrorKind::BadCredentials,
                "token is for devices, not gateways".into()
            )
        );
        assert_eq!(
            err(redeem(&*s, &token, TokenKind::Device, now + 60)),
            (ErrorKind::Expired, "join token expired".into())
        );
        assert_eq!(
            err(redeem(&*s, &"ab".repeat(32), TokenKind::Device, now)),
            (ErrorKind::BadCredentials, "unknown join token".into())
        );
        check(&*s, &token, TokenKind::Device, now).unwrap();
        let t = redeem(&*s, &token, TokenKind::Device, now).unwrap();
        assert_eq!(t.labels["fleet"], "vans");
        assert_eq!(
            err(redeem(&*s, &token, TokenKind::Device, now)),
            (ErrorKind::BadCredentials, "join token already used".into())
        );
        assert!(check(&*s, &token, TokenKind::Device, now).is_err());
    }

    #[test]
    fn reusable_tokens_count_uses() {
        let (_d, s) = store();
        let info = add(&*s, &spec(TokenKind::Gateway, 0, true), "pin", 0).unwrap();
        assert_eq!(info.expires, DEFAULT_TTL_SECS);
        let token = info.token.unwrap();
        for _ in 0..3 {
            redeem(&*s, &token, TokenKind::Gateway, 1).unwrap();
        }
        let listed = list(&*s, "pin", 1).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].uses, 3);
        assert!(listed[0].token.is_none());
    }

    #[test]
    fn concurrent_redemptions_have_one_winner() {
        let (_d, s) = store();
        for _ in 0..5 {
            let token = add(&*s, &spec(TokenKind::Device, 60, false), "pin", 0)
                .unwrap()
                .token
                .unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (s, token, barrier) = (s.clone(), token.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        redeem(&*s, &token, TokenKind::Device, 1)
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
            for r in results.iter().filter_map(|r| r.as_ref().err()) {
                assert_eq!(r.message, "join token already used");
            }
        }
    }

    #[test]
    fn removal_by_id_or_secret_and_purge() {
        let (_d, s) = store();
        let a = add(&*s, &spec(TokenKind::Device, 60, false), "pin", 0).unwrap();
        let b = add(&*s, &spec(TokenKind::Device, 60, false), "pin", 0).unwrap();
        remove(&*s, &a.id).unwrap();
        remove(&*s, b.token.as_deref().unwrap()).unwrap();
        assert_eq!(remove(&*s, &a.id).unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(remove(&*s, "x").unwrap_err().kind, ErrorKind::NotFound);
        add(&*s, &spec(TokenKind::Device, 60, false), "pin", 0).unwrap();
        assert_eq!(list(&*s, "pin", 61).unwrap().len(), 1);
        assert_eq!(
            list(&*s, "pin", 60 + KEEP_AFTER_EXPIRY_SECS).unwrap().len(),
            0
        );
        assert!(s.scan_prefix(Table::Tokens, "").unwrap().is_empty());
    }
}
