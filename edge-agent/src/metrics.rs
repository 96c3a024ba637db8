//! The agent's metrics, behind the cargo feature `metrics` (off by default: it costs the
//! device binary size, docs/deploy.md "Metrics"). Without the feature every function here
//! is empty and `--metrics-addr` does not exist.

#[cfg(feature = "metrics")]
mod on {
    use std::sync::LazyLock;

    use edgeport_net::metrics::{CounterBy, GaugeBy, Registry};

    pub struct AgentMetrics {
        pub tunnel: GaugeBy,
        pub audit_events: CounterBy,
        pub renewals: CounterBy,
    }

    pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
        tunnel: GaugeBy::default(),
        audit_events: CounterBy::default(),
        renewals: CounterBy::default(),
    });

    pub fn registry() -> Registry {
        let m = &*METRICS;
        let mut r = edgeport_net::metrics::registry("agent");
        for t in ["quic", "tcp"] {
            let _ = m.tunnel.get_or_create(&[("transport", t)]);
        }
        for o in ["spooled", "lost"] {
            let _ = m.audit_events.get_or_create(&[("outcome", o)]);
        }
        r.register(
            "edgeport_agent_tunnel_up",
            "1 while the tunnel to the gateway is up, by transport",
            m.tunnel.clone(),
        );
        r.register(
            "edgeport_agent_audit_events",
            "Audit events written to the spool (spooled) or dropped because it was full (lost)",
            m.audit_events.clone(),
        );
        r.register(
            "edgeport_agent_cert_renewals",
            "Certificate renewals, by result (ok, error)",
            m.renewals.clone(),
        );
        r
    }
}

#[cfg(feature = "metrics")]
pub use on::registry;

/// The tunnel over `transport` came up (`true`) or went down.
pub fn tunnel(_transport: &'static str, _up: bool) {
    #[cfg(feature = "metrics")]
    on::METRICS
        .tunnel
        .get_or_create(&[("transport", _transport)])
        .set(i64::from(_up));
}

/// Events written to the spool and events dropped.
pub fn spooled(_written: u64, _lost: u64) {
    #[cfg(feature = "metrics")]
    {
        let m = &on::METRICS.audit_events;
        m.get_or_create(&[("outcome", "spooled")]).inc_by(_written);
        m.get_or_create(&[("outcome", "lost")]).inc_by(_lost);
    }
}

/// A certificate renewal ended.
pub fn renewal(_ok: bool) {
    #[cfg(feature = "metrics")]
    on::METRICS
        .renewals
        .get_or_create(&[("result", if _ok { "ok" } else { "error" })])
        .inc();
}
