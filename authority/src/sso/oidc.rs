//! The OpenID Connect connector: discovery, an authorization URL with state, nonce and a
//! PKCE challenge, code redemption and ID token verification (the openidconnect crate), all
//! at the authority: the client secret and the verifier never leave it.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use base64::Engine;
use edgeport_proto::rpc::RpcError;
use openidconnect::core::{
    CoreAuthPrompt, CoreAuthenticationFlow, CoreClient, CoreIdToken, CoreIdTokenClaims,
    CoreProviderMetadata,
};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    TokenResponse,
};

use super::http::HttpClient;
use super::{chain, unavailable, PendingLogin, Verified};
use crate::errors::denied;

/// The provider's discovery document and keys are fetched again after this long.
const METADATA_TTL: Duration = Duration::from_secs(3600);

/// A client made from the provider's discovery document (authorization endpoint set, token
/// and userinfo endpoints as the provider announced them).
type ProviderClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// The connector's settings (`tctl sso connectors add oidc`), without the secret.
#[derive(Clone, Debug)]
pub struct OidcSettings {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    /// Which ID token claim names the Edgeport user: `preferred_username`, `email` or `sub`.
    pub username_claim: String,
    /// Which claim lists the user's groups.
    pub groups_claim: String,
    /// Scopes asked for besides `openid` (providers differ in which carry groups).
    pub scopes: Vec<String>,
}

/// A new login's authorization URL and what its finish needs.
pub struct Started {
    pub url: String,
    pub state: String,
    pub pkce_verifier: String,
    pub nonce: String,
}

pub struct Oidc {
    cfg: OidcSettings,
    secret: ClientSecret,
    http: HttpClient,
    metadata: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
}

impl Oidc {
    /// Checks the settings and prepares the HTTP client; the provider is contacted on the
    /// first login (a provider that is down must not keep the connector from being saved).
    pub fn new(
        cfg: OidcSettings,
        secret: String,
        tls: rustls::ClientConfig,
    ) -> Result<Self, super::ConnectorError> {
        use super::ConnectorError::Setting;
        IssuerUrl::new(cfg.issuer.clone()).map_err(|e| Setting {
            flag: "--issuer",
            value: cfg.issuer.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(
            cfg.username_claim.as_str(),
            "preferred_username" | "email" | "sub"
        ) {
            return Err(Setting {
                flag: "--username-claim",
                value: cfg.username_claim.clone(),
                reason: "expected preferred_username, email or sub".into(),
            });
        }
        if cfg.groups_claim.trim().is_empty() {
            return Err(Setting {
                flag: "--groups-claim",
                value: cfg.groups_claim.clone(),
                reason: "must name a claim".into(),
            });
        }
        Ok(Self {
            cfg,
            secret: ClientSecret::new(secret),
            http: HttpClient::new(tls),
            metadata: tokio::sync::Mutex::new(None),
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

    fn client(&self, meta: CoreProviderMetadata) -> ProviderClient {
        provider_client(meta, &self.cfg.client_id, &self.secret)
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    /// The provider's login URL for a new attempt that returns to `redirect`, with a fresh
    /// state, nonce and PKCE challenge. A web console login (`web`) asks the provider to
    /// authenticate the user afresh (`prompt=login`, `max_age=0`), which [`Oidc::finish`]
    /// checks in the ID token's `auth_time`.
    pub async fn start(&self, redirect: &RedirectUrl, web: bool) -> Result<Started, RpcError> {
        let client = self.client(self.provider().await?);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut req = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scopes(self.cfg.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .set_redirect_uri(Cow::Borrowed(redirect));
        if web {
            req = req
                .add_prompt(CoreAuthPrompt::Login)
                .set_max_age(Duration::from_secs(0));
        }
        let (url, state, nonce) = req.url();
        Ok(Started {
            url: url.to_string(),
            state: state.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
            nonce: nonce.secret().clone(),
        })
    }

    /// Redeems the code of a login started here and verifies its ID token: who it is.
    pub async fn finish(
        &self,
        code: String,
        pending: &PendingLogin,
        client_addr: &str,
    ) -> Result<Verified, RpcError> {
        let (Some(verifier), Some(nonce)) = (&pending.pkce_verifier, &pending.nonce) else {
            return Err(denied(
                "this single sign-on attempt was not started for an OpenID Connect provider; run tsh login again",
            ));
        };
        let redirect = RedirectUrl::new(pending.redirect.clone())
            .map_err(|e| unavailable(format!("stored redirect: {e}")))?;
        let client = self.client(self.provider().await?);
        let http = self.http.clone();
        let call = move |r| {
            let http = http.clone();
            async move { http.send(r).await }
        };
        let token = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| unavailable(format!("the identity provider has no token endpoint: {e}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.clone()))
            .set_redirect_uri(Cow::Owned(redirect))
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
        let claims = verified_claims(&client, id_token, nonce, client_addr)?;
        if pending.browser_key.is_some() {
            let auth_time = claims.auth_time().map(|t| t.timestamp());
            fresh_login(auth_time, pending.started).inspect_err(|e| {
                tracing::warn!(
                    client = client_addr,
                    "web console single sign-on refused: {}",
                    e.message
                );
            })?;
        }
        let subject = claims.subject().as_str().to_string();
        let user = match self.cfg.username_claim.as_str() {
            // Edgeport user names have no `@` (they become logins' key ids and file names):
            // the address's local part; the record stays bound to issuer and subject, so
            // alice@one and alice@two cannot share an account. An address the provider has
            // not verified may belong to anyone.
            "email" => match claims.email() {
                Some(_) if claims.email_verified() != Some(true) => {
                    return Err(denied(
                        "the identity provider has not verified this account's email address (email_verified is not true); verify it at the provider, or log in another way",
                    ));
                }
                Some(e) => Some(e.as_str().split('@').next().unwrap_or_default().to_string()),
                None => None,
            },
            "sub" => Some(subject.clone()),
            _ => claims.preferred_username().map(|u| u.as_str().to_string()),
        }
        .ok_or_else(|| {
            denied(format!(
                "the ID token has no {} claim (see the connector's --username-claim)",
                self.cfg.username_claim
            ))
        })?;
        // The signature was verified above; its payload also carries the groups claim,
        // which the typed claims do not model.
        let groups = groups_of(&id_token.to_string(), &self.cfg.groups_claim);
        Ok(Verified {
            connector: self.cfg.name.clone(),
            issuer: self.cfg.issuer.clone(),
            subject,
            user,
            groups,
        })
    }
}

/// A confidential client of the provider: its ID tokens are checked against the discovery
/// document's issuer, key set and signing algorithms.
fn provider_client(
    meta: CoreProviderMetadata,
    client_id: &str,
    secret: &ClientSecret,
) -> ProviderClient {
    CoreClient::from_provider_metadata(
        meta,
        ClientId::new(client_id.to_string()),
        Some(secret.clone()),
    )
}

/// The ID token's claims, once all of these hold (security.md G18): it is signed by an
/// algorithm the provider announced, with a key of the provider's key set (or, for an HMAC
/// algorithm, with the client secret, which only the provider and the authority hold); its
/// issuer is the
/// provider; its audience is this connector's client id (and no one else it does not
/// trust); it has not expired; it carries the nonce of the login this authority started.
fn verified_claims<'t>(
    client: &ProviderClient,
    id_token: &'t CoreIdToken,
    nonce: &str,
    client_addr: &str,
) -> Result<&'t CoreIdTokenClaims, RpcError> {
    id_token
        .claims(&client.id_token_verifier(), &Nonce::new(nonce.to_string()))
        .map_err(|e| {
            let why = chain(&e);
            tracing::warn!(client = client_addr, "ID token refused: {why}");
            denied(format!("the ID token does not verify: {why}"))
        })
}

/// A web console login must have been authenticated at the provider after it started
/// (`auth_time`, Unix seconds, allowing [`super::AUTH_TIME_SKEW_SECS`] of clock skew), not
/// in an earlier session the provider kept: otherwise a link started by someone else could
/// come back without the user doing anything.
pub(crate) fn fresh_login(auth_time: Option<i64>, started: u64) -> Result<(), RpcError> {
    let Some(at) = auth_time else {
        return Err(denied(
            "the identity provider did not say when the user logged in (auth_time); the web console needs a fresh login",
        ));
    };
    if started == 0 {
        // A login in progress recorded before starts were (an upgrade): no bound to check.
        return Err(denied(
            "this single sign-on login was started before an upgrade; log in again",
        ));
    }
    let earliest = started.saturating_sub(super::AUTH_TIME_SKEW_SECS);
    if at < 0 || (at as u64) < earliest {
        return Err(denied(
            "the identity provider did not make the user log in again (auth_time is older than this login); the web console needs a fresh login",
        ));
    }
    Ok(())
}

/// The `claim` array (or single string) of a JWT's payload.
pub(crate) fn groups_of(jwt: &str, claim: &str) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use openidconnect::core::{
        CoreEdDsaPrivateSigningKey, CoreHmacKey, CoreJwsSigningAlgorithm, CoreResponseType,
        CoreSubjectIdentifierType,
    };
    use openidconnect::{
        Audience, AuthUrl, EmptyAdditionalClaims, EmptyAdditionalProviderMetadata, JsonWebKeyId,
        JsonWebKeySet, JsonWebKeySetUrl, PrivateSigningKey, ResponseTypes, StandardClaims,
        SubjectIdentifier,
    };

    const ISSUER: &str = "https://idp.example.com";
    const CLIENT_ID: &str = "edgeport";
    const SECRET: &str = "connector-secret";
    const NONCE: &str = "nonce-of-this-login";

    fn signing_key() -> CoreEdDsaPrivateSigningKey {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_pem();
        CoreEdDsaPrivateSigningKey::from_ed25519_pem(&pem, Some(JsonWebKeyId::new("k1".into())))
            .unwrap()
    }

    /// A client as `Oidc` makes it, from a discovery document announcing EdDSA and `key`.
    fn client_trusting(key: &CoreEdDsaPrivateSigningKey) -> ProviderClient {
        let meta = CoreProviderMetadata::new(
            IssuerUrl::new(ISSUER.into()).unwrap(),
            AuthUrl::new(format!("{ISSUER}/auth")).unwrap(),
            JsonWebKeySetUrl::new(format!("{ISSUER}/jwks")).unwrap(),
            vec![ResponseTypes::new(vec![CoreResponseType::Code])],
            vec![CoreSubjectIdentifierType::Public],
            vec![CoreJwsSigningAlgorithm::EdDsa],
            EmptyAdditionalProviderMetadata {},
        )
        .set_jwks(JsonWebKeySet::new(vec![key.as_verification_key()]));
        provider_client(meta, CLIENT_ID, &ClientSecret::new(SECRET.into()))
    }

    struct Claims<'a> {
        iss: &'a str,
        aud: &'a [&'a str],
        expires_in: i64,
        nonce: Option<&'a str>,
    }

    const GOOD: Claims<'static> = Claims {
        iss: ISSUER,
        aud: &[CLIENT_ID],
        expires_in: 300,
        nonce: Some(NONCE),
    };

    fn claims(c: &Claims) -> CoreIdTokenClaims {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        CoreIdTokenClaims::new(
            IssuerUrl::new(c.iss.into()).unwrap(),
            c.aud.iter().map(|a| Audience::new(a.to_string())).collect(),
            DateTime::from_timestamp(now + c.expires_in, 0).unwrap(),
            DateTime::from_timestamp(now - 600, 0).unwrap(),
            StandardClaims::new(SubjectIdentifier::new("alice-at-idp".into())),
            EmptyAdditionalClaims {},
        )
        .set_nonce(c.nonce.map(|n| Nonce::new(n.into())))
    }

    fn signed(key: &CoreEdDsaPrivateSigningKey, c: &Claims) -> CoreIdToken {
        CoreIdToken::new(claims(c), key, CoreJwsSigningAlgorithm::EdDsa, None, None).unwrap()
    }

    /// Refused, and for the expected `reason` (openidconnect's words).
    fn refused(client: &ProviderClient, token: &CoreIdToken, case: &str, reason: &str) {
        let e = verified_claims(client, token, NONCE, "192.0.2.7:5000").unwrap_err();
        assert!(
            e.message.contains("the ID token does not verify") && e.message.contains(reason),
            "{case}: {}",
            e.message
        );
    }

    #[test]
    fn id_tokens_are_checked_for_signature_issuer_audience_expiry_and_nonce() {
        let key = signing_key();
        let client = client_trusting(&key);
        let good = signed(&key, &GOOD);
        let ok = verified_claims(&client, &good, NONCE, "192.0.2.7:5000").unwrap();
        assert_eq!(ok.subject().as_str(), "alice-at-idp");

        refused(
            &client,
            &signed(&signing_key(), &GOOD),
            "another key, same key id",
            "Signature verification failed: Crypto error",
        );
        let other_issuer = Claims {
            iss: "https://evil.example.com",
            ..GOOD
        };
        refused(
            &client,
            &signed(&key, &other_issuer),
            "another issuer",
            "Invalid issuer",
        );
        let other_client = Claims {
            aud: &["another-app"],
            ..GOOD
        };
        refused(
            &client,
            &signed(&key, &other_client),
            "issued to another client",
            "Invalid audiences",
        );
        let shared = Claims {
            aud: &[CLIENT_ID, "another-app"],
            ..GOOD
        };
        refused(
            &client,
            &signed(&key, &shared),
            "an audience it does not trust too",
            "Invalid audiences",
        );
        let expired = Claims {
            expires_in: -60,
            ..GOOD
        };
        refused(&client, &signed(&key, &expired), "expired", "Expired");
        let other_login = Claims {
            nonce: Some("nonce-of-another-login"),
            ..GOOD
        };
        refused(
            &client,
            &signed(&key, &other_login),
            "another login's nonce",
            "Invalid nonce",
        );
        let no_nonce = Claims {
            nonce: None,
            ..GOOD
        };
        refused(
            &client,
            &signed(&key, &no_nonce),
            "no nonce",
            "Invalid nonce",
        );

        // An algorithm the provider did not announce: HS256 keyed with the client secret,
        // and none at all.
        let hmac = CoreHmacKey::new(SECRET.as_bytes().to_vec());
        let hs = CoreIdToken::new(
            claims(&GOOD),
            &hmac,
            CoreJwsSigningAlgorithm::HmacSha256,
            None,
            None,
        )
        .unwrap();
        refused(
            &client,
            &hs,
            "HS256 with the client secret",
            "Disallowed signature algorithm",
        );
        let unsigned = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            good.to_string().split('.').nth(1).unwrap()
        );
        let unsigned: CoreIdToken =
            serde_json::from_value(serde_json::Value::String(unsigned)).unwrap();
        refused(&client, &unsigned, "alg none", "No signature found");
    }

    #[test]
    fn web_logins_need_a_fresh_authentication() {
        assert!(fresh_login(Some(1000), 1000).is_ok());
        assert!(fresh_login(Some(1005), 1000).is_ok());
        assert!(
            fresh_login(Some(995), 1000).is_ok(),
            "a few seconds of skew"
        );
        let e = fresh_login(Some(900), 1000).unwrap_err();
        assert!(e.message.contains("auth_time is older"), "{}", e.message);
        let e = fresh_login(None, 1000).unwrap_err();
        assert!(e.message.contains("auth_time"), "{}", e.message);
        assert!(fresh_login(Some(-1), 1000).is_err());
        assert!(
            fresh_login(Some(1000), 0).is_err(),
            "a record without its start"
        );
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
