//! Single sign-on with GitHub (OAuth2 apps; github.com or GitHub Enterprise Server).
//!
//! GitHub is not an OpenID Connect provider: there is no ID token. The authority redeems
//! the code for an access token with the client secret, asks GitHub's API who the token belongs
//! to (`/user`: login and numeric id) and which teams they are in (`/user/teams`, scope
//! `read:org`), and passes `github:ORG/TEAM` names as the groups that `tctl sso map` maps
//! (the prefix keeps them apart from an OpenID Connect provider's group names: anyone can
//! create a GitHub organisation called, say, `platform`).

use std::time::Duration;

use edgeport_proto::rpc::RpcError;
use openidconnect::url::{form_urlencoded, Url};
use openidconnect::{CsrfToken, RedirectUrl};
use serde::Deserialize;

use super::http::HttpClient;
use super::{unavailable, PendingLogin, Verified};
use crate::errors::denied;

/// Pages of teams read at most (100 each).
const MAX_TEAM_PAGES: usize = 10;

pub struct GitHub {
    name: String,
    client_id: String,
    secret: String,
    /// `https://github.com`, or a GitHub Enterprise Server's address.
    url: String,
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    api_url: String,
    http: HttpClient,
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
    pub fn new(
        name: String,
        client_id: String,
        secret: String,
        url: String,
        api_url: String,
        tls: rustls::ClientConfig,
    ) -> Result<Self, super::ConnectorError> {
        for (flag, u) in [("--github-url", &url), ("--api-url", &api_url)] {
            Url::parse(u).map_err(|e| super::ConnectorError::Setting {
                flag,
                value: u.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            name,
            client_id,
            secret,
            url: url.trim_end_matches('/').to_string(),
            api_url: api_url.trim_end_matches('/').to_string(),
            http: HttpClient::new(tls),
        })
    }

    /// GitHub's login URL for a new attempt that returns to `redirect`, and its state. A web
    /// console login (`web`) asks GitHub to show its account chooser even to a user signed
    /// in there (`prompt=select_account`), so it never comes back without the user's click.
    pub fn start(&self, redirect: &RedirectUrl, web: bool) -> Result<(String, String), RpcError> {
        let state = CsrfToken::new_random().secret().clone();
        let mut url = Url::parse(&format!("{}/login/oauth/authorize", self.url))
            .map_err(|e| unavailable(format!("GitHub URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", redirect.as_str())
            .append_pair("state", &state)
            .append_pair("scope", "read:org")
            .append_pair("allow_signup", "false");
        if web {
            url.query_pairs_mut()
                .append_pair("prompt", "select_account");
        }
        Ok((url.to_string(), state))
    }

    /// Redeems the code of a login started here and asks GitHub who it is and their teams.
    pub async fn finish(
        &self,
        code: String,
        pending: &PendingLogin,
        client_addr: &str,
    ) -> Result<Verified, RpcError> {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.secret)
            .append_pair("code", &code)
            .append_pair("redirect_uri", &pending.redirect)
            .finish();
        let answer: TokenAnswer = self
            .call(
                http::Method::POST,
                &format!("{}/login/oauth/access_token", self.url),
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
                &format!("{}/user", self.api_url),
                Some(&token),
                Vec::new(),
            )
            .await?;
        let mut groups = Vec::new();
        for page in 1..=MAX_TEAM_PAGES {
            let teams: Vec<Team> = self
                .call(
                    http::Method::GET,
                    &format!("{}/user/teams?per_page=100&page={page}", self.api_url),
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
        Ok(Verified {
            connector: self.name.clone(),
            issuer: self.url.clone(),
            subject: user.id.to_string(),
            user: user.login,
            groups,
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
            .header(http::header::USER_AGENT, "edgeport-authority");
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
