//! The append-only spool: `DATA/audit/spool/SEQ.jsonl` segments (SEQ = the first sequence
//! number in the segment, 20 digits), one JSON event per line, plus `DATA/audit/acked`
//! (`SEQ HASH`: how far the authority has acknowledged). Lines are written in group commits
//! (one write, one `fdatasync`); a torn last line after a crash is cut off at the next open.
//! Segments whose events are all acknowledged are deleted; nothing else ever is.
//!
//! Bounded: the spool never grows past `max_bytes`. Recording chunks stop being kept at
//! three quarters of it (so there is room left for events), events at the bound. A write the
//! disk refuses (full, read-only) is rolled back. Either way the events are counted, and the
//! next write that succeeds starts with an `audit.dropped` event carrying the counts.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use edgeport_proto::audit::{AuditEvent, GENESIS_HASH, RECORDING_CHUNK};

/// Width the hash in `acked` is padded to (the record keeps one size: 20 + 1 + 80 + 1).
const ACKED_PAD: usize = 80;

/// Space set aside in `DATA/audit/reserve` and given back when the disk is full, so that the
/// `audit.dropped` report can still be written.
const RESERVE_BYTES: usize = 64 * 1024;

/// Segments are rotated at this size.
const SEGMENT_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool: {0}")]
    Io(String),
}

fn io(what: &str, p: &Path, e: std::io::Error) -> SpoolError {
    SpoolError::Io(format!("{what} {}: {e}", p.display()))
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    size: u64,
    last_seq: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    seq: u64,
    last_hash: String,
    acked: u64,
    segments: BTreeMap<u64, Segment>,
    /// The open newest segment (appends only).
    cur: Option<(u64, File)>,
    dropped_events: u64,
    dropped_bytes: u64,
    drop_reason: String,
    failing: bool,
    /// Where the last `read_batch` stopped: (segment, byte offset, seq of the last event
    /// read), so the next batch does not re-parse the segment from its start.
    cursor: Option<(u64, u64, u64)>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.jsonl")
}

/// Parses a segment: its events and the length of its valid prefix (a torn last line, or
/// trailing garbage after the last good line, is not part of it).
fn parse(content: &[u8]) -> (Vec<AuditEvent>, usize, usize) {
    let mut events = Vec::new();
    let mut pos = 0;
    let mut good_end = 0;
    let mut bad = 0;
    while pos < content.len() {
        let Some(nl) = content[pos..].iter().position(|b| *b == b'\n') else {
            break; // torn write
        };
        let line = &content[pos..pos + nl];
        pos += nl + 1;
        match serde_json::from_slice::<AuditEvent>(line) {
            Ok(e) => {
                events.push(e);
                good_end = pos;
            }
            Err(_) => bad += 1,
        }
    }
    (events, good_end, bad)
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let seg_dir = dir.join("spool");
        edgeport_proto::util::create_private_dir(dir).map_err(|e| io("cannot create", dir, e))?;
        edgeport_proto::util::create_private_dir(&seg_dir)
            .map_err(|e| io("cannot create", &seg_dir, e))?;
        let (acked, acked_hash) = match fs::read_to_string(dir.join("acked")) {
            Ok(s) => {
                let mut it = s.split_whitespace();
                let seq = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let h = it.next().unwrap_or(GENESIS_HASH).to_string();
                (seq, h)
            }
            Err(_) => (0, GENESIS_HASH.to_string()),
        };
        let mut me = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            seq: acked,
            last_hash: acked_hash,
            acked,
            segments: BTreeMap::new(),
            cur: None,
            dropped_events: 0,
            dropped_bytes: 0,
            drop_reason: String::new(),
            failing: false,
            cursor: None,
        };
        me.ensure_reserve();
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(&seg_dir)
            .map_err(|e| io("cannot read", &seg_dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let first = name.strip_suffix(".jsonl")?.parse::<u64>().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        for (first, path) in names {
            let mut content = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut content))
                .map_err(|e| io("cannot read", &path, e))?;
            let (events, good_end, bad) = parse(&content);
            if good_end < content.len() {
                tracing::warn!(
                    path = %path.display(), cut = content.len() - good_end,
                    "audit spool: cut off an incomplete record at the end (interrupted write)"
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| {
                        f.set_len(good_end as u64)?;
                        f.sync_all()
                    })
                    .map_err(|e| io("cannot repair", &path, e))?;
            }
            if bad > 0 {
                tracing::warn!(path = %path.display(), lines = bad,
                    "audit spool: unreadable records in the middle of a segment are skipped \
                     (the authority will report the gap)");
            }
            let Some(last) = events.last() else {
                let _ = fs::remove_file(&path);
                continue;
            };
            if last.seq > me.seq {
                me.seq = last.seq;
                me.last_hash = last.hash();
            }
            if last.seq <= acked {
                let _ = fs::remove_file(&path);
                continue;
            }
            me.segments.insert(
                first,
                Segment {
                    path,
                    size: good_end as u64,
                    last_seq: last.seq,
                },
            );
        }
        Ok(me)
    }

    /// (Re)creates the reserve file if it is missing; a failure only means no reserve.
    fn ensure_reserve(&self) {
        let path = self.dir.join("reserve");
        if fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES as u64) {
            return;
        }
        let made = File::create(&path).and_then(|mut f| {
            f.write_all(&[0u8; RESERVE_BYTES])?;
            f.sync_all()
        });
        if made.is_err() {
            let _ = fs::remove_file(&path);
        }
    }

    /// Gives the reserve back to the filesystem; true if there was one.
    fn release_reserve(&self) -> bool {
        fs::remove_file(self.dir.join("reserve")).is_ok()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk in segments.
    pub fn size(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    pub fn has_dropped(&self) -> bool {
        self.dropped_events > 0
    }

    pub fn count_dropped(&mut self, events: u64, bytes: u64, reason: &str) {
        self.dropped_events += events;
        self.dropped_bytes += bytes;
        self.drop_reason = reason.to_string();
    }

    fn chain(&mut self, mut ev: AuditEvent) -> (AuditEvent, Vec<u8>) {
        ev.seq = self.seq.saturating_add(1);
        ev.prev_hash = self.last_hash.clone();
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        (ev, line)
    }

    /// Appends events (in order) with one write and one fsync. Returns whether anything
    /// was written.
    pub fn append(&mut self, events: Vec<AuditEvent>) -> bool {
        let (seq0, hash0) = (self.seq, self.last_hash.clone());
        let mut buf = Vec::new();
        let mut last_seq = self.seq;
        let mut dropped_now = (0u64, 0u64);
        let reported = (self.dropped_events, self.dropped_bytes);
        let base = self.size();
        if reported.0 > 0 {
            let d = AuditEvent {
                fields: [
                    ("events".to_string(), reported.0.to_string()),
                    ("bytes".to_string(), reported.1.to_string()),
                    ("reason".to_string(), self.drop_reason.clone()),
                ]
                .into_iter()
                .collect(),
                ..AuditEvent::new("audit.dropped", super::now_ms())
            };
            let (ev, line) = self.chain(d);
            buf.extend_from_slice(&line);
            self.seq = ev.seq;
            self.last_hash = ev.hash();
            last_seq = ev.seq;
        }
        for ev in events {
            let limit = if ev.kind == RECORDING_CHUNK {
                self.max_bytes / 4 * 3
            } else {
                self.max_bytes
            };
            let (ev, line) = self.chain(ev);
            if base + (buf.len() + line.len()) as u64 > limit {
                dropped_now.0 += 1;
                dropped_now.1 += line.len() as u64;
                continue;
            }
            buf.extend_from_slice(&line);
            self.seq = ev.seq;
            self.last_hash = ev.hash();
            last_seq = ev.seq;
        }
        if dropped_now.0 > 0 {
            if !self.failing {
                tracing::error!(
                    dir = %self.dir.display(), max_bytes = self.max_bytes,
                    "audit spool is full (the authority has not acknowledged for a while); \
                     dropping new events until it drains; an audit.dropped event will count them"
                );
            }
            self.failing = true;
        }
        if buf.is_empty() {
            crate::metrics::spooled(0, dropped_now.0);
            self.count_dropped(
                dropped_now.0,
                dropped_now.1,
                "the spool reached its size limit",
            );
            return false;
        }
        match self.write(seq0 + 1, &buf) {
            Ok(()) => {
                crate::metrics::spooled(last_seq.saturating_sub(seq0), dropped_now.0);
                if let Some(seg) = self.segments.values_mut().next_back() {
                    seg.last_seq = last_seq;
                }
                self.dropped_events -= reported.0;
                self.dropped_bytes -= reported.1;
                if dropped_now.0 > 0 {
                    self.count_dropped(
                        dropped_now.0,
                        dropped_now.1,
                        "the spool reached its size limit",
                    );
                } else if self.failing && self.dropped_events == 0 {
                    tracing::info!(dir = %self.dir.display(), "audit spool is writable again");
                    self.failing = false;
                }
                true
            }
            Err(e) => {
                self.seq = seq0;
                self.last_hash = hash0;
                // Everything in this write is lost, except the drop report, which is redone.
                let lost = buf.len() as u64;
                let n = last_seq
                    .saturating_sub(seq0)
                    .saturating_sub(u64::from(reported.0 > 0));
                crate::metrics::spooled(0, n + dropped_now.0);
                if !self.failing {
                    tracing::error!(
                        dir = %self.dir.display(),
                        "cannot write the audit spool: {e}; dropping events until it can be \
                         written again (an audit.dropped event will count them); sessions go on"
                    );
                }
                self.failing = true;
                self.count_dropped(
                    n + dropped_now.0,
                    lost + dropped_now.1,
                    &format!("disk: {e}"),
                );
                if self.release_reserve() {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        "released the audit spool's {} KiB reserve so the drop report can be written",
                        RESERVE_BYTES / 1024
                    );
                }
                false
            }
        }
    }

    fn write(&mut self, first_seq: u64, buf: &[u8]) -> Result<(), std::io::Error> {
        let rotate = match self.segments.values().next_back() {
            Some(s) => s.size >= SEGMENT_BYTES || self.cur.is_none(),
            None => true,
        };
        if rotate {
            self.cur = None;
            let path = self.dir.join("spool").join(segment_name(first_seq));
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = f.metadata()?.len();
            self.segments.insert(
                first_seq,
                Segment {
                    path,
                    size,
                    last_seq: first_seq.saturating_sub(1),
                },
            );
            self.cur = Some((first_seq, f));
        }
        let Some((key, f)) = self.cur.as_mut() else {
            return Err(std::io::Error::other("no open segment"));
        };
        let key = *key;
        let before = self.segments.get(&key).map(|s| s.size).unwrap_or(0);
        let res = f.write_all(buf).and_then(|()| f.sync_data());
        match res {
            Ok(()) => {
                if let Some(s) = self.segments.get_mut(&key) {
                    s.size = before + buf.len() as u64;
                }
                Ok(())
            }
            Err(e) => {
                // Roll back to the last whole record; if even that fails, the torn line is
                // cut off at the next open, and later writes go to a new segment.
                if f.set_len(before).and_then(|()| f.sync_data()).is_err() {
                    if let Some(s) = self.segments.get_mut(&key) {
                        s.size = before;
                    }
                }
                self.cur = None;
                if before == 0 {
                    if let Some(s) = self.segments.remove(&key) {
                        let _ = fs::remove_file(s.path);
                    }
                }
                Err(e)
            }
        }
    }

    /// Events after `after`, in order, up to about `max_bytes` encoded (at least one).
    pub fn read_batch(&mut self, after: u64, max_bytes: usize) -> Vec<AuditEvent> {
        let mut out = Vec::new();
        let mut size = 0usize;
        let mut cursor = None;
        for (key, seg) in &self.segments {
            if seg.last_seq <= after {
                continue;
            }
            let start = match self.cursor {
                Some((k, off, s)) if k == *key && s == after && off <= seg.size => off,
                _ => 0,
            };
            let mut content = Vec::new();
            let read = File::open(&seg.path).and_then(|mut f| {
                use std::io::{Seek, SeekFrom};
                f.seek(SeekFrom::Start(start))?;
                f.take(seg.size - start).read_to_end(&mut content)
            });
            if read.is_err() {
                continue;
            }
            let mut pos = 0usize;
            while let Some(nl) = content[pos..].iter().position(|b| *b == b'\n') {
                let line = &content[pos..pos + nl];
                pos += nl + 1;
                let Ok(ev) = serde_json::from_slice::<AuditEvent>(line) else {
                    continue;
                };
                if ev.seq <= after {
                    continue;
                }
                let len = postcard::to_stdvec(&ev).map(|v| v.len()).unwrap_or(0) + 8;
                if !out.is_empty() && size + len > max_bytes {
                    self.cursor = cursor;
                    return out;
                }
                size += len;
                cursor = Some((*key, start + pos as u64, ev.seq));
                out.push(ev);
            }
        }
        self.cursor = cursor;
        out
    }

    /// The authority holds everything up to `seq`: remember that, delete what it covers.
    pub fn ack(&mut self, seq: u64, hash: &str) -> Result<(), SpoolError> {
        if seq > self.seq {
            // The authority's copy goes further than this spool (the spool was lost):
            // continue the chain from there.
            tracing::warn!(
                local = self.seq,
                authority = seq,
                "the authority's audit chain is ahead of this spool; continuing from it"
            );
            self.seq = seq;
            self.last_hash = hash.to_string();
        }
        if seq <= self.acked {
            return Ok(());
        }
        let path = self.dir.join("acked");
        let tmp = self.dir.join("acked.tmp");
        // A fixed-size record overwritten in place needs no new blocks, so acknowledgements
        // (and with them the deletions that free space) still work on a full disk. The first
        // one is written to a temporary file and renamed.
        let record = format!(
            "{seq:020} {hash}{:width$}\n",
            "",
            width = ACKED_PAD.saturating_sub(hash.len())
        );
        let in_place = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).open(&path)?;
            if f.metadata()?.len() != record.len() as u64 {
                return Err(std::io::Error::other("not a fixed-size record"));
            }
            f.write_all(record.as_bytes())?;
            f.sync_data()
        };
        let replace = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(record.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        in_place()
            .or_else(|_| replace())
            .map_err(|e| io("cannot record the acknowledgement in", &path, e))?;
        self.acked = seq;
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| s.last_seq <= seq)
            .map(|(k, _)| *k)
            .collect();
        let freed = !done.is_empty();
        for k in done {
            if self.cur.as_ref().is_some_and(|(c, _)| *c == k) {
                self.cur = None;
            }
            if let Some(s) = self.segments.remove(&k) {
                if let Err(e) = fs::remove_file(&s.path) {
                    tracing::warn!(path = %s.path.display(), "cannot delete an acknowledged spool segment: {e}");
                }
            }
        }
        if freed && !self.failing {
            self.ensure_reserve();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn chain_torn_write_and_ack() {
        let d = tmp("a");
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        s.append(vec![AuditEvent::new("a", 1), AuditEvent::new("b", 2)]);
        let evs = s.read_batch(0, 1 << 20);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].prev_hash, GENESIS_HASH);
        assert_eq!(evs[1].prev_hash, evs[0].hash());
        // A torn line at the end is cut off at the next open.
        let seg = d.join("spool").join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"seq\":3,\"prev").unwrap();
        drop(s);
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(s.last_seq(), 2);
        s.append(vec![AuditEvent::new("c", 3)]);
        let evs = s.read_batch(0, 1 << 20);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[2].prev_hash, evs[1].hash());
        s.ack(3, &evs[2].hash()).unwrap();
        assert!(s.read_batch(3, 1 << 20).is_empty());
        assert_eq!(fs::read_dir(d.join("spool")).unwrap().count(), 0);
        drop(s);
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(s.last_seq(), 3);
        s.append(vec![AuditEvent::new("d", 4)]);
        let evs = s.read_batch(3, 1 << 20);
        assert_eq!(evs[0].seq, 4);
        assert_eq!(
            evs[0].prev_hash,
            AuditEvent {
                seq: 3,
                ..evs[0].clone()
            }
            .prev_hash
        );
    }

    #[test]
    fn bounded_with_drop_report() {
        let d = tmp("b");
        let mut s = Spool::open(&d, 600).unwrap();
        let big = |k: &str| {
            let mut e = AuditEvent::new(k, 1);
            e.fields.insert("x".into(), "y".repeat(200));
            e
        };
        s.append(vec![big("a"), big("b"), big("c"), big("d")]);
        assert!(s.has_dropped());
        let n = s.read_batch(0, 1 << 20).len();
        let last = s.read_batch(0, 1 << 20).last().unwrap().clone();
        s.ack(last.seq, &last.hash()).unwrap();
        s.append(vec![AuditEvent::new("e", 2)]);
        let evs = s.read_batch(n as u64, 1 << 20);
        assert_eq!(evs[0].kind, "audit.dropped");
        assert!(evs[0].field("events").parse::<u64>().unwrap() >= 1);
        assert_eq!(evs[1].kind, "e");
        assert!(!s.has_dropped());
    }
}
