//! The built-in SFTP server (cargo feature `sftp`): SFTP version 3 (draft-ietf-secsh-filexfer-02,
//! as OpenSSH speaks it) on stdin/stdout, for devices whose image has no `sftp-server`
//! (BusyBox, Buildroot). The agent never serves files from its own (root) process: it runs
//! itself again as `edge-agent sftp-server`, started like the system's server would be (as the
//! login's user, in its own process group, with pipes the audit tracker reads), so the
//! kernel checks every file access against the login's permissions.
//!
//! Plain blocking std I/O on one thread and no dependencies, to stay small on the device.
//! Requests are answered in order; `posix-rename@openssh.com` is the one extension.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, ReadDir};
use std::io::{self, BufReader, BufWriter, ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Longest request accepted (a 256 KiB write plus its header); longer ends the session.
const MAX_PACKET: usize = 256 * 1024 + 1024;
/// Largest read answered at once.
const MAX_READ: u32 = 256 * 1024;
/// Most open handles at once.
const MAX_HANDLES: usize = 256;
/// Directory entries per READDIR reply.
const DIR_BATCH: usize = 64;

const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const LSTAT: u8 = 7;
const FSTAT: u8 = 8;
const SETSTAT: u8 = 9;
const FSETSTAT: u8 = 10;
const OPENDIR: u8 = 11;
const READDIR: u8 = 12;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const REALPATH: u8 = 16;
const STAT: u8 = 17;
const RENAME: u8 = 18;
const READLINK: u8 = 19;
const SYMLINK: u8 = 20;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const NAME: u8 = 104;
const ATTRS: u8 = 105;
const EXTENDED: u8 = 200;

const OK: u32 = 0;
const EOF: u32 = 1;
const NO_SUCH_FILE: u32 = 2;
const PERMISSION_DENIED: u32 = 3;
const FAILURE: u32 = 4;
const BAD_MESSAGE: u32 = 5;
const OP_UNSUPPORTED: u32 = 8;

const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;
const ATTR_ACMODTIME: u32 = 0x8;
const ATTR_EXTENDED: u32 = 0x8000_0000;

const FXF_READ: u32 = 0x1;
const FXF_WRITE: u32 = 0x2;
const FXF_APPEND: u32 = 0x4;
const FXF_CREAT: u32 = 0x8;
const FXF_TRUNC: u32 = 0x10;
const FXF_EXCL: u32 = 0x20;

/// A request the server could not even parse, or an error to answer with a status.
#[derive(Debug)]
enum Fail {
    Bad,
    Status(u32, String),
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::NotFound => NO_SUCH_FILE,
            ErrorKind::PermissionDenied => PERMISSION_DENIED,
            _ => FAILURE,
        };
        let mut msg = e.to_string();
        if let Some(i) = msg.find(" (os error") {
            msg.truncate(i);
        }
        Fail::Status(code, msg)
    }
}

type Res<T> = Result<T, Fail>;

/// A request's fields, read in order.
struct Req<'a>(&'a [u8]);

impl<'a> Req<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if self.0.len() < n {
            return Err(Fail::Bad);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Res<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Res<u64> {
        Ok(((self.u32()? as u64) << 32) | self.u32()? as u64)
    }
    fn bytes(&mut self) -> Res<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn path(&mut self) -> Res<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let b = self.bytes()?;
        if b.contains(&0) {
            return Err(Fail::Status(FAILURE, "path contains a NUL byte".into()));
        }
        // An empty path is the current (home) directory, as in OpenSSH.
        Ok(PathBuf::from(if b.is_empty() {
            std::ffi::OsStr::new(".")
        } else {
            std::ffi::OsStr::from_bytes(b)
        }))
    }
    fn attrs(&mut self) -> Res<Attrs> {
        let flags = self.u32()?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid_gid = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.perm = Some(self.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.times = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_EXTENDED != 0 {
            for _ in 0..self.u32()? {
                self.bytes()?;
                self.bytes()?;
            }
        }
        Ok(a)
    }
}

#[derive(Debug, Default)]
struct Attrs {
    size: Option<u64>,
    uid_gid: Option<(u32, u32)>,
    perm: Option<u32>,
    times: Option<(u32, u32)>,
}

/// A reply being built (length prefix filled in by [`Out::send`]).
struct Out(Vec<u8>);

impl Out {
    fn new(kind: u8, id: Option<u32>) -> Self {
        let mut o = Out(vec![0, 0, 0, 0, kind]);
        if let Some(id) = id {
            o.u32(id);
        }
        o
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    fn attrs(&mut self, m: &std::fs::Metadata) -> &mut Self {
        self.u32(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME)
            .u64(m.size())
            .u32(m.uid())
            .u32(m.gid())
            .u32(m.mode())
            .u32(m.atime() as u32)
            .u32(m.mtime() as u32)
    }
    fn finish(mut self) -> Vec<u8> {
        let n = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&n.to_be_bytes());
        self.0
    }
}

fn status(id: u32, code: u32, msg: &str) -> Vec<u8> {
    let mut o = Out::new(STATUS, Some(id));
    o.u32(code).bytes(msg.as_bytes()).bytes(b"en");
    o.finish()
}

fn ok(id: u32) -> Vec<u8> {
    status(id, OK, "Success")
}

enum Handle {
    File(File),
    Dir(ReadDir, PathBuf),
}

struct Server {
    handles: HashMap<u32, Handle>,
    next: u32,
}

/// Serves SFTP on stdin/stdout until the client closes stdin. Returns the exit status.
pub fn run() -> i32 {
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut input = BufReader::with_capacity(MAX_PACKET, stdin.lock());
    let mut output = BufWriter::with_capacity(MAX_READ as usize + 1024, stdout.lock());
    let mut server = Server {
        handles: HashMap::new(),
        next: 1,
    };
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if input.read_exact(&mut len).is_err() {
            return 0;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_PACKET {
            return 1;
        }
        buf.resize(len, 0);
        if input.read_exact(&mut buf).is_err() {
            return 1;
        }
        let Some(reply) = server.handle(&buf) else {
            return 1;
        };
        if output.write_all(&reply).is_err() {
            return 1;
        }
        // Flush only when no request is waiting: pipelined requests share one write.
        if input.buffer().is_empty() && output.flush().is_err() {
            return 1;
        }
    }
}

impl Server {
    /// One request -> its reply; `None` for a message that ends the session.
    fn handle(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let (&kind, rest) = packet.split_first()?;
        let mut r = Req(rest);
        if kind == INIT {
            let mut o = Out::new(VERSION, None);
            o.u32(3).bytes(b"posix-rename@openssh.com").bytes(b"1");
            return Some(o.finish());
        }
        let id = r.u32().ok()?;
        Some(match self.request(kind, id, &mut r) {
            Ok(reply) => reply,
            Err(Fail::Bad) => status(id, BAD_MESSAGE, "Bad message"),
            Err(Fail::Status(code, msg)) => status(id, code, &msg),
        })
    }

    fn request(&mut self, kind: u8, id: u32, r: &mut Req<'_>) -> Res<Vec<u8>> {
        match kind {
            OPEN => {
                let path = r.path()?;
                let flags = r.u32()?;
                let attrs = r.attrs()?;
                let mut o = OpenOptions::new();
                o.read(flags & FXF_READ != 0)
                    .write(flags & FXF_WRITE != 0)
                    .append(flags & FXF_APPEND != 0)
                    .mode(attrs.perm.unwrap_or(0o666) & 0o7777);
                if flags & FXF_CREAT != 0 {
                    if flags & FXF_EXCL != 0 {
                        o.create_new(true);
                    } else {
                        o.create(true);
                    }
                }
                o.truncate(flags & FXF_TRUNC != 0);
                let f = o.open(&path)?;
                self.add(Handle::File(f), id)
            }
            CLOSE => {
                let h = self.handle_id(r)?;
                match self.handles.remove(&h) {
                    Some(_) => Ok(ok(id)),
                    None => Err(bad_handle()),
                }
            }
            READ => {
                let h = self.handle_id(r)?;
                let offset = r.u64()?;
                let len = r.u32()?.min(MAX_READ) as usize;
                let f = self.file(h)?;
                let mut data = vec![0u8; len];
                let mut n = 0;
                while n < len {
                    match f.read_at(&mut data[n..], offset + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                if n == 0 && len > 0 {
                    return Ok(status(id, EOF, "End of file"));
                }
                let mut o = Out::new(DATA, Some(id));
                o.bytes(&data[..n]);
                Ok(o.finish())
            }
            WRITE => {
                let h = self.handle_id(r)?;
                let offset = r.u64()?;
                let data = r.bytes()?;
                self.file(h)?.write_all_at(data, offset)?;
                Ok(ok(id))
            }
            LSTAT | STAT => {
                let path = r.path()?;
                let m = if kind == LSTAT {
                    std::fs::symlink_metadata(&path)?
                } else {
                    std::fs::metadata(&path)?
                };
                Ok(attrs_reply(id, &m))
            }
            FSTAT => {
                let h = self.handle_id(r)?;
                let m = self.file(h)?.metadata()?;
                Ok(attrs_reply(id, &m))
            }
            SETSTAT => {
                let path = r.path()?;
                let a = r.attrs()?;
                set_attrs(&path, None, &a)?;
                Ok(ok(id))
            }
            FSETSTAT => {
                let h = self.handle_id(r)?;
                let a = r.attrs()?;
                match self.handles.get(&h) {
                    Some(Handle::File(f)) => set_attrs(Path::new(""), Some(f), &a)?,
                    Some(Handle::Dir(_, p)) => set_attrs(&p.clone(), None, &a)?,
                    None => return Err(bad_handle()),
                }
                Ok(ok(id))
            }
            OPENDIR => {
                let path = r.path()?;
                let rd = std::fs::read_dir(&path)?;
                self.add(Handle::Dir(rd, path), id)
            }
            READDIR => {
                let h = self.handle_id(r)?;
                let Some(Handle::Dir(rd, dir)) = self.handles.get_mut(&h) else {
                    return Err(bad_handle());
                };
                let mut entries = Vec::new();
                for e in rd.by_ref() {
                    let e = e?;
                    let name = e.file_name();
                    if let Ok(m) = std::fs::symlink_metadata(dir.join(&name)) {
                        entries.push((name, m));
                    }
                    if entries.len() >= DIR_BATCH {
                        break;
                    }
                }
                if entries.is_empty() {
                    return Ok(status(id, EOF, "End of file"));
                }
                let mut o = Out::new(NAME, Some(id));
                o.u32(entries.len() as u32);
                for (name, m) in &entries {
                    use std::os::unix::ffi::OsStrExt;
                    let long = long_name(name.as_bytes(), m);
                    o.bytes(name.as_bytes()).bytes(&long).attrs(m);
                }
                Ok(o.finish())
            }
            REMOVE => {
                std::fs::remove_file(r.path()?)?;
                Ok(ok(id))
            }
            MKDIR => {
                let path = r.path()?;
                let a = r.attrs()?;
                let mut b = std::fs::DirBuilder::new();
                std::os::unix::fs::DirBuilderExt::mode(&mut b, a.perm.unwrap_or(0o777) & 0o7777);
                b.create(&path)?;
                Ok(ok(id))
            }
            RMDIR => {
                std::fs::remove_dir(r.path()?)?;
                Ok(ok(id))
            }
            REALPATH => {
                let path = r.path()?;
                let real = std::fs::canonicalize(&path).or_else(|_| normalize(&path))?;
                name_reply(id, &real)
            }
            RENAME => {
                let (from, to) = (r.path()?, r.path()?);
                // SFTP v3: renaming onto an existing file fails (posix-rename replaces it).
                if std::fs::symlink_metadata(&to).is_ok() {
                    return Err(Fail::Status(FAILURE, "the target exists".into()));
                }
                std::fs::rename(from, to)?;
                Ok(ok(id))
            }
            READLINK => {
                let target = std::fs::read_link(r.path()?)?;
                name_reply(id, &target)
            }
            SYMLINK => {
                // OpenSSH's order: target first, then the link (the draft says the reverse).
                let (target, link) = (r.path()?, r.path()?);
                std::os::unix::fs::symlink(target, link)?;
                Ok(ok(id))
            }
            EXTENDED => {
                let name = r.bytes()?;
                if name == b"posix-rename@openssh.com" {
                    let (from, to) = (r.path()?, r.path()?);
                    std::fs::rename(from, to)?;
                    return Ok(ok(id));
                }
                Ok(status(id, OP_UNSUPPORTED, "Operation unsupported"))
            }
            _ => Ok(status(id, OP_UNSUPPORTED, "Operation unsupported")),
        }
    }

    fn add(&mut self, h: Handle, id: u32) -> Res<Vec<u8>> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(Fail::Status(FAILURE, "too many open handles".into()));
        }
        let n = self.next;
        self.next = self.next.wrapping_add(1);
        self.handles.insert(n, h);
        let mut o = Out::new(HANDLE, Some(id));
        o.bytes(n.to_string().as_bytes());
        Ok(o.finish())
    }

    fn handle_id(&self, r: &mut Req<'_>) -> Res<u32> {
        std::str::from_utf8(r.bytes()?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad_handle)
    }

    fn file(&self, h: u32) -> Res<&File> {
        match self.handles.get(&h) {
            Some(Handle::File(f)) => Ok(f),
            _ => Err(bad_handle()),
        }
    }
}

fn bad_handle() -> Fail {
    Fail::Status(FAILURE, "invalid handle".into())
}

fn attrs_reply(id: u32, m: &std::fs::Metadata) -> Vec<u8> {
    let mut o = Out::new(ATTRS, Some(id));
    o.attrs(m);
    o.finish()
}

fn name_reply(id: u32, p: &Path) -> Res<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let mut o = Out::new(NAME, Some(id));
    o.u32(1)
        .bytes(p.as_os_str().as_bytes())
        .bytes(p.as_os_str().as_bytes())
        .u32(0);
    Ok(o.finish())
}

/// `path` made absolute and without `.`/`..`, for a path that does not exist (yet).
fn normalize(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// Applies the attributes a client set: size, owner, permissions, then times.
fn set_attrs(path: &Path, file: Option<&File>, a: &Attrs) -> Res<()> {
    let opened;
    let f = match file {
        Some(f) => Some(f),
        None if a.size.is_some() => {
            opened = OpenOptions::new().write(true).open(path)?;
            Some(&opened)
        }
        None => None,
    };
    if let Some(size) = a.size {
        if let Some(f) = f {
            f.set_len(size)?;
        }
    }
    if let Some((uid, gid)) = a.uid_gid {
        match f {
            Some(f) => std::os::unix::fs::fchown(f, Some(uid), Some(gid))?,
            None => std::os::unix::fs::chown(path, Some(uid), Some(gid))?,
        }
    }
    if let Some(perm) = a.perm {
        let p = std::fs::Permissions::from_mode(perm & 0o7777);
        match f {
            Some(f) => f.set_permissions(p)?,
            None => std::fs::set_permissions(path, p)?,
        }
    }
    if let Some((atime, mtime)) = a.times {
        let t = |s: u32| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s as u64);
        let times = std::fs::FileTimes::new()
            .set_accessed(t(atime))
            .set_modified(t(mtime));
        match f {
            Some(f) => f.set_times(times)?,
            None => File::open(path)?.set_times(times)?,
        }
    }
    Ok(())
}

/// `ls -l` style line for a directory entry (what `sftp`'s `ls -l` prints).
fn long_name(name: &[u8], m: &std::fs::Metadata) -> Vec<u8> {
    let mode = m.mode();
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    };
    let mut perms = String::from(kind);
    for (bit, ch) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        perms.push(if mode & bit != 0 { ch } else { '-' });
    }
    let (y, mo, d) = civil(m.mtime().div_euclid(86400));
    let mut line = format!(
        "{perms} {:>4} {:<8} {:<8} {:>8} {y:04}-{mo:02}-{d:02} ",
        m.nlink(),
        m.uid(),
        m.gid(),
        m.size()
    )
    .into_bytes();
    line.extend_from_slice(name);
    line
}

/// Days since 1970-01-01 -> (year, month, day) (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
        let mut p = vec![kind];
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    fn s(b: &str) -> Vec<u8> {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b.as_bytes());
        v
    }

    #[test]
    fn open_write_read_and_errors() {
        let dir = std::env::temp_dir().join(format!("ep-sftp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f").display().to_string();
        let mut srv = Server {
            handles: HashMap::new(),
            next: 1,
        };
        let v = srv.handle(&[INIT, 0, 0, 0, 3]).unwrap();
        assert_eq!(v[4], VERSION);
        let mut body = s(&file);
        body.extend_from_slice(&(FXF_WRITE | FXF_CREAT | FXF_TRUNC).to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        let h = srv.handle(&req(OPEN, 1, &body)).unwrap();
        assert_eq!(h[4], HANDLE);
        let handle = String::from_utf8(h[13..].to_vec()).unwrap();
        let mut w = s(&handle);
        w.extend_from_slice(&0u64.to_be_bytes());
        w.extend_from_slice(&s("hello"));
        assert_eq!(srv.handle(&req(WRITE, 2, &w)).unwrap(), ok(2));
        assert_eq!(srv.handle(&req(CLOSE, 3, &s(&handle))).unwrap(), ok(3));
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"hello");
        let missing = dir.join("nope").display().to_string();
        let st = srv.handle(&req(STAT, 4, &s(&missing))).unwrap();
        assert_eq!(st[4], STATUS);
        assert_eq!(&st[9..13], &NO_SUCH_FILE.to_be_bytes());
        let bad = srv.handle(&req(READ, 5, &s("99"))).unwrap();
        assert_eq!(bad[4], STATUS);
        assert_eq!(srv.handle(&[READ, 0]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dates_and_paths() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(
            normalize(Path::new("/a/b/../c/./d")).unwrap(),
            PathBuf::from("/a/c/d")
        );
    }
}
