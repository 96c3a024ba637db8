//! Shipping the spool over the tunnel. Stop and wait: the agent sends one signed batch on
//! the control stream (`AgentControl::Audit`), the gateway relays it to the authority, and
//! the authority's ack (`GatewayControl::AuditAck`) says how far its copy of the chain goes;
//! only then is the spool trimmed and the next batch sent. The first batch after every
//! (re)connect, and after every batch that came back with an error instead of an ack, is
//! empty: it asks where the authority's chain ends, so events the authority stored but whose
//! ack was lost (an authority killed between its store and its answer) are deleted, not
//! resent and flagged as a replay.

use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::audit::{batch_payload, AuditAck, AuditBatch, MAX_BATCH_BYTES};
use edgeport_proto::keys::KeyPair;
use tokio::sync::mpsc;

use super::Shared;

/// How long an ack may take before the tunnel is considered unhealthy for audit.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// Retry delays while the authority cannot take batches.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Test hooks (hidden agent flags) to exercise the authority's checks. Empty without the
/// `test-hooks` feature.
#[derive(Clone, Debug, Default)]
pub struct Tamper {
    /// Sign batches with this key instead of the device key.
    #[cfg(feature = "test-hooks")]
    pub sign_key: Option<KeyPair>,
    /// After the first acknowledged batch, send it once more.
    #[cfg(feature = "test-hooks")]
    pub replay: bool,
}

impl Tamper {
    /// The key batches are signed with, and whether to replay the first acknowledged batch.
    #[cfg(feature = "test-hooks")]
    fn apply(self, key: KeyPair) -> (KeyPair, bool) {
        (self.sign_key.unwrap_or(key), self.replay)
    }

    #[cfg(not(feature = "test-hooks"))]
    fn apply(self, key: KeyPair) -> (KeyPair, bool) {
        (key, false)
    }
}

/// The trusted host CAs' raw keys, read at each acknowledgement: a CA rotation may change
/// them while the tunnel is up.
pub type HostCas = Box<dyn Fn() -> Vec<Vec<u8>> + Send + Sync>;

/// Ships until the tunnel ends (the channels close). `out` goes to the control machine
/// (`AgentControl::send_audit`), `acks` comes from its `AuditAcked` events.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    shared: Arc<Shared>,
    device_id: String,
    key: KeyPair,
    host_cas: HostCas,
    tamper: Tamper,
    out: mpsc::Sender<AuditBatch>,
    mut acks: mpsc::Receiver<AuditAck>,
) {
    let (signer, mut replay) = tamper.apply(key);
    let mut synced = false;
    let mut retry = RETRY_MIN;
    loop {
        let events = if synced {
            let s = shared.clone();
            let after = s.spool().acked();
            match tokio::task::spawn_blocking(move || s.spool().read_batch(after, MAX_BATCH_BYTES))
                .await
            {
                Ok(e) => e,
                Err(_) => return,
            }
        } else {
            Vec::new()
        };
        if synced && events.is_empty() {
            tokio::select! {
                _ = shared.written.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        }
        let n = events.len();
        let batch = AuditBatch {
            signature: signer.sign(&batch_payload(&device_id, &events)),
            events,
        };
        let resend = (replay && n > 0).then(|| batch.clone());
        if out.send(batch).await.is_err() {
            return;
        }
        let ack = match tokio::time::timeout(ACK_TIMEOUT, acks.recv()).await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(_) => {
                tracing::warn!("no acknowledgement for an audit batch in {ACK_TIMEOUT:?}; will retry on the next tunnel");
                return;
            }
        };
        let cas = host_cas();
        let error = match &ack.error {
            Some(e) => Some(e.clone()),
            None if cas.is_empty() => {
                Some("no host CA key to check acknowledgements with".to_string())
            }
            None if !cas
                .iter()
                .any(|ca| edgeport_proto::audit::verify_ack(&device_id, &ack, ca)) =>
            {
                Some(
                    "the acknowledgement is not signed by the cluster's authority; nothing deleted"
                        .to_string(),
                )
            }
            None => None,
        };
        if let Some(e) = error {
            tracing::warn!(
                events = n,
                "audit batch not taken: {e}; retrying in {:.1}s",
                retry.as_secs_f32()
            );
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
            // The authority may have stored the batch all the same: ask again where its chain
            // ends before sending anything.
            if n > 0 {
                synced = false;
            }
            continue;
        }
        retry = RETRY_MIN;
        synced = true;
        let s = shared.clone();
        let res =
            tokio::task::spawn_blocking(move || s.spool().ack(ack.acked_seq, &ack.last_hash)).await;
        match res {
            Ok(Ok(())) => tracing::debug!(
                events = n,
                acked = ack.acked_seq,
                "audit batch acknowledged"
            ),
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(_) => return,
        }
        if let Some(b) = resend {
            replay = false;
            tracing::warn!("test hook: replaying an acknowledged audit batch");
            if out.send(b).await.is_err() {
                return;
            }
            if acks.recv().await.is_none() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use edgeport_proto::audit::{ack_payload, AuditEvent};

    fn ack(ca: &KeyPair, seq: u64, hash: &str) -> AuditAck {
        AuditAck {
            acked_seq: seq,
            last_hash: hash.into(),
            error: None,
            signature: ca.sign(&ack_payload("dev1", seq, hash)),
        }
    }

    /// A shipper for device `dev1` over a spool holding two events, trusting `ca`.
    struct Harness {
        dir: std::path::PathBuf,
        shared: Arc<Shared>,
        ca: KeyPair,
        out: mpsc::Receiver<AuditBatch>,
        acks: mpsc::Sender<AuditAck>,
        ship: tokio::task::JoinHandle<()>,
    }

    fn harness(name: &str) -> Harness {
        let dir = std::env::temp_dir().join(format!("ship-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut spool = crate::audit::Spool::open(&dir, 1 << 20).unwrap();
        spool.append(vec![AuditEvent::new("exec", 1), AuditEvent::new("exec", 2)]);
        let shared = Arc::new(Shared {
            spool: std::sync::Mutex::new(spool),
            written: tokio::sync::Notify::new(),
        });
        let (ca, key) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let (out_tx, out) = mpsc::channel(4);
        let (acks, acks_rx) = mpsc::channel(4);
        let ship = tokio::spawn(run(
            shared.clone(),
            "dev1".into(),
            key,
            {
                let raw = ca.public_raw().to_vec();
                Box::new(move || vec![raw.clone()])
            },
            Tamper::default(),
            out_tx,
            acks_rx,
        ));
        Harness {
            dir,
            shared,
            ca,
            out,
            acks,
            ship,
        }
    }

    impl Harness {
        async fn next(&mut self) -> AuditBatch {
            tokio::time::timeout(Duration::from_secs(30), self.out.recv())
                .await
                .expect("the shipper sent nothing in 30 s")
                .expect("the shipper stopped")
        }

        fn end(self) {
            self.ship.abort();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A batch that comes back with an error may have been stored all the same (the
    /// authority was killed before it answered): the next batch asks where the chain ends
    /// instead of sending the events again.
    #[tokio::test]
    async fn after_an_error_the_shipper_asks_before_resending() {
        let mut h = harness("resync");
        // The sync after connecting, then the events.
        assert!(h.next().await.events.is_empty());
        h.acks.send(ack(&h.ca, 0, "")).await.unwrap();
        let batch = h.next().await;
        assert_eq!(batch.events.len(), 2);
        let stored_hash = batch.events[1].hash();
        // The authority stored them, but the answer is an error.
        h.acks
            .send(AuditAck {
                acked_seq: 0,
                last_hash: String::new(),
                error: Some("connection closed".into()),
                signature: Vec::new(),
            })
            .await
            .unwrap();
        let next = h.next().await;
        assert!(next.events.is_empty(), "the events were resent: {next:?}");
        h.acks.send(ack(&h.ca, 2, &stored_hash)).await.unwrap();
        // Nothing left to send: the spool was trimmed to the authority's chain.
        assert!(tokio::time::timeout(Duration::from_secs(1), h.out.recv())
            .await
            .is_err());
        assert_eq!(h.shared.spool().acked(), 2);
        h.end();
    }

    /// A gateway cannot make the agent delete events it relays (security.md G17): an
    /// acknowledgement not signed by the cluster's host CA, or signed for another device's
    /// chain, trims nothing, and the events go again once the authority says where its
    /// chain ends.
    #[tokio::test]
    async fn a_forged_acknowledgement_deletes_nothing() {
        let mut h = harness("forged");
        assert!(
            h.next().await.events.is_empty(),
            "the sync after connecting"
        );
        h.acks.send(ack(&h.ca, 0, "")).await.unwrap();
        let batch = h.next().await;
        assert_eq!(batch.events.len(), 2);
        let hash = batch.events[1].hash();

        let gateway = KeyPair::generate().unwrap();
        h.acks.send(ack(&gateway, 2, &hash)).await.unwrap();
        assert!(
            h.next().await.events.is_empty(),
            "asks again where the chain ends"
        );
        assert_eq!(
            h.shared.spool().acked(),
            0,
            "a gateway's own signature trimmed the spool"
        );

        let for_another_device = AuditAck {
            acked_seq: 2,
            last_hash: hash.clone(),
            error: None,
            signature: h.ca.sign(&ack_payload("dev2", 2, &hash)),
        };
        h.acks.send(for_another_device).await.unwrap();
        assert!(
            h.next().await.events.is_empty(),
            "asks again where the chain ends"
        );
        assert_eq!(
            h.shared.spool().acked(),
            0,
            "another device's ack trimmed the spool"
        );

        // The authority holds nothing: the same events go again, and its ack trims them.
        h.acks.send(ack(&h.ca, 0, "")).await.unwrap();
        let again = h.next().await;
        assert_eq!(again.events.len(), 2);
        assert_eq!(again.events[1].hash(), hash);
        h.acks.send(ack(&h.ca, 2, &hash)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while h.shared.spool().acked() != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the genuine ack was not applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h.end();
    }
}
