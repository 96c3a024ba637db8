//! Follows the cluster's CA bundle (`tctl auth rotate`): asks the authority for it every
//! [`EVERY`], takes a changed one only if it is signed by the x509 CA this gateway joined
//! with (same pin and cluster), stores it (`DATA/cas.json`) and pushes it to every agent over
//! its tunnel (`GatewayControl::Cas`). The agents check the signature themselves: the gateway
//! is only the messenger.
//!
//! When the bundle's x509 CAs change (an x509 CA rotation) the gateway renews its own
//! certificate at once and rebuilds every TLS configuration from the new bundle.
//!
//! Once this gateway has seen the bundle change (`DATA/cas.rotated`), it also sends the
//! bundle to each agent whose tunnel comes up, so that a device that was offline during a
//! rotation catches up; clusters that never rotated pay nothing for this.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::identity::CaBundle;
use edgeport_proto::rpc::{Request, Response};
use tokio_util::sync::CancellationToken;

use crate::authority::AuthorityClient;
use crate::identity::IdentityCell;
use crate::tunnels::Tunnels;

/// How often the bundle is fetched (one small RPC).
const EVERY: Duration = Duration::from_secs(5);
/// Present once this gateway has seen the CA bundle change.
const ROTATED_FILE: &str = "cas.rotated";

pub struct CaWatch {
    pub auth: Arc<AuthorityClient>,
    pub identity: IdentityCell,
    pub tunnels: Arc<Tunnels>,
    pub data_dir: std::path::PathBuf,
    /// Told when the bundle's x509 CAs change (an x509 CA rotation): the gateway then renews
    /// its certificate (from the CA that issues now) and rebuilds its TLS configurations.
    pub renew_now: Arc<tokio::sync::Notify>,
}

impl CaWatch {
    pub async fn run(self, shutdown: CancellationToken) {
        if self.data_dir.join(ROTATED_FILE).exists() {
            self.tunnels.set_cas(self.identity.get().cas.clone());
        }
        loop {
            if let Err(e) = self.check().await {
                tracing::warn!("CA bundle: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn check(&self) -> Result<(), String> {
        let fresh = match self.auth.call(Request::ExportCas).await {
            Ok(Response::Cas(b)) => b,
            Ok(other) => {
                return Err(format!(
                    "unexpected answer {}",
                    edgeport_proto::variant::variant_name(&other)
                ))
            }
            Err(e) => return Err(format!("cannot fetch it: {e}")),
        };
        let ident = self.identity.get();
        if fresh == ident.cas {
            return Ok(());
        }
        ident
            .cas
            .check_successor(&fresh)
            .map_err(|e| format!("the authority's new bundle is refused: {e}"))?;
        take(&self.data_dir, &fresh)?;
        let mut next = (*ident).clone();
        next.cas = fresh.clone();
        self.identity.set(next);
        tracing::info!(
            user_cas = fresh.user_cas().len(),
            host_cas = fresh.host_cas().len(),
            tunnels = self.tunnels.len(),
            "the cluster's CA bundle changed (CA rotation); telling every agent"
        );
        // During an x509 CA rotation every phase may change the CA that issues servers'
        // certificates (the bundle is signed afresh at each step).
        let x509_changed = fresh.x509_ca_pem != ident.cas.x509_ca_pem
            || fresh.x509_ca_ders().map_or(0, |d| d.len()) > 1;
        self.tunnels.set_cas(fresh);
        if x509_changed {
            tracing::info!("the cluster's x509 CAs changed; renewing this gateway's certificate");
            self.renew_now.notify_one();
        }
        Ok(())
    }
}

/// Stores the bundle and the marker that this gateway has seen a rotation.
fn take(dir: &Path, fresh: &CaBundle) -> Result<(), String> {
    crate::identity::store_cas(dir, fresh).map_err(|e| e.to_string())?;
    edgeport_proto::util::write_private(&dir.join(ROTATED_FILE), b"1\n")
        .map_err(|e| format!("{ROTATED_FILE}: {e}"))
}
