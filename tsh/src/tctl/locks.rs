//! `tctl lock`, `tctl unlock`, `tctl locks ls`.

use anyhow::bail;
use edgeport_proto::rpc::{LockSpec, LockTarget, Request, Response};
use edgeport_proto::rpc_client::unexpected;
use edgeport_proto::util::{now_secs, valid_name};
use serde_json::json;

use super::cli::{Format, FormatArgs, LockArgs, Target, UnlockArgs};
use super::connect::Session;
use super::output::{expiry_text, json_list, print_json, time_json, Table};

fn target(t: Target) -> anyhow::Result<LockTarget> {
    let target = match (t.user, t.device, t.gateway) {
        (Some(u), None, None) => LockTarget::User(u),
        (None, Some(d), None) => LockTarget::Device(d),
        (None, None, Some(g)) => LockTarget::Gateway(g),
        _ => bail!("give exactly one of --user, --device and --gateway"),
    };
    let name = match &target {
        LockTarget::User(n) | LockTarget::Device(n) | LockTarget::Gateway(n) => n,
    };
    if !valid_name(name) {
        bail!("invalid name {name:?}");
    }
    Ok(target)
}

fn describe(t: &LockTarget) -> String {
    match t {
        LockTarget::User(n) => format!("user {n}"),
        LockTarget::Device(n) => format!("device {n}"),
        LockTarget::Gateway(n) => format!("gateway {n}"),
    }
}

pub async fn lock(s: &mut Session, a: LockArgs) -> anyhow::Result<()> {
    let target = target(a.target)?;
    let expires = match a.ttl {
        Some(0) => bail!("--ttl must be more than 0"),
        Some(ttl) => now_secs().saturating_add(ttl),
        None => 0,
    };
    let spec = LockSpec {
        target: target.clone(),
        message: a.message,
        expires,
    };
    match s.call(Request::LockAdd(spec)).await? {
        Response::Ok | Response::Locks(_) => {
            let until = if expires == 0 {
                "`tctl unlock`".to_string()
            } else {
                expiry_text(expires)
            };
            println!("{} locked until {until}", describe(&target));
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn unlock(s: &mut Session, a: UnlockArgs) -> anyhow::Result<()> {
    let target = target(a.target)?;
    match s
        .call(Request::LockRemove {
            target: target.clone(),
        })
        .await?
    {
        Response::Ok | Response::Locks(_) => {
            println!("{} unlocked", describe(&target));
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

fn lock_json(l: &LockSpec) -> serde_json::Value {
    let (kind, name) = match &l.target {
        LockTarget::User(n) => ("user", n),
        LockTarget::Device(n) => ("device", n),
        LockTarget::Gateway(n) => ("gateway", n),
    };
    json!({
        "kind": kind,
        "target": name,
        "message": l.message,
        "expires": time_json(l.expires),
    })
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let locks = match s.call(Request::LockList).await? {
        Response::Locks(l) => l,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json => print_json(&json_list(&locks, lock_json)),
        Format::Text => {
            let mut t = Table::new(&["TARGET", "EXPIRES", "MESSAGE"]);
            for l in &locks {
                t.row(vec![
                    describe(&l.target),
                    expiry_text(l.expires),
                    l.message.clone(),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}
