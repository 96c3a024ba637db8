//! Roles: what a user's certificates allow (DESIGN §6). `access` is built in (every device, the
//! user's own logins, a PTY and port forwarding, sessions of up to 12 hours) and is what a user
//! gets when no role is named. Administrators add their own with `tctl roles add`; they live in
//! the store's `roles` table. Deny wins over allow.

use std::collections::BTreeMap;

use edgeport_proto::rpc::{RoleInfo, RoleSpec, RpcError};
use edgeport_proto::sshcert::{JoinRule, RolesExtension, JOIN_MODES};
use edgeport_proto::util::valid_name;

use crate::errors::{exists, invalid, not_found};
use crate::store::{self, Store, Table};
use crate::users::UserRecord;

/// The role a user gets when none is named.
pub const DEFAULT_ROLE: &str = "access";

/// The longest session any role may grant (also the cap of `tctl auth sign --ttl`).
pub const MAX_SESSION_TTL_SECS: u64 = 12 * 3600;

/// Most labels one role may name (allow and deny together): roles travel in certificates.
const MAX_ROLE_LABELS: usize = 32;

/// The built-in roles.
pub fn builtin(name: &str) -> Option<RoleSpec> {
    match name {
        DEFAULT_ROLE => Some(RoleSpec {
            name: DEFAULT_ROLE.to_string(),
            allow_labels: BTreeMap::new(),
            deny_labels: BTreeMap::new(),
            max_session_ttl: MAX_SESSION_TTL_SECS,
            permit_pty: true,
            permit_port_forwarding: true,
            permit_agent_forwarding: false,
            request_roles: Vec::new(),
            review_roles: Vec::new(),
            require_session_mfa: false,
            join_sessions: Vec::new(),
            require_moderator: BTreeMap::new(),
        }),
        _ => None,
    }
}

/// A role by name: built-in first, then the store.
pub fn lookup(store: &dyn Store, name: &str) -> Result<Option<RoleSpec>, RpcError> {
    if let Some(r) = builtin(name) {
        return Ok(Some(r));
    }
    Ok(store::get::<RoleSpec>(store, Table::Roles, name)?)
}

/// What a set of roles grants together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grants {
    pub max_session_ttl: u64,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
    /// Carried in the SSH certificate so devices can decide offline.
    pub extension: RolesExtension,
}

impl Grants {
    pub fn allows_device(&self, labels: &BTreeMap<String, String>) -> bool {
        self.extension.allows_device(labels)
    }

    /// Whether sessions to a device with `labels` need a per-session second factor.
    pub fn requires_session_mfa(&self, labels: &BTreeMap<String, String>) -> bool {
        self.extension.requires_session_mfa(labels)
    }
}

/// Combines the roles `names` as found in `store` (an empty list means the default role).
pub fn grants(store: &dyn Store, names: &[String]) -> Result<Grants, RpcError> {
    let mut roles = Vec::new();
    let default = [DEFAULT_ROLE.to_string()];
    let names = if names.is_empty() {
        &default[..]
    } else {
        names
    };
    for name in names {
        match lookup(store, name)? {
            Some(r) => roles.push(r),
            None => {
                return Err(invalid(format!(
                    "unknown role {name:?} (see `tctl roles ls`)"
                )))
            }
        }
    }
    Ok(combine(&roles))
}

/// Permissions are the union of the roles', the session cap the smallest, denials all apply;
/// each role's allowed labels stay a set of their own (a device must match one role's set
/// entirely: merging them would allow combinations no role allows).
pub fn combine(roles: &[RoleSpec]) -> Grants {
    let mut g = Grants {
        max_session_ttl: MAX_SESSION_TTL_SECS,
        permit_pty: false,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
        extension: RolesExtension::default(),
    };
    for role in roles {
        g.max_session_ttl = g.max_session_ttl.min(role.max_session_ttl);
        g.permit_pty |= role.permit_pty;
        g.permit_port_forwarding |= role.permit_port_forwarding;
        g.permit_agent_forwarding |= role.permit_agent_forwarding;
        if !g.extension.allow.contains(&role.allow_labels) {
            g.extension.allow.push(role.allow_labels.clone());
        }
        merge(&mut g.extension.deny_labels, &role.deny_labels);
        if !g.extension.roles.contains(&role.name) {
            g.extension.roles.push(role.name.clone());
        }
        // Session MFA applies to the devices the role that asks for it allows.
        if role.require_session_mfa && !g.extension.session_mfa.contains(&role.allow_labels) {
            g.extension.session_mfa.push(role.allow_labels.clone());
        }
        // Joining others' sessions: on the devices this role allows, in its modes.
        if !role.join_sessions.is_empty() {
            g.extension.join.push(JoinRule {
                labels: role.allow_labels.clone(),
                modes: role.join_sessions.clone(),
            });
        }
        if !role.require_moderator.is_empty()
            && !g
                .extension
                .require_moderator
                .contains(&role.require_moderator)
        {
            g.extension
                .require_moderator
                .push(role.require_moderator.clone());
        }
    }
    // A role that reaches every device makes the other sets redundant.
    if g.extension.allow.iter().any(BTreeMap::is_empty) {
        g.extension.allow = vec![BTreeMap::new()];
    }
    g
}

fn merge(into: &mut BTreeMap<String, Vec<String>>, from: &BTreeMap<String, Vec<String>>) {
    for (k, vals) in from {
        let e = into.entry(k.clone()).or_default();
        for v in vals {
            if !e.contains(v) {
                e.push(v.clone());
            }
        }
    }
}

fn check_labels(what: &str, labels: &BTreeMap<String, Vec<String>>) -> Result<(), RpcError> {
    for (k, vals) in labels {
        if !valid_name(k) {
            return Err(invalid(format!(
                "{what} label key {k:?} is not a valid name"
            )));
        }
        if vals.is_empty() {
            return Err(invalid(format!("{what} label {k} has no values")));
        }
        for v in vals {
            if v != "*" && !valid_name(v) {
                return Err(invalid(format!(
                    "{what} label {k}={v:?}: values are names or `*`"
                )));
            }
        }
    }
    Ok(())
}

/// Creates or replaces a role. Built-in roles cannot be changed.
pub fn upsert(store: &dyn Store, spec: &RoleSpec) -> Result<(), RpcError> {
    if !valid_name(&spec.name) {
        return Err(invalid(format!("role name {:?} is not valid", spec.name)));
    }
    if builtin(&spec.name).is_some() {
        return Err(exists(format!(
            "role {} is built in and cannot be changed; add a role of another name",
            spec.name
        )));
    }
    check_labels("allow", &spec.allow_labels)?;
    check_labels("deny", &spec.deny_labels)?;
    check_labels("require-moderator", &spec.require_moderator)?;
    if let Some(m) = spec
        .join_sessions
        .iter()
        .find(|m| !JOIN_MODES.contains(&m.as_str()))
    {
        return Err(invalid(format!(
            "join mode {m:?} is not one of observer, peer, moderator"
        )));
    }
    if spec.allow_labels.len() + spec.deny_labels.len() > MAX_ROLE_LABELS {
        return Err(invalid(format!(
            "a role may name at most {MAX_ROLE_LABELS} labels"
        )));
    }
    for (what, names) in [
        ("request", &spec.request_roles),
        ("review", &spec.review_roles),
    ] {
        if names.len() > MAX_ROLE_LABELS {
            return Err(invalid(format!(
                "a role may name at most {MAX_ROLE_LABELS} {what} roles"
            )));
        }
        if let Some(n) = names.iter().find(|n| !valid_name(n)) {
            return Err(invalid(format!("{what} role {n:?} is not a valid name")));
        }
    }
    if spec.max_session_ttl == 0 || spec.max_session_ttl > MAX_SESSION_TTL_SECS {
        return Err(invalid(format!(
            "the session cap must be between 1s and {}h",
            MAX_SESSION_TTL_SECS / 3600
        )));
    }
    store::put(store, Table::Roles, &spec.name, spec)?;
    Ok(())
}

fn holders(store: &dyn Store, name: &str) -> Result<Vec<String>, RpcError> {
    Ok(store::list::<UserRecord>(store, Table::Users, "")?
        .into_iter()
        .filter(|(_, u)| {
            u.roles.iter().any(|r| r == name) || (u.roles.is_empty() && name == DEFAULT_ROLE)
        })
        .map(|(_, u)| u.name)
        .collect())
}

/// Removes a role no user holds any more.
pub fn remove(store: &dyn Store, name: &str) -> Result<(), RpcError> {
    if builtin(name).is_some() {
        return Err(invalid(format!("role {name} is built in")));
    }
    let users = holders(store, name)?;
    if !users.is_empty() {
        return Err(invalid(format!(
            "role {name} is held by {}; change or remove those users first",
            users.join(", ")
        )));
    }
    let groups: Vec<String> =
        store::list::<edgeport_proto::rpc::SsoMapping>(store, Table::SsoMaps, "")?
            .into_iter()
            .filter(|(_, m)| m.roles.iter().any(|r| r == name))
            .map(|(_, m)| m.group)
            .collect();
    if !groups.is_empty() {
        return Err(invalid(format!(
            "role {name} is granted to single sign-on group(s) {}; change those mappings first",
            groups.join(", ")
        )));
    }
    match store.delete(Table::Roles, name)? {
        Some(_) => Ok(()),
        None => Err(not_found(format!("role {name} not found"))),
    }
}

/// Every role, built-in ones first, with the users holding it.
pub fn list(store: &dyn Store) -> Result<Vec<RoleInfo>, RpcError> {
    let mut out = Vec::new();
    if let Some(spec) = builtin(DEFAULT_ROLE) {
        out.push(RoleInfo {
            users: holders(store, DEFAULT_ROLE)?,
            spec,
            builtin: true,
        });
    }
    for (_, spec) in store::list::<RoleSpec>(store, Table::Roles, "")? {
        out.push(RoleInfo {
            users: holders(store, &spec.name)?,
            spec,
            builtin: false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn role(name: &str) -> RoleSpec {
        RoleSpec {
            name: name.into(),
            allow_labels: BTreeMap::from([("fleet".into(), vec!["vans".into()])]),
            deny_labels: BTreeMap::from([("env".into(), vec!["prod".into()])]),
            max_session_ttl: 3600,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            request_roles: Vec::new(),
            review_roles: Vec::new(),
            require_session_mfa: false,
            join_sessions: Vec::new(),
            require_moderator: BTreeMap::new(),
        }
    }

    #[test]
    fn join_rights_and_moderation_go_into_the_certificate() {
        let d = tempfile::tempdir().unwrap();
        let store = SledStore::open(&d.path().join("s")).unwrap();
        let mut support = role("support");
        support.join_sessions = vec!["observer".into(), "peer".into()];
        let mut medical = role("medical");
        medical.allow_labels = BTreeMap::from([("fleet".into(), vec!["medical".into()])]);
        medical.require_moderator = BTreeMap::from([("fleet".into(), vec!["medical".into()])]);
        upsert(&store, &support).unwrap();
        upsert(&store, &medical).unwrap();
        let mut bad = role("bad");
        bad.join_sessions = vec!["owner".into()];
        assert!(upsert(&store, &bad).is_err());
        let dev = |f: &str| BTreeMap::from([("fleet".to_string(), f.to_string())]);
        let g = grants(&store, &["support".into(), "medical".into()]).unwrap();
        assert!(g.extension.may_join(&dev("vans"), "peer"));
        assert!(!g.extension.may_join(&dev("vans"), "moderator"));
        assert!(!g.extension.may_join(&dev("medical"), "observer"));
        assert!(g.extension.requires_moderator(&dev("medical")));
        assert!(!g.extension.requires_moderator(&dev("vans")));
        let plain = grants(&store, &["support".into()]).unwrap();
        assert!(!plain.extension.requires_moderator(&dev("medical")));
    }

    #[test]
    fn session_mfa_follows_the_roles_that_ask_for_it() {
        let d = tempfile::tempdir().unwrap();
        let store = SledStore::open(&d.path().join("s")).unwrap();
        let mut medical = role("medical");
        medical.allow_labels = BTreeMap::from([("fleet".into(), vec!["medical".into()])]);
        medical.require_session_mfa = true;
        upsert(&store, &medical).unwrap();
        upsert(&store, &role("vans")).unwrap();
        let g = grants(&store, &["vans".into(), "medical".into()]).unwrap();
        let dev = |f: &str| BTreeMap::from([("fleet".to_string(), f.to_string())]);
        assert!(g.allows_device(&dev("medical")) && g.allows_device(&dev("vans")));
        assert!(g.requires_session_mfa(&dev("medical")));
        assert!(!g.requires_session_mfa(&dev("vans")));
        assert!(!grants(&store, &["vans".into()])
            .unwrap()
            .requires_session_mfa(&dev("medical")));
    }

    #[test]
    fn default_role_allows_everything_it_should() {
        let d = tempfile::tempdir().unwrap();
        let store = SledStore::open(&d.path().join("s")).unwrap();
        let g = grants(&store, &[]).unwrap();
        assert!(g.permit_pty && g.permit_port_forwarding && !g.permit_agent_forwarding);
        assert_eq!(g.extension.roles, ["access"]);
        assert!(g.allows_device(&BTreeMap::new()));
        assert!(grants(&store, &["nope".into()])
            .unwrap_err()
            .message
            .contains("unknown role"));
    }

    #[test]
    fn stored_roles_restrict_and_combine() {
        let d = tempfile::tempdir().unwrap();
        let store = SledStore::open(&d.path().join("s")).unwrap();
        upsert(&store, &role("vans")).unwrap();
        let g = grants(&store, &["vans".into()]).unwrap();
        assert!(!g.permit_port_forwarding && g.permit_pty);
        assert_eq!(g.max_session_ttl, 3600);
        let dev = |f: &str, e: &str| {
            BTreeMap::from([
                ("fleet".to_string(), f.to_string()),
                ("env".into(), e.into()),
            ])
        };
        assert!(g.allows_device(&dev("vans", "dev")));
        assert!(!g.allows_device(&dev("vans", "prod")), "deny wins");
        assert!(!g.allows_device(&dev("robots", "dev")));
        // With `access` too, every device is allowed again, but the denial still holds.
        let both = grants(&store, &["vans".into(), "access".into()]).unwrap();
        assert!(both.allows_device(&dev("robots", "dev")));
        assert!(!both.allows_device(&dev("vans", "prod")));
        assert!(both.permit_port_forwarding);
        assert_eq!(both.max_session_ttl, 3600, "the smallest cap applies");
        // Two restricted roles are alternatives, not a cross product.
        let mut trucks = role("trucks");
        trucks.allow_labels = BTreeMap::from([
            ("fleet".into(), vec!["trucks".into()]),
            ("region".into(), vec!["eu".into()]),
        ]);
        upsert(&store, &trucks).unwrap();
        let g = grants(&store, &["vans".into(), "trucks".into()]).unwrap();
        let dev3 = |f: &str, r: &str| {
            BTreeMap::from([
                ("fleet".to_string(), f.to_string()),
                ("region".into(), r.into()),
            ])
        };
        assert!(g.allows_device(&dev3("vans", "us")));
        assert!(g.allows_device(&dev3("trucks", "eu")));
        assert!(!g.allows_device(&dev3("trucks", "us")));
    }

    #[test]
    fn bad_roles_are_refused_and_builtin_is_fixed() {
        let d = tempfile::tempdir().unwrap();
        let store = SledStore::open(&d.path().join("s")).unwrap();
        assert!(upsert(&store, &role("access")).is_err());
        let mut r = role("x");
        r.max_session_ttl = 0;
        assert!(upsert(&store, &r).is_err());
        let mut r = role("x");
        r.allow_labels.insert("bad key".into(), vec!["v".into()]);
        assert!(upsert(&store, &r).is_err());
        assert!(remove(&store, "access").is_err());
        assert!(remove(&store, "missing").is_err());
        upsert(&store, &role("x")).unwrap();
        assert_eq!(list(&store).unwrap().len(), 2);
        remove(&store, "x").unwrap();
        assert_eq!(list(&store).unwrap().len(), 1);
    }
}
