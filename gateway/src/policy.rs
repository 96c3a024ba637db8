//! The gateway's watch on the authority's policy epoch (see the authority's `policy`
//! module): a long poll on a connection of its own. When the epoch moves, reusable grants
//! are dropped and the lock list is fetched again (a presence report) before the next poll
//! acknowledges it, so a lock or an unlock is in force here when `tctl` returns. While the
//! watch is down, grants are not reused (beyond the unwatched limits in [`crate::grants`]).

use std::sync::Arc;
use std::time::Duration;

use edgeport_net::rpc_client::RpcClientError;
use edgeport_proto::rpc::{Request, Response};

use crate::authority::AuthorityClient;
use crate::grants::Grants;
use crate::presence::Reporter;

/// What the watch needs: the authority, the grants it drops, and the presence reporter that
/// fetches the lock list.
pub struct PolicyWatch {
    pub auth: Arc<AuthorityClient>,
    pub grants: Arc<Grants>,
    pub reporter: Arc<Reporter>,
}

/// Wait before reconnecting a broken watch.
const RETRY: Duration = Duration::from_secs(2);
/// How long fetching the lock list may hold up the acknowledgement (the authority waits
/// about as long for it).
const LOCKS_WAIT: Duration = Duration::from_millis(1500);

pub async fn run(w: Arc<PolicyWatch>) {
    let mut healthy = true;
    loop {
        if let Err(e) = watch(&w).await {
            w.grants.set_watched(false);
            w.grants.invalidate();
            if healthy {
                tracing::warn!("policy watch on the authority broke ({e}); asking it for every dial until it is back");
                healthy = false;
            }
        }
        tokio::select! {
            _ = w.reporter.life.shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
        if !healthy {
            tracing::debug!("reconnecting the policy watch");
        }
    }
}

/// One connection's worth of watching; returns when it fails (or at shutdown, Ok).
async fn watch(w: &PolicyWatch) -> Result<(), RpcClientError> {
    let mut client = w.auth.dedicated().await?;
    // An epoch the authority never has: the first answer comes at once.
    let mut seen = 0;
    loop {
        let call = client.call(Request::WatchPolicy { seen });
        let resp = tokio::select! {
            _ = w.reporter.life.shutdown.cancelled() => return Ok(()),
            r = call => r?,
        };
        let Response::Policy { epoch, exclusive } = resp else {
            return Err(edgeport_net::rpc_client::unexpected(resp));
        };
        if epoch != seen {
            w.grants.invalidate();
            if seen != 0 {
                tracing::debug!(epoch, "policy changed at the authority; grants dropped");
                // The lock list now, before acknowledging (the authority waits at most a
                // couple of seconds for that; a failed report is retried by the presence loop).
                let fetched =
                    tokio::time::timeout(LOCKS_WAIT, crate::presence::report(&w.reporter)).await;
                if !matches!(fetched, Ok(Ok(()))) {
                    tracing::debug!("lock list not fetched at once; the presence loop retries");
                    w.reporter.tunnels.changed.notify_one();
                }
            }
        }
        w.grants.set_watched(exclusive);
        seen = epoch;
    }
}
