//! `tctl lock`, `tctl unlock`, `tctl locks ls`.

use anyhow::bail;
use edgeport_net::clock::now_secs;
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{LockSpec, LockTarget, Request, Response};
use edgeport_proto::util::valid_name;
use serde_json::json;

use super::cli::{Format, FormatArgs, LockArgs, Target, UnlockArgs};
use super::connect::Session;
use super::output::{expiry_text, json_list, print_as, time_json, Table};

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
            crate::outln!("{} locked until {until}", describe(&target));
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn unlock(s: &mut Session, a: UnlockArgs) -> anyhow::Result<()> {
    let target = match a.name {
        Some(name) => {
            let locks = list_locks(s).await?;
            lock_named(&locks, &name, now_secs())?
        }
        None => target(Target {
            user: a.user,
            device: a.device,
            gateway: a.gateway,
        })?,
    };
    match s
        .call(Request::LockRemove {
            target: target.clone(),
        })
        .await?
    {
        Response::Ok | Response::Locks(_) => {
            crate::outln!("{} unlocked", describe(&target));
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

/// The target of the one lock in force whose name is `name` (`tctl unlock NAME`).
fn lock_named(locks: &[LockSpec], name: &str, now: u64) -> anyhow::Result<LockTarget> {
    let matching: Vec<&LockTarget> = locks
        .iter()
        .filter(|l| l.expires == 0 || l.expires > now)
        .map(|l| &l.target)
        .filter(|t| target_name(t) == name)
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("no lock in force names {name:?} (`tctl locks ls` lists them)"),
        several => bail!(
            "{name:?} names {} locks ({}): say which with --user, --device or --gateway",
            several.len(),
            several
                .iter()
                .map(|t| describe(t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn target_name(t: &LockTarget) -> &str {
    match t {
        LockTarget::User(n) | LockTarget::Device(n) | LockTarget::Gateway(n) => n,
    }
}

async fn list_locks(s: &mut Session) -> anyhow::Result<Vec<LockSpec>> {
    match s.call(Request::LockList).await? {
        Response::Locks(l) => Ok(l),
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
        "type": kind,
        "target": name,
        "message": l.message,
        "expires": time_json(l.expires),
    })
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let locks = list_locks(s).await?;
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&locks, lock_json)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(target: LockTarget, expires: u64) -> LockSpec {
        LockSpec {
            target,
            message: String::new(),
            expires,
        }
    }

    #[test]
    fn unlock_by_name_needs_exactly_one_lock_in_force() {
        let locks = [
            lock(LockTarget::User("alice".into()), 0),
            lock(LockTarget::Device("van-1".into()), 0),
            lock(LockTarget::User("van-1".into()), 2000),
            lock(LockTarget::Device("old".into()), 500),
        ];
        assert_eq!(
            lock_named(&locks, "alice", 1000).unwrap(),
            LockTarget::User("alice".into())
        );
        let e = lock_named(&locks, "van-1", 1000).unwrap_err().to_string();
        assert!(
            e.contains("names 2 locks (device van-1, user van-1)"),
            "{e}"
        );
        assert!(e.contains("--user, --device or --gateway"), "{e}");
        // Expired locks are not in force.
        assert_eq!(
            lock_named(&locks, "van-1", 3000).unwrap(),
            LockTarget::Device("van-1".into())
        );
        let e = lock_named(&locks, "old", 1000).unwrap_err().to_string();
        assert!(e.contains("no lock in force"), "{e}");
    }
}
