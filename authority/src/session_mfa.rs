//! Per-session second factor (issue 29): roles with `require_session_mfa` make every session
//! to the devices they allow need a fresh one-time code. tsh signs a request (the code, the
//! device and a key it made for this one session) with the key of the user's certificate; a
//! gateway relays it (`Request::SessionMfaCert`) and can neither make nor replay one. The
//! authority checks the signature, the certificate and the code (each code works once), and
//! signs an SSH certificate for the fresh key that opens that one device for a minute: its
//! roles extension names the device (`mfa_device`), which agents check.
//!
//! The authority enforces it too: `AuthorizeDial` refuses an SSH dial to such a device, or to a
//! target behind it whose labels need it (a relay-mode target's own sshd knows nothing of the
//! binding), unless a certificate of this kind was issued to the user for the device within
//! its lifetime (kept in the store, so several authorities share it), and agents refuse a
//! certificate without the device binding (or bound to another device) whenever its roles say
//! the device, or the record-mode target, needs it.

use std::collections::BTreeMap;

use edgeport_proto::audit::AuditEvent;
use edgeport_proto::keys::parse_ed25519_public;
use edgeport_proto::rpc::{
    AccessAction, ErrorKind, LoginRequest, Response, RpcError, SessionMfaAsk, SessionMfaCert,
    SignedUserAction,
};

use crate::errors::{denied, invalid, not_found};
use crate::handlers::user_certs::{check_not_locked, NO_LOGIN_PRINCIPAL};
use crate::service::Service;
use crate::store::{self, Table};
use crate::users::Subject;
use crate::{devices, roles, targets, users};

/// How long a per-session certificate lives.
pub const SESSION_MFA_TTL_SECS: u64 = 60;
/// How far back its validity starts (clock skew between the authority and devices).
const BACKDATE_SECS: u64 = 30;

/// The first words of every refusal for want of the second factor.
pub const REQUIRED: &str = "this device requires a per-session second factor";

/// Where an issuance is remembered, for `AuthorizeDial` (the access requests table keeps
/// `r/` requests and `n/` nonces; `mfa/` stays apart from both).
fn record_key(user: &str, device: &str) -> String {
    format!("mfa/{user}/{device}")
}

/// `Request::SessionMfaCert`: checks everything, signs, remembers and audits (refusals too).
pub fn issue(
    svc: &Service,
    gateway: &str,
    signed: &SignedUserAction,
    now: u64,
) -> Result<Response, RpcError> {
    let mut who = String::new();
    let mut device = String::new();
    let result =
        crate::handlers::user_action::verify(svc, signed, now).and_then(|(subject, action)| {
            who = subject.name.clone();
            let AccessAction::SessionMfa(ask) = action.action else {
                return Err(invalid(
                    "this signed action is not a per-session second factor request",
                ));
            };
            device = ask.device.clone();
            check_not_locked(svc, &subject.name, now)?;
            sign(svc, &subject, &signed.user_cert_der, &ask, now)
        });
    let kind = match &result {
        Ok(_) => "session_mfa.issued",
        Err(_) => "session_mfa.refused",
    };
    let mut ev = AuditEvent::new(kind, now.saturating_mul(1000));
    ev.user = who.clone();
    ev.fields.insert("gateway".into(), gateway.to_string());
    if let Some((_, target)) = edgeport_proto::targets::split(&device) {
        ev.fields.insert("target".into(), target.to_string());
    }
    let device_id = match &result {
        Ok(c) => {
            ev.fields
                .insert("valid_before".into(), c.valid_before.to_string());
            c.device.clone()
        }
        Err(e) => {
            ev.fields.insert("error".into(), e.message.clone());
            device
        }
    };
    ev.fields.insert("device".into(), device_id.clone());
    crate::audit::record_own(svc, ev, &device_id);
    if let Ok(c) = &result {
        tracing::info!(
            user = %who,
            device = %c.device,
            valid_before = c.valid_before,
            "per-session second factor certificate signed"
        );
    }
    result.map(Response::SessionMfaCert)
}

fn sign(
    svc: &Service,
    subject: &Subject,
    cert_der: &[u8],
    ask: &SessionMfaAsk,
    now: u64,
) -> Result<SessionMfaCert, RpcError> {
    let store = svc.store();
    let (key, _) = parse_ed25519_public(&ask.ssh_public_key)
        .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
    // `DEVICE/TARGET` asks for a host behind the device: the roles must allow the target by
    // its own labels, and the certificate names the device, whose agent relays to it.
    let (device, target) = match edgeport_proto::targets::split(&ask.device) {
        Some((device, target)) => (device, Some(target)),
        None => (ask.device.as_str(), None),
    };
    if devices::revoked(store, device)?.is_some() {
        return Err(denied(format!("device {device} was removed")));
    }
    let info = devices::lookup(store, device, now)?
        .ok_or_else(|| not_found(format!("device {device} not found")))?;
    let (what, labels) = match target {
        Some(name) => {
            let t = targets::find(store, &info, name)?.ok_or_else(|| {
                not_found(format!(
                    "device {device} has no target {name:?} (not in its last targets report)"
                ))
            })?;
            (format!("target {}", t.address()), t.labels)
        }
        None => (format!("device {}", info.id), info.labels.clone()),
    };
    let names = crate::access_requests::dial_roles(store, subject, cert_der, now)?;
    let grants = roles::grants(store, &names)?;
    if !grants.allows_device(&labels) {
        return Err(denied(format!(
            "the roles of user {} ({}) do not allow {what}",
            subject.name,
            grants.extension.roles.join(","),
        )));
    }
    // The one-time code, spent like a login's (a code works once).
    let user = users::get(store, &subject.name)?
        .ok_or_else(|| not_found(format!("user {} not found", subject.name)))?;
    if user.totp.is_none() {
        return Err(denied(format!(
            "{REQUIRED}, and user {} has no authenticator app enrolled: an administrator runs \
             `tctl users update {} --require-totp`, then log in again to enroll one",
            subject.name, subject.name
        )));
    }
    if ask.otp.trim().is_empty() {
        return Err(RpcError::new(
            ErrorKind::SecondFactorRequired,
            format!("{REQUIRED}: give the code from your authenticator app"),
        ));
    }
    let login = LoginRequest {
        otp: Some(ask.otp.trim().to_string()),
        ..LoginRequest::default()
    };
    crate::handlers::user_certs::second_factor(svc, &user, &login, now)
        .map_err(|e| RpcError::new(e.kind, format!("per-session second factor: {}", e.message)))?;
    let valid_before = now + SESSION_MFA_TTL_SECS;
    let principals = if subject.logins.is_empty() {
        vec![NO_LOGIN_PRINCIPAL.to_string()]
    } else {
        subject.logins.clone()
    };
    let ssh_cert = crate::handlers::user_certs::sign_ssh(
        svc,
        subject,
        &grants,
        &key,
        &principals,
        (now.saturating_sub(BACKDATE_SECS), valid_before),
        info.id.clone(),
        grants.permit_agent_forwarding,
    )?;
    // A target's code opens that target only (and the device's own sessions need theirs).
    let opened = match target {
        Some(name) => format!("{}/{name}", info.id),
        None => info.id.clone(),
    };
    store::put(
        store,
        Table::AccessRequests,
        &record_key(&subject.name, &opened),
        &valid_before,
    )?;
    Ok(SessionMfaCert {
        device: info.id,
        ssh_cert,
        valid_before,
    })
}

/// For `AuthorizeDial`: refuses an SSH dial by `user` to `device` (an id, or `ID/TARGET` for a
/// host behind it) with `labels` when the roles `grants` require a second factor for it and
/// none was given for exactly that device or target within a certificate's lifetime.
pub fn check_dial(
    svc: &Service,
    grants: &roles::Grants,
    user: &str,
    device: &str,
    labels: &BTreeMap<String, String>,
    now: u64,
) -> Result<(), RpcError> {
    if !grants.requires_session_mfa(labels) {
        return Ok(());
    }
    let until: Option<u64> = store::get(
        svc.store(),
        Table::AccessRequests,
        &record_key(user, device),
    )?;
    match until {
        Some(t) if now <= t => Ok(()),
        _ => Err(RpcError::new(
            ErrorKind::SecondFactorRequired,
            format!(
                "{REQUIRED}: `tsh ssh` asks for the code from your authenticator app (or give \
                 --mfa-code; `tsh proxy ssh` too)"
            ),
        )),
    }
}
