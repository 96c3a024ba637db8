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
    {
        // A poisoned lock only means another report panicked half-way; the store is still
        // consistent record by record, so carry on.
        let mut snapshots = svc.presence.lock().unwrap_or_else(|p| p.into_inner());
        let snap = snapshots.entry(gateway.to_string()).or_default();
        devices::apply_part(svc.store(), gateway, report, snap, now)?;
    }
    if report.part == 0 {
        if let Some(addr) = &report.peer_addr {
            if !valid_peer_addr(addr) {
                return Err(invalid(format!("peer address {addr:?} is not HOST:PORT")));
            }
        }
        gateways::record_peer_addr(svc.store(), gateway, report.peer_addr.as_deref())?;
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

/// `HOST:PORT` (or `[V6]:PORT`) of a sane length, with a port that parses.
fn valid_peer_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    addr.len() <= 261
        && !host.is_empty()
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.[]:_".contains(c))
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_addresses() {
        for ok in ["10.0.0.7:4080", "gw-b.example.com:443", "[::1]:4080"] {
            assert!(super::valid_peer_addr(ok), "{ok}");
        }
        for bad in ["", "gw-b", ":4080", "gw:0", "gw:99999", "gw b:1", "gw:x"] {
            assert!(!super::valid_peer_addr(bad), "{bad}");
        }
    }
}
