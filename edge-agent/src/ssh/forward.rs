//! Local port forwarding (`ssh -L`, `direct-tcpip` channels): the agent connects to the
//! requested address on the device's side and splices it with the channel.

use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `host:port`, then accepts the channel and copies both ways until either side
/// ends. A failed connect rejects the channel, so the client reports "connect failed".
pub async fn direct_tcpip(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    host: String,
    port: u32,
    session_id: String,
) {
    let Ok(port16) = u16::try_from(port) else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&host, port16)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(session = %session_id, "port forward to {host}:{port} failed: {e}");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            tracing::info!(session = %session_id, "port forward to {host}:{port} timed out");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    let mut tcp = crate::usage::CountedStream::local(tcp, crate::usage::Counted::Forward);
    let mut stream = channel.into_stream();
    match tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, 64 * 1024, 64 * 1024)
        .await
    {
        Ok((up, down)) => {
            tracing::debug!(session = %session_id, "port forward to {host}:{port} done: {up} bytes in, {down} out")
        }
        Err(e) => {
            tracing::debug!(session = %session_id, "port forward to {host}:{port} ended: {e}")
        }
    }
}

/// Connects without the resolver for addresses and `localhost` (a static agent may have no
/// working name service); other names go through the system resolver.
async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return TcpStream::connect((ip, port)).await;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await;
    }
    TcpStream::connect((host, port)).await
}
