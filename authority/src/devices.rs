//! The device inventory and presence.
//!
//! Inventory: what joined (id, key, labels, when), and which ids were removed (revoked ids
//! stay refused). Presence: each gateway reports a full snapshot of the tunnels it holds with
//! a lease; a device is online while the lease of the last report that included it has not
//! expired. So a gateway that dies takes its devices offline when its lease runs out, with no
//! cleanup. A device that moves to another gateway shows up in that one's report, with its
//! signed attestation of the new tunnel (`edgeport_proto::attest`): once a device has
//! attested a tunnel, only an attestation at least as new as the newest seen names its
//! holder (see [`apply_part`]).

use std::collections::{BTreeMap, BTreeSet};

use edgeport_proto::rpc::{DeviceInfo, DevicePresence, PresenceReport, RpcError, Transport};
use russh::keys::ssh_key::PublicKey;
use serde::{Deserialize, Serialize};

use crate::errors::{exists, not_found};
use crate::store::{self, Store, Table};

/// Removed devices are announced to gateways for this long (longer than any device
/// certificate lives), and refused for ever.
pub const REVOCATION_ANNOUNCE_SECS: u64 = 31 * 86400;
/// The longest lease a gateway may ask for.
pub const MAX_LEASE_SECS: u64 = 3600;
/// Text fields reported by gateways are cut to this length.
const MAX_FIELD_LEN: usize = 256;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    /// OpenSSH public key line (Ed25519): host key, tunnel key and audit key.
    pub ssh_public_key: String,
    pub labels: BTreeMap<String, String>,
    pub joined_at: u64,
    pub renewed_at: u64,
    pub version: String,
    pub arch: String,
    pub token_id: String,
    /// The gateway that relayed the join, and the address the device joined from.
    pub joined_via: String,
    pub join_addr: String,
    /// Monthly data budget in bytes (`tctl devices set --data-budget`); none by default.
    #[serde(default)]
    pub data_budget: Option<u64>,
    /// The stamp of the newest tunnel attestation the device gave (`edgeport_proto::attest`),
    /// `None` until its first: from then on only a gateway showing an attestation at least
    /// this new is taken as its holder (an older one, replayed by a gateway that once held
    /// the device, counts for nothing, lease or no lease).
    #[serde(default)]
    pub attested_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevokedRecord {
    pub id: String,
    pub revoked_at: u64,
    pub ssh_public_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub gateway: String,
    /// Online while `now < lease_expires`.
    pub lease_expires: u64,
    pub transport: Transport,
    pub address: String,
    pub rtt_ms: u32,
    pub version: String,
    pub arch: String,
    pub labels: BTreeMap<String, String>,
    pub kube_cluster: Option<String>,
    pub connected_at: u64,
    pub last_seen: u64,
    pub last_disconnect_reason: Option<String>,
    #[serde(default)]
    pub loss_permille: Option<u32>,
    /// When the device's IP address changed (not just its port), the last 24 hours' worth.
    #[serde(default)]
    pub address_changes: Vec<u64>,
    /// The stamp of the attestation of this tunnel, if the gateway showed one.
    #[serde(default)]
    pub proven_ms: Option<u64>,
    /// Its signature, so that the same attestation in the next report is not verified again.
    #[serde(default)]
    pub proof_sig: Vec<u8>,
}

/// What a gateway said last, to tell which devices it dropped since.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GatewayReport {
    pub devices: Vec<String>,
    /// When each tunnel came up, by the gateway's clock: the same value in the next report
    /// means the same tunnel, still claimed (see [`apply_part`]).
    #[serde(default)]
    pub connected: BTreeMap<String, u64>,
    pub reported_at: u64,
    pub lease_expires: u64,
}

/// Whether two OpenSSH public key lines hold the same key (comments aside).
pub fn same_key(a: &str, b: &str) -> bool {
    match (
        PublicKey::from_openssh(a.trim()),
        PublicKey::from_openssh(b.trim()),
    ) {
        (Ok(a), Ok(b)) => a.key_data() == b.key_data(),
        _ => false,
    }
}

pub fn get(store: &dyn Store, id: &str) -> Result<Option<DeviceRecord>, RpcError> {
    Ok(store::get(store, Table::Devices, id)?)
}

/// Sets or clears a device's monthly data budget, and whether it is past it now.
pub fn set_budget(
    store: &dyn Store,
    id: &str,
    budget: Option<u64>,
    now: u64,
) -> Result<(), RpcError> {
    let updated = store::update::<DeviceRecord, RpcError, _>(store, Table::Devices, id, |old| {
        let mut dev = old.ok_or_else(|| not_found(format!("no device {id}")))?;
        dev.data_budget = budget;
        Ok(Some(dev))
    })?;
    if updated.is_some() {
        crate::usage::refresh_over_budget(store, id, budget, now)?;
    }
    Ok(())
}

pub fn revoked(store: &dyn Store, id: &str) -> Result<Option<RevokedRecord>, RpcError> {
    Ok(store::get(store, Table::Revoked, id)?)
}

/// The refusal for a removed device id.
pub fn revoked_error(id: &str) -> RpcError {
    edgeport_proto::rpc::RpcError::new(
        edgeport_proto::rpc::ErrorKind::Denied,
        format!("device {id} was removed; it cannot join or renew under this id again"),
    )
}

/// Records a join: a new id, or the same device (same key) joining again. Another key under
/// a taken id is refused, atomically, so two devices racing for one id cannot both win.
pub fn register(store: &dyn Store, rec: DeviceRecord) -> Result<DeviceRecord, RpcError> {
    if revoked(store, &rec.id)?.is_some() {
        return Err(revoked_error(&rec.id));
    }
    let stored = store::update::<DeviceRecord, RpcError, _>(
        store,
        Table::Devices,
        &rec.id,
        |cur| match cur {
            Some(old) if !same_key(&old.ssh_public_key, &rec.ssh_public_key) => Err(exists(
                format!("device id {} is already taken by another device", rec.id),
            )),
            // A join again (same key) proves no hold of the key: it keeps what the device
            // proved (its attestation of tunnels) as well as when it first joined.
            Some(old) => Ok(Some(DeviceRecord {
                joined_at: old.joined_at,
                attested_ms: old.attested_ms,
                ..rec.clone()
            })),
            None => Ok(Some(rec.clone())),
        },
    )?;
    stored.ok_or_else(|| not_found(format!("device {} not found", rec.id)))
}

/// Notes a renewal.
pub fn record_renewal(store: &dyn Store, id: &str, now: u64) -> Result<(), RpcError> {
    store::update::<DeviceRecord, RpcError, _>(store, Table::Devices, id, |cur| {
        Ok(cur.map(|mut d| {
            d.renewed_at = now;
            d
        }))
    })?;
    Ok(())
}

/// Removes a device: it leaves the inventory and its id is refused from now on.
pub fn revoke(store: &dyn Store, id: &str, now: u64) -> Result<(), RpcError> {
    let dev = get(store, id)?.ok_or_else(|| not_found(format!("device {id} not found")))?;
    store::put(
        store,
        Table::Revoked,
        id,
        &RevokedRecord {
            id: id.to_string(),
            revoked_at: now,
            ssh_public_key: dev.ssh_public_key,
        },
    )?;
    store.delete(Table::Devices, id)?;
    store.delete(Table::Presence, id)?;
    Ok(())
}

/// Ids removed recently enough that some gateway may still hold their tunnels.
pub fn recently_revoked(store: &dyn Store, now: u64) -> Result<Vec<String>, RpcError> {
    Ok(store::list::<RevokedRecord>(store, Table::Revoked, "")?
        .into_iter()
        .filter(|(_, r)| r.revoked_at.saturating_add(REVOCATION_ANNOUNCE_SECS) > now)
        .map(|(id, _)| id)
        .collect())
}

fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD_LEN)
        .collect();
    out.truncate(MAX_FIELD_LEN * 4);
    out
}

/// Applies a one-part snapshot (see [`apply_part`]).
pub fn apply_report(
    store: &dyn Store,
    gateway: &str,
    report: &PresenceReport,
    now: u64,
) -> Result<Vec<(String, u64)>, RpcError> {
    let mut seen = Snapshot::default();
    apply_part(store, gateway, report, &mut seen, now)
}

/// Bounds what one snapshot in parts may accumulate (a gateway holds at most this many
/// tunnels anyway).
const MAX_DISCONNECTED_PER_SNAPSHOT: usize = 100_000;

/// What the parts of one gateway snapshot have said so far.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Devices reported online by earlier parts, with their tunnels' `connected_at`.
    pub seen: BTreeMap<String, u64>,
    /// The part expected next.
    pub next_part: u32,
    /// A part went missing (say, the authority restarted mid-snapshot): do not take devices
    /// offline for their absence, since they may have been in the lost part. Their leases
    /// still run out.
    pub broken: bool,
    /// Devices whose tunnels ended, with the reason, from every part so far.
    pub disconnected: Vec<(String, String)>,
}

/// Applies one part of a gateway's snapshot; the last part (`more == false`) completes it
/// and takes the devices the gateway no longer holds offline. The caller serialises reports
/// (one at a time), since a report reads and writes several records.
pub fn apply_part(
    store: &dyn Store,
    gateway: &str,
    report: &PresenceReport,
    snap: &mut Snapshot,
    now: u64,
) -> Result<Vec<(String, u64)>, RpcError> {
    if report.part == 0 {
        *snap = Snapshot::default();
    } else if report.part != snap.next_part {
        snap.broken = true;
    }
    snap.next_part = report.part.saturating_add(1);
    let lease = report.lease_secs.clamp(1, MAX_LEASE_SECS);
    let lease_expires = now + lease;
    let prev: GatewayReport =
        store::get(store, Table::GatewayReports, gateway)?.unwrap_or_default();
    let mut superseded = Vec::new();
    let (mut forged, mut unproven) = (0usize, 0usize);
    for p in &report.online {
        // Only devices in the inventory have presence; a removed one gets its revocation in
        // the acknowledgement instead.
        let Some(dev) = get(store, &p.id)? else {
            continue;
        };
        let old: Option<PresenceRecord> = store::get(store, Table::Presence, &p.id)?;
        let proven = match &p.proof {
            Some(proof) => {
                // The attestation already on this gateway's record was verified then.
                let known = old.as_ref().is_some_and(|o| {
                    o.gateway == gateway
                        && proof.gateway == gateway
                        && o.proven_ms == Some(proof.signed_at_ms)
                        && o.proof_sig == proof.signature
                });
                if known || proof.verify(&p.id, gateway, &dev.ssh_public_key).is_ok() {
                    Some(proof.signed_at_ms)
                } else {
                    forged += 1;
                    None
                }
            }
            None => None,
        };
        // The device is held by another gateway now, and this gateway still reports the
        // tunnel it reported before: that tunnel is an old one (the device reconnected
        // elsewhere while this gateway has not yet noticed the old connection die). The
        // newer tunnel keeps the record and this gateway is told to close its own, so the
        // holder does not flap back with every report. Only this gateway's own clock is
        // compared with itself. Unless the device attested this gateway's tunnel later than
        // the holder's: then the holder's claim was the stale one, and this one takes over.
        let taken_over = old.as_ref().is_some_and(|o| {
            o.gateway != gateway
                && now < o.lease_expires
                && prev.connected.get(&p.id) == Some(&p.connected_at)
                && proven.is_none_or(|t| o.proven_ms.is_some_and(|h| t <= h))
        });
        if taken_over {
            snap.seen.insert(p.id.clone(), p.connected_at);
            superseded.push((p.id.clone(), p.connected_at));
            continue;
        }
        // The gateway's word is not enough (security.md G9): once the device has attested a
        // tunnel, only a gateway showing an attestation at least as new as the newest one
        // seen holds it (the agent's stamps only grow), whether or not anyone holds it now.
        // Such a claim is left out, not answered with `superseded`: it may be the device's
        // newest tunnel, its attestation still on the way. The holder's own claim stays in
        // the snapshot meanwhile (not taken offline for it, its lease not renewed either).
        let ignored = match (proven, dev.attested_ms) {
            (None, mark) => mark.is_some(),
            (Some(t), Some(mark)) => t < mark,
            (Some(_), None) => false,
        };
        if ignored {
            unproven += 1;
            if old.as_ref().is_some_and(|o| o.gateway == gateway) {
                snap.seen.insert(p.id.clone(), p.connected_at);
            }
            continue;
        }
        snap.seen.insert(p.id.clone(), p.connected_at);
        if let Some(t) = proven.filter(|t| dev.attested_ms.is_none_or(|m| *t > m)) {
            store::update::<DeviceRecord, RpcError, _>(store, Table::Devices, &p.id, |cur| {
                Ok(cur.map(|mut d| {
                    d.attested_ms = Some(d.attested_ms.map_or(t, |m| m.max(t)));
                    d
                }))
            })?;
        }
        let mut rec = online_record(gateway, p, lease_expires, now, old);
        rec.proven_ms = proven;
        if proven.is_some() {
            rec.proof_sig = p
                .proof
                .as_ref()
                .map(|x| x.signature.clone())
                .unwrap_or_default();
        }
        store::put(store, Table::Presence, &p.id, &rec)?;
        if let Some(usage) = &p.usage {
            crate::usage::absorb(store, &p.id, usage, now)?;
            if dev.data_budget.is_some() {
                crate::usage::refresh_over_budget(store, &p.id, dev.data_budget, now)?;
            }
        }
    }
    if forged > 0 {
        tracing::warn!(
            gateway,
            devices = forged,
            "presence claims whose device attestation does not verify were ignored"
        );
    }
    if unproven > 0 {
        tracing::debug!(
            gateway,
            devices = unproven,
            "presence claims without a (newer) device attestation were left out"
        );
    }
    snap.disconnected.extend(
        report
            .disconnected
            .iter()
            .take(MAX_DISCONNECTED_PER_SNAPSHOT)
            .cloned(),
    );
    snap.disconnected.truncate(MAX_DISCONNECTED_PER_SNAPSHOT);
    if report.more {
        return Ok(superseded);
    }
    let gone = std::mem::take(&mut snap.disconnected);
    let reported = std::mem::take(&mut snap.seen);
    let trust_absence = !snap.broken;
    let dropped = prev
        .devices
        .iter()
        .filter(|d| trust_absence && !reported.contains_key(*d));
    let reasons: BTreeMap<&str, &str> = gone
        .iter()
        .map(|(id, why)| (id.as_str(), why.as_str()))
        .collect();
    let mut ended: BTreeSet<&str> = dropped.map(String::as_str).collect();
    ended.extend(reasons.keys().copied());
    for id in ended {
        let Some(mut rec) = store::get::<PresenceRecord>(store, Table::Presence, id)? else {
            continue;
        };
        // A device that moved to another gateway is no longer this one's to take offline.
        if rec.gateway != gateway {
            continue;
        }
        if !reported.contains_key(id) && (trust_absence || reasons.contains_key(id)) {
            rec.lease_expires = rec.lease_expires.min(now);
        }
        if let Some(why) = reasons.get(id) {
            rec.last_disconnect_reason = Some(clip(why));
        }
        store::put(store, Table::Presence, id, &rec)?;
    }
    store::put(
        store,
        Table::GatewayReports,
        gateway,
        &GatewayReport {
            devices: reported.keys().cloned().collect(),
            connected: reported,
            reported_at: now,
            lease_expires,
        },
    )?;
    Ok(superseded)
}

fn online_record(
    gateway: &str,
    p: &DevicePresence,
    lease_expires: u64,
    now: u64,
    old: Option<PresenceRecord>,
) -> PresenceRecord {
    PresenceRecord {
        gateway: gateway.to_string(),
        lease_expires,
        transport: p.transport,
        address: clip(&p.address),
        rtt_ms: p.rtt_ms,
        version: clip(&p.version),
        arch: clip(&p.arch),
        labels: p.labels.clone(),
        kube_cluster: p.kube_cluster.as_deref().map(clip),
        connected_at: p.connected_at,
        last_seen: now,
        loss_permille: p.loss_permille.map(|l| l.min(1000)),
        address_changes: address_changes(old.as_ref(), &p.address, now),
        last_disconnect_reason: old.and_then(|o| o.last_disconnect_reason),
        proven_ms: None,
        proof_sig: Vec::new(),
    }
}

/// How long address changes are remembered, and at most how many.
const ADDRESS_CHANGES_SECS: u64 = 86400;
const ADDRESS_CHANGES_MAX: usize = 256;

/// The record's address changes within the last day, with one more if the IP address in
/// this report differs from the last one (a NAT giving the device another port is not an
/// uplink change).
fn address_changes(old: Option<&PresenceRecord>, address: &str, now: u64) -> Vec<u64> {
    let ip = |a: &str| -> String {
        a.parse::<std::net::SocketAddr>()
            .map(|s| s.ip().to_string())
            .unwrap_or_else(|_| a.to_string())
    };
    let mut changes: Vec<u64> = old
        .map(|o| o.address_changes.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| now.saturating_sub(*t) < ADDRESS_CHANGES_SECS)
        .collect();
    if let Some(o) = old {
        if !o.address.is_empty() && ip(&o.address) != ip(address) {
            changes.push(now);
        }
    }
    let excess = changes.len().saturating_sub(ADDRESS_CHANGES_MAX);
    changes.drain(..excess);
    changes
}

/// What tctl, tsh and gateways see of a device at `now`.
pub fn info(dev: &DeviceRecord, presence: Option<&PresenceRecord>, now: u64) -> DeviceInfo {
    let online = presence.is_some_and(|p| now < p.lease_expires);
    let live = presence.filter(|_| online);
    DeviceInfo {
        id: dev.id.clone(),
        // The labels the authority gave at join are the ones access is decided on.
        labels: dev.labels.clone(),
        online,
        transport: live.map(|p| p.transport),
        address: presence
            .map(|p| p.address.clone())
            .unwrap_or_else(|| dev.join_addr.clone()),
        version: presence
            .map(|p| p.version.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| dev.version.clone()),
        arch: presence
            .map(|p| p.arch.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| dev.arch.clone()),
        rtt_ms: live.map(|p| p.rtt_ms),
        last_seen: presence.map_or(dev.joined_at, |p| p.last_seen.max(dev.joined_at)),
        last_disconnect_reason: presence.and_then(|p| p.last_disconnect_reason.clone()),
        gateway: live.map(|p| p.gateway.clone()),
        joined_at: dev.joined_at,
        kube_cluster: presence.and_then(|p| p.kube_cluster.clone()),
        loss_permille: live.and_then(|p| p.loss_permille),
        address_changes_24h: presence.map_or(0, |p| {
            let recent = p.address_changes.iter();
            let n = recent
                .filter(|t| now.saturating_sub(**t) < ADDRESS_CHANGES_SECS)
                .count();
            u32::try_from(n).unwrap_or(u32::MAX)
        }),
    }
}

/// One device as seen now.
pub fn lookup(store: &dyn Store, id: &str, now: u64) -> Result<Option<DeviceInfo>, RpcError> {
    let Some(dev) = get(store, id)? else {
        return Ok(None);
    };
    let presence: Option<PresenceRecord> = store::get(store, Table::Presence, id)?;
    Ok(Some(info(&dev, presence.as_ref(), now)))
}

/// The inventory as seen now, by id.
pub fn list(store: &dyn Store, now: u64) -> Result<Vec<DeviceInfo>, RpcError> {
    let presence: BTreeMap<String, PresenceRecord> = store::list(store, Table::Presence, "")?
        .into_iter()
        .collect();
    Ok(store::list::<DeviceRecord>(store, Table::Devices, "")?
        .into_iter()
        .map(|(id, d)| info(&d, presence.get(&id), now))
        .collect())
}

/// One page of the inventory: the devices with ids after `after`, as many as fit in a frame.
pub fn page(store: &dyn Store, after: &str, now: u64) -> Result<(Vec<DeviceInfo>, bool), RpcError> {
    page_where(store, after, now, |_| true)
}

/// [`page`] of the devices `keep` accepts.
pub fn page_where(
    store: &dyn Store,
    after: &str,
    now: u64,
    keep: impl Fn(&DeviceInfo) -> bool,
) -> Result<(Vec<DeviceInfo>, bool), RpcError> {
    let rest: Vec<DeviceInfo> = list(store, now)?
        .into_iter()
        .filter(|d| (after.is_empty() || d.id.as_str() > after) && keep(d))
        .collect();
    let mut chunks = edgeport_proto::frame::chunk_by_size(rest).into_iter();
    let first = chunks.next().unwrap_or_default();
    Ok((first, chunks.next().is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::keys::KeyPair;
    use edgeport_proto::rpc::ErrorKind;

    fn store() -> (tempfile::TempDir, crate::store::SledStore) {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(&d.path().join("s")).unwrap();
        (d, s)
    }

    fn device(id: &str, key: &KeyPair) -> DeviceRecord {
        DeviceRecord {
            id: id.into(),
            ssh_public_key: key.public_openssh(),
            labels: [("fleet".to_string(), "vans".to_string())].into(),
            joined_at: 100,
            renewed_at: 100,
            version: "1.0".into(),
            arch: "x86_64".into(),
            token_id: "t".into(),
            joined_via: "gw-a".into(),
            join_addr: "192.0.2.1:1".into(),
            data_budget: None,
            attested_ms: None,
        }
    }

    fn seen(id: &str) -> DevicePresence {
        DevicePresence {
            id: id.into(),
            labels: BTreeMap::new(),
            version: "1.1".into(),
            arch: "aarch64".into(),
            transport: Transport::Quic,
            address: "198.51.100.1:2".into(),
            rtt_ms: 12,
            connected_at: 100,
            kube_cluster: None,
            loss_permille: None,
            usage: None,
            proof: None,
        }
    }

    fn report(lease: u64, online: &[&str], gone: &[(&str, &str)]) -> PresenceReport {
        PresenceReport {
            lease_secs: lease,
            online: online.iter().map(|id| seen(id)).collect(),
            disconnected: gone
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn online(s: &dyn Store, id: &str, now: u64) -> bool {
        lookup(s, id, now).unwrap().unwrap().online
    }

    #[test]
    fn ids_belong_to_one_key_and_revoked_ids_stay_refused() {
        let (_d, s) = store();
        let (k1, k2) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        register(&s, device("van-1", &k1)).unwrap();
        let mut again = device("van-1", &k1);
        again.joined_at = 500;
        assert_eq!(register(&s, again).unwrap().joined_at, 100);
        let e = register(&s, device("van-1", &k2)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        revoke(&s, "van-1", 200).unwrap();
        assert!(list(&s, 200).unwrap().is_empty());
        assert_eq!(recently_revoked(&s, 200).unwrap(), ["van-1"]);
        assert!(recently_revoked(&s, 200 + REVOCATION_ANNOUNCE_SECS)
            .unwrap()
            .is_empty());
        let e = register(&s, device("van-1", &k1)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Denied);
        assert!(revoke(&s, "van-1", 300).is_err());
    }

    #[test]
    fn snapshots_in_parts_count_as_one() {
        let (_d, s) = store();
        let k = KeyPair::generate().unwrap();
        for id in ["a", "b", "c"] {
            register(&s, device(id, &k)).unwrap();
        }
        let part = |online: &[&str], gone: &[(&str, &str)], n: u32, more: bool| {
            let mut r = report(30, online, gone);
            r.part = n;
            r.more = more;
            r
        };
        let mut snap = Snapshot::default();
        apply_part(
            &s,
            "gw",
            &report(30, &["a", "b", "c"], &[]),
            &mut snap,
            1000,
        )
        .unwrap();
        // Two parts: devices of the first part are not taken offline by the second.
        apply_part(&s, "gw", &part(&["a"], &[], 0, true), &mut snap, 1010).unwrap();
        apply_part(
            &s,
            "gw",
            &part(&["b"], &[("c", "gone")], 1, false),
            &mut snap,
            1010,
        )
        .unwrap();
        assert!(online(&s, "a", 1011) && online(&s, "b", 1011));
        let c = lookup(&s, "c", 1011).unwrap().unwrap();
        assert!(!c.online);
        assert_eq!(c.last_disconnect_reason.as_deref(), Some("gone"));
        // A snapshot whose first part was lost (the authority restarted) takes nobody offline
        // for being absent; the leases still run out.
        let mut fresh = Snapshot::default();
        apply_part(&s, "gw", &part(&["b"], &[], 1, false), &mut fresh, 1020).unwrap();
        assert!(online(&s, "a", 1021), "a may have been in the lost part");
        assert!(!online(&s, "a", 1041), "but its lease still expires");
    }

    #[test]
    fn inventory_pages_cover_every_device_once() {
        let (_d, s) = store();
        let k = KeyPair::generate().unwrap();
        for i in 0..2000 {
            let mut d = device(&format!("dev-{i:04}"), &k);
            d.labels.insert("note".into(), "x".repeat(40));
            register(&s, d).unwrap();
        }
        let (mut all, mut after, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (devs, more) = page(&s, &after, 1000).unwrap();
            pages += 1;
            after = devs.last().unwrap().id.clone();
            all.extend(devs.into_iter().map(|d| d.id));
            if !more {
                break;
            }
        }
        assert!(pages > 1);
        assert_eq!(all.len(), 2000);
        all.dedup();
        assert_eq!(all.len(), 2000);
    }

    /// G9: a gateway's word does not make it a device's holder. A device that attested a
    /// tunnel is held only with its attestation for the reporting gateway, and moves from a
    /// gateway that shows one only on a later one.
    #[test]
    fn a_gateway_holds_a_device_only_on_its_attestation() {
        use edgeport_proto::attest::TunnelProof;
        let (_d, s) = store();
        let (k, other) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        register(&s, device("van", &k)).unwrap();
        let claim = |proof: Option<TunnelProof>, connected_at: u64| PresenceReport {
            lease_secs: 30,
            online: vec![DevicePresence {
                proof,
                connected_at,
                ..seen("van")
            }],
            ..Default::default()
        };
        let holder = |now| lookup(&s, "van", now).unwrap().unwrap().gateway;
        // Before any attestation (an agent older than it), a gateway's word still holds it.
        apply_report(&s, "gw-rogue", &claim(None, 1), 1000).unwrap();
        assert_eq!(holder(1001).as_deref(), Some("gw-rogue"));
        // The device attests its tunnel to gw-b: gw-b holds it, proved, from then on.
        let at_b = TunnelProof::sign(&k, "van", "gw-b", 5_000);
        apply_report(&s, "gw-b", &claim(Some(at_b.clone()), 2), 1002).unwrap();
        assert_eq!(holder(1003).as_deref(), Some("gw-b"));
        assert!(get(&s, "van").unwrap().unwrap().attested_ms.is_some());
        // The rogue's word, a forged attestation, gw-b's attestation shown by the rogue, and
        // the device's attestation for another gateway all leave gw-b the holder.
        for proof in [
            None,
            Some(TunnelProof::sign(&other, "van", "gw-rogue", 9_000)),
            Some(at_b.clone()),
            Some(TunnelProof::sign(&k, "van", "gw-b", 9_000)),
        ] {
            let superseded = apply_report(&s, "gw-rogue", &claim(proof, 3), 1004).unwrap();
            assert!(superseded.is_empty(), "left out, not told to close");
            assert_eq!(holder(1005).as_deref(), Some("gw-b"));
        }
        // Offline (gw-b's lease ran out), it is not the rogue's on its word, nor on an older
        // attestation the device once gave it, replayed while nobody holds the device.
        apply_report(&s, "gw-rogue", &claim(None, 4), 1100).unwrap();
        assert!(!online(&s, "van", 1101));
        let old_rogue = TunnelProof::sign(&k, "van", "gw-rogue", 4_000);
        apply_report(&s, "gw-rogue", &claim(Some(old_rogue), 5), 1102).unwrap();
        assert!(!online(&s, "van", 1103));
        // gw-b reports its tunnel again: the holder again.
        apply_report(&s, "gw-b", &claim(Some(at_b.clone()), 2), 1200).unwrap();
        assert_eq!(holder(1201).as_deref(), Some("gw-b"));
        // The device moves to gw-a (a later stamp): gw-a takes it, and gw-b, still showing its
        // old tunnel, is told to close it.
        let new_a = TunnelProof::sign(&k, "van", "gw-a", 6_000);
        apply_report(&s, "gw-a", &claim(Some(new_a), 6), 1203).unwrap();
        assert_eq!(holder(1204).as_deref(), Some("gw-a"));
        let superseded = apply_report(&s, "gw-b", &claim(Some(at_b), 2), 1205).unwrap();
        assert_eq!(superseded, [("van".to_string(), 2)]);
        assert_eq!(holder(1206).as_deref(), Some("gw-a"));
        // gw-a's next tunnel (the device reconnected to it) has its attestation on the way:
        // the first report without it keeps the device online, the next one with it renews.
        apply_report(&s, "gw-a", &claim(None, 7), 1210).unwrap();
        assert_eq!(holder(1211).as_deref(), Some("gw-a"));
        let newer_a = TunnelProof::sign(&k, "van", "gw-a", 6_001);
        apply_report(&s, "gw-a", &claim(Some(newer_a), 7), 1212).unwrap();
        assert!(online(&s, "van", 1212 + 29));
        // A join again under the same key (no proof of the key) keeps the device's attests.
        register(&s, device("van", &k)).unwrap();
        assert!(get(&s, "van").unwrap().unwrap().attested_ms.is_some());
    }

    #[test]
    fn presence_leases_snapshots_and_moves() {
        let (_d, s) = store();
        let k = KeyPair::generate().unwrap();
        for id in ["a", "b", "c"] {
            register(&s, device(id, &k)).unwrap();
        }
        // Never reported: offline, last seen at the join.
        let a = lookup(&s, "a", 1000).unwrap().unwrap();
        assert!(!a.online && a.last_seen == 100 && a.transport.is_none());

        apply_report(&s, "gw-1", &report(30, &["a", "b", "ghost"], &[]), 1000).unwrap();
        let a = lookup(&s, "a", 1010).unwrap().unwrap();
        assert!(a.online);
        assert_eq!(a.gateway.as_deref(), Some("gw-1"));
        assert_eq!(a.transport, Some(Transport::Quic));
        assert_eq!((a.version.as_str(), a.arch.as_str()), ("1.1", "aarch64"));
        assert_eq!(a.labels["fleet"], "vans");
        assert_eq!(a.last_seen, 1000);
        assert!(lookup(&s, "ghost", 1010).unwrap().is_none());

        // The lease expires: the gateway died, its devices read offline.
        assert!(!online(&s, "a", 1030));
        assert!(!online(&s, "b", 1031));

        // A fresh snapshot that omits b takes it offline at once; a reason is kept.
        apply_report(&s, "gw-1", &report(30, &["a", "b"], &[]), 1040).unwrap();
        apply_report(
            &s,
            "gw-1",
            &report(30, &["a"], &[("b", "idle timeout")]),
            1050,
        )
        .unwrap();
        assert!(online(&s, "a", 1051));
        let b = lookup(&s, "b", 1051).unwrap().unwrap();
        assert!(!b.online);
        assert_eq!(b.last_disconnect_reason.as_deref(), Some("idle timeout"));
        assert_eq!(b.last_seen, 1040);

        // a moves to gw-2; gw-1's later snapshot without it does not take it offline.
        apply_report(&s, "gw-2", &report(30, &["a"], &[]), 1060).unwrap();
        apply_report(&s, "gw-1", &report(30, &[], &[("a", "moved")]), 1061).unwrap();
        let a = lookup(&s, "a", 1062).unwrap().unwrap();
        assert!(a.online);
        assert_eq!(a.gateway.as_deref(), Some("gw-2"));
        assert_eq!(a.last_disconnect_reason, None);

        // Leases are capped.
        apply_report(&s, "gw-3", &report(u64::MAX, &["c"], &[]), 2000).unwrap();
        assert!(online(&s, "c", 2000 + MAX_LEASE_SECS - 1));
        assert!(!online(&s, "c", 2000 + MAX_LEASE_SECS));
        assert_eq!(list(&s, 2000).unwrap().len(), 3);
    }

    #[test]
    fn an_old_tunnel_at_another_gateway_does_not_take_the_device_back() {
        let (_d, s) = store();
        let k = KeyPair::generate().unwrap();
        register(&s, device("a", &k)).unwrap();
        let at = |connected_at: u64| {
            let mut r = report(30, &["a"], &[]);
            r.online[0].connected_at = connected_at;
            r
        };
        let holder = |now| lookup(&s, "a", now).unwrap().unwrap().gateway;
        assert!(apply_report(&s, "gw-1", &at(100), 1000).unwrap().is_empty());
        // The device reconnects at gw-2; gw-1 has not noticed its tunnel die and keeps
        // reporting it: gw-2 keeps the device and gw-1 is told to close that tunnel.
        assert!(apply_report(&s, "gw-2", &at(1005), 1005)
            .unwrap()
            .is_empty());
        assert_eq!(
            apply_report(&s, "gw-1", &at(100), 1010).unwrap(),
            [("a".to_string(), 100)]
        );
        assert_eq!(holder(1011).as_deref(), Some("gw-2"));
        assert!(lookup(&s, "a", 1011).unwrap().unwrap().online);
        // A new tunnel at gw-1 (the device came back there) takes it, as any move does.
        assert!(apply_report(&s, "gw-1", &at(1020), 1020)
            .unwrap()
            .is_empty());
        assert_eq!(holder(1021).as_deref(), Some("gw-1"));
        // Now gw-2's tunnel is the old one, and gw-1's continuing claim is its own.
        assert_eq!(
            apply_report(&s, "gw-2", &at(1005), 1025).unwrap(),
            [("a".to_string(), 1005)]
        );
        assert!(apply_report(&s, "gw-1", &at(1020), 1030)
            .unwrap()
            .is_empty());
        assert_eq!(holder(1031).as_deref(), Some("gw-1"));
    }
}
