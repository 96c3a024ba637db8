//! Requests about hosts behind devices (issue 22): `SignHost` (a host certificate for
//! `DEVICE/TARGET`, `tctl auth sign --host`) and `TargetList` (`tsh ls`, `tctl devices ls`).

use edgeport_proto::keys::parse_ed25519_public;
use edgeport_proto::rpc::{Response, RpcError};

use crate::ca::BACKDATE_SECS;
use crate::errors::{internal, invalid, not_found};
use crate::service::Service;
use crate::{devices, roles, targets, users};

/// The longest a host certificate from `SignHost` may be valid (ten years).
const MAX_HOST_TTL_SECS: u64 = 10 * 365 * 86_400;

/// Whether `name` may be a host certificate's principal: a device or `DEVICE/TARGET`
/// (letters, digits, `-`, `_`, `.`, one `/`).
fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.matches('/').count() <= 1
        && !name.starts_with(['/', '.', '-'])
        && !name.ends_with('/')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// A host certificate for `name` (principals `name` and `name.CLUSTER`) on the Ed25519 key
/// `ssh_public_key`, for a legacy host's sshd (`HostCertificate`).
pub fn sign_host(
    svc: &Service,
    name: &str,
    ssh_public_key: &str,
    ttl_secs: u64,
    now: u64,
) -> Result<Response, RpcError> {
    if !valid_host_name(name) {
        return Err(invalid(format!(
            "host name {name:?}: use DEVICE/TARGET (letters, digits, '-', '_', '.')"
        )));
    }
    if ttl_secs == 0 || ttl_secs > MAX_HOST_TTL_SECS {
        return Err(invalid(format!(
            "ttl {ttl_secs}s: give 1 s to {MAX_HOST_TTL_SECS} s"
        )));
    }
    let (key, _) = parse_ed25519_public(ssh_public_key).map_err(|e| {
        invalid(format!(
            "the public key: {e} (give the host's Ed25519 key, ssh_host_ed25519_key.pub)"
        ))
    })?;
    let valid_before = now.saturating_add(ttl_secs);
    let cert = svc
        .ca()
        .sign_ssh_host(name, &key, now.saturating_sub(BACKDATE_SECS), valid_before)
        .map_err(|e| internal("a host certificate", e))?;
    tracing::info!(host = %name, "host certificate signed");
    Ok(Response::HostCert { cert, valid_before })
}

/// Every target (admin), or those `user`'s roles reach (a gateway asking for `tsh ls`).
pub fn list(
    svc: &Service,
    caller: &crate::service::Caller,
    user_cert_der: Option<&[u8]>,
    now: u64,
) -> Result<Response, RpcError> {
    use crate::service::Caller;
    let store = svc.store();
    let Some(der) = user_cert_der else {
        if !matches!(caller, Caller::Admin(_)) {
            return Err(crate::errors::denied(
                "a gateway lists targets only for the certificate of the user who asks",
            ));
        }
        return Ok(Response::Targets(targets::list(
            store,
            &devices::list(store, now)?,
        )?));
    };
    let subject = crate::handlers::dial::certified_user(svc, der, now)?;
    let names = crate::access_requests::dial_roles(store, &subject, der, now)?;
    let grants = roles::grants(store, &names)?;
    let all = targets::list(store, &devices::list(store, now)?)?;
    Ok(Response::Targets(
        all.into_iter()
            .filter(|t| grants.allows_device(&t.labels))
            .collect(),
    ))
}

/// How long a per-session target certificate lives: enough for the device to log in.
pub const TARGET_CERT_TTL_SECS: u64 = 120;

/// `Request::TargetCert` (record mode, issue 22): a device asks for a certificate to log in
/// as `login` to its target on behalf of the user it just authenticated. Believed only when
/// the device signed it (its host certificate, from the host CA, naming the device whose
/// tunnel carried it) and the user's certificate is from the user CA, valid, names `login`,
/// the user is not locked, the device not removed or locked, and the user's roles (as they
/// are now) allow `login` and the target's labels (from the device's signed report). The
/// certificate is for the device's fresh key, principal `login` only, two minutes. Audited.
pub fn target_cert(
    svc: &Service,
    gateway: &str,
    device_id: &str,
    req: &edgeport_proto::targets::TargetCertRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let mut who = String::new();
    let result = sign_target_cert(svc, device_id, req, now, &mut who);
    let kind = match &result {
        Ok(_) => "target_cert.issued",
        Err(_) => "target_cert.refused",
    };
    let mut ev = edgeport_proto::audit::AuditEvent::new(kind, now.saturating_mul(1000));
    ev.user = who.clone();
    ev.login = req.login.clone();
    ev.session_id = req.session_id.clone();
    for (k, v) in [
        ("gateway", gateway),
        ("device", device_id),
        ("target", req.target.as_str()),
    ] {
        ev.fields.insert(k.into(), v.to_string());
    }
    if let Err(e) = &result {
        ev.fields.insert("error".into(), e.message.clone());
        tracing::info!(user = %who, device = %device_id, target = %req.target,
            "per-session target certificate refused: {}", e.message);
    }
    crate::audit::record_own(svc, ev, device_id);
    result
}

fn sign_target_cert(
    svc: &Service,
    device_id: &str,
    req: &edgeport_proto::targets::TargetCertRequest,
    now: u64,
    who: &mut String,
) -> Result<Response, RpcError> {
    use crate::errors::{denied, locked};
    use edgeport_proto::rpc::LockTarget;
    let store = svc.store();
    let cas = svc.ca().bundle();
    req.verify(&cas.host_cas(), device_id, now)
        .map_err(|e| denied(format!("the device's request does not count: {e}")))?;
    let cert = russh::keys::ssh_key::Certificate::from_openssh(req.user_cert.trim())
        .map_err(|e| invalid(format!("the user's certificate: {e}")))?;
    let user_cas = cas.user_cas();
    let ca = edgeport_proto::sshcert::signer_of(&cert, &user_cas)
        .ok_or_else(|| denied("the user's certificate is not from this cluster's user CA"))?;
    let grant = edgeport_proto::sshcert::check_user_cert(&cert, ca, &req.login, now)
        .map_err(|e| denied(format!("the user's certificate does not count: {e}")))?;
    *who = grant.user.clone();
    let user = grant.user.clone();
    crate::handlers::user_certs::check_not_locked(svc, &user, now)?;
    let subject =
        users::subject(store, &user)?.ok_or_else(|| not_found(format!("user {user} not found")))?;
    if cert.valid_after().saturating_add(120) < subject.created {
        return Err(denied(format!(
            "the certificate of {user} was issued before this user {user} was created"
        )));
    }
    if devices::revoked(store, device_id)?.is_some() {
        return Err(denied(format!("device {device_id} was removed")));
    }
    let info = devices::lookup(store, device_id, now)?
        .ok_or_else(|| not_found(format!("device {device_id} not found")))?;
    if let Some(l) = crate::locks::find(store, &LockTarget::Device(info.id.clone()), now)? {
        return Err(locked(crate::locks::locked_message(&l)));
    }
    let t = targets::find(store, &info, &req.target)?.ok_or_else(|| {
        not_found(format!(
            "device {device_id} has no target {:?} (not in its last targets report)",
            req.target
        ))
    })?;
    let grants = roles::grants(store, &subject.roles)?;
    if !grants.allows_device(&t.labels) {
        return Err(denied(format!(
            "the roles of user {user} ({}) do not allow target {}",
            grants.extension.roles.join(","),
            t.address()
        )));
    }
    if !subject.logins.iter().any(|l| l == &req.login) {
        return Err(denied(format!(
            "the roles of user {user} do not allow login {:?}",
            req.login
        )));
    }
    let (key, _) = parse_ed25519_public(&req.public_key)
        .map_err(|e| invalid(format!("the session key: {e}")))?;
    let valid_before = now.saturating_add(TARGET_CERT_TTL_SECS);
    let principals = vec![req.login.clone()];
    // Only the one login, no agent forwarding (record mode does not relay it), and no
    // second-factor binding: the user's own certificate passed that check on the device.
    let cert = crate::handlers::user_certs::sign_ssh(
        svc,
        &subject,
        &grants,
        &key,
        &principals,
        (now.saturating_sub(BACKDATE_SECS), valid_before),
        String::new(),
        false,
    )?;
    tracing::info!(user = %user, device = %device_id, target = %req.target, login = %req.login,
        "per-session target certificate signed");
    Ok(Response::TargetCert { cert, valid_before })
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_names() {
        assert!(super::valid_host_name("van-42/ecu1"));
        assert!(super::valid_host_name("legacy.example"));
        assert!(!super::valid_host_name("a/b/c"));
        assert!(!super::valid_host_name("/ecu1"));
        assert!(!super::valid_host_name("van 42"));
    }
}
