//! The local API server and the agent's own credentials for it: from a kubeconfig
//! (`--kubeconfig`), or from the pod's service account when the agent runs in the cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use super::yaml;

/// Where the in-cluster service-account credentials live.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error(transparent)]
    Yaml(#[from] yaml::YamlError),
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// How the forwarder reaches the API server.
pub struct Upstream {
    /// `host:port` to connect to.
    pub addr: String,
    /// The `Host` header for requests.
    pub host: String,
    pub server_name: ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    /// Bearer token (never logged); client-certificate credentials live in `tls`.
    token: Option<String>,
    /// A token file that is re-read (service-account tokens rotate).
    token_file: Option<PathBuf>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(path).map_err(|err| UpstreamError::Read {
        path: path.display().to_string(),
        err,
    })
}

fn cfg_err(msg: impl Into<String>) -> UpstreamError {
    UpstreamError::Config(msg.into())
}

impl Upstream {
    /// The current bearer token, if this upstream uses one.
    pub fn bearer(&self) -> Option<String> {
        if let Some(f) = &self.token_file {
            if let Ok(t) = std::fs::read_to_string(f) {
                let t = t.trim().to_string();
                if !t.is_empty() {
                    return Some(t);
                }
            }
        }
        self.token.clone()
    }

    /// Loads the current context of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, UpstreamError> {
        let text = String::from_utf8(read(path)?).map_err(|_| cfg_err("not UTF-8"))?;
        let doc = yaml::parse(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let named = |list: &str, name: &str, field: &str| -> Option<Value> {
            doc.get(list)?
                .as_array()?
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|e| e.get(field).cloned())
        };
        let current = doc.get("current-context").and_then(Value::as_str);
        let ctx = match current {
            Some(c) => named("contexts", c, "context")
                .ok_or_else(|| cfg_err(format!("context {c:?} not found")))?,
            None => doc
                .get("contexts")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(|c| c.get("context").cloned())
                .ok_or_else(|| cfg_err("no current-context and no contexts"))?,
        };
        let cluster_name = ctx
            .get("cluster")
            .and_then(Value::as_str)
            .ok_or_else(|| cfg_err("the context names no cluster"))?;
        let cluster = named("clusters", cluster_name, "cluster")
            .ok_or_else(|| cfg_err(format!("cluster {cluster_name:?} not found")))?;
        let user = match ctx.get("user").and_then(Value::as_str) {
            Some(u) => {
                named("users", u, "user").ok_or_else(|| cfg_err(format!("user {u:?} not found")))?
            }
            None => Value::Null,
        };
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let data = |v: &Value, k: &str| -> Result<Option<Vec<u8>>, UpstreamError> {
            if let Some(d) = str_of(v, &format!("{k}-data")) {
                return base64::engine::general_purpose::STANDARD
                    .decode(d.trim())
                    .map(Some)
                    .map_err(|e| cfg_err(format!("{k}-data: {e}")));
            }
            match str_of(v, k) {
                Some(p) => read(&base.join(p)).map(Some),
                None => Ok(None),
            }
        };
        let server = str_of(&cluster, "server").ok_or_else(|| cfg_err("no server"))?;
        if cluster.get("insecure-skip-tls-verify") == Some(&Value::Bool(true)) {
            return Err(cfg_err(
                "insecure-skip-tls-verify is not supported: give the cluster's CA",
            ));
        }
        let ca = data(&cluster, "certificate-authority")?;
        let tls_name = str_of(&cluster, "tls-server-name");
        let cert = data(&user, "client-certificate")?;
        let key = data(&user, "client-key")?;
        let token = str_of(&user, "token");
        let token_file = str_of(&user, "tokenFile").map(|p| base.join(p));
        let client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(cfg_err("client-certificate and client-key go together")),
        };
        if client.is_none() && token.is_none() && token_file.is_none() {
            return Err(cfg_err(
                "the user has no credentials the agent supports (token, tokenFile, client certificate); exec plugins are not supported",
            ));
        }
        Self::build(&server, tls_name, ca, client, token, token_file)
    }

    /// The pod's service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, token and CA file).
    pub fn in_cluster() -> Result<Self, UpstreamError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| cfg_err("not in a cluster: KUBERNETES_SERVICE_HOST is not set"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(SA_DIR);
        let ca = read(&dir.join("ca.crt"))?;
        let token_file = dir.join("token");
        read(&token_file)?;
        Self::build(
            &format!("https://{host}:{port}"),
            None,
            Some(ca),
            None,
            None,
            Some(token_file),
        )
    }

    fn build(
        server: &str,
        tls_name: Option<String>,
        ca: Option<Vec<u8>>,
        client: Option<(Vec<u8>, Vec<u8>)>,
        token: Option<String>,
        token_file: Option<PathBuf>,
    ) -> Result<Self, UpstreamError> {
        let rest = server
            .strip_prefix("https://")
            .ok_or_else(|| cfg_err(format!("server {server:?} must be https://")))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        if rest.len() > authority.len() && rest[authority.len()..] != *"/" {
            return Err(cfg_err("servers with a path prefix are not supported"));
        }
        let (hostname, addr) = match authority.rsplit_once(':') {
            Some((h, p)) if !authority.ends_with(']') => {
                if p.parse::<u16>().is_err() {
                    return Err(cfg_err(format!("bad port in {server:?}")));
                }
                (h, authority.to_string())
            }
            _ => (authority, format!("{authority}:443")),
        };
        let bare = hostname.trim_start_matches('[').trim_end_matches(']');
        let name = tls_name.unwrap_or_else(|| bare.to_string());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| cfg_err(format!("bad server name {name:?}")))?;
        let mut roots = rustls::RootCertStore::empty();
        let ca = ca.ok_or_else(|| cfg_err("the cluster has no certificate-authority"))?;
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| cfg_err(format!("certificate-authority: {e}")))?;
            roots.add(c)?;
        }
        if roots.is_empty() {
            return Err(cfg_err("certificate-authority holds no certificate"));
        }
        let builder = rustls::ClientConfig::builder_with_provider(edgeport_proto::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut tls = match client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| cfg_err(format!("client-certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| cfg_err(format!("client-key: {e}")))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr,
            host: authority.to_string(),
            server_name,
            tls: Arc::new(tls),
            token,
            token_file,
        })
    }
}
