//! The gateway's metrics (`--metrics-addr`, docs/deploy.md "Metrics"). They are counted
//! always (a few atomic adds where things already happen) and served only when asked for.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use edgeport_net::metrics::{
    latency, latency_by, Counter, CounterBy, Family, Gauge, GaugeBy, Histogram, HistogramBy,
    Registry,
};
use edgeport_proto::rpc::{ErrorKind, RpcError, Transport};

use crate::budget::Class;

pub struct GatewayMetrics {
    pub tunnels: GaugeBy,
    pub dials: CounterBy,
    pub sessions: Gauge,
    pub stream_open: Histogram,
    pub relayed: CounterBy,
    pub handshake_failures: CounterBy,
    pub authority_rpc: HistogramBy,
    pub audit_events: CounterBy,
    pub renewals: Family<[(&'static str, &'static str); 2], Counter>,
    pub locks: Gauge,
    pub handshakes: Family<[(&'static str, &'static str); 2], Gauge>,
    pub known_sources: Gauge,
}

pub static METRICS: LazyLock<GatewayMetrics> = LazyLock::new(|| GatewayMetrics {
    tunnels: GaugeBy::default(),
    dials: CounterBy::default(),
    sessions: Gauge::default(),
    stream_open: latency(),
    relayed: CounterBy::default(),
    handshake_failures: CounterBy::default(),
    authority_rpc: latency_by(),
    audit_events: CounterBy::default(),
    renewals: Family::default(),
    locks: Gauge::default(),
    handshakes: Family::default(),
    known_sources: Gauge::default(),
});

/// Every gateway metric, with the build info.
pub fn registry() -> Registry {
    let m = &*METRICS;
    let mut r = edgeport_net::metrics::registry("gateway");
    // Both transports show from the start, at 0.
    for t in [Transport::Quic, Transport::Tcp] {
        let _ = m.tunnels.get_or_create(&[("transport", t.as_str())]);
    }
    r.register(
        "edgeport_gateway_tunnels",
        "Device tunnels held now, by transport",
        m.tunnels.clone(),
    );
    r.register(
        "edgeport_gateway_dials",
        "User dials, by result (ok, denied, not_found, error)",
        m.dials.clone(),
    );
    r.register(
        "edgeport_gateway_sessions_active",
        "User streams being spliced to devices now",
        m.sessions.clone(),
    );
    r.register(
        "edgeport_gateway_stream_open_seconds",
        "Time to open a stream on a device's tunnel and send its header",
        m.stream_open.clone(),
    );
    r.register(
        "edgeport_gateway_relayed_bytes",
        "Bytes spliced between users and devices, by direction (up: to the device), counted when a stream ends",
        m.relayed.clone(),
    );
    r.register(
        "edgeport_gateway_handshake_failures",
        "Connections dropped before they were served, by reason (tls, timeout, busy, certificate, alpn)",
        m.handshake_failures.clone(),
    );
    r.register(
        "edgeport_gateway_authority_rpc_seconds",
        "Round trips of this gateway's requests to the authority, by method",
        m.authority_rpc.clone(),
    );
    r.register(
        "edgeport_gateway_audit_events",
        "Audit events of devices relayed to the authority, by outcome (accepted, refused), and of the gateway itself (own_sent, own_lost: dropped while the queue to the authority was full)",
        m.audit_events.clone(),
    );
    r.register(
        "edgeport_gateway_cert_renewals",
        "Certificate renewals of the gateway and of the devices it relays, by kind and result",
        m.renewals.clone(),
    );
    for port in ["tcp", "quic"] {
        for class in [Class::Known, Class::Anonymous] {
            let _ = m
                .handshakes
                .get_or_create(&[("port", port), ("class", class.as_str())]);
        }
    }
    r.register(
        "edgeport_gateway_handshakes_in_flight",
        "Handshakes in progress, by port (tcp, quic) and class (known: from a source that proved a certificate recently, which may also take the quarter of the slots kept for them; anonymous)",
        m.handshakes.clone(),
    );
    r.register(
        "edgeport_gateway_known_sources",
        "Sources (IPv4 addresses, IPv6 /64s) remembered as having proved a certificate of the cluster",
        m.known_sources.clone(),
    );
    r.register(
        "edgeport_gateway_locks",
        "Locks in force, from the authority's latest presence acknowledgement",
        m.locks.clone(),
    );
    r
}

/// A tunnel came up (`+1`) or went away (`-1`).
pub fn tunnel(transport: Transport, delta: i64) {
    METRICS
        .tunnels
        .get_or_create(&[("transport", transport.as_str())])
        .inc_by(delta);
}

/// A dial's outcome.
pub fn dial<T>(result: &Result<T, RpcError>) {
    let label = match result {
        Ok(_) => "ok",
        Err(e) => match e.kind {
            ErrorKind::Denied | ErrorKind::Locked | ErrorKind::BadCredentials => "denied",
            ErrorKind::NotFound => "not_found",
            _ => "error",
        },
    };
    METRICS.dials.get_or_create(&[("result", label)]).inc();
}

/// The user's side of a splice, counting the bytes it reads (up, to the device) and writes
/// (down); they are added to `edgeport_gateway_relayed_bytes` when it is dropped, however
/// the splice ended (an SSH session usually ends with one side's reset or EOF error, when
/// the splice returns no counts).
pub struct Relayed<S> {
    inner: S,
    up: u64,
    down: u64,
}

impl<S> Relayed<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            up: 0,
            down: 0,
        }
    }
}

impl<S> Drop for Relayed<S> {
    fn drop(&mut self) {
        let m = &METRICS.relayed;
        m.get_or_create(&[("direction", "up")]).inc_by(self.up);
        m.get_or_create(&[("direction", "down")]).inc_by(self.down);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Relayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.up += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Relayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.down += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection dropped before it was served.
pub fn handshake_failed(reason: &'static str) {
    METRICS
        .handshake_failures
        .get_or_create(&[("reason", reason)])
        .inc();
}

/// A handshake of `class` began (`+1`) or ended (`-1`) on `port`.
pub fn handshakes_in_flight(port: &'static str, class: Class, delta: i64) {
    METRICS
        .handshakes
        .get_or_create(&[("port", port), ("class", class.as_str())])
        .inc_by(delta);
}

/// Sources now remembered as known.
pub fn known_sources(n: usize) {
    METRICS
        .known_sources
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// One request to the authority took `took`.
pub fn authority_rpc(method: &'static str, took: Duration) {
    METRICS
        .authority_rpc
        .get_or_create(&[("method", method)])
        .observe(took.as_secs_f64());
}

/// `n` audit events with this outcome.
pub fn audit_events(outcome: &'static str, n: u64) {
    METRICS
        .audit_events
        .get_or_create(&[("outcome", outcome)])
        .inc_by(n);
}

/// A certificate renewal (`kind`: gateway, device).
pub fn renewal<T, E>(kind: &'static str, result: &Result<T, E>) {
    let r = if result.is_ok() { "ok" } else { "error" };
    METRICS
        .renewals
        .get_or_create(&[("kind", kind), ("result", r)])
        .inc();
}

/// Times one request to the authority, from here to its drop (whatever the outcome).
pub struct RpcTimer {
    method: &'static str,
    start: std::time::Instant,
}

impl RpcTimer {
    pub fn start(req: &edgeport_proto::rpc::Request) -> Self {
        Self {
            method: edgeport_proto::variant::variant_name(req),
            start: std::time::Instant::now(),
        }
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        authority_rpc(self.method, self.start.elapsed());
    }
}
