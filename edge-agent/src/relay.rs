//! Relay mode (issue 22): a gateway-opened stream for `Service::Target(NAME)` is joined to a
//! TCP connection to the configured address of this agent's target NAME, and the agent only
//! copies bytes: the user's SSH runs end to end to the target's own sshd. Never an address
//! the user names; only with the authority's ticket for that target on this device.
//!
//! The first byte the agent sends back says how it went: `0` and then the target's bytes, or
//! `1` and one line saying why not (tsh prints it), after which the stream ends; or, for a
//! target whose host key is pinned, `2`, one frame with this device's signed statement of the
//! pin (`edgeport_proto::targets::PinnedKey`) and then the target's bytes.

use std::sync::{Arc, RwLock};

use edgeport_net::BoxedStream;
use edgeport_proto::targets::TargetCertRequest;
use edgeport_proto::ticket::{Expected, ReplayGuard};
use edgeport_proto::tunnel::{Service, StreamHeader};
use tokio::io::AsyncWriteExt;

use crate::identity::DeviceIdentity;
use crate::targets::TargetSet;

/// The first byte of a relayed stream: connected.
pub const RELAY_OK: u8 = 0;
/// The first byte of a relayed stream: refused, one line follows.
pub const RELAY_REFUSED: u8 = 1;
/// The first byte of a relayed stream: connected, and a signed pinned host key follows.
pub const RELAY_PINNED: u8 = 2;

/// What a target stream's ticket must name.
#[derive(Default)]
struct Who {
    cluster: String,
    device: String,
    /// The trusted host CAs' raw keys (two during a CA rotation).
    host_cas: Vec<Vec<u8>>,
    /// This device's host certificate and key: they sign pinned host keys for tsh.
    host_cert: String,
    key: Option<edgeport_proto::keys::KeyPair>,
}

pub struct Relay {
    targets: Arc<TargetSet>,
    who: RwLock<Who>,
    seen: ReplayGuard,
}

impl Relay {
    pub fn new(targets: Arc<TargetSet>) -> Self {
        Self {
            targets,
            who: RwLock::new(Who::default()),
            seen: ReplayGuard::default(),
        }
    }

    /// After a join, renewal or CA rotation.
    pub fn identity_changed(&self, ident: &DeviceIdentity) {
        if let Ok(mut w) = self.who.write() {
            *w = Who {
                cluster: ident.cas.cluster.clone(),
                device: ident.device_id.clone(),
                host_cas: ident.cas.host_ca_raws(),
                host_cert: ident.host_cert.clone(),
                key: Some(ident.key.clone()),
            };
        }
    }

    /// Relays `stream` to target `name`, or says in one line why not. A record-mode target
    /// (`mode=record`) is handed back, connected, for the agent's SSH server to terminate
    /// (`crate::ssh::record`): tsh then gets this device's signed word that the device's own
    /// host key is the key of `DEVICE/NAME`, since the device answers for it.
    pub async fn serve(
        &self,
        mut stream: BoxedStream,
        header: StreamHeader,
        name: &str,
    ) -> Option<Handoff> {
        // Who the user is comes from the authority's ticket; the gateway's header only says
        // whom it claims, which the log keeps apart until the ticket is checked.
        let claimed = header.user.clone().unwrap_or_default();
        let session = &header.session_id;
        let refuse = |user: Option<&str>, why: String| {
            tracing::info!(user = user.unwrap_or(""), %claimed, target = %name, %session,
                "target stream refused: {why}");
            let mut ev = crate::audit::event("target.refused")
                .session(session)
                .field("target", name)
                .field("error", &why);
            ev = match user {
                Some(u) => ev.user(u),
                None => ev.field("claimed_user", &claimed),
            };
            ev.emit();
            why
        };
        let checked = match self.who.read() {
            Ok(w) => self
                .seen
                .admit_any(
                    header.ticket.as_ref(),
                    &w.host_cas,
                    &Expected {
                        cluster: &w.cluster,
                        device: &w.device,
                        service: Service::Target(name.to_string()),
                        requester: None,
                        holder: None,
                    },
                    edgeport_net::clock::now_secs(),
                )
                .map(|claims| (w.device.clone(), claims.user))
                .map_err(|e| format!("the dial's ticket does not count: {e}")),
            Err(_) => Err("the device identity is unavailable".into()),
        };
        let (device, user) = match checked {
            Ok(d) => d,
            Err(e) => {
                say(stream, &refuse(None, e)).await;
                return None;
            }
        };
        let Some(t) = self.targets.get(name) else {
            let why = format!("device {device} has no target {name:?} configured");
            say(stream, &refuse(Some(&user), why)).await;
            return None;
        };
        if t.record && !cfg!(feature = "record-targets") {
            let why = format!(
                "target {device}/{name} is set to mode=record, but this agent was built without \
                 record mode (feature record-targets)"
            );
            say(stream, &refuse(Some(&user), why)).await;
            return None;
        }
        let mut up = match crate::targets::connect(&t.addr).await {
            Ok(s) => s,
            Err(e) => {
                let why = format!(
                    "target {device}/{name} ({}) is unreachable from the device: {e}",
                    t.addr
                );
                say(stream, &refuse(Some(&user), why)).await;
                return None;
            }
        };
        let _ = up.set_nodelay(true);
        crate::audit::event("target.connect")
            .session(session)
            .user(&user)
            .field("target", name)
            .field("addr", &t.addr)
            .emit();
        let own_key = self.own_key();
        let hello = match (&t.hostkey, t.record) {
            (_, true) => self.pin_statement(&device, name, &own_key),
            (None, false) => Ok(vec![RELAY_OK]),
            (Some(pin), false) => self.pin_statement(&device, name, pin),
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                say(stream, &refuse(Some(&user), e)).await;
                return None;
            }
        };
        if stream.write_all(&hello).await.is_err() {
            return None;
        }
        if t.record {
            return Some(Handoff {
                stream,
                header,
                user,
                target: t,
                tcp: up,
            });
        }
        let copied = tokio::io::copy_bidirectional(&mut stream, &mut up).await;
        let (up_bytes, down_bytes) = copied.unwrap_or_default();
        crate::audit::event("target.end")
            .session(session)
            .user(&user)
            .field("target", name)
            .field("bytes_up", up_bytes)
            .field("bytes_down", down_bytes)
            .emit();
        None
    }

    /// This device's host key, `ssh-ed25519 BASE64`.
    fn own_key(&self) -> String {
        let w = self.who.read();
        let line = w
            .ok()
            .and_then(|w| w.key.as_ref().map(|k| k.public_openssh()))
            .unwrap_or_default();
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A record-mode target stream, its ticket checked and the target connected, for the SSH
/// server to terminate.
pub struct Handoff {
    pub stream: BoxedStream,
    pub header: StreamHeader,
    /// The user the authority's dial ticket names.
    pub user: String,
    pub target: crate::targets::Target,
    pub tcp: tokio::net::TcpStream,
}

impl Relay {
    /// `RELAY_PINNED` and this device's signed statement that `pin` is target `name`'s key.
    fn pin_statement(&self, device: &str, name: &str, pin: &str) -> Result<Vec<u8>, String> {
        let w = self
            .who
            .read()
            .map_err(|_| "the device identity is unavailable".to_string())?;
        let key = w.key.as_ref().ok_or("the device identity is unavailable")?;
        let signed_at = edgeport_net::clock::now_secs();
        let signature = key.sign(&edgeport_proto::targets::pin_signed_bytes(
            device, name, pin, signed_at,
        ));
        let statement = edgeport_proto::targets::PinnedKey {
            device_cert: w.host_cert.clone(),
            target: name.to_string(),
            host_key: pin.to_string(),
            signed_at,
            signature,
        };
        let frame = edgeport_proto::frame::encode(&statement)
            .map_err(|e| format!("cannot send the pinned host key: {e}"))?;
        let mut out = vec![RELAY_PINNED];
        out.extend(frame);
        Ok(out)
    }
}

/// How long a record-mode login waits for the authority's per-session certificate.
const CERT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

type CertAnswer = tokio::sync::oneshot::Sender<Result<String, String>>;

/// Per-session target certificates (record mode): requests wait in the outbox until the
/// tunnel's control loop sends them (`crate::session`); answers come back by id.
#[derive(Default)]
pub struct CertBroker {
    outbox: std::sync::Mutex<Vec<TargetCertRequest>>,
    pending: std::sync::Mutex<std::collections::BTreeMap<u64, CertAnswer>>,
    next: std::sync::atomic::AtomicU64,
    wake: tokio::sync::Notify,
}

/// The agent's one broker.
pub fn certs() -> &'static CertBroker {
    static CERTS: std::sync::OnceLock<CertBroker> = std::sync::OnceLock::new();
    CERTS.get_or_init(CertBroker::default)
}

impl CertBroker {
    /// A fresh request number.
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// Sends `req` through the tunnel and waits for the authority's certificate.
    pub async fn ask(&self, req: TargetCertRequest) -> Result<String, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = req.id;
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        if let Ok(mut o) = self.outbox.lock() {
            o.push(req);
        }
        self.wake.notify_one();
        let answer = tokio::time::timeout(CERT_TIMEOUT, rx).await;
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
        match answer {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the request was dropped".into()),
            Err(_) => Err(format!(
                "no answer from the authority within {CERT_TIMEOUT:?} (is the tunnel up?)"
            )),
        }
    }

    /// Resolves when requests wait in the outbox.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    pub fn take_outbox(&self) -> Vec<TargetCertRequest> {
        self.outbox
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
    }

    /// The answer to request `id`.
    pub fn answer(&self, id: u64, result: Result<String, String>) {
        let tx = self.pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
    }
}

/// Refuses a target stream with one line.
async fn say(mut stream: BoxedStream, why: &str) {
    let mut msg = vec![RELAY_REFUSED];
    msg.extend_from_slice(why.replace('\n', " ").as_bytes());
    msg.push(b'\n');
    let _ = stream.write_all(&msg).await;
    let _ = stream.shutdown().await;
}
