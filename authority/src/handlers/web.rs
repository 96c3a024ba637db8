//! Web console sessions (issue 25). The gateway relays a browser's login; the authority
//! checks password and one-time code itself (the same checks and throttling as a tsh login),
//! makes a random session token, and stores it (by its SHA-256 only) with the user, the
//! browser's public key and a CSRF token. Every later request of the session is proven by
//! the token plus a fresh signature of the browser key ([`edgeport_proto::web`]), checked
//! here together with the expiry, the user's locks and the user's record, so a gateway can
//! neither make up a session nor keep one alive past logout, a lock or the user's removal.

use edgeport_proto::keys::{random_secret, sha256_hex};
use edgeport_proto::rpc::{
    LoginRequest, Response, RpcError, WebLoginRequest, WebProof, WebSessionInfo,
};
use serde::{Deserialize, Serialize};

use crate::errors::{denied, internal, invalid};
use crate::handlers::user_certs::{check_credentials, check_not_locked};
use crate::service::Service;
use crate::store::{self, Table};
use crate::{devices, roles, users};

/// Longest web session (also capped by the user's roles' `max_session_ttl`).
pub const WEB_SESSION_TTL_SECS: u64 = 8 * 3600;

/// One web session, stored by the SHA-256 of its token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WebSessionRecord {
    pub user: String,
    /// The user record's id at login: a later user of the same name does not inherit it.
    pub user_id: String,
    pub created: u64,
    pub expires: u64,
    pub browser_key: Vec<u8>,
    pub csrf: String,
    pub client_addr: String,
}

fn session_denied(why: &str) -> RpcError {
    denied(format!("web session refused: {why}; log in again"))
}

fn info(
    r: &WebSessionRecord,
    token: Option<String>,
    svc: &Service,
) -> Result<WebSessionInfo, RpcError> {
    let subject = users::subject(svc.store(), &r.user)?
        .ok_or_else(|| session_denied("the user no longer exists"))?;
    Ok(WebSessionInfo {
        token,
        csrf: r.csrf.clone(),
        user: r.user.clone(),
        logins: subject.logins,
        roles: subject.roles,
        expires: r.expires,
        browser_key: r.browser_key.clone(),
    })
}

/// WebLogin: credentials as for tsh, then a new session bound to the browser key.
pub fn login(
    svc: &Service,
    gateway: &str,
    req: WebLoginRequest,
    now: u64,
) -> Result<Response, RpcError> {
    edgeport_proto::web::check_key(&req.browser_key).map_err(|e| invalid(e.to_string()))?;
    let as_login = LoginRequest {
        user: req.user.clone(),
        secret: req.password.clone(),
        new_password: None,
        ssh_public_key: String::new(),
        ttl_secs: 0,
        client_addr: req.client_addr.clone(),
        otp: req.otp.clone().filter(|c| !c.trim().is_empty()),
        totp_enroll: None,
    };
    let user = check_credentials(svc, gateway, &as_login, now)?;
    new_session(svc, gateway, &user, req.browser_key, &req.client_addr, now)
}

/// A new session of `user` (whose credentials, or single sign-on, the caller checked) bound
/// to `browser_key`; its token is in the answer only.
pub(crate) fn new_session(
    svc: &Service,
    gateway: &str,
    user: &users::UserRecord,
    browser_key: Vec<u8>,
    client_addr: &str,
    now: u64,
) -> Result<Response, RpcError> {
    edgeport_proto::web::check_key(&browser_key).map_err(|e| invalid(e.to_string()))?;
    let grants = roles::grants(svc.store(), &user.roles)?;
    let ttl = WEB_SESSION_TTL_SECS
        .min(grants.max_session_ttl)
        .min(svc.limits.max_session_ttl)
        .max(60);
    let token = random_secret().map_err(|e| internal("a session token", e))?;
    let csrf = random_secret().map_err(|e| internal("a CSRF token", e))?;
    let record = WebSessionRecord {
        user: user.name.clone(),
        user_id: users::Subject::from(user).id,
        created: now,
        expires: now + ttl,
        browser_key,
        csrf,
        client_addr: client_addr.to_string(),
    };
    store::put(
        svc.store(),
        Table::WebSessions,
        &sha256_hex(token.as_bytes()),
        &record,
    )?;
    tracing::info!(user = %record.user, client = %client_addr, gateway, expires = record.expires, "web console login");
    Ok(Response::WebSession(info(&record, Some(token), svc)?))
}

/// The session a proof names, if the proof holds now: known token, not expired, signature
/// by its browser key over a fresh request, user still the same record and not locked.
fn proven(
    svc: &Service,
    proof: &WebProof,
    now: u64,
) -> Result<(String, WebSessionRecord), RpcError> {
    let key = sha256_hex(proof.token.as_bytes());
    let record: WebSessionRecord = store::get(svc.store(), Table::WebSessions, &key)?
        .ok_or_else(|| session_denied("unknown or ended session"))?;
    if record.expires <= now {
        let _ = svc.store().delete(Table::WebSessions, &key);
        return Err(session_denied("the session expired"));
    }
    edgeport_proto::web::verify(&record.browser_key, &proof.signed, &proof.signature, now)
        .map_err(|e| session_denied(&e.to_string()))?;
    check_not_locked(svc, &record.user, now)?;
    let subject = users::subject(svc.store(), &record.user)?
        .ok_or_else(|| session_denied("the user no longer exists"))?;
    if subject.id != record.user_id || subject.created > record.created {
        return Err(session_denied("the user was removed and made again"));
    }
    Ok((key, record))
}

/// WebSessionAlive: the session under `key` (its token's SHA-256) is still one a proof
/// could use: known, not expired, its user the same record and not locked. No signature: the
/// gateway asks for terminals the browser opened earlier, and learns only yes or why not.
/// Refused with `session ended: WHY`, which the gateway shows in the terminal as it is.
pub fn alive(svc: &Service, key: &str, now: u64) -> Result<Response, RpcError> {
    let ended = |why: &str| denied(format!("session ended: {why}"));
    let record: WebSessionRecord =
        store::get(svc.store(), Table::WebSessions, key)?.ok_or_else(|| ended("logged out"))?;
    if record.expires <= now {
        return Err(ended("the web session expired"));
    }
    check_not_locked(svc, &record.user, now)?;
    let subject = users::subject(svc.store(), &record.user)?
        .ok_or_else(|| ended("the user no longer exists"))?;
    if subject.id != record.user_id || subject.created > record.created {
        return Err(ended("the user was removed and made again"));
    }
    Ok(Response::Ok)
}

pub fn check(svc: &Service, proof: &WebProof, now: u64) -> Result<Response, RpcError> {
    let (_, record) = proven(svc, proof, now)?;
    Ok(Response::WebSession(info(&record, None, svc)?))
}

pub fn logout(svc: &Service, proof: &WebProof, now: u64) -> Result<Response, RpcError> {
    let (key, record) = proven(svc, proof, now)?;
    svc.store().delete(Table::WebSessions, &key)?;
    tracing::info!(user = %record.user, "web console logout");
    Ok(Response::Ok)
}

/// The devices the session's user may reach, a page at a time.
pub fn device_page(
    svc: &Service,
    proof: &WebProof,
    after: &str,
    now: u64,
) -> Result<Response, RpcError> {
    let (_, record) = proven(svc, proof, now)?;
    let subject = users::subject(svc.store(), &record.user)?
        .ok_or_else(|| session_denied("the user no longer exists"))?;
    let grants = roles::grants(svc.store(), &subject.roles)?;
    let (devices, more) =
        devices::page_where(svc.store(), after, now, |d| grants.allows_device(&d.labels))?;
    Ok(Response::DevicePage { devices, more })
}

/// Whose recordings and events a web session may see: its own user's, as for tsh.
pub fn viewer(svc: &Service, proof: &WebProof, now: u64) -> Result<crate::audit::Viewer, RpcError> {
    let (_, record) = proven(svc, proof, now)?;
    let subject = users::subject(svc.store(), &record.user)?
        .ok_or_else(|| session_denied("the user no longer exists"))?;
    Ok(crate::audit::Viewer {
        name: subject.name,
        id: subject.id,
        since_ms: subject.created.saturating_mul(1000),
    })
}

/// What a browser signs to open a terminal: `GET` of this prefix, then
/// `DEVICE/LOGIN/NONCE` with a nonce from [`terminal_nonce`].
pub const TERMINAL_PATH: &str = "/api/terminal/";
/// How long a terminal nonce may wait to be used.
pub const NONCE_TTL_SECS: u64 = 60;
/// Nonces of one session waiting to be used at once.
pub const MAX_NONCES_PER_SESSION: usize = 16;
/// Where nonces live in [`Table::WebSessions`] (session keys are bare hex, never this).
const NONCE_PREFIX: &str = "n/";

/// A terminal nonce waiting to be used, by `n/NONCE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NonceRecord {
    /// The session's key (SHA-256 of its token).
    session: String,
    expires: u64,
}

/// WebTerminalNonce: a fresh single-use nonce of the proven session, for the browser to
/// sign into the request for one terminal, so that a signature seen once (by a gateway, in
/// a log) cannot open a second terminal. Expired nonces found on the way are removed.
pub fn terminal_nonce(svc: &Service, proof: &WebProof, now: u64) -> Result<Response, RpcError> {
    let (session, _) = proven(svc, proof, now)?;
    let store = svc.store();
    let mut mine = 0;
    for (key, bytes) in store.scan_prefix(Table::WebSessions, NONCE_PREFIX)? {
        match serde_json::from_slice::<NonceRecord>(&bytes) {
            Ok(n) if n.expires > now => {
                if n.session == session {
                    mine += 1;
                }
            }
            _ => {
                store.compare_and_swap(Table::WebSessions, &key, Some(&bytes), None)?;
            }
        }
    }
    if mine >= MAX_NONCES_PER_SESSION {
        return Err(denied(
            "too many terminals of this session are being opened at once; wait a minute",
        ));
    }
    let nonce = random_secret().map_err(|e| internal("a nonce", e))?;
    let expires = now + NONCE_TTL_SECS;
    store::put(
        store,
        Table::WebSessions,
        &format!("{NONCE_PREFIX}{nonce}"),
        &NonceRecord { session, expires },
    )?;
    Ok(Response::WebNonce { nonce, expires })
}

/// Takes `nonce` once: it must have been issued to `session` and not have expired.
fn take_nonce(svc: &Service, session: &str, nonce: &str, now: u64) -> Result<(), RpcError> {
    let refused = || {
        denied("the terminal request's nonce is unknown, used or expired; open the terminal again")
    };
    if nonce.is_empty() || nonce.len() > 128 {
        return Err(denied(
            "the terminal request carries no nonce; reload the page",
        ));
    }
    // The delete is the single use: of two requests racing, only one gets the record.
    let bytes = svc
        .store()
        .delete(Table::WebSessions, &format!("{NONCE_PREFIX}{nonce}"))?
        .ok_or_else(refused)?;
    let n: NonceRecord = serde_json::from_slice(&bytes).map_err(|_| refused())?;
    if n.expires <= now || !edgeport_proto::util::ct_eq(n.session.as_bytes(), session.as_bytes()) {
        return Err(refused());
    }
    Ok(())
}
/// Longest life of a web terminal's certificates (also capped by the session's end).
pub const TERMINAL_CERT_TTL_SECS: u64 = 120;

/// WebSessionCert: certificates for one terminal of a live web session, for the gateway's
/// fresh key. The browser's signature must be for opening a terminal (not any other request
/// of the session a gateway saw), and the certificates name only the login it asked for.
pub fn session_cert(
    svc: &Service,
    gateway: &str,
    proof: &WebProof,
    ssh_public_key: &str,
    now: u64,
) -> Result<Response, RpcError> {
    let (session, record) = proven(svc, proof, now)?;
    let signed =
        edgeport_proto::web::verify(&record.browser_key, &proof.signed, &proof.signature, now)
            .map_err(|e| session_denied(&e.to_string()))?;
    let mut parts = signed
        .path
        .strip_prefix(TERMINAL_PATH)
        .filter(|_| signed.method == "GET")
        .ok_or_else(|| denied("the browser's signature is not for opening a terminal"))?
        .split('/');
    let (Some(device), Some(login), nonce, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(denied(
            "the browser's signature is not for opening a terminal",
        ));
    };
    take_nonce(svc, &session, nonce.unwrap_or(""), now)?;
    let mut subject = users::subject(svc.store(), &record.user)?
        .ok_or_else(|| session_denied("the user no longer exists"))?;
    if !subject.logins.iter().any(|l| l == login) {
        return Err(denied(format!(
            "{} may not log in as {login:?}",
            record.user
        )));
    }
    subject.logins = vec![login.to_string()];
    let ttl = record
        .expires
        .saturating_sub(now)
        .min(TERMINAL_CERT_TTL_SECS);
    // Bound to the one device the browser asked for: the gateway holds this key, and a
    // compromised gateway must not carry it to other devices.
    let certs = crate::handlers::user_certs::issue_bound(
        svc,
        &subject,
        ssh_public_key,
        ttl,
        now,
        Some(device),
    )?;
    tracing::info!(user = %record.user, %device, %login, gateway, valid_before = certs.valid_before, "web console terminal certificate");
    Ok(Response::UserCerts(certs))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::service::Caller;
    use edgeport_proto::rpc::{ErrorKind, LockSpec, LockTarget, Request, UserSpec};
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn key() -> EcdsaKeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pk = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk.as_ref(), &rng).unwrap()
    }

    fn proof(k: &EcdsaKeyPair, token: &str, at: u64) -> WebProof {
        signed_for(k, token, at, "/api/session")
    }

    fn signed_for(k: &EcdsaKeyPair, token: &str, at: u64, path: &str) -> WebProof {
        let signed = edgeport_proto::web::signed_text(at, "GET", path);
        let rng = ring::rand::SystemRandom::new();
        let signature = k.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec();
        WebProof {
            token: token.into(),
            signed,
            signature,
        }
    }

    fn refused(r: Response) -> RpcError {
        match r {
            Response::Error(e) => e,
            other => panic!("not refused: {other:?}"),
        }
    }

    const PASSWORD: &str = "pw-alice-123";

    /// Adds the user alice, with these logins and PASSWORD, as the administrator.
    fn add_alice(svc: &Service, logins: &[&str], now: u64) -> Response {
        svc.handle_at(
            &Caller::Admin("admin".into()),
            Request::UserAdd(UserSpec {
                name: "alice".into(),
                logins: logins.iter().map(|l| l.to_string()).collect(),
                password: Some(PASSWORD.into()),
                ..Default::default()
            }),
            now,
        )
    }

    /// A web login of alice through gateway gw-1, bound to this browser key.
    fn web_login(svc: &Service, browser: &EcdsaKeyPair, password: &str, now: u64) -> Response {
        svc.handle_at(
            &Caller::Gateway("gw-1".into()),
            Request::WebLogin(WebLoginRequest {
                user: "alice".into(),
                password: password.into(),
                otp: None,
                browser_key: browser.public_key().as_ref().to_vec(),
                client_addr: "192.0.2.1".into(),
            }),
            now,
        )
    }

    /// The token of a new session.
    fn token_of(r: Response) -> String {
        match r {
            Response::WebSession(s) => s.token.unwrap(),
            other => panic!("no session: {other:?}"),
        }
    }

    /// Only the authority makes sessions; a session works only with its browser key, only
    /// while fresh, and ends at logout, a lock, expiry and the user's removal.
    #[test]
    fn sessions_need_the_browser_key_and_end_when_they_must() {
        let (_tmp, svc) = crate::tests::service();
        let admin = Caller::Admin("admin".into());
        let gw = Caller::Gateway("gw-1".into());
        let now = 1_700_000_000;
        let add = |svc: &Service| add_alice(svc, &["root"], now);
        assert!(matches!(add(&svc), Response::UserAdded { .. }));
        let browser = key();
        let login = |svc: &Service, password: &str, at: u64| web_login(svc, &browser, password, at);
        assert_eq!(
            refused(login(&svc, "wrong", now)).kind,
            ErrorKind::BadCredentials
        );
        let Response::WebSession(s) = login(&svc, PASSWORD, now) else {
            panic!("no session")
        };
        let token = s.token.unwrap();
        assert_eq!(s.user, "alice");
        // Only a gateway relays.
        assert_eq!(
            refused(svc.handle_at(
                &admin,
                Request::WebSessionCheck(proof(&browser, &token, now)),
                now
            ))
            .kind,
            ErrorKind::Denied
        );
        let check = |p: WebProof, at: u64| svc.handle_at(&gw, Request::WebSessionCheck(p), at);
        assert!(
            matches!(check(proof(&browser, &token, now), now), Response::WebSession(i) if i.token.is_none())
        );
        // A made-up token, another key, a stale signature.
        refused(check(proof(&browser, "made-up", now), now));
        let e = refused(check(proof(&key(), &token, now), now));
        assert!(e.message.contains("browser key"), "{e}");
        refused(check(proof(&browser, &token, now - 120), now));
        // Expired.
        refused(check(
            proof(&browser, &token, now + 9 * 3600),
            now + 9 * 3600,
        ));
        // Locked, then unlocked.
        let Response::WebSession(s) = login(&svc, PASSWORD, now) else {
            panic!("no session")
        };
        let token = s.token.unwrap();
        let lock = LockSpec {
            target: LockTarget::User("alice".into()),
            message: "gone".into(),
            expires: 0,
        };
        svc.handle_at(&admin, Request::LockAdd(lock), now);
        assert_eq!(
            refused(check(proof(&browser, &token, now), now)).kind,
            ErrorKind::Locked
        );
        svc.handle_at(
            &admin,
            Request::LockRemove {
                target: LockTarget::User("alice".into()),
            },
            now,
        );
        assert!(matches!(
            check(proof(&browser, &token, now), now),
            Response::WebSession(_)
        ));
        // Logout ends it for good.
        assert!(matches!(
            svc.handle_at(&gw, Request::WebLogout(proof(&browser, &token, now)), now),
            Response::Ok
        ));
        refused(check(proof(&browser, &token, now), now));
        // A session of a removed user does not pass to a later user of the name.
        let Response::WebSession(s) = login(&svc, PASSWORD, now) else {
            panic!("no session")
        };
        let token = s.token.unwrap();
        svc.handle_at(
            &admin,
            Request::UserRemove {
                name: "alice".into(),
            },
            now,
        );
        svc.handle_at(
            &admin,
            Request::LockRemove {
                target: LockTarget::User("alice".into()),
            },
            now,
        );
        assert!(matches!(add(&svc), Response::UserAdded { .. }));
        refused(check(proof(&browser, &token, now + 10), now + 10));
    }

    /// WebSessionAlive: only gateways ask; yes while the session holds, then why not (logged
    /// out, expired, user removed), in words the terminal shows as they are.
    #[test]
    fn whether_a_session_is_alive_is_answered_by_token_hash() {
        let (_tmp, svc) = crate::tests::service();
        let admin = Caller::Admin("admin".into());
        let gw = Caller::Gateway("gw-1".into());
        let now = 1_700_000_000;
        add_alice(&svc, &["root"], now);
        let browser = key();
        let login = || token_of(web_login(&svc, &browser, PASSWORD, now));
        let alive = |caller: &Caller, token: &str, at: u64| {
            svc.handle_at(
                caller,
                Request::WebSessionAlive {
                    token_sha256: sha256_hex(token.as_bytes()),
                },
                at,
            )
        };
        let token = login();
        assert!(matches!(alive(&gw, &token, now), Response::Ok));
        assert_eq!(refused(alive(&admin, &token, now)).kind, ErrorKind::Denied);
        let e = refused(alive(&gw, &token, now + 9 * 3600));
        assert_eq!(e.message, "session ended: the web session expired");
        svc.handle_at(&gw, Request::WebLogout(proof(&browser, &token, now)), now);
        let e = refused(alive(&gw, &token, now));
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Denied, "session ended: logged out")
        );
        let token = login();
        svc.handle_at(
            &admin,
            Request::UserRemove {
                name: "alice".into(),
            },
            now,
        );
        assert!(matches!(
            refused(alive(&gw, &token, now)).kind,
            ErrorKind::Denied | ErrorKind::Locked
        ));
    }

    /// A terminal's certificates: only for a live session whose browser signed the opening
    /// of that terminal, naming only the login it asked for, never past the session's end.
    #[test]
    fn terminal_certificates_need_the_browser_signature_for_that_terminal() {
        let (_tmp, svc) = crate::tests::service();
        let admin = Caller::Admin("admin".into());
        let gw = Caller::Gateway("gw-1".into());
        let now = 1_700_000_000;
        add_alice(&svc, &["root", "pi"], now);
        let browser = key();
        let token = token_of(web_login(&svc, &browser, PASSWORD, now));
        let gateway_key = edgeport_proto::keys::KeyPair::generate().unwrap();
        // A fresh single-use nonce of this session, for the terminal path.
        let nonce = || match svc.handle_at(
            &gw,
            Request::WebTerminalNonce(proof(&browser, &token, now)),
            now,
        ) {
            Response::WebNonce { nonce, expires } => {
                assert_eq!(expires, now + NONCE_TTL_SECS);
                nonce
            }
            other => panic!("no nonce: {other:?}"),
        };
        let ask = |p: WebProof| {
            svc.handle_at(
                &gw,
                Request::WebSessionCert {
                    proof: p,
                    ssh_public_key: gateway_key.public_openssh(),
                },
                now,
            )
        };
        // A signature the gateway saw on another request of the session does not do.
        let e = refused(ask(proof(&browser, &token, now)));
        assert!(e.message.contains("terminal"), "{e}");
        // Nor another key, nor a login the user does not have.
        refused(ask(signed_for(
            &key(),
            &token,
            now,
            &format!("/api/terminal/van-1/root/{}", nonce()),
        )));
        let e = refused(ask(signed_for(
            &browser,
            &token,
            now,
            &format!("/api/terminal/van-1/admin/{}", nonce()),
        )));
        assert!(e.message.contains("admin"), "{e}");
        // Without a nonce, or with one the authority never issued: refused.
        let e = refused(ask(signed_for(
            &browser,
            &token,
            now,
            "/api/terminal/van-1/pi",
        )));
        assert!(e.message.contains("nonce"), "{e}");
        let e = refused(ask(signed_for(
            &browser,
            &token,
            now,
            "/api/terminal/van-1/pi/made-up",
        )));
        assert!(e.message.contains("nonce"), "{e}");
        let once = signed_for(
            &browser,
            &token,
            now,
            &format!("/api/terminal/van-1/pi/{}", nonce()),
        );
        let Response::UserCerts(c) = ask(once.clone()) else {
            panic!("no certificates")
        };
        // The same signed request again (a replay): refused.
        let e = refused(ask(once));
        assert!(e.message.contains("nonce"), "{e}");
        // A nonce of another session of the same user does not do either.
        let other_token = token_of(web_login(&svc, &browser, PASSWORD, now));
        let Response::WebNonce { nonce: theirs, .. } = svc.handle_at(
            &gw,
            Request::WebTerminalNonce(proof(&browser, &other_token, now)),
            now,
        ) else {
            panic!("no nonce")
        };
        let e = refused(ask(signed_for(
            &browser,
            &token,
            now,
            &format!("/api/terminal/van-1/pi/{theirs}"),
        )));
        assert!(e.message.contains("nonce"), "{e}");
        // Nonces expire, and one session cannot pile them up.
        let n = nonce();
        let late = signed_for(
            &browser,
            &token,
            now + NONCE_TTL_SECS,
            &format!("/api/terminal/van-1/pi/{n}"),
        );
        let e = refused(svc.handle_at(
            &gw,
            Request::WebSessionCert {
                proof: late,
                ssh_public_key: gateway_key.public_openssh(),
            },
            now + NONCE_TTL_SECS,
        ));
        assert!(e.message.contains("nonce"), "{e}");
        // One is still waiting (the one signed by another key was never taken).
        for _ in 1..MAX_NONCES_PER_SESSION {
            nonce();
        }
        let e = refused(svc.handle_at(
            &gw,
            Request::WebTerminalNonce(proof(&browser, &token, now)),
            now,
        ));
        assert!(e.message.contains("too many"), "{e}");
        assert_eq!(c.user, "alice");
        assert_eq!(c.logins, vec!["pi".to_string()]);
        assert!(c.valid_before <= now + TERMINAL_CERT_TTL_SECS);
        let cert = russh::keys::Certificate::from_openssh(&c.ssh_cert).unwrap();
        assert_eq!(cert.valid_principals(), ["pi".to_string()]);
        // Only for the device the browser named.
        let roles: edgeport_proto::sshcert::RolesExtension = serde_json::from_str(
            cert.extensions()
                .get(edgeport_proto::sshcert::EXT_ROLES)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(roles.mfa_device, "van-1");
        // Only gateways relay; a locked user gets none.
        let Response::WebNonce { nonce: n, .. } = svc.handle_at(
            &gw,
            Request::WebTerminalNonce(proof(&browser, &other_token, now)),
            now,
        ) else {
            panic!("no nonce")
        };
        let token = other_token;
        let terminal = signed_for(
            &browser,
            &token,
            now,
            &format!("/api/terminal/van-1/pi/{n}"),
        );
        assert_eq!(
            refused(svc.handle_at(
                &admin,
                Request::WebSessionCert {
                    proof: terminal.clone(),
                    ssh_public_key: gateway_key.public_openssh(),
                },
                now
            ))
            .kind,
            ErrorKind::Denied
        );
        let lock = LockSpec {
            target: LockTarget::User("alice".into()),
            message: "gone".into(),
            expires: 0,
        };
        svc.handle_at(&admin, Request::LockAdd(lock), now);
        assert_eq!(refused(ask(terminal)).kind, ErrorKind::Locked);
    }
}
