//! Remote port forwarding (`ssh -R`, `tcpip-forward` requests): the agent listens on the
//! device's loopback and, for each connection, opens a `forwarded-tcpip` channel back to the
//! client, which connects it onwards on the user's side.
//!
//! Like OpenSSH with `GatewayPorts no`, the listener is always on loopback, whatever address
//! the client names: a forward never opens a port on the device's networks. Ports below
//! 1024 are for root logins only, and one connection holds at most [`MAX_FORWARDS`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use russh::server::Handle;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// Most remote forwards one SSH connection may hold.
pub const MAX_FORWARDS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RemoteForwardError {
    #[error("port {0} is privileged and the login is not root")]
    Privileged(u32),
    #[error("port {0} is not a TCP port")]
    BadPort(u32),
    #[error("this connection already holds {MAX_FORWARDS} remote forwards")]
    TooMany,
    #[error("{addr} is already forwarded on this connection")]
    Duplicate { addr: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The remote forwards of one SSH connection; dropping it closes their listeners.
#[derive(Default)]
pub struct RemoteForwards {
    /// By the (address, port) the client asked for, as it will cancel them.
    listeners: HashMap<(String, u32), AbortHandle>,
}

/// Where to listen for a request naming `address`: loopback always, IPv6 when the client
/// named an IPv6 address.
pub fn bind_ip(address: &str) -> IpAddr {
    let bare = address.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

impl RemoteForwards {
    /// Starts listening for `address:port` (port 0: any free port, written back to
    /// `port`) and relays each connection to the client over `handle`.
    pub async fn start(
        &mut self,
        handle: Handle,
        address: &str,
        port: &mut u32,
        root: bool,
        session_id: &str,
    ) -> Result<SocketAddr, RemoteForwardError> {
        let asked = *port;
        let port16 = u16::try_from(asked).map_err(|_| RemoteForwardError::BadPort(asked))?;
        if port16 != 0 && port16 < 1024 && !root {
            return Err(RemoteForwardError::Privileged(asked));
        }
        if self.listeners.len() >= MAX_FORWARDS {
            return Err(RemoteForwardError::TooMany);
        }
        if asked != 0 && self.listeners.contains_key(&(address.to_string(), asked)) {
            return Err(RemoteForwardError::Duplicate {
                addr: format!("{address}:{asked}"),
            });
        }
        let want = SocketAddr::new(bind_ip(address), port16);
        let listener = TcpListener::bind(want)
            .await
            .map_err(|source| RemoteForwardError::Bind { addr: want, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| RemoteForwardError::Bind { addr: want, source })?;
        let bound_port = u32::from(bound.port());
        *port = bound_port;
        let task = tokio::spawn(accept_loop(
            listener,
            handle,
            address.to_string(),
            bound_port,
            session_id.to_string(),
        ));
        // The client cancels with the port it asked for, or with the allocated one when it
        // asked for 0 (OpenSSH does the latter).
        self.listeners
            .insert((address.to_string(), bound_port), task.abort_handle());
        Ok(bound)
    }

    /// Stops the forward the client set up as `address:port`; false when there is none.
    pub fn cancel(&mut self, address: &str, port: u32) -> bool {
        match self.listeners.remove(&(address.to_string(), port)) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

impl Drop for RemoteForwards {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    handle: Handle,
    address: String,
    port: u32,
    session_id: String,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(session = %session_id, "remote forward {address}:{port}: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // The data budget holds for a listener opened before it ran out: past it, each
        // connection is closed at once (the listener stays, for when the budget allows).
        if let Some(why) = crate::usage::over_budget() {
            tracing::debug!(session = %session_id, "remote forward {address}:{port}: refused a connection from {peer}: {why}");
            drop(tcp);
            continue;
        }
        let handle = handle.clone();
        let (address, session_id) = (address.clone(), session_id.clone());
        tokio::spawn(async move {
            let channel = match handle
                .channel_open_forwarded_tcpip(
                    address.clone(),
                    port,
                    peer.ip().to_string(),
                    u32::from(peer.port()),
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(session = %session_id, "remote forward {address}:{port}: the client refused the connection from {peer}: {e}");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let mut tcp = crate::usage::CountedStream::local(tcp, crate::usage::Counted::Forward);
            let mut stream = channel.into_stream();
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut stream,
                &mut tcp,
                64 * 1024,
                64 * 1024,
            )
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_loopback_whatever_the_client_names() {
        for a in ["", "localhost", "0.0.0.0", "*", "127.0.0.1", "192.168.1.5"] {
            assert_eq!(bind_ip(a), IpAddr::V4(Ipv4Addr::LOCALHOST), "{a}");
        }
        for a in ["::", "::1", "[::]", "fe80::1"] {
            assert_eq!(bind_ip(a), IpAddr::V6(Ipv6Addr::LOCALHOST), "{a}");
        }
    }
}
