//! Agent updates (`tctl devices update`): the manifest the authority signs with the host CA
//! key (the key every device already trusts, so CA rotation keeps working), and the messages
//! that carry a new agent binary from tctl through the authority and a gateway to the device.
//! The gateway only forwards bytes: the device checks the signature, its own id, the expiry,
//! the size and the SHA-256 of what it received before it installs anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Domain separation for the signed bytes (apart from certificates, tickets, acks).
const CONTEXT: &[u8] = b"edgeport-agent-update/1\0";

/// How many hex digits of a binary's SHA-256 an agent reports after its version
/// (`0.1.0+sha.0123456789abcdef`).
pub const SHORT_HASH: usize = 16;

/// What the authority vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The update's id (random, hex).
    pub id: String,
    pub cluster: String,
    /// Hex SHA-256 of the binary.
    pub sha256: String,
    pub size: u64,
    /// The devices this update is for (the selection tctl made, by labels).
    pub devices: Vec<String>,
    /// The label selector the administrator gave, for the record.
    pub labels: BTreeMap<String, String>,
    /// How long the new binary has to bring its tunnel up before the old one comes back.
    pub rollback_secs: u64,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// A manifest as it travels: postcard bytes and the host CA's Ed25519 signature over them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    pub manifest: Vec<u8>,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the update's signature does not verify with the cluster's host CA")]
    BadSignature,
    #[error("the update manifest is unreadable")]
    Malformed,
    #[error("the update is for cluster {0:?}")]
    WrongCluster(String),
    #[error("the update is not for this device")]
    NotForMe,
    #[error("the update expired {0} s ago")]
    Expired(u64),
    #[error("the update is {0} bytes, more than an agent takes")]
    TooLarge(u64),
    #[error("the received binary's SHA-256 is {got}, the signed manifest says {want}")]
    HashMismatch { got: String, want: String },
}

/// The largest binary an agent takes.
pub const MAX_BINARY: u64 = 256 * 1024 * 1024;

fn signed_bytes(manifest: &[u8]) -> Vec<u8> {
    let mut out = CONTEXT.to_vec();
    out.extend_from_slice(manifest);
    out
}

impl SignedManifest {
    /// Encodes `m` and signs it with `sign` (the host CA's Ed25519 signer).
    pub fn issue(m: &Manifest, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Self {
        let manifest = postcard::to_stdvec(m).unwrap_or_default();
        let signature = sign(&signed_bytes(&manifest));
        Self {
            manifest,
            signature,
        }
    }

    /// The manifest, once the signature verifies with one of `host_cas` (raw Ed25519 keys)
    /// and it is for `cluster` and `device` and not expired at `now`.
    pub fn verify(
        &self,
        host_cas: &[Vec<u8>],
        cluster: &str,
        device: &str,
        now: u64,
    ) -> Result<Manifest, ManifestError> {
        let msg = signed_bytes(&self.manifest);
        let signed = host_cas.iter().any(|k| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
                .verify(&msg, &self.signature)
                .is_ok()
        });
        if !signed {
            return Err(ManifestError::BadSignature);
        }
        let m: Manifest =
            postcard::from_bytes(&self.manifest).map_err(|_| ManifestError::Malformed)?;
        if m.cluster != cluster {
            return Err(ManifestError::WrongCluster(m.cluster));
        }
        if !m.devices.iter().any(|d| d == device) {
            return Err(ManifestError::NotForMe);
        }
        if now > m.expires_at {
            return Err(ManifestError::Expired(now - m.expires_at));
        }
        if m.size > MAX_BINARY {
            return Err(ManifestError::TooLarge(m.size));
        }
        Ok(m)
    }
}

/// The agent's one-frame answer on an update stream, once the binary is checked and in place
/// (it restarts on the new binary right after), or why it refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReply {
    pub accepted: bool,
    pub message: String,
}

/// `tctl devices update`: start shipping an uploaded binary to these devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSpec {
    pub sha256: String,
    pub devices: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub rollback_secs: u64,
}

/// Where an update stands on one device: `pending` (not yet delivered: offline, or the last
/// delivery broke off, retried), `installed` (the agent took it and restarts), `done` (back
/// online on the new binary), `refused` (the agent said why), `failed` (delivery broke off
/// too many times), `rolled_back` (the new binary did not come online in time), `expired`
/// (the device was not online before the update's deadline).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUpdate {
    pub device: String,
    pub state: String,
    pub detail: String,
}

/// An update as the authority tracks it (the answer to `UpdateStart` and `UpdateStatus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateInfo {
    pub id: String,
    pub sha256: String,
    pub size: u64,
    pub devices: Vec<DeviceUpdate>,
}

/// One kept update (`tctl devices update --status`): its devices' states and when it was
/// issued and stops being delivered (devices offline until then end `expired`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSummary {
    pub info: UpdateInfo,
    pub labels: BTreeMap<String, String>,
    pub rollback_secs: u64,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// What a gateway delivers: the signed manifest and the devices still waiting for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOrder {
    pub id: String,
    pub sha256: String,
    pub size: u64,
    pub signed: SignedManifest,
    pub pending: Vec<String>,
}

/// `VERSION+sha.HEX`: what an agent reports as its version, with the start of its binary's
/// SHA-256, so that `tctl devices ls` and a canary can tell binaries apart.
pub fn version_with_hash(version: &str, sha256_hex: &str) -> String {
    let short: String = sha256_hex.chars().take(SHORT_HASH).collect();
    format!("{version}+sha.{short}")
}

/// Splits a reported version into the version and the binary's short hash (if any).
pub fn split_version(reported: &str) -> (&str, Option<&str>) {
    match reported.split_once("+sha.") {
        Some((v, h)) => (v, Some(h)),
        None => (reported, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            id: "u1".into(),
            cluster: "edge".into(),
            sha256: "ab".repeat(32),
            size: 10,
            devices: vec!["van-1".into()],
            labels: BTreeMap::new(),
            rollback_secs: 60,
            issued_at: 100,
            expires_at: 200,
        }
    }

    #[test]
    fn only_the_host_ca_for_this_device_and_time_counts() {
        use ring::signature::KeyPair;
        let (ca, other) = (key(), key());
        let raw = ca.public_key().as_ref().to_vec();
        let s = SignedManifest::issue(&manifest(), |b| ca.sign(b).as_ref().to_vec());
        assert_eq!(
            s.verify(std::slice::from_ref(&raw), "edge", "van-1", 150)
                .unwrap(),
            manifest()
        );
        // A second trusted CA (rotation) is fine.
        let both = [other.public_key().as_ref().to_vec(), raw.clone()];
        assert!(s.verify(&both, "edge", "van-1", 150).is_ok());
        let forged = SignedManifest::issue(&manifest(), |b| other.sign(b).as_ref().to_vec());
        assert_eq!(
            forged.verify(std::slice::from_ref(&raw), "edge", "van-1", 150),
            Err(ManifestError::BadSignature)
        );
        // A gateway that edits the manifest (another hash, more devices) breaks the signature.
        let mut edited = s.clone();
        let mut m = manifest();
        m.devices.push("van-2".into());
        edited.manifest = postcard::to_stdvec(&m).unwrap();
        assert_eq!(
            edited.verify(std::slice::from_ref(&raw), "edge", "van-2", 150),
            Err(ManifestError::BadSignature)
        );
        assert_eq!(
            s.verify(std::slice::from_ref(&raw), "edge", "van-2", 150),
            Err(ManifestError::NotForMe)
        );
        assert_eq!(
            s.verify(std::slice::from_ref(&raw), "other", "van-1", 150),
            Err(ManifestError::WrongCluster("edge".into()))
        );
        assert_eq!(
            s.verify(&[raw], "edge", "van-1", 250),
            Err(ManifestError::Expired(50))
        );
    }

    #[test]
    fn versions_carry_the_short_hash() {
        let v = version_with_hash("0.1.0", &"0123456789abcdef".repeat(4));
        assert_eq!(v, "0.1.0+sha.0123456789abcdef");
        assert_eq!(split_version(&v), ("0.1.0", Some("0123456789abcdef")));
        assert_eq!(split_version("0.1.0"), ("0.1.0", None));
    }
}
