//! Per-session second factor (issue 29): a device that one of the user's roles marks with
//! `--require-session-mfa` takes only a certificate the authority signs for that one device
//! and session, after a fresh one-time code. tsh makes a new key for it (the private key stays
//! in this process, or in the local ssh-agent for a minute for stock OpenSSH), signs the
//! request with the key of the user's certificate (so the gateway can neither make nor replay
//! one), and uses the certificate it gets back for this one session.

use edgeport_net::clock::now_secs;
use edgeport_proto::keys::KeyPair;
use edgeport_proto::rpc::{sign_user_action, AccessAction, SessionMfaAsk, UserAction};
use edgeport_proto::tunnel::{ClientReply, ClientRequest};
use russh::keys::ssh_key::Certificate;

use super::cli::Transport;
use super::profile::Creds;
use super::{gateway, term, CliError};

/// The words every refusal for want of the second factor carries (the authority's and the
/// agent's).
const REQUIRED: &str = "requires a per-session second factor";

/// Whether `e` says the device needs a per-session second factor.
pub fn is_required(e: &CliError) -> bool {
    e.to_string().contains(REQUIRED)
}

/// The one-time code for `device`, asked on the terminal when `may_ask` (`tsh ssh` with a
/// terminal on stdin; `tsh proxy ssh`, whose stdin is OpenSSH's pipe, asks on /dev/tty).
pub fn ask_code(device: &str, may_ask: bool) -> Result<String, CliError> {
    let no_terminal = || {
        CliError::msg(format!(
            "device {device} requires a per-session second factor and there is no terminal to \
             ask for the code on: give --mfa-code CODE (or TSH_MFA_CODE)"
        ))
    };
    if !may_ask {
        return Err(no_terminal());
    }
    term::read_secret(&format!(
        "{device} requires a per-session second factor. One-time code from your authenticator app: "
    ))
    .map_err(|_| no_terminal())
}

/// A session key and the authority's certificate for it, for `device`.
pub struct SessionCert {
    pub key: KeyPair,
    pub cert: Certificate,
    pub valid_before: u64,
}

impl SessionCert {
    /// `creds` with this key and certificate for SSH (the gateway still takes the login's).
    pub fn ssh_creds(&self, creds: &Creds) -> Creds {
        Creds {
            key: self.key.clone(),
            ssh_cert: self.cert.clone(),
            ..creds.clone()
        }
    }
}

/// Asks the authority (through the gateway) for a per-session certificate for `device`.
pub async fn fetch(
    creds: &Creds,
    transport: Transport,
    device: &str,
    code: &str,
) -> Result<SessionCert, CliError> {
    let key = KeyPair::generate().map_err(|e| CliError::msg(format!("cannot make a key: {e}")))?;
    let nonce = edgeport_proto::keys::random_bytes(16)
        .map(hex::encode)
        .map_err(|e| CliError::msg(format!("cannot make a nonce: {e}")))?;
    let action = UserAction {
        cluster: creds.cas.cluster.clone(),
        issued_at: now_secs(),
        nonce,
        action: AccessAction::SessionMfa(SessionMfaAsk {
            device: device.to_string(),
            otp: code.trim().to_string(),
            ssh_public_key: key.public_openssh(),
        }),
    };
    let (body, signature) = sign_user_action(&action, &creds.key)
        .map_err(|e| CliError::msg(format!("cannot encode the request: {e}")))?;
    let tls = gateway::creds_config(creds)?;
    let req = ClientRequest::SessionMfaCert { body, signature };
    let got = match gateway::user_request(creds, tls, transport, &req).await? {
        (ClientReply::SessionMfaCert(c), _) => c,
        (ClientReply::Refused(e), _) => return Err(CliError::msg(e.message)),
        (other, _) => return Err(gateway::unexpected(&other)),
    };
    let cert = Certificate::from_openssh(got.ssh_cert.trim())
        .map_err(|e| CliError::msg(format!("the per-session certificate cannot be read: {e}")))?;
    Ok(SessionCert {
        key,
        cert,
        valid_before: got.valid_before,
    })
}

/// For stock OpenSSH behind `tsh proxy ssh`: the session's key and certificate go to the
/// ssh-agent at `SSH_AUTH_SOCK` until the certificate expires; OpenSSH offers the agent's
/// keys when it authenticates, after this command has begun (the ssh_config must let it:
/// no `IdentitiesOnly yes`).
pub async fn to_ssh_agent(cert: &SessionCert, device: &str) -> Result<(), CliError> {
    let sock = std::env::var_os("SSH_AUTH_SOCK")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            CliError::msg(format!(
                "device {device} requires a per-session second factor: stock ssh gets its \
                 certificate from an ssh-agent, and SSH_AUTH_SOCK is not set (start one: \
                 eval $(ssh-agent))"
            ))
        })?;
    let lifetime = cert.valid_before.saturating_sub(now_secs()).max(1);
    let lifetime = u32::try_from(lifetime).unwrap_or(u32::MAX);
    super::agent::add(
        std::path::Path::new(&sock),
        &cert.key,
        &cert.cert,
        lifetime,
        &format!("edgeport session mfa {device}"),
    )
    .await
    .map_err(|e| {
        CliError::msg(format!(
            "cannot add the per-session certificate to the ssh-agent: {e}"
        ))
    })
}
