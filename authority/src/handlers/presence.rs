//! Presence: a gateway's snapshot of its tunnels, answered with what it must enforce
//! (removed devices and locks).

use edgeport_proto::rpc::{PresenceAck, PresenceReport, Response, RpcError};

use crate::errors::invalid;
use crate::service::Service;
use crate::{devices, locks};

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
    {
        // A poisoned lock only means another report panicked half-way; the store is still
        // consistent record by record, so carry on.
        let mut snapshots = svc.presence.lock().unwrap_or_else(|p| p.into_inner());
        let snap = snapshots.entry(gateway.to_string()).or_default();
        devices::apply_part(svc.store(), gateway, report, snap, now)?;
    }
    tracing::debug!(
        gateway,
        online = report.online.len(),
        disconnected = report.disconnected.len(),
        part = report.part,
        more = report.more,
        "presence"
    );
    Ok(Response::PresenceAck(PresenceAck {
        revoked_devices: devices::recently_revoked(svc.store(), now)?,
        locks: locks::active(svc.store(), now)?,
    }))
}
