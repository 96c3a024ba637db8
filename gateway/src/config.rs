//! Gateway settings (from the command line) and the limits that protect it from bad input.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub data_dir: PathBuf,
    /// The authority's RPC address.
    pub auth_addr: String,
    /// Gateway join token and CA pin: needed on the first start only.
    pub token: Option<String>,
    pub ca_pin: Option<String>,
    /// Requested gateway id (the authority may pick one).
    pub gateway_id: Option<String>,
    /// TCP and UDP address (same port for both).
    pub listen: SocketAddr,
    /// `HOST:PORT` that devices and users dial, put into the server certificate.
    pub public_addr: Option<String>,
    /// `HOST:PORT` (UDP) where other gateways forward dials for this one's devices.
    pub peer_addr: Option<String>,
    /// Full presence snapshot interval.
    pub presence_interval: Duration,
    /// How long the authority may believe a snapshot.
    pub presence_lease: Duration,
    /// A TCP tunnel whose control stream stays silent this long is dropped (agents ping
    /// every keep-alive interval); QUIC tunnels negotiate their idle timeout with the agent.
    pub tunnel_idle_timeout: Duration,
    /// TLS/QUIC handshake and first-frame deadline.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once (more are dropped at once: slow-loris protection).
    pub max_handshakes: usize,
    /// Established connections at once (TCP and QUIC each).
    pub max_connections: usize,
    /// A public certificate chain and key (PEM) for users' first contact by name.
    pub public_cert: Option<PathBuf>,
    pub public_key: Option<PathBuf>,
    /// Test hook: copy spliced bytes here (see [`crate::splice_dump`]).
    pub splice_dump: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`GET /metrics`); none by default.
    pub metrics_addr: Option<SocketAddr>,
    /// Where to serve the web console over HTTPS (`--web-addr`); none by default.
    pub web_addr: Option<SocketAddr>,
    /// The web console's origin as browsers reach it (`--web-origin`); derived from
    /// `public_addr` or `web_addr` when absent ([`crate::web::public_origin`]).
    pub web_origin: Option<String>,
}

impl GatewayConfig {
    pub fn new(data_dir: PathBuf, auth_addr: String, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            auth_addr,
            token: None,
            ca_pin: None,
            gateway_id: None,
            listen,
            public_addr: None,
            peer_addr: None,
            presence_interval: Duration::from_secs(10),
            presence_lease: Duration::from_secs(45),
            tunnel_idle_timeout: Duration::from_secs(180),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_connections: 10_000,
            public_cert: None,
            public_key: None,
            splice_dump: None,
            metrics_addr: None,
            web_addr: None,
            web_origin: None,
        }
    }
}
