//! The gateway's side of the control stream: wait for Hello, let the application admit the
//! device (or refuse it), say Welcome, then answer Pings, relay renewals and audit batches to
//! the authority (a bounded number at once) and pass on locks and refusals from elsewhere in
//! the gateway.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::audit::{AuditAck, AuditBatch};
use crate::frame::FrameError;
use crate::rpc::{DeviceCerts, ErrorKind, RpcError, Transport};
use crate::tunnel::{AgentControl as AgentMsg, GatewayControl as GatewayMsg, Hello};

use super::{agent_msg_kind, ControlError, RelayId, HANDSHAKE_TIMEOUT, RELAYS_PER_TUNNEL};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The device id from the verified client certificate: the only one trusted.
    pub device_id: String,
    /// How long the Hello may take.
    pub handshake_timeout: Duration,
    /// Close when no frame came for this long (TCP: `--tunnel-idle-timeout`; QUIC negotiates
    /// its own, so pass something very long).
    pub idle_timeout: Duration,
    /// Renewals and audit batches relayed at once; past that the gateway stops reading.
    pub relays: usize,
}

impl GatewayConfig {
    pub fn new(device_id: String, idle_timeout: Duration) -> Self {
        Self {
            device_id,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout,
            relays: RELAYS_PER_TUNNEL,
        }
    }
}

/// The application's answer to [`GatewayEvent::Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Welcome the device (if the Hello names the certificate's device), then tell it the
    /// current locks (none sent when empty).
    Accept {
        gateway_id: String,
        transport: Transport,
        locked_users: Vec<String>,
    },
    /// The certificate was revoked: refuse with this message.
    Revoked { message: String },
}

/// What the gateway application must know or do.
#[derive(Clone, Debug)]
pub enum GatewayEvent {
    /// The device said Hello: answer with [`GatewayControl::admit`] before anything else.
    Hello(Hello),
    /// Welcome queued: register the tunnel.
    Established,
    /// The device's last measured round-trip time (from its Ping).
    Rtt(u32),
    /// Relay this renewal to the authority, then call [`GatewayControl::renew_done`]; the
    /// device's signature is `None` from older agents.
    Renew {
        id: RelayId,
        ssh_public_key: String,
        proof: Option<crate::renew::RenewProof>,
    },
    /// Relay this batch to the authority, then call [`GatewayControl::audit_done`].
    Audit { id: RelayId, batch: AuditBatch },
    /// Relay this per-session target certificate request to the authority, then call
    /// [`GatewayControl::target_cert_done`].
    TargetCert {
        id: RelayId,
        req: crate::targets::TargetCertRequest,
    },
    /// A message that changes nothing.
    Ignored(GatewayIgnored),
    /// The machine closed; [`GatewayControl::close_reason`] says why.
    Closed,
    /// The device's byte counters (keep the latest for presence).
    Usage(crate::usage::UsageReport),
    /// The device's signed word that it holds this tunnel (pass it on with presence).
    Attested(crate::attest::TunnelProof),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GatewayIgnored {
    #[error("ignored a second Hello")]
    SecondHello,
}

/// Why the gateway's machine closed. Display is the text for logs and `tctl devices ls`;
/// [`GatewayCloseReason::conn_reason`] the short one the connection is closed with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayCloseReason {
    #[error("no Hello in time")]
    NoHello,
    #[error("bad Hello: {0}")]
    BadHello(FrameError),
    /// The first message was not a Hello (answered with `Refused(Invalid)`).
    #[error("expected Hello first, got {got}")]
    ExpectedHello { got: &'static str },
    /// Answered with `Refused(Denied)`.
    #[error("{message}")]
    Revoked { message: String },
    /// Answered with `Refused(Denied)`.
    #[error("Hello names device {claimed:?} but the certificate is for {certified:?}")]
    DeviceIdMismatch { claimed: String, certified: String },
    #[error("idle timeout (no keep-alive from the device for {secs}s)")]
    Idle { secs: u64 },
    #[error("closed by the device")]
    ClosedByDevice,
    #[error("control stream: {0}")]
    Stream(FrameError),
    /// [`GatewayControl::close`]: shutdown, the connection ended, the tunnel was replaced, ...
    #[error("{0}")]
    Local(String),
}

impl GatewayCloseReason {
    /// The reason the connection itself is closed with.
    pub fn conn_reason(&self) -> String {
        match self {
            Self::NoHello => "no hello".into(),
            Self::BadHello(_) => "bad hello".into(),
            Self::ExpectedHello { .. } => "protocol error".into(),
            Self::Revoked { .. } => "device revoked".into(),
            Self::DeviceIdMismatch { .. } => "device id mismatch".into(),
            other => other.to_string(),
        }
    }

    /// Whether the tunnel ended before the Welcome (it was never registered).
    pub fn during_handshake(&self) -> bool {
        matches!(
            self,
            Self::NoHello
                | Self::BadHello(_)
                | Self::ExpectedHello { .. }
                | Self::Revoked { .. }
                | Self::DeviceIdMismatch { .. }
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelayKind {
    Renew,
    Audit,
    TargetCert,
}

impl RelayKind {
    fn name(self) -> &'static str {
        match self {
            RelayKind::Renew => "renewal",
            RelayKind::Audit => "audit",
            RelayKind::TargetCert => "target certificate",
        }
    }
}

#[derive(Debug)]
enum Relay {
    Renew(String, Option<crate::renew::RenewProof>),
    Audit(AuditBatch),
    TargetCert(crate::targets::TargetCertRequest),
}

#[derive(Debug)]
enum State {
    AwaitingHello { deadline: Instant },
    AwaitingAdmission { hello: Hello },
    Established(Established),
    Closed(GatewayCloseReason),
}

#[derive(Debug)]
struct Established {
    /// `None` while reading is paused (a relay waits for a slot).
    idle_deadline: Option<Instant>,
    in_flight: BTreeMap<RelayId, RelayKind>,
    /// Relays read while every slot was taken; reading stops until they start.
    backlog: VecDeque<Relay>,
}

/// The gateway's control-stream machine; see the module docs of `control` for how to drive it.
#[derive(Debug)]
pub struct GatewayControl {
    cfg: GatewayConfig,
    state: State,
    transmits: VecDeque<GatewayMsg>,
    events: VecDeque<GatewayEvent>,
    next_relay: u64,
}

impl GatewayControl {
    /// The control stream was accepted at `now`: the Hello deadline starts.
    pub fn new(now: Instant, cfg: GatewayConfig) -> Self {
        let deadline = now + cfg.handshake_timeout;
        Self {
            cfg,
            state: State::AwaitingHello { deadline },
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_relay: 0,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<GatewayMsg> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next: `None` once closed, while a Hello
    /// waits for [`Self::admit`], and while reading is paused for a relay slot.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingHello { deadline } => Some(*deadline),
            State::Established(e) => e.idle_deadline,
            State::AwaitingAdmission { .. } | State::Closed(_) => None,
        }
    }

    /// Whether the next frame should be read now (false while waiting for [`Self::admit`] or
    /// for a relay slot: the device's frames wait in the stream meanwhile).
    pub fn wants_read(&self) -> bool {
        match &self.state {
            State::AwaitingHello { .. } => true,
            State::Established(e) => e.backlog.is_empty(),
            State::AwaitingAdmission { .. } | State::Closed(_) => false,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    pub fn close_reason(&self) -> Option<&GatewayCloseReason> {
        match &self.state {
            State::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// Relays handed to the application and not answered yet.
    pub fn relays_in_flight(&self) -> usize {
        match &self.state {
            State::Established(e) => e.in_flight.len(),
            _ => 0,
        }
    }

    /// A raw frame body from the control stream; one that does not decode closes the machine.
    pub fn handle_frame(&mut self, now: Instant, body: &[u8]) -> Result<(), ControlError> {
        match crate::frame::decode::<AgentMsg>(body) {
            Ok(msg) => self.handle_message(now, msg),
            Err(e) => self.handle_read_error(now, e),
        }
    }

    /// One message from the agent.
    pub fn handle_message(&mut self, now: Instant, msg: AgentMsg) -> Result<(), ControlError> {
        let idle = self.cfg.idle_timeout;
        let limit = self.cfg.relays;
        match &mut self.state {
            State::Closed(_) => Err(ControlError::Closed),
            State::AwaitingAdmission { .. } => Err(ControlError::AdmissionPending),
            State::AwaitingHello { .. } => {
                match msg {
                    AgentMsg::Hello(hello) => {
                        self.events.push_back(GatewayEvent::Hello(hello.clone()));
                        self.state = State::AwaitingAdmission { hello };
                    }
                    other => {
                        let got = agent_msg_kind(&other);
                        self.transmits.push_back(GatewayMsg::Refused(RpcError::new(
                            ErrorKind::Invalid,
                            "expected Hello first",
                        )));
                        self.close_with(GatewayCloseReason::ExpectedHello { got });
                    }
                }
                Ok(())
            }
            State::Established(e) => {
                let relay = match msg {
                    AgentMsg::Ping { seq, rtt_ms } => {
                        if let Some(rtt) = rtt_ms {
                            self.events.push_back(GatewayEvent::Rtt(rtt));
                        }
                        self.transmits.push_back(GatewayMsg::Pong { seq });
                        None
                    }
                    AgentMsg::Hello(_) => {
                        self.events
                            .push_back(GatewayEvent::Ignored(GatewayIgnored::SecondHello));
                        None
                    }
                    AgentMsg::Renew { ssh_public_key } => Some(Relay::Renew(ssh_public_key, None)),
                    AgentMsg::RenewProven {
                        ssh_public_key,
                        proof,
                    } => Some(Relay::Renew(ssh_public_key, Some(proof))),
                    AgentMsg::Audit(batch) => Some(Relay::Audit(batch)),
                    AgentMsg::TargetCert(req) => Some(Relay::TargetCert(req)),
                    AgentMsg::Usage(report) => {
                        self.events.push_back(GatewayEvent::Usage(report));
                        None
                    }
                    AgentMsg::Attest(proof) => {
                        self.events.push_back(GatewayEvent::Attested(proof));
                        None
                    }
                };
                if let Some(relay) = relay {
                    if e.in_flight.len() < limit && e.backlog.is_empty() {
                        let id = RelayId(self.next_relay);
                        self.next_relay += 1;
                        start_relay(e, &mut self.events, id, relay);
                    } else {
                        e.backlog.push_back(relay);
                    }
                }
                // The next read starts now, unless a relay waits for a slot.
                e.idle_deadline = e.backlog.is_empty().then(|| now + idle);
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
            (State::AwaitingHello { .. } | State::AwaitingAdmission { .. }, e) => {
                GatewayCloseReason::BadHello(e)
            }
            (State::Established(_), FrameError::Closed) => GatewayCloseReason::ClosedByDevice,
            (State::Established(_), e) => GatewayCloseReason::Stream(e),
        };
        self.close_with(reason);
        Ok(())
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let reason = match &self.state {
            State::AwaitingHello { deadline } if now >= *deadline => GatewayCloseReason::NoHello,
            State::Established(Established {
                idle_deadline: Some(at),
                ..
            }) if now >= *at => GatewayCloseReason::Idle {
                secs: self.cfg.idle_timeout.as_secs(),
            },
            _ => return,
        };
        self.close_with(reason);
    }

    /// The application's verdict on the Hello: Welcome (and the current locks), or a
    /// refusal for a revoked certificate or a Hello that names another device.
    pub fn admit(&mut self, now: Instant, admission: Admission) -> Result<(), ControlError> {
        let hello = match &self.state {
            State::AwaitingAdmission { hello } => hello,
            State::Closed(_) => return Err(ControlError::Closed),
            _ => return Err(ControlError::NothingToAdmit),
        };
        let refusal = match admission {
            Admission::Revoked { message } => Some(GatewayCloseReason::Revoked { message }),
            Admission::Accept { .. } if hello.device_id != self.cfg.device_id => {
                Some(GatewayCloseReason::DeviceIdMismatch {
                    claimed: hello.device_id.clone(),
                    certified: self.cfg.device_id.clone(),
                })
            }
            Admission::Accept {
                gateway_id,
                transport,
                locked_users,
            } => {
                self.transmits.push_back(GatewayMsg::Welcome {
                    gateway_id,
                    transport,
                });
                if !locked_users.is_empty() {
                    self.transmits.push_back(GatewayMsg::Locked {
                        users: locked_users,
                    });
                }
                None
            }
        };
        match refusal {
            Some(reason) => {
                self.transmits.push_back(GatewayMsg::Refused(RpcError::new(
                    ErrorKind::Denied,
                    reason.to_string(),
                )));
                self.close_with(reason);
            }
            None => {
                self.state = State::Established(Established {
                    idle_deadline: Some(now + self.cfg.idle_timeout),
                    in_flight: BTreeMap::new(),
                    backlog: VecDeque::new(),
                });
                self.events.push_back(GatewayEvent::Established);
            }
        }
        Ok(())
    }

    /// The authority's answer to renewal `id`: `Renewed` or `Refused` to the agent.
    pub fn renew_done(
        &mut self,
        now: Instant,
        id: RelayId,
        result: Result<DeviceCerts, RpcError>,
    ) -> Result<(), ControlError> {
        self.finish_relay(now, id, RelayKind::Renew)?;
        self.transmits.push_back(match result {
            Ok(certs) => GatewayMsg::Renewed(certs),
            Err(e) => GatewayMsg::Refused(e),
        });
        Ok(())
    }

    /// The authority's answer to target certificate request `id` (the agent's number
    /// `agent_id`): the certificate or why not.
    pub fn target_cert_done(
        &mut self,
        now: Instant,
        id: RelayId,
        agent_id: u64,
        result: Result<String, RpcError>,
    ) -> Result<(), ControlError> {
        self.finish_relay(now, id, RelayKind::TargetCert)?;
        self.transmits.push_back(GatewayMsg::TargetCert {
            id: agent_id,
            result,
        });
        Ok(())
    }

    /// The authority's answer to audit batch `id` (errors travel inside the ack).
    pub fn audit_done(
        &mut self,
        now: Instant,
        id: RelayId,
        ack: AuditAck,
    ) -> Result<(), ControlError> {
        self.finish_relay(now, id, RelayKind::Audit)?;
        self.transmits.push_back(GatewayMsg::AuditAck(ack));
        Ok(())
    }

    /// A lock or revocation the agent must honour at once.
    pub fn send_locked(&mut self, users: Vec<String>) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(GatewayMsg::Locked { users });
        Ok(())
    }

    /// The cluster's new CA bundle (a CA rotation), for the agent to check and trust.
    pub fn send_cas(&mut self, cas: crate::identity::CaBundle) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(GatewayMsg::Cas(cas));
        Ok(())
    }

    /// The device's data budget state (see [`GatewayMsg::Budget`]).
    pub fn send_budget(&mut self, exceeded: Option<String>) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(GatewayMsg::Budget { exceeded });
        Ok(())
    }

    /// Refuses the tunnel (the device was removed); the caller closes it a moment later.
    pub fn send_refused(&mut self, error: RpcError) -> Result<(), ControlError> {
        self.established()?;
        self.transmits.push_back(GatewayMsg::Refused(error));
        Ok(())
    }

    /// Closes from this side (first reason wins; closing twice changes nothing).
    pub fn close(&mut self, _now: Instant, reason: impl Into<String>) {
        if !self.is_closed() {
            self.close_with(GatewayCloseReason::Local(reason.into()));
        }
    }

    fn established(&mut self) -> Result<&mut Established, ControlError> {
        match &mut self.state {
            State::Established(e) => Ok(e),
            State::Closed(_) => Err(ControlError::Closed),
            _ => Err(ControlError::NotEstablished),
        }
    }

    fn finish_relay(
        &mut self,
        now: Instant,
        id: RelayId,
        kind: RelayKind,
    ) -> Result<(), ControlError> {
        let idle = self.cfg.idle_timeout;
        let limit = self.cfg.relays;
        let e = self.established()?;
        if e.in_flight.get(&id) != Some(&kind) {
            return Err(ControlError::UnknownRelay {
                id,
                kind: kind.name(),
            });
        }
        e.in_flight.remove(&id);
        if e.in_flight.len() < limit {
            if let Some(relay) = e.backlog.pop_front() {
                let id = RelayId(self.next_relay);
                self.next_relay += 1;
                // `established()` borrowed all of self; take the state again.
                if let State::Established(e) = &mut self.state {
                    start_relay(e, &mut self.events, id, relay);
                    if e.backlog.is_empty() {
                        // Reading resumes now, with a fresh idle deadline.
                        e.idle_deadline = Some(now + idle);
                    }
                }
            }
        }
        Ok(())
    }

    fn close_with(&mut self, reason: GatewayCloseReason) {
        self.state = State::Closed(reason);
        self.events.push_back(GatewayEvent::Closed);
    }
}

fn start_relay(e: &mut Established, events: &mut VecDeque<GatewayEvent>, id: RelayId, r: Relay) {
    match r {
        Relay::Renew(ssh_public_key, proof) => {
            e.in_flight.insert(id, RelayKind::Renew);
            events.push_back(GatewayEvent::Renew {
                id,
                ssh_public_key,
                proof,
            });
        }
        Relay::Audit(batch) => {
            e.in_flight.insert(id, RelayKind::Audit);
            events.push_back(GatewayEvent::Audit { id, batch });
        }
        Relay::TargetCert(req) => {
            e.in_flight.insert(id, RelayKind::TargetCert);
            events.push_back(GatewayEvent::TargetCert { id, req });
        }
    }
}
