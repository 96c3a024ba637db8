//! SSH certificate rules shared by the authority (which signs) and the agent and tsh (which
//! check). russh and ssh-key verify signatures only; every other rule lives here, so that the
//! CA, the validity window, the principals, the critical options and the extensions are
//! checked the same way everywhere.

use std::collections::BTreeMap;

use russh::keys::ssh_key::{certificate::CertType, Algorithm, Certificate, PublicKey};
use serde::{Deserialize, Serialize};

pub const EXT_PERMIT_PTY: &str = "permit-pty";
pub const EXT_PERMIT_PORT_FORWARDING: &str = "permit-port-forwarding";
pub const EXT_PERMIT_AGENT_FORWARDING: &str = "permit-agent-forwarding";
pub const EXT_PERMIT_X11_FORWARDING: &str = "permit-X11-forwarding";
pub const EXT_PERMIT_USER_RC: &str = "permit-user-rc";
/// The user's roles and device-label rules, JSON of [`RolesExtension`].
pub const EXT_ROLES: &str = "roles@edgeport";

/// What a device needs to decide access offline, carried inside the user certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolesExtension {
    pub roles: Vec<String>,
    /// One rule set per role, label key -> allowed values (`*` matches anything). A device is
    /// allowed when any one set matches all of its keys (an empty set matches every device).
    /// Sets are never merged across roles: `{fleet: vans, env: dev}` and `{fleet: trucks, env:
    /// prod}` do not add up to vans in prod. No set at all allows nothing (fail closed).
    #[serde(default)]
    pub allow: Vec<BTreeMap<String, Vec<String>>>,
    /// Label key -> denied values. Deny wins over allow.
    #[serde(default)]
    pub deny_labels: BTreeMap<String, Vec<String>>,
    /// The id of the user record the certificate was issued for (random, never reused):
    /// sessions and recordings belong to it, not to the name, which a later user may take.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_id: String,
    /// The allow sets of the roles with `require_session_mfa` (as in `allow`): a device one of
    /// them matches takes only a per-session second factor certificate (`mfa_device`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_mfa: Vec<BTreeMap<String, Vec<String>>>,
    /// Set only in a per-session second factor certificate: the one device it opens.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mfa_device: String,
    /// Shared sessions (`tsh join`): per role with `join_sessions`, its allow set and the
    /// modes (`observer`, `peer`, `moderator`) its users may join with on matching devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub join: Vec<JoinRule>,
    /// Label sets (a role's `require_moderator`): a session of this user to a device one of
    /// them matches starts only once a moderator has joined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_moderator: Vec<BTreeMap<String, Vec<String>>>,
}

/// One role's right to join other users' sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRule {
    /// The devices (as in `RolesExtension::allow`).
    pub labels: BTreeMap<String, Vec<String>>,
    pub modes: Vec<String>,
}

/// The modes a participant may join a session with.
pub const JOIN_MODES: [&str; 3] = ["observer", "peer", "moderator"];

impl RolesExtension {
    /// Rules that reach every device (no label restriction), for `roles`.
    pub fn every_device(roles: Vec<String>) -> Self {
        Self {
            roles,
            allow: vec![BTreeMap::new()],
            deny_labels: BTreeMap::new(),
            user_id: String::new(),
            session_mfa: Vec::new(),
            mfa_device: String::new(),
            join: Vec::new(),
            require_moderator: Vec::new(),
        }
    }

    /// Whether these roles let their user join a session on a device with `labels` in
    /// `mode` (deny labels win, as for logins).
    pub fn may_join(&self, labels: &BTreeMap<String, String>, mode: &str) -> bool {
        self.allows_device(labels)
            && self
                .join
                .iter()
                .any(|r| r.modes.iter().any(|m| m == mode) && labels_match(&r.labels, labels))
    }

    /// Whether a session of this user to a device with `labels` waits for a moderator.
    pub fn requires_moderator(&self, labels: &BTreeMap<String, String>) -> bool {
        self.require_moderator
            .iter()
            .any(|rules| labels_match(rules, labels))
    }

    /// Whether a device with `labels` takes only a per-session second factor certificate:
    /// one role that requires it matches the device.
    pub fn requires_session_mfa(&self, labels: &BTreeMap<String, String>) -> bool {
        self.session_mfa
            .iter()
            .any(|rules| labels_match(rules, labels))
    }

    /// Whether a device with `labels` may be reached under these rules.
    pub fn allows_device(&self, labels: &BTreeMap<String, String>) -> bool {
        let matches = |rules: &BTreeMap<String, Vec<String>>| labels_match(rules, labels);
        let denied = !self.deny_labels.is_empty()
            && self.deny_labels.iter().any(|(k, vals)| {
                labels
                    .get(k)
                    .is_some_and(|v| vals.iter().any(|a| a == "*" || a == v))
            });
        !denied && self.allow.iter().any(matches)
    }
}

/// Whether `labels` has every key of `rules` with one of its values (`*`: any value).
fn labels_match(rules: &BTreeMap<String, Vec<String>>, labels: &BTreeMap<String, String>) -> bool {
    rules.iter().all(|(k, vals)| {
        labels
            .get(k)
            .is_some_and(|v| vals.iter().any(|a| a == "*" || a == v))
    })
}

/// Why a certificate was refused. The messages are what agents log and clients print.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    #[error("certificate is a {got} certificate, expected a {want} certificate")]
    WrongType {
        got: &'static str,
        want: &'static str,
    },
    #[error("certificate is not signed by this cluster's {0} CA")]
    UnknownCa(&'static str),
    #[error("certificate signature does not verify")]
    BadSignature,
    #[error("certificate expired at {0}")]
    Expired(String),
    #[error("certificate is not valid before {0}")]
    NotYetValid(String),
    #[error("certificate does not allow login {0:?} (principals: {1})")]
    Principal(String, String),
    #[error("certificate carries unsupported critical option {0:?}")]
    CriticalOption(String),
    #[error("certificate roles do not allow this device")]
    LabelsDenied,
    #[error("this device requires a per-session second factor: run `tsh ssh` (it asks for the code) or `tsh proxy ssh --mfa-code CODE`")]
    SessionMfaRequired,
    #[error("this per-session second factor certificate is for device {cert:?}, not {device:?}")]
    SessionMfaOtherDevice { cert: String, device: String },
    #[error("certificate key type {0:?} is not supported")]
    UnsupportedKey(String),
}

/// The facts a valid user certificate grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserGrant {
    pub user: String,
    pub login: String,
    pub principals: Vec<String>,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
    pub roles: RolesExtension,
    pub valid_before: u64,
    pub serial: u64,
}

fn check_common(
    cert: &Certificate,
    ca: &PublicKey,
    want: CertType,
    now: u64,
) -> Result<(), CertRefusal> {
    let name = |t: CertType| if t.is_user() { "user" } else { "host" };
    if cert.cert_type() != want {
        return Err(CertRefusal::WrongType {
            got: name(cert.cert_type()),
            want: name(want),
        });
    }
    if cert.signature_key() != ca.key_data() {
        return Err(CertRefusal::UnknownCa(name(want)));
    }
    // ssh-key panics while re-encoding a certificate whose key algorithm it does not know
    // (found by the ssh_cert fuzz target, 2026-12-07), and anyone can name the cluster's
    // public CA key as the signer: refuse such keys before the signature check.
    if let Algorithm::Other(other) = cert.public_key().algorithm() {
        let shown: String = other.as_str().chars().take(64).collect();
        return Err(CertRefusal::UnsupportedKey(shown));
    }
    cert.verify_signature()
        .map_err(|_| CertRefusal::BadSignature)?;
    if now < cert.valid_after() {
        return Err(CertRefusal::NotYetValid(crate::util::format_time(
            cert.valid_after(),
        )));
    }
    if now >= cert.valid_before() {
        return Err(CertRefusal::Expired(crate::util::format_time(
            cert.valid_before(),
        )));
    }
    if let Some((opt, _)) = cert.critical_options().iter().next() {
        return Err(CertRefusal::CriticalOption(opt.clone()));
    }
    Ok(())
}

/// Of the trusted CAs `cas` (two during a CA rotation), the one that signed `cert`, or the
/// first (which then refuses it as from an unknown CA). `None` only when `cas` is empty.
pub fn signer_of<'a>(cert: &Certificate, cas: &'a [PublicKey]) -> Option<&'a PublicKey> {
    cas.iter()
        .find(|c| cert.signature_key() == c.key_data())
        .or_else(|| cas.first())
}

/// Checks a user certificate for `login` at time `now` (Unix seconds): signed by `user_ca`,
/// a user certificate, inside its validity window, `login` among its principals (an empty
/// principal list is refused, unlike OpenSSH's "any"), and no critical option we do not honour.
pub fn check_user_cert(
    cert: &Certificate,
    user_ca: &PublicKey,
    login: &str,
    now: u64,
) -> Result<UserGrant, CertRefusal> {
    check_common(cert, user_ca, CertType::User, now)?;
    let principals = cert.valid_principals().to_vec();
    if !principals.iter().any(|p| p == login) {
        return Err(CertRefusal::Principal(
            login.to_string(),
            principals.join(","),
        ));
    }
    let ext = cert.extensions();
    let roles = ext
        .get(EXT_ROLES)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    Ok(UserGrant {
        user: cert.key_id().to_string(),
        login: login.to_string(),
        principals,
        permit_pty: ext.contains_key(EXT_PERMIT_PTY),
        permit_port_forwarding: ext.contains_key(EXT_PERMIT_PORT_FORWARDING),
        permit_agent_forwarding: ext.contains_key(EXT_PERMIT_AGENT_FORWARDING),
        roles,
        valid_before: cert.valid_before(),
        serial: cert.serial(),
    })
}

/// Checks a device's host certificate: signed by `host_ca`, a host certificate, valid now,
/// and naming `device_id` among its principals.
pub fn check_host_cert(
    cert: &Certificate,
    host_ca: &PublicKey,
    device_id: &str,
    now: u64,
) -> Result<(), CertRefusal> {
    check_common(cert, host_ca, CertType::Host, now)?;
    if !cert.valid_principals().iter().any(|p| p == device_id) {
        return Err(CertRefusal::Principal(
            device_id.to_string(),
            cert.valid_principals().join(","),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;
    use russh::keys::ssh_key::certificate::Builder;

    /// The ssh_cert fuzz target's finding: a certificate whose key algorithm ssh-key does not
    /// know, "signed" by the (public) CA key, made `verify_signature` panic (an abort in
    /// release builds). It is refused with a line instead.
    #[test]
    fn an_unknown_key_algorithm_is_refused_not_a_panic() {
        let data = include_bytes!("../../fuzz/corpus/ssh_cert/regress-unknown-key-algorithm");
        // The type "-cert-v01@openssh.com" names no algorithm at all: the patched ssh-key
        // refuses it while decoding (vendor/README.md); unpatched, verifying it panicked.
        assert!(Certificate::from_bytes(data).is_err());
        crate::fuzz_entry::ssh_cert(data);
        // With a name ("x-cert-v01@..."), it decodes as an algorithm ssh-key does not know,
        // which the checks refuse before they verify anything.
        let mut named = data.to_vec();
        named[3] += 1;
        named.insert(4, b'x');
        let cert = Certificate::from_bytes(&named).unwrap();
        assert!(matches!(cert.public_key().algorithm(), Algorithm::Other(_)));
        let ca = PublicKey::from(cert.signature_key().clone());
        for now in [0, cert.valid_after(), cert.valid_before().saturating_sub(1)] {
            let login = cert.valid_principals().first().cloned().unwrap_or_default();
            let user = check_user_cert(&cert, &ca, &login, now).unwrap_err();
            let host = check_host_cert(&cert, &ca, &login, now).unwrap_err();
            for e in [user, host] {
                assert!(
                    matches!(
                        e,
                        CertRefusal::UnsupportedKey(_) | CertRefusal::WrongType { .. }
                    ),
                    "{e}"
                );
            }
        }
        crate::fuzz_entry::ssh_cert(&named);
    }

    fn sign(
        ca: &KeyPair,
        subject: &KeyPair,
        t: CertType,
        principals: &[&str],
        after: u64,
        before: u64,
        pty: bool,
    ) -> Certificate {
        let mut b = Builder::new(
            vec![7u8; 32],
            subject.ssh_public().key_data().clone(),
            after,
            before,
        )
        .unwrap();
        b.cert_type(t).unwrap().key_id("alice").unwrap();
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        if pty {
            b.extension(EXT_PERMIT_PTY, "").unwrap();
        }
        b.sign(ca.ssh_private()).unwrap()
    }

    #[test]
    fn signer_of_picks_the_ca_that_signed_among_trusted_ones() {
        let (old, new, user) = (
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
            KeyPair::generate().unwrap(),
        );
        let cas = [new.ssh_public().clone(), old.ssh_public().clone()];
        let cert = sign(&old, &user, CertType::User, &["root"], 0, u64::MAX, false);
        let ca = signer_of(&cert, &cas).unwrap();
        check_user_cert(&cert, ca, "root", 10).unwrap();
        // After standby the old CA is gone: refused as from an unknown CA.
        let only_new = [new.ssh_public().clone()];
        let ca = signer_of(&cert, &only_new).unwrap();
        assert!(matches!(
            check_user_cert(&cert, ca, "root", 10),
            Err(CertRefusal::UnknownCa(_))
        ));
        assert!(signer_of(&cert, &[]).is_none());
    }

    #[test]
    fn user_cert_rules() {
        let ca = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let user = KeyPair::generate().unwrap();
        let c = sign(&ca, &user, CertType::User, &["root"], 100, 200, true);
        let g = check_user_cert(&c, ca.ssh_public(), "root", 150).unwrap();
        assert!(g.permit_pty && !g.permit_port_forwarding);
        assert_eq!(g.user, "alice");
        assert!(matches!(
            check_user_cert(&c, ca.ssh_public(), "pi", 150),
            Err(CertRefusal::Principal(..))
        ));
        assert!(matches!(
            check_user_cert(&c, ca.ssh_public(), "root", 200),
            Err(CertRefusal::Expired(_))
        ));
        assert!(matches!(
            check_user_cert(&c, ca.ssh_public(), "root", 99),
            Err(CertRefusal::NotYetValid(_))
        ));
        assert!(matches!(
            check_user_cert(&c, other.ssh_public(), "root", 150),
            Err(CertRefusal::UnknownCa(_))
        ));
        let h = sign(&ca, &user, CertType::Host, &["root"], 100, 200, false);
        assert!(matches!(
            check_user_cert(&h, ca.ssh_public(), "root", 150),
            Err(CertRefusal::WrongType { .. })
        ));
        let none = sign(&ca, &user, CertType::User, &[], 100, 200, false);
        assert!(check_user_cert(&none, ca.ssh_public(), "root", 150).is_err());
    }

    #[test]
    fn host_cert_rules() {
        let ca = KeyPair::generate().unwrap();
        let dev = KeyPair::generate().unwrap();
        let c = sign(
            &ca,
            &dev,
            CertType::Host,
            &["dev1", "dev1.edge"],
            100,
            200,
            false,
        );
        check_host_cert(&c, ca.ssh_public(), "dev1", 150).unwrap();
        assert!(check_host_cert(&c, ca.ssh_public(), "dev2", 150).is_err());
    }

    #[test]
    fn label_rules() {
        let labels: BTreeMap<String, String> = [
            ("fleet".to_string(), "vans".to_string()),
            ("env".into(), "prod".into()),
        ]
        .into();
        assert!(
            !RolesExtension::default().allows_device(&labels),
            "no rules: fail closed"
        );
        let mut r = RolesExtension::every_device(vec![]);
        assert!(r.allows_device(&labels));
        r.allow = vec![[("fleet".to_string(), vec!["vans".to_string()])].into()];
        assert!(r.allows_device(&labels));
        r.deny_labels.insert("env".into(), vec!["prod".into()]);
        assert!(!r.allows_device(&labels));
        // Two roles' sets are alternatives, never merged into a cross product.
        let set = |f: &str, e: &str| -> BTreeMap<String, Vec<String>> {
            [
                ("fleet".to_string(), vec![f.to_string()]),
                ("env".into(), vec![e.into()]),
            ]
            .into()
        };
        let two = RolesExtension {
            roles: vec![],
            allow: vec![set("vans", "dev"), set("trucks", "prod")],
            deny_labels: BTreeMap::new(),
            ..RolesExtension::default()
        };
        assert!(
            !two.allows_device(&labels),
            "vans in prod is in neither role"
        );
        let vans_dev = [
            ("fleet".to_string(), "vans".to_string()),
            ("env".into(), "dev".into()),
        ];
        assert!(two.allows_device(&vans_dev.into()));
    }
}
