//! The agent's side of the control stream: say Hello, wait for Welcome, then keep the tunnel
//! alive (Ping on TCP), ask for renewals, ship audit batches one at a time and pass on what
//! the gateway tells (renewed certificates, locks, refusals).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::audit::{AuditAck, AuditBatch};
use crate::frame::FrameError;
use crate::rpc::{DeviceCerts, RpcError, Transport};
use crate::tunnel::{AgentControl as AgentMsg, GatewayControl as GatewayMsg, Hello};

use super::{gateway_msg_kind, AuditId, ControlError, HANDSHAKE_TIMEOUT, RENEW_CHECK};

/// Keep-alive on the control stream (TCP tunnels; QUIC keeps itself alive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// A Ping every `interval` (the agent's `--keepalive`), the first at once.
    pub interval: Duration,
    /// Give up when nothing was heard for longer than this (`--idle-timeout`), checked at
    /// each Ping.
    pub idle_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// How long the Welcome may take.
    pub handshake_timeout: Duration,
    /// `None` on QUIC.
    pub keepalive: Option<Keepalive>,
    /// How often [`AgentEvent::RenewDue`] comes.
    pub renew_check: Duration,
}

impl AgentConfig {
    /// The defaults for a tunnel on `transport`, with the agent's keep-alive settings.
    pub fn new(transport: Transport, interval: Duration, idle_timeout: Duration) -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive: (transport == Transport::Tcp).then_some(Keepalive {
                interval,
                idle_timeout,
            }),
            renew_check: RENEW_CHECK,
        }
    }
}

/// What the agent application must know or do.
#[derive(Clone, Debug)]
pub enum AgentEvent {
    /// The gateway said Welcome.
    Established {
        gateway_id: String,
        transport: Transport,
    },
    /// Time to check the certificates (no renewal is in flight): call
    /// [`AgentControl::request_renew`] if they are due or a renewal was forced.
    RenewDue,
    /// The answer to [`AgentControl::request_renew`]: store and use these.
    Renewed(DeviceCerts),
    /// The gateway refused the renewal (the tunnel stays up).
    RenewRefused(RpcError),
    /// End the sessions of these users at once.
    Locked(Vec<String>),
    /// A new CA bundle (CA rotation): check it, trust it, renew if it asks for that.
    Cas(crate::identity::CaBundle),
    /// The authority's answer to the batch `id`.
    AuditAcked { id: AuditId, ack: AuditAck },
    /// The machine closed before batch `id` was acknowledged: ship it again later.
    AuditFailed { id: AuditId },
    /// A message that changes nothing (worth a log line).
    Ignored(AgentIgnored),
    /// The machine closed; [`AgentControl::close_reason`] says why.
    Closed,
    /// The device's data budget: `Some(message)` while it is exceeded.
    Budget(Option<String>),
    /// The authority's answer to [`AgentControl::request_target_cert`] `id`.
    TargetCert {
        id: u64,
        result: Result<String, RpcError>,
    },
}

/// Messages the agent drops.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AgentIgnored {
    #[error("the gateway sent certificates nobody asked for; ignored")]
    UnsolicitedRenewed,
    #[error("the gateway sent an audit acknowledgement for no batch; ignored")]
    UnsolicitedAuditAck,
    #[error("the gateway sent a second Welcome; ignored")]
    SecondWelcome,
}

/// Why the agent's machine closed. The texts are the ones the agent logs and reports.
#[derive(Debug, thiserror::Error)]
pub enum AgentCloseReason {
    /// The gateway answered Hello with a refusal (no point in trying another transport).
    #[error("the gateway refused the tunnel: {0}")]
    HelloRefused(RpcError),
    #[error("unexpected answer to Hello ({got})")]
    UnexpectedAnswer { got: &'static str },
    #[error(
        "the gateway closed the tunnel during Hello (is this device's certificate from this \
         cluster and still valid?)"
    )]
    ClosedDuringHello,
    #[error("waiting for Welcome: {0}")]
    HelloStream(FrameError),
    #[error("no Welcome from the gateway in time")]
    HandshakeTimeout,
    /// A refusal outside a renewal: the gateway drops the tunnel (device revoked).
    #[error("the gateway refused the tunnel: {0}")]
    Refused(RpcError),
    #[error("the gateway closed the control stream")]
    StreamClosed,
    #[error("control stream: {0}")]
    Stream(FrameError),
    #[error("nothing heard from the gateway for {secs}s")]
    Idle { secs: u64 },
    /// [`AgentControl::close`]: shutdown, the connection ended, a write failed, ...
    #[error("{0}")]
    Local(String),
}

impl AgentCloseReason {
    /// Whether the tunnel ended before the Welcome (the old `establish` failed).
    pub fn during_handshake(&self) -> bool {
        matches!(
            self,
            Self::HelloRefused(_)
                | Self::UnexpectedAnswer { .. }
                | Self::ClosedDuringHello
                | Self::HelloStream(_)
                | Self::HandshakeTimeout
        )
    }
}

#[derive(Debug)]
enum State {
    AwaitingWelcome { deadline: Instant },
    Established(Established),
    Closed(AgentCloseReason),
}

#[derive(Debug)]
struct Established {
    last_heard: Instant,
    /// `None` without keep-alive.
    next_ping: Option<Instant>,
    next_renew_check: Instant,
    seq: u64,
    /// The oldest Ping not yet answered, for the round-trip time.
    ping_sent: Option<(u64, Instant)>,
    rtt_ms: Option<u32>,
    renew_pending: bool,
    audit_in_flight: Option<AuditId>,
}

/// The agent's control-stream machine; see the module docs of `control` for how to drive it.
#[derive(Debug)]
pub struct AgentControl {
    cfg: AgentConfig,
    state: State,
    transmits: VecDeque<AgentMsg>,
    events: VecDeque<AgentEvent>,
    next_audit: u64,
}

impl AgentControl {
    /// Starts the exchange: queues `Hello` and arms the Welcome deadline.
    pub fn new(now: Instant, cfg: AgentConfig, hello: Hello) -> Self {
        let deadline = now + cfg.handshake_timeout;
        let mut transmits = VecDeque::new();
        transmits.push_back(AgentMsg::Hello(hello));
        Self {
            cfg,
            state: State::AwaitingWelcome { deadline },
            transmits,
            events: VecDeque::new(),
            next_audit: 0,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<AgentMsg> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingWelcome { deadline } => Some(*deadline),
            State::Established(e) => Some(match e.next_ping {
                Some(p) => p.min(e.next_renew_check),
                None => e.next_renew_check,
            }),
            State::Closed(_) => None,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    pub fn close_reason(&self) -> Option<&AgentCloseReason> {
        match &self.state {
            State::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// The last measured round-trip time (keep-alive only).
    pub fn rtt_ms(&self) -> Option<u32> {
        match &self.state {
            State::Established(e) => e.rtt_ms,
            _ => None,
        }
    }

    /// Whether a renewal waits for its answer.
    pub fn renew_pending(&self) -> bool {
        matches!(&self.state, State::Established(e) if e.renew_pending)
    }

    /// The audit batch waiting for its ack, if any.
    pub fn audit_in_flight(&self) -> Option<AuditId> {
        match &self.state {
            State::Established(e) => e.audit_in_flight,
            _ => None,
        }
    }

    /// A raw frame body from the control stream; one that does not decode closes the machine.
    pub fn handle_frame(&mut self, now: Instant, body: &[u8]) -> Result<(), ControlError> {
        match crate::frame::decode::<GatewayMsg>(body) {
            Ok(msg) => self.handle_message(now, msg),
            Err(e) => self.handle_read_error(now, e),
        }
    }

    /// One message from the gateway.
    pub fn handle_message(&mut self, now: Instant, msg: GatewayMsg) -> Result<(), ControlError> {
        match &mut self.state {
            State::Closed(_) => Err(ControlError::Closed),
            State::AwaitingWelcome { .. } => {
                match msg {
                    GatewayMsg::Welcome {
                        gateway_id,
                        transport,
                    } => {
                        // Both timers fire at once, as the first tick of an interval does.
                        self.state = State::Established(Established {
                            last_heard: now,
                            next_ping: self.cfg.keepalive.map(|_| now),
                            next_renew_check: now,
                            seq: 0,
                            ping_sent: None,
                            rtt_ms: None,
                            renew_pending: false,
                            audit_in_flight: None,
                        });
                        self.events.push_back(AgentEvent::Established {
                            gateway_id,
                            transport,
                        });
                    }
                    GatewayMsg::Refused(e) => self.close_with(AgentCloseReason::HelloRefused(e)),
                    other => self.close_with(AgentCloseReason::UnexpectedAnswer {
                        got: gateway_msg_kind(&other),
                    }),
                }
                Ok(())
            }
            State::Established(e) => {
                e.last_heard = now;
                match msg {
                    GatewayMsg::Pong { seq } => {
                        if let Some((sent, at)) = e.ping_sent {
                            if seq == sent {
                                let ms = now.saturating_duration_since(at).as_millis();
                                e.rtt_ms = Some(u32::try_from(ms).unwrap_or(u32::MAX));
                                e.ping_sent = None;
                            }
                        }
                    }
                    GatewayMsg::Renewed(certs) if e.renew_pending => {
                        e.renew_pending = false;
                        self.events.push_back(AgentEvent::Renewed(certs));
                    }
                    GatewayMsg::Renewed(_) => self
                        .events
                        .push_back(AgentEvent::Ignored(AgentIgnored::UnsolicitedRenewed)),
                    GatewayMsg::Refused(err) if e.renew_pending => {
                        e.renew_pending = false;
                        self.events.push_back(AgentEvent::RenewRefused(err));
                    }
                    GatewayMsg::Refused(err) => self.close_with(AgentCloseReason::Refused(err)),
                    GatewayMsg::Cas(cas) => self.events.push_back(AgentEvent::Cas(cas)),
                    GatewayMsg::Budget { exceeded } => {
                        self.events.push_back(AgentEvent::Budget(exceeded))
                    }
                    GatewayMsg::Locked { users } => {
                        self.events.push_back(AgentEvent::Locked(users))
                    }
                    GatewayMsg::TargetCert { id, result } => {
                        self.events.push_back(AgentEvent::TargetCert { id, result })
                    }
                    GatewayMsg::Welcome { .. } => self
                        .events
                        .push_back(AgentEvent::Ignored(AgentIgnored::SecondWelcome)),
                    GatewayMsg::AuditAck(ack) => match e.audit_in_flight.take() {
                        Some(id) => self.events.push_back(AgentEvent::AuditAcked { id, ack }),
                        None => self
                            .events
                            .push_back(AgentEvent::Ignored(AgentIgnored::UnsolicitedAuditAck)),
                    },
                }
                Ok(())
            }
        }
    }

    /// The control stream failed or ended; the machine closes.
    pub fn handle_read_error(
        &mut self,
        _now: Instant,
        err: FrameError,
    ) -> Result<(), ControlError> {
        let reason = match (&self.state, err) {
            (State::Closed(_), _) => return Err(ControlError::Closed),
            (State::AwaitingWelcome { .. }, FrameError::Closed | FrameError::Truncated) => {
                AgentCloseReason::ClosedDuringHello
            }
            (State::AwaitingWelcome { .. }, e) => AgentCloseReason::HelloStream(e),
            (State::Established(_), FrameError::Closed) => AgentCloseReason::StreamClosed,
            (State::Established(_), e) => AgentCloseReason::Stream(e),
        };
        self.close_with(reason);
        Ok(())
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let keepalive = self.cfg.keepalive;
        let renew_check = self.cfg.renew_check;
        match &mut self.state {
            State::Closed(_) => {}
            State::AwaitingWelcome { deadline } => {
                if now >= *deadline {
                    self.close_with(AgentCloseReason::HandshakeTimeout);
                }
            }
            State::Established(e) => {
                if let (Some(k), Some(at)) = (keepalive, e.next_ping) {
                    if now >= at {
                        if now.saturating_duration_since(e.last_heard) > k.idle_timeout {
                            let secs = k.idle_timeout.as_secs();
                            self.close_with(AgentCloseReason::Idle { secs });
                            return;
                        }
                        e.seq += 1;
                        if e.ping_sent.is_none() {
                            e.ping_sent = Some((e.seq, now));
                        }
                        self.transmits.push_back(AgentMsg::Ping {
                            seq: e.seq,
                            rtt_ms: e.rtt_ms,
                        });
                        e.next_ping = Some(now + k.interval);
                    }
                }
                if now >= e.next_renew_check {
                    e.next_renew_check = now + renew_check;
                    if !e.renew_pending {
                        self.events.push_back(AgentEvent::RenewDue);
                    }
                }
            }
        }
    }

    /// Changes the keep-alive (`None`: the transport keeps itself alive). The next Ping goes
    /// one new interval from `now`; the idle check comes with it and counts from `now` (on
    /// QUIC the control stream may have been quiet for hours).
    pub fn set_keepalive(&mut self, now: Instant, keepalive: Option<Keepalive>) {
        self.cfg.keepalive = keepalive;
        if let State::Established(e) = &mut self.state {
            e.next_ping = keepalive.map(|k| now + k.interval);
            e.last_heard = e.last_heard.max(now);
        }
    }

    /// Sends a Ping now, outside the keep-alive's rhythm: an idle QUIC agent whose address
    /// went away says so at once, and the gateway follows it to the new one.
    pub fn ping_now(&mut self) -> Result<(), ControlError> {
        let e = self.established()?;
        e.seq += 1;
        let (seq, rtt_ms) = (e.seq, e.rtt_ms);
        self.transmits.push_back(AgentMsg::Ping { seq, rtt_ms });
        Ok(())
    }

    /// Asks the gateway for fresh certificates for the same key, with the device's
    /// signature on the request (see [`crate::renew`]).
    pub fn request_renew(
        &mut self,
        ssh_public_key: String,
        proof: crate::renew::RenewProof,
    ) -> Result<(), ControlError> {
        let e = self.established()?;
        if e.renew_pending {
            return Err(ControlError::RenewInFlight);
        }
        e.renew_pending = true;
        self.transmits.push_back(AgentMsg::RenewProven {
            ssh_public_key,
            proof,
        });
        Ok(())
    }

    /// Sends the device's signed word that it holds this tunnel (once, after Welcome).
    pub fn attest(&mut self, proof: crate::attest::TunnelProof) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(AgentMsg::Attest(proof));
        Ok(())
    }

    /// Asks the authority, through the gateway, for a per-session target certificate
    /// (record mode, issue 22); the answer comes as [`AgentEvent::TargetCert`] of `req.id`.
    pub fn request_target_cert(
        &mut self,
        req: crate::targets::TargetCertRequest,
    ) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(AgentMsg::TargetCert(req));
        Ok(())
    }

    /// Sends a signed audit batch; one at a time (wait for its ack or failure).
    pub fn send_audit(&mut self, batch: AuditBatch) -> Result<AuditId, ControlError> {
        let id = AuditId(self.next_audit);
        let e = self.established()?;
        if e.audit_in_flight.is_some() {
            return Err(ControlError::AuditInFlight);
        }
        e.audit_in_flight = Some(id);
        self.next_audit += 1;
        self.transmits.push_back(AgentMsg::Audit(batch));
        Ok(id)
    }

    /// Sends the agent's byte counters (a snapshot; no answer comes).
    pub fn send_usage(&mut self, report: crate::usage::UsageReport) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(AgentMsg::Usage(report));
        Ok(())
    }

    /// Closes from this side (first reason wins; closing twice changes nothing).
    pub fn close(&mut self, _now: Instant, reason: impl Into<String>) {
        if !self.is_closed() {
            self.close_with(AgentCloseReason::Local(reason.into()));
        }
    }

    fn established(&mut self) -> Result<&mut Established, ControlError> {
        match &mut self.state {
            State::Established(e) => Ok(e),
            State::AwaitingWelcome { .. } => Err(ControlError::NotEstablished),
            State::Closed(_) => Err(ControlError::Closed),
        }
    }

    fn close_with(&mut self, reason: AgentCloseReason) {
        let old = std::mem::replace(&mut self.state, State::Closed(reason));
        if let State::Established(Established {
            audit_in_flight: Some(id),
            ..
        }) = old
        {
            self.events.push_back(AgentEvent::AuditFailed { id });
        }
        self.events.push_back(AgentEvent::Closed);
    }
}
