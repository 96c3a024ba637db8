//! Single sign-on with an OpenID Connect provider.
//!
//! tsh asks the gateway where to send the browser (`SsoStart`, with tsh's loopback address
//! as the redirect); the gateway answers with the provider's authorization URL, carrying a
//! fresh `state`, `nonce` and PKCE challenge whose verifier it keeps. The provider sends the
//! browser back to tsh's loopback listener with a code; tsh hands code and state to the
//! gateway (`SsoFinish`) over its verified TLS connection, together with the public key it
//! made. The gateway redeems the code (client secret + PKCE verifier: the code alone is
//! worth nothing), verifies the ID token (signature against the provider's keys, issuer,
//! audience, expiry, nonce), and asks the authority to sign tsh's key for the user and
//! groups the token names; the authority decides what those groups grant.

pub mod http;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use edgeport_proto::rpc::{ErrorKind, RpcError, SsoLoginRequest};
use edgeport_proto::tunnel::SsoFinish;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};

use self::http::HttpClient;

/// A login must come back within this time of its start.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Logins in progress at once (older ones are dropped first).
const MAX_PENDING: usize = 10_000;
/// The provider's discovery document and keys are fetched again after this long.
const METADATA_TTL: Duration = Duration::from_secs(3600);

/// The connector's settings (gateway flags).
#[derive(Clone, Debug)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret_file: PathBuf,
    /// Which ID token claim names the Edgeport user: `preferred_username`, `email` or `sub`.
    pub username_claim: String,
    /// Which claim lists the user's groups.
    pub groups_claim: String,
    /// Roots (PEM) for an `https` issuer; the system's if absent.
    pub ca_file: Option<PathBuf>,
}

struct Pending {
    verifier: PkceCodeVerifier,
    nonce: Nonce,
    redirect: RedirectUrl,
    started: Instant,
}

pub struct Oidc {
    cfg: OidcConfig,
    secret: ClientSecret,
    http: HttpClient,
    metadata: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
    pending: Mutex<HashMap<String, Pending>>,
}

fn denied(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Denied, msg)
}

fn unavailable(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Internal, msg)
}

impl Oidc {
    /// Reads the client secret and prepares the HTTP client; the provider is contacted on
    /// the first login (a provider that is down must not keep the gateway from starting).
    pub fn new(cfg: OidcConfig) -> Result<Self, String> {
        let secret = std::fs::read_to_string(&cfg.client_secret_file)
            .map_err(|e| format!("{}: {e}", cfg.client_secret_file.display()))?
            .trim()
            .to_string();
        if secret.is_empty() {
            return Err(format!("{} is empty", cfg.client_secret_file.display()));
        }
        IssuerUrl::new(cfg.issuer.clone()).map_err(|e| format!("--oidc-issuer: {e}"))?;
        if !matches!(
            cfg.username_claim.as_str(),
            "preferred_username" | "email" | "sub"
        ) {
            return Err(format!(
                "--oidc-username-claim {:?}: expected preferred_username, email or sub",
                cfg.username_claim
            ));
        }
        let tls = roots_config(cfg.ca_file.as_deref())?;
        Ok(Self {
            cfg,
            secret: ClientSecret::new(secret),
            http: HttpClient::new(tls),
            metadata: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        })
    }

    async fn provider(&self) -> Result<CoreProviderMetadata, RpcError> {
        let mut cached = self.metadata.lock().await;
        if let Some((at, m)) = cached.as_ref() {
            if at.elapsed() < METADATA_TTL {
                return Ok(m.clone());
            }
        }
        let issuer = IssuerUrl::new(self.cfg.issuer.clone())
            .map_err(|e| unavailable(format!("issuer URL: {e}")))?;
        let http = self.http.clone();
        let client = move |req| {
            let http = http.clone();
            async move { http.send(req).await }
        };
        let m = CoreProviderMetadata::discover_async(issuer, &client)
            .await
            .map_err(|e| {
                tracing::warn!(issuer = %self.cfg.issuer, "OpenID Connect discovery failed: {}", chain(&e));
                unavailable(format!(
                    "the identity provider {} cannot be reached; try again later",
                    self.cfg.issuer
                ))
            })?;
        *cached = Some((Instant::now(), m.clone()));
        Ok(m)
    }

    /// The provider's login URL for a new attempt that returns to `redirect_uri`.
    pub async fn start(&self, redirect_uri: &str) -> Result<String, RpcError> {
        let redirect = loopback_redirect(redirect_uri)?;
        let meta = self.provider().await?;
        let client = CoreClient::from_provider_metadata(
            meta,
            ClientId::new(self.cfg.client_id.clone()),
            Some(self.secret.clone()),
        );
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .add_scope(Scope::new(self.cfg.groups_claim.clone()))
            .set_pkce_challenge(challenge)
            .set_redirect_uri(Cow::Owned(redirect.clone()))
            .url();
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| unavailable("internal error"))?;
        pending.retain(|_, p| p.started.elapsed() < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.started)
                .map(|(k, _)| k.clone())
            {
                pending.remove(&oldest);
            }
        }
        pending.insert(
            state.secret().clone(),
            Pending {
                verifier,
                nonce,
                redirect,
                started: Instant::now(),
            },
        );
        Ok(url.to_string())
    }

    /// Redeems the code of a login started here and verifies its ID token: who it is, for
    /// the authority to sign.
    pub async fn finish(
        &self,
        req: SsoFinish,
        client_addr: &str,
    ) -> Result<SsoLoginRequest, RpcError> {
        let p = self
            .pending
            .lock()
            .map_err(|_| unavailable("internal error"))?
            .remove(&req.state)
            .filter(|p| p.started.elapsed() < PENDING_TTL)
            .ok_or_else(|| {
                denied("this single sign-on attempt is unknown or expired (state); run tsh login again")
            })?;
        let meta = self.provider().await?;
        let client = CoreClient::from_provider_metadata(
            meta,
            ClientId::new(self.cfg.client_id.clone()),
            Some(self.secret.clone()),
        );
        let http = self.http.clone();
        let call = move |r| {
            let http = http.clone();
            async move { http.send(r).await }
        };
        let token = client
            .exchange_code(AuthorizationCode::new(req.code))
            .map_err(|e| unavailable(format!("the identity provider has no token endpoint: {e}")))?
            .set_pkce_verifier(p.verifier)
            .set_redirect_uri(Cow::Owned(p.redirect))
            .request_async(&call)
            .await
            .map_err(|e| {
                tracing::info!(
                    client = client_addr,
                    "single sign-on code refused: {}",
                    chain(&e)
                );
                denied("the identity provider refused the login code; run tsh login again")
            })?;
        let id_token = token
            .id_token()
            .ok_or_else(|| denied("the identity provider returned no ID token"))?;
        let verifier = client.id_token_verifier();
        let claims = id_token.claims(&verifier, &p.nonce).map_err(|e| {
            tracing::warn!(client = client_addr, "ID token refused: {}", chain(&e));
            denied(format!("the ID token does not verify: {e}"))
        })?;
        let subject = claims.subject().as_str().to_string();
        let user = match self.cfg.username_claim.as_str() {
            "email" => claims.email().map(|e| e.as_str().to_string()),
            "sub" => Some(subject.clone()),
            _ => claims.preferred_username().map(|u| u.as_str().to_string()),
        }
        .ok_or_else(|| {
            denied(format!(
                "the ID token has no {} claim (see the gateway's --oidc-username-claim)",
                self.cfg.username_claim
            ))
        })?;
        // The signature was verified above; its payload also carries the groups claim,
        // which the typed claims do not model.
        let groups = groups_of(&id_token.to_string(), &self.cfg.groups_claim);
        Ok(SsoLoginRequest {
            connector: "oidc".into(),
            issuer: self.cfg.issuer.clone(),
            subject,
            user,
            groups,
            ssh_public_key: req.ssh_public_key,
            ttl_secs: req.ttl_secs,
            client_addr: client_addr.to_string(),
        })
    }
}

/// tsh's listener: `http://127.0.0.1:PORT/...`, `http://[::1]:PORT/...` or `localhost`.
/// Anything else would let a link started by someone else deliver the code elsewhere.
fn loopback_redirect(uri: &str) -> Result<RedirectUrl, RpcError> {
    let bad = || {
        RpcError::new(
            ErrorKind::Invalid,
            format!("redirect {uri:?}: single sign-on returns only to tsh on this machine (http://127.0.0.1:PORT/...)"),
        )
    };
    let rest = uri.strip_prefix("http://").ok_or_else(bad)?;
    let host_port = rest.split('/').next().unwrap_or("");
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.rsplit_once(':').map_or(host_port, |(h, _)| h),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback || host_port.contains('@') {
        return Err(bad());
    }
    RedirectUrl::new(uri.to_string()).map_err(|_| bad())
}

/// The `claim` array (or single string) of a JWT's payload.
fn groups_of(jwt: &str, claim: &str) -> Vec<String> {
    let payload = jwt.split('.').nth(1).unwrap_or("");
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    match &v[claim] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn roots_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for c in pem::parse_many(&text).map_err(|e| format!("{}: {e}", path.display()))? {
                if c.tag() == "CERTIFICATE" {
                    roots
                        .add(c.contents().to_vec().into())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(edgeport_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// An error with its causes, for logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s = format!("{s}: {x}");
        c = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_redirects() {
        for ok in [
            "http://127.0.0.1:4242/v1/webapi/oidc/callback",
            "http://localhost:9/cb",
            "http://[::1]:80/cb",
        ] {
            assert!(loopback_redirect(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://127.0.0.1:4242/cb",
            "http://evil.example/cb",
            "http://127.0.0.1.evil.example:80/cb",
            "http://127.0.0.1@evil.example/cb",
            "http://10.0.0.1:80/cb",
            "javascript:alert(1)",
        ] {
            assert!(loopback_redirect(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn groups_come_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"a","groups":["devs","ops"],"team":"x"}"#);
        let jwt = format!("h.{payload}.s");
        assert_eq!(groups_of(&jwt, "groups"), ["devs", "ops"]);
        assert_eq!(groups_of(&jwt, "team"), ["x"]);
        assert!(groups_of(&jwt, "missing").is_empty());
        assert!(groups_of("garbage", "groups").is_empty());
    }
}
