//! `tsh scp`: copies files to and from devices over SFTP, on tsh's own SSH connection (the
//! `sftp` subsystem: the device's sftp-server, or the agent's built-in one).
//!
//! `tsh scp [-r] SRC... [login@]DEVICE:PATH` uploads, `tsh scp [-r] [login@]DEVICE:PATH... DEST`
//! downloads, and `tsh scp fw.bin fleet=vans:/tmp` uploads to every online device with those
//! labels, a few at a time, with one result line per device. Reads and writes are pipelined
//! (32 KiB requests, [`DEPTH`] in flight) so a long round trip does not cap the speed.
//!
//! `--resume` continues partial transfers: a destination file shorter than the source is
//! taken as an interrupted copy of it and only the rest is sent (like `sftp reget`/`reput`),
//! one of the same size is left alone, and a longer one is copied again. Sizes are all that
//! is compared: the existing part is not checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, FuturesOrdered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use russh::ChannelMsg;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::cli::{ScpArgs, Transport};
use super::profile::Creds;
use super::{gateway, multi, ssh, term, CliError};

/// Bytes per read or write request (what OpenSSH's sftp uses, and every server accepts).
const CHUNK: u32 = 32 * 1024;
/// Requests in flight per file.
const DEPTH: usize = 32;
/// How long one SFTP request may take (a cellular link can stall for a while).
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loc {
    Local(PathBuf),
    Remote {
        login: Option<String>,
        /// A device id or a `k=v[,k2=v2]` label selector.
        host: String,
        path: String,
    },
}

/// scp's rule: `HOST:PATH` when a colon comes before any slash (`./a:b` and `/x:y` are local).
fn parse_loc(s: &str) -> Loc {
    match s.find(':') {
        Some(i) if i > 0 && !s[..i].contains('/') => {
            let (lh, path) = (&s[..i], &s[i + 1..]);
            let (login, host) = match lh.rsplit_once('@') {
                Some((l, h)) => (Some(l.to_string()), h.to_string()),
                None => (None, lh.to_string()),
            };
            Loc::Remote {
                login,
                host,
                path: path.to_string(),
            }
        }
        _ => Loc::Local(PathBuf::from(s)),
    }
}

/// A remote path as the SFTP server takes it: relative paths start at the login's home
/// (the server's working directory), so `~` and `~/` are dropped.
fn remote_path(p: &str) -> String {
    match p {
        "" | "~" => ".".into(),
        p => p.strip_prefix("~/").unwrap_or(p).to_string(),
    }
}

fn remote_join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn base_name(p: &str) -> &str {
    p.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(p)
}

#[derive(Clone, Copy)]
struct Opts {
    recursive: bool,
    preserve: bool,
    resume: bool,
}

/// Files and bytes moved.
#[derive(Default, Debug)]
struct Stats {
    files: u64,
    bytes: u64,
    skipped: u64,
}

impl Stats {
    fn line(&self) -> String {
        let mut s = format!(
            "{}, {}",
            crate::text::count(self.files as usize, "file"),
            human(self.bytes)
        );
        if self.skipped > 0 {
            s.push_str(&format!(" ({} already complete)", self.skipped));
        }
        s
    }
}

fn human(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

pub async fn run(creds: &Creds, transport: Transport, args: &ScpArgs) -> Result<i32, CliError> {
    let Some((dest, srcs)) = args.paths.split_last() else {
        return Err(CliError::msg("usage: tsh scp [-r] SRC... DEST"));
    };
    if srcs.is_empty() {
        return Err(CliError::msg("usage: tsh scp [-r] SRC... DEST"));
    }
    let opts = Opts {
        recursive: args.recursive,
        preserve: args.preserve,
        resume: args.resume,
    };
    let progress = !args.quiet && term::is_tty(2);
    let srcs: Vec<Loc> = srcs.iter().map(|s| parse_loc(s)).collect();
    let default_login =
        || {
            creds.logins().first().cloned().ok_or_else(|| {
                CliError::msg("your certificate allows no logins: ask an administrator")
            })
        };
    match parse_loc(dest) {
        Loc::Remote { login, host, path } => {
            let mut local = Vec::new();
            for s in srcs {
                match s {
                    Loc::Local(p) => local.push(p),
                    Loc::Remote { .. } => return Err(CliError::msg(
                        "copying between two devices is not supported: copy through this machine",
                    )),
                }
            }
            let login = match login.or_else(|| args.login.clone()) {
                Some(l) => l,
                None => default_login()?,
            };
            // Local sources are checked before any device is dialed.
            for p in &local {
                check_local_source(p, opts)?;
            }
            let path = remote_path(&path);
            if multi::is_selector(&host) {
                return upload_many(creds, transport, &login, &host, &local, &path, opts).await;
            }
            let sftp = open(creds, transport, &host, &login).await?;
            let stats = upload(&sftp, &host, &local, &path, opts, progress).await?;
            tracing::debug!("uploaded {}", stats.line());
            let _ = sftp.sftp.close_session();
            Ok(0)
        }
        Loc::Local(dest) => {
            let mut device: Option<(Option<String>, String)> = None;
            let mut paths = Vec::new();
            for s in srcs {
                let Loc::Remote { login, host, path } = s else {
                    return Err(CliError::msg(
                        "neither side names a device: use [login@]DEVICE:PATH for one of them",
                    ));
                };
                if multi::is_selector(&host) {
                    return Err(CliError::msg(format!(
                        "cannot download from a label selector ({host}): name one device"
                    )));
                }
                match &device {
                    Some((l, h)) if *h != host || *l != login => {
                        return Err(CliError::msg("downloads come from one device at a time"))
                    }
                    _ => device = Some((login, host)),
                }
                paths.push(remote_path(&path));
            }
            let Some((login, host)) = device else {
                return Err(CliError::msg("usage: tsh scp [-r] SRC... DEST"));
            };
            let login = match login.or_else(|| args.login.clone()) {
                Some(l) => l,
                None => default_login()?,
            };
            let sftp = open(creds, transport, &host, &login).await?;
            let stats = download(&sftp, &host, &paths, &dest, opts, progress).await?;
            tracing::debug!("downloaded {}", stats.line());
            let _ = sftp.sftp.close_session();
            Ok(0)
        }
    }
}

fn check_local_source(p: &Path, opts: Opts) -> Result<(), CliError> {
    let meta = std::fs::metadata(p).map_err(|e| local_err(p, &e))?;
    if meta.is_dir() && !opts.recursive {
        return Err(CliError::msg(format!(
            "{}: is a directory (use -r to copy directories)",
            p.display()
        )));
    }
    Ok(())
}

/// An SFTP session on a device, and the connection that carries it.
struct Sftp {
    sftp: RawSftpSession,
    device: String,
    /// What the device said on the channel's stderr (a refusal's reason).
    stderr: StderrTail,
    _conn: ssh::Connection,
}

/// Dials `device`, logs in and starts its `sftp` subsystem.
async fn open(
    creds: &Creds,
    transport: Transport,
    device: &str,
    login: &str,
) -> Result<Sftp, CliError> {
    let (stream, _) = gateway::dial_ssh(creds, transport, device).await?;
    let conn = ssh::connect(stream, creds, device, login, false, Default::default()).await?;
    let mut channel = conn
        .handle
        .channel_open_session()
        .await
        .map_err(|e| CliError::msg(format!("cannot open a session on {device}: {e}")))?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(|e| CliError::msg(format!("cannot start SFTP on {device}: {e}")))?;
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => break,
            Some(ChannelMsg::Failure) => {
                return Err(CliError::msg(format!(
                    "{device} refused SFTP (it has no SFTP server, or the certificate does not permit it)"
                )))
            }
            Some(ChannelMsg::Close) | None => {
                return Err(CliError::msg(format!(
                    "{device} closed the SFTP session before it started"
                )))
            }
            Some(_) => {}
        }
    }
    let stderr = StderrTail::default();
    let sftp = RawSftpSession::new(bridge(channel, stderr.clone()));
    sftp.set_timeout(REQUEST_TIMEOUT_SECS);
    if let Err(e) = sftp.init().await {
        // A device that refuses the transfer after accepting the subsystem (past its data
        // budget, say) says why on stderr: that line is the error, not the broken stream.
        return Err(CliError::msg(match stderr.first_line() {
            Some(line) => format!("{device}: {line}"),
            None => format!("SFTP on {device} failed to start: {e}"),
        }));
    }
    Ok(Sftp {
        sftp,
        device: device.to_string(),
        stderr,
        _conn: conn,
    })
}

/// The first few KiB a device wrote on the SFTP channel's stderr.
#[derive(Clone, Default)]
struct StderrTail(Arc<std::sync::Mutex<Vec<u8>>>);

impl StderrTail {
    const MAX: usize = 4096;

    fn push(&self, data: &[u8]) {
        if let Ok(mut b) = self.0.lock() {
            let room = Self::MAX.saturating_sub(b.len());
            b.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    fn first_line(&self) -> Option<String> {
        let b = self.0.lock().ok()?;
        let text = String::from_utf8_lossy(&b);
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        Some(line.to_string())
    }
}

/// The channel as the byte stream SFTP runs on, keeping its stderr (which
/// `Channel::into_stream` drops) in `stderr`.
fn bridge(
    channel: russh::Channel<russh::client::Msg>,
    stderr: StderrTail,
) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut from_sftp, mut to_sftp) = tokio::io::split(theirs);
    let (mut rx, tx) = channel.split();
    tokio::spawn(async move {
        while let Some(msg) = rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    let written = to_sftp.write_all(&data).await;
                    if written.is_err() {
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data),
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = to_sftp.shutdown().await;
    });
    tokio::spawn(async move {
        let mut w = tx.make_writer();
        let _ = tokio::io::copy(&mut from_sftp, &mut w).await;
        let _ = w.shutdown().await;
        let _ = tx.eof().await;
    });
    ours
}

/// One line for a failed SFTP request about `path`.
fn remote_err(device: &str, path: &str, e: SftpError) -> CliError {
    CliError::msg(match e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => format!("{device}:{path}: no such file or directory"),
            StatusCode::PermissionDenied => format!("{device}:{path}: permission denied"),
            _ if !s.error_message.is_empty() => format!("{device}:{path}: {}", s.error_message),
            code => format!("{device}:{path}: {code}"),
        },
        SftpError::Timeout => {
            format!("{device}: the SFTP server did not answer within {REQUEST_TIMEOUT_SECS} s")
        }
        e => format!("{device}:{path}: {e}"),
    })
}

fn local_err(p: &Path, e: &std::io::Error) -> CliError {
    let what = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => {
            let mut m = e.to_string();
            if let Some(i) = m.find(" (os error") {
                m.truncate(i);
            }
            m
        }
    };
    CliError::msg(format!("{}: {what}", p.display()))
}

fn is_no_such_file(e: &SftpError) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == StatusCode::NoSuchFile)
}

fn is_eof(e: &SftpError) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == StatusCode::Eof)
}

impl Sftp {
    /// The attributes of `path` (following links), `None` when it does not exist.
    async fn stat(&self, path: &str) -> Result<Option<FileAttributes>, CliError> {
        match self.sftp.stat(path).await {
            Ok(a) => Ok(Some(a.attrs)),
            Err(e) if is_no_such_file(&e) => Ok(None),
            Err(e) => Err(remote_err(&self.device, path, e)),
        }
    }

    fn err(&self, path: &str, e: SftpError) -> CliError {
        // A session the device ended (a lock, a refusal) may have said why on stderr.
        if !matches!(e, SftpError::Status(_)) {
            if let Some(line) = self.stderr.first_line() {
                return CliError::msg(format!("{}: {line}", self.device));
            }
        }
        remote_err(&self.device, path, e)
    }
}

/// A byte progress bar for one file (hidden when `show` is false).
fn file_bar(show: bool, name: &str, len: u64, done: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:30!} {bytes:>10}/{total_bytes:<10} {bar:25} {binary_bytes_per_sec:>12} {eta:>4}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(name.to_string());
    bar.set_position(done);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

// ---- upload ------------------------------------------------------------------------

async fn upload(
    s: &Sftp,
    device: &str,
    srcs: &[PathBuf],
    dest: &str,
    opts: Opts,
    progress: bool,
) -> Result<Stats, CliError> {
    let dest_attrs = s.stat(dest).await?;
    let dest_is_dir = dest_attrs.as_ref().is_some_and(|a| a.is_dir());
    if srcs.len() > 1 && !dest_is_dir {
        return Err(CliError::msg(match dest_attrs {
            Some(_) => format!("{device}:{dest}: not a directory"),
            None => format!("{device}:{dest}: no such directory"),
        }));
    }
    let mut stats = Stats::default();
    for src in srcs {
        let meta = std::fs::metadata(src).map_err(|e| local_err(src, &e))?;
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        let target = if dest_is_dir {
            remote_join(dest, &name)
        } else {
            dest.to_string()
        };
        if meta.is_dir() {
            if !opts.recursive {
                return Err(CliError::msg(format!(
                    "{}: is a directory (use -r to copy directories)",
                    src.display()
                )));
            }
            upload_dir(s, src, &target, opts, progress, &mut stats).await?;
        } else {
            upload_file(s, src, &meta, &target, opts, progress, &mut stats).await?;
        }
    }
    Ok(stats)
}

async fn upload_dir(
    s: &Sftp,
    src: &Path,
    target: &str,
    opts: Opts,
    progress: bool,
    stats: &mut Stats,
) -> Result<(), CliError> {
    match s.stat(target).await? {
        Some(a) if a.is_dir() => {}
        Some(_) => {
            return Err(CliError::msg(format!(
                "{}:{target}: not a directory",
                s.device
            )))
        }
        None => {
            let mut attrs = FileAttributes::default();
            if let Ok(m) = std::fs::metadata(src) {
                use std::os::unix::fs::PermissionsExt;
                attrs.permissions = Some(m.permissions().mode() & 0o7777);
            }
            s.sftp
                .mkdir(target, attrs)
                .await
                .map_err(|e| s.err(target, e))?;
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| local_err(src, &e))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let child = remote_join(target, &name);
        // Links are followed, as scp -r does.
        let meta = std::fs::metadata(&path).map_err(|e| local_err(&path, &e))?;
        if meta.is_dir() {
            Box::pin(upload_dir(s, &path, &child, opts, progress, stats)).await?;
        } else if meta.is_file() {
            upload_file(s, &path, &meta, &child, opts, progress, stats).await?;
        } else {
            eprintln!("tsh: {}: not a regular file, skipped", path.display());
        }
    }
    Ok(())
}

async fn upload_file(
    s: &Sftp,
    src: &Path,
    meta: &std::fs::Metadata,
    target: &str,
    opts: Opts,
    progress: bool,
    stats: &mut Stats,
) -> Result<(), CliError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let len = meta.len();
    let mut offset = 0;
    if opts.resume {
        if let Some(a) = s.stat(target).await? {
            let have = a.size.unwrap_or(0);
            if a.is_regular() && have == len {
                stats.skipped += 1;
                stats.files += 1;
                return Ok(());
            }
            if a.is_regular() && have < len {
                offset = have;
            }
        }
    }
    let mut flags = OpenFlags::WRITE | OpenFlags::CREATE;
    if offset == 0 {
        flags |= OpenFlags::TRUNCATE;
    }
    let mode = meta.permissions().mode() & 0o7777;
    let attrs = FileAttributes {
        permissions: Some(mode),
        ..Default::default()
    };
    let handle = s
        .sftp
        .open(target, flags, attrs)
        .await
        .map_err(|e| s.err(target, e))?
        .handle;
    let mut file = tokio::fs::File::open(src)
        .await
        .map_err(|e| local_err(src, &e))?;
    if offset > 0 {
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| local_err(src, &e))?;
    }
    let bar = file_bar(progress, &src.display().to_string(), len, offset);
    let sent = async {
        let mut pos = offset;
        let mut inflight = FuturesOrdered::new();
        let mut done = false;
        loop {
            while !done && inflight.len() < DEPTH {
                let mut buf = vec![0u8; CHUNK as usize];
                let mut n = 0;
                while n < buf.len() {
                    match file.read(&mut buf[n..]).await {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => return Err(local_err(src, &e)),
                    }
                }
                if n == 0 {
                    done = true;
                    break;
                }
                buf.truncate(n);
                let at = pos;
                pos += n as u64;
                let h = handle.clone();
                inflight.push_back(async move { (n, s.sftp.write(h, at, buf).await) });
            }
            match inflight.next().await {
                None => break,
                Some((n, Ok(_))) => bar.inc(n as u64),
                Some((_, Err(e))) => return Err(s.err(target, e)),
            }
        }
        Ok(pos - offset)
    }
    .await;
    bar.finish_and_clear();
    let sent = match sent {
        Ok(n) => n,
        Err(e) => {
            let _ = s.sftp.close(handle).await;
            return Err(e);
        }
    };
    if opts.preserve {
        let attrs = FileAttributes {
            permissions: Some(mode),
            atime: Some(meta.atime() as u32),
            mtime: Some(meta.mtime() as u32),
            ..Default::default()
        };
        s.sftp
            .fsetstat(handle.clone(), attrs)
            .await
            .map_err(|e| s.err(target, e))?;
    }
    s.sftp.close(handle).await.map_err(|e| s.err(target, e))?;
    stats.files += 1;
    stats.bytes += sent;
    Ok(())
}

// ---- download ----------------------------------------------------------------------

async fn download(
    s: &Sftp,
    device: &str,
    srcs: &[String],
    dest: &Path,
    opts: Opts,
    progress: bool,
) -> Result<Stats, CliError> {
    let dest_is_dir = dest.is_dir();
    if srcs.len() > 1 && !dest_is_dir {
        return Err(CliError::msg(if dest.exists() {
            format!("{}: not a directory", dest.display())
        } else {
            format!("{}: no such directory", dest.display())
        }));
    }
    let mut stats = Stats::default();
    for src in srcs {
        let Some(attrs) = s.stat(src).await? else {
            return Err(CliError::msg(format!(
                "{device}:{src}: no such file or directory"
            )));
        };
        let target = if dest_is_dir {
            dest.join(base_name(src))
        } else {
            dest.to_path_buf()
        };
        if attrs.is_dir() {
            if !opts.recursive {
                return Err(CliError::msg(format!(
                    "{device}:{src}: is a directory (use -r to copy directories)"
                )));
            }
            download_dir(s, src, &attrs, &target, opts, progress, &mut stats).await?;
        } else {
            download_file(s, src, &attrs, &target, opts, progress, &mut stats).await?;
        }
    }
    Ok(stats)
}

async fn download_dir(
    s: &Sftp,
    src: &str,
    attrs: &FileAttributes,
    target: &Path,
    opts: Opts,
    progress: bool,
    stats: &mut Stats,
) -> Result<(), CliError> {
    match std::fs::metadata(target) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CliError::msg(format!(
                "{}: not a directory",
                target.display()
            )))
        }
        Err(_) => {
            std::fs::create_dir(target).map_err(|e| local_err(target, &e))?;
            if let Some(mode) = attrs.permissions {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(
                    target,
                    std::fs::Permissions::from_mode(mode & 0o7777 | 0o700),
                );
            }
        }
    }
    let handle = s.sftp.opendir(src).await.map_err(|e| s.err(src, e))?.handle;
    let mut entries = Vec::new();
    loop {
        match s.sftp.readdir(handle.clone()).await {
            Ok(name) => entries.extend(name.files),
            Err(e) if is_eof(&e) => break,
            Err(e) => {
                let _ = s.sftp.close(handle).await;
                return Err(s.err(src, e));
            }
        }
    }
    let _ = s.sftp.close(handle).await;
    entries.retain(|f| f.filename != "." && f.filename != ".." && !f.filename.contains('/'));
    entries.sort_by(|a, b| a.filename.cmp(&b.filename));
    for f in entries {
        let child = remote_join(src, &f.filename);
        let local = target.join(&f.filename);
        let mut a = f.attrs;
        if a.is_symlink() {
            // Links are followed, as scp -r does.
            match s.stat(&child).await? {
                Some(t) => a = t,
                None => {
                    eprintln!("tsh: {}:{child}: dangling link, skipped", s.device);
                    continue;
                }
            }
        }
        if a.is_dir() {
            Box::pin(download_dir(s, &child, &a, &local, opts, progress, stats)).await?;
        } else if a.is_regular() {
            download_file(s, &child, &a, &local, opts, progress, stats).await?;
        } else {
            eprintln!("tsh: {}:{child}: not a regular file, skipped", s.device);
        }
    }
    Ok(())
}

async fn download_file(
    s: &Sftp,
    src: &str,
    attrs: &FileAttributes,
    target: &Path,
    opts: Opts,
    progress: bool,
    stats: &mut Stats,
) -> Result<(), CliError> {
    let len = attrs.size.unwrap_or(0);
    let mut offset = 0;
    if opts.resume {
        if let Ok(m) = std::fs::metadata(target) {
            if m.is_file() && m.len() == len {
                stats.skipped += 1;
                stats.files += 1;
                return Ok(());
            }
            if m.is_file() && m.len() < len {
                offset = m.len();
            }
        }
    }
    let handle = s
        .sftp
        .open(src, OpenFlags::READ, FileAttributes::default())
        .await
        .map_err(|e| s.err(src, e))?
        .handle;
    let mut o = tokio::fs::OpenOptions::new();
    o.write(true).create(true);
    if offset == 0 {
        o.truncate(true);
    }
    let file = o.open(target).await.map_err(|e| local_err(target, &e));
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            let _ = s.sftp.close(handle).await;
            return Err(e);
        }
    };
    let bar = file_bar(progress, src, len, offset);
    let got = async {
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| local_err(target, &e))?;
        let mut next = offset;
        let mut written = offset;
        'file: loop {
            let mut inflight = FuturesOrdered::new();
            let mut eof = false;
            loop {
                // Keep DEPTH reads ahead, up to one past the size the file had.
                while !eof && inflight.len() < DEPTH && (next <= len || inflight.is_empty()) {
                    let at = next;
                    next += CHUNK as u64;
                    let h = handle.clone();
                    inflight.push_back(async move { (at, s.sftp.read(h, at, CHUNK).await) });
                }
                let Some((at, r)) = inflight.next().await else {
                    if eof {
                        break 'file;
                    }
                    continue;
                };
                match r {
                    Ok(d) => {
                        let n = d.data.len() as u64;
                        if at != written {
                            continue; // after a short read: a stale answer
                        }
                        file.write_all(&d.data)
                            .await
                            .map_err(|e| local_err(target, &e))?;
                        written += n;
                        bar.inc(n);
                        if n < CHUNK as u64 {
                            // A short read: drain what is in flight, continue from here.
                            while inflight.next().await.is_some() {}
                            next = written;
                            continue 'file;
                        }
                    }
                    Err(e) if is_eof(&e) => {
                        if at == written {
                            eof = true;
                        }
                    }
                    Err(e) => return Err(s.err(src, e)),
                }
            }
        }
        file.flush().await.map_err(|e| local_err(target, &e))?;
        Ok(written - offset)
    }
    .await;
    bar.finish_and_clear();
    let _ = s.sftp.close(handle).await;
    let got = got?;
    if opts.preserve {
        if let Some(mode) = attrs.permissions {
            use std::os::unix::fs::PermissionsExt;
            let _ =
                std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode & 0o7777));
        }
        if let (Some(at), Some(mt)) = (attrs.atime, attrs.mtime) {
            let t = |s: u32| std::time::UNIX_EPOCH + Duration::from_secs(s as u64);
            if let Ok(f) = std::fs::File::options().write(true).open(target) {
                let _ = f.set_times(
                    std::fs::FileTimes::new()
                        .set_accessed(t(at))
                        .set_modified(t(mt)),
                );
            }
        }
    }
    stats.files += 1;
    stats.bytes += got;
    Ok(())
}

// ---- label fan-out -----------------------------------------------------------------

/// Uploads to every online device matching `selector`, [`multi::DEFAULT_PARALLEL`] at a
/// time: one line per device on stdout (`[van-1] 2 files, 1.0 MiB`) or stderr (`[van-2]
/// tsh: ...`), then the summary. Exit status 0 when every device got everything, else 1.
async fn upload_many(
    creds: &Creds,
    transport: Transport,
    login: &str,
    selector: &str,
    srcs: &[PathBuf],
    dest: &str,
    opts: Opts,
) -> Result<i32, CliError> {
    let want: BTreeMap<String, String> =
        edgeport_proto::util::parse_labels(selector).map_err(|e| CliError::msg(e.to_string()))?;
    let devices = gateway::list_devices(creds, transport).await?;
    let ids = multi::matching(devices, &want);
    if ids.is_empty() {
        return Err(CliError::msg(format!(
            "no online device matches {selector} (see tsh ls {selector})"
        )));
    }
    let bar = if term::is_tty(2) {
        let bar = ProgressBar::new(ids.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} devices {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let creds = Arc::new(creds.clone());
    let total = ids.len();
    let mut failed = Vec::new();
    let mut runs = stream::iter(ids.into_iter().map(|device| {
        let creds = creds.clone();
        async move {
            let r = async {
                let s = open(&creds, transport, &device, login).await?;
                let stats = upload(&s, &device, srcs, dest, opts, false).await;
                let _ = s.sftp.close_session();
                stats
            }
            .await;
            (device, r)
        }
    }))
    .buffer_unordered(multi::DEFAULT_PARALLEL);
    while let Some((device, r)) = runs.next().await {
        bar.suspend(|| match &r {
            Ok(stats) => crate::outln!("[{device}] {}", stats.line()),
            Err(e) => eprintln!("[{device}] tsh: {e}"),
        });
        bar.inc(1);
        bar.set_message(device.clone());
        if r.is_err() {
            failed.push(device);
        }
    }
    bar.finish_and_clear();
    let ok = total - failed.len();
    if failed.is_empty() {
        eprintln!(
            "tsh: {}: all {ok} succeeded",
            crate::text::count(total, "device")
        );
        Ok(0)
    } else {
        eprintln!(
            "tsh: {}: {ok} succeeded, {} failed: {}",
            crate::text::count(total, "device"),
            failed.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let r = |l: Option<&str>, h: &str, p: &str| Loc::Remote {
            login: l.map(str::to_string),
            host: h.into(),
            path: p.into(),
        };
        assert_eq!(parse_loc("van-1:/tmp"), r(None, "van-1", "/tmp"));
        assert_eq!(parse_loc("root@van-1:"), r(Some("root"), "van-1", ""));
        assert_eq!(
            parse_loc("pi@fleet=vans,region=eu:/opt/fw.bin"),
            r(Some("pi"), "fleet=vans,region=eu", "/opt/fw.bin")
        );
        assert_eq!(parse_loc("./a:b"), Loc::Local("./a:b".into()));
        assert_eq!(parse_loc("/x/y:z"), Loc::Local("/x/y:z".into()));
        assert_eq!(parse_loc("file.txt"), Loc::Local("file.txt".into()));
        assert_eq!(parse_loc(":x"), Loc::Local(":x".into()));
        assert_eq!(remote_path(""), ".");
        assert_eq!(remote_path("~/logs"), "logs");
        assert_eq!(remote_join("/tmp/", "a"), "/tmp/a");
        assert_eq!(remote_join("/tmp", "a"), "/tmp/a");
        assert_eq!(base_name("/var/log/"), "log");
        assert_eq!(base_name("a"), "a");
    }
}
