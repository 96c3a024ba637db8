//! What the agent serves on streams the gateway opens: each starts with a [`StreamHeader`]
//! naming the service. SSH goes to the in-process server ([`crate::ssh`]), Echo (tests
//! only, `--test-echo`) sends bytes back, Kube goes to [`crate::kube`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use edgeport_net::read_frame;
use edgeport_net::BoxedStream;
use edgeport_proto::tunnel::{Service, StreamHeader};
use tokio::io::{AsyncWriteExt, BufReader};

use crate::identity::DeviceIdentity;
use crate::ssh::{SshConfig, SshServer};

/// How long the gateway has to send the header of a stream it opened.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Echo copy buffer.
const ECHO_BUF: usize = 256 * 1024;

pub type ServiceFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A service behind gateway-opened streams.
pub trait StreamService: Send + Sync + 'static {
    fn serve(&self, stream: BoxedStream, header: StreamHeader) -> ServiceFuture;
    /// Users locked out right now: end their sessions, refuse new ones.
    fn set_locked_users(&self, _users: Vec<String>) {}
}

impl StreamService for SshServer {
    fn serve(&self, stream: BoxedStream, header: StreamHeader) -> ServiceFuture {
        let me = self.clone();
        Box::pin(async move { SshServer::serve(&me, stream, header).await })
    }

    fn set_locked_users(&self, users: Vec<String>) {
        SshServer::set_locked_users(self, users);
    }
}

/// The services of this agent. The SSH server is rebuilt when the host certificate is
/// renewed; live sessions keep the server they started on.
pub struct Services {
    echo: bool,
    ssh: RwLock<Option<Arc<dyn StreamService>>>,
    kube: Option<Arc<dyn StreamService>>,
    locked: RwLock<Vec<String>>,
    /// SSH servers replaced by a renewal. Their live connections keep them alive; a lock must
    /// still reach those sessions.
    retired: std::sync::Mutex<Vec<std::sync::Weak<dyn StreamService>>>,
}

impl Services {
    pub fn new(
        test_echo: bool,
        ident: &DeviceIdentity,
        kube: Option<Arc<dyn StreamService>>,
    ) -> Self {
        let me = Self {
            echo: test_echo,
            ssh: RwLock::new(None),
            kube,
            locked: RwLock::new(Vec::new()),
            retired: std::sync::Mutex::new(Vec::new()),
        };
        me.identity_changed(ident);
        me
    }

    /// (Re)builds the identity-dependent services (after a join or a renewal).
    pub fn identity_changed(&self, ident: &DeviceIdentity) {
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
        if let Some(k) = &self.kube {
            k.set_locked_users(users.clone());
        }
        if let Some(s) = self.ssh() {
            s.set_locked_users(users);
        }
    }

    fn ssh(&self) -> Option<Arc<dyn StreamService>> {
        self.ssh.read().ok().and_then(|s| s.clone())
    }
}

/// Builds the SSH server from the device identity: the device key with its host
/// certificate, trusting the cluster's user CA.
pub fn ssh_service(ident: &DeviceIdentity) -> Result<Arc<dyn StreamService>, String> {
    use russh::keys::ssh_key::{Certificate, PublicKey};
    let host_cert = Certificate::from_openssh(&ident.host_cert)
        .map_err(|e| format!("host certificate: {e}"))?;
    let user_ca =
        PublicKey::from_openssh(ident.cas.user_ca.trim()).map_err(|e| format!("user CA: {e}"))?;
    let server = SshServer::new(SshConfig {
        host_key: ident.key.clone(),
        host_cert,
        user_ca,
        device_id: ident.device_id.clone(),
        labels: ident.labels.clone(),
    })
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(server))
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
    match header.service {
        Service::Echo if services.echo => echo(stream).await,
        Service::Echo => {
            tracing::info!(session = %header.session_id, "echo refused: not started with --test-echo");
        }
        Service::Ssh => match services.ssh() {
            Some(ssh) => ssh.serve(stream, header).await,
            None => tracing::warn!(session = %header.session_id, "ssh service not available"),
        },
        Service::Kube => match &services.kube {
            Some(kube) => kube.serve(stream, header).await,
            None => tracing::info!(session = %header.session_id, "kube service not available"),
        },
    }
}

/// Echo: every byte back until EOF, then EOF.
async fn echo(stream: BoxedStream) {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(ECHO_BUF, r);
    if let Err(e) = tokio::io::copy_buf(&mut r, &mut w).await {
        tracing::debug!("echo stream ended: {e}");
        return;
    }
    let _ = w.shutdown().await;
}
