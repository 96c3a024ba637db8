//! Session recordings in the store, laid out so that both listing and playing cost what
//! they return, however many recordings there are and however long they are (#28):
//!
//! - pieces are keyed by the byte offset just past them (`SESSION/eEND`, 20 digits), so the
//!   piece that holds offset X is the first key at or above `SESSION/e(X+1)`: a read from
//!   any offset is one bounded range scan;
//! - one [`IndexRecord`] per session (size, device, user, start, end);
//! - a timeline, newest first (`a/INV/SESSION` and `u/USER/INV/SESSION`, where INV is
//!   `u64::MAX - started_ms`): a page of N recordings is one scan of N keys and N reads.
//!
//! Stores from before this layout (pieces keyed by the event's sequence number, no
//! timeline) are rewritten once when the authority opens them ([`migrate`]).

use edgeport_proto::audit::RecordingInfo;
use edgeport_proto::rpc::RpcError;
use serde::{Deserialize, Serialize};

use crate::errors::{invalid, not_found};
use crate::store::{self, Store, StoreError, Table};

/// Largest piece of a recording per answer (the frame limit is 64 KiB).
pub const PIECE: usize = 48 * 1024;
/// Recordings per page unless the caller asks for another number.
pub const PAGE_DEFAULT: u32 = 50;
/// Most recordings per page (a page must fit in one frame).
pub const PAGE_MAX: u32 = 100;
/// Stop filling a page past this many (estimated) encoded bytes.
const PAGE_BYTES: usize = 40 * 1024;
/// Timeline entries examined for one page at most: a user's page skips entries that are
/// not theirs (a previous holder of the name), and the cursor says where to go on.
const PAGE_SCAN_BUDGET: usize = 2_000;
/// Timeline keys read per scan.
const SCAN_BATCH: usize = 128;
/// Pieces read by the first scan of an answer (the agent ships one every 16 KiB or second,
/// so a few usually fill it); each further scan reads twice as many, up to
/// [`PIECE_SCAN_MAX`], so small pieces take few scans and large ones are not over-read.
const PIECE_SCAN: usize = 4;
const PIECE_SCAN_MAX: usize = 256;

/// The layout this module writes; records without it are from before paging.
const LAYOUT: u32 = 2;
/// Where the migration is noted (in `AuditState`).
const LAYOUT_KEY: &str = "@recordings-layout";
/// A migration claimed longer ago than this is taken over (its authority died).
const MIGRATION_STALE_MS: u64 = 10 * 60 * 1000;

/// What the store keeps per recorded session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexRecord {
    #[serde(flatten)]
    pub info: RecordingInfo,
    /// The time of the last piece (device clock, Unix ms).
    #[serde(default)]
    pub ended_ms: u64,
    /// 0: pieces keyed by sequence number and no timeline entry (before paging).
    #[serde(default)]
    pub layout: u32,
}

/// Where the migration stands (`AuditState/@recordings-layout`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LayoutState {
    layout: u32,
    /// Set while an authority rewrites old recordings.
    #[serde(default)]
    migrating_since_ms: u64,
}

fn piece_prefix(sid: &str) -> String {
    format!("{sid}/e")
}

fn piece_key(sid: &str, end: u64) -> String {
    format!("{sid}/e{end:020}")
}

fn inverted(started_ms: u64) -> String {
    format!("{:020}", u64::MAX - started_ms)
}

/// The two timeline keys of a recording.
fn timeline_keys(info: &RecordingInfo) -> [String; 2] {
    let inv = inverted(info.started_ms);
    [
        format!("a/{inv}/{}", info.session_id),
        format!("u/{}/{inv}/{}", info.user, info.session_id),
    ]
}

/// Session ids become key components: one with a `/` could reach into another session's
/// keys, so its pieces are not stored (devices make UUIDs).
pub fn acceptable_session_id(sid: &str) -> bool {
    !sid.is_empty() && !sid.contains('/') && !sid.contains('\0')
}

/// Appends one piece of a session's recording (the device was checked to own the session).
/// The piece is written before the index moves past it, so a crash in between only makes
/// the retried batch write the same piece again.
pub fn append(
    st: &dyn Store,
    mut fresh: RecordingInfo,
    time_ms: u64,
    data: &[u8],
) -> Result<(), StoreError> {
    let sid = fresh.session_id.clone();
    let rec = match store::get::<IndexRecord>(st, Table::RecordingIndex, &sid)? {
        Some(r) if r.layout < LAYOUT => migrate_one(st, r)?,
        Some(r) => r,
        None => {
            fresh.bytes = 0;
            let rec = IndexRecord {
                info: fresh,
                ended_ms: time_ms,
                layout: LAYOUT,
            };
            for k in timeline_keys(&rec.info) {
                st.put(Table::RecordingTimeline, &k, Vec::new())?;
            }
            rec
        }
    };
    if data.is_empty() {
        return Ok(());
    }
    let end = rec.info.bytes + data.len() as u64;
    st.put(Table::Recordings, &piece_key(&sid, end), data.to_vec())?;
    let rec = IndexRecord {
        info: RecordingInfo {
            bytes: end,
            ..rec.info
        },
        ended_ms: rec.ended_ms.max(time_ms),
        layout: LAYOUT,
    };
    store::put(st, Table::RecordingIndex, &sid, &rec)
}

/// Which recordings a viewer may see (`audit::may_see`).
pub type Filter<'a> = &'a dyn Fn(&RecordingInfo) -> bool;

/// One page of the timeline, newest first: the recordings and the cursor to go on from
/// (`None`: no more). `user` narrows the scan to one user name's timeline; `visible`
/// decides what the caller may see.
pub fn page(
    st: &dyn Store,
    user: Option<&str>,
    visible: Filter<'_>,
    cursor: Option<&str>,
    limit: u32,
) -> Result<(Vec<RecordingInfo>, Option<String>), RpcError> {
    let limit = if limit == 0 {
        PAGE_DEFAULT
    } else {
        limit.min(PAGE_MAX)
    } as usize;
    let prefix = match user {
        Some(u) => format!("u/{u}/"),
        None => "a/".to_string(),
    };
    let mut from = match cursor {
        None | Some("") => prefix.clone(),
        Some(c) => {
            if !valid_cursor(c) {
                return Err(invalid(format!(
                    "bad recordings cursor {c:?}: use the one the previous page returned"
                )));
            }
            format!("{prefix}{c}\0")
        }
    };
    let mut out = Vec::new();
    let (mut bytes, mut examined) = (0usize, 0usize);
    let mut last: Option<String> = None;
    loop {
        let rows = st.scan_from(Table::RecordingTimeline, &prefix, &from, SCAN_BATCH)?;
        let n = rows.len();
        for (key, _) in rows {
            if out.len() >= limit || bytes >= PAGE_BYTES || examined >= PAGE_SCAN_BUDGET {
                // A full page with an entry after it: more to come from the last one taken.
                return Ok((out, last));
            }
            examined += 1;
            let rest = &key[prefix.len()..];
            last = Some(rest.to_string());
            let Some((_, sid)) = rest.split_once('/') else {
                continue;
            };
            let Some(rec) = store::get::<IndexRecord>(st, Table::RecordingIndex, sid)? else {
                continue;
            };
            if !visible(&rec.info) || user.is_some_and(|u| u != rec.info.user) {
                continue;
            }
            bytes += encoded_estimate(&rec.info);
            out.push(rec.info);
        }
        if n < SCAN_BATCH {
            return Ok((out, None));
        }
        from = match &last {
            Some(l) => format!("{prefix}{l}\0"),
            None => return Ok((out, None)),
        };
    }
}

/// `INV/SESSION`: 20 digits, a slash, a session id.
fn valid_cursor(c: &str) -> bool {
    c.len() > 21
        && c.as_bytes()[..20].iter().all(u8::is_ascii_digit)
        && c.as_bytes()[20] == b'/'
        && acceptable_session_id(&c[21..])
}

fn encoded_estimate(r: &RecordingInfo) -> usize {
    32 + r.session_id.len() + r.device.len() + r.user.len() + r.login.len() + r.user_id.len()
}

/// The index record of a session, if the viewer may see it.
pub fn info(
    st: &dyn Store,
    sid: &str,
    visible: Filter<'_>,
) -> Result<Option<IndexRecord>, StoreError> {
    Ok(store::get::<IndexRecord>(st, Table::RecordingIndex, sid)?.filter(|r| visible(&r.info)))
}

/// Up to [`PIECE`] bytes of a recording from `offset`, and its total length. The work is a
/// scan of the few pieces that hold those bytes, wherever `offset` is.
pub fn read(
    st: &dyn Store,
    sid: &str,
    visible: Filter<'_>,
    offset: u64,
) -> Result<(Vec<u8>, u64), RpcError> {
    let Some(rec) = info(st, sid, visible)? else {
        return Err(not_found(format!("no recording of session {sid}")));
    };
    if rec.layout < LAYOUT {
        return read_old(st, sid, offset, rec.info.bytes);
    }
    let total = rec.info.bytes;
    let prefix = piece_prefix(sid);
    let mut data = Vec::new();
    let mut pos = offset;
    let mut from = piece_key(sid, offset.saturating_add(1));
    let mut batch = PIECE_SCAN;
    while data.len() < PIECE && pos < total {
        let rows = st.scan_from(Table::Recordings, &prefix, &from, batch)?;
        let n = rows.len();
        for (key, piece) in rows {
            from = format!("{key}\0");
            let Ok(end) = key[prefix.len()..].parse::<u64>() else {
                continue;
            };
            let start = end.saturating_sub(piece.len() as u64);
            let skip = pos.saturating_sub(start).min(piece.len() as u64) as usize;
            let take = &piece[skip..];
            let take = &take[..take.len().min(PIECE - data.len())];
            data.extend_from_slice(take);
            pos = start.max(pos) + take.len() as u64;
            if data.len() >= PIECE {
                break;
            }
        }
        if n < batch {
            break;
        }
        batch = (batch * 2).min(PIECE_SCAN_MAX);
    }
    Ok((data, total))
}

/// A recording another authority (of an older version) is still writing the old way.
fn read_old(
    st: &dyn Store,
    sid: &str,
    offset: u64,
    total: u64,
) -> Result<(Vec<u8>, u64), RpcError> {
    let mut data = Vec::new();
    let mut pos = 0u64;
    for (_, chunk) in old_pieces(st, sid)? {
        let len = chunk.len() as u64;
        if pos + len <= offset {
            pos += len;
            continue;
        }
        let start = offset.saturating_sub(pos) as usize;
        data.extend_from_slice(&chunk[start.min(chunk.len())..]);
        pos += len;
        if data.len() >= PIECE {
            break;
        }
    }
    data.truncate(PIECE);
    Ok((data, total))
}

/// The pieces of a session in the old layout (`SESSION/SEQ`), in order.
fn old_pieces(st: &dyn Store, sid: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let prefix = format!("{sid}/");
    Ok(st
        .scan_prefix(Table::Recordings, &prefix)?
        .into_iter()
        .filter(|(k, _)| {
            let rest = &k[prefix.len()..];
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
        })
        .collect())
}

/// Rewrites one recording of the old layout: its pieces under offset keys, its timeline
/// entries, then the index record says so, then the old keys go. Every step can run again
/// after a crash and write the same thing.
fn migrate_one(st: &dyn Store, mut rec: IndexRecord) -> Result<IndexRecord, StoreError> {
    let sid = rec.info.session_id.clone();
    if !acceptable_session_id(&sid) {
        return Ok(rec);
    }
    let old = old_pieces(st, &sid)?;
    let mut end = 0u64;
    for (_, piece) in &old {
        if piece.is_empty() {
            continue;
        }
        end += piece.len() as u64;
        st.put(Table::Recordings, &piece_key(&sid, end), piece.clone())?;
    }
    rec.info.bytes = end;
    rec.ended_ms = rec.ended_ms.max(rec.info.started_ms);
    rec.layout = LAYOUT;
    for k in timeline_keys(&rec.info) {
        st.put(Table::RecordingTimeline, &k, Vec::new())?;
    }
    store::put(st, Table::RecordingIndex, &sid, &rec)?;
    for (k, _) in old {
        st.delete(Table::Recordings, &k)?;
    }
    Ok(rec)
}

/// Brings a store from before paging to the current layout, once, when the authority opens
/// it (before it serves). With several authorities on one database, one claims the work;
/// the others serve meanwhile (old recordings read the old way until rewritten). Returns how
/// many recordings were rewritten.
pub fn migrate(st: &dyn Store, now_ms: u64) -> Result<usize, StoreError> {
    let old = st.get(Table::AuditState, LAYOUT_KEY)?;
    let state: Option<LayoutState> = old.as_deref().and_then(|b| serde_json::from_slice(b).ok());
    match &state {
        Some(s) if s.layout >= LAYOUT => return Ok(0),
        Some(s) if now_ms.saturating_sub(s.migrating_since_ms) < MIGRATION_STALE_MS => {
            return Ok(0)
        }
        _ => {}
    }
    let claim = serde_json::to_vec(&LayoutState {
        layout: 0,
        migrating_since_ms: now_ms,
    })
    .map_err(|e| StoreError::Encode(e.to_string()))?;
    if !st.compare_and_swap(Table::AuditState, LAYOUT_KEY, old.as_deref(), Some(claim))? {
        return Ok(0);
    }
    let mut n = 0usize;
    for (sid, rec) in store::list::<IndexRecord>(st, Table::RecordingIndex, "")? {
        if rec.layout < LAYOUT {
            migrate_one(st, rec)?;
            n += 1;
            if n.is_multiple_of(1000) {
                tracing::info!(sid = %sid, "recordings: {n} rewritten for paging");
            }
        }
    }
    store::put(
        st,
        Table::AuditState,
        LAYOUT_KEY,
        &LayoutState {
            layout: LAYOUT,
            migrating_since_ms: 0,
        },
    )?;
    st.flush()?;
    if n > 0 {
        tracing::info!("recordings: {n} rewritten for paging and streaming");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use crate::store::SledStore;

    /// A store that counts what reads return, to check the work per request.
    struct Counting {
        inner: SledStore,
        scanned_bytes: AtomicU64,
        prefix_scans: AtomicU64,
    }

    impl Store for Counting {
        fn get(&self, t: Table, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let v = self.inner.get(t, k)?;
            let n = v.as_ref().map_or(0, |v| v.len() as u64);
            self.scanned_bytes.fetch_add(n, Ordering::Relaxed);
            Ok(v)
        }
        fn put(&self, t: Table, k: &str, v: Vec<u8>) -> Result<(), StoreError> {
            self.inner.put(t, k, v)
        }
        fn delete(&self, t: Table, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.delete(t, k)
        }
        fn scan_prefix(&self, t: Table, p: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.prefix_scans.fetch_add(1, Ordering::Relaxed);
            self.inner.scan_prefix(t, p)
        }
        fn scan_from(
            &self,
            t: Table,
            p: &str,
            from: &str,
            limit: usize,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            let rows = self.inner.scan_from(t, p, from, limit)?;
            let n: usize = rows.iter().map(|(k, v)| k.len() + v.len()).sum();
            self.scanned_bytes.fetch_add(n as u64, Ordering::Relaxed);
            Ok(rows)
        }
        fn compare_and_swap(
            &self,
            t: Table,
            k: &str,
            e: Option<&[u8]>,
            n: Option<Vec<u8>>,
        ) -> Result<bool, StoreError> {
            self.inner.compare_and_swap(t, k, e, n)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
    }

    fn counting() -> (tempfile::TempDir, Arc<Counting>) {
        let dir = tempfile::tempdir().unwrap();
        let inner = SledStore::open(&dir.path().join("store")).unwrap();
        let st = Arc::new(Counting {
            inner,
            scanned_bytes: AtomicU64::new(0),
            prefix_scans: AtomicU64::new(0),
        });
        (dir, st)
    }

    fn info(sid: &str, user: &str, started_ms: u64) -> RecordingInfo {
        RecordingInfo {
            session_id: sid.into(),
            device: "dev1".into(),
            user: user.into(),
            login: "root".into(),
            started_ms,
            bytes: 0,
            user_id: format!("id-{user}"),
        }
    }

    fn everyone(_: &RecordingInfo) -> bool {
        true
    }

    /// 10,000 recordings: pages of any size come back newest first, every recording once,
    /// and a page reads only its own entries; a user's pages hold only theirs.
    #[test]
    fn ten_thousand_recordings_page_newest_first_without_gaps_or_duplicates() {
        let (_dir, st) = counting();
        let t0 = 1_800_000_000_000u64;
        let n = 10_000u64;
        // Started in a shuffled order (i * 7919 mod n), two users, some at the same ms.
        for i in 0..n {
            let k = (i * 7919) % n;
            let user = if k.is_multiple_of(3) { "bob" } else { "alice" };
            let rec = info(&format!("s{k:05}"), user, t0 + (k / 2) * 1000);
            append(&*st, rec, t0, b"x").unwrap();
        }
        let started = std::time::Instant::now();
        let (first, _) = page(&*st, None, &everyone, None, 50).unwrap();
        eprintln!(
            "MEASURE first page of 50 of {n} recordings: {:?}",
            started.elapsed()
        );
        assert_eq!(first.len(), 50);
        for limit in [1u32, 37, 100, 1000] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            let mut pages = 0;
            loop {
                let before = st.scanned_bytes.load(Ordering::Relaxed);
                let (p, next) = page(&*st, None, &everyone, cursor.as_deref(), limit).unwrap();
                let read = st.scanned_bytes.load(Ordering::Relaxed) - before;
                assert!(p.len() <= limit.min(PAGE_MAX) as usize);
                // A page reads its own entries (and one batch of keys), never the table.
                assert!(read < 64 * 1024, "a page of {limit} read {read} bytes");
                pages += 1;
                seen.extend(p);
                match next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(seen.len() as u64, n, "pages of {limit}");
            let ids: HashSet<&str> = seen.iter().map(|r| r.session_id.as_str()).collect();
            assert_eq!(ids.len() as u64, n, "duplicates in pages of {limit}");
            assert!(
                seen.windows(2).all(|w| w[0].started_ms >= w[1].started_ms),
                "not newest first in pages of {limit}"
            );
            assert!(pages as u64 >= n / u64::from(limit.min(PAGE_MAX)));
        }
        assert_eq!(st.prefix_scans.load(Ordering::Relaxed), 0);
        // One user's timeline: only theirs, all of them.
        let bob = |r: &RecordingInfo| r.user_id == "id-bob";
        let mut seen = 0;
        let mut cursor: Option<String> = None;
        loop {
            let (p, next) = page(&*st, Some("bob"), &bob, cursor.as_deref(), 100).unwrap();
            assert!(p.iter().all(|r| r.user == "bob"));
            seen += p.len();
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(
            seen as u64,
            (0..n).filter(|k| k.is_multiple_of(3)).count() as u64
        );
        // A cursor that is not one is a clear error.
        let e = page(&*st, None, &everyone, Some("../x"), 10).unwrap_err();
        assert!(e.message.contains("bad recordings cursor"), "{e}");
    }

    /// A 100 MB session, in the agent's 16 KiB pieces, reads back byte-exact from offset 0,
    /// each answer at most [`PIECE`] and each read touching only the pieces it returns; any
    /// offset (mid-piece included) answers from there.
    #[test]
    fn a_100_mb_recording_reads_back_exact_with_bounded_work_per_read() {
        let (_dir, st) = counting();
        let total = 100 * 1024 * 1024usize;
        let piece = 16 * 1024 + 7; // not aligned with the answers
        let byte = |i: usize| b"abcdefghijklmnopqrstuvwxyz0123456789\n"[(i * 31 + i / 4093) % 37];
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut at = 0;
        let mut t = 1_800_000_000_000u64;
        let started = std::time::Instant::now();
        while at < total {
            let len = piece.min(total - at);
            let data: Vec<u8> = (at..at + len).map(byte).collect();
            hasher.update(&data);
            t += 1;
            append(&*st, info("big", "alice", 1_800_000_000_000), t, &data).unwrap();
            at += len;
        }
        let want = hasher.finish();
        eprintln!("MEASURE write 100 MB: {:?}", started.elapsed());
        let rec = store::get::<IndexRecord>(&*st, Table::RecordingIndex, "big")
            .unwrap()
            .unwrap();
        assert_eq!(rec.info.bytes, total as u64);
        assert_eq!(rec.ended_ms, t);

        let started = std::time::Instant::now();
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut offset = 0u64;
        let mut reads = 0u64;
        loop {
            let before = st.scanned_bytes.load(Ordering::Relaxed);
            let (data, len) = read(&*st, "big", &everyone, offset).unwrap();
            let work = st.scanned_bytes.load(Ordering::Relaxed) - before;
            assert_eq!(len, total as u64);
            assert!(data.len() <= PIECE);
            // The pieces that hold the answer, one piece more at most, and the index record.
            assert!(
                work <= (PIECE + 2 * piece + 4096) as u64,
                "a read at {offset} scanned {work} bytes"
            );
            if data.is_empty() {
                break;
            }
            reads += 1;
            hasher.update(&data);
            offset += data.len() as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "MEASURE read 100 MB in {reads} reads: {secs:.2} s ({:.0} MB/s)",
            100.0 / secs.max(1e-9)
        );
        assert_eq!(offset, total as u64);
        assert_eq!(hasher.finish().as_ref(), want.as_ref(), "not byte-exact");
        assert_eq!(st.prefix_scans.load(Ordering::Relaxed), 0);
        // From inside a piece, and at the very end.
        for off in [1u64, piece as u64 - 1, 12_345_678, total as u64 - 3] {
            let (data, _) = read(&*st, "big", &everyone, off).unwrap();
            let expect: Vec<u8> = (off as usize..(off as usize + PIECE).min(total))
                .map(byte)
                .collect();
            assert_eq!(data, expect, "from {off}");
        }
        let (data, _) = read(&*st, "big", &everyone, total as u64 + 10).unwrap();
        assert!(data.is_empty());
        assert!(read(&*st, "big", &|_: &RecordingInfo| false, 0).is_err());
    }

    /// A store from before paging (pieces by sequence number, no timeline) is rewritten
    /// when opened: the recordings list and read back the same; the rewrite runs once.
    #[test]
    fn old_recordings_are_rewritten_on_open_and_stay_readable() {
        let (_dir, st) = counting();
        for (n, sid) in ["old1", "old2"].iter().enumerate() {
            let mut rec = info(sid, "alice", 1_700_000_000_000 + n as u64);
            rec.bytes = 11;
            let old = serde_json::to_vec(&rec).unwrap();
            st.put(Table::RecordingIndex, sid, old).unwrap();
            st.put(
                Table::Recordings,
                &format!("{sid}/{:020}", 3),
                b"hello ".to_vec(),
            )
            .unwrap();
            st.put(
                Table::Recordings,
                &format!("{sid}/{:020}", 10),
                b"world".to_vec(),
            )
            .unwrap();
        }
        // Readable the old way before the rewrite.
        let (data, _) = read(&*st, "old1", &everyone, 2).unwrap();
        assert_eq!(data, b"llo world");
        assert_eq!(migrate(&*st, 1).unwrap(), 2);
        assert_eq!(migrate(&*st, 2).unwrap(), 0, "the rewrite runs once");
        let (p, next) = page(&*st, None, &everyone, None, 10).unwrap();
        let ids: Vec<&str> = p.iter().map(|r| r.session_id.as_str()).collect();
        assert_eq!(ids, ["old2", "old1"]);
        assert!(next.is_none());
        let (data, total) = read(&*st, "old1", &everyone, 2).unwrap();
        assert_eq!((data.as_slice(), total), (&b"llo world"[..], 11));
        let keys: Vec<String> = st
            .inner
            .scan_prefix(Table::Recordings, "old1/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [format!("old1/e{:020}", 6), format!("old1/e{:020}", 11)]
        );
        // New pieces go on at the end.
        append(&*st, info("old1", "alice", 0), 5, b"!").unwrap();
        let (data, total) = read(&*st, "old1", &everyone, 0).unwrap();
        assert_eq!((data.as_slice(), total), (&b"hello world!"[..], 12));
    }
}
