//! Dial grants: the authority's `AuthorizeDial` answers, kept per (user, target).
//!
//! While the gateway watches the authority's policy epoch ([`crate::policy`]) and that
//! authority sees every change (its own store), a grant is reused for [`REUSE`] on every path
//! until the epoch moves: a lock, a role change or a removed device makes the authority move
//! it, and `tctl lock` returns only after this gateway has dropped its grants. Without such a
//! watch (it broke, or the authorities share PostgreSQL) SSH dials ask the authority every
//! time and the Kubernetes front door reuses a grant for [`KUBE_REUSE`] (kubectl sends many
//! requests per command), as locks reach it within that time or at the next presence
//! acknowledgement. While the authority is unreachable, a grant from the last [`OUTAGE`]
//! still admits its user on either path (locks the gateway knows still apply), so sessions
//! on devices keep working and keep being audited on the device. A refusal drops the
//! remembered grant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgeport_proto::rpc::{DialGrant, ErrorKind, Request, Response, RpcError};
use edgeport_proto::rpc_client::RpcClientError;

use crate::authority::AuthorityClient;

/// How long a grant is reused while the policy watch is live (and the epoch unchanged).
pub const REUSE: Duration = Duration::from_secs(30);
/// How long the Kubernetes front door reuses a grant without a live policy watch.
pub const KUBE_REUSE: Duration = Duration::from_secs(5);
/// How long a grant still admits its user while the authority cannot be reached.
pub const OUTAGE: Duration = Duration::from_secs(600);
/// Grants kept at most (one per user and device dialled in the last [`OUTAGE`]).
const MAX_ENTRIES: usize = 100_000;

type Key = (String, String);

/// When a grant was given, under which policy epoch, and the grant.
type Entry = (Instant, u64, DialGrant);

#[derive(Default)]
pub struct Grants {
    map: Mutex<HashMap<Key, Entry>>,
    /// Moves with the authority's policy epoch (and when the watch breaks): grants of an
    /// older one are not reused (they still serve the outage fallback).
    epoch: AtomicU64,
    /// The policy watch is live on an authority that sees every change.
    watched: AtomicBool,
}

impl Grants {
    /// Grants given before this are not reused.
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the policy watch is live on an authority that sees every change.
    pub fn set_watched(&self, on: bool) {
        self.watched.store(on, Ordering::SeqCst);
    }

    /// May `user` reach `target`? A grant younger than [`REUSE`] (with a live policy watch,
    /// else `unwatched_reuse`) from the current policy epoch, else the authority's answer,
    /// else (authority unreachable) one younger than [`OUTAGE`].
    pub async fn authorize(
        &self,
        auth: &AuthorityClient,
        user: &str,
        target: &str,
        unwatched_reuse: Duration,
    ) -> Result<DialGrant, RpcError> {
        let key = (user.to_string(), target.to_string());
        let epoch = self.epoch.load(Ordering::SeqCst);
        let reuse = if self.watched.load(Ordering::SeqCst) {
            REUSE
        } else {
            unwatched_reuse
        };
        if let Some(g) = self.recent(&key, reuse, true) {
            return Ok(g);
        }
        self.ask(auth, key, epoch).await
    }

    /// The authority's answer now, never a reused grant (else, authority unreachable, one
    /// younger than [`OUTAGE`]): for a dial whose reused grant put the device where it is not.
    pub async fn refresh(
        &self,
        auth: &AuthorityClient,
        user: &str,
        target: &str,
    ) -> Result<DialGrant, RpcError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.ask(auth, (user.to_string(), target.to_string()), epoch)
            .await
    }

    async fn ask(
        &self,
        auth: &AuthorityClient,
        key: Key,
        epoch: u64,
    ) -> Result<DialGrant, RpcError> {
        let req = Request::AuthorizeDial {
            user: key.0.clone(),
            device: key.1.clone(),
        };
        match auth.call(req).await {
            Ok(Response::DialAllowed(g)) => {
                self.remember(key, epoch, &g);
                Ok(g)
            }
            Ok(Response::Error(e)) | Err(RpcClientError::Remote(e)) => {
                self.forget(&key);
                Err(e)
            }
            Ok(other) => Err(RpcError::new(
                ErrorKind::Internal,
                edgeport_proto::rpc_client::unexpected(other).to_string(),
            )),
            Err(e) => match self.recent(&key, OUTAGE, false) {
                Some(g) => {
                    let (user, target) = (&key.0, &key.1);
                    tracing::warn!(%user, %target, "authority unreachable ({e}); using a recent grant");
                    Ok(g)
                }
                None => Err(crate::identity::unavailable(&e)),
            },
        }
    }

    /// A grant younger than `within` (and, with `current`, of the policy epoch as it is now:
    /// read here, not when the dial started, so a change acknowledged in between counts).
    fn recent(&self, key: &Key, within: Duration, current: bool) -> Option<DialGrant> {
        let m = self.map.lock().ok()?;
        let now = self.epoch.load(Ordering::SeqCst);
        m.get(key)
            .filter(|(at, e, _)| at.elapsed() < within && (!current || *e == now))
            .map(|(_, _, g)| g.clone())
    }

    fn remember(&self, key: Key, epoch: u64, g: &DialGrant) {
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= MAX_ENTRIES {
                m.retain(|_, (at, _, _)| at.elapsed() < OUTAGE);
            }
            if m.len() < MAX_ENTRIES {
                m.insert(key, (Instant::now(), epoch, g.clone()));
            }
        }
    }

    fn forget(&self, key: &Key) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(key);
        }
    }
}
