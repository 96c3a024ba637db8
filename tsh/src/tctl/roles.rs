//! `tctl roles add | ls | rm`: what users' certificates allow (DESIGN section 6).

use std::collections::BTreeMap;

use edgeport_proto::rpc::{Request, Response, RoleInfo, RoleSpec};
use edgeport_proto::rpc_client::unexpected;
use serde_json::json;

use super::cli::{Format, FormatArgs, RoleAddArgs};
use super::connect::Session;
use super::output::{csv, json_list, print_json, Table};

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

pub async fn add(s: &mut Session, a: RoleAddArgs) -> anyhow::Result<()> {
    let spec = RoleSpec {
        name: a.name.clone(),
        allow_labels: a.allow,
        deny_labels: a.deny,
        max_session_ttl: a.max_session_ttl,
        permit_pty: !a.no_pty,
        permit_port_forwarding: !a.no_port_forwarding,
        permit_agent_forwarding: false,
    };
    match s.call(Request::RoleUpsert(spec)).await? {
        Response::Ok => {
            println!("role {} saved", a.name);
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let roles = match s.call(Request::RoleList).await? {
        Response::Roles(r) => r,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json => print_json(&json_list(&roles, role_json)),
        Format::Text => {
            let mut t = Table::new(&[
                "NAME", "DEVICES", "DENY", "PTY", "FORWARD", "MAX TTL", "USERS",
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
                    format!(
                        "{}h{:02}m",
                        sp.max_session_ttl / 3600,
                        sp.max_session_ttl % 3600 / 60
                    ),
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
        "users": r.users,
    })
}

pub async fn remove(s: &mut Session, name: String) -> anyhow::Result<()> {
    match s.call(Request::RoleRemove { name: name.clone() }).await? {
        Response::Ok => {
            println!("role {name} removed");
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
}
