//! The authority's RPC (ALPN `edgeport-rpc/1`, mutual TLS): tctl and gateways send one
//! [`Request`] frame and read one [`Response`] frame, as many times as they like on one
//! connection. Who may send what is decided from the caller's certificate, never from a
//! field in the request.
#![allow(clippy::large_enum_variant)] // messages live briefly; boxing buys nothing here

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::CaBundle;

/// Requests to the authority.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Anyone: liveness and cluster name.
    Ping,
    /// Anyone: the CA public material.
    ExportCas,
    /// Admin: sign a user's public key (`tctl auth sign`).
    SignUser(SignUserRequest),
    /// Admin: users.
    UserAdd(UserSpec),
    UserList,
    UserRemove {
        name: String,
    },
    /// Admin: join tokens.
    TokenAdd(TokenSpec),
    TokenList,
    /// Removes a token by its id (or the token itself).
    TokenRemove {
        id: String,
    },
    /// Admin or gateway: the device inventory.
    DeviceList,
    /// Admin: revoke a device.
    DeviceRemove {
        id: String,
    },
    /// No identity needed: a gateway joins with a gateway token.
    JoinGateway(JoinGatewayRequest),
    /// Gateway: relays a device's join.
    JoinDevice(JoinDeviceRequest),
    /// Gateway: renews certificates of a device it holds a tunnel for.
    RenewDevice(RenewDeviceRequest),
    /// Gateway: renews its own certificate.
    RenewGateway(RenewGatewayRequest),
    /// Gateway: presence of the devices it holds (a lease, renewed periodically).
    Presence(PresenceReport),
    /// Gateway: a user logs in through tsh (password or invite code).
    Login(LoginRequest),
    /// Gateway: may the user of `user_cert_der` (the x509 certificate they presented, which
    /// the authority checks itself) open `service` on `device` (an id or a name)? The answer
    /// carries a signed [`crate::ticket::DialTicket`] for that one dial.
    AuthorizeDial {
        user_cert_der: Vec<u8>,
        device: String,
        service: crate::tunnel::Service,
    },
    /// Admin: locks and unlocks.
    LockAdd(LockSpec),
    LockRemove {
        target: LockTarget,
    },
    LockList,
    /// Admin: roles (what a user's certificates allow). `RoleUpsert` creates or replaces.
    RoleUpsert(RoleSpec),
    RoleList,
    RoleRemove {
        name: String,
    },
    /// Admin or gateway: one page of the inventory, devices with ids after `after` in id
    /// order (`""` for the first page). Large fleets do not fit in one 64 KiB frame.
    DevicePage {
        after: String,
    },
    /// Gateway: a device's signed audit batch (the device id comes from its tunnel
    /// certificate).
    AuditUpload {
        device_id: String,
        batch: crate::audit::AuditBatch,
    },
    /// Gateway: its own events (dials).
    AuditRecord(Vec<crate::audit::AuditEvent>),
    /// Admin: `tctl audit search`.
    AuditSearch(crate::audit::AuditQuery),
    /// Admin: `tctl audit verify`.
    AuditVerify {
        device: Option<String>,
    },
    /// Admin (every recording, or `user`'s) or gateway (for `tsh`: the certificate the user
    /// presented, which the authority checks; only that user's recordings).
    RecordingList {
        user: Option<String>,
        user_cert_der: Option<Vec<u8>>,
    },
    /// Admin or gateway (as for `RecordingList`): a piece of a recording (asciicast v2) from
    /// `offset`.
    RecordingGet {
        session_id: String,
        user: Option<String>,
        offset: u64,
        user_cert_der: Option<Vec<u8>>,
    },
    /// Gateway: a page of the devices the roles of the user whose certificate (DER, as the
    /// user presented it) the gateway hands over reach (what `tsh ls` shows); as
    /// `DevicePage` otherwise. The authority checks the certificate: a gateway cannot ask
    /// on behalf of a user who is not asking.
    UserDevicePage {
        user_cert_der: Vec<u8>,
        after: String,
    },
    /// Admin: which roles, logins and Kubernetes groups an identity provider group grants.
    SsoMapSet(SsoMapping),
    SsoMapList,
    SsoMapRemove {
        group: String,
    },
    /// Gateway: answered when the authority's policy epoch differs from `seen` (a lock, a
    /// role or user change, a removed device), or after a while unchanged. Sending the next
    /// one with the new epoch acknowledges it: the gateway has dropped its reusable grants.
    WatchPolicy {
        seen: u64,
    },
    /// Gateway: part `part` (from 1) of the lists that a presence acknowledgement with `more`
    /// began (locks, removed devices, revoked gateways), as acknowledgements themselves.
    PresenceAckPart {
        part: u32,
        /// The first part's `digest`: the lists must not have changed in between.
        digest: String,
    },
    /// Admin: the gateways that joined, with what the authority knows of them.
    GatewayList,
    /// Admin: revoke a gateway at once: its requests, renewals and re-joins under the same
    /// name are refused, other gateways refuse its forwarded dials.
    GatewayRemove {
        id: String,
    },
    /// Gateway: relays tsh's `SsoStart`. The authority makes the state, nonce and PKCE
    /// verifier, keeps the login in progress and answers `SsoRedirect`.
    SsoStart(SsoStartRequest),
    /// Gateway: relays tsh's `SsoFinish`. The authority redeems the code itself, verifies
    /// who the provider says this is and answers `UserCerts`: a gateway never names the user.
    SsoFinish(SsoFinishRequest),
    /// Admin: single sign-on connectors (`tctl sso connectors`); `SsoConnectorAdd` replaces
    /// a connector of the same name.
    SsoConnectorAdd(SsoConnectorSpec),
    SsoConnectorList,
    SsoConnectorRemove {
        name: String,
    },
    /// Admin: change a local user's grants in place (`tctl users update`); what is not
    /// given stays as it is.
    UserUpdate(UserUpdate),
    /// Admin or gateway (as for `RecordingList`): one page of recordings, newest first,
    /// from `cursor` (`None`: the newest), at most `limit` (0: the authority's default).
    RecordingPage {
        user: Option<String>,
        user_cert_der: Option<Vec<u8>>,
        cursor: Option<String>,
        limit: u32,
    },
    /// Gateway: relays a web console login (password and one-time code, as `Login`). The
    /// authority checks them itself and answers `WebSession` with a new session bound to
    /// the browser's own key.
    WebLogin(WebLoginRequest),
    /// Gateway: is this web session (cookie plus a fresh signature by its browser key)
    /// valid now? Answers `WebSession` (without the token) or an error.
    WebSessionCheck(WebProof),
    /// Gateway: ends a web session (logout); needs the same proof.
    WebLogout(WebProof),
    /// Gateway: one page of the devices the web session's user may reach (as
    /// `UserDevicePage`, with the user taken from the proven session, never from the
    /// gateway).
    WebDevicePage {
        proof: WebProof,
        after: String,
    },
    /// Admin: bytes per device and service over the last `days` days (today included), of
    /// `device` or of every device.
    DeviceUsage {
        days: u32,
        device: Option<String>,
    },
    /// Gateway: relays a user's signed access request action (`tsh request create | ls |
    /// review`). The authority checks the certificate and the signature by the certificate's
    /// own key itself: a gateway can carry such an action, never make one.
    AccessRequestUser(SignedUserAction),
    /// Admin: every access request (`tctl requests ls`), newest first.
    AccessRequestList,
    /// Admin: approve or deny a pending access request (`tctl requests approve | deny`).
    AccessRequestReview(AccessReview),
    /// Admin: an SSH host certificate for a host behind a device (issue 22, relay mode),
    /// principals `name` (`DEVICE/TARGET`) and `NAME.CLUSTER`, signed by the host CA for
    /// `ssh_public_key` (OpenSSH format). Answered with `HostCert`.
    SignHost {
        name: String,
        ssh_public_key: String,
        ttl_secs: u64,
    },
    /// Admin (`None`: every target) or gateway (the certificate, DER, of the user who asks:
    /// the targets that user's roles reach): the targets behind devices as their devices
    /// last reported them.
    TargetList {
        user_cert_der: Option<Vec<u8>>,
    },
    /// Admin: set (`Some(bytes)`) or clear a device's monthly data budget.
    DeviceSetBudget {
        id: String,
        data_budget: Option<u64>,
    },
    /// Admin: CA rotation (`tctl auth rotate`): start, advance, complete or roll back the
    /// rotation of one CA, or (`Status`) only read where every CA stands. Answered with
    /// `CaRotations`.
    CaRotate(CaRotateRequest),
    /// Gateway: relays tsh's signed `AccessAction::SessionMfa` (a one-time code, a device and
    /// a fresh public key). The authority checks the signature, the certificate and the code
    /// itself and answers `SessionMfaCert`.
    SessionMfaCert(SignedUserAction),
    /// Admin: one piece of an agent binary for `UpdateStart` (`tctl devices update`), at
    /// `offset` of the binary whose SHA-256 is `sha256` (pieces come in order from 0).
    UpdateUpload {
        sha256: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Admin: sign a manifest for the uploaded binary and ship it to these devices; answered
    /// with `Update`.
    UpdateStart(crate::update::UpdateSpec),
    /// Admin: where an update stands on each of its devices; answered with `Update`.
    UpdateStatus {
        id: String,
    },
    /// Gateway: the updates with devices still waiting; answered with `UpdateOrders`.
    UpdateOrders,
    /// Gateway: a piece of an update's binary from `offset`; answered with `UpdateChunk`.
    UpdateFetch {
        sha256: String,
        offset: u64,
    },
    /// Gateway: what a device answered to an update (or why it could not be delivered).
    UpdateReport {
        id: String,
        device: String,
        accepted: bool,
        message: String,
    },
    /// Gateway: short-lived user certificates for one web console terminal, for the gateway's
    /// own fresh key `ssh_public_key`. The authority checks the proof itself: a live web
    /// session whose browser signed `GET /api/terminal/DEVICE/LOGIN/NONCE` just now, with a
    /// nonce from `WebTerminalNonce` that the authority takes (single use). The
    /// certificates name only that login. Answered with `UserCerts`.
    WebSessionCert {
        proof: WebProof,
        ssh_public_key: String,
    },
    /// Gateway: a page of the web session's user's own recordings (as `RecordingPage` for
    /// tsh, the user taken from the proven session).
    WebRecordingPage {
        proof: WebProof,
        cursor: Option<String>,
        limit: u32,
    },
    /// Gateway: a piece of one of the web session's user's recordings (as `RecordingGet`).
    WebRecordingGet {
        proof: WebProof,
        session_id: String,
        offset: u64,
    },
    /// Gateway: the audit events of the web session's user (`query.user` is replaced by the
    /// proven session's user). Answered with `AuditPage`.
    WebAuditSearch {
        proof: WebProof,
        query: crate::audit::AuditQuery,
    },
    /// Gateway: a device's request, relayed from its tunnel, for a per-session certificate
    /// to log in to one of its targets in record mode (issue 22). The authority believes
    /// only what the device signed and the user's certificate; answered with `TargetCert`.
    TargetCert {
        /// The device whose tunnel carried it (the signature must be that device's).
        device_id: String,
        req: crate::targets::TargetCertRequest,
    },
    /// Gateway: the single sign-on connectors a web console may offer (names and kinds
    /// only). Answered with `SsoConnectors` (client ids left empty).
    WebSsoConnectors,
    /// Gateway: a browser starts a single sign-on login to the web console. The authority
    /// keeps the browser's key with the login in progress and answers `SsoRedirect`.
    WebSsoStart(WebSsoStartRequest),
    /// Gateway: the provider's answer that reached the gateway's callback page, signed by
    /// the browser key of the start. The authority redeems the code itself, verifies who it
    /// is, and answers `WebSession` with a new session bound to that key.
    WebSsoFinish(WebSsoFinishRequest),
    /// Gateway: a single-use nonce for opening one terminal of the proven web session; the
    /// browser signs it into `GET /api/terminal/DEVICE/LOGIN/NONCE`. Answered `WebNonce`.
    WebTerminalNonce(WebProof),
    /// Admin: the agent updates the authority keeps (newest first), each with its devices'
    /// states, settled against their presence; answered with `UpdateList`.
    UpdateList,
    /// Admin: every authority registered in the store (several share a PostgreSQL store),
    /// with the CA keys each holds against what the cluster's rotation needs; answered with
    /// `Authorities`.
    AuthorityList,
    /// Gateway: is the web session whose token's SHA-256 (hex) this is still live: not
    /// logged out through any gateway, not expired, its user neither removed nor locked? A
    /// gateway asks this every few seconds for the sessions it holds open terminals of, so a
    /// logout through another gateway ends them too. The gateway holds the token anyway, so
    /// the answer tells it nothing new. Answered `Ok`, or refused with why.
    WebSessionAlive {
        token_sha256: String,
    },
}

/// Responses from the authority.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Error(RpcError),
    Pong {
        cluster: String,
        version: String,
    },
    Cas(CaBundle),
    UserCerts(UserCerts),
    UserAdded {
        invite: Option<String>,
        invite_expires: Option<u64>,
    },
    Users(Vec<UserInfo>),
    Token(TokenInfo),
    Tokens(Vec<TokenInfo>),
    Devices(Vec<DeviceInfo>),
    GatewayCerts(GatewayCerts),
    DeviceCerts(DeviceCerts),
    PresenceAck(PresenceAck),
    DialAllowed(DialGrant),
    Locks(Vec<LockSpec>),
    Roles(Vec<RoleInfo>),
    /// One page of the inventory; `more` says another page follows (ask after the last id).
    DevicePage {
        devices: Vec<DeviceInfo>,
        more: bool,
    },
    AuditAck(crate::audit::AuditAck),
    AuditPage(crate::audit::AuditPage),
    AuditReport(Vec<crate::audit::ChainReport>),
    Recordings(Vec<crate::audit::RecordingInfo>),
    RecordingData {
        data: Vec<u8>,
        total: u64,
    },
    SsoMaps(Vec<SsoMapping>),
    /// The policy epoch. `exclusive`: this authority sees every change (its own embedded
    /// store), so a gateway may reuse grants until the epoch moves.
    Policy {
        epoch: u64,
        exclusive: bool,
    },
    Gateways(Vec<GatewayInfo>),
    /// Where tsh sends the browser to log in (the provider's authorization URL).
    SsoRedirect {
        auth_url: String,
    },
    /// The connectors, without their secrets.
    SsoConnectors(Vec<SsoConnectorInfo>),
    /// One page of recordings, newest first; `next` is the cursor of the following page
    /// (`None`: this was the last).
    RecordingPage {
        recordings: Vec<crate::audit::RecordingInfo>,
        next: Option<String>,
    },
    /// A web console session: after `WebLogin` (with its token) or `WebSessionCheck`.
    WebSession(WebSessionInfo),
    /// The answer to `DeviceUsage`, one entry per device that moved bytes.
    DeviceUsage(Vec<crate::usage::DeviceUsage>),
    /// Access requests: the one just created or reviewed, or a listing.
    AccessRequests(Vec<AccessRequestInfo>),
    /// The answer to `SignHost`: the OpenSSH host certificate and its expiry (Unix seconds).
    HostCert {
        cert: String,
        valid_before: u64,
    },
    /// The answer to `TargetList`.
    Targets(Vec<crate::targets::TargetInfo>),
    /// The answer to `CaRotate`: where each CA's rotation stands.
    CaRotations(Vec<CaRotation>),
    /// The answer to `SessionMfaCert`.
    SessionMfaCert(SessionMfaCert),
    /// The answer to `UpdateStart` and `UpdateStatus`.
    Update(crate::update::UpdateInfo),
    /// The answer to `UpdateOrders`.
    UpdateOrders(Vec<crate::update::UpdateOrder>),
    /// The answer to `UpdateFetch` (empty past the end).
    UpdateChunk(Vec<u8>),
    /// The answer to `AccessAction::LiveSessions`.
    LiveSessions(Vec<LiveSession>),
    /// The answer to `TargetCert`: the per-session SSH user certificate, OpenSSH line.
    TargetCert {
        cert: String,
        valid_before: u64,
    },
    /// The answer to `WebTerminalNonce`: taken once, until `expires` (Unix seconds).
    WebNonce {
        nonce: String,
        expires: u64,
    },
    /// The answer to `UpdateList`.
    UpdateList(Vec<crate::update::UpdateSummary>),
    /// The answer to `AuthorityList`.
    Authorities(Vec<AuthorityInfo>),
}

/// One authority of the cluster as registered in the store (`tctl status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityInfo {
    /// Stable across restarts (kept in `DATA/authority.id`).
    pub id: String,
    /// The address it serves on (as in its `admin.identity`).
    pub address: String,
    pub version: String,
    /// When it started (Unix seconds).
    pub started: u64,
    /// Its last heartbeat (Unix seconds).
    pub last_seen: u64,
    /// Not seen for three heartbeat intervals.
    pub stale: bool,
    /// The CA keys the cluster's rotations need that it does not hold, as `KIND CA
    /// FINGERPRINT` (empty: it holds them all).
    pub missing: Vec<String>,
    /// CAs whose rotation it does not follow though it may hold the keys (phase or signing
    /// key differ from the cluster's), as `KIND CA: phase P (cluster: Q)`.
    pub behind: Vec<String>,
    /// What to do about `missing` or `behind` (empty when nothing is wrong).
    pub remedy: String,
}

/// A CA `tctl auth rotate --type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaKind {
    User,
    Host,
    X509,
}

impl CaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CaKind::User => "user",
            CaKind::Host => "host",
            CaKind::X509 => "x509",
        }
    }
}

/// What `tctl auth rotate` asks of one CA's rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotateAction {
    /// Only report (`tctl auth rotate --status`).
    Status,
    /// `standby` to `init`: a new CA, trusted beside the old one that still signs. The old
    /// one stays trusted for `grace_secs` once the new one signs.
    Start { grace_secs: u64 },
    /// The next phase: `init` to `update_clients` to `update_servers`.
    Advance,
    /// End the grace period now: drop the CA that no longer signs (`standby`).
    Complete,
    /// Back to the old CA (from any phase but `standby`); the new one stays trusted for the
    /// grace period, then is dropped.
    Rollback,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotateRequest {
    pub kind: CaKind,
    pub action: RotateAction,
}

/// One CA's rotation, as `tctl auth rotate --status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    pub kind: CaKind,
    /// `standby`, `init`, `update_clients`, `update_servers` or `rollback`.
    pub phase: String,
    /// SHA-256 fingerprint of the CA that signs now.
    pub signing: String,
    /// Fingerprints of every CA trusted now (the signing one first).
    pub trusted: Vec<String>,
    pub grace_secs: u64,
    /// When the CA that no longer signs is dropped (Unix seconds), once the new one signs.
    pub drop_at: Option<u64>,
    /// Gateways that fetched the current CA bundle since the phase began, of those that
    /// reported presence recently.
    pub gateways_current: u32,
    pub gateways_total: u32,
    /// Online devices renewed under the signing host CA since the rotation began (host
    /// rotations), of the devices online.
    pub devices_renewed: u32,
    pub devices_online: u32,
}

/// A per-session second factor certificate: an SSH user certificate for the asked key that
/// opens one device (`device`, its id) for about a minute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMfaCert {
    pub device: String,
    /// OpenSSH certificate line.
    pub ssh_cert: String,
    /// Unix seconds.
    pub valid_before: u64,
}

/// tsh asks for a [`SessionMfaCert`] (inside a signed [`UserAction`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMfaAsk {
    /// The device, by id or name.
    pub device: String,
    /// The current code of the user's one-time password app.
    pub otp: String,
    /// A key tsh made for this one session (OpenSSH public key line, Ed25519).
    pub ssh_public_key: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The caller may not do this.
    Denied,
    /// Bad credentials (password, token).
    BadCredentials,
    NotFound,
    AlreadyExists,
    Invalid,
    Expired,
    Locked,
    Internal,
    /// The password was right; a one-time code from the user's app is needed too.
    SecondFactorRequired,
    /// The password was right; this account must first enroll a one-time password app
    /// (send `totp_enroll` with a code from it).
    SecondFactorEnroll,
    /// The calling gateway was revoked or is locked: it must stop serving.
    GatewayRevoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RpcError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignUserRequest {
    pub user: String,
    /// OpenSSH public key line (Ed25519); the same key gets the x509 certificate.
    pub ssh_public_key: String,
    pub ttl_secs: u64,
    /// Restrict the certificate to these logins (must be a subset of the user's logins,
    /// unless the user does not exist and the caller is an administrator signing for a bot).
    pub logins: Option<Vec<String>>,
}

/// What a user gets: SSH certificate, x509 client certificate and the trust material.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserCerts {
    pub user: String,
    pub ssh_cert: String,
    pub x509_cert_pem: String,
    pub cas: CaBundle,
    pub logins: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    pub valid_before: u64,
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct UserSpec {
    pub name: String,
    pub logins: Vec<String>,
    pub roles: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    /// Set the password now; without it an invite code is returned.
    pub password: Option<String>,
    /// The user must enroll a one-time password app at the first login, and give its code
    /// at every login after.
    pub require_totp: bool,
}

/// `tctl users update`: each `Some` replaces that field of the user; `reset_totp` drops the
/// enrolled one-time password app (the user enrolls again at the next login when
/// `require_totp` holds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUpdate {
    pub name: String,
    pub logins: Option<Vec<String>>,
    pub roles: Option<Vec<String>>,
    pub kube_groups: Option<Vec<String>>,
    pub kube_users: Option<Vec<String>>,
    pub require_totp: Option<bool>,
    pub reset_totp: bool,
}

/// A role (DESIGN section 6): which devices its users reach and what their sessions may do.
/// Deny wins over allow; a user with several roles gets the union of their permissions and the
/// smallest session cap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSpec {
    pub name: String,
    /// Label key -> allowed values (`*` = any value); empty = every device.
    pub allow_labels: BTreeMap<String, Vec<String>>,
    /// Label key -> denied values (`*` = any value).
    pub deny_labels: BTreeMap<String, Vec<String>>,
    /// Longest certificate this role grants, in seconds.
    pub max_session_ttl: u64,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
    /// Roles that holders of this role may ask for (`tsh request create --roles`).
    #[serde(default)]
    pub request_roles: Vec<String>,
    /// Roles whose access requests holders of this role may approve or deny
    /// (`tsh request review`); never their own.
    #[serde(default)]
    pub review_roles: Vec<String>,
    /// Every session to a device this role allows needs a fresh one-time code: tsh asks for
    /// it and the authority signs a certificate for that one device that lives a minute.
    #[serde(default)]
    pub require_session_mfa: bool,
    /// Modes (`observer`, `peer`, `moderator`) its users may join other users' live sessions
    /// with, on the devices `allow_labels` matches (`tsh join`).
    #[serde(default)]
    pub join_sessions: Vec<String>,
    /// Sessions of its users to devices with these labels start only once a moderator has
    /// joined, and end when the last moderator leaves (empty: no such rule).
    #[serde(default)]
    pub require_moderator: BTreeMap<String, Vec<String>>,
}

/// A live session as `tsh sessions ls` shows it: from the device-signed `session.start`,
/// `session.join` and `session.leave` events the authority has verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSession {
    pub session_id: String,
    pub device: String,
    pub user: String,
    pub login: String,
    /// `shell`, `exec`, ...
    pub kind: String,
    /// Unix ms, the device's clock.
    pub started_ms: u64,
    /// Who joined (`NAME (MODE)`), besides the session's own user.
    pub participants: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoleInfo {
    pub spec: RoleSpec,
    /// Built into the authority (cannot be changed or removed).
    pub builtin: bool,
    /// Users that hold the role.
    pub users: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub logins: Vec<String>,
    pub roles: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    pub has_password: bool,
    pub created: u64,
    pub locked: bool,
    /// `enrolled`, `required` (not yet enrolled) or empty.
    pub second_factor: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    Device,
    Gateway,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Device => "device",
            TokenKind::Gateway => "gateway",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenSpec {
    pub kind: TokenKind,
    pub labels: BTreeMap<String, String>,
    pub ttl_secs: u64,
    pub reusable: bool,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The secret itself: only in the answer to `TokenAdd`, never stored in clear.
    pub token: Option<String>,
    /// A short, non-secret id (prefix of the token's hash) to list and remove it by.
    pub id: String,
    pub kind: TokenKind,
    pub labels: BTreeMap<String, String>,
    pub expires: u64,
    pub reusable: bool,
    pub uses: u32,
    pub ca_pin: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct JoinGatewayRequest {
    pub token: String,
    pub gateway_id: Option<String>,
    /// The gateway's public key (SubjectPublicKeyInfo DER), made on the gateway.
    pub public_key_spki_der: Vec<u8>,
    /// Names and addresses its server certificate must carry (public address, listen IP).
    pub dns_names: Vec<String>,
    pub ip_addrs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewGatewayRequest {
    pub public_key_spki_der: Vec<u8>,
    pub dns_names: Vec<String>,
    pub ip_addrs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayCerts {
    pub gateway_id: String,
    pub x509_cert_pem: String,
    pub cas: CaBundle,
    pub valid_before: u64,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct JoinDeviceRequest {
    pub token: String,
    pub requested_id: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The device's Ed25519 public key (host key, tunnel key and audit signing key).
    pub ssh_public_key: String,
    pub version: String,
    pub arch: String,
    /// Filled in by the gateway from the connection, not by the device.
    pub remote_addr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewDeviceRequest {
    /// Taken by the gateway from the device's tunnel certificate.
    pub device_id: String,
    pub ssh_public_key: String,
    /// The device's signature on this renewal (`None` from agents older than the proof):
    /// without it the authority still signs certificates for the recorded key but does not
    /// record a renewal.
    pub proof: Option<crate::renew::RenewProof>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceCerts {
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    /// SSH host certificate line.
    pub host_cert: String,
    /// x509 tunnel certificate, PEM.
    pub x509_cert_pem: String,
    pub cas: CaBundle,
    pub valid_before: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicePresence {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub arch: String,
    pub transport: Transport,
    pub address: String,
    pub rtt_ms: u32,
    pub connected_at: u64,
    pub kube_cluster: Option<String>,
    /// QUIC packets lost per thousand sent since the tunnel came up (`None` over TCP, whose
    /// retransmissions the gateway does not see).
    pub loss_permille: Option<u32>,
    /// The agent's latest byte counters (agents that report them).
    pub usage: Option<crate::usage::UsageReport>,
    /// The device's signed word that it holds this tunnel to the reporting gateway (`None`
    /// until it arrives, and from agents older than it): see [`crate::attest`].
    pub proof: Option<crate::attest::TunnelProof>,
}

/// A gateway's view of its tunnels. `online` replaces everything the gateway said before
/// (a full snapshot, so a lost report cannot leave a device stuck online); the lease says how
/// long the authority may believe it without hearing from the gateway again.
///
/// A snapshot too large for one frame goes in parts: `part` counts from 0 and `more` is set
/// on every part but the last; the authority treats the parts together as one snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresenceReport {
    pub lease_secs: u64,
    pub online: Vec<DevicePresence>,
    /// Devices whose tunnel ended since the last report, with the reason.
    pub disconnected: Vec<(String, String)>,
    pub part: u32,
    pub more: bool,
    /// Where other gateways reach this one (`HOST:PORT`, UDP) to forward dials for the
    /// devices it holds; `None`: it takes no forwarded dials.
    pub peer_addr: Option<String>,
    /// The gateway's version (`tctl gateways ls`).
    pub version: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresenceAck {
    /// Devices that were removed: close their tunnels and refuse them.
    pub revoked_devices: Vec<String>,
    pub locks: Vec<LockSpec>,
    /// Tunnels of this report that a newer tunnel of the same device at another gateway
    /// replaced (device id, the `connected_at` reported): close them.
    pub superseded: Vec<(String, u64)>,
    /// Gateways revoked or locked: refuse their forwarded dials, drop links to them.
    pub revoked_gateways: Vec<String>,
    /// Devices past their monthly data budget (device id, budget in bytes): their agents
    /// refuse bulk transfers.
    pub over_budget: Vec<(String, u64)>,
    /// The lists above did not fit in one frame: ask for the next part
    /// ([`Request::PresenceAckPart`]) until one comes without `more`.
    pub more: bool,
    /// Hex SHA-256 of the whole lists, in every part: parts are taken together only when
    /// they are of the same lists.
    pub digest: String,
}

/// A gateway, as `tctl gateways ls` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub id: String,
    pub peer_addr: Option<String>,
    pub dns_names: Vec<String>,
    pub ip_addrs: Vec<String>,
    pub version: String,
    /// Devices whose tunnel it holds now, by the inventory.
    pub tunnels: u32,
    pub joined_at: u64,
    pub renewed_at: u64,
    /// Its last presence report to this authority (0: none since this authority started).
    pub last_report: u64,
    pub revoked: bool,
    pub locked: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub online: bool,
    pub transport: Option<Transport>,
    pub address: String,
    pub version: String,
    pub arch: String,
    pub rtt_ms: Option<u32>,
    pub last_seen: u64,
    pub last_disconnect_reason: Option<String>,
    pub gateway: Option<String>,
    pub joined_at: u64,
    pub kube_cluster: Option<String>,
    /// See [`DevicePresence::loss_permille`]; online devices only.
    pub loss_permille: Option<u32>,
    /// How often the device's address (its uplink, not just its port) changed in the last
    /// 24 hours, as the gateways reported it.
    pub address_changes_24h: u32,
}

impl DeviceInfo {
    /// What kind of event ended the device's previous tunnel, from the reason the gateway
    /// recorded: `link lost`, `gateway restart`, `lock`, `renewal failure`, `agent stopped`,
    /// `reconnected`, `removed` or `other`.
    pub fn last_disconnect_kind(&self) -> Option<&'static str> {
        self.last_disconnect_reason.as_deref().map(disconnect_kind)
    }
}

/// Sorts a tunnel's close reason (as gateways word it) into the kinds `tctl devices ls` shows.
pub fn disconnect_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| r.contains(w));
    if has(&["is locked", "locked:"]) {
        "lock"
    } else if has(&["renew", "certificate expired", "expired certificate"]) {
        "renewal failure"
    } else if has(&["removed from the cluster", "device revoked"]) {
        "removed"
    } else if has(&[
        "gateway shutting down",
        "gateway revoked",
        "gateway restart",
    ]) {
        "gateway restart"
    } else if has(&["replaced by a newer tunnel", "moving to quic"]) {
        "reconnected"
    } else if has(&["agent shutting down", "closed by the device"]) {
        "agent stopped"
    } else if has(&[
        "idle timeout",
        "timed out",
        "reset",
        "connection lost",
        "was lost",
        "network",
        "unreachable",
        "broken pipe",
    ]) {
        "link lost"
    } else {
        "other"
    }
}

/// Gateway -> authority: tsh asks where to log in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SsoStartRequest {
    /// The connector's name (`oidc`, `github`).
    pub connector: String,
    /// tsh's loopback listener, where the provider sends the browser back.
    pub redirect_uri: String,
    /// Hex SHA-256 of a secret only the starting tsh holds (`SsoFinishRequest::proof`).
    pub proof_hash: String,
    /// The client's address as the gateway sees it (pending logins are bounded per client).
    pub client_addr: String,
}

/// Gateway -> authority: the provider's answer that reached tsh's listener.
#[derive(Clone, Serialize, Deserialize)]
pub struct SsoFinishRequest {
    pub state: String,
    pub code: String,
    /// The secret whose hash the start carried.
    pub proof: String,
    pub ssh_public_key: String,
    pub ttl_secs: u64,
    pub client_addr: String,
}

/// A single sign-on connector as an administrator configures it at the authority.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsoConnectorSpec {
    /// `oidc` or `github` (what `tsh login --auth NAME` asks for).
    pub name: String,
    pub client_id: String,
    pub client_secret: String,
    /// Root certificates (PEM) for the provider's `https` addresses; the system's if absent.
    pub ca_pem: Option<String>,
    pub kind: SsoConnectorKind,
    /// The web console origins (`https://HOST[:PORT]`) whose callback page may receive this
    /// connector's logins (`--web-origin`). Empty: no web console single sign-on with it
    /// (tsh logins only), which is what records saved before the flag existed mean.
    #[serde(default)]
    pub web_origins: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SsoConnectorKind {
    Oidc {
        issuer: String,
        /// Which ID token claim names the Edgeport user: `preferred_username`, `email`, `sub`.
        username_claim: String,
        /// Which claim lists the user's groups.
        groups_claim: String,
        /// Scopes asked for besides `openid`.
        scopes: Vec<String>,
    },
    GitHub {
        /// `https://github.com`, or a GitHub Enterprise Server's address.
        url: String,
        /// `https://api.github.com`, or `https://HOST/api/v3`.
        api_url: String,
    },
}

/// A connector as `tctl sso connectors ls` shows it: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsoConnectorInfo {
    pub name: String,
    pub client_id: String,
    /// Whether the connector trusts its own roots (PEM) instead of the system's.
    pub custom_ca: bool,
    pub kind: SsoConnectorKind,
    /// Where web console logins with this connector may return (empty: web sign-on off).
    #[serde(default)]
    pub web_origins: Vec<String>,
}

/// What members of an identity provider group get (the union over all their groups).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsoMapping {
    pub group: String,
    pub roles: Vec<String>,
    pub logins: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct LoginRequest {
    pub user: String,
    /// Password, or a one-time invite code (which then sets `new_password`).
    pub secret: String,
    pub new_password: Option<String>,
    pub ssh_public_key: String,
    pub ttl_secs: u64,
    pub client_addr: String,
    /// The current code of the user's one-time password app (RFC 6238), when enrolled.
    pub otp: Option<String>,
    /// Enrollment: the app's new secret (base32), proven by `otp` computed from it.
    pub totp_enroll: Option<String>,
}

/// The context every web console request signature starts with (one line), so that a
/// signature made for this can never pass for anything else.
pub const WEB_SIGNATURE_CONTEXT: &str = "edgeport-web/1";

/// Gateway -> authority: a browser logs in to the web console.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct WebLoginRequest {
    pub user: String,
    pub password: String,
    /// The current code of the user's one-time password app, when enrolled.
    pub otp: Option<String>,
    /// The browser's public key (P-256, uncompressed point, 65 bytes), made with WebCrypto
    /// as non-extractable: every later request of the session is signed with it.
    pub browser_key: Vec<u8>,
    /// The client's address as the gateway sees it (failed logins are throttled by it).
    pub client_addr: String,
}

/// The path a browser signs (`POST`, with the login's `state` appended) to finish a web
/// console single sign-on login: only the browser holding the start's key can finish it.
pub const WEB_SSO_FINISH_PATH: &str = "/web/sso/finish/";

/// Gateway -> authority: a browser starts a single sign-on login to the web console.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct WebSsoStartRequest {
    /// The connector's name (`oidc`, `github`).
    pub connector: String,
    /// The gateway's callback page, `https://HOST/web/sso/CONNECTOR/callback`.
    pub redirect_uri: String,
    /// The browser's public key (as in `WebLoginRequest`): the finish must be signed by it
    /// and the session is bound to it.
    pub browser_key: Vec<u8>,
    pub client_addr: String,
}

/// Gateway -> authority: the provider's answer, as the browser's page handed it over.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct WebSsoFinishRequest {
    pub state: String,
    pub code: String,
    /// What the browser signed: `edgeport-web/1`, Unix seconds, `POST` and
    /// [`WEB_SSO_FINISH_PATH`] followed by `state`, one per line.
    pub signed: String,
    /// ECDSA P-256 SHA-256 over `signed` by the start's browser key.
    pub signature: Vec<u8>,
    pub client_addr: String,
}

/// Gateway -> authority: proof that a request comes from a web session's browser.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct WebProof {
    /// The session token (the browser's cookie).
    pub token: String,
    /// What the browser signed: `edgeport-web/1`, Unix seconds, method and path, one per
    /// line.
    pub signed: String,
    /// ECDSA P-256 SHA-256 over `signed`, as WebCrypto makes it (r || s, 64 bytes).
    pub signature: Vec<u8>,
}

/// A web console session as the authority keeps it, for the gateway.
#[derive(Clone, Serialize, Deserialize)]
pub struct WebSessionInfo {
    /// The session token: only in the answer to `WebLogin`, never stored in clear.
    pub token: Option<String>,
    /// The CSRF token every state-changing request must carry.
    pub csrf: String,
    pub user: String,
    pub logins: Vec<String>,
    pub roles: Vec<String>,
    /// Unix seconds.
    pub expires: u64,
    /// The browser key the session is bound to (as in `WebLoginRequest`).
    pub browser_key: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DialGrant {
    pub device: DeviceInfo,
    pub logins: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    /// The peer address of the gateway that holds the device's tunnel (`device.gateway`),
    /// when it has given one: a dial that reaches another gateway is forwarded there.
    pub gateway_addr: Option<String>,
    /// The authority's signed proof of this grant, for one dial within a minute (absent
    /// from grants a gateway reuses).
    pub ticket: Option<crate::ticket::DialTicket>,
    /// The user, as the certificate behind the request names them.
    pub user: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockTarget {
    User(String),
    Device(String),
    /// A gateway: refused like a revoked one while the lock lasts.
    Gateway(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LockSpec {
    pub target: LockTarget,
    pub message: String,
    /// Unix seconds; 0 = until removed.
    pub expires: u64,
}

/// The context every user action signature starts with (one line), so that a signature made
/// for this can never pass for anything else.
pub const USER_ACTION_CONTEXT: &str = "edgeport-user-action/1";

/// A user's action, signed by tsh with the private key of the user's certificate. The
/// gateway adds the certificate the user presented to it; the authority checks both.
#[derive(Clone, Serialize, Deserialize)]
pub struct SignedUserAction {
    /// The user's x509 certificate, as the gateway saw it in the TLS handshake.
    pub user_cert_der: Vec<u8>,
    /// A postcard-encoded [`UserAction`].
    pub body: Vec<u8>,
    /// Ed25519 by the certificate's key over [`user_action_message`] of `body`.
    pub signature: Vec<u8>,
}

/// What is signed: the context line, then the body.
pub fn user_action_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(USER_ACTION_CONTEXT.len() + 1 + body.len());
    m.extend_from_slice(USER_ACTION_CONTEXT.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(body);
    m
}

/// tsh's side: `action` encoded and signed with `key` (the key of the user's certificate),
/// as the body and signature of a [`SignedUserAction`].
pub fn sign_user_action(
    action: &UserAction,
    key: &crate::keys::KeyPair,
) -> Result<(Vec<u8>, Vec<u8>), postcard::Error> {
    let body = postcard::to_stdvec(action)?;
    let signature = key.sign(&user_action_message(&body));
    Ok((body, signature))
}

/// The signed part of a [`SignedUserAction`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAction {
    /// The cluster it is meant for (a signature for another cluster does not count here).
    pub cluster: String,
    /// Unix seconds when tsh signed it: the authority refuses stale ones.
    pub issued_at: u64,
    /// Random (hex, 16 bytes or more): the authority takes each once.
    pub nonce: String,
    pub action: AccessAction,
}

/// What a user asks of the access request workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessAction {
    /// Ask for `roles` (each allowed by a role's `request_roles`).
    Create { roles: Vec<String>, reason: String },
    /// The user's own requests, and those the user may review.
    List,
    /// Approve or deny another user's request (roles' `review_roles`).
    Review(AccessReview),
    /// A per-session second factor certificate (`Request::SessionMfaCert` only).
    SessionMfa(SessionMfaAsk),
    /// The live sessions the user may see: their own and those their roles let them join
    /// (`tsh sessions ls`); answered with `Response::LiveSessions`.
    LiveSessions,
}

/// An approval or denial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessReview {
    pub id: String,
    pub approve: bool,
    pub reason: String,
    /// How long an approval lasts (0: the authority's default, one hour).
    pub ttl_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessState {
    Pending,
    Approved,
    Denied,
    /// Approved, and the approval's time is over.
    Expired,
}

impl AccessState {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessState::Pending => "pending",
            AccessState::Approved => "approved",
            AccessState::Denied => "denied",
            AccessState::Expired => "expired",
        }
    }
}

/// An access request as tsh and tctl show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequestInfo {
    pub id: String,
    pub user: String,
    pub roles: Vec<String>,
    pub reason: String,
    pub state: AccessState,
    /// Unix seconds.
    pub created: u64,
    /// Who approved or denied it (`admin NAME` or `user NAME`), when someone did.
    pub reviewer: String,
    pub review_reason: String,
    pub reviewed_at: u64,
    /// Unix seconds when an approval ends (0: not approved).
    pub expires: u64,
}

crate::debug_redacted!(LoginRequest { user, ssh_public_key, ttl_secs, client_addr } secret { secret, new_password, otp, totp_enroll });
crate::debug_redacted!(JoinDeviceRequest { requested_id, labels, ssh_public_key, version, arch, remote_addr } secret { token });
crate::debug_redacted!(JoinGatewayRequest { gateway_id, dns_names, ip_addrs } secret { token, public_key_spki_der });
crate::debug_redacted!(UserSpec { name, logins, roles, kube_groups, kube_users, require_totp } secret { password });
crate::debug_redacted!(TokenInfo { id, kind, labels, expires, reusable, uses, ca_pin } secret { token });
crate::debug_redacted!(SsoFinishRequest { state, ssh_public_key, ttl_secs, client_addr } secret { code, proof });
crate::debug_redacted!(SsoConnectorSpec { name, client_id, kind, web_origins } secret { client_secret, ca_pem });
crate::debug_redacted!(WebLoginRequest { user, client_addr } secret { password, otp, browser_key });
crate::debug_redacted!(SignedUserAction { body } secret { user_cert_der, signature });
crate::debug_redacted!(WebProof { signed } secret { token, signature });
crate::debug_redacted!(WebSsoStartRequest { connector, redirect_uri, client_addr } secret { browser_key });
crate::debug_redacted!(WebSsoFinishRequest { signed, client_addr } secret { state, code, signature });
crate::debug_redacted!(SessionMfaAsk { device, ssh_public_key } secret { otp });
crate::debug_redacted!(WebSessionInfo { user, logins, roles, expires } secret { token, csrf, browser_key });

#[cfg(test)]
mod tests {
    use super::disconnect_kind;

    #[test]
    fn close_reasons_sort_into_the_kinds_tctl_shows() {
        let cases = [
            (
                "idle timeout (no keep-alive from the device for 90s)",
                "link lost",
            ),
            ("timed out", "link lost"),
            ("reset by the peer", "link lost"),
            ("gateway shutting down", "gateway restart"),
            ("device van-1 is locked: stolen", "lock"),
            ("certificate renewal failed: denied", "renewal failure"),
            (
                "device van-1 was removed from the cluster; join again",
                "removed",
            ),
            (
                "replaced by a newer tunnel from the same device",
                "reconnected",
            ),
            ("closed by the peer: agent shutting down", "agent stopped"),
            ("something new", "other"),
        ];
        for (reason, kind) in cases {
            assert_eq!(disconnect_kind(reason), kind, "{reason}");
        }
    }
}
