//! The CA bundle is signed by the cluster's x509 CA key, so a party that trusts the x509 CA
//! (by its pin, or because it already holds it) can trust the SSH CAs in the same bundle. The
//! bundle travels through gateways (joins, renewals, logins); without the signature a
//! compromised gateway could hand agents its own user CA, or tsh its own host CA.
//!
//! CA rotation (`tctl auth rotate`): during a rotation `user_ca` and `host_ca` hold one
//! OpenSSH line per trusted CA (old and new). The first line is the CA the authority signs
//! with now; every line is trusted. Outside a rotation each holds one line, and the signed
//! bytes are exactly what they were before rotation existed.
//!
//! A rotated bundle reaches gateways (`gateway/src/ca_watch.rs`) and agents
//! (`GatewayControl::Cas`, `edge-agent/src/ca_rotation.rs`) over their existing connections;
//! each takes it only through [`CaBundle::check_successor`]: signed by the x509 CA it already
//! trusts, never on the gateway's word. No SSH CA rotation needs a new join.
//!
//! x509 CA rotation: `x509_ca_pem` then holds several certificates, the first the CA that
//! issues certificates now (its pin is `ca_pin`); every one is trusted. The signed bytes add
//! one `x509 SHA256-OF-DER` line per certificate, and `signature` holds one signature per
//! certificate, space-separated, in the same order: the old CA's signature over a bundle
//! that lists the new CA is its endorsement, so a holder that knows only the old CA takes
//! the bundle (and from then on trusts the new CA too). Once the old CA is dropped, a holder
//! that never saw such a bundle (offline the whole grace period) refuses the next one.

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
    #[error("the CA bundle changed ({0}): a new x509 CA or cluster needs a new join")]
    Changed(&'static str),
    #[error("the CA bundle's x509 CA {0} is not one this holder trusts nor endorsed by one (the cluster's x509 CA was rotated while it was offline, or another cluster): join again (docs/deploy.md, \"Rotating a CA\")")]
    X509Rotated(String),
}

/// `algo base64` of an OpenSSH public key line (the comment is not signed).
fn key_part(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `algo base64` of every key line of a CA field (one line outside a rotation).
pub fn key_lines(field: &str) -> impl Iterator<Item = String> + '_ {
    field.lines().filter(|l| !l.trim().is_empty()).map(key_part)
}

/// All key lines of a field, one per line, for the signed bytes.
fn keys_signed(field: &str) -> String {
    key_lines(field).collect::<Vec<_>>().join("\n")
}

impl CaBundle {
    /// DER of every trusted x509 CA certificate, concatenated (one outside an x509 CA
    /// rotation): what the TLS root stores take (`tls::split_ders`).
    pub fn x509_ca_der(&self) -> Result<Vec<u8>, crate::keys::KeyError> {
        Ok(self.x509_ca_ders()?.concat())
    }

    /// DER of each trusted x509 CA certificate, the one that issues now first.
    pub fn x509_ca_ders(&self) -> Result<Vec<Vec<u8>>, crate::keys::KeyError> {
        let all: Vec<Vec<u8>> = pem::parse_many(&self.x509_ca_pem)
            .map_err(|e| crate::keys::KeyError::Cert(e.to_string()))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| p.into_contents())
            .collect();
        if all.is_empty() {
            return Err(crate::keys::KeyError::Cert("no CERTIFICATE block".into()));
        }
        Ok(all)
    }

    /// The pins of the trusted x509 CAs (unreadable ones are left out).
    pub fn x509_pins(&self) -> Vec<String> {
        self.x509_ca_ders()
            .unwrap_or_default()
            .iter()
            .filter_map(|d| ca_pin(d).ok())
            .collect()
    }

    /// The bytes the x509 CA signs: context, cluster, both SSH CAs, and during an x509 CA
    /// rotation the digest of every x509 CA certificate.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut s = format!(
            "{CONTEXT}\n{}\n{}\n{}\n",
            self.cluster,
            keys_signed(&self.user_ca),
            keys_signed(&self.host_ca)
        );
        let ders = self.x509_ca_ders().unwrap_or_default();
        if ders.len() > 1 {
            for d in &ders {
                s.push_str(&format!("x509 {}\n", crate::keys::sha256_hex(d)));
            }
        }
        s.into_bytes()
    }

    /// Whether the `i`th signature verifies with the `i`th x509 CA's key.
    fn signed_by(&self, i: usize, der: &[u8]) -> Result<(), BundleError> {
        let sig = self
            .signature
            .split_whitespace()
            .nth(i)
            .ok_or(BundleError::Unsigned)?;
        let sig = hex::decode(sig).map_err(|_| BundleError::BadSignature)?;
        let point = ec_point(der)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(&self.signed_bytes(), &sig)
            .map_err(|_| BundleError::BadSignature)
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
        self.signed_by(0, &der)
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

    /// Checks that `fresh` holds the same cluster and CAs as `self` and is validly signed.
    /// (Renewals may bring a rotated bundle: agents use [`Self::check_successor`].)
    pub fn check_same_cas(&self, fresh: &CaBundle) -> Result<(), BundleError> {
        self.check_successor(fresh)?;
        if keys_signed(&fresh.user_ca) != keys_signed(&self.user_ca) {
            return Err(BundleError::Changed("user CA"));
        }
        if keys_signed(&fresh.host_ca) != keys_signed(&self.host_ca) {
            return Err(BundleError::Changed("host CA"));
        }
        Ok(())
    }

    /// A bundle that may replace `self` (a renewal, or a CA rotation pushed over the tunnel):
    /// validly signed, for the same cluster, and signed by an x509 CA `self` trusts. The SSH
    /// CAs may change, and during an x509 CA rotation the x509 CAs too: a CA we already trust
    /// vouches for them (its signature over the bundle that lists them).
    pub fn check_successor(&self, fresh: &CaBundle) -> Result<(), BundleError> {
        fresh.verify()?;
        if fresh.cluster != self.cluster {
            return Err(BundleError::Changed("cluster"));
        }
        fresh.endorsed_by(&self.x509_pins())
    }

    /// After [`Self::verify`]: the bundle's x509 CA is one of `pins`, or one of `pins` signed
    /// this bundle that lists it (an x509 CA rotation).
    pub fn endorsed_by(&self, pins: &[String]) -> Result<(), BundleError> {
        if pins.contains(&self.ca_pin) {
            return Ok(());
        }
        let ders = self
            .x509_ca_ders()
            .map_err(|e| BundleError::BadCa(e.to_string()))?;
        for (i, der) in ders.iter().enumerate() {
            let known = ca_pin(der).is_ok_and(|p| pins.contains(&p));
            if known && self.signed_by(i, der).is_ok() {
                return Ok(());
            }
        }
        Err(BundleError::X509Rotated(self.ca_pin.clone()))
    }

    /// The user CAs trusted now (the first is the one that signs).
    pub fn user_cas(&self) -> Vec<russh::keys::ssh_key::PublicKey> {
        parse_keys(&self.user_ca)
    }

    /// The host CAs trusted now (the first is the one that signs).
    pub fn host_cas(&self) -> Vec<russh::keys::ssh_key::PublicKey> {
        parse_keys(&self.host_ca)
    }

    /// The raw Ed25519 keys of the trusted host CAs (dial tickets, audit acknowledgements).
    pub fn host_ca_raws(&self) -> Vec<Vec<u8>> {
        self.host_ca
            .lines()
            .filter_map(crate::audit::raw_ed25519)
            .collect()
    }
}

fn parse_keys(field: &str) -> Vec<russh::keys::ssh_key::PublicKey> {
    key_lines(field)
        .filter_map(|l| russh::keys::ssh_key::PublicKey::from_openssh(&l).ok())
        .collect()
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
    use crate::keys::{cert_pem, KeyPair};
    use crate::tls;
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    /// An x509 CA (rcgen) and a signer for bundles with its key.
    fn x509_ca() -> (String, EcdsaKeyPair) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let signer =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng)
                .unwrap();
        (cert_pem(cert.der()), signer)
    }

    fn bundle(pem: &str, signer: &EcdsaKeyPair, user: &str, host: &str) -> CaBundle {
        let der = first_cert_der(pem).unwrap();
        let mut b = CaBundle {
            cluster: "edge".into(),
            user_ca: user.into(),
            host_ca: host.into(),
            x509_ca_pem: pem.into(),
            ca_pin: ca_pin(&der).unwrap(),
            signature: String::new(),
        };
        let rng = ring::rand::SystemRandom::new();
        let sig = signer.sign(&rng, &b.signed_bytes()).unwrap();
        b.signature = hex::encode(sig.as_ref());
        b
    }

    #[test]
    fn one_key_per_ca_signs_the_bytes_it_always_did() {
        let (user, host) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let b = CaBundle {
            cluster: "edge".into(),
            user_ca: format!("{} comment", user.public_openssh()),
            host_ca: host.public_openssh(),
            x509_ca_pem: String::new(),
            ca_pin: String::new(),
            signature: String::new(),
        };
        let old = format!(
            "{CONTEXT}\nedge\n{}\n{}\n",
            key_part(&b.user_ca),
            key_part(&b.host_ca)
        );
        assert_eq!(b.signed_bytes(), old.into_bytes());
    }

    #[test]
    fn rotation_bundle_signs_every_key_and_trusts_both() {
        let (pem, signer) = x509_ca();
        let (old, new) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let host = KeyPair::generate().unwrap();
        let one = bundle(&pem, &signer, &old.public_openssh(), &host.public_openssh());
        let two_lines = format!("{}\n{}", new.public_openssh(), old.public_openssh());
        let both = bundle(&pem, &signer, &two_lines, &host.public_openssh());
        both.verify().unwrap();
        assert_eq!(both.user_cas().len(), 2);
        assert_eq!(both.user_cas()[0].key_data(), new.ssh_public().key_data());
        // Dropping the old key without the x509 CA's signature is caught.
        let mut stripped = both.clone();
        stripped.user_ca = new.public_openssh();
        assert_eq!(stripped.verify(), Err(BundleError::BadSignature));
        // A rotated bundle is a successor, but not "the same CAs".
        one.check_successor(&both).unwrap();
        assert_eq!(
            one.check_same_cas(&both),
            Err(BundleError::Changed("user CA"))
        );
        one.check_same_cas(&one).unwrap();
        // Another x509 CA may not vouch for a successor.
        let (pem2, signer2) = x509_ca();
        let foreign = bundle(
            &pem2,
            &signer2,
            &new.public_openssh(),
            &host.public_openssh(),
        );
        assert!(matches!(
            one.check_successor(&foreign),
            Err(BundleError::X509Rotated(_))
        ));
        // known_hosts: one @cert-authority line per host CA.
        let hosts = format!("{}\n{}", host.public_openssh(), new.public_openssh());
        let h = bundle(&pem, &signer, &old.public_openssh(), &hosts);
        assert_eq!(h.known_hosts_line("*").lines().count(), 2);
        assert_eq!(h.host_ca_raws().len(), 2);
    }

    /// A bundle listing every x509 CA of `cas` (the first issues), signed by each.
    fn x509_bundle(cas: &[&(String, EcdsaKeyPair)], host: &str) -> CaBundle {
        let pem: String = cas.iter().map(|(p, _)| p.as_str()).collect();
        let der = first_cert_der(&pem).unwrap();
        let mut b = CaBundle {
            cluster: "edge".into(),
            user_ca: host.into(),
            host_ca: host.into(),
            x509_ca_pem: pem,
            ca_pin: ca_pin(&der).unwrap(),
            signature: String::new(),
        };
        let rng = ring::rand::SystemRandom::new();
        let sigs: Vec<String> = cas
            .iter()
            .map(|(_, k)| hex::encode(k.sign(&rng, &b.signed_bytes()).unwrap().as_ref()))
            .collect();
        b.signature = sigs.join(" ");
        b
    }

    #[test]
    fn x509_rotation_is_endorsed_by_the_old_ca_and_missed_rotations_are_refused() {
        let (old, new) = (x509_ca(), x509_ca());
        let host = KeyPair::generate().unwrap().public_openssh();
        let before = x509_bundle(&[&old], &host);
        // init: the old CA issues, the new one is listed; both sign.
        let init = x509_bundle(&[&old, &new], &host);
        init.verify().unwrap();
        assert_eq!(init.x509_ca_ders().unwrap().len(), 2);
        assert_eq!(
            tls::split_ders(&init.x509_ca_der().unwrap()).unwrap().len(),
            2
        );
        before.check_successor(&init).unwrap();
        // update_clients: the new CA issues; a holder of the old one only still takes it
        // through the old CA's signature.
        let update = x509_bundle(&[&new, &old], &host);
        before.check_successor(&update).unwrap();
        init.check_successor(&update).unwrap();
        // Without the old CA's signature it is not endorsed.
        let mut unendorsed = update.clone();
        unendorsed.signature = update.signature.split(' ').next().unwrap().into();
        assert!(matches!(
            before.check_successor(&unendorsed),
            Err(BundleError::X509Rotated(_))
        ));
        // A listed CA cannot be swapped without breaking the signatures.
        let mut swapped = update.clone();
        swapped.x509_ca_pem = format!("{}{}", new.0, x509_ca().0);
        assert_eq!(swapped.verify(), Err(BundleError::BadSignature));
        // standby: the new CA only. Holders that saw the rotation take it; one that was
        // offline the whole time (old CA only) refuses it.
        let after = x509_bundle(&[&new], &host);
        update.check_successor(&after).unwrap();
        init.check_successor(&after).unwrap();
        assert!(matches!(
            before.check_successor(&after),
            Err(BundleError::X509Rotated(_))
        ));
    }

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
