//! The gateway's lifetime, as one cheap handle: the shutdown and revocation signals and the
//! tracker of connection and stream tasks that shutdown drains (mini-redis's listener,
//! handler and graceful drain).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// On shutdown, connection and stream tasks get this long to finish once their tunnels and
/// QUIC connections are closed; whatever is still running then is dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled on SIGINT/SIGTERM.
    pub shutdown: CancellationToken,
    /// Cancelled (before `shutdown`) when the authority refuses this gateway as revoked.
    pub revoked: CancellationToken,
    /// Tasks serving one connection or stream: spawned here, not detached, so shutdown
    /// waits (a bounded time) for them to finish instead of dropping them mid-way.
    pub tasks: TaskTracker,
}

impl Lifecycle {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            ..Self::default()
        }
    }

    /// The authority refused this gateway: stop everything, and say why at exit.
    pub fn revoke(&self) {
        self.revoked.cancel();
        self.shutdown.cancel();
    }

    /// Waits (up to [`DRAIN_TIMEOUT`]) for the connection and stream tasks to finish their
    /// replies, audit events and session bookkeeping.
    pub async fn drain(&self) {
        self.tasks.close();
        match tokio::time::timeout(DRAIN_TIMEOUT, self.tasks.wait()).await {
            Ok(()) => tracing::debug!("all connection tasks finished"),
            Err(_) => tracing::warn!(
                "{} connection task(s) still busy after {:?}; dropping them",
                self.tasks.len(),
                DRAIN_TIMEOUT
            ),
        }
    }
}
