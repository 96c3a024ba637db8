//! Session recordings: the PTY output of interactive sessions as asciicast v2 lines
//! (`[seconds, "o", text]` after a header line), shipped in `recording.chunk` events of the
//! session so that they travel, chain and verify like every other event.

use std::time::Instant;

use edgeport_proto::audit::RECORDING_CHUNK;

/// Bytes of asciicast text per chunk before it is emitted.
const CHUNK: usize = 16 * 1024;
/// Most time output sits in the recorder before it is emitted (seconds).
const MAX_AGE: f64 = 1.0;

#[derive(Debug)]
pub struct Recorder {
    session_id: String,
    user: String,
    login: String,
    started: Instant,
    buf: String,
    /// An incomplete UTF-8 sequence from the end of the last read.
    tail: Vec<u8>,
    oldest: Option<f64>,
    pub bytes: u64,
}

impl Recorder {
    pub fn new(
        session_id: &str,
        user: &str,
        login: &str,
        device: &str,
        cols: u32,
        rows: u32,
        term: &str,
    ) -> Self {
        let header = serde_json::json!({
            "version": 2,
            "width": cols.max(1),
            "height": rows.max(1),
            "timestamp": super::now_ms() / 1000,
            "title": format!("edgeport session {session_id}: {user} as {login} on {device}"),
            "env": { "TERM": term, "SHELL": "" },
        });
        let mut me = Self {
            session_id: session_id.to_string(),
            user: user.to_string(),
            login: login.to_string(),
            started: Instant::now(),
            buf: String::new(),
            tail: Vec::new(),
            oldest: None,
            bytes: 0,
        };
        me.buf.push_str(&header.to_string());
        me.buf.push('\n');
        me.oldest = Some(0.0);
        me
    }

    /// Terminal output.
    pub fn output(&mut self, data: &[u8]) {
        let t = self.started.elapsed().as_secs_f64();
        let mut bytes = std::mem::take(&mut self.tail);
        bytes.extend_from_slice(data);
        let text = match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_string(),
            Err(e) if e.error_len().is_none() => {
                // Incomplete character at the end: keep it for the next read.
                let (ok, rest) = bytes.split_at(e.valid_up_to());
                self.tail = rest.to_vec();
                String::from_utf8_lossy(ok).into_owned()
            }
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        if text.is_empty() {
            return;
        }
        let line = serde_json::json!([(t * 1_000_000.0).round() / 1_000_000.0, "o", text]);
        self.buf.push_str(&line.to_string());
        self.buf.push('\n');
        self.oldest.get_or_insert(t);
        if self.buf.len() >= CHUNK || self.oldest.is_some_and(|o| t - o >= MAX_AGE) {
            self.emit_chunk();
        }
    }

    /// An asciicast marker (`[seconds, "m", text]`): who joined or left a shared session.
    pub fn marker(&mut self, text: &str) {
        let t = self.started.elapsed().as_secs_f64();
        let line = serde_json::json!([(t * 1_000_000.0).round() / 1_000_000.0, "m", text]);
        self.buf.push_str(&line.to_string());
        self.buf.push('\n');
        self.oldest.get_or_insert(t);
    }

    fn emit_chunk(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.buf);
        self.bytes += data.len() as u64;
        self.oldest = None;
        super::event(RECORDING_CHUNK)
            .session(&self.session_id)
            .user(&self.user)
            .login(&self.login)
            .raw_field("data", data)
            .emit();
    }

    /// Emits what is left (the session ended).
    pub fn finish(&mut self) {
        if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.output(&tail);
        }
        self.emit_chunk();
    }
}
