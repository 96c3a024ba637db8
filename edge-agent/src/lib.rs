//! The edge agent: joins once, keeps a reverse tunnel to the gateway, and serves the
//! services the gateway opens streams for (SSH, Kubernetes, and the test-only echo).
//!
//! Module map: [`config`], [`identity`] (key and certificates on disk), [`join`] (first
//! start), [`transport`] (QUIC or TCP+TLS+yamux), [`session`] (Hello, control stream,
//! keep-alive, renewal, QUIC re-probing), [`agent`] (reconnect loop with backoff),
//! [`services`] (stream dispatch), [`ssh`] (the SSH server), [`kube`] (the Kubernetes
//! forwarder, cargo feature `kube`).
//!
//! Cargo features: `kube` (default) builds the Kubernetes forwarder; `test-hooks` (off)
//! builds the hidden `--test-*` flags the end-to-end tests and benchmarks use; `sftp`
//! (default) builds [`sftp_server`], the SFTP server for devices that have none.

pub mod agent;
pub mod audit;
pub mod backoff;
pub mod ca_rotation;
pub mod config;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gateway_probe;
pub mod hostkey;
pub mod identity;
pub mod join;
#[cfg(feature = "kube")]
pub mod kube;
pub mod link_watch;
pub mod metrics;
pub mod nat_keepalive;
pub mod relay;
pub mod services;
pub mod session;
#[cfg(feature = "sftp")]
pub mod sftp_server;
pub mod ssh;
pub mod targets;
pub mod transport;
pub mod update;
pub mod usage;

pub use agent::run;
pub use config::{AgentConfig, TransportChoice};
