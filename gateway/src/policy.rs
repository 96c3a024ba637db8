//! The gateway's watch on the authority's policy epoch (see the authority's `policy`
//! module): a long poll on a connection of its own. When the epoch moves, reusable grants
//! are dropped before the next poll acknowledges it, and locks are fetched again with a
//! presence report. While the watch is down, grants are not reused (beyond the unwatched
//! limits in [`crate::grants`]).

use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::rpc::{Request, Response};

use crate::ctx::Ctx;

/// Wait before reconnecting a broken watch.
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(ctx: Arc<Ctx>) {
    let mut healthy = true;
    loop {
        if let Err(e) = watch(&ctx).await {
            ctx.grants.set_watched(false);
            ctx.grants.invalidate();
            if healthy {
                tracing::warn!("policy watch on the authority broke ({e}); asking it for every dial until it is back");
                healthy = false;
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
        if !healthy {
            tracing::debug!("reconnecting the policy watch");
        }
    }
}

/// One connection's worth of watching; returns when it fails (or at shutdown, Ok).
async fn watch(ctx: &Ctx) -> Result<(), String> {
    let mut client = ctx.auth.dedicated().await.map_err(|e| e.to_string())?;
    // An epoch the authority never has: the first answer comes at once.
    let mut seen = 0;
    loop {
        let call = client.call(Request::WatchPolicy { seen });
        let resp = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            r = call => r.map_err(|e| e.to_string())?,
        };
        let Response::Policy { epoch, exclusive } = resp else {
            return Err(edgeport_proto::rpc_client::unexpected(resp).to_string());
        };
        if epoch != seen {
            ctx.grants.invalidate();
            if seen != 0 {
                tracing::debug!(epoch, "policy changed at the authority; grants dropped");
                // Fetch the lock list now rather than at the next presence tick.
                ctx.tunnels.changed.notify_one();
            }
        }
        ctx.grants.set_watched(exclusive);
        seen = epoch;
    }
}
