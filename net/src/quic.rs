//! QUIC settings every Edgeport endpoint shares (the agent's tunnel, the gateway, tsh's user
//! leg, the load generator): flow-control windows for bulk transfers, acknowledgement
//! frequency, and client endpoints on sockets with large kernel buffers.

use std::net::SocketAddr;
use std::sync::Arc;

/// Transport settings for bulk transfers: 16 MiB stream / 64 MiB connection / 64 MiB send
/// windows (DESIGN section 7), no unidirectional streams, and a request that the peer
/// acknowledge every [`ACK_ELICITING_THRESHOLD`] packets, and BBR congestion control
/// ([`congestion_name`]). Callers add their stream limit, keep-alive and idle timeout.
pub fn bulk_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(ack));
    match congestion_name() {
        "cubic" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
        "newreno" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        _ => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
    }
    t
}

/// The congestion controller QUIC connections use: BBR, unless `EDGEPORT_QUIC_CC` names
/// `cubic` or `newreno` (quinn's default is Cubic). Random loss is what a cellular link has,
/// and loss-based controllers take it for congestion: with 2% loss and a 50 ms round trip
/// on a 20 Mbit/s link, a transfer ran at 0.40-0.46 MiB/s with Cubic and 1.89-1.93 MiB/s
/// with BBR (OpenSSH over TCP: 1.47-1.67); without the added round trip the two were level
/// (docs/benchmarks.md, `lossy`).
pub fn congestion_name() -> &'static str {
    match std::env::var("EDGEPORT_QUIC_CC").as_deref() {
        Ok("cubic") => "cubic",
        Ok("newreno") => "newreno",
        _ => "bbr",
    }
}

/// Packets a peer may receive before it must acknowledge (the ACK-frequency extension; the
/// QUIC default acknowledges every second packet). Fewer ACKs on the uplink of a bulk
/// download; on loopback it made no measurable difference (docs/benchmarks.md).
pub const ACK_ELICITING_THRESHOLD: u32 = 10;

/// A client-only QUIC endpoint on a fresh UDP socket with large kernel buffers
/// ([`crate::udp`]).
pub fn client_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = crate::udp::bind(bind)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}
