//! x509 leaf certificates signed by the cluster's CA (ECDSA P-256, SHA-256).
//!
//! The CA itself is made once with rcgen; leaves are written here with a small DER writer
//! because a Kubernetes client certificate carries one `O=` attribute per group, which
//! rcgen's `DistinguishedName` (one value per attribute type) cannot express. Every input is
//! checked before it reaches the encoder, so bad names become errors, never panics.

use std::net::IpAddr;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use yasna::models::ObjectIdentifier;
use yasna::{DERWriter, Tag};

const OID_ECDSA_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
const OID_EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
const OID_ED25519: &[u64] = &[1, 3, 101, 112];
const OID_CN: &[u64] = &[2, 5, 4, 3];
const OID_O: &[u64] = &[2, 5, 4, 10];
const OID_SKI: &[u64] = &[2, 5, 29, 14];
const OID_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const OID_SAN: &[u64] = &[2, 5, 29, 17];
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const OID_AKI: &[u64] = &[2, 5, 29, 35];
const OID_EKU: &[u64] = &[2, 5, 29, 37];
const OID_SERVER_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
const OID_CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];

/// Upper bound of a DirectoryString attribute such as CN or O (RFC 5280 appendix A).
const MAX_ATTRIBUTE_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("invalid CA certificate: {0}")]
    BadCa(String),
    #[error("invalid CA key: {0}")]
    BadCaKey(String),
    #[error("invalid public key: {0}")]
    BadPublicKey(String),
    #[error("invalid certificate field: {0}")]
    BadField(String),
    #[error("signing failed")]
    Sign,
    #[error("the system random number generator failed")]
    Random,
}

/// What a leaf certificate says.
#[derive(Clone, Debug, Default)]
pub struct LeafSpec<'a> {
    pub common_name: &'a str,
    /// One `O=` attribute each (Kubernetes groups).
    pub organizations: &'a [String],
    /// SubjectPublicKeyInfo DER of the subject's key (Ed25519 or ECDSA).
    pub spki_der: &'a [u8],
    pub dns_names: &'a [String],
    pub ip_addrs: &'a [IpAddr],
    pub uris: &'a [String],
    pub server_auth: bool,
    pub client_auth: bool,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

/// The CA's signing half for leaves: its key and the names a leaf must carry to chain to it.
pub struct X509Issuer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    subject_der: Vec<u8>,
    key_id: Option<Vec<u8>>,
}

impl X509Issuer {
    /// `ca_cert_der`: the CA certificate; `key_pkcs8`: its ECDSA P-256 key.
    pub fn new(ca_cert_der: &[u8], key_pkcs8: &[u8]) -> Result<Self, X509Error> {
        use x509_parser::certificate::X509Certificate;
        use x509_parser::extensions::ParsedExtension;
        use x509_parser::prelude::FromDer;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8, &rng)
            .map_err(|e| X509Error::BadCaKey(e.to_string()))?;
        let (_, cert) =
            X509Certificate::from_der(ca_cert_der).map_err(|e| X509Error::BadCa(e.to_string()))?;
        // The CA certificate must be for this very key, or nothing it signs would verify.
        use ring::signature::KeyPair as _;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(X509Error::BadCa(
                "the CA certificate does not match the CA key".into(),
            ));
        }
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        Ok(Self {
            key,
            rng,
            subject_der: cert.tbs_certificate.subject.as_raw().to_vec(),
            key_id,
        })
    }

    /// Signs arbitrary bytes with the CA key (ECDSA P-256, ASN.1 signature): the CA bundle.
    pub fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>, X509Error> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| X509Error::Random)
    }

    /// Signs a leaf certificate; returns its DER.
    pub fn sign(&self, spec: &LeafSpec<'_>) -> Result<Vec<u8>, X509Error> {
        check(spec)?;
        let mut serial = edgeport_proto::keys::random_bytes(16).map_err(|_| X509Error::Random)?;
        serial[0] &= 0x7f;
        serial[0] |= 0x01; // positive and never zero
        let ski = ring::digest::digest(&ring::digest::SHA256, spec.spki_der);
        let tbs = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_tagged(Tag::context(0), |w| w.write_u8(2)); // v3
                w.next().write_bigint_bytes(&serial, true);
                write_algorithm(w.next());
                w.next().write_der(&self.subject_der);
                w.next().write_sequence(|w| {
                    write_time(w.next(), spec.not_before);
                    write_time(w.next(), spec.not_after);
                });
                w.next().write_sequence(|w| {
                    for o in spec.organizations {
                        write_attribute(w.next(), OID_O, o);
                    }
                    write_attribute(w.next(), OID_CN, spec.common_name);
                });
                w.next().write_der(spec.spki_der);
                w.next().write_tagged(Tag::context(3), |w| {
                    w.write_sequence(|w| {
                        write_extension(w.next(), OID_BASIC_CONSTRAINTS, true, &{
                            yasna::construct_der(|w| w.write_sequence(|_| {}))
                        });
                        write_extension(w.next(), OID_KEY_USAGE, true, &{
                            // digitalSignature only: TLS 1.3 with EC/EdDSA keys needs no more.
                            yasna::construct_der(|w| w.write_bitvec_bytes(&[0x80], 1))
                        });
                        write_extension(w.next(), OID_EKU, false, &{
                            yasna::construct_der(|w| {
                                w.write_sequence(|w| {
                                    if spec.server_auth {
                                        w.next().write_oid(&oid(OID_SERVER_AUTH));
                                    }
                                    if spec.client_auth {
                                        w.next().write_oid(&oid(OID_CLIENT_AUTH));
                                    }
                                })
                            })
                        });
                        if !(spec.dns_names.is_empty()
                            && spec.ip_addrs.is_empty()
                            && spec.uris.is_empty())
                        {
                            write_extension(w.next(), OID_SAN, false, &san(spec));
                        }
                        write_extension(w.next(), OID_SKI, false, &{
                            yasna::construct_der(|w| w.write_bytes(&ski.as_ref()[..20]))
                        });
                        if let Some(kid) = &self.key_id {
                            write_extension(w.next(), OID_AKI, false, &{
                                yasna::construct_der(|w| {
                                    w.write_sequence(|w| {
                                        w.next().write_tagged_implicit(Tag::context(0), |w| {
                                            w.write_bytes(kid)
                                        })
                                    })
                                })
                            });
                        }
                    })
                });
            })
        });
        let sig = self
            .key
            .sign(&self.rng, &tbs)
            .map_err(|_| X509Error::Sign)?;
        Ok(yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_der(&tbs);
                write_algorithm(w.next());
                w.next()
                    .write_bitvec_bytes(sig.as_ref(), sig.as_ref().len() * 8);
            })
        }))
    }
}

fn oid(parts: &[u64]) -> ObjectIdentifier {
    ObjectIdentifier::from_slice(parts)
}

fn write_algorithm(w: DERWriter<'_>) {
    w.write_sequence(|w| w.next().write_oid(&oid(OID_ECDSA_SHA256)));
}

fn write_attribute(w: DERWriter<'_>, attr: &[u64], value: &str) {
    w.write_set(|w| {
        w.next().write_sequence(|w| {
            w.next().write_oid(&oid(attr));
            w.next().write_utf8_string(value);
        })
    });
}

fn write_extension(w: DERWriter<'_>, id: &[u64], critical: bool, value: &[u8]) {
    w.write_sequence(|w| {
        w.next().write_oid(&oid(id));
        if critical {
            w.next().write_bool(true);
        }
        w.next().write_bytes(value);
    });
}

fn san(spec: &LeafSpec<'_>) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for d in spec.dns_names {
                w.next()
                    .write_tagged_implicit(Tag::context(2), |w| w.write_ia5_string(d));
            }
            for u in spec.uris {
                w.next()
                    .write_tagged_implicit(Tag::context(6), |w| w.write_ia5_string(u));
            }
            for ip in spec.ip_addrs {
                let bytes = match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                w.next()
                    .write_tagged_implicit(Tag::context(7), |w| w.write_bytes(&bytes));
            }
        })
    })
}

/// UTCTime through 2049, GeneralizedTime after (RFC 5280 4.1.2.5).
fn write_time(w: DERWriter<'_>, unix: u64) {
    let digits: String = edgeport_proto::util::format_time(unix)
        .chars()
        .filter(char::is_ascii_digit)
        .collect(); // YYYYMMDDHHMMSS
    let year: u32 = digits.get(..4).and_then(|y| y.parse().ok()).unwrap_or(0);
    if (1950..2050).contains(&year) {
        let text = format!("{}Z", digits.get(2..).unwrap_or_default());
        w.write_tagged_implicit(yasna::tags::TAG_UTCTIME, |w| w.write_bytes(text.as_bytes()));
    } else {
        let text = format!("{digits}Z");
        w.write_tagged_implicit(yasna::tags::TAG_GENERALIZEDTIME, |w| {
            w.write_bytes(text.as_bytes())
        });
    }
}

/// A DNS name as a SAN: ASCII letters, digits, `-`, `_`, `.`, and a leading `*.` wildcard.
pub fn valid_dns_name(name: &str) -> bool {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    !rest.is_empty()
        && name.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

fn check(spec: &LeafSpec<'_>) -> Result<(), X509Error> {
    let bad = |m: String| Err(X509Error::BadField(m));
    let attr_ok = |s: &str| {
        !s.is_empty() && s.chars().count() <= MAX_ATTRIBUTE_LEN && !s.chars().any(char::is_control)
    };
    if !attr_ok(spec.common_name) {
        return bad(format!("common name {:?}", spec.common_name));
    }
    if let Some(o) = spec.organizations.iter().find(|o| !attr_ok(o)) {
        return bad(format!("organization {o:?} (1 to 64 printable characters)"));
    }
    if let Some(d) = spec.dns_names.iter().find(|d| !valid_dns_name(d)) {
        return bad(format!("DNS name {d:?}"));
    }
    if let Some(u) = spec
        .uris
        .iter()
        .find(|u| u.is_empty() || !u.bytes().all(|c| c.is_ascii_graphic()))
    {
        return bad(format!("URI {u:?}"));
    }
    if spec.not_before >= spec.not_after {
        return bad("validity window is empty".into());
    }
    if !spec.server_auth && !spec.client_auth {
        return bad("a certificate needs serverAuth or clientAuth".into());
    }
    check_spki(spec.spki_der)
}

/// Accepts Ed25519 and elliptic-curve public keys, the kinds Edgeport parties make.
pub fn check_spki(der: &[u8]) -> Result<(), X509Error> {
    use x509_parser::prelude::FromDer;
    use x509_parser::x509::SubjectPublicKeyInfo;
    let (rest, spki) =
        SubjectPublicKeyInfo::from_der(der).map_err(|e| X509Error::BadPublicKey(e.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Error::BadPublicKey(
            "trailing bytes after the SubjectPublicKeyInfo".into(),
        ));
    }
    let alg: Vec<u64> = spki
        .algorithm
        .algorithm
        .iter()
        .map(|it| it.collect())
        .unwrap_or_default();
    if alg == OID_ED25519 {
        if spki.subject_public_key.data.len() != 32 {
            return Err(X509Error::BadPublicKey("an Ed25519 key is 32 bytes".into()));
        }
        Ok(())
    } else if alg == OID_EC_PUBLIC_KEY {
        Ok(())
    } else {
        Err(X509Error::BadPublicKey(
            "only Ed25519 and ECDSA keys are accepted".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(valid_dns_name("gateway.edgeport"));
        assert!(valid_dns_name("*.example.com"));
        assert!(valid_dns_name("localhost"));
        assert!(!valid_dns_name("a..b"));
        assert!(!valid_dns_name("ünïcode.example"));
        assert!(!valid_dns_name(""));
        assert!(!valid_dns_name("a b"));
    }

    #[test]
    fn spki_checks() {
        let k = edgeport_proto::keys::KeyPair::generate().unwrap();
        check_spki(&k.spki_der()).unwrap();
        assert!(check_spki(b"garbage").is_err());
        let mut long = k.spki_der();
        long.push(0);
        assert!(check_spki(&long).is_err());
    }
}
