//! A device's signed word that it holds a tunnel to a gateway (security.md G9). Gateways
//! report which devices they hold, and the authority routes dials to the holder; a gateway's
//! word alone would let a compromised one claim any device and draw its users' dials (and
//! their Kubernetes requests) to itself. So the agent, once a gateway welcomed it, signs the
//! gateway's id and the time with its device key, and the gateway passes that on with its
//! presence reports. The authority checks it against the key recorded at join: only a device
//! that chose this gateway produces it, and of two gateways that both show one, the later
//! signature (the device's own clock, compared with itself) is the tunnel the device made
//! last.

use serde::{Deserialize, Serialize};

use crate::keys::KeyPair;

const CONTEXT: &[u8] = b"edgeport-tunnel-attestation/1\0";

/// Signed by the device for one tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelProof {
    /// The gateway id from its Welcome.
    pub gateway: String,
    /// A stamp that only grows from one of the device's tunnels to the next: Unix
    /// milliseconds by the device's clock, or one more than its previous stamp when the
    /// clock is behind that (`edge-agent/src/identity.rs` `next_attest_stamp`).
    pub signed_at_ms: u64,
    /// Ed25519 signature of the device key over [`signed_bytes`].
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("the device's tunnel attestation names gateway {0:?}")]
    OtherGateway(String),
    #[error("the device's tunnel attestation does not verify with the key it joined with")]
    BadSignature,
    #[error("the device's recorded key is not an Ed25519 key")]
    BadKey,
}

/// The bytes a device signs to attest its tunnel to `gateway` at `signed_at_ms`.
pub fn signed_bytes(device: &str, gateway: &str, signed_at_ms: u64) -> Vec<u8> {
    let mut out = CONTEXT.to_vec();
    for part in [device, gateway] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&signed_at_ms.to_be_bytes());
    out
}

impl TunnelProof {
    /// The device `device` (key `key`) attests its tunnel to `gateway` at `now_ms`.
    pub fn sign(key: &KeyPair, device: &str, gateway: &str, now_ms: u64) -> Self {
        Self {
            signature: key.sign(&signed_bytes(device, gateway, now_ms)),
            gateway: gateway.to_string(),
            signed_at_ms: now_ms,
        }
    }

    /// Checks that the key recorded for `device` (an OpenSSH line) attested a tunnel to
    /// `gateway`, the one that reports it.
    pub fn verify(
        &self,
        device: &str,
        gateway: &str,
        ssh_public_key: &str,
    ) -> Result<(), AttestError> {
        if self.gateway != gateway {
            return Err(AttestError::OtherGateway(self.gateway.clone()));
        }
        crate::keys::verify_ed25519_line(
            ssh_public_key,
            &signed_bytes(device, gateway, self.signed_at_ms),
            &self.signature,
        )
        .map_err(|e| match e {
            crate::keys::KeyError::NotEd25519 | crate::keys::KeyError::Ssh(_) => {
                AttestError::BadKey
            }
            _ => AttestError::BadSignature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_devices_signature_for_this_gateway_passes() {
        let dev = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let line = dev.public_openssh();
        let proof = TunnelProof::sign(&dev, "van", "gw-b", 1_000);
        assert_eq!(proof.verify("van", "gw-b", &line), Ok(()));
        // Shown by another gateway, for another device, by another key, or changed.
        assert_eq!(
            proof.verify("van", "gw-a", &line),
            Err(AttestError::OtherGateway("gw-b".into()))
        );
        assert_eq!(
            proof.verify("car", "gw-b", &line),
            Err(AttestError::BadSignature)
        );
        assert_eq!(
            TunnelProof::sign(&other, "van", "gw-b", 1_000).verify("van", "gw-b", &line),
            Err(AttestError::BadSignature)
        );
        let later = TunnelProof {
            signed_at_ms: 2_000,
            ..proof.clone()
        };
        assert_eq!(
            later.verify("van", "gw-b", &line),
            Err(AttestError::BadSignature)
        );
        let relabelled = TunnelProof {
            gateway: "gw-a".into(),
            ..proof.clone()
        };
        assert_eq!(
            relabelled.verify("van", "gw-a", &line),
            Err(AttestError::BadSignature)
        );
        assert_eq!(
            proof.verify("van", "gw-b", "not a key"),
            Err(AttestError::BadKey)
        );
    }
}
