//! `tctl users add | ls | rm | update`.

use std::io::Read;

use anyhow::{bail, Context};
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{Request, Response, UserInfo, UserSpec, UserUpdate};
use edgeport_proto::util::{format_time, valid_name};
use serde_json::json;

use super::cli::{Format, FormatArgs, UserAddArgs, UserUpdateArgs};
use super::connect::Session;
use super::output::{csv, expiry_text, json_list, print_as, time_json, Table};

pub async fn add(s: &mut Session, a: UserAddArgs) -> anyhow::Result<()> {
    for n in std::iter::once(&a.name).chain(&a.grant.logins) {
        if !valid_name(n) {
            bail!("invalid name {n:?}: use letters, digits, '.', '_' or '-'");
        }
    }
    let password = if a.password_stdin {
        Some(read_password()?)
    } else {
        None
    };
    let spec = UserSpec {
        name: a.name.clone(),
        logins: a.grant.logins,
        roles: a.grant.roles,
        kube_groups: a.grant.kube_groups,
        kube_users: a.grant.kube_users,
        password,
        require_totp: a.require_totp,
    };
    match s.call(Request::UserAdd(spec)).await? {
        Response::UserAdded {
            invite: Some(code),
            invite_expires,
        } => {
            // A first login needs the CA pin to verify the gateway: print it in the line. The
            // user exists already, so a failure here must not lose the code: the identity
            // file's copy of the pin is the fallback.
            let pin = match s.call(Request::ExportCas).await {
                Ok(Response::Cas(cas)) => cas.ca_pin,
                _ => s.cas.ca_pin.clone(),
            };
            crate::outln!("user {} added", a.name);
            crate::outln!();
            crate::outln!("One-time invite code: {code}");
            if let Some(exp) = invite_expires {
                crate::outln!("It expires {}.", expiry_text(exp));
            }
            crate::outln!(
                "The user chooses a password and logs in with (GATEWAY:3080: the gateway's address):"
            );
            crate::outln!("  {}", invite_line(&a.name, &code, &pin));
        }
        Response::UserAdded { invite: None, .. } | Response::Ok => {
            crate::outln!("user {} added", a.name);
        }
        other => return Err(unexpected(other).into()),
    }
    Ok(())
}

/// The first login of an invited user, as printed by `tctl users add`.
fn invite_line(user: &str, code: &str, pin: &str) -> String {
    format!("tsh login --proxy GATEWAY:3080 --user {user} --invite {code} --ca-pin {pin}")
}

/// One line from stdin, without its line ending.
fn read_password() -> anyhow::Result<String> {
    let mut buf = String::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut buf)
        .context("cannot read the password from standard input")?;
    let pw = buf.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        bail!("--password-stdin: standard input holds no password");
    }
    Ok(pw)
}

async fn list_users(s: &mut Session) -> anyhow::Result<Vec<UserInfo>> {
    match s.call(Request::UserList).await? {
        Response::Users(u) => Ok(u),
        other => Err(unexpected(other).into()),
    }
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let users = list_users(s).await?;
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&users, user_json)),
        Format::Text => {
            let mut t = Table::new(&[
                "NAME",
                "LOGINS",
                "ROLES",
                "KUBE GROUPS",
                "PASSWORD",
                "2FA",
                "LOCKED",
                "CREATED",
            ]);
            for u in &users {
                t.row(vec![
                    u.name.clone(),
                    csv(&u.logins),
                    csv(&u.roles),
                    csv(&u.kube_groups),
                    if u.has_password { "set" } else { "invite" }.into(),
                    if u.second_factor.is_empty() {
                        "-".into()
                    } else {
                        u.second_factor.clone()
                    },
                    if u.locked { "yes" } else { "no" }.into(),
                    format_time(u.created),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

fn user_json(u: &UserInfo) -> serde_json::Value {
    json!({
        "name": u.name,
        "logins": u.logins,
        "roles": u.roles,
        "kube_groups": u.kube_groups,
        "kube_users": u.kube_users,
        "has_password": u.has_password,
        "second_factor": u.second_factor,
        "locked": u.locked,
        "created": time_json(u.created),
    })
}

pub async fn remove(s: &mut Session, name: String) -> anyhow::Result<()> {
    match s.call(Request::UserRemove { name: name.clone() }).await? {
        Response::Ok => {
            crate::outln!("user {name} removed");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

/// `--set-kube-groups ""` clears the list: empty items are dropped.
fn list_arg(v: Option<Vec<String>>) -> Option<Vec<String>> {
    v.map(|items| items.into_iter().filter(|i| !i.is_empty()).collect())
}

pub async fn update(s: &mut Session, a: UserUpdateArgs) -> anyhow::Result<()> {
    let change = UserUpdate {
        name: a.name.clone(),
        logins: list_arg(a.set_logins),
        roles: list_arg(a.set_roles),
        kube_groups: list_arg(a.set_kube_groups),
        kube_users: list_arg(a.set_kube_users),
        require_totp: match (a.require_totp, a.no_require_totp) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        reset_totp: a.reset_totp,
    };
    match s.call(Request::UserUpdate(change)).await? {
        Response::Ok => {
            crate::outln!("user {} updated", a.name);
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}
