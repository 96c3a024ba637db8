//! The authority's system of record behind one narrow trait: the embedded sled store (one
//! authority, the default) or PostgreSQL (several authorities sharing state), chosen at start
//! without touching the handlers. The trait deals in bytes on named tables; typed records (JSON) and the atomic
//! read-modify-write loop live in the helpers below it and work for every implementation.

pub mod conformance;
pub mod postgres;
mod postgres_tls;
pub mod sled;

use serde::{de::DeserializeOwned, Serialize};

pub use self::postgres::PostgresStore;
pub use self::sled::SledStore;

/// The tables of the store. Each maps a string key to one serialized record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Local users (`users::UserRecord`), by name.
    Users,
    /// Identities an administrator signed without a user record (`tctl auth sign` for bots).
    Bots,
    /// Join tokens (`tokens::TokenRecord`), by the hex SHA-256 of the secret.
    Tokens,
    /// The device inventory (`devices::DeviceRecord`), by device id.
    Devices,
    /// Removed devices (`devices::RevokedRecord`), by device id; their ids stay refused.
    Revoked,
    /// Where and how each device was last seen (`devices::PresenceRecord`), by device id.
    Presence,
    /// The last presence snapshot of each gateway (`devices::GatewayReport`), by gateway id.
    GatewayReports,
    /// Joined gateways (`gateways::GatewayRecord`), by gateway id.
    Gateways,
    /// Locks (`proto::rpc::LockSpec`), by `user/NAME` or `device/ID`.
    Locks,
    /// Administrator-defined roles (`proto::rpc::RoleSpec`), by name.
    Roles,
    /// Audit events (`proto::audit::StoredEvent`): `d/DEVICE/SEQ`, `a/SEQ`, `g/GATEWAY/...`.
    AuditEvents,
    /// Where each chain ends (`audit::ChainState`), by device id (`@authority` for its own).
    AuditState,
    /// Integrity alerts (`proto::audit::IntegrityAlert`), by `DEVICE/TIME-N`.
    AuditAlerts,
    /// Session recording pieces (asciicast v2 bytes), by `SESSION/eEND` where END is the byte
    /// offset (20 digits) just past the piece, so a read from any offset is one range scan
    /// (`recordings`). Stores from before paging held `SESSION/SEQ`, rewritten when the
    /// authority opens them.
    Recordings,
    /// One `recordings::IndexRecord` per recorded session (size, device, user, start, end),
    /// by session id.
    RecordingIndex,
    /// What identity provider groups grant (`proto::rpc::SsoMapping`), by group.
    SsoMaps,
    /// Single sign-on connectors with their client secrets (`proto::rpc::SsoConnectorSpec`),
    /// by name.
    SsoConnectors,
    /// Single sign-on logins in progress (`sso::PendingLogin`), by state; single use.
    SsoPending,
    /// Which device opened each session (`audit::SessionOwner`), by session id: recording
    /// pieces are taken only from that device.
    Sessions,
    /// Failed login counts (`throttle`), by `p/USER/SOURCE`, `s/SOURCE` and `u/USER`: in
    /// the store so that several authorities share them.
    LoginThrottle,
    /// Sessions a device reported started and not yet ended (`open_sessions::OpenSession`),
    /// by session id: the authority flags those still open past their certificate's expiry.
    OpenSessions,
    /// The recordings newest first: `a/INV/SESSION` for everyone's and `u/USER/INV/SESSION`
    /// for one user's, where INV is `u64::MAX - started_ms` (20 digits), so listing is a
    /// page of a range scan (`recordings`).
    RecordingTimeline,
    /// Web console sessions (`handlers::web::WebSessionRecord`), by the hex SHA-256 of the
    /// session token (the token itself is never stored), and the terminal nonces waiting to
    /// be used (`handlers::web::NonceRecord`), by `n/NONCE`.
    WebSessions,
    /// Bytes per device and service (`usage::UsageRecord`), by device id.
    Usage,
    /// Access requests (`access_requests::AccessRecord`) by `r/ID`, and the nonces of signed
    /// user actions already taken, by `n/NONCE` (dropped once too old to be accepted).
    AccessRequests,
    /// The latest `targets` report of each device (`targets::Report`), by device id.
    Targets,
    /// Devices past their monthly data budget (`usage::OverBudget`), by device id.
    OverBudget,
    /// Agent updates (`updates::OrderRecord`: the signed manifest and each device's state)
    /// by `o/ID`, and `a/ID` while devices may still be waiting for one: kept across restarts
    /// so devices offline at the time get them later.
    UpdateOrders,
    /// The agent binaries of kept updates (raw bytes, not JSON), by hex SHA-256.
    UpdateBinaries,
    /// The authorities sharing this store (`authorities::AuthorityRecord`: address, version,
    /// heartbeat, the CA keys each holds) by `a/ID`, and the cluster's CA rotation state
    /// (`authorities::ClusterCas`) at `cluster/cas`, written by the authority that took the
    /// last rotation step.
    Authorities,
}

impl Table {
    pub const ALL: [Table; 30] = [
        Table::Users,
        Table::Bots,
        Table::Tokens,
        Table::Devices,
        Table::Revoked,
        Table::Presence,
        Table::GatewayReports,
        Table::Gateways,
        Table::Locks,
        Table::Roles,
        Table::AuditEvents,
        Table::AuditState,
        Table::AuditAlerts,
        Table::Recordings,
        Table::RecordingIndex,
        Table::SsoMaps,
        Table::SsoConnectors,
        Table::SsoPending,
        Table::Sessions,
        Table::LoginThrottle,
        Table::OpenSessions,
        Table::RecordingTimeline,
        Table::WebSessions,
        Table::Usage,
        Table::AccessRequests,
        Table::Targets,
        Table::OverBudget,
        Table::UpdateOrders,
        Table::UpdateBinaries,
        Table::Authorities,
    ];

    /// The table's name in the backing store.
    pub fn name(self) -> &'static str {
        match self {
            Table::Users => "users",
            Table::Bots => "bots",
            Table::Tokens => "tokens",
            Table::Devices => "devices",
            Table::Revoked => "revoked",
            Table::Presence => "presence",
            Table::GatewayReports => "gateway_reports",
            Table::Gateways => "gateways",
            Table::Locks => "locks",
            Table::Roles => "roles",
            Table::AuditEvents => "audit_events",
            Table::AuditState => "audit_state",
            Table::AuditAlerts => "audit_alerts",
            Table::Recordings => "recordings",
            Table::RecordingIndex => "recording_index",
            Table::SsoMaps => "sso_maps",
            Table::SsoConnectors => "sso_connectors",
            Table::SsoPending => "sso_pending",
            Table::Sessions => "sessions",
            Table::LoginThrottle => "login_throttle",
            Table::OpenSessions => "open_sessions",
            Table::RecordingTimeline => "recording_timeline",
            Table::WebSessions => "web_sessions",
            Table::Usage => "usage",
            Table::AccessRequests => "access_requests",
            Table::Targets => "targets",
            Table::OverBudget => "over_budget",
            Table::UpdateOrders => "update_orders",
            Table::UpdateBinaries => "update_binaries",
            Table::Authorities => "authorities",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend: {0}")]
    Backend(String),
    #[error("stored record {table}/{key} is corrupt: {err}")]
    Corrupt {
        table: &'static str,
        key: String,
        err: String,
    },
    #[error("cannot encode record: {0}")]
    Encode(String),
    #[error("too much contention updating {table}/{key}")]
    Contention { table: &'static str, key: String },
}

/// Byte-level storage: enough for the authority and easy to implement on SQL
/// (`(table, key) -> value` with a conditional update).
pub trait Store: Send + Sync + 'static {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Removes a key; returns the value it held.
    fn delete(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// All entries whose key starts with `prefix` (`""` lists the table), in key order.
    fn scan_prefix(&self, table: Table, prefix: &str)
        -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// One page of a range scan: at most `limit` entries whose key starts with `prefix` and
    /// is at least `from` (a `from` below the prefix starts at the prefix), in key order. The
    /// work is bounded by `limit`, however large the table: paging goes on from the last key
    /// returned followed by `\0`.
    fn scan_from(
        &self,
        table: Table,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Atomically replaces the value of `key` with `new` (`None` deletes) if it currently is
    /// `expected` (`None` = absent). Returns whether the swap happened.
    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Other authorities may write to this store too (so this one does not see every change).
    fn shared(&self) -> bool {
        false
    }
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: table.name(),
        key: key.to_string(),
        err: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))
}

/// Reads a typed record.
pub fn get<T: DeserializeOwned>(
    store: &dyn Store,
    table: Table,
    key: &str,
) -> Result<Option<T>, StoreError> {
    store
        .get(table, key)?
        .map(|b| decode(table, key, &b))
        .transpose()
}

/// Writes a typed record (last writer wins; use [`update`] where that matters).
pub fn put<T: Serialize>(
    store: &dyn Store,
    table: Table,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    store.put(table, key, encode(value)?)
}

/// Every typed record of a table whose key starts with `prefix`. A corrupt record is an error
/// rather than silently skipped, so that data loss is noticed.
pub fn list<T: DeserializeOwned>(
    store: &dyn Store,
    table: Table,
    prefix: &str,
) -> Result<Vec<(String, T)>, StoreError> {
    store
        .scan_prefix(table, prefix)?
        .into_iter()
        .map(|(k, v)| {
            let t = decode(table, &k, &v)?;
            Ok((k, t))
        })
        .collect()
}

/// How many times [`update`] retries when other writers keep changing the record.
const MAX_CAS_ATTEMPTS: usize = 64;

/// Atomic read-modify-write of one record: `f` sees the current value and returns the new
/// one (`None` deletes) or an error that aborts without writing. If another writer changed
/// the record in between, `f` runs again on the fresh value, so the decision it makes (token
/// still unused, device id still free) is always taken on what is actually stored.
pub fn update<T, E, F>(store: &dyn Store, table: Table, key: &str, mut f: F) -> Result<Option<T>, E>
where
    T: Serialize + DeserializeOwned,
    E: From<StoreError>,
    F: FnMut(Option<T>) -> Result<Option<T>, E>,
{
    for _ in 0..MAX_CAS_ATTEMPTS {
        let old = store.get(table, key)?;
        let current = old
            .as_deref()
            .map(|b| decode::<T>(table, key, b))
            .transpose()?;
        let new = f(current)?;
        let new_bytes = new.as_ref().map(encode).transpose()?;
        if store.compare_and_swap(table, key, old.as_deref(), new_bytes)? {
            return Ok(new);
        }
    }
    Err(StoreError::Contention {
        table: table.name(),
        key: key.to_string(),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sled_passes_the_store_conformance_checks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        conformance::run_all(store).unwrap();
    }
}
