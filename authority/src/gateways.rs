//! Joined gateways: who they are and what names their certificates carry. Gateways hold no
//! durable state (DESIGN §5); this record is what lets a gateway renew its certificate.

use edgeport_proto::rpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::store::{self, Store, Table};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub id: String,
    pub joined_at: u64,
    pub renewed_at: u64,
    /// The id of the token it joined with.
    pub token_id: String,
    pub dns_names: Vec<String>,
    pub ip_addrs: Vec<String>,
    /// Set by an administrator to refuse its renewals.
    #[serde(default)]
    pub revoked: bool,
    /// Where other gateways reach it to forward dials (from its presence reports).
    #[serde(default)]
    pub peer_addr: Option<String>,
    /// When it was revoked (Unix seconds; 0 if it was not).
    #[serde(default)]
    pub revoked_at: u64,
    /// The version it last reported.
    #[serde(default)]
    pub version: String,
}

pub fn get(store: &dyn Store, id: &str) -> Result<Option<GatewayRecord>, RpcError> {
    Ok(store::get(store, Table::Gateways, id)?)
}

/// Records a join (a gateway re-joining under the same id replaces its record).
pub fn record_join(store: &dyn Store, rec: &GatewayRecord) -> Result<(), RpcError> {
    store::put(store, Table::Gateways, &rec.id, rec)?;
    Ok(())
}

/// Records a renewal and the names of the new certificate.
pub fn record_renewal(
    store: &dyn Store,
    id: &str,
    dns_names: &[String],
    ip_addrs: &[String],
    now: u64,
) -> Result<(), RpcError> {
    store::update::<GatewayRecord, RpcError, _>(store, Table::Gateways, id, |cur| {
        Ok(cur.map(|mut g| {
            g.renewed_at = now;
            g.dns_names = dns_names.to_vec();
            g.ip_addrs = ip_addrs.to_vec();
            g
        }))
    })?;
    Ok(())
}

/// Records the peer address a gateway reported; writes only when it changed (presence
/// reports come every few seconds and usually repeat it).
pub fn record_peer_addr(
    store: &dyn Store,
    id: &str,
    peer_addr: Option<&str>,
) -> Result<(), RpcError> {
    let same = get(store, id)?.is_none_or(|g| g.peer_addr.as_deref() == peer_addr);
    if same {
        return Ok(());
    }
    store::update::<GatewayRecord, RpcError, _>(store, Table::Gateways, id, |cur| {
        Ok(cur.map(|mut g| {
            g.peer_addr = peer_addr.map(str::to_string);
            g
        }))
    })?;
    Ok(())
}

/// The peer address of gateway `id`, if it is known and has given one.
pub fn peer_addr(store: &dyn Store, id: &str) -> Result<Option<String>, RpcError> {
    Ok(get(store, id)?.and_then(|g| g.peer_addr))
}

/// Records the version a gateway reported; writes only when it changed.
pub fn record_version(store: &dyn Store, id: &str, version: &str) -> Result<(), RpcError> {
    let same = get(store, id)?.is_none_or(|g| g.version == version);
    if same {
        return Ok(());
    }
    store::update::<GatewayRecord, RpcError, _>(store, Table::Gateways, id, |cur| {
        Ok(cur.map(|mut g| {
            g.version = version.to_string();
            g
        }))
    })?;
    Ok(())
}

/// Revokes gateway `id`: from now on its requests, renewals and a re-join under its name are
/// refused, and every gateway learns it with its next presence acknowledgement.
pub fn revoke(store: &dyn Store, id: &str, now: u64) -> Result<(), RpcError> {
    let found = store::update::<GatewayRecord, RpcError, _>(store, Table::Gateways, id, |cur| {
        Ok(cur.map(|mut g| {
            g.revoked = true;
            if g.revoked_at == 0 {
                g.revoked_at = now;
            }
            g
        }))
    })?;
    match found {
        Some(_) => Ok(()),
        None => Err(crate::errors::not_found(format!("no gateway named {id}"))),
    }
}

/// Every gateway record, in id order.
pub fn all(store: &dyn Store) -> Result<Vec<GatewayRecord>, RpcError> {
    Ok(store::list::<GatewayRecord>(store, Table::Gateways, "")?
        .into_iter()
        .map(|(_, g)| g)
        .collect())
}

/// How long a gateway's standing (revoked or locked) is reused before the store is read
/// again: several authorities sharing a store see each other's revocations within this.
const STANDING_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// The gateways that may not act (revoked, or under a lock), read at most every
/// [`STANDING_TTL`] and at once after a change made here.
#[derive(Default)]
pub struct Standing {
    cache: std::sync::Mutex<Option<(std::time::Instant, Vec<String>)>>,
}

impl Standing {
    /// Forget the cached list (a revocation or lock was made through this authority).
    pub fn changed(&self) {
        if let Ok(mut c) = self.cache.lock() {
            *c = None;
        }
    }

    /// Whether gateway `id` is barred, if the cached list is fresh (no store read).
    pub fn cached(&self, id: &str) -> Option<bool> {
        let c = self.cache.lock().ok()?;
        c.as_ref()
            .filter(|(at, _)| at.elapsed() < STANDING_TTL)
            .map(|(_, list)| list.iter().any(|g| g == id))
    }

    /// The gateways revoked or locked now.
    pub fn barred(&self, store: &dyn Store, now: u64) -> Result<Vec<String>, RpcError> {
        if let Ok(c) = self.cache.lock() {
            if let Some((_, list)) = c.as_ref().filter(|(at, _)| at.elapsed() < STANDING_TTL) {
                return Ok(list.clone());
            }
        }
        let mut list: Vec<String> = all(store)?
            .into_iter()
            .filter(|g| g.revoked)
            .map(|g| g.id)
            .collect();
        for l in crate::locks::active(store, now)? {
            if let edgeport_proto::rpc::LockTarget::Gateway(g) = l.target {
                list.push(g);
            }
        }
        list.sort();
        list.dedup();
        if let Ok(mut c) = self.cache.lock() {
            *c = Some((std::time::Instant::now(), list.clone()));
        }
        Ok(list)
    }
}

/// `tctl gateways ls`: every gateway with its standing, what it last reported here and how
/// many tunnels the inventory puts on it.
pub fn list_info(
    svc: &crate::service::Service,
    now: u64,
) -> Result<edgeport_proto::rpc::Response, RpcError> {
    let store = svc.store();
    let barred = svc.standing.barred(store, now)?;
    let mut tunnels: std::collections::HashMap<String, u32> = Default::default();
    for d in crate::devices::list(store, now)? {
        if let (true, Some(g)) = (d.online, d.gateway) {
            *tunnels.entry(g).or_default() += 1;
        }
    }
    let reports = svc
        .gateway_reports
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let infos = all(store)?
        .into_iter()
        .map(|g| edgeport_proto::rpc::GatewayInfo {
            locked: !g.revoked && barred.contains(&g.id),
            tunnels: tunnels.get(&g.id).copied().unwrap_or(0),
            last_report: reports.get(&g.id).copied().unwrap_or(0),
            id: g.id,
            peer_addr: g.peer_addr,
            dns_names: g.dns_names,
            ip_addrs: g.ip_addrs,
            version: g.version,
            joined_at: g.joined_at,
            renewed_at: g.renewed_at,
            revoked: g.revoked,
        })
        .collect();
    Ok(edgeport_proto::rpc::Response::Gateways(infos))
}
