//! Edgeport's IO crate: everything between the protocol (`edgeport-proto`) and the sockets.
//! QUIC settings and UDP sockets, the yamux driver, the [`Tunnel`] trait over both, frames on
//! async streams, the RPC client for the authority, the wall clock, and the runtime every
//! daemon runs in.

pub mod budget;
pub mod clock;
pub mod daemon;
pub mod frame_io;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod mux;
pub mod quic;
pub mod rpc_client;
pub mod stream;
pub mod tunnel;
pub mod udp;
pub mod write_gate;

pub use frame_io::{read_frame, write_frame};
pub use stream::{BoxedStream, Duplex};
pub use tunnel::{CloseReason, Tunnel, TunnelStream};
