//! SSH agent forwarding (`ssh -A`, `auth-agent-req@openssh.com`): a Unix socket on the
//! device, in a fresh directory only the login's user can enter, named in the session's
//! `SSH_AUTH_SOCK`. Each connection to it becomes an `auth-agent@openssh.com` channel to
//! the client, which hands it to the user's own agent: keys never leave the user's machine.
//!
//! Allowed only when the certificate carries `permit-agent-forwarding` (a role's
//! `--agent-forwarding`); one socket per SSH connection, removed when the connection ends.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::server::Handle;
use tokio::net::UnixListener;
use tokio::task::AbortHandle;

use super::passwd::LocalUser;

#[derive(Debug, thiserror::Error)]
#[error("cannot make the agent socket {path}: {source}")]
pub struct AgentSocketError {
    path: PathBuf,
    source: std::io::Error,
}

/// A forwarded agent's socket; dropping it closes and removes it.
pub struct AgentSocket {
    dir: PathBuf,
    path: PathBuf,
    task: AbortHandle,
}

impl AgentSocket {
    /// Makes the socket for `account` under the system's temporary directory.
    pub fn create(
        handle: Handle,
        account: &LocalUser,
        chown: bool,
        session_id: &str,
    ) -> Result<Self, AgentSocketError> {
        let suffix = edgeport_proto::keys::random_bytes(8)
            .map(hex::encode)
            .unwrap_or_else(|_| format!("{}", std::process::id()));
        let dir = std::env::temp_dir().join(format!("edgeport-agent-{suffix}"));
        let path = dir.join("agent.sock");
        let fail = |p: &Path| {
            let p = p.to_path_buf();
            move |source| AgentSocketError { path: p, source }
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(fail(&dir))?;
        let made = (|| {
            let listener = UnixListener::bind(&path).map_err(fail(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(fail(&path))?;
            if chown {
                for p in [&path, &dir] {
                    std::os::unix::fs::chown(p, Some(account.uid), Some(account.gid))
                        .map_err(fail(p))?;
                }
            }
            Ok(listener)
        })();
        let listener = match made {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let task = tokio::spawn(accept_loop(listener, handle, session_id.to_string()));
        Ok(Self {
            dir,
            path,
            task: task.abort_handle(),
        })
    }

    /// The value for `SSH_AUTH_SOCK`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn accept_loop(listener: UnixListener, handle: Handle, session_id: String) {
    loop {
        let mut unix = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(session = %session_id, "agent socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let session_id = session_id.clone();
        tokio::spawn(async move {
            match handle.channel_open_agent().await {
                Ok(channel) => {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut unix).await;
                }
                Err(e) => {
                    tracing::info!(session = %session_id, "the client refused an agent channel: {e}");
                }
            }
        });
    }
}
