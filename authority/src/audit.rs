//! The authority's side of audit: it takes devices' signed batches (relayed by gateways),
//! checks signature, sequence and chain, stores the events and answers with how far the
//! stored chain goes; it records its own events and gateways' events; it answers searches,
//! re-verifies chains and serves recordings.
//!
//! Nothing that fails a check is silently accepted: a batch with a bad signature is refused
//! and an alert recorded; a gap, a broken link or a resent sequence number is recorded as an
//! alert, and (except resends) the event is still stored, because a flagged record of what a
//! device said beats no record.

use std::collections::BTreeMap;

use edgeport_proto::audit::{
    verify_batch, AuditAck, AuditBatch, AuditEvent, AuditPage, AuditQuery, ChainReport,
    IntegrityAlert, RecordingInfo, StoredEvent, GENESIS_HASH, RECORDING_CHUNK,
};
use edgeport_proto::rpc::{ErrorKind, Request, Response, RpcError};
use serde::{Deserialize, Serialize};

use crate::devices;
use crate::errors::{denied, not_found};
use crate::service::{Caller, Service};
use crate::store::{self, Store, Table};

/// Largest page of search results (encoded), below the frame limit.
const PAGE_BYTES: usize = 40 * 1024;
/// Most alerts one verify report lists per device.
const MAX_ALERTS: usize = 200;

/// Where a device's chain ends in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChainState {
    pub last_seq: u64,
    pub last_hash: String,
    pub events: u64,
}

impl Default for ChainState {
    fn default() -> Self {
        Self {
            last_seq: 0,
            last_hash: GENESIS_HASH.to_string(),
            events: 0,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn device_key(device: &str, seq: u64) -> String {
    format!("d/{device}/{seq:020}")
}

/// Refused batches are retried by the agent every few seconds; one alert of a kind per
/// device per this long is enough to see it (the log has every one).
const REFUSAL_ALERT_EVERY_MS: u64 = 60_000;

fn alert(store: &dyn Store, a: IntegrityAlert) -> Result<(), RpcError> {
    let per = a.device.clone();
    alert_once_per(store, a, &per)
}

/// [`alert`], with refusal alerts limited to one a minute per `per` (a device, or for
/// batches naming no registered device the relaying gateway: it chose the id, and made-up
/// ids must not each get rows of their own).
fn alert_once_per(store: &dyn Store, a: IntegrityAlert, per: &str) -> Result<(), RpcError> {
    tracing::warn!(device = %a.device, kind = %a.kind, seq = a.seq, "audit integrity alert: {}", a.detail);
    if a.kind == "bad_signature" || a.kind == "unknown_device" {
        let key = format!("@alerted/{per}/{}", a.kind);
        let last: Option<u64> = store::get(store, Table::AuditState, &key)?;
        if last.is_some_and(|t| a.time_ms.saturating_sub(t) < REFUSAL_ALERT_EVERY_MS) {
            return Ok(());
        }
        store::put(store, Table::AuditState, &key, &a.time_ms)?;
    }
    let n = edgeport_proto::keys::random_bytes(4)
        .map(hex::encode)
        .unwrap_or_default();
    let key = format!("{}/{:020}-{n}", a.device, a.time_ms);
    store::put(store, Table::AuditAlerts, &key, &a)?;
    Ok(())
}

/// A device's batch, relayed by `gateway`.
pub fn upload(
    svc: &Service,
    gateway: &str,
    device_id: &str,
    batch: AuditBatch,
) -> Result<Response, RpcError> {
    let store = svc.store();
    let _one = svc
        .audit
        .lock()
        .map_err(|_| denied("audit ingest is unavailable"))?;
    let now = now_ms();
    let Some(dev) = devices::get(store, device_id)? else {
        alert_once_per(
            store,
            IntegrityAlert {
                device: device_id.chars().take(64).collect(),
                time_ms: now,
                kind: "unknown_device".into(),
                seq: batch.events.first().map(|e| e.seq).unwrap_or(0),
                detail: format!("batch from an unknown or removed device via gateway {gateway}"),
            },
            &format!("@gateway/{gateway}"),
        )?;
        return Err(not_found(format!("device {device_id} is not registered")));
    };
    let raw = edgeport_proto::keys::parse_ed25519_public(&dev.ssh_public_key)
        .map(|(_, spki)| spki[spki.len().saturating_sub(32)..].to_vec())
        .map_err(|e| crate::errors::internal("device key", e))?;
    if !verify_batch(device_id, &batch, &raw) {
        let (a, b) = (
            batch.events.first().map(|e| e.seq).unwrap_or(0),
            batch.events.last().map(|e| e.seq).unwrap_or(0),
        );
        alert(
            store,
            IntegrityAlert {
                device: device_id.into(),
                time_ms: now,
                kind: "bad_signature".into(),
                seq: a,
                detail: format!(
                    "batch of {} event(s), seq {a}..{b}, via gateway {gateway}: the signature does \
                     not verify with the device's registered key; refused",
                    batch.events.len()
                ),
            },
        )?;
        crate::metrics::audit_events("refused", batch.events.len() as u64);
        return Err(denied(
            "audit batch refused: the signature does not verify with this device's registered key",
        ));
    }
    let mut state: ChainState =
        store::get(store, Table::AuditState, device_id)?.unwrap_or_default();
    let accepted_before = state.events;
    for ev in batch.events {
        let hash = ev.hash();
        if ev.seq <= state.last_seq {
            let old: Option<StoredEvent> =
                store::get(store, Table::AuditEvents, &device_key(device_id, ev.seq))?;
            let (kind, detail) = match old {
                Some(o) if o.event.hash() == hash => (
                    "replay",
                    format!("event seq {} was already stored; a batch resent it (replay)", ev.seq),
                ),
                _ => (
                    "conflict",
                    format!(
                        "event seq {} arrived again with different content (stored chain ends at {})",
                        ev.seq, state.last_seq
                    ),
                ),
            };
            alert(
                store,
                IntegrityAlert {
                    device: device_id.into(),
                    time_ms: now,
                    kind: kind.into(),
                    seq: ev.seq,
                    detail,
                },
            )?;
            continue;
        }
        if ev.seq != state.last_seq.saturating_add(1) {
            crate::metrics::audit_events(
                "lost",
                ev.seq.saturating_sub(state.last_seq).saturating_sub(1),
            );
            alert(
                store,
                IntegrityAlert {
                    device: device_id.into(),
                    time_ms: now,
                    kind: "gap".into(),
                    seq: ev.seq,
                    detail: format!(
                        "events {}..{} are missing (got {} after {})",
                        state.last_seq.saturating_add(1),
                        ev.seq.saturating_sub(1),
                        ev.seq,
                        state.last_seq
                    ),
                },
            )?;
        } else if ev.prev_hash != state.last_hash {
            alert(
                store,
                IntegrityAlert {
                    device: device_id.into(),
                    time_ms: now,
                    kind: "chain".into(),
                    seq: ev.seq,
                    detail: format!(
                        "event seq {} does not link to event {}: its prev_hash differs from the \
                         stored event's hash (an event was altered or replaced)",
                        ev.seq, state.last_seq
                    ),
                },
            )?;
        }
        state.last_seq = ev.seq;
        state.last_hash = hash;
        state.events += 1;
        if ev.kind == SESSION_START {
            bind_session(store, device_id, &ev, now)?;
        }
        crate::open_sessions::observe(store, device_id, &ev)?;
        crate::targets::observe(store, device_id, &ev)?;
        if ev.kind == RECORDING_CHUNK {
            store_chunk(store, device_id, &ev, now)?;
        }
        let rec = StoredEvent {
            source: "device".into(),
            device: device_id.into(),
            gateway: gateway.into(),
            received_ms: now,
            event: ev,
        };
        store::put(
            store,
            Table::AuditEvents,
            &device_key(device_id, rec.event.seq),
            &rec,
        )?;
    }
    store::put(store, Table::AuditState, device_id, &state)?;
    store.flush()?;
    crate::metrics::audit_events("accepted", state.events - accepted_before);
    let signature = svc.ca().sign_audit_ack(&edgeport_proto::audit::ack_payload(
        device_id,
        state.last_seq,
        &state.last_hash,
    ));
    Ok(Response::AuditAck(AuditAck {
        acked_seq: state.last_seq,
        last_hash: state.last_hash,
        error: None,
        signature,
    }))
}

/// The event that opens a session on a device.
const SESSION_START: &str = "session.start";

/// Which device opened a session (its `session.start`), and as whom.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SessionOwner {
    pub device: String,
    pub user: String,
    /// The id of the user record, from the certificate the device checked.
    #[serde(default)]
    pub user_id: String,
}

/// Binds a session id to the device whose `session.start` came first; a second device
/// claiming the same id is an integrity alert, and its recording pieces are not taken.
fn bind_session(
    store: &dyn Store,
    device: &str,
    ev: &AuditEvent,
    now: u64,
) -> Result<(), RpcError> {
    let sid = &ev.session_id;
    if sid.is_empty() {
        return Ok(());
    }
    match store::get::<SessionOwner>(store, Table::Sessions, sid)? {
        Some(o) if o.device != device => alert(
            store,
            IntegrityAlert {
                device: device.into(),
                time_ms: now,
                kind: "session".into(),
                seq: ev.seq,
                detail: format!(
                    "session.start for session {sid}, which device {} opened before",
                    o.device
                ),
            },
        ),
        Some(_) => Ok(()),
        None => store::put(
            store,
            Table::Sessions,
            sid,
            &SessionOwner {
                device: device.into(),
                user: ev.user.clone(),
                user_id: ev.field("user_id").to_string(),
            },
        )
        .map_err(Into::into),
    }
}

fn store_chunk(store: &dyn Store, device: &str, ev: &AuditEvent, now: u64) -> Result<(), RpcError> {
    let sid = &ev.session_id;
    if sid.is_empty() {
        return Ok(());
    }
    // Only the device that opened the session records it.
    let owner = store::get::<SessionOwner>(store, Table::Sessions, sid)?;
    let user_id = owner
        .as_ref()
        .map(|o| o.user_id.clone())
        .unwrap_or_default();
    if owner.as_ref().is_none_or(|o| o.device != device) {
        return alert(
            store,
            IntegrityAlert {
                device: device.into(),
                time_ms: now,
                kind: "recording".into(),
                seq: ev.seq,
                detail: format!(
                    "a recording piece for session {sid}, which {}; not stored",
                    match owner {
                        Some(o) => format!("device {} opened", o.device),
                        None => "this device never opened".to_string(),
                    }
                ),
            },
        );
    }
    if !crate::recordings::acceptable_session_id(sid) {
        return alert(
            store,
            IntegrityAlert {
                device: device.into(),
                time_ms: now,
                kind: "recording".into(),
                seq: ev.seq,
                detail: format!(
                    "a recording piece for session {sid:?}, not a usable id; not stored"
                ),
            },
        );
    }
    let fresh = RecordingInfo {
        session_id: sid.clone(),
        device: device.into(),
        user: ev.user.clone(),
        login: ev.login.clone(),
        started_ms: ev.time_ms,
        bytes: 0,
        user_id,
    };
    crate::recordings::append(store, fresh, ev.time_ms, ev.field("data").as_bytes())?;
    Ok(())
}

/// Records one of the authority's own events (its own chain, `source = authority`).
///
/// Several authorities may share one store (PostgreSQL), so the next link is claimed, not
/// assumed: the event is created at `a/SEQ` only if that slot is free; if another authority
/// took it first, its event becomes the new tail and the next slot is tried. The chain state
/// only moves forward, so it may lag the log briefly but never forks it.
pub fn record_own(svc: &Service, ev: AuditEvent, device: &str) {
    let Ok(_one) = svc.audit.lock() else { return };
    if let Err(e) = append_own(svc.store(), ev, device) {
        tracing::error!("cannot record an audit event: {e}");
    }
}

/// Claims attempts before giving up (each lost one means another authority appended).
const MAX_CLAIMS: usize = 64;

fn append_own(store: &dyn Store, mut ev: AuditEvent, device: &str) -> Result<(), RpcError> {
    let mut tail: ChainState =
        store::get(store, Table::AuditState, "@authority")?.unwrap_or_default();
    for _ in 0..MAX_CLAIMS {
        ev.seq = tail.last_seq.saturating_add(1);
        ev.prev_hash = tail.last_hash.clone();
        let key = format!("a/{:020}", ev.seq);
        let rec = StoredEvent {
            source: "authority".into(),
            device: device.into(),
            gateway: String::new(),
            received_ms: ev.time_ms,
            event: ev.clone(),
        };
        let bytes = serde_json::to_vec(&rec)
            .map_err(|e| RpcError::new(ErrorKind::Internal, e.to_string()))?;
        if store.compare_and_swap(Table::AuditEvents, &key, None, Some(bytes))? {
            let (seq, hash) = (ev.seq, ev.hash());
            store::update::<ChainState, RpcError, _>(
                store,
                Table::AuditState,
                "@authority",
                |cur| {
                    let mut st = cur.unwrap_or_default();
                    if st.last_seq < seq {
                        st.last_seq = seq;
                        st.last_hash = hash.clone();
                    }
                    st.events += 1;
                    Ok(Some(st))
                },
            )?;
            return Ok(());
        }
        // Another authority holds this slot: follow the chain through its event.
        let taken: Option<StoredEvent> = store::get(store, Table::AuditEvents, &key)?;
        let Some(taken) = taken else { continue };
        tail.last_seq = taken.event.seq;
        tail.last_hash = taken.event.hash();
    }
    Err(RpcError::new(
        ErrorKind::Internal,
        "too much contention appending to the authority's audit chain",
    ))
}

/// Events a gateway reports (dials): stored as they come, tagged with the gateway.
pub fn record_gateway(
    svc: &Service,
    gateway: &str,
    events: Vec<AuditEvent>,
) -> Result<Response, RpcError> {
    let store = svc.store();
    let now = now_ms();
    for (i, ev) in events.into_iter().take(256).enumerate() {
        let device = ev.field("device").to_string();
        let key = format!("g/{gateway}/{:020}-{i:04}-{}", ev.time_ms, now);
        let rec = StoredEvent {
            source: "gateway".into(),
            device,
            gateway: gateway.into(),
            received_ms: now,
            event: ev,
        };
        store::put(store, Table::AuditEvents, &key, &rec)?;
    }
    Ok(Response::Ok)
}

fn matches(q: &AuditQuery, e: &StoredEvent) -> bool {
    if e.event.time_ms < q.since_ms {
        return false;
    }
    match &q.kind {
        Some(k) if k != &e.event.kind => return false,
        None if e.event.kind == RECORDING_CHUNK => return false,
        _ => {}
    }
    if q.device.as_ref().is_some_and(|d| d != &e.device) {
        return false;
    }
    if q.user.as_ref().is_some_and(|u| u != &e.event.user) {
        return false;
    }
    if q.session_id
        .as_ref()
        .is_some_and(|s| s != &e.event.session_id)
    {
        return false;
    }
    true
}

/// `tctl audit search`: matches in time order, a page at a time.
pub fn search(svc: &Service, q: &AuditQuery) -> Result<Response, RpcError> {
    let mut all: Vec<StoredEvent> =
        store::list::<StoredEvent>(svc.store(), Table::AuditEvents, "")?
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| matches(q, e))
            .collect();
    // Device events in chain order; everything by time otherwise.
    all.sort_by(|a, b| {
        (a.event.time_ms, &a.device, a.event.seq).cmp(&(b.event.time_ms, &b.device, b.event.seq))
    });
    let mut events = Vec::new();
    let mut size = 0usize;
    let mut next = None;
    for (i, e) in all.into_iter().enumerate().skip(q.offset as usize) {
        let len = postcard::to_stdvec(&e).map(|v| v.len()).unwrap_or(0);
        if !events.is_empty() && size + len > PAGE_BYTES {
            next = Some(i as u64);
            break;
        }
        size += len;
        events.push(e);
    }
    Ok(Response::AuditPage(AuditPage { events, next }))
}

/// The web console's audit search: only the viewer's own events, and only from after their
/// user record was made (a later user of a removed user's name sees none of the earlier
/// one's, as with recordings). Recording chunks hold terminal output: they are read through
/// the recording requests, which check whose session it was, never through a search.
pub fn web_search(svc: &Service, viewer: &Viewer, mut q: AuditQuery) -> Result<Response, RpcError> {
    if q.kind.as_deref() == Some(RECORDING_CHUNK) {
        return Err(RpcError::new(
            ErrorKind::Denied,
            "recordings are read with the recordings page, not the audit search",
        ));
    }
    q.user = Some(viewer.name.clone());
    q.since_ms = q
        .since_ms
        .max(viewer.since_ms.saturating_sub(CLOCK_SKEW_MS));
    search(svc, &q)
}

/// `tctl audit verify`: re-checks every stored device chain and lists recorded alerts.
pub fn verify(svc: &Service, device: Option<&str>) -> Result<Response, RpcError> {
    let store = svc.store();
    let mut chains: BTreeMap<String, Vec<StoredEvent>> = BTreeMap::new();
    let prefix = match device {
        Some(d) => format!("d/{d}/"),
        None => "d/".to_string(),
    };
    for (_, e) in store::list::<StoredEvent>(store, Table::AuditEvents, &prefix)? {
        chains.entry(e.device.clone()).or_default().push(e);
    }
    // The authority's own chain, listed as `@authority`.
    if device.is_none_or(|d| d == "@authority") {
        for (_, e) in store::list::<StoredEvent>(store, Table::AuditEvents, "a/")? {
            chains.entry("@authority".into()).or_default().push(e);
        }
    }
    let mut alerts: BTreeMap<String, Vec<IntegrityAlert>> = BTreeMap::new();
    let aprefix = device.map(|d| format!("{d}/")).unwrap_or_default();
    for (_, a) in store::list::<IntegrityAlert>(store, Table::AuditAlerts, &aprefix)? {
        if device.is_none_or(|d| d == a.device) {
            alerts.entry(a.device.clone()).or_default().push(a);
        }
    }
    for d in alerts.keys() {
        chains.entry(d.clone()).or_default();
    }
    if let Some(d) = device {
        chains.entry(d.to_string()).or_default();
    }
    let mut out = Vec::new();
    for (dev, events) in chains {
        let mut problems = Vec::new();
        let mut prev: Option<(u64, String)> = None;
        for e in &events {
            match &prev {
                None if e.event.seq != 1 => problems.push(format!(
                    "events 1..{} are missing",
                    e.event.seq.saturating_sub(1)
                )),
                None if e.event.prev_hash != GENESIS_HASH => {
                    problems.push("event 1 does not start the chain (prev_hash)".into())
                }
                Some((s, _)) if e.event.seq != s.saturating_add(1) => problems.push(format!(
                    "events {}..{} are missing",
                    s.saturating_add(1),
                    e.event.seq.saturating_sub(1)
                )),
                Some((s, h)) if &e.event.prev_hash != h => problems.push(format!(
                    "event {} does not link to event {s} (altered or replaced)",
                    e.event.seq
                )),
                _ => {}
            }
            prev = Some((e.event.seq, e.event.hash()));
        }
        let mut al = alerts.remove(&dev).unwrap_or_default();
        al.truncate(MAX_ALERTS);
        out.push(ChainReport {
            first_seq: events.first().map(|e| e.event.seq).unwrap_or(0),
            last_seq: events.last().map(|e| e.event.seq).unwrap_or(0),
            events: events.len() as u64,
            device: dev,
            problems,
            alerts: al,
        });
    }
    Ok(Response::AuditReport(out))
}

/// Whose recordings a request may see (see `Service::viewer`).
#[derive(Clone, Debug)]
pub struct Viewer {
    pub name: String,
    /// The user record's id: recordings that carry one must carry this one.
    pub id: String,
    /// Only sessions that started after this (Unix ms; the user's record was made then).
    pub since_ms: u64,
}

/// Device clocks may run behind the authority's.
const CLOCK_SKEW_MS: u64 = 120_000;

/// A recording is the viewer's when it carries their user id; otherwise (a recording or a
/// user record from before ids existed, or an administrator's filter by name) when it
/// carries their name and started after their record was made.
fn may_see(info: &RecordingInfo, viewer: Option<&Viewer>) -> bool {
    viewer.is_none_or(|v| {
        if !v.id.is_empty() && !info.user_id.is_empty() {
            return info.user_id == v.id;
        }
        v.name == info.user && info.started_ms.saturating_add(CLOCK_SKEW_MS) >= v.since_ms
    })
}

/// The newest recordings the viewer may see (at most 300, oldest first): the answer to the
/// `RecordingList` of gateways from before paging.
pub fn recordings(svc: &Service, viewer: Option<&Viewer>) -> Result<Response, RpcError> {
    let mut list = Vec::new();
    let mut cursor: Option<String> = None;
    while list.len() < 300 {
        let (page, next) = page_of(svc, viewer, cursor.as_deref(), 100)?;
        list.extend(page);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    list.truncate(300);
    list.reverse();
    Ok(Response::Recordings(list))
}

fn page_of(
    svc: &Service,
    viewer: Option<&Viewer>,
    cursor: Option<&str>,
    limit: u32,
) -> Result<(Vec<RecordingInfo>, Option<String>), RpcError> {
    let visible = |r: &RecordingInfo| may_see(r, viewer);
    crate::recordings::page(
        svc.store(),
        viewer.map(|v| v.name.as_str()),
        &visible,
        cursor,
        limit,
    )
}

/// One page of recordings, newest first, and the cursor of the next (`RecordingPage`).
pub fn recording_page(
    svc: &Service,
    viewer: Option<&Viewer>,
    cursor: Option<&str>,
    limit: u32,
) -> Result<Response, RpcError> {
    let (recordings, next) = page_of(svc, viewer, cursor, limit)?;
    Ok(Response::RecordingPage { recordings, next })
}

/// A piece of a recording from `offset` (`RecordingGet`): bounded work wherever it is.
pub fn recording(
    svc: &Service,
    session_id: &str,
    user: Option<&Viewer>,
    offset: u64,
) -> Result<Response, RpcError> {
    let visible = |r: &RecordingInfo| may_see(r, user);
    let (data, total) = crate::recordings::read(svc.store(), session_id, &visible, offset)?;
    Ok(Response::RecordingData { data, total })
}

/// What an administrative request means for the audit log, decided before it runs.
pub struct Pending {
    kind: &'static str,
    user: String,
    device: String,
    fields: BTreeMap<String, String>,
}

pub fn describe(caller: &Caller, req: &Request) -> Option<Pending> {
    let mut p = Pending {
        kind: "",
        user: String::new(),
        device: String::new(),
        fields: BTreeMap::new(),
    };
    p.fields.insert("caller".into(), caller.to_string());
    match req {
        Request::Login(r) => {
            p.kind = "user.login";
            p.user = r.user.clone();
            p.fields.insert("client_addr".into(), r.client_addr.clone());
        }
        Request::WebLogin(r) => {
            p.kind = "web.login";
            p.user = r.user.clone();
            p.fields.insert("client_addr".into(), r.client_addr.clone());
        }
        Request::SsoMapSet(m) => {
            p.kind = "sso.mapped";
            p.fields.insert("group".into(), m.group.clone());
            p.fields.insert("roles".into(), m.roles.join(","));
            p.fields.insert("logins".into(), m.logins.join(","));
        }
        Request::SsoMapRemove { group } => {
            p.kind = "sso.unmapped";
            p.fields.insert("group".into(), group.clone());
        }
        Request::SsoConnectorAdd(c) => {
            p.kind = "sso.connector_saved";
            p.fields.insert("connector".into(), c.name.clone());
            p.fields.insert("client_id".into(), c.client_id.clone());
        }
        Request::SsoConnectorRemove { name } => {
            p.kind = "sso.connector_removed";
            p.fields.insert("connector".into(), name.clone());
        }
        Request::SignUser(r) => {
            p.kind = "cert.issued";
            p.user = r.user.clone();
        }
        Request::UserAdd(s) => {
            p.kind = "user.created";
            p.user = s.name.clone();
            p.fields.insert("logins".into(), s.logins.join(","));
            p.fields.insert("roles".into(), s.roles.join(","));
        }
        Request::UserRemove { name } => {
            p.kind = "user.removed";
            p.user = name.clone();
        }
        Request::UserUpdate(u) => {
            p.kind = "user.updated";
            p.user = u.name.clone();
            let mut set = |key: &str, v: &Option<Vec<String>>| {
                if let Some(v) = v {
                    p.fields.insert(key.into(), v.join(","));
                }
            };
            set("logins", &u.logins);
            set("roles", &u.roles);
            set("kube_groups", &u.kube_groups);
            set("kube_users", &u.kube_users);
            if let Some(r) = u.require_totp {
                p.fields.insert("require_totp".into(), r.to_string());
            }
            if u.reset_totp {
                p.fields.insert("reset_totp".into(), "true".into());
            }
        }
        Request::TokenAdd(s) => {
            p.kind = "token.created";
            p.fields.insert("token_kind".into(), s.kind.as_str().into());
        }
        Request::TokenRemove { .. } => p.kind = "token.removed",
        Request::JoinDevice(r) => {
            p.kind = "device.join";
            p.device = r.requested_id.clone().unwrap_or_default();
            p.fields.insert("remote_addr".into(), r.remote_addr.clone());
        }
        Request::JoinGateway(_) => p.kind = "gateway.join",
        Request::DeviceRemove { id } => {
            p.kind = "device.removed";
            p.device = id.clone();
        }
        Request::LockAdd(s) => {
            p.kind = "lock.created";
            p.fields
                .insert("target".into(), crate::locks::describe(&s.target));
        }
        Request::LockRemove { target } => {
            p.kind = "lock.removed";
            p.fields
                .insert("target".into(), crate::locks::describe(target));
        }
        Request::GatewayRemove { id } => {
            p.kind = "gateway.revoked";
            p.fields.insert("gateway".into(), id.clone());
        }
        Request::UpdateStart(u) => {
            p.kind = "agent.update";
            p.fields.insert("sha256".into(), u.sha256.clone());
            p.fields.insert("devices".into(), u.devices.join(","));
            p.fields
                .insert("rollback_secs".into(), u.rollback_secs.to_string());
        }
        Request::UpdateReport {
            id,
            device,
            accepted,
            message,
        } => {
            p.kind = "agent.update_delivered";
            p.device = device.clone();
            p.fields.insert("update".into(), id.clone());
            p.fields.insert("accepted".into(), accepted.to_string());
            if !message.is_empty() {
                p.fields.insert("message".into(), message.clone());
            }
        }
        _ => return None,
    }
    Some(p)
}

/// Records a single sign-on login (`SsoFinish`): who the provider said it was, once the
/// authority verified that, and whether certificates were issued (or why not).
pub fn sso_login(
    svc: &Service,
    caller: &Caller,
    client_addr: &str,
    who: Option<&crate::sso::Verified>,
    result: &Result<Response, RpcError>,
) {
    let mut p = Pending {
        kind: "user.login",
        user: String::new(),
        device: String::new(),
        fields: BTreeMap::new(),
    };
    p.fields.insert("caller".into(), caller.to_string());
    p.fields
        .insert("client_addr".into(), client_addr.to_string());
    if let Some(w) = who {
        p.user = w.user.clone();
        p.fields.insert("connector".into(), w.connector.clone());
        p.fields
            .insert("subject".into(), format!("{} {}", w.issuer, w.subject));
        p.fields.insert("groups".into(), w.groups.join(","));
    }
    finish(svc, p, result);
}

/// Records what an administrative request did (or why it failed).
pub fn finish(svc: &Service, p: Pending, result: &Result<Response, RpcError>) {
    let mut ev = AuditEvent::new(p.kind, now_ms());
    ev.user = p.user;
    ev.fields = p.fields;
    let mut device = p.device;
    match result {
        Ok(resp) => {
            ev.fields.insert("success".into(), "true".into());
            match resp {
                Response::Token(t) => {
                    ev.fields.insert("token_id".into(), t.id.clone());
                }
                Response::DeviceCerts(c) => {
                    device = c.device_id.clone();
                }
                Response::Update(u) => {
                    ev.fields.insert("update".into(), u.id.clone());
                }
                _ => {}
            }
        }
        Err(e) => {
            ev.fields.insert("success".into(), "false".into());
            ev.fields.insert("error".into(), e.message.clone());
        }
    }
    if !device.is_empty() {
        ev.fields.insert("device".into(), device.clone());
    }
    let success = result.is_ok();
    let kind = ev.kind.clone();
    let user = ev.user.clone();
    record_own(svc, ev.clone(), &device);
    // A successful login or join also issued certificates / used a token.
    if success && kind == "user.login" {
        let mut c = AuditEvent::new("cert.issued", ev.time_ms);
        c.user = user;
        c.fields.insert("via".into(), "login".into());
        record_own(svc, c, "");
    }
    if success && kind == "device.join" {
        let mut t = AuditEvent::new("token.used", ev.time_ms);
        t.fields.insert("device".into(), device.clone());
        record_own(svc, t, &device);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use edgeport_proto::audit::batch_payload;
    use edgeport_proto::keys::KeyPair;

    use super::*;

    fn chain(from: u64, prev: &str, n: u64) -> Vec<AuditEvent> {
        let mut prev = prev.to_string();
        (from..from + n)
            .map(|seq| {
                let mut e = AuditEvent::new("exec", seq);
                e.seq = seq;
                e.prev_hash = prev.clone();
                e.fields.insert("command".into(), format!("cmd {seq}"));
                prev = e.hash();
                e
            })
            .collect()
    }

    fn signed(key: &KeyPair, dev: &str, events: Vec<AuditEvent>) -> AuditBatch {
        AuditBatch {
            signature: key.sign(&batch_payload(dev, &events)),
            events,
        }
    }

    fn up(svc: &Service, dev: &str, b: AuditBatch) -> Result<AuditAck, String> {
        let gw = Caller::Gateway("gw-1".into());
        match svc.handle(
            &gw,
            Request::AuditUpload {
                device_id: dev.into(),
                batch: b,
            },
        ) {
            Response::AuditAck(a) => Ok(a),
            Response::Error(e) => Err(e.message),
            other => panic!("{other:?}"),
        }
    }

    fn alerts(svc: &Service, dev: &str) -> Vec<String> {
        match verify(svc, Some(dev)).unwrap() {
            Response::AuditReport(r) => r[0].alerts.iter().map(|a| a.kind.clone()).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Batches naming made-up device ids (only a gateway can send them: an honest one takes
    /// the id from the tunnel's certificate) are refused, and their alerts are limited per
    /// gateway, not per made-up id.
    #[test]
    fn made_up_device_ids_do_not_each_get_an_alert() {
        let (_tmp, svc) = crate::tests::service();
        for i in 0..200 {
            let e = up(
                &svc,
                &format!("made-up-{i}"),
                AuditBatch {
                    events: Vec::new(),
                    signature: Vec::new(),
                },
            )
            .unwrap_err();
            assert!(e.contains("is not registered"), "{e}");
        }
        let rows = store::list::<IntegrityAlert>(svc.store(), Table::AuditAlerts, "")
            .unwrap()
            .len();
        assert_eq!(rows, 1);
        let marks = svc
            .store()
            .scan_prefix(Table::AuditState, "@alerted/")
            .unwrap()
            .len();
        assert_eq!(marks, 1);
    }

    #[test]
    fn ingest_checks_signature_sequence_and_chain() {
        let (_tmp, svc) = crate::tests::service();
        let (key, _) = crate::tests::join_device(&svc, "d1", edgeport_net::clock::now_secs());

        // Sync, then a good batch.
        let a = up(&svc, "d1", signed(&key, "d1", vec![])).unwrap();
        assert_eq!(a.acked_seq, 0);
        let host_ca = edgeport_proto::audit::raw_ed25519(&svc.ca().bundle().host_ca).unwrap();
        assert!(edgeport_proto::audit::verify_ack("d1", &a, &host_ca));
        assert!(!edgeport_proto::audit::verify_ack("d2", &a, &host_ca));
        let first = chain(1, GENESIS_HASH, 3);
        let a = up(&svc, "d1", signed(&key, "d1", first.clone())).unwrap();
        assert_eq!(a.acked_seq, 3);
        assert!(alerts(&svc, "d1").is_empty());

        // Another key, or another device's name on the batch: refused, nothing stored.
        let other = KeyPair::generate().unwrap();
        let next = chain(4, &a.last_hash, 2);
        assert!(up(&svc, "d1", signed(&other, "d1", next.clone())).is_err());
        assert!(up(&svc, "d1", signed(&key, "d2", next.clone())).is_err());
        // One alert per kind and device per minute: the agent retries refused batches.
        assert_eq!(alerts(&svc, "d1"), ["bad_signature"]);

        // Replay of a stored batch: flagged, chain unchanged.
        let a2 = up(&svc, "d1", signed(&key, "d1", first)).unwrap();
        assert_eq!(a2.acked_seq, 3);
        assert!(alerts(&svc, "d1").iter().filter(|k| *k == "replay").count() == 3);

        // An altered event breaks the next link; a gap is flagged.
        let mut altered = next.clone();
        altered[0]
            .fields
            .insert("command".into(), "innocent".into());
        up(&svc, "d1", signed(&key, "d1", altered)).unwrap();
        let gap = chain(9, "whatever", 1);
        let a3 = up(&svc, "d1", signed(&key, "d1", gap)).unwrap();
        assert_eq!(a3.acked_seq, 9);
        let kinds = alerts(&svc, "d1");
        assert!(kinds.contains(&"chain".to_string()), "{kinds:?}");
        assert!(kinds.contains(&"gap".to_string()), "{kinds:?}");
        match verify(&svc, Some("d1")).unwrap() {
            Response::AuditReport(r) => assert!(!r[0].problems.is_empty()),
            other => panic!("{other:?}"),
        }
        // The authority's own events are there too.
        match search(&svc, &AuditQuery::default()).unwrap() {
            Response::AuditPage(p) => {
                assert!(p.events.iter().any(|e| e.event.kind == "device.join"));
                assert!(p.events.iter().any(|e| e.event.kind == "token.used"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A recording belongs to the device whose `session.start` opened the session: another
    /// device can neither plant pieces in it nor claim it; and a user sees only recordings
    /// made since their record was (a later holder of a removed user's name sees none of the
    /// earlier one's).
    #[test]
    fn recordings_are_bound_to_the_opening_device_and_the_current_user() {
        let (_tmp, svc) = crate::tests::service();
        let events = |kinds: &[(&str, &str)], t: u64| {
            let mut prev = GENESIS_HASH.to_string();
            kinds
                .iter()
                .enumerate()
                .map(|(i, (kind, data))| {
                    let mut e = AuditEvent::new(kind, t);
                    e.seq = i as u64 + 1;
                    e.prev_hash = prev.clone();
                    e.session_id = "s1".into();
                    e.user = "alice".into();
                    e.fields.insert("data".into(), data.to_string());
                    e.fields.insert("user_id".into(), "id-of-alice-1".into());
                    prev = e.hash();
                    e
                })
                .collect::<Vec<_>>()
        };
        let t = now_ms();
        let (k1, _) = crate::tests::join_device(&svc, "d1", t / 1000);
        let (k2, _) = crate::tests::join_device(&svc, "d2", t / 1000);
        up(
            &svc,
            "d1",
            signed(
                &k1,
                "d1",
                events(&[(SESSION_START, ""), (RECORDING_CHUNK, "hello ")], t),
            ),
        )
        .unwrap();
        // d2 claims the same session and adds a piece: flagged, not stored.
        up(
            &svc,
            "d2",
            signed(
                &k2,
                "d2",
                events(&[(SESSION_START, ""), (RECORDING_CHUNK, "planted")], t),
            ),
        )
        .unwrap();
        let mut kinds = alerts(&svc, "d2");
        kinds.sort();
        assert_eq!(kinds, ["recording", "session"]);
        let alice = |since_ms| Viewer {
            name: "alice".into(),
            id: "id-of-alice-1".into(),
            since_ms,
        };
        match recording(&svc, "s1", Some(&alice(0)), 0).unwrap() {
            Response::RecordingData { data, .. } => assert_eq!(data, b"hello "),
            other => panic!("{other:?}"),
        }
        let listed = |v: Option<&Viewer>| match recordings(&svc, v).unwrap() {
            Response::Recordings(r) => r.len(),
            other => panic!("{other:?}"),
        };
        assert_eq!(listed(Some(&alice(0))), 1);
        assert_eq!(listed(None), 1, "auditors see every recording");
        // Another user record named alice (another id) sees nothing of the first alice's,
        // whenever it was made; an administrator's filter by name sees it.
        let other = Viewer {
            id: "id-of-alice-2".into(),
            ..alice(0)
        };
        assert_eq!(listed(Some(&other)), 0);
        assert!(recording(&svc, "s1", Some(&other), 0).is_err());
        let by_name = Viewer {
            id: String::new(),
            ..alice(0)
        };
        assert_eq!(listed(Some(&by_name)), 1);
        // Without ids (records from before them), the record's age decides.
        let legacy_later = Viewer {
            id: String::new(),
            ..alice(t + 3_600_000)
        };
        assert_eq!(listed(Some(&legacy_later)), 0);
        // The console's audit search: the first alice's session events are hers alone, a
        // later alice (a record made an hour after) sees none of them, and nobody searches
        // recording chunks (terminal output) there.
        let found = |v: &Viewer, q: AuditQuery| match web_search(&svc, v, q).unwrap() {
            Response::AuditPage(p) => p.events.len(),
            other => panic!("{other:?}"),
        };
        let hers = found(&alice(0), AuditQuery::default());
        assert!(hers >= 1, "the first alice's session events");
        assert_eq!(found(&legacy_later, AuditQuery::default()), 0);
        let chunks = AuditQuery {
            kind: Some(RECORDING_CHUNK.into()),
            ..Default::default()
        };
        assert_eq!(
            web_search(&svc, &alice(0), chunks).unwrap_err().kind,
            ErrorKind::Denied
        );
        let someone_else = AuditQuery {
            user: Some("bob".into()),
            ..Default::default()
        };
        assert_eq!(
            found(&alice(0), someone_else),
            hers,
            "the viewer's own, whatever asked"
        );
    }
}
