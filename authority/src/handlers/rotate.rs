//! `CaRotate` (`tctl auth rotate`): one step of an SSH CA's rotation, answered with where
//! every CA stands and how far the change has spread (gateways that fetched the current
//! bundle, online devices renewed under the current host CA).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use edgeport_proto::rpc::{CaKind, CaRotateRequest, CaRotation, Response, RotateAction, RpcError};

use crate::ca::RotationFailed;
use crate::errors::{internal, invalid};
use crate::service::Service;

/// A gateway counts towards the total if it reported within this long.
const GATEWAY_RECENT_SECS: u64 = 120;

/// Who has seen which bundle generation (kept in memory: a restarted authority starts
/// counting again; the gateways fetch the bundle again within a presence interval).
#[derive(Default)]
pub struct Spread {
    /// Gateway id -> the bundle generation it last fetched.
    fetched: Mutex<HashMap<String, u64>>,
    /// Devices renewed since the host CA last changed.
    renewed: Mutex<HashSet<String>>,
}

impl Spread {
    pub fn fetched(&self, gateway: &str, generation: u64) {
        if let Ok(mut f) = self.fetched.lock() {
            f.insert(gateway.to_string(), generation);
        }
    }

    pub fn renewed(&self, device: &str) {
        if let Ok(mut r) = self.renewed.lock() {
            r.insert(device.to_string());
        }
    }

    #[cfg(test)]
    pub fn has_renewed(&self, device: &str) -> bool {
        self.renewed.lock().is_ok_and(|r| r.contains(device))
    }

    fn host_changed(&self) {
        if let Ok(mut r) = self.renewed.lock() {
            r.clear();
        }
    }
}

pub fn rotate(svc: &Service, req: CaRotateRequest, now: u64) -> Result<Response, RpcError> {
    if req.action != RotateAction::Status {
        crate::authorities::check_rotation(svc, now)?;
    }
    let before = svc.ca().rotations();
    match svc.ca().rotate(req.kind, &req.action, now) {
        Ok(()) => {}
        Err(RotationFailed::Refused(e)) => return Err(invalid(e.to_string())),
        Err(e) => return Err(internal("CA rotation", e)),
    }
    if req.action != RotateAction::Status {
        let after = svc.ca().rotations();
        let phase = after
            .iter()
            .find(|r| r.kind == req.kind)
            .map(|r| r.phase.clone())
            .unwrap_or_default();
        tracing::info!(ca = req.kind.as_str(), %phase, "CA rotation: phase changed");
        // The other authorities compare their keys with this (tctl status, signing).
        crate::authorities::rotated(svc, now)?;
        if let Some((path, addr)) = svc.admin_identity.get() {
            if let Err(e) = crate::admin_identity::ensure(svc.ca(), path, addr) {
                tracing::warn!("cannot refresh the administrator identity: {e}");
            }
        }
        // Devices renew when the host CA or the x509 CA that issues changes.
        let signers = |v: &[CaRotation]| {
            v.iter()
                .filter(|r| r.kind != CaKind::User)
                .map(|r| r.signing.clone())
                .collect::<Vec<_>>()
        };
        if signers(&before) != signers(&after) {
            svc.spread.host_changed();
        } else if req.action == RotateAction::Rollback {
            // Rolled back in init: the signing CAs never changed, nothing is to renew.
            for d in crate::devices::list(svc.store(), now)? {
                svc.spread.renewed(&d.id);
            }
        }
    }
    Ok(Response::CaRotations(status(svc, now)?))
}

/// Every CA's rotation with the spread counters filled in.
pub fn status(svc: &Service, now: u64) -> Result<Vec<CaRotation>, RpcError> {
    let generation = svc.ca().generation();
    let recent: Vec<String> = svc
        .gateway_reports
        .lock()
        .map(|g| {
            g.iter()
                .filter(|(_, at)| now.saturating_sub(**at) <= GATEWAY_RECENT_SECS)
                .map(|(id, _)| id.clone())
                .collect()
        })
        .unwrap_or_default();
    let current = svc
        .spread
        .fetched
        .lock()
        .map(|f| {
            recent
                .iter()
                .filter(|g| f.get(*g) == Some(&generation))
                .count()
        })
        .unwrap_or_default();
    let online: Vec<String> = crate::devices::list(svc.store(), now)?
        .into_iter()
        .filter(|d| d.online)
        .map(|d| d.id)
        .collect();
    let renewed = svc
        .spread
        .renewed
        .lock()
        .map(|r| online.iter().filter(|d| r.contains(*d)).count())
        .unwrap_or_default();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let mut all = svc.ca().rotations();
    for r in &mut all {
        r.gateways_current = count(current);
        r.gateways_total = count(recent.len());
        r.devices_online = count(online.len());
        r.devices_renewed = if r.kind != CaKind::User {
            count(renewed)
        } else {
            0
        };
    }
    Ok(all)
}
