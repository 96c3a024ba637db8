//! The authority's metrics (`--metrics-addr`, docs/deploy.md "Metrics"). Counters move where
//! things already happen (each RPC, each stored audit event); the gauges of what the store
//! holds (locks, devices, gateways) are read again every [`REFRESH`] while the endpoint runs.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use edgeport_net::metrics::{latency_by, Counter, CounterBy, Family, Gauge, HistogramBy, Registry};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the store gauges are read again.
pub const REFRESH: Duration = Duration::from_secs(15);

pub struct AuthorityMetrics {
    pub rpc: HistogramBy,
    pub handshake_failures: CounterBy,
    pub audit_events: CounterBy,
    pub renewals: Family<[(&'static str, &'static str); 2], Counter>,
    pub locks: Gauge,
    pub devices: CounterGauge,
    pub gateways: Gauge,
}

/// Devices by state (online, offline).
pub type CounterGauge = edgeport_net::metrics::GaugeBy;

pub static METRICS: LazyLock<AuthorityMetrics> = LazyLock::new(|| AuthorityMetrics {
    rpc: latency_by(),
    handshake_failures: CounterBy::default(),
    audit_events: CounterBy::default(),
    renewals: Family::default(),
    locks: Gauge::default(),
    devices: CounterGauge::default(),
    gateways: Gauge::default(),
});

/// Every authority metric, with the build info.
pub fn registry() -> Registry {
    let m = &*METRICS;
    let mut r = edgeport_net::metrics::registry("authority");
    r.register(
        "edgeport_authority_rpc_seconds",
        "Time to handle one RPC request, by method (the Request variant)",
        m.rpc.clone(),
    );
    r.register(
        "edgeport_authority_handshake_failures",
        "RPC connections that failed their TLS handshake, by reason (tls, timeout)",
        m.handshake_failures.clone(),
    );
    for outcome in ["accepted", "lost", "refused"] {
        let _ = m.audit_events.get_or_create(&[("outcome", outcome)]);
    }
    r.register(
        "edgeport_authority_audit_events",
        "Device audit events by outcome: accepted (stored), lost (sequence numbers that never arrived: a gap in a device's chain), refused (batches whose signature does not verify)",
        m.audit_events.clone(),
    );
    r.register(
        "edgeport_authority_cert_renewals",
        "Certificate renewals asked of the authority, by kind (gateway, device) and result",
        m.renewals.clone(),
    );
    r.register(
        "edgeport_authority_locks",
        "Locks in force",
        m.locks.clone(),
    );
    r.register(
        "edgeport_authority_devices",
        "Registered devices, by state (online, offline)",
        m.devices.clone(),
    );
    r.register(
        "edgeport_authority_gateways",
        "Gateways that joined and are not revoked",
        m.gateways.clone(),
    );
    r
}

/// One RPC request took `took`; renewals are counted by their answer too.
pub fn rpc(method: &'static str, took: Duration, resp: &edgeport_proto::rpc::Response) {
    METRICS
        .rpc
        .get_or_create(&[("method", method)])
        .observe(took.as_secs_f64());
    let kind = match method {
        "RenewDevice" => "device",
        "RenewGateway" => "gateway",
        _ => return,
    };
    let result = match resp {
        edgeport_proto::rpc::Response::Error(_) => "error",
        _ => "ok",
    };
    METRICS
        .renewals
        .get_or_create(&[("kind", kind), ("result", result)])
        .inc();
}

pub fn handshake_failed(reason: &'static str) {
    METRICS
        .handshake_failures
        .get_or_create(&[("reason", reason)])
        .inc();
}

pub fn audit_events(outcome: &'static str, n: u64) {
    if n > 0 {
        METRICS
            .audit_events
            .get_or_create(&[("outcome", outcome)])
            .inc_by(n);
    }
}

/// Reads the store gauges now and every [`REFRESH`] until `shutdown`.
pub async fn refresh(store: Arc<dyn Store>, shutdown: CancellationToken) {
    loop {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || read_gauges(&*s)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("metrics: cannot read the store: {e}"),
            Err(e) => tracing::debug!("metrics: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn read_gauges(store: &dyn Store) -> Result<(), edgeport_proto::rpc::RpcError> {
    let now = edgeport_net::clock::now_secs();
    let m = &*METRICS;
    m.locks.set(crate::locks::active(store, now)?.len() as i64);
    let devices = crate::devices::list(store, now)?;
    let online = devices.iter().filter(|d| d.online).count() as i64;
    m.devices.get_or_create(&[("state", "online")]).set(online);
    m.devices
        .get_or_create(&[("state", "offline")])
        .set(devices.len() as i64 - online);
    let gateways = crate::gateways::all(store)?;
    m.gateways
        .set(gateways.iter().filter(|g| !g.revoked).count() as i64);
    Ok(())
}
