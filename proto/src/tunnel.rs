#![allow(clippy::large_enum_variant)] // messages live briefly; boxing buys nothing here
//! Messages on the gateway's ports: device joins (`edgeport-join/1`), device tunnels
//! (`edgeport-tunnel/1`) and user streams from tsh (`edgeport-dial/1`).
//!
//! Tunnel streams: the agent opens the first stream (control) and sends [`AgentControl`]
//! frames; the gateway answers with [`GatewayControl`]. Every other stream is opened by the
//! gateway and starts with one [`StreamHeader`] frame; after it the stream carries raw bytes
//! for the service (SSH, HTTP) or further frames (echo in tests).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rpc::{
    DeviceCerts, DeviceInfo, JoinDeviceRequest, LoginRequest, RpcError, Transport, UserCerts,
};

/// First frame on the join connection (no client certificate; the CA is pinned).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JoinMessage {
    Join(JoinDeviceRequest),
}

/// The gateway's answer to a join.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JoinReply {
    Joined(DeviceCerts),
    Refused(RpcError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the id in the device certificate; the gateway only ever trusts the latter.
    pub device_id: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub arch: String,
    pub kube_cluster: Option<String>,
}

/// Agent -> gateway on the control stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentControl {
    Hello(Hello),
    /// Ask for fresh certificates for the same key.
    Renew {
        ssh_public_key: String,
    },
    /// Keep-alive on TCP tunnels (QUIC has its own): keeps NAT bindings open, proves the
    /// tunnel is alive to both sides, and carries the agent's last measured round-trip time
    /// (the gateway reports it as the device's RTT).
    Ping {
        seq: u64,
        rtt_ms: Option<u32>,
    },
    /// A signed batch of audit events (the gateway relays it to the authority and answers
    /// with [`GatewayControl::AuditAck`]); one batch in flight at a time.
    Audit(crate::audit::AuditBatch),
    /// The agent's byte counters per service since it started (the gateway passes the latest
    /// on with presence).
    Usage(crate::usage::UsageReport),
    /// A per-session certificate for a record-mode target login (issue 22), signed by this
    /// device; the gateway relays it to the authority and answers with
    /// [`GatewayControl::TargetCert`] of the same `id`.
    TargetCert(crate::targets::TargetCertRequest),
    /// [`AgentControl::Renew`] with the device's signature: the authority records a renewal
    /// (what CA rotations count) only with it. Older agents send `Renew`, older gateways
    /// cannot decode this one: upgrade gateways before agents.
    RenewProven {
        ssh_public_key: String,
        proof: crate::renew::RenewProof,
    },
    /// Sent once after Welcome: the device's signed word that it holds this tunnel to the
    /// gateway that welcomed it, which the gateway passes on with presence (see
    /// [`crate::attest`]). Older gateways cannot decode it: upgrade gateways before agents.
    Attest(crate::attest::TunnelProof),
}

/// Gateway -> agent on the control stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum GatewayControl {
    Welcome {
        gateway_id: String,
        transport: Transport,
    },
    Renewed(DeviceCerts),
    /// A lock or revocation the agent must honour at once (end matching sessions).
    Locked {
        users: Vec<String>,
    },
    Refused(RpcError),
    /// The answer to [`AgentControl::Ping`].
    Pong {
        seq: u64,
    },
    /// The authority's answer to [`AgentControl::Audit`].
    AuditAck(crate::audit::AuditAck),
    /// The cluster's CA bundle changed (a CA rotation, `tctl auth rotate`): trust these CAs
    /// from now on, and renew at once if the host certificate is not from the bundle's first
    /// host CA. Sent over an established tunnel; the agent checks the x509 CA's signature.
    Cas(crate::identity::CaBundle),
    /// The device's data budget: `Some(message)` once its month's bytes passed the budget
    /// (refuse bulk transfers with that message), `None` when they are within it again.
    Budget {
        exceeded: Option<String>,
    },
    /// The authority's answer to [`AgentControl::TargetCert`] `id`: the certificate (OpenSSH
    /// line) or why not.
    TargetCert {
        id: u64,
        result: Result<String, crate::rpc::RpcError>,
    },
}

/// The services an agent offers on gateway-opened streams.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Service {
    /// Test-only echo service (agents serve it only when started with `--test-echo`).
    Echo,
    Ssh,
    Kube,
    /// Relay mode (issue 22): the bytes of the stream go to the configured address of the
    /// agent's target of this name (`DEVICE/NAME`), never to an address the user names; the
    /// user's SSH runs end to end to the target's own sshd.
    Target(String),
    /// An agent update (`tctl devices update`): a `SignedManifest` frame, then the binary's
    /// bytes; the agent answers one `UpdateReply` frame. Opened by the gateway, checked by
    /// the agent against the host CA (the gateway cannot forge one).
    Update,
}

impl Service {
    /// The name of the service in audit events and logs: `ssh`, `kube`, `target:ecu1`.
    pub fn label(&self) -> String {
        match self {
            Service::Echo => "echo".into(),
            Service::Ssh => "ssh".into(),
            Service::Kube => "kube".into(),
            Service::Target(t) => format!("target:{t}"),
            Service::Update => "update".into(),
        }
    }
}

/// First frame of every gateway-opened stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamHeader {
    pub service: Service,
    /// The authenticated user, from the user's certificate (absent for tests).
    pub user: Option<String>,
    pub session_id: String,
    pub client_addr: String,
    /// The user's Kubernetes groups and users, for the gateway's own records. The agent
    /// impersonates only whom the `ticket` names, never these.
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    /// The authority's ticket for this dial: a holding gateway takes a forwarded dial only
    /// with one, and the agent impersonates in Kubernetes only whom one names.
    pub ticket: Option<crate::ticket::DialTicket>,
    /// The gateway that carried the dial to the holder (forwarded dials; for the audit log).
    pub via: Option<String>,
}

/// tsh -> gateway: the first frame of every dial stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// No certificate needed.
    Login(LoginRequest),
    /// Needs the user's certificate.
    ListDevices,
    /// Needs the user's certificate; after an `Ok` reply the stream is raw bytes.
    Dial { target: String, service: Service },
    /// Needs the user's certificate: the user's recorded sessions.
    Recordings,
    /// Needs the user's certificate: one recording, sent as `RecordingData` frames.
    Recording { session_id: String },
    /// No certificate needed: where to send the browser for single sign-on with
    /// `connector` (`oidc` or `github`, configured at the authority; the gateway relays
    /// this as `Request::SsoStart`). The provider will redirect it to `redirect_uri`
    /// (tsh's loopback listener).
    SsoStart {
        connector: String,
        redirect_uri: String,
        /// Hex SHA-256 of a secret only this tsh holds: `SsoFinish` must bring the secret,
        /// so a login can be finished only by the tsh that started it.
        proof_hash: String,
    },
    /// No certificate needed: the provider's answer that reached tsh's listener. The
    /// gateway relays it to the authority (`Request::SsoFinish`), which redeems the code
    /// (with the client secret and the PKCE verifier that only it holds), verifies the ID
    /// token and signs; the gateway answers `LoggedIn`.
    SsoFinish(SsoFinish),
    /// Gateway -> gateway (needs a gateway certificate of this cluster): the sending gateway
    /// has authorised a dial for `device_id`, which holds its tunnel to the receiving
    /// gateway. The receiver opens a stream on that tunnel with `header` (never forwarding
    /// again), answers `DialOk` and splices, as for a dial of its own.
    Forward {
        device_id: String,
        header: StreamHeader,
    },
    /// Needs the user's certificate: why the gateway ended the user's session `session_id`
    /// (the id of its `DialOk`), if it did. A lock cuts a spliced session without a word on
    /// the (end-to-end encrypted) stream, so tsh asks afterwards to say "device D is
    /// locked: MESSAGE" instead of "connection lost".
    SessionEnd { session_id: String },
    /// Needs the user's certificate: one page of the user's recordings, newest first, from
    /// `cursor` (`None`: the newest), at most `limit` (0: the authority's default).
    RecordingPage { cursor: Option<String>, limit: u32 },
    /// Needs the user's certificate: one recording from byte `offset` (to resume a
    /// transfer), sent as `RecordingData` frames as for `Recording`.
    RecordingFrom { session_id: String, offset: u64 },
    /// Needs the user's certificate: an access request action signed with the certificate's
    /// key (`rpc::UserAction`, postcard, signed as `rpc::user_action_message`). The gateway
    /// relays it with the certificate (`rpc::Request::AccessRequestUser`); the authority
    /// checks both. Answered by `AccessRequests`.
    UserAction { body: Vec<u8>, signature: Vec<u8> },
    /// Needs the user's certificate: the targets behind devices (issue 22) that the user's
    /// roles reach, answered with `Targets`.
    ListTargets,
    /// Needs the user's certificate: a signed `rpc::AccessAction::SessionMfa` (as for
    /// `UserAction`), relayed as `rpc::Request::SessionMfaCert`; answered by
    /// `SessionMfaCert`.
    SessionMfaCert { body: Vec<u8>, signature: Vec<u8> },
}

#[derive(Clone, Serialize, Deserialize)]
pub struct SsoFinish {
    pub state: String,
    pub code: String,
    pub ssh_public_key: String,
    pub ttl_secs: u64,
    /// The secret whose hash `SsoStart` carried.
    pub proof: String,
}

crate::debug_redacted!(SsoFinish { state, ssh_public_key, ttl_secs } secret { code, proof });

/// gateway -> tsh: the answer to a [`ClientRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientReply {
    LoggedIn(UserCerts),
    Devices(Vec<DeviceInfo>),
    DialOk {
        session_id: String,
        device_id: String,
    },
    Refused(RpcError),
    /// A part of the device list; more parts follow, and the last comes as `Devices`.
    DevicesPart(Vec<DeviceInfo>),
    Recordings(Vec<crate::audit::RecordingInfo>),
    /// A piece of a recording; the last one has `more: false`.
    RecordingData {
        data: Vec<u8>,
        more: bool,
    },
    /// The identity provider's login page for this attempt.
    SsoRedirect {
        auth_url: String,
    },
    /// The answer to `SessionEnd`: the reason the gateway cut the session, or `None` when
    /// it did not (or no longer remembers).
    SessionEnd {
        reason: Option<String>,
    },
    /// The answer to `RecordingPage`: `next` is the cursor of the following page.
    RecordingPage {
        recordings: Vec<crate::audit::RecordingInfo>,
        next: Option<String>,
    },
    /// The answer to `UserAction`: the request made or reviewed, or the listing.
    AccessRequests(Vec<crate::rpc::AccessRequestInfo>),
    /// The answer to `ListTargets`.
    Targets(Vec<crate::targets::TargetInfo>),
    /// The answer to `SessionMfaCert`.
    SessionMfaCert(crate::rpc::SessionMfaCert),
    /// The answer to a `UserAction` asking for the live sessions (`tsh sessions ls`).
    LiveSessions(Vec<crate::rpc::LiveSession>),
}
