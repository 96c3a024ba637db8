//! The byte stream type that code above the transport sees.

use tokio::io::{AsyncRead, AsyncWrite};

/// Anything that reads and writes bytes: a QUIC stream pair, a yamux stream, a TLS socket.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A stream whose transport is hidden from the code above it.
pub type BoxedStream = Box<dyn Duplex>;
