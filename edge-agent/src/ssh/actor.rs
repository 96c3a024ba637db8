//! The session actor of one SSH connection: a task, started once the login is accepted,
//! that owns what the connection sets up (its session channels with their pty requests,
//! environment and running programs, the `-L` forwards in flight, the `-R` listeners and
//! the `-A` socket) and does the work of every channel request.
//!
//! The russh handler (`handler.rs`) turns each callback into a [`Request`]. Where the client
//! wants an answer (a channel request's success or failure, a global request's), the request
//! carries a oneshot and the callback awaits the verdict before it answers the client itself:
//! russh remembers only the latest want-reply flag of a channel, so the answer must go out
//! before the next request is read. Requests are handled one at a time, in order, and no
//! request waits on the russh session loop (a channel-open answer is only queued to it), so
//! a callback waiting for the actor cannot deadlock it. Channel data does not pass through
//! here: each started program's task reads and writes its channel halves directly
//! (`session.rs`). The actor ends when the handler drops its sender, at the end of the
//! connection, and its state goes with it: listeners closed, the agent socket removed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::sync::{mpsc, oneshot};

use super::agent_forward::AgentSocket;
use super::auth::{self, Authorized};
use super::process::{self, Program, Spawn, Started};
use super::pty::{self, PtyMaster, PtyRequest};
use super::remote_forward::RemoteForwards;
use super::session::{self, LogCtx, ProcessIo};
use super::shared::{self, Gate, Shared};
use super::{forward, Inner};

/// Most channels one connection may hold open at once (OpenSSH's multiplexing rarely needs
/// more than a handful).
pub(super) const MAX_CHANNELS: usize = 64;
/// Most `env` requests honoured per channel.
const MAX_ENV: usize = 64;
/// Requests queued for the actor before the handler waits (it mostly waits for an answer
/// anyway).
const QUEUE: usize = 32;

/// The audit reason for a forward the certificate does not allow.
pub(super) const NO_PORT_FORWARDING: &str = "the certificate does not permit port forwarding";
/// Why forwards are refused where the roles require a moderator: a moderator watches a
/// terminal, and a forward has none to watch.
pub(super) const MODERATED_NO_FORWARDS: &str =
    "the roles require a moderator for sessions on this device, and forwarding cannot be moderated";
const NO_AGENT_FORWARDING: &str = "the certificate does not permit agent forwarding";

/// A terminal size from `pty-req` or `window-change`: columns, rows, pixel width, height.
#[derive(Clone, Copy, Debug)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
}

/// What the handler asks of the actor, one message per russh callback after
/// authentication. `done` carries the verdict back where the client waits for one.
pub enum Request {
    OpenSession {
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
    },
    /// `ssh -L`: a `direct-tcpip` channel to `host:port` on the device's side.
    OpenDirectTcpip {
        channel: Channel<Msg>,
        host: String,
        port: u32,
        reply: ChannelOpenHandle,
    },
    Close {
        channel: ChannelId,
    },
    Pty {
        channel: ChannelId,
        request: PtyRequest,
        done: oneshot::Sender<bool>,
    },
    Env {
        channel: ChannelId,
        name: String,
        value: String,
        done: oneshot::Sender<bool>,
    },
    Shell {
        channel: ChannelId,
        done: oneshot::Sender<bool>,
    },
    Exec {
        channel: ChannelId,
        command: Vec<u8>,
        done: oneshot::Sender<bool>,
    },
    Subsystem {
        channel: ChannelId,
        name: String,
        done: oneshot::Sender<bool>,
    },
    WindowChange {
        channel: ChannelId,
        size: WindowSize,
        done: oneshot::Sender<bool>,
    },
    Signal {
        channel: ChannelId,
        signal: Sig,
    },
    /// `ssh -A`: `auth-agent-req@openssh.com` on a session channel.
    Agent {
        channel: ChannelId,
        done: oneshot::Sender<bool>,
    },
    /// `ssh -R`: `tcpip-forward`; the answer is the port bound, or None when refused.
    TcpipForward {
        address: String,
        port: u32,
        done: oneshot::Sender<Option<u32>>,
    },
    CancelTcpipForward {
        address: String,
        port: u32,
        done: oneshot::Sender<bool>,
    },
    /// A moderator joined the moderated session waiting on `channel`: start its program.
    Begin {
        channel: ChannelId,
    },
}

/// The handler's end of the actor.
pub struct ActorHandle {
    tx: mpsc::Sender<Request>,
}

impl ActorHandle {
    /// Starts the actor of an authenticated connection.
    pub fn spawn(conn: Conn) -> Self {
        let (me, rx) = Self::queue();
        let actor = SessionActor {
            me: me.tx.downgrade(),
            conn,
            channels: HashMap::new(),
            forwards_open: Arc::new(AtomicUsize::new(0)),
            remote_forwards: RemoteForwards::default(),
            agent_socket: None,
        };
        tokio::spawn(actor.run(rx));
        me
    }

    /// A handle and the queue of requests it sends, for an actor of another kind (record
    /// mode's relay to a host behind the device).
    pub fn queue() -> (Self, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// Sends a request that needs no answer.
    pub async fn tell(&self, req: Request) {
        let _ = self.tx.send(req).await;
    }

    /// Sends a request and waits for its answer; `default` if the actor is gone.
    pub async fn ask<T>(&self, default: T, req: impl FnOnce(oneshot::Sender<T>) -> Request) -> T {
        let (done, answer) = oneshot::channel();
        if self.tx.send(req(done)).await.is_err() {
            return default;
        }
        answer.await.unwrap_or(default)
    }
}

/// Who is logged in on this connection, and where from: what every channel's program and
/// audit event needs.
pub struct Conn {
    pub inner: Arc<Inner>,
    pub auth: Authorized,
    pub session_id: String,
    pub client_addr: String,
    /// The connection's russh handle, for tasks that write to it (programs, forwards).
    pub handle: Handle,
}

impl Conn {
    /// One audit event for a forward the client asked for, allowed or refused.
    fn audit_forward(&self, kind: &'static str, fields: &[(&str, String)], refused: Option<&str>) {
        audit_forward(&self.session_id, &self.auth.grant, kind, fields, refused)
    }
}

/// Answers a channel request that was accepted with one line on stderr and exit status 1,
/// then closes the channel (here and in record mode).
pub(super) fn refuse_with_line(handle: Handle, channel: ChannelId, message: String) {
    tokio::spawn(async move {
        let line = format!("{message}\r\n").into_bytes();
        let _ = handle.extended_data(channel, 1, line).await;
        let _ = handle.exit_status_request(channel, 1).await;
        let _ = handle.eof(channel).await;
        let _ = handle.close(channel).await;
    });
}

/// One audit event for a forward the client asked for, allowed or refused (here and in
/// record mode).
pub(super) fn audit_forward(
    session_id: &str,
    grant: &edgeport_proto::sshcert::UserGrant,
    kind: &'static str,
    fields: &[(&str, String)],
    refused: Option<&str>,
) {
    let mut ev = crate::audit::event(kind)
        .session(session_id)
        .user(&grant.user)
        .login(&grant.login);
    for (k, v) in fields {
        ev = ev.field(k, v);
    }
    ev = ev.field("success", refused.is_none());
    if let Some(why) = refused {
        ev = ev.field("reason", why);
    }
    ev.emit();
}

struct SessionActor {
    /// For tasks that report back (a moderated session's wait).
    me: mpsc::WeakSender<Request>,
    conn: Conn,
    channels: HashMap<ChannelId, SessionChannel>,
    /// `direct-tcpip` channels open now (each runs in its own task).
    forwards_open: Arc<AtomicUsize>,
    /// `ssh -R` listeners, closed with the connection.
    remote_forwards: RemoteForwards,
    /// The `ssh -A` socket, made on the first agent request, removed with the connection.
    agent_socket: Option<AgentSocket>,
}

impl SessionActor {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(req) = rx.recv().await {
            self.handle(req).await;
        }
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::OpenSession { channel, reply } => self.open_session(channel, reply).await,
            Request::OpenDirectTcpip {
                channel,
                host,
                port,
                reply,
            } => self.open_direct_tcpip(channel, host, port, reply).await,
            Request::Close { channel } => {
                // The channel's task sees the close on its own and hangs the program up.
                self.channels.remove(&channel);
            }
            Request::Pty {
                channel,
                request,
                done,
            } => {
                let _ = done.send(self.pty(channel, request));
            }
            Request::Env {
                channel,
                name,
                value,
                done,
            } => {
                let ok = auth::env_ok(&name, &value)
                    && self
                        .channels
                        .get_mut(&channel)
                        .is_some_and(|ch| ch.set_env(name, value));
                let _ = done.send(ok);
            }
            Request::Shell { channel, done } => {
                let _ = done.send(self.start(channel, Program::LoginShell));
            }
            Request::Exec {
                channel,
                command,
                done,
            } => {
                let ok = match String::from_utf8(command) {
                    Ok(cmd) if cmd.starts_with(shared::JOIN_COMMAND) => {
                        let args = cmd[shared::JOIN_COMMAND.len()..].to_string();
                        self.join(channel, &args)
                    }
                    Ok(cmd) if process::exec_safe(&cmd) => {
                        if is_transfer(&cmd) && self.refuse_bulk(channel, "scp/rsync") {
                            let _ = done.send(true);
                            return;
                        }
                        self.start(channel, Program::Command(cmd))
                    }
                    _ => false,
                };
                let _ = done.send(ok);
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
                let _ = done.send(self.subsystem(channel, &name));
            }
            Request::WindowChange {
                channel,
                size,
                done,
            } => {
                let ok = self
                    .channels
                    .get_mut(&channel)
                    .is_some_and(|ch| ch.resize(size));
                let _ = done.send(ok);
            }
            Request::Signal { channel, signal } => {
                if let Some(ch) = self.channels.get(&channel) {
                    ch.signal(&signal);
                }
            }
            Request::Agent { channel, done } => {
                let _ = done.send(self.agent(channel));
            }
            Request::TcpipForward {
                address,
                port,
                done,
            } => {
                let _ = done.send(self.tcpip_forward(&address, port).await);
            }
            Request::CancelTcpipForward {
                address,
                port,
                done,
            } => {
                let _ = done.send(self.remote_forwards.cancel(&address, port));
            }
            Request::Begin { channel } => self.begin(channel),
        }
    }

    async fn open_session(&mut self, channel: Channel<Msg>, reply: ChannelOpenHandle) {
        if self.channels.len() >= MAX_CHANNELS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        }
        self.channels
            .insert(channel.id(), SessionChannel::new(channel.split()));
        reply.accept().await;
    }

    async fn open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: String,
        port: u32,
        reply: ChannelOpenHandle,
    ) {
        let conn = &self.conn;
        let grant = &conn.auth.grant;
        let fields = [
            ("direction", "local".to_string()),
            ("host", host.clone()),
            ("port", port.to_string()),
        ];
        if let Some(why) = crate::usage::over_budget() {
            tracing::warn!(user = %grant.user, session = %conn.session_id,
                "refused port forward to {host}:{port}: {why}");
            conn.audit_forward("port_forward", &fields, Some(&why));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        }
        if !grant.permit_port_forwarding {
            tracing::warn!(
                user = %grant.user,
                session = %conn.session_id,
                "refused port forward to {host}:{port}: the certificate does not permit port forwarding"
            );
            conn.audit_forward("port_forward", &fields, Some(NO_PORT_FORWARDING));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        }
        if grant.roles.requires_moderator(&conn.inner.labels) {
            tracing::warn!(user = %grant.user, session = %conn.session_id,
                "refused port forward to {host}:{port}: {MODERATED_NO_FORWARDS}");
            conn.audit_forward("port_forward", &fields, Some(MODERATED_NO_FORWARDS));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        }
        let count = self.forwards_open.clone();
        if count.load(Ordering::Relaxed) >= MAX_CHANNELS * 4 {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        }
        tracing::info!(
            user = %grant.user,
            session = %conn.session_id,
            "port forward to {host}:{port}"
        );
        conn.audit_forward("port_forward", &fields, None);
        let sid = conn.session_id.clone();
        count.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            forward::direct_tcpip(channel, reply, host, port, sid).await;
            count.fetch_sub(1, Ordering::Relaxed);
        });
    }

    fn pty(&mut self, channel: ChannelId, request: PtyRequest) -> bool {
        let grant = &self.conn.auth.grant;
        if !grant.permit_pty {
            tracing::warn!(user = %grant.user, session = %self.conn.session_id,
                "refused a pty: the certificate does not permit it");
            return false;
        }
        process::exec_safe(&request.term)
            && self
                .channels
                .get_mut(&channel)
                .is_some_and(|ch| ch.set_pty(request))
    }

    /// Past the device's data budget, a bulk transfer (`what`) gets the refusal on its
    /// stderr and exit status 1 instead of its program: true when refused. The request
    /// itself is accepted, so that the client reads the line before the channel closes.
    fn refuse_bulk(&self, channel: ChannelId, what: &str) -> bool {
        let Some(message) = crate::usage::over_budget() else {
            return false;
        };
        let conn = &self.conn;
        tracing::warn!(user = %conn.auth.grant.user, session = %conn.session_id,
            "refused {what}: {message}");
        self.refuse_line(channel, message);
        true
    }

    /// Answers a request it accepted with one line on stderr and exit status 1.
    fn refuse_line(&self, channel: ChannelId, message: String) {
        refuse_with_line(self.conn.handle.clone(), channel, message);
    }

    fn subsystem(&mut self, channel: ChannelId, name: &str) -> bool {
        match (name, &self.conn.inner.sftp_server) {
            ("sftp", Some(server)) => {
                let server = server.clone();
                self.start(channel, Program::Sftp(server))
            }
            ("sftp", None) => {
                tracing::warn!(session = %self.conn.session_id,
                    "refused sftp: no sftp-server on this device and none built in (EDGEPORT_SFTP_SERVER)");
                false
            }
            _ => false,
        }
    }

    fn start(&mut self, channel: ChannelId, program: Program) -> bool {
        let conn = &self.conn;
        if !conn.auth.grant.roles.requires_moderator(&conn.inner.labels) {
            return self
                .channels
                .get_mut(&channel)
                .is_some_and(|ch| ch.start(conn, channel, program, None));
        }
        // A moderated session: announced now (so that a moderator finds it), started when
        // a moderator joins.
        let Some(ch) = self.channels.get_mut(&channel) else {
            return false;
        };
        if ch.running.is_some() || ch.pending.is_some() {
            return false;
        }
        if ch.pty.is_none() {
            self.refuse_line(
                channel,
                "edgeport: sessions to this device need a moderator, who can join only an interactive session: use a terminal (tsh ssh -t)".into(),
            );
            return true;
        }
        let (grant, sid) = (&conn.auth.grant, &conn.session_id);
        let Some(shared) = Shared::register(
            &conn.inner.shared,
            sid,
            &grant.user,
            &conn.inner.device_id,
            true,
            (conn.handle.clone(), channel),
        ) else {
            return false;
        };
        session::audit_start(conn, &program, true);
        tracing::info!(user = %grant.user, session = %sid, "session waits for a moderator");
        ch.pending = Some(Pending {
            ctx: LogCtx::new(grant, sid, program.kind()),
            program,
            shared: shared.clone(),
            armed: true,
        });
        let (me, handle, sid) = (self.me.clone(), conn.handle.clone(), sid.clone());
        tokio::spawn(async move {
            let line = format!("waiting for a moderator to join session {sid}\r\n");
            let _ = handle.data(channel, line.into_bytes()).await;
            let mut gate = shared.gate();
            let go = gate
                .wait_for(|g| *g != Gate::Waiting)
                .await
                .is_ok_and(|g| *g == Gate::Go);
            if let (true, Some(tx)) = (go, me.upgrade()) {
                let _ = tx.send(Request::Begin { channel }).await;
            }
        });
        true
    }

    /// Starts a moderated session's program now that a moderator is there.
    fn begin(&mut self, channel: ChannelId) {
        let conn = &self.conn;
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let Some(mut p) = ch.pending.take() else {
            return;
        };
        p.armed = false;
        let (program, shared) = (p.program.clone(), p.shared.clone());
        if !ch.start(conn, channel, program, Some(shared.clone())) {
            p.armed = true;
            drop(p);
            let h = conn.handle.clone();
            tokio::spawn(async move {
                let _ = h.exit_status_request(channel, 1).await;
                let _ = h.close(channel).await;
            });
        }
    }

    /// `tsh join`: attaches this channel to another live session of this device, if the
    /// certificate's roles allow the mode here. A refusal is one line on stderr.
    fn join(&mut self, channel: ChannelId, args: &str) -> bool {
        let conn = &self.conn;
        let grant = &conn.auth.grant;
        let checked = shared::parse_join(args).and_then(|(id, mode)| {
            shared::check_join(&grant.roles, &conn.inner.labels, mode)?;
            let s = Shared::find(&conn.inner.shared, &id)
                .ok_or_else(|| format!("no live interactive session {id} on this device"))?;
            shared::check_not_own_moderator(&s.owner, &grant.user, mode)?;
            Ok((s, mode))
        });
        let (target, mode) = match checked {
            Ok(v) => v,
            Err(why) => {
                tracing::warn!(user = %grant.user, session = %conn.session_id, "refused a join: {why}");
                crate::audit::event("session.join_refused")
                    .session(&conn.session_id)
                    .user(&grant.user)
                    .login(&grant.login)
                    .field("request", args.trim())
                    .field("reason", &why)
                    .emit();
                self.refuse_line(channel, format!("edgeport: {why}"));
                return true;
            }
        };
        let Some(ch) = self.channels.get_mut(&channel) else {
            return false;
        };
        if ch.running.is_some() || ch.pending.is_some() {
            return false;
        }
        let Some(io) = ch.io.take() else {
            return false;
        };
        let who = shared::Joiner {
            user: grant.user.clone(),
            login: grant.login.clone(),
            connection: conn.session_id.clone(),
        };
        shared::join(target, who, mode, io, conn.handle.clone(), channel)
    }

    fn agent(&mut self, channel: ChannelId) -> bool {
        let conn = &self.conn;
        let auth = &conn.auth;
        if !auth.grant.permit_agent_forwarding {
            tracing::warn!(user = %auth.grant.user, session = %conn.session_id,
                "refused agent forwarding: the certificate does not permit it");
            conn.audit_forward("agent_forward", &[], Some(NO_AGENT_FORWARDING));
            return false;
        }
        if auth.grant.roles.requires_moderator(&conn.inner.labels) {
            tracing::warn!(user = %auth.grant.user, session = %conn.session_id,
                "refused agent forwarding: {MODERATED_NO_FORWARDS}");
            conn.audit_forward("agent_forward", &[], Some(MODERATED_NO_FORWARDS));
            return false;
        }
        if self.agent_socket.is_none() {
            match AgentSocket::create(
                conn.handle.clone(),
                &auth.account,
                auth.switch_user,
                &conn.session_id,
            ) {
                Ok(s) => self.agent_socket = Some(s),
                Err(e) => {
                    tracing::warn!(session = %conn.session_id, "agent forwarding failed: {e}");
                    conn.audit_forward("agent_forward", &[], Some(&e.to_string()));
                    return false;
                }
            }
        }
        let (Some(sock), Some(ch)) = (&self.agent_socket, self.channels.get_mut(&channel)) else {
            return false;
        };
        ch.env
            .push(("SSH_AUTH_SOCK".into(), sock.path().display().to_string()));
        tracing::info!(user = %auth.grant.user, session = %conn.session_id, "agent forwarding");
        conn.audit_forward("agent_forward", &[], None);
        true
    }

    /// Starts an `ssh -R` listener; the port bound, or None when refused.
    async fn tcpip_forward(&mut self, address: &str, asked: u32) -> Option<u32> {
        let conn = &self.conn;
        let auth = &conn.auth;
        let mut fields = vec![
            ("direction", "remote".to_string()),
            ("host", address.to_string()),
            ("port", asked.to_string()),
        ];
        if let Some(why) = crate::usage::over_budget() {
            tracing::warn!(user = %auth.grant.user, session = %conn.session_id,
                "refused remote port forward of {address}:{asked}: {why}");
            conn.audit_forward("port_forward", &fields, Some(&why));
            return None;
        }
        if !auth.grant.permit_port_forwarding {
            tracing::warn!(user = %auth.grant.user, session = %conn.session_id,
                "refused remote port forward of {address}:{asked}: the certificate does not permit port forwarding");
            conn.audit_forward("port_forward", &fields, Some(NO_PORT_FORWARDING));
            return None;
        }
        if auth.grant.roles.requires_moderator(&conn.inner.labels) {
            tracing::warn!(user = %auth.grant.user, session = %conn.session_id,
                "refused remote port forward of {address}:{asked}: {MODERATED_NO_FORWARDS}");
            conn.audit_forward("port_forward", &fields, Some(MODERATED_NO_FORWARDS));
            return None;
        }
        let root = auth.account.uid == 0;
        let mut port = asked;
        match self
            .remote_forwards
            .start(
                conn.handle.clone(),
                address,
                &mut port,
                root,
                &conn.session_id,
            )
            .await
        {
            Ok(bound) => {
                tracing::info!(user = %auth.grant.user, session = %conn.session_id,
                    "remote port forward: listening on {bound}");
                fields[2].1 = port.to_string();
                conn.audit_forward("port_forward", &fields, None);
                Some(port)
            }
            Err(e) => {
                tracing::info!(user = %auth.grant.user, session = %conn.session_id,
                    "refused remote port forward of {address}:{asked}: {e}");
                conn.audit_forward("port_forward", &fields, Some(&e.to_string()));
                None
            }
        }
    }
}

/// A session channel before and after its program starts.
struct SessionChannel {
    /// The channel's halves until its program takes them.
    io: Option<(ChannelReadHalf, ChannelWriteHalf<Msg>)>,
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
    running: Option<Running>,
    /// A moderated session waiting for its moderator.
    pending: Option<Pending>,
}

/// A moderated session's program until a moderator joins. Dropped while armed (the user
/// left first), it ends the shared session and records the session's end.
struct Pending {
    program: Program,
    shared: Arc<Shared>,
    ctx: LogCtx,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.shared.end();
        let ctx = &self.ctx;
        crate::audit::event("session.end")
            .session(&ctx.session_id)
            .user(&ctx.user)
            .login(&ctx.login)
            .field("kind", ctx.kind)
            .field("reason", "no moderator joined")
            .field("duration_ms", ctx.started.elapsed().as_millis())
            .emit();
    }
}

/// A started program, for signals and window changes.
struct Running {
    group: Arc<process::Group>,
    master: Option<Arc<PtyMaster>>,
}

impl SessionChannel {
    fn new(io: (ChannelReadHalf, ChannelWriteHalf<Msg>)) -> Self {
        Self {
            io: Some(io),
            pty: None,
            env: Vec::new(),
            running: None,
            pending: None,
        }
    }

    /// Remembers a terminal for the program to come.
    fn set_pty(&mut self, request: PtyRequest) -> bool {
        if self.running.is_some() {
            return false;
        }
        self.pty = Some(request);
        true
    }

    /// Remembers an (already filtered) variable for the program to come.
    fn set_env(&mut self, name: String, value: String) -> bool {
        if self.running.is_some() || self.env.len() >= MAX_ENV {
            return false;
        }
        self.env.push((name, value));
        true
    }

    /// Resizes the running program's terminal, or, before it starts, the one asked for.
    fn resize(&mut self, s: WindowSize) -> bool {
        match self.running.as_ref().and_then(|r| r.master.as_ref()) {
            Some(m) => m.resize(s.cols, s.rows, s.px_width, s.px_height).is_ok(),
            None => match self.pty.as_mut() {
                Some(p) => {
                    (p.cols, p.rows, p.px_width, p.px_height) =
                        (s.cols, s.rows, s.px_width, s.px_height);
                    true
                }
                None => false,
            },
        }
    }

    /// Passes a client's signal on to the running program.
    fn signal(&self, signal: &Sig) {
        let Some(num) = process::signal_number(&session::sig_name(signal)) else {
            return;
        };
        let Some(r) = &self.running else {
            return;
        };
        // Nothing goes to a group that has ended: its id may belong to someone else now.
        if r.group.is_gone() {
            return;
        }
        // With a terminal, what a key press can send (^C, ^\, ^Z) goes to its foreground
        // job, as the terminal would send it. Anything else goes to the session's own group
        // only: the agent signals as root, and the foreground job may be a program the user
        // could not signal (sudo's command), which SIGKILL or SIGSTOP must not reach.
        match r.master.as_ref().and_then(|m| m.foreground_group()) {
            Some(fg) if process::a_key_sends(num) => {
                process::signal_group(fg, num);
            }
            _ => {
                r.group.signal(num);
            }
        }
    }

    /// Starts `program` on this channel: its terminal if one was asked for, the process,
    /// the audit events, then the task that moves its bytes (`session::run`). False, with
    /// the channel left as it was, when the program cannot start.
    fn start(
        &mut self,
        conn: &Conn,
        id: ChannelId,
        program: Program,
        moderated: Option<Arc<Shared>>,
    ) -> bool {
        if self.running.is_some() {
            return false;
        }
        let Some((read, write)) = self.io.take() else {
            return false;
        };
        let mut ctx = LogCtx::new(&conn.auth.grant, &conn.session_id, program.kind());
        ctx.transfer = match &program {
            Program::Sftp(_) => true,
            Program::Command(c) => is_transfer(c),
            Program::LoginShell => false,
        };
        let Some((mut started, master)) = self.spawn_program(conn, &program) else {
            self.io = Some((read, write));
            return false;
        };
        tracing::info!(
            device = %conn.inner.device_id,
            user = %conn.auth.grant.user,
            login = %conn.auth.grant.login,
            session = %conn.session_id,
            kind = program.kind(),
            pty = master.is_some(),
            "session started"
        );
        self.running = Some(Running {
            group: started.group.clone(),
            master: master.clone(),
        });
        // A moderated session announced itself when it began to wait.
        if moderated.is_none() {
            session::audit_start(conn, &program, master.is_some());
        }
        let mut ctx = build_log_ctx(
            ctx,
            conn,
            &program,
            self.pty.as_ref().filter(|_| master.is_some()),
        );
        if let Some(m) = &master {
            // Interactive sessions can be joined (`tsh join`).
            let shared = moderated.or_else(|| {
                Shared::register(
                    &conn.inner.shared,
                    &conn.session_id,
                    &conn.auth.grant.user,
                    &conn.inner.device_id,
                    false,
                    (conn.handle.clone(), id),
                )
            });
            if let Some(s) = &shared {
                s.started(m.clone(), started.group.clone(), ctx.recorder.clone());
            }
            ctx.shared = shared;
        }
        let io = ProcessIo::take(&mut started, master);
        tokio::spawn(session::run(
            started,
            io,
            read,
            write,
            conn.handle.clone(),
            id,
            ctx,
        ));
        true
    }

    /// Opens the terminal (if asked for) and spawns the program as the login's user.
    fn spawn_program(
        &self,
        conn: &Conn,
        program: &Program,
    ) -> Option<(Started, Option<Arc<PtyMaster>>)> {
        let env = self.program_env(conn);
        let (master, slave) = match &self.pty {
            Some(req) => match pty::open_shared(req) {
                Ok((m, s)) => (Some(m), Some(s)),
                Err(e) => {
                    tracing::warn!(session = %conn.session_id, "cannot open a pty: {e}");
                    return None;
                }
            },
            None => (None, None),
        };
        if let Program::Command(c) = program {
            tracing::debug!(session = %conn.session_id, command = %c, "exec");
        }
        match process::spawn(Spawn {
            user: &conn.auth.account,
            switch_user: conn.auth.switch_user,
            program: program.clone(),
            env,
            pty_slave: slave,
        }) {
            Ok(s) => Some((s, master)),
            Err(e) => {
                tracing::warn!(session = %conn.session_id, login = %conn.auth.grant.login,
                    "cannot start the session's program: {e}");
                None
            }
        }
    }

    /// The program's extra environment: the client's (filtered) variables, the agent's own,
    /// and the terminal type.
    fn program_env(&self, conn: &Conn) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.push(("EDGEPORT_USER".into(), conn.auth.grant.user.clone()));
        env.push(("EDGEPORT_SESSION_ID".into(), conn.session_id.clone()));
        env.push(("EDGEPORT_DEVICE".into(), conn.inner.device_id.clone()));
        if let Some(req) = &self.pty {
            env.push(("TERM".into(), req.term.clone()));
        }
        env
    }
}

/// The log and audit context of a started program: the sftp tracker for the sftp
/// subsystem, the recorder for a session with a terminal (`pty`).
fn build_log_ctx(ctx: LogCtx, conn: &Conn, program: &Program, pty: Option<&PtyRequest>) -> LogCtx {
    let ctx = match program {
        Program::Sftp(_) => ctx.with_sftp(),
        _ => ctx,
    };
    match pty {
        Some(req) => ctx.with_recorder(&conn.inner.device_id, req),
        None => ctx,
    }
}

/// An scp or rsync server command (a file transfer, as the data budget counts one).
pub(crate) fn is_transfer(command: &str) -> bool {
    let c = command.trim_start();
    let first = c.split_whitespace().next().unwrap_or("");
    let prog = first.rsplit('/').next().unwrap_or(first);
    prog == "scp" || (prog == "rsync" && c.contains("--server"))
}
