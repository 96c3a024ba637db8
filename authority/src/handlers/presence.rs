//! Presence: a gateway's snapshot of its tunnels, answered with what it must enforce
//! (removed devices and locks).

use edgeport_proto::rpc::{PresenceAck, PresenceReport, Response, RpcError};

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
        superseded,
    }))
}
