//! `tctl sso map | ls | unmap`: what members of an identity provider group get when they
//! log in with `tsh login --auth oidc`; `tctl sso connectors add | ls | rm`: the identity
//! providers the authority accepts.

use std::path::Path;

use anyhow::Context;
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{
    Request, Response, SsoConnectorInfo, SsoConnectorKind, SsoConnectorSpec, SsoMapping,
};
use serde_json::json;

use super::cli::{ConnectorAddCmd, ConnectorsCmd, Format, FormatArgs, SsoMapArgs};
use super::connect::Session;
use super::output::{csv, json_list, print_as, Table};

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
            crate::outln!("members of group {} are mapped", a.group);
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
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&maps, mapping_json)),
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
            crate::outln!("group {group} is no longer mapped");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn connectors(s: &mut Session, c: ConnectorsCmd) -> anyhow::Result<()> {
    match c {
        ConnectorsCmd::Add(a) => connector_add(s, a).await,
        ConnectorsCmd::Ls(a) => connector_list(s, a).await,
        ConnectorsCmd::Rm { name } => {
            match s
                .call(Request::SsoConnectorRemove { name: name.clone() })
                .await?
            {
                Response::Ok => {
                    crate::outln!("single sign-on connector {name} removed");
                    Ok(())
                }
                other => Err(unexpected(other).into()),
            }
        }
    }
}

/// A client secret from its file (trimmed; an empty file is an error).
fn read_secret(path: &Path) -> anyhow::Result<String> {
    let secret = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the client secret {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!secret.is_empty(), "{} is empty", path.display());
    Ok(secret)
}

fn read_ca(path: Option<&Path>) -> anyhow::Result<Option<String>> {
    path.map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()
}

async fn connector_add(s: &mut Session, a: ConnectorAddCmd) -> anyhow::Result<()> {
    let spec = match a {
        ConnectorAddCmd::Oidc(o) => SsoConnectorSpec {
            name: "oidc".into(),
            client_id: o.client_id,
            client_secret: read_secret(&o.client_secret_file)?,
            ca_pem: read_ca(o.ca_file.as_deref())?,
            kind: SsoConnectorKind::Oidc {
                issuer: o.issuer,
                username_claim: o.username_claim,
                groups_claim: o.groups_claim,
                scopes: o.scopes,
            },
            web_origins: o.web_origins,
        },
        ConnectorAddCmd::Github(g) => SsoConnectorSpec {
            name: "github".into(),
            client_id: g.client_id,
            client_secret: read_secret(&g.client_secret_file)?,
            ca_pem: read_ca(g.ca_file.as_deref())?,
            kind: SsoConnectorKind::GitHub {
                url: g.github_url,
                api_url: g.api_url,
            },
            web_origins: g.web_origins,
        },
    };
    let name = spec.name.clone();
    match s.call(Request::SsoConnectorAdd(spec)).await? {
        Response::Ok => {
            crate::outln!("single sign-on connector {name} saved (tsh login --auth {name})");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

async fn connector_list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let list = match s.call(Request::SsoConnectorList).await? {
        Response::SsoConnectors(l) => l,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&list, connector_json)),
        Format::Text => {
            let mut t = Table::new(&["NAME", "CLIENT ID", "PROVIDER", "WEB ORIGINS", "SETTINGS"]);
            for c in &list {
                let (provider, settings) = match &c.kind {
                    SsoConnectorKind::Oidc {
                        issuer,
                        username_claim,
                        groups_claim,
                        scopes,
                    } => (
                        issuer.clone(),
                        format!(
                            "user={username_claim} groups={groups_claim} scopes={}",
                            csv(scopes)
                        ),
                    ),
                    SsoConnectorKind::GitHub { url, api_url } => {
                        (url.clone(), format!("api={api_url}"))
                    }
                };
                let ca = if c.custom_ca { " ca=custom" } else { "" };
                let web = if c.web_origins.is_empty() {
                    "off".to_string()
                } else {
                    csv(&c.web_origins)
                };
                t.row(vec![
                    c.name.clone(),
                    c.client_id.clone(),
                    provider,
                    web,
                    format!("{settings}{ca}"),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

fn connector_json(c: &SsoConnectorInfo) -> serde_json::Value {
    let mut v = json!({
        "name": c.name,
        "client_id": c.client_id,
        "custom_ca": c.custom_ca,
        "web_origins": c.web_origins,
    });
    match &c.kind {
        SsoConnectorKind::Oidc {
            issuer,
            username_claim,
            groups_claim,
            scopes,
        } => {
            v["type"] = json!("oidc");
            v["issuer"] = json!(issuer);
            v["username_claim"] = json!(username_claim);
            v["groups_claim"] = json!(groups_claim);
            v["scopes"] = json!(scopes);
        }
        SsoConnectorKind::GitHub { url, api_url } => {
            v["type"] = json!("github");
            v["github_url"] = json!(url);
            v["api_url"] = json!(api_url);
        }
    }
    v
}
