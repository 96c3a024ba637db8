//! The russh handler of one SSH connection: authentication by certificate only, then
//! session channels (exec, shell, sftp) and, where the certificate allows, port forwarding
//! both ways (`direct-tcpip`, `tcpip-forward`) and agent forwarding.
//!
//! Channel requests are answered inside the callbacks (russh remembers only the latest
//! want-reply flag of a channel, so a late answer could go to the wrong request); the
//! process I/O runs in a task per channel (see `session.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use russh::keys::ssh_key::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session, VerifiedPublicKey};
use russh::{
    Channel, ChannelId, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf, Disconnect, Pty, Sig,
};

use super::agent_forward::AgentSocket;
use super::auth::{self, Authorized, Policy, Refusal};
use super::process::{self, Program, Spawn};
use super::pty::{self, PtyMaster, PtyRequest};
use super::remote_forward::RemoteForwards;
use super::session::{self, LogCtx, ProcessIo};
use super::{forward, Inner};

/// Most channels one connection may hold open at once (OpenSSH's multiplexing rarely needs
/// more than a handful).
const MAX_CHANNELS: usize = 64;
/// Most `env` requests honoured per channel.
const MAX_ENV: usize = 64;
/// The channel window for tsh's own SSH client (see [`ConnHandler::adjust_window`]).
const TSH_WINDOW: u32 = 16 * 1024 * 1024;

/// A session channel before and after its program starts.
struct SessionChannel {
    io: Option<(ChannelReadHalf, ChannelWriteHalf<Msg>)>,
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
    running: Option<Running>,
}

struct Running {
    group: Arc<process::Group>,
    master: Option<Arc<PtyMaster>>,
}

pub struct ConnHandler {
    pub(super) inner: Arc<Inner>,
    pub(super) conn_id: u64,
    pub(super) stream_user: Option<String>,
    pub(super) session_id: String,
    pub(super) client_addr: String,
    pub(super) handle: Arc<OnceLock<Handle>>,
    pub(super) auth: Option<Authorized>,
    pub(super) authenticated: Arc<AtomicBool>,
    channels: HashMap<ChannelId, SessionChannel>,
    open_channels: Arc<AtomicUsize>,
    /// The channel window to grow to: the configured one, or [`TSH_WINDOW`] for tsh.
    window: Option<u32>,
    /// `ssh -R` listeners, closed with the connection.
    remote_forwards: RemoteForwards,
    /// The `ssh -A` socket, made on the first agent request, removed with the connection.
    agent_socket: Option<AgentSocket>,
}

impl ConnHandler {
    pub(super) fn new(
        inner: Arc<Inner>,
        conn_id: u64,
        stream_user: Option<String>,
        session_id: String,
        client_addr: String,
        handle: Arc<OnceLock<Handle>>,
        authenticated: Arc<AtomicBool>,
    ) -> Self {
        Self {
            inner,
            conn_id,
            stream_user,
            session_id,
            client_addr,
            handle,
            auth: None,
            authenticated,
            channels: HashMap::new(),
            open_channels: Arc::new(AtomicUsize::new(0)),
            window: None,
            remote_forwards: RemoteForwards::default(),
            agent_socket: None,
        }
    }

    /// One audit event for a forward the client asked for, allowed or refused.
    fn audit_forward(&self, kind: &'static str, fields: &[(&str, String)], refused: Option<&str>) {
        let Some(auth) = self.authorized() else {
            return;
        };
        let mut ev = crate::audit::event(kind)
            .session(&self.session_id)
            .user(&auth.grant.user)
            .login(&auth.grant.login);
        for (k, v) in fields {
            ev = ev.field(k, v);
        }
        ev = ev.field("success", refused.is_none());
        if let Some(why) = refused {
            ev = ev.field("reason", why);
        }
        ev.emit();
    }

    /// Refuses a login: one warning in the log with who, which key and why. When the
    /// certificate is this cluster's, the reason also goes to the client in a disconnect
    /// message (SSH has no other way to say why). OpenSSH usually stops at the failure
    /// before reading it; tsh waits for it.
    fn refuse(&self, login: &str, key_id: &str, serial: Option<u64>, why: &Refusal) {
        tracing::warn!(
            device = %self.inner.device_id,
            login = %login,
            key_id = %key_id,
            serial = ?serial,
            client = %self.client_addr,
            session = %self.session_id,
            reason = %why,
            "refused SSH login"
        );
        crate::audit::event("auth.refused")
            .session(&self.session_id)
            .user(self.stream_user.as_deref().unwrap_or(""))
            .login(login)
            .field("identity", key_id)
            .field("serial", serial.map(|s| s.to_string()).unwrap_or_default())
            .field("reason", why)
            .field("client_addr", &self.client_addr)
            .emit();
        if !why.ends_connection() {
            // Not one of ours (a plain key, another cluster's certificate): the client may
            // hold others, so let it try the next one.
            return;
        }
        let msg = format!(
            "edgeport: device {} refused the certificate of {key_id:?} for login {login:?}: {why}",
            self.inner.device_id
        );
        if let Some(h) = self.handle.get().cloned() {
            tokio::spawn(async move {
                let _ = h
                    .disconnect(Disconnect::NoMoreAuthMethodsAvailable, msg, String::new())
                    .await;
            });
        }
    }

    fn authorized(&self) -> Option<&Authorized> {
        self.auth.as_ref()
    }

    fn log_ctx(&self, kind: &'static str) -> LogCtx {
        let (user, login) = self
            .auth
            .as_ref()
            .map(|a| (a.grant.user.clone(), a.grant.login.clone()))
            .unwrap_or_default();
        LogCtx {
            user,
            login,
            session_id: self.session_id.clone(),
            kind,
            started: std::time::Instant::now(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
            recorder: None,
            sftp: None,
        }
    }

    /// Starts `program` on `channel` and answers the request.
    fn start(&mut self, channel: ChannelId, program: Program, session: &mut Session) {
        let ok = self.try_start(channel, program, session);
        let _ = if ok {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        };
    }

    fn try_start(&mut self, channel: ChannelId, program: Program, session: &mut Session) -> bool {
        let Some(auth) = self.auth.clone() else {
            return false;
        };
        let kind = match &program {
            Program::LoginShell => "shell",
            Program::Command(_) => "exec",
            Program::Binary(_) => "subsystem",
        };
        let mut ctx = self.log_ctx(kind);
        let Some(ch) = self.channels.get_mut(&channel) else {
            return false;
        };
        if ch.running.is_some() {
            return false;
        }
        let Some((read, write)) = ch.io.take() else {
            return false;
        };
        let mut env = ch.env.clone();
        env.push(("EDGEPORT_USER".into(), auth.grant.user.clone()));
        env.push(("EDGEPORT_SESSION_ID".into(), self.session_id.clone()));
        env.push(("EDGEPORT_DEVICE".into(), self.inner.device_id.clone()));
        let (master, slave) = match &ch.pty {
            Some(req) => {
                env.push(("TERM".into(), req.term.clone()));
                match pty::open(req).and_then(|(m, s)| Ok((PtyMaster::new(m)?, s))) {
                    Ok((m, s)) => (Some(Arc::new(m)), Some(s)),
                    Err(e) => {
                        tracing::warn!(session = %self.session_id, "cannot open a pty: {e}");
                        ch.io = Some((read, write));
                        return false;
                    }
                }
            }
            None => (None, None),
        };
        if let Program::Command(c) = &program {
            tracing::debug!(session = %self.session_id, command = %c, "exec");
        }
        let audit_detail = match &program {
            Program::Command(c) => c.clone(),
            Program::Binary(b) => b.display().to_string(),
            Program::LoginShell => String::new(),
        };
        let audit_pty = ch.pty.as_ref().map(|p| (p.cols, p.rows, p.term.clone()));
        let started = match process::spawn(Spawn {
            user: &auth.account,
            switch_user: auth.switch_user,
            program,
            env,
            pty_slave: slave,
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(session = %self.session_id, login = %auth.grant.login,
                    "cannot start the session's program: {e}");
                ch.io = Some((read, write));
                return false;
            }
        };
        tracing::info!(
            device = %self.inner.device_id,
            user = %auth.grant.user,
            login = %auth.grant.login,
            session = %self.session_id,
            kind,
            pty = master.is_some(),
            "session started"
        );
        ch.running = Some(Running {
            group: started.group.clone(),
            master: master.clone(),
        });
        let dev = &self.inner.device_id;
        crate::audit::event("session.start")
            .session(&self.session_id)
            .user(&auth.grant.user)
            .login(&auth.grant.login)
            .field("user_id", &auth.grant.roles.user_id)
            .field("kind", kind)
            .field("pty", master.is_some())
            .field("device", dev)
            .field("client_addr", &self.client_addr)
            .emit();
        match kind {
            "exec" => crate::audit::event("exec")
                .session(&self.session_id)
                .user(&auth.grant.user)
                .login(&auth.grant.login)
                .field("command", &audit_detail)
                .emit(),
            "subsystem" => {
                crate::audit::event("sftp.start")
                    .session(&self.session_id)
                    .user(&auth.grant.user)
                    .login(&auth.grant.login)
                    .field("server", &audit_detail)
                    .emit();
                ctx.sftp = Some(Arc::new(std::sync::Mutex::new(
                    crate::audit::sftp::SftpTracker::new(
                        &self.session_id,
                        &auth.grant.user,
                        &auth.grant.login,
                    ),
                )));
            }
            _ => {}
        }
        if let (Some((cols, rows, term)), true) = (audit_pty, master.is_some()) {
            ctx.recorder = Some(Arc::new(std::sync::Mutex::new(
                crate::audit::record::Recorder::new(
                    &self.session_id,
                    &auth.grant.user,
                    &auth.grant.login,
                    dev,
                    cols,
                    rows,
                    &term,
                ),
            )));
        }
        let mut started = started;
        let io = match master {
            Some(m) => ProcessIo::Pty(m),
            None => ProcessIo::Pipes {
                stdin: started.stdin.take(),
                stdout: started.stdout.take(),
                stderr: started.stderr.take(),
            },
        };
        let handle = session.handle();
        tokio::spawn(session::run(started, io, read, write, handle, channel, ctx));
        true
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(publickey_only())
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(publickey_only())
    }

    async fn auth_publickey(
        &mut self,
        login: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fp = key
            .public_key
            .fingerprint(russh::keys::HashAlg::Sha256)
            .to_string();
        self.refuse(login, &fp, None, &Refusal::PlainKey);
        Ok(publickey_only())
    }

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let locked = self.inner.locked_snapshot();
        let policy = Policy {
            user_ca: &self.inner.user_ca,
            labels: &self.inner.labels,
            locked: &locked,
            accounts: &self.inner.accounts,
            stream_user: self.stream_user.as_deref(),
        };
        let now = edgeport_net::clock::now_secs();
        match auth::authorize(&policy, login, cert, now) {
            Ok(a) => {
                tracing::info!(
                    device = %self.inner.device_id,
                    user = %a.grant.user,
                    login = %login,
                    serial = a.grant.serial,
                    client = %self.client_addr,
                    session = %self.session_id,
                    "accepted SSH login"
                );
                self.inner
                    .register(self.conn_id, &a.grant.user, self.handle.clone());
                self.auth = Some(a);
                Ok(Auth::Accept)
            }
            Err(why) => {
                self.refuse(login, cert.key_id(), Some(cert.serial()), &why);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::SeqCst);
        self.window = window_for(session.remote_sshid());
        // A lock may have arrived between the check and now.
        if let Some(a) = &self.auth {
            if self.inner.is_locked(&a.grant.user) {
                return Err(russh::Error::Disconnect);
            }
        }
        Ok(())
    }

    /// The window each channel is topped up to. OpenSSH clients keep the configured 2 MiB
    /// (a bigger one makes them queue that much in their own output buffer behind a
    /// ProxyCommand, at a high CPU cost: see `russh_config`). tsh's russh client has no such
    /// buffer, and on a path of three hops (tsh, gateway, agent) 2 MiB in flight is too
    /// little to keep all of them busy: with 16 MiB a 1 GiB upload idled the CPUs a third
    /// less and took about 10% less time (docs/benchmarks.md). The cost: russh acknowledges
    /// data as it decodes it (its channel buffer of `channel_buffer_size` packets then
    /// blocks its loop), so behind a slow consumer up to the window more can wait in the
    /// tunnel's receive buffers (QUIC stream window, yamux), 16 MiB instead of 2 per upload.
    /// russh keeps one target per connection, and raises it only after its first top-up.
    fn adjust_window(&mut self, _channel: ChannelId, current: u32) -> u32 {
        self.window.map_or(current, |w| w.max(current))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.authorized().is_none() || self.channels.len() >= MAX_CHANNELS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let id = channel.id();
        self.channels.insert(
            id,
            SessionChannel {
                io: Some(channel.split()),
                pty: None,
                env: Vec::new(),
                running: None,
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(auth) = self.authorized() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let fields = [
            ("direction", "local".to_string()),
            ("host", host_to_connect.to_string()),
            ("port", port_to_connect.to_string()),
        ];
        if !auth.grant.permit_port_forwarding {
            tracing::warn!(
                user = %auth.grant.user,
                session = %self.session_id,
                "refused port forward to {host_to_connect}:{port_to_connect}: the certificate does not permit port forwarding"
            );
            self.audit_forward("port_forward", &fields, Some(NO_PORT_FORWARDING));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let count = self.open_channels.clone();
        if count.load(Ordering::Relaxed) >= MAX_CHANNELS * 4 {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        tracing::info!(
            user = %auth.grant.user,
            session = %self.session_id,
            "port forward to {host_to_connect}:{port_to_connect}"
        );
        self.audit_forward("port_forward", &fields, None);
        let (host, sid) = (host_to_connect.to_string(), self.session_id.clone());
        count.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            forward::direct_tcpip(channel, reply, host, port_to_connect, sid).await;
            count.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The channel's task sees the close on its own and hangs the program up.
        self.channels.remove(&channel);
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
        let permit = self.authorized().is_some_and(|a| a.grant.permit_pty);
        let ok = match self.channels.get_mut(&channel) {
            Some(ch) if permit && ch.running.is_none() && process::exec_safe(term) => {
                ch.pty = Some(PtyRequest {
                    term: term.to_string(),
                    cols: col_width,
                    rows: row_height,
                    px_width: pix_width,
                    px_height: pix_height,
                    modes: modes.to_vec(),
                });
                true
            }
            _ => false,
        };
        if !permit {
            if let Some(a) = self.authorized() {
                tracing::warn!(user = %a.grant.user, session = %self.session_id,
                    "refused a pty: the certificate does not permit it");
            }
        }
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = auth::env_allowed(variable_name)
            && process::exec_safe(variable_value)
            && match self.channels.get_mut(&channel) {
                Some(ch) if ch.running.is_none() && ch.env.len() < MAX_ENV => {
                    ch.env
                        .push((variable_name.to_string(), variable_value.to_string()));
                    true
                }
                _ => false,
            };
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Program::LoginShell, session);
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match std::str::from_utf8(data) {
            Ok(cmd) if process::exec_safe(cmd) => {
                self.start(channel, Program::Command(cmd.to_string()), session)
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, &self.inner.sftp_server) {
            ("sftp", Some(path)) => self.start(channel, Program::Binary(path.clone()), session),
            ("sftp", None) => {
                tracing::warn!(session = %self.session_id,
                    "refused sftp: no sftp-server binary on this device (install OpenSSH's sftp-server)");
                session.channel_failure(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = match self.channels.get_mut(&channel) {
            Some(ch) => match ch.running.as_ref().and_then(|r| r.master.as_ref()) {
                Some(m) => m
                    .resize(col_width, row_height, pix_width, pix_height)
                    .is_ok(),
                None => match ch.pty.as_mut() {
                    // Before the program starts: remember the size for the pty.
                    Some(p) => {
                        (p.cols, p.rows, p.px_width, p.px_height) =
                            (col_width, row_height, pix_width, pix_height);
                        true
                    }
                    None => false,
                },
            },
            None => false,
        };
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let name = sig_name(&signal);
        let Some(num) = process::signal_number(&name) else {
            return Ok(());
        };
        if let Some(r) = self.channels.get(&channel).and_then(|c| c.running.as_ref()) {
            // Nothing goes to a group that has ended: its id may belong to someone else now.
            if r.group.is_gone() {
                return Ok(());
            }
            // With a terminal, the signal goes to its foreground job, like a key press would.
            match r.master.as_ref().and_then(|m| m.foreground_group()) {
                Some(fg) => {
                    process::signal_group(fg, num);
                }
                None => {
                    r.group.signal(num);
                }
            }
        }
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(auth) = self.auth.clone() else {
            return Ok(false);
        };
        if !auth.grant.permit_agent_forwarding {
            tracing::warn!(user = %auth.grant.user, session = %self.session_id,
                "refused agent forwarding: the certificate does not permit it");
            self.audit_forward("agent_forward", &[], Some(NO_AGENT_FORWARDING));
            return Ok(false);
        }
        if self.agent_socket.is_none() {
            match AgentSocket::create(
                session.handle(),
                &auth.account,
                auth.switch_user,
                &self.session_id,
            ) {
                Ok(s) => self.agent_socket = Some(s),
                Err(e) => {
                    tracing::warn!(session = %self.session_id, "agent forwarding failed: {e}");
                    self.audit_forward("agent_forward", &[], Some(&e.to_string()));
                    return Ok(false);
                }
            }
        }
        let (Some(sock), Some(ch)) = (&self.agent_socket, self.channels.get_mut(&channel)) else {
            return Ok(false);
        };
        ch.env
            .push(("SSH_AUTH_SOCK".into(), sock.path().display().to_string()));
        tracing::info!(user = %auth.grant.user, session = %self.session_id, "agent forwarding");
        self.audit_forward("agent_forward", &[], None);
        Ok(true)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(auth) = self.auth.clone() else {
            return Ok(false);
        };
        let asked = *port;
        let mut fields = vec![
            ("direction", "remote".to_string()),
            ("host", address.to_string()),
            ("port", asked.to_string()),
        ];
        if !auth.grant.permit_port_forwarding {
            tracing::warn!(user = %auth.grant.user, session = %self.session_id,
                "refused remote port forward of {address}:{asked}: the certificate does not permit port forwarding");
            self.audit_forward("port_forward", &fields, Some(NO_PORT_FORWARDING));
            return Ok(false);
        }
        let root = auth.account.uid == 0;
        match self
            .remote_forwards
            .start(session.handle(), address, port, root, &self.session_id)
            .await
        {
            Ok(bound) => {
                tracing::info!(user = %auth.grant.user, session = %self.session_id,
                    "remote port forward: listening on {bound}");
                fields[2].1 = port.to_string();
                self.audit_forward("port_forward", &fields, None);
                Ok(true)
            }
            Err(e) => {
                tracing::info!(user = %auth.grant.user, session = %self.session_id,
                    "refused remote port forward of {address}:{asked}: {e}");
                self.audit_forward("port_forward", &fields, Some(&e.to_string()));
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.remote_forwards.cancel(address, port))
    }
}

/// The audit reason for a forward the certificate does not allow.
const NO_PORT_FORWARDING: &str = "the certificate does not permit port forwarding";
const NO_AGENT_FORWARDING: &str = "the certificate does not permit agent forwarding";

/// The channel window for a client by its SSH version line: [`TSH_WINDOW`] for tsh, the
/// configured one (None) for everyone else.
fn window_for(ssh_id: &[u8]) -> Option<u32> {
    ssh_id
        .starts_with(edgeport_proto::TSH_SSH_ID_PREFIX.as_bytes())
        .then_some(TSH_WINDOW)
}

fn publickey_only() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(russh::MethodSet::from(&[russh::MethodKind::PublicKey][..])),
        partial_success: false,
    }
}

fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(c) => c.clone(),
    }
}

impl Drop for ConnHandler {
    fn drop(&mut self) {
        self.inner.unregister(self.conn_id);
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn only_tsh_gets_the_big_window() {
        let tsh = format!(
            "{}_{}",
            edgeport_proto::TSH_SSH_ID_PREFIX,
            edgeport_proto::VERSION
        );
        assert_eq!(window_for(tsh.as_bytes()), Some(TSH_WINDOW));
        assert_eq!(window_for(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10"), None);
        assert_eq!(window_for(b"SSH-2.0-russh_0.65.1"), None);
        assert_eq!(window_for(b"SSH-2.0-Edgeport_0.1.0"), None);
        assert_eq!(window_for(b""), None);
    }
}
