//! Dial grants: the authority's `AuthorizeDial` answers, kept per (user certificate, target).
//!
//! Every answer carries the authority's signed ticket for one dial (`edgeport_proto::ticket`);
//! kept grants never do. A dial that needs a ticket asks the authority each time
//! ([`Grants::ticketed`]): Kubernetes requests (the agent impersonates only whom a ticket
//! names) and forwarded dials (the holding gateway takes none without one). SSH dials to a
//! device held here need none: the device checks the user's own SSH certificate.
//!
//! While the gateway watches the authority's policy epoch (the `policy` module) and that
//! authority sees every change (its own store), a grant is reused for [`REUSE`] until the
//! epoch moves: a lock, a role change or a removed device makes the authority move it, and
//! `tctl lock` returns only after this gateway has dropped its grants. Without such a watch (it
//! broke, or the authorities share PostgreSQL) SSH dials ask the authority every time. While
//! the authority is unreachable, a grant from the last [`OUTAGE`] still admits its user to
//! devices held here (locks the gateway knows still apply), so SSH sessions keep working and
//! keep being audited on the device. A refusal drops the remembered grant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeport_net::rpc_client::RpcClientError;
use edgeport_proto::rpc::{DialGrant, ErrorKind, Request, Response, RpcError};
use edgeport_proto::tunnel::Service;

use crate::authority::AuthorityClient;

/// How long a grant is reused while the policy watch is live (and the epoch unchanged).
pub const REUSE: Duration = Duration::from_secs(30);
/// How long a grant still admits its user while the authority cannot be reached.
pub const OUTAGE: Duration = Duration::from_secs(600);
/// Grants kept at most (one per user and device dialled in the last [`OUTAGE`]).
const MAX_ENTRIES: usize = 100_000;

/// The user behind a dial, as the authority must see them: the certificate they presented
/// (the authority checks it and names the user from it; the gateway's word counts for nothing).
#[derive(Clone, Debug)]
pub struct UserCert {
    /// The user the certificate names (verified by this gateway's TLS handshake).
    pub name: String,
    /// The certificate, DER.
    pub der: Arc<Vec<u8>>,
    /// Hex SHA-256 of `der`: grants are kept per certificate.
    pub digest: String,
}

impl UserCert {
    pub fn new(name: String, der: Vec<u8>) -> Self {
        let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &der));
        Self {
            name,
            der: Arc::new(der),
            digest,
        }
    }
}

/// (certificate digest, target): the target is the device, or `DEVICE/TARGET` for a host
/// behind it (whose labels, and so the answer, differ from the device's).
type Key = (String, String);

fn key(who: &UserCert, target: &str, service: &Service) -> Key {
    let target = match service {
        Service::Target(t) => format!("{target}/{t}"),
        _ => target.to_string(),
    };
    (who.digest.clone(), target)
}

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

    /// May `who` reach `target`? A grant younger than [`REUSE`] (with a live policy watch,
    /// else `unwatched_reuse`) from the current policy epoch, else the authority's answer,
    /// else (authority unreachable) one younger than [`OUTAGE`]. A reused grant carries no
    /// ticket.
    pub async fn authorize(
        &self,
        auth: &AuthorityClient,
        who: &UserCert,
        target: &str,
        service: Service,
        unwatched_reuse: Duration,
    ) -> Result<DialGrant, RpcError> {
        let key = key(who, target, &service);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let reuse = if self.watched.load(Ordering::SeqCst) {
            REUSE
        } else {
            unwatched_reuse
        };
        if let Some(g) = self.recent(&key, reuse, true) {
            return Ok(g);
        }
        self.ask(auth, who, target, service, epoch, true).await
    }

    /// The authority's answer now, with a fresh ticket for one dial of `service`: never a
    /// reused grant, and no outage fallback (a holding gateway or an agent would refuse a
    /// dial without a ticket anyway; and a dial whose reused grant put the device where it
    /// is not learns nothing from an old one).
    pub async fn ticketed(
        &self,
        auth: &AuthorityClient,
        who: &UserCert,
        target: &str,
        service: Service,
    ) -> Result<DialGrant, RpcError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.ask(auth, who, target, service, epoch, false).await
    }

    async fn ask(
        &self,
        auth: &AuthorityClient,
        who: &UserCert,
        target: &str,
        service: Service,
        epoch: u64,
        outage_fallback: bool,
    ) -> Result<DialGrant, RpcError> {
        let key = key(who, target, &service);
        let req = Request::AuthorizeDial {
            user_cert_der: who.der.as_ref().clone(),
            device: target.to_string(),
            service,
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
                edgeport_net::rpc_client::unexpected(other).to_string(),
            )),
            Err(e) => match self.recent(&key, OUTAGE, false).filter(|_| outage_fallback) {
                Some(g) => {
                    let user = &who.name;
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
                // A ticket is for one dial: kept grants never carry one.
                let kept = DialGrant {
                    ticket: None,
                    ..g.clone()
                };
                m.insert(key, (Instant::now(), epoch, kept));
            }
        }
    }

    fn forget(&self, key: &Key) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(key);
        }
    }
}
