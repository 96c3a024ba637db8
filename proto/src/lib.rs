//! Edgeport's shared crate: the wire protocol (length-prefixed postcard frames and the
//! messages that travel in them), identity types (SPIFFE names, keys, CA pins, identity
//! files), TLS configuration helpers and the SSH certificate checks that every component
//! applies the same way.
//!
//! See `docs/architecture.md` for who sends which message to whom.

pub mod alpn;
pub mod audit;
pub mod ca_bundle;
pub mod daemon;
pub mod frame;
pub mod identity;
pub mod keys;
pub mod mux;
pub mod quic;
pub mod rpc;
pub mod rpc_client;
pub mod sshcert;
pub mod ticket;
pub mod tls;
pub mod totp;
pub mod tunnel;
pub mod udp;
pub mod util;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};

/// The version every Edgeport binary reports (agents send it in their Hello).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How tsh's SSH client names itself (`SSH-2.0-Edgeport_tsh_VERSION`): the agent gives it a
/// bigger channel window than OpenSSH clients get (edge-agent/src/ssh/handler.rs).
pub const TSH_SSH_ID_PREFIX: &str = "SSH-2.0-Edgeport_tsh";
