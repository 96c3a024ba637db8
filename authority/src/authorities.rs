//! The authorities of a cluster, registered in the store (`Table::Authorities`): each writes
//! its address, version, start time and the CA keys it holds at start and every
//! [`HEARTBEAT_SECS`]; the authority that takes a CA rotation step records the cluster's
//! rotation state beside them. `tctl status` compares the two (an authority that lacks a key
//! is told to copy `DATA/ca`), and an authority whose signing key is not the cluster's
//! refuses to sign. Several authorities keep their CA keys in files (architecture.md, "What
//! several authorities share"), so this is how one left behind by a rotation is noticed.
//!
//! Each running process also writes a random instance name into its record. Between two of
//! its own heartbeats nobody else writes that record, unless a second process has the same
//! id: a data dir copied whole (a cloned VM image) shares `DATA/authority.id`. Such an
//! authority says so in its log and in its record, and `tctl status` tells the remedy.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use edgeport_proto::rpc::{AuthorityInfo, CaKind, CaRotation, ErrorKind, Request, RpcError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::service::{Caller, Service};
use crate::store::{self, Store, StoreError, Table};

/// How often each authority writes its record.
pub const HEARTBEAT_SECS: u64 = 15;
/// A record not written for this long is shown stale.
pub const STALE_AFTER_SECS: u64 = 3 * HEARTBEAT_SECS;
/// A record not written for this long is dropped (a retired authority).
pub const PRUNE_AFTER_SECS: u64 = 24 * 3600;
/// How often an authority reads the cluster's CA state (and, when it is behind, `DATA/ca`).
const CHECK_EVERY: Duration = Duration::from_secs(2);
const CLUSTER_KEY: &str = "cluster/cas";
const RECORD_PREFIX: &str = "a/";

/// One CA's rotation reduced to what must match across authorities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaState {
    pub kind: CaKind,
    pub phase: String,
    /// Fingerprint of the key that signs.
    pub signing: String,
    /// Fingerprints of every trusted key (the signing one first); an authority holds the
    /// private key of each.
    pub trusted: Vec<String>,
    pub drop_at: Option<u64>,
}

impl CaState {
    pub fn of(r: &CaRotation) -> Self {
        Self {
            kind: r.kind,
            phase: r.phase.clone(),
            signing: r.signing.clone(),
            trusted: r.trusted.clone(),
            drop_at: r.drop_at,
        }
    }

    /// The grace period ended: the key that no longer signs is dropped, as
    /// `RotatingCa::expire` does with the keys themselves.
    fn expire(&mut self, now: u64) -> bool {
        let ending = matches!(self.phase.as_str(), "update_servers" | "rollback");
        if ending && self.drop_at.is_some_and(|at| now >= at) {
            self.phase = "standby".into();
            self.trusted = vec![self.signing.clone()];
            self.drop_at = None;
            return true;
        }
        false
    }
}

/// The states of a set of rotations.
pub fn states(rotations: &[CaRotation]) -> Vec<CaState> {
    rotations.iter().map(CaState::of).collect()
}

/// The cluster's CA rotation state: what the authority that took the last step holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCas {
    pub cas: Vec<CaState>,
    /// The address of the authority that wrote it.
    pub by: String,
}

/// One authority's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started: u64,
    pub last_seen: u64,
    /// The CA keys it holds and the rotation it follows.
    pub held: Vec<CaState>,
    /// Random, made at each start of the process (empty: written by an older release).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// Another running process that writes this record too (its address): the two share
    /// the id because one's data dir was copied from the other's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<String>,
}

/// Who this authority is (set once at start) and the cluster's CA state it last read.
#[derive(Default)]
pub struct Registry {
    me: OnceLock<Me>,
    cluster: Mutex<Option<ClusterCas>>,
    sharing: Mutex<Sharing>,
    refusals: Mutex<RefusalLog>,
}

#[derive(Clone, Debug)]
struct Me {
    id: String,
    address: String,
    started: u64,
    instance: String,
}

/// What this process has seen of another one writing its record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sharing {
    /// This process wrote its record at least once.
    wrote: bool,
    /// The other process (its address) and when it was last seen writing.
    other: Option<(String, u64)>,
}

impl Sharing {
    /// Looks at the record as found just before this process writes it again. Returns the
    /// address of another process that wrote it since this one last did (newly or again),
    /// kept for [`STALE_AFTER_SECS`] after it was last seen so that two processes whose
    /// heartbeats drift do not flap.
    pub fn observe(
        &mut self,
        found: Option<&AuthorityRecord>,
        instance: &str,
        now: u64,
    ) -> Option<String> {
        let foreign =
            found.filter(|r| self.wrote && !r.instance.is_empty() && r.instance != instance);
        if let Some(r) = foreign {
            self.other = Some((r.address.clone(), now));
        }
        self.wrote = true;
        if self
            .other
            .as_ref()
            .is_some_and(|(_, seen)| now.saturating_sub(*seen) > STALE_AFTER_SECS)
        {
            self.other = None;
        }
        self.other.as_ref().map(|(a, _)| a.clone())
    }
}

/// How often the same signing refusal is logged again while it lasts.
const REFUSAL_REMIND_SECS: u64 = 300;

/// Which signing refusals this process has logged: a lagging authority behind a fleet
/// refuses every audit upload and dial, and one error line per request would bury the one
/// that says what to do. Each distinct refusal is logged when it first appears and then
/// every [`REFUSAL_REMIND_SECS`] with the number refused since.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// By refusal text: when it was last logged and how many were refused since.
    seen: std::collections::HashMap<String, (u64, u64)>,
}

impl RefusalLog {
    /// Records one refusal; returns how many more were refused since it was last logged
    /// when it is to be logged now.
    pub fn note(&mut self, msg: &str, now: u64) -> Option<u64> {
        // Refusal texts name a CA kind, a key and a remedy: a handful at most. Forget them
        // all rather than grow if that ever stops being true.
        if self.seen.len() >= 64 && !self.seen.contains_key(msg) {
            self.seen.clear();
        }
        match self.seen.get_mut(msg) {
            Some((logged, since)) if now.saturating_sub(*logged) < REFUSAL_REMIND_SECS => {
                *since += 1;
                None
            }
            Some((logged, since)) => {
                let more = *since;
                *logged = now;
                *since = 0;
                Some(more)
            }
            None => {
                self.seen.insert(msg.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// Forgets every refusal: the keys are the cluster's again, and the next refusal is news.
    pub fn clear(&mut self) {
        self.seen.clear();
    }
}

impl Registry {
    /// Records a signing refusal ([`RefusalLog::note`]).
    fn note_refusal(&self, msg: &str, now: u64) -> Option<u64> {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(msg, now)
    }

    /// This authority signs again: a later refusal is logged at once.
    fn clear_refusals(&self) {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Who this process is. `instance` is made here: random, new at each start.
    pub fn set_identity(&self, id: String, address: String, started: u64) {
        let instance = edgeport_proto::keys::random_bytes(8)
            .map(hex::encode)
            .unwrap_or_else(|_| format!("{started}-{}", std::process::id()));
        let _ = self.me.set(Me {
            id,
            address,
            started,
            instance,
        });
    }

    fn cached(&self) -> Option<ClusterCas> {
        self.cluster.lock().ok().and_then(|c| c.clone())
    }

    fn remember(&self, c: Option<ClusterCas>) {
        if let Ok(mut cur) = self.cluster.lock() {
            *cur = c;
        }
    }
}

/// The cluster's CA state, with any grace period that ended applied.
pub fn cluster(st: &dyn Store, now: u64) -> Result<Option<ClusterCas>, StoreError> {
    let mut c: Option<ClusterCas> = store::get(st, Table::Authorities, CLUSTER_KEY)?;
    if let Some(c) = &mut c {
        for ca in &mut c.cas {
            ca.expire(now);
        }
    }
    Ok(c)
}

/// Records `held` as the cluster's CA state (after a rotation step here).
pub fn publish(st: &dyn Store, held: &[CaState], by: &str) -> Result<(), StoreError> {
    let c = ClusterCas {
        cas: held.to_vec(),
        by: by.to_string(),
    };
    store::put(st, Table::Authorities, CLUSTER_KEY, &c)
}

/// Writes `me`, records the cluster's CA state from it if there is none yet (the first
/// authority of this release) or moves it to `standby` once a grace period ended, and drops
/// records not written for [`PRUNE_AFTER_SECS`]. Returns the cluster's CA state.
pub fn heartbeat(st: &dyn Store, me: &AuthorityRecord, now: u64) -> Result<ClusterCas, StoreError> {
    store::put(st, Table::Authorities, &record_key(&me.id), me)?;
    let cluster =
        store::update::<ClusterCas, StoreError, _>(st, Table::Authorities, CLUSTER_KEY, |cur| {
            Ok(Some(match cur {
                None => ClusterCas {
                    cas: me.held.clone(),
                    by: me.address.clone(),
                },
                Some(mut c) => {
                    for ca in &mut c.cas {
                        ca.expire(now);
                    }
                    c
                }
            }))
        })?;
    for (key, r) in store::list::<AuthorityRecord>(st, Table::Authorities, RECORD_PREFIX)? {
        if now.saturating_sub(r.last_seen) > PRUNE_AFTER_SECS {
            tracing::info!(authority = %r.address, id = %r.id, "dropped the record of an authority not seen for a day");
            st.delete(Table::Authorities, &key)?;
        }
    }
    cluster.ok_or_else(|| StoreError::Backend("the cluster's CA state vanished".into()))
}

fn record_key(id: &str) -> String {
    format!("{RECORD_PREFIX}{id}")
}

/// What `held` lacks against the cluster: the keys it does not hold (`KIND CA FINGERPRINT`)
/// and the CAs whose rotation it does not follow (phase or signing key).
pub fn compare(held: &[CaState], cluster: &[CaState]) -> (Vec<String>, Vec<String>) {
    let (mut missing, mut behind) = (Vec::new(), Vec::new());
    for want in cluster {
        let kind = want.kind.as_str();
        let have = held.iter().find(|h| h.kind == want.kind);
        let keys: &[String] = have.map_or(&[], |h| &h.trusted);
        for fp in &want.trusted {
            if !keys.contains(fp) {
                missing.push(format!("{kind} CA {fp}"));
            }
        }
        if let Some(h) = have {
            if h.phase != want.phase || h.signing != want.signing {
                behind.push(format!(
                    "{kind} CA: phase {} (cluster: {})",
                    h.phase, want.phase
                ));
            }
        }
    }
    (missing, behind)
}

fn in_step(held: &[CaState], cluster: &[CaState]) -> bool {
    let (missing, behind) = compare(held, cluster);
    missing.is_empty() && behind.is_empty()
}

/// An authority to copy `DATA/ca` from: one seen recently that follows the cluster's
/// rotations (the one that took the last step first).
fn source(records: &[AuthorityRecord], cluster: &ClusterCas, now: u64) -> Option<String> {
    let good = |r: &&AuthorityRecord| {
        now.saturating_sub(r.last_seen) <= STALE_AFTER_SECS && in_step(&r.held, &cluster.cas)
    };
    records
        .iter()
        .filter(good)
        .find(|r| r.address == cluster.by)
        .or_else(|| records.iter().find(good))
        .map(|r| r.address.clone())
        // None seen lately follows it: the one that took the last step still has the keys.
        .or_else(|| Some(cluster.by.clone()).filter(|by| !by.is_empty()))
}

fn remedy(from: Option<&str>) -> String {
    match from {
        Some(a) => format!(
            "copy DATA/ca from {a} to this authority (it takes the keys within seconds)"
        ),
        None => "copy DATA/ca from the authority that took the last rotation step to this authority (it takes the keys within seconds)".into(),
    }
}

/// Every registered authority, as `tctl status` shows them, by address.
pub fn list(st: &dyn Store, now: u64) -> Result<Vec<AuthorityInfo>, StoreError> {
    let mut records: Vec<AuthorityRecord> =
        store::list::<AuthorityRecord>(st, Table::Authorities, RECORD_PREFIX)?
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| now.saturating_sub(r.last_seen) <= PRUNE_AFTER_SECS)
            .collect();
    records.sort_by(|a, b| a.address.cmp(&b.address).then(a.id.cmp(&b.id)));
    let cluster = cluster(st, now)?;
    let from = cluster.as_ref().and_then(|c| source(&records, c, now));
    Ok(records
        .iter()
        .map(|r| {
            let (missing, behind) = cluster
                .as_ref()
                .map(|c| compare(&r.held, &c.cas))
                .unwrap_or_default();
            let mut remedy = if missing.is_empty() && behind.is_empty() {
                String::new()
            } else {
                remedy(from.as_deref().filter(|a| *a != r.address))
            };
            if let Some(other) = &r.shared_with {
                if !remedy.is_empty() {
                    remedy.push_str("; and ");
                }
                remedy.push_str(&shared_id_text("it", &r.id, &r.address, other));
            }
            AuthorityInfo {
                id: r.id.clone(),
                address: r.address.clone(),
                version: r.version.clone(),
                started: r.started,
                last_seen: r.last_seen,
                stale: now.saturating_sub(r.last_seen) > STALE_AFTER_SECS,
                missing,
                behind,
                remedy,
            }
        })
        .collect())
}

/// Why this authority must not sign now: the cluster signs with a key it does not hold or
/// that is not its signing key (another authority advanced a rotation). One line with the
/// key and the remedy.
pub fn signing_refusal(
    held: &[CaState],
    cluster: &ClusterCas,
    from: Option<&str>,
) -> Option<String> {
    signing_refusal_of(held, cluster, from, None)
}

/// [`signing_refusal`] for the CA `only` (every CA: `None`).
fn signing_refusal_of(
    held: &[CaState],
    cluster: &ClusterCas,
    from: Option<&str>,
    only: Option<CaKind>,
) -> Option<String> {
    cluster.cas.iter().find_map(|want| {
        if only.is_some_and(|k| k != want.kind) {
            return None;
        }
        let have = held.iter().find(|h| h.kind == want.kind)?;
        if have.signing == want.signing {
            return None;
        }
        let kind = want.kind.as_str();
        let why = if have.trusted.contains(&want.signing) {
            format!(
                "this authority's {kind} CA rotation is behind the cluster's (phase {}, the cluster is in {} and signs with {})",
                have.phase, want.phase, want.signing
            )
        } else {
            format!(
                "this authority does not hold the {kind} CA key {} that the cluster signs with now (phase {})",
                want.signing, want.phase
            )
        };
        Some(format!("{why}: {}", remedy(from)))
    })
}

/// Why this authority must not answer `req` now, if it must not: a request answered with a
/// certificate while any of its signing keys is not the cluster's, and one answered with a
/// signature of the host CA's key (a dial ticket, an audit acknowledgement, an update
/// manifest) while its host CA key is not. Agents check those against the host CAs they
/// trust, which after the grace period no longer include the key this authority still has.
fn refusal_for_request(
    req: &Request,
    held: &[CaState],
    cluster: &ClusterCas,
    from: Option<&str>,
) -> Option<String> {
    if signs(req) {
        signing_refusal(held, cluster, from)
    } else if signs_with_host_key(req) {
        signing_refusal_of(held, cluster, from, Some(CaKind::Host))
    } else {
        None
    }
}

/// Requests answered with a signature of the host CA's signing key.
fn signs_with_host_key(req: &Request) -> bool {
    matches!(
        req,
        Request::AuthorizeDial { .. } | Request::AuditUpload { .. } | Request::UpdateStart(_)
    )
}

/// Requests answered with a certificate this authority signs.
fn signs(req: &Request) -> bool {
    matches!(
        req,
        Request::SignUser(_)
            | Request::SignHost { .. }
            | Request::JoinDevice(_)
            | Request::RenewDevice(_)
            | Request::JoinGateway(_)
            | Request::RenewGateway(_)
            | Request::Login(_)
            | Request::SsoFinish(_)
            | Request::WebLogin(_)
            | Request::WebSsoFinish(_)
            | Request::WebSessionCert { .. }
            | Request::SessionMfaCert(_)
            | Request::TargetCert { .. }
    )
}

/// What a caller other than an administrator is told when this authority refuses to sign:
/// gateways relay it to joining devices and users, so it names neither a key nor another
/// authority's address (the detailed message goes to the log and to administrators).
pub const SIGNING_REFUSED_PUBLIC: &str = "this authority cannot sign right now: its CA keys are behind the cluster's (an administrator sees why in `tctl status`); try again later or through another authority";

/// The refusal as `caller` reads it: the detail for administrators, the public text for
/// everyone else.
fn refusal_for(caller: &Caller, detail: String) -> String {
    match caller {
        Caller::Admin(_) => detail,
        _ => SIGNING_REFUSED_PUBLIC.to_string(),
    }
}

/// Refuses a signing request while this authority's signing keys are not the cluster's
/// ([`refusal_for_request`]).
pub fn check_signing(
    svc: &Service,
    caller: &Caller,
    req: &Request,
    now: u64,
) -> Result<(), RpcError> {
    if !signs(req) && !signs_with_host_key(req) {
        return Ok(());
    }
    let Some(cluster) = svc.registry.cached() else {
        return Ok(());
    };
    let held = states(&svc.ca().rotations());
    if refusal_for_request(req, &held, &cluster, None).is_none() {
        svc.registry.clear_refusals();
        return Ok(());
    }
    let records: Vec<AuthorityRecord> =
        store::list::<AuthorityRecord>(svc.store(), Table::Authorities, RECORD_PREFIX)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
    let from = source(&records, &cluster, now);
    let msg = refusal_for_request(req, &held, &cluster, from.as_deref()).unwrap_or_default();
    match svc.registry.note_refusal(&msg, now) {
        Some(0) => tracing::error!(%caller, "refused to sign: {msg}"),
        Some(more) => tracing::error!(
            %caller,
            "refused to sign: {msg} ({more} more requests refused for this since it was last logged)"
        ),
        None => tracing::debug!(%caller, "refused to sign: {msg}"),
    }
    Err(RpcError::new(ErrorKind::Internal, refusal_for(caller, msg)))
}

/// Refuses a rotation step on an authority that does not follow the cluster's rotation
/// (it would start another one from its own, older keys).
pub fn check_rotation(svc: &Service, now: u64) -> Result<(), RpcError> {
    let Some(cluster) = cluster(svc.store(), now)? else {
        return Ok(());
    };
    svc.ca().expire_rotations(now);
    let held = states(&svc.ca().rotations());
    let (missing, behind) = compare(&held, &cluster.cas);
    if missing.is_empty() && behind.is_empty() {
        return Ok(());
    }
    let records: Vec<AuthorityRecord> =
        store::list::<AuthorityRecord>(svc.store(), Table::Authorities, RECORD_PREFIX)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
    let from = source(&records, &cluster, now);
    let lacks = missing
        .into_iter()
        .chain(behind)
        .collect::<Vec<_>>()
        .join(", ");
    Err(RpcError::new(
        ErrorKind::Invalid,
        format!(
            "this authority does not follow the cluster's CA rotation ({lacks}): {}, or run tctl against {}",
            remedy(from.as_deref()),
            from.as_deref().unwrap_or("that authority")
        ),
    ))
}

/// After a rotation step here: the cluster's CA state is this authority's, and its record
/// says so at once (so `tctl status` right after does not show it behind).
pub fn rotated(svc: &Service, now: u64) -> Result<(), StoreError> {
    let held = states(&svc.ca().rotations());
    let by = svc
        .registry
        .me
        .get()
        .map(|m| m.address.clone())
        .unwrap_or_default();
    publish(svc.store(), &held, &by)?;
    svc.registry.remember(Some(ClusterCas { cas: held, by }));
    beat(svc, now).map(|_| ())
}

fn beat(svc: &Service, now: u64) -> Result<Option<ClusterCas>, StoreError> {
    let Some(me) = svc.registry.me.get() else {
        return Ok(None);
    };
    let found: Option<AuthorityRecord> =
        store::get(svc.store(), Table::Authorities, &record_key(&me.id))?;
    let shared_with = {
        let mut sharing = svc
            .registry
            .sharing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = sharing.other.as_ref().map(|(a, _)| a.clone());
        let now_shared = sharing.observe(found.as_ref(), &me.instance, now);
        if now_shared != before {
            match &now_shared {
                Some(other) => tracing::error!(
                    id = %me.id,
                    "{}",
                    shared_id_text(
                        &format!("this authority ({})", me.address),
                        &me.id,
                        &me.address,
                        other
                    )
                ),
                None => tracing::info!(
                    id = %me.id,
                    "no other authority writes this authority's record any more"
                ),
            }
        }
        now_shared
    };
    let record = AuthorityRecord {
        id: me.id.clone(),
        address: me.address.clone(),
        version: edgeport_proto::VERSION.to_string(),
        started: me.started,
        last_seen: now,
        held: states(&svc.ca().rotations()),
        instance: me.instance.clone(),
        shared_with,
    };
    heartbeat(svc.store(), &record, now).map(Some)
}

/// One line: `subject` (the authority at `a`) and the one at `b` both run with the id `id`,
/// and what to do.
fn shared_id_text(subject: &str, id: &str, a: &str, b: &str) -> String {
    let other = if a == b {
        "another process at the same address".to_string()
    } else {
        format!("the authority at {b}")
    };
    format!(
        "{subject} and {other} both run with the id {id}: one's data dir was copied whole from the other's; stop one of them, delete its DATA/authority.id and start it again"
    )
}

/// What the periodic check remembers between runs.
#[derive(Default)]
struct Ticker {
    last_beat: Option<u64>,
    last_held: Vec<CaState>,
    /// What the last warning said was lacking (warned once per change).
    last_warned: (Vec<String>, Vec<String>),
}

/// One check: takes a copied `DATA/ca` when this authority is behind the cluster, and
/// writes its record every [`HEARTBEAT_SECS`] or when the keys it holds changed.
fn check(svc: &Service, t: &mut Ticker, now: u64) -> Result<(), StoreError> {
    svc.ca().expire_rotations(now);
    let mut cluster = cluster(svc.store(), now)?;
    if let Some(c) = &cluster {
        if !in_step(&states(&svc.ca().rotations()), &c.cas) {
            match svc.ca().reload(|r| in_step(&states(r), &c.cas)) {
                Ok(true) => tracing::info!(
                    "took the CA keys and rotation state copied into DATA/ca: this authority follows the cluster's CA rotation again"
                ),
                Ok(false) => {}
                Err(e) => tracing::debug!("cannot read DATA/ca again: {e}"),
            }
        }
    }
    let held = states(&svc.ca().rotations());
    let due = t
        .last_beat
        .is_none_or(|at| now.saturating_sub(at) >= HEARTBEAT_SECS);
    if due || held != t.last_held {
        if let Some(c) = beat(svc, now)? {
            cluster = Some(c);
        }
        t.last_beat = Some(now);
        t.last_held = held.clone();
    }
    let lacks = cluster
        .as_ref()
        .map(|c| compare(&held, &c.cas))
        .unwrap_or_default();
    if lacks != t.last_warned {
        if let Some(c) = cluster
            .as_ref()
            .filter(|_| !lacks.0.is_empty() || !lacks.1.is_empty())
        {
            tracing::warn!(
                missing = %lacks.0.join(", "),
                behind = %lacks.1.join(", "),
                "this authority does not follow the cluster's CA rotation (last step by {}): copy DATA/ca from there",
                c.by
            );
        }
        t.last_warned = lacks;
    }
    svc.registry.remember(cluster);
    Ok(())
}

/// The first check, before the authority serves (so one left behind refuses at once).
pub fn start(svc: &Service, now: u64) -> Result<(), StoreError> {
    check(svc, &mut Ticker::default(), now)
}

/// Runs [`check`] every [`CHECK_EVERY`] until shutdown.
pub async fn run(svc: Arc<Service>, shutdown: CancellationToken) {
    let t = Ticker {
        last_beat: Some(edgeport_net::clock::now_secs()),
        last_held: states(&svc.ca().rotations()),
        ..Default::default()
    };
    let ticker = Arc::new(Mutex::new(t));
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (svc, ticker) = (svc.clone(), ticker.clone());
        let now = edgeport_net::clock::now_secs();
        let done = tokio::task::spawn_blocking(move || {
            let mut t = ticker.lock().unwrap_or_else(|p| p.into_inner());
            check(&svc, &mut t, now)
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot register this authority in the store: {e}"),
            Err(e) => tracing::warn!("authority registration failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn ca(kind: CaKind, phase: &str, trusted: &[&str], drop_at: Option<u64>) -> CaState {
        CaState {
            kind,
            phase: phase.into(),
            signing: trusted[0].into(),
            trusted: trusted.iter().map(|t| t.to_string()).collect(),
            drop_at,
        }
    }

    fn standby() -> Vec<CaState> {
        vec![
            ca(CaKind::User, "standby", &["u1"], None),
            ca(CaKind::Host, "standby", &["h1"], None),
            ca(CaKind::X509, "standby", &["x1"], None),
        ]
    }

    fn record(id: &str, address: &str, held: Vec<CaState>, now: u64) -> AuthorityRecord {
        AuthorityRecord {
            id: id.into(),
            address: address.into(),
            version: "1.2.3".into(),
            started: 1,
            last_seen: now,
            held,
            instance: String::new(),
            shared_with: None,
        }
    }

    fn sled() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    /// Two processes with one id (a copied data dir) each write the record every
    /// heartbeat; each sees the other's instance in between. A restart (a new instance that
    /// finds the old one's record) is not a clash, and a clash ends once the other stops.
    #[test]
    fn a_shared_id_is_noticed_by_both_and_not_on_a_restart() {
        let (_d, st) = sled();
        let write = |addr: &str, inst: &str, shared: Option<String>, now: u64| {
            let mut r = record("a", addr, standby(), now);
            r.instance = inst.into();
            r.shared_with = shared;
            heartbeat(&st, &r, now).unwrap();
        };
        let found = || store::get::<AuthorityRecord>(&st, Table::Authorities, "a/a").unwrap();

        // A restart: the new process finds the old one's record, a moment old.
        write("10.0.0.5:3025", "old", None, 100);
        let mut first = Sharing::default();
        assert_eq!(first.observe(found().as_ref(), "new", 101), None);
        write("10.0.0.5:3025", "new", None, 101);
        assert_eq!(first.observe(found().as_ref(), "new", 116), None);
        write("10.0.0.5:3025", "new", None, 116);

        // A clone starts at another address: its first write is no clash for it, but the
        // first process sees a foreign instance at its next heartbeat, and so does the clone.
        let mut clone = Sharing::default();
        assert_eq!(clone.observe(found().as_ref(), "clone", 120), None);
        write("10.0.0.9:3025", "clone", None, 120);
        let seen = first.observe(found().as_ref(), "new", 131);
        assert_eq!(seen.as_deref(), Some("10.0.0.9:3025"));
        write("10.0.0.5:3025", "new", seen, 131);
        let seen = clone.observe(found().as_ref(), "clone", 135);
        assert_eq!(seen.as_deref(), Some("10.0.0.5:3025"));
        write("10.0.0.9:3025", "clone", seen, 135);
        let l = list(&st, 136).unwrap();
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(
            l[0].remedy
                .starts_with("it and the authority at 10.0.0.5:3025 both run with the id a: ")
                && l[0].remedy.contains("delete its DATA/authority.id"),
            "{}",
            l[0].remedy
        );
        assert!(l[0].missing.is_empty() && l[0].behind.is_empty());

        // Heartbeats that drift: two of the first's in a row still say it is shared, until
        // the clone has not written for STALE_AFTER_SECS (it was stopped).
        write("10.0.0.5:3025", "new", Some("10.0.0.9:3025".into()), 146);
        assert!(first.observe(found().as_ref(), "new", 161).is_some());
        write("10.0.0.5:3025", "new", None, 161);
        assert_eq!(
            first.observe(found().as_ref(), "new", 131 + STALE_AFTER_SECS + 1),
            None
        );
    }

    #[test]
    fn records_go_stale_then_are_dropped() {
        let (_d, st) = sled();
        let t0 = 1_000_000;
        heartbeat(&st, &record("a", "10.0.0.5:3025", standby(), t0), t0).unwrap();
        heartbeat(&st, &record("b", "10.0.0.6:3025", standby(), t0), t0).unwrap();
        let l = list(&st, t0 + STALE_AFTER_SECS).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l
            .iter()
            .all(|a| !a.stale && a.remedy.is_empty() && a.missing.is_empty()));
        assert_eq!(l[0].address, "10.0.0.5:3025");

        // b stops; a goes on.
        let later = t0 + STALE_AFTER_SECS + 1;
        heartbeat(&st, &record("a", "10.0.0.5:3025", standby(), later), later).unwrap();
        let l = list(&st, later).unwrap();
        let b = l.iter().find(|a| a.id == "b").unwrap();
        assert!(b.stale && b.missing.is_empty(), "{b:?}");
        assert!(!l.iter().find(|a| a.id == "a").unwrap().stale);

        // A day later b's record is gone (a's heartbeat prunes it); a restarted a is one record.
        let day = t0 + PRUNE_AFTER_SECS + 1;
        assert_eq!(list(&st, day).unwrap().len(), 1, "a stale record is listed");
        heartbeat(&st, &record("a", "10.0.0.7:3025", standby(), day), day).unwrap();
        let keys = st.scan_prefix(Table::Authorities, RECORD_PREFIX).unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let l = list(&st, day).unwrap();
        assert_eq!((l.len(), l[0].address.as_str()), (1, "10.0.0.7:3025"));
    }

    #[test]
    fn an_authority_without_the_new_key_is_told_where_to_copy_it_from() {
        let (_d, st) = sled();
        let now = 5_000;
        heartbeat(&st, &record("a", "a:1", standby(), now), now).unwrap();
        heartbeat(&st, &record("b", "b:1", standby(), now), now).unwrap();
        // a starts a user CA rotation: the cluster trusts u2 beside u1.
        let mut rotating = standby();
        rotating[0] = ca(CaKind::User, "init", &["u1", "u2"], None);
        publish(&st, &rotating, "a:1").unwrap();
        heartbeat(&st, &record("a", "a:1", rotating.clone(), now), now).unwrap();
        let l = list(&st, now).unwrap();
        let (a, b) = (&l[0], &l[1]);
        assert!(a.missing.is_empty() && a.behind.is_empty() && a.remedy.is_empty());
        assert_eq!(b.missing, vec!["user CA u2".to_string()]);
        assert!(b.behind[0].starts_with("user CA: phase standby (cluster: init)"));
        assert!(b.remedy.contains("copy DATA/ca from a:1"), "{}", b.remedy);
        // a stopped: the remedy still names it (it took the step, it has the keys).
        let later = now + STALE_AFTER_SECS + 1;
        let l = list(&st, later).unwrap();
        assert!(
            l[0].stale && l[1].remedy.contains("copy DATA/ca from a:1"),
            "{l:?}"
        );

        // While the old key signs, b may sign; once u2 signs it must not.
        let cluster = cluster(&st, now).unwrap().unwrap();
        assert_eq!(signing_refusal(&standby(), &cluster, Some("a:1")), None);
        rotating[0] = ca(CaKind::User, "update_clients", &["u2", "u1"], None);
        publish(&st, &rotating, "a:1").unwrap();
        let cluster = super::cluster(&st, now).unwrap().unwrap();
        let msg = signing_refusal(&standby(), &cluster, Some("a:1")).unwrap();
        assert!(
            msg.starts_with("this authority does not hold the user CA key u2")
                && msg.contains("copy DATA/ca from a:1"),
            "{msg}"
        );
        // Holding u2 but still in init (an older copy of DATA/ca): behind, not missing.
        let mut old_copy = standby();
        old_copy[0] = ca(CaKind::User, "init", &["u1", "u2"], None);
        let msg = signing_refusal(&old_copy, &cluster, None).unwrap();
        assert!(msg.contains("rotation is behind the cluster's"), "{msg}");
        assert_eq!(signing_refusal(&rotating, &cluster, None), None);

        // Only an administrator reads the detail; a gateway relays the refusal to joining
        // devices and users, who must not learn keys or other authorities' addresses.
        let detail = signing_refusal(&standby(), &cluster, Some("a:1")).unwrap();
        let admin = refusal_for(&Caller::Admin("root".into()), detail.clone());
        assert_eq!(admin, detail);
        for caller in [Caller::Gateway("gw1".into()), Caller::Anonymous] {
            let told = refusal_for(&caller, detail.clone());
            assert_eq!(told, SIGNING_REFUSED_PUBLIC);
            assert!(!told.contains("a:1") && !told.contains("u2"), "{told}");
        }
    }

    /// Dial tickets, audit acknowledgements and update manifests carry the host CA's
    /// signature: refused while this authority's host key is not the cluster's, whatever the
    /// other CAs; certificates while any key is behind; everything else never.
    #[test]
    fn host_key_signatures_are_refused_only_for_a_host_ca_behind() {
        let dial = Request::AuthorizeDial {
            user_cert_der: Vec::new(),
            device: "van".into(),
            service: edgeport_proto::tunnel::Service::Ssh,
        };
        let login = Request::Login(Default::default());
        let list = Request::DevicePage {
            after: String::new(),
        };
        let mut host_moved = standby();
        host_moved[1] = ca(CaKind::Host, "update_clients", &["h2", "h1"], None);
        let host_moved = ClusterCas {
            cas: host_moved,
            by: "a:1".into(),
        };
        let mut user_moved = standby();
        user_moved[0] = ca(CaKind::User, "update_clients", &["u2", "u1"], None);
        let user_moved = ClusterCas {
            cas: user_moved,
            by: "a:1".into(),
        };
        let lagging = standby();
        let msg = refusal_for_request(&dial, &lagging, &host_moved, Some("a:1")).unwrap();
        assert!(
            msg.starts_with("this authority does not hold the host CA key h2"),
            "{msg}"
        );
        assert!(refusal_for_request(&login, &lagging, &host_moved, None).is_some());
        assert!(refusal_for_request(&dial, &lagging, &user_moved, None).is_none());
        assert!(refusal_for_request(&login, &lagging, &user_moved, None).is_some());
        assert!(refusal_for_request(&list, &lagging, &host_moved, None).is_none());
        assert!(signs_with_host_key(&Request::AuditUpload {
            device_id: "van".into(),
            batch: edgeport_proto::audit::AuditBatch {
                events: Vec::new(),
                signature: Vec::new(),
            },
        }));
        // In step: nothing refused.
        assert!(refusal_for_request(&dial, &host_moved.cas, &host_moved, None).is_none());
    }

    /// A refusal is logged when it first appears, then once per reminder period with the
    /// count since; another refusal is logged at once; after a clear, at once again.
    #[test]
    fn a_lasting_refusal_is_logged_once_then_reminded() {
        let mut log = RefusalLog::default();
        assert_eq!(log.note("host behind", 1000), Some(0));
        for t in 1001..1100 {
            assert_eq!(log.note("host behind", t), None);
        }
        assert_eq!(log.note("user behind", 1100), Some(0));
        assert_eq!(
            log.note("host behind", 1000 + REFUSAL_REMIND_SECS),
            Some(99)
        );
        assert_eq!(log.note("host behind", 1001 + REFUSAL_REMIND_SECS), None);
        log.clear();
        assert_eq!(log.note("host behind", 1002 + REFUSAL_REMIND_SECS), Some(0));
        // Many distinct texts do not grow it without end.
        for i in 0..1000 {
            log.note(&format!("text {i}"), 2000);
        }
        assert!(log.seen.len() <= 64);
    }

    #[test]
    fn the_cluster_state_drops_the_old_key_when_the_grace_ends() {
        let (_d, st) = sled();
        let mut rotating = standby();
        rotating[1] = ca(CaKind::Host, "update_servers", &["h2", "h1"], Some(100));
        publish(&st, &rotating, "a:1").unwrap();
        assert_eq!(cluster(&st, 99).unwrap().unwrap().cas[1].trusted.len(), 2);
        let after = cluster(&st, 100).unwrap().unwrap();
        assert_eq!(after.cas[1], ca(CaKind::Host, "standby", &["h2"], None));
        // An authority that dropped h1 itself is in step; the heartbeat writes it back.
        let mut dropped = standby();
        dropped[1] = ca(CaKind::Host, "standby", &["h2"], None);
        let c = heartbeat(&st, &record("a", "a:1", dropped.clone(), 100), 100).unwrap();
        assert!(in_step(&dropped, &c.cas));
        let stored: ClusterCas = store::get(&st, Table::Authorities, CLUSTER_KEY)
            .unwrap()
            .unwrap();
        assert_eq!(stored.cas[1].phase, "standby");
    }

    #[test]
    fn the_first_authority_records_the_cluster_state() {
        let (_d, st) = sled();
        assert!(cluster(&st, 1).unwrap().is_none());
        let c = heartbeat(&st, &record("a", "a:1", standby(), 1), 1).unwrap();
        assert_eq!((c.cas, c.by.as_str()), (standby(), "a:1"));
        // A later one does not overwrite it with its own.
        let mut other = standby();
        other[2] = ca(CaKind::X509, "standby", &["x9"], None);
        let c = heartbeat(&st, &record("b", "b:1", other, 2), 2).unwrap();
        assert_eq!(c.by, "a:1");
        let l = list(&st, 2).unwrap();
        assert_eq!(l[1].missing, vec!["x509 CA x1".to_string()]);
    }
}
