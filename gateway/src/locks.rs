//! The locks this gateway enforces, from the authority's latest presence acknowledgement:
//! locked users and devices (their dials are refused and their sessions cut) and gateways the
//! authority revoked or locked (their forwarded dials are refused and their links closed).

use std::sync::RwLock;

use edgeport_proto::rpc::{ErrorKind, LockSpec, LockTarget, RpcError};
use tokio::sync::watch;

pub struct Locks {
    /// Every lock of the latest acknowledgement.
    specs: RwLock<Vec<LockSpec>>,
    /// Locked user names, as last sent to agents (they end those users' sessions).
    users: RwLock<Vec<String>>,
    /// Revoked or locked gateways; links to them watch this.
    barred_gateways: watch::Sender<Vec<String>>,
}

impl Default for Locks {
    fn default() -> Self {
        Self {
            specs: RwLock::new(Vec::new()),
            users: RwLock::new(Vec::new()),
            barred_gateways: watch::Sender::new(Vec::new()),
        }
    }
}

impl Locks {
    /// Refuses `target` while a lock this gateway knows of is active on it ("user U is
    /// locked: MESSAGE", "device D is locked: MESSAGE").
    pub fn check_unlocked(&self, target: &LockTarget) -> Result<(), RpcError> {
        let now = edgeport_net::clock::now_secs();
        let message = self.specs.read().ok().and_then(|locks| {
            locks
                .iter()
                .find(|l| &l.target == target && (l.expires == 0 || l.expires > now))
                .map(|l| l.message.clone())
        });
        let Some(m) = message else { return Ok(()) };
        Err(RpcError::new(ErrorKind::Locked, lock_reason(target, &m)))
    }

    /// Replaces the lock list with the acknowledgement's.
    pub fn set_specs(&self, specs: Vec<LockSpec>) {
        if let Ok(mut locks) = self.specs.write() {
            crate::metrics::METRICS.locks.set(specs.len() as i64);
            *locks = specs;
        }
    }

    /// Whether gateway `id` was revoked or locked, as of the latest acknowledgement.
    pub fn gateway_barred(&self, id: &str) -> bool {
        self.barred_gateways.borrow().iter().any(|g| g == id)
    }

    /// Changes of the barred gateways, for a link that must close when its peer is barred.
    pub fn watch_barred(&self) -> watch::Receiver<Vec<String>> {
        self.barred_gateways.subscribe()
    }

    /// Sets the barred gateways (sorted, without repeats); logs each newly barred one.
    pub fn set_barred(&self, mut barred: Vec<String>) {
        barred.sort();
        barred.dedup();
        self.barred_gateways.send_if_modified(|cur| {
            if *cur == barred {
                return false;
            }
            for g in barred.iter().filter(|g| !cur.contains(g)) {
                tracing::warn!(gateway = %g, "gateway revoked or locked by the authority: refusing its forwarded dials");
            }
            *cur = barred;
            true
        });
    }

    pub fn locked_users(&self) -> Vec<String> {
        self.users.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sets the locked users (sorted); whether they changed (agents are then told).
    pub fn set_locked_users(&self, users: &[String]) -> bool {
        match self.users.write() {
            Ok(mut cur) if *cur != users => {
                *cur = users.to_vec();
                true
            }
            _ => false,
        }
    }
}

/// What a lock on `target` tells the user: "device D is locked: MESSAGE", or without the
/// colon when the administrator gave no message.
pub fn lock_reason(target: &LockTarget, message: &str) -> String {
    let what = match target {
        LockTarget::User(u) => format!("user {u}"),
        LockTarget::Device(d) => format!("device {d}"),
        LockTarget::Gateway(g) => format!("gateway {g}"),
    };
    if message.is_empty() {
        format!("{what} is locked")
    } else {
        format!("{what} is locked: {message}")
    }
}
