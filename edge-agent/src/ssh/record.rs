//! Record mode for a host behind the device (issue 22, `mode=record` on a target line).
//!
//! The agent terminates the user's SSH itself, with the same checks as for its own logins
//! (user CA, validity, principal = login, locks, the ticket's user, roles against the
//! device's labels and the target's own, `edgeport_proto::targets::labels_of`), but presenting its bare host key: the relay hello
//! already gave tsh this device's signed word that this key answers for `DEVICE/TARGET`.
//! Once the user's certificate passes, the agent makes a key pair for this one session and
//! asks the authority, through its tunnel, for a certificate for it: the request carries the
//! user's certificate and is signed with the device's host key, so a gateway cannot make one.
//! It then logs in to the target with russh's client, checking the target's host key against
//! the pinned key or a host certificate for `DEVICE/TARGET` from the host CA (never trust on
//! first use), and relays session channels (PTY, shell, exec, signals, window changes, the
//! sftp subsystem and so scp), `direct-tcpip` (`-L`) and `tcpip-forward` (`-R`: the agent
//! asks the target's sshd for the same forward and relays its `forwarded-tcpip` channels
//! back), the forwards when the certificate permits them. Agent forwarding (`-A`) is not
//! relayed. PTY output is recorded as asciicast like the agent's own sessions; a lock or the
//! end of the user's connection ends the target connection.
//!
//! The russh callbacks are the agent's own (`handler.rs`, with [`TargetConn`] set): they
//! check the login against the target's labels, then send each channel request to
//! [`RecordActor`] here instead of the local session actor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgeport_proto::keys::KeyPair;
use edgeport_proto::sshcert::UserGrant;
use edgeport_proto::targets::{labels_of, TargetCertRequest};
use russh::keys::ssh_key::{Certificate, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::server::{Auth, Handle, Msg};
use russh::{
    client, Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf,
    Disconnect,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::actor::{self, ActorHandle, Request};
use super::auth::{self, Refusal};
use super::handler::ConnHandler;
use super::pty::PtyRequest;
use super::session::{self, LogCtx};
use super::{HandleSlot, Inner, SshConfig};
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

/// The `-R` forwards the user asked for on this connection, as (address, bound port): the
/// target may open `forwarded-tcpip` channels for these and no others.
type Forwards = Arc<Mutex<HashSet<(String, u32)>>>;

/// A record-mode connection's target: what the login is checked against, and after it the
/// agent's SSH connection to the target.
pub(super) struct TargetConn {
    inner: Arc<Inner>,
    target: Target,
    /// `DEVICE/TARGET`.
    name: String,
    /// The device's labels and the target's other keys ([`labels_of`]): what the roles are
    /// matched against.
    pub(super) labels: BTreeMap<String, String>,
    /// The connection to the target, until the login uses it.
    tcp: Option<TcpStream>,
    up: Option<client::Handle<Upstream>>,
    grant: Option<UserGrant>,
    forwards: Forwards,
}

impl TargetConn {
    pub(super) fn new(inner: &Arc<Inner>, target: Target, tcp: TcpStream) -> Self {
        let labels = labels_of(&inner.labels, &target.labels);
        Self {
            name: format!("{}/{}", inner.device_id, target.name),
            inner: inner.clone(),
            target,
            labels,
            tcp: Some(tcp),
            up: None,
            grant: None,
            forwards: Default::default(),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn target_name(&self) -> &str {
        &self.target.name
    }

    /// The logged-in user, once the target accepted the login.
    pub(super) fn user(&self) -> Option<&str> {
        self.grant.as_ref().map(|g| g.user.as_str())
    }

    /// Starts the relay of an accepted login's channels to the target.
    pub(super) fn start(
        &mut self,
        session_id: &str,
        client_addr: &str,
        handle: Handle,
    ) -> Option<ActorHandle> {
        let (up, grant) = (self.up.take()?, self.grant.take()?);
        let (me, rx) = ActorHandle::queue();
        let relay = RecordActor {
            device_id: self.inner.device_id.clone(),
            target: self.target.name.clone(),
            name: self.name.clone(),
            session_id: session_id.to_string(),
            client_addr: client_addr.to_string(),
            up,
            grant,
            handle,
            chans: HashMap::new(),
            forwards: self.forwards.clone(),
            started: Instant::now(),
        };
        tokio::spawn(relay.run(rx));
        Some(me)
    }

    /// Gets a per-session certificate from the authority and logs in to the target with it.
    async fn log_in(
        &mut self,
        session_id: &str,
        user: HandleSlot,
        login: &str,
        user_cert: &Certificate,
        grant: &UserGrant,
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
            session_id: session_id.to_string(),
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
            user,
            forwards: self.forwards.clone(),
            grant: grant.clone(),
            session_id: session_id.to_string(),
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
}

impl Drop for TargetConn {
    /// A login that never reached [`TargetConn::start`] (a lock in between): the target
    /// connection ends too.
    fn drop(&mut self) {
        if let (Some(up), Ok(rt)) = (self.up.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = up
                    .disconnect(Disconnect::ByApplication, "session ended", "")
                    .await;
            });
        }
    }
}

/// The login of a record-mode connection: the certificate checks (`checked`, against the
/// target's labels), then the login to the target; either refusal is one line to the user.
pub(super) async fn authenticate(
    h: &mut ConnHandler,
    login: &str,
    cert: &Certificate,
    checked: Result<UserGrant, Refusal>,
) -> Auth {
    let grant = match checked {
        Ok(g) => g,
        Err(why) => {
            h.cert_refused(login, cert, &why);
            return Auth::reject();
        }
    };
    let Some(t) = h.target.as_mut() else {
        return Auth::reject();
    };
    // A record-mode session is the agent's to hold back until a moderator joins, and it
    // does not: such a target is closed to roles that require a moderator, rather than open
    // without one.
    if grant.roles.requires_moderator(&t.labels) {
        let why = format!(
            "target {} is in record mode, which cannot wait for a moderator, and the roles of {} require one here",
            t.target.name, grant.user
        );
        h.refuse(
            login,
            cert.key_id(),
            Some(cert.serial()),
            &why,
            Some(why.clone()),
        );
        return Auth::reject();
    }
    match t
        .log_in(&h.session_id, h.handle.clone(), login, cert, &grant)
        .await
    {
        Ok(up) => {
            tracing::info!(target = %t.name, user = %grant.user, %login,
                session = %h.session_id, "record-mode login to the target");
            crate::audit::event("target.login")
                .session(&h.session_id)
                .user(&grant.user)
                .login(login)
                .field("target", &t.target.name)
                .field("addr", &t.target.addr)
                .field("mode", "record")
                .emit();
            h.inner.register(h.conn_id, &grant.user, h.handle.clone());
            t.up = Some(up);
            t.grant = Some(grant);
            Auth::Accept
        }
        Err(why) => {
            h.refuse(
                login,
                cert.key_id(),
                Some(cert.serial()),
                &why,
                Some(why.clone()),
            );
            Auth::reject()
        }
    }
}

/// The agent's SSH client to the target: trusts only the pinned key or a host certificate
/// for `DEVICE/TARGET` from the host CA.
struct Upstream {
    name: String,
    pin: Option<PublicKey>,
    host_cas: Vec<PublicKey>,
    problem: Arc<Mutex<Option<String>>>,
    /// The user's connection, for `forwarded-tcpip` channels.
    user: HandleSlot,
    forwards: Forwards,
    grant: UserGrant,
    session_id: String,
}

impl client::Handler for Upstream {
    type Error = russh::Error;

    /// A connection to a `-R` forward on the target: relayed to the user on a
    /// `forwarded-tcpip` channel, only for a forward the user asked for.
    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let asked = (connected_address.to_string(), connected_port);
        let user = self.user.get().cloned();
        // Past the data budget a forward asked for earlier carries nothing more (as the
        // device's own `-R` listeners: `remote_forward.rs`).
        let (Some(user), true, None) = (
            user,
            self.forwards.lock().is_ok_and(|f| f.contains(&asked)),
            crate::usage::over_budget(),
        ) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let ctx = Arc::new(OnceLock::from(LogCtx::new(
            &self.grant,
            &self.session_id,
            "forward",
        )));
        let originator = originator_address.to_string();
        tokio::spawn(async move {
            let (addr, port) = asked;
            match user
                .channel_open_forwarded_tcpip(addr, port, originator, originator_port)
                .await
            {
                Ok(to_user) => {
                    reply.accept().await;
                    bridge(to_user, channel, ctx, None, user);
                }
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
        });
        Ok(())
    }

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
        preferred: super::preferred(),
        inactivity_timeout: None,
        keepalive_interval: super::KEEPALIVE.0,
        keepalive_max: super::KEEPALIVE.1,
        nodelay: true,
        ..Default::default()
    })
}

/// A channel's audit context, set when its program starts on the target (a forward's at
/// once): bytes, recording, `session.end`.
type Ctx = Arc<OnceLock<LogCtx>>;

struct Chan {
    up: Arc<ChannelWriteHalf<client::Msg>>,
    /// The target's answer to this channel's request in flight; room for one, so a target
    /// that answers what nobody asked cannot queue up memory.
    replies: mpsc::Receiver<bool>,
    ctx: Ctx,
    pty: Option<PtyRequest>,
}

/// Relays one record-mode connection's channel requests to the target: the record-mode
/// counterpart of the local session actor, fed the same [`Request`]s by `handler.rs`.
struct RecordActor {
    device_id: String,
    target: String,
    name: String,
    session_id: String,
    client_addr: String,
    up: client::Handle<Upstream>,
    grant: UserGrant,
    /// The user's connection.
    handle: Handle,
    chans: HashMap<ChannelId, Chan>,
    forwards: Forwards,
    started: Instant,
}

impl RecordActor {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(req) = rx.recv().await {
            self.handle(req).await;
        }
        // The user's connection ended (or a lock ended it): so does the target's.
        crate::audit::event("target.end")
            .session(&self.session_id)
            .user(&self.grant.user)
            .field("target", &self.target)
            .field("mode", "record")
            .field("duration_ms", self.started.elapsed().as_millis())
            .emit();
        let _ = self
            .up
            .disconnect(Disconnect::ByApplication, "session ended", "")
            .await;
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::OpenSession { channel, reply } => {
                let up = match self.chans.len() < actor::MAX_CHANNELS {
                    true => in_time(self.up.channel_open_session()).await,
                    false => None,
                };
                let Some(up) = up else {
                    return reply.reject(ChannelOpenFailure::ConnectFailed).await;
                };
                let (tx, replies) = mpsc::channel(1);
                let (id, ctx) = (channel.id(), Ctx::default());
                reply.accept().await;
                let up = bridge(channel, up, ctx.clone(), Some(tx), self.handle.clone());
                let chan = Chan {
                    up,
                    replies,
                    ctx,
                    pty: None,
                };
                self.chans.insert(id, chan);
            }
            Request::OpenDirectTcpip {
                channel,
                host,
                port,
                reply,
            } => {
                let to = [("host", host.clone()), ("port", port.to_string())];
                if !self.forward_allowed("local", &to) {
                    return reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await;
                }
                let opened = self
                    .up
                    .channel_open_direct_tcpip(host, port, "127.0.0.1", 0);
                match in_time(opened).await {
                    Some(up) => {
                        reply.accept().await;
                        let ctx = LogCtx::new(&self.grant, &self.session_id, "forward");
                        let ctx = Arc::new(OnceLock::from(ctx));
                        bridge(channel, up, ctx, None, self.handle.clone());
                    }
                    None => reply.reject(ChannelOpenFailure::ConnectFailed).await,
                }
            }
            Request::Close { channel } => {
                self.chans.remove(&channel);
            }
            Request::Pty {
                channel,
                request: r,
                done,
            } => {
                let ok = self.grant.permit_pty
                    && self
                        .ask(channel, async |up| {
                            let size = (r.cols, r.rows, r.px_width, r.px_height);
                            up.request_pty(true, &r.term, size.0, size.1, size.2, size.3, &r.modes)
                                .await
                        })
                        .await;
                if let (true, Some(c)) = (ok, self.chans.get_mut(&channel)) {
                    c.pty = Some(r);
                }
                let _ = done.send(ok);
            }
            Request::Env {
                done,
                channel,
                name,
                value,
            } => {
                let ok = auth::env_ok(&name, &value)
                    && self
                        .ask(channel, async |up| up.set_env(true, name, value).await)
                        .await;
                let _ = done.send(ok);
            }
            Request::Shell { channel, done } => {
                let ok = self
                    .ask(channel, async |up| up.request_shell(true).await)
                    .await;
                let _ = done.send(ok && self.started(channel, "shell", None));
            }
            Request::Exec {
                channel,
                command,
                done,
            } => {
                let text = String::from_utf8_lossy(&command).into_owned();
                if actor::is_transfer(&text) && self.refuse_bulk(channel, "scp/rsync") {
                    let _ = done.send(true);
                    return;
                }
                let ok = self
                    .ask(channel, async |up| up.exec(true, command).await)
                    .await;
                let _ = done.send(ok && self.started(channel, "exec", Some(&text)));
            }
            Request::Subsystem {
                channel,
                name,
                done,
            } => {
                if name == "sftp" && self.refuse_bulk(channel, "sftp") {
                    let _ = done.send(true);
                    return;
                }
                let ok = self
                    .ask(channel, async |up| up.request_subsystem(true, &name).await)
                    .await;
                let kind = if name == "sftp" { "sftp" } else { "subsystem" };
                let _ = done.send(ok && self.started(channel, kind, None));
            }
            Request::WindowChange {
                channel,
                size: s,
                done,
            } => {
                let ok = match self.chans.get(&channel) {
                    Some(c) => {
                        let sent = c.up.window_change(s.cols, s.rows, s.px_width, s.px_height);
                        sent.await.is_ok()
                    }
                    None => false,
                };
                let _ = done.send(ok);
            }
            Request::Signal { channel, signal } => {
                if let Some(c) = self.chans.get(&channel) {
                    let _ = c.up.signal(signal).await;
                }
            }
            // Agent forwarding is not relayed to a target.
            Request::Agent { done, .. } => {
                let _ = done.send(false);
            }
            Request::TcpipForward {
                address,
                port,
                done,
            } => {
                let _ = done.send(self.tcpip_forward(address, port).await);
            }
            Request::CancelTcpipForward {
                address,
                port,
                done,
            } => {
                let known = self
                    .forwards
                    .lock()
                    .is_ok_and(|mut f| f.remove(&(address.clone(), port)));
                let ok = known && self.up.cancel_tcpip_forward(address, port).await.is_ok();
                let _ = done.send(ok);
            }
            Request::Begin { .. } => {}
        }
    }

    /// Whether the certificate permits a forward (`direction` local or remote, to `to`);
    /// audited either way.
    fn forward_allowed(&self, direction: &str, to: &[(&str, String); 2]) -> bool {
        let fields = [
            ("direction", direction.to_string()),
            ("target", self.target.clone()),
            to[0].clone(),
            to[1].clone(),
        ];
        let refused = crate::usage::over_budget().or_else(|| {
            (!self.grant.permit_port_forwarding).then(|| actor::NO_PORT_FORWARDING.to_string())
        });
        if let Some(why) = &refused {
            tracing::warn!(user = %self.grant.user, session = %self.session_id,
                target = %self.target, "refused a {direction} port forward: {why}");
        }
        actor::audit_forward(
            &self.session_id,
            &self.grant,
            "port_forward",
            &fields,
            refused.as_deref(),
        );
        refused.is_none()
    }

    /// Past the device's data budget, a bulk transfer (`what`) to the target gets the
    /// refusal on its stderr and exit status 1, as on the device itself: true when refused.
    /// The bytes of a record-mode session cross the device's link like its own.
    fn refuse_bulk(&self, channel: ChannelId, what: &str) -> bool {
        let Some(message) = crate::usage::over_budget() else {
            return false;
        };
        tracing::warn!(user = %self.grant.user, session = %self.session_id,
            target = %self.target, "refused {what}: {message}");
        actor::refuse_with_line(self.handle.clone(), channel, message);
        true
    }

    /// `ssh -R`: the same forward asked of the target's sshd; the port it bound, or None.
    async fn tcpip_forward(&mut self, address: String, port: u32) -> Option<u32> {
        let to = [("host", address.clone()), ("port", port.to_string())];
        let room = self
            .forwards
            .lock()
            .is_ok_and(|f| f.len() < super::remote_forward::MAX_FORWARDS);
        if !room || !self.forward_allowed("remote", &to) {
            return None;
        }
        let bound = match in_time(self.up.tcpip_forward(address.clone(), port)).await {
            // A reply without a port: the one asked for.
            Some(0) => port,
            Some(p) => p,
            None => {
                tracing::info!(target = %self.name, "the target refused -R {address}:{port}");
                return None;
            }
        };
        if let Ok(mut f) = self.forwards.lock() {
            f.insert((address, bound));
        }
        Some(bound)
    }

    /// Sends a request the target must answer and waits for the answer.
    async fn ask(
        &mut self,
        channel: ChannelId,
        send: impl AsyncFnOnce(&ChannelWriteHalf<client::Msg>) -> Result<(), russh::Error>,
    ) -> bool {
        let Some(c) = self.chans.get_mut(&channel) else {
            return false;
        };
        // An answer nobody waited for is not this request's.
        while c.replies.try_recv().is_ok() {}
        if send(&c.up).await.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(REPLY_TIMEOUT, c.replies.recv()).await,
            Ok(Some(true))
        )
    }

    /// `session.start` (and `exec`) once a program started on the target; recording starts
    /// for a PTY session. Always true (the program runs).
    fn started(&mut self, channel: ChannelId, kind: &'static str, command: Option<&str>) -> bool {
        let Some(c) = self.chans.get(&channel) else {
            return true;
        };
        let (sid, grant) = (&self.session_id, &self.grant);
        session::start_event(sid, grant, kind, c.pty.is_some())
            .field("device", &self.device_id)
            .field("target", &self.target)
            .field("mode", "record")
            .field("client_addr", &self.client_addr)
            .emit();
        if let Some(cmd) = command {
            session::exec_event(sid, grant, cmd)
                .field("target", &self.target)
                .emit();
        }
        let mut ctx = LogCtx::new(grant, sid, kind);
        if let Some(pty) = &c.pty {
            ctx = ctx.with_recorder(&self.name, pty);
        }
        let _ = c.ctx.set(ctx);
        true
    }
}

/// What the target answered within [`REPLY_TIMEOUT`]: a target that never answers holds up
/// only the connection that asked, and not for ever.
async fn in_time<T>(
    answer: impl std::future::Future<Output = Result<T, russh::Error>>,
) -> Option<T> {
    tokio::time::timeout(REPLY_TIMEOUT, answer).await.ok()?.ok()
}

/// Joins a user channel to a target channel: a task copies the target's side to the user
/// (with the answers to requests to `replies`), another the user's side to the target.
/// Returns the target side's writer.
fn bridge(
    user: Channel<Msg>,
    up: Channel<client::Msg>,
    ctx: Ctx,
    replies: Option<mpsc::Sender<bool>>,
    handle: Handle,
) -> Arc<ChannelWriteHalf<client::Msg>> {
    let id = user.id();
    let (user_read, user_write) = user.split();
    let (up_read, up_write) = up.split();
    let up_write = Arc::new(up_write);
    tokio::spawn(from_target(
        up_read,
        user_write,
        replies,
        ctx.clone(),
        handle,
        id,
    ));
    tokio::spawn(to_target(user_read, up_write.clone(), ctx));
    up_write
}

/// The target's side of a channel to the user: data (recorded for a PTY), stderr, the exit
/// status or signal, EOF and close; the answers to requests go to `replies` (dropped when
/// nobody waits for one).
async fn from_target(
    mut up: ChannelReadHalf,
    user: ChannelWriteHalf<Msg>,
    replies: Option<mpsc::Sender<bool>>,
    ctx: Ctx,
    handle: Handle,
    id: ChannelId,
) {
    let (mut exit, mut signal) = (None, None);
    let count = |n: usize| {
        if let Some(c) = ctx.get() {
            c.bytes_out
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    };
    while let Some(msg) = up.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                match ctx.get() {
                    Some(c) => c.record(&data),
                    None => count(data.len()),
                }
                user.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                count(data.len());
                user.extended_data_bytes(ext, data).await
            }
            ChannelMsg::ExitStatus { exit_status } => {
                exit = Some(exit_status as i32);
                user.exit_status(exit_status).await
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                signal = Some(session::sig_name(&signal_name));
                let _ = handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await;
                Ok(())
            }
            ChannelMsg::Success | ChannelMsg::Failure => {
                if let Some(r) = &replies {
                    let _ = r.try_send(matches!(msg, ChannelMsg::Success));
                }
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
    if let Some(c) = ctx.get() {
        session::audit_end(c, exit, signal);
    }
}

/// The user's side of a channel to the target: data, EOF, close.
async fn to_target(mut user: ChannelReadHalf, up: Arc<ChannelWriteHalf<client::Msg>>, ctx: Ctx) {
    loop {
        let sent = match user.wait().await {
            Some(ChannelMsg::Data { data }) => {
                if let Some(c) = ctx.get() {
                    c.bytes_in
                        .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                up.data_bytes(data).await
            }
            Some(ChannelMsg::Eof) => up.eof().await,
            Some(ChannelMsg::Close) | None => break,
            Some(_) => continue,
        };
        if sent.is_err() {
            break;
        }
    }
    let _ = up.close().await;
}
