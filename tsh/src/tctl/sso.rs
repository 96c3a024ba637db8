//! `tctl sso map | ls | unmap`: what members of an identity provider group get when they
//! log in with `tsh login --auth oidc`.

use edgeport_proto::rpc::{Request, Response, SsoMapping};
use edgeport_proto::rpc_client::unexpected;
use serde_json::json;

use super::cli::{Format, FormatArgs, SsoMapArgs};
use super::connect::Session;
use super::output::{csv, json_list, print_json, Table};

pub async fn map(s: &mut Session, a: SsoMapArgs) -> anyhow::Result<()> {
    let m = SsoMapping {
        group: a.group.clone(),
        roles: a.grant.roles,
        logins: a.grant.logins,
        kube_groups: a.grant.kube_groups,
        kube_users: a.grant.kube_users,
    };
    match s.call(Request::SsoMapSet(m)).await? {
        Response::Ok => {
            println!("members of group {} are mapped", a.group);
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let maps = match s.call(Request::SsoMapList).await? {
        Response::SsoMaps(m) => m,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json => print_json(&json_list(&maps, mapping_json)),
        Format::Text => {
            let mut t = Table::new(&["GROUP", "ROLES", "LOGINS", "KUBE GROUPS", "KUBE USERS"]);
            for m in &maps {
                t.row(vec![
                    m.group.clone(),
                    csv(&m.roles),
                    csv(&m.logins),
                    csv(&m.kube_groups),
                    csv(&m.kube_users),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

fn mapping_json(m: &SsoMapping) -> serde_json::Value {
    json!({
        "group": m.group,
        "roles": m.roles,
        "logins": m.logins,
        "kube_groups": m.kube_groups,
        "kube_users": m.kube_users,
    })
}

pub async fn unmap(s: &mut Session, group: String) -> anyhow::Result<()> {
    match s
        .call(Request::SsoMapRemove {
            group: group.clone(),
        })
        .await?
    {
        Response::Ok => {
            println!("group {group} is no longer mapped");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}
