//! The Edgeport gateway: holds devices' reverse tunnels (QUIC, or TCP+TLS+yamux), relays
//! joins and logins to the authority, authorises user dials and splices them onto device
//! streams. It never dials a device and keeps no durable state beyond its own identity and a
//! book of its QUIC connections that only wakes their agents after a crash ([`restart_wake`]).
//!
//! Module map: [`identity`] (key, join, renewal), [`authority`] (RPC connection pool),
//! [`tcp`] and [`quic`] (the two listeners, told apart by ALPN; [`budget`]: handshakes per
//! source), [`tunnel`] (one device's
//! tunnel: Hello, control stream), [`tunnels`] (the device id -> tunnel registry and the
//! stream API), [`presence`] (lease reports), [`join`] and [`dial`] (the other ALPNs),
//! [`grants`] (the authority's dial decisions, reused briefly), [`restart_wake`] (resets
//! that wake a crashed predecessor's agents),
//! [`kube`] (the Kubernetes front door on `h2`/`http/1.1`),
//! [`server`] (wiring and shutdown).

pub mod accept;
pub mod audit;
pub mod authority;
pub mod budget;
pub mod ca_watch;
pub mod config;
pub mod dial;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod grants;
pub mod identity;
pub mod join;
pub mod kube;
pub mod lifecycle;
pub mod locks;
pub mod metrics;
pub mod peers;
pub mod policy;
pub mod presence;
pub mod public_cert;
pub mod quic;
pub mod restart_wake;
pub mod server;
pub mod sessions;
pub mod splice_dump;
pub mod tcp;
pub mod tunnel;
pub mod tunnels;
pub mod updates;
pub mod web;

pub use config::GatewayConfig;
pub use server::run;
pub use tunnels::{TunnelError, Tunnels};
