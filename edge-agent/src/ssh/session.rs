//! Moving bytes between a session channel and its process, and ending the channel the way
//! OpenSSH clients expect: all output, then `exit-status` (or `exit-signal`), EOF, close.

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::sshcert::UserGrant;
use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};

use super::actor::Conn;
use super::process::{self, Program, Started};
use super::pty::{PtyMaster, PtyRequest};

/// How long a closed channel's processes get between SIGHUP and SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// Copy buffer: large enough that bulk transfers are not syscall-bound.
const BUF: usize = 256 * 1024;

/// The process side of a running session.
pub enum ProcessIo {
    Pipes {
        stdin: Option<ChildStdin>,
        stdout: Option<ChildStdout>,
        stderr: Option<ChildStderr>,
    },
    Pty(Arc<PtyMaster>),
}

impl ProcessIo {
    /// The process side of `started`: the terminal when it has one, else its pipes.
    pub fn take(started: &mut Started, master: Option<Arc<PtyMaster>>) -> Self {
        match master {
            Some(m) => ProcessIo::Pty(m),
            None => ProcessIo::Pipes {
                stdin: started.stdin.take(),
                stdout: started.stdout.take(),
                stderr: started.stderr.take(),
            },
        }
    }
}

/// Who and what, for the log lines and the audit events.
#[derive(Clone, Debug)]
pub struct LogCtx {
    pub user: String,
    pub login: String,
    pub session_id: String,
    pub kind: &'static str,
    /// Audit: when the program started, bytes each way, and the recording (PTY sessions).
    pub started: std::time::Instant,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
    pub recorder: Option<Arc<std::sync::Mutex<crate::audit::record::Recorder>>>,
    /// SFTP file operations (subsystem sessions).
    pub sftp: Option<Sftp>,
    /// A file transfer (the sftp subsystem, `scp`): its bytes count as `sftp` usage too.
    pub transfer: bool,
    /// The session as others join it (PTY sessions): its output goes to them too.
    pub shared: Option<Arc<super::shared::Shared>>,
}

pub type Sftp = Arc<std::sync::Mutex<crate::audit::sftp::SftpTracker>>;

fn tap(t: &Option<Sftp>, f: impl FnOnce(&mut crate::audit::sftp::SftpTracker)) {
    if let Some(t) = t {
        if let Ok(mut t) = t.lock() {
            f(&mut t);
        }
    }
}

impl LogCtx {
    /// The context of a program of `kind` starting now, without recording or sftp tracking.
    pub fn new(grant: &UserGrant, session_id: &str, kind: &'static str) -> Self {
        Self {
            user: grant.user.clone(),
            login: grant.login.clone(),
            session_id: session_id.to_string(),
            kind,
            started: std::time::Instant::now(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
            recorder: None,
            sftp: None,
            transfer: false,
            shared: None,
        }
    }

    /// Tracks the SFTP file operations of the session (the sftp subsystem).
    pub fn with_sftp(mut self) -> Self {
        self.sftp = Some(Arc::new(std::sync::Mutex::new(
            crate::audit::sftp::SftpTracker::new(&self.session_id, &self.user, &self.login),
        )));
        self
    }

    /// Records the session's terminal output, from the size and type `pty` asked for.
    pub fn with_recorder(mut self, device: &str, pty: &PtyRequest) -> Self {
        self.recorder = Some(Arc::new(std::sync::Mutex::new(
            crate::audit::record::Recorder::new(
                &self.session_id,
                &self.user,
                &self.login,
                device,
                pty.cols,
                pty.rows,
                &pty.term,
            ),
        )));
        self
    }

    pub(super) fn record(&self, data: &[u8]) {
        self.bytes_out
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(s) = &self.shared {
            s.output(data);
        }
        if let Some(r) = &self.recorder {
            if let Ok(mut r) = r.lock() {
                r.output(data);
            }
        }
    }
}

/// Runs a started session to its end. Returns when the channel is closed.
pub async fn run(
    mut started: Started,
    io: ProcessIo,
    read: ChannelReadHalf,
    write: ChannelWriteHalf<Msg>,
    handle: Handle,
    channel: ChannelId,
    ctx: LogCtx,
) {
    let group = started.group.clone();
    match io {
        ProcessIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let input = tokio::spawn(pipe_input(
                read,
                stdin,
                group.clone(),
                ctx.bytes_in.clone(),
                ctx.sftp.clone(),
            ));
            let out = copy_out(
                stdout,
                write.make_writer(),
                ctx.bytes_out.clone(),
                ctx.sftp.clone(),
            );
            let err = copy_out(
                stderr,
                write.make_writer_ext(Some(1)),
                ctx.bytes_out.clone(),
                None,
            );
            let (status, _, _) = tokio::join!(started.child.wait(), out, err);
            finish(&handle, channel, status, &ctx).await;
            // Reap what the program left behind now, not when the client gets round to
            // closing the channel (the group id must not outlive the group).
            group.terminate(HANGUP_GRACE).await;
            let _ = input.await;
        }
        ProcessIo::Pty(master) => {
            let input = tokio::spawn(pty_input(
                read,
                master.clone(),
                group.clone(),
                ctx.bytes_in.clone(),
            ));
            let mut out = write.make_writer();
            let mut buf = vec![0u8; BUF];
            let mut exited = None;
            // Copy until the child exits, then drain what the terminal still holds.
            loop {
                tokio::select! {
                    n = master.read(&mut buf) => match n {
                        Ok(n) if n > 0 => {
                            ctx.record(&buf[..n]);
                            if out.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    },
                    st = started.child.wait(), if exited.is_none() => {
                        exited = Some(st);
                        break;
                    }
                }
            }
            if exited.is_some() {
                drain_pty(&master, &mut out, &mut buf, &ctx).await;
            }
            let status = match exited {
                Some(st) => st,
                None => started.child.wait().await,
            };
            finish(&handle, channel, status, &ctx).await;
            if let Some(s) = &ctx.shared {
                s.end();
            }
            group.terminate(HANGUP_GRACE).await;
            let _ = input.await;
        }
    }
    // Whatever the program left behind goes with its channel.
    group.terminate(HANGUP_GRACE).await;
}

/// Reads what is left on the terminal after its session leader exited: until every slave
/// descriptor is closed, or the terminal stays quiet for a moment (a background job may
/// hold it open forever; it is hung up right after).
async fn drain_pty<W: AsyncWrite + Unpin>(
    master: &PtyMaster,
    out: &mut W,
    buf: &mut [u8],
    ctx: &LogCtx,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let quiet = Duration::from_millis(200);
        match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + quiet),
            master.read(buf),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 => {
                ctx.record(&buf[..n]);
                if out.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// The audit events of a program that started: `session.start`, then `exec` (the
/// command) or `sftp.start` (the server binary). Their end is in [`finish`].
pub fn audit_start(conn: &Conn, program: &Program, pty: bool) {
    let (sid, grant) = (&conn.session_id, &conn.auth.grant);
    let ev = start_event(sid, grant, program.kind(), pty).field("device", &conn.inner.device_id);
    ev.field("client_addr", &conn.client_addr).emit();
    match program {
        Program::Command(c) => exec_event(sid, grant, c).emit(),
        Program::Sftp(server) => crate::audit::event("sftp.start")
            .session(sid)
            .user(&grant.user)
            .login(&grant.login)
            .field("server", server.describe())
            .emit(),
        Program::LoginShell => {}
    }
}

/// `session.start` of a program of `kind` (here and in record mode, which adds its fields).
pub(super) fn start_event(
    sid: &str,
    grant: &UserGrant,
    kind: &str,
    pty: bool,
) -> crate::audit::Event {
    crate::audit::event("session.start")
        .session(sid)
        .user(&grant.user)
        .login(&grant.login)
        .field("user_id", &grant.roles.user_id)
        .field("kind", kind)
        .field("pty", pty)
        // The authority flags a session still open past this (authority/src/open_sessions.rs).
        .field("cert_expires", grant.valid_before)
}

/// `exec`: the command a session runs.
pub(super) fn exec_event(sid: &str, grant: &UserGrant, command: &str) -> crate::audit::Event {
    crate::audit::event("exec")
        .session(sid)
        .user(&grant.user)
        .login(&grant.login)
        .field("command", command)
}

/// The end of a program in the audit log: the rest of its recording and sftp tracking, its
/// bytes as `sftp` usage for a transfer, and `session.end` with the exit code or signal.
pub(super) fn audit_end(ctx: &LogCtx, code: Option<i32>, signal: Option<String>) {
    if let Some(r) = &ctx.recorder {
        if let Ok(mut r) = r.lock() {
            r.finish();
        }
    }
    tap(&ctx.sftp, |t| t.finish());
    if ctx.transfer {
        // In from the user reached the device; out left it.
        crate::usage::add(
            crate::usage::Counted::Sftp,
            ctx.bytes_out.load(Ordering::Relaxed),
            ctx.bytes_in.load(Ordering::Relaxed),
        );
    }
    let mut ev = crate::audit::event("session.end")
        .session(&ctx.session_id)
        .user(&ctx.user)
        .login(&ctx.login)
        .field("kind", ctx.kind)
        .field("bytes_in", ctx.bytes_in.load(Ordering::Relaxed))
        .field("bytes_out", ctx.bytes_out.load(Ordering::Relaxed))
        .field("duration_ms", ctx.started.elapsed().as_millis());
    if let Some(c) = code {
        ev = ev.field("exit_code", c);
    }
    if let Some(s) = signal {
        ev = ev.field("signal", s);
    }
    ev.emit();
}

/// Sends the exit status (or signal), EOF and close, in that order.
async fn finish(
    handle: &Handle,
    channel: ChannelId,
    status: std::io::Result<std::process::ExitStatus>,
    ctx: &LogCtx,
) {
    let (code, signal) = match &status {
        Ok(st) => (st.code(), st.signal()),
        Err(_) => (Some(255), None),
    };
    audit_end(ctx, code, signal.map(process::signal_name));
    match status {
        Ok(st) => {
            if let Some(code) = st.code() {
                tracing::info!(user = %ctx.user, login = %ctx.login, session = %ctx.session_id,
                    kind = ctx.kind, exit_status = code, "session ended");
                let _ = handle.exit_status_request(channel, code as u32).await;
            } else if let Some(sig) = st.signal() {
                tracing::info!(user = %ctx.user, login = %ctx.login, session = %ctx.session_id,
                    kind = ctx.kind, signal = sig, "session ended by signal");
                let _ = handle
                    .exit_signal_request(
                        channel,
                        to_sig(sig),
                        st.core_dumped(),
                        String::new(),
                        String::new(),
                    )
                    .await;
            }
        }
        Err(e) => {
            tracing::warn!(session = %ctx.session_id, "cannot wait for the session's process: {e}");
            let _ = handle.exit_status_request(channel, 255).await;
        }
    }
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

/// The SSH name of a signal the client sent (RFC 4254 6.10, without the "SIG").
pub fn sig_name(s: &Sig) -> String {
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

fn to_sig(sig: i32) -> Sig {
    match sig {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        other => Sig::Custom(process::signal_name(other)),
    }
}

/// Copies one output stream of the process to the channel until EOF.
async fn copy_out<R, W>(src: Option<R>, mut dst: W, count: Arc<AtomicU64>, sftp: Option<Sftp>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(mut src) = src else { return };
    let mut buf = vec![0u8; BUF];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                tap(&sftp, |t| t.server(&buf[..n]));
                if dst.write_all(&buf[..n]).await.is_err() {
                    // The client is gone; keep draining so the process is not blocked
                    // before it is hung up.
                    while matches!(src.read(&mut buf).await, Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    }
}

/// Client -> process stdin. EOF from the client closes stdin; the channel closing (or the
/// connection ending) hangs the process group up.
async fn pipe_input(
    mut read: ChannelReadHalf,
    mut stdin: Option<ChildStdin>,
    group: Arc<process::Group>,
    count: Arc<AtomicU64>,
    sftp: Option<Sftp>,
) {
    loop {
        match read.wait().await {
            Some(ChannelMsg::Data { data }) => {
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
                tap(&sftp, |t| t.client(&data));
                if let Some(w) = stdin.as_mut() {
                    if w.write_all(&data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            Some(ChannelMsg::Eof) => stdin = None,
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    drop(stdin);
    group.terminate(HANGUP_GRACE).await;
}

/// Client -> terminal. A pty cannot be half-closed, so EOF is ignored (as sshd does).
async fn pty_input(
    mut read: ChannelReadHalf,
    master: Arc<PtyMaster>,
    group: Arc<process::Group>,
    count: Arc<AtomicU64>,
) {
    loop {
        match read.wait().await {
            Some(ChannelMsg::Data { data }) => {
                count.fetch_add(data.len() as u64, Ordering::Relaxed);
                if master.write_all(&data).await.is_err() {
                    break;
                }
            }
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    group.terminate(HANGUP_GRACE).await;
}
