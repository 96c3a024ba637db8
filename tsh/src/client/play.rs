//! `tsh recordings ls` and `tsh play SESSION`: recorded interactive sessions (asciicast v2,
//! as the device recorded them), fetched from the authority through the gateway. A user sees
//! the recordings of their own sessions.

use std::time::Duration;

use edgeport_net::read_frame;
use edgeport_proto::tunnel::{ClientReply, ClientRequest};
use edgeport_proto::util::format_time;

use super::cli::{Format, Global, PlayArgs, PlayFormat, RecordingsArgs};
use super::profile::load_creds;
use super::{gateway, CliError};

/// Largest recording tsh holds in memory.
const MAX_RECORDING: usize = 512 * 1024 * 1024;

pub async fn list(g: &Global, args: &RecordingsArgs) -> Result<i32, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    let tls = gateway::creds_config(&creds)?;
    let recs =
        match gateway::user_request(&creds, tls, g.transport, &ClientRequest::Recordings).await? {
            (ClientReply::Recordings(r), _) => r,
            (ClientReply::Refused(e), _) => return Err(CliError::msg(e.message)),
            (other, _) => return Err(gateway::unexpected(&other)),
        };
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
        }
    }
    Ok(0)
}

async fn fetch(g: &Global, session_id: &str) -> Result<Vec<u8>, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    let tls = gateway::creds_config(&creds)?;
    let req = ClientRequest::Recording {
        session_id: session_id.to_string(),
    };
    let (mut reply, mut stream) = gateway::user_request(&creds, tls, g.transport, &req).await?;
    let mut data = Vec::new();
    loop {
        match reply {
            ClientReply::RecordingData { data: d, more } => {
                data.extend_from_slice(&d);
                if data.len() > MAX_RECORDING {
                    return Err(CliError::msg("the recording is too large to play here"));
                }
                if !more {
                    return Ok(data);
                }
            }
            ClientReply::Refused(e) => return Err(CliError::msg(e.message)),
            other => return Err(gateway::unexpected(&other)),
        }
        reply = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut stream))
            .await
            .map_err(|_| CliError::msg("the gateway stopped sending the recording"))?
            .map_err(|e| CliError::msg(format!("reading the recording: {e}")))?;
    }
}

/// The output events of an asciicast v2 recording: (seconds, text).
pub fn output_events(cast: &str) -> Result<Vec<(f64, String)>, CliError> {
    let mut lines = cast.lines();
    let header: serde_json::Value = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| CliError::msg("the recording has no asciicast header"))?;
    if header.get("version").and_then(|v| v.as_u64()) != Some(2) {
        return Err(CliError::msg("not an asciicast v2 recording"));
    }
    let mut out = Vec::new();
    for l in lines {
        let Ok(serde_json::Value::Array(a)) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if let (Some(t), Some("o"), Some(text)) = (
            a.first().and_then(|v| v.as_f64()),
            a.get(1).and_then(|v| v.as_str()),
            a.get(2).and_then(|v| v.as_str()),
        ) {
            out.push((t, text.to_string()));
        }
    }
    Ok(out)
}

pub async fn play(g: &Global, args: &PlayArgs) -> Result<i32, CliError> {
    let data = fetch(g, &args.session_id).await?;
    match args.format {
        PlayFormat::Cast => crate::out::write_stdout_bytes(&data),
        PlayFormat::Text | PlayFormat::Play => {
            let cast = String::from_utf8_lossy(&data);
            let events = output_events(&cast)?;
            let speed = if args.speed > 0.0 { args.speed } else { 1.0 };
            let start = tokio::time::Instant::now();
            for (t, text) in events {
                if args.format == PlayFormat::Play {
                    let at = start + Duration::from_secs_f64((t / speed).clamp(0.0, 86400.0));
                    tokio::time::sleep_until(at).await;
                }
                crate::out::write_stdout_bytes(text.as_bytes());
            }
        }
    }
    Ok(0)
}
