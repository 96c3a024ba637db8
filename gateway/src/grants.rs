//! Dial grants: the authority's `AuthorizeDial` answers, kept per (user, target).
//!
//! A grant is reused for [`REUSE`]: kubectl sends many requests per command and scripts run
//! `tsh ssh` against one device in a loop, and each authority round trip is about 200 µs of
//! a dial's latency. Role or user changes at the authority therefore reach new dials within
//! [`REUSE`]; locks apply at once regardless, because callers check the lock list the
//! gateway holds before and after asking here. While the authority is unreachable, a grant
//! from the last [`OUTAGE`] still admits its user, so sessions on devices keep working and
//! keep being audited on the device. A refusal drops the remembered grant.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgeport_proto::rpc::{DialGrant, ErrorKind, Request, Response, RpcError};
use edgeport_proto::rpc_client::RpcClientError;

use crate::authority::AuthorityClient;

/// How long a grant is reused without asking the authority again.
pub const REUSE: Duration = Duration::from_secs(5);
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
    /// May `user` reach `target`? The answer of the authority, or a recent one (see the
    /// module documentation).
    pub async fn authorize(
        &self,
        auth: &AuthorityClient,
        user: &str,
        target: &str,
    ) -> Result<DialGrant, RpcError> {
        let key = (user.to_string(), target.to_string());
        if let Some(g) = self.recent(&key, REUSE) {
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
