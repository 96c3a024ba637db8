//! The device id -> tunnel registry and the stream API the rest of the gateway uses:
//! [`Tunnels::open_stream`] opens a stream to a device with a [`StreamHeader`] and hands back
//! a [`BoxedStream`], whatever the tunnel runs on (QUIC or yamux over TCP+TLS).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeport_net::write_frame;
use edgeport_net::write_gate::WriteGate;
use edgeport_net::BoxedStream;
use edgeport_proto::identity::CaBundle;
use edgeport_proto::rpc::{DevicePresence, RpcError};
use edgeport_proto::tunnel::{Hello, StreamHeader};
use tokio::sync::{mpsc, Notify};
use tokio_util::task::TaskTracker;

/// How long opening a stream and sending its header may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("device {0} is not connected to this gateway")]
    NotConnected(String),
    #[error("cannot open a stream to device {device}: {err}")]
    Open { device: String, err: String },
    #[error("device {0} did not accept a stream in time")]
    Timeout(String),
    /// No link to the gateway that holds the device (details in the gateway's log).
    #[error("{0}")]
    Peer(String),
    /// The gateway that holds the device refused the forwarded dial.
    #[error("{0}")]
    Refused(edgeport_proto::rpc::RpcError),
}

/// One device's live tunnel.
pub struct Tunnel {
    pub device_id: String,
    /// Distinguishes this tunnel from an older or newer one of the same device.
    pub generation: u64,
    pub conn: Arc<dyn edgeport_net::Tunnel>,
    /// Lets a new stream's header and the control stream's frames go ahead of the bulk
    /// writes of the streams already open ([`edgeport_net::write_gate`]).
    pub gate: Arc<WriteGate>,
    pub hello: Hello,
    /// The address the tunnel came from.
    pub remote_addr: SocketAddr,
    /// The address last seen (QUIC follows a device that changes networks): see
    /// [`Tunnel::path_changed`].
    pub last_addr: Mutex<SocketAddr>,
    pub connected_at: u64,
    /// SHA-256 of the device certificate: revocation refuses exactly this certificate, so
    /// a device that joins again (new certificate) is welcome.
    pub cert_fingerprint: String,
    /// Commands for the tunnel's control machine (locks, refusals), to the task that owns it.
    pub control: mpsc::Sender<Outside>,
    /// Agent-reported RTT, for transports that do not measure their own (TCP).
    pub tcp_rtt_ms: AtomicU32,
    /// Why the gateway closed it (when it did).
    pub close_reason: Mutex<Option<String>>,
    /// The agent's latest byte counters, passed on with the next presence report.
    pub usage: Mutex<Option<edgeport_proto::usage::UsageReport>>,
    /// The device's signed word that it holds this tunnel, passed on with every presence
    /// report: the authority takes this gateway as the device's holder only with it.
    pub proof: Mutex<Option<edgeport_proto::attest::TunnelProof>>,
}

impl Tunnel {
    /// Smoothed round-trip time in milliseconds.
    pub fn rtt_ms(&self) -> u32 {
        match self.conn.rtt() {
            Some(rtt) => rtt.as_millis().min(u32::MAX as u128) as u32,
            None => self.tcp_rtt_ms.load(Ordering::Relaxed),
        }
    }

    /// The device's address now: after a QUIC connection migration (the device changed
    /// networks), no longer the one the tunnel came from.
    pub fn address(&self) -> SocketAddr {
        self.conn.remote_addr().unwrap_or(self.remote_addr)
    }

    /// `(old, new)` when the device's address changed since the last call.
    pub fn path_changed(&self) -> Option<(SocketAddr, SocketAddr)> {
        let now = self.address();
        let mut last = self.last_addr.lock().ok()?;
        (*last != now).then(|| (std::mem::replace(&mut *last, now), now))
    }

    /// Closes the tunnel, remembering why (reported as the disconnect reason).
    pub fn close(&self, reason: &str) {
        if let Ok(mut r) = self.close_reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.conn.close(reason);
    }

    pub fn presence(&self) -> DevicePresence {
        DevicePresence {
            id: self.device_id.clone(),
            labels: self.hello.labels.clone(),
            version: self.hello.version.clone(),
            arch: self.hello.arch.clone(),
            transport: self.conn.transport(),
            address: self.address().to_string(),
            rtt_ms: self.rtt_ms(),
            connected_at: self.connected_at,
            kube_cluster: self.hello.kube_cluster.clone(),
            loss_permille: self.conn.path_counters().map(|c| {
                let permille = c.packets_lost.saturating_mul(1000) / c.packets_sent.max(1);
                u32::try_from(permille).unwrap_or(1000)
            }),
            // Sent once: agents report cumulative counters, so one lost with a failed
            // presence report is made good by the agent's next.
            usage: self.usage.lock().ok().and_then(|mut u| u.take()),
            proof: self.proof.lock().ok().and_then(|p| p.clone()),
        }
    }

    /// Opens a stream to the device and sends `header` on it. The stream's writes then
    /// yield to the next stream's header and to control frames (see [`Tunnel::gate`]): a
    /// dial during bulk transfers is not stuck behind them for want of flow-control credit.
    pub async fn open_stream(&self, header: &StreamHeader) -> Result<BoxedStream, TunnelError> {
        let fut = async {
            let mut s = self.conn.open().await.map_err(|err| TunnelError::Open {
                device: self.device_id.clone(),
                err: err.to_string(),
            })?;
            // Not while waiting for stream credit above: that comes back only as streams
            // finish, which held writes would keep them from doing.
            let _urgent = self.gate.urgent();
            write_frame(&mut s, header)
                .await
                .map_err(|e| TunnelError::Open {
                    device: self.device_id.clone(),
                    err: e.to_string(),
                })?;
            Ok(Box::new(self.gate.gate(s)) as BoxedStream)
        };
        let start = std::time::Instant::now();
        let opened = tokio::time::timeout(OPEN_TIMEOUT, fut)
            .await
            .map_err(|_| TunnelError::Timeout(self.device_id.clone()))?;
        if opened.is_ok() {
            crate::metrics::METRICS
                .stream_open
                .observe(start.elapsed().as_secs_f64());
        }
        opened
    }
}

/// What the rest of the gateway tells a tunnel's control stream.
#[derive(Debug)]
pub enum Outside {
    /// The locked users changed: the agent ends their sessions.
    Locked(Vec<String>),
    /// The device was removed: refuse the tunnel (the caller closes it a moment later).
    Refused(RpcError),
    /// The device's data budget state changed (`Some`: past it).
    Budget(Option<String>),
    /// The cluster's CA bundle changed (CA rotation).
    Cas(Box<CaBundle>),
}

/// What the user of a bulk transfer reads when the device is past its data budget.
pub fn budget_message(device_id: &str, budget: u64) -> String {
    format!(
        "device {device_id} is past its monthly data budget of {}: bulk transfers (sftp, scp, \
         rsync, port forwarding, Kubernetes) are refused until next month or until an administrator \
         raises it (tctl devices set {device_id} --data-budget SIZE)",
        edgeport_proto::util::bytes_text(budget)
    )
}

/// All tunnels of this gateway, plus what presence reports need.
#[derive(Default)]
pub struct Tunnels {
    map: Mutex<HashMap<String, Arc<Tunnel>>>,
    next_generation: AtomicU64,
    revoked_certs: Mutex<HashSet<String>>,
    disconnected: Mutex<Vec<(String, String)>>,
    /// Devices past their monthly data budget (bytes), as the authority said last.
    over_budget: Mutex<HashMap<String, u64>>,
    /// The CA bundle to give each agent whose tunnel comes up, once a rotation was seen.
    cas: Mutex<Option<CaBundle>>,
    /// Woken when the set of tunnels changes (presence reports soon after).
    pub changed: Notify,
}

impl Tunnels {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the authority's list of devices past their data budget and tells the agents
    /// whose state changed.
    pub fn set_over_budget(&self, list: &[(String, u64)]) {
        let new: HashMap<String, u64> = list.iter().cloned().collect();
        let old = match self.over_budget.lock() {
            Ok(mut b) => std::mem::replace(&mut *b, new.clone()),
            Err(_) => return,
        };
        for t in self.all() {
            let (was, is) = (old.get(&t.device_id), new.get(&t.device_id));
            if was != is {
                let msg = is.map(|b| budget_message(&t.device_id, *b));
                let _ = t.control.try_send(Outside::Budget(msg));
            }
        }
    }

    /// A rotated CA bundle: sent to every agent now, and to each agent whose tunnel comes up
    /// later (see [`crate::ca_watch`]).
    pub fn set_cas(&self, cas: CaBundle) {
        if let Ok(mut c) = self.cas.lock() {
            *c = Some(cas.clone());
        }
        for t in self.all() {
            let _ = t.control.try_send(Outside::Cas(Box::new(cas.clone())));
        }
    }

    /// The bundle for an agent whose tunnel just came up, once a rotation was seen.
    pub fn rotated_cas(&self) -> Option<CaBundle> {
        self.cas.lock().ok()?.clone()
    }

    /// The refusal a device's agent must give bulk transfers, if it is past its budget.
    pub fn budget_refusal(&self, device_id: &str) -> Option<String> {
        let b = self.over_budget.lock().ok()?.get(device_id).copied()?;
        Some(budget_message(device_id, b))
    }

    pub fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a tunnel; an older tunnel of the same device is closed and returned.
    pub fn register(&self, t: Arc<Tunnel>) -> Option<Arc<Tunnel>> {
        crate::metrics::tunnel(t.conn.transport(), 1);
        let old = self
            .map
            .lock()
            .ok()
            .and_then(|mut m| m.insert(t.device_id.clone(), t));
        if let Some(old) = &old {
            crate::metrics::tunnel(old.conn.transport(), -1);
            old.close("replaced by a newer tunnel from the same device");
        }
        self.changed.notify_one();
        old
    }

    /// Removes the tunnel if it is still the registered one for its device.
    pub fn unregister(&self, device_id: &str, generation: u64, reason: String) {
        let removed = match self.map.lock() {
            Ok(mut m) => match m.get(device_id) {
                Some(t) if t.generation == generation => m
                    .remove(device_id)
                    .inspect(|t| crate::metrics::tunnel(t.conn.transport(), -1))
                    .is_some(),
                _ => false,
            },
            Err(_) => false,
        };
        if removed {
            if let Ok(mut d) = self.disconnected.lock() {
                d.push((device_id.to_string(), reason));
            }
            self.changed.notify_one();
        }
    }

    pub fn get(&self, device_id: &str) -> Option<Arc<Tunnel>> {
        self.map.lock().ok().and_then(|m| m.get(device_id).cloned())
    }

    pub fn all(&self) -> Vec<Arc<Tunnel>> {
        self.map
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stream API: opens a stream to `device_id` and sends `header` first.
    pub async fn open_stream(
        &self,
        device_id: &str,
        header: &StreamHeader,
    ) -> Result<BoxedStream, TunnelError> {
        let t = self
            .get(device_id)
            .ok_or_else(|| TunnelError::NotConnected(device_id.to_string()))?;
        t.open_stream(header).await
    }

    /// Closes the device's tunnel and refuses its current certificate from now on. The
    /// delayed close runs on `tasks` (the gateway's, drained on shutdown).
    pub fn revoke(&self, device_id: &str, reason: &str, tasks: &TaskTracker) {
        if let Some(t) = self.get(device_id) {
            if let Ok(mut r) = self.revoked_certs.lock() {
                r.insert(t.cert_fingerprint.clone());
            }
            let _ = t
                .control
                .try_send(Outside::Refused(edgeport_proto::rpc::RpcError::new(
                    edgeport_proto::rpc::ErrorKind::Denied,
                    reason.to_string(),
                )));
            // Give the refusal a moment to reach the agent before the connection goes.
            let t2 = t.clone();
            let reason = reason.to_string();
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                t2.close(&reason);
            });
        }
    }

    pub fn is_revoked(&self, cert_fingerprint: &str) -> bool {
        self.revoked_certs
            .lock()
            .map(|r| r.contains(cert_fingerprint))
            .unwrap_or(false)
    }

    /// Presence snapshot of every live tunnel (taking the byte counters that came since the
    /// last one).
    pub fn snapshot(&self) -> Vec<DevicePresence> {
        self.all().iter().map(|t| t.presence()).collect()
    }

    /// Disconnects since the last successful report (minus devices that are back online).
    pub fn take_disconnected(&self) -> Vec<(String, String)> {
        let list = self
            .disconnected
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        let online = self
            .map
            .lock()
            .map(|m| m.keys().cloned().collect::<HashSet<_>>())
            .unwrap_or_default();
        list.into_iter()
            .filter(|(id, _)| !online.contains(id))
            .collect()
    }

    /// Puts disconnects back after a failed report.
    pub fn restore_disconnected(&self, mut list: Vec<(String, String)>) {
        if let Ok(mut d) = self.disconnected.lock() {
            list.append(&mut d);
            // Bound memory when the authority is away for long.
            list.truncate(10_000);
            *d = list;
        }
    }

    /// Closes every tunnel (shutdown).
    pub fn close_all(&self, reason: &str) {
        for t in self.all() {
            t.close(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Each tunnel has a channel of these, and tokio allocates a channel's first block of 32
    /// items when it is made: a large item costs every idle tunnel memory (issue 26).
    #[test]
    fn the_control_channel_item_stays_small() {
        assert!(std::mem::size_of::<super::Outside>() <= 64);
    }
}
