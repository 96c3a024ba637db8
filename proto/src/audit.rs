//! Audit events and the batches devices ship them in.
//!
//! Every device keeps one hash chain: event `n` carries `seq = n` and `prev_hash` = the
//! SHA-256 of the canonical (postcard) encoding of event `n - 1` (64 zeros before the first).
//! Batches of consecutive events are signed with the device's Ed25519 key over
//! [`batch_payload`]; the authority verifies them against the key it registered at join, never
//! against anything the batch says. See `docs/architecture.md`, section "Audit".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `prev_hash` of a chain's first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Event type of a piece of a session recording (asciicast v2 lines in field `data`).
pub const RECORDING_CHUNK: &str = "recording.chunk";

/// Largest encoded batch an agent sends (leaves room in a 64 KiB frame).
pub const MAX_BATCH_BYTES: usize = 40 * 1024;

/// One audit event. Empty strings stand for "none" (postcard has no optional fields that
/// JSON could skip, and the canonical encoding must not depend on the format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: u64,
    pub prev_hash: String,
    /// Unix milliseconds when the event happened (the device's clock).
    pub time_ms: u64,
    /// `session.start`, `exec`, `session.end`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub session_id: String,
    pub user: String,
    pub login: String,
    pub fields: BTreeMap<String, String>,
}

impl AuditEvent {
    pub fn new(kind: &str, time_ms: u64) -> Self {
        Self {
            seq: 0,
            prev_hash: String::new(),
            time_ms,
            kind: kind.to_string(),
            session_id: String::new(),
            user: String::new(),
            login: String::new(),
            fields: BTreeMap::new(),
        }
    }

    /// Hex SHA-256 of the canonical encoding: what the next event's `prev_hash` must be.
    pub fn hash(&self) -> String {
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        crate::keys::sha256_hex(&bytes)
    }

    pub fn field(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("")
    }
}

/// Consecutive events of one device, signed by it. An empty batch asks where the authority's
/// copy of the chain ends (the agent sends one after every reconnect).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditBatch {
    pub events: Vec<AuditEvent>,
    /// Ed25519 signature over [`batch_payload`].
    pub signature: Vec<u8>,
}

/// The bytes a batch signature covers: a domain tag, the device id and the events.
pub fn batch_payload(device_id: &str, events: &[AuditEvent]) -> Vec<u8> {
    let mut out = b"edgeport-audit-batch/1\0".to_vec();
    out.extend_from_slice(&postcard::to_stdvec(&(device_id, events)).unwrap_or_default());
    out
}

/// Verifies a batch signature against a raw Ed25519 public key.
pub fn verify_batch(device_id: &str, batch: &AuditBatch, public_raw: &[u8]) -> bool {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_raw);
    key.verify(&batch_payload(device_id, &batch.events), &batch.signature)
        .is_ok()
}

/// The authority's answer to a batch: where its copy of the chain ends now. The agent may
/// delete everything up to `acked_seq`, once `signature` verifies with the cluster's host CA
/// key (the gateway in between cannot make a device delete unshipped events).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditAck {
    pub acked_seq: u64,
    pub last_hash: String,
    /// Why the batch was not (fully) taken; the agent retries later.
    pub error: Option<String>,
    /// Ed25519 signature of the host CA over [`ack_payload`] (empty on errors).
    pub signature: Vec<u8>,
}

/// The bytes an ack signature covers.
pub fn ack_payload(device_id: &str, acked_seq: u64, last_hash: &str) -> Vec<u8> {
    let mut out = b"edgeport-audit-ack/1\0".to_vec();
    out.extend_from_slice(
        &postcard::to_stdvec(&(device_id, acked_seq, last_hash)).unwrap_or_default(),
    );
    out
}

/// Verifies an ack against the raw host CA public key.
pub fn verify_ack(device_id: &str, ack: &AuditAck, host_ca_raw: &[u8]) -> bool {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, host_ca_raw);
    key.verify(
        &ack_payload(device_id, ack.acked_seq, &ack.last_hash),
        &ack.signature,
    )
    .is_ok()
}

/// The raw Ed25519 key of an OpenSSH public key line (the host CA in a `CaBundle`).
pub fn raw_ed25519(line: &str) -> Option<Vec<u8>> {
    let (_, spki) = crate::keys::parse_ed25519_public(line).ok()?;
    Some(spki[spki.len().checked_sub(32)?..].to_vec())
}

/// An event as the authority keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    /// `device`, `authority` or `gateway`.
    pub source: String,
    /// The device the event is about (its chain for device events).
    pub device: String,
    /// The gateway that relayed it, or emitted it.
    pub gateway: String,
    pub received_ms: u64,
    pub event: AuditEvent,
}

/// `tctl audit search`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Unix milliseconds; 0 = everything.
    pub since_ms: u64,
    pub kind: Option<String>,
    pub device: Option<String>,
    pub user: Option<String>,
    pub session_id: Option<String>,
    /// Paging: skip this many matches.
    pub offset: u64,
}

/// A page of search results; `next` is the offset of the next page.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditPage {
    pub events: Vec<StoredEvent>,
    pub next: Option<u64>,
}

/// An integrity problem the authority found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IntegrityAlert {
    pub device: String,
    pub time_ms: u64,
    /// `gap`, `chain`, `replay`, `conflict`, `bad_signature`, `unknown_device`.
    pub kind: String,
    pub seq: u64,
    pub detail: String,
}

/// `tctl audit verify`: one device's chain.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChainReport {
    pub device: String,
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Problems found re-checking the stored chain now.
    pub problems: Vec<String>,
    /// Alerts recorded when batches arrived.
    pub alerts: Vec<IntegrityAlert>,
}

/// One recorded session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordingInfo {
    pub session_id: String,
    pub device: String,
    pub user: String,
    pub login: String,
    pub started_ms: u64,
    pub bytes: u64,
    /// The id of the user record whose certificate opened the session (empty for sessions
    /// recorded before ids existed).
    #[serde(default)]
    pub user_id: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hash_changes_with_content_and_signature_binds_device() {
        let mut a = AuditEvent::new("exec", 1);
        a.fields.insert("command".into(), "ls".into());
        let h = a.hash();
        a.fields.insert("command".into(), "rm".into());
        assert_ne!(h, a.hash());
        let key = crate::keys::KeyPair::generate().unwrap();
        let events = vec![a];
        let batch = AuditBatch {
            signature: key.sign(&batch_payload("dev1", &events)),
            events,
        };
        assert!(verify_batch("dev1", &batch, &key.public_raw()));
        assert!(!verify_batch("dev2", &batch, &key.public_raw()));
        let other = crate::keys::KeyPair::generate().unwrap();
        assert!(!verify_batch("dev1", &batch, &other.public_raw()));
    }
}
