//! Web console request signatures. The browser makes a non-extractable ECDSA P-256 key with
//! WebCrypto at login; the authority records its public key with the session, and every
//! request of the session carries a signature by it over
//! `edgeport-web/1\nUNIX_SECONDS\nMETHOD\nPATH`. A session cookie without that key is useless.

use crate::rpc::WEB_SIGNATURE_CONTEXT;

/// How far the signed time may be from the checker's clock, either way.
pub const MAX_SKEW_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebProofError {
    #[error("the browser key is not a P-256 public key (65 bytes, uncompressed)")]
    BadKey,
    #[error("the signed request is malformed")]
    Malformed,
    #[error("the request signature is too old or from the future (check the computer's clock)")]
    Stale,
    #[error("the request signature does not verify with the session's browser key")]
    BadSignature,
}

/// A signed request's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed<'a> {
    pub at: u64,
    pub method: &'a str,
    pub path: &'a str,
}

/// The text a browser signs for one request.
pub fn signed_text(at: u64, method: &str, path: &str) -> String {
    format!("{WEB_SIGNATURE_CONTEXT}\n{at}\n{method}\n{path}")
}

/// Whether `key` is a well-formed uncompressed P-256 point (length and prefix; the curve
/// check happens at verification).
pub fn check_key(key: &[u8]) -> Result<(), WebProofError> {
    if key.len() == 65 && key[0] == 4 {
        Ok(())
    } else {
        Err(WebProofError::BadKey)
    }
}

/// Checks `signature` (r || s) over `signed` with `key`, and that `signed` is of this
/// context and within [`MAX_SKEW_SECS`] of `now`. Returns the signed method and path, for
/// the caller to compare with the request it serves.
pub fn verify<'a>(
    key: &[u8],
    signed: &'a str,
    signature: &[u8],
    now: u64,
) -> Result<Signed<'a>, WebProofError> {
    check_key(key)?;
    let mut parts = signed.split('\n');
    if parts.next() != Some(WEB_SIGNATURE_CONTEXT) {
        return Err(WebProofError::Malformed);
    }
    let at: u64 = parts
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or(WebProofError::Malformed)?;
    let (Some(method), Some(path), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(WebProofError::Malformed);
    };
    if at.abs_diff(now) > MAX_SKEW_SECS {
        return Err(WebProofError::Stale);
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, key)
        .verify(signed.as_bytes(), signature)
        .map_err(|_| WebProofError::BadSignature)?;
    Ok(Signed { at, method, path })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    #[test]
    fn only_the_browser_key_signs_and_only_now() {
        let rng = ring::rand::SystemRandom::new();
        let pk = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng).unwrap();
        let other = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let other =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, other.as_ref(), &rng)
                .unwrap();
        let key = kp.public_key().as_ref().to_vec();
        let text = signed_text(1000, "GET", "/api/devices");
        let sig = kp.sign(&rng, text.as_bytes()).unwrap();
        let ok = verify(&key, &text, sig.as_ref(), 1030).unwrap();
        assert_eq!((ok.method, ok.path), ("GET", "/api/devices"));
        assert_eq!(
            verify(&key, &text, sig.as_ref(), 1061),
            Err(WebProofError::Stale)
        );
        let forged = other.sign(&rng, text.as_bytes()).unwrap();
        assert_eq!(
            verify(&key, &text, forged.as_ref(), 1000),
            Err(WebProofError::BadSignature)
        );
        let changed = signed_text(1000, "POST", "/api/logout");
        assert_eq!(
            verify(&key, &changed, sig.as_ref(), 1000),
            Err(WebProofError::BadSignature)
        );
        assert_eq!(
            verify(&key, "other/1\n1000\nGET\n/", sig.as_ref(), 1000),
            Err(WebProofError::Malformed)
        );
        assert_eq!(
            verify(&key[1..], &text, sig.as_ref(), 1000),
            Err(WebProofError::BadKey)
        );
    }
}
