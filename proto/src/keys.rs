//! Key material. Every Edgeport party (user, device, administrator) has one Ed25519 key pair,
//! made where it is used, that serves both its SSH certificate and its x509 certificate.
//! Only public keys travel.

use ring::rand::{SecureRandom, SystemRandom};
use russh::keys::ssh_key::{
    self,
    private::{Ed25519Keypair, KeypairData},
    LineEnding, PrivateKey, PublicKey,
};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the system random number generator failed")]
    Random,
    #[error("only Ed25519 keys are supported here")]
    NotEd25519,
    #[error("invalid key: {0}")]
    Ssh(#[from] ssh_key::Error),
    #[error("invalid certificate: {0}")]
    Cert(String),
}

/// Fills a buffer of `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, KeyError> {
    let mut buf = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeyError::Random)?;
    Ok(buf)
}

/// A random secret of 32 bytes, hex encoded (join tokens, invite codes).
pub fn random_secret() -> Result<String, KeyError> {
    Ok(hex::encode(random_bytes(32)?))
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// An Ed25519 key pair usable for SSH and for TLS.
#[derive(Clone)]
pub struct KeyPair {
    seed: [u8; 32],
    ssh: PrivateKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "KeyPair({})", self.public_openssh())
    }
}

impl KeyPair {
    pub fn generate() -> Result<Self, KeyError> {
        let bytes = random_bytes(32)?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes);
        Ok(Self::from_seed(seed))
    }

    fn from_seed(seed: [u8; 32]) -> Self {
        let ssh = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        Self { seed, ssh }
    }

    /// Reads an OpenSSH private key (unencrypted Ed25519).
    pub fn from_openssh(pem: &str) -> Result<Self, KeyError> {
        let key = PrivateKey::from_openssh(pem)?;
        match key.key_data() {
            KeypairData::Ed25519(kp) => Ok(Self::from_seed(kp.private.to_bytes())),
            _ => Err(KeyError::NotEd25519),
        }
    }

    pub fn to_openssh(&self) -> Result<String, KeyError> {
        Ok(self.ssh.to_openssh(LineEnding::LF)?.to_string())
    }

    pub fn ssh_private(&self) -> &PrivateKey {
        &self.ssh
    }

    pub fn ssh_public(&self) -> &PublicKey {
        self.ssh.public_key()
    }

    /// `ssh-ed25519 AAAA...`
    pub fn public_openssh(&self) -> String {
        self.ssh.public_key().to_openssh().unwrap_or_default()
    }

    /// The raw 32-byte public key.
    pub fn public_raw(&self) -> [u8; 32] {
        match self.ssh.public_key().key_data() {
            ssh_key::public::KeyData::Ed25519(k) => k.0,
            _ => [0; 32],
        }
    }

    /// PKCS#8 v1 DER of the private key, for rustls.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut out = PREFIX.to_vec();
        out.extend_from_slice(&self.seed);
        out
    }

    /// PEM of the PKCS#8 private key (`PATH.key` of `tctl auth sign --format tls`).
    pub fn pkcs8_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.pkcs8_der()))
    }

    /// An Ed25519 signature (audit batches).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match ring::signature::Ed25519KeyPair::from_seed_unchecked(&self.seed) {
            Ok(k) => k.sign(msg).as_ref().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    /// The SubjectPublicKeyInfo DER of the public key, for the x509 certificate.
    pub fn spki_der(&self) -> Vec<u8> {
        ed25519_spki_der(&self.public_raw())
    }
}

/// Wraps a raw Ed25519 public key as SubjectPublicKeyInfo DER.
pub fn ed25519_spki_der(raw: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let mut out = PREFIX.to_vec();
    out.extend_from_slice(raw);
    out
}

/// Parses `ssh-ed25519 AAAA... [comment]` and returns the key and its SPKI DER.
pub fn parse_ed25519_public(line: &str) -> Result<(PublicKey, Vec<u8>), KeyError> {
    let key = PublicKey::from_openssh(line.trim())?;
    match key.key_data() {
        ssh_key::public::KeyData::Ed25519(k) => {
            let spki = ed25519_spki_der(&k.0);
            Ok((key, spki))
        }
        _ => Err(KeyError::NotEd25519),
    }
}

/// Verifies an Ed25519 `signature` over `msg` with the key of an OpenSSH public key line
/// (`Err(Cert)` when it does not verify).
pub fn verify_ed25519_line(line: &str, msg: &[u8], signature: &[u8]) -> Result<(), KeyError> {
    let key = PublicKey::from_openssh(line.trim())?;
    let ssh_key::public::KeyData::Ed25519(raw) = key.key_data() else {
        return Err(KeyError::NotEd25519);
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, raw.0)
        .verify(msg, signature)
        .map_err(|_| KeyError::Cert("the signature does not verify".into()))
}

/// Wraps DER contents in a SEQUENCE header.
fn der_sequence(contents: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// The CA pin of an x509 CA certificate: `sha256:` + hex SHA-256 of its SubjectPublicKeyInfo.
pub fn ca_pin(ca_cert_der: &[u8]) -> Result<String, KeyError> {
    let der = rustls_pki_types::CertificateDer::from(ca_cert_der);
    let anchor =
        webpki::anchor_from_trusted_cert(&der).map_err(|e| KeyError::Cert(format!("{e:?}")))?;
    let spki = der_sequence(anchor.subject_public_key_info.as_ref());
    Ok(format!("sha256:{}", sha256_hex(&spki)))
}

/// Normalises a user-typed pin: accepts `sha256:HEX` or bare HEX, any case.
pub fn normalize_pin(pin: &str) -> Option<String> {
    let hex_part = pin.trim().strip_prefix("sha256:").unwrap_or(pin.trim());
    (hex_part.len() == 64 && hex_part.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex_part.to_ascii_lowercase()))
}

/// The first certificate in a PEM string, as DER.
pub fn first_cert_der(pem_text: &str) -> Result<Vec<u8>, KeyError> {
    pem::parse_many(pem_text)
        .map_err(|e| KeyError::Cert(e.to_string()))?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .ok_or_else(|| KeyError::Cert("no CERTIFICATE block".into()))
}

/// DER to PEM for a certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_roundtrips() {
        let k = KeyPair::generate().unwrap();
        let pem = k.to_openssh().unwrap();
        let k2 = KeyPair::from_openssh(&pem).unwrap();
        assert_eq!(k.public_openssh(), k2.public_openssh());
        assert_eq!(k.pkcs8_der(), k2.pkcs8_der());
        // ring accepts our PKCS#8 encoding and derives the same public key.
        let ring_kp =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&k.pkcs8_der()).unwrap();
        use ring::signature::KeyPair as _;
        assert_eq!(ring_kp.public_key().as_ref(), &k.public_raw());
        let (_, spki) = parse_ed25519_public(&k.public_openssh()).unwrap();
        assert_eq!(spki, k.spki_der());
        assert!(!format!("{k:?}").contains(&pem));
    }

    #[test]
    fn pins() {
        assert_eq!(normalize_pin(&format!("SHA256:{}", "A".repeat(64))), None);
        assert_eq!(
            normalize_pin(&"Ab".repeat(32)).unwrap(),
            format!("sha256:{}", "ab".repeat(32))
        );
        assert_eq!(der_sequence(&[1, 2]), vec![0x30, 2, 1, 2]);
        assert_eq!(der_sequence(&[0; 200])[..3], [0x30, 0x81, 200]);
    }
}
