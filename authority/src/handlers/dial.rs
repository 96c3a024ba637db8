//! AuthorizeDial: the gateway asks before it splices a user stream to a device.

use edgeport_proto::rpc::{DialGrant, LockTarget, Response, RpcError};

use crate::errors::{denied, locked, not_found};
use crate::handlers::user_certs::check_not_locked;
use crate::service::Service;
use crate::{devices, gateways, locks, roles, users};

pub fn authorize_dial(
    svc: &Service,
    user: &str,
    device: &str,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    let subject =
        users::subject(store, user)?.ok_or_else(|| not_found(format!("user {user} not found")))?;
    check_not_locked(svc, user, now)?;
    if devices::revoked(store, device)?.is_some() {
        return Err(denied(format!("device {device} was removed")));
    }
    let info = devices::lookup(store, device, now)?
        .ok_or_else(|| not_found(format!("device {device} not found")))?;
    if let Some(l) = locks::find(store, &LockTarget::Device(device.to_string()), now)? {
        return Err(locked(locks::locked_message(&l)));
    }
    if !info.online {
        return Err(not_found(format!("device {device} is offline")));
    }
    let grants = roles::grants(store, &subject.roles)?;
    if !grants.allows_device(&info.labels) {
        return Err(denied(format!(
            "the roles of user {user} ({}) do not allow device {device}",
            grants.extension.roles.join(",")
        )));
    }
    let gateway_addr = match &info.gateway {
        Some(g) => gateways::peer_addr(store, g)?,
        None => None,
    };
    Ok(Response::DialAllowed(DialGrant {
        gateway_addr,
        device: info,
        logins: subject.logins,
        kube_groups: subject.kube_groups,
        kube_users: subject.kube_users,
    }))
}
