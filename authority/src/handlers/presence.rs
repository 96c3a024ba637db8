//! Presence: a gateway's snapshot of its tunnels, answered with what it must enforce
//! (removed devices, locks, revoked gateways).
//!
//! What a gateway must enforce can outgrow one frame (thousands of locks with long messages,
//! thousands of removed devices). It never fails for that: the acknowledgement carries the
//! first part and `more`, and the gateway asks for the rest with `PresenceAckPart`. A gateway
//! that cannot get every part keeps what it had and tries again at the next report.

use edgeport_proto::frame::{chunk_within, LIST_BUDGET};
use edgeport_proto::rpc::{LockSpec, PresenceAck, PresenceReport, Response, RpcError};
use serde::Serialize;

use crate::errors::invalid;
use crate::service::Service;
use crate::{devices, gateways, locks};

/// The most devices one report may carry (a 64 KiB frame holds a few hundred anyway).
const MAX_REPORTED: usize = 100_000;

pub fn presence(
    svc: &Service,
    gateway: &str,
    report: &PresenceReport,
    now: u64,
) -> Result<Response, RpcError> {
    if report.online.len() + report.disconnected.len() > MAX_REPORTED {
        return Err(invalid("presence report too large"));
    }
    // A bad peer address costs only forwarding to this gateway, never the report: the
    // acknowledgement carries the locks the gateway must enforce.
    let peer_addr = report.peer_addr.as_deref().filter(|addr| {
        edgeport_proto::util::check_peer_addr(addr)
            .map_err(|e| tracing::warn!(gateway, "ignoring the gateway's {e}"))
            .is_ok()
    });
    let superseded = {
        // A poisoned lock only means another report panicked half-way; the store is still
        // consistent record by record, so carry on.
        let mut snapshots = svc.presence.lock().unwrap_or_else(|p| p.into_inner());
        let snap = snapshots.entry(gateway.to_string()).or_default();
        devices::apply_part(svc.store(), gateway, report, snap, now)?
    };
    if report.part == 0 {
        gateways::record_peer_addr(svc.store(), gateway, peer_addr)?;
        gateways::record_version(svc.store(), gateway, clip(&report.version))?;
        svc.gateway_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gateway.to_string(), now);
    }
    tracing::debug!(
        gateway,
        online = report.online.len(),
        disconnected = report.disconnected.len(),
        part = report.part,
        more = report.more,
        "presence"
    );
    let mut ack = enforcement_part(svc, 0, now)?;
    ack.superseded = fit(superseded);
    Ok(Response::PresenceAck(ack))
}

/// Part `part` of what gateways must enforce (`PresenceAckPart`), of the same lists as the
/// first part (`digest`): if they changed in between, the gateway must start again.
pub fn ack_part(svc: &Service, part: u32, digest: &str, now: u64) -> Result<Response, RpcError> {
    let ack = enforcement_part(svc, part, now)?;
    if ack.digest != digest {
        return Err(invalid(
            "the locks or revocations changed while they were being fetched; report again",
        ));
    }
    Ok(Response::PresenceAck(ack))
}

fn clip(version: &str) -> &str {
    let mut end = version.len().min(64);
    while !version.is_char_boundary(end) {
        end -= 1;
    }
    &version[..end]
}

/// Room kept in the first part for the tunnels this report's gateway must close.
const SUPERSEDED_BUDGET: usize = 16 * 1024;

/// As many superseded tunnels as fit in [`SUPERSEDED_BUDGET`]: the gateway reports the others
/// again, and they are answered then.
fn fit(mut superseded: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let mut size = 0;
    let keep = superseded
        .iter()
        .take_while(|(id, _)| {
            size += id.len() + 12;
            size <= SUPERSEDED_BUDGET
        })
        .count();
    superseded.truncate(keep);
    superseded
}

/// One entry of the lists a gateway enforces.
#[derive(Serialize)]
enum Enforce {
    Lock(LockSpec),
    RevokedDevice(String),
    RevokedGateway(String),
    OverBudget(String, u64),
}

/// Every list, split into parts that each fit in one frame (with room for `superseded`).
fn enforcement_part(svc: &Service, part: u32, now: u64) -> Result<PresenceAck, RpcError> {
    let store = svc.store();
    let mut all: Vec<Enforce> = Vec::new();
    all.extend(
        gateways_barred(svc, now)?
            .into_iter()
            .map(Enforce::RevokedGateway),
    );
    all.extend(locks::active(store, now)?.into_iter().map(Enforce::Lock));
    all.extend(
        devices::recently_revoked(store, now)?
            .into_iter()
            .map(Enforce::RevokedDevice),
    );
    all.extend(
        crate::usage::over_budget(store, now)?
            .into_iter()
            .map(|(d, b)| Enforce::OverBudget(d, b)),
    );
    let digest = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &postcard::to_stdvec(&all).unwrap_or_default(),
    ));
    let mut parts = chunk_within(all, LIST_BUDGET - SUPERSEDED_BUDGET);
    let n = parts.len() as u32;
    let Some(chosen) = parts.get_mut(part as usize) else {
        return Err(invalid(format!(
            "there is no part {part} (the lists have {n} now; start again with a report)"
        )));
    };
    let mut ack = PresenceAck {
        more: part + 1 < n,
        digest,
        ..Default::default()
    };
    for e in std::mem::take(chosen) {
        match e {
            Enforce::Lock(l) => ack.locks.push(l),
            Enforce::RevokedDevice(d) => ack.revoked_devices.push(d),
            Enforce::RevokedGateway(g) => ack.revoked_gateways.push(g),
            Enforce::OverBudget(d, b) => ack.over_budget.push((d, b)),
        }
    }
    Ok(ack)
}

fn gateways_barred(svc: &Service, now: u64) -> Result<Vec<String>, RpcError> {
    svc.standing.barred(svc.store(), now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::rpc::{LockTarget, Request};
    use std::sync::Arc;

    /// Locks cannot fail open: 1,000 locks with the longest message allowed and 10,000
    /// removed devices reach the gateway in parts that each fit in one frame.
    #[test]
    fn large_enforcement_lists_go_in_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::SledStore::open(&tmp.path().join("s")).unwrap());
        let ca =
            crate::ca::CertAuthority::new("edge", crate::ca::CaKeys::generate("edge").unwrap())
                .unwrap();
        let svc = Service::new(store, Arc::new(ca), Default::default());
        let now = 1_000_000;
        for i in 0..1000 {
            locks::add(
                svc.store(),
                &LockSpec {
                    target: LockTarget::User(format!("user-{i:04}")),
                    message: "m".repeat(512),
                    expires: 0,
                },
                now,
            )
            .unwrap();
        }
        for i in 0..10_000 {
            crate::store::put(
                svc.store(),
                crate::store::Table::Revoked,
                &format!("device-{i:05}"),
                &devices::RevokedRecord {
                    id: format!("device-{i:05}"),
                    revoked_at: now,
                    ssh_public_key: String::new(),
                },
            )
            .unwrap();
        }
        let gw = crate::service::Caller::Gateway("gw-1".into());
        let first = match svc.handle_at(&gw, Request::Presence(PresenceReport::default()), now) {
            Response::PresenceAck(a) => a,
            other => panic!("{other:?}"),
        };
        assert!(first.more);
        let (mut locks, mut removed) = (first.locks.len(), first.revoked_devices.len());
        let mut part = 1;
        loop {
            let resp = svc.handle_at(
                &gw,
                Request::PresenceAckPart {
                    part,
                    digest: first.digest.clone(),
                },
                now,
            );
            assert!(edgeport_proto::frame::encode(&resp).is_ok(), "part {part}");
            let Response::PresenceAck(a) = resp else {
                panic!("{resp:?}")
            };
            locks += a.locks.len();
            removed += a.revoked_devices.len();
            part += 1;
            if !a.more {
                break;
            }
        }
        assert_eq!((locks, removed), (1000, 10_000));
        assert!(part > 5, "{part} parts");
        // A part that does not exist is a clear error, not an empty list.
        let part = |part, digest: &str| {
            svc.handle_at(
                &gw,
                Request::PresenceAckPart {
                    part,
                    digest: digest.into(),
                },
                now,
            )
        };
        match part(10_000, &first.digest) {
            Response::Error(e) => assert!(e.message.contains("no part 10000"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Lists that changed between two parts are never taken together.
        locks::remove(svc.store(), &LockTarget::User("user-0000".into())).unwrap();
        match part(1, &first.digest) {
            Response::Error(e) => assert!(e.message.contains("changed"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
