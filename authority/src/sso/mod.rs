//! Single sign-on, verified by the authority itself: OpenID Connect providers ([`oidc`])
//! and GitHub ([`github`]).
//!
//! Administrators configure connectors here (`tctl sso connectors add`); they live in the
//! store with their client secrets, which never leave the authority. tsh asks its gateway
//! where to send the browser; the gateway relays that as `SsoStart`, and the authority
//! answers with the provider's authorization URL, carrying a fresh `state` (and for OpenID
//! Connect a `nonce` and a PKCE challenge). The login in progress is kept in the store
//! (table `SsoPending`), so that with authorities sharing PostgreSQL the finish may reach
//! another authority than the start. The provider sends the browser back to tsh's loopback
//! listener with a code; tsh hands code and state to the gateway, which relays them as
//! `SsoFinish`. The authority redeems the code with the client secret (and the verifier),
//! verifies who this is (the ID token's signature against the provider's keys, issuer,
//! audience, expiry and nonce; for GitHub, the API asked with the token it redeemed) and
//! only then signs. A gateway relays bytes it cannot forge into an identity: it never holds
//! a client secret, and no request lets it name a single sign-on user.
//!
//! The web console logs in the same way ([`web_start`], [`web_finish`]): the provider sends
//! the browser back to the gateway's page `https://HOST/web/sso/CONNECTOR/callback`, and the
//! login in progress holds the browser's WebCrypto key instead of tsh's secret, so only a
//! request signed by that key over its `state` can finish it: a stolen callback URL is
//! worth nothing in another browser, and the gateway that sees it cannot redeem it either.

pub mod github;
pub mod http;
pub mod oidc;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use edgeport_proto::keys::parse_ed25519_public;
use edgeport_proto::rpc::{
    Response, RpcError, SsoConnectorInfo, SsoConnectorKind, SsoConnectorSpec, SsoFinishRequest,
    SsoStartRequest, WebSsoFinishRequest, WebSsoStartRequest, WEB_SSO_FINISH_PATH,
};
use openidconnect::RedirectUrl;
use serde::{Deserialize, Serialize};

use crate::errors::{denied, internal, invalid, not_found};
use crate::service::Service;
use crate::store::{self, Store, Table};

pub use self::github::GitHub;
pub use self::oidc::Oidc;

/// A login must come back within this time of its start.
pub const PENDING_TTL_SECS: u64 = 600;
/// Logins in progress at once in the cluster: refused beyond this, rather than dropping
/// someone's login in progress.
pub const MAX_PENDING: usize = 10_000;
/// Logins in progress at once from one client address: starting logins needs no
/// credentials, so one address must not be able to push everyone else's out.
pub const MAX_PENDING_PER_CLIENT: usize = 16;
/// Web console logins in progress at once in the cluster (counted within
/// [`MAX_PENDING`]): anonymous browsers at the gateways' login pages cannot take the room
/// tsh's logins need.
pub const MAX_PENDING_WEB: usize = 2_000;
/// How much earlier than the start of a web console login the provider's `auth_time` may
/// be (the provider's clock against the authority's).
pub const AUTH_TIME_SKEW_SECS: u64 = 10;

/// What a connector established about the user, from the provider's own answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The connector's name (`oidc`, `github`).
    pub connector: String,
    /// The provider's issuer and subject (`sub`, or GitHub's numeric id).
    pub issuer: String,
    pub subject: String,
    /// The Edgeport user name.
    pub user: String,
    pub groups: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Connectors: configuration in the store.

fn kind_name(kind: &SsoConnectorKind) -> &'static str {
    match kind {
        SsoConnectorKind::Oidc { .. } => "oidc",
        SsoConnectorKind::GitHub { .. } => "github",
    }
}

/// Checks a connector and saves it (replacing one of the same name).
pub fn connector_add(store: &dyn Store, mut spec: SsoConnectorSpec) -> Result<Response, RpcError> {
    spec.name = spec.name.trim().to_string();
    spec.client_id = spec.client_id.trim().to_string();
    spec.client_secret = spec.client_secret.trim().to_string();
    if spec.name != kind_name(&spec.kind) {
        return Err(invalid(format!(
            "connector name {:?}: an {} connector is named {} (tsh login --auth {})",
            spec.name,
            kind_name(&spec.kind),
            kind_name(&spec.kind),
            kind_name(&spec.kind)
        )));
    }
    if spec.client_id.is_empty() || spec.client_id.chars().any(char::is_control) {
        return Err(invalid("the connector needs a client id"));
    }
    if spec.client_secret.is_empty() {
        return Err(invalid(
            "the connector needs a client secret (the file is empty)",
        ));
    }
    match &mut spec.kind {
        SsoConnectorKind::Oidc { scopes, .. } => {
            scopes.retain(|s| !s.trim().is_empty() && s != "openid");
        }
        SsoConnectorKind::GitHub { url, api_url } => {
            *url = url.trim_end_matches('/').to_string();
            *api_url = api_url.trim_end_matches('/').to_string();
        }
    }
    // Everything that can be checked without contacting the provider (which may be down
    // now and up at the first login).
    spec.web_origins = web_origins(&spec.web_origins)?;
    Connector::build(&spec).map_err(|e| invalid(e.to_string()))?;
    store::put(store, Table::SsoConnectors, &spec.name, &spec)?;
    tracing::info!(connector = %spec.name, client_id = %spec.client_id,
        web_origins = ?spec.web_origins, "single sign-on connector saved");
    Ok(Response::Ok)
}

/// A web console origin as `--web-origin` takes it: `https://HOST[:PORT]`, nothing else
/// (no path, query, fragment or credentials); answered in its canonical form.
pub(crate) fn web_origin(given: &str) -> Result<String, RpcError> {
    let bad = |why: &str| {
        invalid(format!(
            "--web-origin {given:?}: {why} (expected https://GATEWAY[:PORT], the web console's address)"
        ))
    };
    let u = openidconnect::url::Url::parse(given.trim()).map_err(|e| bad(&e.to_string()))?;
    if u.scheme() != "https" {
        return Err(bad("the web console is served over https only"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !u.username().is_empty()
        || u.password().is_some()
        || u.query().is_some()
        || u.fragment().is_some()
        || u.path() != "/"
    {
        return Err(bad("an origin has no path, query, fragment or user"));
    }
    Ok(u.origin().ascii_serialization())
}

/// The connector's web origins, checked, canonical and without duplicates.
fn web_origins(given: &[String]) -> Result<Vec<String>, RpcError> {
    let mut out: Vec<String> = Vec::new();
    for g in given.iter().filter(|g| !g.trim().is_empty()) {
        let o = web_origin(g)?;
        if !out.contains(&o) {
            out.push(o);
        }
    }
    Ok(out)
}

pub fn connector_list(store: &dyn Store) -> Result<Response, RpcError> {
    let list = store::list::<SsoConnectorSpec>(store, Table::SsoConnectors, "")?
        .into_iter()
        .map(|(_, s)| SsoConnectorInfo {
            name: s.name,
            client_id: s.client_id,
            custom_ca: s.ca_pem.is_some(),
            kind: s.kind,
            web_origins: s.web_origins,
        })
        .collect();
    Ok(Response::SsoConnectors(list))
}

pub fn connector_remove(store: &dyn Store, name: &str) -> Result<Response, RpcError> {
    match store.delete(Table::SsoConnectors, name)? {
        Some(_) => {
            tracing::info!(connector = name, "single sign-on connector removed");
            Ok(Response::Ok)
        }
        None => Err(not_found(format!(
            "no single sign-on connector named {name:?}"
        ))),
    }
}

/// Why a connector's settings cannot make a connector (said to the administrator).
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("the connector's CA: {0}")]
    Ca(String),
    #[error("{flag} {value:?}: {reason}")]
    Setting {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

/// A configured connector, ready to talk to its provider.
pub enum Connector {
    /// Boxed: the cached discovery document is large.
    Oidc(Box<Oidc>),
    GitHub(GitHub),
}

impl Connector {
    fn build(spec: &SsoConnectorSpec) -> Result<Self, ConnectorError> {
        let tls = edgeport_proto::tls::external_client_config_pem(
            spec.ca_pem.as_deref().map(str::as_bytes),
            || rustls_native_certs::load_native_certs().certs,
        )
        .map_err(|e| ConnectorError::Ca(e.to_string()))?;
        Ok(match &spec.kind {
            SsoConnectorKind::Oidc {
                issuer,
                username_claim,
                groups_claim,
                scopes,
            } => Connector::Oidc(Box::new(Oidc::new(
                oidc::OidcSettings {
                    name: spec.name.clone(),
                    issuer: issuer.clone(),
                    client_id: spec.client_id.clone(),
                    username_claim: username_claim.clone(),
                    groups_claim: groups_claim.clone(),
                    scopes: scopes.clone(),
                },
                spec.client_secret.clone(),
                tls,
            )?)),
            SsoConnectorKind::GitHub { url, api_url } => Connector::GitHub(GitHub::new(
                spec.name.clone(),
                spec.client_id.clone(),
                spec.client_secret.clone(),
                url.clone(),
                api_url.clone(),
                tls,
            )?),
        })
    }
}

/// The connectors this authority has built from the store's records, reused while their
/// record is unchanged (they cache the provider's discovery document and keys).
#[derive(Default)]
pub struct Connectors {
    built: Mutex<HashMap<String, (SsoConnectorSpec, Arc<Connector>)>>,
}

impl Connectors {
    /// The connector named `name` as the store has it now (another authority sharing the
    /// store may have changed it).
    pub fn get(&self, store: &dyn Store, name: &str) -> Result<Option<Arc<Connector>>, RpcError> {
        let Some(spec) = store::get::<SsoConnectorSpec>(store, Table::SsoConnectors, name)? else {
            return Ok(None);
        };
        let mut built = self
            .built
            .lock()
            .map_err(|_| internal("single sign-on", "connector cache poisoned"))?;
        if let Some((s, c)) = built.get(name) {
            if *s == spec {
                return Ok(Some(c.clone()));
            }
        }
        let c = Arc::new(Connector::build(&spec).map_err(|e| {
            internal(
                "single sign-on connector",
                format!("{name}: {e} (run tctl sso connectors add again)"),
            )
        })?);
        built.insert(name.to_string(), (spec, c.clone()));
        Ok(Some(c))
    }
}

fn not_configured(store: &dyn Store, connector: &str) -> RpcError {
    let have: Vec<String> = store::list::<SsoConnectorSpec>(store, Table::SsoConnectors, "")
        .unwrap_or_default()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    invalid(if have.is_empty() {
        "this cluster has no single sign-on connector; log in with a password".to_string()
    } else {
        format!(
            "this cluster has no {connector} single sign-on connector (it has: {}); use tsh login --auth {}",
            have.join(", "),
            have[0]
        )
    })
}

// ---------------------------------------------------------------------------------------
// Logins in progress: in the store, single use, expiring, bounded.

/// A login between `SsoStart` and `SsoFinish`, by `state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLogin {
    pub connector: String,
    /// Unix seconds after which the login is refused.
    pub expires: u64,
    /// The starting client's address, as counted for the per-client bound.
    pub client: String,
    /// Hex SHA-256 of the starting tsh's secret.
    pub proof_hash: String,
    pub redirect: String,
    /// OpenID Connect: the PKCE verifier and the nonce the ID token must carry.
    pub pkce_verifier: Option<String>,
    pub nonce: Option<String>,
    /// Web console logins: the browser key that must sign the finish (and that the
    /// session is bound to). `None` for tsh's logins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser_key: Option<Vec<u8>>,
    /// Unix seconds of the start: a web console login must have been authenticated at
    /// the provider after it (`auth_time`), not earlier in a session the provider kept.
    #[serde(default)]
    pub started: u64,
}

/// Counted together: one IPv4 address, or one IPv6 /64 (what one subscriber usually has).
pub(crate) fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

/// `IP:PORT`, `[V6]:PORT` or a bare address.
pub(crate) fn client_ip(addr: &str) -> Result<IpAddr, RpcError> {
    addr.parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| addr.parse::<IpAddr>())
        .map_err(|_| invalid(format!("client address {addr:?} is not IP:PORT")))
}

fn unknown_state() -> RpcError {
    denied("this single sign-on attempt is unknown or expired (state); run tsh login again")
}

/// Records a new login in progress under `state`, if its client and the cluster have room.
/// Expired logins found on the way are removed.
pub fn pending_insert(
    store: &dyn Store,
    state: &str,
    login: &PendingLogin,
    now: u64,
) -> Result<(), RpcError> {
    if login.proof_hash.len() != 64 || !login.proof_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "single sign-on needs the hash of tsh's secret (proof_hash: 64 hex digits)",
        ));
    }
    let mut live = 0;
    let mut live_web = 0;
    let mut from_client = 0;
    for (key, bytes) in store.scan_prefix(Table::SsoPending, "")? {
        match serde_json::from_slice::<PendingLogin>(&bytes) {
            Ok(p) if p.expires > now => {
                live += 1;
                if p.browser_key.is_some() {
                    live_web += 1;
                }
                if p.client == login.client {
                    from_client += 1;
                }
            }
            // Expired (or unreadable, which no login can use either): gone, unless it
            // changed in between.
            _ => {
                store.compare_and_swap(Table::SsoPending, &key, Some(&bytes), None)?;
            }
        }
    }
    if from_client >= MAX_PENDING_PER_CLIENT {
        return Err(denied(format!(
            "too many single sign-on logins in progress from {}; finish one or wait a few minutes",
            login.client
        )));
    }
    if login.browser_key.is_some() && live_web >= MAX_PENDING_WEB {
        return Err(RpcError::new(
            edgeport_proto::rpc::ErrorKind::Internal,
            "too many web console single sign-on logins in progress; try again in a few minutes",
        ));
    }
    if live >= MAX_PENDING {
        return Err(RpcError::new(
            edgeport_proto::rpc::ErrorKind::Internal,
            "too many single sign-on logins in progress; try again in a few minutes",
        ));
    }
    let bytes = serde_json::to_vec(login).map_err(|e| internal("single sign-on", e))?;
    if !store.compare_and_swap(Table::SsoPending, state, None, Some(bytes))? {
        return Err(internal(
            "single sign-on",
            "a fresh state was already in use",
        ));
    }
    Ok(())
}

/// The login started with `state`, once (a second attempt, or one after a refusal, finds
/// nothing), if it has not expired and `proof` is the starter's secret.
pub fn pending_take(
    store: &dyn Store,
    state: &str,
    proof: &str,
    now: u64,
) -> Result<PendingLogin, RpcError> {
    if state.is_empty() || state.len() > 256 {
        return Err(unknown_state());
    }
    // The delete is the single use: of two finishes racing, on one authority or two, only
    // one gets the record.
    let bytes = store
        .delete(Table::SsoPending, state)?
        .ok_or_else(unknown_state)?;
    let p: PendingLogin = serde_json::from_slice(&bytes).map_err(|_| unknown_state())?;
    if p.expires <= now {
        return Err(unknown_state());
    }
    if p.browser_key.is_some() {
        return Err(denied(
            "this single sign-on login was started by a web console; finish it there",
        ));
    }
    let shown = edgeport_proto::keys::sha256_hex(proof.as_bytes());
    if !edgeport_proto::util::ct_eq(
        shown.as_bytes(),
        p.proof_hash.to_ascii_lowercase().as_bytes(),
    ) {
        return Err(denied(
            "this single sign-on login was started by another client; run tsh login again",
        ));
    }
    Ok(p)
}

/// The web console's login started with `state`, once, if it has not expired and `signed`
/// is a fresh signature by the start's browser key over `POST` of
/// [`WEB_SSO_FINISH_PATH`]`STATE`.
pub fn pending_take_web(
    store: &dyn Store,
    state: &str,
    signed: &str,
    signature: &[u8],
    now: u64,
) -> Result<PendingLogin, RpcError> {
    if state.is_empty() || state.len() > 256 {
        return Err(unknown_state());
    }
    let bytes = store
        .delete(Table::SsoPending, state)?
        .ok_or_else(unknown_state)?;
    let p: PendingLogin = serde_json::from_slice(&bytes).map_err(|_| unknown_state())?;
    if p.expires <= now {
        return Err(unknown_state());
    }
    let Some(key) = &p.browser_key else {
        return Err(denied(
            "this single sign-on login was started by tsh, not by a web console",
        ));
    };
    let s = edgeport_proto::web::verify(key, signed, signature, now).map_err(|e| {
        denied(format!(
            "this single sign-on login was started by another browser: {e}"
        ))
    })?;
    if s.method != "POST" || s.path.strip_prefix(WEB_SSO_FINISH_PATH) != Some(state) {
        return Err(denied(
            "the browser's signature is not for finishing this single sign-on login",
        ));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// The RPCs.

/// Asks the connector for its login URL and keeps the login in progress.
#[allow(clippy::too_many_arguments)]
fn begin(
    svc: &Service,
    gateway: &str,
    connector_name: &str,
    redirect: RedirectUrl,
    client_addr: &str,
    proof_hash: String,
    browser_key: Option<Vec<u8>>,
    now: u64,
) -> Result<Response, RpcError> {
    let store = svc.store();
    let client = client_key(client_ip(client_addr)?).to_string();
    let connector = svc
        .sso
        .get(store, connector_name)?
        .ok_or_else(|| not_configured(store, connector_name))?;
    // A web console login always makes the user act at the provider (see `web_start`).
    let web = browser_key.is_some();
    let (auth_url, state, pkce_verifier, nonce) = match &*connector {
        Connector::Oidc(o) => {
            let s = block_on(o.start(&redirect, web))?;
            (s.url, s.state, Some(s.pkce_verifier), Some(s.nonce))
        }
        Connector::GitHub(g) => {
            let (url, state) = g.start(&redirect, web)?;
            (url, state, None, None)
        }
    };
    let login = PendingLogin {
        connector: connector_name.to_string(),
        expires: now + PENDING_TTL_SECS,
        client,
        proof_hash,
        redirect: redirect.as_str().to_string(),
        pkce_verifier,
        nonce,
        browser_key,
        started: now,
    };
    pending_insert(store, &state, &login, now)?;
    tracing::debug!(connector = %connector_name, client = %client_addr, gateway, web, "single sign-on started");
    Ok(Response::SsoRedirect { auth_url })
}

/// How long one start or finish may spend with the provider in all: less than the 15 s
/// the gateway waits for an answer, so the user gets this reason rather than a timeout.
const PROVIDER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(12);

/// Runs `fut` from a handler on the blocking pool (the providers are asked over async
/// HTTP), for at most [`PROVIDER_DEADLINE`].
fn block_on<T, F>(fut: F) -> Result<T, RpcError>
where
    F: std::future::Future<Output = Result<T, RpcError>>,
{
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| internal("single sign-on needs the server's runtime", e))?;
    handle
        .block_on(tokio::time::timeout(PROVIDER_DEADLINE, fut))
        .unwrap_or_else(|_| {
            Err(unavailable(format!(
                "the identity provider did not answer within {} s; try again later",
                PROVIDER_DEADLINE.as_secs()
            )))
        })
}

/// `SsoStart`: the provider's login URL for a new attempt that returns to tsh.
pub fn start(
    svc: &Service,
    gateway: &str,
    req: SsoStartRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let redirect = loopback_redirect(&req.redirect_uri)?;
    begin(
        svc,
        gateway,
        &req.connector,
        redirect,
        &req.client_addr,
        req.proof_hash.to_ascii_lowercase(),
        None,
        now,
    )
}

/// `WebSsoStart`: the provider's login URL for a web console login that returns to the
/// gateway's callback page, bound to the browser's key.
///
/// The gateway asking is not trusted to be honest: a rogue one could start a login with
/// its own key and put the URL before a victim already signed in at the provider. So web
/// sign-on is off unless the administrator listed the console's origin with the connector
/// (`--web-origin`), and the provider is asked to make the user log in again (OpenID
/// Connect `prompt=login` and `max_age=0`, checked against the ID token's `auth_time`;
/// GitHub `prompt=select_account`): no login finishes without the user acting at the
/// provider's own page, which names the application and where it returns.
pub fn web_start(
    svc: &Service,
    gateway: &str,
    req: WebSsoStartRequest,
    now: u64,
) -> Result<Response, RpcError> {
    edgeport_proto::web::check_key(&req.browser_key).map_err(|e| invalid(e.to_string()))?;
    let redirect = web_redirect(&req.redirect_uri, &req.connector)?;
    let store = svc.store();
    let spec = store::get::<SsoConnectorSpec>(store, Table::SsoConnectors, &req.connector)?
        .ok_or_else(|| not_configured(store, &req.connector))?;
    web_origin_allowed(&spec, redirect.url())?;
    // Not a secret: a web login is finished only by the browser key's signature, and
    // `pending_take` refuses it.
    let proof_hash = edgeport_proto::keys::sha256_hex(&req.browser_key);
    begin(
        svc,
        gateway,
        &req.connector,
        redirect,
        &req.client_addr,
        proof_hash,
        Some(req.browser_key),
        now,
    )
}

/// `WebSsoFinish`: as [`finish`], for the browser that started it; answers a new web
/// session bound to that browser's key.
pub fn web_finish(
    svc: &Service,
    caller: &crate::service::Caller,
    gateway: &str,
    req: WebSsoFinishRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let client_addr = req.client_addr.clone();
    audited(
        svc,
        caller,
        gateway,
        &client_addr,
        "web console single sign-on",
        |verified| {
            let pending =
                pending_take_web(svc.store(), &req.state, &req.signed, &req.signature, now)?;
            let browser_key = pending.browser_key.clone().unwrap_or_default();
            let who = verified.insert(redeem(svc, &pending, req.code, &req.client_addr)?);
            let user = crate::handlers::sso::sso_user(svc, gateway, who, now)?;
            tracing::info!(user = %user.name, connector = %who.connector, subject = %who.subject,
            client = %req.client_addr, gateway, "web console single sign-on login");
            crate::handlers::web::new_session(
                svc,
                gateway,
                &user,
                browser_key,
                &req.client_addr,
                now,
            )
        },
    )
}

/// Runs the rest of a login's finish, then records it (or its refusal) in the audit log
/// and, for a refusal, logs why: the reason in the authority's log, whoever asked (a
/// gateway with a forged code included).
fn audited(
    svc: &Service,
    caller: &crate::service::Caller,
    gateway: &str,
    client_addr: &str,
    what: &str,
    rest: impl FnOnce(&mut Option<Verified>) -> Result<Response, RpcError>,
) -> Result<Response, RpcError> {
    let mut verified: Option<Verified> = None;
    let result = rest(&mut verified);
    crate::audit::sso_login(svc, caller, client_addr, verified.as_ref(), &result);
    if let Err(e) = &result {
        tracing::info!(gateway, client = %client_addr, "{what} refused: {}", e.message);
    }
    result
}

/// Redeems the provider's code for a pending login with its connector: who logged in.
fn redeem(
    svc: &Service,
    pending: &PendingLogin,
    code: String,
    client_addr: &str,
) -> Result<Verified, RpcError> {
    let connector = svc
        .sso
        .get(svc.store(), &pending.connector)?
        .ok_or_else(|| {
            denied(format!(
                "the single sign-on connector {} was removed during this login",
                pending.connector
            ))
        })?;
    match &*connector {
        Connector::Oidc(o) => block_on(o.finish(code, pending, client_addr)),
        Connector::GitHub(g) => block_on(g.finish(code, pending, client_addr)),
    }
}

/// Whether a web console login with `spec` may return to `redirect`'s origin.
pub(crate) fn web_origin_allowed(
    spec: &SsoConnectorSpec,
    redirect: &openidconnect::url::Url,
) -> Result<(), RpcError> {
    let name = &spec.name;
    if spec.web_origins.is_empty() {
        return Err(denied(format!(
            "the {name} single sign-on connector is not enabled for the web console; an administrator enables it with tctl sso connectors add {name} ... --web-origin https://GATEWAY:PORT"
        )));
    }
    let origin = redirect.origin().ascii_serialization();
    if !spec.web_origins.contains(&origin) {
        return Err(denied(format!(
            "the web console at {origin} is not among the {name} connector's web origins ({}); an administrator adds it with --web-origin {origin}",
            spec.web_origins.join(", ")
        )));
    }
    Ok(())
}

/// `WebSsoConnectors`: the names and kinds of the connectors enabled for the web console
/// (`--web-origin`), for the login page's buttons.
pub fn web_connectors(store: &dyn Store) -> Result<Response, RpcError> {
    let mut list = match connector_list(store)? {
        Response::SsoConnectors(l) => l,
        _ => Vec::new(),
    };
    list.retain(|c| !c.web_origins.is_empty());
    for c in &mut list {
        c.client_id.clear();
        c.custom_ca = false;
        c.web_origins.clear();
    }
    Ok(Response::SsoConnectors(list))
}

/// `SsoFinish`: redeems the code of a login started here (or at an authority sharing the
/// store), establishes who it is from the provider's answer, and signs tsh's key.
pub fn finish(
    svc: &Service,
    caller: &crate::service::Caller,
    gateway: &str,
    req: SsoFinishRequest,
    now: u64,
) -> Result<Response, RpcError> {
    let client_addr = req.client_addr.clone();
    audited(
        svc,
        caller,
        gateway,
        &client_addr,
        "single sign-on",
        |verified| {
            parse_ed25519_public(&req.ssh_public_key)
                .map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
            let pending = pending_take(svc.store(), &req.state, &req.proof, now)?;
            let who = verified.insert(redeem(svc, &pending, req.code, &req.client_addr)?);
            crate::handlers::sso::login(
                svc,
                gateway,
                who,
                &req.ssh_public_key,
                req.ttl_secs,
                &req.client_addr,
                now,
            )
        },
    )
}

/// tsh's listener: `http://127.0.0.1:PORT/...`, `http://[::1]:PORT/...` or `localhost`.
/// Anything else would let a link started by someone else deliver the code elsewhere.
pub(crate) fn loopback_redirect(uri: &str) -> Result<RedirectUrl, RpcError> {
    let bad = || {
        invalid(format!(
            "redirect {uri:?}: single sign-on returns only to tsh on this machine (http://127.0.0.1:PORT/...)"
        ))
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

/// The gateway's callback page for a web console login: `https://HOST[:PORT]` then exactly
/// `/web/sso/CONNECTOR/callback`, no credentials, query or fragment. The provider must list
/// it among the client's redirect URIs, which is what keeps a gateway from sending the code
/// elsewhere; a code that went elsewhere is still useless without the browser's key.
pub(crate) fn web_redirect(uri: &str, connector: &str) -> Result<RedirectUrl, RpcError> {
    let bad = || {
        invalid(format!(
            "redirect {uri:?}: a web console login returns only to https://GATEWAY/web/sso/{connector}/callback"
        ))
    };
    let r = RedirectUrl::new(uri.to_string()).map_err(|_| bad())?;
    let u = r.url();
    let ok = u.scheme() == "https"
        && u.host_str().is_some_and(|h| !h.is_empty())
        && u.username().is_empty()
        && u.password().is_none()
        && u.query().is_none()
        && u.fragment().is_none()
        && u.path() == format!("/web/sso/{connector}/callback");
    if ok {
        Ok(r)
    } else {
        Err(bad())
    }
}

/// An error with its causes, for logs.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s = format!("{s}: {x}");
        c = x.source();
    }
    s
}

/// The provider could not be reached or answered nonsense: the details go to the log.
pub(crate) fn unavailable(msg: impl Into<String>) -> RpcError {
    RpcError::new(edgeport_proto::rpc::ErrorKind::Internal, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, crate::store::SledStore) {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(&d.path().join("s")).unwrap();
        (d, s)
    }

    fn login(client: &str, expires: u64) -> PendingLogin {
        PendingLogin {
            connector: "oidc".into(),
            expires,
            client: client.into(),
            proof_hash: edgeport_proto::keys::sha256_hex(b"secret"),
            redirect: "http://127.0.0.1:1/cb".into(),
            pkce_verifier: Some("v".into()),
            nonce: Some("n".into()),
            browser_key: None,
            started: expires.saturating_sub(PENDING_TTL_SECS),
        }
    }

    #[test]
    fn one_client_cannot_crowd_out_the_others() {
        let (_d, s) = store();
        for i in 0..MAX_PENDING_PER_CLIENT {
            pending_insert(&s, &format!("a{i}"), &login("192.0.2.1", 700), 100).unwrap();
        }
        let e = pending_insert(&s, "a-more", &login("192.0.2.1", 700), 100).unwrap_err();
        assert!(e.message.contains("too many"), "{}", e.message);
        pending_insert(&s, "b0", &login("192.0.2.2", 700), 100).unwrap();
        assert!(pending_take(&s, "a0", "secret", 100).is_ok());
        assert!(
            pending_take(&s, "a0", "secret", 100).is_err(),
            "a state works once"
        );
        pending_insert(&s, "a-again", &login("192.0.2.1", 700), 100).unwrap();
        // Once they expire, the client has room again (and the expired ones are gone).
        pending_insert(&s, "a-later", &login("192.0.2.1", 2000), 700).unwrap();
        let left = s.scan_prefix(Table::SsoPending, "").unwrap();
        assert_eq!(left.len(), 1, "expired logins are removed");
    }

    #[test]
    fn clients_are_counted_by_address_and_v6_prefix() {
        let key = |a: &str| client_key(client_ip(a).unwrap()).to_string();
        assert_eq!(key("192.0.2.1:4000"), key("192.0.2.1:5000"));
        assert_eq!(key("[2001:db8::1]:1"), key("[2001:db8::ffff]:2"));
        assert_ne!(key("[2001:db8::1]:1"), key("[2001:db8:0:1::1]:1"));
        assert_eq!(key("[::ffff:192.0.2.1]:1"), key("192.0.2.1:1"));
        assert!(client_ip("not an address").is_err());
    }

    #[test]
    fn only_the_starter_finishes_once_and_in_time() {
        let (_d, s) = store();
        pending_insert(&s, "s", &login("192.0.2.1", 700), 100).unwrap();
        let e = pending_take(&s, "s", "not the secret", 100).unwrap_err();
        assert!(e.message.contains("another client"), "{}", e.message);
        assert!(
            pending_take(&s, "s", "secret", 100).is_err(),
            "a refused attempt still spends the state"
        );
        pending_insert(&s, "t", &login("192.0.2.1", 700), 100).unwrap();
        assert_eq!(
            pending_take(&s, "t", "secret", 699).unwrap(),
            login("192.0.2.1", 700)
        );
        pending_insert(&s, "u", &login("192.0.2.1", 700), 100).unwrap();
        let e = pending_take(&s, "u", "secret", 700).unwrap_err();
        assert!(e.message.contains("unknown or expired"), "{}", e.message);
        let e = pending_take(&s, "never-issued", "secret", 100).unwrap_err();
        assert!(e.message.contains("unknown or expired"), "{}", e.message);
        let mut bad = login("192.0.2.1", 700);
        bad.proof_hash = "short".into();
        assert!(pending_insert(&s, "v", &bad, 100).is_err());
    }

    fn oidc_spec(secret: &str) -> SsoConnectorSpec {
        SsoConnectorSpec {
            name: "oidc".into(),
            client_id: "edgeport".into(),
            client_secret: secret.into(),
            ca_pem: None,
            kind: SsoConnectorKind::Oidc {
                issuer: "https://idp.example".into(),
                username_claim: "email".into(),
                groups_claim: "groups".into(),
                scopes: vec!["openid".into(), "email".into()],
            },
            web_origins: Vec::new(),
        }
    }

    #[test]
    fn connectors_are_stored_and_listed_without_their_secret() {
        let (_d, s) = store();
        connector_add(&s, oidc_spec("s3cr3t-value\n")).unwrap();
        connector_add(
            &s,
            SsoConnectorSpec {
                name: "github".into(),
                client_id: "gh-id".into(),
                client_secret: "gh-s3cr3t".into(),
                ca_pem: None,
                kind: SsoConnectorKind::GitHub {
                    url: "https://github.example/".into(),
                    api_url: "https://github.example/api/v3".into(),
                },
                web_origins: vec!["https://gw.example:3443/".into()],
            },
        )
        .unwrap();
        let Response::SsoConnectors(list) = connector_list(&s).unwrap() else {
            panic!("not a connector list")
        };
        assert_eq!(list.len(), 2);
        let shown = format!("{list:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("gh-s3cr3t"),
            "{shown}"
        );
        let oidc = list.iter().find(|c| c.name == "oidc").unwrap();
        assert_eq!(oidc.client_id, "edgeport");
        assert!(
            matches!(&oidc.kind, SsoConnectorKind::Oidc { scopes, .. } if scopes == &["email"]),
            "{oidc:?}"
        );
        let gh = list.iter().find(|c| c.name == "github").unwrap();
        assert!(
            matches!(&gh.kind, SsoConnectorKind::GitHub { url, .. } if url == "https://github.example"),
            "{gh:?}"
        );
        // The secret is stored (trimmed) for the authority's own use, and Debug hides it.
        let stored: SsoConnectorSpec = store::get(&s, Table::SsoConnectors, "oidc")
            .unwrap()
            .unwrap();
        assert_eq!(stored.client_secret, "s3cr3t-value");
        assert!(!format!("{stored:?}").contains("s3cr3t"));

        // Refusals: wrong name, an empty secret, a bad claim, a CA file without certificates.
        let mut bad = oidc_spec("x");
        bad.name = "github".into();
        assert!(connector_add(&s, bad).is_err());
        assert!(connector_add(&s, oidc_spec("  \n")).is_err());
        let mut bad = oidc_spec("x");
        bad.kind = SsoConnectorKind::Oidc {
            issuer: "https://idp.example".into(),
            username_claim: "name".into(),
            groups_claim: "groups".into(),
            scopes: vec![],
        };
        let e = connector_add(&s, bad).unwrap_err();
        assert!(e.message.contains("username"), "{}", e.message);
        let mut bad = oidc_spec("x");
        bad.ca_pem = Some("not a certificate".into());
        assert!(connector_add(&s, bad).is_err());

        // The cache rebuilds a connector whose record changed.
        let cache = Connectors::default();
        let a = cache.get(&s, "oidc").unwrap().unwrap();
        let b = cache.get(&s, "oidc").unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        connector_add(&s, oidc_spec("another")).unwrap();
        let c = cache.get(&s, "oidc").unwrap().unwrap();
        assert!(!Arc::ptr_eq(&a, &c));

        connector_remove(&s, "oidc").unwrap();
        assert!(connector_remove(&s, "oidc").is_err());
        assert!(cache.get(&s, "oidc").unwrap().is_none());
        let e = not_configured(&s, "oidc");
        assert!(e.message.contains("it has: github"), "{}", e.message);
    }

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

    /// Web sign-on is per connector and per console origin: off without `--web-origin`,
    /// and a redirect elsewhere is refused; only enabled connectors are offered.
    #[test]
    fn web_sign_on_needs_the_consoles_origin_with_the_connector() {
        for (given, canonical) in [
            ("https://gw.example", "https://gw.example"),
            ("https://GW.example:3443/", "https://gw.example:3443"),
            ("https://gw.example:443", "https://gw.example"),
            ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
        ] {
            assert_eq!(web_origin(given).unwrap(), canonical, "{given}");
        }
        for bad in [
            "http://gw.example",
            "https://gw.example/web",
            "https://gw.example/?x",
            "https://u@gw.example",
            "gw.example",
            "https://",
        ] {
            assert!(web_origin(bad).is_err(), "{bad}");
        }
        let (_d, s) = store();
        connector_add(&s, oidc_spec("x")).unwrap();
        let url = |u: &str| web_redirect(u, "oidc").unwrap().url().clone();
        let spec: SsoConnectorSpec = store::get(&s, Table::SsoConnectors, "oidc")
            .unwrap()
            .unwrap();
        let e = web_origin_allowed(&spec, &url("https://gw.example/web/sso/oidc/callback"))
            .unwrap_err();
        assert!(
            e.message.contains("not enabled for the web console"),
            "{}",
            e.message
        );
        let Response::SsoConnectors(offered) = web_connectors(&s).unwrap() else {
            panic!("not a connector list")
        };
        assert!(offered.is_empty(), "{offered:?}");

        let mut on = oidc_spec("x");
        on.web_origins = vec![
            "https://gw.example:3443".into(),
            "https://gw.example:3443/".into(),
        ];
        connector_add(&s, on).unwrap();
        let spec: SsoConnectorSpec = store::get(&s, Table::SsoConnectors, "oidc")
            .unwrap()
            .unwrap();
        assert_eq!(spec.web_origins, ["https://gw.example:3443"]);
        assert!(
            web_origin_allowed(&spec, &url("https://gw.example:3443/web/sso/oidc/callback"))
                .is_ok()
        );
        for elsewhere in [
            "https://gw.example/web/sso/oidc/callback",
            "https://rogue.example:3443/web/sso/oidc/callback",
            "https://gw.example:3444/web/sso/oidc/callback",
        ] {
            let e = web_origin_allowed(&spec, &url(elsewhere)).unwrap_err();
            assert!(
                e.message.contains("not among"),
                "{elsewhere}: {}",
                e.message
            );
        }
        let Response::SsoConnectors(offered) = web_connectors(&s).unwrap() else {
            panic!("not a connector list")
        };
        assert_eq!(offered.len(), 1);
        assert!(offered[0].web_origins.is_empty() && offered[0].client_id.is_empty());
        let mut bad = oidc_spec("x");
        bad.web_origins = vec!["http://gw.example".into()];
        assert!(connector_add(&s, bad)
            .unwrap_err()
            .message
            .contains("https only"));
    }

    /// Web console logins have a cap of their own inside the cluster's.
    #[test]
    fn web_logins_cannot_take_the_room_of_tsh_logins() {
        let (_d, s) = store();
        let mut web = login("192.0.2.1", 700);
        web.browser_key = Some(vec![1]);
        let bytes = serde_json::to_vec(&web).unwrap();
        for i in 0..MAX_PENDING_WEB {
            // Straight into the store: the per-client bound is not what is tested here.
            s.compare_and_swap(
                Table::SsoPending,
                &format!("w{i}"),
                None,
                Some(bytes.clone()),
            )
            .unwrap();
        }
        let mut one_more = login("192.0.2.99", 700);
        one_more.browser_key = Some(vec![1]);
        let e = pending_insert(&s, "w-more", &one_more, 100).unwrap_err();
        assert!(e.message.contains("web console"), "{}", e.message);
        pending_insert(&s, "tsh", &login("192.0.2.99", 700), 100).unwrap();
    }

    #[test]
    fn web_logins_return_only_to_a_gateway_callback() {
        assert!(web_redirect("https://gw.example:3080/web/sso/oidc/callback", "oidc").is_ok());
        assert!(web_redirect("https://127.0.0.1:8443/web/sso/github/callback", "github").is_ok());
        for bad in [
            "http://gw.example/web/sso/oidc/callback",
            "https://gw.example/web/sso/github/callback",
            "https://gw.example/web/sso/oidc/callback?x=1",
            "https://gw.example/web/sso/oidc/callback#f",
            "https://user@gw.example/web/sso/oidc/callback",
            "https://gw.example/elsewhere",
            "javascript:alert(1)",
        ] {
            assert!(web_redirect(bad, "oidc").is_err(), "{bad}");
        }
    }

    /// A web login is finished only by its browser's key, signed over its own state, once;
    /// tsh's and the web's logins cannot be finished the other way.
    #[test]
    fn only_the_starting_browser_finishes_a_web_login() {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let new_key = || {
            let pk = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng).unwrap()
        };
        let (browser, thief) = (new_key(), new_key());
        let sign = |k: &EcdsaKeyPair, at: u64, path: &str| {
            let text = edgeport_proto::web::signed_text(at, "POST", path);
            let sig = k.sign(&rng, text.as_bytes()).unwrap().as_ref().to_vec();
            (text, sig)
        };
        let (_d, s) = store();
        let mut web = login("192.0.2.1", 700);
        web.browser_key = Some(browser.public_key().as_ref().to_vec());
        pending_insert(&s, "st-1", &web, 100).unwrap();
        // tsh's finish cannot take a web login (and burns it, as any failed finish does).
        let e = pending_take(&s, "st-1", "secret", 100).unwrap_err();
        assert!(e.message.contains("web console"), "{}", e.message);
        pending_insert(&s, "st-2", &web, 100).unwrap();
        // Another browser (a stolen callback URL): refused, and the login is gone.
        let (t, sig) = sign(&thief, 100, "/web/sso/finish/st-2");
        let e = pending_take_web(&s, "st-2", &t, &sig, 100).unwrap_err();
        assert!(e.message.contains("another browser"), "{}", e.message);
        let (t, sig) = sign(&browser, 100, "/web/sso/finish/st-2");
        assert!(pending_take_web(&s, "st-2", &t, &sig, 100).is_err());
        // A signature over another state, or of another method, does not do.
        pending_insert(&s, "st-3", &web, 100).unwrap();
        let (t, sig) = sign(&browser, 100, "/web/sso/finish/st-other");
        let e = pending_take_web(&s, "st-3", &t, &sig, 100).unwrap_err();
        assert!(e.message.contains("not for finishing"), "{}", e.message);
        // The right one works once.
        pending_insert(&s, "st-4", &web, 100).unwrap();
        let (t, sig) = sign(&browser, 100, "/web/sso/finish/st-4");
        let p = pending_take_web(&s, "st-4", &t, &sig, 100).unwrap();
        assert_eq!(p.browser_key, web.browser_key);
        assert!(pending_take_web(&s, "st-4", &t, &sig, 100).is_err());
        // A tsh login cannot be finished as a web one.
        pending_insert(&s, "st-5", &login("192.0.2.1", 700), 100).unwrap();
        let (t, sig) = sign(&browser, 100, "/web/sso/finish/st-5");
        let e = pending_take_web(&s, "st-5", &t, &sig, 100).unwrap_err();
        assert!(e.message.contains("tsh"), "{}", e.message);
    }
}
