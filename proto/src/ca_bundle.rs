//! The CA bundle is signed by the cluster's x509 CA key, so a party that trusts the x509 CA
//! (by its pin, or because it already holds it) can trust the SSH CAs in the same bundle. The
//! bundle travels through gateways (joins, renewals, logins); without the signature a
//! compromised gateway could hand agents its own user CA, or tsh its own host CA.

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

use crate::identity::CaBundle;
use crate::keys::{ca_pin, first_cert_der};

/// Domain separation for the signed bytes.
const CONTEXT: &str = "edgeport-ca-bundle/1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("the CA bundle carries no signature")]
    Unsigned,
    #[error(
        "the CA bundle's signature does not verify with its x509 CA: the SSH CAs were altered"
    )]
    BadSignature,
    #[error("the CA bundle's x509 CA is unreadable: {0}")]
    BadCa(String),
    #[error("the CA bundle's x509 CA has pin {got}, expected {want}")]
    PinMismatch { got: String, want: String },
    #[error("the CA bundle changed ({0}); CA rotation needs a new join")]
    Changed(&'static str),
}

/// `algo base64` of an OpenSSH public key line (the comment is not signed).
fn key_part(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

impl CaBundle {
    /// DER of the cluster's x509 CA certificate (the first one in `x509_ca_pem`).
    pub fn x509_ca_der(&self) -> Result<Vec<u8>, crate::keys::KeyError> {
        first_cert_der(&self.x509_ca_pem)
    }

    /// The bytes the x509 CA signs: context, cluster, both SSH CAs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "{CONTEXT}\n{}\n{}\n{}\n",
            self.cluster,
            key_part(&self.user_ca),
            key_part(&self.host_ca)
        )
        .into_bytes()
    }

    /// Checks the signature against the bundle's own x509 CA and that `ca_pin` is that CA's
    /// pin. The caller decides whether it trusts that x509 CA (see [`Self::verify_pinned`]).
    pub fn verify(&self) -> Result<(), BundleError> {
        let der =
            first_cert_der(&self.x509_ca_pem).map_err(|e| BundleError::BadCa(e.to_string()))?;
        let pin = ca_pin(&der).map_err(|e| BundleError::BadCa(e.to_string()))?;
        if pin != self.ca_pin {
            return Err(BundleError::PinMismatch {
                got: pin,
                want: self.ca_pin.clone(),
            });
        }
        if self.signature.is_empty() {
            return Err(BundleError::Unsigned);
        }
        let sig = hex::decode(&self.signature).map_err(|_| BundleError::BadSignature)?;
        let point = ec_point(&der)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(&self.signed_bytes(), &sig)
            .map_err(|_| BundleError::BadSignature)
    }

    /// [`Self::verify`], and the x509 CA is the one with `pin`.
    pub fn verify_pinned(&self, pin: &str) -> Result<(), BundleError> {
        self.verify()?;
        if self.ca_pin != pin {
            return Err(BundleError::PinMismatch {
                got: self.ca_pin.clone(),
                want: pin.to_string(),
            });
        }
        Ok(())
    }

    /// A renewal may bring new certificates but never new CAs: checks that `fresh` holds the
    /// same cluster and CAs as `self` and is validly signed.
    pub fn check_same_cas(&self, fresh: &CaBundle) -> Result<(), BundleError> {
        fresh.verify()?;
        if fresh.cluster != self.cluster {
            return Err(BundleError::Changed("cluster"));
        }
        if fresh.ca_pin != self.ca_pin {
            return Err(BundleError::Changed("x509 CA"));
        }
        if key_part(&fresh.user_ca) != key_part(&self.user_ca) {
            return Err(BundleError::Changed("user CA"));
        }
        if key_part(&fresh.host_ca) != key_part(&self.host_ca) {
            return Err(BundleError::Changed("host CA"));
        }
        Ok(())
    }
}

/// One DER TLV: (tag, value, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The uncompressed EC point of a certificate's public key.
fn ec_point(cert_der: &[u8]) -> Result<Vec<u8>, BundleError> {
    let cert = rustls_pki_types::CertificateDer::from(cert_der);
    let anchor = webpki::anchor_from_trusted_cert(&cert)
        .map_err(|e| BundleError::BadCa(format!("{e:?}")))?;
    // SubjectPublicKeyInfo contents: AlgorithmIdentifier, then the key as a BIT STRING.
    let bad = || BundleError::BadCa("unexpected public key encoding".into());
    let (_, _, rest) = tlv(anchor.subject_public_key_info.as_ref()).ok_or_else(bad)?;
    let (tag, bits, _) = tlv(rest).ok_or_else(bad)?;
    match (tag, bits.split_first()) {
        (0x03, Some((0, point))) => Ok(point.to_vec()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_reader_handles_long_lengths_and_garbage() {
        let mut long = vec![0x04, 0x81, 200];
        long.extend(std::iter::repeat_n(7u8, 200));
        let (tag, v, rest) = tlv(&long).unwrap();
        assert_eq!((tag, v.len(), rest.len()), (0x04, 200, 0));
        assert!(tlv(&[0x04, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(tlv(&[0x04, 0x05, 1]).is_none());
        assert!(tlv(&[]).is_none());
    }
}
