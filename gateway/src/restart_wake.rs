//! Waking the agents of a crashed gateway: the restarted process sends each QUIC connection
//! its predecessor had a stateless reset at once, instead of waiting for each agent's next
//! keep-alive to draw one (up to 55 s later: the idle agent's keep-alive ceiling,
//! `edge-agent/src/nat_keepalive.rs`). Issue 26: 10,000 agents back within 30 s.
//!
//! While it runs, the gateway keeps a book of its QUIC connections: the peer's address and the
//! connection id the peer sends to (the one this gateway chose at the handshake; an agent
//! keeps it unless it moves to another local address), saved to `DATA/quic-peers` every
//! [`SAVE_EVERY`] when something changed. A reset token is HMAC-SHA256(reset key, id) cut to
//! 16 bytes (quinn's `ResetToken`), and the key survives restarts
//! (`identity::load_or_make_reset_key`), so the next process can compute every old token. At
//! start it takes the book (reads and deletes it) and sends the resets, paced: at most
//! [`WAKE_PER_TICK`] per [`TICK`], and none while connections for half as many as the port's
//! handshake slots wait for their handshake (their source's budget included),
//! so the agents come back as fast as the gateway takes their handshakes and not all in the
//! same second (each still adds its own backoff jitter).
//!
//! Why it is safe: a reset ends only the connection whose token it carries, which only this
//! gateway's key produces. A stale entry (the device moved, or reconnected since) reaches an
//! address where no token matches and is dropped there. Each entry gets one 41-byte datagram,
//! to an address that was talking to this gateway seconds before the crash. Connections from
//! the last [`SAVE_EVERY`] before a crash, and agents that moved, are not in the book: their
//! next keep-alive draws the reset, as before.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::quic::QuicPort;

/// The book's file in the gateway's data dir.
pub const BOOK_FILE: &str = "quic-peers";
/// How often the book is saved when it changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Saved at least every this many [`SAVE_EVERY`] (a minute), for addresses that moved.
const REFRESH_TICKS: u32 = 12;
/// Pacing of the resets after a restart: at most this many per [`TICK`] (2,000 a second).
pub const WAKE_PER_TICK: usize = 20;
pub const TICK: Duration = Duration::from_millis(10);
/// Bytes of a stateless reset: a short-header first byte, random bytes, the 16-byte token.
/// Longer than quinn's minimum (21) and than a short header with an 8-byte id.
const RESET_LEN: usize = 41;
const TOKEN_LEN: usize = 16;

/// One connection of the book.
struct Entry {
    cid: Vec<u8>,
    conn: quinn::Connection,
}

/// The QUIC connections of this process and the ids their peers send to.
#[derive(Default)]
pub struct PeerBook {
    entries: Mutex<HashMap<usize, Entry>>,
    changed: AtomicBool,
}

impl PeerBook {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Books a connection that finished its handshake with id `cid`.
    pub fn add(&self, conn: &quinn::Connection, cid: &[u8]) {
        let entry = Entry {
            cid: cid.to_vec(),
            conn: conn.clone(),
        };
        self.map().insert(conn.stable_id(), entry);
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Forgets a connection that ended.
    pub fn remove(&self, stable_id: usize) {
        if self.map().remove(&stable_id).is_some() {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// The book as saved: one `ADDRESS HEX-ID` line per connection (addresses as they are
    /// now: QUIC follows a device that changed networks).
    fn render(&self) -> String {
        let map = self.map();
        let mut out = String::with_capacity(map.len() * 40);
        for e in map.values() {
            out.push_str(&format!(
                "{} {}\n",
                e.conn.remote_address(),
                hex::encode(&e.cid)
            ));
        }
        out
    }
}

/// Parses a saved book; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<(SocketAddr, Vec<u8>)> {
    text.lines()
        .filter_map(|l| {
            let (addr, cid) = l.split_once(' ')?;
            let cid = hex::decode(cid.trim()).ok()?;
            (!cid.is_empty() && cid.len() <= 20).then_some((addr.parse().ok()?, cid))
        })
        .collect()
}

/// A stateless reset for connection id `cid`: `random` fills the bytes before the token
/// (at least `RESET_LEN - TOKEN_LEN` of them are used).
pub fn reset_packet(reset_key: &ring::hmac::Key, cid: &[u8], random: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; RESET_LEN];
    let pad = RESET_LEN - TOKEN_LEN;
    for (dst, src) in p[..pad].iter_mut().zip(random) {
        *dst = *src;
    }
    // A short header: form bit clear, fixed bit set.
    p[0] = (p[0] & 0x3f) | 0x40;
    let tag = ring::hmac::sign(reset_key, cid);
    p[pad..].copy_from_slice(&tag.as_ref()[..TOKEN_LEN]);
    p
}

/// Reads and deletes the book a previous process left (empty if there is none).
pub fn take(data_dir: &Path) -> Vec<(SocketAddr, Vec<u8>)> {
    let p = data_dir.join(BOOK_FILE);
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Vec::new();
    };
    if let Err(e) = std::fs::remove_file(&p) {
        tracing::warn!(path = %p.display(), "cannot remove the old QUIC peer book: {e}");
    }
    parse(&text)
}

/// Saves the book every [`SAVE_EVERY`] when it changed, until `shutdown`; then deletes it
/// (a clean stop closed every connection itself).
pub async fn keep(book: std::sync::Arc<PeerBook>, data_dir: PathBuf, shutdown: CancellationToken) {
    let p = data_dir.join(BOOK_FILE);
    let mut tick = tokio::time::interval(SAVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        // Addresses change without an add or a remove (migration): save at least every
        // REFRESH_TICKS ticks.
        quiet += 1;
        if !book.changed.swap(false, Ordering::Relaxed) && quiet < REFRESH_TICKS {
            continue;
        }
        quiet = 0;
        let text = book.render();
        let p2 = p.clone();
        let r = tokio::task::spawn_blocking(move || {
            edgeport_proto::util::write_private(&p2, text.as_bytes())
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(path = %p.display(), "cannot save the QUIC peer book: {e}");
        }
    }
    let _ = std::fs::remove_file(&p);
}

/// Sends the stateless resets of a previous process's book, paced (see the module docs).
pub async fn wake(
    socket: UdpSocket,
    peers: Vec<(SocketAddr, Vec<u8>)>,
    reset_key: ring::hmac::Key,
    port: std::sync::Arc<QuicPort>,
    shutdown: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    let total = peers.len();
    tracing::info!(
        connections = total,
        "waking the agents of the previous gateway process with stateless resets"
    );
    let started = std::time::Instant::now();
    let mut sent = 0usize;
    let mut failed = 0usize;
    let mut pending = peers.into_iter().peekable();
    let mut tick = tokio::time::interval(TICK);
    while pending.peek().is_some() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let admitting = port.admitting.load(std::sync::atomic::Ordering::Relaxed);
        if admitting * 2 >= port.admission.max_handshakes {
            continue;
        }
        let random = edgeport_proto::keys::random_bytes(RESET_LEN * WAKE_PER_TICK)
            .unwrap_or_else(|_| vec![0x5a; RESET_LEN * WAKE_PER_TICK]);
        for chunk in random.chunks(RESET_LEN).take(WAKE_PER_TICK) {
            let Some((addr, cid)) = pending.peek() else {
                break;
            };
            let packet = reset_packet(&reset_key, cid, chunk);
            match socket.send_to(&packet, addr) {
                Ok(_) => sent += 1,
                // The socket's buffer is full: try this one again next tick.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    failed += 1;
                    tracing::debug!(%addr, "stateless reset not sent: {e}");
                }
            }
            pending.next();
        }
    }
    tracing::info!(
        sent,
        failed,
        secs = started.elapsed().as_secs_f64(),
        "woke the agents of the previous gateway process"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn book_lines_round_trip_and_junk_is_skipped() {
        let text = "127.0.0.1:4433 0011223344556677\n\
                    [::1]:9 aabbccddeeff0011\n\
                    garbage\n\
                    1.2.3.4:5 nothex\n\
                    1.2.3.4:5 \n";
        let got = parse(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "127.0.0.1:4433".parse::<SocketAddr>().unwrap());
        assert_eq!(got[0].1, vec![0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
        assert_eq!(got[1].0, "[::1]:9".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn reset_carries_quinns_token_in_a_short_header() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7u8; 32]);
        let cid = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let p = reset_packet(&key, &cid, &[0xff; RESET_LEN]);
        assert_eq!(p.len(), RESET_LEN);
        assert_eq!(p[0] & 0xc0, 0x40, "short header with the fixed bit");
        // quinn's ResetToken::new: the HMAC of the id under the endpoint's reset key.
        let tag = ring::hmac::sign(&key, &cid);
        assert_eq!(&p[RESET_LEN - TOKEN_LEN..], &tag.as_ref()[..TOKEN_LEN]);
    }
}
