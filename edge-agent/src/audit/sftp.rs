//! SFTP file operations for the audit log, read off the bytes between the client and
//! the SFTP server process (the system's `sftp-server`, or the agent's built-in one run as
//! `edge-agent sftp-server`). Client packets name the files
//! (open, remove, rename, mkdir, rmdir) and carry written data; server `DATA` replies carry
//! read data. Each opened file gives one `sftp.file` event when its handle is closed (path,
//! mode, bytes read and written); the other operations give one event each.
//!
//! Parsing is bounded: of packets longer than [`MAX_PACKET`] only the head is read (enough
//! for the paths they name), at most [`MAX_OPEN`] handles of at most [`MAX_HANDLE`] bytes are
//! tracked, and only reads of tracked handles. Anything unparseable is ignored: auditing
//! never interferes with the transfer.

use std::collections::HashMap;

/// SFTP packets above this are not parsed (data packets are 32-256 KiB in practice; only
/// their length matters and it is read from the header).
const MAX_PACKET: usize = 64 * 1024;
/// Most handles tracked per session.
const MAX_OPEN: usize = 1024;

const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_RENAME: u8 = 18;
const FXP_SETSTAT: u8 = 9;
const FXP_SYMLINK: u8 = 20;
const FXP_EXTENDED: u8 = 200;
/// How much of an oversized packet is parsed: enough for a request's paths (PATH_MAX is
/// 4096), so that padding a request past [`MAX_PACKET`] does not hide what it names.
const OVERSIZED_HEAD: usize = 9 * 1024;
/// Longest handle tracked (the SFTP draft's limit; OpenSSH's are 4 bytes).
const MAX_HANDLE: usize = 256;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;

const FXF_WRITE: u32 = 0x02;

#[derive(Debug, Default)]
struct File {
    path: String,
    write: bool,
    read_bytes: u64,
    written_bytes: u64,
}

/// One direction's packet reassembly.
#[derive(Debug, Default)]
struct Stream {
    buf: Vec<u8>,
    /// Bytes of an oversized packet still to skip, and its header.
    skip: usize,
}

#[derive(Debug, Default)]
pub struct SftpTracker {
    session_id: String,
    user: String,
    login: String,
    c2s: Stream,
    s2c: Stream,
    /// Request id -> path of an OPEN awaiting its HANDLE reply.
    opening: HashMap<u32, (String, bool)>,
    /// Request id -> handle of a READ awaiting its DATA reply.
    reading: HashMap<u32, Vec<u8>>,
    files: HashMap<Vec<u8>, File>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn string_at(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u32_at(b, at)? as usize;
    let s = b.get(at + 4..at + 4 + len)?;
    Some((s, at + 4 + len))
}

impl SftpTracker {
    pub fn new(session_id: &str, user: &str, login: &str) -> Self {
        Self {
            session_id: session_id.into(),
            user: user.into(),
            login: login.into(),
            ..Default::default()
        }
    }

    fn event(&self, kind: &str) -> super::Event {
        super::event(kind)
            .session(&self.session_id)
            .user(&self.user)
            .login(&self.login)
    }

    /// Bytes from the client to sftp-server.
    pub fn client(&mut self, data: &[u8]) {
        let mut s = std::mem::take(&mut self.c2s);
        s.feed(data, &mut |p, total| self.client_packet(p, total));
        self.c2s = s;
    }

    /// Bytes from sftp-server to the client.
    pub fn server(&mut self, data: &[u8]) {
        let mut s = std::mem::take(&mut self.s2c);
        s.feed(data, &mut |p, total| self.server_packet(p, total));
        self.s2c = s;
    }

    /// `p` is the packet from its type byte on (possibly only a prefix of an oversized
    /// packet); `total` its full length.
    fn client_packet(&mut self, p: &[u8], total: usize) {
        let Some((&ty, _)) = p.split_first() else {
            return;
        };
        let Some(id) = u32_at(p, 1) else { return };
        let path = |at| string_at(p, at).map(|(s, n)| (String::from_utf8_lossy(s).into_owned(), n));
        match ty {
            FXP_OPEN => {
                if let Some((name, next)) = path(5) {
                    let flags = u32_at(p, next).unwrap_or(0);
                    let write = flags & FXF_WRITE != 0;
                    if let Some((earlier, earlier_write)) = self.opening.remove(&id) {
                        // The client reused a request id before the server answered: the
                        // answer can no longer be told apart, so the earlier open is
                        // recorded now rather than lost behind the later one.
                        self.event("sftp.file")
                            .field("path", earlier)
                            .field("mode", if earlier_write { "write" } else { "read" })
                            .field("note", "request id reused before the server answered")
                            .emit();
                    }
                    if self.opening.len() < MAX_OPEN {
                        self.opening.insert(id, (name, write));
                    }
                }
            }
            FXP_CLOSE => {
                if let Some((h, _)) = string_at(p, 5) {
                    if let Some(f) = self.files.remove(h) {
                        self.event("sftp.file")
                            .field("path", &f.path)
                            .field("mode", if f.write { "write" } else { "read" })
                            .field("bytes_read", f.read_bytes)
                            .field("bytes_written", f.written_bytes)
                            .emit();
                    }
                }
            }
            FXP_READ => {
                // Only reads of a file this tracker knows: made-up handles cost nothing.
                if let Some((h, _)) = string_at(p, 5) {
                    if self.files.contains_key(h) && self.reading.len() < MAX_OPEN * 64 {
                        self.reading.insert(id, h.to_vec());
                    }
                }
            }
            FXP_WRITE => {
                // handle, u64 offset, string data: the data length is what is left.
                if let Some((h, next)) = string_at(p, 5) {
                    let data = total.saturating_sub(next + 8 + 4) as u64;
                    if let Some(f) = self.files.get_mut(h) {
                        f.written_bytes += data;
                    }
                }
            }
            FXP_REMOVE | FXP_MKDIR | FXP_RMDIR => {
                if let Some((name, _)) = path(5) {
                    let kind = match ty {
                        FXP_REMOVE => "sftp.remove",
                        FXP_MKDIR => "sftp.mkdir",
                        _ => "sftp.rmdir",
                    };
                    self.event(kind).field("path", name).emit();
                }
            }
            FXP_RENAME | FXP_SYMLINK => {
                if let Some((from, next)) = path(5) {
                    let to = path(next).map(|(t, _)| t).unwrap_or_default();
                    let kind = if ty == FXP_RENAME {
                        "sftp.rename"
                    } else {
                        "sftp.symlink"
                    };
                    self.event(kind).field("path", from).field("to", to).emit();
                }
            }
            FXP_SETSTAT => {
                if let Some((name, _)) = path(5) {
                    self.event("sftp.setstat").field("path", name).emit();
                }
            }
            FXP_EXTENDED => {
                // OpenSSH's extensions that change names: the same events as their
                // standard forms (sftp's `rename` uses posix-rename when offered).
                if let Some((ext, next)) = path(5) {
                    let kind = match ext.as_str() {
                        "posix-rename@openssh.com" => Some("sftp.rename"),
                        "hardlink@openssh.com" => Some("sftp.link"),
                        _ => None,
                    };
                    if let (Some(kind), Some((from, next))) = (kind, path(next)) {
                        let to = path(next).map(|(t, _)| t).unwrap_or_default();
                        self.event(kind).field("path", from).field("to", to).emit();
                    }
                }
            }
            _ => {}
        }
    }

    fn server_packet(&mut self, p: &[u8], total: usize) {
        let Some((&ty, _)) = p.split_first() else {
            return;
        };
        let Some(id) = u32_at(p, 1) else { return };
        match ty {
            FXP_HANDLE => {
                if let (Some((path, write)), Some((h, _))) =
                    (self.opening.remove(&id), string_at(p, 5))
                {
                    if self.files.len() < MAX_OPEN && h.len() <= MAX_HANDLE {
                        self.files.insert(
                            h.to_vec(),
                            File {
                                path,
                                write,
                                ..Default::default()
                            },
                        );
                    }
                }
            }
            FXP_DATA => {
                if let Some(h) = self.reading.remove(&id) {
                    if let Some(f) = self.files.get_mut(&h) {
                        f.read_bytes += total.saturating_sub(1 + 4 + 4) as u64;
                    }
                }
            }
            _ => {
                // STATUS and others end an OPEN or READ that failed.
                self.opening.remove(&id);
                self.reading.remove(&id);
            }
        }
    }

    /// The session ended: files still open are reported as they are.
    pub fn finish(&mut self) {
        for (_, f) in std::mem::take(&mut self.files) {
            self.event("sftp.file")
                .field("path", &f.path)
                .field("mode", if f.write { "write" } else { "read" })
                .field("bytes_read", f.read_bytes)
                .field("bytes_written", f.written_bytes)
                .field("unclosed", true)
                .emit();
        }
    }
}

impl Stream {
    /// Splits `data` into packets; calls `f(packet or its first bytes, packet length)` for
    /// each complete one (oversized ones after their first [`OVERSIZED_HEAD`] bytes).
    fn feed(&mut self, mut data: &[u8], f: &mut impl FnMut(&[u8], usize)) {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
            }
            if data.is_empty() {
                return;
            }
            if self.buf.len() < 4 {
                let n = (4 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.buf.len() < 4 {
                    return;
                }
            }
            let len = u32_at(&self.buf, 0).unwrap_or(0) as usize;
            let oversized = len > MAX_PACKET;
            let want = 4 + if oversized {
                len.min(OVERSIZED_HEAD)
            } else {
                len
            };
            let n = want.saturating_sub(self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() < want {
                return;
            }
            f(&self.buf[4..], len);
            if oversized {
                self.skip = len - (self.buf.len() - 4);
            }
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(ty: u8, id: u32, body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&((1 + 4 + body.len()) as u32).to_be_bytes());
        p.push(ty);
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn tracks_a_written_file_in_odd_pieces() {
        let mut t = SftpTracker::new("s", "u", "l");
        let mut open = string(b"/tmp/x");
        open.extend_from_slice(&(FXF_WRITE | 0x08).to_be_bytes());
        open.extend_from_slice(&0u32.to_be_bytes());
        let mut c2s = packet(FXP_OPEN, 1, &open);
        let h = string(b"h1");
        let mut write = h.clone();
        write.extend_from_slice(&0u64.to_be_bytes());
        write.extend_from_slice(&string(&vec![7u8; 100_000]));
        let w = packet(FXP_WRITE, 2, &write);
        // The HANDLE reply comes before the write.
        for chunk in c2s.chunks(3) {
            t.client(chunk);
        }
        t.server(&packet(FXP_HANDLE, 1, &h));
        for chunk in w.chunks(7000) {
            t.client(chunk);
        }
        let f = t.files.get(b"h1".as_slice()).unwrap();
        assert_eq!(f.path, "/tmp/x");
        assert!(f.write);
        assert_eq!(f.written_bytes, 100_000);
        c2s = packet(FXP_CLOSE, 3, &h);
        t.client(&c2s);
        assert!(t.files.is_empty());
        // Garbage never panics.
        t.client(&[0xff; 100]);
        t.server(&[0, 0, 0, 0, 1, 2, 3]);
    }

    /// Reads of handles nobody opened are not kept (a client that stops reading replies
    /// cannot make the tracker hold its made-up handles), nor handles past MAX_HANDLE.
    #[test]
    fn made_up_and_oversized_handles_are_not_kept() {
        let mut t = SftpTracker::new("s", "u", "l");
        for id in 0..1000u32 {
            let mut read = string(&vec![b'x'; 60_000]);
            read.extend_from_slice(&0u64.to_be_bytes());
            read.extend_from_slice(&32768u32.to_be_bytes());
            t.client(&packet(FXP_READ, id, &read));
        }
        assert!(t.reading.is_empty());
        let mut open = string(b"/tmp/y");
        open.extend_from_slice(&0u32.to_be_bytes());
        open.extend_from_slice(&0u32.to_be_bytes());
        t.client(&packet(FXP_OPEN, 1, &open));
        t.server(&packet(FXP_HANDLE, 1, &string(&[b'h'; MAX_HANDLE + 1])));
        assert!(t.files.is_empty());
    }

    /// An OPEN padded past MAX_PACKET still names its (long) path.
    #[test]
    fn a_padded_request_still_names_its_path() {
        let mut t = SftpTracker::new("s", "u", "l");
        let name = format!("/etc/cron.d/{}", "a".repeat(200));
        let mut open = string(name.as_bytes());
        open.extend_from_slice(&FXF_WRITE.to_be_bytes());
        open.extend_from_slice(&0u32.to_be_bytes());
        open.extend_from_slice(&vec![0u8; MAX_PACKET + 10]);
        let p = packet(FXP_OPEN, 9, &open);
        for chunk in p.chunks(1000) {
            t.client(chunk);
        }
        assert_eq!(t.opening.get(&9), Some(&(name, true)));
        // The next packet is read from the right place.
        t.client(&packet(FXP_OPEN, 10, &open[..open.len() - MAX_PACKET - 10]));
        assert_eq!(t.opening.len(), 2);
    }
}
