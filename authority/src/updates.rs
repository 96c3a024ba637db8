//! Agent updates (`tctl devices update`): tctl uploads the binary in pieces, the authority
//! signs a manifest (SHA-256, size, devices, deadline) with the host CA key and keeps the
//! order in its store (`Table::UpdateOrders`, the binary in `Table::UpdateBinaries`), so an
//! authority restart does not forget it; gateways fetch the orders and the binary and deliver
//! both to the devices they hold, then report what each agent answered. A device offline at
//! the time stays `pending` and gets the update when its tunnel comes up, until the deadline
//! (then `expired`); a delivery that broke off is retried. Whether an installed update came
//! back online on the new binary, or rolled back, is read from the device's presence (its
//! version carries the short hash of its running binary), whenever the order is read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use edgeport_proto::audit::AuditEvent;
use edgeport_proto::keys::{random_bytes, sha256_hex};
use edgeport_proto::rpc::{Response, RpcError};
use edgeport_proto::update::{
    split_version, DeviceUpdate, Manifest, SignedManifest, UpdateInfo, UpdateOrder, UpdateSpec,
    UpdateSummary, MAX_BINARY, SHORT_HASH,
};
use serde::{Deserialize, Serialize};

use crate::errors::{internal, invalid, not_found};
use crate::service::Service;
use crate::store::{self, Table};

/// How long a signed manifest is good for: devices offline until then end `expired`.
const MANIFEST_TTL_SECS: u64 = 3600;
/// The largest piece in one `UpdateFetch` answer (a frame holds 64 KiB).
pub const CHUNK: usize = 60_000;
/// Uploads in progress kept at once (the newest).
const KEEP_UPLOADS: usize = 2;
/// Finished orders kept for `UpdateStatus` and `UpdateList` (the newest); orders still
/// before their deadline are always kept.
const KEEP_ORDERS: usize = 32;
/// After the rollback deadline, how long a device may still look online on its old binary
/// before that counts as a rollback (presence reports trail the tunnel by a moment).
const SETTLE_SECS: u64 = 5;
/// Deliveries that broke off (the tunnel went away mid-transfer) before a device is `failed`.
const MAX_TRIES: u32 = 5;

fn order_key(id: &str) -> String {
    format!("o/{id}")
}

fn active_key(id: &str) -> String {
    format!("a/{id}")
}

/// One device's state in an order (see `proto::update::DeviceUpdate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeviceState {
    state: String,
    detail: String,
    /// When it was installed (for the rollback deadline).
    at: u64,
    /// Deliveries that broke off.
    #[serde(default)]
    tries: u32,
}

/// An update as stored (`Table::UpdateOrders` under `o/ID`; `a/ID` marks it active: devices
/// may still be waiting, so gateways' polls read only those).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OrderRecord {
    manifest: Manifest,
    signed: SignedManifest,
    devices: BTreeMap<String, DeviceState>,
}

#[derive(Default)]
struct Inner {
    /// Uploads in progress (a finished one is stored by `start`).
    uploads: Vec<(String, Vec<u8>)>,
    /// The binary gateways fetch now, read once from the store.
    cache: Option<(String, Arc<Vec<u8>>)>,
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

/// Moves a finished upload into the store (once); its size.
fn store_binary(svc: &Service, sha256: &str) -> Result<u64, RpcError> {
    let upload = {
        let mut g = svc.updates.lock();
        let at = g.uploads.iter().position(|(h, _)| h == sha256);
        at.map(|i| g.uploads.remove(i).1)
    };
    match upload {
        Some(buf) if sha256_hex(&buf) == sha256 => {
            let size = buf.len() as u64;
            svc.store().put(Table::UpdateBinaries, sha256, buf)?;
            Ok(size)
        }
        Some(_) => Err(invalid(
            "the uploaded binary does not match its SHA-256; upload it again",
        )),
        // Uploaded for an earlier wave of the same rollout.
        None => match svc.store().get(Table::UpdateBinaries, sha256)? {
            Some(buf) => Ok(buf.len() as u64),
            None => Err(not_found("no uploaded binary with this SHA-256")),
        },
    }
}

pub fn start(svc: &Service, admin: &str, spec: UpdateSpec, now: u64) -> Result<Response, RpcError> {
    if spec.devices.is_empty() {
        return Err(invalid("no devices to update"));
    }
    let id = random_bytes(8)
        .map(hex::encode)
        .map_err(|e| internal("an update id", e))?;
    let size = store_binary(svc, &spec.sha256)?;
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
    let devices = spec
        .devices
        .iter()
        .map(|d| {
            let st = DeviceState {
                state: "pending".into(),
                detail: String::new(),
                at: 0,
                tries: 0,
            };
            (d.clone(), st)
        })
        .collect();
    let rec = OrderRecord {
        manifest,
        signed,
        devices,
    };
    store::put(svc.store(), Table::UpdateOrders, &order_key(&id), &rec)?;
    store::put(svc.store(), Table::UpdateOrders, &active_key(&id), &true)?;
    svc.store().flush()?;
    if let Err(e) = prune(svc, now) {
        tracing::warn!("cannot drop old agent updates: {}", e.message);
    }
    tracing::info!(update = %id, %admin, devices = spec.devices.len(), sha256 = %spec.sha256, "agent update started");
    status(svc, &id, now)
}

/// Drops the oldest finished orders past [`KEEP_ORDERS`], and their binaries once no kept
/// order needs them.
fn prune(svc: &Service, now: u64) -> Result<(), RpcError> {
    let mut all = store::list::<OrderRecord>(svc.store(), Table::UpdateOrders, "o/")?;
    all.sort_by_key(|(_, o)| std::cmp::Reverse(o.manifest.issued_at));
    let (keep, drop): (Vec<_>, Vec<_>) = all
        .into_iter()
        .enumerate()
        .partition(|(i, (_, o))| *i < KEEP_ORDERS || o.manifest.expires_at > now);
    for (_, (id, o)) in drop {
        svc.store().delete(Table::UpdateOrders, &id)?;
        svc.store()
            .delete(Table::UpdateOrders, &active_key(&o.manifest.id))?;
        if !keep
            .iter()
            .any(|(_, (_, k))| k.manifest.sha256 == o.manifest.sha256)
        {
            svc.store()
                .delete(Table::UpdateBinaries, &o.manifest.sha256)?;
        }
    }
    Ok(())
}

/// Settles `o` at `now`: installed devices against their presence, devices still waiting
/// past the deadline. The changes, for the audit log.
fn settle(
    svc: &Service,
    o: &mut OrderRecord,
    now: u64,
) -> Result<Vec<(String, String, String)>, RpcError> {
    let mut events = Vec::new();
    let short: String = o.manifest.sha256.chars().take(SHORT_HASH).collect();
    for (dev, st) in o.devices.iter_mut() {
        if st.state == "pending" && now > o.manifest.expires_at {
            st.state = "expired".into();
            st.detail = "not delivered before the update's deadline (device offline)".into();
            events.push((dev.clone(), st.state.clone(), st.detail.clone()));
            continue;
        }
        if st.state != "installed" {
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
            st.state = "done".into();
            st.detail = format!("online on sha.{short}");
        } else if now > st.at + o.manifest.rollback_secs + SETTLE_SECS {
            st.state = "rolled_back".into();
            st.detail = format!(
                "not online within {}s; back on sha.{running}",
                o.manifest.rollback_secs
            );
        } else {
            continue;
        }
        events.push((dev.clone(), st.state.clone(), st.detail.clone()));
    }
    Ok(events)
}

/// The stored order `id`, settled (and written back, audited, if that changed it).
fn settled(svc: &Service, id: &str, now: u64) -> Result<Option<OrderRecord>, RpcError> {
    let key = order_key(id);
    let Some(mut o) = store::get::<OrderRecord>(svc.store(), Table::UpdateOrders, &key)? else {
        return Ok(None);
    };
    if settle(svc, &mut o, now)?.is_empty() {
        return Ok(Some(o));
    }
    let mut events = Vec::new();
    let o =
        store::update::<OrderRecord, RpcError, _>(svc.store(), Table::UpdateOrders, &key, |cur| {
            let Some(mut cur) = cur else { return Ok(None) };
            events = settle(svc, &mut cur, now)?;
            Ok(Some(cur))
        })?;
    if let Some(o) = &o {
        for (dev, state, detail) in events {
            let mut ev = AuditEvent::new("agent.update_result", now * 1000);
            ev.fields.insert("update".into(), id.to_string());
            ev.fields.insert("state".into(), state);
            ev.fields.insert("detail".into(), detail);
            ev.fields.insert("sha256".into(), o.manifest.sha256.clone());
            crate::audit::record_own(svc, ev, &dev);
        }
    }
    Ok(o)
}

/// Where the update stands, with installed devices checked against their presence.
pub fn status(svc: &Service, id: &str, now: u64) -> Result<Response, RpcError> {
    match settled(svc, id, now)? {
        Some(o) => Ok(Response::Update(info_of(&o))),
        None => Err(not_found(format!("no update {id}"))),
    }
}

/// Every kept update, newest first, settled.
pub fn list(svc: &Service, now: u64) -> Result<Response, RpcError> {
    let ids: Vec<String> = store::list::<OrderRecord>(svc.store(), Table::UpdateOrders, "o/")?
        .into_iter()
        .map(|(_, o)| o.manifest.id)
        .collect();
    let mut out = Vec::new();
    for id in ids {
        if let Some(o) = settled(svc, &id, now)? {
            out.push(UpdateSummary {
                info: info_of(&o),
                labels: o.manifest.labels.clone(),
                rollback_secs: o.manifest.rollback_secs,
                issued_at: o.manifest.issued_at,
                expires_at: o.manifest.expires_at,
            });
        }
    }
    out.sort_by(|a, b| (b.issued_at, &b.info.id).cmp(&(a.issued_at, &a.info.id)));
    Ok(Response::UpdateList(out))
}

fn info_of(o: &OrderRecord) -> UpdateInfo {
    UpdateInfo {
        id: o.manifest.id.clone(),
        sha256: o.manifest.sha256.clone(),
        size: o.manifest.size,
        devices: o
            .devices
            .iter()
            .map(|(d, st)| DeviceUpdate {
                device: d.clone(),
                state: st.state.clone(),
                detail: st.detail.clone(),
            })
            .collect(),
    }
}

/// Orders with devices still waiting (and not expired). Reading them also settles the
/// kept orders, so results are recorded even when no tctl is watching.
pub fn orders(svc: &Service, now: u64) -> Result<Response, RpcError> {
    let mut list = Vec::new();
    for (key, _) in store::list::<bool>(svc.store(), Table::UpdateOrders, "a/")? {
        let id = key.trim_start_matches("a/");
        let Some(o) = settled(svc, id, now)? else {
            svc.store().delete(Table::UpdateOrders, &key)?;
            continue;
        };
        let pending: Vec<String> = o
            .devices
            .iter()
            .filter(|(_, st)| st.state == "pending")
            .map(|(d, _)| d.clone())
            .collect();
        let installed = o.devices.values().any(|st| st.state == "installed");
        // Installed devices are settled here for an hour past the deadline; later, only
        // when the update is read (`--status`).
        let watched = installed && now <= o.manifest.expires_at + MANIFEST_TTL_SECS;
        if pending.is_empty() && !watched {
            svc.store().delete(Table::UpdateOrders, &key)?;
        }
        if o.manifest.expires_at > now && !pending.is_empty() {
            list.push(UpdateOrder {
                id: o.manifest.id.clone(),
                sha256: o.manifest.sha256.clone(),
                size: o.manifest.size,
                signed: o.signed.clone(),
                pending,
            });
        }
    }
    Ok(Response::UpdateOrders(list))
}

pub fn fetch(svc: &Service, sha256: &str, offset: u64) -> Result<Response, RpcError> {
    let cached = {
        let g = svc.updates.lock();
        g.cache
            .as_ref()
            .filter(|(h, _)| h == sha256)
            .map(|(_, b)| b.clone())
    };
    let buf = match cached {
        Some(b) => b,
        None => {
            let Some(b) = svc.store().get(Table::UpdateBinaries, sha256)? else {
                return Err(not_found("no uploaded binary with this SHA-256"));
            };
            let b = Arc::new(b);
            svc.updates.lock().cache = Some((sha256.to_string(), b.clone()));
            b
        }
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
    // Only the gateway that holds the device's tunnel delivered the update: another one
    // (a compromised gateway, which cannot speak for a device it does not hold) could
    // otherwise mark a fleet's security update refused or installed.
    let holder = crate::devices::lookup(svc.store(), device, now)?.and_then(|d| d.gateway);
    if holder.as_deref() != Some(gateway) {
        return Err(crate::errors::denied(format!(
            "gateway {gateway} does not hold device {device}: only the gateway that delivered an update reports on it"
        )));
    }
    store::update::<OrderRecord, RpcError, _>(
        svc.store(),
        Table::UpdateOrders,
        &order_key(id),
        |cur| {
            let Some(mut o) = cur else {
                return Err(not_found(format!("no update {id}")));
            };
            let Some(st) = o.devices.get_mut(device) else {
                return Err(invalid(format!("update {id} is not for device {device}")));
            };
            if st.state != "pending" {
                return Ok(Some(o));
            }
            if accepted {
                st.state = "installed".into();
                st.detail = format!("installed via {gateway}");
                st.at = now;
            } else if message.starts_with("delivery ") {
                // The gateway could not hand it over (the tunnel went away): try again.
                st.tries += 1;
                st.detail = format!("try {} of {MAX_TRIES}: {message}", st.tries);
                if st.tries >= MAX_TRIES {
                    st.state = "failed".into();
                }
            } else {
                st.state = "refused".into();
                st.detail = message.clone();
            }
            Ok(Some(o))
        },
    )?;
    Ok(Response::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(svc: &Service, id: &str, now: u64) -> BTreeMap<String, String> {
        let Ok(Response::Update(info)) = status(svc, id, now) else {
            panic!("no update {id}");
        };
        info.devices
            .into_iter()
            .map(|d| (d.device, d.state))
            .collect()
    }

    /// Devices joined and held by gateway `gw`, as its presence report says.
    fn held_by_gw(svc: &Service, ids: &[&str], now: u64) {
        use edgeport_proto::rpc::{DevicePresence, PresenceReport, Transport};
        for id in ids {
            crate::tests::join_device(svc, id, now);
        }
        let online = ids
            .iter()
            .map(|id| DevicePresence {
                id: id.to_string(),
                labels: BTreeMap::new(),
                version: "1".into(),
                arch: "aarch64".into(),
                transport: Transport::Quic,
                address: "198.51.100.1:2".into(),
                rtt_ms: 1,
                connected_at: now,
                kube_cluster: None,
                loss_permille: None,
                usage: None,
                proof: None,
            })
            .collect();
        let report = PresenceReport {
            lease_secs: 600,
            online,
            ..Default::default()
        };
        crate::devices::apply_report(svc.store(), "gw", &report, now).unwrap();
    }

    #[test]
    fn broken_deliveries_are_retried_and_devices_offline_past_the_deadline_expire() {
        let (_tmp, svc) = crate::tests::service();
        held_by_gw(&svc, &["a", "b", "z"], 1000);
        let bin = b"an agent binary".to_vec();
        let sha = sha256_hex(&bin);
        upload(&svc, sha.clone(), 0, bin.clone()).unwrap();
        let spec = UpdateSpec {
            sha256: sha.clone(),
            devices: vec!["a".into(), "b".into(), "c".into()],
            labels: BTreeMap::new(),
            rollback_secs: 60,
        };
        let Response::Update(info) = start(&svc, "admin", spec.clone(), 1000).unwrap() else {
            panic!("not an update");
        };
        let id = info.id;
        // The binary now lives in the store, not in memory.
        assert!(svc.updates.lock().uploads.is_empty());
        let Response::UpdateChunk(c) = fetch(&svc, &sha, 0).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!(c, bin);
        // A second wave of the same binary needs no new upload.
        assert!(start(&svc, "admin", spec, 1000).is_ok());

        // a: the delivery broke off; retried until MAX_TRIES, then failed.
        for i in 1..=MAX_TRIES {
            report(
                &svc,
                "gw",
                &id,
                "a",
                false,
                "delivery failed: closed".into(),
                1001,
            )
            .unwrap();
            let want = if i < MAX_TRIES { "pending" } else { "failed" };
            assert_eq!(states(&svc, &id, 1001)["a"], want, "try {i}");
        }
        // b: the agent refused it: final at once.
        report(&svc, "gw", &id, "b", false, "bad signature".into(), 1001).unwrap();
        assert_eq!(states(&svc, &id, 1001)["b"], "refused");
        // A device the update is not for.
        assert!(report(&svc, "gw", &id, "z", true, String::new(), 1001).is_err());
        // A gateway that does not hold the device: refused, and nothing changes.
        let e = report(&svc, "gw-rogue", &id, "c", false, "bad".into(), 1001).unwrap_err();
        assert!(e.message.contains("does not hold device c"), "{e}");
        assert_eq!(states(&svc, &id, 1001)["c"], "pending");

        // Only c is still delivered, until the deadline; then it expired.
        let Ok(Response::UpdateOrders(o)) = orders(&svc, 1002) else {
            panic!("no orders");
        };
        let mine: Vec<&UpdateOrder> = o.iter().filter(|o| o.id == id).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].pending, ["c"]);
        let late = 1000 + MANIFEST_TTL_SECS + 1;
        let Ok(Response::UpdateOrders(o)) = orders(&svc, late) else {
            panic!("no orders");
        };
        assert!(o.is_empty(), "{o:?}");
        // Nothing left to deliver: gateways' polls no longer read it.
        let active = svc
            .store()
            .get(Table::UpdateOrders, &active_key(&id))
            .unwrap();
        assert!(active.is_none());
        assert_eq!(states(&svc, &id, late)["c"], "expired");
        let Ok(Response::UpdateList(list)) = list(&svc, late) else {
            panic!("no list");
        };
        assert_eq!(list.len(), 2);
        assert!(list
            .iter()
            .any(|u| u.info.id == id && u.expires_at == 1000 + MANIFEST_TTL_SECS));
    }
}
