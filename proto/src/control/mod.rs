//! The tunnel's control stream as two sans-IO state machines, one per side: [`AgentControl`]
//! (the device) and [`GatewayControl`] (the gateway). They own the protocol (Hello/Welcome,
//! Ping/Pong and the idle timeouts, Renew/Renewed, Audit/AuditAck, Locked, Refused) and
//! nothing else: no sockets, no tasks, no clock. The caller passes the time in (`now`, a
//! [`std::time::Instant`] it read itself) and does the IO: the agent's `session::establish`
//! and `session::serve`, the gateway's `tunnel::serve`.
//!
//! # Driving a machine (poll style, like quinn-proto)
//!
//! Inputs are method calls, each taking `now`:
//!
//! * a message read off the control stream (`handle_message`, or `handle_frame` for a raw
//!   frame body, which decodes it first), or the read error that ended the stream
//!   (`handle_read_error`);
//! * a timer that fired (`handle_timeout`; call it whenever `now >= poll_timeout()`);
//! * a local request (the agent's `request_renew` and `send_audit`, the gateway's `admit`,
//!   relay results, `send_locked` and `send_refused`);
//! * a local close (`close`: shutdown, the connection went away, a write failed).
//!
//! After every input the caller drains three queues, in any order:
//!
//! * `poll_transmit()`: messages to write on the control stream, in order;
//! * `poll_event()`: what the application must know or do (certificates renewed, a lock,
//!   an audit ack, a relay to run, the machine closed);
//! * `poll_timeout()`: the next instant at which `handle_timeout` must be called (`None` once
//!   closed, or while the machine waits only on the application).
//!
//! Protocol faults never panic and never return `Err`: they close the machine with a typed
//! reason ([`AgentCloseReason`], [`GatewayCloseReason`]), reported once as a `Closed` event
//! and kept in `close_reason()`. `Err(`[`ControlError`]`)` is for the caller's own mistakes
//! (asking for a renewal before the Welcome, answering a relay that does not exist, ...) and
//! changes nothing. Messages queued before a close stay in the transmit queue: the gateway's
//! `Refused` before it drops a tunnel is worth flushing (best effort, briefly).
//!
//! # States
//!
//! ```text
//!  agent                                         gateway
//!  -----                                         -------
//!  new: send Hello                               new
//!    |                                             |
//!    v                                             v
//!  AwaitingWelcome --timeout/Refused/other--+    AwaitingHello --timeout/read error/other--+
//!    | Welcome                              |      | Hello (event: Hello)                  |
//!    v                                      |      v                                       |
//!  Established <-- Pong, Renewed, Locked,   |    AwaitingAdmission --admit(Revoked) or ----+
//!    |             AuditAck, Refused        |      | admit(Accept)    wrong device id      |
//!    |             (while a renewal waits)  |      | send Welcome (+ Locked)               |
//!    |                                      |      v                                       |
//!    | idle, Refused, read error, close()   |    Established <-- Ping, Renew, Audit,     |
//!    v                                      |      |             second Hello (ignored)    |
//!  Closed <---------------------------------+      | idle, read error, close()             |
//!                                                  v                                       |
//!                                                Closed <----------------------------------+
//! ```
//!
//! Timers: the agent's Welcome deadline ([`AgentConfig::handshake_timeout`]); once
//! established, its keep-alive ([`Keepalive`]: a Ping every `interval`, the first at once,
//! and "nothing heard for longer than `idle_timeout`" checked at each Ping, as on TCP; QUIC
//! keeps itself alive and passes no keep-alive) and the certificate check
//! ([`AgentConfig::renew_check`], the first at once: the event [`AgentEvent::RenewDue`],
//! to which the application answers `request_renew` if its certificates are due). The
//! gateway's Hello deadline and, once established, its idle deadline (renewed by every
//! frame; paused while the device has more renewals and audit batches in flight than
//! [`GatewayConfig::relays`] allows, because the gateway stops reading then, exactly as the
//! loop it replaces did).
//!
//! Audit batches are stop-and-wait: the agent has at most one in flight; each one is
//! answered by exactly one [`AgentEvent::AuditAcked`], or by [`AgentEvent::AuditFailed`] when
//! the machine closes first. The property tests in `tests.rs` check this, that the Hello
//! exchange completes when nothing is lost, and that no reachable state leaves both sides
//! waiting with no timer armed.

mod agent;
mod gateway;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use agent::{AgentCloseReason, AgentConfig, AgentControl, AgentEvent, AgentIgnored, Keepalive};
pub use gateway::{
    Admission, GatewayCloseReason, GatewayConfig, GatewayControl, GatewayEvent, GatewayIgnored,
};

/// Deadline for the Hello/Welcome exchange (both sides' defaults).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agent checks whether its certificates are due for renewal.
pub const RENEW_CHECK: Duration = Duration::from_secs(600);
/// Renewals and audit batches one tunnel may have relayed to the authority at once.
pub const RELAYS_PER_TUNNEL: usize = 2;

/// The agent's name for one audit batch it sent, to match acks and failures to batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditId(pub u64);

/// The gateway's name for one renewal or audit batch it relays to the authority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(pub u64);

/// The caller used a machine wrongly; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("the control stream is closed")]
    Closed,
    #[error("the Hello/Welcome exchange has not completed")]
    NotEstablished,
    #[error("a certificate renewal is already in flight")]
    RenewInFlight,
    #[error("an audit batch is already in flight (one at a time)")]
    AuditInFlight,
    #[error("the gateway has not received a Hello to admit")]
    NothingToAdmit,
    #[error("a Hello waits for admit(); nothing is read before it")]
    AdmissionPending,
    #[error("no {kind} relay {id:?} is in flight")]
    UnknownRelay { id: RelayId, kind: &'static str },
}

/// The variant name of an agent message, for errors.
fn agent_msg_kind(m: &crate::tunnel::AgentControl) -> &'static str {
    use crate::tunnel::AgentControl as M;
    match m {
        M::Hello(_) => "Hello",
        M::Renew { .. } => "Renew",
        M::RenewProven { .. } => "RenewProven",
        M::Attest(_) => "Attest",
        M::Ping { .. } => "Ping",
        M::Audit(_) => "Audit",
        M::Usage(_) => "Usage",
        M::TargetCert(_) => "TargetCert",
    }
}

/// The variant name of a gateway message, for errors.
fn gateway_msg_kind(m: &crate::tunnel::GatewayControl) -> &'static str {
    use crate::tunnel::GatewayControl as M;
    match m {
        M::Welcome { .. } => "Welcome",
        M::Renewed(_) => "Renewed",
        M::Locked { .. } => "Locked",
        M::Refused(_) => "Refused",
        M::Pong { .. } => "Pong",
        M::AuditAck(_) => "AuditAck",
        M::Cas(_) => "Cas",
        M::Budget { .. } => "Budget",
        M::TargetCert { .. } => "TargetCert",
    }
}
