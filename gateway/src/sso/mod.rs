//! Single sign-on for tsh: OpenID Connect providers ([`oidc`]) and GitHub ([`github`]).
//!
//! tsh asks the gateway where to send the browser (`SsoStart`, naming the connector and
//! tsh's loopback address as the redirect); the gateway answers with the provider's
//! authorization URL, carrying a fresh `state` (and for OpenID Connect a `nonce` and a PKCE
//! challenge whose verifier it keeps). The provider sends the browser back to tsh's loopback
//! listener with a code; tsh hands code and state to the gateway (`SsoFinish`) over its
//! verified TLS connection, together with the public key it made. The gateway redeems the
//! code (with the client secret, which only it holds: the code alone is worth nothing),
//! establishes who the user is and their groups, and asks the authority to sign tsh's key;
//! the authority decides what those groups grant.

pub mod github;
pub mod http;
pub mod oidc;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgeport_proto::rpc::{ErrorKind, RpcError, SsoLoginRequest};
use edgeport_proto::tunnel::SsoFinish;
use openidconnect::RedirectUrl;

pub use self::github::{GitHub, GitHubConfig};
pub use self::oidc::{Oidc, OidcConfig};

/// A login must come back within this time of its start.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Logins in progress at once per connector (the oldest is dropped first).
const MAX_PENDING: usize = 10_000;
/// Logins in progress at once from one client address: starting logins needs no
/// credentials, so one address must not be able to push everyone else's out.
const MAX_PENDING_PER_CLIENT: usize = 16;

/// The configured connectors.
#[derive(Default)]
pub struct Sso {
    pub oidc: Option<Oidc>,
    pub github: Option<GitHub>,
}

impl Sso {
    pub fn is_empty(&self) -> bool {
        self.oidc.is_none() && self.github.is_none()
    }

    /// The provider's login URL for `connector` (`oidc` or `github`).
    pub async fn start(
        &self,
        connector: &str,
        redirect_uri: &str,
        starter: Starter,
    ) -> Result<String, RpcError> {
        match connector {
            "oidc" => match &self.oidc {
                Some(o) => o.start(redirect_uri, starter).await,
                None => Err(not_configured(connector, self)),
            },
            "github" => match &self.github {
                Some(g) => g.start(redirect_uri, starter),
                None => Err(not_configured(connector, self)),
            },
            other => Err(RpcError::new(
                ErrorKind::Invalid,
                format!("unknown single sign-on connector {other:?} (oidc or github)"),
            )),
        }
    }

    /// Finishes the login that issued `req.state`, whichever connector that was.
    pub async fn finish(
        &self,
        req: SsoFinish,
        client_addr: &str,
    ) -> Result<SsoLoginRequest, RpcError> {
        if let Some(o) = self.oidc.as_ref().filter(|o| o.owns(&req.state)) {
            return o.finish(req, client_addr).await;
        }
        if let Some(g) = self.github.as_ref().filter(|g| g.owns(&req.state)) {
            return g.finish(req, client_addr).await;
        }
        Err(denied(
            "this single sign-on attempt is unknown or expired (state); run tsh login again",
        ))
    }
}

fn not_configured(connector: &str, sso: &Sso) -> RpcError {
    let have: Vec<&str> = [
        ("oidc", sso.oidc.is_some()),
        ("github", sso.github.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    RpcError::new(
        ErrorKind::Invalid,
        if have.is_empty() {
            "this gateway has no single sign-on connector; log in with a password".to_string()
        } else {
            format!(
                "this gateway has no {connector} connector (it has: {}); use tsh login --auth {}",
                have.join(", "),
                have[0]
            )
        },
    )
}

/// Who starts a login: the client's address (for the per-client bound) and the hash of the
/// secret it must show to finish.
pub struct Starter {
    pub addr: IpAddr,
    pub proof_hash: String,
}

/// Counted together: one IPv4 address, or one IPv6 /64 (what one subscriber usually has).
fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

struct PendingLogin<T> {
    started: Instant,
    client: IpAddr,
    proof_hash: String,
    value: T,
}

/// Logins in progress, by `state`: single use, expiring, bounded (in all and per client),
/// finished only by whoever shows the starter's secret.
pub(crate) struct PendingLogins<T> {
    map: Mutex<HashMap<String, PendingLogin<T>>>,
}

impl<T> Default for PendingLogins<T> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> PendingLogins<T> {
    pub(crate) fn insert(&self, state: String, starter: Starter, value: T) -> Result<(), RpcError> {
        if starter.proof_hash.len() != 64
            || !starter.proof_hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(RpcError::new(
                ErrorKind::Invalid,
                "single sign-on needs the hash of tsh's secret (proof_hash: 64 hex digits)",
            ));
        }
        let client = client_key(starter.addr);
        let mut m = self.map.lock().map_err(|_| unavailable("internal error"))?;
        m.retain(|_, p| p.started.elapsed() < PENDING_TTL);
        if m.values().filter(|p| p.client == client).count() >= MAX_PENDING_PER_CLIENT {
            return Err(RpcError::new(
                ErrorKind::Denied,
                format!("too many single sign-on logins in progress from {}; finish one or wait a few minutes", starter.addr),
            ));
        }
        // Full: refuse the newcomer rather than drop someone's login in progress.
        if m.len() >= MAX_PENDING {
            return Err(unavailable(
                "too many single sign-on logins in progress; try again in a few minutes",
            ));
        }
        m.insert(
            state,
            PendingLogin {
                started: Instant::now(),
                client,
                proof_hash: starter.proof_hash.to_ascii_lowercase(),
                value,
            },
        );
        Ok(())
    }

    pub(crate) fn contains(&self, state: &str) -> bool {
        self.map.lock().is_ok_and(|m| m.contains_key(state))
    }

    /// The login started with `state`, once, if it has not expired and `proof` is the
    /// starter's secret.
    pub(crate) fn take(&self, state: &str, proof: &str) -> Result<T, RpcError> {
        let unknown = || {
            denied("this single sign-on attempt is unknown or expired (state); run tsh login again")
        };
        let p = self
            .map
            .lock()
            .map_err(|_| unavailable("internal error"))?
            .remove(state)
            .filter(|p| p.started.elapsed() < PENDING_TTL)
            .ok_or_else(unknown)?;
        let shown = edgeport_proto::keys::sha256_hex(proof.as_bytes());
        if !edgeport_proto::util::ct_eq(shown.as_bytes(), p.proof_hash.as_bytes()) {
            return Err(denied(
                "this single sign-on login was started by another client; run tsh login again",
            ));
        }
        Ok(p.value)
    }
}

pub(crate) fn denied(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Denied, msg)
}

pub(crate) fn unavailable(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Internal, msg)
}

/// A client secret from its file (trimmed; an empty file is an error).
pub(crate) fn read_secret(path: &Path) -> Result<String, String> {
    let secret = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .trim()
        .to_string();
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret)
}

/// tsh's listener: `http://127.0.0.1:PORT/...`, `http://[::1]:PORT/...` or `localhost`.
/// Anything else would let a link started by someone else deliver the code elsewhere.
pub(crate) fn loopback_redirect(uri: &str) -> Result<RedirectUrl, RpcError> {
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

/// Trusts `ca_file` (PEM), else the system's roots.
pub(crate) fn roots_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    edgeport_proto::tls::external_client_config(ca_file, || {
        rustls_native_certs::load_native_certs().certs
    })
    .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn starter(addr: &str) -> Starter {
        Starter {
            addr: addr.parse().unwrap(),
            proof_hash: edgeport_proto::keys::sha256_hex(b"secret"),
        }
    }

    #[test]
    fn one_client_cannot_crowd_out_the_others() {
        let p = PendingLogins::<()>::default();
        for i in 0..MAX_PENDING_PER_CLIENT {
            p.insert(format!("a{i}"), starter("192.0.2.1"), ()).unwrap();
        }
        let e = p
            .insert("a-more".into(), starter("192.0.2.1"), ())
            .unwrap_err();
        assert!(e.message.contains("too many"), "{}", e.message);
        p.insert("b0".into(), starter("192.0.2.2"), ()).unwrap();
        assert!(p.take("a0", "secret").is_ok());
        assert!(p.take("a0", "secret").is_err(), "a state works once");
        p.insert("a-again".into(), starter("192.0.2.1"), ())
            .unwrap();
        // One IPv6 /64 counts as one client.
        for i in 0..MAX_PENDING_PER_CLIENT {
            let addr = format!("2001:db8::{:x}", i + 1);
            p.insert(format!("v6-{i}"), starter(&addr), ()).unwrap();
        }
        assert!(p
            .insert("v6-more".into(), starter("2001:db8::ffff"), ())
            .is_err());
        assert!(p
            .insert("v6-other".into(), starter("2001:db8:0:1::1"), ())
            .is_ok());
    }

    #[test]
    fn only_the_starter_finishes() {
        let p = PendingLogins::<u8>::default();
        p.insert("s".into(), starter("192.0.2.1"), 7).unwrap();
        let e = p.take("s", "not the secret").unwrap_err();
        assert!(e.message.contains("another client"), "{}", e.message);
        assert!(
            p.take("s", "secret").is_err(),
            "a refused attempt still spends the state"
        );
        p.insert("t".into(), starter("192.0.2.1"), 8).unwrap();
        assert_eq!(p.take("t", "secret").unwrap(), 8);
        let bad = Starter {
            addr: "192.0.2.1".parse().unwrap(),
            proof_hash: "short".into(),
        };
        assert!(p.insert("u".into(), bad, 9).is_err());
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
}
