//! Presence: the gateway tells the authority which devices it holds, as a full snapshot with
//! a lease, every few seconds and soon after any change. If the gateway dies the lease runs
//! out and its devices read offline, so `online` in the inventory can be trusted. The
//! acknowledgement carries revocations (close and refuse those tunnels) and locks.

use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::frame::chunk_by_size;
use edgeport_proto::rpc::{
    DevicePresence, LockTarget, PresenceAck, PresenceReport, Request, Response,
};

use crate::authority::AuthorityClient;
use crate::lifecycle::Lifecycle;
use crate::locks::Locks;
use crate::sessions::Sessions;
use crate::tunnels::Tunnels;

/// What presence reports need: the authority, the tunnels reported, and what the
/// acknowledgement acts on (sessions cut by locks, the lock list, the gateway's lifetime,
/// which a revocation ends).
pub struct Reporter {
    pub auth: Arc<AuthorityClient>,
    pub tunnels: Arc<Tunnels>,
    pub sessions: Arc<Sessions>,
    pub locks: Arc<Locks>,
    pub life: Lifecycle,
    /// How often a full snapshot goes out, and how long the authority trusts it.
    pub interval: Duration,
    pub lease: Duration,
    /// Where peer gateways reach this one, reported with each snapshot.
    pub peer_addr: Option<String>,
    /// Held while a report is in flight (the presence loop and the policy watch both send
    /// them).
    reporting: tokio::sync::Mutex<()>,
}

impl Reporter {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        auth: Arc<AuthorityClient>,
        tunnels: Arc<Tunnels>,
        sessions: Arc<Sessions>,
        locks: Arc<Locks>,
        life: Lifecycle,
        interval: Duration,
        lease: Duration,
        peer_addr: Option<String>,
    ) -> Self {
        Self {
            auth,
            tunnels,
            sessions,
            locks,
            life,
            interval,
            lease,
            peer_addr,
            reporting: tokio::sync::Mutex::new(()),
        }
    }
}

/// How long agents get to end a locked user's sessions before the gateway cuts them.
const USER_LOCK_GRACE: Duration = Duration::from_secs(5);

/// Changes are batched for this long before a report goes out.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// How often the tunnels' addresses are compared with the last seen: a device whose QUIC
/// connection migrated (it changed networks) is logged and reported at once.
const PATH_CHECK: Duration = Duration::from_secs(1);

pub async fn run(rep: Arc<Reporter>) {
    let mut tick = tokio::time::interval(rep.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paths = tokio::time::interval(PATH_CHECK);
    paths.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = paths.tick() => {
                if !paths_changed(&rep) {
                    continue;
                }
            }
            _ = rep.tunnels.changed.notified() => {
                tokio::select! {
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                    _ = rep.life.shutdown.cancelled() => return,
                }
            }
            _ = rep.life.shutdown.cancelled() => return,
        }
        match report(&rep).await {
            Err(ReportError::Revoked(why)) => {
                // Its certificate buys nothing any more: close every tunnel so the agents
                // look for another gateway, and stop.
                tracing::error!("the authority refuses this gateway ({why}); stopping");
                rep.life.revoke();
                return;
            }
            Ok(()) if !healthy => {
                tracing::info!("presence reports reach the authority again");
                healthy = true;
            }
            Ok(()) => {}
            Err(e) if healthy => {
                tracing::warn!("presence report failed (tunnels stay up; retrying): {e}");
                healthy = false;
            }
            Err(e) => tracing::debug!("presence report failed again: {e}"),
        }
    }
}

/// Logs every tunnel whose device address changed since the last look (a QUIC connection
/// migration: the device moved to another network and its session went on); whether any did.
fn paths_changed(rep: &Reporter) -> bool {
    let mut any = false;
    for t in rep.tunnels.all() {
        if let Some((from, to)) = t.path_changed() {
            tracing::info!(device = %t.device_id, %from, %to, "device path changed (connection migrated)");
            any = true;
        }
    }
    any
}

/// Why a report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The authority revoked or locked this gateway: it must stop serving.
    #[error("{0}")]
    Revoked(String),
    #[error("{0}")]
    Failed(String),
}

async fn call(rep: &Reporter, req: Request) -> Result<PresenceAck, ReportError> {
    use edgeport_net::rpc_client::RpcClientError;
    use edgeport_proto::rpc::ErrorKind;
    match rep.auth.call(req).await {
        Ok(Response::PresenceAck(ack)) => Ok(ack),
        Ok(Response::Error(e)) | Err(RpcClientError::Remote(e))
            if e.kind == ErrorKind::GatewayRevoked =>
        {
            Err(ReportError::Revoked(e.message))
        }
        Ok(other) => Err(ReportError::Failed(
            edgeport_net::rpc_client::unexpected(other).to_string(),
        )),
        Err(e) => Err(ReportError::Failed(e.to_string())),
    }
}

/// Sends one report part; for an acknowledgement with `more`, gathers every further part of
/// the lists into it (a gateway never acts on half a list of locks).
async fn send(rep: &Reporter, report: PresenceReport) -> Result<PresenceAck, ReportError> {
    let mut ack = call(rep, Request::Presence(report)).await?;
    let mut part = 1;
    while ack.more {
        let next = call(
            rep,
            Request::PresenceAckPart {
                part,
                digest: ack.digest.clone(),
            },
        )
        .await?;
        ack.locks.extend(next.locks);
        ack.revoked_devices.extend(next.revoked_devices);
        ack.revoked_gateways.extend(next.revoked_gateways);
        ack.over_budget.extend(next.over_budget);
        ack.more = next.more;
        part += 1;
    }
    Ok(ack)
}

/// Splits a snapshot into reports that each fit in one frame: the online devices first, then
/// the disconnected ones; every part but the last says `more`.
fn parts(
    lease_secs: u64,
    peer_addr: Option<String>,
    online: Vec<DevicePresence>,
    disconnected: Vec<(String, String)>,
) -> Vec<PresenceReport> {
    let mut out: Vec<PresenceReport> = Vec::new();
    for chunk in chunk_by_size(online) {
        if !chunk.is_empty() || out.is_empty() {
            out.push(PresenceReport {
                lease_secs,
                online: chunk,
                ..Default::default()
            });
        }
    }
    for chunk in chunk_by_size(disconnected) {
        if chunk.is_empty() {
            continue;
        }
        out.push(PresenceReport {
            lease_secs,
            disconnected: chunk,
            ..Default::default()
        });
    }
    let n = out.len();
    for (i, p) in out.iter_mut().enumerate() {
        p.part = i as u32;
        p.more = i + 1 < n;
        p.peer_addr = peer_addr.clone();
    }
    out
}

/// Sends every part of a snapshot; returns the acknowledgement of the last.
async fn send_all(
    rep: &Reporter,
    reports: Vec<PresenceReport>,
) -> Result<PresenceAck, ReportError> {
    let mut last = PresenceAck::default();
    for r in reports {
        last = send(rep, r).await?;
    }
    Ok(last)
}

/// Sends one snapshot and applies the acknowledgement. One report at a time: the parts of two
/// snapshots must not interleave at the authority.
pub async fn report(rep: &Reporter) -> Result<(), ReportError> {
    let _one = rep.reporting.lock().await;
    let disconnected = rep.tunnels.take_disconnected();
    let mut reports = parts(
        rep.lease.as_secs(),
        rep.peer_addr.clone(),
        rep.tunnels.snapshot(),
        disconnected.clone(),
    );
    for r in &mut reports {
        r.version = edgeport_proto::VERSION.to_string();
    }
    match send_all(rep, reports).await {
        Ok(ack) => {
            apply(rep, ack);
            Ok(())
        }
        Err(e) => {
            rep.tunnels.restore_disconnected(disconnected);
            Err(e)
        }
    }
}

fn apply(rep: &Reporter, ack: PresenceAck) {
    for (id, connected_at) in &ack.superseded {
        // Only the very tunnel that was reported: the device may have come back since.
        if let Some(t) = rep
            .tunnels
            .get(id)
            .filter(|t| t.connected_at == *connected_at)
        {
            tracing::info!(device = %id, "the device has a newer tunnel at another gateway; closing this one");
            t.close("replaced by a newer tunnel at another gateway");
        }
    }
    rep.tunnels.set_over_budget(&ack.over_budget);
    for id in &ack.revoked_devices {
        if rep.tunnels.get(id).is_some() {
            tracing::info!(device = %id, "device was removed from the cluster; closing its tunnel");
            rep.tunnels.revoke(
                id,
                &format!("device {id} was removed from the cluster; join again with a new token"),
                &rep.life.tasks,
            );
        }
    }
    let now = edgeport_net::clock::now_secs();
    // Each locked user and device once, with what the user is told.
    let mut users: Vec<(String, String)> = Vec::new();
    let mut devices: Vec<(String, String)> = Vec::new();
    for l in ack
        .locks
        .iter()
        .filter(|l| l.expires == 0 || l.expires > now)
    {
        let reason = crate::locks::lock_reason(&l.target, &l.message);
        match &l.target {
            LockTarget::User(u) if !users.iter().any(|(n, _)| n == u) => {
                users.push((u.clone(), reason))
            }
            LockTarget::Device(d) if !devices.iter().any(|(n, _)| n == d) => {
                devices.push((d.clone(), reason))
            }
            _ => {}
        }
    }
    // Locks take effect at once. A locked device cannot be trusted to end its own sessions:
    // the gateway cuts them now. A locked user's sessions are ended by the agents, which tell
    // the client why; whatever is still spliced a few seconds later is cut here as well.
    let cut = rep.sessions.cut(&cut_targets(&devices), &[]);
    if cut > 0 {
        tracing::info!(sessions = cut, "ended sessions to locked devices");
    }
    if !users.is_empty() && rep.sessions.count() > 0 {
        let sessions = rep.sessions.clone();
        let users = users.clone();
        rep.life.tasks.spawn(async move {
            tokio::time::sleep(USER_LOCK_GRACE).await;
            let cut = sessions.cut(&[], &cut_targets(&users));
            if cut > 0 {
                tracing::info!(sessions = cut, "ended sessions of locked users");
            }
        });
    }
    rep.locks.set_specs(ack.locks);
    rep.locks.set_barred(ack.revoked_gateways);
    let mut users: Vec<String> = users.into_iter().map(|(name, _)| name).collect();
    users.sort();
    let changed = rep.locks.set_locked_users(&users);
    if changed {
        // Agents end the sessions of locked users at once (DESIGN section 6).
        for t in rep.tunnels.all() {
            let _ = t
                .control
                .try_send(crate::tunnels::Outside::Locked(users.clone()));
        }
    }
}

/// On shutdown: every device this gateway held is offline now (best effort, short).
pub async fn final_report(rep: &Reporter, reason: &str) {
    let _one = tokio::time::timeout(Duration::from_secs(1), rep.reporting.lock()).await;
    let mut disconnected = rep.tunnels.take_disconnected();
    disconnected.extend(
        rep.tunnels
            .all()
            .iter()
            .map(|t| (t.device_id.clone(), reason.to_string())),
    );
    let reports = parts(
        rep.lease.as_secs(),
        rep.peer_addr.clone(),
        Vec::new(),
        disconnected,
    );
    if let Err(e) = tokio::time::timeout(Duration::from_secs(3), send_all(rep, reports))
        .await
        .unwrap_or_else(|_| Err(ReportError::Failed("timed out".into())))
    {
        tracing::warn!("final presence report failed: {e}");
    }
}

fn cut_targets(named: &[(String, String)]) -> Vec<crate::sessions::CutTarget<'_>> {
    named
        .iter()
        .map(|(name, reason)| crate::sessions::CutTarget { name, reason })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::rpc::Transport;

    fn presence(i: usize) -> DevicePresence {
        DevicePresence {
            id: format!("device-{i:05}"),
            labels: [("fleet".to_string(), "vans".to_string())].into(),
            version: "0.1.0".into(),
            arch: "aarch64".into(),
            transport: Transport::Quic,
            address: "203.0.113.7:40000".into(),
            rtt_ms: 40,
            connected_at: 1,
            kube_cluster: None,
            loss_permille: Some(3),
            usage: None,
            proof: Some(edgeport_proto::attest::TunnelProof {
                gateway: "gateway-1".into(),
                signed_at_ms: 1_700_000_000_000,
                signature: vec![7; 64],
            }),
        }
    }

    #[test]
    fn large_snapshots_go_in_parts_that_fit_a_frame() {
        let online: Vec<_> = (0..10_000).map(presence).collect();
        let gone: Vec<_> = (0..3_000)
            .map(|i| (format!("old-{i}"), "connection lost".to_string()))
            .collect();
        let reports = parts(45, None, online, gone);
        assert!(reports.len() > 2);
        let mut ids = 0;
        for (i, r) in reports.iter().enumerate() {
            assert!(edgeport_proto::frame::encode(&Request::Presence(r.clone())).is_ok());
            assert_eq!(r.part as usize, i);
            assert_eq!(r.more, i + 1 < reports.len());
            ids += r.online.len();
        }
        assert_eq!(ids, 10_000);
        let small = parts(45, None, vec![presence(1)], vec![]);
        assert_eq!(small.len(), 1);
        assert!(!small[0].more);
        let empty = parts(45, None, vec![], vec![]);
        assert_eq!(empty.len(), 1, "an empty snapshot still renews the lease");
    }
}
