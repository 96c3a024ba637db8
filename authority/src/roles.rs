//! Roles: what a user's certificates allow. For now the roles are built in (DESIGN §6 names
//! the shape; role management arrives with its own RPC): `access` reaches every device with
//! the user's own logins, a PTY and port forwarding, for sessions of up to 12 hours.

use std::collections::BTreeMap;

use edgeport_proto::sshcert::RolesExtension;

/// The role a user gets when none is named.
pub const DEFAULT_ROLE: &str = "access";

/// The longest session any role may grant (also the cap of `tctl auth sign --ttl`).
pub const MAX_SESSION_TTL_SECS: u64 = 12 * 3600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub name: &'static str,
    /// Label key -> allowed values (`*` = any); empty = every device.
    pub allow_labels: BTreeMap<String, Vec<String>>,
    pub deny_labels: BTreeMap<String, Vec<String>>,
    pub max_session_ttl: u64,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
}

/// The built-in roles.
pub fn builtin(name: &str) -> Option<Role> {
    match name {
        "access" => Some(Role {
            name: "access",
            allow_labels: BTreeMap::new(),
            deny_labels: BTreeMap::new(),
            max_session_ttl: MAX_SESSION_TTL_SECS,
            permit_pty: true,
            permit_port_forwarding: true,
            permit_agent_forwarding: false,
        }),
        _ => None,
    }
}

/// Names of the built-in roles, for error messages.
pub fn builtin_names() -> &'static [&'static str] {
    &["access"]
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
}

/// Combines `names` (an empty list means the default role). Permissions are the union of the
/// roles', the session cap the smallest, denials all apply; a role allowing every device makes
/// the allow rules empty, otherwise allowed values are merged per label.
pub fn grants(names: &[String]) -> Result<Grants, String> {
    let default = [DEFAULT_ROLE.to_string()];
    let names = if names.is_empty() {
        &default[..]
    } else {
        names
    };
    let mut g = Grants {
        max_session_ttl: MAX_SESSION_TTL_SECS,
        permit_pty: false,
        permit_port_forwarding: false,
        permit_agent_forwarding: false,
        extension: RolesExtension::default(),
    };
    let mut allow_all = false;
    for name in names {
        let role = builtin(name).ok_or_else(|| {
            format!(
                "unknown role {name:?} (roles: {})",
                builtin_names().join(", ")
            )
        })?;
        g.max_session_ttl = g.max_session_ttl.min(role.max_session_ttl);
        g.permit_pty |= role.permit_pty;
        g.permit_port_forwarding |= role.permit_port_forwarding;
        g.permit_agent_forwarding |= role.permit_agent_forwarding;
        allow_all |= role.allow_labels.is_empty();
        merge(&mut g.extension.allow_labels, &role.allow_labels);
        merge(&mut g.extension.deny_labels, &role.deny_labels);
        if !g.extension.roles.contains(name) {
            g.extension.roles.push(name.clone());
        }
    }
    if allow_all {
        g.extension.allow_labels.clear();
    }
    Ok(g)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_role_allows_everything_it_should() {
        let g = grants(&[]).unwrap();
        assert!(g.permit_pty && g.permit_port_forwarding && !g.permit_agent_forwarding);
        assert_eq!(g.extension.roles, ["access"]);
        assert!(g.allows_device(&BTreeMap::new()));
        assert!(grants(&["nope".into()])
            .unwrap_err()
            .contains("unknown role"));
    }
}
