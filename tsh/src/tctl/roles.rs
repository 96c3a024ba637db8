//! `tctl roles add | update | ls | rm`: what users' certificates allow (DESIGN section 6).
//!
//! `add` never replaces a role (a replacement would silently drop the fields not given, deny
//! rules included); `update` reads the role, changes only the fields given and writes it back.

use std::collections::BTreeMap;

use anyhow::bail;

use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{Request, Response, RoleInfo, RoleSpec};
use serde_json::json;

use super::cli::{Format, FormatArgs, RoleAddArgs, RoleUpdateArgs};
use super::connect::Session;
use super::output::{csv, duration_text, json_list, print_as, Table};

/// `k=v,k=v2,k2=*` -> {k: [v, v2], k2: [*]}: repeating a key allows several values.
pub fn parse_label_rules(s: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected key=value (value `*` = any)"))?;
        let (k, v) = (k.trim(), v.trim());
        let ok = |x: &str| edgeport_proto::util::valid_name(x);
        if !ok(k) || !(v == "*" || ok(v)) {
            return Err(format!("{part:?}: keys and values are names (or `*`)"));
        }
        let vals = out.entry(k.to_string()).or_default();
        if !vals.iter().any(|x| x == v) {
            vals.push(v.to_string());
        }
    }
    Ok(out)
}

fn rules_text(rules: &BTreeMap<String, Vec<String>>) -> String {
    rules
        .iter()
        .map(|(k, vs)| format!("{k}={}", vs.join("|")))
        .collect::<Vec<_>>()
        .join(",")
}

async fn list_roles(s: &mut Session) -> anyhow::Result<Vec<RoleInfo>> {
    match s.call(Request::RoleList).await? {
        Response::Roles(r) => Ok(r),
        other => Err(unexpected(other).into()),
    }
}

pub async fn add(s: &mut Session, a: RoleAddArgs) -> anyhow::Result<()> {
    // Checked here, not by the authority (which upserts): two administrators adding the same
    // name at the same moment can still both succeed, the later one winning.
    if list_roles(s).await?.iter().any(|r| r.spec.name == a.name) {
        bail!(
            "role {} exists: change it with `tctl roles update {}` (or `tctl roles rm` it first)",
            a.name,
            a.name
        );
    }
    let spec = RoleSpec {
        name: a.name.clone(),
        allow_labels: a.allow,
        deny_labels: a.deny,
        max_session_ttl: a.max_session_ttl,
        permit_pty: !a.no_pty,
        permit_port_forwarding: !a.no_port_forwarding,
        permit_agent_forwarding: a.agent_forwarding,
        request_roles: nonempty(a.request_roles),
        review_roles: nonempty(a.review_roles),
        require_session_mfa: a.require_session_mfa,
        join_sessions: nonempty(a.join_sessions),
        require_moderator: a.require_moderator,
    };
    match s.call(Request::RoleUpsert(spec)).await? {
        Response::Ok => {
            crate::outln!("role {} saved", a.name);
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

/// `--request-roles ""` is no role, not one empty name.
fn nonempty(v: Vec<String>) -> Vec<String> {
    v.into_iter().filter(|r| !r.trim().is_empty()).collect()
}

/// `spec` with the fields `a` gives changed; `None` when it gives none.
fn updated(mut spec: RoleSpec, a: RoleUpdateArgs) -> Option<RoleSpec> {
    let asked = a.allow.is_some()
        || a.deny.is_some()
        || a.no_pty
        || a.pty
        || a.no_port_forwarding
        || a.port_forwarding
        || a.agent_forwarding
        || a.no_agent_forwarding
        || a.max_session_ttl.is_some()
        || a.request_roles.is_some()
        || a.review_roles.is_some()
        || a.require_session_mfa
        || a.no_require_session_mfa
        || a.join_sessions.is_some()
        || a.require_moderator.is_some();
    if let Some(allow) = a.allow {
        spec.allow_labels = allow;
    }
    if let Some(deny) = a.deny {
        spec.deny_labels = deny;
    }
    if a.no_pty || a.pty {
        spec.permit_pty = a.pty;
    }
    if a.no_port_forwarding || a.port_forwarding {
        spec.permit_port_forwarding = a.port_forwarding;
    }
    if a.agent_forwarding || a.no_agent_forwarding {
        spec.permit_agent_forwarding = a.agent_forwarding;
    }
    if let Some(ttl) = a.max_session_ttl {
        spec.max_session_ttl = ttl;
    }
    if let Some(r) = a.request_roles {
        spec.request_roles = nonempty(r);
    }
    if let Some(r) = a.review_roles {
        spec.review_roles = nonempty(r);
    }
    if a.require_session_mfa || a.no_require_session_mfa {
        spec.require_session_mfa = a.require_session_mfa;
    }
    if let Some(j) = a.join_sessions {
        spec.join_sessions = nonempty(j);
    }
    if let Some(m) = a.require_moderator {
        spec.require_moderator = m;
    }
    asked.then_some(spec)
}

pub async fn update(s: &mut Session, a: RoleUpdateArgs) -> anyhow::Result<()> {
    let name = a.name.clone();
    let roles = list_roles(s).await?;
    let Some(role) = roles.into_iter().find(|r| r.spec.name == name) else {
        bail!("no role {name}: add it with `tctl roles add {name}`");
    };
    if role.builtin {
        bail!("role {name} is built in and cannot be changed");
    }
    let Some(spec) = updated(role.spec, a) else {
        bail!(
            "nothing to change: give --allow, --deny, --[no-]pty, --[no-]port-forwarding, \
             --[no-]agent-forwarding, --max-session-ttl, --request-roles, --review-roles or \
             --[no-]require-session-mfa, --join-sessions or --require-moderator"
        );
    };
    match s.call(Request::RoleUpsert(spec)).await? {
        Response::Ok => {
            crate::outln!("role {name} updated");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let roles = list_roles(s).await?;
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&roles, role_json)),
        Format::Text => {
            let mut t = Table::new(&[
                "NAME",
                "DEVICES",
                "DENY",
                "PTY",
                "FORWARD",
                "AGENT",
                "MAX TTL",
                "JOIN",
                "MODERATED",
                "USERS",
            ]);
            for r in &roles {
                let sp = &r.spec;
                t.row(vec![
                    if r.builtin {
                        format!("{} (built in)", sp.name)
                    } else {
                        sp.name.clone()
                    },
                    if sp.allow_labels.is_empty() {
                        "all".into()
                    } else {
                        rules_text(&sp.allow_labels)
                    },
                    rules_text(&sp.deny_labels),
                    yes_no(sp.permit_pty),
                    yes_no(sp.permit_port_forwarding),
                    yes_no(sp.permit_agent_forwarding),
                    duration_text(sp.max_session_ttl),
                    csv(&sp.join_sessions),
                    rules_text(&sp.require_moderator),
                    csv(&r.users),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn role_json(r: &RoleInfo) -> serde_json::Value {
    json!({
        "name": r.spec.name,
        "builtin": r.builtin,
        "allow_labels": r.spec.allow_labels,
        "deny_labels": r.spec.deny_labels,
        "max_session_ttl_secs": r.spec.max_session_ttl,
        "permit_pty": r.spec.permit_pty,
        "permit_port_forwarding": r.spec.permit_port_forwarding,
        "permit_agent_forwarding": r.spec.permit_agent_forwarding,
        "request_roles": r.spec.request_roles,
        "review_roles": r.spec.review_roles,
        "require_session_mfa": r.spec.require_session_mfa,
        "join_sessions": r.spec.join_sessions,
        "require_moderator": r.spec.require_moderator,
        "users": r.users,
    })
}

pub async fn remove(s: &mut Session, name: String) -> anyhow::Result<()> {
    match s.call(Request::RoleRemove { name: name.clone() }).await? {
        Response::Ok => {
            crate::outln!("role {name} removed");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_rules_collect_values_per_key() {
        let r = parse_label_rules("fleet=vans, fleet=trucks,region=*").unwrap();
        assert_eq!(r["fleet"], ["vans", "trucks"]);
        assert_eq!(r["region"], ["*"]);
        assert!(parse_label_rules("fleet").is_err());
        assert!(parse_label_rules("a b=c").is_err());
        assert!(parse_label_rules("").unwrap().is_empty());
    }

    fn args(name: &str) -> RoleUpdateArgs {
        RoleUpdateArgs {
            name: name.into(),
            allow: None,
            deny: None,
            no_pty: false,
            pty: false,
            no_port_forwarding: false,
            port_forwarding: false,
            agent_forwarding: false,
            no_agent_forwarding: false,
            max_session_ttl: None,
            request_roles: None,
            review_roles: None,
            require_session_mfa: false,
            no_require_session_mfa: false,
            join_sessions: None,
            require_moderator: None,
        }
    }

    #[test]
    fn update_changes_only_the_fields_given() {
        let spec = RoleSpec {
            name: "field".into(),
            allow_labels: parse_label_rules("fleet=vans").unwrap(),
            deny_labels: parse_label_rules("env=prod").unwrap(),
            max_session_ttl: 8 * 3600,
            permit_pty: true,
            permit_port_forwarding: false,
            permit_agent_forwarding: false,
            request_roles: Vec::new(),
            review_roles: Vec::new(),
            require_session_mfa: false,
            join_sessions: Vec::new(),
            require_moderator: BTreeMap::new(),
        };
        assert!(updated(spec.clone(), args("field")).is_none());
        let got = updated(
            spec.clone(),
            RoleUpdateArgs {
                join_sessions: Some(vec!["observer".into(), "peer".into()]),
                require_moderator: Some(parse_label_rules("fleet=medical").unwrap()),
                ..args("field")
            },
        )
        .unwrap();
        assert_eq!(got.join_sessions, ["observer", "peer"]);
        assert_eq!(got.require_moderator["fleet"], ["medical"]);
        assert_eq!(got.allow_labels, spec.allow_labels);
        let got = updated(
            spec.clone(),
            RoleUpdateArgs {
                max_session_ttl: Some(3600),
                no_pty: true,
                ..args("field")
            },
        )
        .unwrap();
        assert_eq!(
            got,
            RoleSpec {
                max_session_ttl: 3600,
                permit_pty: false,
                ..spec.clone()
            }
        );
        let got = updated(
            spec.clone(),
            RoleUpdateArgs {
                deny: Some(BTreeMap::new()),
                port_forwarding: true,
                ..args("field")
            },
        )
        .unwrap();
        assert!(got.deny_labels.is_empty() && got.permit_port_forwarding);
        assert_eq!(got.allow_labels, spec.allow_labels);
    }
}
