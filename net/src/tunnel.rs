//! One interface for a tunnel, whatever carries it: QUIC (one quinn connection) or yamux over
//! a TCP+TLS byte stream ([`crate::mux`]). Code above it opens and accepts streams, closes
//! the tunnel, learns why it ended as a [`CloseReason`], and reads the round-trip time; it
//! never sees quinn or yamux types. The transport's name ([`Tunnel::transport`]) is a label
//! for reports, not something to branch on.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::rpc::Transport;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::mux::{self, Mode, MuxConfig, MuxHandle, MuxIncoming};
use crate::stream::BoxedStream;

/// A bidirectional stream of a tunnel (one type for both transports).
pub type TunnelStream = BoxedStream;

/// A future a [`Tunnel`] method returns.
pub type TunnelFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed it, with the words it gave (empty when it gave none; yamux cannot).
    ClosedByPeer(String),
    /// Nothing heard from the peer within the idle timeout.
    TimedOut,
    /// The peer no longer knows the connection (a QUIC stateless reset: it restarted).
    Reset,
    /// This side closed it ([`Tunnel::close`]).
    LocallyClosed,
    /// Anything else, in the transport's words (a TLS alert, an IO error, a protocol error).
    Other(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ClosedByPeer(r) if r.is_empty() => f.write_str("closed by the peer"),
            CloseReason::ClosedByPeer(r) => write!(f, "closed by the peer: {r}"),
            CloseReason::TimedOut => f.write_str("idle timeout"),
            CloseReason::Reset => f.write_str("reset by the peer"),
            CloseReason::LocallyClosed => f.write_str("closed locally"),
            CloseReason::Other(r) => f.write_str(r),
        }
    }
}

impl std::error::Error for CloseReason {}

impl From<quinn::ConnectionError> for CloseReason {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::ApplicationClosed(a) => {
                CloseReason::ClosedByPeer(String::from_utf8_lossy(&a.reason).into_owned())
            }
            E::TimedOut => CloseReason::TimedOut,
            E::Reset => CloseReason::Reset,
            E::LocallyClosed => CloseReason::LocallyClosed,
            // Transport-level closes keep quinn's words: a refused certificate is in them.
            other => CloseReason::Other(other.to_string()),
        }
    }
}

/// A multiplexed connection between an agent and a gateway (or tsh and a gateway).
/// Implemented once for QUIC ([`quic`]) and once for yamux over TLS ([`yamux`]).
pub trait Tunnel: Send + Sync {
    /// Which transport carries the tunnel (for presence reports and logs).
    fn transport(&self) -> Transport;

    /// Opens a stream to the peer; fails only once the tunnel has ended.
    fn open(&self) -> TunnelFuture<'_, Result<TunnelStream, CloseReason>>;

    /// The next stream the peer opened; `None` once the tunnel has ended.
    fn accept(&self) -> TunnelFuture<'_, Option<TunnelStream>>;

    /// Refuses the peer's further streams (a gateway takes only the agent's control stream).
    fn stop_accepting(&self);

    /// Closes the tunnel; `reason` reaches the peer where the transport carries it (QUIC).
    fn close(&self, reason: &str);

    /// Why the tunnel ended, once it has.
    fn close_reason(&self) -> Option<CloseReason>;

    /// Resolves when the tunnel has ended, with the reason.
    fn closed(&self) -> TunnelFuture<'_, CloseReason>;

    /// Smoothed round-trip time, when the transport measures it (QUIC does; over yamux the
    /// control stream's pings do).
    fn rtt(&self) -> Option<Duration>;

    /// Whether the transport itself keeps the tunnel alive and notices a dead peer (QUIC's
    /// keep-alives and idle timeout). When it does not, the control stream must ping.
    fn keeps_alive(&self) -> bool;

    /// The peer's address as the transport sees it now. QUIC follows a peer that changed
    /// networks (connection migration), so this can differ from the address the tunnel
    /// started from; a TCP connection cannot move (`None`: the accepted address holds).
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// Counters of the path the tunnel runs on, where the transport keeps them (QUIC).
    fn path_counters(&self) -> Option<PathCounters> {
        None
    }
}

/// What a QUIC tunnel counts about its path: the agent learns its NAT's timeout from them
/// (edge-agent's `nat_keepalive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathCounters {
    /// PATH_CHALLENGE frames received: the peer saw this end at a new address.
    pub path_challenges: u64,
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// QUIC packets sent on the current path, and those of them declared lost.
    pub packets_sent: u64,
    pub packets_lost: u64,
}

/// A tunnel over a QUIC connection.
pub fn quic(conn: quinn::Connection) -> Arc<dyn Tunnel> {
    Arc::new(QuicTunnel(conn))
}

/// A tunnel of yamux over `io` (a TLS stream), its driver on a new task.
pub fn yamux<T>(io: T, mode: Mode, cfg: &MuxConfig) -> Arc<dyn Tunnel>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (handle, incoming) = mux::spawn(io, mode, cfg);
    Arc::new(YamuxTunnel {
        handle,
        incoming: tokio::sync::Mutex::new(incoming),
    })
}

struct QuicTunnel(quinn::Connection);

impl Tunnel for QuicTunnel {
    fn transport(&self) -> Transport {
        Transport::Quic
    }

    fn open(&self) -> TunnelFuture<'_, Result<TunnelStream, CloseReason>> {
        Box::pin(async move {
            let (send, recv) = self.0.open_bi().await?;
            Ok(Box::new(tokio::io::join(recv, send)) as TunnelStream)
        })
    }

    fn accept(&self) -> TunnelFuture<'_, Option<TunnelStream>> {
        Box::pin(async move {
            let (send, recv) = self.0.accept_bi().await.ok()?;
            Some(Box::new(tokio::io::join(recv, send)) as TunnelStream)
        })
    }

    fn stop_accepting(&self) {
        self.0
            .set_max_concurrent_bi_streams(quinn::VarInt::from_u32(0));
    }

    fn close(&self, reason: &str) {
        self.0.close(quinn::VarInt::from_u32(0), reason.as_bytes());
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.0.close_reason().map(CloseReason::from)
    }

    fn closed(&self) -> TunnelFuture<'_, CloseReason> {
        Box::pin(async move { self.0.closed().await.into() })
    }

    fn rtt(&self) -> Option<Duration> {
        Some(self.0.rtt())
    }

    fn keeps_alive(&self) -> bool {
        true
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.0.remote_address())
    }

    fn path_counters(&self) -> Option<PathCounters> {
        let s = self.0.stats();
        Some(PathCounters {
            path_challenges: s.frame_rx.path_challenge,
            datagrams_sent: s.udp_tx.datagrams,
            packets_sent: s.path.sent_packets,
            packets_lost: s.path.lost_packets,
        })
    }
}

struct YamuxTunnel {
    handle: MuxHandle,
    incoming: tokio::sync::Mutex<MuxIncoming>,
}

impl Tunnel for YamuxTunnel {
    fn transport(&self) -> Transport {
        Transport::Tcp
    }

    fn open(&self) -> TunnelFuture<'_, Result<TunnelStream, CloseReason>> {
        Box::pin(async move {
            self.handle.open().await.map_err(|e| match e {
                mux::MuxError::Closed(r) => r,
            })
        })
    }

    fn accept(&self) -> TunnelFuture<'_, Option<TunnelStream>> {
        Box::pin(async move { self.incoming.lock().await.accept().await })
    }

    fn stop_accepting(&self) {
        self.handle.stop_accepting();
    }

    fn close(&self, _reason: &str) {
        self.handle.close();
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.handle.close_reason()
    }

    fn closed(&self) -> TunnelFuture<'_, CloseReason> {
        Box::pin(self.handle.closed())
    }

    fn rtt(&self) -> Option<Duration> {
        None
    }

    fn keeps_alive(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn yamux_tunnel_streams_and_typed_close() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = yamux(a, Mode::Client, &MuxConfig::default());
        let server = yamux(b, Mode::Server, &MuxConfig::default());
        assert_eq!(client.transport(), Transport::Tcp);
        assert!(!client.keeps_alive());
        assert!(client.rtt().is_none());
        let mut s = client.open().await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.flush().await.unwrap();
        let mut t = server.accept().await.unwrap();
        let mut buf = [0u8; 4];
        t.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert!(client.close_reason().is_none());
        client.close("done");
        assert_eq!(client.closed().await, CloseReason::LocallyClosed);
        assert_eq!(
            server.closed().await,
            CloseReason::ClosedByPeer(String::new())
        );
        assert_eq!(server.close_reason(), Some(server.closed().await));
        assert!(matches!(
            client.open().await,
            Err(CloseReason::LocallyClosed)
        ));
        assert!(server.accept().await.is_none());
    }

    #[tokio::test]
    async fn yamux_streams_after_stop_accepting_are_reset() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = yamux(a, Mode::Client, &MuxConfig::default());
        let server = yamux(b, Mode::Server, &MuxConfig::default());
        server.stop_accepting();
        let mut s = client.open().await.unwrap();
        s.write_all(b"x").await.unwrap();
        s.flush().await.unwrap();
        let mut buf = Vec::new();
        // The server dropped the stream: reading ends (reset or EOF) instead of hanging.
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok());
        assert!(buf.is_empty());
    }

    #[test]
    fn close_reasons_read_well() {
        assert_eq!(
            CloseReason::ClosedByPeer(String::new()).to_string(),
            "closed by the peer"
        );
        assert_eq!(
            CloseReason::ClosedByPeer("bye".into()).to_string(),
            "closed by the peer: bye"
        );
        assert_eq!(
            CloseReason::from(quinn::ConnectionError::TimedOut),
            CloseReason::TimedOut
        );
        assert_eq!(
            CloseReason::from(quinn::ConnectionError::Reset),
            CloseReason::Reset
        );
        assert_eq!(
            CloseReason::from(quinn::ConnectionError::LocallyClosed),
            CloseReason::LocallyClosed
        );
    }
}
