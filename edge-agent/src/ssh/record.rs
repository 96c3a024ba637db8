//! Record mode for a host behind the device (issue 22, `mode=record` on a target line).
//!
//! The agent terminates the user's SSH itself, with the same checks as for its own logins
//! (user CA, validity, principal = login, locks, the ticket's user, roles against the
//! target's labels on top of the device's), but presenting its bare host key: the relay hello
//! already gave tsh this device's signed word that this key answers for `DEVICE/TARGET`.
//! Once the user's certificate passes, the agent makes a key pair for this one session and
//! asks the authority, through its tunnel, for a certificate for it: the request carries the
//! user's certificate and is signed with the device's host key, so a gateway cannot make one.
//! It then logs in to the target with russh's client, checking the target's host key against
//! the pinned key or a host certificate for `DEVICE/TARGET` from the host CA (never trust on
//! first use), and relays session channels (PTY, shell, exec, signals, window changes, the
//! sftp subsystem and so scp) and `direct-tcpip` (`-L`, when the certificate permits it).
//! PTY output is recorded as asciicast like the agent's own sessions; a lock or the end of
//! the user's connection ends the target connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgeport_net::BoxedStream;
use edgeport_proto::keys::KeyPair;
use edgeport_proto::sshcert::UserGrant;
use edgeport_proto::targets::TargetCertRequest;
use edgeport_proto::tunnel::StreamHeader;
use russh::keys::ssh_key::{Certificate, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session};
use russh::{
    cipher, client, Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelReadHalf,
    ChannelWriteHalf, Disconnect, Preferred, Pty, Sig,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::auth::{self, Policy, Refusal};
use super::{Inner, SshConfig, AUTH_TIMEOUT, ID_TIMEOUT};
use crate::audit::record::Recorder;
use crate::targets::Target;

/// How long the target has for its SSH handshake and for the login.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the target has to answer a channel request (pty, shell, exec, subsystem).
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// What record mode needs of the device identity.
pub(super) struct RecordIdentity {
    key: KeyPair,
    /// The device's host certificate, OpenSSH line (sent with each certificate request).
    host_cert: String,
    host_cas: Vec<PublicKey>,
}

impl RecordIdentity {
    pub(super) fn new(cfg: &SshConfig) -> Self {
        Self {
            key: cfg.host_key.clone(),
            host_cert: cfg.host_cert.to_openssh().unwrap_or_default(),
            host_cas: cfg.host_cas.clone(),
        }
    }
}

/// Serves one record-mode connection until it ends.
pub(super) async fn serve(
    inner: Arc<Inner>,
    stream: BoxedStream,
    header: StreamHeader,
    user: String,
    target: Target,
    tcp: TcpStream,
) {
    let conn_id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let handle_slot: Arc<OnceLock<Handle>> = Arc::new(OnceLock::new());
    let authenticated = Arc::new(AtomicBool::new(false));
    let mut labels = inner.labels.clone();
    labels.extend(target.labels.clone());
    let handler = RecordHandler {
        name: format!("{}/{}", inner.device_id, target.name),
        inner: inner.clone(),
        conn_id,
        session_id: header.session_id.clone(),
        client_addr: header.client_addr.clone(),
        ticket_user: user,
        target,
        labels,
        handle: handle_slot.clone(),
        authenticated: authenticated.clone(),
        tcp: Some(tcp),
        up: None,
        grant: None,
        chans: HashMap::new(),
        started: Instant::now(),
    };
    let config = inner.record_config.clone();
    let session = match tokio::time::timeout(
        ID_TIMEOUT,
        russh::server::run_stream(config, stream, handler),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(session = %header.session_id, "record-mode SSH connection failed before it started: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(session = %header.session_id, "SSH client sent no identification in time");
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
    if let Err(e) = session.await {
        tracing::info!(session = %header.session_id, "record-mode SSH connection ended: {e}");
    }
    deadline.abort();
    inner.unregister(conn_id);
}

/// The agent's SSH client to the target: trusts only the pinned key or a host certificate
/// for `DEVICE/TARGET` from the host CA.
struct Upstream {
    name: String,
    pin: Option<PublicKey>,
    host_cas: Vec<PublicKey>,
    problem: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let name = &self.name;
        let problem = match (&self.pin, key) {
            (Some(pin), k) => {
                let presented = match k {
                    PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data().clone(),
                    PublicKeyOrCertificate::Certificate(c) => c.public_key().clone(),
                };
                (&presented != pin.key_data()).then(|| {
                    let got =
                        PublicKey::new(presented, "").fingerprint(russh::keys::HashAlg::Sha256);
                    format!(
                        "host key mismatch: {name} presented {got}, not the key pinned for it \
                         at enrolment ({}); refusing to connect",
                        pin.fingerprint(russh::keys::HashAlg::Sha256)
                    )
                })
            }
            (None, PublicKeyOrCertificate::PublicKey { .. }) => Some(format!(
                "{name} presented a bare host key, and it has neither a pinned key nor an \
                 Edgeport host certificate; refusing to connect"
            )),
            (None, PublicKeyOrCertificate::Certificate(cert)) => {
                edgeport_proto::sshcert::signer_of(cert, &self.host_cas)
                    .ok_or(edgeport_proto::sshcert::CertRefusal::BadSignature)
                    .and_then(|ca| {
                        edgeport_proto::sshcert::check_host_cert(
                            cert,
                            ca,
                            name,
                            edgeport_net::clock::now_secs(),
                        )
                    })
                    .err()
                    .map(|e| {
                        format!(
                            "the host certificate of {name} was refused: {e}; refusing to connect"
                        )
                    })
            }
        };
        let ok = problem.is_none();
        if let (Some(p), Ok(mut slot)) = (problem, self.problem.lock()) {
            *slot = Some(p);
        }
        Ok(ok)
    }
}

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        preferred: Preferred {
            cipher: std::borrow::Cow::Borrowed(&[
                cipher::AES_128_GCM,
                cipher::AES_256_GCM,
                cipher::CHACHA20_POLY1305,
                cipher::AES_256_CTR,
                cipher::AES_128_CTR,
            ]),
            ..Preferred::default()
        },
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    })
}

/// Shared by a channel's handler side and its pump from the target.
struct Ctx {
    session_id: String,
    user: String,
    login: String,
    kind: Mutex<&'static str>,
    recorder: Mutex<Option<Recorder>>,
    started: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Ctx {
    fn record(&self, data: &[u8]) {
        if let Ok(mut r) = self.recorder.lock() {
            if let Some(r) = r.as_mut() {
                r.output(data);
            }
        }
    }

    /// The channel ended: the rest of the recording and `session.end`.
    fn end(&self, exit: Option<u32>, signal: Option<String>) {
        if let Ok(mut r) = self.recorder.lock() {
            if let Some(r) = r.as_mut() {
                r.finish();
            }
        }
        let kind = self.kind.lock().map(|k| *k).unwrap_or("session");
        let mut ev = crate::audit::event("session.end")
            .session(&self.session_id)
            .user(&self.user)
            .login(&self.login)
            .field("kind", kind)
            .field("bytes_in", self.bytes_in.load(Ordering::Relaxed))
            .field("bytes_out", self.bytes_out.load(Ordering::Relaxed))
            .field("duration_ms", self.started.elapsed().as_millis());
        if let Some(c) = exit {
            ev = ev.field("exit_code", c);
        }
        if let Some(s) = signal {
            ev = ev.field("signal", s);
        }
        ev.emit();
    }
}

struct Chan {
    up: Arc<ChannelWriteHalf<client::Msg>>,
    /// The target's answers to this channel's requests, in order.
    replies: mpsc::UnboundedReceiver<bool>,
    ctx: Arc<Ctx>,
    pty: Option<(u32, u32, String)>,
}

struct RecordHandler {
    inner: Arc<Inner>,
    conn_id: u64,
    session_id: String,
    client_addr: String,
    /// The user the authority's dial ticket names.
    ticket_user: String,
    target: Target,
    /// `DEVICE/TARGET`.
    name: String,
    /// The device's labels with the target's on top: what the roles are matched against.
    labels: BTreeMap<String, String>,
    handle: Arc<OnceLock<Handle>>,
    authenticated: Arc<AtomicBool>,
    /// The connection to the target, until the login uses it.
    tcp: Option<TcpStream>,
    up: Option<client::Handle<Upstream>>,
    grant: Option<UserGrant>,
    chans: HashMap<ChannelId, Chan>,
    started: Instant,
}

impl RecordHandler {
    /// Refuses the login: a log line, a `target.refused` audit event and, when it ends the
    /// connection, the reason to the client in a disconnect message.
    fn refuse(&self, login: &str, key_id: &str, why: &str, disconnect: bool) {
        tracing::warn!(target = %self.name, %login, %key_id, session = %self.session_id,
            client = %self.client_addr, reason = %why, "refused record-mode login");
        crate::audit::event("target.refused")
            .session(&self.session_id)
            .user(&self.ticket_user)
            .login(login)
            .field("target", &self.target.name)
            .field("mode", "record")
            .field("identity", key_id)
            .field("error", why)
            .emit();
        if !disconnect {
            return;
        }
        let msg = format!("edgeport: {why}");
        if let Some(h) = self.handle.get().cloned() {
            tokio::spawn(async move {
                let _ = h
                    .disconnect(Disconnect::NoMoreAuthMethodsAvailable, msg, String::new())
                    .await;
            });
        }
    }

    /// Gets a per-session certificate from the authority and logs in to the target with it.
    async fn log_in(
        &mut self,
        login: &str,
        user_cert: &Certificate,
    ) -> Result<client::Handle<Upstream>, String> {
        let name = self.name.clone();
        let tcp = self
            .tcp
            .take()
            .ok_or("the connection to the target was used by an earlier attempt")?;
        let key = KeyPair::generate().map_err(|e| format!("cannot make a session key: {e}"))?;
        let rec = &self.inner.record;
        let public_key = key.public_openssh();
        let mut req = TargetCertRequest {
            id: crate::relay::certs().next_id(),
            device_cert: rec.host_cert.clone(),
            target: self.target.name.clone(),
            login: login.to_string(),
            session_id: self.session_id.clone(),
            user_cert: user_cert
                .to_openssh()
                .map_err(|e| format!("the user's certificate: {e}"))?,
            public_key: public_key
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
            signed_at: edgeport_net::clock::now_secs(),
            signature: Vec::new(),
        };
        req.signature = rec.key.sign(&req.signed_bytes(&self.inner.device_id));
        let cert = crate::relay::certs().ask(req).await.map_err(|e| {
            format!("the authority refused a per-session certificate for {name}: {e}")
        })?;
        let cert = Certificate::from_openssh(cert.trim())
            .map_err(|e| format!("the authority's per-session certificate is unreadable: {e}"))?;
        let pin = match &self.target.hostkey {
            Some(p) => Some(
                edgeport_proto::keys::parse_ed25519_public(p)
                    .map_err(|e| format!("the pinned host key of {name}: {e}"))?
                    .0,
            ),
            None => None,
        };
        let problem = Arc::new(Mutex::new(None));
        let upstream = Upstream {
            name: name.clone(),
            pin,
            host_cas: rec.host_cas.clone(),
            problem: problem.clone(),
        };
        let connect = client::connect_stream(client_config(), tcp, upstream);
        let mut h = match tokio::time::timeout(UPSTREAM_TIMEOUT, connect).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let noted = problem.lock().ok().and_then(|p| p.clone());
                return Err(noted.unwrap_or_else(|| format!("SSH to target {name} failed: {e}")));
            }
            Err(_) => {
                return Err(format!(
                    "target {name} did not finish an SSH handshake within {UPSTREAM_TIMEOUT:?}"
                ))
            }
        };
        let auth = h.authenticate_openssh_cert(login, Arc::new(key.ssh_private().clone()), cert);
        match tokio::time::timeout(UPSTREAM_TIMEOUT, auth).await {
            Ok(Ok(r)) if r.success() => Ok(h),
            Ok(Ok(_)) => Err(format!(
                "login refused by the target: {name} did not accept the per-session certificate \
                 for {login:?} (its sshd needs TrustedUserCAKeys with the user CA and {login:?} \
                 among the principals it accepts for {login:?})"
            )),
            Ok(Err(e)) => Err(format!("logging in to target {name} failed: {e}")),
            Err(_) => Err(format!(
                "target {name} did not answer the login within {UPSTREAM_TIMEOUT:?}"
            )),
        }
    }

    /// Joins a user channel to a target channel: a task copies the target's side to the
    /// user, another the user's side to the target.
    async fn bridge(
        &mut self,
        user: Channel<Msg>,
        up: Channel<client::Msg>,
        reply: ChannelOpenHandle,
        kind: &'static str,
    ) {
        let Some(grant) = &self.grant else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        };
        let id = user.id();
        let (user_read, user_write) = user.split();
        let (up_read, up_write) = up.split();
        let up_write = Arc::new(up_write);
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(Ctx {
            session_id: self.session_id.clone(),
            user: grant.user.clone(),
            login: grant.login.clone(),
            kind: Mutex::new(kind),
            recorder: Mutex::new(None),
            started: Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        reply.accept().await;
        let handle = self.handle.get().cloned();
        tokio::spawn(from_target(
            up_read,
            user_write,
            tx,
            ctx.clone(),
            handle,
            id,
        ));
        tokio::spawn(to_target(user_read, up_write.clone(), ctx.clone()));
        self.chans.insert(
            id,
            Chan {
                up: up_write,
                replies: rx,
                ctx,
                pty: None,
            },
        );
    }

    /// Sends a request the target must answer and waits for the answer.
    async fn ask_target(
        &mut self,
        channel: ChannelId,
        send: impl AsyncFnOnce(&ChannelWriteHalf<client::Msg>) -> Result<(), russh::Error>,
    ) -> bool {
        let Some(c) = self.chans.get_mut(&channel) else {
            return false;
        };
        if send(&c.up).await.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(REPLY_TIMEOUT, c.replies.recv()).await,
            Ok(Some(true))
        )
    }

    /// `session.start` (and `exec`) once a program started on the target; recording starts
    /// for a PTY session.
    fn started(&mut self, channel: ChannelId, kind: &'static str, command: Option<&str>) {
        let (Some(grant), Some(c)) = (&self.grant, self.chans.get(&channel)) else {
            return;
        };
        if let Ok(mut k) = c.ctx.kind.lock() {
            *k = kind;
        }
        crate::audit::event("session.start")
            .session(&self.session_id)
            .user(&grant.user)
            .login(&grant.login)
            .field("user_id", &grant.roles.user_id)
            .field("kind", kind)
            .field("pty", c.pty.is_some())
            .field("device", &self.inner.device_id)
            .field("target", &self.target.name)
            .field("mode", "record")
            .field("client_addr", &self.client_addr)
            .field("cert_expires", grant.valid_before)
            .emit();
        if let Some(cmd) = command {
            crate::audit::event("exec")
                .session(&self.session_id)
                .user(&grant.user)
                .login(&grant.login)
                .field("command", cmd)
                .field("target", &self.target.name)
                .emit();
        }
        if let Some((cols, rows, term)) = &c.pty {
            if let Ok(mut r) = c.ctx.recorder.lock() {
                *r = Some(Recorder::new(
                    &self.session_id,
                    &grant.user,
                    &grant.login,
                    &self.name,
                    *cols,
                    *rows,
                    term,
                ));
            }
        }
    }

    async fn answer(
        &self,
        ok: bool,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if ok {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }
}

/// The target's side of a channel to the user: data (recorded for a PTY), stderr, the exit
/// status or signal, EOF and close; the answers to requests go to the handler.
async fn from_target(
    mut up: ChannelReadHalf,
    user: ChannelWriteHalf<Msg>,
    replies: mpsc::UnboundedSender<bool>,
    ctx: Arc<Ctx>,
    handle: Option<Handle>,
    id: ChannelId,
) {
    let (mut exit, mut signal) = (None, None);
    while let Some(msg) = up.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.record(&data);
                ctx.bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                user.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                ctx.bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                user.extended_data_bytes(ext, data).await
            }
            ChannelMsg::ExitStatus { exit_status } => {
                exit = Some(exit_status);
                user.exit_status(exit_status).await
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                signal = Some(format!("{signal_name:?}"));
                if let Some(h) = &handle {
                    let _ = h
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                }
                Ok(())
            }
            ChannelMsg::Success => {
                let _ = replies.send(true);
                Ok(())
            }
            ChannelMsg::Failure => {
                let _ = replies.send(false);
                Ok(())
            }
            ChannelMsg::Eof => user.eof().await,
            ChannelMsg::Close => break,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    let _ = user.close().await;
    ctx.end(exit, signal);
}

/// The user's side of a channel to the target: data, EOF, close.
async fn to_target(
    mut user: ChannelReadHalf,
    up: Arc<ChannelWriteHalf<client::Msg>>,
    ctx: Arc<Ctx>,
) {
    while let Some(msg) = user.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
                up.data_bytes(data).await
            }
            ChannelMsg::Eof => up.eof().await,
            ChannelMsg::Close => break,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    let _ = up.close().await;
}

impl russh::server::Handler for RecordHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(super::handler::publickey_only())
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(super::handler::publickey_only())
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.refuse(login, "", &Refusal::PlainKey.to_string(), false);
        Ok(super::handler::publickey_only())
    }

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let locked = self.inner.locked_snapshot();
        let policy = Policy {
            user_cas: &self.inner.user_cas,
            labels: &self.labels,
            device_id: &self.inner.device_id,
            locked: &locked,
            accounts: &self.inner.accounts,
            stream_user: Some(&self.ticket_user),
        };
        let grant = match auth::check_cert(&policy, login, cert, edgeport_net::clock::now_secs()) {
            Ok(g) => g,
            Err(why) => {
                let text = format!(
                    "{} refused the certificate of {:?} for login {login:?}: {why}",
                    self.name,
                    cert.key_id()
                );
                self.refuse(login, cert.key_id(), &text, why.ends_connection());
                return Ok(Auth::reject());
            }
        };
        match self.log_in(login, cert).await {
            Ok(up) => {
                tracing::info!(target = %self.name, user = %grant.user, %login,
                    session = %self.session_id, "record-mode login to the target");
                crate::audit::event("target.login")
                    .session(&self.session_id)
                    .user(&grant.user)
                    .login(login)
                    .field("target", &self.target.name)
                    .field("addr", &self.target.addr)
                    .field("mode", "record")
                    .emit();
                self.inner
                    .register(self.conn_id, &grant.user, self.handle.clone());
                self.up = Some(up);
                self.grant = Some(grant);
                Ok(Auth::Accept)
            }
            Err(why) => {
                self.refuse(login, cert.key_id(), &why, true);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::SeqCst);
        // A lock may have arrived between the check and now.
        match &self.grant {
            Some(g) if self.inner.is_locked(&g.user) => Err(russh::Error::Disconnect),
            _ => Ok(()),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let up = match &self.up {
            Some(up) => up.channel_open_session().await,
            None => {
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
                return Ok(());
            }
        };
        match up {
            Ok(up) => self.bridge(channel, up, reply, "session").await,
            Err(e) => {
                tracing::info!(target = %self.name, "the target refused a session channel: {e}");
                reply.reject(ChannelOpenFailure::ConnectFailed).await
            }
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(up), Some(grant)) = (&self.up, &self.grant) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        if !grant.permit_port_forwarding {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        crate::audit::event("port_forward")
            .session(&self.session_id)
            .user(&grant.user)
            .login(&grant.login)
            .field("target", &self.target.name)
            .field("to", format!("{host_to_connect}:{port_to_connect}"))
            .emit();
        let opened = up
            .channel_open_direct_tcpip(
                host_to_connect,
                port_to_connect,
                originator_address,
                originator_port,
            )
            .await;
        match opened {
            Ok(up) => self.bridge(channel, up, reply, "forward").await,
            Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.chans.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let permitted = self.grant.as_ref().is_some_and(|g| g.permit_pty);
        let ok = permitted
            && self
                .ask_target(channel, async |up| {
                    up.request_pty(
                        true, term, col_width, row_height, pix_width, pix_height, modes,
                    )
                    .await
                })
                .await;
        if let (true, Some(c)) = (ok, self.chans.get_mut(&channel)) {
            c.pty = Some((col_width, row_height, term.to_string()));
        }
        self.answer(ok, channel, session).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = auth::env_allowed(variable_name)
            && self
                .ask_target(channel, async |up| {
                    up.set_env(true, variable_name, variable_value).await
                })
                .await;
        self.answer(ok, channel, session).await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self
            .ask_target(channel, async |up| up.request_shell(true).await)
            .await;
        if ok {
            self.started(channel, "shell", None);
        }
        self.answer(ok, channel, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        let ok = self
            .ask_target(channel, async |up| up.exec(true, data.to_vec()).await)
            .await;
        if ok {
            self.started(channel, "exec", Some(&command));
        }
        self.answer(ok, channel, session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self
            .ask_target(channel, async |up| up.request_subsystem(true, name).await)
            .await;
        if ok {
            let kind = if name == "sftp" { "sftp" } else { "subsystem" };
            self.started(channel, kind, None);
        }
        self.answer(ok, channel, session).await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.get(&channel) {
            let _ =
                c.up.window_change(col_width, row_height, pix_width, pix_height)
                    .await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.get(&channel) {
            let _ = c.up.signal(signal).await;
        }
        Ok(())
    }
}

impl Drop for RecordHandler {
    fn drop(&mut self) {
        self.inner.unregister(self.conn_id);
        if let Some(up) = self.up.take() {
            if let Some(g) = &self.grant {
                crate::audit::event("target.end")
                    .session(&self.session_id)
                    .user(&g.user)
                    .field("target", &self.target.name)
                    .field("mode", "record")
                    .field("duration_ms", self.started.elapsed().as_millis())
                    .emit();
            }
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = up
                        .disconnect(Disconnect::ByApplication, "session ended", "")
                        .await;
                });
            }
        }
    }
}
