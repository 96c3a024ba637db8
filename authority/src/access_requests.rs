//! Access requests (just-in-time elevation): a user asks for roles their roles let them ask
//! for (`request_roles`), an administrator (`tctl requests approve | deny`) or a user whose
//! roles review them (`review_roles`, never their own request) decides, and an approval
//! lasts a given time. While it lasts, every certificate issued to the user carries the
//! approved roles and ends no later than the approval ([`elevation`]); dials count the
//! roles only for such a certificate ([`dial_roles`]). Requests and decisions are audited.

use std::collections::BTreeSet;

use edgeport_proto::audit::AuditEvent;
use edgeport_proto::rpc::{
    AccessAction, AccessRequestInfo, AccessReview, AccessState, Response, RpcError,
    SignedUserAction,
};
use serde::{Deserialize, Serialize};

use crate::ca::BACKDATE_SECS;
use crate::errors::{denied, internal, invalid, not_found};
use crate::roles::{self, DEFAULT_ROLE, MAX_SESSION_TTL_SECS};
use crate::service::Service;
use crate::store::{self, Store, Table};
use crate::users::{self, Subject};

/// How long an approval lasts when the reviewer does not say.
pub const DEFAULT_APPROVAL_SECS: u64 = 3600;
/// Pending requests one user may have at once.
const MAX_PENDING_PER_USER: usize = 16;
/// Longest reason kept.
const MAX_REASON: usize = 1024;
/// Most roles one request may name.
const MAX_ROLES: usize = 16;

/// One access request as stored (`r/ID`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccessRecord {
    pub id: String,
    pub user: String,
    /// The requester's user id: a later user of a removed user's name does not inherit it.
    pub user_id: String,
    pub roles: Vec<String>,
    pub reason: String,
    pub state: AccessState,
    pub created: u64,
    pub reviewer: String,
    pub review_reason: String,
    pub reviewed_at: u64,
    pub expires: u64,
}

impl AccessRecord {
    fn info(&self, now: u64) -> AccessRequestInfo {
        let state = match self.state {
            AccessState::Approved if self.expires <= now => AccessState::Expired,
            s => s,
        };
        AccessRequestInfo {
            id: self.id.clone(),
            user: self.user.clone(),
            roles: self.roles.clone(),
            reason: self.reason.clone(),
            state,
            created: self.created,
            reviewer: self.reviewer.clone(),
            review_reason: self.review_reason.clone(),
            reviewed_at: self.reviewed_at,
            expires: self.expires,
        }
    }

    fn belongs_to(&self, s: &Subject) -> bool {
        self.user == s.name && self.user_id == s.id
    }

    fn active(&self, now: u64) -> bool {
        self.state == AccessState::Approved && self.expires > now
    }
}

/// Who decides on a request.
pub enum Reviewer<'a> {
    Admin(&'a str),
    User(&'a Subject),
}

impl Reviewer<'_> {
    fn describe(&self) -> String {
        match self {
            Reviewer::Admin(n) => format!("admin {n}"),
            Reviewer::User(s) => format!("user {}", s.name),
        }
    }
}

fn records(store: &dyn Store) -> Result<Vec<AccessRecord>, RpcError> {
    let mut v: Vec<AccessRecord> = store::list::<AccessRecord>(store, Table::AccessRequests, "r/")?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    v.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
    Ok(v)
}

/// The roles a subject's own roles name in `field` (`request_roles` or `review_roles`).
fn permitted(
    store: &dyn Store,
    subject: &Subject,
    field: fn(&edgeport_proto::rpc::RoleSpec) -> &Vec<String>,
) -> Result<BTreeSet<String>, RpcError> {
    let default = [DEFAULT_ROLE.to_string()];
    let names = if subject.roles.is_empty() {
        &default[..]
    } else {
        &subject.roles[..]
    };
    let mut out = BTreeSet::new();
    for n in names {
        if let Some(spec) = roles::lookup(store, n)? {
            out.extend(field(&spec).iter().cloned());
        }
    }
    Ok(out)
}

fn audit(svc: &Service, kind: &str, rec: &AccessRecord, by: &str, now: u64) {
    let mut ev = AuditEvent::new(kind, now.saturating_mul(1000));
    ev.user = rec.user.clone();
    ev.fields.insert("request_id".into(), rec.id.clone());
    ev.fields.insert("roles".into(), rec.roles.join(","));
    ev.fields.insert("by".into(), by.to_string());
    if kind == "access_request.created" {
        ev.fields.insert("reason".into(), rec.reason.clone());
    } else {
        ev.fields.insert("reason".into(), rec.review_reason.clone());
    }
    if rec.expires > 0 {
        ev.fields.insert("expires".into(), rec.expires.to_string());
    }
    crate::audit::record_own(svc, ev, "");
}

/// A signed action from tsh, relayed by a gateway. A refusal is audited too (a forged or
/// replayed action is worth knowing about).
pub fn user_action(
    svc: &Service,
    gateway: &str,
    signed: &SignedUserAction,
    now: u64,
) -> Result<Response, RpcError> {
    let result =
        crate::handlers::user_action::verify(svc, signed, now).and_then(|(subject, action)| {
            crate::handlers::user_certs::check_not_locked(svc, &subject.name, now)?;
            match action.action {
                AccessAction::Create { roles, reason } => create(svc, &subject, roles, reason, now),
                AccessAction::List => list_for(svc.store(), &subject, now),
                AccessAction::Review(r) => review(svc, Reviewer::User(&subject), r, now),
                AccessAction::SessionMfa(_) => Err(crate::errors::invalid(
                    "a per-session second factor request goes as SessionMfaCert",
                )),
                AccessAction::LiveSessions => crate::open_sessions::live_for(svc.store(), &subject)
                    .map(Response::LiveSessions),
            }
        });
    if let Err(e) = &result {
        let mut ev = AuditEvent::new("access_request.refused", now.saturating_mul(1000));
        ev.fields.insert("gateway".into(), gateway.to_string());
        ev.fields.insert("error".into(), e.message.clone());
        crate::audit::record_own(svc, ev, "");
    }
    result
}

fn create(
    svc: &Service,
    subject: &Subject,
    wanted: Vec<String>,
    reason: String,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    if users::get(store, &subject.name)?.is_none() {
        return Err(denied(format!(
            "{} is not a user of this cluster and cannot request roles",
            subject.name
        )));
    }
    let wanted = users::dedup(&wanted);
    if wanted.is_empty() || wanted.len() > MAX_ROLES {
        return Err(invalid(format!("name 1 to {MAX_ROLES} roles to request")));
    }
    if reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(invalid(format!(
            "the reason must be at most {MAX_REASON} printable characters"
        )));
    }
    let may = permitted(store, subject, |r| &r.request_roles)?;
    for r in &wanted {
        if roles::lookup(store, r)?.is_none() {
            return Err(invalid(format!("no role {r:?}")));
        }
        if !may.contains(r) {
            return Err(denied(format!(
                "user {} may not request role {r} (their roles allow requesting: {})",
                subject.name,
                if may.is_empty() {
                    "none".to_string()
                } else {
                    may.iter().cloned().collect::<Vec<_>>().join(",")
                }
            )));
        }
        if subject.roles.contains(r) {
            return Err(invalid(format!(
                "user {} already holds role {r}",
                subject.name
            )));
        }
    }
    let pending = records(store)?
        .iter()
        .filter(|r| r.belongs_to(subject) && r.state == AccessState::Pending)
        .count();
    if pending >= MAX_PENDING_PER_USER {
        return Err(denied(format!(
            "user {} has {pending} pending requests; wait for a decision",
            subject.name
        )));
    }
    let id = edgeport_proto::keys::random_bytes(8)
        .map(hex::encode)
        .map_err(|e| internal("a request id", e))?;
    let rec = AccessRecord {
        id: id.clone(),
        user: subject.name.clone(),
        user_id: subject.id.clone(),
        roles: wanted,
        reason,
        state: AccessState::Pending,
        created: now,
        reviewer: String::new(),
        review_reason: String::new(),
        reviewed_at: 0,
        expires: 0,
    };
    let data = serde_json::to_vec(&rec).map_err(|e| internal("an access request", e))?;
    if !store.compare_and_swap(Table::AccessRequests, &format!("r/{id}"), None, Some(data))? {
        return Err(internal("an access request", "request id taken"));
    }
    tracing::info!(user = %rec.user, roles = %rec.roles.join(","), id = %rec.id, "access requested");
    audit(
        svc,
        "access_request.created",
        &rec,
        &format!("user {}", rec.user),
        now,
    );
    Ok(Response::AccessRequests(vec![rec.info(now)]))
}

/// A user's own requests and the pending ones they may review.
fn list_for(store: &dyn Store, subject: &Subject, now: u64) -> Result<Response, RpcError> {
    let may = permitted(store, subject, |r| &r.review_roles)?;
    let out = records(store)?
        .into_iter()
        .filter(|r| {
            r.belongs_to(subject)
                || (r.state == AccessState::Pending && r.roles.iter().all(|x| may.contains(x)))
        })
        .map(|r| r.info(now))
        .collect();
    Ok(Response::AccessRequests(out))
}

/// Every request (`tctl requests ls`).
pub fn list_all(store: &dyn Store, now: u64) -> Result<Response, RpcError> {
    Ok(Response::AccessRequests(
        records(store)?.into_iter().map(|r| r.info(now)).collect(),
    ))
}

/// Approves or denies a pending request.
pub fn review(
    svc: &Service,
    by: Reviewer<'_>,
    r: AccessReview,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    if r.reason.chars().count() > MAX_REASON || r.reason.chars().any(char::is_control) {
        return Err(invalid(format!(
            "the reason must be at most {MAX_REASON} printable characters"
        )));
    }
    let ttl = match r.ttl_secs {
        0 => DEFAULT_APPROVAL_SECS,
        t if t > MAX_SESSION_TTL_SECS => {
            return Err(invalid(format!(
                "an approval lasts at most {}h",
                MAX_SESSION_TTL_SECS / 3600
            )))
        }
        t => t,
    };
    let may_review = match &by {
        Reviewer::User(s) => Some(permitted(store, s, |x| &x.review_roles)?),
        Reviewer::Admin(_) => None,
    };
    let who = by.describe();
    let key = format!("r/{}", r.id);
    let rec =
        store::update::<AccessRecord, RpcError, _>(store, Table::AccessRequests, &key, |cur| {
            let mut rec = cur.ok_or_else(|| not_found(format!("no access request {}", r.id)))?;
            if rec.state != AccessState::Pending {
                return Err(invalid(format!(
                    "access request {} is already {}",
                    rec.id,
                    rec.info(now).state.as_str()
                )));
            }
            if let (Reviewer::User(s), Some(may)) = (&by, &may_review) {
                if rec.user == s.name || rec.user_id == s.id {
                    return Err(denied(format!(
                        "user {} cannot review their own access request",
                        s.name
                    )));
                }
                if let Some(x) = rec.roles.iter().find(|x| !may.contains(*x)) {
                    return Err(denied(format!(
                        "user {} may not review requests for role {x}",
                        s.name
                    )));
                }
            }
            rec.state = if r.approve {
                AccessState::Approved
            } else {
                AccessState::Denied
            };
            rec.reviewer = who.clone();
            rec.review_reason = r.reason.clone();
            rec.reviewed_at = now;
            rec.expires = if r.approve { now + ttl } else { 0 };
            Ok(Some(rec))
        })?
        .ok_or_else(|| internal("an access request", "vanished"))?;
    let kind = if r.approve {
        "access_request.approved"
    } else {
        "access_request.denied"
    };
    tracing::info!(user = %rec.user, id = %rec.id, by = %who, "{kind}");
    audit(svc, kind, &rec, &who, now);
    Ok(Response::AccessRequests(vec![rec.info(now)]))
}

/// What approvals add to a certificate issued now: the roles, and the time the certificate
/// must end by (the earliest of their approvals' ends), if any.
pub struct Elevation {
    pub roles: Vec<String>,
    pub until: Option<u64>,
}

pub fn elevation(store: &dyn Store, subject: &Subject, now: u64) -> Result<Elevation, RpcError> {
    let mut e = Elevation {
        roles: Vec::new(),
        until: None,
    };
    if subject.id.is_empty() {
        // Bots and users from before ids: nothing to elevate.
        return Ok(e);
    }
    for rec in records(store)? {
        if rec.belongs_to(subject) && rec.active(now) {
            for r in &rec.roles {
                if !e.roles.contains(r) && !subject.roles.contains(r) {
                    e.roles.push(r.clone());
                }
            }
            e.until = Some(e.until.map_or(rec.expires, |u| u.min(rec.expires)));
        }
    }
    Ok(e)
}

/// The subject's own roles (the default one when none), plus `extra`.
pub fn with_roles(subject: &Subject, extra: &[String]) -> Vec<String> {
    let mut names = if subject.roles.is_empty() {
        vec![DEFAULT_ROLE.to_string()]
    } else {
        subject.roles.clone()
    };
    for r in extra {
        if !names.contains(r) {
            names.push(r.clone());
        }
    }
    names
}

/// The roles a dial with `cert_der` counts: the user's own, and those of approvals in force
/// now that the certificate was issued under (issued after the approval, ending no later).
pub fn dial_roles(
    store: &dyn Store,
    subject: &Subject,
    cert_der: &[u8],
    now: u64,
) -> Result<Vec<String>, RpcError> {
    if subject.id.is_empty() {
        return Ok(subject.roles.clone());
    }
    let (not_before, not_after) = edgeport_proto::tls::validity(cert_der)
        .map_err(|e| denied(format!("the user's certificate does not count: {e}")))?;
    let issued = not_before.saturating_add(BACKDATE_SECS);
    let mut extra = Vec::new();
    for rec in records(store)? {
        if rec.belongs_to(subject)
            && rec.active(now)
            && rec.reviewed_at <= issued
            && not_after <= rec.expires
        {
            extra.extend(rec.roles.iter().cloned());
        }
    }
    if extra.is_empty() {
        return Ok(subject.roles.clone());
    }
    Ok(with_roles(subject, &extra))
}
