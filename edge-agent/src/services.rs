//! What the agent serves on streams the gateway opens: each starts with a [`StreamHeader`]
//! naming the service. SSH goes to the in-process server ([`crate::ssh`]), Echo (tests
//! only, `--test-echo`, feature `test-hooks`) sends bytes back, Kube goes to `crate::kube`
//! (feature `kube`; without it a kube stream gets a one-line HTTP refusal).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edgeport_net::read_frame;
use edgeport_net::BoxedStream;
use edgeport_proto::tunnel::{Service, StreamHeader};

use crate::identity::DeviceIdentity;
use crate::ssh::{SshConfig, SshServer};
use crate::usage::{Counted, CountedStream};

/// How long the gateway has to send the header of a stream it opened.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Echo copy buffer.
#[cfg(feature = "test-hooks")]
const ECHO_BUF: usize = 256 * 1024;
/// What a kube stream (and a Kubernetes setting) gets from an agent built without `kube`.
pub const NO_KUBE: &str = "this agent was built without Kubernetes support";

pub type ServiceFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A service behind gateway-opened streams.
pub trait StreamService: Send + Sync + 'static {
    fn serve(&self, stream: BoxedStream, header: StreamHeader) -> ServiceFuture;
    /// Users locked out right now: end their sessions, refuse new ones.
    fn set_locked_users(&self, _users: Vec<String>) {}
    /// The device identity changed (a renewal or a CA rotation).
    fn identity_changed(&self, _ident: &DeviceIdentity) {}
    /// A record-mode target session (issue 22); only the SSH server serves them.
    fn serve_record(&self, _h: crate::relay::Handoff) -> ServiceFuture {
        Box::pin(async {})
    }
}

impl StreamService for SshServer {
    fn serve(&self, stream: BoxedStream, header: StreamHeader) -> ServiceFuture {
        let me = self.clone();
        Box::pin(async move { SshServer::serve(&me, stream, header).await })
    }

    fn set_locked_users(&self, users: Vec<String>) {
        SshServer::set_locked_users(self, users);
    }

    #[cfg(feature = "record-targets")]
    fn serve_record(&self, h: crate::relay::Handoff) -> ServiceFuture {
        let me = self.clone();
        Box::pin(async move {
            me.serve_record(h.stream, h.header, h.user, h.target, h.tcp)
                .await
        })
    }
}

/// The services of this agent. The SSH server is rebuilt when the host certificate is
/// renewed; live sessions keep the server they started on.
pub struct Services {
    #[cfg(feature = "test-hooks")]
    echo: bool,
    ssh: RwLock<Option<Arc<dyn StreamService>>>,
    #[cfg(feature = "kube")]
    kube: Option<Arc<dyn StreamService>>,
    locked: RwLock<Vec<String>>,
    /// Relay mode: streams to the hosts behind this device.
    relay: crate::relay::Relay,
    /// SSH servers replaced by a renewal. Their live connections keep them alive; a lock must
    /// still reach those sessions.
    retired: std::sync::Mutex<Vec<std::sync::Weak<dyn StreamService>>>,
    /// The trusted host CAs' raw keys (audit acknowledgements), as of the last identity.
    host_cas: RwLock<Vec<Vec<u8>>>,
    /// (cluster, device id), for checking update manifests.
    me: RwLock<(String, String)>,
}

impl Services {
    pub fn new(
        #[cfg(feature = "test-hooks")] test_echo: bool,
        ident: &DeviceIdentity,
        #[cfg(feature = "kube")] kube: Option<Arc<dyn StreamService>>,
        targets: Arc<crate::targets::TargetSet>,
    ) -> Self {
        let me = Self {
            #[cfg(feature = "test-hooks")]
            echo: test_echo,
            ssh: RwLock::new(None),
            #[cfg(feature = "kube")]
            kube,
            locked: RwLock::new(Vec::new()),
            relay: crate::relay::Relay::new(targets),
            retired: std::sync::Mutex::new(Vec::new()),
            host_cas: RwLock::new(Vec::new()),
            me: RwLock::new(Default::default()),
        };
        me.identity_changed(ident);
        me
    }

    /// (Re)builds the identity-dependent services (after a join or a renewal).
    pub fn identity_changed(&self, ident: &DeviceIdentity) {
        self.relay.identity_changed(ident);
        if let Ok(mut h) = self.host_cas.write() {
            *h = ident.cas.host_ca_raws();
        }
        if let Ok(mut m) = self.me.write() {
            *m = (ident.cas.cluster.clone(), ident.device_id.clone());
        }
        #[cfg(feature = "kube")]
        if let Some(k) = &self.kube {
            k.identity_changed(ident);
        }
        let ssh = match ssh_service(ident) {
            Ok(s) => {
                s.set_locked_users(self.locked.read().map(|l| l.clone()).unwrap_or_default());
                Some(s)
            }
            Err(e) => {
                tracing::error!("ssh service not available: {e}");
                None
            }
        };
        let old = match self.ssh.write() {
            Ok(mut slot) => std::mem::replace(&mut *slot, ssh),
            Err(_) => None,
        };
        if let (Some(old), Ok(mut retired)) = (old, self.retired.lock()) {
            retired.retain(|w| w.strong_count() > 0);
            retired.push(Arc::downgrade(&old));
        }
    }

    pub fn set_locked_users(&self, users: Vec<String>) {
        if let Ok(mut l) = self.locked.write() {
            *l = users.clone();
        }
        if let Ok(mut retired) = self.retired.lock() {
            retired.retain(|w| w.strong_count() > 0);
            for old in retired.iter().filter_map(|w| w.upgrade()) {
                old.set_locked_users(users.clone());
            }
        }
        #[cfg(feature = "kube")]
        if let Some(k) = &self.kube {
            k.set_locked_users(users.clone());
        }
        if let Some(s) = self.ssh() {
            s.set_locked_users(users);
        }
    }

    /// The trusted host CAs' raw keys now (two during a CA rotation).
    pub fn host_cas(&self) -> Vec<Vec<u8>> {
        self.host_cas.read().map(|h| h.clone()).unwrap_or_default()
    }

    /// A record-mode target session: the SSH server terminates it (issue 22). The server
    /// is held until the session ends, so that a lock still reaches it after a renewal.
    async fn record(&self, h: crate::relay::Handoff) {
        let session = h.header.session_id.clone();
        match self.ssh() {
            Some(ssh) => ssh.serve_record(h).await,
            None => tracing::warn!(%session, "ssh service not available"),
        }
    }

    fn ssh(&self) -> Option<Arc<dyn StreamService>> {
        self.ssh.read().ok().and_then(|s| s.clone())
    }
}

/// Builds the SSH server from the device identity: the device key with its host
/// certificate, trusting the cluster's user CA.
pub fn ssh_service(ident: &DeviceIdentity) -> Result<Arc<dyn StreamService>, String> {
    use russh::keys::ssh_key::Certificate;
    let host_cert = Certificate::from_openssh(&ident.host_cert)
        .map_err(|e| format!("host certificate: {e}"))?;
    let user_cas = ident.cas.user_cas();
    if user_cas.is_empty() {
        return Err("user CA: no readable key in the CA bundle".into());
    }
    let server = SshServer::new(SshConfig {
        host_key: ident.key.clone(),
        host_cert,
        user_cas,
        device_id: ident.device_id.clone(),
        labels: ident.labels.clone(),
        host_cas: ident.cas.host_cas(),
    })
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(server))
}

fn counted(stream: BoxedStream, service: Counted) -> BoxedStream {
    Box::new(CountedStream::tunnel(stream, service))
}

/// Reads the header of a gateway-opened stream and hands the stream to its service.
pub async fn handle(services: Arc<Services>, mut stream: BoxedStream) {
    let header = match tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame::<StreamHeader, _>(&mut stream),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!("stream dropped: bad header: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("stream dropped: no header in time");
            return;
        }
    };
    match header.service.clone() {
        #[cfg(feature = "test-hooks")]
        Service::Echo if services.echo => echo(stream).await,
        Service::Echo => {
            tracing::info!(session = %header.session_id, "echo refused: not started with --test-echo");
        }
        Service::Ssh => match services.ssh() {
            Some(ssh) => ssh.serve(counted(stream, Counted::Ssh), header).await,
            None => tracing::warn!(session = %header.session_id, "ssh service not available"),
        },
        Service::Kube if crate::usage::over_budget().is_some() => {
            let why = crate::usage::over_budget().unwrap_or_default();
            tracing::warn!(session = %header.session_id, "kube stream refused: {why}");
            refuse_kube(stream, kube_refusal(403, "Forbidden", "Forbidden", &why)).await;
        }
        #[cfg(feature = "kube")]
        Service::Kube => match &services.kube {
            Some(kube) => kube.serve(counted(stream, Counted::Kube), header).await,
            None => tracing::info!(session = %header.session_id, "kube service not available"),
        },
        #[cfg(not(feature = "kube"))]
        Service::Kube => {
            tracing::info!(session = %header.session_id, "kube stream refused: {NO_KUBE}");
            refuse_kube(stream, no_kube_response()).await;
        }
        Service::Target(name) => {
            let stream = counted(stream, Counted::Target);
            if let Some(h) = services.relay.serve(stream, header, &name).await {
                services.record(h).await
            }
        }
        Service::Update => {
            let (cluster, device) = services.me.read().map(|m| m.clone()).unwrap_or_default();
            let me = crate::update::Me {
                cluster,
                device,
                host_cas: services.host_cas(),
            };
            crate::update::serve(stream, me).await
        }
    }
}

/// Most bytes of a request head read before answering a refused kube stream.
const REFUSE_HEAD_MAX: usize = 64 * 1024;

/// Answers the HTTP/1.1 request on a kube stream with `answer` (a whole response, see
/// [`kube_refusal`]), without an HTTP library: the request head is read first (the gateway
/// expects its request taken), then the answer is written and the stream closed.
async fn refuse_kube(mut stream: BoxedStream, answer: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read_head = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 4096];
        while head.len() < REFUSE_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(HEADER_TIMEOUT, read_head).await;
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The whole HTTP/1.1 answer to a kube stream on an agent built without `kube`.
#[cfg(not(feature = "kube"))]
fn no_kube_response() -> String {
    kube_refusal(501, "Not Implemented", "NotImplemented", NO_KUBE)
}

/// A whole HTTP/1.1 answer carrying a Kubernetes `Status` (kubectl prints its message).
fn kube_refusal(code: u16, status: &str, reason: &str, message: &str) -> String {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code,
    })
    .to_string();
    format!(
        "HTTP/1.1 {code} {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Echo: every byte back until EOF, then EOF.
#[cfg(feature = "test-hooks")]
async fn echo(stream: BoxedStream) {
    use tokio::io::AsyncWriteExt;
    let (r, mut w) = tokio::io::split(stream);
    let mut r = tokio::io::BufReader::with_capacity(ECHO_BUF, r);
    if let Err(e) = tokio::io::copy_buf(&mut r, &mut w).await {
        tracing::debug!("echo stream ended: {e}");
        return;
    }
    let _ = w.shutdown().await;
}

#[cfg(all(test, not(feature = "kube")))]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Built without `kube`: a kube stream's request is answered with one 501 and the
    /// stream closed (kubectl prints the message), not left hanging.
    #[tokio::test]
    async fn kube_stream_refused_without_the_feature() {
        let (agent, mut gateway) = tokio::io::duplex(64 * 1024);
        let refused = tokio::spawn(super::refuse_kube(
            Box::new(agent),
            super::no_kube_response(),
        ));
        gateway
            .write_all(b"GET /api/v1/pods HTTP/1.1\r\nhost: k8s\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        gateway.read_to_string(&mut answer).await.unwrap();
        refused.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 501 Not Implemented\r\n"),
            "{answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(status["message"], super::NO_KUBE);
        assert_eq!(status["code"], 501);
    }
}
