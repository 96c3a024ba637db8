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
pub fn list(svc: &Service, user: Option<&str>, now: u64) -> Result<Response, RpcError> {
    let store = svc.store();
    let all = targets::list(store, &devices::list(store, now)?)?;
    let Some(user) = user else {
        return Ok(Response::Targets(all));
    };
    let subject =
        users::subject(store, user)?.ok_or_else(|| not_found(format!("user {user} not found")))?;
    let grants = roles::grants(store, &subject.roles)?;
    Ok(Response::Targets(
        all.into_iter()
            .filter(|t| grants.allows_device(&t.labels))
            .collect(),
    ))
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
