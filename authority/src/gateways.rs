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
