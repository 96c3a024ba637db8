//! Deciding who may log in. The agent decides offline, from what it holds: the user CA, its
//! own labels, the locks the gateway told it about, and the local accounts. russh only
//! checks that the client owns the certificate's key; every other rule is applied here.

use std::collections::{BTreeMap, HashSet};

use edgeport_proto::sshcert::{check_user_cert, CertRefusal, RolesExtension, UserGrant};
use russh::keys::ssh_key::{Certificate, PublicKey};

use super::passwd::{AccountError, AccountFiles, LocalUser};
use super::process;

/// A login that passed every check.
#[derive(Clone, Debug)]
pub struct Authorized {
    pub grant: UserGrant,
    pub account: LocalUser,
    /// Whether processes must switch to the account (the agent runs as root).
    pub switch_user: bool,
}

/// Why a login was refused. The text goes to the agent's log and to the client.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Cert(#[from] CertRefusal),
    #[error("user {0:?} is locked")]
    Locked(String),
    #[error("the certificate belongs to {cert:?} but the gateway authenticated {stream:?}")]
    WrongUser { cert: String, stream: String },
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error("this agent does not run as root and can only serve its own user {own:?}, not {requested:?}")]
    NotRoot { own: String, requested: String },
    #[error("only Edgeport certificates are accepted here, not plain public keys")]
    PlainKey,
}

impl Refusal {
    /// Whether the refusal ends the connection (with the reason sent to the client). A
    /// certificate of this cluster that does not allow this login will not start allowing
    /// it on a retry; a plain key or another cluster's certificate may just be the first of
    /// several identities the client holds.
    pub fn ends_connection(&self) -> bool {
        !matches!(
            self,
            Refusal::PlainKey
                | Refusal::Cert(CertRefusal::UnknownCa(_))
                | Refusal::Cert(CertRefusal::BadSignature)
                | Refusal::Cert(CertRefusal::WrongType { .. })
                | Refusal::Cert(CertRefusal::SessionMfaRequired)
                | Refusal::Cert(CertRefusal::SessionMfaOtherDevice { .. })
        )
    }
}

/// The inputs of the decision.
pub struct Policy<'a> {
    /// The trusted user CAs (two during a CA rotation).
    pub user_cas: &'a [PublicKey],
    pub labels: &'a BTreeMap<String, String>,
    /// This device's id (what a per-session second factor certificate must name).
    pub device_id: &'a str,
    pub locked: &'a HashSet<String>,
    pub accounts: &'a AccountFiles,
    /// The user the gateway authenticated for this stream (from its x509 certificate).
    pub stream_user: Option<&'a str>,
}

/// The local account a login by a certificate that passed [`check_cert`] runs as.
pub fn account(policy: &Policy<'_>, login: &str, grant: UserGrant) -> Result<Authorized, Refusal> {
    let switch_user = process::running_as_root();
    let account = if switch_user {
        policy.accounts.lookup(login)?
    } else {
        let own = policy
            .accounts
            .lookup_uid(process::own_uid())
            .ok_or_else(|| AccountError::NoSuchUser(format!("uid {}", process::own_uid())))?;
        if own.name != login {
            return Err(Refusal::NotRoot {
                own: own.name,
                requested: login.to_string(),
            });
        }
        own
    };
    Ok(Authorized {
        grant,
        account,
        switch_user,
    })
}

/// The certificate checks (the local account is [`account`]'s): user CA, validity,
/// principal = login, locks, the gateway's user, the roles against `policy.labels` (a
/// record-mode target's, issue 22), the per-session second factor.
pub fn check_cert(
    policy: &Policy<'_>,
    login: &str,
    cert: &Certificate,
    now: u64,
) -> Result<UserGrant, Refusal> {
    let ca = edgeport_proto::sshcert::signer_of(cert, policy.user_cas)
        .ok_or(Refusal::Cert(CertRefusal::BadSignature))?;
    let grant = check_user_cert(cert, ca, login, now)?;
    if policy.locked.contains(&grant.user) {
        return Err(Refusal::Locked(grant.user));
    }
    if let Some(stream_user) = policy.stream_user {
        if stream_user != grant.user {
            return Err(Refusal::WrongUser {
                cert: grant.user,
                stream: stream_user.to_string(),
            });
        }
    }
    if !grant.roles.allows_device(policy.labels) {
        return Err(CertRefusal::LabelsDenied.into());
    }
    check_session_mfa(&grant.roles, policy.labels, policy.device_id)?;
    Ok(grant)
}

/// A per-session second factor certificate opens only the device it names; a device its
/// roles say needs one takes no other certificate.
fn check_session_mfa(
    roles: &RolesExtension,
    labels: &BTreeMap<String, String>,
    device_id: &str,
) -> Result<(), CertRefusal> {
    if !roles.mfa_device.is_empty() {
        if roles.mfa_device != device_id {
            return Err(CertRefusal::SessionMfaOtherDevice {
                cert: roles.mfa_device.clone(),
                device: device_id.to_string(),
            });
        }
        return Ok(());
    }
    if roles.requires_session_mfa(labels) {
        return Err(CertRefusal::SessionMfaRequired);
    }
    Ok(())
}

/// Environment variables a client may set (`env` requests), as OpenSSH's usual
/// `AcceptEnv LANG LC_*` plus a few harmless ones. Anything that changes how programs load
/// or run (PATH, LD_*, BASH_ENV, ...) is refused.
/// An `env` request a session takes: a name [`env_allowed`], a value safe to pass on.
pub fn env_ok(name: &str, value: &str) -> bool {
    env_allowed(name) && process::exec_safe(value)
}

pub fn env_allowed(name: &str) -> bool {
    matches!(
        name,
        "LANG" | "TZ" | "COLORTERM" | "NO_COLOR" | "TERM_PROGRAM"
    ) || name.starts_with("LC_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_mfa_binds_one_device() {
        let medical = BTreeMap::from([("fleet".to_string(), vec!["medical".to_string()])]);
        let plain = RolesExtension {
            session_mfa: vec![medical],
            ..RolesExtension::every_device(vec!["medical".into()])
        };
        let med = BTreeMap::from([("fleet".to_string(), "medical".to_string())]);
        let van = BTreeMap::from([("fleet".to_string(), "vans".to_string())]);
        assert_eq!(
            check_session_mfa(&plain, &med, "med1"),
            Err(CertRefusal::SessionMfaRequired)
        );
        assert!(check_session_mfa(&plain, &van, "van1").is_ok());
        let bound = RolesExtension {
            mfa_device: "med1".into(),
            ..plain.clone()
        };
        assert!(check_session_mfa(&bound, &med, "med1").is_ok());
        assert!(matches!(
            check_session_mfa(&bound, &med, "med2"),
            Err(CertRefusal::SessionMfaOtherDevice { .. })
        ));
        assert!(matches!(
            check_session_mfa(&bound, &van, "van1"),
            Err(CertRefusal::SessionMfaOtherDevice { .. })
        ));
        assert!(!Refusal::Cert(CertRefusal::SessionMfaRequired).ends_connection());
    }

    #[test]
    fn env_filter() {
        assert!(env_allowed("LANG"));
        assert!(env_allowed("LC_ALL"));
        assert!(!env_allowed("LD_PRELOAD"));
        assert!(!env_allowed("PATH"));
        assert!(!env_allowed("BASH_ENV"));
    }
}
