//! AuthorizeDial: the gateway asks before it splices a user stream to a device. Who the user is
//! comes from the certificate they presented, checked here, never from the gateway; the answer
//! carries a signed ticket for that one dial (see `edgeport_proto::ticket`).

use edgeport_proto::identity::Principal;
use edgeport_proto::keys::random_bytes;
use edgeport_proto::rpc::{DialGrant, LockTarget, Response, RpcError};
use edgeport_proto::ticket::{DialTicket, TicketClaims, TICKET_TTL_SECS};
use edgeport_proto::tunnel::Service;

use crate::errors::{denied, internal, locked, not_found};
use crate::handlers::user_certs::check_not_locked;
use crate::service::Service as Svc;
use crate::{devices, gateways, locks, roles, targets, users};

/// The user a gateway-relayed certificate names, once the authority has checked it: this
/// cluster's CA, the validity window, a user principal, and a user record no younger than the
/// certificate (a removed user's certificate does not pass for a later user of the name).
pub fn certified_user(svc: &Svc, cert_der: &[u8], now: u64) -> Result<users::Subject, RpcError> {
    let (principal, not_before) = edgeport_proto::tls::verify_client_cert(
        cert_der,
        &svc.ca().x509_ca_der(),
        svc.cluster(),
        now,
    )
    .map_err(|e| denied(format!("the user's certificate does not count: {e}")))?;
    let Principal::User(user) = principal else {
        return Err(denied(format!(
            "the certificate names {principal}, not a user"
        )));
    };
    let subject = users::subject(svc.store(), &user)?
        .ok_or_else(|| not_found(format!("user {user} not found")))?;
    // Certificates carry notBefore a minute early (clock skew); a record made after that
    // belongs to someone else.
    if not_before.saturating_add(120) < subject.created {
        return Err(denied(format!(
            "the certificate of {user} was issued before this user {user} was created"
        )));
    }
    Ok(subject)
}

pub fn authorize_dial(
    svc: &Svc,
    gateway: &str,
    cert_der: &[u8],
    device: &str,
    service: Service,
    now: u64,
) -> Result<Response, RpcError> {
    if service == Service::Update {
        return Err(denied(
            "agent updates come from the authority, not from a user's dial",
        ));
    }
    let store = svc.store();
    let subject = certified_user(svc, cert_der, now)?;
    let user = subject.name.clone();
    check_not_locked(svc, &user, now)?;
    if devices::revoked(store, device)?.is_some() {
        return Err(denied(format!("device {device} was removed")));
    }
    let info = devices::lookup(store, device, now)?
        .ok_or_else(|| not_found(format!("device {device} not found")))?;
    if let Some(l) = locks::find(store, &LockTarget::Device(info.id.clone()), now)? {
        return Err(locked(locks::locked_message(&l)));
    }
    if !info.online {
        return Err(not_found(format!("device {device} is offline")));
    }
    let names = crate::access_requests::dial_roles(store, &subject, cert_der, now)?;
    // A target behind the device (relay mode) is matched by the device's labels plus its
    // own other keys (`labels_of`), as its device last reported it in its signed audit log.
    let (what, labels) = match &service {
        Service::Target(name) => {
            let t = targets::find(store, &info, name)?.ok_or_else(|| {
                not_found(format!(
                    "device {device} has no target {name:?} (not in its last targets report)"
                ))
            })?;
            (format!("target {}", t.address()), t.labels)
        }
        _ => (format!("device {device}"), info.labels.clone()),
    };
    let grants = roles::grants(store, &names)?;
    if !grants.allows_device(&labels) {
        return Err(denied(format!(
            "the roles of user {user} ({}) do not allow {what}",
            grants.extension.roles.join(",")
        )));
    }
    match &service {
        // A target behind the device counts by its own labels and needs a second factor
        // given for it (`tsh ssh DEVICE/TARGET` asks for one naming the target; the
        // certificate names the device, whose agent relays).
        Service::Ssh => {
            crate::session_mfa::check_dial(svc, &grants, &user, &info.id, &labels, now)?
        }
        Service::Target(name) => {
            let target = format!("{}/{name}", info.id);
            crate::session_mfa::check_dial(svc, &grants, &user, &target, &labels, now)?
        }
        // kubectl has no way to give a per-session code: a role that asks for one keeps
        // its devices' Kubernetes closed rather than open with the login's certificate
        // alone (which is all a stolen laptop needs).
        Service::Kube if grants.requires_session_mfa(&labels) => {
            return Err(RpcError::new(
                edgeport_proto::rpc::ErrorKind::SecondFactorRequired,
                format!(
                    "{}: kubectl cannot give one, so this device's Kubernetes API is closed to roles with --require-session-mfa",
                    crate::session_mfa::REQUIRED
                ),
            ));
        }
        _ => {}
    }
    let gateway_addr = match &info.gateway {
        Some(g) => gateways::peer_addr(store, g)?,
        None => None,
    };
    let id = random_bytes(16)
        .map(hex::encode)
        .map_err(|e| internal("a ticket id", e))?;
    let claims = TicketClaims {
        id,
        cluster: svc.cluster().to_string(),
        user: user.clone(),
        device: info.id.clone(),
        service,
        logins: subject.logins.clone(),
        kube_groups: subject.kube_groups.clone(),
        kube_users: subject.kube_users.clone(),
        requester: gateway.to_string(),
        holder: info.gateway.clone(),
        issued_at: now,
        expires_at: now + TICKET_TTL_SECS,
    };
    let ticket = DialTicket::issue(&claims, |m| svc.ca().sign_dial_ticket(m));
    Ok(Response::DialAllowed(DialGrant {
        gateway_addr,
        device: info,
        logins: subject.logins,
        kube_groups: subject.kube_groups,
        kube_users: subject.kube_users,
        ticket: Some(ticket),
        user,
    }))
}
