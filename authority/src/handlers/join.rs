//! Joins and renewals (DESIGN §3, Join): gateways join with a gateway token (no identity
//! yet), devices join through a gateway with a device token, and both renew with the
//! identity they were given.

use std::net::IpAddr;

use edgeport_proto::keys::{parse_ed25519_public, random_bytes};
use edgeport_proto::rpc::{
    DeviceCerts, GatewayCerts, JoinDeviceRequest, JoinGatewayRequest, RenewDeviceRequest,
    RenewGatewayRequest, Response, RpcError, TokenKind,
};
use edgeport_proto::util::valid_name;

use crate::ca::{CaError, BACKDATE_SECS, MACHINE_CERT_TTL_SECS};
use crate::devices::{self, DeviceRecord};
use crate::errors::{denied, exists, internal, invalid, not_found};
use crate::gateways::{self, GatewayRecord};
use crate::service::Service;
use crate::tokens::{self, check_labels};
use crate::users::check_name;
use crate::x509::{check_spki, valid_dns_name};

/// How many extra names a gateway certificate may carry.
const MAX_GATEWAY_NAMES: usize = 32;
/// Bounds on what a device reports about itself.
const MAX_LABELS: usize = 64;
const MAX_INFO_LEN: usize = 128;

fn cert_error(what: &str, e: CaError) -> RpcError {
    match e {
        CaError::X509(crate::x509::X509Error::BadField(f))
        | CaError::X509(crate::x509::X509Error::BadPublicKey(f)) => invalid(f),
        CaError::Key(k) => invalid(format!("public key: {k}")),
        other => internal(what, other),
    }
}

/// `PREFIX-` and 8 random hex digits.
fn random_id(prefix: &str) -> Result<String, RpcError> {
    let b = random_bytes(4).map_err(|e| internal("random id", e))?;
    Ok(format!("{prefix}-{}", hex::encode(b)))
}

fn check_gateway_names(dns: &[String], ips: &[String]) -> Result<Vec<IpAddr>, RpcError> {
    if dns.len() + ips.len() > MAX_GATEWAY_NAMES {
        return Err(invalid(format!(
            "a gateway certificate carries at most {MAX_GATEWAY_NAMES} names"
        )));
    }
    if let Some(d) = dns.iter().find(|d| !valid_dns_name(d)) {
        return Err(invalid(format!("invalid DNS name {d:?}")));
    }
    ips.iter()
        .map(|s| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| invalid(format!("invalid IP address {s:?}")))
        })
        .collect()
}

fn sign_gateway(
    svc: &Service,
    id: &str,
    spki: &[u8],
    dns: &[String],
    ips: &[IpAddr],
    now: u64,
) -> Result<GatewayCerts, RpcError> {
    let valid_before = now + MACHINE_CERT_TTL_SECS;
    let pem = svc
        .ca
        .sign_x509_gateway(
            id,
            spki,
            dns,
            ips,
            now.saturating_sub(BACKDATE_SECS),
            valid_before,
        )
        .map_err(|e| cert_error("gateway certificate", e))?;
    Ok(GatewayCerts {
        gateway_id: id.to_string(),
        x509_cert_pem: pem,
        cas: svc.ca.bundle().clone(),
        valid_before,
    })
}

/// JoinGateway: a gateway token buys a gateway certificate.
pub fn join_gateway(
    svc: &Service,
    req: JoinGatewayRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    tokens::check(store, &req.token, TokenKind::Gateway, now)?;
    let id = match &req.gateway_id {
        Some(id) => {
            check_name("gateway id", id)?;
            id.clone()
        }
        None => random_id("gw")?,
    };
    // A name belongs to the gateway that joined under it: a token cannot take over a live
    // gateway's identity, and a revoked name stays revoked.
    match gateways::get(store, &id)? {
        Some(g) if g.revoked => {
            return Err(denied(format!(
                "gateway {id} was revoked; join a new gateway under another name"
            )))
        }
        Some(_) => {
            return Err(exists(format!(
                "a gateway named {id} already joined; join under another name (or let the \
                 authority pick one), or revoke it first with tctl gateways rm {id}"
            )))
        }
        None => {}
    }
    check_spki(&req.public_key_spki_der).map_err(|e| invalid(e.to_string()))?;
    let ips = check_gateway_names(&req.dns_names, &req.ip_addrs)?;
    let token = tokens::redeem(store, &req.token, TokenKind::Gateway, now)?;
    let certs = sign_gateway(
        svc,
        &id,
        &req.public_key_spki_der,
        &req.dns_names,
        &ips,
        now,
    )?;
    gateways::record_join(
        store,
        &GatewayRecord {
            id: id.clone(),
            joined_at: now,
            renewed_at: now,
            token_id: token.id.clone(),
            dns_names: req.dns_names.clone(),
            ip_addrs: req.ip_addrs.clone(),
            revoked: false,
            peer_addr: None,
            revoked_at: 0,
            version: String::new(),
        },
    )?;
    tracing::info!(gateway = %id, token = %token.id, "gateway joined");
    Ok(Response::GatewayCerts(certs))
}

/// RenewGateway: a fresh certificate for the calling gateway.
pub fn renew_gateway(
    svc: &Service,
    gateway: &str,
    req: RenewGatewayRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let rec = gateways::get(svc.store(), gateway)?
        .ok_or_else(|| not_found(format!("gateway {gateway} is not known to this authority")))?;
    if rec.revoked {
        return Err(denied(format!("gateway {gateway} was revoked")));
    }
    check_spki(&req.public_key_spki_der).map_err(|e| invalid(e.to_string()))?;
    let ips = check_gateway_names(&req.dns_names, &req.ip_addrs)?;
    let certs = sign_gateway(
        svc,
        gateway,
        &req.public_key_spki_der,
        &req.dns_names,
        &ips,
        now,
    )?;
    gateways::record_renewal(svc.store(), gateway, &req.dns_names, &req.ip_addrs, now)?;
    tracing::info!(gateway, "gateway certificate renewed");
    Ok(Response::GatewayCerts(certs))
}

fn sign_device(
    svc: &Service,
    id: &str,
    ssh_public_key: &str,
    labels: &std::collections::BTreeMap<String, String>,
    now: u64,
) -> Result<DeviceCerts, RpcError> {
    let (key, spki) = parse_ed25519_public(ssh_public_key)
        .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
    let valid_after = now.saturating_sub(BACKDATE_SECS);
    let valid_before = now + MACHINE_CERT_TTL_SECS;
    let host_cert = svc
        .ca
        .sign_ssh_host(id, &key, valid_after, valid_before)
        .map_err(|e| cert_error("host certificate", e))?;
    let x509_cert_pem = svc
        .ca
        .sign_x509_device(id, &spki, valid_after, valid_before)
        .map_err(|e| cert_error("device certificate", e))?;
    Ok(DeviceCerts {
        device_id: id.to_string(),
        labels: labels.clone(),
        host_cert,
        x509_cert_pem,
        cas: svc.ca.bundle().clone(),
        valid_before,
    })
}

fn short(what: &str, s: &str) -> Result<String, RpcError> {
    if s.len() > MAX_INFO_LEN || s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must be at most {MAX_INFO_LEN} printable characters"
        )));
    }
    Ok(s.to_string())
}

/// JoinDevice: a device token (relayed by a gateway) buys a host certificate and a tunnel
/// certificate, and a place in the inventory.
pub fn join_device(
    svc: &Service,
    gateway: &str,
    req: JoinDeviceRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    // The token first, so that a bad token gets the precise message whatever else is wrong.
    tokens::check(store, &req.token, TokenKind::Device, now)?;
    parse_ed25519_public(&req.ssh_public_key)
        .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
    if req.labels.len() > MAX_LABELS {
        return Err(invalid(format!("a device has at most {MAX_LABELS} labels")));
    }
    check_labels(&req.labels)?;
    let version = short("version", &req.version)?;
    let arch = short("arch", &req.arch)?;
    let join_addr = short("remote address", &req.remote_addr)?;
    let id = match &req.requested_id {
        Some(id) if !id.is_empty() => {
            check_name("device id", id)?;
            id.clone()
        }
        _ => random_id("dev")?,
    };
    if devices::revoked(store, &id)?.is_some() {
        return Err(devices::revoked_error(&id));
    }
    let existing = devices::get(store, &id)?;
    if let Some(d) = &existing {
        if !devices::same_key(&d.ssh_public_key, &req.ssh_public_key) {
            return Err(crate::errors::exists(format!(
                "device id {id} is already taken by another device"
            )));
        }
    }
    let token = tokens::redeem(store, &req.token, TokenKind::Device, now)?;
    // Labels: the device's own, overridden by the token's. A device joining again under its
    // id keeps the labels it has: the join proves no hold of the device's key (which is
    // public), so a gateway relaying a token could otherwise rewrite another device's labels,
    // which roles decide access by. A new token's labels still override them.
    let mut labels = match &existing {
        Some(d) => d.labels.clone(),
        None => req.labels.clone(),
    };
    labels.extend(token.labels.clone());
    let record = devices::register(
        store,
        DeviceRecord {
            id: id.clone(),
            ssh_public_key: req.ssh_public_key.trim().to_string(),
            labels: labels.clone(),
            joined_at: now,
            renewed_at: now,
            version,
            arch,
            token_id: token.id.clone(),
            joined_via: gateway.to_string(),
            join_addr,
            // A device that joins again keeps the budget it had.
            data_budget: devices::get(store, &id)?.and_then(|d| d.data_budget),
            attested_ms: None,
        },
    )?;
    let certs = sign_device(svc, &id, &record.ssh_public_key, &record.labels, now)?;
    tracing::info!(
        device = %id,
        gateway,
        token = %token.id,
        from = %req.remote_addr,
        "device joined"
    );
    Ok(Response::DeviceCerts(certs))
}

/// RenewDevice: fresh certificates for a known, not removed device and the same key. The
/// certificates are public and bound to the recorded key, so they go to any gateway that
/// asks; the renewal is recorded (what a CA rotation counts as spread) only on the device's
/// own fresh signature naming the CA bundle served now ([`edgeport_proto::renew`]), never on
/// a gateway's word. A proof that does not verify is refused outright: the relaying gateway
/// made or changed it.
pub fn renew_device(
    svc: &Service,
    gateway: &str,
    req: RenewDeviceRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    if !valid_name(&req.device_id) {
        return Err(invalid(format!("invalid device id {:?}", req.device_id)));
    }
    if devices::revoked(store, &req.device_id)?.is_some() {
        return Err(devices::revoked_error(&req.device_id));
    }
    let dev = devices::get(store, &req.device_id)?
        .ok_or_else(|| not_found(format!("device {} not found", req.device_id)))?;
    if !devices::same_key(&dev.ssh_public_key, &req.ssh_public_key) {
        return Err(denied(format!(
            "device {} renews with a different key than it joined with",
            dev.id
        )));
    }
    let counted = match &req.proof {
        Some(proof) => proof
            .check(&dev.id, &dev.ssh_public_key, &svc.ca().bundle(), now)
            .map_err(|e| {
                // Only the relaying gateway makes or changes a proof on the way.
                tracing::warn!(device = %dev.id, gateway, "device renewal refused: {e}");
                denied(e.to_string())
            })?
            .map_err(|why| why.to_string()),
        None => Err(
            "it carries no proof from the device (an agent older than the proof, or \
                     the gateway's own request)"
                .to_string(),
        ),
    };
    let certs = sign_device(svc, &dev.id, &dev.ssh_public_key, &dev.labels, now)?;
    match counted {
        Ok(()) => {
            devices::record_renewal(store, &dev.id, now)?;
            svc.spread.renewed(&dev.id);
            tracing::info!(device = %dev.id, gateway, "device certificates renewed");
        }
        Err(why) => tracing::warn!(
            device = %dev.id,
            gateway,
            "device certificates signed but the renewal is not counted: {why}"
        ),
    }
    Ok(Response::DeviceCerts(certs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::keys::KeyPair;
    use edgeport_proto::renew::RenewProof;
    use edgeport_proto::rpc::Request;
    use std::sync::Arc;

    /// A gateway's word renews nothing: certificates for the recorded key go to whoever asks
    /// (they are public), but only the device's own fresh signature records a renewal, and a
    /// proof that does not verify is refused.
    #[test]
    fn only_the_devices_proof_records_a_renewal() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::SledStore::open(&tmp.path().join("s")).unwrap());
        let ca =
            crate::ca::CertAuthority::new("edge", crate::ca::CaKeys::generate("edge").unwrap())
                .unwrap();
        let svc = Service::new(store, Arc::new(ca), Default::default());
        let (dev, other) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let joined = 1_000_000;
        crate::store::put(
            svc.store(),
            crate::store::Table::Devices,
            "van",
            &devices::DeviceRecord {
                id: "van".into(),
                ssh_public_key: dev.public_openssh(),
                labels: Default::default(),
                joined_at: joined,
                renewed_at: joined,
                version: String::new(),
                arch: String::new(),
                token_id: String::new(),
                joined_via: String::new(),
                join_addr: String::new(),
                data_budget: None,
                attested_ms: None,
            },
        )
        .unwrap();
        let gw = crate::service::Caller::Gateway("gw-1".into());
        let renewed_at = || {
            devices::get(svc.store(), "van")
                .unwrap()
                .unwrap()
                .renewed_at
        };
        let renew = |proof: Option<RenewProof>, now: u64| {
            svc.handle_at(
                &gw,
                Request::RenewDevice(RenewDeviceRequest {
                    device_id: "van".into(),
                    ssh_public_key: dev.public_openssh(),
                    proof,
                }),
                now,
            )
        };
        let now = joined + 86_400;
        // No proof (an older agent, or a gateway on its own): certificates, no renewal.
        assert!(matches!(renew(None, now), Response::DeviceCerts(_)));
        assert_eq!(renewed_at(), joined);
        // Signed by another key or for another device: refused, with why.
        let cas = svc.ca().bundle();
        for (proof, why) in [
            (
                RenewProof::sign(&other, "van", &cas, now),
                "does not verify",
            ),
            (RenewProof::sign(&dev, "car", &cas, now), "does not verify"),
        ] {
            match renew(Some(proof), now) {
                Response::Error(e) => {
                    assert_eq!(e.kind, edgeport_proto::rpc::ErrorKind::Denied);
                    assert!(e.message.contains(why), "{e}");
                }
                other => panic!("a bad proof was taken: {other:?}"),
            }
        }
        assert_eq!(renewed_at(), joined);
        // The device's own, but long ago or under another bundle (a replay from before a
        // rotation): certificates, no renewal.
        let mut before = cas.clone();
        before.host_ca = other.public_openssh();
        for proof in [
            RenewProof::sign(&dev, "van", &cas, now - 3600),
            RenewProof::sign(&dev, "van", &before, now),
        ] {
            assert!(matches!(renew(Some(proof), now), Response::DeviceCerts(_)));
        }
        assert_eq!(renewed_at(), joined);
        assert!(!svc.spread.has_renewed("van"));
        // The device's own fresh signature under the bundle served now: recorded.
        let proof = RenewProof::sign(&dev, "van", &cas, now);
        assert!(matches!(renew(Some(proof), now), Response::DeviceCerts(_)));
        assert_eq!(renewed_at(), now);
        assert!(svc.spread.has_renewed("van"), "what rotations count");
    }
}
