//! Delivers agent updates (`tctl devices update`): asks the authority every [`EVERY`] for
//! updates with devices still waiting, and for each such device whose tunnel this gateway
//! holds, fetches the binary (once per update, kept in memory while in use), opens an update
//! stream and sends the authority's signed manifest and the bytes. The agent checks the
//! signature and the hash itself; this gateway only carries bytes and reports the agent's
//! one-line answer back to the authority.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeport_net::{read_frame, write_frame};
use edgeport_proto::rpc::{Request, Response};
use edgeport_proto::tunnel::{Service, StreamHeader};
use edgeport_proto::update::{UpdateOrder, UpdateReply};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::authority::AuthorityClient;
use crate::tunnels::Tunnels;

/// How often the authority is asked for updates to deliver.
const EVERY: Duration = Duration::from_secs(2);
/// How long an agent has to take the bytes and answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Deliveries {
    auth: Arc<AuthorityClient>,
    tunnels: Arc<Tunnels>,
    /// (update id, device) being delivered now.
    busy: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Deliveries {
    pub fn new(auth: Arc<AuthorityClient>, tunnels: Arc<Tunnels>) -> Self {
        Self {
            auth,
            tunnels,
            busy: Default::default(),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.auth.call(Request::UpdateOrders).await {
                Ok(Response::UpdateOrders(orders)) => {
                    for o in orders {
                        self.start(Arc::new(o));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("agent updates: cannot ask the authority: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn start(&self, order: Arc<UpdateOrder>) {
        let mine: Vec<String> = order
            .pending
            .iter()
            .filter(|d| self.tunnels.get(d).is_some())
            .cloned()
            .collect();
        if mine.is_empty() {
            return;
        }
        let bin: Arc<tokio::sync::OnceCell<Option<Arc<Vec<u8>>>>> = Arc::default();
        for device in mine {
            let key = (order.id.clone(), device.clone());
            if !self
                .busy
                .lock()
                .map(|mut b| b.insert(key.clone()))
                .unwrap_or(false)
            {
                continue;
            }
            let (auth, tunnels, busy) =
                (self.auth.clone(), self.tunnels.clone(), self.busy.clone());
            let (order, bin) = (order.clone(), bin.clone());
            tokio::spawn(async move {
                let bytes = bin.get_or_init(|| fetch(&auth, &order)).await.clone();
                let (accepted, message) = match bytes {
                    Some(b) => deliver(&tunnels, &device, &order, &b).await,
                    None => {
                        // Not reported: the next round tries again.
                        if let Ok(mut b) = busy.lock() {
                            b.remove(&key);
                        }
                        return;
                    }
                };
                tracing::info!(update = %order.id, %device, accepted, "agent update delivered: {message}");
                let report = Request::UpdateReport {
                    id: order.id.clone(),
                    device: device.clone(),
                    accepted,
                    message,
                };
                if let Err(e) = auth.call(report).await {
                    tracing::warn!(update = %order.id, %device, "cannot report the update: {e}");
                }
                if let Ok(mut b) = busy.lock() {
                    b.remove(&key);
                }
            });
        }
    }
}

/// The update's binary from the authority, piece by piece.
async fn fetch(auth: &AuthorityClient, order: &UpdateOrder) -> Option<Arc<Vec<u8>>> {
    let mut buf = Vec::with_capacity(usize::try_from(order.size).unwrap_or(0));
    while (buf.len() as u64) < order.size {
        let req = Request::UpdateFetch {
            sha256: order.sha256.clone(),
            offset: buf.len() as u64,
        };
        match auth.call(req).await {
            Ok(Response::UpdateChunk(c)) if !c.is_empty() => buf.extend_from_slice(&c),
            other => {
                tracing::warn!(update = %order.id, "cannot fetch the agent binary: {other:?}");
                return None;
            }
        }
    }
    Some(Arc::new(buf))
}

/// Sends the manifest and the bytes on a new update stream; the agent's answer.
async fn deliver(
    tunnels: &Tunnels,
    device: &str,
    order: &UpdateOrder,
    bin: &[u8],
) -> (bool, String) {
    let header = StreamHeader {
        service: Service::Update,
        user: None,
        session_id: order.id.clone(),
        client_addr: String::new(),
        kube_groups: Vec::new(),
        kube_users: Vec::new(),
        ticket: None,
        via: None,
    };
    let run = async {
        let mut s = tunnels
            .open_stream(device, &header)
            .await
            .map_err(|e| e.to_string())?;
        write_frame(&mut s, &order.signed)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(bin).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let reply: UpdateReply = read_frame(&mut s).await.map_err(|e| e.to_string())?;
        let _ = s.shutdown().await;
        Ok::<_, String>(reply)
    };
    match tokio::time::timeout(DELIVERY_TIMEOUT, run).await {
        Ok(Ok(r)) => (r.accepted, r.message),
        Ok(Err(e)) => (false, format!("delivery failed: {e}")),
        Err(_) => (false, "delivery timed out".into()),
    }
}
