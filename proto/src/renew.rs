//! A device's proof that it asked for its own certificate renewal. The gateway relays a
//! renewal to the authority, and a gateway's word that a device renewed counts for nothing:
//! the certificates themselves are public, but the authority also records the renewal
//! (`tctl auth rotate` counts devices renewed under the new CA before an operator ends a
//! rotation), so a compromised gateway that could renew any device on its own word could
//! make a rotation look done while the devices still trust only the old CA.
//!
//! The agent signs its renewal with its device key, over its device id, its key, the time and
//! a digest of the CA bundle it trusts. The authority checks the signature with the key it
//! recorded at join (a signature that does not verify is refused), and counts the renewal only
//! when the proof is fresh and names the bundle the authority serves now: a proof from before
//! a rotation, replayed by a gateway after it, renews nothing.

use serde::{Deserialize, Serialize};

use crate::identity::CaBundle;
use crate::keys::KeyPair;

/// A proof signed longer ago (or further ahead) than this is not counted.
pub const RENEW_MAX_AGE_SECS: u64 = 300;

const CONTEXT: &[u8] = b"edgeport-device-renewal/1\0";

/// Signed by the device for one renewal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewProof {
    /// Unix seconds when the agent signed it.
    pub signed_at: u64,
    /// [`bundle_digest`] of the CA bundle the device trusts.
    pub bundle: String,
    /// Ed25519 signature of the device key over [`signed_bytes`].
    pub signature: Vec<u8>,
}

/// A proof that verifies but does not count as a renewal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCounted {
    #[error(
        "the device signed it {0} s away from the authority's clock (is the device's clock wrong?)"
    )]
    Stale(u64),
    #[error("the device does not hold the CA bundle served now")]
    OldBundle,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewProofError {
    #[error("the device's signature on the renewal does not verify with the key it joined with")]
    BadSignature,
    #[error("the device's recorded key is not an Ed25519 key")]
    BadKey,
}

/// Hex SHA-256 of all a bundle says: its signed contents (cluster, SSH CAs, and the x509
/// CAs' digests during an x509 rotation), every x509 CA certificate and the pin (so one x509
/// CA and another outside a rotation differ too), not the signature.
pub fn bundle_digest(bundle: &CaBundle) -> String {
    let mut all = bundle.signed_bytes();
    for der in bundle.x509_ca_ders().unwrap_or_default() {
        all.extend_from_slice(b"x509 ");
        all.extend_from_slice(crate::keys::sha256_hex(&der).as_bytes());
        all.push(b'\n');
    }
    all.extend_from_slice(b"pin ");
    all.extend_from_slice(bundle.ca_pin.as_bytes());
    crate::keys::sha256_hex(&all)
}

/// An OpenSSH public key line without its comment (`ssh-ed25519 AAAA...`): what is signed,
/// so that a comment cannot make the authority's recorded line and the device's differ.
fn key_text(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The bytes a device signs to renew as `device` with `ssh_public_key` at `signed_at`,
/// trusting the bundle whose digest is `bundle`.
pub fn signed_bytes(device: &str, ssh_public_key: &str, bundle: &str, signed_at: u64) -> Vec<u8> {
    let mut out = CONTEXT.to_vec();
    for part in [device, &key_text(ssh_public_key), bundle] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&signed_at.to_be_bytes());
    out
}

impl RenewProof {
    /// The device `device` (key `key`, trusting `cas`) asks for a renewal at `now`.
    pub fn sign(key: &KeyPair, device: &str, cas: &CaBundle, now: u64) -> Self {
        let bundle = bundle_digest(cas);
        Self {
            signature: key.sign(&signed_bytes(device, &key.public_openssh(), &bundle, now)),
            signed_at: now,
            bundle,
        }
    }

    /// Checks that the key recorded for `device` (`ssh_public_key`, an OpenSSH line) signed
    /// this renewal (`Err` if not), and whether it counts as one: signed within
    /// [`RENEW_MAX_AGE_SECS`] of `now`, trusting `current`, the bundle served now.
    pub fn check(
        &self,
        device: &str,
        ssh_public_key: &str,
        current: &CaBundle,
        now: u64,
    ) -> Result<Result<(), NotCounted>, RenewProofError> {
        let msg = signed_bytes(device, ssh_public_key, &self.bundle, self.signed_at);
        crate::keys::verify_ed25519_line(ssh_public_key, &msg, &self.signature).map_err(
            |e| match e {
                crate::keys::KeyError::NotEd25519 | crate::keys::KeyError::Ssh(_) => {
                    RenewProofError::BadKey
                }
                _ => RenewProofError::BadSignature,
            },
        )?;
        let age = now.abs_diff(self.signed_at);
        Ok(if age > RENEW_MAX_AGE_SECS {
            Err(NotCounted::Stale(age))
        } else if self.bundle != bundle_digest(current) {
            Err(NotCounted::OldBundle)
        } else {
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(host_ca: &str) -> CaBundle {
        CaBundle {
            cluster: "edge".into(),
            user_ca: String::new(),
            host_ca: host_ca.into(),
            x509_ca_pem: String::new(),
            ca_pin: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn only_the_devices_own_fresh_signature_counts() {
        let dev = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let line = dev.public_openssh();
        let (cas, rotated) = (bundle("a"), bundle("b"));
        let proof = RenewProof::sign(&dev, "van", &cas, 10_000);
        assert_eq!(proof.check("van", &line, &cas, 10_100), Ok(Ok(())));
        // Signed by another key or for another device, or changed on the way: refused.
        assert_eq!(
            proof.check("car", &line, &cas, 10_100),
            Err(RenewProofError::BadSignature)
        );
        assert_eq!(
            RenewProof::sign(&other, "van", &cas, 10_000).check("van", &line, &cas, 10_000),
            Err(RenewProofError::BadSignature)
        );
        for changed in [
            RenewProof {
                signed_at: 10_050,
                ..proof.clone()
            },
            RenewProof {
                bundle: bundle_digest(&rotated),
                ..proof.clone()
            },
        ] {
            assert_eq!(
                changed.check("van", &line, &rotated, 10_050),
                Err(RenewProofError::BadSignature)
            );
        }
        assert_eq!(
            proof.check("van", "not a key", &cas, 10_000),
            Err(RenewProofError::BadKey)
        );
        // The device's own, but old or from before a rotation: verified, not counted.
        let late = 10_000 + RENEW_MAX_AGE_SECS + 1;
        assert_eq!(
            proof.check("van", &line, &cas, late),
            Ok(Err(NotCounted::Stale(RENEW_MAX_AGE_SECS + 1)))
        );
        assert_eq!(
            proof.check("van", &line, &rotated, 10_000),
            Ok(Err(NotCounted::OldBundle))
        );
    }
}
