//! `tsh recordings ls` and `tsh play SESSION`: recorded interactive sessions (asciicast v2,
//! as the device recorded them), fetched from the authority through the gateway. A user sees
//! the recordings of their own sessions.

use std::sync::Arc;
use std::time::Duration;

use edgeport_net::{read_frame, BoxedStream};
use edgeport_proto::audit::RecordingInfo;
use edgeport_proto::tunnel::{ClientReply, ClientRequest};
use edgeport_proto::util::format_time;

use super::cli::{Format, Global, PlayArgs, PlayFormat, RecordingsArgs, Transport};
use super::profile::{load_creds, Creds};
use super::{gateway, CliError};

/// Most recordings asked for per page (the authority caps pages at 100).
const PAGE: u32 = 100;
/// Longest line of a recording tsh holds while replaying it (the agent's pieces are 16 KiB).
const MAX_LINE: usize = 64 * 1024 * 1024;
/// Times a broken transfer is resumed from where it stopped.
const RESUMES: u32 = 3;

/// `tsh recordings ls`: the newest page (`--limit`), or every page in turn (`--all`),
/// newest first.
pub async fn list(g: &Global, args: &RecordingsArgs) -> Result<i32, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    let tls = gateway::creds_config(&creds)?;
    let want = if args.all {
        usize::MAX
    } else {
        args.limit as usize
    };
    let mut recs: Vec<RecordingInfo> = Vec::new();
    let mut cursor: Option<String> = None;
    let more = loop {
        let limit = PAGE.min(u32::try_from(want - recs.len()).unwrap_or(PAGE));
        let req = ClientRequest::RecordingPage {
            cursor: cursor.take(),
            limit,
        };
        let (page, next) =
            match gateway::user_request(&creds, tls.clone(), g.transport, &req).await? {
                (ClientReply::RecordingPage { recordings, next }, _) => (recordings, next),
                (ClientReply::Refused(e), _) => return Err(CliError::msg(e.message)),
                (other, _) => return Err(gateway::unexpected(&other)),
            };
        recs.extend(page);
        match next {
            Some(c) if recs.len() < want => cursor = Some(c),
            next => break next.is_some(),
        }
    };
    recs.truncate(want);
    match args.format {
        Format::Json | Format::Yaml => args.format.print(&serde_json::Value::Array(
            recs.iter().map(crate::schema::recording).collect(),
        )),
        Format::Text => {
            let mut t = crate::text::Table::new(&[
                "SESSION", "DEVICE", "USER", "LOGIN", "STARTED", "BYTES",
            ]);
            for r in &recs {
                t.row(vec![
                    r.session_id.clone(),
                    r.device.clone(),
                    r.user.clone(),
                    r.login.clone(),
                    format_time(r.started_ms / 1000),
                    r.bytes.to_string(),
                ]);
            }
            t.print();
            if more {
                eprintln!("(the newest {}; --limit N or --all for more)", recs.len());
            }
        }
    }
    Ok(0)
}

/// A recording as it arrives, piece by piece from offset 0. A transfer that breaks is
/// resumed from the offset reached (`RecordingFrom`), a few times.
struct Pieces {
    creds: Creds,
    tls: Arc<rustls::ClientConfig>,
    transport: Transport,
    session_id: String,
    offset: u64,
    stream: Option<BoxedStream>,
    done: bool,
    resumes: u32,
}

impl Pieces {
    fn new(g: &Global, session_id: &str) -> Result<Self, CliError> {
        let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
        let tls = gateway::creds_config(&creds)?;
        Ok(Self {
            creds,
            tls,
            transport: g.transport,
            session_id: session_id.to_string(),
            offset: 0,
            stream: None,
            done: false,
            resumes: 0,
        })
    }

    /// Drops the broken stream; the next call asks again from the offset reached.
    fn resume(&mut self, why: String) -> Result<(), CliError> {
        self.stream = None;
        if self.resumes >= RESUMES {
            return Err(CliError::msg(why));
        }
        self.resumes += 1;
        tracing::debug!(offset = self.offset, "resuming the recording: {why}");
        Ok(())
    }

    /// The next piece, `None` at the end.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, CliError> {
        if self.done {
            return Ok(None);
        }
        loop {
            let reply = match self.stream.as_mut() {
                None => {
                    // Offset 0 asks as gateways from before resuming understand.
                    let req = if self.offset == 0 {
                        ClientRequest::Recording {
                            session_id: self.session_id.clone(),
                        }
                    } else {
                        ClientRequest::RecordingFrom {
                            session_id: self.session_id.clone(),
                            offset: self.offset,
                        }
                    };
                    let (reply, stream) =
                        gateway::user_request(&self.creds, self.tls.clone(), self.transport, &req)
                            .await?;
                    self.stream = Some(stream);
                    reply
                }
                Some(stream) => {
                    match tokio::time::timeout(Duration::from_secs(60), read_frame(stream)).await {
                        Ok(Ok(reply)) => reply,
                        Ok(Err(e)) => {
                            self.resume(format!("reading the recording: {e}"))?;
                            continue;
                        }
                        Err(_) => {
                            self.resume("the gateway stopped sending the recording".into())?;
                            continue;
                        }
                    }
                }
            };
            match reply {
                ClientReply::RecordingData { data, more } => {
                    self.offset += data.len() as u64;
                    self.done = !more;
                    self.resumes = 0;
                    return Ok(Some(data));
                }
                ClientReply::Refused(e) => return Err(CliError::msg(e.message)),
                other => return Err(gateway::unexpected(&other)),
            }
        }
    }
}
/// Turns asciicast v2 text, fed in pieces of any size, into output events (seconds,
/// text), holding at most one line.
#[derive(Default)]
pub struct CastParser {
    line: Vec<u8>,
    header: bool,
}

impl CastParser {
    /// The events completed by `data`.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<(f64, String)>, CliError> {
        let mut out = Vec::new();
        for part in data.split_inclusive(|b| *b == b'\n') {
            self.line.extend_from_slice(part);
            if self.line.len() > MAX_LINE {
                return Err(CliError::msg("a line of the recording is too long to play"));
            }
            if self.line.ends_with(b"\n") {
                let line = std::mem::take(&mut self.line);
                self.take_line(&line, &mut out)?;
            }
        }
        Ok(out)
    }

    /// The events of a last line without a newline; an error if there was no header.
    pub fn finish(&mut self) -> Result<Vec<(f64, String)>, CliError> {
        let mut out = Vec::new();
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.take_line(&line, &mut out)?;
        }
        if !self.header {
            return Err(CliError::msg("the recording has no asciicast header"));
        }
        Ok(out)
    }

    fn take_line(&mut self, line: &[u8], out: &mut Vec<(f64, String)>) -> Result<(), CliError> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        if !self.header {
            let header: serde_json::Value = serde_json::from_str(text)
                .map_err(|_| CliError::msg("the recording has no asciicast header"))?;
            if header.get("version").and_then(|v| v.as_u64()) != Some(2) {
                return Err(CliError::msg("not an asciicast v2 recording"));
            }
            self.header = true;
            return Ok(());
        }
        let Ok(serde_json::Value::Array(a)) = serde_json::from_str::<serde_json::Value>(text)
        else {
            return Ok(());
        };
        if let (Some(t), Some("o"), Some(s)) = (
            a.first().and_then(|v| v.as_f64()),
            a.get(1).and_then(|v| v.as_str()),
            a.get(2).and_then(|v| v.as_str()),
        ) {
            out.push((t, s.to_string()));
        }
        Ok(())
    }
}

/// `tsh play`: streams the recording from offset 0, one piece per request to the
/// authority, and writes (or replays) each piece as it comes: memory stays at one piece
/// and one line, however long the session was.
pub async fn play(g: &Global, args: &PlayArgs) -> Result<i32, CliError> {
    let mut pieces = Pieces::new(g, &args.session_id)?;
    let mut parser = CastParser::default();
    let speed = if args.speed > 0.0 { args.speed } else { 1.0 };
    let start = tokio::time::Instant::now();
    let show = |events: Vec<(f64, String)>| async move {
        for (t, text) in events {
            if args.format == PlayFormat::Play {
                let at = start + Duration::from_secs_f64((t / speed).clamp(0.0, 86400.0));
                tokio::time::sleep_until(at).await;
            }
            crate::out::write_stdout_bytes(text.as_bytes());
        }
    };
    while let Some(data) = pieces.next().await? {
        match args.format {
            PlayFormat::Cast => crate::out::write_stdout_bytes(&data),
            PlayFormat::Text | PlayFormat::Play => show(parser.feed(&data)?).await,
        }
    }
    if args.format != PlayFormat::Cast {
        show(parser.finish()?).await;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Pieces cut anywhere (inside a line, a UTF-8 sequence, a JSON string) give the same
    /// events as the whole file.
    #[test]
    fn pieces_of_any_size_parse_as_the_whole() {
        let cast = "{\"version\": 2, \"width\": 80, \"height\": 24}\n\
                    [0.1, \"o\", \"h\u{e9}llo \"]\n[0.2, \"i\", \"x\"]\n\
                    [0.3, \"o\", \"w\u{f6}rld\\r\\n\"]";
        let whole = {
            let mut p = CastParser::default();
            let mut e = p.feed(cast.as_bytes()).unwrap();
            e.extend(p.finish().unwrap());
            e
        };
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].1, "h\u{e9}llo ");
        for size in 1..cast.len() {
            let mut p = CastParser::default();
            let mut e = Vec::new();
            for piece in cast.as_bytes().chunks(size) {
                e.extend(p.feed(piece).unwrap());
            }
            e.extend(p.finish().unwrap());
            assert_eq!(e, whole, "pieces of {size}");
        }
        let mut p = CastParser::default();
        assert!(p.feed(b"{\"version\": 1}\n").is_err());
        let mut p = CastParser::default();
        assert!(p.finish().is_err(), "an empty recording has no header");
    }
}
