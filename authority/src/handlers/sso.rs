//! Single sign-on: the mapping from identity provider groups to what Edgeport grants
//! (`tctl sso map`), and the certificates for a login the authority verified itself
//! ([`crate::sso`]: no request lets a gateway name a single sign-on user).
//!
//! A user gets the union of the mappings of their groups, and nothing without one. The user
//! record it keeps (so that dials, `tsh ls`, locks and `tctl users ls` know the user) is
//! refreshed at every login and bound to the provider's issuer and subject: a name that
//! belongs to a local user, or to another identity at the provider, is refused.

use edgeport_proto::keys::parse_ed25519_public;
use edgeport_proto::rpc::{Response, RpcError, SsoMapping};

use super::user_certs::{check_not_locked, issue};
use crate::errors::{denied, invalid, not_found};
use crate::service::Service;
use crate::sso::Verified;
use crate::store::{self, Store, Table};
use crate::users::{check_grant, check_name, dedup, Subject, UserRecord};

/// Saves (or replaces) the mapping of one group.
pub fn map_set(store: &dyn Store, m: SsoMapping) -> Result<Response, RpcError> {
    let group = m.group.trim();
    if group.is_empty() || group.len() > 256 || group.chars().any(char::is_control) {
        return Err(invalid(format!("invalid group name {:?}", m.group)));
    }
    let g = check_grant(store, &m.logins, &m.roles, &m.kube_groups, &m.kube_users)?;
    let m = SsoMapping {
        group: group.to_string(),
        roles: g.roles,
        logins: g.logins,
        kube_groups: g.kube_groups,
        kube_users: g.kube_users,
    };
    store::put(store, Table::SsoMaps, &m.group, &m)?;
    Ok(Response::Ok)
}

pub fn map_list(store: &dyn Store) -> Result<Response, RpcError> {
    let maps = store::list::<SsoMapping>(store, Table::SsoMaps, "")?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    Ok(Response::SsoMaps(maps))
}

pub fn map_remove(store: &dyn Store, group: &str) -> Result<Response, RpcError> {
    match store.delete(Table::SsoMaps, group)? {
        Some(_) => Ok(Response::Ok),
        None => Err(not_found(format!("no mapping for group {group:?}"))),
    }
}

/// What `groups` grant together: roles, logins and Kubernetes names of every mapped group.
fn granted(store: &dyn Store, groups: &[String]) -> Result<Option<SsoMapping>, RpcError> {
    let mut all = SsoMapping::default();
    let mut any = false;
    for g in groups {
        if let Some(m) = store::get::<SsoMapping>(store, Table::SsoMaps, g)? {
            any = true;
            all.roles.extend(m.roles);
            all.logins.extend(m.logins);
            all.kube_groups.extend(m.kube_groups);
            all.kube_users.extend(m.kube_users);
        }
    }
    Ok(any.then(|| SsoMapping {
        group: String::new(),
        roles: dedup(&all.roles),
        logins: dedup(&all.logins),
        kube_groups: dedup(&all.kube_groups),
        kube_users: dedup(&all.kube_users),
    }))
}

/// Signs `ssh_public_key` for the user `req` names, which [`crate::sso`] established from
/// the provider's own answer.
pub(crate) fn login(
    svc: &Service,
    gateway: &str,
    req: &Verified,
    ssh_public_key: &str,
    ttl_secs: u64,
    client_addr: &str,
    now: u64,
) -> Result<Response, RpcError> {
    parse_ed25519_public(ssh_public_key).map_err(|e| invalid(format!("ssh_public_key: {e}")))?;
    let user = sso_user(svc, gateway, req, now)?;
    let certs = issue(svc, &Subject::from(&user), ssh_public_key, ttl_secs, now)?;
    tracing::info!(user = %user.name, connector = %req.connector, subject = %req.subject,
        client = %client_addr, gateway, "single sign-on login");
    Ok(Response::UserCerts(certs))
}

/// The user record of a single sign-on user [`crate::sso`] established, made or refreshed
/// from their groups' mappings, if it may log in now (mapped, not a local user's or another
/// identity's name, not locked). For tsh's certificates and the web console's sessions.
pub(crate) fn sso_user(
    svc: &Service,
    gateway: &str,
    req: &Verified,
    now: u64,
) -> Result<UserRecord, RpcError> {
    check_name("user name from the identity provider", &req.user)?;
    let store = svc.store();
    let Some(grant) = granted(store, &req.groups)? else {
        tracing::info!(user = %req.user, groups = ?req.groups, gateway, "single sign-on refused: no mapped group");
        return Err(denied(format!(
            "{} signed in, but none of their groups ({}) is mapped to Edgeport; an \
             administrator can run: tctl sso map GROUP --logins ... [--roles ...]",
            req.user,
            if req.groups.is_empty() {
                "none".to_string()
            } else {
                req.groups.join(", ")
            }
        )));
    };
    let identity = format!("{} {}", req.issuer, req.subject);
    if store::get::<crate::users::BotRecord>(store, Table::Bots, &req.user)?.is_some() {
        return Err(denied(format!(
            "the user name {} belongs to an automation identity (tctl auth sign)",
            req.user
        )));
    }
    let mut narrowed = false;
    let mut fresh = false;
    let user = store::update::<UserRecord, RpcError, _>(store, Table::Users, &req.user, |cur| {
        fresh = cur.is_none();
        narrowed = cur.as_ref().is_some_and(|u| {
            let lost = |old: &[String], new: &[String]| old.iter().any(|x| !new.contains(x));
            lost(&u.roles, &grant.roles)
                || lost(&u.logins, &grant.logins)
                || lost(&u.kube_groups, &grant.kube_groups)
                || lost(&u.kube_users, &grant.kube_users)
        });
        let created = match &cur {
            Some(u) if u.sso.is_none() => {
                return Err(denied(format!(
                    "a local user named {} exists; single sign-on cannot log in as them",
                    req.user
                )))
            }
            Some(u) if u.sso.as_deref() != Some(identity.as_str()) => {
                return Err(denied(format!(
                    "the user name {} belongs to another identity at the provider",
                    req.user
                )))
            }
            Some(u) => (u.created, u.id.clone()),
            None => (now, crate::users::new_id()?),
        };
        let (created, id) = created;
        Ok(Some(UserRecord {
            name: req.user.clone(),
            logins: grant.logins.clone(),
            roles: grant.roles.clone(),
            kube_groups: grant.kube_groups.clone(),
            kube_users: grant.kube_users.clone(),
            password_hash: None,
            invite: None,
            created,
            sso: Some(identity.clone()),
            require_totp: false,
            totp: None,
            id,
            used_invite: None,
        }))
    })?
    .ok_or_else(|| denied("the user record could not be written"))?;
    if narrowed {
        // Gateways may hold grants given under the wider mapping.
        svc.policy.changed();
    }
    if fresh && crate::locks::clear_removed_user(store, &user.name)? {
        svc.standing.changed();
        svc.policy.changed();
    }
    check_not_locked(svc, &user.name, now)?;
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, crate::store::SledStore) {
        let d = tempfile::tempdir().unwrap();
        let s = crate::store::SledStore::open(&d.path().join("s")).unwrap();
        (d, s)
    }

    #[test]
    fn groups_grant_the_union_of_their_mappings() {
        let (_d, s) = store();
        let m = |g: &str, logins: &[&str]| SsoMapping {
            group: g.into(),
            logins: logins.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        };
        map_set(&s, m("devs", &["root", "pi"])).unwrap();
        map_set(&s, m("ops", &["pi", "admin"])).unwrap();
        let g = granted(&s, &["devs".into(), "ops".into(), "nobody".into()])
            .unwrap()
            .unwrap();
        assert_eq!(g.logins, ["root", "pi", "admin"]);
        assert_eq!(g.roles, [crate::roles::DEFAULT_ROLE]);
        assert!(granted(&s, &["nobody".into()]).unwrap().is_none());
        assert!(map_set(&s, m("x", &["bad login!"])).is_err());
        assert!(map_set(&s, m("", &["root"])).is_err());
        let unknown_role = SsoMapping {
            group: "y".into(),
            roles: vec!["no-such-role".into()],
            ..Default::default()
        };
        assert!(map_set(&s, unknown_role).is_err());
        map_remove(&s, "ops").unwrap();
        assert!(map_remove(&s, "ops").is_err());
    }
}
