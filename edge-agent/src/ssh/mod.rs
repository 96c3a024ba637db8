//! The agent's in-process SSH server (russh), serving streams the gateway opens.
//!
//! The gateway only splices bytes: the SSH session runs between the user's client and this
//! server, so the gateway never sees keys or plaintext. The server presents the device's
//! host certificate (clients trust the host CA, never the bare key), accepts user
//! certificates only, and checks each one itself: user CA, validity, principal = login,
//! critical options, the roles' label rules against this device's labels, and locks.
//!
//! Sessions: exec (exit status and signal), shell with pty (window changes, env, TERM),
//! signals, stdin EOF, the `sftp` subsystem (the system's own `sftp-server` run over the
//! channel, else the agent's built-in one, `crate::sftp_server`) and `scp` (an exec like any other), and, when the certificate permits them,
//! local and remote port forwarding (`-L`, `-R`) and agent forwarding (`-A`). Each
//! session's processes run as the login's local user, in their own session and process
//! group, and are hung up when the channel closes.

mod actor;
mod agent_forward;
mod auth;
mod forward;
mod handler;
mod passwd;
mod process;
mod pty;
#[cfg(feature = "record-targets")]
mod record;
mod remote_forward;
mod session;
mod shared;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use edgeport_net::BoxedStream;
use edgeport_proto::keys::KeyPair;
use edgeport_proto::tunnel::StreamHeader;
use russh::keys::ssh_key::{Certificate, PublicKey};
use russh::server::Handle;
use russh::{cipher, Disconnect, MethodKind, MethodSet, Preferred};

pub use passwd::{AccountFiles, LocalUser};

/// How long a client has to send its SSH identification line.
pub(super) const ID_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client has to authenticate.
pub(super) const AUTH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the SSH server needs from the agent.
#[derive(Clone, Debug)]
pub struct SshConfig {
    /// The device key (also its tunnel key); its public half is in `host_cert`.
    pub host_key: KeyPair,
    /// The host certificate from the authority (principals: device id and `ID.CLUSTER`).
    pub host_cert: Certificate,
    /// The user CAs (two during a CA rotation): only certificates they signed are accepted.
    pub user_cas: Vec<PublicKey>,
    pub device_id: String,
    /// This device's labels, matched against the roles carried in user certificates.
    pub labels: BTreeMap<String, String>,
    /// The trusted host CAs: record mode checks a target's host certificate against them.
    pub host_cas: Vec<PublicKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("the host certificate does not belong to the device key")]
    CertKeyMismatch,
    #[error("the host certificate is not a host certificate")]
    NotHostCert,
}

/// The SSH server. Cheap to clone; clones share locks and live sessions.
#[derive(Clone)]
pub struct SshServer {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: Arc<russh::server::Config>,
    /// The server of record-mode target sessions: the device key without its certificate.
    #[cfg(feature = "record-targets")]
    record_config: Arc<russh::server::Config>,
    user_cas: Vec<PublicKey>,
    device_id: String,
    labels: BTreeMap<String, String>,
    accounts: AccountFiles,
    sftp_server: Option<process::SftpServer>,
    next_conn: AtomicU64,
    locked: Mutex<HashSet<String>>,
    /// Authenticated connections: id -> (user, handle), so that a lock can end them.
    live: Mutex<HashMap<u64, (String, HandleSlot)>>,
    /// Live PTY sessions others may join (`tsh join`), by session id.
    shared: shared::Registry,
    /// Record mode (issue 22): the device key signs per-session certificate requests with
    /// its host certificate; the server there presents the bare key (pinned for the target
    /// in the device's signed statement to tsh), and target host certificates are checked
    /// against the host CAs.
    #[cfg(feature = "record-targets")]
    record: record::RecordIdentity,
}

/// A connection's russh handle, filled in once the connection is set up.
type HandleSlot = Arc<OnceLock<Handle>>;

impl Inner {
    fn locked_snapshot(&self) -> HashSet<String> {
        self.locked.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn is_locked(&self, user: &str) -> bool {
        self.locked
            .lock()
            .map(|l| l.contains(user))
            .unwrap_or(false)
    }

    fn register(&self, conn: u64, user: &str, handle: HandleSlot) {
        if let Ok(mut live) = self.live.lock() {
            live.insert(conn, (user.to_string(), handle));
        }
    }

    fn unregister(&self, conn: u64) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&conn);
        }
    }
}

/// The russh settings that matter for speed (DESIGN section 7): AES-GCM offered (russh's
/// default list lacks aes128-gcm; OpenSSH clients pick by their own preference order),
/// chacha20 for CPUs without AES instructions, no 1 s penalty on the initial "none" probe,
/// and a 2 MiB window (see below).
fn russh_config(cfg: &SshConfig) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Owned(format!(
            "SSH-2.0-Edgeport_{}",
            edgeport_proto::VERSION
        ))),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Certificates are not guessable secrets: a rejection delay buys nothing.
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![cfg.host_key.ssh_private().clone()],
        certificates: vec![cfg.host_cert.clone()],
        // OpenSSH's 2 MiB, not more: a bigger window lets an OpenSSH client queue up to
        // that much in its own output buffer whenever its transport is slower than its
        // cipher (always the case behind a ProxyCommand), and the buffer churn (realloc,
        // memmove, page faults) tripled its CPU: 16 MiB gave 406 MiB/s through
        // `tsh proxy ssh`, 2 MiB 907 MiB/s, with direct connections no slower.
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 65535,
        channel_buffer_size: 256,
        event_buffer_size: 64,
        preferred: preferred(),
        // Idle interactive sessions are legitimate; dead peers are found by keep-alives.
        inactivity_timeout: None,
        keepalive_interval: KEEPALIVE.0,
        keepalive_max: KEEPALIVE.1,
        nodelay: true,
        ..Default::default()
    }
}

/// Keep-alive interval and how many may go unanswered (server, and record mode's client).
const KEEPALIVE: (Option<Duration>, usize) = (Some(Duration::from_secs(30)), 4);

/// The algorithm preferences of [`russh_config`], shared with record mode's client.
fn preferred() -> Preferred {
    Preferred {
        cipher: Cow::Borrowed(&[
            cipher::AES_128_GCM,
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]),
        ..Preferred::default()
    }
}

impl SshServer {
    pub fn new(cfg: SshConfig) -> Result<SshServer, SshError> {
        Self::with_accounts(cfg, AccountFiles::default())
    }

    /// As [`SshServer::new`], reading accounts from other files (tests).
    pub fn with_accounts(cfg: SshConfig, accounts: AccountFiles) -> Result<SshServer, SshError> {
        if cfg.host_cert.public_key() != cfg.host_key.ssh_public().key_data() {
            return Err(SshError::CertKeyMismatch);
        }
        if !cfg.host_cert.cert_type().is_host() {
            return Err(SshError::NotHostCert);
        }
        let setting = std::env::var("EDGEPORT_SFTP_SERVER").ok();
        let sftp_server = process::choose_sftp_server(setting.as_deref());
        match &sftp_server {
            None => tracing::info!("no sftp-server found on this system and none built in: sftp (and scp's default mode) will be refused"),
            Some(process::SftpServer::Builtin(_)) => tracing::info!("sftp: serving with the built-in SFTP server"),
            Some(process::SftpServer::System(p)) => tracing::debug!("sftp: serving with {}", p.display()),
        }
        if !process::running_as_root() {
            let own = accounts
                .lookup_uid(process::own_uid())
                .map(|u| u.name)
                .unwrap_or_else(|| format!("uid {}", process::own_uid()));
            tracing::warn!(
                "the agent does not run as root: SSH logins are limited to its own user {own:?}"
            );
        }
        #[cfg(feature = "record-targets")]
        let record = record::RecordIdentity::new(&cfg);
        #[cfg(feature = "record-targets")]
        let record_config = {
            let mut c = russh_config(&cfg);
            c.certificates = Vec::new();
            Arc::new(c)
        };
        Ok(SshServer {
            inner: Arc::new(Inner {
                #[cfg(feature = "record-targets")]
                record_config,
                config: Arc::new(russh_config(&cfg)),
                user_cas: cfg.user_cas,
                device_id: cfg.device_id,
                labels: cfg.labels,
                accounts,
                sftp_server,
                next_conn: AtomicU64::new(1),
                locked: Mutex::new(HashSet::new()),
                live: Mutex::new(HashMap::new()),
                shared: Default::default(),
                #[cfg(feature = "record-targets")]
                record,
            }),
        })
    }

    /// Serves one SSH connection on a gateway-opened stream until it ends. Errors are
    /// logged here; there is nobody to return them to.
    pub async fn serve(&self, stream: BoxedStream, header: StreamHeader) {
        let user = header.user.clone();
        self.serve_conn(stream, header, user, |_| {}).await
    }

    /// Serves one connection whose stream user is `user`; `setup` finishes its handler.
    async fn serve_conn(
        &self,
        stream: BoxedStream,
        header: StreamHeader,
        user: Option<String>,
        setup: impl FnOnce(&mut handler::ConnHandler),
    ) {
        let conn_id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let handle_slot = Arc::new(OnceLock::new());
        let authenticated = Arc::new(AtomicBool::new(false));
        let mut handler = handler::ConnHandler::new(
            self.inner.clone(),
            conn_id,
            user,
            header.session_id.clone(),
            header.client_addr.clone(),
            handle_slot.clone(),
            authenticated.clone(),
        );
        setup(&mut handler);
        #[cfg(feature = "record-targets")]
        let config = match handler.target.is_some() {
            true => self.inner.record_config.clone(),
            false => self.inner.config.clone(),
        };
        #[cfg(not(feature = "record-targets"))]
        let config = self.inner.config.clone();
        let session = match tokio::time::timeout(
            ID_TIMEOUT,
            russh::server::run_stream(config, stream, handler),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(session = %header.session_id, client = %header.client_addr,
                    "SSH connection failed before it started: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(session = %header.session_id, client = %header.client_addr,
                    "SSH client sent no identification within {ID_TIMEOUT:?}");
                return;
            }
        };
        let handle = session.handle();
        let _ = handle_slot.set(handle.clone());
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(AUTH_TIMEOUT).await;
            if !authenticated.load(Ordering::SeqCst) {
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        "edgeport: authentication timed out".into(),
                        String::new(),
                    )
                    .await;
            }
        });
        match session.await {
            Ok(()) => tracing::debug!(session = %header.session_id, "SSH connection closed"),
            Err(e) => tracing::info!(session = %header.session_id, "SSH connection ended: {e}"),
        }
        deadline.abort();
        self.inner.unregister(conn_id);
    }

    /// Replaces the set of locked users: their live sessions end now, and they cannot log
    /// in until unlocked.
    pub fn set_locked_users(&self, users: Vec<String>) {
        let users: HashSet<String> = users.into_iter().collect();
        // The set first, then the sessions to end: a login registers itself before its last
        // lock check, so one that registers after the snapshot below sees the new set.
        if let Ok(mut l) = self.inner.locked.lock() {
            l.clone_from(&users);
        }
        let victims: Vec<(String, Handle)> = self
            .inner
            .live
            .lock()
            .map(|live| {
                live.values()
                    .filter(|(u, _)| users.contains(u))
                    .filter_map(|(u, h)| h.get().map(|h| (u.clone(), h.clone())))
                    .collect()
            })
            .unwrap_or_default();
        if victims.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("set_locked_users called outside the runtime: live sessions not ended");
            return;
        };
        for (user, h) in victims {
            tracing::warn!(user = %user, "ending SSH session: the user is locked");
            rt.spawn(async move {
                let _ = h
                    .disconnect(
                        Disconnect::ByApplication,
                        format!("edgeport: user {user:?} is locked"),
                        String::new(),
                    )
                    .await;
            });
        }
    }

    /// Serves a record-mode session to `target` (issue 22) on a stream whose dial ticket
    /// named `user`; `tcp` is already connected to the target.
    #[cfg(feature = "record-targets")]
    pub async fn serve_record(
        &self,
        stream: BoxedStream,
        header: StreamHeader,
        user: String,
        target: crate::targets::Target,
        tcp: tokio::net::TcpStream,
    ) {
        let target = record::TargetConn::new(&self.inner, target, tcp);
        self.serve_conn(stream, header, Some(user), move |h| h.target = Some(target))
            .await
    }

    /// The device id this server answers for.
    pub fn device_id(&self) -> &str {
        &self.inner.device_id
    }
}
