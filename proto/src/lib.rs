//! Edgeport's protocol crate, with no IO: the messages that travel between the components
//! (length-prefixed postcard frames, a `tokio_util` codec over them), identity types (SPIFFE
//! names, keys, CA pins, identity files), TLS configuration helpers and the SSH certificate
//! checks that every component applies the same way. Nothing here opens a socket, spawns a
//! task or reads the clock: callers pass the time in. Sockets, QUIC, yamux, the RPC client and
//! the daemon runtime are in `edgeport-net`.
//!
//! See `docs/architecture.md` for who sends which message to whom.

pub mod alpn;
pub mod attest;
pub mod audit;
pub mod ca_bundle;
pub mod codec;
pub mod control;
pub mod frame;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod identity;
pub mod keys;
pub mod percent;
pub mod proxy_headers;
pub mod renew;
pub mod rpc;
pub mod sshcert;
pub mod targets;
pub mod ticket;
pub mod tls;
pub mod totp;
pub mod tunnel;
pub mod update;
pub mod usage;
pub mod util;
pub mod variant;
pub mod web;

pub use frame::{FrameError, MAX_FRAME_LEN};

/// The version every Edgeport binary reports (agents send it in their Hello).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How tsh's SSH client names itself (`SSH-2.0-Edgeport_tsh_VERSION`): the agent gives it a
/// bigger channel window than OpenSSH clients get (edge-agent/src/ssh/handler.rs).
pub const TSH_SSH_ID_PREFIX: &str = "SSH-2.0-Edgeport_tsh";
