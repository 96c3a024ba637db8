//! Sessions a device reported started and not yet ended, so that the authority can flag the
//! ones still open past their user certificate's expiry (issue 28). A session whose agent
//! died and never came back has a `session.start` and no `session.end`; the agent closes
//! such sessions itself when it restarts (`edge-agent/src/audit/open_sessions.rs`), and
//! what stays open after the certificate that opened it expired is worth a look: the device
//! is gone, its spool lost, or it keeps a session its policy should have ended.
//!
//! A flagged session gets one `session.overdue` event in the authority's own chain (so
//! `tctl audit search --type session.overdue` and any SIEM export see it) and is listed by
//! [`overdue`]. Several authorities sharing a store flag each session once: the flag is set by
//! compare-and-swap and only the winner records the event.

use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::audit::AuditEvent;
use edgeport_proto::rpc::{ErrorKind, RpcError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::service::Service;
use crate::store::{self, Store, Table};

pub const SESSION_START: &str = "session.start";
pub const SESSION_END: &str = "session.end";
pub const SESSION_OVERDUE: &str = "session.overdue";

/// How far past its certificate's expiry an open session must be to be flagged: device
/// clocks lag, and the `session.end` may still be in a spool on a cellular link.
pub const GRACE_SECS: u64 = 300;

/// How often the authority looks.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One session the log shows open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    pub device: String,
    pub user: String,
    pub login: String,
    /// When the device says it started (Unix ms, the device's clock).
    pub started_ms: u64,
    /// The user certificate's `valid_before` (Unix seconds); 0 when the agent did not say
    /// (an agent older than this field), and then the session is never flagged.
    pub cert_expires: u64,
    /// A `session.overdue` was recorded for it.
    #[serde(default)]
    pub flagged: bool,
    /// `shell`, `exec`, ... (the start event's `kind`).
    #[serde(default)]
    pub kind: String,
    /// Who joined it and is still there (`NAME (MODE)`), from `session.join` and
    /// `session.leave` events of the same device.
    #[serde(default)]
    pub participants: Vec<String>,
}

pub const SESSION_JOIN: &str = "session.join";
pub const SESSION_LEAVE: &str = "session.leave";
/// Most participants remembered per session.
const MAX_PARTICIPANTS: usize = 64;

fn internal(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(ErrorKind::Internal, e.to_string())
}

/// Notes a device's event: a `session.start` opens the session, its `session.end` (from the
/// same device) closes it. Other events are ignored.
pub fn observe(store: &dyn Store, device: &str, ev: &AuditEvent) -> Result<(), RpcError> {
    let sid = ev.session_id.as_str();
    if sid.is_empty() {
        return Ok(());
    }
    match ev.kind.as_str() {
        SESSION_START => {
            let open = OpenSession {
                device: device.to_string(),
                user: ev.user.clone(),
                login: ev.login.clone(),
                started_ms: ev.time_ms,
                cert_expires: ev.field("cert_expires").parse().unwrap_or(0),
                flagged: false,
                kind: ev.field("kind").to_string(),
                participants: Vec::new(),
            };
            let bytes = serde_json::to_vec(&open).map_err(internal)?;
            // The first start of an id counts; a replay or a second device changes nothing.
            store.compare_and_swap(Table::OpenSessions, sid, None, Some(bytes))?;
        }
        SESSION_END => {
            let open: Option<OpenSession> = store::get(store, Table::OpenSessions, sid)?;
            if open.is_some_and(|o| o.device == device) {
                store.delete(Table::OpenSessions, sid)?;
            }
        }
        SESSION_JOIN | SESSION_LEAVE => {
            let who = format!("{} ({})", ev.field("participant"), ev.field("mode"));
            // Compare-and-swap: a sweep or another authority may write the record meanwhile.
            for _ in 0..8 {
                let Some(cur) = store.get(Table::OpenSessions, sid)? else {
                    return Ok(());
                };
                let mut open: OpenSession = serde_json::from_slice(&cur).map_err(internal)?;
                if open.device != device {
                    return Ok(());
                }
                if ev.kind == SESSION_JOIN {
                    if open.participants.len() < MAX_PARTICIPANTS {
                        open.participants.push(who.clone());
                    }
                } else if let Some(i) = open.participants.iter().position(|p| *p == who) {
                    open.participants.remove(i);
                }
                let new = serde_json::to_vec(&open).map_err(internal)?;
                if store.compare_and_swap(Table::OpenSessions, sid, Some(&cur), Some(new))? {
                    break;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The live sessions `subject` may see (`tsh sessions ls`): their own, and those on devices
/// where their roles let them join in some mode. Every fact comes from device-signed events
/// the authority verified, never from a gateway.
pub fn live_for(
    store: &dyn Store,
    subject: &crate::users::Subject,
) -> Result<Vec<edgeport_proto::rpc::LiveSession>, RpcError> {
    let grants = crate::roles::grants(store, &subject.roles)?;
    let mut out = Vec::new();
    for (sid, open) in store::list::<OpenSession>(store, Table::OpenSessions, "")? {
        let own = open.user == subject.name;
        let may_join = || -> Result<bool, RpcError> {
            let Some(dev) = crate::devices::get(store, &open.device)? else {
                return Ok(false);
            };
            Ok(edgeport_proto::sshcert::JOIN_MODES
                .iter()
                .any(|m| grants.extension.may_join(&dev.labels, m)))
        };
        if own || may_join()? {
            out.push(edgeport_proto::rpc::LiveSession {
                session_id: sid,
                device: open.device,
                user: open.user,
                login: open.login,
                kind: open.kind,
                started_ms: open.started_ms,
                participants: open.participants,
            });
        }
    }
    out.sort_by_key(|a| a.started_ms);
    Ok(out)
}

/// Sessions open past their certificate's expiry plus [`GRACE_SECS`] at `now_secs`, flagged
/// or not, by session id.
pub fn overdue(store: &dyn Store, now_secs: u64) -> Result<Vec<(String, OpenSession)>, RpcError> {
    Ok(store::list::<OpenSession>(store, Table::OpenSessions, "")?
        .into_iter()
        .filter(|(_, o)| o.cert_expires > 0 && o.cert_expires.saturating_add(GRACE_SECS) < now_secs)
        .collect())
}

/// Flags every overdue session not flagged yet: one `session.overdue` event each. Returns how
/// many this call flagged.
pub fn sweep(svc: &Service, now_secs: u64) -> Result<usize, RpcError> {
    let store = svc.store();
    let mut flagged = 0;
    for (sid, open) in overdue(store, now_secs)? {
        if open.flagged {
            continue;
        }
        let old = serde_json::to_vec(&open).map_err(internal)?;
        let mut marked = open.clone();
        marked.flagged = true;
        let new = serde_json::to_vec(&marked).map_err(internal)?;
        // Another authority, or a session.end that just came in, may have won the record.
        let Some(current) = store.get(Table::OpenSessions, &sid)? else {
            continue;
        };
        if current != old
            || !store.compare_and_swap(Table::OpenSessions, &sid, Some(&current), Some(new))?
        {
            continue;
        }
        tracing::warn!(session = %sid, device = %open.device, user = %open.user,
            "session still open past its certificate's expiry");
        let mut ev = AuditEvent::new(SESSION_OVERDUE, now_secs.saturating_mul(1000));
        ev.session_id = sid;
        ev.user = open.user;
        ev.login = open.login;
        ev.fields.insert("device".into(), open.device.clone());
        ev.fields
            .insert("started_ms".into(), open.started_ms.to_string());
        ev.fields
            .insert("cert_expires".into(), open.cert_expires.to_string());
        ev.fields.insert(
            "reason".into(),
            "still open past the user certificate's expiry, with no session.end from the device"
                .into(),
        );
        crate::audit::record_own(svc, ev, &open.device);
        flagged += 1;
    }
    Ok(flagged)
}

/// Sweeps every [`SWEEP_EVERY`] until `shutdown`.
pub async fn run(svc: Arc<Service>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let svc = svc.clone();
        let now = edgeport_net::clock::now_secs();
        match tokio::task::spawn_blocking(move || sweep(&svc, now)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(sessions = n, "flagged sessions open past expiry"),
            Ok(Err(e)) => tracing::warn!("cannot sweep open sessions: {}", e.message),
            Err(e) => tracing::warn!("open-session sweep failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn ev(kind: &str, sid: &str, expires: Option<u64>) -> AuditEvent {
        let mut e = AuditEvent::new(kind, 1_000);
        e.session_id = sid.into();
        e.user = "alice".into();
        e.login = "root".into();
        if let Some(x) = expires {
            e.fields.insert("cert_expires".into(), x.to_string());
        }
        e
    }

    #[test]
    fn start_opens_end_from_the_same_device_closes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("s")).unwrap();
        observe(&store, "van-1", &ev(SESSION_START, "s1", Some(100))).unwrap();
        observe(&store, "van-1", &ev(SESSION_START, "s2", None)).unwrap();
        // Another device cannot close van-1's session, nor take its id over.
        observe(&store, "van-2", &ev(SESSION_END, "s1", None)).unwrap();
        observe(&store, "van-2", &ev(SESSION_START, "s1", Some(1))).unwrap();
        let o: OpenSession = store::get(&store, Table::OpenSessions, "s1")
            .unwrap()
            .unwrap();
        assert_eq!((o.device.as_str(), o.cert_expires), ("van-1", 100));
        // Not overdue before expiry + grace; s2 (no expiry known) never.
        assert!(overdue(&store, 100 + GRACE_SECS).unwrap().is_empty());
        let late = overdue(&store, 101 + GRACE_SECS).unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].0, "s1");
        observe(&store, "van-1", &ev(SESSION_END, "s1", None)).unwrap();
        assert!(overdue(&store, u64::MAX / 2).unwrap().is_empty());
    }

    #[test]
    fn a_sweep_flags_each_overdue_session_once_in_the_authoritys_chain() {
        let (_dir, svc) = crate::tests::service();
        let store = svc.store();
        observe(store, "van-1", &ev(SESSION_START, "s1", Some(100))).unwrap();
        observe(store, "van-1", &ev(SESSION_START, "s2", Some(10_000))).unwrap();
        let now = 100 + GRACE_SECS + 1;
        assert_eq!(sweep(&svc, now).unwrap(), 1);
        assert_eq!(sweep(&svc, now + 60).unwrap(), 0, "flagged once");
        let events =
            store::list::<edgeport_proto::audit::StoredEvent>(store, Table::AuditEvents, "a/")
                .unwrap();
        let flagged: Vec<_> = events
            .iter()
            .filter(|(_, e)| e.event.kind == SESSION_OVERDUE)
            .collect();
        assert_eq!(flagged.len(), 1);
        let e = &flagged[0].1.event;
        assert_eq!((e.session_id.as_str(), e.field("device")), ("s1", "van-1"));
        assert_eq!(e.field("cert_expires"), "100");
        // Still listed as overdue (flagged) until its session.end comes.
        assert!(overdue(store, now).unwrap()[0].1.flagged);
    }
}
