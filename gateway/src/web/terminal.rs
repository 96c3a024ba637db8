//! The web console's terminal: a WebSocket from the browser, an SSH session from here to
//! the device. The WebSocket's first message carries the browser's signature over
//! `GET /api/terminal/DEVICE/LOGIN/NONCE` (a WebSocket cannot carry custom headers), where
//! NONCE is a single-use nonce the authority issued to the session just before
//! (`GET /api/terminal-nonce`) and takes when it certifies the terminal; the gateway
//! makes a fresh Ed25519 key, and the authority signs short-lived certificates for it only
//! after checking that proof of the live web session itself. The dial is tsh's own (grant,
//! locks, audit), and the agent records the session as it records any SSH session.
//!
//! Messages: browser to gateway, binary is keyboard input and text is
//! `{"resize":[cols,rows]}`; gateway to browser, binary is terminal output and text is
//! `{"ready":{...}}` or `{"closed":"why"}`.
//!
//! A logout through this gateway ends the session's open terminals ([`Term::end_session`]);
//! a logout through another gateway (or the session's expiry, or its user's removal) ends
//! them within [`ALIVE_EVERY`], when the authority answers that the session is over
//! ([`Term::watch_sessions`]); a lock ends them through the dial's own lock handling.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeport_proto::keys::KeyPair;
use edgeport_proto::rpc::{ErrorKind, Request, Response, WebProof};
use edgeport_proto::sshcert::check_host_cert;
use futures::{SinkExt, StreamExt};
use russh::client;
use russh::keys::ssh_key::{Algorithm, PublicKey};
use russh::keys::{Certificate, PublicKeyOrCertificate};
use russh::{ChannelMsg, Preferred};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::dial::Dialer;
use crate::grants::UserCert;

use super::AuthCall;

/// The path a terminal's WebSocket opens, and the prefix of what its browser signs.
pub const PATH: &str = "/api/terminal";
/// Largest WebSocket message either way (keyboard input and pastes are small).
const MAX_MESSAGE: usize = 64 * 1024;
/// How long the browser has to send its signed first message.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const SSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one write may wait for the browser, or the device, to take it: past this the
/// other side stopped reading, and the session ends rather than hold its connections.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// How often the authority is asked whether the sessions of open terminals still hold.
pub const ALIVE_EVERY: Duration = Duration::from_secs(5);

/// What a terminal task needs from the gateway.
pub struct Term {
    pub auth: AuthCall,
    pub dialer: Arc<Dialer>,
    pub shutdown: CancellationToken,
    /// The open terminals by the SHA-256 of their session's token, to end at logout.
    pub open: Mutex<HashMap<String, Vec<Ending>>>,
}

/// How an open terminal is ended from outside, and why.
#[derive(Clone, Default)]
pub struct Ending {
    token: CancellationToken,
    why: Arc<std::sync::OnceLock<String>>,
}

impl Ending {
    fn end(&self, why: &str) {
        let _ = self.why.set(why.to_string());
        self.token.cancel();
    }

    fn why(&self) -> String {
        self.why
            .get()
            .cloned()
            .unwrap_or_else(|| "session ended".to_string())
    }
}

impl Term {
    /// Ends every open terminal of the session whose token is `token` (its logout here).
    pub fn end_session(&self, token: &str) {
        let key = edgeport_proto::keys::sha256_hex(token.as_bytes());
        self.end_key(&key, "session ended: logged out");
    }

    /// Ends every open terminal of the session whose token's SHA-256 is `key`.
    fn end_key(&self, key: &str, why: &str) {
        let ended = self.open.lock().ok().and_then(|mut m| m.remove(key));
        for t in ended.into_iter().flatten() {
            t.end(why);
        }
    }

    /// Every [`ALIVE_EVERY`] until shutdown: asks the authority about each session with an
    /// open terminal here, and ends the terminals of one it says is over (logged out through
    /// another gateway, expired, its user removed). An authority that cannot be reached, or
    /// one too old to know the question, ends nothing; nor does a lock, which the dial's own
    /// lock handling cuts with its reason (`[edgeport] session cut: ...`).
    pub async fn watch_sessions(self: Arc<Self>) {
        let mut tick = tokio::time::interval(ALIVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let keys: Vec<String> = self
                .open
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for key in keys {
                let req = Request::WebSessionAlive {
                    token_sha256: key.clone(),
                };
                match (self.auth)(req).await {
                    Err(edgeport_net::rpc_client::RpcClientError::Remote(e))
                        if e.kind == ErrorKind::Denied =>
                    {
                        tracing::info!("web terminals ended: {}", e.message);
                        self.end_key(&key, &e.message);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!("web session check: {e}"),
                }
            }
        }
    }

    fn register(&self, token: &str) -> Ending {
        let key = edgeport_proto::keys::sha256_hex(token.as_bytes());
        let t = Ending::default();
        if let Ok(mut m) = self.open.lock() {
            m.entry(key).or_default().push(t.clone());
        }
        t
    }

    fn unregister(&self, token: &str, t: &Ending) {
        let key = edgeport_proto::keys::sha256_hex(token.as_bytes());
        if let Ok(mut m) = self.open.lock() {
            if let Some(v) = m.get_mut(&key) {
                v.retain(|x| x.token != t.token);
                if v.is_empty() {
                    m.remove(&key);
                }
            }
        }
    }
}

/// A terminal listed under its session until dropped.
struct Registered<'a> {
    term: &'a Term,
    token: String,
    ended: Ending,
}

impl<'a> Registered<'a> {
    fn new(term: &'a Term, token: &str) -> Self {
        Self {
            term,
            token: token.to_string(),
            ended: term.register(token),
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.term.unregister(&self.token, &self.ended);
    }
}

/// The browser's first message.
#[derive(serde::Deserialize)]
struct Hello {
    at: u64,
    sig: String,
    device: String,
    login: String,
    /// From `GET /api/terminal-nonce` (missing: the authority refuses the request).
    #[serde(default)]
    nonce: String,
    cols: u32,
    rows: u32,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

fn closed(why: &str) -> Message {
    text(serde_json::json!({ "closed": why }))
}

/// A device or login name fit for the signed path: one segment, printable, short.
fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != '?' && c != '#' && c != '%')
}

/// Serves one upgraded WebSocket until the shell ends, a lock cuts it or the gateway stops.
///
/// `admitted` is the connection's share of the console's unauthenticated budget: held until
/// the authority has verified the hello, as a TLS handshake holds its slot.
pub async fn serve<S>(
    term: Arc<Term>,
    io: S,
    token: Option<String>,
    addr: SocketAddr,
    admitted: super::Admitted,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
    let (mut tx, mut rx) = ws.split();
    let outcome = run(&term, &mut tx, &mut rx, token, addr, admitted).await;
    let why = match outcome {
        Ok(why) | Err(why) => why,
    };
    let _ = tx.send(closed(&why)).await;
    let _ = tx.close().await;
}

type Tx<S> = futures::stream::SplitSink<WebSocketStream<S>, Message>;
type Rx<S> = futures::stream::SplitStream<WebSocketStream<S>>;

/// The session; `Ok(why it ended)` or `Err(why it never began)`.
async fn run<S>(
    term: &Term,
    tx: &mut Tx<S>,
    rx: &mut Rx<S>,
    token: Option<String>,
    addr: SocketAddr,
    admitted: super::Admitted,
) -> Result<String, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(HELLO_TIMEOUT, rx.next())
        .await
        .map_err(|_| "no signed request in time".to_string())?;
    let hello: Hello = match first {
        Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str())
            .map_err(|_| "the first message must be the signed request".to_string())?,
        _ => return Err("the first message must be the signed request".into()),
    };
    let token = token.ok_or("no session: log in")?;
    if !segment_ok(&hello.device)
        || !segment_ok(&hello.login)
        || !(hello.nonce.is_empty() || segment_ok(&hello.nonce))
    {
        return Err("malformed device, login or nonce".into());
    }
    let signature = hex::decode(&hello.sig).map_err(|_| "malformed signature".to_string())?;
    let path = format!("{PATH}/{}/{}/{}", hello.device, hello.login, hello.nonce);
    let proof = WebProof {
        token: token.clone(),
        signed: edgeport_proto::web::signed_text(hello.at, "GET", &path),
        signature,
    };
    // A key of this one session, never stored; the authority decides whether to certify it.
    let key = KeyPair::generate().map_err(|e| format!("no key: {e}"))?;
    let req = Request::WebSessionCert {
        proof,
        ssh_public_key: key.public_openssh(),
    };
    let certs = match (term.auth)(req).await {
        Ok(Response::UserCerts(c)) => c,
        Ok(_) => return Err("unexpected answer from the authority".into()),
        Err(edgeport_net::rpc_client::RpcClientError::Remote(e)) => return Err(e.message),
        Err(e) => {
            tracing::warn!("web terminal: authority unavailable: {e}");
            return Err("the cluster's authority is unavailable".into());
        }
    };
    // The hello is proven: the connection leaves the unauthenticated budget, and only now
    // is it listed among its session's terminals (to end at logout).
    drop(admitted);
    let registered = Registered::new(term, &token);
    let ended = registered.ended.clone();
    let der = edgeport_proto::keys::first_cert_der(&certs.x509_cert_pem)
        .map_err(|e| format!("bad certificate from the authority: {e}"))?;
    let who = UserCert::new(certs.user.clone(), der);
    let dialled = crate::dial::dial_for_web(&term.dialer, &who, &hello.device, addr)
        .await
        .map_err(|e| e.message)?;
    let ssh_cert = Certificate::from_openssh(&certs.ssh_cert)
        .map_err(|e| format!("bad certificate from the authority: {e}"))?;
    let problem = Arc::new(Mutex::new(None));
    let verifier = HostCheck {
        host_cas: certs.cas.host_cas(),
        device: hello.device.clone(),
        problem: problem.clone(),
    };
    let connected = tokio::time::timeout(
        SSH_TIMEOUT,
        client::connect_stream(Arc::new(ssh_config()), dialled.stream, verifier),
    )
    .await
    .map_err(|_| "the SSH handshake with the device timed out".to_string())?;
    let mut handle = connected.map_err(|e| {
        problem
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .unwrap_or_else(|| format!("SSH connection to {} failed: {e}", hello.device))
    })?;
    let auth = tokio::time::timeout(
        SSH_TIMEOUT,
        handle.authenticate_openssh_cert(
            &hello.login,
            Arc::new(key.ssh_private().clone()),
            ssh_cert,
        ),
    )
    .await
    .map_err(|_| "SSH authentication timed out".to_string())?;
    if !auth.is_ok_and(|r| r.success()) {
        return Err(format!(
            "access to {} as {:?} denied",
            hello.device, hello.login
        ));
    }
    let channel = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("cannot open a session: {e}"))?;
    let (cols, rows) = (hello.cols.clamp(10, 500), hello.rows.clamp(2, 300));
    channel
        .request_pty(true, "xterm", cols, rows, 0, 0, &[])
        .await
        .map_err(|e| e.to_string())?;
    channel
        .request_shell(true)
        .await
        .map_err(|e| e.to_string())?;
    let (mut read, write) = channel.split();
    // Ready once the device said yes to both (what the shell prints meanwhile is kept).
    let mut early = Vec::new();
    let mut yes = 0;
    while yes < 2 {
        match tokio::time::timeout(SSH_TIMEOUT, read.wait()).await {
            Ok(Some(ChannelMsg::Success)) => yes += 1,
            Ok(Some(ChannelMsg::Data { data })) => early.push(data),
            Ok(Some(ChannelMsg::Failure)) => {
                return Err(format!("{} refused a terminal", hello.device))
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("{} closed the session", hello.device)),
            Err(_) => return Err(format!("{} did not start a shell in time", hello.device)),
        }
    }
    let _ = tx
        .send(text(serde_json::json!({ "ready": {
            "session_id": dialled.session_id, "device": dialled.device_id,
            "user": certs.user, "login": hello.login,
        }})))
        .await;
    for data in early {
        let _ = tx.send(Message::Binary(data.to_vec().into())).await;
    }
    tracing::info!(user = %certs.user, device = %dialled.device_id, session = %dialled.session_id, "web terminal opened");
    let cancel = dialled.registered.cancel.clone();
    let mut exit: Option<u32> = None;
    // What ends the session from outside: a lock, shutdown, logout or the session's end.
    // Also raced against each write below, so that a browser or a device that stops
    // reading cannot hold the session past any of them.
    let stop = || async {
        tokio::select! {
            _ = cancel.cancelled() => {
                end_reason(term, &certs.user, &dialled.session_id, &dialled.device_id, None)
            }
            _ = term.shutdown.cancelled() => "the gateway is shutting down".to_string(),
            _ = ended.token.cancelled() => ended.why(),
        }
    };
    let why = loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    tokio::select! {
                        r = tokio::time::timeout(WRITE_STALL, write.data_bytes(b)) => match r {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break "the device closed the session".to_string(),
                            Err(_) => break "the device stopped reading input".to_string(),
                        },
                        why = stop() => break why,
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if let Some([c, r]) = v.get("resize").and_then(|r| r.as_array()).map(|a| a.as_slice()) {
                        let c = c.as_u64().unwrap_or(80).clamp(10, 500) as u32;
                        let r = r.as_u64().unwrap_or(24).clamp(2, 300) as u32;
                        let _ = write.window_change(c, r, 0, 0).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    break "closed by the browser".to_string()
                }
                Some(Ok(_)) => {}
            },
            m = read.wait() => match m {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    let sent = tokio::time::timeout(
                        WRITE_STALL,
                        tx.send(Message::Binary(data.to_vec().into())),
                    );
                    tokio::select! {
                        r = sent => match r {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break "closed by the browser".to_string(),
                            Err(_) => break "the browser stopped reading output".to_string(),
                        },
                        why = stop() => break why,
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => exit = Some(exit_status),
                Some(ChannelMsg::Close) | None => {
                    break end_reason(term, &certs.user, &dialled.session_id, &dialled.device_id, exit)
                }
                Some(_) => {}
            },
            why = stop() => break why,
        }
    };
    tracing::info!(user = %certs.user, device = %dialled.device_id, session = %dialled.session_id, "web terminal ended: {why}");
    Ok(why)
}

/// Why a session ended: a lock the gateway cut it for, or one the agent acted on (the
/// gateway knows the same locks), else the shell's exit or a lost connection.
fn end_reason(
    term: &Term,
    user: &str,
    session_id: &str,
    device: &str,
    exit: Option<u32>,
) -> String {
    use edgeport_proto::rpc::LockTarget;
    if let Some(r) = term.dialer.sessions.why_ended(user, session_id) {
        return format!("session cut: {r}");
    }
    let locks = &term.dialer.reach.locks;
    for target in [
        LockTarget::User(user.to_string()),
        LockTarget::Device(device.to_string()),
    ] {
        if let Err(e) = locks.check_unlocked(&target) {
            return format!("session cut: {}", e.message);
        }
    }
    match exit {
        Some(s) => format!("the shell exited with status {s}"),
        None => "the connection to the device was lost".to_string(),
    }
}

fn ssh_config() -> client::Config {
    client::Config {
        preferred: Preferred {
            host_key_certificates: Cow::Borrowed(&[Algorithm::Ed25519]),
            key: Cow::Borrowed(&[Algorithm::Ed25519]),
            ..Preferred::default()
        },
        client_id: russh::SshId::Standard(Cow::Owned(format!(
            "SSH-2.0-edgeport-web_{}",
            edgeport_proto::VERSION
        ))),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    }
}

/// The device is trusted only through the host CA, as tsh trusts it.
struct HostCheck {
    host_cas: Vec<PublicKey>,
    device: String,
    problem: Arc<Mutex<Option<String>>>,
}

impl client::Handler for HostCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let now = edgeport_net::clock::now_secs();
        let verdict = match key.certificate() {
            None => Err("the device presented a bare host key, not a host certificate".into()),
            Some(cert) => edgeport_proto::sshcert::signer_of(cert, &self.host_cas)
                .ok_or(edgeport_proto::sshcert::CertRefusal::BadSignature)
                .and_then(|ca| check_host_cert(cert, ca, &self.device, now))
                .map_err(|e| format!("the device's host certificate was refused: {e}")),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(p) => {
                if let Ok(mut slot) = self.problem.lock() {
                    *slot = Some(p);
                }
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_clean_path_segment_is_signed() {
        assert!(segment_ok("van-1"));
        assert!(segment_ok("root"));
        for bad in ["", "a/b", "a?b", "a b", "a%2fb", "x#"] {
            assert!(!segment_ok(bad), "{bad:?}");
        }
        assert!(!segment_ok(&"a".repeat(129)));
    }
}
