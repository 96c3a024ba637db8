//! ALPN protocol ids. The protocol version lives here, not in the frames: a breaking change
//! to a message set gets a new ALPN string and both versions can be served side by side.

/// tctl and gateways talking to the authority's RPC port.
pub const RPC: &[u8] = b"edgeport-rpc/1";
/// Agents' reverse tunnels to the gateway (QUIC, or TCP+TLS with yamux on top).
pub const TUNNEL: &[u8] = b"edgeport-tunnel/1";
/// A device that has no certificate yet, joining with a token (TCP+TLS, pinned CA).
pub const JOIN: &[u8] = b"edgeport-join/1";
/// tsh talking to the gateway: login, listing, and user streams to devices.
pub const DIAL: &[u8] = b"edgeport-dial/1";
/// HTTP on the gateway's TCP port (Kubernetes front door, web login).
pub const H2: &[u8] = b"h2";
pub const HTTP11: &[u8] = b"http/1.1";
