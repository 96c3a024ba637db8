//! The russh handler of one SSH connection: authentication by certificate only, and the
//! lock check, here; everything after (session channels, forwards, agent forwarding) is a
//! [`Request`] to the connection's session actor (`actor.rs`), started once the login is
//! accepted. Callbacks that answer the client (channel requests, global requests) await the
//! actor's verdict and answer inside the callback: russh remembers only the latest
//! want-reply flag of a channel, so a late answer could go to the wrong request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use russh::keys::ssh_key::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, Pty, Sig};

use super::actor::{ActorHandle, Conn, Request, WindowSize};
use super::auth::{self, Authorized, Policy, Refusal};
use super::pty::PtyRequest;
use super::Inner;

/// The channel window for tsh's own SSH client (see [`ConnHandler::adjust_window`]).
const TSH_WINDOW: u32 = 16 * 1024 * 1024;

pub struct ConnHandler {
    pub(super) inner: Arc<Inner>,
    pub(super) conn_id: u64,
    pub(super) stream_user: Option<String>,
    pub(super) session_id: String,
    pub(super) client_addr: String,
    pub(super) handle: Arc<OnceLock<Handle>>,
    /// The accepted login, until the actor takes it over in `auth_succeeded`.
    pub(super) auth: Option<Authorized>,
    pub(super) authenticated: Arc<AtomicBool>,
    /// The session actor, once the login is accepted.
    pub(super) actor: Option<ActorHandle>,
    /// Record mode (issue 22): the host behind the device this connection goes to. The
    /// login is checked against its labels, and a relay to it serves the channels.
    #[cfg(feature = "record-targets")]
    pub(super) target: Option<super::record::TargetConn>,
    /// The channel window to grow to: the configured one, or [`TSH_WINDOW`] for tsh.
    window: Option<u32>,
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
            actor: None,
            window: None,
            #[cfg(feature = "record-targets")]
            target: None,
        }
    }

    /// What the client talks to: `device ID`, or `DEVICE/TARGET` in record mode.
    pub(super) fn name(&self) -> String {
        #[cfg(feature = "record-targets")]
        if let Some(t) = &self.target {
            return t.name().to_string();
        }
        format!("device {}", self.inner.device_id)
    }

    /// The labels the roles are matched against: the device's, plus a target's other keys.
    fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        #[cfg(feature = "record-targets")]
        if let Some(t) = &self.target {
            return &t.labels;
        }
        &self.inner.labels
    }

    /// Refuses a login: one warning in the log with who, which key and why, and an audit
    /// event (`auth.refused`, or `target.refused` in record mode). A `disconnect` message
    /// (the certificate is this cluster's, or the target failed) ends the connection and
    /// tells the client why in it (SSH has no other way to say why). OpenSSH usually
    /// stops at the failure before reading it; tsh waits for it.
    pub(super) fn refuse(
        &self,
        login: &str,
        key_id: &str,
        serial: Option<u64>,
        why: &str,
        disconnect: Option<String>,
    ) {
        let name = self.name();
        tracing::warn!(%name, %login, %key_id, ?serial, client = %self.client_addr,
            session = %self.session_id, reason = %why, "refused SSH login");
        self.refused_event(why)
            .session(&self.session_id)
            .user(self.stream_user.as_deref().unwrap_or(""))
            .login(login)
            .field("identity", key_id)
            .field("serial", serial.map(|s| s.to_string()).unwrap_or_default())
            .field("reason", why)
            .field("client_addr", &self.client_addr)
            .emit();
        let Some(msg) = disconnect else {
            // Not one of ours (a plain key, another cluster's certificate): the client may
            // hold others, so let it try the next one.
            return;
        };
        let msg = format!("edgeport: {msg}");
        if let Some(h) = self.handle.get().cloned() {
            tokio::spawn(async move {
                let _ = h
                    .disconnect(Disconnect::NoMoreAuthMethodsAvailable, msg, String::new())
                    .await;
            });
        }
    }

    /// `auth.refused`, or `target.refused` in record mode (with the target and the error).
    fn refused_event(&self, _why: &str) -> crate::audit::Event {
        #[cfg(feature = "record-targets")]
        if let Some(t) = &self.target {
            return crate::audit::event("target.refused")
                .field("target", t.target_name())
                .field("mode", "record")
                .field("error", _why);
        }
        crate::audit::event("auth.refused")
    }

    /// The reason a certificate was refused, as the refusal says it.
    pub(super) fn cert_refused(&self, login: &str, cert: &Certificate, why: &Refusal) {
        let text = why.ends_connection().then(|| {
            format!(
                "{} refused the certificate of {:?} for login {login:?}: {why}",
                self.name(),
                cert.key_id()
            )
        });
        self.refuse(
            login,
            cert.key_id(),
            Some(cert.serial()),
            &why.to_string(),
            text,
        );
    }

    /// Asks the actor and waits for its answer; `default` before authentication.
    async fn ask<T>(
        &self,
        default: T,
        req: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Request,
    ) -> T {
        match &self.actor {
            Some(a) => a.ask(default, req).await,
            None => default,
        }
    }

    /// Asks the actor about a channel request and answers the client.
    async fn answer(
        &self,
        channel: ChannelId,
        session: &mut Session,
        req: impl FnOnce(tokio::sync::oneshot::Sender<bool>) -> Request,
    ) -> Result<(), russh::Error> {
        if self.ask(false, req).await {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
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
        self.refuse(login, &fp, None, &Refusal::PlainKey.to_string(), None);
        Ok(publickey_only())
    }

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let locked = self.inner.locked_snapshot();
        let policy = Policy {
            user_cas: &self.inner.user_cas,
            labels: self.labels(),
            device_id: &self.inner.device_id,
            locked: &locked,
            accounts: &self.inner.accounts,
            stream_user: self.stream_user.as_deref(),
        };
        let checked = auth::check_cert(&policy, login, cert, edgeport_net::clock::now_secs());
        #[cfg(feature = "record-targets")]
        if self.target.is_some() {
            return Ok(super::record::authenticate(self, login, cert, checked).await);
        }
        match checked.and_then(|grant| auth::account(&policy, login, grant)) {
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
                self.cert_refused(login, cert, &why);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::SeqCst);
        self.window = window_for(session.remote_sshid());
        if let Some(auth) = self.auth.take() {
            // A lock may have arrived between the check and now.
            if self.inner.is_locked(&auth.grant.user) {
                return Err(russh::Error::Disconnect);
            }
            self.actor = Some(ActorHandle::spawn(Conn {
                inner: self.inner.clone(),
                auth,
                session_id: self.session_id.clone(),
                client_addr: self.client_addr.clone(),
                handle: session.handle(),
            }));
        }
        #[cfg(feature = "record-targets")]
        if let Some(t) = &mut self.target {
            if t.user().is_some_and(|u| self.inner.is_locked(u)) {
                return Err(russh::Error::Disconnect);
            }
            self.actor = t.start(&self.session_id, &self.client_addr, session.handle());
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
        match &self.actor {
            Some(a) => a.tell(Request::OpenSession { channel, reply }).await,
            None => reply.reject(ChannelOpenFailure::ResourceShortage).await,
        }
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
        match &self.actor {
            Some(a) => {
                a.tell(Request::OpenDirectTcpip {
                    channel,
                    host: host_to_connect.to_string(),
                    port: port_to_connect,
                    reply,
                })
                .await
            }
            None => {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(a) = &self.actor {
            a.tell(Request::Close { channel }).await;
        }
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
        let request = PtyRequest {
            term: term.to_string(),
            cols: col_width,
            rows: row_height,
            px_width: pix_width,
            px_height: pix_height,
            modes: modes.to_vec(),
        };
        self.answer(channel, session, |done| Request::Pty {
            channel,
            request,
            done,
        })
        .await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (name, value) = (variable_name.to_string(), variable_value.to_string());
        self.answer(channel, session, |done| Request::Env {
            channel,
            name,
            value,
            done,
        })
        .await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.answer(channel, session, |done| Request::Shell { channel, done })
            .await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = data.to_vec();
        self.answer(channel, session, |done| Request::Exec {
            channel,
            command,
            done,
        })
        .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let name = name.to_string();
        self.answer(channel, session, |done| Request::Subsystem {
            channel,
            name,
            done,
        })
        .await
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
        let size = WindowSize {
            cols: col_width,
            rows: row_height,
            px_width: pix_width,
            px_height: pix_height,
        };
        self.answer(channel, session, |done| Request::WindowChange {
            channel,
            size,
            done,
        })
        .await
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(a) = &self.actor {
            a.tell(Request::Signal { channel, signal }).await;
        }
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self
            .ask(false, |done| Request::Agent { channel, done })
            .await)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (address, asked) = (address.to_string(), *port);
        let bound = self
            .ask(None, |done| Request::TcpipForward {
                address,
                port: asked,
                done,
            })
            .await;
        if let Some(p) = bound {
            *port = p;
        }
        Ok(bound.is_some())
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let address = address.to_string();
        Ok(self
            .ask(false, |done| Request::CancelTcpipForward {
                address,
                port,
                done,
            })
            .await)
    }
}

/// The channel window for a client by its SSH version line: [`TSH_WINDOW`] for tsh, the
/// configured one (None) for everyone else.
fn window_for(ssh_id: &[u8]) -> Option<u32> {
    ssh_id
        .starts_with(edgeport_proto::TSH_SSH_ID_PREFIX.as_bytes())
        .then_some(TSH_WINDOW)
}

pub(super) fn publickey_only() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(russh::MethodSet::from(&[russh::MethodKind::PublicKey][..])),
        partial_success: false,
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
