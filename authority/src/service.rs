//! The RPC service: who may send which request, and one handler per [`Request`] variant.
//! The caller's identity comes only from its verified client certificate (see
//! [`crate::rpc_server`]), never from a request field.
//!
//! Handlers are synchronous (the store is embedded and argon2 is CPU work); the server runs
//! each request on the blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use edgeport_net::clock::now_secs;
use edgeport_proto::identity::Principal;
use edgeport_proto::rpc::{Request, Response, RpcError};

use crate::ca::CertAuthority;
use crate::errors::denied;
use crate::handlers;
use crate::store::Store;
use crate::{devices, locks, roles, tokens, users};

/// Who sent a request, from the client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No client certificate.
    Anonymous,
    Admin(String),
    Gateway(String),
    /// A user or device certificate: nothing beyond what anonymous callers may do.
    Other(Principal),
}

impl Caller {
    pub fn from_principal(p: Principal) -> Self {
        match p {
            Principal::Admin(n) => Caller::Admin(n),
            Principal::Gateway(n) => Caller::Gateway(n),
            other => Caller::Other(other),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anonymous => write!(f, "anonymous"),
            Caller::Admin(n) => write!(f, "admin {n}"),
            Caller::Gateway(n) => write!(f, "gateway {n}"),
            Caller::Other(p) => write!(f, "{p}"),
        }
    }
}

/// Who may send a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Anyone,
    Admin,
    Gateway,
    /// Read-only requests both administrators and gateways make.
    AdminOrGateway,
}

fn access(req: &Request) -> Access {
    match req {
        Request::Ping | Request::ExportCas | Request::JoinGateway(_) => Access::Anyone,
        Request::SignUser(_)
        | Request::UserAdd(_)
        | Request::UserList
        | Request::UserRemove { .. }
        | Request::UserUpdate(_)
        | Request::TokenAdd(_)
        | Request::TokenList
        | Request::TokenRemove { .. }
        | Request::DeviceRemove { .. }
        | Request::LockAdd(_)
        | Request::LockRemove { .. }
        | Request::LockList
        | Request::RoleUpsert(_)
        | Request::RoleList
        | Request::RoleRemove { .. }
        | Request::AuditSearch(_)
        | Request::AuditVerify { .. }
        | Request::SsoMapSet(_)
        | Request::SsoMapList
        | Request::SsoMapRemove { .. }
        | Request::GatewayList
        | Request::GatewayRemove { .. }
        | Request::SsoConnectorAdd(_)
        | Request::SsoConnectorList
        | Request::SsoConnectorRemove { .. }
        | Request::DeviceUsage { .. }
        | Request::AccessRequestList
        | Request::AccessRequestReview(_)
        | Request::SignHost { .. }
        | Request::DeviceSetBudget { .. }
        | Request::CaRotate(_)
        | Request::UpdateUpload { .. }
        | Request::UpdateStart(_)
        | Request::UpdateStatus { .. }
        | Request::UpdateList
        | Request::AuthorityList => Access::Admin,
        Request::JoinDevice(_)
        | Request::RenewDevice(_)
        | Request::RenewGateway(_)
        | Request::Presence(_)
        | Request::Login(_)
        | Request::SsoStart(_)
        | Request::SsoFinish(_)
        | Request::AuditUpload { .. }
        | Request::AuditRecord(_)
        | Request::WatchPolicy { .. }
        | Request::PresenceAckPart { .. }
        | Request::UserDevicePage { .. }
        | Request::WebLogin(_)
        | Request::WebSessionCheck(_)
        | Request::WebLogout(_)
        | Request::WebDevicePage { .. }
        | Request::AccessRequestUser(_)
        | Request::SessionMfaCert(_)
        | Request::UpdateOrders
        | Request::UpdateFetch { .. }
        | Request::UpdateReport { .. }
        | Request::WebSessionCert { .. }
        | Request::WebRecordingPage { .. }
        | Request::WebRecordingGet { .. }
        | Request::WebAuditSearch { .. }
        | Request::TargetCert { .. }
        | Request::WebSsoConnectors
        | Request::WebSsoStart(_)
        | Request::WebSsoFinish(_)
        | Request::WebTerminalNonce(_)
        | Request::WebSessionAlive { .. } => Access::Gateway,
        Request::DeviceList
        | Request::DevicePage { .. }
        | Request::AuthorizeDial { .. }
        | Request::RecordingList { .. }
        | Request::RecordingPage { .. }
        | Request::RecordingGet { .. }
        | Request::TargetList { .. } => Access::AdminOrGateway,
    }
}

/// A short name of the request for logs and refusals (never its secrets).
pub fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Ping => "ping",
        Request::ExportCas => "export CAs",
        Request::SignUser(_) => "signing user certificates",
        Request::UserAdd(_) => "adding users",
        Request::UserList => "listing users",
        Request::UserRemove { .. } => "removing users",
        Request::UserUpdate(_) => "changing users",
        Request::TokenAdd(_) => "adding join tokens",
        Request::TokenList => "listing join tokens",
        Request::TokenRemove { .. } => "removing join tokens",
        Request::DeviceList | Request::DevicePage { .. } | Request::UserDevicePage { .. } => {
            "listing devices"
        }
        Request::DeviceRemove { .. } => "removing devices",
        Request::JoinGateway(_) => "gateway join",
        Request::JoinDevice(_) => "relaying device joins",
        Request::RenewDevice(_) => "renewing device certificates",
        Request::RenewGateway(_) => "renewing gateway certificates",
        Request::Presence(_) => "presence reports",
        Request::Login(_) => "relaying logins",
        Request::AuthorizeDial { .. } => "authorizing dials",
        Request::SignHost { .. } => "signing host certificates",
        Request::TargetList { .. } => "listing targets",
        Request::TargetCert { .. } => "relaying target certificate requests",
        Request::LockAdd(_) => "adding locks",
        Request::LockRemove { .. } => "removing locks",
        Request::LockList => "listing locks",
        Request::RoleUpsert(_) => "changing roles",
        Request::RoleList => "listing roles",
        Request::RoleRemove { .. } => "removing roles",
        Request::AuditUpload { .. } => "relaying audit batches",
        Request::AuditRecord(_) => "recording gateway events",
        Request::AuditSearch(_) => "searching the audit log",
        Request::AuditVerify { .. } => "verifying audit chains",
        Request::RecordingList { .. } | Request::RecordingPage { .. } => "listing recordings",
        Request::RecordingGet { .. } => "reading recordings",
        Request::SsoMapSet(_) | Request::SsoMapRemove { .. } => "changing single sign-on mappings",
        Request::SsoMapList => "listing single sign-on mappings",
        Request::WatchPolicy { .. } => "watching policy changes",
        Request::PresenceAckPart { .. } => "presence reports",
        Request::GatewayList => "listing gateways",
        Request::GatewayRemove { .. } => "removing gateways",
        Request::SsoStart(_) | Request::SsoFinish(_) => "relaying single sign-on logins",
        Request::SsoConnectorAdd(_) | Request::SsoConnectorRemove { .. } => {
            "changing single sign-on connectors"
        }
        Request::SsoConnectorList => "listing single sign-on connectors",
        Request::WebLogin(_) => "relaying web console logins",
        Request::WebSessionCheck(_) | Request::WebLogout(_) | Request::WebDevicePage { .. } => {
            "relaying web console requests"
        }
        Request::WebSessionCert { .. } => "relaying web console terminals",
        Request::WebRecordingPage { .. } | Request::WebRecordingGet { .. } => {
            "relaying web console recordings"
        }
        Request::WebAuditSearch { .. } => "relaying web console audit searches",
        Request::WebSsoConnectors | Request::WebSsoStart(_) | Request::WebSsoFinish(_) => {
            "relaying web console single sign-on logins"
        }
        Request::WebTerminalNonce(_) | Request::WebSessionAlive { .. } => {
            "relaying web console terminals"
        }
        Request::DeviceUsage { .. } => "reading device usage",
        Request::DeviceSetBudget { .. } => "setting data budgets",
        Request::CaRotate(_) => "rotating CAs",
        Request::UpdateUpload { .. } | Request::UpdateStart(_) => "updating agents",
        Request::UpdateStatus { .. } | Request::UpdateList => "reading agent updates",
        Request::AuthorityList => "listing authorities",
        Request::UpdateOrders | Request::UpdateFetch { .. } | Request::UpdateReport { .. } => {
            "delivering agent updates"
        }
        Request::AccessRequestUser(_) => "relaying access requests",
        Request::SessionMfaCert(_) => "relaying per-session second factor requests",
        Request::AccessRequestList => "listing access requests",
        Request::AccessRequestReview(_) => "reviewing access requests",
    }
}

/// Requests whose success changes what gateways must enforce: anything that can turn an
/// allowed dial into a refused one (gateways must stop reusing the authority's earlier
/// answers), and a removed lock (gateways fetch the lock list again). Each waits, briefly,
/// until the watching gateways have done so, so it is in force when tctl returns. (A device
/// that joins again with other labels is not among them: the agent checks roles against its
/// own labels at every session.)
fn moves_policy(req: &Request) -> bool {
    matches!(
        req,
        Request::LockAdd(_)
            | Request::LockRemove { .. }
            | Request::UserRemove { .. }
            | Request::UserUpdate(_)
            | Request::DeviceRemove { .. }
            | Request::RoleUpsert(_)
            | Request::RoleRemove { .. }
            | Request::GatewayRemove { .. }
    )
}

fn check_access(caller: &Caller, req: &Request) -> Result<(), RpcError> {
    let ok = matches!(
        (access(req), caller),
        (Access::Anyone, _)
            | (Access::Admin, Caller::Admin(_))
            | (Access::Gateway, Caller::Gateway(_))
            | (
                Access::AdminOrGateway,
                Caller::Admin(_) | Caller::Gateway(_)
            )
    );
    if ok {
        return Ok(());
    }
    let needs = match access(req) {
        Access::Gateway => "a gateway identity",
        _ => "an administrator identity",
    };
    Err(denied(format!(
        "{} requires {needs} (this connection is {caller})",
        request_name(req)
    )))
}

/// Tunables of the service.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Cap on user certificate lifetimes (also capped by the user's roles).
    pub max_session_ttl: u64,
    /// How many connections each party may hold.
    pub connections: crate::rpc_server::ConnectionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_session_ttl: crate::roles::MAX_SESSION_TTL_SECS,
            connections: Default::default(),
        }
    }
}

pub struct Service {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) ca: Arc<CertAuthority>,
    pub(crate) limits: Limits,
    /// Presence reports touch several records each; one at a time keeps them consistent.
    /// The map holds each gateway's snapshot in progress (large ones come in parts).
    pub(crate) presence: Mutex<HashMap<String, devices::Snapshot>>,
    /// Audit chains are extended one batch at a time.
    pub(crate) audit: Mutex<()>,
    /// Failed logins per user and client address.
    pub(crate) logins: crate::throttle::LoginThrottle,
    /// The policy epoch that gateways watch (see [`crate::policy`]).
    pub policy: crate::policy::Policy,
    /// Which gateways are revoked or locked (every gateway request is checked).
    pub standing: crate::gateways::Standing,
    /// When each gateway last reported presence here (Unix seconds).
    pub gateway_reports: Mutex<HashMap<String, u64>>,
    /// Single sign-on connectors built from the store's records.
    pub(crate) sso: crate::sso::Connectors,
    /// How far a CA rotation has spread (`tctl auth rotate --status`).
    pub(crate) spread: crate::handlers::rotate::Spread,
    /// Agent update uploads in progress and the binary being fetched (orders are stored).
    pub(crate) updates: crate::updates::Updates,
    /// The administrator identity file and the address in it, refreshed at once when a CA
    /// rotation step changes the bundle (tctl's next run trusts the current CAs).
    pub(crate) admin_identity: std::sync::OnceLock<(std::path::PathBuf, String)>,
    /// This authority's registration and the cluster's CA state it last read.
    pub registry: crate::authorities::Registry,
}

impl Service {
    pub fn new(store: Arc<dyn Store>, ca: Arc<CertAuthority>, limits: Limits) -> Self {
        let exclusive = !store.shared();
        Self {
            store,
            ca,
            limits,
            presence: Mutex::new(HashMap::new()),
            audit: Mutex::new(()),
            logins: Default::default(),
            policy: crate::policy::Policy::new(exclusive),
            standing: Default::default(),
            gateway_reports: Default::default(),
            sso: Default::default(),
            spread: Default::default(),
            updates: Default::default(),
            admin_identity: Default::default(),
            registry: Default::default(),
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn ca(&self) -> &CertAuthority {
        &self.ca
    }

    pub fn cluster(&self) -> &str {
        self.ca.cluster()
    }

    /// Answers one request from `caller` at the current time.
    pub fn handle(&self, caller: &Caller, req: Request) -> Response {
        self.handle_at(caller, req, now_secs())
    }

    /// Answers one request as if the time were `now` (Unix seconds).
    pub fn handle_at(&self, caller: &Caller, req: Request, now: u64) -> Response {
        // A rotation's grace period may have ended: drop the old CA before answering.
        self.ca.expire_rotations(now);
        let name = request_name(&req);
        let pending = crate::audit::describe(caller, &req);
        let moves = moves_policy(&req);
        let result = check_access(caller, &req)
            .and_then(|()| self.check_standing(caller, now))
            .and_then(|()| crate::authorities::check_signing(self, caller, &req, now))
            .and_then(|()| self.dispatch(caller, req, now));
        if moves && result.is_ok() {
            self.standing.changed();
            self.policy.changed();
        }
        if let Some(p) = pending {
            crate::audit::finish(self, p, &result);
        }
        match result {
            Ok(resp) => {
                tracing::debug!(%caller, request = name, "ok");
                resp
            }
            Err(e) => {
                tracing::info!(%caller, request = name, kind = ?e.kind, "refused: {}", e.message);
                Response::Error(e)
            }
        }
    }

    /// Whether `caller` is a gateway that is revoked or locked now (its connections close).
    pub fn is_barred(&self, caller: &Caller) -> bool {
        self.check_standing(caller, now_secs()).is_err()
    }

    /// Whose recordings a request may see. An administrator: everyone's, or `user`'s (a
    /// removed user's included: auditors keep them). A gateway: only those of the user whose
    /// certificate it hands over, checked here, and none made before that user's record (a
    /// later user of a removed user's name never sees the earlier one's sessions).
    fn viewer(
        &self,
        caller: &Caller,
        user: Option<String>,
        cert: Option<Vec<u8>>,
        now: u64,
    ) -> Result<Option<crate::audit::Viewer>, RpcError> {
        match caller {
            Caller::Gateway(_) => {
                let Some(der) = cert else {
                    return Err(denied(
                        "a gateway must hand over the certificate of the user whose recordings it asks for",
                    ));
                };
                let subject = handlers::dial::certified_user(self, &der, now)?;
                Ok(Some(crate::audit::Viewer {
                    id: subject.id,
                    name: subject.name,
                    since_ms: subject.created.saturating_mul(1000),
                }))
            }
            // An administrator's filter is by name: every recording of that name, whoever
            // held it.
            _ => Ok(user.map(|name| crate::audit::Viewer {
                name,
                id: String::new(),
                since_ms: 0,
            })),
        }
    }

    /// A revoked or locked gateway's certificate buys nothing, whatever it asks.
    fn check_standing(&self, caller: &Caller, now: u64) -> Result<(), RpcError> {
        let Caller::Gateway(id) = caller else {
            return Ok(());
        };
        if self.standing.barred(self.store(), now)?.contains(id) {
            return Err(RpcError::new(
                edgeport_proto::rpc::ErrorKind::GatewayRevoked,
                format!("gateway {id} was revoked or is locked by an administrator"),
            ));
        }
        Ok(())
    }

    fn dispatch(&self, caller: &Caller, req: Request, now: u64) -> Result<Response, RpcError> {
        let store = self.store();
        let pin = &self.ca.bundle().ca_pin;
        let caller_name = match caller {
            Caller::Admin(n) | Caller::Gateway(n) => n.as_str(),
            _ => "",
        };
        match req {
            Request::Ping => Ok(Response::Pong {
                cluster: self.cluster().to_string(),
                version: edgeport_proto::VERSION.to_string(),
            }),
            Request::ExportCas => {
                // Counted for `tctl auth rotate`'s progress: this gateway has the bundle now.
                if let Caller::Gateway(g) = caller {
                    self.spread.fetched(g, self.ca.generation());
                }
                Ok(Response::Cas(self.ca.bundle()))
            }
            Request::CaRotate(r) => handlers::rotate::rotate(self, r, now),
            Request::UpdateUpload {
                sha256,
                offset,
                data,
            } => crate::updates::upload(self, sha256, offset, data),
            Request::UpdateStart(spec) => crate::updates::start(self, caller_name, spec, now),
            Request::UpdateStatus { id } => crate::updates::status(self, &id, now),
            Request::UpdateOrders => crate::updates::orders(self, now),
            Request::UpdateList => crate::updates::list(self, now),
            Request::AuthorityList => {
                Ok(Response::Authorities(crate::authorities::list(store, now)?))
            }
            Request::UpdateFetch { sha256, offset } => crate::updates::fetch(self, &sha256, offset),
            Request::UpdateReport {
                id,
                device,
                accepted,
                message,
            } => crate::updates::report(self, caller_name, &id, &device, accepted, message, now),
            Request::SignUser(r) => handlers::user_certs::sign_user(self, r, now),
            Request::UserAdd(spec) => {
                let (invite, invite_expires) = users::add(store, &spec, now)?;
                if locks::clear_removed_user(store, &spec.name)? {
                    // A removed user's lock on the name: gateways fetch the locks again.
                    self.standing.changed();
                    self.policy.changed();
                }
                tracing::info!(
                    user = %spec.name,
                    logins = %spec.logins.join(","),
                    invite = invite.is_some(),
                    "user added"
                );
                Ok(Response::UserAdded {
                    invite,
                    invite_expires,
                })
            }
            Request::UserList => {
                let locked = locks::active(store, now)?;
                let is_locked = |n: &str| {
                    locked.iter().any(
                        |l| matches!(&l.target, edgeport_proto::rpc::LockTarget::User(u) if u == n),
                    )
                };
                Ok(Response::Users(users::list(store, &is_locked)?))
            }
            Request::UserRemove { name } => {
                users::remove(store, &name)?;
                // Their live sessions end as under a lock (gateways and agents act on it).
                locks::lock_removed_user(store, &name, self.limits.max_session_ttl, now)?;
                self.standing.changed();
                tracing::info!(user = %name, "user removed");
                Ok(Response::Ok)
            }
            Request::UserUpdate(change) => {
                users::update(store, &change)?;
                tracing::info!(user = %change.name, "user updated");
                Ok(Response::Ok)
            }
            Request::TokenAdd(spec) => {
                let info = tokens::add(store, &spec, pin, now)?;
                tracing::info!(id = %info.id, kind = spec.kind.as_str(), "join token added");
                Ok(Response::Token(info))
            }
            Request::TokenList => Ok(Response::Tokens(tokens::list(store, pin, now)?)),
            Request::TokenRemove { id } => {
                tokens::remove(store, &id)?;
                Ok(Response::Ok)
            }
            Request::DeviceList => Ok(Response::Devices(devices::list(store, now)?)),
            Request::DeviceUsage { days, device } => Ok(Response::DeviceUsage(
                crate::usage::totals(store, device.as_deref(), days, now)?,
            )),
            Request::DevicePage { after } => {
                let (devices, more) = devices::page(store, &after, now)?;
                Ok(Response::DevicePage { devices, more })
            }
            Request::UserDevicePage {
                user_cert_der,
                after,
            } => {
                // A user sees the devices their roles reach, nothing more: the user of the
                // certificate the gateway hands over, with the roles it dials with (approved
                // access requests included).
                let subject = handlers::dial::certified_user(self, &user_cert_der, now)?;
                let names =
                    crate::access_requests::dial_roles(store, &subject, &user_cert_der, now)?;
                let grants = roles::grants(store, &names)?;
                let (devices, more) =
                    devices::page_where(store, &after, now, |d| grants.allows_device(&d.labels))?;
                Ok(Response::DevicePage { devices, more })
            }
            Request::DeviceSetBudget { id, data_budget } => {
                devices::set_budget(store, &id, data_budget, now)?;
                tracing::info!(device = %id, ?data_budget, "data budget set");
                Ok(Response::Ok)
            }
            Request::DeviceRemove { id } => {
                devices::revoke(store, &id, now)?;
                tracing::info!(device = %id, "device removed");
                Ok(Response::Ok)
            }
            Request::JoinGateway(r) => handlers::join::join_gateway(self, r, now),
            Request::JoinDevice(r) => handlers::join::join_device(self, caller_name, r, now),
            Request::RenewDevice(r) => handlers::join::renew_device(self, caller_name, r, now),
            Request::RenewGateway(r) => handlers::join::renew_gateway(self, caller_name, r, now),
            Request::Presence(r) => handlers::presence::presence(self, caller_name, &r, now),
            Request::Login(r) => handlers::user_certs::login(self, caller_name, r, now),
            Request::AuthorizeDial {
                user_cert_der,
                device,
                service,
            } => handlers::dial::authorize_dial(
                self,
                caller_name,
                &user_cert_der,
                &device,
                service,
                now,
            ),
            Request::SignHost {
                name,
                ssh_public_key,
                ttl_secs,
            } => handlers::targets::sign_host(self, &name, &ssh_public_key, ttl_secs, now),
            Request::TargetList { user_cert_der } => {
                handlers::targets::list(self, caller, user_cert_der.as_deref(), now)
            }
            Request::TargetCert { device_id, req } => {
                handlers::targets::target_cert(self, caller_name, &device_id, &req, now)
            }
            Request::LockAdd(spec) => {
                locks::add(store, &spec, now)?;
                tracing::info!(target = %locks::describe(&spec.target), "lock added");
                Ok(Response::Ok)
            }
            Request::LockRemove { target } => {
                locks::remove(store, &target)?;
                self.standing.changed();
                tracing::info!(target = %locks::describe(&target), "lock removed");
                Ok(Response::Ok)
            }
            Request::LockList => Ok(Response::Locks(locks::active(store, now)?)),
            Request::RoleUpsert(spec) => {
                roles::upsert(store, &spec)?;
                tracing::info!(role = %spec.name, "role saved");
                Ok(Response::Ok)
            }
            Request::RoleList => Ok(Response::Roles(roles::list(store)?)),
            Request::RoleRemove { name } => {
                roles::remove(store, &name)?;
                tracing::info!(role = %name, "role removed");
                Ok(Response::Ok)
            }
            Request::AuditUpload { device_id, batch } => {
                crate::audit::upload(self, caller_name, &device_id, batch)
            }
            Request::AuditRecord(events) => crate::audit::record_gateway(self, caller_name, events),
            Request::AuditSearch(q) => crate::audit::search(self, &q),
            Request::AuditVerify { device } => crate::audit::verify(self, device.as_deref()),
            Request::RecordingList {
                user,
                user_cert_der,
            } => {
                let viewer = self.viewer(caller, user, user_cert_der, now)?;
                crate::audit::recordings(self, viewer.as_ref())
            }
            Request::RecordingPage {
                user,
                user_cert_der,
                cursor,
                limit,
            } => {
                let viewer = self.viewer(caller, user, user_cert_der, now)?;
                crate::audit::recording_page(self, viewer.as_ref(), cursor.as_deref(), limit)
            }
            Request::RecordingGet {
                session_id,
                user,
                offset,
                user_cert_der,
            } => {
                let viewer = self.viewer(caller, user, user_cert_der, now)?;
                crate::audit::recording(self, &session_id, viewer.as_ref(), offset)
            }
            Request::SsoMapSet(m) => handlers::sso::map_set(store, m),
            Request::SsoMapList => handlers::sso::map_list(store),
            Request::SsoMapRemove { group } => handlers::sso::map_remove(store, &group),
            Request::PresenceAckPart { part, digest } => {
                handlers::presence::ack_part(self, part, &digest, now)
            }
            Request::GatewayList => crate::gateways::list_info(self, now),
            Request::GatewayRemove { id } => {
                crate::gateways::revoke(store, &id, now)?;
                tracing::info!(gateway = %id, "gateway revoked");
                Ok(Response::Ok)
            }
            // Answered by the RPC server, which can wait; here only the current epoch.
            Request::WatchPolicy { .. } => Ok(Response::Policy {
                epoch: self.policy.epoch(),
                exclusive: self.policy.exclusive,
            }),
            // These two ask the identity provider over HTTP: the handler waits for it on
            // the blocking pool it runs on.
            Request::SsoStart(r) => crate::sso::start(self, caller_name, r, now),
            Request::SsoFinish(r) => crate::sso::finish(self, caller, caller_name, r, now),
            Request::SsoConnectorAdd(spec) => crate::sso::connector_add(store, spec),
            Request::SsoConnectorList => crate::sso::connector_list(store),
            Request::SsoConnectorRemove { name } => crate::sso::connector_remove(store, &name),
            Request::WebLogin(r) => handlers::web::login(self, caller_name, r, now),
            Request::WebSessionCheck(p) => handlers::web::check(self, &p, now),
            Request::WebLogout(p) => handlers::web::logout(self, &p, now),
            Request::WebDevicePage { proof, after } => {
                handlers::web::device_page(self, &proof, &after, now)
            }
            Request::WebSessionCert {
                proof,
                ssh_public_key,
            } => handlers::web::session_cert(self, caller_name, &proof, &ssh_public_key, now),
            Request::WebRecordingPage {
                proof,
                cursor,
                limit,
            } => {
                let viewer = handlers::web::viewer(self, &proof, now)?;
                crate::audit::recording_page(self, Some(&viewer), cursor.as_deref(), limit)
            }
            Request::WebRecordingGet {
                proof,
                session_id,
                offset,
            } => {
                let viewer = handlers::web::viewer(self, &proof, now)?;
                crate::audit::recording(self, &session_id, Some(&viewer), offset)
            }
            Request::WebSsoConnectors => crate::sso::web_connectors(store),
            Request::WebSsoStart(r) => crate::sso::web_start(self, caller_name, r, now),
            Request::WebSsoFinish(r) => crate::sso::web_finish(self, caller, caller_name, r, now),
            Request::WebTerminalNonce(p) => handlers::web::terminal_nonce(self, &p, now),
            Request::WebSessionAlive { token_sha256 } => {
                handlers::web::alive(self, &token_sha256, now)
            }
            Request::WebAuditSearch { proof, query } => {
                let viewer = handlers::web::viewer(self, &proof, now)?;
                crate::audit::web_search(self, &viewer, query)
            }
            Request::AccessRequestUser(signed) => {
                crate::access_requests::user_action(self, caller_name, &signed, now)
            }
            Request::AccessRequestList => crate::access_requests::list_all(store, now),
            Request::SessionMfaCert(signed) => {
                crate::session_mfa::issue(self, caller_name, &signed, now)
            }
            Request::AccessRequestReview(r) => crate::access_requests::review(
                self,
                crate::access_requests::Reviewer::Admin(caller_name),
                r,
                now,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::rpc::ErrorKind;

    #[test]
    fn access_rules() {
        let admin = Caller::Admin("admin".into());
        let gw = Caller::Gateway("gw-1".into());
        let user = Caller::Other(Principal::User("alice".into()));
        assert!(check_access(&Caller::Anonymous, &Request::Ping).is_ok());
        assert!(check_access(&user, &Request::ExportCas).is_ok());
        let e = check_access(&gw, &Request::UserList).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Denied);
        assert!(
            e.message.contains("requires an administrator identity"),
            "{e}"
        );
        assert!(check_access(&user, &Request::UserList).is_err());
        assert!(check_access(&admin, &Request::UserList).is_ok());
        assert!(check_access(&gw, &Request::DeviceList).is_ok());
        assert!(check_access(&admin, &Request::DeviceList).is_ok());
        assert!(check_access(&Caller::Anonymous, &Request::DeviceList).is_err());
        let e = check_access(
            &admin,
            &Request::RenewDevice(edgeport_proto::rpc::RenewDeviceRequest {
                device_id: "x".into(),
                ssh_public_key: String::new(),
                proof: None,
            }),
        )
        .unwrap_err();
        assert!(e.message.contains("requires a gateway identity"), "{e}");
        // Access requests: users' signed actions come only through gateways (which cannot
        // make them: the authority checks the user's signature), decisions from admins.
        let signed = Request::AccessRequestUser(edgeport_proto::rpc::SignedUserAction {
            user_cert_der: Vec::new(),
            body: Vec::new(),
            signature: Vec::new(),
        });
        assert!(check_access(&gw, &signed).is_ok());
        assert!(check_access(&admin, &signed).is_err());
        assert!(check_access(&user, &signed).is_err());
        let review = Request::AccessRequestReview(edgeport_proto::rpc::AccessReview {
            id: "x".into(),
            approve: true,
            reason: String::new(),
            ttl_secs: 0,
        });
        assert!(check_access(&admin, &review).is_ok());
        assert!(check_access(&gw, &review).is_err());
        assert!(check_access(&gw, &Request::AccessRequestList).is_err());
    }
}
