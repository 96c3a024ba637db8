//! Agent updates (`tctl devices update`): tctl uploads the binary in pieces, the authority
//! signs a manifest (SHA-256, size, devices, expiry) with the host CA key and keeps the order;
//! gateways fetch the orders and the binary and deliver both to the devices they hold, then
//! report what each agent answered. Whether an installed update came back online on the new
//! binary, or rolled back, is read from the device's presence (its version carries the short
//! hash of its running binary). Orders and uploads live in memory: an authority restart
//! forgets updates in flight (tctl says so; run it again).

use std::collections::BTreeMap;
use std::sync::Mutex;

use edgeport_proto::audit::AuditEvent;
use edgeport_proto::keys::{random_bytes, sha256_hex};
use edgeport_proto::rpc::{Response, RpcError};
use edgeport_proto::update::{
    split_version, DeviceUpdate, Manifest, SignedManifest, UpdateInfo, UpdateOrder, UpdateSpec,
    MAX_BINARY, SHORT_HASH,
};

use crate::errors::{internal, invalid, not_found};
use crate::service::Service;

/// How long a signed manifest is good for.
const MANIFEST_TTL_SECS: u64 = 3600;
/// The largest piece in one `UpdateFetch` answer (a frame holds 64 KiB).
pub const CHUNK: usize = 60_000;
/// Uploaded binaries kept at once (the newest).
const KEEP_UPLOADS: usize = 2;
/// Orders kept for `UpdateStatus` (the newest).
const KEEP_ORDERS: usize = 32;
/// After the rollback deadline, how long a device may still look online on its old binary
/// before that counts as a rollback (presence reports trail the tunnel by a moment).
const SETTLE_SECS: u64 = 5;

struct Order {
    manifest: Manifest,
    signed: SignedManifest,
    states: BTreeMap<String, (String, String, u64)>,
}

#[derive(Default)]
struct Inner {
    uploads: Vec<(String, Vec<u8>)>,
    orders: Vec<Order>,
}

#[derive(Default)]
pub struct Updates {
    inner: Mutex<Inner>,
}

impl Updates {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn upload(
    svc: &Service,
    sha256: String,
    offset: u64,
    data: Vec<u8>,
) -> Result<Response, RpcError> {
    let mut g = svc.updates.lock();
    if offset == 0 {
        g.uploads.retain(|(h, _)| h != &sha256);
        g.uploads.push((sha256.clone(), Vec::new()));
        let excess = g.uploads.len().saturating_sub(KEEP_UPLOADS);
        g.uploads.drain(..excess);
    }
    let Some((_, buf)) = g.uploads.iter_mut().find(|(h, _)| h == &sha256) else {
        return Err(invalid(
            "no upload of this binary in progress (start at offset 0)",
        ));
    };
    if buf.len() as u64 != offset {
        return Err(invalid(format!(
            "upload out of order: have {} bytes, got a piece at {offset}",
            buf.len()
        )));
    }
    if offset + data.len() as u64 > MAX_BINARY {
        return Err(invalid(format!(
            "an agent binary is at most {MAX_BINARY} bytes"
        )));
    }
    buf.extend_from_slice(&data);
    Ok(Response::Ok)
}

pub fn start(svc: &Service, admin: &str, spec: UpdateSpec, now: u64) -> Result<Response, RpcError> {
    if spec.devices.is_empty() {
        return Err(invalid("no devices to update"));
    }
    let id = random_bytes(8)
        .map(hex::encode)
        .map_err(|e| internal("an update id", e))?;
    let mut g = svc.updates.lock();
    let size = match g.uploads.iter().find(|(h, _)| h == &spec.sha256) {
        Some((_, buf)) if sha256_hex(buf) == spec.sha256 => buf.len() as u64,
        Some(_) => {
            return Err(invalid(
                "the uploaded binary does not match its SHA-256; upload it again",
            ))
        }
        None => return Err(not_found("no uploaded binary with this SHA-256")),
    };
    let manifest = Manifest {
        id: id.clone(),
        cluster: svc.cluster().to_string(),
        sha256: spec.sha256.clone(),
        size,
        devices: spec.devices.clone(),
        labels: spec.labels.clone(),
        rollback_secs: spec.rollback_secs.max(1),
        issued_at: now,
        expires_at: now + MANIFEST_TTL_SECS,
    };
    let signed = SignedManifest::issue(&manifest, |b| svc.ca().sign_dial_ticket(b));
    let states = spec
        .devices
        .iter()
        .map(|d| (d.clone(), ("pending".to_string(), String::new(), 0)))
        .collect();
    g.orders.push(Order {
        manifest,
        signed,
        states,
    });
    let excess = g.orders.len().saturating_sub(KEEP_ORDERS);
    g.orders.drain(..excess);
    drop(g);
    tracing::info!(update = %id, %admin, devices = spec.devices.len(), sha256 = %spec.sha256, "agent update started");
    status(svc, &id, now)
}

/// Where the update stands, with installed devices checked against their presence.
pub fn status(svc: &Service, id: &str, now: u64) -> Result<Response, RpcError> {
    let mut events = Vec::new();
    let info = {
        let mut g = svc.updates.lock();
        let Some(o) = g.orders.iter_mut().find(|o| o.manifest.id == id) else {
            return Err(not_found(format!(
                "no update {id} (an authority restart forgets updates in flight)"
            )));
        };
        let short: String = o.manifest.sha256.chars().take(SHORT_HASH).collect();
        for (dev, (state, detail, at)) in o.states.iter_mut() {
            if state != "installed" {
                continue;
            }
            let Some(info) = crate::devices::lookup(svc.store(), dev, now)? else {
                continue;
            };
            if !info.online {
                continue;
            }
            let running = split_version(&info.version).1.unwrap_or("").to_string();
            if running == short {
                *state = "done".into();
                *detail = format!("online on sha.{short}");
            } else if now > *at + o.manifest.rollback_secs + SETTLE_SECS {
                *state = "rolled_back".into();
                *detail = format!(
                    "not online within {}s; back on sha.{running}",
                    o.manifest.rollback_secs
                );
            } else {
                continue;
            }
            events.push((dev.clone(), state.clone(), detail.clone()));
        }
        info_of(o)
    };
    for (dev, state, detail) in events {
        let mut ev = AuditEvent::new("agent.update_result", now * 1000);
        ev.fields.insert("update".into(), id.to_string());
        ev.fields.insert("state".into(), state);
        ev.fields.insert("detail".into(), detail);
        ev.fields.insert("sha256".into(), info.sha256.clone());
        crate::audit::record_own(svc, ev, &dev);
    }
    Ok(Response::Update(info))
}

fn info_of(o: &Order) -> UpdateInfo {
    UpdateInfo {
        id: o.manifest.id.clone(),
        sha256: o.manifest.sha256.clone(),
        size: o.manifest.size,
        devices: o
            .states
            .iter()
            .map(|(d, (state, detail, _))| DeviceUpdate {
                device: d.clone(),
                state: state.clone(),
                detail: detail.clone(),
            })
            .collect(),
    }
}

/// Orders with devices still waiting (and not expired).
pub fn orders(svc: &Service, now: u64) -> Response {
    let g = svc.updates.lock();
    let list = g
        .orders
        .iter()
        .filter(|o| o.manifest.expires_at > now)
        .filter_map(|o| {
            let pending: Vec<String> = o
                .states
                .iter()
                .filter(|(_, (s, _, _))| s == "pending")
                .map(|(d, _)| d.clone())
                .collect();
            (!pending.is_empty()).then(|| UpdateOrder {
                id: o.manifest.id.clone(),
                sha256: o.manifest.sha256.clone(),
                size: o.manifest.size,
                signed: o.signed.clone(),
                pending,
            })
        })
        .collect();
    Response::UpdateOrders(list)
}

pub fn fetch(svc: &Service, sha256: &str, offset: u64) -> Result<Response, RpcError> {
    let g = svc.updates.lock();
    let Some((_, buf)) = g.uploads.iter().find(|(h, _)| h == sha256) else {
        return Err(not_found("no uploaded binary with this SHA-256"));
    };
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(buf.len());
    let to = from.saturating_add(CHUNK).min(buf.len());
    Ok(Response::UpdateChunk(buf[from..to].to_vec()))
}

pub fn report(
    svc: &Service,
    gateway: &str,
    id: &str,
    device: &str,
    accepted: bool,
    message: String,
    now: u64,
) -> Result<Response, RpcError> {
    let mut g = svc.updates.lock();
    let Some(o) = g.orders.iter_mut().find(|o| o.manifest.id == id) else {
        return Err(not_found(format!("no update {id}")));
    };
    let Some(st) = o.states.get_mut(device) else {
        return Err(invalid(format!("update {id} is not for device {device}")));
    };
    if st.0 != "pending" {
        return Ok(Response::Ok);
    }
    *st = if accepted {
        ("installed".into(), format!("installed via {gateway}"), now)
    } else {
        ("refused".into(), message, now)
    };
    Ok(Response::Ok)
}
