//! Running a session's program as the requested local user, in its own session and process
//! group, so the whole group can be signalled and cleaned up when the channel closes.
#![allow(unsafe_code)] // fork-time syscalls (setsid, setgroups, setuid, ...) and kill(2)

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use super::passwd::LocalUser;

/// The program a session runs.
#[derive(Clone, Debug)]
pub enum Program {
    /// The user's login shell, interactive (`-bash`).
    LoginShell,
    /// `SHELL -c COMMAND`, as sshd does for `exec`.
    Command(String),
    /// The SFTP server (the `sftp` subsystem).
    Sftp(SftpServer),
}

/// Which SFTP server the `sftp` subsystem runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SftpServer {
    /// The system's own `sftp-server` at this path.
    System(PathBuf),
    /// The agent's built-in server (cargo feature `sftp`): this binary run again as
    /// `edge-agent sftp-server`, like any session program (as the login's user).
    Builtin(PathBuf),
}

impl SftpServer {
    /// What the audit's `sftp.start` event names as the server.
    pub fn describe(&self) -> String {
        match self {
            SftpServer::System(p) => p.display().to_string(),
            SftpServer::Builtin(_) => "builtin".into(),
        }
    }
}

impl Program {
    /// The session kind in logs and audit events: `shell`, `exec` or `subsystem`.
    pub fn kind(&self) -> &'static str {
        match self {
            Program::LoginShell => "shell",
            Program::Command(_) => "exec",
            Program::Sftp(_) => "subsystem",
        }
    }
}

/// Everything needed to start a session's process.
pub struct Spawn<'a> {
    pub user: &'a LocalUser,
    /// Whether to switch to `user` (only possible, and only needed, when running as root).
    pub switch_user: bool,
    pub program: Program,
    /// Extra environment from the client and the agent (already filtered).
    pub env: Vec<(String, String)>,
    /// The pty slave to use as stdin/stdout/stderr and controlling terminal.
    pub pty_slave: Option<OwnedFd>,
}

/// A started process and the ends of its standard streams (pipes, when there is no pty).
pub struct Started {
    pub child: Child,
    /// The process group (its id is the pid, as the child calls setsid), for signals and
    /// clean-up.
    pub group: std::sync::Arc<Group>,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// The default PATH for a login, like OpenSSH's.
fn default_path(uid: u32) -> &'static str {
    if uid == 0 {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
    }
}

fn base_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into())
}

/// Starts the program. The child gets a clean environment (HOME, USER, LOGNAME, SHELL, PATH
/// plus `spec.env`), the user's home as working directory (or `/` if it does not exist),
/// a new session (so it is the leader of its own process group), the pty as its controlling
/// terminal when there is one, and the user's groups, gid and uid when switching.
pub fn spawn(spec: Spawn<'_>) -> std::io::Result<Started> {
    let user = spec.user;
    let mut cmd = match &spec.program {
        Program::LoginShell => {
            let mut c = Command::new(&user.shell);
            c.arg0(format!("-{}", base_name(&user.shell)));
            c
        }
        Program::Command(command) => {
            let mut c = Command::new(&user.shell);
            c.arg("-c").arg(command);
            c
        }
        Program::Sftp(SftpServer::System(path)) => {
            let mut c = Command::new(path);
            c.arg0(base_name(path));
            c
        }
        Program::Sftp(SftpServer::Builtin(exe)) => {
            let mut c = Command::new(exe);
            c.arg0("edge-agent").arg("sftp-server");
            c
        }
    };
    cmd.env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .env("PATH", default_path(user.uid));
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let cwd = if user.home.is_dir() {
        user.home.clone()
    } else {
        PathBuf::from("/")
    };
    cmd.current_dir(cwd);
    let has_pty = spec.pty_slave.is_some();
    match spec.pty_slave {
        Some(slave) => {
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let ids = spec
        .switch_user
        .then(|| (user.uid, user.gid, user.groups.clone()));
    // Prepared before fork: nothing below allocates in the child.
    let groups: Vec<libc::gid_t> = ids
        .as_ref()
        .map(|(_, _, g)| g.iter().map(|g| *g as libc::gid_t).collect())
        .unwrap_or_default();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if has_pty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, _)) = &ids {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    Ok(Started {
        group: Group::new(pgid),
        stdin: child.stdin.take(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        child,
    })
}

/// Whether a terminal sends `sig` to its foreground job on a key press (interrupt, quit,
/// suspend), which reaches that job whoever runs it.
pub fn a_key_sends(sig: i32) -> bool {
    matches!(sig, libc::SIGINT | libc::SIGQUIT | libc::SIGTSTP)
}

/// Sends `sig` to every process of the group.
pub fn signal_group(pgid: i32, sig: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names a group.
    unsafe { libc::kill(-pgid, sig) == 0 }
}

/// A session's process group. Once the group is gone its id can be reused by anyone's
/// processes (quickly, with a small `pid_max`), so from then on nothing is sent to it: a
/// client that holds its channel open must not get to signal a stranger's processes.
pub struct Group {
    pgid: i32,
    gone: std::sync::atomic::AtomicBool,
}

impl Group {
    pub fn new(pgid: i32) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            pgid,
            gone: std::sync::atomic::AtomicBool::new(pgid <= 1),
        })
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn mark_gone(&self) {
        self.gone.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sends `sig` to the group while it exists; notices when it no longer does.
    pub fn signal(&self, sig: i32) -> bool {
        if self.is_gone() {
            return false;
        }
        let ok = signal_group(self.pgid, sig);
        if !ok && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            self.mark_gone();
        }
        ok
    }

    /// Hangs the group up (SIGHUP, then SIGCONT so stopped jobs see it), SIGKILLs whatever is
    /// left after `grace`, and retires the group id. Used when the session's program exits or
    /// its channel closes; a second call does nothing.
    pub async fn terminate(&self, grace: Duration) {
        if !self.signal(libc::SIGHUP) {
            self.mark_gone();
            return;
        }
        self.signal(libc::SIGCONT);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !self.signal(0) {
                self.mark_gone();
                return;
            }
        }
        self.signal(libc::SIGKILL);
        self.mark_gone();
    }
}

/// The signal number for an SSH signal name (RFC 4254 6.10, without the "SIG").
pub fn signal_number(name: &str) -> Option<i32> {
    Some(match name {
        "ABRT" => libc::SIGABRT,
        "ALRM" => libc::SIGALRM,
        "FPE" => libc::SIGFPE,
        "HUP" => libc::SIGHUP,
        "ILL" => libc::SIGILL,
        "INT" => libc::SIGINT,
        "KILL" => libc::SIGKILL,
        "PIPE" => libc::SIGPIPE,
        "QUIT" => libc::SIGQUIT,
        "SEGV" => libc::SIGSEGV,
        "TERM" => libc::SIGTERM,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

/// The SSH name of a signal number (for `exit-signal`).
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGABRT => "ABRT",
        libc::SIGALRM => "ALRM",
        libc::SIGFPE => "FPE",
        libc::SIGHUP => "HUP",
        libc::SIGILL => "ILL",
        libc::SIGINT => "INT",
        libc::SIGKILL => "KILL",
        libc::SIGPIPE => "PIPE",
        libc::SIGQUIT => "QUIT",
        libc::SIGSEGV => "SEGV",
        libc::SIGTERM => "TERM",
        libc::SIGUSR1 => "USR1",
        libc::SIGUSR2 => "USR2",
        libc::SIGBUS => "BUS",
        libc::SIGSYS => "SYS",
        libc::SIGTRAP => "TRAP",
        _ => return format!("SIG{sig}"),
    }
    .to_string()
}

/// The SFTP server to use, from `EDGEPORT_SFTP_SERVER`: unset, empty or `auto` for the
/// system's own when there is one ([`find_sftp_server`]) and else the built-in one (cargo
/// feature `sftp`); `builtin` for the built-in one; `none` to refuse SFTP; or the path of a
/// server binary. `None` when SFTP cannot be served.
pub fn choose_sftp_server(setting: Option<&str>) -> Option<SftpServer> {
    let builtin = || {
        if !cfg!(feature = "sftp") {
            return None;
        }
        // Resolved now, as root and before any upgrade replaces the file.
        std::env::current_exe().ok().map(SftpServer::Builtin)
    };
    match setting.map(str::trim).unwrap_or("") {
        "" | "auto" => find_sftp_server().map(SftpServer::System).or_else(builtin),
        "builtin" => builtin(),
        "none" => None,
        path => Some(SftpServer::System(PathBuf::from(path))),
    }
}

/// The first sftp-server found on this system, if any. The agent prefers the system's own
/// server: it is the reference implementation, maintained by the distribution.
pub fn find_sftp_server() -> Option<PathBuf> {
    [
        "/usr/lib/openssh/sftp-server",
        "/usr/lib/ssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
        "/usr/lib/sftp-server",
        "/usr/libexec/ssh/sftp-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Whether this process runs as root (and so can serve any login).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The effective uid of this process.
pub fn own_uid() -> u32 {
    // SAFETY: as above.
    unsafe { libc::geteuid() }
}

/// Whether a string can be passed to exec (no interior NUL).
pub fn exec_safe(s: &str) -> bool {
    CString::new(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only what a key press sends reaches a terminal's foreground job; KILL, STOP and TERM
    /// go to the session's own group.
    #[test]
    fn keys_send_interrupt_quit_and_suspend_only() {
        for s in ["INT", "QUIT"] {
            assert!(a_key_sends(signal_number(s).unwrap()), "{s}");
        }
        assert!(a_key_sends(libc::SIGTSTP));
        for s in ["KILL", "STOP", "TERM", "HUP", "USR1"] {
            if let Some(n) = signal_number(s) {
                assert!(!a_key_sends(n), "{s}");
            }
        }
    }
}
