//! The gateway's connection to the authority: a few pooled mTLS RPC connections, made on
//! demand and dropped when they fail, so an authority restart heals by itself and concurrent
//! callers (joins, dials, presence) do not queue behind each other.
//!
//! Requests go in three lanes with their own budgets ([`Lane`]): what keeps the cluster safe
//! and usable (presence and the lock lists it brings, dial grants, device lists) never waits
//! behind bulk work that anyone can cause in numbers (logins, audit uploads, renewals,
//! joins, recordings), nor behind the web console's requests, which any signed-in user can
//! send as fast as a browser tab can (audit searches, device pages, session checks).

use std::sync::{Arc, Mutex, RwLock};

use edgeport_net::rpc_client::{RpcClient, RpcClientError};
use edgeport_proto::rpc::{Request, Response};
use edgeport_proto::FrameError;

/// Requests at once in the control lane (and idle connections kept for reuse): bursts of
/// dials queue here instead of opening a connection each.
const POOL: usize = 8;
/// Requests at once in the bulk lane.
const BULK: usize = 4;
/// Requests at once from the web console.
const WEB: usize = 4;

/// Which budget a request is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Presence and lock lists, dial grants, device lists, policy.
    Control,
    /// Logins, single sign-on, audit uploads and records, renewals, joins, recordings.
    Bulk,
    /// The web console: its logins, session checks, device pages, audit searches,
    /// recordings and terminals.
    Web,
}

impl Lane {
    pub fn of(req: &Request) -> Self {
        match req {
            Request::Login(_)
            | Request::SsoStart(_)
            | Request::SsoFinish(_)
            | Request::AuditUpload { .. }
            | Request::AuditRecord(_)
            | Request::RenewDevice(_)
            | Request::RenewGateway(_)
            | Request::JoinDevice(_)
            | Request::JoinGateway(_)
            | Request::RecordingList { .. }
            | Request::RecordingPage { .. }
            | Request::RecordingGet { .. }
            | Request::AccessRequestUser(_)
            | Request::SessionMfaCert(_)
            | Request::UpdateFetch { .. } => Lane::Bulk,
            Request::WebLogin(_)
            | Request::WebSessionCheck(_)
            | Request::WebLogout(_)
            | Request::WebDevicePage { .. }
            | Request::WebSessionCert { .. }
            | Request::WebRecordingPage { .. }
            | Request::WebRecordingGet { .. }
            | Request::WebAuditSearch { .. }
            | Request::WebSsoConnectors
            | Request::WebSsoStart(_)
            | Request::WebSsoFinish(_)
            | Request::WebTerminalNonce(_)
            | Request::WebSessionAlive { .. } => Lane::Web,
            _ => Lane::Control,
        }
    }
}

/// Whether a request may be sent again when its connection died before the answer: all but
/// an audit upload with events (an empty one only asks where the device's chain ends).
fn resendable(req: &Request) -> bool {
    !matches!(req, Request::AuditUpload { batch, .. } if !batch.events.is_empty())
}

pub struct AuthorityClient {
    addr: String,
    config: RwLock<Arc<rustls::ClientConfig>>,
    idle: Mutex<Vec<RpcClient>>,
    slots: tokio::sync::Semaphore,
    bulk: tokio::sync::Semaphore,
    web: tokio::sync::Semaphore,
}

impl AuthorityClient {
    pub fn new(addr: String, config: rustls::ClientConfig) -> Self {
        Self {
            addr,
            config: RwLock::new(Arc::new(config)),
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(POOL),
            bulk: tokio::sync::Semaphore::new(BULK),
            web: tokio::sync::Semaphore::new(WEB),
        }
    }

    /// Uses a new client certificate for connections made from now on.
    pub fn set_config(&self, config: rustls::ClientConfig) {
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(config);
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    fn take_idle(&self) -> Option<RpcClient> {
        self.idle.lock().ok().and_then(|mut v| v.pop())
    }

    fn put_idle(&self, c: RpcClient) {
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < POOL + BULK {
                v.push(c);
            }
        }
    }

    /// A connection of its own, outside the pool (for the long-polling policy watch).
    pub async fn dedicated(&self) -> Result<RpcClient, RpcClientError> {
        self.connect().await
    }

    async fn connect(&self) -> Result<RpcClient, RpcClientError> {
        let cfg = self
            .config
            .read()
            .map(|c| c.clone())
            .map_err(|_| RpcClientError::Unexpected("poisoned lock".into()))?;
        RpcClient::connect(&self.addr, cfg).await
    }

    /// The whole inventory, page by page (large fleets do not fit in one frame).
    pub async fn all_devices(
        &self,
    ) -> Result<Vec<edgeport_proto::rpc::DeviceInfo>, RpcClientError> {
        let (mut devices, mut next) = (Vec::new(), Some(String::new()));
        while let Some(after) = next {
            let resp = self.call(Request::DevicePage { after }).await?;
            next = edgeport_net::rpc_client::add_device_page(&mut devices, resp)?;
        }
        Ok(devices)
    }

    /// One request/response. A pooled connection that turns out to be dead (the authority
    /// restarted) is replaced once, and the other idle ones are dropped with it. The request
    /// is sent again on the new connection unless it is an audit upload with events: an
    /// authority killed after storing it and before answering would see it twice and flag a
    /// replay, so its error goes back to the agent, which asks where the chain ends first.
    pub async fn call(&self, req: Request) -> Result<Response, RpcClientError> {
        let _timer = crate::metrics::RpcTimer::start(&req);
        let lane = match Lane::of(&req) {
            Lane::Control => &self.slots,
            Lane::Bulk => &self.bulk,
            Lane::Web => &self.web,
        };
        let _slot = lane
            .acquire()
            .await
            .map_err(|_| RpcClientError::Unexpected("authority client closed".into()))?;
        if let Some(mut c) = self.take_idle() {
            match c.call(req.clone()).await {
                Ok(resp) => {
                    self.put_idle(c);
                    return Ok(resp);
                }
                Err(RpcClientError::Remote(e)) => {
                    self.put_idle(c);
                    return Err(RpcClientError::Remote(e));
                }
                Err(RpcClientError::Frame(e @ (FrameError::Closed | FrameError::Io(_)))) => {
                    tracing::debug!("pooled authority connection was closed; reconnecting");
                    if let Ok(mut idle) = self.idle.lock() {
                        idle.clear();
                    }
                    if !resendable(&req) {
                        return Err(RpcClientError::Frame(e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let mut c = self.connect().await?;
        match c.call(req).await {
            Ok(resp) => {
                self.put_idle(c);
                Ok(resp)
            }
            Err(RpcClientError::Remote(e)) => {
                self.put_idle(c);
                Err(RpcClientError::Remote(e))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::rpc::PresenceReport;

    /// An audit upload with events is never sent twice (the authority would flag the second
    /// copy as a replay); the empty one that asks where the chain ends may be.
    #[test]
    fn audit_uploads_with_events_are_not_resent() {
        use edgeport_proto::audit::{AuditBatch, AuditEvent};
        let upload = |events: Vec<AuditEvent>| Request::AuditUpload {
            device_id: "dev1".into(),
            batch: AuditBatch {
                signature: Vec::new(),
                events,
            },
        };
        assert!(resendable(&upload(Vec::new())));
        assert!(!resendable(&upload(vec![AuditEvent::new("exec", 1)])));
        assert!(resendable(&Request::Presence(PresenceReport::default())));
    }

    /// Logins and audit floods have their own budget: they never hold up presence (and the
    /// locks it brings) or dial grants.
    #[test]
    fn bulk_work_never_takes_the_control_lane() {
        assert_eq!(
            Lane::of(&Request::Presence(PresenceReport::default())),
            Lane::Control
        );
        assert_eq!(
            Lane::of(&Request::PresenceAckPart {
                part: 1,
                digest: String::new()
            }),
            Lane::Control
        );
        assert_eq!(
            Lane::of(&Request::AuthorizeDial {
                user_cert_der: vec![],
                device: "d".into(),
                service: edgeport_proto::tunnel::Service::Ssh,
            }),
            Lane::Control
        );
        assert_eq!(Lane::of(&Request::WatchPolicy { seen: 1 }), Lane::Control);
        assert_eq!(Lane::of(&Request::Login(Default::default())), Lane::Bulk);
        assert_eq!(Lane::of(&Request::AuditRecord(Vec::new())), Lane::Bulk);
        assert_eq!(
            Lane::of(&Request::RecordingList {
                user: None,
                user_cert_der: None
            }),
            Lane::Bulk
        );
        assert_eq!(
            Lane::of(&Request::RecordingPage {
                user: None,
                user_cert_der: None,
                cursor: None,
                limit: 0,
            }),
            Lane::Bulk
        );
        // The console's requests, audit searches first, take neither lane.
        let proof = edgeport_proto::rpc::WebProof {
            token: String::new(),
            signed: String::new(),
            signature: Vec::new(),
        };
        assert_eq!(
            Lane::of(&Request::WebAuditSearch {
                proof: proof.clone(),
                query: Default::default(),
            }),
            Lane::Web
        );
        assert_eq!(Lane::of(&Request::WebSessionCheck(proof)), Lane::Web);
        assert_eq!(
            Lane::of(&Request::WebSessionAlive {
                token_sha256: String::new()
            }),
            Lane::Web
        );
    }
}
