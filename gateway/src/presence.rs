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

use crate::ctx::Ctx;

/// How long agents get to end a locked user's sessions before the gateway cuts them.
const USER_LOCK_GRACE: Duration = Duration::from_secs(5);

/// Changes are batched for this long before a report goes out.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// How often the tunnels' addresses are compared with the last seen: a device whose QUIC
/// connection migrated (it changed networks) is logged and reported at once.
const PATH_CHECK: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.cfg.presence_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paths = tokio::time::interval(PATH_CHECK);
    paths.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = paths.tick() => {
                if !paths_changed(&ctx) {
                    continue;
                }
            }
            _ = ctx.tunnels.changed.notified() => {
                tokio::select! {
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                    _ = ctx.shutdown.cancelled() => return,
                }
            }
            _ = ctx.shutdown.cancelled() => return,
        }
        match report(&ctx).await {
            Err(ReportError::Revoked(why)) => {
                // Its certificate buys nothing any more: close every tunnel so the agents
                // look for another gateway, and stop.
                tracing::error!("the authority refuses this gateway ({why}); stopping");
                ctx.revoked.cancel();
                ctx.shutdown.cancel();
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
fn paths_changed(ctx: &Ctx) -> bool {
    let mut any = false;
    for t in ctx.tunnels.all() {
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

async fn call(ctx: &Ctx, req: Request) -> Result<PresenceAck, ReportError> {
    use edgeport_net::rpc_client::RpcClientError;
    use edgeport_proto::rpc::ErrorKind;
    match ctx.auth.call(req).await {
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
async fn send(ctx: &Ctx, report: PresenceReport) -> Result<PresenceAck, ReportError> {
    let mut ack = call(ctx, Request::Presence(report)).await?;
    let mut part = 1;
    while ack.more {
        let next = call(
            ctx,
            Request::PresenceAckPart {
                part,
                digest: ack.digest.clone(),
            },
        )
        .await?;
        ack.locks.extend(next.locks);
        ack.revoked_devices.extend(next.revoked_devices);
        ack.revoked_gateways.extend(next.revoked_gateways);
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
async fn send_all(ctx: &Ctx, reports: Vec<PresenceReport>) -> Result<PresenceAck, ReportError> {
    let mut last = PresenceAck::default();
    for r in reports {
        last = send(ctx, r).await?;
    }
    Ok(last)
}

/// Sends one snapshot and applies the acknowledgement. One report at a time: the parts of two
/// snapshots must not interleave at the authority.
pub async fn report(ctx: &Arc<Ctx>) -> Result<(), ReportError> {
    let _one = ctx.reporting.lock().await;
    let disconnected = ctx.tunnels.take_disconnected();
    let mut reports = parts(
        ctx.cfg.presence_lease.as_secs(),
        ctx.cfg.peer_addr.clone(),
        ctx.tunnels.snapshot(),
        disconnected.clone(),
    );
    for r in &mut reports {
        r.version = edgeport_proto::VERSION.to_string();
    }
    match send_all(ctx, reports).await {
        Ok(ack) => {
            apply(ctx, ack);
            Ok(())
        }
        Err(e) => {
            ctx.tunnels.restore_disconnected(disconnected);
            Err(e)
        }
    }
}

fn apply(ctx: &Arc<Ctx>, ack: PresenceAck) {
    for (id, connected_at) in &ack.superseded {
        // Only the very tunnel that was reported: the device may have come back since.
        if let Some(t) = ctx
            .tunnels
            .get(id)
            .filter(|t| t.connected_at == *connected_at)
        {
            tracing::info!(device = %id, "the device has a newer tunnel at another gateway; closing this one");
            t.close("replaced by a newer tunnel at another gateway");
        }
    }
    for id in &ack.revoked_devices {
        if ctx.tunnels.get(id).is_some() {
            tracing::info!(device = %id, "device was removed from the cluster; closing its tunnel");
            ctx.tunnels.revoke(
                id,
                &format!("device {id} was removed from the cluster; join again with a new token"),
                &ctx.tasks,
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
        let reason = crate::ctx::lock_reason(&l.target, &l.message);
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
    let cut = ctx.sessions.cut(&cut_targets(&devices), &[]);
    if cut > 0 {
        tracing::info!(sessions = cut, "ended sessions to locked devices");
    }
    if !users.is_empty() && ctx.sessions.count() > 0 {
        let ctx = ctx.clone();
        let users = users.clone();
        ctx.tasks.clone().spawn(async move {
            tokio::time::sleep(USER_LOCK_GRACE).await;
            let cut = ctx.sessions.cut(&[], &cut_targets(&users));
            if cut > 0 {
                tracing::info!(sessions = cut, "ended sessions of locked users");
            }
        });
    }
    if let Ok(mut locks) = ctx.locks.write() {
        crate::metrics::METRICS.locks.set(ack.locks.len() as i64);
        *locks = ack.locks;
    }
    let mut barred = ack.revoked_gateways;
    barred.sort();
    barred.dedup();
    ctx.barred_gateways.send_if_modified(|cur| {
        if *cur == barred {
            return false;
        }
        for g in barred.iter().filter(|g| !cur.contains(g)) {
            tracing::warn!(gateway = %g, "gateway revoked or locked by the authority: refusing its forwarded dials");
        }
        *cur = barred;
        true
    });
    let mut users: Vec<String> = users.into_iter().map(|(name, _)| name).collect();
    users.sort();
    let changed = match ctx.locked_users.write() {
        Ok(mut cur) if *cur != users => {
            *cur = users.clone();
            true
        }
        _ => false,
    };
    if changed {
        // Agents end the sessions of locked users at once (DESIGN section 6).
        for t in ctx.tunnels.all() {
            let _ = t
                .control
                .try_send(crate::tunnel::Outside::Locked(users.clone()));
        }
    }
}

/// On shutdown: every device this gateway held is offline now (best effort, short).
pub async fn final_report(ctx: &Ctx, reason: &str) {
    let _one = tokio::time::timeout(Duration::from_secs(1), ctx.reporting.lock()).await;
    let mut disconnected = ctx.tunnels.take_disconnected();
    disconnected.extend(
        ctx.tunnels
            .all()
            .iter()
            .map(|t| (t.device_id.clone(), reason.to_string())),
    );
    let reports = parts(
        ctx.cfg.presence_lease.as_secs(),
        ctx.cfg.peer_addr.clone(),
        Vec::new(),
        disconnected,
    );
    if let Err(e) = tokio::time::timeout(Duration::from_secs(3), send_all(ctx, reports))
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
