//! `tsh request create | ls | review`: access requests (just-in-time elevation). Each action
//! is signed with the private key of the user's certificate (the cluster, the time and a
//! random nonce included), so the gateway that carries it can neither make nor replay one;
//! the authority checks the signature against the certificate it checks too.

use edgeport_net::clock::now_secs;
use edgeport_proto::rpc::{
    sign_user_action, AccessAction, AccessRequestInfo, AccessReview, UserAction,
};
use edgeport_proto::tunnel::{ClientReply, ClientRequest};

use super::cli::{Format, Global, RequestCmd};
use super::profile::{load_creds, Creds};
use super::{gateway, CliError};

/// Signs `action` for the cluster of `creds` and sends it through the gateway.
async fn send(
    g: &Global,
    creds: &Creds,
    action: AccessAction,
) -> Result<Vec<AccessRequestInfo>, CliError> {
    match send_action(g, creds, action).await? {
        ClientReply::AccessRequests(v) => Ok(v),
        other => Err(gateway::unexpected(&other)),
    }
}

/// Signs `action` for the cluster of `creds`, sends it through the gateway and returns the
/// answer (a refusal as an error).
pub(super) async fn send_action(
    g: &Global,
    creds: &Creds,
    action: AccessAction,
) -> Result<ClientReply, CliError> {
    let nonce = edgeport_proto::keys::random_bytes(16)
        .map(hex::encode)
        .map_err(|e| CliError::msg(format!("cannot make a nonce: {e}")))?;
    let signed = UserAction {
        cluster: creds.cas.cluster.clone(),
        issued_at: now_secs(),
        nonce,
        action,
    };
    let (body, signature) = sign_user_action(&signed, &creds.key)
        .map_err(|e| CliError::msg(format!("cannot encode the request: {e}")))?;
    let tls = gateway::creds_config(creds)?;
    let req = ClientRequest::UserAction { body, signature };
    match gateway::user_request(creds, tls, g.transport, &req).await? {
        (ClientReply::Refused(e), _) => Err(CliError::msg(e.message)),
        (other, _) => Ok(other),
    }
}

pub async fn run(g: &Global, cmd: &RequestCmd) -> Result<i32, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    match cmd {
        RequestCmd::Create {
            roles,
            reason,
            format,
        } => {
            let action = AccessAction::Create {
                roles: roles.clone(),
                reason: reason.clone().unwrap_or_default(),
            };
            let made = send(g, &creds, action).await?;
            match format {
                Format::Text => {
                    for r in &made {
                        crate::outln!("{}", r.id);
                        eprintln!(
                            "requested {} (pending): an administrator approves it with \
                             `tctl requests approve {}`; then run `tsh login` again",
                            r.roles.join(","),
                            r.id
                        );
                    }
                }
                f => f.print(&serde_json::Value::Array(
                    made.iter().map(crate::schema::access_request).collect(),
                )),
            }
        }
        RequestCmd::Ls { format } => {
            let all = send(g, &creds, AccessAction::List).await?;
            print_list(&all, *format);
        }
        RequestCmd::Review {
            id,
            approve,
            deny: _,
            reason,
            ttl,
        } => {
            let review = AccessReview {
                id: id.clone(),
                approve: *approve,
                reason: reason.clone().unwrap_or_default(),
                ttl_secs: ttl.unwrap_or(0),
            };
            for r in send(g, &creds, AccessAction::Review(review)).await? {
                crate::outln!("access request {} {}", r.id, r.state.as_str());
            }
        }
    }
    Ok(0)
}

/// A list of requests as a table or JSON (shared with `tctl requests ls`).
pub fn print_list(all: &[AccessRequestInfo], format: Format) {
    match format {
        Format::Text => crate::schema::access_request_table(all, now_secs()).print(),
        f => f.print(&serde_json::Value::Array(
            all.iter().map(crate::schema::access_request).collect(),
        )),
    }
}
