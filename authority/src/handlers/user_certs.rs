//! User certificates: `tctl auth sign` (SignUser, administrators) and tsh logins relayed by
//! gateways (Login). Both end in [`issue`], which signs an SSH user certificate and an x509
//! client certificate for the same Ed25519 key with the same validity (DESIGN §2).

use edgeport_proto::keys::parse_ed25519_public;
use edgeport_proto::rpc::{
    LockTarget, LoginRequest, Response, RpcError, SignUserRequest, UserCerts,
};

use crate::ca::{SshUserCert, BACKDATE_SECS};
use crate::errors::{denied, internal, invalid, locked, not_found};
use crate::service::Service;
use crate::users::{self, check_name, Subject};
use crate::{locks, roles};
use edgeport_proto::sshcert::RolesExtension;

/// The principal of a certificate for a user without logins: no Edgeport login can have this
/// name (names start with a letter or digit), so it opens nothing, yet the certificate stays
/// well-formed (an empty principal list would mean "any login" to OpenSSH).
pub const NO_LOGIN_PRINCIPAL: &str = "-";

/// Refuses locked users.
pub fn check_not_locked(svc: &Service, user: &str, now: u64) -> Result<(), RpcError> {
    match locks::find(svc.store(), &LockTarget::User(user.to_string()), now)? {
        Some(l) => Err(locked(locks::locked_message(&l))),
        None => Ok(()),
    }
}

/// Signs both certificates for `subject` and `ssh_public_key`.
pub fn issue(
    svc: &Service,
    subject: &Subject,
    ssh_public_key: &str,
    ttl_secs: u64,
    now: u64,
) -> Result<UserCerts, RpcError> {
    issue_bound(svc, subject, ssh_public_key, ttl_secs, now, None)
}

/// Signs an SSH user certificate for `subject` with the permissions and roles of `grants`:
/// the one place that fills in the certificate for a login ([`issue_bound`]), a per-session
/// second factor (`session_mfa.rs`) and a record-mode target session (`handlers/targets.rs`).
/// `mfa_device` binds it to one device (empty: not bound).
#[allow(clippy::too_many_arguments)]
pub fn sign_ssh(
    svc: &Service,
    subject: &Subject,
    grants: &roles::Grants,
    key: &russh::keys::ssh_key::PublicKey,
    principals: &[String],
    (valid_after, valid_before): (u64, u64),
    mfa_device: String,
    permit_agent_forwarding: bool,
) -> Result<String, RpcError> {
    svc.ca()
        .sign_ssh_user(&SshUserCert {
            user: &subject.name,
            public_key: key,
            principals,
            valid_after,
            valid_before,
            permit_pty: grants.permit_pty,
            permit_port_forwarding: grants.permit_port_forwarding,
            permit_agent_forwarding,
            roles: &RolesExtension {
                user_id: subject.id.clone(),
                mfa_device,
                ..grants.extension.clone()
            },
        })
        .map_err(|e| internal("SSH user certificate", e))
}

/// [`issue`], with the SSH certificate bound to one device when `device` is given (agents
/// refuse it anywhere else: the roles extension's `mfa_device`).
pub fn issue_bound(
    svc: &Service,
    subject: &Subject,
    ssh_public_key: &str,
    ttl_secs: u64,
    now: u64,
    device: Option<&str>,
) -> Result<UserCerts, RpcError> {
    let (key, spki) = parse_ed25519_public(ssh_public_key)
        .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
    // Approved access requests in force add their roles, for their time only.
    let elevation = crate::access_requests::elevation(svc.store(), subject, now)?;
    let grants = if elevation.roles.is_empty() {
        roles::grants(svc.store(), &subject.roles)?
    } else {
        let names = crate::access_requests::with_roles(subject, &elevation.roles);
        roles::grants(svc.store(), &names)?
    };
    let cap = svc
        .limits
        .max_session_ttl
        .min(grants.max_session_ttl)
        .max(1);
    let ttl = if ttl_secs == 0 {
        cap
    } else {
        ttl_secs.min(cap)
    };
    let valid_after = now.saturating_sub(BACKDATE_SECS);
    let valid_before = elevation.until.map_or(now + ttl, |u| u.min(now + ttl));
    let principals = if subject.logins.is_empty() {
        vec![NO_LOGIN_PRINCIPAL.to_string()]
    } else {
        subject.logins.clone()
    };
    let mfa_device = device.map_or_else(|| grants.extension.mfa_device.clone(), str::to_string);
    let ssh_cert = sign_ssh(
        svc,
        subject,
        &grants,
        &key,
        &principals,
        (valid_after, valid_before),
        mfa_device,
        grants.permit_agent_forwarding,
    )
    .map_err(|e| internal("SSH user certificate", e))?;
    let x509_cert_pem = svc
        .ca
        .sign_x509_user(
            &subject.name,
            &subject.kube_groups,
            &spki,
            valid_after,
            valid_before,
        )
        .map_err(|e| match e {
            crate::ca::CaError::X509(crate::x509::X509Error::BadField(f)) => invalid(f),
            other => internal("x509 user certificate", other),
        })?;
    Ok(UserCerts {
        user: subject.name.clone(),
        ssh_cert,
        x509_cert_pem,
        cas: svc.ca.bundle().clone(),
        logins: subject.logins.clone(),
        kube_groups: subject.kube_groups.clone(),
        kube_users: subject.kube_users.clone(),
        valid_before,
    })
}

/// SignUser: certificates for an existing user (optionally restricted to some of its
/// logins), or for a bot identity given explicit logins.
pub fn sign_user(svc: &Service, req: SignUserRequest, now: u64) -> Result<Response, RpcError> {
    check_name("user name", &req.user)?;
    if let Some(logins) = &req.logins {
        for l in logins {
            check_name("login", l)?;
        }
    }
    check_not_locked(svc, &req.user, now)?;
    let subject = match users::get(svc.store(), &req.user)? {
        Some(u) => {
            let mut s = Subject::from(&u);
            if let Some(want) = &req.logins {
                if let Some(l) = want.iter().find(|l| !u.logins.contains(l)) {
                    return Err(denied(format!(
                        "login {l} is not allowed for user {} (logins: {})",
                        u.name,
                        u.logins.join(",")
                    )));
                }
                s.logins = want.clone();
            }
            s
        }
        None => {
            let Some(logins) = req.logins.clone().filter(|l| !l.is_empty()) else {
                return Err(not_found(format!(
                    "user {} not found (to sign for a bot identity, name its logins)",
                    req.user
                )));
            };
            // Refuse a malformed key before remembering the bot.
            parse_ed25519_public(&req.ssh_public_key)
                .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
            users::record_bot(svc.store(), &req.user, &logins, now)?;
            let mut s = users::get_bot(svc.store(), &req.user)?
                .map(|b| Subject::from(&b))
                .ok_or_else(|| not_found(format!("user {} not found", req.user)))?;
            s.logins = logins;
            s
        }
    };
    let certs = issue(svc, &subject, &req.ssh_public_key, req.ttl_secs, now)?;
    tracing::info!(
        user = %subject.name,
        logins = %subject.logins.join(","),
        valid_before = certs.valid_before,
        "user certificates signed"
    );
    Ok(Response::UserCerts(certs))
}

/// Login: a password (or an invite code with a new password) for certificates.
/// The one-time code of an enrolled user (each code works once), or the enrollment of a user
/// who must have an app: its secret, proven by a code computed from it.
pub(crate) fn second_factor(
    svc: &Service,
    user: &users::UserRecord,
    req: &LoginRequest,
    now: u64,
) -> Result<(), RpcError> {
    use edgeport_proto::rpc::ErrorKind;
    use edgeport_proto::totp;
    let code = req.otp.as_deref().unwrap_or("");
    let (secret_b32, after) = match (&user.totp, &req.totp_enroll) {
        (Some(t), _) => {
            if code.is_empty() {
                return Err(RpcError::new(
                    ErrorKind::SecondFactorRequired,
                    "a one-time code from your authenticator app is required",
                ));
            }
            (t.secret.clone(), t.last_step)
        }
        (None, None) if !user.require_totp => return Ok(()),
        (None, None) => {
            return Err(RpcError::new(
                ErrorKind::SecondFactorEnroll,
                "this account needs a one-time password app: enroll one now",
            ))
        }
        (None, Some(new)) => {
            let bytes = totp::from_base32(new)
                .filter(|b| b.len() >= 16)
                .ok_or_else(|| {
                    invalid("the new one-time password secret is not base32 of 16 or more bytes")
                })?;
            (totp::base32(&bytes), 0)
        }
    };
    let secret = totp::from_base32(&secret_b32)
        .ok_or_else(|| internal("one-time password secret", "not base32"))?;
    let bad = || {
        RpcError::new(
            ErrorKind::BadCredentials,
            "wrong or already used one-time code",
        )
    };
    let step = totp::verify(&secret, code, now, after).ok_or_else(bad)?;
    // Spend the code: a concurrent login with the same code finds the step taken.
    crate::store::update::<users::UserRecord, RpcError, _>(
        svc.store(),
        crate::store::Table::Users,
        &user.name,
        |cur| {
            let mut u = cur.ok_or_else(bad)?;
            let last = u.totp.as_ref().map_or(0, |t| t.last_step);
            if u.totp.is_some() && u.totp.as_ref().map(|t| &t.secret) != Some(&secret_b32) {
                return Err(bad());
            }
            if step <= last {
                return Err(bad());
            }
            u.totp = Some(users::TotpState {
                secret: secret_b32.clone(),
                last_step: step,
            });
            Ok(Some(u))
        },
    )?;
    if user.totp.is_none() {
        tracing::info!(user = %user.name, "one-time password app enrolled");
    }
    Ok(())
}

pub fn login(
    svc: &Service,
    gateway: &str,
    req: LoginRequest,
    now: u64,
) -> Result<Response, RpcError> {
    // Refuse a malformed key before spending an argon2 verification on it.
    parse_ed25519_public(&req.ssh_public_key)
        .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
    let user = check_credentials(svc, gateway, &req, now)?;
    let certs = issue(
        svc,
        &Subject::from(&user),
        &req.ssh_public_key,
        req.ttl_secs,
        now,
    )?;
    tracing::info!(
        user = %user.name,
        client = %req.client_addr,
        gateway,
        valid_before = certs.valid_before,
        "login"
    );
    Ok(Response::UserCerts(certs))
}

/// The password (or invite) and second factor of a login, throttled per user and client,
/// and the lock check: the user record when all pass. Shared by tsh and web console logins.
pub fn check_credentials(
    svc: &Service,
    gateway: &str,
    req: &LoginRequest,
    now: u64,
) -> Result<users::UserRecord, RpcError> {
    if let Err(wait) = svc
        .logins
        .check(svc.store(), gateway, &req.user, &req.client_addr, now)?
    {
        tracing::info!(user = %req.user, client = %req.client_addr, gateway, wait,
            "login refused: too many failed attempts");
        return Err(crate::errors::denied(format!(
            "too many failed logins; try again in {wait}s"
        )));
    }
    // The secret first, then the second factor, and only then any change (a new password, an
    // invite spent): a stolen password alone must not be able to change the password.
    let checked =
        users::check_secret(svc.store(), &req.user, &req.secret, now).and_then(|(u, invite)| {
            if invite && req.new_password.is_none() {
                return Err(invalid(
                    "this is an invite code: choose a password (new_password) to accept it",
                ));
            }
            second_factor(svc, &u, req, now)?;
            match req.new_password.as_deref() {
                None => Ok(u),
                new => users::authenticate(svc.store(), &req.user, &req.secret, new, now),
            }
        });
    let user = match checked {
        Ok(u) => u,
        Err(e) => {
            if e.kind == edgeport_proto::rpc::ErrorKind::BadCredentials {
                if let Err(err) =
                    svc.logins
                        .failed(svc.store(), gateway, &req.user, &req.client_addr, now)
                {
                    tracing::warn!(user = %req.user, %err, "cannot record a failed login");
                }
            }
            tracing::info!(
                user = %req.user,
                client = %req.client_addr,
                gateway,
                "login refused: {}",
                e.message
            );
            return Err(e);
        }
    };
    if let Err(err) = svc
        .logins
        .succeeded(svc.store(), gateway, &user.name, &req.client_addr)
    {
        tracing::warn!(user = %user.name, %err, "cannot clear failed logins");
    }
    check_not_locked(svc, &user.name, now)?;
    Ok(user)
}
