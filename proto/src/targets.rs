//! Hosts behind a device (issue 22): how a target is addressed (`DEVICE/TARGET`) and what the
//! authority tells about one (`tsh ls`, `tctl devices ls`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The labels roles match a target by: the device's, plus the target's own keys the device
/// does not have. The device reports its targets' labels itself, so a target may describe
/// itself (`zone=engine`) but never gives another value for a key of the device's, whose
/// labels the token set at join: behind an `env=prod` device every target is `env=prod`, for
/// allow and deny rules and per-session MFA alike. The authority (dial checks, lists) and the
/// agent (record mode's own check) both use this.
pub fn labels_of(
    device: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = target.clone();
    labels.extend(device.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// One target behind a device, as its device last reported it in its signed audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub device: String,
    pub name: String,
    /// `HOST:PORT` on the device's side, as configured on the agent.
    pub addr: String,
    /// The device's labels and the target's own other keys (what roles match; see
    /// [`labels_of`]).
    pub labels: BTreeMap<String, String>,
    /// The agent's last TCP check: `None` when it has not checked yet.
    pub reachable: Option<bool>,
    /// Unix milliseconds of the last check (0: none).
    pub checked_ms: u64,
    /// The target's host key pinned at enrolment (`ssh-ed25519 AAAA...`), if any.
    pub hostkey: Option<String>,
    /// The agent's last check found a host key other than the pinned one.
    pub hostkey_mismatch: bool,
    /// `mode=record`: the agent terminates the SSH and records it (else relay mode).
    #[serde(default)]
    pub record: bool,
}

impl TargetInfo {
    /// The administrator's mode for the target: `relay` or `record`.
    pub fn mode(&self) -> &'static str {
        if self.record {
            "record"
        } else {
            "relay"
        }
    }

    /// `DEVICE/TARGET`, the name users give and the principal of its host certificate.
    pub fn address(&self) -> String {
        format!("{}/{}", self.device, self.name)
    }

    /// The last check as a word: `reachable`, `unreachable`, `unchecked` or `host key
    /// mismatch` (reachable, but presenting a key other than the pinned one).
    pub fn status(&self) -> &'static str {
        match self.reachable {
            Some(true) if self.hostkey_mismatch => "host key mismatch",
            Some(true) => "reachable",
            Some(false) => "unreachable",
            None => "unchecked",
        }
    }
}

/// Splits `DEVICE/TARGET` into its two parts; `None` for a plain device name.
pub fn split(addr: &str) -> Option<(&str, &str)> {
    addr.split_once('/')
        .filter(|(d, t)| !d.is_empty() && !t.is_empty() && !t.contains('/'))
}

/// Domain separation for a device's statement of a target's pinned host key.
const PIN_CONTEXT: &[u8] = b"edgeport-target-pin/1\0";
/// How old a device's pin statement may be when tsh reads it (clock skew included).
pub const PIN_MAX_AGE_SECS: u64 = 300;

/// A device's signed word on the host key pinned for one of its targets, sent by the agent
/// on a relayed stream before the target's bytes (`edge-agent/src/relay.rs`). tsh believes it
/// only when `device_cert` is a host certificate from the cluster's host CA naming the device
/// dialled and `signature` verifies with that certificate's key: a gateway, which relays the
/// stream, can drop it (tsh then wants a host certificate) but cannot make one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedKey {
    /// The device's SSH host certificate, OpenSSH line.
    pub device_cert: String,
    /// The target's name on that device.
    pub target: String,
    /// The pinned host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// Unix seconds when the agent signed it.
    pub signed_at: u64,
    /// Ed25519 signature of the device's host key over [`pin_signed_bytes`].
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("the device's certificate is unreadable")]
    Malformed,
    #[error("the device's host certificate was refused: {0}")]
    Cert(#[from] crate::sshcert::CertRefusal),
    #[error("the statement is for target {0:?}")]
    OtherTarget(String),
    #[error("the statement is {0} s old")]
    Stale(u64),
    #[error("the device's signature does not verify")]
    BadSignature,
    #[error("the pinned key is not an Ed25519 key")]
    BadKey,
}

/// The bytes a device signs to pin `host_key` for its target `target`.
pub fn pin_signed_bytes(device: &str, target: &str, host_key: &str, signed_at: u64) -> Vec<u8> {
    let mut out = PIN_CONTEXT.to_vec();
    for part in [device, target, host_key] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&signed_at.to_be_bytes());
    out
}

impl PinnedKey {
    /// The pinned key, once the statement is checked: the device's host certificate from one
    /// of `host_cas`, valid now and naming `device`; the target is `target`; signed at most
    /// [`PIN_MAX_AGE_SECS`] ago; the signature verifies with the certificate's key.
    pub fn verify(
        &self,
        host_cas: &[russh::keys::ssh_key::PublicKey],
        device: &str,
        target: &str,
        now: u64,
    ) -> Result<russh::keys::ssh_key::PublicKey, PinError> {
        use russh::keys::ssh_key::{public::KeyData, Certificate};
        let cert =
            Certificate::from_openssh(self.device_cert.trim()).map_err(|_| PinError::Malformed)?;
        let ca = crate::sshcert::signer_of(&cert, host_cas)
            .ok_or(crate::sshcert::CertRefusal::BadSignature)?;
        crate::sshcert::check_host_cert(&cert, ca, device, now)?;
        if self.target != target {
            return Err(PinError::OtherTarget(self.target.clone()));
        }
        let age = now.abs_diff(self.signed_at);
        if age > PIN_MAX_AGE_SECS {
            return Err(PinError::Stale(age));
        }
        let KeyData::Ed25519(dev) = cert.public_key() else {
            return Err(PinError::BadSignature);
        };
        let msg = pin_signed_bytes(device, target, &self.host_key, self.signed_at);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, dev.0)
            .verify(&msg, &self.signature)
            .map_err(|_| PinError::BadSignature)?;
        let (key, _) =
            crate::keys::parse_ed25519_public(&self.host_key).map_err(|_| PinError::BadKey)?;
        Ok(key)
    }
}

/// Domain separation for a device's request of a per-session target certificate.
const TARGET_CERT_CONTEXT: &[u8] = b"edgeport-target-cert/1\0";

/// A device's request, on its tunnel's control stream, for a per-session SSH certificate to
/// log in as `login` to its target `target` in record mode (issue 22). The device makes the
/// session's key pair and sends only the public half. It signs the request with its host key
/// after its own SSH server checked `user_cert` and saw the user prove the certificate's key,
/// so a gateway, which relays it, can neither make one nor change one (it can only drop it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCertRequest {
    /// The agent's number for matching the answer.
    pub id: u64,
    /// The device's SSH host certificate, OpenSSH line (its key signs the request).
    pub device_cert: String,
    pub target: String,
    pub login: String,
    pub session_id: String,
    /// The certificate the user logged in to the device with, OpenSSH line.
    pub user_cert: String,
    /// The per-session public key, `ssh-ed25519 AAAA...`.
    pub public_key: String,
    pub signed_at: u64,
    /// Ed25519 signature of the device's host key over [`TargetCertRequest::signed_bytes`].
    pub signature: Vec<u8>,
}

impl TargetCertRequest {
    /// The bytes the device signs (everything but `id` and the signature).
    pub fn signed_bytes(&self, device: &str) -> Vec<u8> {
        let mut out = TARGET_CERT_CONTEXT.to_vec();
        for part in [
            device,
            &self.target,
            &self.login,
            &self.session_id,
            &self.user_cert,
            &self.public_key,
        ] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(&self.signed_at.to_be_bytes());
        out
    }

    /// Checks that `device` made this request: its host certificate from one of `host_cas`,
    /// valid now and naming `device`; signed at most [`PIN_MAX_AGE_SECS`] ago; the signature
    /// verifies with the certificate's key.
    pub fn verify(
        &self,
        host_cas: &[russh::keys::ssh_key::PublicKey],
        device: &str,
        now: u64,
    ) -> Result<(), PinError> {
        use russh::keys::ssh_key::{public::KeyData, Certificate};
        let cert =
            Certificate::from_openssh(self.device_cert.trim()).map_err(|_| PinError::Malformed)?;
        let ca = crate::sshcert::signer_of(&cert, host_cas)
            .ok_or(crate::sshcert::CertRefusal::BadSignature)?;
        crate::sshcert::check_host_cert(&cert, ca, device, now)?;
        let age = now.abs_diff(self.signed_at);
        if age > PIN_MAX_AGE_SECS {
            return Err(PinError::Stale(age));
        }
        let KeyData::Ed25519(dev) = cert.public_key() else {
            return Err(PinError::BadSignature);
        };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, dev.0)
            .verify(&self.signed_bytes(device), &self.signature)
            .map_err(|_| PinError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses() {
        assert_eq!(super::split("van-42/ecu1"), Some(("van-42", "ecu1")));
        assert_eq!(super::split("van-42"), None);
        assert_eq!(super::split("/ecu1"), None);
        assert_eq!(super::split("a/b/c"), None);
    }

    #[test]
    fn pinned_keys_need_the_devices_certificate_and_signature() {
        use super::*;
        use crate::keys::KeyPair;
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        let (ca, dev, other, target) = (
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
        );
        let cert = |key: &KeyPair, name: &str| {
            let mut b = Builder::new(
                vec![7u8; 32],
                key.ssh_public().key_data().clone(),
                0,
                10_000,
            )
            .unwrap();
            b.cert_type(CertType::Host).unwrap().key_id(name).unwrap();
            b.valid_principal(name).unwrap();
            b.sign(ca.ssh_private()).unwrap().to_openssh().unwrap()
        };
        let host_key = target.public_openssh();
        let pin = |by: &KeyPair, device_cert: String, name: &str, at: u64| PinnedKey {
            device_cert,
            target: "ecu1".into(),
            host_key: host_key.clone(),
            signed_at: at,
            signature: by.sign(&pin_signed_bytes(name, "ecu1", &host_key, at)),
        };
        let cas = [ca.ssh_public().clone()];
        let good = pin(&dev, cert(&dev, "van"), "van", 1000);
        let key = good.verify(&cas, "van", "ecu1", 1100).unwrap();
        assert_eq!(key.key_data(), target.ssh_public().key_data());
        // Another device's certificate, another target, a stale or forged statement.
        assert!(matches!(
            good.verify(&cas, "bus", "ecu1", 1100),
            Err(PinError::Cert(_))
        ));
        assert!(matches!(
            good.verify(&cas, "van", "cam", 1100),
            Err(PinError::OtherTarget(_))
        ));
        assert!(matches!(
            good.verify(&cas, "van", "ecu1", 1000 + PIN_MAX_AGE_SECS + 1),
            Err(PinError::Stale(_))
        ));
        let forged = pin(&other, cert(&dev, "van"), "van", 1000);
        assert_eq!(
            forged.verify(&cas, "van", "ecu1", 1100),
            Err(PinError::BadSignature)
        );
        let mut swapped = good.clone();
        swapped.host_key = other.public_openssh();
        assert_eq!(
            swapped.verify(&cas, "van", "ecu1", 1100),
            Err(PinError::BadSignature)
        );
        let rogue_ca = [other.ssh_public().clone()];
        assert!(good.verify(&rogue_ca, "van", "ecu1", 1100).is_err());
    }

    #[test]
    fn target_cert_requests_need_the_devices_signature() {
        use super::*;
        use crate::keys::KeyPair;
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        let (ca, dev, gw) = (
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
        );
        let mut b = Builder::new(
            vec![7u8; 32],
            dev.ssh_public().key_data().clone(),
            0,
            10_000,
        )
        .unwrap();
        b.cert_type(CertType::Host).unwrap().key_id("van").unwrap();
        b.valid_principal("van").unwrap();
        let device_cert = b.sign(ca.ssh_private()).unwrap().to_openssh().unwrap();
        let mut req = TargetCertRequest {
            id: 1,
            device_cert,
            target: "ecu1".into(),
            login: "root".into(),
            session_id: "s1".into(),
            user_cert: "ssh-ed25519-cert-v01@openssh.com AAAA".into(),
            public_key: gw.public_openssh(),
            signed_at: 1000,
            signature: Vec::new(),
        };
        req.signature = dev.sign(&req.signed_bytes("van"));
        let cas = [ca.ssh_public().clone()];
        assert_eq!(req.verify(&cas, "van", 1100), Ok(()));
        // Another device's tunnel, a stale request, a gateway's signature, a changed login.
        assert!(matches!(
            req.verify(&cas, "bus", 1100),
            Err(PinError::Cert(_))
        ));
        assert!(matches!(
            req.verify(&cas, "van", 1000 + PIN_MAX_AGE_SECS + 1),
            Err(PinError::Stale(_))
        ));
        let mut forged = req.clone();
        forged.signature = gw.sign(&req.signed_bytes("van"));
        assert_eq!(
            forged.verify(&cas, "van", 1100),
            Err(PinError::BadSignature)
        );
        let mut changed = req.clone();
        changed.login = "admin".into();
        assert_eq!(
            changed.verify(&cas, "van", 1100),
            Err(PinError::BadSignature)
        );
    }
}
