//! Device joins (`edgeport-join/1`, TCP+TLS, no client certificate: the agent pins the CA).
//! The gateway only relays: it reads one Join, adds the address it saw, asks the authority
//! and passes the answer back. The token is never logged.

use std::net::SocketAddr;
use std::time::Duration;

use edgeport_net::BoxedStream;
use edgeport_net::{read_frame, write_frame};
use edgeport_proto::rpc::{ErrorKind, Request, Response, RpcError};
use edgeport_proto::tunnel::{JoinMessage, JoinReply};
use tokio::io::AsyncWriteExt;

use crate::authority::AuthorityClient;

pub async fn serve(
    auth: &AuthorityClient,
    request_timeout: Duration,
    mut stream: BoxedStream,
    addr: SocketAddr,
) {
    let first =
        tokio::time::timeout(request_timeout, read_frame::<JoinMessage, _>(&mut stream)).await;
    let mut req = match first {
        Ok(Ok(JoinMessage::Join(r))) => r,
        Ok(Err(e)) => {
            tracing::info!(%addr, "join dropped: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%addr, "join dropped: no request in time");
            return;
        }
    };
    req.remote_addr = addr.to_string();
    let requested = req.requested_id.clone().unwrap_or_default();
    let reply = match auth.call(Request::JoinDevice(req)).await {
        Ok(Response::DeviceCerts(certs)) => {
            tracing::info!(%addr, device = %certs.device_id, "device joined");
            JoinReply::Joined(certs)
        }
        Ok(other) => JoinReply::Refused(RpcError::new(
            ErrorKind::Internal,
            edgeport_net::rpc_client::unexpected(other).to_string(),
        )),
        Err(e) => {
            tracing::info!(%addr, requested = %requested, "join refused: {e}");
            JoinReply::Refused(crate::identity::unavailable(&e))
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = write_frame(&mut stream, &reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
