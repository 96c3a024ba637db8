//! The mutual-TLS connection to the authority, made from an identity file, with connection
//! and handshake failures turned into messages that say what to do.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use edgeport_net::rpc_client::{RpcClient, RpcClientError};
use edgeport_proto::identity::IdentityFile;
use edgeport_proto::keys::KeyPair;
use edgeport_proto::rpc::{ErrorKind, Request, Response};
use edgeport_proto::tls::{client_config, CertKey};
use edgeport_proto::{alpn, identity::CaBundle};

/// An open connection plus what tctl knows about where it points.
pub struct Session {
    client: RpcClient,
    /// The address dialled (used in the command lines tctl prints).
    pub auth_addr: String,
    /// The cluster's CAs as the identity file holds them.
    pub cas: CaBundle,
}

impl Session {
    /// Loads the identity and connects to `addr`.
    pub async fn open(addr: &str, identity: Option<&Path>) -> anyhow::Result<Self> {
        let path = identity.ok_or_else(|| {
            anyhow!(
                "no identity: pass --identity or set EDGEPORT_IDENTITY \
                 (the authority writes DATA_DIR/admin.identity)"
            )
        })?;
        let ident = IdentityFile::load(path)?;
        let config = tls_config(&ident)
            .with_context(|| format!("identity file {} is not usable", path.display()))?;
        let client = RpcClient::connect(addr, Arc::new(config))
            .await
            .map_err(|e| explain_connect(addr, e))?;
        Ok(Self {
            client,
            auth_addr: addr.to_string(),
            cas: ident.cas,
        })
    }

    /// Sends one request; the authority's refusals become errors that name the kind.
    pub async fn call(&mut self, req: Request) -> anyhow::Result<Response> {
        self.client.call(req).await.map_err(explain_call)
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        self.client.close().await;
    }
}

fn tls_config(ident: &IdentityFile) -> anyhow::Result<rustls::ClientConfig> {
    let key = KeyPair::from_openssh(&ident.ssh_private_key).context("private key")?;
    let ca_der = ident.cas.x509_ca_der().context("x509 CA")?;
    let me = CertKey::from_pem(&ident.x509_cert_pem, None, key.pkcs8_der())
        .context("x509 certificate")?;
    Ok(client_config(&ca_der, Some(&me), &[alpn::RPC])?)
}

/// Turns connection errors into advice. With an identity from another cluster the client is
/// the first to notice (the authority's certificate does not chain to the identity's CA); with
/// a matching CA but a foreign or revoked client certificate, the authority closes the
/// connection right after the handshake.
fn explain_connect(addr: &str, e: RpcClientError) -> anyhow::Error {
    match e {
        RpcClientError::Connect { err, .. } => anyhow!(
            "cannot reach the authority at {addr}: {err} (is it running? see --auth / EDGEPORT_AUTH)"
        ),
        RpcClientError::Handshake { err, .. } if err.contains("invalid peer certificate") => {
            anyhow!(
                "cannot verify the authority's certificate with this identity's CA \
                 (identity from another cluster?): {err}"
            )
        }
        RpcClientError::Handshake { err, .. } => anyhow!(
            "the authority at {addr} refused this identity (is it from another cluster?): {err}"
        ),
        RpcClientError::Remote(r) if r.kind == ErrorKind::Denied => {
            anyhow!("the authority refused this identity: {}", r.message)
        }
        other => anyhow!("cannot talk to the authority at {addr}: {other}"),
    }
}

fn explain_call(e: RpcClientError) -> anyhow::Error {
    match e {
        RpcClientError::Remote(r) => {
            let what = match r.kind {
                ErrorKind::Denied => "permission denied",
                ErrorKind::BadCredentials => "bad credentials",
                ErrorKind::NotFound => "not found",
                ErrorKind::AlreadyExists => "already exists",
                ErrorKind::Invalid => "invalid request",
                ErrorKind::Expired => "expired",
                ErrorKind::Locked => "locked",
                ErrorKind::GatewayRevoked => "gateway revoked",
                ErrorKind::Internal => "authority error",
                ErrorKind::SecondFactorRequired | ErrorKind::SecondFactorEnroll => {
                    "second factor needed"
                }
            };
            anyhow!("{what}: {}", r.message)
        }
        other => anyhow!(other),
    }
}
