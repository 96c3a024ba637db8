//! tsh's own SSH client (russh), spoken straight onto the gateway's dial stream: no
//! ProxyCommand hop, AES-GCM first, large windows. The device is trusted only through the
//! host CA: it must present a host certificate signed by that CA naming the device that
//! was asked for, or tsh refuses it.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeport_net::clock::now_secs;
use edgeport_net::BoxedStream;
use edgeport_proto::sshcert::{check_host_cert, CertRefusal};
use russh::client::ChannelOpenHandle;
use russh::client::{self, DisconnectReason, Handle};
use russh::keys::ssh_key::{Algorithm, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::{cipher, Channel, ChannelMsg, ChannelOpenFailure, Preferred, Sig};
use tokio::io::AsyncWriteExt;

use super::forwarding::Inbound;
use super::profile::Creds;
use super::term;
use super::CliError;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// SSH keep-alives to the device: a device (or agent) that died without closing anything
/// is noticed after [`KEEPALIVE_MAX`] of them go unanswered, not at the tunnel's idle timeout.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_MAX: usize = 2;
const IO_BUF: usize = 256 * 1024;

/// What the client learned about why a connection failed, for one clear error line.
#[derive(Default)]
struct Notes {
    host_problem: Option<String>,
    disconnect: Option<String>,
    /// The device stopped answering keep-alives.
    silent: bool,
    /// The session ended with neither an exit status nor a word from the device.
    lost: bool,
}

pub struct Verifier {
    /// The trusted host CAs (two during a CA rotation).
    host_cas: Vec<PublicKey>,
    device: String,
    notes: Arc<Mutex<Notes>>,
    /// Where channels the device opens (`-R`, `-A`) go.
    inbound: Arc<Inbound>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // A host behind a device whose device vouched for a pinned key (signed, checked when
        // dialled): that key and nothing else.
        let pinned = super::gateway::pinned_key(&self.device);
        let problem = match (pinned, key.certificate()) {
            (Some(pin), _) => {
                let presented = match key {
                    PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data().clone(),
                    PublicKeyOrCertificate::Certificate(c) => c.public_key().clone(),
                };
                if &presented == pin.key_data() {
                    None
                } else {
                    let got = PublicKey::new(presented, "")
                        .fingerprint(russh::keys::HashAlg::Sha256);
                    Some(format!(
                        "host key mismatch: {} presented {got}, not the key pinned for it at enrolment ({}); refusing to connect",
                        self.device,
                        pin.fingerprint(russh::keys::HashAlg::Sha256)
                    ))
                }
            }
            (None, None) => Some(format!(
                "{} presented a bare host key instead of an Edgeport host certificate; refusing to connect",
                self.device
            )),
            (None, Some(cert)) => match edgeport_proto::sshcert::signer_of(cert, &self.host_cas)
                .ok_or(CertRefusal::BadSignature)
                .and_then(|ca| check_host_cert(cert, ca, &self.device, now_secs()))
            {
                Ok(()) => None,
                Err(CertRefusal::Principal(_, names)) => Some(format!(
                    "the device that answered for {} holds a host certificate for {names:?}, not {}: refusing to connect (possible impersonation)",
                    self.device, self.device
                )),
                Err(e) => Some(format!(
                    "the host certificate presented for {} was refused: {e} (key id {:?}); refusing to connect",
                    self.device,
                    cert.key_id()
                )),
            },
        };
        let ok = problem.is_none();
        if let (Some(p), Ok(mut n)) = (problem, self.notes.lock()) {
            n.host_problem = Some(p);
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if !self.inbound.has_remote(connected_port) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        self.inbound.remote_channel(
            channel,
            connected_port,
            format!("{originator_address}:{originator_port}"),
        );
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Only when asked for with -A: a device cannot reach the agent on its own.
        if self.inbound.agent.is_none() {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        self.inbound.agent_channel(channel);
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                if let Ok(mut n) = self.notes.lock() {
                    n.disconnect = Some(info.message);
                }
                Ok(())
            }
            DisconnectReason::Error(e) => {
                if matches!(e, russh::Error::KeepaliveTimeout) {
                    if let Ok(mut n) = self.notes.lock() {
                        n.silent = true;
                    }
                }
                Err(e)
            }
        }
    }
}

/// Cipher preference. `EDGEPORT_SSH_CIPHER=chacha20-poly1305@openssh.com` puts ChaCha20
/// first (ARM boards without AES instructions; the benchmark's second column).
fn ciphers() -> &'static [cipher::Name] {
    const AES_FIRST: &[cipher::Name] = &[
        cipher::AES_128_GCM,
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
    ];
    const CHACHA_FIRST: &[cipher::Name] = &[
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
        cipher::AES_256_GCM,
    ];
    match std::env::var("EDGEPORT_SSH_CIPHER") {
        Ok(c) if c == cipher::CHACHA20_POLY1305.as_ref() => CHACHA_FIRST,
        _ => AES_FIRST,
    }
}

/// russh client settings: AES-GCM first (DESIGN section 7), host certificates only. `pty`:
/// an interactive session, which gets a small download window (see below).
fn config(pty: bool) -> client::Config {
    client::Config {
        preferred: Preferred {
            cipher: Cow::Borrowed(ciphers()),
            host_key_certificates: Cow::Borrowed(&[Algorithm::Ed25519]),
            key: Cow::Borrowed(&[Algorithm::Ed25519]),
            ..Preferred::default()
        },
        // The agent knows tsh by this and gives its channels a 16 MiB window for uploads
        // (edge-agent/src/ssh/handler.rs, `adjust_window`).
        client_id: russh::SshId::Standard(Cow::Owned(format!(
            "{}_{}",
            edgeport_proto::TSH_SSH_ID_PREFIX,
            edgeport_proto::VERSION
        ))),
        // Downloads: the window tsh gives the agent. 16 MiB for commands, as the agent gives
        // tsh: on a path of three hops 2 MiB in flight is too little to keep them all busy.
        // An interactive session keeps OpenSSH's 2 MiB: the window is how much output can
        // queue between the device and the terminal, and on a slow cellular uplink 16 MiB
        // of it would make Ctrl-C take minutes to show.
        window_size: if pty {
            2 * 1024 * 1024
        } else {
            16 * 1024 * 1024
        },
        maximum_packet_size: 65535,
        channel_buffer_size: 256,
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    }
}

/// An authenticated SSH connection to a device.
pub struct Connection {
    pub handle: Handle<Verifier>,
    pub device: String,
    notes: Arc<Mutex<Notes>>,
}

impl Connection {
    /// Whether the session ended under the user without an exit status or a word from the
    /// device: the gateway may know why (a device lock cuts the stream silently).
    pub fn was_lost(&self) -> bool {
        self.notes.lock().map(|n| n.lost).unwrap_or(false)
    }
}

/// Runs the SSH handshake on `stream`, verifies the device and logs in as `login`.
/// `inbound` says where channels the device opens go (none without `-R` or `-A`).
pub async fn connect(
    stream: BoxedStream,
    creds: &Creds,
    device: &str,
    login: &str,
    pty: bool,
    inbound: Arc<Inbound>,
) -> Result<Connection, CliError> {
    let host_cas = creds.cas.host_cas();
    if host_cas.is_empty() {
        return Err(CliError::msg("the stored host CA is unreadable"));
    }
    let notes = Arc::new(Mutex::new(Notes::default()));
    let verifier = Verifier {
        host_cas,
        device: device.to_string(),
        notes: notes.clone(),
        inbound,
    };
    let note = |f: fn(&Notes) -> Option<String>| notes.lock().ok().and_then(|n| f(&n));
    let connected = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        client::connect_stream(Arc::new(config(pty)), stream, verifier),
    )
    .await
    .map_err(|_| CliError::msg(format!("the SSH handshake with {device} timed out")))?;
    let mut handle = match connected {
        Ok(h) => h,
        Err(e) => {
            if let Some(p) = note(|n| n.host_problem.clone()) {
                return Err(CliError::msg(p));
            }
            return Err(CliError::msg(format!(
                "SSH connection to {device} failed: {e}"
            )));
        }
    };
    let key = Arc::new(creds.key.ssh_private().clone());
    let auth = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handle.authenticate_openssh_cert(login, key, creds.ssh_cert.clone()),
    )
    .await
    .map_err(|_| CliError::msg(format!("SSH authentication with {device} timed out")))?;
    let refused = match auth {
        Ok(r) if r.success() => None,
        Ok(_) => Some(String::new()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(detail) = refused {
        // The agent says why in a disconnect message right after the failure.
        for _ in 0..50 {
            if note(|n| n.disconnect.clone()).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let why = note(|n| n.disconnect.clone())
            .map(|m| m.trim_start_matches("edgeport: ").to_string())
            .unwrap_or(if detail.is_empty() {
                "the certificate was not accepted".to_string()
            } else {
                detail
            });
        // A host behind a device (relay mode) runs its own sshd, which decides alone.
        let hint = if edgeport_proto::targets::split(device).is_some() {
            " (the target's sshd refused the login: does it trust the user CA and list this login's principal?)"
        } else {
            ""
        };
        return Err(CliError::msg(format!(
            "access to {device} as {login:?} denied: {why}{hint}"
        )));
    }
    Ok(Connection {
        handle,
        device: device.to_string(),
        notes,
    })
}

/// What to run in the session.
pub struct SessionSpec {
    /// None: a login shell.
    pub command: Option<String>,
    pub tty: bool,
    /// Send EOF at once instead of reading stdin (`-n`).
    pub no_stdin: bool,
    /// Ask for agent forwarding (`-A`).
    pub forward_agent: bool,
}

/// Runs one session channel with the local stdin/stdout/stderr attached and returns the
/// remote exit status (255 when the program died of a signal or no status came back).
pub async fn run_session(conn: &Connection, spec: SessionSpec) -> Result<i32, CliError> {
    let channel = conn
        .handle
        .channel_open_session()
        .await
        .map_err(|e| CliError::msg(format!("cannot open a session on {}: {e}", conn.device)))?;
    let fail = |e: russh::Error| CliError::msg(format!("session on {}: {e}", conn.device));
    // Replies to want-reply requests come back in order; remember what they were for.
    let mut pending: std::collections::VecDeque<&'static str> = Default::default();
    if spec.tty {
        let (cols, rows, px, py) = term::size(0)
            .or_else(|| term::size(1))
            .unwrap_or((80, 24, 0, 0));
        let term_name = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        channel
            .request_pty(true, &term_name, cols, rows, px, py, &[])
            .await
            .map_err(fail)?;
        pending.push_back("pty");
    }
    if spec.forward_agent {
        channel.agent_forward(true).await.map_err(fail)?;
        pending.push_back("agent");
    }
    for (k, v) in std::env::vars() {
        if k == "LANG" || k.starts_with("LC_") {
            let _ = channel.set_env(false, k, v).await;
        }
    }
    match &spec.command {
        Some(c) => channel.exec(true, c.as_bytes()).await.map_err(fail)?,
        None => channel.request_shell(true).await.map_err(fail)?,
    }
    pending.push_back("exec");

    let raw = if spec.tty && term::is_tty(0) {
        term::RawMode::enter(0).ok()
    } else {
        None
    };
    let (mut read, write) = channel.split();
    let write = Arc::new(write);

    // stdin: a plain thread (blocking reads of fd 0 never hold up the runtime, and process
    // exit ends it), feeding the channel through a small queue.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let no_stdin = spec.no_stdin;
    if !no_stdin {
        term::grow_pipe(0);
    }
    // Reads in whole SSH packets: russh cuts data at the device's maximum packet size, and a
    // 256 KiB read would leave a 4-byte packet behind every four full ones.
    let packet = write.writable_packet_size().await;
    let read_size = if packet == 0 || packet > IO_BUF {
        IO_BUF
    } else {
        IO_BUF / packet * packet
    };
    std::thread::spawn(move || {
        if no_stdin {
            return;
        }
        let mut buf = vec![0u8; read_size];
        loop {
            match term::read_fd(0, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut writer = write.make_writer();
    let input_write = write.clone();
    let input = async move {
        while let Some(chunk) = rx.recv().await {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = input_write.eof().await;
        std::future::pending::<()>().await;
    };

    let mut winch = if spec.tty {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut status: Option<i32> = None;
    let mut signal: Option<String> = None;
    let mut exec_failed = false;
    tokio::pin!(input);
    loop {
        tokio::select! {
            _ = &mut input => {}
            Some(()) = async {
                match winch.as_mut() {
                    Some(w) => w.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((c, r, px, py)) = term::size(0).or_else(|| term::size(1)) {
                    let _ = write.window_change(c, r, px, py).await;
                }
            }
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if term::write_fd(1, &data).is_err() {
                        break;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    let _ = term::write_fd(2, &data);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status as i32),
                Some(ChannelMsg::ExitSignal { signal_name, error_message, .. }) => {
                    signal = Some(format!("{}{}", sig_name(&signal_name),
                        if error_message.is_empty() { String::new() } else { format!(" ({error_message})") }));
                }
                Some(ChannelMsg::Success) => { pending.pop_front(); }
                Some(ChannelMsg::Failure) => match pending.pop_front() {
                    Some("pty") => {
                        let _ = term::write_fd(2, b"tsh: the device refused a terminal (the certificate may not permit one)\r\n");
                    }
                    Some("agent") => {
                        let _ = term::write_fd(2, format!("tsh: {} refused agent forwarding (the certificate does not permit it: ask for a role with --agent-forwarding)\r\n", conn.device).as_bytes());
                    }
                    _ => { exec_failed = true; break; }
                },
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            }
        }
    }
    drop(raw);
    if exec_failed {
        return Err(CliError::msg(format!(
            "{} refused to start the {}",
            conn.device,
            if spec.command.is_some() {
                "command"
            } else {
                "shell"
            }
        )));
    }
    if let Some(sig) = signal {
        eprintln!("tsh: remote command killed by signal {sig}");
        return Ok(255);
    }
    match status {
        Some(code) => Ok(code),
        None => {
            // No exit status: the connection ended under the session. The agent says why
            // when it ends it on purpose (a lock, for instance).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (why, silent) = conn
                .notes
                .lock()
                .map(|mut n| {
                    n.lost = n.disconnect.is_none();
                    (n.disconnect.clone(), n.silent)
                })
                .unwrap_or_default();
            Err(CliError::msg(match (why, silent) {
                (Some(m), _) => format!(
                    "{} closed the session: {}",
                    conn.device,
                    m.trim_start_matches("edgeport: ")
                ),
                (None, true) => format!(
                    "the connection to {} was lost: it did not answer for {} s (the device \
                     or its agent may be down, or its network gone)",
                    conn.device,
                    KEEPALIVE.as_secs() * (KEEPALIVE_MAX as u64 + 1)
                ),
                (None, false) => format!("the connection to {} was lost", conn.device),
            }))
        }
    }
}

fn sig_name(s: &Sig) -> String {
    match s {
        Sig::Custom(c) => c.clone(),
        other => format!("{other:?}"),
    }
}
