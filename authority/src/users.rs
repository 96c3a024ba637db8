//! Local users: logins, roles, Kubernetes groups, an argon2 password hash or a one-time
//! invite code (stored as a SHA-256 hash, 24 h), and the bot identities an administrator
//! signed for without a user record.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use edgeport_proto::keys::{random_bytes, random_secret, sha256_hex};
use edgeport_proto::rpc::{RpcError, UserInfo, UserSpec, UserUpdate};
use edgeport_proto::util::valid_name;
use serde::{Deserialize, Serialize};

use crate::errors::{bad_credentials, exists, expired, internal, invalid, not_found};
use crate::roles;
use crate::store::{self, Store, Table};

/// How long an invite code may be used.
pub const INVITE_TTL_SECS: u64 = 24 * 3600;
/// Bounds the argon2 input; a password longer than this is a mistake, not a secret.
const MAX_PASSWORD_LEN: usize = 1024;
/// The one message for every failed password check, so it does not tell whether the user
/// exists.
pub const BAD_LOGIN: &str = "invalid user or password";
/// A second login with an invite code that was already accepted.
pub const INVITE_USED: &str =
    "this invite code was already used: log in with the password chosen then, or ask an administrator for a new invite";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Invite {
    /// Hex SHA-256 of the code (the code has 256 random bits, a fast hash is enough).
    pub hash: String,
    pub expires: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub logins: Vec<String>,
    pub roles: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    /// PHC string of the argon2 hash.
    pub password_hash: Option<String>,
    pub invite: Option<Invite>,
    pub created: u64,
    /// For a user made by single sign-on: `ISSUER SUBJECT` of the identity it belongs to
    /// (refreshed at each login from the mapping of their groups). `None` for local users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sso: Option<String>,
    /// The user must enroll a one-time password app (`tctl users add --require-totp`).
    #[serde(default)]
    pub require_totp: bool,
    /// The enrolled app's secret and the step of the last code accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<TotpState>,
    /// Random and never reused: certificates carry it, and sessions and recordings belong to
    /// it (a user made later under a removed user's name gets another). Empty for records
    /// made before ids existed.
    #[serde(default)]
    pub id: String,
    /// Hex SHA-256 of the invite code this user accepted, so that following the invite a
    /// second time says it was used instead of "invalid user or password".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_invite: Option<String>,
}

/// A fresh user id.
pub fn new_id() -> Result<String, RpcError> {
    edgeport_proto::keys::random_bytes(12)
        .map(hex::encode)
        .map_err(|e| crate::errors::internal("a user id", e))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TotpState {
    /// Base32, as the app holds it.
    pub secret: String,
    /// Codes of this step and earlier are spent.
    pub last_step: u64,
}

/// An identity signed by an administrator without a user record (a CI bot): remembered so
/// that gateways can authorise its dials and locks can name it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BotRecord {
    pub name: String,
    pub logins: Vec<String>,
    pub created: u64,
    pub last_signed: u64,
}

/// Who a certificate is issued to: a user or a bot, with what it may do.
#[derive(Clone, Debug)]
pub struct Subject {
    pub name: String,
    pub logins: Vec<String>,
    pub roles: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    /// When the record was made: a certificate older than this was issued to an earlier
    /// holder of the name and no longer counts.
    pub created: u64,
    /// The user record's id (empty for bots and for records older than ids).
    pub id: String,
}

impl From<&UserRecord> for Subject {
    fn from(u: &UserRecord) -> Self {
        Subject {
            name: u.name.clone(),
            logins: u.logins.clone(),
            roles: u.roles.clone(),
            kube_groups: u.kube_groups.clone(),
            kube_users: u.kube_users.clone(),
            created: u.created,
            id: u.id.clone(),
        }
    }
}

impl From<&BotRecord> for Subject {
    fn from(b: &BotRecord) -> Self {
        Subject {
            name: b.name.clone(),
            logins: b.logins.clone(),
            roles: vec![roles::DEFAULT_ROLE.to_string()],
            kube_groups: Vec::new(),
            kube_users: Vec::new(),
            created: b.created,
            id: String::new(),
        }
    }
}

/// Checks a user or login name.
pub fn check_name(what: &str, name: &str) -> Result<(), RpcError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid {what} {name:?}: 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Kubernetes group and user names end up in certificate subjects and HTTP headers.
fn check_kube_name(what: &str, name: &str) -> Result<(), RpcError> {
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "invalid Kubernetes {what} {name:?}: 1 to 64 printable characters"
        )));
    }
    Ok(())
}

fn check_password(pw: &str) -> Result<(), RpcError> {
    if pw.is_empty() {
        return Err(invalid("the password is empty"));
    }
    if pw.len() > MAX_PASSWORD_LEN {
        return Err(invalid(format!(
            "the password is longer than {MAX_PASSWORD_LEN} bytes"
        )));
    }
    Ok(())
}

pub fn dedup(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// argon2id with the crate's default parameters and a random salt.
pub fn hash_password(pw: &str) -> Result<String, RpcError> {
    let salt_bytes = random_bytes(16).map_err(|e| internal("random salt", e))?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| internal("password salt", e))?;
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| internal("password hash", e))
}

pub fn verify_password(pw: &str, hash: &str) -> bool {
    pw.len() <= MAX_PASSWORD_LEN
        && PasswordHash::new(hash)
            .is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

/// A hash that matches nothing, verified against when the user does not exist so that an
/// unknown user costs as much time as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("edgeport-decoy").unwrap_or_default())
}

/// What a user (or an identity provider group) is given: checked and normalised.
pub struct Grant {
    pub logins: Vec<String>,
    pub roles: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
}

/// Checks names (logins, Kubernetes groups and users) and that the roles exist (the built-in
/// one when none is given), and drops duplicates.
pub fn check_grant(
    store: &dyn Store,
    logins: &[String],
    roles: &[String],
    kube_groups: &[String],
    kube_users: &[String],
) -> Result<Grant, RpcError> {
    for l in logins {
        check_name("login", l)?;
    }
    for g in kube_groups {
        check_kube_name("group", g)?;
    }
    for u in kube_users {
        check_kube_name("user", u)?;
    }
    let roles = if roles.is_empty() {
        vec![roles::DEFAULT_ROLE.to_string()]
    } else {
        dedup(roles)
    };
    roles::grants(store, &roles)?;
    Ok(Grant {
        logins: dedup(logins),
        roles,
        kube_groups: dedup(kube_groups),
        kube_users: dedup(kube_users),
    })
}

/// Adds a user. Without a password the answer carries a one-time invite code and its expiry.
pub fn add(
    store: &dyn Store,
    spec: &UserSpec,
    now: u64,
) -> Result<(Option<String>, Option<u64>), RpcError> {
    check_name("user name", &spec.name)?;
    let grant = check_grant(
        store,
        &spec.logins,
        &spec.roles,
        &spec.kube_groups,
        &spec.kube_users,
    )?;
    let password_hash = match &spec.password {
        Some(pw) => {
            check_password(pw)?;
            Some(hash_password(pw)?)
        }
        None => None,
    };
    let (invite, code) = if password_hash.is_none() {
        let code = random_secret().map_err(|e| internal("invite code", e))?;
        let inv = Invite {
            hash: sha256_hex(code.as_bytes()),
            expires: now + INVITE_TTL_SECS,
        };
        (Some(inv), Some(code))
    } else {
        (None, None)
    };
    let record = UserRecord {
        name: spec.name.clone(),
        logins: grant.logins,
        roles: grant.roles,
        kube_groups: grant.kube_groups,
        kube_users: grant.kube_users,
        password_hash,
        invite: invite.clone(),
        created: now,
        sso: None,
        require_totp: spec.require_totp,
        totp: None,
        id: new_id()?,
        used_invite: None,
    };
    store::update::<UserRecord, RpcError, _>(store, Table::Users, &spec.name, |cur| match cur {
        Some(_) => Err(exists(format!("user {} already exists", spec.name))),
        None => Ok(Some(record.clone())),
    })?;
    Ok((code, invite.map(|i| i.expires)))
}

pub fn get(store: &dyn Store, name: &str) -> Result<Option<UserRecord>, RpcError> {
    Ok(store::get(store, Table::Users, name)?)
}

pub fn get_bot(store: &dyn Store, name: &str) -> Result<Option<BotRecord>, RpcError> {
    Ok(store::get(store, Table::Bots, name)?)
}

/// The user, or else the bot, of that name.
pub fn subject(store: &dyn Store, name: &str) -> Result<Option<Subject>, RpcError> {
    if let Some(u) = get(store, name)? {
        return Ok(Some(Subject::from(&u)));
    }
    Ok(get_bot(store, name)?.map(|b| Subject::from(&b)))
}

/// Remembers that an administrator signed `logins` for the bot `name`.
pub fn record_bot(
    store: &dyn Store,
    name: &str,
    logins: &[String],
    now: u64,
) -> Result<(), RpcError> {
    store::update::<BotRecord, RpcError, _>(store, Table::Bots, name, |cur| {
        let mut b = cur.unwrap_or(BotRecord {
            name: name.to_string(),
            logins: Vec::new(),
            created: now,
            last_signed: now,
        });
        for l in logins {
            if !b.logins.contains(l) {
                b.logins.push(l.clone());
            }
        }
        b.last_signed = now;
        Ok(Some(b))
    })?;
    Ok(())
}

/// Lists users; `locked` says which names are under a lock.
pub fn list(store: &dyn Store, locked: &dyn Fn(&str) -> bool) -> Result<Vec<UserInfo>, RpcError> {
    Ok(store::list::<UserRecord>(store, Table::Users, "")?
        .into_iter()
        .map(|(_, u)| UserInfo {
            locked: locked(&u.name),
            name: u.name,
            logins: u.logins,
            roles: u.roles,
            kube_groups: u.kube_groups,
            kube_users: u.kube_users,
            has_password: u.password_hash.is_some(),
            created: u.created,
            second_factor: match (&u.totp, u.require_totp) {
                (Some(_), _) => "enrolled".into(),
                (None, true) => "required".into(),
                (None, false) => String::new(),
            },
        })
        .collect())
}

/// Removes a user (or a bot of that name).
/// Changes a local user's grants in place; what `change` leaves out stays. A single
/// sign-on user's grants come from the group mapping at each login, so changing them here
/// would not last: refused with the command that does.
pub fn update(store: &dyn Store, change: &UserUpdate) -> Result<UserRecord, RpcError> {
    let nothing = change.logins.is_none()
        && change.roles.is_none()
        && change.kube_groups.is_none()
        && change.kube_users.is_none()
        && change.require_totp.is_none()
        && !change.reset_totp;
    if nothing {
        return Err(invalid(
            "nothing to change: give --set-logins, --set-roles, --set-kube-groups, \
             --set-kube-users, --[no-]require-totp or --reset-totp",
        ));
    }
    let name = &change.name;
    let updated = store::update::<UserRecord, RpcError, _>(store, Table::Users, name, |cur| {
        let mut u = cur.ok_or_else(|| not_found(format!("user {name} not found")))?;
        if u.sso.is_some() {
            return Err(invalid(format!(
                "{name} signs in with single sign-on: their grants come from the group \
                 mapping at each login (tctl sso map)"
            )));
        }
        let pick = |new: &Option<Vec<String>>, old: &[String]| new.clone().unwrap_or(old.to_vec());
        let grant = check_grant(
            store,
            &pick(&change.logins, &u.logins),
            &pick(&change.roles, &u.roles),
            &pick(&change.kube_groups, &u.kube_groups),
            &pick(&change.kube_users, &u.kube_users),
        )?;
        u.logins = grant.logins;
        u.roles = grant.roles;
        u.kube_groups = grant.kube_groups;
        u.kube_users = grant.kube_users;
        if let Some(required) = change.require_totp {
            u.require_totp = required;
        }
        if change.reset_totp {
            u.totp = None;
        }
        Ok(Some(u))
    })?;
    updated.ok_or_else(|| not_found(format!("user {name} not found")))
}

pub fn remove(store: &dyn Store, name: &str) -> Result<(), RpcError> {
    let user = store.delete(Table::Users, name)?;
    let bot = store.delete(Table::Bots, name)?;
    if user.is_none() && bot.is_none() {
        return Err(not_found(format!("user {name} not found")));
    }
    Ok(())
}

/// Checks a login secret (the password, or an unexpired invite code) without changing
/// anything: the user, and whether the secret was the invite.
pub fn check_secret(
    store: &dyn Store,
    name: &str,
    secret: &str,
    now: u64,
) -> Result<(UserRecord, bool), RpcError> {
    let Some(user) = (if valid_name(name) {
        get(store, name)?
    } else {
        None
    }) else {
        verify_password(secret, decoy_hash());
        return Err(bad_credentials(BAD_LOGIN));
    };
    let by_password = user
        .password_hash
        .as_deref()
        .is_some_and(|h| verify_password(secret, h));
    let invite_hash = sha256_hex(secret.as_bytes());
    let by_invite = !by_password && user.invite.as_ref().is_some_and(|i| i.hash == invite_hash);
    if !by_password && !by_invite {
        if user.password_hash.is_none() {
            // Keep the timing of a real check.
            verify_password(secret, decoy_hash());
        }
        if user.used_invite.as_deref() == Some(invite_hash.as_str()) {
            // Only the holder of the 256-bit code can get here, so this tells nobody else
            // anything.
            return Err(bad_credentials(INVITE_USED));
        }
        return Err(bad_credentials(BAD_LOGIN));
    }
    if by_invite && user.invite.as_ref().is_some_and(|i| i.expires <= now) {
        return Err(expired(
            "the invite code expired; ask an administrator for a new one",
        ));
    }
    Ok((user, by_invite))
}

/// Checks a login secret: the password, or the invite code (which then needs
/// `new_password`, sets it and is consumed). A correct password with `new_password` changes
/// the password. Returns the user as stored afterwards.
pub fn authenticate(
    store: &dyn Store,
    name: &str,
    secret: &str,
    new_password: Option<&str>,
    now: u64,
) -> Result<UserRecord, RpcError> {
    let (user, by_invite) = check_secret(store, name, secret, now)?;
    let invite_hash = sha256_hex(secret.as_bytes());
    if by_invite && new_password.is_none() {
        return Err(invalid(
            "this is an invite code: choose a password (new_password) to accept it",
        ));
    }
    let Some(new_pw) = new_password else {
        return Ok(user);
    };
    check_password(new_pw)?;
    let new_hash = hash_password(new_pw)?;
    let updated = store::update::<UserRecord, RpcError, _>(store, Table::Users, name, |cur| {
        let mut u = cur.ok_or_else(|| bad_credentials(BAD_LOGIN))?;
        if by_invite {
            // Consumed at most once, even by two concurrent logins.
            if u.invite.as_ref().is_none_or(|i| i.hash != invite_hash) {
                return Err(bad_credentials(BAD_LOGIN));
            }
            u.invite = None;
            u.used_invite = Some(invite_hash.clone());
        } else if u.password_hash != user.password_hash {
            // The password changed meanwhile; the one we checked is no longer current.
            return Err(bad_credentials(BAD_LOGIN));
        }
        u.password_hash = Some(new_hash.clone());
        Ok(Some(u))
    })?;
    updated.ok_or_else(|| bad_credentials(BAD_LOGIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::rpc::ErrorKind;

    fn store() -> (tempfile::TempDir, crate::store::SledStore) {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(&d.path().join("s")).unwrap();
        (d, s)
    }

    fn spec(name: &str, pw: Option<&str>) -> UserSpec {
        UserSpec {
            name: name.into(),
            logins: vec!["root".into()],
            password: pw.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn password_and_invite_logins() {
        let (_d, s) = store();
        let now = 1_000_000;
        assert_eq!(
            add(&s, &spec("alice", Some("pw1")), now).unwrap(),
            (None, None)
        );
        assert_eq!(
            add(&s, &spec("alice", None), now).unwrap_err().kind,
            ErrorKind::AlreadyExists
        );
        authenticate(&s, "alice", "pw1", None, now).unwrap();
        let e = authenticate(&s, "alice", "pw2", None, now).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::BadCredentials, BAD_LOGIN)
        );
        let e = authenticate(&s, "nobody", "pw1", None, now).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::BadCredentials, BAD_LOGIN)
        );

        let (code, exp) = add(&s, &spec("bob", None), now).unwrap();
        let code = code.unwrap();
        assert_eq!(exp, Some(now + INVITE_TTL_SECS));
        let stored = get(&s, "bob").unwrap().unwrap();
        assert!(!serde_json::to_string(&stored).unwrap().contains(&code));
        assert_eq!(
            authenticate(&s, "bob", &code, None, now).unwrap_err().kind,
            ErrorKind::Invalid
        );
        assert_eq!(
            authenticate(&s, "bob", &code, Some("new"), now + INVITE_TTL_SECS)
                .unwrap_err()
                .kind,
            ErrorKind::Expired
        );
        authenticate(&s, "bob", &code, Some("new"), now).unwrap();
        // The invite is consumed, and says so; the new password works.
        let e = authenticate(&s, "bob", &code, Some("other"), now).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::BadCredentials, INVITE_USED)
        );
        authenticate(&s, "bob", "new", None, now).unwrap();
        let listed = list(&s, &|n| n == "bob").unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .any(|u| u.name == "bob" && u.locked && u.has_password));
        remove(&s, "bob").unwrap();
        assert_eq!(remove(&s, "bob").unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn update_changes_only_what_it_is_given() {
        let (_d, s) = store();
        let now = 1_000_000;
        let mut alice = spec("alice", Some("pw1"));
        alice.logins = vec!["root".into(), "pi".into()];
        alice.kube_groups = vec!["dev".into()];
        alice.require_totp = true;
        add(&s, &alice, now).unwrap();
        let before = get(&s, "alice").unwrap().unwrap();

        let u = update(
            &s,
            &UserUpdate {
                name: "alice".into(),
                logins: Some(vec!["ubuntu".into(), "ubuntu".into()]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(u.logins, ["ubuntu"]);
        assert_eq!(u.kube_groups, ["dev"]);
        assert_eq!(u.roles, before.roles);
        assert!(u.require_totp);
        assert_eq!(u.password_hash, before.password_hash);
        assert_eq!(u.id, before.id);
        authenticate(&s, "alice", "pw1", None, now).unwrap();

        let u = update(
            &s,
            &UserUpdate {
                name: "alice".into(),
                require_totp: Some(false),
                reset_totp: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!u.require_totp && u.totp.is_none());

        let err = |c: UserUpdate| update(&s, &c).unwrap_err();
        let e = err(UserUpdate {
            name: "alice".into(),
            ..Default::default()
        });
        assert!(e.message.starts_with("nothing to change"), "{}", e.message);
        let e = err(UserUpdate {
            name: "nobody".into(),
            logins: Some(vec![]),
            ..Default::default()
        });
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = err(UserUpdate {
            name: "alice".into(),
            roles: Some(vec!["no-such-role".into()]),
            ..Default::default()
        });
        assert!(e.message.contains("no-such-role"), "{}", e.message);
        // A refused change leaves the user as it was.
        assert_eq!(get(&s, "alice").unwrap().unwrap().logins, ["ubuntu"]);
    }

    #[test]
    fn bad_specs_are_refused() {
        let (_d, s) = store();
        let mut bad = spec("-x", Some("pw"));
        assert_eq!(add(&s, &bad, 1).unwrap_err().kind, ErrorKind::Invalid);
        bad.name = "ok".into();
        bad.roles = vec!["superuser".into()];
        assert!(add(&s, &bad, 1)
            .unwrap_err()
            .message
            .contains("unknown role"));
        bad.roles = vec![];
        bad.logins = vec!["root; rm".into()];
        assert_eq!(add(&s, &bad, 1).unwrap_err().kind, ErrorKind::Invalid);
        bad.logins = vec![];
        bad.password = Some(String::new());
        assert_eq!(add(&s, &bad, 1).unwrap_err().kind, ErrorKind::Invalid);
    }
}
