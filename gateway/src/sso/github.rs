//! Single sign-on with GitHub (OAuth2 apps; github.com or GitHub Enterprise Server).
//!
//! GitHub is not an OpenID Connect provider: there is no ID token. The gateway redeems the
//! code for an access token with the client secret, asks GitHub's API who the token belongs
//! to (`/user`: login and numeric id) and which teams they are in (`/user/teams`, scope
//! `read:org`), and passes `github:ORG/TEAM` names as the groups that `tctl sso map` maps
//! (the prefix keeps them apart from an OpenID Connect provider's group names: anyone can
//! create a GitHub organisation called, say, `platform`).

use std::time::Duration;

use edgeport_proto::rpc::{RpcError, SsoLoginRequest};
use edgeport_proto::tunnel::SsoFinish;
use openidconnect::url::{form_urlencoded, Url};
use openidconnect::CsrfToken;
use serde::Deserialize;

use super::http::HttpClient;
use super::{
    denied, loopback_redirect, read_secret, roots_config, unavailable, PendingLogins, Starter,
};

/// Pages of teams read at most (100 each).
const MAX_TEAM_PAGES: usize = 10;

#[derive(Clone, Debug)]
pub struct GitHubConfig {
    pub client_id: String,
    pub client_secret_file: std::path::PathBuf,
    /// `https://github.com`, or a GitHub Enterprise Server's address.
    pub url: String,
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: String,
    pub ca_file: Option<std::path::PathBuf>,
}

pub struct GitHub {
    cfg: GitHubConfig,
    secret: String,
    http: HttpClient,
    pending: PendingLogins<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct User {
    id: u64,
    login: String,
}

#[derive(Deserialize)]
struct Team {
    slug: String,
    organization: Org,
}

#[derive(Deserialize)]
struct Org {
    login: String,
}

impl GitHub {
    pub fn new(mut cfg: GitHubConfig) -> Result<Self, String> {
        let secret = read_secret(&cfg.client_secret_file)?;
        for (flag, u) in [
            ("--github-url", &cfg.url),
            ("--github-api-url", &cfg.api_url),
        ] {
            Url::parse(u).map_err(|e| format!("{flag} {u:?}: {e}"))?;
        }
        cfg.url = cfg.url.trim_end_matches('/').to_string();
        cfg.api_url = cfg.api_url.trim_end_matches('/').to_string();
        let tls = roots_config(cfg.ca_file.as_deref())?;
        Ok(Self {
            cfg,
            secret,
            http: HttpClient::new(tls),
            pending: PendingLogins::default(),
        })
    }

    pub fn owns(&self, state: &str) -> bool {
        self.pending.contains(state)
    }

    pub fn start(&self, redirect_uri: &str, starter: Starter) -> Result<String, RpcError> {
        let redirect = loopback_redirect(redirect_uri)?;
        let state = CsrfToken::new_random().secret().clone();
        let mut url = Url::parse(&format!("{}/login/oauth/authorize", self.cfg.url))
            .map_err(|e| unavailable(format!("GitHub URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", redirect.as_str())
            .append_pair("state", &state)
            .append_pair("scope", "read:org")
            .append_pair("allow_signup", "false");
        self.pending
            .insert(state, starter, redirect.as_str().to_string())?;
        Ok(url.to_string())
    }

    pub async fn finish(
        &self,
        req: SsoFinish,
        client_addr: &str,
    ) -> Result<SsoLoginRequest, RpcError> {
        let redirect = self.pending.take(&req.state, &req.proof)?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("client_secret", &self.secret)
            .append_pair("code", &req.code)
            .append_pair("redirect_uri", &redirect)
            .finish();
        let answer: TokenAnswer = self
            .call(
                http::Method::POST,
                &format!("{}/login/oauth/access_token", self.cfg.url),
                None,
                form.into_bytes(),
            )
            .await?;
        let token = match (answer.access_token, answer.error) {
            (Some(t), None) if !t.is_empty() => t,
            (_, err) => {
                let why = err.unwrap_or_else(|| "no access token".into());
                let desc = answer.error_description.unwrap_or_default();
                tracing::info!(
                    client = client_addr,
                    "GitHub refused the login code: {why} {desc}"
                );
                return Err(denied(format!(
                    "GitHub refused the login code ({why}); run tsh login again"
                )));
            }
        };
        let user: User = self
            .call(
                http::Method::GET,
                &format!("{}/user", self.cfg.api_url),
                Some(&token),
                Vec::new(),
            )
            .await?;
        let mut groups = Vec::new();
        for page in 1..=MAX_TEAM_PAGES {
            let teams: Vec<Team> = self
                .call(
                    http::Method::GET,
                    &format!("{}/user/teams?per_page=100&page={page}", self.cfg.api_url),
                    Some(&token),
                    Vec::new(),
                )
                .await?;
            let full = teams.len() == 100;
            groups.extend(
                teams
                    .into_iter()
                    .map(|t| format!("github:{}/{}", t.organization.login, t.slug)),
            );
            if !full {
                break;
            }
        }
        Ok(SsoLoginRequest {
            connector: "github".into(),
            issuer: self.cfg.url.clone(),
            subject: user.id.to_string(),
            user: user.login,
            groups,
            ssh_public_key: req.ssh_public_key,
            ttl_secs: req.ttl_secs,
            client_addr: client_addr.to_string(),
        })
    }

    /// One JSON request to GitHub; a non-2xx answer or a body that is not the expected JSON
    /// is an error that names the endpoint (never the token).
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: http::Method,
        url: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Result<T, RpcError> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "edgeport-gateway");
        if !body.is_empty() {
            b = b.header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        }
        if let Some(t) = token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let endpoint = url.split('?').next().unwrap_or(url).to_string();
        let req = b
            .body(body)
            .map_err(|e| unavailable(format!("{endpoint}: {e}")))?;
        let resp = tokio::time::timeout(Duration::from_secs(20), self.http.send(req))
            .await
            .map_err(|_| unavailable(format!("GitHub did not answer ({endpoint})")))?
            .map_err(|e| {
                tracing::warn!("GitHub request failed ({endpoint}): {e}");
                unavailable(format!(
                    "GitHub cannot be reached ({endpoint}); try again later"
                ))
            })?;
        if !resp.status().is_success() {
            tracing::info!("GitHub answered {} ({endpoint})", resp.status());
            return Err(denied(format!(
                "GitHub answered {} ({endpoint})",
                resp.status()
            )));
        }
        serde_json::from_slice(resp.body())
            .map_err(|e| unavailable(format!("unexpected answer from GitHub ({endpoint}): {e}")))
    }
}
