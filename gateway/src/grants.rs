//! Dial grants: the authority's `AuthorizeDial` answers, kept per (user, target).
//!
//! The Kubernetes front door reuses a grant for [`KUBE_REUSE`]: kubectl sends many requests
//! per command, each would otherwise cost an authority round trip, and a lock made at the
//! authority reaches it within that time or at the next presence acknowledgement. SSH dials
//! ask the authority every time (reuse zero), so that `tctl lock` stops new sessions at once.
//! While the authority is unreachable, a grant from the last [`OUTAGE`] still admits its
//! user on either path (locks the gateway knows still apply), so sessions on devices keep
//! working and keep being audited on the device. A refusal drops the remembered grant.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgeport_proto::rpc::{DialGrant, ErrorKind, Request, Response, RpcError};
use edgeport_proto::rpc_client::RpcClientError;

use crate::authority::AuthorityClient;

/// How long the Kubernetes front door reuses a grant without asking the authority again.
pub const KUBE_REUSE: Duration = Duration::from_secs(5);
/// How long a grant still admits its user while the authority cannot be reached.
pub const OUTAGE: Duration = Duration::from_secs(600);
/// Grants kept at most (one per user and device dialled in the last [`OUTAGE`]).
const MAX_ENTRIES: usize = 100_000;

type Key = (String, String);

#[derive(Default)]
pub struct Grants {
    map: Mutex<HashMap<Key, (Instant, DialGrant)>>,
}

impl Grants {
    /// May `user` reach `target`? A grant younger than `reuse`, else the authority's answer,
    /// else (authority unreachable) one younger than [`OUTAGE`].
    pub async fn authorize(
        &self,
        auth: &AuthorityClient,
        user: &str,
        target: &str,
        reuse: Duration,
    ) -> Result<DialGrant, RpcError> {
        let key = (user.to_string(), target.to_string());
        if let Some(g) = self.recent(&key, reuse) {
            return Ok(g);
        }
        let req = Request::AuthorizeDial {
            user: user.to_string(),
            device: target.to_string(),
        };
        match auth.call(req).await {
            Ok(Response::DialAllowed(g)) => {
                self.remember(key, &g);
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
            Err(e) => match self.recent(&key, OUTAGE) {
                Some(g) => {
                    tracing::warn!(%user, %target, "authority unreachable ({e}); using a recent grant");
                    Ok(g)
                }
                None => Err(crate::identity::unavailable(&e)),
            },
        }
    }

    fn recent(&self, key: &Key, within: Duration) -> Option<DialGrant> {
        let m = self.map.lock().ok()?;
        m.get(key)
            .filter(|(at, _)| at.elapsed() < within)
            .map(|(_, g)| g.clone())
    }

    fn remember(&self, key: Key, g: &DialGrant) {
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= MAX_ENTRIES {
                m.retain(|_, (at, _)| at.elapsed() < OUTAGE);
            }
            if m.len() < MAX_ENTRIES {
                m.insert(key, (Instant::now(), g.clone()));
            }
        }
    }

    fn forget(&self, key: &Key) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(key);
        }
    }
}
