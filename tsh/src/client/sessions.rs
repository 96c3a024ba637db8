//! `tsh sessions ls` and `tsh join`: shared sessions (issue 29). The list comes from the
//! authority (a signed user action the gateway only carries), built from the device-signed
//! `session.start`, `session.join` and `session.leave` events it verified and filtered by
//! the user's roles. Joining dials the session's device like `tsh ssh` (end to end, with the
//! user's own certificate) and asks its agent to attach with the exec request
//! `edgeport-join@edgeport.dev SESSION_ID MODE`; the agent decides from the certificate.

use std::sync::Arc;

use edgeport_proto::rpc::{AccessAction, LiveSession};
use edgeport_proto::tunnel::ClientReply;
use serde_json::{json, Value};

use super::cli::{Format, Global, JoinArgs};
use super::forwarding::Inbound;
use super::profile::{load_creds, Creds};
use super::ssh::{self, SessionSpec};
use super::{gateway, term, CliError};

/// The exec request the agent takes as a join (`edge-agent/src/ssh/shared.rs`).
const JOIN_COMMAND: &str = "edgeport-join@edgeport.dev";

async fn fetch(g: &Global, creds: &Creds) -> Result<Vec<LiveSession>, CliError> {
    match super::requests::send_action(g, creds, AccessAction::LiveSessions).await? {
        ClientReply::LiveSessions(v) => Ok(v),
        other => Err(gateway::unexpected(&other)),
    }
}

fn session_json(s: &LiveSession) -> Value {
    json!({
        "session_id": s.session_id,
        "device": s.device,
        "user": s.user,
        "login": s.login,
        "kind": s.kind,
        "started": crate::schema::time(s.started_ms / 1000),
        "participants": s.participants,
    })
}

pub async fn list(g: &Global, format: Format) -> Result<i32, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    let all = fetch(g, &creds).await?;
    match format {
        Format::Text => {
            let mut t = crate::text::Table::new(&[
                "ID",
                "DEVICE",
                "USER",
                "LOGIN",
                "KIND",
                "STARTED",
                "PARTICIPANTS",
            ]);
            for s in &all {
                t.row(vec![
                    s.session_id.clone(),
                    s.device.clone(),
                    s.user.clone(),
                    s.login.clone(),
                    s.kind.clone(),
                    edgeport_proto::util::format_time(s.started_ms / 1000),
                    s.participants.join(", "),
                ]);
            }
            t.print();
        }
        f => f.print(&Value::Array(all.iter().map(session_json).collect())),
    }
    Ok(0)
}

pub async fn join(g: &Global, a: &JoinArgs) -> Result<i32, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    let session = fetch(g, &creds)
        .await?
        .into_iter()
        .find(|s| s.session_id == a.session_id)
        .ok_or_else(|| {
            CliError::msg(format!(
                "no live session {} that you may join (see `tsh sessions ls`)",
                a.session_id
            ))
        })?;
    let login = a
        .login
        .clone()
        .or_else(|| creds.logins().first().cloned())
        .ok_or_else(|| CliError::msg("your certificate allows no logins: ask an administrator"))?;
    let device = session.device.as_str();
    let tty = term::is_tty(0);
    let (mfa, (stream, _)) = super::commands::dial_with_mfa(
        &creds,
        g.transport,
        device,
        device,
        a.mfa_code.as_deref(),
        tty,
    )
    .await?;
    let ssh_creds = match &mfa {
        Some(m) => m.ssh_creds(&creds),
        None => creds.clone(),
    };
    let inbound = Arc::new(Inbound::new(None));
    let conn = ssh::connect(stream, &ssh_creds, device, &login, tty, inbound).await?;
    if tty {
        eprintln!(
            "joining session {} of {} on {device} as {} (Ctrl-] leaves)",
            session.session_id, session.user, a.mode
        );
    }
    ssh::run_session(
        &conn,
        SessionSpec {
            command: Some(format!("{JOIN_COMMAND} {} {}", session.session_id, a.mode)),
            tty,
            no_stdin: false,
            forward_agent: false,
        },
    )
    .await
}
